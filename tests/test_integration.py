"""
A few end-to-end tests over real sockets, on loopback only: a twisted.web
origin, the proxy with the real safe resolver, and HTTP clients.
"""

from __future__ import annotations

from io import BytesIO

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase
from twisted.web.client import (
    FileBodyProducer,
    HTTPConnectionPool,
    ProxyAgent,
    readBody,
)
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from proxy_app.addresses import AddressPolicy
from proxy_app.config import Config
from proxy_app.observe import AccessLog
from proxy_app.resolver import SafeResolver
from proxy_app.server import ProxyFactory
from proxy_app.upstream import Connector


class Echo(Resource):
    """
    Answers with the method, the path, the request body and the client's
    port, so tests can see what arrived and over which connection.
    """

    isLeaf = True

    def render(self, request):  # type: ignore[no-untyped-def]
        body = request.content.read()
        port = request.getClientAddress().port
        return b"%s %s %d %s" % (request.method, request.uri, port, body)


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred = Deferred()
        self.waiters: list[tuple[bytes, Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for marker, d in list(self.waiters):
            if marker in self.data:
                self.waiters.remove((marker, d))
                d.callback(self.data)

    def waitFor(self, marker: bytes) -> Deferred:
        d: Deferred = Deferred()
        if marker in self.data:
            d.callback(self.data)
        else:
            self.waiters.append((marker, d))
        return d

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(self.data)


class LoopbackTests(TestCase):
    """
    The proxy between real clients and a real origin on 127.0.0.1.
    """

    def setUp(self) -> None:
        origin = reactor.listenTCP(0, Site(Echo()), interface="127.0.0.1")
        self.addCleanup(origin.stopListening)
        self.originPort = origin.getHost().port
        self.access: list[dict] = []
        accessLog = AccessLog(None)
        accessLog.publisher.addObserver(self.access.append)
        config = Config()
        policy = AddressPolicy(allowRanges=["127.0.0.0/8"])
        resolver = SafeResolver(policy, reactor.nameResolver, reactor, timeout=5)
        self.factory = ProxyFactory(
            config, resolver, reactor, Connector(reactor, 5), accessLog
        )
        proxy = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(proxy.stopListening)
        self.proxyPort = proxy.getHost().port
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.pool.closeCachedConnections)
        self.addCleanup(self.factory.pool.closeIdle)

    def agent(self) -> ProxyAgent:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxyPort)
        return ProxyAgent(endpoint, reactor, pool=self.pool)

    def url(self, path: str = "/hello") -> bytes:
        return f"http://127.0.0.1:{self.originPort}{path}".encode()

    @inlineCallbacks
    def test_getAndPost(self):  # type: ignore[no-untyped-def]
        """
        GET and POST through the proxy reach the origin with their bodies.
        """
        agent = self.agent()
        response = yield agent.request(b"GET", self.url("/a?b=c"))
        body = yield readBody(response)
        self.assertEqual(response.code, 200)
        self.assertTrue(body.startswith(b"GET /a?b=c "), body)

        response = yield agent.request(
            b"POST",
            self.url("/hook"),
            Headers({b"content-type": [b"application/json"]}),
            FileBodyProducer(BytesIO(b'{"event": 1}')),
        )
        body = yield readBody(response)
        self.assertTrue(body.startswith(b"POST /hook "), body)
        self.assertTrue(body.endswith(b' {"event": 1}'), body)

    @inlineCallbacks
    def test_keepAliveReuse(self):  # type: ignore[no-untyped-def]
        """
        Two requests over one persistent client connection reuse one
        upstream connection: the origin sees the same client port twice.
        """
        agent = self.agent()
        ports = []
        for _ in range(2):
            response = yield agent.request(b"GET", self.url())
            body = yield readBody(response)
            ports.append(body.split(b" ")[2])
        self.assertEqual(ports[0], ports[1])
        self.assertEqual([line["response_code"] for line in self.access], [200, 200])

    @inlineCallbacks
    def test_deniedLoopbackAddress(self):  # type: ignore[no-untyped-def]
        """
        With only 127.0.0.2 allowed, a request for 127.0.0.1 is refused with
        403/1000 naming the address, and the origin never sees it.
        """
        policy = AddressPolicy(allowRanges=["127.0.0.2/32"])
        self.factory.resolver = SafeResolver(policy, reactor.nameResolver, reactor, timeout=5)
        response = yield self.agent().request(b"GET", self.url())
        body = yield readBody(response)
        self.assertEqual(response.code, 403)
        self.assertEqual(response.headers.getRawHeaders(b"x-whsentry-reasoncode"), [b"1000"])
        self.assertIn(b"(127.0.0.1)", body)

    @inlineCallbacks
    def test_connectTunnel(self):  # type: ignore[no-untyped-def]
        """
        A CONNECT tunnel carries an HTTP exchange to the origin and back.
        """
        client = _Collect()
        yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxyPort), client
        )
        client.transport.write(
            b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
            % (self.originPort, self.originPort)
        )
        data = yield client.waitFor(b"\r\n\r\n")
        self.assertEqual(data, b"HTTP/1.1 200 Connection established\r\n\r\n")
        client.transport.write(
            b"GET /tunnelled HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        logged: Deferred = Deferred()
        self.factory.accessLog.publisher.addObserver(
            lambda event: event["method"] == "CONNECT" and logged.callback(event)
        )
        data = yield client.done
        self.assertIn(b"GET /tunnelled ", data)
        yield logged
        self.assertEqual(self.access[-1]["method"], "CONNECT")
        self.assertGreater(self.access[-1]["bytes_down"], 0)
