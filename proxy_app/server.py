"""
The proxy's client side: L{ProxyFactory} and the protocol it builds for
each client connection, which serves forwarded requests
(C{GET http://host/path}) and CONNECT tunnels on the same port.

Requests are parsed with llhttp (L{proxy_app.http1}), which hands us the
bytes that follow a CONNECT head, what a tunnel needs and what
C{twisted.web}'s C{HTTPChannel} does not offer without its private
attributes (see C{docs/architecture.md}).

A request's path: parse and normalize the target, vet the destination
through the L{IDestinationResolver} (no byte goes anywhere before that),
connect through the L{Connector} to a vetted address only, then stream.
"""

from __future__ import annotations

import os
import re
from http import HTTPStatus
from typing import Any

import attr
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy_app.access import AccessControl, AuthFailed
from proxy_app.acl import ACLDecision
from proxy_app.config import Config
from proxy_app.http1 import (
    DATA,
    END,
    HEAD,
    LAST_CHUNK,
    HeadError,
    RequestHead,
    RequestReader,
    ResponseHead,
    chunk,
    responseHead,
)
from proxy_app.interfaces import IDestinationResolver, IResponseSink
from proxy_app.limits import Overloaded, RateLimiter
from proxy_app.observe import AccessLog, DecisionLog, Metrics
from proxy_app.reasons import DENIALS, ProxyError, Reason
from proxy_app.redact import loggedTarget
from proxy_app.resolver import DestinationDenied, VettedDestination
from proxy_app.sniffer import TLSSniffer
from proxy_app.target import Target, hostPort, parseAbsoluteTarget, parseConnectTarget
from proxy_app.tls import Origination
from proxy_app.upstream import (
    NOT_PASSED,
    Connector,
    Timer,
    TLSHandshakeTimeout,
    TLSSettings,
    UpstreamHTTP,
    UpstreamPool,
    UpstreamTunnel,
    UpstreamTunnelFactory,
    endToEndHeaders,
    framingHeaders,
)
from proxy_app.webhook import (
    GateResult,
    WebhookService,
    approvedAddresses,
    connectionInfoDetails,
    connectionStopInfo,
    sessionLabel,
)

log = Logger()

_PHRASES = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_DISCARD_LIMIT = 65536
# The read size and write-buffer threshold of an established tunnel's two
# connections: a busy tunnel with a slow reader holds up to about twice this
# per direction.  (Relaying a 256 MiB file with glibc's allocator tuned:
# 64 KiB 690-716 MB/s, 256 KiB 837-907, 512 KiB 997-1,148, 2 MiB
# 1,355-1,365.)
TUNNEL_BUFFER = 524288
# What a well-formed incoming request id looks like; anything else is
# replaced, since it ends up in logs and upstream headers.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+=@-]{0,127}$")
# The methods RFC 9110 (9.2.2) calls idempotent: a request with one of them
# may be sent again when a reused connection closed before answering.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


_TLS_FAILURES = {
    Reason.TLS_HANDSHAKE_FAILED: "handshake",
    Reason.CERTIFICATE_INVALID: "certificate",
}


def errorResponse(
    error: ProxyError,
    extraHeaders: list[tuple[bytes, bytes]] | None = None,
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """
    The headers and plain-text body of the response the proxy makes for
    C{error}: the C{X-WhSentry-Reason} and C{X-WhSentry-ReasonCode} headers
    and the message.
    """
    body = (error.message + "\n").encode("utf-8")
    reason = error.message.encode("ascii", "backslashreplace")
    reason = reason.replace(b"\r", b" ").replace(b"\n", b" ").replace(b"\x00", b" ")
    headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"X-Content-Type-Options", b"nosniff"),
        (b"X-WhSentry-Reason", reason),
        (b"X-WhSentry-ReasonCode", str(int(error.reason)).encode("ascii")),
    ]
    headers.extend(getattr(error, "headers", ()))
    if extraHeaders:
        headers.extend(extraHeaders)
    return headers, body


class ProxyFactory(Factory):
    """
    Builds a L{ProxyProtocol} for each client connection and holds what
    they share.

    @ivar resolver: the L{IDestinationResolver} vetting every destination.
    @ivar connector: the L{Connector}, the one way out.
    @ivar pool: the L{UpstreamPool} of persistent origin connections.
    @ivar connections: the live client protocols, for draining.
    @ivar draining: set on shutdown: finish what is in flight, take nothing
        new.
    """

    noisy = False

    def __init__(
        self,
        config: Config,
        resolver: IDestinationResolver,
        clock: Any,
        connector: Connector,
        accessLog: AccessLog,
        origination: Origination | None = None,
        metrics: Metrics | None = None,
        webhook: WebhookService | None = None,
        access: AccessControl | None = None,
        decisionLog: DecisionLog | None = None,
    ) -> None:
        self.config = config
        self.origination = origination
        self.webhook = webhook
        self.access = access if access is not None else AccessControl()
        self.decisionLog = decisionLog if decisionLog is not None else DecisionLog(None)
        self.metrics = metrics if metrics is not None else Metrics(process=False)
        # Matched in lower case (as the parser gives names), sent as configured.
        self.requestIDName = config.access_log.request_id_header.encode("ascii")
        self.requestIDHeader = self.requestIDName.lower()
        # What is not passed on of a request's and a response's headers
        # (Host is re-made from the URI; the request id is the proxy's).
        self.responseDrop = NOT_PASSED | {self.requestIDHeader}
        self.requestDrop = self.responseDrop | {b"host"}
        self.resolver = resolver
        self.clock = clock
        self.connector = connector
        self.pool = UpstreamPool(
            connector, clock, config.timeouts.read, config.timeouts.lifetime
        )
        self.accessLog = accessLog
        self.connections: set[ProxyProtocol] = set()
        self.draining = False
        self._drained: Deferred | None = None
        # Exchanges in progress, by proxy type, for the concurrency limits.
        self.active = {"http": 0, "connect": 0}
        limits = config.limits
        self.rateLimiter = (
            RateLimiter(clock, limits.max_request_rate, limits.request_burst)
            if limits.max_request_rate
            else None
        )
        self._idPrefix = os.urandom(4).hex()
        self._counter = 0

    def buildProtocol(self, addr: Any) -> ProxyProtocol:
        return ProxyProtocol(self)

    def forListener(self, name: str) -> Factory:
        """
        A factory for one listener, so that connections are counted per
        listener.
        """
        return _ListenerFactory(self, name)

    def overloaded(self, exchange: _Exchange) -> Overloaded | None:
        """
        The refusal for C{exchange} if a concurrency limit is reached.
        """
        limits = self.config.limits
        limit = (
            limits.max_concurrent_tunnels
            if exchange.proxyType == "connect"
            else limits.max_concurrent_requests
        )
        # The exchange itself is already counted.
        if limit and self.active[exchange.proxyType] > limit:
            kind = "tunnels" if exchange.proxyType == "connect" else "requests"
            return Overloaded(
                f"Too many concurrent {kind} (limit {limit}); try again shortly", 503, 1
            )
        return None

    def acceptRequestID(self, value: str | None) -> str:
        """
        The request id to use: the client's, when it is well formed, else a
        new one.
        """
        if value is not None and _REQUEST_ID.match(value):
            return value
        return self.newRequestID()

    def newRequestID(self) -> str:
        """
        A request id unique within this process and unlikely to repeat
        across processes: the control webhook's connection id
        (C{Proxy-<8 hex>-OID-<12 hex>}) when there is a webhook, so that
        logs and webhook events share it.
        """
        if self.webhook is not None:
            return self.webhook.newConnectionID()
        self._counter += 1
        return f"{self._idPrefix}-{self._counter:08x}"

    def drain(self) -> Deferred:
        """
        Stop taking new requests: idle keep-alive connections close now,
        busy ones after their current exchange.

        @return: a L{Deferred} that fires once no client connection is left.
        """
        self.draining = True
        self._drained = Deferred()
        for connection in list(self.connections):
            connection.drain()
        self.pool.closeIdle()
        self._checkDrained()
        return self._drained

    def connectionClosed(self, connection: ProxyProtocol) -> None:
        self.connections.discard(connection)
        self._checkDrained()

    def _checkDrained(self) -> None:
        if self._drained is not None and not self.connections and not self._drained.called:
            self._drained.callback(None)


class _ListenerFactory(Factory):
    noisy = False

    def __init__(self, proxy: ProxyFactory, name: str) -> None:
        self.proxy = proxy
        self.name = name

    def buildProtocol(self, addr: Any) -> ProxyProtocol:
        protocol = self.proxy.buildProtocol(addr)
        protocol.listener = self.name
        return protocol


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class ProxyProtocol(Protocol):
    """
    One client connection: a sequence of forwarded requests, possibly ending
    in a CONNECT tunnel.
    """

    # A TCP or TLS transport: producer, consumer, half-closeable, abortable.
    transport: Any

    def __init__(self, factory: ProxyFactory) -> None:
        self.factory = factory
        config = factory.config
        limits = config.limits
        # None once the connection is a tunnel.
        self._reader: RequestReader | None = RequestReader(
            limits.max_uri_length, limits.max_header_count, limits.max_request_header
        )
        self._headerTimer = Timer(
            factory.clock, config.timeouts.request_header, self._headerTimeout
        )
        self.exchange: _Exchange | None = None
        self.tunnel: ConnectExchange | None = None
        self._waiting = False
        # Whether we stopped reading the client (flow control aside).
        self._paused = False
        # The current request: its head, and whether its end has been read.
        self._request: RequestHead | None = None
        self._requestEnded = False
        # Whether the request's end had been read when it started (its
        # whole body in the queue): nothing of it to hold back.
        self.requestReadWhole = False
        # The response in progress: a head was sent and its end was not;
        # its body is chunked; the connection closes after it.
        self._responding = False
        self._chunked = False
        self._closeAfter = False
        self._clientDone = False
        # While not None: bytes of an answered request's body still to be
        # read and dropped before the next request.
        self._discard: int | None = None
        self.clientAddress = ""
        self.peerHost = ""
        self.peerPort = 0
        self.overTLS = False
        self.listener = "default"
        # Who the client is, from a verified TLS client certificate.
        self.role: str | None = None
        self.certificateCN: str | None = None
        self.certificateOU: str | None = None

    # Connection events.

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        self.factory.metrics.listenerConnections(self.listener).inc()
        peer = self.transport.getPeer()
        host = getattr(peer, "host", "")
        self.peerHost, self.peerPort = host, getattr(peer, "port", 0)
        self.clientAddress = hostPort(host, self.peerPort)
        if self.factory.webhook is not None:
            self.factory.webhook.neighbor(host)
        if self.factory.draining:
            self.transport.loseConnection()
            return
        self._headerTimer.start()

    def handshakeCompleted(self) -> None:
        """
        A TLS listener's handshake is done: a verified client certificate's
        subject CN becomes the role, as Smokescreen derives roles.
        """
        self.overTLS = True
        certificate = self.transport.getPeerCertificate()
        if certificate is None:
            return
        subject = certificate.get_subject()
        self.certificateCN = subject.CN
        self.certificateOU = subject.OU
        self.role = subject.CN

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.fromClient(data)
            return
        reader = self._reader
        assert reader is not None
        try:
            reader.feed(data)
            if self.exchange is not None and (
                self._waiting or self._requestEnded or reader.upgraded
            ):
                # Whatever follows a request read whole (a pipelined
                # request, or what follows a CONNECT head) waits, and no
                # more is read.
                self._pause()
            self._process()
        except Exception:
            # The safety net under every step a request takes from here,
            # the Deferred-free path included: a bug is answered, never a
            # silent close.
            self.internalError(Failure())

    def internalError(self, failure: Failure) -> None:
        """
        A bug surfaced while handling this connection: the exchange in
        progress answers 500 (1009), or is cut off if its response has
        begun; the connection then closes.
        """
        self._closeAfter = True
        exchange = self.exchange
        if exchange is not None:
            exchange.internalError(failure)
            return
        log.failure("Internal error on the connection from {client}", failure, client=self.clientAddress)
        if self.transport is None:
            return
        if self._responding:
            self.abort()
            return
        self.sendError(ProxyError(Reason.INTERNAL_ERROR, "Internal error in the proxy"), close=True)
        self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        if self.tunnel is not None:
            self.tunnel.clientReadClosed()
            return
        self._clientDone = True
        reader = self._reader
        if reader is None:
            return
        reader.finish()
        self._process()
        if self.exchange is None and self.transport is not None and not reader.events:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self.tunnel is not None:
            self.tunnel.clientWriteClosed()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._headerTimer.cancel()
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.clientLost(reason)
        self.factory.metrics.listenerConnections(self.listener).dec()
        self.factory.connectionClosed(self)

    # Request parsing.

    def _process(self) -> None:
        """
        Act on parsed request events, as far as the exchange in progress
        lets us.
        """
        reader = self._reader
        if reader is None:
            return
        events = reader.events
        while events and not self._waiting and self.tunnel is None and self.transport is not None:
            kind, value = events[0]
            if kind == HEAD:
                if self.exchange is not None or self._discard is not None:
                    # A pipelined request waits, unread, until this
                    # exchange is over.
                    self._pause()
                    return
                events.popleft()
                # The header timer is left running (restarting it for the
                # next request is cheaper than cancelling it); it ignores
                # a request in progress.
                self._startRequest(value)
            elif kind == DATA:
                events.popleft()
                if self._discard is not None:
                    self._discard -= len(value)
                    if self._discard < 0:
                        self.transport.loseConnection()
                        return
                elif self.exchange is not None:
                    self.exchange.requestData(value)
            elif kind == END:
                events.popleft()
                self._requestEnded = True
                if self._discard is not None:
                    self._discard = None
                    self._nextCycle()
                    return
                if self.exchange is not None:
                    self.exchange.requestDone()
            else:
                if self._requestEnded and self.exchange is not None:
                    # A malformed request behind a whole one: answered
                    # once that one has been.
                    self._pause()
                    return
                events.popleft()
                self._malformed(value)
                return

    def _malformed(self, error: HeadError) -> None:
        """
        The client sent something that is not HTTP/1.1 as the proxy reads
        it: answer 400 (or the status the error names) if no response is
        under way, and close.
        """
        self._headerTimer.cancel()
        refusal = ProxyError(Reason.BAD_REQUEST, error.message, status=error.status)
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            self._refuse(refusal)
            return
        if self._responding:
            self.abort()
            exchange.clientLost(None)
            return
        # A request body broke off: the exchange ends with the error, and
        # nothing more of it goes anywhere.
        exchange.abandon(refusal)
        self.sendError(refusal, close=True, requestID=exchange.requestID)
        self.transport.loseConnection()

    def _refuse(self, error: ProxyError, method: str = "", url: str = "") -> None:
        """
        Answer a request that is not going anywhere, then close.
        """
        self.sendError(error, close=True)
        proxyType = "connect" if method == "CONNECT" else "http"
        self.factory.metrics.requestDone(proxyType, int(error.reason), 0, 0)
        self.factory.accessLog.record(
            rq_id=self.factory.newRequestID(),
            client_addr=self.clientAddress,
            method=method or None,
            url=url or None,
            response_code=error.status,
            response_time=0.0,
            bytes_up=0,
            bytes_down=0,
            reason_code=int(error.reason),
            error=error.message,
        )
        self.transport.loseConnection()

    def _startRequest(self, request: RequestHead) -> None:
        self._request = request
        self._requestEnded = False
        self._closeAfter = not request.keepAlive
        exchange: ForwardExchange | ConnectExchange
        try:
            if request.method == b"CONNECT":
                exchange = ConnectExchange(self, request, parseConnectTarget(request.target))
            else:
                exchange = ForwardExchange(self, request, parseAbsoluteTarget(request.target))
        except ProxyError as error:
            refused = _Refused(self, request, error)
            self.exchange = refused
            refused.start()
            return
        self.exchange = exchange
        self._waiting = True
        self.requestReadWhole = self._requestQueued()
        if not self.requestReadWhole:
            # Until the destination is vetted and connected, the client is
            # not read, so that no body piles up meanwhile.  (A request
            # already read whole needs no pause: anything after it waits in
            # the queue, and a pipelined head pauses reading when it gets
            # there.)
            self._pause()
        exchange.count()
        overload = self.factory.overloaded(exchange)
        if overload is not None:
            exchange.fail(overload)
            return
        exchange.start()

    def _requestQueued(self) -> bool:
        """
        Whether the end of the current request is already in the queue.
        """
        assert self._reader is not None
        for kind, _ in self._reader.events:
            if kind == END:
                return True
            if kind != DATA:
                return False
        return False

    def _pause(self) -> None:
        self._paused = True
        self.transport.pauseProducing()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def resumeRequest(self) -> None:
        """
        The exchange can take the request body now.
        """
        self._waiting = False
        self._resume()
        self._process()

    # Responding.

    def sendInformational(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """
        Send a 1xx response ahead of the final one.
        """
        if self.transport is not None and not self._responding:
            self.transport.write(responseHead(status, reason, headers))

    def sendHead(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
        bodiless: bool = False,
    ) -> bool:
        """
        Send a response head, adding the framing headers for the body that
        follows: C{length} bytes, or (for L{None}) as many as come before
        L{sendEnd}: chunked to an HTTP/1.1 client, up to the close to an
        HTTP/1.0 one.  A C{bodiless} response (to HEAD, or a 204 or 304)
        gets no framing headers beyond those in C{headers}.

        @return: C{False} if the client has gone or a response was already
            under way (the connection is then aborted).
        """
        if self.transport is None or self._responding:
            self.abort()
            return False
        self._chunked = False
        if bodiless:
            pass
        elif length is not None:
            headers.append((b"Content-Length", b"%d" % length))
        elif self._request is not None and self._request.version == "1.0":
            self._closeAfter = True
        else:
            self._chunked = True
            headers.append((b"Transfer-Encoding", b"chunked"))
        if self.factory.draining or self._clientDone:
            self._closeAfter = True
        if self._closeAfter:
            headers.append((b"Connection", b"close"))
        self._responding = not bodiless
        self.transport.write(responseHead(status, reason or _PHRASES.get(status, b""), headers))
        return True

    def sendTunnelEstablished(self) -> bool:
        """
        Answer a CONNECT: the tunnel is up.
        """
        if self.transport is None or self._responding:
            return False
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        return True

    def sendBody(self, data: bytes) -> None:
        """
        Send part of the body of the response whose head L{sendHead} sent.
        A body byte with no such head before it would be read by the client
        as a response of its own (to this request or the next): rather than
        ever write one, the connection is cut.
        """
        if self.transport is None or not data:
            return
        if not self._responding:
            log.error(
                "Refused to write {size} body bytes to {client} without a response head; "
                "connection aborted",
                size=len(data),
                client=self.clientAddress,
            )
            self.abort()
            return
        self.transport.write(chunk(data) if self._chunked else data)

    def sendEnd(self) -> None:
        if self._responding and self.transport is not None and self._chunked:
            self.transport.write(LAST_CHUNK)
        self._responding = False

    def sendError(
        self, error: ProxyError, close: bool = False, requestID: str | None = None
    ) -> bool:
        extra = (
            [(self.factory.requestIDName, requestID.encode("ascii"))]
            if requestID is not None
            else None
        )
        headers, body = errorResponse(error, extra)
        if close:
            self._closeAfter = True
        if not self.sendHead(error.status, b"", headers, len(body)):
            return False
        self.sendBody(body)
        self.sendEnd()
        return True

    def abort(self) -> None:
        """
        Cut the client connection so that it cannot mistake a partial
        response for a complete one.
        """
        if self.transport is not None:
            self.transport.abortConnection()

    def exchangeDone(self) -> None:
        """
        The current request has been answered: read the next one, or close.
        """
        self.exchange = None
        self._waiting = False
        if self.transport is None:
            return
        if self._responding:
            # The response was not finished: the client must not take it
            # for a whole one.
            self.abort()
            return
        if self._closeAfter or self.factory.draining or self._clientDone:
            self.transport.loseConnection()
            return
        if not self._requestEnded:
            # Answered before the body was read (an error, or an origin
            # that did not wait): read and drop a small remainder so the
            # connection can go on; a large one is not worth it.
            self._discard = _DISCARD_LIMIT
            self._resume()
            self._process()
            return
        self._nextCycle()

    def _nextCycle(self) -> None:
        """
        Wait for the next request on this connection.
        """
        assert self._reader is not None
        self._request = None
        self._requestEnded = False
        self._headerTimer.start()
        # After a refused CONNECT or a forwarded upgrade request, what the
        # client sent after it is read as the next request.
        self._reader.resume()
        self._resume()
        self._process()

    def becomeTunnel(self, exchange: ConnectExchange) -> bytes:
        """
        The CONNECT succeeded: from now on every byte from the client goes
        to the tunnel.

        @return: bytes the client sent after the CONNECT head.
        """
        self.tunnel = exchange
        self._headerTimer.cancel()
        assert self._reader is not None
        leftover = self._reader.leftover
        # No HTTP on this connection any more: let the parser go, since
        # idle tunnels are held by the thousand.
        self._reader = None
        self._request = None
        return leftover

    def drain(self) -> None:
        if self.exchange is None and self.tunnel is None:
            self.transport.loseConnection()

    def _headerTimeout(self) -> None:
        if self.exchange is not None or self.tunnel is not None or self._discard is not None:
            return
        if self._reader is not None and self._reader.inHead:
            self._refuse(
                ProxyError(
                    Reason.BAD_REQUEST,
                    "Request head not received within "
                    f"{self.factory.config.timeouts.request_header:g} s",
                    status=408,
                )
            )
        else:
            # An idle keep-alive connection: nothing to answer.
            self.transport.loseConnection()


def _header(headers: Any, name: bytes) -> str | None:
    """
    The first value of header C{name} (lower case), decoded, or L{None}.
    """
    for key, value in headers:
        if key == name:
            return value.decode("latin-1").strip()
    return None


def _wantsTLS(headers: Any) -> bool:
    """
    Whether C{X-WhSentry-TLS} asks for TLS origination: any value but C{0}
    or C{false}.
    """
    value = _header(headers, b"x-whsentry-tls")
    return value is not None and value.lower() not in ("0", "false")


class _Exchange:
    """
    What forwarded requests and tunnels share: the request, its id, the
    vetting of its target, the access-log line.
    """

    proxyType = ""

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
        "_connectStarted",
        "_connect",
        "_destination",
        "connectionID",
        "statistics",
        "session",
        "gateResult",
        "_webhookStarted",
        "role",
        "aclDecision",
        "outboundAddress",
        "bytesUp",
        "bytesDown",
        "status",
        "error",
        "_pending",
        "_finished",
        "_counted",
        "_clientGone",
        "_decisionLogged",
        "_url",
    )

    def __init__(self, protocol: ProxyProtocol, request: RequestHead, target: Target | None) -> None:
        self.protocol = protocol
        self.factory = protocol.factory
        self.request = request
        self.target = target
        incomingID = _header(request.headers, self.factory.requestIDHeader)
        self.requestID = self.factory.acceptRequestID(incomingID)
        self.started = self.factory.clock.seconds()
        self.dnsTime: float | None = None
        self.connectTime: float | None = None
        self._connectStarted = 0.0
        self._connect: Any = None
        self._destination: VettedDestination | None = None
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
        self.statistics = webhook.newStatistics() if webhook is not None else None
        self.session = ""
        self.gateResult: GateResult | None = None
        self._webhookStarted = False
        # Who asked, and what the ACL said.
        self.role: str | None = protocol.role
        self.aclDecision: ACLDecision | None = None
        self.outboundAddress: str | None = None
        self.bytesUp = 0
        self.bytesDown = 0
        self.status: int | None = None
        self.error: ProxyError | None = None
        self._pending: Deferred | None = None
        self._finished = False
        self._counted = False
        self._clientGone = False
        self._decisionLogged = False
        self._url: str | None = None

    @property
    def url(self) -> str:
        """
        The request target as every log line and webhook event shows it:
        without userinfo, query values redacted unless configured (see
        L{loggedTarget}); made once per exchange.
        """
        url = self._url
        if url is None:
            url = self._url = loggedTarget(
                self.request.target, self.factory.config.access_log.log_query_values
            )
        return url

    def start(self) -> None:
        raise NotImplementedError()

    def count(self) -> None:
        """
        Count this exchange against its concurrency limit until it ends.
        """
        self._counted = True
        self.factory.active[self.proxyType] += 1


    def _vetAndConnect(self, connect: Any) -> None:
        """
        Identify the client, decide, vet the target, then call
        C{connect(destination)}, which returns an upstream protocol or a
        L{Deferred} of one; L{_connected} gets it.

        Each step answers at once when it can (no password to check, an IP
        literal or a cached name, an idle pooled connection, no gate), and
        the request then goes through without a single L{Deferred}: most
        requests do.  A step that has to wait makes the rest a callback
        chain.
        """
        target = self.target
        assert target is not None
        self._connect = connect
        factory = self.factory
        try:
            role = factory.access.identify(
                self.protocol.role, self.request.headers, self.protocol.peerHost
            )
            if isinstance(role, Deferred):
                role.addCallback(self._identified)
                self._wait(role)
                return
            self._decide(role)
            destination = factory.resolver.vetNow(target.host, target.port)
            if destination is None:
                d = factory.resolver.vet(target.host, target.port)
                self._wait(d.addCallback(self._vettedThenConnect))
                return
            upstream = self._vettedThenConnect(destination)
        except Exception:
            # The same answer as on the callback path: a ProxyError is
            # answered as it is, anything else is a 500 and a traceback.
            self._setupFailed(Failure())
            return
        self._whenConnected(upstream)

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

    def _identified(self, role: str | None) -> Any:
        assert self.target is not None
        self._decide(role)
        return self.factory.resolver.vet(self.target.host, self.target.port).addCallback(
            self._vettedThenConnect
        )

    def _vettedThenConnect(self, destination: VettedDestination) -> Any:
        self._vetted(destination)
        # The addresses that may be tried (capped, in connect order) are
        # fixed here, before the gate is asked: the gate judges exactly
        # these, and the connector, the pool and a retry get only what it
        # approved, as one object.
        destination = self.factory.connector.candidates(destination)
        webhook = self.factory.webhook
        if webhook is not None and webhook.gateEnabled:
            return self._askGate(destination).addCallback(self._approved)
        return self._approved(destination)

    def _approved(self, destination: VettedDestination) -> Any:
        self._destination = destination
        return self._connect(destination)

    def _decide(self, role: str | None) -> None:
        """
        The ACL decides on the name; the address policy decides later on
        the addresses, so neither check can be passed through the other.
        """
        assert self.target is not None
        self.role = role
        limiter = self.factory.rateLimiter
        if limiter is not None:
            wait = limiter.take(role or "")
            if wait:
                raise Overloaded(
                    f"Request rate limit reached for role '{role or 'anonymous'}'", 429, wait
                )
        decision = self.aclDecision = self.factory.access.decide(role, self.target.host)
        if self.factory.access.acl is not None:
            outcome = "deny"
            if decision.allow:
                outcome = "report" if decision.action == "report" and decision.enforceWouldDeny else "allow"
            self.factory.metrics.aclDecisions.labels(
                decision.rule or "", decision.project or "", outcome
            ).inc()
        if not decision.allow:
            raise ProxyError(
                Reason.DENIED_BY_ACL,
                f"Egress proxying is denied to host '{self.target.authority}': "
                f"{decision.reason}.",
            )

    def _vetted(self, destination: VettedDestination) -> VettedDestination:
        metrics = self.factory.metrics
        self.dnsTime = destination.lookupTime
        if destination.lookupTime:
            metrics.dnsTime.observe(destination.lookupTime)
        for decision in destination.denied:
            metrics.resolverDenials.labels(decision.label).inc()
            log.info(
                "{rq_id}: dropped answer {address} for {host}: {rule}",
                rq_id=self.requestID,
                address=decision.address,
                host=destination.host,
                rule=decision.rule,
            )
        self._connectStarted = self.factory.clock.seconds()
        return destination

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

    def _sessionLabel(self, address: str) -> str:
        assert self.target is not None
        return sessionLabel(
            self.protocol.peerHost,
            self.protocol.peerPort,
            address,
            self.target.port,
            self.originatesTLS,
            clientTLS=self.protocol.overTLS,
        )

    def _askGate(self, destination: VettedDestination) -> Any:
        """
        With the access-request gate on, wait for the control webhook's
        word before connecting.  The request names every address that may
        be tried; the webhook may accept only some of them.

        @return: a L{Deferred} firing with C{destination} narrowed to the
            addresses the webhook approved.
        """
        webhook = self.factory.webhook
        if webhook is None or not webhook.gateEnabled:
            return destination
        session = self._sessionLabel(destination.addresses[0])

        def decided(result: GateResult) -> VettedDestination:
            self.gateResult = result
            metrics = self.factory.metrics
            metrics.gateLatency.observe(result.latency)
            metrics.gateOutcomes.labels("accept" if result.accepted else "reject").inc()
            if not result.accepted:
                raise ProxyError(
                    Reason.REJECTED_BY_WEBHOOK,
                    f"Connection to {self.target.authority if self.target else ''} "
                    f"rejected by the access-request webhook: {result.reason}",
                )
            approved = approvedAddresses(result.reply, destination.addresses)
            if not approved:
                raise ProxyError(
                    Reason.REJECTED_BY_WEBHOOK,
                    f"Connection to {self.target.authority if self.target else ''} "
                    "rejected by the access-request webhook: it approved none of "
                    f"the addresses {', '.join(destination.addresses)}",
                )
            if approved == destination.addresses:
                return destination
            return attr.evolve(destination, addresses=approved)

        return webhook.accessRequest(
            self.connectionID, self.policy, session, addresses=destination.addresses
        ).addCallback(decided)

    def _connectedOrStale(self, upstream: Any) -> None:
        self._pending = None
        webhook = self.factory.webhook
        if not self._finished:
            peer = upstream.transport.getPeer()
            self.outboundAddress = hostPort(peer.host, peer.port)
        if webhook is not None and not self._finished:
            self.session = self._sessionLabel(upstream.transport.getPeer().host)
            webhook.connectionStarted(self.connectionID, self.session)
            self._webhookStarted = True
        if not getattr(upstream, "reused", False):
            self.connectTime = self.factory.clock.seconds() - self._connectStarted
            self.factory.metrics.connectTime.observe(self.connectTime)
        if self._finished:
            # The client went away while we were connecting.
            upstream.transport.loseConnection()
            return
        self._connected(upstream)

    def _connected(self, upstream: Any) -> None:
        raise NotImplementedError()

    def _setupFailed(self, failure: Failure) -> None:
        self._pending = None
        if failure.check(CancelledError) or self._finished or self._clientGone:
            return
        if isinstance(failure.value, DestinationDenied):
            self.factory.metrics.resolverDenials.labels(failure.value.decision.label).inc()
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
        self.fail(ProxyError(Reason.INTERNAL_ERROR, "Internal error in the proxy"), close=True)

    def internalError(self, failure: Failure) -> None:
        """
        A bug surfaced while setting up or running this exchange: log the
        traceback, and answer 500 (1009) if no response head has gone to the
        client, else cut the client off.  Either way the client connection
        does not carry another request, since its state is not trusted.
        """
        log.failure("Internal error handling {url}", failure, url=self.url)
        if self._finished:
            return
        if self.status is None:
            self.fail(ProxyError(Reason.INTERNAL_ERROR, "Internal error in the proxy"), close=True)
        else:
            self.error = ProxyError(Reason.INTERNAL_ERROR, "Internal error in the proxy")
            self.record()
            self.protocol.abort()


    def fail(self, error: ProxyError, close: bool = False) -> None:
        """
        The exchange failed before a response head went to the client:
        answer with C{error}, and close the client connection after it if
        C{close}.
        """
        self.error = error
        self.status = error.status
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
        if self._finished:
            return
        self.record()
        self.protocol.exchangeDone()

    def record(self, error: str | None = None) -> None:
        """
        Write the exchange's access-log line, once.
        """
        if self._finished:
            return
        self._finished = True
        if self._counted:
            self.factory.active[self.proxyType] -= 1
        if error is None and self.error is not None:
            error = self.error.message
        reasonCode = int(self.error.reason) if self.error is not None else None
        self._reportToWebhook()
        metrics = self.factory.metrics
        decision = self.aclDecision
        report = (
            decision is not None
            and decision.action == "report"
            and decision.enforceWouldDeny
            and self.error is None
        )
        metrics.requestDone(self.proxyType, reasonCode, self.bytesUp, self.bytesDown, report)
        if self.error is not None:
            kind = _TLS_FAILURES.get(self.error.reason)
            if isinstance(self.error, TLSHandshakeTimeout):
                kind = "timeout"
            if kind is not None:
                metrics.tlsFailures.labels(kind).inc()
        if self.factory.accessLog.enabled:
            self._writeAccessLine(reasonCode, error)
        if not self._decisionLogged:
            self.logDecision()

    def _writeAccessLine(self, reasonCode: int | None, error: str | None) -> None:
        self.factory.accessLog.record(
            rq_id=self.requestID,
            client_addr=self.protocol.clientAddress,
            method=self.request.method.decode("ascii", "replace"),
            url=self.url,
            response_code=self.status,
            response_time=round(self.factory.clock.seconds() - self.started, 6),
            bytes_up=self.bytesUp,
            bytes_down=self.bytesDown,
            reason_code=reasonCode,
            error=error,
            role=self.role,
            client_cn=self.protocol.certificateCN,
            client_ou=self.protocol.certificateOU,
        )

    def logDecision(self) -> None:
        """
        Write Smokescreen's C{CANONICAL-PROXY-DECISION} line.
        """
        self._decisionLogged = True
        if not self.factory.decisionLog.enabled:
            return
        decision = self.aclDecision
        error = self.error
        reason: str | None
        if error is not None and error.reason is not Reason.DENIED_BY_ACL:
            reason = error.message
        else:
            reason = decision.reason if decision is not None else None
        self.factory.decisionLog.record(
            msg="CANONICAL-PROXY-DECISION",
            id=self.requestID,
            proxy_type=self.proxyType,
            requested_host=self.target.authority if self.target is not None else self.url,
            role=self.role,
            project=decision.project if decision is not None else None,
            decision_reason=reason,
            enforce_would_deny=decision.enforceWouldDeny if decision is not None else False,
            allow=error is None or error.reason not in DENIALS,
            inbound_remote_addr=self.protocol.clientAddress,
            outbound_remote_addr=self.outboundAddress,
            dns_lookup_time_ms=_ms(self.dnsTime),
            conn_establish_time_ms=_ms(self.connectTime),
            status_code=self.status,
        )

    def _stopInfo(self) -> dict[str, Any]:
        return connectionStopInfo(
            self.session, self.policy, self.bytesUp, self.bytesDown, app="http/1.1", details=[self.url]
        )

    def _reportToWebhook(self) -> None:
        webhook = self.factory.webhook
        if webhook is None:
            return
        if self._webhookStarted:
            webhook.connectionStopped(self.connectionID, self._stopInfo())
        details = connectionInfoDetails(self.statistics if self._webhookStarted else None, self.gateResult)
        if details:
            webhook.connectionInfo(self.connectionID, details)

    def clientLost(self, reason: Failure | None) -> None:
        """
        The client connection closed before the exchange finished.
        """
        self._stop()
        self.record("client closed the connection")

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


class _Refused(_Exchange):
    """
    A request refused before anything was looked up (a malformed target).
    Its body, if any, is read and dropped so that the connection can go on.
    """

    __slots__ = ("proxyType", "_error")

    def __init__(self, protocol: ProxyProtocol, request: RequestHead, error: ProxyError) -> None:
        super().__init__(protocol, request, None)
        self.proxyType = "connect" if request.method == b"CONNECT" else "http"
        self._error = error

    def start(self) -> None:
        self.fail(self._error)


@implementer(IResponseSink)
class ForwardExchange(_Exchange):
    """
    One forwarded request: its body streams to the origin and the
    response streams back, each way with backpressure.
    """

    proxyType = "http"
    __slots__ = (
        "upstream",
        "headSent",
        "requestComplete",
        "_bodyProducing",
        "_responseProducing",
        "_tls",
        "_retried",
        "_limit",
    )

    def __init__(self, protocol: ProxyProtocol, request: RequestHead, target: Target) -> None:
        super().__init__(protocol, request, target)
        self.upstream: UpstreamHTTP | None = None
        self.headSent = False
        self.requestComplete = False
        self._bodyProducing = False
        self._responseProducing = False
        self._tls: TLSSettings | None = None
        self._retried = False
        self._limit = self.factory.config.limits.max_response_body

    def start(self) -> None:
        target = self.target
        assert target is not None
        tls = None
        if target.scheme == "https" or _wantsTLS(self.request.headers):
            # X-WhSentry-TLS makes an http:// URI mean https://, default
            # port included.
            port = target.port if target.explicitPort else 443
            self.target = target = attr.evolve(target, scheme="https", port=port)
            origination = self.factory.origination
            if origination is None:
                self.fail(ProxyError(Reason.BAD_SCHEME, "TLS origination is not configured"))
                return
            try:
                identity = origination.identity(_header(self.request.headers, b"x-whsentry-clientcert"))
            except ProxyError as error:
                self.fail(error)
                return
            try:
                creator = origination.creator(target.host, identity)
            except UnicodeError as e:
                # idna's errors: a name IDNA 2008 refuses (an underscore, an
                # emoji label) cannot be sent as SNI or verified.
                self.fail(
                    ProxyError(
                        Reason.BAD_TARGET,
                        f"Host name {target.host!r} cannot be used for TLS: {e}",
                    )
                )
                return
            tls = TLSSettings(
                target.host, identity.alias if identity is not None else None, creator
            )
        self._tls = tls
        self._vetAndConnect(lambda destination: self.factory.pool.acquire(destination, tls))

    def _decide(self, role: str | None) -> None:
        """
        Also check that the role may present the client certificate it
        named: the role is known only now, and nothing has been connected
        yet (nor taken from the pool).
        """
        super()._decide(role)
        tls = self._tls
        origination = self.factory.origination
        if tls is not None and tls.alias is not None and origination is not None:
            origination.permit(origination.identity(tls.alias), role)

    def _connected(self, upstream: UpstreamHTTP) -> None:
        assert self.target is not None
        self.upstream = upstream
        headers = [(b"Host", self.target.hostHeader)]
        drop = self.factory.requestDrop
        roleHeader = self.factory.access.roleHeader
        if roleHeader is not None:
            # A trusted role header is for the proxy only.
            drop = drop | {roleHeader}
        headers += endToEndHeaders(self.request, drop)
        headers.append((self.factory.requestIDName, self.requestID.encode("ascii")))
        headers += framingHeaders(self.request)
        upstream.sendRequest(
            self, self.request.method, self.target.path, headers, self.request.chunked
        )
        if self.requestComplete:
            # A retry: the (bodiless) request was read already.
            upstream.sendEnd()
            return
        if not self.protocol.requestReadWhole:
            # The client's body goes no faster than the origin takes it.
            # (A request already read whole has nothing left to hold back.)
            upstream.transport.registerProducer(self.protocol.transport, True)
            self._bodyProducing = True
        self.protocol.resumeRequest()

    @property
    def originatesTLS(self) -> bool:
        return self._tls is not None

    def _stopInfo(self) -> dict[str, Any]:
        assert self.target is not None
        url = self.url
        if self._tls is not None and url.startswith("http://"):
            url = "https://" + url[len("http://") :]
        return connectionStopInfo(
            self.session,
            self.policy,
            self.bytesUp,
            self.bytesDown,
            sni=self._tls.host if self._tls is not None and not self.target.isIP else None,
            app="http/1.1",
            details=[url],
        )

    def requestData(self, data: bytes) -> None:
        if self.upstream is None or self._finished:
            return
        self.bytesUp += len(data)
        if self.statistics is not None:
            self.statistics.left(data)
        self.upstream.sendData(data)

    def requestDone(self) -> None:
        self.requestComplete = True
        upstream = self.upstream
        if upstream is None or self._finished:
            return
        upstream.sendEnd()
        self._releaseClient()

    def _releaseClient(self) -> None:
        """
        Stop tying the client's reading to the origin's writing.
        """
        if not self._bodyProducing:
            return
        self._bodyProducing = False
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.unregisterProducer()
        client = self.protocol.transport
        if client is not None and not getattr(client, "disconnecting", False):
            client.resumeProducing()

    # Response events from UpstreamHTTP.

    def upstreamInformational(self, head: ResponseHead) -> None:
        if head.status != 101 and self.request.version != "1.0":
            self.protocol.sendInformational(head.status, head.reason, endToEndHeaders(head))

    def upstreamResponse(self, head: ResponseHead) -> None:
        # A HEAD, 204 or 304 response announces a length it does not send.
        bodiless = self.request.method == b"HEAD" or head.status in (204, 304)
        length = head.contentLength
        if length is not None and not bodiless and length > self._limit:
            self._dropUpstream()
            self.fail(
                ProxyError(
                    Reason.RESPONSE_TOO_LARGE,
                    f"Response body of {length} bytes exceeds the limit of {self._limit} bytes",
                )
            )
            return
        headers = endToEndHeaders(head, self.factory.responseDrop)
        headers.append((self.factory.requestIDName, self.requestID.encode("ascii")))
        if bodiless and length is not None and head.status != 204:
            # A 304's (or a HEAD response's) length describes the
            # representation; a 204 has none (RFC 9110, 8.6).
            headers.append((b"Content-Length", b"%d" % length))
        self.status = head.status
        if not self.protocol.sendHead(
            head.status, head.reason, headers, None if bodiless else length, bodiless
        ):
            return
        self.headSent = True

    def upstreamReadDone(self) -> None:
        if self.headSent and not self._responseProducing and self.upstream is not None:
            # More of the body is to come: a slow client slows the origin
            # instead of growing a buffer here.  (A response that came whole
            # in one read needs no such link.)
            self.protocol.transport.registerProducer(self.upstream.transport, True)
            self._responseProducing = True

    def upstreamData(self, data: bytes) -> None:
        self.bytesDown += len(data)
        if self.statistics is not None:
            self.statistics.right(data)
        if self.bytesDown > self._limit:
            # Too late for an error response: cut the connection so the
            # client cannot take what it got for the whole body.
            self.error = ProxyError(
                Reason.RESPONSE_TOO_LARGE,
                f"Response body exceeded the limit of {self._limit} bytes and was cut",
            )
            log.info("{rq_id} {url}: {reason}", rq_id=self.requestID, url=self.url, reason=self.error.message)
            self._dropUpstream()
            self.record()
            self.protocol.abort()
            return
        self.protocol.sendBody(data)

    def upstreamDone(self) -> None:
        upstream = self.upstream
        self.protocol.sendEnd()
        self._unhook()
        if upstream is not None:
            if self.requestComplete:
                upstream.finished()
            else:
                # The origin answered before taking the whole body.
                upstream.abort()
        self.finish()

    def upstreamFailed(self, error: ProxyError) -> None:
        upstream = self.upstream
        self._unhook()
        self.upstream = None
        if self._canRetry(upstream):
            # A pooled connection the origin closed just as we reused it:
            # nothing of this request reached the origin's application, so
            # send it once more on a fresh connection.
            self._retried = True
            log.info(
                "{rq_id}: reused connection failed ({reason}); retrying on a new one",
                rq_id=self.requestID,
                reason=error.message,
            )
            self._whenConnected(
                self.factory.pool.acquire(self._destination, self._tls, reuse=False)
            )
            return
        if self.headSent:
            self.error = error
            log.info("{rq_id} {url}: {reason}", rq_id=self.requestID, url=self.url, reason=error.message)
            self.record()
            self.protocol.abort()
            return
        self.fail(error)

    def _canRetry(self, upstream: UpstreamHTTP | None) -> bool:
        """
        Whether a failure can be retried: it happened on a reused pooled
        connection that closed before sending a byte of the response, the
        request's method is idempotent (RFC 9110, 9.2.2: a POST may have
        been acted on before the close, and must not be sent twice), it had
        no body, and it was not retried already.
        """
        return (
            upstream is not None
            and upstream.reused
            and upstream.closedUnanswered
            and self.request.method in IDEMPOTENT_METHODS
            and not self.headSent
            and not self._retried
            and self.requestComplete
            and self.bytesUp == 0
            and self._destination is not None
            and not self._finished
        )

    def _unhook(self) -> None:
        """
        Undo the producer links between the two connections.
        """
        transport = self.protocol.transport
        if self._responseProducing:
            self._responseProducing = False
            if transport is not None:
                transport.unregisterProducer()
        self._releaseClient()

    def _dropUpstream(self) -> None:
        self._unhook()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()

    def clientLost(self, reason: Failure | None) -> None:
        self._dropUpstream()
        super().clientLost(reason)

    def abandon(self, error: ProxyError) -> None:
        self._dropUpstream()
        super().abandon(error)


class ConnectExchange(_Exchange):
    """
    A CONNECT request and, once the upstream connection is up, the tunnel
    it becomes: two transports joined as each other's producer, with
    half-close passed through.
    """

    proxyType = "connect"
    __slots__ = (
        "upstream",
        "_timer",
        "_expires",
        "_final",
        "_clientReadOpen",
        "_upstreamReadOpen",
        "_sniffer",
    )

    def __init__(self, protocol: ProxyProtocol, request: RequestHead, target: Target) -> None:
        super().__init__(protocol, request, target)
        self.upstream: UpstreamTunnel | None = None
        # One timer for both limits of an established tunnel: the read
        # (idle) timeout, restarted by every byte, until the lifetime's end
        # is nearer; then the lifetime's end.
        self._timer = Timer(self.factory.clock, self.factory.config.timeouts.read, self._timedOut)
        self._expires = 0.0
        self._final = False
        self._clientReadOpen = True
        self._upstreamReadOpen = True
        # Only the control webhook wants the SNI.
        self._sniffer = TLSSniffer() if self.factory.webhook is not None else None

    def start(self) -> None:
        self._vetAndConnect(
            lambda destination: self.factory.connector.connect(
                destination, UpstreamTunnelFactory()
            )
        )

    def _connected(self, upstream: UpstreamTunnel) -> None:
        self.upstream = upstream
        upstream.peer = self
        self.status = 200
        if not self.protocol.sendTunnelEstablished():
            upstream.transport.loseConnection()
            return
        leftover = self.protocol.becomeTunnel(self)
        self.factory.metrics.tunnels.inc()
        self.logDecision()
        client = self.protocol.transport
        # Bulk data moves in larger reads (and is let pile up as far before
        # the other side is paused) than a request's 64 KiB.
        client.bufferSize = upstream.transport.bufferSize = TUNNEL_BUFFER
        # Wire the two transports together for flow control, as
        # twisted.protocols.portforward does.
        client.registerProducer(upstream.transport, True)
        upstream.transport.registerProducer(client, True)
        self._expires = self.factory.clock.seconds() + self.factory.config.timeouts.lifetime
        self._touch()
        # What set the tunnel up is not needed any more (idle tunnels are
        # held by the thousand): the head's header lines, the connect step.
        self.request.headers = self.request.raw = []
        self._connect = self._destination = None
        if leftover:
            self.fromClient(leftover)
        self.protocol._resume()

    # Bytes each way.

    def _stopInfo(self) -> dict[str, Any]:
        sniffer = self._sniffer
        return connectionStopInfo(
            self.session,
            self.policy,
            self.bytesUp,
            self.bytesDown,
            sni=sniffer.sni if sniffer is not None else None,
            app="tls" if sniffer is not None and sniffer.isTLS else None,
        )

    def _touch(self) -> None:
        """
        Bytes moved: restart the idle timeout, unless the lifetime ends
        first.
        """
        if self._final:
            return
        timer = self._timer
        left = self._expires - self.factory.clock.seconds()
        if left <= timer.seconds:
            self._final = True
            timer.start(max(left, 0))
        else:
            timer.start()

    def fromClient(self, data: bytes) -> None:
        self.bytesUp += len(data)
        if self._sniffer is not None:
            self._sniffer.feed(data)
            if self.statistics is not None:
                self.statistics.left(data)
        self._touch()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.write(data)

    def upstreamTunnelData(self, data: bytes) -> None:
        self.bytesDown += len(data)
        if self.statistics is not None:
            self.statistics.right(data)
        self._touch()
        self.protocol.transport.write(data)

    # Closing, one direction at a time.

    def clientReadClosed(self) -> None:
        self._clientReadOpen = False
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseWriteConnection()
        self._closeIfDone()

    def clientWriteClosed(self) -> None:
        pass

    def upstreamTunnelReadClosed(self) -> None:
        self._upstreamReadOpen = False
        self.protocol.transport.loseWriteConnection()
        self._closeIfDone()

    def _closeIfDone(self) -> None:
        if not self._clientReadOpen and not self._upstreamReadOpen:
            self._close()

    def _close(self, abort: bool = False) -> None:
        self._timer.cancel()
        for transport in (
            self.protocol.transport,
            self.upstream.transport if self.upstream is not None else None,
        ):
            if transport is not None:
                if abort:
                    transport.abortConnection()
                else:
                    transport.loseConnection()

    def upstreamTunnelLost(self, reason: Failure | None) -> None:
        self._timer.cancel()
        if self.protocol.transport is not None:
            self.protocol.transport.loseConnection()

    def clientLost(self, reason: Failure | None) -> None:
        self._timer.cancel()
        if self.upstream is not None:
            self.upstream.peer = None
            if self.upstream.transport is not None:
                self.upstream.transport.loseConnection()
        if self.status == 200 and self.protocol.tunnel is self:
            # The tunnel's line is written when it ends.
            self.factory.metrics.tunnels.dec()
            self.record()
            now = self.factory.clock.seconds()
            self.factory.decisionLog.record(
                msg="CANONICAL-PROXY-CN-CLOSE",
                id=self.requestID,
                proxy_type=self.proxyType,
                requested_host=self.target.authority if self.target is not None else self.url,
                role=self.role,
                inbound_remote_addr=self.protocol.clientAddress,
                outbound_remote_addr=self.outboundAddress,
                bytes_in=self.bytesDown,
                bytes_out=self.bytesUp,
                duration=round(now - self.started, 6),
                end_time=now,
                error=self.error.message if self.error is not None else "",
            )
            return
        super().clientLost(reason)

    def _timedOut(self) -> None:
        timeouts = self.factory.config.timeouts
        if self._final:
            message = f"Tunnel exceeded its lifetime of {timeouts.lifetime:g} s"
        else:
            message = f"Tunnel idle for {timeouts.read:g} s (read timeout)"
        self.error = ProxyError(Reason.UPSTREAM_TIMEOUT, message)
        self._close()
