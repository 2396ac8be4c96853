"""
L{WebhookService}: the one object the rest of the proxy talks to.  It
builds messages (L{proxy_app.webhook._messages}), hands events to the
delivery queue (L{proxy_app.webhook._delivery}), asks the gate
(L{proxy_app.webhook._gate}), all over one client
(L{proxy_app.webhook._client}), and pings on a timer.
"""

from __future__ import annotations

import collections
import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS

from proxy_app.config import Gate, Statistics
from proxy_app.stats import ConnectionStatistics
from proxy_app.webhook._client import WebhookClient, buildClient, checkURL
from proxy_app.webhook._delivery import EventQueue, Tally
from proxy_app.webhook._gate import AccessGate, GateResult
from proxy_app.webhook._log import log
from proxy_app.webhook._messages import (
    ACCESS_REQUEST,
    EVENT_ACTIONS,
    ConnectionIDs,
    Messages,
)


class WebhookService(Service):
    """
    Sends the proxy's events to the control webhook and runs the
    access-request gate.

    Start it for the periodic C{ping}; events and gate calls work whether
    it runs or not, until L{stopService} has flushed the queue.

    @ivar pingInterval: seconds between pings.
    @ivar firstPing: seconds from L{startService} to the first ping, unless
        C{pingInterval} is shorter.
    @ivar flushTimeout: how long L{stopService} waits for the queue.
    @ivar events: the actions sent, of
        L{EVENT_ACTIONS<proxy_app.webhook.EVENT_ACTIONS>}.
    @ivar statisticsSettings: the statistics feature's L{Statistics}
        settings.
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
        accessRequest: Gate | None = None,
        statistics: Statistics | None = None,
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
        @param firstPing: seconds from L{startService} to the first ping,
            unless C{pingInterval} is shorter: the first ping goes within
            C{min(pingInterval, firstPing)}.
        @param timeout: seconds one event POST may take.
        @param queueSize: how many events may be held (waiting, waiting to
            be tried again, or being sent) before new ones are dropped.
        @param retries: how many times a failed event is tried again.
        @param retryDelay: the wait before the first retry; it doubles for
            each further one, up to
            L{MAX_BACKOFF<proxy_app.webhook.MAX_BACKOFF>}.
        @param maxConcurrent: how many event POSTs may be in flight.
        @param events: the actions to send (of
            L{EVENT_ACTIONS<proxy_app.webhook.EVENT_ACTIONS>}); all if
            L{None}.
        @param accessRequest: the gate's settings
            (L{proxy_app.config.Gate}); off if L{None}.
        @param statistics: the statistics feature's settings
            (L{proxy_app.config.Statistics}); off if L{None}.
        @param flushTimeout: how long L{stopService} waits for the queue.
        @param neighborMemory: how many client addresses are remembered for
            C{neighbor}; past that the least recently seen are forgotten
            (and reported again when they come back).
        @param idSource: C{os.urandom}'s signature, for the connection ids.

        @raise ValueError: for a setting out of range; the message names
            the setting and never shows the URL's path.
        """
        super().__init__()
        checkURL(url)
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
            raise ValueError(
                "webhook queue_size, concurrency and neighbor memory must be 1 or more"
            )
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
        pool: HTTPConnectionPool | None = None
        if treqClient is None:
            if reactor is None:
                raise ValueError("WebhookService needs a treqClient or a reactor")
            treqClient, pool = buildClient(
                reactor,
                tlsVerify=tlsVerify,
                trustRoot=trustRoot,
                tlsPolicy=tlsPolicy,
                maxConcurrent=maxConcurrent,
                connectTimeout=timeout,
            )
        self._client = client = WebhookClient(url, treqClient, clock, pool)
        self.pingInterval = pingInterval
        self.firstPing = firstPing
        self.statisticsSettings = statistics or Statistics()
        self.flushTimeout = flushTimeout

        self._messages = Messages(hostid or socket.gethostname())
        self._ids = ConnectionIDs(idSource or os.urandom)
        self._live: dict[str, None] = {}
        self._neighbors: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._neighborMemory = neighborMemory

        self._tally = Tally(client.redactedURL, retries)
        self._queue = EventQueue(
            client,
            self._tally,
            clock,
            queueSize=queueSize,
            retries=retries,
            retryDelay=retryDelay,
            maxConcurrent=maxConcurrent,
            timeout=timeout,
        )
        self._gate = AccessGate(
            accessRequest or Gate(), client, self._tally, self._messages, clock
        )

        self._firstPingCall: IDelayedCall | None = None
        self._pingLoop: LoopingCall | None = None

    # State.

    @property
    def url(self) -> str:
        """
        The configured URL (holding the secret: never log it).
        """
        return self._client.url

    @property
    def redactedURL(self) -> str:
        """
        L{redactURL<proxy_app.webhook.redactURL>} of L{url}, for logs.
        """
        return self._client.redactedURL

    @property
    def hostid(self) -> str:
        """
        The C{source} of every message.
        """
        return self._messages.source

    @property
    def accessRequestSettings(self) -> Gate:
        """
        The gate's L{Gate} settings.
        """
        return self._gate.settings

    @property
    def sent(self) -> int:
        """
        POSTs answered with a 2xx status (events and gate calls).
        """
        return self._tally.sent

    @property
    def failed(self) -> int:
        """
        Events given up on (after their tries, or at once for a 4xx that a
        retry would not change), and gate calls that got no 2xx answer.
        """
        return self._tally.failed

    @property
    def dropped(self) -> int:
        """
        Events not sent because the queue was full, or left when
        L{stopService} gave up.
        """
        return self._tally.dropped

    @property
    def queueDepth(self) -> int:
        """
        Events held: waiting, waiting to be tried again, or being sent.
        """
        return self._queue.depth

    @property
    def liveConnections(self) -> list[str]:
        """
        The ids of connections started and not yet stopped, as C{ping}
        reports them.
        """
        return list(self._live)

    @property
    def gateEnabled(self) -> bool:
        """
        Whether connections wait for the access-request gate.
        """
        return self._gate.settings.enabled

    def newConnectionID(self) -> str:
        """
        A connection id, C{Proxy-<8 hex>-OID-<12 hex>}: the first part is
        random per process, the second unique per connection within it
        (a counter from a random start, modulo 2**48).
        """
        return self._ids.next()

    def newStatistics(self) -> ConnectionStatistics | None:
        """
        A L{ConnectionStatistics} for a new connection if the statistics
        feature is on, else L{None}.
        """
        if not self.statisticsSettings.enabled:
            return None
        return ConnectionStatistics(self._clock, self.statisticsSettings.max_bytes)

    # Events.

    def _enqueue(self, action: str, message: dict[str, Any]) -> None:
        if action in self.events:
            self._queue.put(action, message)

    def ping(self) -> None:
        """
        Send a C{ping} now, listing the live connections.
        """
        self._enqueue("ping", self._messages.ping(self.liveConnections))

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
        self._enqueue("neighbor", self._messages.neighbor(address))

    def connectionStarted(self, connectionID: str, session: str) -> None:
        """
        Report a connection opening (it then counts as live for C{ping}).
        """
        self._live[connectionID] = None
        self._enqueue(
            "connection-start", self._messages.connectionStart(connectionID, session)
        )

    def connectionStopped(self, connectionID: str, info: Mapping[str, Any]) -> None:
        """
        Report a connection's end.

        @param info: the C{details.info}, from
            L{connectionStopInfo<proxy_app.webhook.connectionStopInfo>}.
        """
        self._live.pop(connectionID, None)
        self._enqueue(
            "connection-stop", self._messages.connectionStop(connectionID, info)
        )

    def connectionInfo(self, connectionID: str, details: Mapping[str, Any]) -> None:
        """
        Report what features collected about a destroyed connection; sends
        nothing if C{details} is empty.

        @param details: from
            L{connectionInfoDetails<proxy_app.webhook.connectionInfoDetails>}.
        """
        if not details:
            return
        self._enqueue(
            "connection-info", self._messages.connectionInfo(connectionID, details)
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
        a reply that accepts may narrow them (see
        L{approvedAddresses<proxy_app.webhook.approvedAddresses>}).

        The request is sent at once (not through the event queue) and waits
        for the reply for at most the gate's timeout.  A 2xx reply whose
        JSON says C{"access-response": "reject"} rejects; an explicit
        C{"accept"} accepts; anything else (other JSON, garbage, a non-2xx
        status, a timeout, a connection error) is decided by C{on_error}.
        If the gate is off, the result is an immediate accept.

        @return: a L{twisted.internet.defer.Deferred} firing with a
            L{GateResult}; it never fails,
            except with C{CancelledError} when the caller cancels it (the
            client went away), which cancels the request too.
        """
        return self._gate.ask(connectionID, policy, session, addresses)

    # Running.

    def startService(self) -> None:
        """
        Start pinging: the first after C{firstPing} seconds or
        C{pingInterval}, whichever is shorter, then every C{pingInterval}.
        """
        super().startService()
        self._queue.start()
        self._firstPingCall = self._clock.callLater(
            min(self.firstPing, self.pingInterval), self._startPinging
        )

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

        @return: a L{twisted.internet.defer.Deferred} firing when the queue
            is empty or given up.
        """
        super().stopService()
        if self._firstPingCall is not None and self._firstPingCall.active():
            self._firstPingCall.cancel()
        self._firstPingCall = None
        if self._pingLoop is not None and self._pingLoop.running:
            self._pingLoop.stop()
        self._pingLoop = None
        return self._queue.stop(self.flushTimeout)
