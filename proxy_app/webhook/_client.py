"""
The HTTP client that POSTs to the control webhook: its TLS policy, its
persistent connection pool, and one logical POST with a deadline.

It is not a proxy client: it connects with the reactor's own resolver and
endpoints, so an operator's URL on localhost works.  That makes it the one
documented exception to "only C{upstream.Connector} connects".

The URL's path may hold a secret (C{/webhook/<SECRET_ID>}); what this
module says about the URL, in logs and errors, goes through L{redactURL}.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import attr
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from proxy_app.tls import loadTrustRoot

#: How much of a reply body is read; a longer one is cut off (and, for the
#: gate, is an error).
MAX_REPLY_BYTES = 65536


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


def checkURL(url: str) -> None:
    """
    Refuse a URL the client cannot POST to.

    @raise ValueError: unless C{url} is C{http://} or C{https://} with a
        host and a valid port; the message shows only L{redactURL} of it.
    """
    try:
        parts = urlsplit(url)
        validURL = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        validURL = False
    if not validURL:
        raise ValueError(
            "webhook url must be an http:// or https:// URL with a host, not "
            f"{redactURL(url)}"
        )


# Building the client.


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


@implementer(IStreamClientEndpoint)
class _QuietEndpoint:
    """
    An endpoint whose connections start and stop without a log line.

    The pool builds a new factory for every connection, and a
    L{Factory} logs "Starting factory" and "Stopping factory" around each
    one unless it is not C{noisy}: two lines per webhook connection.
    """

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def __repr__(self) -> str:
        # The pool names its factories after the endpoint.
        return repr(self._endpoint)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        if isinstance(protocolFactory, Factory):
            protocolFactory.noisy = False
        return self._endpoint.connect(protocolFactory)


@implementer(IAgentEndpointFactory)
class _WebhookEndpoints:
    """
    Where the webhook client's connections come from: the reactor's
    C{HostnameEndpoint} (its own resolver, not the proxy's vetted one),
    wrapped in TLS by the HTTPS policy for C{https://}, and quiet.
    """

    def __init__(
        self, reactor: Any, tlsPolicy: IPolicyForHTTPS, connectTimeout: float | None
    ) -> None:
        self._reactor = reactor
        self._tlsPolicy = tlsPolicy
        self._connectTimeout = connectTimeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        kwargs: dict[str, Any] = {}
        if self._connectTimeout is not None:
            kwargs["timeout"] = self._connectTimeout
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, uri.host.decode("ascii"), uri.port, **kwargs
        )
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(
                self._tlsPolicy.creatorForNetloc(uri.host, uri.port), endpoint
            )
        elif uri.scheme != b"http":
            raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
        return _QuietEndpoint(endpoint)


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
    @param connectTimeout: seconds a connection attempt may take; the
        endpoint's default if L{None}.

    @return: the client and its pool (to close on shutdown).
    """
    from treq.client import HTTPClient

    if tlsPolicy is None:
        if tlsVerify:
            tlsPolicy = BrowserLikePolicyForHTTPS(
                trustRoot=trustRoot if trustRoot is not None else loadTrustRoot()
            )
        else:
            tlsPolicy = UnverifiedPolicyForHTTPS()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = maxConcurrent
    agent = Agent.usingEndpointFactory(
        reactor, _WebhookEndpoints(reactor, tlsPolicy, connectTimeout), pool=pool
    )
    return HTTPClient(agent, data_to_body_producer=_BytesProducer), pool


# Posting.


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Reply:
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
    return bool(
        failure.check(RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)
    )


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


class Post:
    """
    One logical POST of a message with a deadline: it fails with
    L{WebhookTimeout} when the deadline passes, and is tried once more at
    once if a pooled connection turned out to be stale.

    @ivar result: fires with a L{Reply}, or fails with the error;
        cancelling it cancels the request.
    @ivar cancelled: whether L{result} was cancelled by its caller.
    """

    def __init__(self, client: WebhookClient, body: bytes, timeout: float) -> None:
        self._client = client
        self._body = body
        self._timeout = timeout
        self._current: Deferred[Reply] | None = None
        self._timer: IDelayedCall | None = None
        self._over = False
        self._triedAgain = False
        self.cancelled = False
        self.result: Deferred[Any] = Deferred(self._cancel)

    def start(self) -> None:
        """
        Send it, and start the deadline.
        """
        self._timer = self._client.clock.callLater(self._timeout, self._timedOut)
        self._attempt()

    def _attempt(self) -> None:
        d = self._client.send(self._body)
        self._current = d
        d.addBoth(self._attemptDone, d)

    def _attemptDone(self, result: Reply | Failure, d: Deferred[Reply]) -> None:
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


class WebhookClient:
    """
    POSTs JSON bodies to the webhook's URL.

    @ivar url: the configured URL (holding the secret: never log it).
    @ivar redactedURL: L{redactURL} of it, for logs.
    @ivar clock: the clock for the deadlines.
    """

    def __init__(
        self,
        url: str,
        treqClient: Any,
        clock: IReactorTime,
        pool: HTTPConnectionPool | None = None,
    ) -> None:
        """
        @param treqClient: an object with treq's C{post}.
        @param pool: the pool behind C{treqClient}, closed by L{close}, if
            this client owns one.
        """
        self.url = url
        self.redactedURL = redactURL(url)
        self.clock = clock
        self._treq = treqClient
        self._pool = pool

    def post(self, body: bytes, timeout: float) -> Post:
        """
        Start POSTing C{body}, for at most C{timeout} seconds.
        """
        post = Post(self, body, timeout)
        post.start()
        return post

    def send(self, body: bytes) -> Deferred[Reply]:
        """
        POST C{body} once; fire with the status and (capped) body.
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
            reactor=self.clock,
        )

        def gotResponse(response: Any) -> Deferred[Reply]:
            status = response.code
            if response.length == 0:
                return succeed(Reply(status, b""))
            reader = _BodyReader(MAX_REPLY_BYTES)
            response.deliverBody(reader)
            return reader.finished.addCallback(lambda body: Reply(status, body))

        return d.addCallback(gotResponse)

    def describe(self, failure: Failure) -> str:
        """
        What a failed POST went through, in words safe to log: the URL and
        its path appear only redacted.
        """
        text = _failureText(failure)
        path = urlsplit(self.url).path
        text = text.replace(self.url, self.redactedURL)
        if path not in ("", "/"):
            text = text.replace(path, "/…")
        return text

    def close(self) -> Deferred[Any]:
        """
        Close the pool's idle connections, if this client owns a pool.
        """
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()
