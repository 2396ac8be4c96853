"""
The proxy chained to a real parent proxy on loopback: a tiny CONNECT-only
parent written here, real origins (plain and TLS), and HTTP clients.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet import reactor, ssl
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool, ProxyAgent, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from proxy_app.access import AccessControl
from proxy_app.acl import ACL
from proxy_app.addresses import AddressPolicy
from proxy_app.config import TLS, Config
from proxy_app.observe import AccessLog
from proxy_app.parent import Bypass, ParentProxy, parseParentURL
from proxy_app.resolver import SafeResolver
from proxy_app.server import ProxyFactory
from proxy_app.tap import buildOrigination
from proxy_app.upstream import Connector

from .certs import Authority
from .helpers import ScriptedNameResolver
from .test_integration import Echo, _Collect
from .test_tls import WhoAmI

CREDENTIALS = b"Basic " + base64.b64encode(b"egress:s3cret")


class _Splice(Protocol):
    """
    The parent's leg to the destination.
    """

    def __init__(self, peer: Any) -> None:
        self.peer = peer

    def connectionMade(self) -> None:
        self.peer.spliced(self)

    def dataReceived(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.peer.transport.loseConnection()


class TinyParent(Protocol):
    """
    A parent proxy that understands only CONNECT, wants C{CREDENTIALS},
    and records every request head it gets.
    """

    def __init__(self, heads: list[bytes], answer: bytes | None) -> None:
        self.heads = heads
        self.answer = answer
        self.buffer = b""
        self.upstream: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        self.heads.append(head)
        if self.answer is not None:
            self.transport.write(self.answer)
            self.transport.loseConnection()
            return
        if b"Proxy-Authorization: " + CREDENTIALS not in head:
            self.transport.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
            self.transport.loseConnection()
            return
        authority = head.split(b" ")[1].decode()
        host, port = authority.rsplit(":", 1)
        self.transport.pauseProducing()
        connectProtocol(
            TCP4ClientEndpoint(reactor, host.strip("[]"), int(port)), _Splice(self)
        ).addErrback(lambda _: self.transport.loseConnection())

    def spliced(self, upstream: _Splice) -> None:
        self.upstream = upstream
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if self.buffer:
            upstream.transport.write(self.buffer)
        self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


class _Outbound:
    """
    An exchange observer keeping each finished exchange's outbound address,
    as the decision log writes it.
    """

    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    def exchangeEnded(self, record: Any) -> None:
        self.seen.append(record.outboundAddress)

    def __getattr__(self, name: str) -> Any:
        return lambda *args: None


class ParentLoopbackTests(TestCase):
    """
    The proxy tunnelling through a real parent on 127.0.0.1 to real origins.
    """

    def setUp(self) -> None:
        self.dir = FilePath(self.mktemp())
        self.dir.makedirs()
        self.ca = Authority()
        self.dir.child("ca.pem").setContent(self.ca.pem)
        self.tls = TLS(ca_bundle=self.dir.child("ca.pem").path)
        self.origination = buildOrigination(self.tls)
        self.heads: list[bytes] = []
        self.parentAnswer: bytes | None = None
        origin = reactor.listenTCP(0, Site(Echo()), interface="127.0.0.1")
        self.addCleanup(origin.stopListening)
        self.originPort = origin.getHost().port

    def listenTLS(self, factory: Factory, name: str) -> int:
        certPEM, keyPEM, _ = self.ca.issue(name, (name,))
        private = ssl.PrivateCertificate.loadPEM(certPEM + keyPEM)
        options = ssl.CertificateOptions(
            privateKey=private.privateKey.original, certificate=private.original
        )
        port = reactor.listenSSL(0, factory, options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def parent(self, tlsName: str | None = None) -> ParentProxy:
        def build() -> TinyParent:
            return TinyParent(self.heads, self.parentAnswer)

        factory = Factory.forProtocol(build)  # type: ignore[arg-type]
        if tlsName is None:
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            number = port.getHost().port
            url = f"http://egress:s3cret@127.0.0.1:{number}"
            return ParentProxy(parseParentURL(url), "127.0.0.1", None, Bypass())
        number = self.listenTLS(factory, tlsName)
        url = parseParentURL(f"https://egress:s3cret@{tlsName}:{number}")
        return ParentProxy(
            url, "127.0.0.1", self.origination.creator(tlsName, None), Bypass()
        )

    def proxy(self, parent: ParentProxy) -> int:
        names = ScriptedNameResolver({"origin.test": [["127.0.0.1"]]})
        resolver = SafeResolver(
            AddressPolicy(allowRanges=["127.0.0.1/32"]), names, reactor
        )
        self.access: list[dict] = []
        accessLog = AccessLog(None)
        accessLog.addObserver(self.access.append)
        factory = ProxyFactory(
            Config(tls=self.tls),
            resolver,
            reactor,
            Connector(reactor, 5, parent=parent),
            accessLog,
            self.origination,
        )
        self.addCleanup(factory.pool.closeIdle)
        self.outbound: list[str] = []
        factory.observers = (*factory.observers, _Outbound(self.outbound))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        return port.getHost().port

    @inlineCallbacks
    def get(self, proxyPort: int, url: str, **headers: str):  # type: ignore[no-untyped-def]
        agent = ProxyAgent(
            TCP4ClientEndpoint(reactor, "127.0.0.1", proxyPort), reactor, pool=self.pool
        )
        response = yield agent.request(
            b"GET",
            url.encode(),
            Headers(
                {k.replace("_", "-").encode(): [v.encode()] for k, v in headers.items()}
            ),
        )
        body = yield readBody(response)
        return response, body

    def assertAskedForTheAddress(self, port: int) -> None:
        self.assertEqual(len(self.heads), 1, self.heads)
        self.assertTrue(
            self.heads[0].startswith(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n" % port),
            self.heads[0],
        )
        self.assertNotIn(b"origin.test", self.heads[0])

    @inlineCallbacks
    def test_forwardedGet(self):  # type: ignore[no-untyped-def]
        """
        A plain forwarded GET is tunnelled through the parent to the vetted
        address, with the credentials, and reaches the origin.
        """
        proxyPort = self.proxy(self.parent())
        response, body = yield self.get(
            proxyPort, f"http://origin.test:{self.originPort}/hello"
        )
        self.assertEqual(response.code, 200, body)
        self.assertTrue(body.startswith(b"GET /hello "), body)
        self.assertAskedForTheAddress(self.originPort)
        # The logs name the destination's address, not the parent's.
        self.assertEqual(self.outbound, [f"127.0.0.1:{self.originPort}"])

    @inlineCallbacks
    def test_connectTunnel(self):  # type: ignore[no-untyped-def]
        """
        A client's CONNECT tunnel is carried through the parent.
        """
        proxyPort = self.proxy(self.parent())
        client = _Collect()
        yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", proxyPort), client
        )
        client.transport.write(
            b"CONNECT origin.test:%d HTTP/1.1\r\nHost: origin.test:%d\r\n\r\n"
            % (self.originPort, self.originPort)
        )
        data = yield client.waitFor(b"\r\n\r\n")
        self.assertEqual(data, b"HTTP/1.1 200 Connection established\r\n\r\n")
        client.transport.write(
            b"GET /tunnelled HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = yield client.done
        self.assertIn(b"GET /tunnelled ", data)
        self.assertAskedForTheAddress(self.originPort)

    @inlineCallbacks
    def test_tlsOriginationVerifiesTheName(self):  # type: ignore[no-untyped-def]
        """
        X-WhSentry-TLS through the parent sends SNI and verifies the
        certificate for the requested name, not the address the parent was
        asked for; a certificate for another name is refused (1007).
        """
        originPort = self.listenTLS(Site(WhoAmI()), "origin.test")
        proxyPort = self.proxy(self.parent())
        response, body = yield self.get(
            proxyPort, f"http://origin.test:{originPort}/x", X_WhSentry_TLS="true"
        )
        self.assertEqual(response.code, 200, body)
        self.assertEqual(body, b"/x origin.test:%d -" % originPort)
        self.assertAskedForTheAddress(originPort)

        wrongPort = self.listenTLS(Site(WhoAmI()), "other.test")
        response, body = yield self.get(
            proxyPort, f"http://origin.test:{wrongPort}/x", X_WhSentry_TLS="true"
        )
        self.assertEqual(response.code, 502, body)
        self.assertEqual(
            response.headers.getRawHeaders(b"x-whsentry-reasoncode"), [b"1007"]
        )

    @inlineCallbacks
    def test_httpsParent(self):  # type: ignore[no-untyped-def]
        """
        An https:// parent is spoken to over TLS verified for its own name,
        and TLS to the origin runs inside that, verified for the origin's.
        """
        originPort = self.listenTLS(Site(WhoAmI()), "origin.test")
        proxyPort = self.proxy(self.parent(tlsName="parent.test"))
        response, body = yield self.get(
            proxyPort, f"https://origin.test:{originPort}/y"
        )
        self.assertEqual(response.code, 200, body)
        self.assertEqual(body, b"/y origin.test:%d -" % originPort)
        self.assertAskedForTheAddress(originPort)

    @inlineCallbacks
    def test_httpsParentWrongName(self):  # type: ignore[no-untyped-def]
        """
        An https:// parent whose certificate is for another name is refused
        before anything is sent to it.
        """
        proxyPort = self.proxy(self.parent(tlsName="parent.test"))
        parent = self.parent(tlsName="impostor.test")
        wrong = ParentProxy(
            parseParentURL(f"https://egress:s3cret@parent.test:{parent.url.port}"),
            "127.0.0.1",
            self.origination.creator("parent.test", None),
            Bypass(),
        )
        proxyPort = self.proxy(wrong)
        response, body = yield self.get(
            proxyPort, f"http://origin.test:{self.originPort}/"
        )
        self.assertEqual(response.code, 502, body)
        self.assertIn(b"parent proxy https://parent.test:", body)
        self.assertEqual(self.heads, [])

    @inlineCallbacks
    def test_parentRefuses(self):  # type: ignore[no-untyped-def]
        """
        A parent answering 407 gives the client 502 with 1018 naming the
        parent and its answer, and never the credentials.
        """
        self.parentAnswer = b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"
        proxyPort = self.proxy(self.parent())
        response, body = yield self.get(
            proxyPort, f"http://origin.test:{self.originPort}/"
        )
        self.assertEqual(response.code, 502, body)
        self.assertEqual(
            response.headers.getRawHeaders(b"x-whsentry-reasoncode"), [b"1018"]
        )
        self.assertIn(b"407 Proxy Authentication Required", body)
        self.assertIn(b"the parent proxy http://127.0.0.1:", body)
        self.assertNotIn(b"s3cret", body)

    @inlineCallbacks
    def test_parentDown(self):  # type: ignore[no-untyped-def]
        """
        A parent that refuses the connection gives 502 with 1018.
        """
        closed = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        port = closed.getHost().port
        yield closed.stopListening()
        url = parseParentURL(f"http://127.0.0.1:{port}")
        proxyPort = self.proxy(ParentProxy(url, "127.0.0.1", None, Bypass()))
        response, body = yield self.get(
            proxyPort, f"http://origin.test:{self.originPort}/"
        )
        self.assertEqual(response.code, 502, body)
        self.assertEqual(
            response.headers.getRawHeaders(b"x-whsentry-reasoncode"), [b"1018"]
        )
        self.assertIn(b"127.0.0.1:%d" % port, body)
        self.assertIn(b"refused", body)


EXTERNAL_ACL = """
version: v1
services: []
default:
  project: p
  action: enforce
  allowed_domains: [origin.test]
  allowed_external_proxies: [proxy.test]
"""


class ExternalProxyLoopbackTests(TestCase):
    """
    A client's CONNECT naming its own proxy with C{X-Upstream-Https-Proxy}
    (Smokescreen's per-request parent), through a real one on 127.0.0.1.
    """

    # The same origin, certificates and tiny parent as above, without
    # running those tests twice.
    setUp = ParentLoopbackTests.setUp
    listenTLS = ParentLoopbackTests.listenTLS
    parent = ParentLoopbackTests.parent
    assertAskedForTheAddress = ParentLoopbackTests.assertAskedForTheAddress

    def externalProxy(self, tlsName: str | None = None) -> tuple[int, int]:
        """
        Start the tiny parent (over TLS for C{tlsName}) and a proxy with no
        parent of its own whose ACL allows C{proxy.test} as an external
        proxy; C{proxy.test} and C{origin.test} resolve to 127.0.0.1.

        @return: the external proxy's port and the proxy's.
        """
        parent = self.parent(tlsName)
        names = ScriptedNameResolver(
            {"origin.test": [["127.0.0.1"]], "proxy.test": [["127.0.0.1"]]}
        )
        resolver = SafeResolver(
            AddressPolicy(allowRanges=["127.0.0.1/32"]), names, reactor
        )
        factory = ProxyFactory(
            Config(tls=self.tls),
            resolver,
            reactor,
            Connector(reactor, 5),
            AccessLog(None),
            self.origination,
        )
        factory.access = AccessControl(
            ACL.fromYAML(EXTERNAL_ACL), allowMissingRole=True
        )
        self.addCleanup(factory.pool.closeIdle)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return parent.url.port, port.getHost().port

    @inlineCallbacks
    def tunnel(self, proxyPort: int, header: str):  # type: ignore[no-untyped-def]
        client = _Collect()
        yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", proxyPort), client
        )
        client.transport.write(
            b"CONNECT origin.test:%d HTTP/1.1\r\nHost: origin.test:%d\r\n"
            b"X-Upstream-Https-Proxy: %s\r\n\r\n"
            % (self.originPort, self.originPort, header.encode())
        )
        data = yield client.waitFor(b"\r\n\r\n")
        return client, data

    @inlineCallbacks
    def test_tunnelThroughTheClientsProxy(self):  # type: ignore[no-untyped-def]
        """
        The tunnel goes through the external proxy the client named, over
        TLS verified for its name, with its credentials, which is asked for
        the vetted address and never sees the name or the header.
        """
        parentPort, proxyPort = self.externalProxy(tlsName="proxy.test")
        client, data = yield self.tunnel(
            proxyPort, f"https://egress:s3cret@proxy.test:{parentPort}"
        )
        self.assertEqual(data, b"HTTP/1.1 200 Connection established\r\n\r\n")
        client.transport.write(
            b"GET /tunnelled HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = yield client.done
        self.assertIn(b"GET /tunnelled ", data)
        self.assertAskedForTheAddress(self.originPort)
        self.assertNotIn(b"pstream-Https", self.heads[0])

    @inlineCallbacks
    def test_notAllowedIsNotContacted(self):  # type: ignore[no-untyped-def]
        """
        An external proxy the ACL does not list is refused (403, 1011) and
        never contacted, even at an address the policy allows.
        """
        parentPort, proxyPort = self.externalProxy()
        client, data = yield self.tunnel(proxyPort, f"http://127.0.0.1:{parentPort}")
        self.assertTrue(data.startswith(b"HTTP/1.1 403 "), data)
        self.assertIn(b"X-WhSentry-ReasonCode: 1011", data)
        client.transport.loseConnection()
        self.assertEqual(self.heads, [])
