"""
The control webhook: the events the proxy POSTs to an operator's HTTP(S)
endpoint, in smithproxy's message format, and the access-request gate,
which asks that endpoint whether a connection may go ahead.

Events never delay traffic.  They go into a bounded queue that a treq
client drains, a few POSTs at a time, over persistent connections;
failures are retried with exponential backoff on the injected clock; a full
queue drops events and counts them.  Only the gate
(L{WebhookService.accessRequest}) makes a connection wait, and only for as
long as its own timeout.

The webhook client is not a proxy client: it connects with the reactor's
own resolver and endpoints, so an operator's URL on localhost works.

The URL's path may hold a secret (C{/webhook/<SECRET_ID>}); logs show only
L{redactURL}'s C{scheme://host:port/…}.

C{docs/webhooks.md} documents every message, the gate's semantics and the
delivery guarantees.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attr
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from proxy_app.stats import ConnectionStatistics
from proxy_app.target import hostPort

log = Logger()

#: The actions the event queue carries, which C{events} may name.
EVENT_ACTIONS = frozenset(
    {"ping", "neighbor", "connection-start", "connection-stop", "connection-info"}
)

#: The action of the gate's request; C{events} may name it, to no effect:
#: the gate is governed by L{AccessRequestSettings.enabled} alone.
ACCESS_REQUEST = "access-request"

#: How much of a reply body is read; a longer one is cut off (and, for the
#: gate, is an error).
MAX_REPLY_BYTES = 65536

#: The longest wait between two tries of one event.
MAX_BACKOFF = 60.0

#: How many URLs a connection-stop's C{l7.details} lists at most.
MAX_L7_DETAILS = 100

# Statuses worth trying again: the server is busy, broken for now, or timed
# out.  Any other non-2xx (404 for a wrong secret, 400, 401, ...) will not
# change by itself.
_RETRYABLE_STATUS = frozenset({408, 425, 429})


# Configuration records.


@attr.s(frozen=True, slots=True, auto_attribs=True)
class AccessRequestSettings:
    """
    The access-request gate's settings (YAML C{webhook.access_request}).

    @ivar enabled: whether connections wait for the webhook's answer.
    @ivar timeout: how long one gate call may wait, in seconds.
    @ivar onError: C{"accept"} or C{"reject"}: the outcome when the
        webhook gives no clear answer (see C{docs/webhooks.md}).
    """

    enabled: bool = False
    timeout: float = 5.0
    onError: str = attr.ib(default="accept")

    @onError.validator
    def _checkOnError(self, attribute: Any, value: str) -> None:
        if value not in ("accept", "reject"):
            raise ValueError(f"access_request.on_error must be accept or reject, not {value!r}")

    def __attrs_post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"access_request.timeout must be above zero, not {self.timeout!r}")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class StatisticsSettings:
    """
    The statistics feature's settings (YAML C{webhook.statistics}: C{true},
    or C{{enabled: true, max_bytes: 65536}}).

    @ivar enabled: whether connections collect L{ConnectionStatistics}.
    @ivar maxBytes: how many bytes of each direction the entropy covers.
    """

    enabled: bool = False
    maxBytes: int = 65536

    def __attrs_post_init__(self) -> None:
        if self.maxBytes < 0:
            raise ValueError(f"statistics.max_bytes must be 0 or more, not {self.maxBytes!r}")


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


# Message pieces.


def sessionLabel(
    clientHost: str,
    clientPort: int,
    destHost: str,
    destPort: int,
    originatedTLS: bool,
    *,
    clientTLS: bool = False,
) -> str:
    """
    The session label of smithproxy's messages:
    C{<L>_<client>:<port>+<R>_<destination>:<port>}.

    Each prefix names its leg's protocol: C{tcp} for plain TCP, C{ssli} for
    TLS that the proxy itself speaks on that leg (TLS it originates toward
    the destination, or a TLS listener's connection from the client); IPv6
    addresses are bracketed.  For example
    C{tcp_127.0.0.1:40000+ssli_[2001:db8::1]:443}.

    @param destHost: the vetted address connected to (or, before one is
        chosen, the host name).
    """
    left = "ssli" if clientTLS else "tcp"
    right = "ssli" if originatedTLS else "tcp"
    return f"{left}_{hostPort(clientHost, clientPort)}+{right}_{hostPort(destHost, destPort)}"


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


def connectionStopInfo(
    session: str,
    policy: Any,
    bytesUp: int,
    bytesDown: int,
    *,
    sni: str | None = None,
    app: str | None = None,
    details: Iterable[str] = (),
) -> dict[str, Any]:
    """
    The C{details.info} of a C{connection-stop} message.

    @param policy: the ACL rule or role that allowed the connection.
    @param sni: the server name of TLS the proxy originated, or that a
        tunnel's ClientHello carried (see L{proxy_app.sniffer.TLSSniffer}); L{None} for none.
    @param app: the L7 protocol seen: C{"http/1.1"} for forwarded requests,
        C{"tls"} for a tunnel carrying TLS; L{None} to leave C{l7} out.
    @param details: for C{http/1.1}, the URLs requested, of which the first
        L{MAX_L7_DETAILS} are listed.
    """
    info: dict[str, Any] = {
        "session": session,
        "policy": policy,
        "bytes_up": bytesUp,
        "bytes_down": bytesDown,
    }
    if sni:
        info["tls"] = {"sni": sni}
    if app:
        listed: list[str] = []
        for url in details:
            if len(listed) >= MAX_L7_DETAILS:
                break
            listed.append(url)
        info["l7"] = {"app": app, "details": listed}
    return info


def connectionInfoDetails(
    statistics: Any = None, gate: GateResult | None = None
) -> dict[str, Any]:
    """
    The C{details} of a C{connection-info} message: one key per feature
    that collected something.  Empty when none did, and then
    L{WebhookService.connectionInfo} sends nothing.

    @param statistics: the connection's
        L{proxy_app.stats.ConnectionStatistics}, or L{None}.
    @param gate: the connection's L{GateResult}, or L{None}; its reply, if
        any, becomes C{access-request}.
    """
    details: dict[str, Any] = {}
    if statistics is not None:
        details["statistics"] = statistics.report()
    if gate is not None and gate.reply is not None:
        details["access-request"] = gate.reply
    return details


def redactURL(url: str) -> str:
    """
    The webhook URL as logs may show it: C{scheme://host:port/…}, without
    the path, query or credentials that may hold a secret.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparseable URL>"
    scheme = parts.scheme or "?"
    if ":" in host:
        host = f"[{host}]"
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    where = f"{scheme}://{host}" + (f":{port}" if port is not None else "")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return where + "/…"
    return where + "/"


# The HTTP client.


def _certifiTrustRoot() -> Any:
    """
    Every certificate in certifi's bundle as a trust root (C{loadPEM}
    alone would read only the first).
    """
    import certifi

    with open(certifi.where(), "rb") as f:
        pem = f.read()
    blocks = re.findall(
        rb"-----BEGIN CERTIFICATE-----\s.+?\s-----END CERTIFICATE-----", pem, re.DOTALL
    )
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedCreator:
    """
    TLS toward a webhook whose certificate is not checked (C{tls_verify:
    false}), still sending the host name as SNI so that a virtual host
    answers.
    """

    def __init__(self, hostname: str, options: ssl.CertificateOptions) -> None:
        self._hostname = hostname
        self._options = options

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        if not (isIPAddress(self._hostname) or isIPv6Address(self._hostname)):
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        connection.set_connect_state()
        return connection


@implementer(IPolicyForHTTPS)
class UnverifiedPolicyForHTTPS:
    """
    An HTTPS policy that does not verify the server's certificate, for
    C{tls_verify: false}.
    """

    def __init__(self) -> None:
        self._options = ssl.CertificateOptions(
            verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2
        )

    def creatorForNetloc(self, hostname: bytes, port: int) -> _UnverifiedCreator:
        return _UnverifiedCreator(hostname.decode("ascii"), self._options)


@implementer(IBodyProducer)
class _BytesProducer:
    """
    A request body already in memory, written at once (the default
    producer would go through the global reactor's cooperator).
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def buildClient(
    reactor: Any,
    *,
    tlsVerify: bool = True,
    trustRoot: Any = None,
    tlsPolicy: IPolicyForHTTPS | None = None,
    maxConcurrent: int = 4,
    connectTimeout: float | None = None,
) -> tuple[Any, HTTPConnectionPool]:
    """
    A treq C{HTTPClient} for the webhook, on a persistent connection pool.

    @param reactor: the reactor whose TCP, TLS and name resolution the
        client uses: the normal one, not the proxy's vetted connector.
    @param tlsVerify: check the server's certificate against C{trustRoot}
        and its name against the URL's host (a browser-like policy); if
        false, check nothing.
    @param trustRoot: an C{IOpenSSLTrustRoot}; certifi's bundle if L{None}.
    @param tlsPolicy: an C{IPolicyForHTTPS} that overrides both of the
        above.
    @param maxConcurrent: how many idle connections to keep.

    @return: the client and its pool (to close on shutdown).
    """
    from treq.client import HTTPClient

    if tlsPolicy is None:
        if tlsVerify:
            tlsPolicy = BrowserLikePolicyForHTTPS(
                trustRoot=trustRoot if trustRoot is not None else _certifiTrustRoot()
            )
        else:
            tlsPolicy = UnverifiedPolicyForHTTPS()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = maxConcurrent
    # The pool's connection factory would log "Starting factory" and
    # "Stopping factory" for every connection; a quiet subclass, on this
    # pool only.
    base = getattr(pool, "_factory", None)
    if isinstance(base, type):
        setattr(pool, "_factory", type("_QuietHTTP11ClientFactory", (base,), {"noisy": False}))  # noqa: B010
    agent = Agent(reactor, contextFactory=tlsPolicy, connectTimeout=connectTimeout, pool=pool)
    return HTTPClient(agent, data_to_body_producer=_BytesProducer), pool


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Reply:
    """
    An HTTP answer: its status and body (L{None} if longer than
    L{MAX_REPLY_BYTES}).
    """

    status: int
    body: bytes | None


class WebhookTimeout(Exception):
    """
    The webhook did not answer within the timeout.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(f"webhook timed out after {seconds:g} s")
        self.seconds = seconds


class _BodyReader(Protocol):
    """
    Reads a reply body up to a limit, then cuts the connection.
    """

    transport: Any

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._tooLarge = False
        self._cancelled = False
        self.finished: Deferred[bytes | None] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        if self._tooLarge:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._tooLarge = True
            self._chunks = []
            self.transport.stopProducing()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._cancelled or self.finished.called:
            return
        if self._tooLarge:
            self.finished.callback(None)
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)

    def _cancel(self, d: Deferred[Any]) -> None:
        self._cancelled = True
        if self.transport is not None:
            self.transport.stopProducing()


def _isStale(failure: Failure) -> bool:
    """
    Whether a request failed the way one does on a pooled connection that
    the server had closed; it is then sent once more at once.
    """
    return bool(failure.check(RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived))


class _Post:
    """
    One logical POST of a message with a deadline: it fails with
    L{WebhookTimeout} when the deadline passes, and is tried once more at
    once if a pooled connection turned out to be stale.

    @ivar result: fires with a L{_Reply}, or fails with the error;
        cancelling it cancels the request.
    """

    def __init__(self, service: WebhookService, body: bytes, timeout: float) -> None:
        self._service = service
        self._body = body
        self._timeout = timeout
        self._current: Deferred[_Reply] | None = None
        self._timer: IDelayedCall | None = None
        self._over = False
        self._triedAgain = False
        self.cancelled = False
        self.result: Deferred[Any] = Deferred(self._cancel)

    def start(self) -> None:
        self._timer = self._service._clock.callLater(self._timeout, self._timedOut)
        self._attempt()

    def _attempt(self) -> None:
        d = self._service._send(self._body)
        self._current = d
        d.addBoth(self._attemptDone, d)

    def _attemptDone(self, result: _Reply | Failure, d: Deferred[_Reply]) -> None:
        if self._over or d is not self._current:
            return None
        self._current = None
        if isinstance(result, Failure) and not self._triedAgain and _isStale(result):
            self._triedAgain = True
            self._attempt()
            return None
        self._finish()
        if isinstance(result, Failure):
            self.result.errback(result)
        else:
            self.result.callback(result)
        return None

    def _finish(self) -> None:
        self._over = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timedOut(self) -> None:
        self._timer = None
        self._finish()
        self._stopCurrent()
        self.result.errback(WebhookTimeout(self._timeout))

    def _cancel(self, d: Deferred[Any]) -> None:
        # Deferred.cancel fails self.result with CancelledError afterwards.
        self.cancelled = True
        self._finish()
        self._stopCurrent()

    def _stopCurrent(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            current.cancel()


@attr.s(slots=True, eq=False)
class _Event:
    """
    A queued event: its action, its serialized body and its tries so far.
    """

    action: str = attr.ib()
    body: bytes = attr.ib()
    tries: int = attr.ib(default=0)


class WebhookService(Service):
    """
    Sends the proxy's events to the control webhook and runs the
    access-request gate.

    Start it for the periodic C{ping}; events and gate calls work whether
    it runs or not, until L{stopService} has flushed the queue.

    @ivar sent: POSTs answered with a 2xx status (events and gate calls).
    @ivar failed: events given up on (after their tries, or at once for a
        4xx that a retry would not change), and gate calls that got no 2xx
        answer.
    @ivar dropped: events not sent because the queue was full, or left
        when L{stopService} gave up.
    @ivar url: the configured URL (holding the secret: never log it).
    @ivar redactedURL: L{redactURL} of it, for logs.
    @ivar hostid: the C{source} of every message.
    """

    name = "webhook"

    def __init__(
        self,
        url: str,
        *,
        clock: IReactorTime,
        treqClient: Any = None,
        reactor: Any = None,
        hostid: str | None = None,
        tlsVerify: bool = True,
        trustRoot: Any = None,
        tlsPolicy: IPolicyForHTTPS | None = None,
        pingInterval: float = 120.0,
        firstPing: float = 10.0,
        timeout: float = 5.0,
        queueSize: int = 10000,
        retries: int = 3,
        retryDelay: float = 1.0,
        maxConcurrent: int = 4,
        events: Iterable[str] | None = None,
        accessRequest: AccessRequestSettings | None = None,
        statistics: StatisticsSettings | None = None,
        flushTimeout: float = 5.0,
        neighborMemory: int = 65536,
        idSource: Callable[[int], bytes] | None = None,
    ) -> None:
        """
        @param url: the webhook's C{http://} or C{https://} URL.
        @param clock: the clock for pings, timeouts and backoff.
        @param treqClient: an object with treq's C{post} (a C{HTTPClient},
            or C{treq.testing.StubTreq} in tests); if L{None}, one is built
            with L{buildClient} on C{reactor}.
        @param reactor: the reactor for the client built here.
        @param hostid: the C{source} of messages; the host name if L{None}
            or empty.
        @param tlsVerify: see L{buildClient}; so are C{trustRoot} and
            C{tlsPolicy}.
        @param pingInterval: seconds between pings.
        @param firstPing: seconds from L{startService} to the first ping.
        @param timeout: seconds one event POST may take.
        @param queueSize: how many events may be held (waiting, waiting to
            be tried again, or being sent) before new ones are dropped.
        @param retries: how many times a failed event is tried again.
        @param retryDelay: the wait before the first retry; it doubles for
            each further one, up to L{MAX_BACKOFF}.
        @param maxConcurrent: how many event POSTs may be in flight.
        @param events: the actions to send (of L{EVENT_ACTIONS}); all if
            L{None}.
        @param flushTimeout: how long L{stopService} waits for the queue.
        @param neighborMemory: how many client addresses are remembered for
            C{neighbor}; past that the least recently seen are forgotten
            (and reported again when they come back).
        @param idSource: C{os.urandom}'s signature, for the connection ids.

        @raise ValueError: for a setting out of range; the message names
            the setting and never shows the URL's path.
        """
        super().__init__()
        self.url = url
        self.redactedURL = redactURL(url)
        try:
            parts = urlsplit(url)
            validURL = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port  # noqa: B018 -- raises ValueError for a bad port
        except ValueError:
            validURL = False
        if not validURL:
            raise ValueError(f"webhook url must be an http:// or https:// URL with a host, not {self.redactedURL}")
        for name, value in (
            ("ping_interval", pingInterval),
            ("timeout", timeout),
            ("retry delay", retryDelay),
        ):
            if not value > 0:
                raise ValueError(f"webhook {name} must be above zero, not {value!r}")
        if firstPing < 0 or flushTimeout < 0:
            raise ValueError("webhook first ping and flush timeout must be 0 or more")
        if queueSize < 1 or maxConcurrent < 1 or neighborMemory < 1:
            raise ValueError("webhook queue_size, concurrency and neighbor memory must be 1 or more")
        if retries < 0:
            raise ValueError(f"webhook retries must be 0 or more, not {retries!r}")
        if events is None:
            self.events = frozenset(EVENT_ACTIONS)
        else:
            chosen = frozenset(events)
            unknown = chosen - EVENT_ACTIONS - {ACCESS_REQUEST}
            if unknown:
                raise ValueError(
                    f"webhook events: unknown action {sorted(unknown)[0]!r}; known: "
                    + ", ".join(sorted(EVENT_ACTIONS | {ACCESS_REQUEST}))
                )
            self.events = chosen & EVENT_ACTIONS

        self._clock = clock
        self._pool: HTTPConnectionPool | None = None
        if treqClient is None:
            if reactor is None:
                raise ValueError("WebhookService needs a treqClient or a reactor")
            treqClient, self._pool = buildClient(
                reactor,
                tlsVerify=tlsVerify,
                trustRoot=trustRoot,
                tlsPolicy=tlsPolicy,
                maxConcurrent=maxConcurrent,
                connectTimeout=timeout,
            )
        self._treq = treqClient
        self.hostid = hostid or socket.gethostname()
        self.pingInterval = pingInterval
        self.firstPing = firstPing
        self.timeout = timeout
        self.queueSize = queueSize
        self.retries = retries
        self.retryDelay = retryDelay
        self.maxConcurrent = maxConcurrent
        self.accessRequestSettings = accessRequest or AccessRequestSettings()
        self.statisticsSettings = statistics or StatisticsSettings()
        self.flushTimeout = flushTimeout

        idSource = idSource or os.urandom
        self._instance = idSource(4).hex().upper()
        self._nextOID = int.from_bytes(idSource(6), "big")
        self._live: dict[str, None] = {}
        self._neighbors: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._neighborMemory = neighborMemory

        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._ready: collections.deque[_Event] = collections.deque()
        self._retrying: dict[_Event, IDelayedCall] = {}
        self._inflight: dict[_Event, _Post] = {}
        self._pumping = False
        self._healthy = True
        self._failuresSinceHealthy = 0
        self._droppingSince: int | None = None

        self._firstPingCall: IDelayedCall | None = None
        self._pingLoop: LoopingCall | None = None
        self._stopping = False
        self._closed = False
        self._flushed: Deferred[None] | None = None
        self._giveUpCall: IDelayedCall | None = None

    # Identity.

    def newConnectionID(self) -> str:
        """
        A connection id, C{Proxy-<8 hex>-OID-<12 hex>}: the first part is
        random per process, the second unique per connection within it
        (a counter from a random start, modulo 2**48).
        """
        oid = self._nextOID
        self._nextOID = (oid + 1) % (1 << 48)
        return f"Proxy-{self._instance}-OID-{oid:012X}"

    @property
    def liveConnections(self) -> list[str]:
        """
        The ids of connections started and not yet stopped, as C{ping}
        reports them.
        """
        return list(self._live)

    @property
    def queueDepth(self) -> int:
        """
        Events held: waiting, waiting to be tried again, or being sent.
        """
        return len(self._ready) + len(self._retrying) + len(self._inflight)

    @property
    def gateEnabled(self) -> bool:
        return self.accessRequestSettings.enabled

    def newStatistics(self) -> ConnectionStatistics | None:
        """
        A L{ConnectionStatistics} for a new connection if the statistics
        feature is on, else L{None}.
        """
        if not self.statisticsSettings.enabled:
            return None
        return ConnectionStatistics(self._clock, self.statisticsSettings.maxBytes)

    # Events.

    def _message(self, action: str, connectionID: str | None = None, **fields: Any) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "proxy", "action": action, "source": self.hostid}
        if connectionID is not None:
            message["id"] = connectionID
        message.update(fields)
        return message

    def ping(self) -> None:
        """
        Send a C{ping} now, listing the live connections.
        """
        self._enqueue("ping", self._message("ping", proxies=self.liveConnections))

    def neighbor(self, address: str) -> None:
        """
        Report a client address the first time it is seen.
        """
        if address in self._neighbors:
            self._neighbors.move_to_end(address)
            return
        self._neighbors[address] = None
        if len(self._neighbors) > self._neighborMemory:
            self._neighbors.popitem(last=False)
        self._enqueue(
            "neighbor",
            self._message("neighbor", address=address, addresses=[address], state="new"),
        )

    def connectionStarted(self, connectionID: str, session: str) -> None:
        """
        Report a connection opening (it then counts as live for C{ping}).
        """
        self._live[connectionID] = None
        self._enqueue(
            "connection-start",
            self._message("connection-start", connectionID, details={"info": {"session": session}}),
        )

    def connectionStopped(self, connectionID: str, info: Mapping[str, Any]) -> None:
        """
        Report a connection's end.

        @param info: the C{details.info}, from L{connectionStopInfo}.
        """
        self._live.pop(connectionID, None)
        self._enqueue(
            "connection-stop",
            self._message("connection-stop", connectionID, details={"info": dict(info)}),
        )

    def connectionInfo(self, connectionID: str, details: Mapping[str, Any]) -> None:
        """
        Report what features collected about a destroyed connection; sends
        nothing if C{details} is empty.

        @param details: from L{connectionInfoDetails}.
        """
        if not details:
            return
        self._enqueue(
            "connection-info",
            self._message("connection-info", connectionID, details=dict(details)),
        )

    def _enqueue(self, action: str, message: dict[str, Any]) -> None:
        if action not in self.events:
            return
        if self._closed:
            self.dropped += 1
            log.debug("Webhook {url}: stopped; dropped {action}", url=self.redactedURL, action=action)
            return
        if self.queueDepth >= self.queueSize:
            self.dropped += 1
            if self._droppingSince is None:
                self._droppingSince = self.dropped - 1
                log.warn(
                    "Webhook {url}: event queue full ({size} events); dropping events until it drains",
                    url=self.redactedURL,
                    size=self.queueSize,
                )
            return
        if self._droppingSince is not None:
            log.info(
                "Webhook {url}: event queue accepting again; {count} events were dropped",
                url=self.redactedURL,
                count=self.dropped - self._droppingSince,
            )
            self._droppingSince = None
        body = _serialize(message)
        self._ready.append(_Event(action, body))
        self._pump()

    def _pump(self) -> None:
        # An answer can arrive synchronously (an in-memory server), so a
        # completion may call back in here; the loop rereads its state.
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._ready and len(self._inflight) < self.maxConcurrent:
                event = self._ready.popleft()
                event.tries += 1
                post = _Post(self, event.body, self.timeout)
                self._inflight[event] = post
                post.result.addBoth(self._eventDone, event)
                post.start()
        finally:
            self._pumping = False

    def _eventDone(self, result: _Reply | Failure, event: _Event) -> None:
        if self._inflight.pop(event, None) is None:
            # Given up on at shutdown; already counted.
            return None
        if isinstance(result, _Reply) and 200 <= result.status < 300:
            self.sent += 1
            self._noteSuccess()
        else:
            error, retryable = self._describeFailure(result)
            self._noteFailure(event, error)
            if retryable and event.tries <= self.retries and not self._stopping:
                delay = min(self.retryDelay * 2 ** (event.tries - 1), MAX_BACKOFF)
                log.debug(
                    "Webhook {url}: {action} failed ({error}); try {next} in {delay} s",
                    url=self.redactedURL,
                    action=event.action,
                    error=error,
                    next=event.tries + 1,
                    delay=delay,
                )
                self._retrying[event] = self._clock.callLater(delay, self._retryDue, event)
            else:
                self.failed += 1
                log.debug(
                    "Webhook {url}: gave up on {action} after {tries} tries ({error})",
                    url=self.redactedURL,
                    action=event.action,
                    tries=event.tries,
                    error=error,
                )
        self._pump()
        self._checkFlushed()
        return None

    def _retryDue(self, event: _Event) -> None:
        del self._retrying[event]
        # It is older than anything waiting: it goes first.
        self._ready.appendleft(event)
        self._pump()

    def _describeFailure(self, result: _Reply | Failure) -> tuple[str, bool]:
        """
        What went wrong, in words safe to log, and whether trying again
        might help.
        """
        if isinstance(result, _Reply):
            status = result.status
            return (
                f"HTTP {status}",
                status in _RETRYABLE_STATUS or 500 <= status < 600,
            )
        return self._scrub(_failureText(result)), True

    def _scrub(self, text: str) -> str:
        """
        C{text} with the URL and its path replaced by the redacted URL.
        """
        path = urlsplit(self.url).path
        text = text.replace(self.url, self.redactedURL)
        if path not in ("", "/"):
            text = text.replace(path, "/…")
        return text

    def _noteSuccess(self) -> None:
        if not self._healthy:
            log.info(
                "Webhook {url} is answering again ({failures} failed POSTs meanwhile)",
                url=self.redactedURL,
                failures=self._failuresSinceHealthy,
            )
            self._healthy = True
            self._failuresSinceHealthy = 0

    def _noteFailure(self, event: _Event | None, error: str) -> None:
        # One warning when the webhook starts failing, not one per event.
        self._failuresSinceHealthy += 1
        if self._healthy:
            self._healthy = False
            log.warn(
                "Webhook {url} is failing: {action} POST: {error}; events are retried up to {retries} times, traffic is unaffected",
                url=self.redactedURL,
                action=event.action if event is not None else ACCESS_REQUEST,
                error=error,
                retries=self.retries,
            )

    # The access-request gate.

    def accessRequest(
        self,
        connectionID: str,
        policy: Any,
        session: str,
        addresses: Sequence[str] | None = None,
    ) -> Deferred[GateResult]:
        """
        Ask the webhook whether a connection may exchange data.

        C{addresses}, if given, are every address the connection may be made
        to (the session names only the first), sent as C{details.addresses};
        a reply that accepts may narrow them (see L{approvedAddresses}).

        The request is sent at once (not through the event queue) and waits
        for the reply for at most the gate's timeout.  A 2xx reply whose
        JSON says C{"access-response": "reject"} rejects; an explicit
        C{"accept"} accepts; anything else (other JSON, garbage, a non-2xx
        status, a timeout, a connection error) is decided by C{on_error}.
        If the gate is off, the result is an immediate accept.

        @return: a L{Deferred} firing with a L{GateResult}; it never fails,
            except with C{CancelledError} when the caller cancels it (the
            client went away), which cancels the request too.
        """
        settings = self.accessRequestSettings
        if not settings.enabled:
            return succeed(GateResult(True, "access-request gate is off"))
        started = self._clock.seconds()
        details: dict[str, Any] = {"policy": policy, "session": session}
        if addresses is not None:
            details["addresses"] = list(addresses)
        message = self._message(ACCESS_REQUEST, connectionID, details=details)
        body = _serialize(message)
        post = _Post(self, body, settings.timeout)

        def decided(result: _Reply | Failure) -> GateResult:
            gate = self._judge(result, settings.onError, self._clock.seconds() - started)
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

        post.result.addBoth(outcome)
        post.start()
        return post.result

    def _judge(self, result: _Reply | Failure, onError: str, latency: float) -> GateResult:
        """
        Turn the webhook's answer into a L{GateResult}, counting it.
        """
        reply: Any = None
        if isinstance(result, Failure):
            self.failed += 1
            text = self._scrub(_failureText(result))
            self._noteFailure(None, text)
            if result.check(WebhookTimeout):
                problem = text
            else:
                problem = f"webhook request failed: {text}"

        else:
            if 200 <= result.status < 300:
                self.sent += 1
                self._noteSuccess()
            else:
                self.failed += 1
                self._noteFailure(None, f"HTTP {result.status}")
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
        return GateResult(onError == "accept", f"{problem}; on_error={onError}", reply, latency)

    # Running.

    def startService(self) -> None:
        """
        Start pinging: the first after C{firstPing} seconds, then every
        C{pingInterval}.
        """
        super().startService()
        self._stopping = False
        self._closed = False
        self._firstPingCall = self._clock.callLater(self.firstPing, self._startPinging)

    def _startPinging(self) -> None:
        self._firstPingCall = None
        loop = self._pingLoop = LoopingCall(self.ping)
        loop.clock = self._clock
        loop.start(self.pingInterval, now=True).addErrback(
            lambda f: log.failure("Webhook ping loop failed", f)
        )

    def stopService(self) -> Deferred[None]:
        """
        Stop pinging and send what is queued, for at most C{flushTimeout}
        seconds; what is left then is dropped (and counted).  Events that
        were waiting to be tried again are tried now, once.  Gate calls in
        flight are left to their own timeout.

        @return: a L{Deferred} firing when the queue is empty or given up.
        """
        super().stopService()
        if self._firstPingCall is not None and self._firstPingCall.active():
            self._firstPingCall.cancel()
        self._firstPingCall = None
        if self._pingLoop is not None and self._pingLoop.running:
            self._pingLoop.stop()
        self._pingLoop = None
        self._stopping = True
        for event, call in list(self._retrying.items()):
            call.cancel()
            del self._retrying[event]
            self._ready.appendleft(event)
        self._pump()
        self._flushed = Deferred()
        self._giveUpCall = self._clock.callLater(self.flushTimeout, self._giveUp)
        flushed = self._flushed
        self._checkFlushed()
        return flushed

    def _checkFlushed(self) -> None:
        if self._stopping and self._flushed is not None and self.queueDepth == 0:
            self._close()

    def _giveUp(self) -> None:
        self._giveUpCall = None
        left = self.queueDepth
        if left:
            log.warn(
                "Webhook {url}: gave up on {count} unsent events at shutdown",
                url=self.redactedURL,
                count=left,
            )
        self.dropped += left
        self._ready.clear()
        for call in self._retrying.values():
            call.cancel()
        self._retrying.clear()
        inflight, self._inflight = self._inflight, {}
        for post in inflight.values():
            post.result.cancel()
        self._close()

    def _close(self) -> None:
        if self._giveUpCall is not None and self._giveUpCall.active():
            self._giveUpCall.cancel()
        self._giveUpCall = None
        self._closed = True
        flushed, self._flushed = self._flushed, None
        closing: Deferred[Any] = succeed(None)
        if self._pool is not None:
            closing = self._pool.closeCachedConnections()
        if flushed is not None:
            closing.addBoth(lambda _: flushed.callback(None))

    # HTTP.

    def _send(self, body: bytes) -> Deferred[_Reply]:
        """
        POST C{body}; fire with the status and (capped) body.
        """
        d = maybeDeferred(
            self._treq.post,
            self.url,
            data=body,
            headers={b"Content-Type": [b"application/json"]},
            allow_redirects=False,
            unbuffered=True,
            # treq would otherwise import the global reactor to look for a
            # timeout we never give it.
            reactor=self._clock,
        )

        def gotResponse(response: Any) -> Deferred[_Reply]:
            status = response.code
            if response.length == 0:
                return succeed(_Reply(status, b""))
            reader = _BodyReader(MAX_REPLY_BYTES)
            response.deliverBody(reader)
            return reader.finished.addCallback(lambda body: _Reply(status, body))

        return d.addCallback(gotResponse)


def _failureText(failure: Failure) -> str:
    """
    A failure in a few words: the reasons a C{ResponseNeverReceived} or
    C{ResponseFailed} wraps, else the error's message.
    """
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return "; ".join(_failureText(r) for r in reasons)
    if failure.check(WebhookTimeout):
        return str(failure.value)
    text = failure.getErrorMessage().strip()
    name = failure.type.__name__ if failure.type is not None else "error"
    return f"{name}: {text}" if text else name


def _serialize(message: dict[str, Any]) -> bytes:
    """
    A message as compact JSON.  A value JSON cannot hold (an object the
    caller passed as a policy, say) is written as its C{str} rather than
    raising into the proxy's connection handling.
    """
    return json.dumps(message, separators=(",", ":"), default=str).encode("utf-8")


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


__all__ = [
    "ACCESS_REQUEST",
    "EVENT_ACTIONS",
    "AccessRequestSettings",
    "GateResult",
    "StatisticsSettings",
    "UnverifiedPolicyForHTTPS",
    "WebhookService",
    "WebhookTimeout",
    "buildClient",
    "connectionInfoDetails",
    "connectionStopInfo",
    "redactURL",
    "sessionLabel",
]
