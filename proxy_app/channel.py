"""
The client connection: L{ProxyFactory}, and the L{ProxyProtocol} it builds
for each client, which reads requests with llhttp (L{proxy_app.http1}),
hands each to an exchange (L{proxy_app.forward}, L{proxy_app.tunnel}) and
writes what the exchange answers, framed by the connection and never
outside a head the proxy wrote.

Exchanges see the connection only through L{IClientChannel}.
"""

from __future__ import annotations

import os
import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy_app.access import AccessControl
from proxy_app.accounting import observers
from proxy_app.admission import Admission
from proxy_app.config import Config
from proxy_app.exchange import Refused
from proxy_app.forward import ForwardExchange
from proxy_app.http1 import (
    DATA,
    END,
    HEAD,
    LAST_CHUNK,
    HeadError,
    RequestHead,
    RequestReader,
    chunk,
    responseHead,
)
from proxy_app.interfaces import IClientChannel, IDestinationResolver
from proxy_app.limits import Overloaded, RateLimiter
from proxy_app.observe import AccessLog, DecisionLog, Metrics
from proxy_app.reasons import ProxyError, Reason
from proxy_app.target import hostPort, parseAbsoluteTarget, parseConnectTarget
from proxy_app.tls import CertificateRole, Origination
from proxy_app.tunnel import ConnectExchange, TunnelWatch
from proxy_app.upstream import (
    NOT_PASSED,
    Connector,
    Deadlines,
    QueuedTimer,
    UpstreamPool,
)
from proxy_app.webhook import WebhookService

if TYPE_CHECKING:
    from proxy_app.exchange import Exchange

# The process log's namespace is still that of the module this was split
# from, so that filters on it keep working.
log = Logger(namespace="proxy_app.server")

_PHRASES = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_DISCARD_LIMIT = 65536
_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
# What a well-formed incoming request id looks like; anything else is
# replaced, since it ends up in logs and upstream headers.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+=@-]{0,127}$")


SMOKESCREEN_ERROR = b"X-Smokescreen-Error"


def clientServerName(transport: Any) -> str | None:
    """
    The SNI a client sent in its ClientHello to the proxy's own TLS (a TLS
    listener's, or an intercepted tunnel's), lower-cased; L{None} when it
    sent none or one that is not ASCII.
    """
    name = transport.getHandle().get_servername()
    try:
        return name.decode("ascii").lower() if name else None
    except UnicodeDecodeError:
        return None


def errorResponse(
    error: ProxyError,
    extraHeaders: list[tuple[bytes, bytes]] | None = None,
    denyMessageExtra: str | None = None,
    smokescreenError: bool = False,
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """
    The headers and plain-text body of the response the proxy makes for
    C{error}: the C{X-WhSentry-Reason} and C{X-WhSentry-ReasonCode} headers
    and the message.

    @param denyMessageExtra: the operator's text (C{acl.deny_message_extra})
        for a 403: a line of the body after the message, and not in the
        header, which stays the one compact sentence logs and clients match.
    @param smokescreenError: add C{X-Smokescreen-Error}
        (C{compat.smokescreen_error_header}) holding what Smokescreen puts
        there: the body's text, the operator's text after two spaces
        (Smokescreen joins the two with two line breaks, which Go's header
        writer turns into spaces, trimming the ends).
    """
    body = (error.message + "\n").encode("utf-8")
    extra = denyMessageExtra if error.status == 403 else None
    if extra is not None:
        body += (extra + "\n").encode("utf-8")
    reason = error.message.encode("ascii", "backslashreplace")
    reason = reason.replace(b"\r", b" ").replace(b"\n", b" ").replace(b"\x00", b" ")
    headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"X-Content-Type-Options", b"nosniff"),
        (b"X-WhSentry-Reason", reason),
        (b"X-WhSentry-ReasonCode", str(int(error.reason)).encode("ascii")),
    ]
    if smokescreenError:
        value = reason
        if extra is not None:
            # parseDenyMessage has refused control characters already.
            value += b"  " + extra.encode("ascii", "backslashreplace")
        headers.append((SMOKESCREEN_ERROR, value))
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
    @ivar tunnelWatch: the L{TunnelWatch} closing established tunnels that
        are idle or past their lifetime.
    @ivar observers: the L{IExchangeObserver}s every exchange's record goes
        to (L{proxy_app.accounting}).
    @ivar admission: the L{Admission} pipeline every exchange goes through.
    @ivar interception: the L{proxy_app.mitm.Interception} choosing the
        tunnels to intercept, or L{None} for none.
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
        interception: Any = None,
    ) -> None:
        self.config = config
        self.origination = origination
        # The proxy_app.mitm.Interception deciding which tunnels are
        # intercepted, or None: every tunnel passes through.
        self.interception = interception
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
        compat = config.compat
        if compat.smokescreen_error_header:
            # As Smokescreen: the header means the proxy made the response,
            # so an origin's is not passed on.
            self.responseDrop = self.responseDrop | {SMOKESCREEN_ERROR.lower()}
        self.denyStatus = compat.deny_status
        self.requestDrop = self.responseDrop | {b"host"}
        self.resolver = resolver
        self.clock = clock
        self.connector = connector
        self.pool = UpstreamPool(
            connector, clock, config.timeouts.read, config.timeouts.lifetime
        )
        # Every connection's request-header timeout, on one delayed call.
        self.headerDeadlines = Deadlines(clock, config.timeouts.request_header)
        # The read timeout and lifetime of every established tunnel.
        self.tunnelWatch = TunnelWatch(
            clock, config.timeouts.read, config.timeouts.lifetime
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
        self.admission = Admission(self)
        self.observers = observers(self)
        self._idPrefix = os.urandom(4).hex()
        self._counter = 0

    def buildProtocol(self, addr: Any) -> ProxyProtocol:
        return ProxyProtocol(self)

    def forListener(
        self, name: str, certificateRole: CertificateRole | None = None
    ) -> Factory:
        """
        A factory for one listener, so that connections are counted per
        listener.

        @param certificateRole: where the listener's verified client
            certificates give their role from; L{None} for the CN.
        """
        return _ListenerFactory(self, name, certificateRole)

    def overloaded(self, exchange: Exchange) -> Overloaded | None:
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

    def status(self, error: ProxyError) -> int:
        """
        The status C{error} is answered with: its own, but a denial's (a
        403) is C{compat.deny_status}.
        """
        return self.denyStatus if error.status == 403 else error.status

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

        @return: a L{twisted.internet.defer.Deferred} that fires once no
            client connection is left.
        """
        self.draining = True
        self.metrics.draining.set(1)
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
        if (
            self._drained is not None
            and not self.connections
            and not self._drained.called
        ):
            self._drained.callback(None)


class _ListenerFactory(Factory):
    noisy = False

    def __init__(
        self,
        proxy: ProxyFactory,
        name: str,
        certificateRole: CertificateRole | None = None,
    ) -> None:
        self.proxy = proxy
        self.name = name
        self.certificateRole = certificateRole

    def buildProtocol(self, addr: Any) -> ProxyProtocol:
        protocol = self.proxy.buildProtocol(addr)
        protocol.listener = self.name
        if self.certificateRole is not None:
            protocol.certificateRole = self.certificateRole
        return protocol


@implementer(IHalfCloseableProtocol, IHandshakeListener)
@implementer(IClientChannel, IHalfCloseableProtocol, IHandshakeListener)
class ProxyProtocol(Protocol):
    """
    One client connection: a sequence of forwarded requests, possibly ending
    in a CONNECT tunnel.

    @ivar _state: where the connection is in its life, one of:

        - C{IDLE}: no exchange; the next request head is awaited, under the
          request-header timer.  (A connection being closed after its last
          response is C{IDLE} too: nothing more is read from it.)
        - C{SETTING_UP}: an exchange was made for the request just read, and
          is being admitted and connected; nothing more of the client is
          handed on (its body waits in the reader's queue, or unread).
        - C{RECEIVING}: the exchange is set up and takes the request's body
          as it comes.  A malformed or refused request's exchange, which
          ends at once, is here too.
        - C{RECEIVED}: the request's end has been read and handed on; the
          exchange is relaying its response.  Anything the client sends
          meanwhile (a pipelined request) waits, unread.
        - C{DISCARDING}: the exchange ended before the request's end was
          read; up to C{_discardLeft} more body bytes are read and dropped
          so that the connection can carry the next request.
        - C{TUNNEL}: the CONNECT succeeded; every byte goes to L{tunnel},
          and no HTTP is read any more.
        - C{CLOSED}: the connection is gone.

        The legal transitions::

            IDLE ----------> SETTING_UP   a head was read (_startRequest)
            IDLE ----------> RECEIVING    a head with a refused target
            SETTING_UP ----> RECEIVING    resumeRequest
            SETTING_UP ----> TUNNEL       becomeTunnel
            RECEIVING -----> RECEIVED     the request's end was read
            SETTING_UP, RECEIVING ------> DISCARDING
                                          exchangeDone, body not all read
            SETTING_UP, RECEIVING, RECEIVED -> IDLE
                                          exchangeDone (or a malformed
                                          body); then the connection is
                                          read on, or closed
            DISCARDING ----> IDLE         the dropped request's end
            any -----------> CLOSED       connectionLost

    @ivar _response: the response being written, independent of
        C{_state} because an origin may answer before the request's body
        has all been read: L{None} when no response head is in progress (a
        body byte now would be a framing error, and aborts), C{IDENTITY}
        when its body goes as it is (a length, or up to the close), or
        C{CHUNKED} when the connection chunks it.
    @ivar _paused: whether the connection stopped reading the client (flow
        control aside: the client's transport may also be paused by a
        producer link).
    @ivar _closeAfter: close the connection after the current response.
    @ivar _clientDone: the client half-closed its side; the connection
        closes once the current exchange is over.
    @ivar exchange: the exchange of the current request (in C{SETTING_UP},
        C{RECEIVING}, C{RECEIVED} and C{TUNNEL}), else L{None}.
    @ivar tunnel: the L{ConnectExchange} the connection became, in
        C{TUNNEL}, else L{None}.
    @ivar bytesRead: the bytes read from the client as HTTP (heads and
        bodies as received) since L{takeCounts} last took them; a tunnel's
        bytes are its exchange's to count.
    @ivar bytesWritten: the bytes written to the client by the C{send*}
        methods (heads, bodies as framed) since L{takeCounts} last took
        them.
    """

    # A TCP or TLS transport: producer, consumer, half-closeable, abortable.
    transport: Any
    # The inside of an intercepted tunnel (proxy_app.mitm): its role is the
    # CONNECT's, fixed, and it is not a client connection of its own.
    intercepted = False
    # Inside an intercepted tunnel, the CONNECT's admitted destination.
    tunnelDestination: Any = None
    # Where a verified client certificate's role comes from; a listener
    # with role_from sets its own.
    certificateRole: CertificateRole = CertificateRole()
    # The SNI a TLS listener's client sent, read only for the control
    # webhook.
    serverName: str | None = None

    def __init__(self, factory: ProxyFactory) -> None:
        self.factory = factory
        config = factory.config
        limits = config.limits
        # None once the connection is a tunnel.
        self._reader: RequestReader | None = RequestReader(
            limits.max_uri_length, limits.max_header_count, limits.max_request_header
        )
        self._headerTimer = QueuedTimer(factory.headerDeadlines, self._headerTimeout)
        self._state = "IDLE"
        self._response: str | None = None
        self.exchange: Exchange | None = None
        self.tunnel: Any = None
        self._paused = False
        self._closeAfter = False
        self._clientDone = False
        self._discardLeft = 0
        # The current request's head.
        self._request: RequestHead | None = None
        # Whether the request's end had been read when it started (its
        # whole body in the queue): nothing of it to hold back.
        self.requestReadWhole = False
        self.clientAddress = ""
        self.peerHost = ""
        self.peerPort = 0
        self.overTLS = False
        self.listener = "default"
        # Who the client is, from a verified TLS client certificate.
        self.role: str | None = None
        self.certificateCN: str | None = None
        self.certificateOU: str | None = None
        # The control webhook's wire counts (one addition per read or
        # write: cheaper than asking whether anyone wants them).
        self.bytesRead = 0
        self.bytesWritten = 0

    # Connection events.

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        if not self.intercepted and self.factory.metrics.counting:
            self.factory.metrics.listenerConnections(self.listener).inc()
        peer = self.transport.getPeer()
        host = getattr(peer, "host", "")
        self.peerHost, self.peerPort = host, getattr(peer, "port", 0)
        self.clientAddress = hostPort(host, self.peerPort)
        if self.factory.webhook is not None and not self.intercepted:
            self.factory.webhook.neighbor(host)
        if self.factory.draining:
            self.transport.loseConnection()
            return
        self._headerTimer.start()

    def handshakeCompleted(self) -> None:
        """
        A TLS listener's handshake is done: a verified client certificate
        gives the role, from its subject CN as Smokescreen derives roles,
        or from where the listener's C{role_from} says
        (L{certificateRole}).
        """
        self.overTLS = True
        if self.factory.webhook is not None:
            # The name the client reached the proxy by: the control
            # webhook's tls.sni when nothing nearer the destination has one.
            self.serverName = clientServerName(self.transport)
        certificate = self.transport.getPeerCertificate()
        if certificate is None:
            return
        subject = certificate.get_subject()
        self.certificateCN = subject.CN
        self.certificateOU = subject.OU
        self.role = self.certificateRole(certificate)

    def dataReceived(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.fromClient(data)
            return
        reader = self._reader
        assert reader is not None
        self.bytesRead += len(data)
        try:
            reader.feed(data)
            state = self._state
            if (
                state == "SETTING_UP"
                or state == "RECEIVED"
                or (state == "RECEIVING" and reader.upgraded)
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
        log.failure(
            "Internal error on the connection from {client}",
            failure,
            client=self.clientAddress,
        )
        if self.transport is None:
            return
        if self._response is not None:
            self.abort()
            return
        self.sendError(
            ProxyError(Reason.INTERNAL_ERROR, "Internal error in the proxy"), close=True
        )
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
        self._headerTimer.release()
        self._state = "CLOSED"
        if self._reader is not None:
            self._reader.release()
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.clientLost(reason)
        if not self.intercepted and self.factory.metrics.counting:
            self.factory.metrics.listenerConnections(self.listener).dec()
        self.factory.connectionClosed(self)
        # The tunnel refers back to this connection: the pair goes with it
        # rather than to the garbage collector.
        self.tunnel = None

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
        while events and self.transport is not None:
            state = self._state
            if state == "SETTING_UP" or state == "TUNNEL" or state == "CLOSED":
                return
            kind, value = events[0]
            if kind == HEAD:
                if state != "IDLE":
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
                if state == "DISCARDING":
                    self._discardLeft -= len(value)
                    if self._discardLeft < 0:
                        self.transport.loseConnection()
                        return
                elif self.exchange is not None:
                    self.exchange.requestData(value)
            elif kind == END:
                events.popleft()
                if state == "DISCARDING":
                    self._nextCycle()
                    return
                exchange = self.exchange
                if exchange is not None:
                    self._state = "RECEIVED"
                    exchange.requestDone()
            else:
                if state == "RECEIVED":
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
        self._state = "IDLE"
        if self._response is not None:
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
            response_code=self.factory.status(error),
            response_time=0.0,
            bytes_up=0,
            bytes_down=0,
            reason_code=int(error.reason),
            error=error.message,
        )
        self.transport.loseConnection()

    def _startRequest(self, request: RequestHead) -> None:
        self._request = request
        self._closeAfter = not request.keepAlive
        factory = self.factory
        try:
            exchange = self.makeExchange(request)
        except ProxyError as error:
            refused = Refused(self, factory, request, error)
            self.exchange = refused
            self._state = "RECEIVING"
            refused.start()
            return
        self.exchange = exchange
        self._state = "SETTING_UP"
        self.requestReadWhole = self._requestQueued()
        if not self.requestReadWhole:
            # Until the destination is vetted and connected, the client is
            # not read, so that no body piles up meanwhile.  (A request
            # already read whole needs no pause: anything after it waits in
            # the queue, and a pipelined head pauses reading when it gets
            # there.)
            self._pause()
        exchange.count()
        overload = factory.overloaded(exchange)
        if overload is not None:
            exchange.fail(overload)
            return
        exchange.start()

    def makeExchange(self, request: RequestHead) -> ForwardExchange | ConnectExchange:
        """
        The exchange for C{request}, by its method and target.

        @raise ProxyError: the target is refused.
        """
        if request.method == b"CONNECT":
            return ConnectExchange(
                self, self.factory, request, parseConnectTarget(request.target)
            )
        return ForwardExchange(
            self, self.factory, request, parseAbsoluteTarget(request.target)
        )

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

    def resumeReading(self) -> None:
        """
        Undo L{_pause}: read the client again.
        """
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def resumeRequest(self) -> None:
        """
        The exchange can take the request body now.
        """
        self._state = "RECEIVING"
        self.resumeReading()
        self._process()

    # Responding.

    def sendInformational(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """
        Send a 1xx response ahead of the final one.
        """
        if self.transport is not None and self._response is None:
            head = responseHead(status, reason, headers)
            self.bytesWritten += len(head)
            self.transport.write(head)

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
        if self.transport is None or self._response is not None:
            self.abort()
            return False
        framing = "IDENTITY"
        if bodiless:
            pass
        elif length is not None:
            headers.append((b"Content-Length", b"%d" % length))
        elif self._request is not None and self._request.version == "1.0":
            self._closeAfter = True
        else:
            framing = "CHUNKED"
            headers.append((b"Transfer-Encoding", b"chunked"))
        if self.factory.draining or self._clientDone:
            self._closeAfter = True
        if self._closeAfter:
            headers.append((b"Connection", b"close"))
        self._response = None if bodiless else framing
        head = responseHead(status, reason or _PHRASES.get(status, b""), headers)
        self.bytesWritten += len(head)
        self.transport.write(head)
        return True

    def sendTunnelEstablished(self) -> bool:
        """
        Answer a CONNECT: the tunnel is up.
        """
        if self.transport is None or self._response is not None:
            return False
        self.bytesWritten += len(_ESTABLISHED)
        self.transport.write(_ESTABLISHED)
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
        response = self._response
        if response is None:
            log.error(
                "Refused to write {size} body bytes to {client} without a "
                "response head; connection aborted",
                size=len(data),
                client=self.clientAddress,
            )
            self.abort()
            return
        if response == "CHUNKED":
            data = chunk(data)
        self.bytesWritten += len(data)
        self.transport.write(data)

    def sendEnd(self) -> None:
        if self._response == "CHUNKED" and self.transport is not None:
            self.bytesWritten += len(LAST_CHUNK)
            self.transport.write(LAST_CHUNK)
        self._response = None

    def sendError(
        self, error: ProxyError, close: bool = False, requestID: str | None = None
    ) -> bool:
        extra = (
            [(self.factory.requestIDName, requestID.encode("ascii"))]
            if requestID is not None
            else None
        )
        config = self.factory.config
        headers, body = errorResponse(
            error,
            extra,
            config.acl.deny_message_extra,
            config.compat.smokescreen_error_header,
        )
        if close:
            self._closeAfter = True
        if not self.sendHead(self.factory.status(error), b"", headers, len(body)):
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
        ended = self._state == "RECEIVED"
        self._state = "IDLE"
        if self.transport is None:
            return
        if self._response is not None:
            # The response was not finished: the client must not take it
            # for a whole one.
            self.abort()
            return
        if self._closeAfter or self.factory.draining or self._clientDone:
            self.transport.loseConnection()
            return
        if not ended:
            # Answered before the body was read (an error, or an origin
            # that did not wait): read and drop a small remainder so the
            # connection can go on; a large one is not worth it.
            self._state = "DISCARDING"
            self._discardLeft = _DISCARD_LIMIT
            self.resumeReading()
            self._process()
            return
        self._nextCycle()

    def _nextCycle(self) -> None:
        """
        Wait for the next request on this connection.
        """
        assert self._reader is not None
        self._state = "IDLE"
        self._request = None
        self._headerTimer.start()
        # After a refused CONNECT or a forwarded upgrade request, what the
        # client sent after it is read as the next request.
        self._reader.resume()
        self.resumeReading()
        self._process()

    def becomeTunnel(self, exchange: Any) -> bytes:
        """
        The CONNECT succeeded: from now on every byte from the client goes
        to the tunnel (the L{ConnectExchange}, or the
        L{proxy_app.mitm.InterceptedSession} of an intercepted one).

        @return: bytes the client sent after the CONNECT head.
        """
        self._state = "TUNNEL"
        self.tunnel = exchange
        # Never needed again: its bound method goes too.
        self._headerTimer.release()
        assert self._reader is not None
        leftover = self._reader.leftover
        # The tunnel counts what the client sent after the head as its own.
        self.bytesRead -= len(leftover)
        # No HTTP on this connection any more: let the parser go, since
        # idle tunnels are held by the thousand.
        self._reader.release()
        self._reader = None
        self._request = None
        return leftover

    def takeCounts(self) -> tuple[int, int]:
        """
        The bytes read from and written to the client as HTTP since the
        last call (see L{bytesRead} and L{bytesWritten}), which start
        again from zero.
        """
        counts = (self.bytesRead, self.bytesWritten)
        self.bytesRead = self.bytesWritten = 0
        return counts

    def drain(self) -> None:
        state = self._state
        if state == "IDLE" or state == "DISCARDING":
            self.transport.loseConnection()

    def _headerTimeout(self) -> None:
        if self._state != "IDLE":
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
