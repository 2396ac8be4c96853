"""
TLS interception of CONNECT tunnels (L{proxy_app.mitm}): certificate
issuance and its cache, which tunnels are intercepted, the checks on the
requests inside, the configuration, and real clients through plain and TLS
listeners on loopback against an in-process TLS origin.
"""

from __future__ import annotations

import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    SSL4ClientEndpoint,
    TCP4ClientEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from proxy_app.access import AccessControl
from proxy_app.acl import ACL, ACLError, MitmDomain
from proxy_app.config import TLS, Config, ConfigError, Mitm, load
from proxy_app.http1 import RequestHead
from proxy_app.mitm import (
    GLOBAL,
    InterceptedSession,
    Interception,
    IssuingCA,
    notValidAfter,
)
from proxy_app.reasons import ProxyError, Reason
from proxy_app.tap import (
    Options,
    ProxyService,
    buildOrigination,
    checkInterception,
    makeService,
)
from proxy_app.target import Target

from .certs import Authority
from .helpers import makeHarness, parseResponse


def _notValidBefore(certificate: x509.Certificate) -> float:
    """
    notBefore in seconds, on cryptography 41 (naive, UTC) and 42+.
    """
    aware = getattr(certificate, "not_valid_before_utc", None)
    if aware is None:
        aware = certificate.not_valid_before.replace(tzinfo=datetime.timezone.utc)
    return float(aware.timestamp())


_NOW = datetime.datetime.now(datetime.timezone.utc)


def _rsaAuthority() -> tuple[Any, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(_NOW - datetime.timedelta(days=1))
        .not_valid_after(_NOW + datetime.timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _clockNow() -> Clock:
    clock = Clock()
    clock.advance(_NOW.timestamp())
    return clock


class IssuingCATests(SynchronousTestCase):
    """
    Leaf certificates issued on the fly, and their bounded cache.
    """

    def setUp(self) -> None:
        self.ca = Authority("mitm CA")
        self.clock = _clockNow()

    def authority(self, **kwargs: Any) -> IssuingCA:
        return IssuingCA(self.ca.cert, self.ca.key, self.clock, **kwargs)

    def test_leafForName(self) -> None:
        """
        A leaf for a DNS name has that name as its only subjectAltName, is
        no CA, has an ECDSA P-256 key, is signed by the CA, and is valid
        from 5 minutes before the clock's now for the lifetime.
        """
        leaf, end = self.authority(lifetime=3600).issue("api.example.com")
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(
            san.value.get_values_for_type(x509.DNSName), ["api.example.com"]
        )
        self.assertFalse(
            leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        )
        key = leaf.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        self.assertEqual(key.curve.name, "secp256r1")
        self.assertEqual(leaf.issuer, self.ca.cert.subject)
        leaf.verify_directly_issued_by(self.ca.cert)
        now = self.clock.seconds()
        self.assertEqual(_notValidBefore(leaf), int(now - 300))
        self.assertEqual(notValidAfter(leaf), int(now + 3600))
        self.assertEqual(end, now + 3600)

    def test_leafForAddress(self) -> None:
        """
        A leaf for an IP literal names it as an IP address.
        """
        leaf, _ = self.authority().issue("2001:db8::1")
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(
            [str(a) for a in san.value.get_values_for_type(x509.IPAddress)],
            ["2001:db8::1"],
        )
        self.assertEqual(san.value.get_values_for_type(x509.DNSName), [])

    def test_rsaCA(self) -> None:
        """
        An RSA CA signs ECDSA leaves.
        """
        cert, key = _rsaAuthority()
        leaf, _ = IssuingCA(cert, key, self.clock).issue("a.example")
        leaf.verify_directly_issued_by(cert)

    def test_notBeyondCA(self) -> None:
        """
        No leaf outlives its CA.
        """
        leaf, _ = self.authority(lifetime=365 * 86400).issue("a.example")
        self.assertEqual(notValidAfter(leaf), notValidAfter(self.ca.cert))

    def test_cachedPerName(self) -> None:
        """
        One leaf per host, reused: a second tunnel to a host issues
        nothing.
        """
        authority = self.authority()
        first = authority.tlsFactory("a.example")
        self.assertIs(authority.tlsFactory("a.example"), first)
        self.assertIsNot(authority.tlsFactory("b.example"), first)
        self.assertEqual(authority.issued, 2)

    def test_bounded(self) -> None:
        """
        The cache holds C{cacheSize} leaves, the least recently used
        dropped first.
        """
        authority = self.authority(cacheSize=2)
        authority.tlsFactory("a.example")
        authority.tlsFactory("b.example")
        authority.tlsFactory("a.example")
        authority.tlsFactory("c.example")
        self.assertEqual(authority.cached(), ["a.example", "c.example"])
        authority.tlsFactory("b.example")
        self.assertEqual(authority.issued, 4)

    def test_reissuedNearExpiry(self) -> None:
        """
        A leaf with less than a quarter of its lifetime left is issued
        anew; before that, it is reused.
        """
        authority = self.authority(lifetime=4000)
        first = authority.tlsFactory("a.example")
        self.clock.advance(2999)
        self.assertIs(authority.tlsFactory("a.example"), first)
        self.clock.advance(2)
        self.assertIsNot(authority.tlsFactory("a.example"), first)
        self.assertEqual(authority.issued, 2)

    def test_reprHidesKey(self) -> None:
        """
        The CA's repr names its subject, never its key.
        """
        text = repr(self.authority())
        self.assertIn("mitm CA", text)
        self.assertNotIn("PRIVATE", text)


class LoadTests(SynchronousTestCase):
    """
    L{IssuingCA.load}: each problem with the CA files is one line naming
    the key and the file, never the key's contents.
    """

    def setUp(self) -> None:
        self.dir = FilePath(self.mktemp())
        self.dir.makedirs()
        self.ca = Authority("mitm CA")
        self.keyPEM = self.ca.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, name: str, data: bytes) -> str:
        self.dir.child(name).setContent(data)
        return self.dir.child(name).path

    def assertRefused(self, cert: str, key: str, *parts: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            Options(environ={}).parseOptions(
                ["--mitm-ca-cert", cert, "--mitm-ca-key", key, "--metrics", "none"]
            )
            from proxy_app.tap import buildInterception

            buildInterception(Config(mitm=Mitm(ca_cert=cert, ca_key=key)), _clockNow())
        message = str(caught.exception)
        for part in parts:
            self.assertIn(part, message)
        self.assertNotIn("PRIVATE KEY", message)
        self.assertNotIn(self.keyPEM.decode().splitlines()[1], message)

    def test_loads(self) -> None:
        """
        A CA certificate and its key load.
        """
        authority = IssuingCA.load(
            self.write("ca.pem", self.ca.pem),
            self.write("ca.key", self.keyPEM),
            _clockNow(),
        )
        self.assertEqual(authority.certificate, self.ca.cert)

    def test_notCA(self) -> None:
        """
        A certificate without basicConstraints CA:TRUE is refused.
        """
        cert, key, _ = self.ca.issue("leaf.example", ("leaf.example",))
        path = self.write("leaf.pem", cert)
        self.assertRefused(
            path, self.write("leaf.key", key), "mitm.ca_cert", path, "not a CA"
        )

    def test_mismatchedKey(self) -> None:
        """
        A key that is not the certificate's is refused.
        """
        other = Authority("other")
        key = other.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path = self.write("other.key", key)
        self.assertRefused(
            self.write("ca.pem", self.ca.pem),
            path,
            "mitm.ca_key",
            path,
            "does not match",
        )

    def test_encryptedKey(self) -> None:
        """
        An encrypted key is refused with the advice to decrypt it.
        """
        key = self.ca.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        path = self.write("enc.key", key)
        self.assertRefused(
            self.write("ca.pem", self.ca.pem), path, "mitm.ca_key", path, "encrypted"
        )

    def test_unreadable(self) -> None:
        """
        A missing file is named.
        """
        path = self.dir.child("missing.pem").path
        self.assertRefused(
            path, self.write("ca.key", self.keyPEM), "mitm.ca_cert", path, "cannot read"
        )

    def test_garbageKey(self) -> None:
        """
        A file that is no key is refused without quoting it.
        """
        path = self.write("bad.key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n")
        self.assertRefused(
            self.write("ca.pem", self.ca.pem), path, "mitm.ca_key", "not a PEM"
        )


class ConfigurationTests(SynchronousTestCase):
    """
    The C{mitm} section and the ACL's C{mitm_domains} need each other's
    parts.
    """

    def test_flagsAndEnvironment(self) -> None:
        """
        Every key has its flag and environment variable.
        """
        options = Options(environ={"EGRESSPROXY_MITM_CA_CERT": "/ca.pem"})
        options.parseOptions(
            [
                "--mitm-ca-key",
                "/ca.key",
                "--mitm-domain",
                "api.example.com",
                "--mitm-domain",
                "*.example.net",
                "--mitm-all",
                "--metrics",
                "none",
            ]
        )
        mitm = options.config.mitm
        self.assertEqual(
            (mitm.ca_cert, mitm.ca_key, mitm.domains, mitm.all),
            ("/ca.pem", "/ca.key", ("api.example.com", "*.example.net"), True),
        )

    def test_badDomain(self) -> None:
        """
        A domain is written as the ACL's entries are.
        """
        with self.assertRaises(ConfigError) as caught:
            load({"mitm-domain": ["*example.com"]}, {}, None)
        self.assertTrue(str(caught.exception).startswith("--mitm-domain"))
        self.assertIn("*.example.com", str(caught.exception))

    def test_certWithoutKey(self) -> None:
        """
        C{mitm.ca_cert} without C{mitm.ca_key} stops start-up.
        """
        with self.assertRaises(ConfigError) as caught:
            checkInterception(Config(mitm=Mitm(ca_cert="/ca.pem")), False)
        self.assertEqual(
            str(caught.exception),
            "mitm.ca_cert = '/ca.pem': mitm.ca_key must be given with it",
        )

    def test_domainsWithoutCA(self) -> None:
        """
        C{mitm.domains}, C{mitm.all} and the ACL's C{mitm_domains} each
        need the CA.
        """
        for config, aclIntercepts, key in [
            (Config(mitm=Mitm(domains=("a.example",))), False, "mitm.domains"),
            (Config(mitm=Mitm(all=True)), False, "mitm.all"),
            (Config(), True, "acl.file"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                checkInterception(config, aclIntercepts)
            self.assertTrue(str(caught.exception).startswith(key), caught.exception)
            self.assertIn("needs mitm.ca_cert", str(caught.exception))


MITM_ACL = """\
version: v1
services:
  - name: billing
    action: enforce
    allowed_domains: [api.example.com, "*.example.net", plain.example]
    mitm_domains:
      - domain: api.example.com
        add_headers: {Accept-Language: el}
        detailed_http_logs: true
        detailed_http_logs_full_headers: [User-Agent]
      - domain: "*.example.net"
default:
  action: open
  allowed_domains: [api.example.com]
  mitm_domains:
    - domain: api.example.com
"""


class ACLTests(SynchronousTestCase):
    """
    Smokescreen's C{mitm_domains}, per service and in the default rule.
    """

    def test_perRole(self) -> None:
        """
        A role's entry applies to its own hosts only; other roles fall to
        the default rule's.
        """
        acl = ACL.fromYAML(MITM_ACL)
        self.assertTrue(acl.intercepts)
        entry = acl.mitmFor("billing", "api.example.com")
        assert entry is not None
        self.assertEqual(entry.addHeaders, (("Accept-Language", "el"),))
        self.assertTrue(entry.detailedLogs)
        self.assertEqual(entry.fullHeaders, frozenset({"user-agent"}))
        self.assertEqual(
            acl.mitmFor("billing", "x.example.net"), MitmDomain("*.example.net")
        )
        self.assertIsNone(acl.mitmFor("billing", "plain.example"))
        self.assertEqual(
            acl.mitmFor("other", "api.example.com"), MitmDomain("api.example.com")
        )
        self.assertIsNone(acl.mitmFor("other", "x.example.net"))
        self.assertIsNone(acl.mitmFor(None, "api.example.com"))
        self.assertIsNotNone(
            acl.mitmFor(None, "api.example.com", allowMissingRole=True)
        )

    def test_mustBeAllowed(self) -> None:
        """
        As in Smokescreen, an entry missing from C{allowed_domains} is an
        error.
        """
        with self.assertRaises(ACLError) as caught:
            ACL.fromYAML(
                MITM_ACL.replace("plain.example]", "]").replace(
                    '"*.example.net", ]', "]"
                )
            )
        self.assertIn("missing in allowed_domains", str(caught.exception))

    def test_unknownKey(self) -> None:
        """
        An unknown key in an entry is an error.
        """
        with self.assertRaises(ACLError) as caught:
            ACL.fromYAML(MITM_ACL.replace("detailed_http_logs: true", "detailed: true"))
        self.assertIn("unknown key 'detailed'", str(caught.exception))

    def test_headerInjection(self) -> None:
        """
        An C{add_headers} value with a line break is refused.
        """
        with self.assertRaises(ACLError) as caught:
            ACL.fromYAML(
                MITM_ACL.replace("{Accept-Language: el}", '{X: "a\\r\\nB: c"}')
            )
        self.assertIn("add_headers", str(caught.exception))

    def test_reloadNeedsCA(self) -> None:
        """
        A reload does not take an ACL with C{mitm_domains} when no CA is
        configured, and carries them when one is.
        """
        path = FilePath(self.mktemp())
        path.setContent(b"version: v1\nservices: []\n")
        access = AccessControl.fromConfig(
            Config().acl.__class__(file=path.path), Config().auth, None
        )
        path.setContent(MITM_ACL.encode())
        self.assertFalse(access.reload())
        assert access.acl is not None
        self.assertFalse(access.acl.intercepts)
        access.intercepting = True
        self.assertTrue(access.reload())
        self.assertTrue(access.acl.intercepts)


def _request(
    target: bytes, *headers: tuple[bytes, bytes], method: bytes = b"GET"
) -> RequestHead:
    request = RequestHead()
    request.method = method
    request.target = target
    request.raw = list(headers)
    request.headers = [(n.lower(), v) for n, v in headers]
    return request


class _Exchange:
    def __init__(self, target: Target) -> None:
        self.target = target


class InnerTargetTests(SynchronousTestCase):
    """
    Where a request inside an intercepted tunnel goes, and which are
    refused.
    """

    def target(self, request: RequestHead, connect: Target | None = None) -> Target:
        session = InterceptedSession.__new__(InterceptedSession)
        session.exchange = _Exchange(connect or Target("api.example.com", 443))
        return session.target(request)

    def assertRefused(
        self, request: RequestHead, text: str, reason: Reason = Reason.BAD_TARGET
    ) -> None:
        with self.assertRaises(ProxyError) as caught:
            self.target(request)
        self.assertEqual(caught.exception.reason, reason)
        self.assertIn(text, caught.exception.message)

    def test_originForm(self) -> None:
        """
        An origin-form request goes to https:// on the CONNECT authority.
        """
        target = self.target(_request(b"/v1/x?q=1", (b"Host", b"api.example.com")))
        self.assertEqual(
            target, Target("api.example.com", 443, "https", b"/v1/x?q=1", False)
        )
        target = self.target(
            _request(b"/", (b"Host", b"API.example.com:8443")),
            Target("api.example.com", 8443),
        )
        self.assertEqual(target.port, 8443)
        self.assertEqual(target.hostHeader, b"api.example.com:8443")

    def test_absoluteForm(self) -> None:
        """
        An absolute-form target on the same authority is taken.
        """
        target = self.target(
            _request(b"https://api.example.com/a", (b"Host", b"api.example.com"))
        )
        self.assertEqual(target.path, b"/a")

    def test_otherHost(self) -> None:
        """
        A Host or target naming another authority (virtual-host confusion)
        is refused.
        """
        self.assertRefused(
            _request(b"/", (b"Host", b"evil.example")), "Host evil.example:443"
        )
        self.assertRefused(
            _request(b"/", (b"Host", b"api.example.com:444")), "does not match"
        )
        self.assertRefused(
            _request(b"https://evil.example/", (b"Host", b"api.example.com")),
            "names https://evil.example:443",
        )
        self.assertRefused(
            _request(b"http://api.example.com/", (b"Host", b"api.example.com")),
            "names http://",
        )
        self.assertRefused(
            _request(b"/", (b"Host", b"api.example.com"), (b"Host", b"evil.example")),
            "More than one Host",
        )
        self.assertRefused(_request(b"/"), "needs a Host")
        self.assertRefused(_request(b"*", (b"Host", b"api.example.com")), "asterisk")

    def test_connectInside(self) -> None:
        """
        A CONNECT inside the tunnel is refused.
        """
        self.assertRefused(
            _request(b"api.example.com:443", method=b"CONNECT"),
            "CONNECT inside",
            Reason.BAD_REQUEST,
        )

    def test_addHeaders(self) -> None:
        """
        C{add_headers} replace the request's headers of the same name.
        """
        session = InterceptedSession.__new__(InterceptedSession)
        session.mitm = MitmDomain("a", (("Accept-Language", "el"),))
        request = _request(
            b"/", (b"Host", b"a"), (b"accept-language", b"en"), (b"X-Keep", b"1")
        )
        session.addHeaders(request)
        self.assertEqual(
            request.raw,
            [(b"Host", b"a"), (b"X-Keep", b"1"), (b"Accept-Language", b"el")],
        )
        self.assertEqual(request.headers[-1], (b"accept-language", b"el"))


class SelectionTests(SynchronousTestCase):
    """
    Which tunnels are intercepted: decided once the CONNECT is admitted;
    the others pass through as before.
    """

    def harness(
        self, domains: tuple[str, ...] = ("origin.example",), acl: str = ""
    ) -> Any:
        harness = makeHarness(
            {
                "origin.example": ["203.0.113.10"],
                "other.example": ["203.0.113.11"],
                "api.example.com": ["203.0.113.12"],
            }
        )
        ca = Authority("mitm CA")
        harness.factory.interception = Interception(
            IssuingCA(ca.cert, ca.key, harness.reactor), domains
        )
        if acl:
            harness.factory.access = AccessControl(
                ACL.fromYAML(acl), roleHeader="X-Role", allowMissingRole=False
            )
        return harness

    def test_passthrough(self) -> None:
        """
        A tunnel to a host not selected connects upstream and relays bytes
        untouched, as without interception.
        """
        harness = self.harness()
        harness.send(b"CONNECT other.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(len(harness.reactor.tcpClients), 1)
        _, upstream = harness.connectUpstream()
        self.assertEqual(
            harness.client.value(), b"HTTP/1.1 200 Connection established\r\n\r\n"
        )
        harness.send(b"\x16\x03\x01 not really TLS")
        self.assertEqual(upstream.value(), b"\x16\x03\x01 not really TLS")

    def test_intercepted(self) -> None:
        """
        A tunnel to a selected host connects nowhere at CONNECT time: the
        proxy answers 200 and then answers the client's TLS itself.
        """
        harness = self.harness()
        harness.send(b"CONNECT origin.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(harness.reactor.tcpClients, [])
        self.assertEqual(
            harness.client.value(), b"HTTP/1.1 200 Connection established\r\n\r\n"
        )
        harness.client.clear()
        client = _MemoryTLSClient(harness, "origin.example")
        client.pump()
        self.assertTrue(client.handshakeDone)
        self.assertEqual(harness.reactor.tcpClients, [])

    def intercepted(self) -> tuple[Any, _MemoryTLSClient]:
        harness = self.harness()
        harness.factory.origination = buildOrigination(TLS())
        harness.send(b"CONNECT origin.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        harness.client.clear()
        client = _MemoryTLSClient(harness, "origin.example")
        client.pump()
        return harness, client

    def test_innerRequestToAdmittedAddress(self) -> None:
        """
        A request inside connects to the address the CONNECT was vetted to,
        on the CONNECT's port, as an https:// request: the name is not
        resolved again.
        """
        harness, client = self.intercepted()
        self.assertEqual(harness.resolver.calls, [("origin.example", 443)])
        harness.resolver.answers["origin.example"] = ["203.0.113.99"]
        client.tls.write(
            b"GET /x HTTP/1.1\r\nHost: origin.example\r\nProxy-Authorization: "
            b"Basic eDp5\r\n\r\n"
        )
        client.pump()
        self.assertEqual(harness.resolver.calls, [("origin.example", 443)])
        [(host, port, *_)] = harness.reactor.tcpClients
        self.assertEqual((host, port), ("203.0.113.10", 443))

    def test_http2Only(self) -> None:
        """
        A client offering only ALPN C{h2} gets no HTTP/2: the proxy's TLS
        (whose ALPN offers only C{http/1.1}) fails the handshake with a
        fatal C{internal_error} alert, which is what Twisted's ALPN
        callback makes OpenSSL send when nothing overlaps; the tunnel
        closes, and nothing is connected upstream nor logged as a request
        inside.
        """
        from OpenSSL import SSL
        from twisted.internet.error import ConnectionDone

        harness = self.harness()
        harness.factory.origination = buildOrigination(TLS())
        harness.send(b"CONNECT origin.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        harness.client.clear()
        client = _MemoryTLSClient(harness, "origin.example", alpn=[b"h2"])
        client.harness.reactor.advance(0)
        harness.send(client.wire.value())
        client.wire.clear()
        harness.reactor.advance(0)
        # A TLS 1.2-framed fatal alert: level 2, description 80.
        self.assertEqual(harness.client.value(), bytes.fromhex("15030300020250"))
        self.assertTrue(harness.client.disconnecting)
        client.tls.dataReceived(harness.client.value())
        client.tls.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(client.handshakeDone)
        self.assertIsInstance(client.innerReason.value, SSL.Error)
        self.assertIn("tlsv1 alert internal error", str(client.innerReason.value))
        harness.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(harness.reactor.tcpClients, [])
        self.assertEqual(
            [(line["method"], line["response_code"]) for line in harness.access],
            [("CONNECT", 200)],
        )

    def test_http2OrHTTP11(self) -> None:
        """
        A client offering ALPN C{h2} and C{http/1.1} gets C{http/1.1}.
        """
        harness = self.harness()
        harness.send(b"CONNECT origin.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        harness.client.clear()
        client = _MemoryTLSClient(harness, "origin.example", alpn=[b"h2", b"http/1.1"])
        client.pump()
        self.assertTrue(client.handshakeDone)
        self.assertEqual(client.tls.negotiatedProtocol, b"http/1.1")

    def test_flowControl(self) -> None:
        """
        The channel inside pauses and resumes the client's connection, and
        a producer registered on it (an origin's response) is registered on
        the client's connection.
        """
        harness, client = self.intercepted()
        channel = harness.protocol.tunnel.channel
        self.assertEqual(harness.client.producerState, "producing")
        channel.transport.pauseProducing()
        self.assertEqual(harness.client.producerState, "paused")
        channel.transport.resumeProducing()
        self.assertEqual(harness.client.producerState, "producing")
        producer = _Producer()
        channel.transport.registerProducer(producer, True)
        self.assertIsNotNone(harness.client.producer)
        harness.client.producer.pauseProducing()
        self.assertEqual(producer.paused, 1)
        channel.transport.unregisterProducer()
        self.assertIsNone(harness.client.producer)

    def test_pipelinedClientHello(self) -> None:
        """
        A ClientHello sent with the CONNECT, before its answer, is taken
        as the start of the TLS inside.
        """
        harness = self.harness()
        client = _MemoryTLSClient(harness, "origin.example")
        hello = client.wire.value()
        client.wire.clear()
        harness.send(b"CONNECT origin.example:443 HTTP/1.1\r\nHost: x\r\n\r\n" + hello)
        status = b"HTTP/1.1 200 Connection established\r\n\r\n"
        self.assertTrue(harness.client.value().startswith(status))
        serverHello = harness.client.value()[len(status) :]
        self.assertTrue(serverHello)
        harness.client.clear()
        client.tls.dataReceived(serverHello)
        client.pump()
        self.assertTrue(client.handshakeDone)

    def test_issuanceFails(self) -> None:
        """
        Should the leaf not be issued, the CONNECT is answered 500 (1009),
        not with a tunnel.
        """
        harness = self.harness()

        def broken(host: str) -> Any:
            raise ValueError("no")

        harness.factory.interception.authority.tlsFactory = broken
        harness.send(b"CONNECT origin.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = parseResponse(harness.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (500, b"1009"))
        self.flushLoggedErrors(ValueError)

    def test_lifetime(self) -> None:
        """
        An intercepted tunnel ends at C{timeouts.lifetime} (within the
        tunnel watch's interval after), busy or not.
        """
        harness, client = self.intercepted()
        lifetime = harness.factory.config.timeouts.lifetime
        harness.reactor.pump([0.25] * int((lifetime - 0.25) * 4))
        self.assertFalse(harness.client.disconnecting)
        harness.reactor.pump([0.25] * int(harness.factory.tunnelWatch.interval * 4 + 1))
        self.assertTrue(harness.client.disconnecting)

    def test_clientGoneEndsInside(self) -> None:
        """
        When the client's connection closes, the channel inside closes
        too, and the tunnel's record lists what it carried.
        """
        harness, client = self.intercepted()
        channel = harness.protocol.tunnel.channel
        self.assertIn(channel, harness.factory.connections)
        harness.protocol.connectionLost(Failure(ConnectionError("gone")))
        self.assertNotIn(channel, harness.factory.connections)
        [line] = harness.access
        self.assertEqual((line["method"], line["response_code"]), ("CONNECT", 200))

    def test_perRole(self) -> None:
        """
        The ACL's C{mitm_domains} apply to their role only.
        """
        acl = MITM_ACL.replace("  mitm_domains:\n    - domain: api.example.com\n", "")
        for role, expected in [(b"billing", 0), (b"nobody", 1)]:
            harness = self.harness(domains=(), acl=acl)
            harness.send(
                b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: x\r\nX-Role: "
                + role
                + b"\r\n\r\n"
            )
            self.assertEqual(len(harness.reactor.tcpClients), expected, role)

    def test_globalEntry(self) -> None:
        """
        C{mitm.domains} and C{mitm.all} select with no headers added.
        """
        ca = Authority("x")
        access = AccessControl()
        self.assertIs(
            Interception(IssuingCA(ca.cert, ca.key, Clock()), ("*.example",)).select(
                access, None, "a.example"
            ),
            GLOBAL,
        )
        self.assertIsNone(
            Interception(IssuingCA(ca.cert, ca.key, Clock())).select(
                access, None, "a.b"
            )
        )
        self.assertIs(
            Interception(IssuingCA(ca.cert, ca.key, Clock()), (), True).select(
                access, None, "a.b"
            ),
            GLOBAL,
        )


A, B, C = "203.0.113.10", "203.0.113.11", "203.0.113.12"
URL = "http://127.0.0.1:5000/webhook/SECRET"


class _MemoryOrigin:
    """
    A TLS origin in memory for a proxy's upstream connection (from
    L{Harness.connectUpstream}): it answers every request C{200 ok}.
    """

    def __init__(self, harness: Any, authority: Authority, host: str) -> None:
        from twisted.internet.testing import StringTransport

        certPEM, keyPEM, _ = authority.issue(host, (host,))
        private = ssl.PrivateCertificate.loadPEM(certPEM + keyPEM)
        factory = TLSMemoryBIOFactory(
            private.options(), False, Factory(), clock=harness.reactor
        )
        self.requests: list[bytes] = []
        self.harness = harness
        self.tls = factory.protocol(factory, _Answering(self))
        self.wire = StringTransport()
        self.tls.makeConnection(self.wire)
        self.upstream, self.transport = harness.connectUpstream()

    def pump(self) -> bool:
        """
        Move what each side wrote to the other; whether anything moved.
        """
        out = self.transport.value()
        self.transport.clear()
        if out:
            self.tls.dataReceived(out)
        # The server's writes wait for the clock's next turn.
        self.harness.reactor.advance(0)
        back = self.wire.value()
        self.wire.clear()
        if back:
            self.upstream.dataReceived(back)
        return bool(out or back)


class _Answering(Protocol):
    def __init__(self, origin: _MemoryOrigin) -> None:
        self.origin = origin
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self.origin.requests.append(head)
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


class OneSessionTests(TestCase):
    """
    An intercepted tunnel is one control-webhook session, as in
    smithproxy: one access request (at CONNECT), one C{connection-start}
    and one C{connection-stop} listing the URLs inside; the requests
    inside go only to the addresses that access request approved, and
    send no events of their own.
    """

    def setUp(self) -> None:
        from treq.testing import StubTreq

        from proxy_app.config import Gate
        from proxy_app.webhook import WebhookService

        from .test_webhook import ControlServer

        self.server = ControlServer("never")
        self.stub = StubTreq(self.server)
        self.harness = harness = makeHarness({"origin.example": [A, B]})
        self.originCA = Authority("origin CA")
        path = self.mktemp()
        FilePath(path).setContent(self.originCA.pem)
        harness.factory.origination = buildOrigination(TLS(extra_ca=(path,)))
        ca = Authority("mitm CA")
        harness.factory.interception = Interception(
            IssuingCA(ca.cert, ca.key, harness.reactor), ("origin.example",)
        )
        harness.factory.webhook = WebhookService(
            URL,
            clock=harness.reactor,
            treqClient=self.stub,
            hostid="proxy-1",
            accessRequest=Gate(enabled=True, timeout=30),
        )
        self.sent = self.received = 0

    def messages(self, action: str) -> list[dict[str, Any]]:
        self.stub.flush()
        return [r.json for r in self.server.requests if r.json["action"] == action]

    def send(self, data: bytes) -> None:
        self.sent += len(data)
        self.harness.send(data)

    @inlineCallbacks
    def connect(self, approve: bytes) -> Any:
        """
        CONNECT to origin.example, answer the access request with
        C{approve}, and make the TLS handshake inside.
        """
        harness = self.harness
        self.send(b"CONNECT origin.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.stub.flush()
        [pending] = self.server.pending()
        pending.answer(200, approve)
        self.stub.flush()
        self.received += len(harness.client.value())
        harness.client.clear()
        client = _MemoryTLSClient(harness, "origin.example")
        yield self.pump(client)
        self.assertTrue(client.handshakeDone)
        return client

    @inlineCallbacks
    def pump(self, client: _MemoryTLSClient, origin: Any = None) -> Any:
        """
        Move bytes between the client, the proxy and the origin until none
        move.  The proxy's upstream TLS (C{wrapClientTLS}) writes on the
        global reactor's next turn, so each round waits for one.
        """
        harness = self.harness
        for _ in range(50):
            yield deferLater(reactor, 0, lambda: None)
            harness.reactor.advance(0)
            out = client.wire.value()
            client.wire.clear()
            if out:
                self.send(out)
            back = harness.client.value()
            harness.client.clear()
            if back:
                self.received += len(back)
                client.tls.dataReceived(back)
            moved = origin.pump() if origin is not None else False
            if not (out or back or moved):
                return

    @inlineCallbacks
    def test_onlyApprovedAddress(self):  # type: ignore[no-untyped-def]
        """
        The gate approves A of A and B; the name then resolves to C: a
        request inside goes to A, with no second lookup and no second
        access request.
        """
        harness = self.harness
        client = yield self.connect(
            b'{"access-response": "accept", "addresses": ["%s"]}' % A.encode()
        )
        harness.resolver.answers["origin.example"] = [C]
        client.tls.write(b"GET /x HTTP/1.1\r\nHost: origin.example\r\n\r\n")
        yield self.pump(client)
        self.assertEqual(harness.resolver.calls, [("origin.example", 443)])
        self.assertEqual([c[:2] for c in harness.reactor.tcpClients], [(A, 443)])
        self.assertEqual(len(self.messages("access-request")), 1)

    @inlineCallbacks
    def test_oneSession(self):  # type: ignore[no-untyped-def]
        """
        Two requests inside one tunnel: one access request, one
        connection-start and one connection-stop, whose C{l7.details} lists
        both URLs, with C{tls.sni}, C{ssli_} on both legs and the bytes
        that crossed the client's connection; each request still has its
        access-log line.
        """
        harness = self.harness
        client = yield self.connect(b'{"access-response": "accept"}')
        client.tls.write(
            b"GET /a?token=secret HTTP/1.1\r\nHost: origin.example\r\n\r\n"
            b"GET /b HTTP/1.1\r\nHost: origin.example\r\n\r\n"
        )
        yield self.pump(client)
        origin = _MemoryOrigin(harness, self.originCA, "origin.example")
        yield self.pump(client, origin)
        self.assertEqual(len(origin.requests), 2)
        self.assertEqual(client.received.count(b"HTTP/1.1 200 OK"), 2)
        # The client ends its TLS (close_notify each way), then the
        # connection.
        client.tls.loseConnection()
        yield self.pump(client)
        self.assertTrue(harness.client.disconnecting)
        harness.protocol.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(len(self.messages("access-request")), 1)
        [start] = self.messages("connection-start")
        [stop] = self.messages("connection-stop")
        self.assertEqual(stop["id"], start["id"])
        session = f"ssli_127.0.0.1:40000+ssli_{A}:443"
        self.assertEqual(start["details"]["info"]["session"], session)
        info = stop["details"]["info"]
        self.assertEqual(
            info["l7"],
            {
                "app": "http/1.1",
                "details": [
                    "https://origin.example/a?token=…",
                    "https://origin.example/b",
                ],
            },
        )
        self.assertEqual(info["tls"], {"sni": "origin.example"})
        self.assertEqual(info["session"], session)
        self.assertEqual(
            (info["bytes_up"], info["bytes_down"]), (self.sent, self.received)
        )
        self.assertEqual(
            [(line["method"], line["url"]) for line in harness.access],
            [
                ("GET", "https://origin.example/a?token=…"),
                ("GET", "https://origin.example/b"),
                ("CONNECT", "origin.example:443"),
            ],
        )


class _Producer:
    paused = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IHandshakeListener)
class _Inner(Protocol):
    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def connectionMade(self) -> None:
        if self.owner.requests:
            self.transport.write(self.owner.requests)

    def handshakeCompleted(self) -> None:
        self.owner.handshakeDone = True

    def dataReceived(self, data: bytes) -> None:
        self.owner.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.owner.innerReason = reason


class _MemoryTLSClient:
    """
    A TLS client in memory over a harness's client connection, trusting
    nothing (it only checks that a handshake answer comes).
    """

    def __init__(
        self, harness: Any, host: str, alpn: list[bytes] | None = None
    ) -> None:
        from twisted.internet.testing import StringTransport

        self.harness = harness
        self.handshakeDone = False
        self.received = b""
        self.requests = b""
        self.innerReason: Any = None
        # No verification: a probe.
        options = ssl.CertificateOptions(acceptableProtocols=alpn)
        factory = TLSMemoryBIOFactory(options, True, Factory(), clock=harness.reactor)
        self.tls = factory.protocol(factory, _Inner(self))
        self.wire = StringTransport()
        self.tls.makeConnection(self.wire)

    def pump(self) -> None:
        for _ in range(10):
            self.harness.reactor.advance(0)
            out = self.wire.value()
            self.wire.clear()
            if out:
                self.harness.send(out)
            self.harness.reactor.advance(0)
            back = self.harness.client.value()
            self.harness.client.clear()
            if back:
                self.tls.dataReceived(back)
            if not out and not back:
                return


class WhoAmI(Resource):
    """
    Answers with the path, the headers and the CN of the client
    certificate the proxy presented; C{/big} is large.
    """

    isLeaf = True

    def render(self, request: Any) -> bytes:
        self.seen.append(request)
        if request.path == b"/big":
            return b"x" * 100000
        transport = request.channel.transport
        cert = getattr(transport, "getPeerCertificate", lambda: None)()
        cn = cert.get_subject().CN.encode() if cert is not None else b"-"
        headers = b"".join(
            b"%s=%s;" % (k.lower(), v)
            for k, vs in request.requestHeaders.getAllRawHeaders()
            for v in vs
        )
        return b"%s %s %s" % (request.uri, cn, headers)

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []


class TunnelClient(Protocol):
    """
    A client that sends a CONNECT, then speaks TLS inside the tunnel
    (nested over whatever the connection to the proxy is), trusting
    C{trust}, and sends C{requests}.
    """

    def __init__(
        self,
        authority: bytes,
        host: str,
        trust: bytes,
        requests: bytes,
        extra: bytes = b"",
    ) -> None:
        self.authority = authority
        self.host = host
        self.trust = trust
        self.requests = requests
        self.extra = extra
        self.head = b""
        self.status: int | None = None
        self.tls: Any = None
        self.received = b""
        self.handshakeDone = False
        self.innerReason: Any = None
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(
            b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n"
            % (self.authority, self.authority, self.extra)
        )

    def dataReceived(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.dataReceived(data)
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        head, _, rest = self.head.partition(b"\r\n\r\n")
        self.status = int(head.split()[1])
        if self.status != 200:
            self.received = head + b"\r\n\r\n" + rest
            self.transport.loseConnection()
            return
        options = ssl.optionsForClientTLS(
            self.host,
            trustRoot=ssl.Certificate.loadPEM(self.trust),
            acceptableProtocols=[b"http/1.1"],
        )
        factory = TLSMemoryBIOFactory(options, True, Factory())
        self.tls = factory.protocol(factory, _Inner(self))
        self.tls.makeConnection(self.transport)
        if rest:
            self.tls.dataReceived(rest)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.tls is not None:
            self.tls.connectionLost(reason)
        self.done.callback(self)


def _responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """
    Split responses framed by Content-Length.
    """
    out = []
    while data:
        status, headers, rest = parseResponse(data)
        length = int(headers.get(b"content-length", b"0"))
        out.append((status, headers, rest[:length]))
        data = rest[length:]
    return out


class Recorder:
    """
    An observer keeping every ended exchange.
    """

    def __init__(self) -> None:
        self.ended: list[Any] = []
        self.tunnelEnded: Deferred = Deferred()

    def exchangeConnected(self, record: Any, host: str, reused: bool) -> None:
        pass

    def tunnelEstablished(self, record: Any) -> None:
        pass

    def exchangeEnded(self, record: Any) -> None:
        self.ended.append(record)
        if record.proxyType == "connect" and not self.tunnelEnded.called:
            self.tunnelEnded.callback(record)

    def tunnelClosed(self, record: Any) -> None:
        pass


class LoopbackTests(TestCase):
    """
    Interception end to end on loopback: a TLS origin on 127.0.0.2 with a
    test CA the proxy trusts through C{--extra-ca}, and clients that trust
    the interception CA.
    """

    def setUp(self) -> None:
        from .test_integration import freePort

        self.dir = FilePath(self.mktemp())
        self.dir.makedirs()
        self.originCA = Authority("origin CA")
        self.mitmCA = Authority("mitm CA")
        self.listenerCA = Authority("listener CA")
        self.clientCA = Authority("client CA")
        self.write("origin-ca.pem", self.originCA.pem)
        self.write("mitm-ca.pem", self.mitmCA.pem)
        self.write(
            "mitm-ca.key",
            self.mitmCA.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        cert, key, _ = self.listenerCA.issue("proxy.test", ("proxy.test", "127.0.0.1"))
        self.write("listener.pem", cert)
        self.write("listener.key", key)
        cert, key, _ = self.clientCA.issue("proxy-billing", client=True)
        self.write("billing.pem", cert)
        self.write("billing.key", key)
        self.resource = WhoAmI()
        self.originPort = self.origin(self.originCA)
        self.port = freePort("127.0.0.1")
        self.tlsPort = freePort("127.0.0.1")

    def write(self, name: str, data: bytes) -> str:
        self.dir.child(name).setContent(data)
        return self.dir.child(name).path

    def origin(self, authority: Authority) -> int:
        certPEM, keyPEM, _ = authority.issue("127.0.0.2", ("127.0.0.2",))
        private = ssl.PrivateCertificate.loadPEM(certPEM + keyPEM)
        # Asks for a client certificate without requiring one: the alias
        # tests see which one the proxy presented.
        options = ssl.CertificateOptions(
            privateKey=private.privateKey.original,
            certificate=private.original,
            verify=True,
            caCerts=[ssl.Certificate.loadPEM(self.clientCA.pem).original],
            requireCertificate=False,
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
        port = reactor.listenSSL(0, Site(self.resource), options, interface="127.0.0.2")
        self.addCleanup(port.stopListening)
        return port.getHost().port  # type: ignore[no-any-return]

    def start(self, *extra: str, acl: str | None = None) -> Any:
        args = [
            "--listen",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--listen",
            f"mtls:{self.tlsPort}:interface=127.0.0.1"
            f":cert={self.dir.child('listener.pem').path}"
            f":key={self.dir.child('listener.key').path}",
            "--allow-range",
            "127.0.0.2/32",
            "--extra-ca",
            self.dir.child("origin-ca.pem").path,
            "--mitm-ca-cert",
            self.dir.child("mitm-ca.pem").path,
            "--mitm-ca-key",
            self.dir.child("mitm-ca.key").path,
            "--access-log",
            "none",
            "--metrics",
            "none",
            *extra,
        ]
        if acl is not None:
            args += ["--acl", self.write("acl.yaml", acl.encode())]
        options = Options(environ={})
        options.parseOptions(args)
        service = makeService(options)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        for child in service:
            if isinstance(child, ProxyService):
                factory = child.factory
        self.access: list[dict[str, Any]] = []
        factory.accessLog.addObserver(self.access.append)
        self.recorder = Recorder()
        factory.observers = (*factory.observers, self.recorder)
        self.factory = factory
        self.addCleanup(factory.pool.closeIdle)
        return factory

    def connect(
        self,
        requests: bytes,
        trust: bytes | None = None,
        overTLS: bool = False,
        extra: bytes = b"",
    ) -> Deferred:
        authority = b"127.0.0.2:%d" % self.originPort
        client = TunnelClient(
            authority, "127.0.0.2", trust or self.mitmCA.pem, requests, extra
        )
        if overTLS:
            endpoint: Any = SSL4ClientEndpoint(
                reactor,
                "127.0.0.1",
                self.tlsPort,
                ssl.optionsForClientTLS(
                    "proxy.test", trustRoot=ssl.Certificate.loadPEM(self.listenerCA.pem)
                ),
            )
        else:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        return connectProtocol(endpoint, client).addCallback(lambda _: client.done)

    def get(self, path: bytes, *headers: bytes, close: bool = True) -> bytes:
        host = b"127.0.0.2:%d" % self.originPort
        lines = b"".join(h + b"\r\n" for h in headers)
        return b"GET %s HTTP/1.1\r\nHost: %s\r\n%s%s\r\n" % (
            path,
            host,
            lines,
            b"Connection: close\r\n" if close else b"",
        )

    def tunnelRecord(self) -> Any:
        [record] = [r for r in self.recorder.ended if r.proxyType == "connect"]
        return record

    @inlineCallbacks
    def test_plainListener(self):  # type: ignore[no-untyped-def]
        """
        Through a plain listener, two requests inside one intercepted
        tunnel each reach the origin over verified TLS and come back; each
        has its own access line with the full (redacted) URL; the tunnel's
        record lists them, with the SNI and C{ssli} on both legs.
        """
        self.start("--mitm-domain", "127.0.0.2")
        client = yield self.connect(
            self.get(b"/one?token=secret", close=False) + self.get(b"/two")
        )
        yield self.recorder.tunnelEnded
        self.assertEqual(client.status, 200)
        self.assertTrue(client.handshakeDone)
        [(s1, h1, b1), (s2, h2, b2)] = _responses(client.received)
        self.assertEqual((s1, s2), (200, 200))
        self.assertTrue(b1.startswith(b"/one?token=secret - "), b1)
        self.assertIn(b"host=127.0.0.2:%d;" % self.originPort, b1)
        self.assertTrue(b2.startswith(b"/two - "), b2)
        base = f"https://127.0.0.2:{self.originPort}"
        inner = [line for line in self.access if line["method"] == "GET"]
        self.assertEqual(
            [line["url"] for line in inner], [base + "/one?token=…", base + "/two"]
        )
        self.assertEqual([line["response_code"] for line in inner], [200, 200])
        record = self.tunnelRecord()
        self.assertEqual(record.details, [base + "/one?token=…", base + "/two"])
        self.assertEqual(record.application, "http/1.1")
        self.assertEqual(record.sni, "127.0.0.2")
        from proxy_app.accounting import webhookSession

        session = webhookSession(record, "127.0.0.2")
        self.assertTrue(session.startswith("ssli_127.0.0.1:"), session)
        self.assertIn("+ssli_127.0.0.2:", session)
        self.assertGreater(record.bytesUp, 0)
        self.assertGreater(record.bytesDown, 0)

    @inlineCallbacks
    def test_tlsListener(self):  # type: ignore[no-untyped-def]
        """
        Through a TLS listener, TLS nests inside TLS.
        """
        self.start("--mitm-domain", "127.0.0.2")
        client = yield self.connect(self.get(b"/nested"), overTLS=True)
        [(status, _, body)] = _responses(client.received)
        self.assertEqual(status, 200)
        self.assertTrue(body.startswith(b"/nested - "), body)

    @inlineCallbacks
    def test_untrustedClient(self):  # type: ignore[no-untyped-def]
        """
        A client that does not trust the interception CA fails its
        handshake, and nothing reaches the origin.
        """
        self.start("--mitm-all")
        client = yield self.connect(self.get(b"/secret"), trust=Authority("x").pem)
        yield self.recorder.tunnelEnded
        self.assertEqual(client.status, 200)
        self.assertFalse(client.handshakeDone)
        self.assertEqual(client.received, b"")
        self.assertEqual(self.resource.seen, [])
        self.assertEqual([r.proxyType for r in self.recorder.ended], ["connect"])

    @inlineCallbacks
    def test_badOriginCertificate(self):  # type: ignore[no-untyped-def]
        """
        An origin whose certificate the proxy does not trust is answered
        502 with 1007 inside the tunnel.
        """
        self.originPort = self.origin(Authority("untrusted origin CA"))
        self.start("--mitm-domain", "127.0.0.2")
        client = yield self.connect(self.get(b"/"))
        [(status, headers, body)] = _responses(client.received)
        self.assertEqual(status, 502)
        self.assertEqual(headers[b"x-whsentry-reasoncode"], b"1007")

    @inlineCallbacks
    def test_bodyLimit(self):  # type: ignore[no-untyped-def]
        """
        The response body limit applies inside the tunnel (1008).
        """
        self.start("--mitm-domain", "127.0.0.2", "--max-response-body", "1000")
        client = yield self.connect(self.get(b"/big"))
        [(status, headers, _)] = _responses(client.received)
        self.assertEqual(status, 502)
        self.assertEqual(headers[b"x-whsentry-reasoncode"], b"1008")

    @inlineCallbacks
    def test_hostMismatch(self):  # type: ignore[no-untyped-def]
        """
        A request inside naming another host is refused inside the tunnel
        (400, 1002), nothing reaches the origin, and its access line names
        the tunnel's URL, not a bare path.
        """
        self.start("--mitm-domain", "127.0.0.2")
        client = yield self.connect(
            b"GET /z HTTP/1.1\r\nHost: 127.0.0.3\r\nConnection: close\r\n\r\n"
        )
        [(status, headers, body)] = _responses(client.received)
        self.assertEqual(status, 400)
        self.assertEqual(headers[b"x-whsentry-reasoncode"], b"1002")
        self.assertEqual(self.resource.seen, [])
        [refused] = [line for line in self.access if line["response_code"] == 400]
        self.assertRegex(refused["url"], r"^https://127\.0\.0\.2:[0-9]+/z$")

    @inlineCallbacks
    def test_addHeadersAndAlias(self):  # type: ignore[no-untyped-def]
        """
        The ACL's C{add_headers} reach the origin, and C{detailed_http_logs}
        logs the request with only the listed headers' values; C{X-WhSentry-ClientCert}
        inside presents the alias to a role it lists, and the
        C{X-WhSentry-*} and C{Proxy-*} headers do not reach the origin.
        """
        self.start(
            "--role-header",
            "X-Role",
            "--client-cert-alias",
            "billing={}:{}:billing".format(
                self.dir.child("billing.pem").path, self.dir.child("billing.key").path
            ),
            acl=ACL_LOOPBACK,
        )
        with capturedLogs() as events:
            client = yield self.connect(
                self.get(
                    b"/alias?k=v",
                    b"X-WhSentry-ClientCert: billing",
                    b"Proxy-Authorization: Basic Zm9vOmJhcg==",
                    b"Accept-Language: en",
                ),
                extra=b"X-Role: billing\r\n",
            )
        [detailed] = [e for e in events if "mitm_req_url" in e]
        self.assertEqual(
            (detailed["mitm_req_method"], detailed["mitm_req_url"]),
            ("GET", f"https://127.0.0.2:{self.originPort}/alias?k=…"),
        )
        headers = detailed["mitm_req_headers"]
        self.assertEqual(headers["Accept-Language"], ["el"])
        self.assertEqual(headers["Proxy-Authorization"], ["[REDACTED]"])
        [(status, _, body)] = _responses(client.received)
        self.assertEqual(status, 200, body)
        self.assertIn(b" proxy-billing ", body)
        self.assertIn(b"accept-language=el;", body)
        self.assertNotIn(b"accept-language=en", body)
        self.assertNotIn(b"x-whsentry", body)
        self.assertNotIn(b"proxy-authorization", body)
        self.assertNotIn(b"x-role", body)

    @inlineCallbacks
    def test_aliasNotPermitted(self):  # type: ignore[no-untyped-def]
        """
        The tunnel's role is the CONNECT's: a role not bound to the alias
        gets 403 with 1016 inside, whatever role header it sends inside.
        """
        self.start(
            "--role-header",
            "X-Role",
            "--client-cert-alias",
            "billing={}:{}:billing".format(
                self.dir.child("billing.pem").path, self.dir.child("billing.key").path
            ),
            acl=ACL_LOOPBACK,
        )
        client = yield self.connect(
            self.get(b"/alias", b"X-WhSentry-ClientCert: billing", b"X-Role: billing"),
            extra=b"X-Role: reports\r\n",
        )
        [(status, headers, _)] = _responses(client.received)
        self.assertEqual(status, 403)
        self.assertEqual(headers[b"x-whsentry-reasoncode"], b"1016")
        self.assertEqual(self.resource.seen, [])

    @inlineCallbacks
    def test_innerRoleHeaderIgnored(self):  # type: ignore[no-untyped-def]
        """
        A role header inside an anonymous tunnel does not give its
        requests a role: an alias bound to that role is refused (1016).
        """
        self.start(
            "--role-header",
            "X-Role",
            "--allow-missing-role",
            "--client-cert-alias",
            "billing={}:{}:billing".format(
                self.dir.child("billing.pem").path, self.dir.child("billing.key").path
            ),
            acl=ACL_LOOPBACK
            + "default:\n  action: open\n  allowed_domains: [127.0.0.2]\n"
            "  mitm_domains:\n    - domain: 127.0.0.2\n",
        )
        client = yield self.connect(
            self.get(b"/alias", b"X-WhSentry-ClientCert: billing", b"X-Role: billing")
        )
        [(status, headers, _)] = _responses(client.received)
        self.assertEqual(status, 403)
        self.assertEqual(headers[b"x-whsentry-reasoncode"], b"1016")
        self.assertEqual(self.resource.seen, [])
        self.assertIsNone(self.access[-1]["role"])


ACL_LOOPBACK = """\
version: v1
services:
  - name: billing
    action: enforce
    allowed_domains: [127.0.0.2]
    mitm_domains:
      - domain: 127.0.0.2
        add_headers: {Accept-Language: el}
        detailed_http_logs: true
        detailed_http_logs_full_headers: [accept-language]
  - name: reports
    action: enforce
    allowed_domains: [127.0.0.2]
    mitm_domains:
      - domain: 127.0.0.2
"""
