"""
A few end-to-end tests over real sockets, on loopback only: a twisted.web
origin, the proxy with the real safe resolver, and HTTP clients.
"""

from __future__ import annotations

import gc
from io import BytesIO

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import globalLogPublisher
from twisted.names import dns
from twisted.python.filepath import FilePath
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
from proxy_app.tap import Options, makeService
from proxy_app.upstream import Connector

from .helpers import startNameServer


def logged(start: str) -> Deferred:
    """
    A L{Deferred} that fires with the next log event whose format begins
    with C{start}: a test waits for the event itself, not for a guess at
    how long it takes (trial's timeout bounds the wait).
    """
    d: Deferred = Deferred()

    def observer(event: dict) -> None:
        if not d.called and str(event.get("log_format", "")).startswith(start):
            globalLogPublisher.removeObserver(observer)
            d.callback(event)

    globalLogPublisher.addObserver(observer)
    return d


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
        accessLog.addObserver(self.access.append)
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
        self.factory.resolver = SafeResolver(
            policy, reactor.nameResolver, reactor, timeout=5
        )
        response = yield self.agent().request(b"GET", self.url())
        body = yield readBody(response)
        self.assertEqual(response.code, 403)
        self.assertEqual(
            response.headers.getRawHeaders(b"x-whsentry-reasoncode"), [b"1000"]
        )
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
        self.factory.accessLog.addObserver(
            lambda event: event["method"] == "CONNECT" and logged.callback(event)
        )
        data = yield client.done
        self.assertIn(b"GET /tunnelled ", data)
        yield logged
        self.assertEqual(self.access[-1]["method"], "CONNECT")
        self.assertGreater(self.access[-1]["bytes_down"], 0)


def freePort(host: str) -> int:
    """
    A TCP port free on C{host} at the moment of asking.
    """
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class DestinationSafetyTests(TestCase):
    """
    The proxy as twistd builds it (L{makeService} from command-line
    options), in front of origins on loopback addresses and a twisted.names
    server, with only 127.0.0.2 allowed.
    """

    def setUp(self) -> None:
        self.seen: list[bytes] = []
        allowed = reactor.listenTCP(0, Site(Echo()), interface="127.0.0.2")
        self.addCleanup(allowed.stopListening)
        self.allowedPort = allowed.getHost().port
        # An origin on a denied address records whether anything reached it.
        seen = self.seen

        class Recorder(Echo):
            def render(self, request):  # type: ignore[no-untyped-def]
                seen.append(request.uri)
                return Echo.render(self, request)

        denied = reactor.listenTCP(0, Site(Recorder()), interface="127.0.0.1")
        self.addCleanup(denied.stopListening)
        self.deniedPort = denied.getHost().port

        dns_ = startNameServer(
            reactor,
            b"test",
            {
                b"good.test": [dns.Record_A("127.0.0.2")],
                b"bad.test": [dns.Record_A("127.0.0.1")],
                b"mixed.test": [dns.Record_A("127.0.0.1"), dns.Record_A("127.0.0.2")],
            },
        )
        self.addCleanup(dns_.stopListening)

        self.proxyPort = freePort("127.0.0.1")
        options = Options(environ={})
        options.parseOptions(
            [
                "--listen",
                f"tcp:{self.proxyPort}:interface=127.0.0.1",
                "--allow-range",
                "127.0.0.2/32",
                # Even an explicit allow cannot open the proxy's own port.
                "--allow-address",
                f"127.0.0.1:{self.proxyPort}",
                "--nameserver",
                f"127.0.0.1:{dns_.getHost().port}",
                "--access-log",
                self.mktemp(),
                "--metrics",
                "none",
            ]
        )
        service = makeService(options)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def get(self, url: str) -> Deferred:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxyPort)
        return ProxyAgent(endpoint, reactor, pool=self.pool).request(
            b"GET", url.encode()
        )

    @inlineCallbacks
    def assertDenied(
        self, url: str, address: str, rule: str = "Deny: Not Global Unicast"
    ):  # type: ignore[no-untyped-def]
        response = yield self.get(url)
        body = yield readBody(response)
        self.assertEqual(response.code, 403)
        self.assertEqual(
            response.headers.getRawHeaders(b"x-whsentry-reasoncode"), [b"1000"]
        )
        self.assertIn(
            f"The destination address ({address}) was denied by rule "
            f"'{rule}'.".encode(),
            body,
        )
        self.assertEqual(self.seen, [])

    @inlineCallbacks
    def test_allowedAddress(self):  # type: ignore[no-untyped-def]
        """
        The allowed address is reached.
        """
        response = yield self.get(f"http://127.0.0.2:{self.allowedPort}/ok")
        body = yield readBody(response)
        self.assertEqual(response.code, 200)
        self.assertTrue(body.startswith(b"GET /ok "))

    def test_deniedAddress(self):  # type: ignore[no-untyped-def]
        """
        127.0.0.1 is refused with 403/1000 and its origin sees nothing.
        """
        return self.assertDenied(f"http://127.0.0.1:{self.deniedPort}/", "127.0.0.1")

    def test_deniedSpelling(self):  # type: ignore[no-untyped-def]
        """
        127.0.0.1 written as a decimal integer is judged as the address it
        dials, and refused.
        """
        return self.assertDenied(f"http://2130706433:{self.deniedPort}/", "127.0.0.1")

    @inlineCallbacks
    def test_names(self):  # type: ignore[no-untyped-def]
        """
        Through --nameserver: a name resolving to the allowed address is
        reached, one resolving to a denied address is refused, and one with
        both answers is reached through the allowed one.
        """
        response = yield self.get(f"http://good.test:{self.allowedPort}/")
        yield readBody(response)
        self.assertEqual(response.code, 200)
        yield self.assertDenied(f"http://bad.test:{self.deniedPort}/", "127.0.0.1")
        response = yield self.get(f"http://mixed.test:{self.allowedPort}/mixed")
        body = yield readBody(response)
        self.assertEqual(response.code, 200)
        self.assertTrue(body.startswith(b"GET /mixed "))

    @inlineCallbacks
    def test_unknownName(self):  # type: ignore[no-untyped-def]
        """
        A name the server does not know gets 502/1001 naming it.
        """
        response = yield self.get(f"http://nowhere.test:{self.allowedPort}/")
        body = yield readBody(response)
        self.assertEqual(response.code, 502)
        self.assertEqual(
            response.headers.getRawHeaders(b"x-whsentry-reasoncode"), [b"1001"]
        )
        self.assertIn(b"nowhere.test", body)

    @inlineCallbacks
    def test_connectDenied(self):  # type: ignore[no-untyped-def]
        """
        CONNECT to a name resolving to a denied address is refused with
        403/1000.
        """
        client = _Collect()
        yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxyPort), client
        )
        client.transport.write(
            b"CONNECT bad.test:%d HTTP/1.1\r\nHost: bad.test\r\n\r\n" % self.deniedPort
        )
        data = yield client.waitFor(b"\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 403 Forbidden\r\n"), data)
        self.assertIn(b"X-WhSentry-ReasonCode: 1000", data)
        client.transport.loseConnection()

    @inlineCallbacks
    def test_selfConnection(self):  # type: ignore[no-untyped-def]
        """
        The proxy refuses to connect to its own listener even where the
        address and port are explicitly allowed.
        """
        yield self.assertDenied(
            f"http://127.0.0.1:{self.proxyPort}/", "127.0.0.1", "Deny: Self Connection"
        )


class IPv6Tests(TestCase):
    """
    Listening, resolving and connecting over IPv6 loopback.
    """

    @inlineCallbacks
    def test_ipv6(self):  # type: ignore[no-untyped-def]
        """
        A proxy listening on [::1] forwards to an origin on [::1] when that
        address is allowed.
        """
        origin = reactor.listenTCP(0, Site(Echo()), interface="::1")
        self.addCleanup(origin.stopListening)
        port = freePort("::1")
        options = Options(environ={})
        options.parseOptions(
            [
                "--listen",
                f"tcp6:{port}:interface=\\:\\:1",
                "--allow-address",
                "::1",
                "--access-log",
                self.mktemp(),
                "--metrics",
                "none",
            ]
        )
        service = makeService(options)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        from twisted.internet.endpoints import TCP6ClientEndpoint

        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = ProxyAgent(TCP6ClientEndpoint(reactor, "::1", port), reactor, pool=pool)
        response = yield agent.request(
            b"GET", f"http://[::1]:{origin.getHost().port}/six".encode()
        )
        body = yield readBody(response)
        self.assertEqual(response.code, 200)
        self.assertTrue(body.startswith(b"GET /six "), body)


class AccessControlTests(TestCase):
    """
    Proxy authentication and the ACL through the proxy as twistd builds
    it, with an htpasswd file and a real SIGHUP reload.
    """

    def setUp(self) -> None:
        import bcrypt

        origin = reactor.listenTCP(0, Site(Echo()), interface="127.0.0.2")
        self.addCleanup(origin.stopListening)
        self.originPort = origin.getHost().port
        directory = FilePath(self.mktemp())
        directory.makedirs()
        self.acl = directory.child("acl.yaml")
        self.writeACL(["127.0.0.2"])
        htpasswd = directory.child("htpasswd")
        htpasswd.setContent(
            b"alice:" + bcrypt.hashpw(b"secret", bcrypt.gensalt(4)) + b"\n"
        )
        self.proxyPort = freePort("127.0.0.1")
        options = Options(environ={})
        options.parseOptions(
            [
                "--listen",
                f"tcp:{self.proxyPort}:interface=127.0.0.1",
                "--allow-range",
                "127.0.0.2/32",
                "--acl",
                self.acl.path,
                "--auth",
                f"htpasswd:{htpasswd.path}",
                "--access-log",
                "none",
                "--decision-log",
                "none",
                "--metrics",
                "none",
            ]
        )
        self.service = makeService(options)
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def writeACL(self, domains: list[str]) -> None:
        self.acl.setContent(
            (
                "version: v1\nservices:\n  - name: alice\n    project: p\n"
                f"    action: enforce\n    allowed_domains: {domains!r}\n"
            ).encode()
        )

    @inlineCallbacks
    def get(self, credentials: bytes | None = None):  # type: ignore[no-untyped-def]
        import base64

        headers = Headers()
        if credentials is not None:
            headers.addRawHeader(
                b"Proxy-Authorization", b"Basic " + base64.b64encode(credentials)
            )
        agent = ProxyAgent(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxyPort),
            reactor,
            pool=self.pool,
        )
        response = yield agent.request(
            b"GET", f"http://127.0.0.2:{self.originPort}/x".encode(), headers
        )
        body = yield readBody(response)
        return response, body

    @inlineCallbacks
    def test_authAndACLAndReload(self):  # type: ignore[no-untyped-def]
        """
        No credentials: 407 with the realm; good credentials: through; after
        the ACL file drops the host and SIGHUP arrives: 403/1011; after a
        broken ACL file and another SIGHUP, the last good ACL stays.
        """
        import os
        import signal

        response, _ = yield self.get()
        self.assertEqual(response.code, 407)
        self.assertEqual(
            response.headers.getRawHeaders(b"proxy-authenticate"),
            [b'Basic realm="egressproxy"'],
        )
        response, body = yield self.get(b"alice:secret")
        self.assertEqual(response.code, 200, body)

        # Install the real handlers as twistd would, and restore ours after.
        from proxy_app.tap import ProxyService

        proxyService = [s for s in self.service if isinstance(s, ProxyService)][0]
        previous = signal.getsignal(signal.SIGHUP), signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGHUP, previous[0])
        self.addCleanup(signal.signal, signal.SIGUSR1, previous[1])
        proxyService.installSignals = True
        self.addCleanup(gc.unfreeze)
        proxyService.startService()
        # As twistd runs it, what start-up loaded is out of the collector's
        # way.
        self.assertGreater(gc.get_freeze_count(), 0)

        self.writeACL(["other.example"])
        reloaded = logged("ACL reloaded")
        os.kill(os.getpid(), signal.SIGHUP)
        yield reloaded
        response, body = yield self.get(b"alice:secret")
        self.assertEqual(response.code, 403, body)
        self.assertEqual(
            response.headers.getRawHeaders(b"x-whsentry-reasoncode"), [b"1011"]
        )

        self.acl.setContent(b"version: v1\nservices: [[[\n")
        refused = logged("ACL not reloaded")
        os.kill(os.getpid(), signal.SIGHUP)
        yield refused
        response, _ = yield self.get(b"alice:secret")
        self.assertEqual(response.code, 403)


class PortRulesTests(TestCase):
    """
    C{--allow-port} on the proxy as twistd builds it, with two origins on
    the allowed address 127.0.0.2: one on the allowed port, one on another.
    """

    def setUp(self) -> None:
        self.seen: list[bytes] = []
        seen = self.seen

        class Recorder(Echo):
            def render(self, request):  # type: ignore[no-untyped-def]
                seen.append(request.uri)
                return Echo.render(self, request)

        allowed = reactor.listenTCP(0, Site(Echo()), interface="127.0.0.2")
        self.addCleanup(allowed.stopListening)
        self.allowedPort = allowed.getHost().port
        other = reactor.listenTCP(0, Site(Recorder()), interface="127.0.0.2")
        self.addCleanup(other.stopListening)
        self.otherPort = other.getHost().port
        self.proxyPort = freePort("127.0.0.1")
        options = Options(environ={})
        options.parseOptions(
            [
                "--listen",
                f"tcp:{self.proxyPort}:interface=127.0.0.1",
                "--allow-range",
                "127.0.0.2/32",
                "--allow-port",
                f"80,443,{self.allowedPort}",
                "--access-log",
                self.mktemp(),
                "--metrics",
                "none",
            ]
        )
        service = makeService(options)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def get(self, url: str) -> Deferred:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxyPort)
        return ProxyAgent(endpoint, reactor, pool=self.pool).request(
            b"GET", url.encode()
        )

    @inlineCallbacks
    def test_ports(self):  # type: ignore[no-untyped-def]
        """
        The allowed port is reached; another port of the same allowed
        address gets 403/1017, for GET and CONNECT, and its origin sees
        nothing.
        """
        response = yield self.get(f"http://127.0.0.2:{self.allowedPort}/ok")
        yield readBody(response)
        self.assertEqual(response.code, 200)
        response = yield self.get(f"http://127.0.0.2:{self.otherPort}/no")
        body = yield readBody(response)
        self.assertEqual(response.code, 403)
        self.assertEqual(
            response.headers.getRawHeaders(b"x-whsentry-reasoncode"), [b"1017"]
        )
        self.assertIn(f"The destination port ({self.otherPort})".encode(), body)
        client = _Collect()
        yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxyPort), client
        )
        client.transport.write(
            b"CONNECT 127.0.0.2:%d HTTP/1.1\r\nHost: x\r\n\r\n" % self.otherPort
        )
        data = yield client.waitFor(b"\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 403 Forbidden\r\n"), data)
        self.assertIn(b"X-WhSentry-ReasonCode: 1017", data)
        client.transport.loseConnection()
        self.assertEqual(self.seen, [])


class OperatorTextTests(TestCase):
    """
    C{--deny-message-extra} and C{--report-only} through the proxy as twistd
    builds it, on loopback.
    """

    def start(self, *extra: str) -> int:
        origin = reactor.listenTCP(0, Site(Echo()), interface="127.0.0.2")
        self.addCleanup(origin.stopListening)
        self.originPort = origin.getHost().port
        acl = FilePath(self.mktemp())
        acl.setContent(
            b"version: v1\nservices:\n  - name: alice\n    project: p\n"
            b"    action: enforce\n    allowed_domains: [other.example]\n"
        )
        port = freePort("127.0.0.1")
        options = Options(environ={})
        options.parseOptions(
            [
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--allow-range",
                "127.0.0.2/32",
                "--acl",
                acl.path,
                "--access-log",
                "none",
                "--decision-log",
                "none",
                "--metrics",
                "none",
                *extra,
            ]
        )
        service = makeService(options)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        return port

    @inlineCallbacks
    def get(self, port: int, url: str):  # type: ignore[no-untyped-def]
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = ProxyAgent(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port), reactor, pool=pool
        )
        response = yield agent.request(b"GET", url.encode())
        body = yield readBody(response)
        return response, body

    @inlineCallbacks
    def test_denyMessageExtra(self):  # type: ignore[no-untyped-def]
        """
        The operator's text follows the message in the body of an ACL's 403,
        and stays out of C{X-WhSentry-Reason}.
        """
        port = self.start("--deny-message-extra", "See go/egress for access.")
        response, body = yield self.get(port, f"http://127.0.0.2:{self.originPort}/x")
        self.assertEqual(response.code, 403)
        self.assertEqual(
            response.headers.getRawHeaders(b"x-whsentry-reasoncode"), [b"1011"]
        )
        self.assertTrue(body.endswith(b"\nSee go/egress for access.\n"), body)
        self.assertNotIn(
            b"go/egress", response.headers.getRawHeaders(b"x-whsentry-reason")[0]
        )

    @inlineCallbacks
    def test_reportOnly(self):  # type: ignore[no-untyped-def]
        """
        With C{--report-only} a request the ACL denies goes through, while
        the address policy still refuses a metadata address.
        """
        port = self.start("--report-only")
        response, body = yield self.get(port, f"http://127.0.0.2:{self.originPort}/x")
        self.assertEqual(response.code, 200, body)
        response, _ = yield self.get(port, "http://169.254.169.254/latest/")
        self.assertEqual(response.code, 403)
        self.assertEqual(
            response.headers.getRawHeaders(b"x-whsentry-reasoncode"), [b"1000"]
        )
