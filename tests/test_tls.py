"""
TLS origination (X-WhSentry-TLS and https:// URIs) against TLS origins on
loopback, with certificates made at test time.
"""

from __future__ import annotations

import re
from typing import Any

from service_identity.hazmat import DNS_ID
from twisted.internet import reactor, ssl
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool, ProxyAgent, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from proxy_app.addresses import AddressPolicy
from proxy_app.config import TLS, Config
from proxy_app.observe import AccessLog
from proxy_app.reasons import Reason
from proxy_app.resolver import SafeResolver
from proxy_app.server import ProxyFactory
from proxy_app.tap import Options, buildOrigination, makeService
from proxy_app.tls import Origination, TLSConfigError, _PeerCheck, tlsError
from proxy_app.upstream import Connector

from .certs import Authority
from .helpers import ScriptedNameResolver


class WhoAmI(Resource):
    """
    Answers with the path, the Host header and the CN of the client
    certificate the proxy presented, if any.
    """

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        transport = request.channel.transport
        cert = getattr(transport, "getPeerCertificate", lambda: None)()
        cn = cert.get_subject().CN.encode() if cert is not None else b"-"
        return b"%s %s %s" % (request.uri, request.getHeader(b"host"), cn)


class OriginationTests(TestCase):
    """
    The proxy originating TLS to origins on 127.0.0.1.
    """

    def setUp(self) -> None:
        self.dir = FilePath(self.mktemp())
        self.dir.makedirs()
        self.ca = Authority()
        self.clientCA = Authority("client CA")
        self.write("ca.pem", self.ca.pem)
        for alias, cn in [("default", "proxy-default"), ("billing", "proxy-billing")]:
            cert, key, _ = self.clientCA.issue(cn, client=True)
            self.write(f"{alias}.pem", cert)
            self.write(f"{alias}.key", key)

    def write(self, name: str, data: bytes) -> str:
        path = self.dir.child(name)
        path.setContent(data)
        return path.path

    def origin(
        self,
        names: tuple[str, ...] = ("origin.test", "127.0.0.1"),
        expired: bool = False,
        requireClient: bool = False,
        tls13: bool = False,
        authority: Authority | None = None,
    ) -> int:
        certPEM, keyPEM, _ = (authority or self.ca).issue(
            names[0], names, expired=expired
        )
        private = ssl.PrivateCertificate.loadPEM(certPEM + keyPEM)
        options: dict[str, Any] = {}
        if requireClient:
            options["trustRoot"] = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(self.clientCA.pem)]
            )
        options["raiseMinimumTo"] = (
            ssl.TLSVersion.TLSv1_3 if tls13 else ssl.TLSVersion.TLSv1_2
        )
        contextFactory = ssl.CertificateOptions(
            privateKey=private.privateKey.original,
            certificate=private.original,
            **options,
        )
        port = reactor.listenSSL(
            0, Site(WhoAmI()), contextFactory, interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def proxy(self, tls: TLS | None = None) -> int:
        tls = tls or TLS(
            ca_bundle=self.dir.child("ca.pem").path,
            client_certs=(
                (
                    "billing",
                    self.dir.child("billing.pem").path,
                    self.dir.child("billing.key").path,
                ),
            ),
        )
        config = Config(tls=tls)
        names = ScriptedNameResolver(
            {
                "origin.test": [["127.0.0.1"]],
                "other.test": [["127.0.0.1"]],
                "foo_bar.origin.test": [["127.0.0.1"]],
            }
        )
        resolver = SafeResolver(
            AddressPolicy(allowRanges=["127.0.0.1/32"]), names, reactor
        )
        self.access: list[dict] = []
        accessLog = AccessLog(None)
        accessLog.addObserver(self.access.append)
        factory = ProxyFactory(
            config,
            resolver,
            reactor,
            Connector(reactor, 5),
            accessLog,
            buildOrigination(tls),
        )
        self.addCleanup(factory.pool.closeIdle)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
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

    def assertReason(
        self, response: Any, body: bytes, status: int, code: int, text: str
    ) -> None:
        self.assertEqual(response.code, status, body)
        self.assertEqual(
            response.headers.getRawHeaders(b"x-whsentry-reasoncode"),
            [str(code).encode()],
        )
        self.assertIn(text.encode(), body)

    @inlineCallbacks
    def test_header(self):  # type: ignore[no-untyped-def]
        """
        X-WhSentry-TLS on an http:// request makes the proxy speak TLS to
        the origin, verifying its name, with Host as the client wrote it.
        """
        originPort = self.origin()
        response, body = yield self.get(
            self.proxy(), f"http://origin.test:{originPort}/x", X_WhSentry_TLS="true"
        )
        self.assertEqual(response.code, 200, body)
        self.assertEqual(body, b"/x origin.test:%d -" % originPort)

    @inlineCallbacks
    def test_headerFalse(self):  # type: ignore[no-untyped-def]
        """
        X-WhSentry-TLS: false does not originate TLS, so the TLS origin
        cannot answer the plain request.
        """
        originPort = self.origin()
        response, body = yield self.get(
            self.proxy(), f"http://origin.test:{originPort}/x", X_WhSentry_TLS="False"
        )
        self.assertNotEqual(response.code, 200)

    @inlineCallbacks
    def test_httpsURIAndIPLiteral(self):  # type: ignore[no-untyped-def]
        """
        An absolute https:// URI is originated the same way, and an IP
        literal is verified against the certificate's IP SAN.
        """
        originPort = self.origin()
        response, body = yield self.get(
            self.proxy(), f"https://127.0.0.1:{originPort}/ip"
        )
        self.assertEqual(response.code, 200, body)
        self.assertTrue(body.startswith(b"/ip "), body)

    @inlineCallbacks
    def test_untrusted(self):  # type: ignore[no-untyped-def]
        """
        An origin whose certificate no trusted CA issued gets 502/1007
        saying why.
        """
        originPort = self.origin(authority=Authority("rogue CA"))
        response, body = yield self.get(
            self.proxy(), f"http://origin.test:{originPort}/", X_WhSentry_TLS="1"
        )
        self.assertReason(
            response, body, 502, 1007, "unable to get local issuer certificate"
        )

    @inlineCallbacks
    def test_defaultBundleRejectsTestCA(self):  # type: ignore[no-untyped-def]
        """
        With no --ca-bundle, certifi's bundle is used, which does not trust
        the test CA.
        """
        originPort = self.origin()
        response, body = yield self.get(
            self.proxy(TLS()), f"https://origin.test:{originPort}/"
        )
        self.assertReason(response, body, 502, 1007, "is not valid")

    @inlineCallbacks
    def test_wrongName(self):  # type: ignore[no-untyped-def]
        """
        A certificate for another name gets 502/1007 naming both names.
        """
        originPort = self.origin(names=("other.example",))
        response, body = yield self.get(
            self.proxy(), f"http://origin.test:{originPort}/", X_WhSentry_TLS="true"
        )
        self.assertReason(
            response,
            body,
            502,
            1007,
            "hostname mismatch: wanted origin.test, certificate is for other.example",
        )

    @inlineCallbacks
    def test_ipLiteralMismatch(self):  # type: ignore[no-untyped-def]
        """
        An IP literal is checked against the certificate's IP
        subjectAltNames only: a certificate naming the host but not the
        address gets 502/1007 naming both.
        """
        originPort = self.origin(names=("origin.test",))
        response, body = yield self.get(
            self.proxy(), f"https://127.0.0.1:{originPort}/"
        )
        self.assertReason(
            response,
            body,
            502,
            1007,
            "hostname mismatch: wanted 127.0.0.1, certificate is for origin.test",
        )

    @inlineCallbacks
    def test_underscoreName(self):  # type: ignore[no-untyped-def]
        """
        A name with an underscore, which IDNA 2008 refuses but curl and
        browsers accept, is sent as SNI and verified against the
        certificate, exactly or through a wildcard.
        """
        for names in [("foo_bar.origin.test",), ("*.origin.test",)]:
            originPort = self.origin(names=names)
            response, body = yield self.get(
                self.proxy(), f"https://foo_bar.origin.test:{originPort}/u"
            )
            self.assertEqual(response.code, 200, body)
            self.assertEqual(body, b"/u foo_bar.origin.test:%d -" % originPort)

    @inlineCallbacks
    def test_expired(self):  # type: ignore[no-untyped-def]
        """
        An expired certificate gets 502/1007 saying so.
        """
        originPort = self.origin(expired=True)
        response, body = yield self.get(
            self.proxy(), f"http://origin.test:{originPort}/", X_WhSentry_TLS="true"
        )
        self.assertReason(response, body, 502, 1007, "certificate has expired")

    @inlineCallbacks
    def test_plainOrigin(self):  # type: ignore[no-untyped-def]
        """
        TLS to an origin that does not speak TLS fails the handshake:
        502/1005.
        """

        class NotTLS(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                self.transport.loseConnection()

        plain = reactor.listenTCP(0, Factory.forProtocol(NotTLS), interface="127.0.0.1")
        self.addCleanup(plain.stopListening)
        response, body = yield self.get(
            self.proxy(),
            f"http://origin.test:{plain.getHost().port}/",
            X_WhSentry_TLS="true",
        )
        self.assertReason(response, body, 502, 1005, "TLS handshake with origin.test")

    @inlineCallbacks
    def test_mutualTLS(self):  # type: ignore[no-untyped-def]
        """
        An origin that requires a client certificate refuses the proxy
        without one (502/1005), accepts the default identity, and accepts
        the alias named by X-WhSentry-ClientCert; an unknown alias is 400/1010.
        """
        originPort = self.origin(requireClient=True)
        url = f"http://origin.test:{originPort}/m"
        response, body = yield self.get(self.proxy(), url, X_WhSentry_TLS="true")
        self.assertReason(response, body, 502, 1005, "TLS")

        proxyPort = self.proxy(
            TLS(
                ca_bundle=self.dir.child("ca.pem").path,
                client_cert=self.dir.child("default.pem").path,
                client_key=self.dir.child("default.key").path,
                client_certs=(
                    (
                        "billing",
                        self.dir.child("billing.pem").path,
                        self.dir.child("billing.key").path,
                    ),
                ),
            )
        )
        response, body = yield self.get(proxyPort, url, X_WhSentry_TLS="true")
        self.assertEqual(body, b"/m origin.test:%d proxy-default" % originPort)
        response, body = yield self.get(
            proxyPort, url, X_WhSentry_TLS="true", X_WhSentry_ClientCert="billing"
        )
        # The same client connection, but never the same upstream
        # connection for two identities.
        self.assertEqual(body, b"/m origin.test:%d proxy-billing" % originPort)
        response, body = yield self.get(
            proxyPort, url, X_WhSentry_TLS="true", X_WhSentry_ClientCert="nope"
        )
        self.assertReason(response, body, 400, 1010, "'nope'")

    @inlineCallbacks
    def test_tls13Only(self):  # type: ignore[no-untyped-def]
        """
        An origin that speaks only TLS 1.3 is reached.
        """
        originPort = self.origin(tls13=True)
        response, body = yield self.get(
            self.proxy(), f"https://origin.test:{originPort}/13"
        )
        self.assertEqual(response.code, 200, body)


class _TLSProtocol:
    """
    Stands in for the TLS transport a creator makes connections for.
    """

    def __init__(self) -> None:
        self.failures: list[Failure] = []

    def failVerification(self, reason: Failure) -> None:
        self.failures.append(reason)


class CreatorTests(SynchronousTestCase):
    """
    L{Origination.creator}'s connection creators, without a network.
    """

    def setUp(self) -> None:
        self.origination = Origination(
            ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(Authority().pem)])
        )

    def test_interface(self) -> None:
        """
        A creator is an C{IOpenSSLClientConnectionCreator}, and one
        (host, identity) gets the same creator each time.
        """
        creator = self.origination.creator("origin.test", None)
        verifyObject(IOpenSSLClientConnectionCreator, creator)
        self.assertIs(self.origination.creator("origin.test", None), creator)

    def test_serverName(self) -> None:
        """
        A host name is sent as SNI, an IP literal never is.
        """
        named = self.origination.creator("foo_bar.origin.test", None)
        connection = named.clientConnectionForTLS(_TLSProtocol())
        self.assertEqual(connection.get_servername(), b"foo_bar.origin.test")
        literal = self.origination.creator("2001:db8::1", None)
        self.assertIsNone(
            literal.clientConnectionForTLS(_TLSProtocol()).get_servername()
        )

    def test_refusedName(self) -> None:
        """
        A name whose A-label IDNA 2008 refuses (an emoji), or that is not
        a host name at all, raises C{UnicodeError}, which the exchange
        answers with 400/1002; valid internationalized names pass.
        """
        for host in ("xn--jv8h.example.com", "\U0001f510.example", "a b.example"):
            self.assertRaises(UnicodeError, self.origination.creator, host, None)
        self.origination.creator("xn--bcher-kva.example", None)
        self.origination.creator("b\xfccher.example", None)

    def test_checkFailsClosed(self) -> None:
        """
        A failure inside the certificate check refuses the peer and is
        logged, rather than letting the handshake go on.
        """
        protocol = _TLSProtocol()
        creator = self.origination.creator("origin.test", None)
        connection = creator.clientConnectionForTLS(protocol)
        check = _PeerCheck("origin.test", DNS_ID("origin.test"), protocol)
        # Not a certificate: reading its names raises.
        self.assertFalse(check.callback(connection, None, 0, 0, 1))  # type: ignore[arg-type]
        self.assertEqual(len(protocol.failures), 1)
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        error = tlsError(protocol.failures[0], "origin.test", "origin.test:443")
        self.assertEqual(error.reason, Reason.TLS_HANDSHAKE_FAILED)

    def test_noPrivateTwisted(self) -> None:
        """
        No module of C{proxy_app} or of the tests imports a private Twisted
        module (one whose name starts with an underscore), which can change
        with any release.
        """
        import proxy_app

        private = re.compile(
            r"^\s*(?:from|import)\s+twisted(?:\.\w+)*\._", re.MULTILINE
        )
        package = FilePath(proxy_app.__file__).parent()
        tests = FilePath(__file__).parent()
        offenders = [
            path.path
            for root in (package, tests)
            for path in root.walk()
            if path.path.endswith(".py")
            and private.search(path.getContent().decode("utf-8"))
        ]
        self.assertEqual(offenders, [])


class LoadingTests(SynchronousTestCase):
    """
    Loading TLS files at start-up.
    """

    def test_mismatchedKey(self) -> None:
        """
        A client key that does not belong to its certificate stops
        start-up with a line naming both files.
        """
        ca = Authority()
        directory = FilePath(self.mktemp())
        directory.makedirs()
        certA, _, _ = ca.issue("a", client=True)
        _, keyB, _ = ca.issue("b", client=True)
        directory.child("a.pem").setContent(certA)
        directory.child("b.key").setContent(keyB)
        with self.assertRaises(TLSConfigError) as raised:
            buildOrigination(
                TLS(
                    client_cert=directory.child("a.pem").path,
                    client_key=directory.child("b.key").path,
                )
            )
        self.assertIn("b.key", str(raised.exception))
        self.assertIn(
            "is not the private key of the certificate in", str(raised.exception)
        )

    def test_bundleReadWhole(self) -> None:
        """
        Every certificate of a bundle is trusted, not only the first.
        """
        from proxy_app.tls import loadCertificates

        bundle = FilePath(self.mktemp())
        bundle.setContent(Authority("one").pem + Authority("two").pem)
        self.assertEqual(len(loadCertificates(bundle.path)), 2)

    def test_missingFiles(self) -> None:
        """
        Missing files are named.
        """
        with self.assertRaises(TLSConfigError) as raised:
            buildOrigination(TLS(ca_bundle="/nonexistent/ca.pem"))
        self.assertIn("/nonexistent/ca.pem", str(raised.exception))
        with self.assertRaises(TLSConfigError):
            buildOrigination(TLS(client_cert="/nonexistent/c.pem"))


class ListenerTests(TestCase):
    """
    A TLS listener that requires client certificates, with a CRL: the
    certificate's CN becomes the role.
    """

    clientCertMode = "required"

    def setUp(self) -> None:
        self.dir = FilePath(self.mktemp())
        self.dir.makedirs()
        self.serverCA = Authority("server CA")
        self.clientCA = Authority("client CA")
        cert, key, _ = self.serverCA.issue("proxy.test", ("proxy.test", "127.0.0.1"))
        self.write("server.pem", cert)
        self.write("server.key", key)
        self.write("clients.pem", self.clientCA.pem)
        self.good = self.clientCA.issue(
            "billing", client=True, organizationalUnit="payments"
        )
        self.revoked = self.clientCA.issue("mallory", client=True)
        self.clientCA.revoked.append(self.revoked[2])
        self.write("clients.crl", self.clientCA.crl())

        origin = reactor.listenTCP(0, Site(WhoAmI()), interface="127.0.0.2")
        self.addCleanup(origin.stopListening)
        self.originPort = origin.getHost().port

        from .test_integration import freePort

        self.port = freePort("127.0.0.1")
        self.accessLog = self.dir.child("access.log")
        options = Options(environ={})
        options.parseOptions(
            [
                "--listen",
                f"mtls:{self.port}:interface=127.0.0.1:cert={self.dir.child('server.pem').path}"
                f":key={self.dir.child('server.key').path}:client_ca={self.dir.child('clients.pem').path}"
                f":client_cert={self.clientCertMode}:crl={self.dir.child('clients.crl').path}",
                "--allow-range",
                "127.0.0.2/32",
                "--access-log",
                self.accessLog.path,
                "--metrics",
                "none",
                "--access-log-format",
                "json",
            ]
        )
        service = self.service = makeService(options)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)

    def write(self, name: str, data: bytes) -> str:
        path = self.dir.child(name)
        path.setContent(data)
        return path.path

    def flushAccessLog(self) -> None:
        """
        Write out the access log's batch now, as its timer would.
        """
        from proxy_app.tap import ProxyService

        for child in self.service:
            if isinstance(child, ProxyService):
                child.factory.accessLog.flush()

    def request(self, client: tuple[bytes, bytes, int] | None) -> Any:
        """
        Send one forwarded request over TLS to the listener.

        @return: a Deferred firing with what came back before the close.
        """
        from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol

        from .test_integration import _Collect

        certificate = (
            ssl.PrivateCertificate.loadPEM(client[0] + client[1])
            if client is not None
            else None
        )
        options = ssl.optionsForClientTLS(
            "proxy.test",
            trustRoot=ssl.Certificate.loadPEM(self.serverCA.pem),
            clientCertificate=certificate,
        )
        collector = _Collect()
        d = connectProtocol(
            SSL4ClientEndpoint(reactor, "127.0.0.1", self.port, options), collector
        )

        def connected(protocol: Any) -> Any:
            protocol.transport.write(
                b"GET http://127.0.0.2:%d/who HTTP/1.1\r\nHost: x\r\nConnection: "
                b"close\r\n\r\n" % self.originPort
            )
            return collector.done

        return d.addCallback(connected)

    @inlineCallbacks
    def test_clientCertificateRole(self):  # type: ignore[no-untyped-def]
        """
        A client with a certificate from the client CA is served, and its
        CN is logged as the role with its OU.
        """
        import json

        data = yield self.request(self.good)
        self.assertIn(b"200 OK", data)
        self.assertIn(b"/who ", data)
        self.flushAccessLog()
        line = json.loads(self.accessLog.getContent().splitlines()[-1])
        self.assertEqual(
            (line["role"], line["client_cn"], line["client_ou"]),
            ("billing", "billing", "payments"),
        )

    @inlineCallbacks
    def test_noCertificate(self):  # type: ignore[no-untyped-def]
        """
        A client without a certificate gets no answer: the handshake fails.
        """
        try:
            data = yield self.request(None)
        except Exception:
            data = b""
        self.assertNotIn(b"HTTP/1.1", data)

    @inlineCallbacks
    def test_revokedRefused(self):  # type: ignore[no-untyped-def]
        """
        A client whose certificate the CRL revokes is refused.
        """
        try:
            data = yield self.request(self.revoked)
        except Exception:
            data = b""
        self.assertNotIn(b"HTTP/1.1", data)
        self.flushAccessLog()
        self.assertFalse(self.accessLog.exists() and self.accessLog.getContent())


class OptionalClientCertificateTests(ListenerTests):
    """
    A TLS listener that asks for client certificates but does not require
    them: clients without one are served anonymously, those with one get
    their role, and revoked ones are still refused.
    """

    clientCertMode = "optional"

    @inlineCallbacks
    def test_noCertificate(self):  # type: ignore[no-untyped-def]
        """
        Without a certificate the client is served, with no role.
        """
        import json

        data = yield self.request(None)
        self.assertIn(b"200 OK", data)
        self.flushAccessLog()
        line = json.loads(self.accessLog.getContent().splitlines()[-1])
        self.assertNotIn("role", line)
