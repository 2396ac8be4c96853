"""
The forwarding exchange: one request for an absolute URI, its body
streamed to the origin over a pooled connection and the response streamed
back, each way with backpressure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attr
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy_app.exchange import Exchange
from proxy_app.http1 import RequestHead, ResponseHead, headerValue
from proxy_app.interfaces import IClientChannel, IResponseSink
from proxy_app.reasons import ProxyError, Reason
from proxy_app.resolver import VettedDestination
from proxy_app.target import Target
from proxy_app.upstream import (
    TLSSettings,
    UpstreamHTTP,
    endToEndHeaders,
    framingHeaders,
)

if TYPE_CHECKING:
    from proxy_app.channel import ProxyFactory

# The process log's namespace is still that of the module this was split
# from, so that filters on it keep working.
log = Logger(namespace="proxy_app.server")

# The methods RFC 9110 (9.2.2) calls idempotent: a request with one of them
# may be sent again when a reused connection closed before answering.
IDEMPOTENT_METHODS = frozenset(
    {b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"}
)


def _wantsTLS(headers: Any) -> bool:
    """
    Whether C{X-WhSentry-TLS} asks for TLS origination: any value but C{0}
    or C{false}.
    """
    value = headerValue(headers, b"x-whsentry-tls")
    return value is not None and value.decode("latin-1").strip().lower() not in (
        "0",
        "false",
    )


@implementer(IResponseSink)
class ForwardExchange(Exchange):
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
        "tls",
        "_retried",
        "_limit",
    )

    def __init__(
        self,
        protocol: IClientChannel,
        factory: ProxyFactory,
        request: RequestHead,
        target: Target,
    ) -> None:
        super().__init__(protocol, factory, request, target)
        self.upstream: UpstreamHTTP | None = None
        self.headSent = False
        self.requestComplete = False
        self._bodyProducing = False
        self._responseProducing = False
        self.tls: TLSSettings | None = None
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
                self.fail(
                    ProxyError(Reason.BAD_SCHEME, "TLS origination is not configured")
                )
                return
            try:
                alias = headerValue(self.request.headers, b"x-whsentry-clientcert")
                identity = origination.identity(
                    alias.decode("latin-1").strip() if alias is not None else None
                )
            except ProxyError as error:
                self.fail(error)
                return
            try:
                creator = origination.creator(target.host, identity)
            except UnicodeError as e:
                # idna's errors: an A-label IDNA 2008 refuses (an
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
        self.tls = tls
        self._admit()

    def connectTo(self, destination: VettedDestination) -> Any:
        return self.factory.pool.acquire(destination, self.tls)

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
        return self.tls is not None

    @property
    def sni(self) -> str | None:
        # The name sent originating TLS (an IP literal is never sent).
        assert self.target is not None
        if self.tls is not None and not self.target.isIP:
            return self.tls.host
        return self.protocol.serverName

    @property
    def details(self) -> list[str]:
        url = self.url
        if self.tls is not None and url.startswith("http://"):
            url = "https://" + url[len("http://") :]
        return [url]

    def requestData(self, data: bytes) -> None:
        if self.upstream is None or self.finished:
            return
        self.bytesUp += len(data)
        if self.statistics is not None:
            self.statistics.left(data)
        self.upstream.sendData(data)

    def requestDone(self) -> None:
        self.requestComplete = True
        upstream = self.upstream
        if upstream is None or self.finished:
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
            self.protocol.sendInformational(
                head.status, head.reason, endToEndHeaders(head)
            )

    def upstreamResponse(self, head: ResponseHead) -> None:
        # A HEAD, 204 or 304 response announces a length it does not send.
        bodiless = self.request.method == b"HEAD" or head.status in (204, 304)
        length = head.contentLength
        if length is not None and not bodiless and length > self._limit:
            self._dropUpstream()
            self.fail(
                ProxyError(
                    Reason.RESPONSE_TOO_LARGE,
                    f"Response body of {length} bytes exceeds the limit of "
                    f"{self._limit} bytes",
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
            log.info(
                "{rq_id} {url}: {reason}",
                rq_id=self.requestID,
                url=self.url,
                reason=self.error.message,
            )
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
            assert self.destination is not None
            self._whenConnected(
                self.factory.pool.acquire(self.destination, self.tls, reuse=False)
            )
            return
        if self.headSent:
            self.error = error
            log.info(
                "{rq_id} {url}: {reason}",
                rq_id=self.requestID,
                url=self.url,
                reason=error.message,
            )
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
            and self.destination is not None
            and not self.finished
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
