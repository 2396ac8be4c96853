"""
What every exchange (one request on a client connection, forwarded or
tunnelled) shares: the request and its id, its timing, its vetting and
connecting, its failure, and its accounting once it ends.

L{proxy_app.forward} and L{proxy_app.tunnel} build on L{Exchange}.  An
exchange sees its client connection only through L{IClientChannel}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from proxy_app.access import AuthFailed
from proxy_app.acl import ACLDecision
from proxy_app.http1 import RequestHead, headerValue
from proxy_app.interfaces import IClientChannel
from proxy_app.reasons import ProxyError, Reason
from proxy_app.redact import loggedTarget
from proxy_app.resolver import DestinationDenied, VettedDestination
from proxy_app.target import Target, hostPort
from proxy_app.upstream import TLSSettings
from proxy_app.webhook import (
    GateResult,
)

if TYPE_CHECKING:
    from proxy_app.channel import ProxyFactory

# The process log's namespace is still that of the module this was split
# from, so that filters on it keep working.
log = Logger(namespace="proxy_app.server")


# The logged URLs (loggedTarget) of raw request targets, without and with
# log_query_values: at most _LOGGED_URLS each, of targets of at most
# _LOGGED_URL_BYTES bytes.
_loggedURLs: tuple[dict[bytes, str], dict[bytes, str]] = ({}, {})
_LOGGED_URLS = 256
_LOGGED_URL_BYTES = 512


class Exchange:
    """
    What forwarded requests and tunnels share: the request, its id, its
    admission and connecting, its failure and its end.

    An exchange is also its own accounting record, which every
    L{IExchangeObserver} reads when told: C{requestID}, C{proxyType},
    C{request}, C{url}, C{target}, C{protocol} (the client's address and
    certificate), C{started}, C{role}, C{aclDecision}, C{policy},
    C{dnsTime}, C{connectTime}, C{outboundAddress}, C{status}, C{error},
    C{endedBecause}, C{bytesUp}, C{bytesDown} (bodies, or a tunnel's relayed
    bytes), C{sni}, C{application}, C{details}, L{wireCounts}, C{finished},
    C{decisionLogged}, and the webhook's C{connectionID}, C{statistics},
    C{gateResult}, C{session} and C{webhookStarted}.
    """

    proxyType = ""
    # Only a CONNECT may name an external proxy (L{ConnectExchange}).
    externalProxy: Any = None
    # The TLS origination asked for; only a forwarded request has one.
    tls: TLSSettings | None = None

    # Slots: idle tunnels are held by the thousand, and an instance dict
    # this size is not shared between instances.
    __slots__ = (
        "protocol",
        "factory",
        "request",
        "target",
        "requestID",
        "started",
        "dnsTime",
        "connectTime",
        "connectStarted",
        "destination",
        "connectionID",
        "statistics",
        "session",
        "gateResult",
        "webhookStarted",
        "role",
        "aclDecision",
        "outboundAddress",
        "bytesUp",
        "bytesDown",
        "status",
        "error",
        "_pending",
        "finished",
        "_counted",
        "_clientGone",
        "decisionLogged",
        "_url",
        "endedBecause",
    )

    def __init__(
        self,
        protocol: IClientChannel,
        factory: ProxyFactory,
        request: RequestHead,
        target: Target | None,
    ) -> None:
        self.protocol = protocol
        self.factory = factory
        self.request = request
        self.target = target
        incoming = headerValue(request.headers, factory.requestIDHeader)
        incomingID = (
            incoming.decode("latin-1").strip() if incoming is not None else None
        )
        self.requestID = self.factory.acceptRequestID(incomingID)
        self.started = self.factory.clock.seconds()
        self.dnsTime: float | None = None
        self.connectTime: float | None = None
        self.connectStarted = 0.0
        self.destination: VettedDestination | None = None
        # The control webhook's view of this exchange.
        webhook = self.factory.webhook
        # A request id the proxy made is the webhook's connection id too
        # (newRequestID makes them in smithproxy's form); a client's own id
        # is not in that form, so the webhook gets one of its own.
        if webhook is None:
            self.connectionID = ""
        elif self.requestID != incomingID:
            self.connectionID = self.requestID
        else:
            self.connectionID = webhook.newConnectionID()
        # Inside an intercepted tunnel the tunnel's own statistics count
        # the bytes (it is the webhook's session).
        self.statistics = (
            webhook.newStatistics()
            if webhook is not None and not protocol.intercepted
            else None
        )
        self.session = ""
        self.gateResult: GateResult | None = None
        self.webhookStarted = False
        # Who asked, and what the ACL said.
        self.role: str | None = protocol.role
        self.aclDecision: ACLDecision | None = None
        self.outboundAddress: str | None = None
        self.bytesUp = 0
        self.bytesDown = 0
        self.status: int | None = None
        self.error: ProxyError | None = None
        self._pending: Deferred | None = None
        self.finished = False
        self._counted = False
        self._clientGone = False
        self.decisionLogged = False
        self._url: str | None = None
        self.endedBecause: str | None = None

    @property
    def url(self) -> str:
        """
        The request target as every log line and webhook event shows it:
        without userinfo, query values redacted unless configured (see
        L{loggedTarget}); made once per exchange, and remembered for the
        targets clients ask for again and again (L{_loggedURLs}).
        """
        url = self._url
        if url is None:
            raw = self.request.target
            keep = self.factory.config.access_log.log_query_values
            urls = _loggedURLs[keep]
            url = urls.get(raw)
            if url is None:
                url = loggedTarget(raw, keep)
                if len(raw) <= _LOGGED_URL_BYTES:
                    if len(urls) >= _LOGGED_URLS:
                        urls.clear()
                    urls[raw] = url
            self._url = url
        return url

    def start(self) -> None:
        raise NotImplementedError()

    def count(self) -> None:
        """
        Count this exchange against its concurrency limit until it ends.
        """
        self._counted = True
        self.factory.active[self.proxyType] += 1

    def _admit(self) -> None:
        """
        Run the admission pipeline (L{proxy_app.admission}); L{_connected}
        gets the upstream protocol it ends with, at once or once a step
        that has to wait is done.
        """
        try:
            upstream = self.factory.admission.admit(self)
        except Exception:
            # The same answer as on the callback path: a ProxyError is
            # answered as it is, anything else is a 500 and a traceback.
            self._setupFailed(Failure())
            return
        self._whenConnected(upstream)

    def connectTo(self, destination: VettedDestination) -> Any:
        """
        Connect to the admitted C{destination}, the last step of admission.

        @return: the upstream protocol, or a L{Deferred} of one.
        """
        raise NotImplementedError()

    def _wait(self, d: Deferred) -> None:
        """
        The rest of the setup happens when C{d} fires with the upstream
        protocol.
        """
        d.addCallbacks(self._connectedOrStale, self._setupFailed)
        d.addErrback(self.internalError)
        self._pending = d

    def _whenConnected(self, upstream: Any) -> None:
        """
        Go on with C{upstream}, a protocol or a L{Deferred} of one.
        """
        if isinstance(upstream, Deferred):
            self._wait(upstream)
            return
        try:
            self._connectedOrStale(upstream)
        except Exception:
            self.internalError(Failure())

    @property
    def policy(self) -> str:
        """
        What allowed this exchange, for the webhook: the role, else
        C{default}.
        """
        decision = self.aclDecision
        if decision is not None and decision.rule:
            return decision.rule
        return self.role or "default"

    @property
    def originatesTLS(self) -> bool:
        return False

    @property
    def intercepted(self) -> bool:
        """
        Whether this is a CONNECT whose tunnel the proxy intercepts: it
        speaks TLS to the client itself (L{proxy_app.mitm}).
        """
        return False

    def _connectedOrStale(self, upstream: Any) -> None:
        self._pending = None
        # The address the connection leads to, as its factory recorded it
        # (through a parent proxy the transport's peer is the parent; and
        # asking the transport builds a new address object each time).
        peer = upstream.destinationAddress or upstream.transport.getPeer()
        if not self.finished:
            self.outboundAddress = hostPort(peer.host, peer.port)
        reused = getattr(upstream, "reused", False)
        if not reused:
            self.connectTime = self.factory.clock.seconds() - self.connectStarted
        for observer in self.factory.observers:
            observer.exchangeConnected(self, peer.host, reused)
        if self.finished:
            # The client went away while we were connecting.
            upstream.transport.loseConnection()
            return
        self._connected(upstream)

    def _connected(self, upstream: Any) -> None:
        raise NotImplementedError()

    def _setupFailed(self, failure: Failure) -> None:
        self._pending = None
        if failure.check(CancelledError) or self.finished or self._clientGone:
            return
        if isinstance(failure.value, DestinationDenied):
            self.factory.metrics.resolverDenials.labels(
                failure.value.decision.label
            ).inc()
        if isinstance(failure.value, AuthFailed) and not failure.value.missing:
            self.factory.metrics.authFailures.inc()
            log.info(
                "{rq_id}: proxy authentication failed for client {client}",
                rq_id=self.requestID,
                client=self.protocol.peerHost,
            )
        if isinstance(failure.value, ProxyError):
            self.fail(failure.value)
            return
        log.failure("Unexpected error setting up {url}", failure, url=self.url)
        self.fail(
            ProxyError(Reason.INTERNAL_ERROR, "Internal error in the proxy"), close=True
        )

    def internalError(self, failure: Failure) -> None:
        """
        A bug surfaced while setting up or running this exchange: log the
        traceback, and answer 500 (1009) if no response head has gone to the
        client, else cut the client off.  Either way the client connection
        does not carry another request, since its state is not trusted.
        """
        log.failure("Internal error handling {url}", failure, url=self.url)
        if self.finished:
            return
        if self.status is None:
            self.fail(
                ProxyError(Reason.INTERNAL_ERROR, "Internal error in the proxy"),
                close=True,
            )
        else:
            self.error = ProxyError(
                Reason.INTERNAL_ERROR, "Internal error in the proxy"
            )
            self.record()
            self.protocol.abort()

    def fail(self, error: ProxyError, close: bool = False) -> None:
        """
        The exchange failed before a response head went to the client:
        answer with C{error}, and close the client connection after it if
        C{close}.
        """
        self.error = error
        self.status = self.factory.status(error)
        log.info(
            "{rq_id} {method} {url}: {reason} ({code})",
            rq_id=self.requestID,
            method=self.request.method.decode("ascii", "replace"),
            url=self.url,
            reason=error.message,
            code=int(error.reason),
        )
        # After a bug the connection's state is not trusted with another
        # request.
        close = close or error.reason is Reason.INTERNAL_ERROR
        self.protocol.sendError(error, close=close, requestID=self.requestID)
        self.finish()

    def finish(self) -> None:
        """
        Write the access-log line and let the client connection go on.
        """
        if self.finished:
            return
        self.record()
        self.protocol.exchangeDone()

    def record(self) -> None:
        """
        The exchange is over: hand its record (itself) to every observer,
        once.
        """
        if self.finished:
            return
        self.finished = True
        if self._counted:
            self.factory.active[self.proxyType] -= 1
        for observer in self.factory.observers:
            observer.exchangeEnded(self)

    @property
    def sni(self) -> str | None:
        """
        The TLS server name the exchange carried, for accounting: that of
        the TLS session nearest the destination that has one.  Here, the
        one the client sent to a TLS listener, if any.
        """
        return self.protocol.serverName

    @property
    def application(self) -> str | None:
        """
        The L7 protocol the exchange carried, for accounting.
        """
        return "http/1.1"

    @property
    def details(self) -> list[str] | tuple[()]:
        """
        The URLs the exchange carried, for accounting.
        """
        return [self.url]

    def wireCounts(self) -> tuple[int, int]:
        """
        The bytes that crossed the client's connection for this exchange,
        up and down, heads and framing included (the control webhook's
        C{bytes_up} and C{bytes_down}): what the connection counted since
        the exchange before this one took its counts
        (L{IClientChannel.takeCounts}).  Taken once, as the exchange ends.
        """
        return self.protocol.takeCounts()

    def clientLost(self, reason: Failure | None) -> None:
        """
        The client connection closed before the exchange finished.
        """
        self._stop()
        self.endedBecause = "client closed the connection"
        self.record()

    def abandon(self, error: ProxyError) -> None:
        """
        The client broke the protocol in the request's body: end the
        exchange with C{error}; the client is answered and cut off by the
        protocol.
        """
        self._stop()
        self.error = error
        self.status = error.status
        self.record()

    def _stop(self) -> None:
        self._clientGone = True
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    # Request body events; a tunnel has none.

    def requestData(self, data: bytes) -> None:
        pass

    def requestDone(self) -> None:
        pass


class Refused(Exchange):
    """
    A request refused before anything was looked up (a malformed target).
    Its body, if any, is read and dropped so that the connection can go on.
    """

    __slots__ = ("proxyType", "_error")

    def __init__(
        self,
        protocol: IClientChannel,
        factory: ProxyFactory,
        request: RequestHead,
        error: ProxyError,
    ) -> None:
        super().__init__(protocol, factory, request, None)
        self.proxyType = "connect" if request.method == b"CONNECT" else "http"
        self._error = error

    def start(self) -> None:
        self.fail(self._error)
