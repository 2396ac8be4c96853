"""
The access-request gate: asking the webhook, synchronously, whether a
connection may exchange data.  It sends at once (not through the event
queue), waits at most its own timeout, and turns whatever comes back
(an answer, garbage, an error status, a timeout, a connection error) into
a L{GateResult}, with C{on_error} deciding when the answer is unclear.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import Any

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from proxy_app.config import Gate
from proxy_app.webhook._client import (
    MAX_REPLY_BYTES,
    Reply,
    WebhookClient,
    WebhookTimeout,
)
from proxy_app.webhook._delivery import Tally
from proxy_app.webhook._log import log
from proxy_app.webhook._messages import ACCESS_REQUEST, Messages, serialize


@attr.s(frozen=True, slots=True, auto_attribs=True)
class GateResult:
    """
    The outcome of one access request.

    @ivar accepted: whether the connection may go ahead.
    @ivar reason: why, in words (for logs and the deny body), e.g.
        C{"rejected by webhook"} or C{"webhook timed out after 5 s;
        on_error=reject"}.
    @ivar reply: the webhook's reply body: parsed JSON if it was JSON, else
        its text; L{None} if nothing (or nothing usable) came back.  It is
        what C{connection-info}'s C{access-request} carries.
    @ivar latency: seconds from sending the request to the outcome.
    """

    accepted: bool
    reason: str
    reply: Any = None
    latency: float = 0.0


def approvedAddresses(reply: Any, addresses: Sequence[str]) -> tuple[str, ...]:
    """
    Which of C{addresses} (those an access request named) a reply that
    accepted approves: all of them, unless the reply is a JSON object with
    an C{addresses} member, which then lists the approved ones.  Only
    C{addresses} can come out, in their order; an entry the proxy did not
    ask about, or one that is not an IP address, approves nothing, and an
    C{addresses} member that is not a list approves nothing at all.
    """
    if not isinstance(reply, dict) or "addresses" not in reply:
        return tuple(addresses)
    listed = reply["addresses"]
    if not isinstance(listed, list):
        return ()
    approved = set()
    for entry in listed:
        if not isinstance(entry, str):
            continue
        try:
            approved.add(str(ipaddress.ip_address(entry.strip())))
        except ValueError:
            continue
    return tuple(a for a in addresses if a in approved)


def _parseReply(body: bytes | None) -> tuple[Any, bool]:
    """
    A reply body as JSON if it is JSON, else as text.

    @return: C{(value, isJSON)}; C{(None, False)} for no body.
    """
    if not body:
        return None, False
    try:
        return json.loads(body), True
    except ValueError:
        return body.decode("utf-8", "replace"), False


class AccessGate:
    """
    Asks the webhook about connections, as L{Gate} settings say.

    @ivar settings: the L{Gate} settings.
    """

    def __init__(
        self,
        settings: Gate,
        client: WebhookClient,
        tally: Tally,
        messages: Messages,
        clock: IReactorTime,
    ) -> None:
        """
        @param tally: where each answer (or its absence) is counted.
        @param messages: builds the C{access-request} message.
        """
        self.settings = settings
        self._client = client
        self._tally = tally
        self._messages = messages
        self._clock = clock

    def ask(
        self,
        connectionID: str,
        policy: Any,
        session: str,
        addresses: Sequence[str] | None = None,
    ) -> Deferred[GateResult]:
        """
        Ask the webhook whether a connection may exchange data.

        A 2xx reply whose JSON says C{"access-response": "reject"} rejects;
        an explicit C{"accept"} accepts; anything else (other JSON,
        garbage, a non-2xx status, a timeout, a connection error) is
        decided by C{on_error}.  If the gate is off, the result is an
        immediate accept.

        @return: a L{Deferred} firing with a L{GateResult}; it never fails,
            except with C{CancelledError} when the caller cancels it (the
            client went away), which cancels the request too.
        """
        settings = self.settings
        if not settings.enabled:
            return succeed(GateResult(True, "access-request gate is off"))
        started = self._clock.seconds()
        message = self._messages.accessRequest(connectionID, policy, session, addresses)
        post = self._client.post(serialize(message), settings.timeout)

        def decided(result: Reply | Failure) -> GateResult:
            gate = self._judge(
                result, settings.on_error, self._clock.seconds() - started
            )
            # A plain accept is the common case; anything else is worth a
            # line at the default level.
            emit = log.debug if gate.reason == "accepted by webhook" else log.info
            emit(
                "Access request {id} for {session}: {outcome} ({reason})",
                id=connectionID,
                session=session,
                outcome="accepted" if gate.accepted else "rejected",
                reason=gate.reason,
            )
            return gate

        def outcome(result: Any) -> Any:
            if post.cancelled:
                # The caller gave up: it gets its CancelledError, and
                # nothing is counted or logged.
                return result
            return decided(result)

        return post.result.addBoth(outcome)

    def _judge(
        self, result: Reply | Failure, onError: str, latency: float
    ) -> GateResult:
        """
        Turn the webhook's answer into a L{GateResult}, counting it.
        """
        reply: Any = None
        if isinstance(result, Failure):
            self._tally.failed += 1
            text = self._client.describe(result)
            self._tally.triedAndFailed(ACCESS_REQUEST, text)
            if result.check(WebhookTimeout):
                problem = text
            else:
                problem = f"webhook request failed: {text}"
        else:
            if 200 <= result.status < 300:
                self._tally.answered()
            else:
                self._tally.failed += 1
                self._tally.triedAndFailed(ACCESS_REQUEST, f"HTTP {result.status}")
            reply, isJSON = _parseReply(result.body)
            verdict = reply.get("access-response") if isinstance(reply, dict) else None
            if not 200 <= result.status < 300:
                problem = f"webhook answered HTTP {result.status}"
            elif result.body is None:
                problem = f"webhook reply longer than {MAX_REPLY_BYTES} bytes"
            elif not isJSON:
                problem = "webhook reply is not JSON"
            elif verdict == "reject":
                return GateResult(False, "rejected by webhook", reply, latency)
            elif verdict == "accept":
                return GateResult(True, "accepted by webhook", reply, latency)
            else:
                problem = "webhook reply has no access-response accept or reject"
        return GateResult(
            onError == "accept", f"{problem}; on_error={onError}", reply, latency
        )
