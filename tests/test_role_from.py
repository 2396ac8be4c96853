"""
Roles from more of the client certificate: a TLS listener's C{role_from}
(C{cn}, C{ou}, C{uri-san}) and C{role_from_prefix}.
"""

from __future__ import annotations

import json
from typing import Any

from OpenSSL import crypto
from twisted.internet import reactor, ssl
from twisted.internet.defer import inlineCallbacks
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from proxy_app import config
from proxy_app.tap import Options, makeService
from proxy_app.tls import CertificateRole

from .certs import Authority
from .test_tls import WhoAmI

SPIFFE = "spiffe://example.org/ns/prod/sa/billing"


def x509(pem: bytes) -> crypto.X509:
    return crypto.load_certificate(crypto.FILETYPE_PEM, pem)


class CertificateRoleTests(SynchronousTestCase):
    """
    L{CertificateRole}: which part of a verified certificate is the role.
    """

    def setUp(self) -> None:
        self.ca = Authority("client CA")

    def role(self, source: str, prefix: str | None = None, **issue: Any) -> Any:
        cert = x509(self.ca.issue(issue.pop("cn", "the-cn"), client=True, **issue)[0])
        return CertificateRole(source, prefix)(cert)

    def test_cn(self) -> None:
        """
        The default, C{cn}, is the subject's CN, as Smokescreen does.
        """
        self.assertEqual(self.role("cn", uris=(SPIFFE,)), "the-cn")

    def test_ou(self) -> None:
        """
        C{ou} is the subject's one OU; none, or two, give no role.
        """
        self.assertEqual(self.role("ou", organizationalUnit="payments"), "payments")
        self.assertIsNone(self.role("ou"))
        self.assertIsNone(self.role("ou", organizationalUnit=("payments", "admin")))

    def test_uriSANWhole(self) -> None:
        """
        C{uri-san} without a prefix is the certificate's SPIFFE ID, whole.
        """
        self.assertEqual(self.role("uri-san", uris=(SPIFFE,)), SPIFFE)

    def test_uriSANPrefix(self) -> None:
        """
        With a prefix, the role is what follows it.
        """
        self.assertEqual(
            self.role("uri-san", "spiffe://example.org/ns/prod/sa/", uris=(SPIFFE,)),
            "billing",
        )

    def test_uriSANRefused(self) -> None:
        """
        No role for: no URI SAN (the CN is not a fallback), a URI that is not
        a SPIFFE ID, two URIs, a URI outside the prefix (another trust
        domain whose name merely starts the same), or nothing after it.
        """
        prefix = "spiffe://example.org/"
        self.assertIsNone(self.role("uri-san", cn="billing"))
        self.assertIsNone(self.role("uri-san", uris=("https://example.org/billing",)))
        self.assertIsNone(self.role("uri-san", uris=(SPIFFE, SPIFFE + "2")))
        self.assertIsNone(
            self.role("uri-san", prefix, uris=("spiffe://example.org.evil/ns/x",))
        )
        self.assertIsNone(self.role("uri-san", prefix, uris=(prefix,)))


class ConfigTests(SynchronousTestCase):
    """
    C{role_from} and C{role_from_prefix} in a TLS listener's description.
    """

    base = "mtls:9443:cert=c.pem:key=k.pem:client_ca=ca.pem"

    def test_parsed(self) -> None:
        """
        Both keys reach the L{config.TLSListener}, the prefix's colon
        escaped as in any endpoint description; the default is C{cn}.
        """
        listener = config.parseEndpoint(
            self.base + ":role_from=uri-san:role_from_prefix=spiffe\\://example.org/ns/"
        )
        self.assertEqual(
            (listener.roleFrom, listener.roleFromPrefix),
            ("uri-san", "spiffe://example.org/ns/"),
        )
        self.assertEqual(config.parseEndpoint(self.base).roleFrom, "cn")
        mapping = config.parseEndpoint(
            {"port": 1, "cert": "c", "key": "k", "client_ca": "a", "role_from": "ou"}
        )
        self.assertEqual(mapping.roleFrom, "ou")

    def test_mistakes(self) -> None:
        """
        An unknown source, a source without client certificates, a prefix
        without C{uri-san}, and a prefix that does not end in C{/} (which
        would let C{spiffe://example.org.evil} match C{spiffe://example.org})
        are refused, each saying what to write.
        """
        for description, expected in [
            (self.base + ":role_from=san", "expected one of cn, ou, uri-san"),
            ("mtls:1:cert=c:key=k:role_from=ou", "needs client_ca"),
            (
                self.base + ":role_from_prefix=spiffe\\://example.org/",
                "needs role_from=uri-san",
            ),
            (
                self.base
                + ":role_from=uri-san:role_from_prefix=spiffe\\://example.org",
                "ending in '/'",
            ),
        ]:
            with self.assertRaises(ValueError) as raised:
                config.parseEndpoint(description)
            self.assertIn(expected, str(raised.exception), description)


ACL = """\
version: v1
services:
  - name: billing
    action: enforce
    allowed_domains: ["127.0.0.2"]
"""


class SpiffeListenerTests(TestCase):
    """
    A real mtls listener on loopback with C{role_from=uri-san} and a
    prefix, and an ACL that knows the role C{billing}.
    """

    def setUp(self) -> None:
        self.dir = FilePath(self.mktemp())
        self.dir.makedirs()
        self.serverCA = Authority("server CA")
        self.clientCA = Authority("client CA")
        cert, key, _ = self.serverCA.issue("proxy.test", ("proxy.test", "127.0.0.1"))
        self.write("server.pem", cert)
        self.write("server.key", key)
        self.write("clients.pem", self.clientCA.pem)
        self.write("acl.yaml", ACL.encode())
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
                f"mtls:{self.port}:interface=127.0.0.1"
                f":cert={self.dir.child('server.pem').path}"
                f":key={self.dir.child('server.key').path}"
                f":client_ca={self.dir.child('clients.pem').path}"
                ":role_from=uri-san:role_from_prefix=spiffe\\://example.org/ns/prod/sa/",
                "--acl",
                self.dir.child("acl.yaml").path,
                "--allow-range",
                "127.0.0.2/32",
                "--access-log",
                self.accessLog.path,
                "--access-log-format",
                "json",
                "--metrics",
                "none",
            ]
        )
        service = self.service = makeService(options)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)

    def write(self, name: str, data: bytes) -> None:
        self.dir.child(name).setContent(data)

    def request(self, client: tuple[bytes, bytes, int]) -> Any:
        from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol

        from .test_integration import _Collect

        options = ssl.optionsForClientTLS(
            "proxy.test",
            trustRoot=ssl.Certificate.loadPEM(self.serverCA.pem),
            clientCertificate=ssl.PrivateCertificate.loadPEM(client[0] + client[1]),
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

    def lastLogLine(self) -> dict[str, Any]:
        from proxy_app.tap import ProxyService

        for child in self.service:
            if isinstance(child, ProxyService):
                child.factory.accessLog.flush()
        return json.loads(self.accessLog.getContent().splitlines()[-1])  # type: ignore[no-any-return]

    @inlineCallbacks
    def test_spiffeRole(self):  # type: ignore[no-untyped-def]
        """
        A certificate whose SPIFFE ID is under the prefix gets the rest as
        its role (its CN, another name, plays no part) and the ACL lets it
        through.
        """
        data = yield self.request(
            self.clientCA.issue("mallory", client=True, uris=(SPIFFE,))
        )
        self.assertIn(b"200 OK", data)
        line = self.lastLogLine()
        self.assertEqual((line["role"], line["client_cn"]), ("billing", "mallory"))

    @inlineCallbacks
    def test_noURINoRole(self):  # type: ignore[no-untyped-def]
        """
        A certificate with no URI SAN gets no role, even with the CN
        C{billing}: the ACL denies it for want of one (403, 1011).
        """
        data = yield self.request(self.clientCA.issue("billing", client=True))
        self.assertIn(b"403 ", data)
        self.assertIn(b"X-WhSentry-ReasonCode: 1011", data)
        self.assertIn(b"Client role cannot be determined", data)

    @inlineCallbacks
    def test_otherTrustDomain(self):  # type: ignore[no-untyped-def]
        """
        A SPIFFE ID from a trust domain whose name only starts like the
        prefix's gets no role.
        """
        data = yield self.request(
            self.clientCA.issue(
                "billing",
                client=True,
                uris=("spiffe://example.org.evil/ns/prod/sa/billing",),
            )
        )
        self.assertIn(b"Client role cannot be determined", data)
