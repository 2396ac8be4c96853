"""
Delivering events: a bounded queue drained a few POSTs at a time, retries
with exponential backoff on the injected clock, drops when full, and the
counters every POST (events and gate calls alike) is tallied in.

Events never delay traffic: L{EventQueue.put} returns at once, whatever the
webhook does.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from proxy_app.webhook._client import Post, Reply, WebhookClient
from proxy_app.webhook._log import log
from proxy_app.webhook._messages import serialize

#: The longest wait between two tries of one event.
MAX_BACKOFF = 60.0

# Statuses worth trying again: the server is busy, broken for now, or timed
# out.  Any other non-2xx (404 for a wrong secret, 400, 401, ...) will not
# change by itself.
_RETRYABLE_STATUS = frozenset({408, 425, 429})


class Tally:
    """
    What became of the webhook's POSTs, and whether it is answering: one
    warning when it starts failing and one line when it answers again, not
    one per POST.

    @ivar sent: POSTs answered with a 2xx status (events and gate calls).
    @ivar failed: events given up on, and gate calls that got no 2xx answer.
    @ivar dropped: events not sent because the queue was full, or left at
        shutdown.
    """

    def __init__(self, redactedURL: str, retries: int) -> None:
        """
        @param redactedURL: the URL as logs may show it.
        @param retries: how often events are retried, for the warning.
        """
        self._url = redactedURL
        self._retries = retries
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._healthy = True
        self._failuresSinceHealthy = 0

    def answered(self) -> None:
        """
        A POST got a 2xx answer.
        """
        self.sent += 1
        if not self._healthy:
            log.info(
                "Webhook {url} is answering again ({failures} failed POSTs meanwhile)",
                url=self._url,
                failures=self._failuresSinceHealthy,
            )
            self._healthy = True
            self._failuresSinceHealthy = 0

    def triedAndFailed(self, action: str, error: str) -> None:
        """
        A POST of C{action} failed with C{error} (words safe to log); it
        may still be tried again.
        """
        self._failuresSinceHealthy += 1
        if self._healthy:
            self._healthy = False
            log.warn(
                "Webhook {url} is failing: {action} POST: {error}; events are retried "
                "up to {retries} times, traffic is unaffected",
                url=self._url,
                action=action,
                error=error,
                retries=self._retries,
            )


@attr.s(slots=True, eq=False)
class _Event:
    """
    A queued event: its action, its serialized body and its tries so far.
    """

    action: str = attr.ib()
    body: bytes = attr.ib()
    tries: int = attr.ib(default=0)


class EventQueue:
    """
    The bounded queue of events waiting to be POSTed, waiting to be tried
    again, or being POSTed.

    An event whose POST fails (a connection error, a timeout, 408, 425, 429
    or 5xx) is tried again after C{retryDelay}, doubling per try up to
    L{MAX_BACKOFF}, at most C{retries} times; any other non-2xx is given up
    on at once.  A full queue drops new events.
    """

    def __init__(
        self,
        client: WebhookClient,
        tally: Tally,
        clock: IReactorTime,
        *,
        queueSize: int,
        retries: int,
        retryDelay: float,
        maxConcurrent: int,
        timeout: float,
    ) -> None:
        """
        @param queueSize: how many events may be held at once.
        @param retries: how many times a failed event is tried again.
        @param retryDelay: the wait before the first retry.
        @param maxConcurrent: how many POSTs may be in flight.
        @param timeout: seconds one POST may take.
        """
        self._client = client
        self._tally = tally
        self._clock = clock
        self._queueSize = queueSize
        self._retries = retries
        self._retryDelay = retryDelay
        self._maxConcurrent = maxConcurrent
        self._timeout = timeout
        self._ready: collections.deque[_Event] = collections.deque()
        self._retrying: dict[_Event, IDelayedCall] = {}
        self._inflight: dict[_Event, Post] = {}
        self._pumping = False
        self._droppingSince: int | None = None
        self._stopping = False
        self._closed = False
        self._flushed: Deferred[None] | None = None
        self._giveUpCall: IDelayedCall | None = None

    @property
    def depth(self) -> int:
        """
        Events held: waiting, waiting to be tried again, or being sent.
        """
        return len(self._ready) + len(self._retrying) + len(self._inflight)

    def put(self, action: str, message: Mapping[str, Any]) -> None:
        """
        Queue C{message}, or drop it (counted) if the queue is full or
        closed.
        """
        url = self._client.redactedURL
        if self._closed:
            self._tally.dropped += 1
            log.debug(
                "Webhook {url}: stopped; dropped {action}", url=url, action=action
            )
            return
        if self.depth >= self._queueSize:
            self._tally.dropped += 1
            if self._droppingSince is None:
                self._droppingSince = self._tally.dropped - 1
                log.warn(
                    "Webhook {url}: event queue full ({size} events); dropping events "
                    "until it drains",
                    url=url,
                    size=self._queueSize,
                )
            return
        if self._droppingSince is not None:
            log.info(
                "Webhook {url}: event queue accepting again; {count} events were "
                "dropped",
                url=url,
                count=self._tally.dropped - self._droppingSince,
            )
            self._droppingSince = None
        self._ready.append(_Event(action, serialize(message)))
        self._pump()

    def _pump(self) -> None:
        # An answer can arrive synchronously (an in-memory server), so a
        # completion may call back in here; the loop rereads its state.
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._ready and len(self._inflight) < self._maxConcurrent:
                event = self._ready.popleft()
                event.tries += 1
                post = Post(self._client, event.body, self._timeout)
                self._inflight[event] = post
                post.result.addBoth(self._eventDone, event)
                post.start()
        finally:
            self._pumping = False

    def _eventDone(self, result: Reply | Failure, event: _Event) -> None:
        if self._inflight.pop(event, None) is None:
            # Given up on at shutdown; already counted.
            return None
        if isinstance(result, Reply) and 200 <= result.status < 300:
            self._tally.answered()
        else:
            error, retryable = self._describeFailure(result)
            self._tally.triedAndFailed(event.action, error)
            if retryable and event.tries <= self._retries and not self._stopping:
                delay = min(self._retryDelay * 2 ** (event.tries - 1), MAX_BACKOFF)
                log.debug(
                    "Webhook {url}: {action} failed ({error}); try {next} in {delay} s",
                    url=self._client.redactedURL,
                    action=event.action,
                    error=error,
                    next=event.tries + 1,
                    delay=delay,
                )
                self._retrying[event] = self._clock.callLater(
                    delay, self._retryDue, event
                )
            else:
                self._tally.failed += 1
                log.debug(
                    "Webhook {url}: gave up on {action} after {tries} tries ({error})",
                    url=self._client.redactedURL,
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

    def _describeFailure(self, result: Reply | Failure) -> tuple[str, bool]:
        """
        What went wrong, in words safe to log, and whether trying again
        might help.
        """
        if isinstance(result, Reply):
            status = result.status
            return (
                f"HTTP {status}",
                status in _RETRYABLE_STATUS or 500 <= status < 600,
            )
        return self._client.describe(result), True

    # Running.

    def start(self) -> None:
        """
        Accept events again after a L{stop}.
        """
        self._stopping = False
        self._closed = False

    def stop(self, flushTimeout: float) -> Deferred[None]:
        """
        Send what is queued, for at most C{flushTimeout} seconds; what is
        left then is dropped (and counted).  Events that were waiting to be
        tried again are tried now, once.  Then close the client's idle
        connections, and drop (counting) events put after that.

        @return: a L{Deferred} firing when the queue is empty or given up.
        """
        self._stopping = True
        for event, call in list(self._retrying.items()):
            call.cancel()
            del self._retrying[event]
            self._ready.appendleft(event)
        self._pump()
        self._flushed = Deferred()
        self._giveUpCall = self._clock.callLater(flushTimeout, self._giveUp)
        flushed = self._flushed
        self._checkFlushed()
        return flushed

    def _checkFlushed(self) -> None:
        if self._stopping and self._flushed is not None and self.depth == 0:
            self._close()

    def _giveUp(self) -> None:
        self._giveUpCall = None
        left = self.depth
        if left:
            log.warn(
                "Webhook {url}: gave up on {count} unsent events at shutdown",
                url=self._client.redactedURL,
                count=left,
            )
        self._tally.dropped += left
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
        closing = self._client.close()
        if flushed is not None:
            closing.addBoth(lambda _: flushed.callback(None))
