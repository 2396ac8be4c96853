"""
Smokescreen's per-request parent: a CONNECT's C{X-Upstream-Https-Proxy}
header, allowed by the role's C{allowed_external_proxies}, on a memory
reactor.  The external proxy's own address is vetted like a destination's,
it is asked for the vetted destination address (never the name), and every
refusal connects nowhere.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.access import AccessControl
from proxy_app.acl import ACL
from proxy_app.addresses import AddressDecision
from proxy_app.admission import externalProxyURL
from proxy_app.parent import Bypass, ParentProxy, parseParentURL
from proxy_app.reasons import ProxyError, Reason
from proxy_app.resolver import DestinationDenied, VettedDestination
from proxy_app.upstream import Connector, UpstreamTunnelFactory

from .helpers import Harness, makeHarness, parseResponse

ACL_TEXT = """
version: v1
services: []
default:
  project: p
  action: enforce
  allowed_domains: [origin.example]
  allowed_external_proxies: [proxy.example, "*.corp.example", "198.51.100.99"]
"""

PROXY = "198.51.100.7"
ORIGIN = "203.0.113.10"


def connect(
    header: bytes | None = None, target: bytes = b"origin.example:443"
) -> bytes:
    lines = [b"CONNECT " + target + b" HTTP/1.1", b"Host: " + target]
    if header is not None:
        lines.append(b"X-Upstream-Https-Proxy: " + header)
    return b"\r\n".join(lines) + b"\r\n\r\n"


class ExternalProxyTests(SynchronousTestCase):
    """
    What a client sees, and what the external proxy is sent.
    """

    def harness(self, acl: str | None = ACL_TEXT) -> Harness:
        denied = DestinationDenied(
            "internal.corp.example",
            3128,
            AddressDecision(False, "10.0.0.8", "Deny: Private Range"),
        )
        h = makeHarness(
            {
                "origin.example": [ORIGIN],
                "proxy.example": [PROXY, "198.51.100.8"],
                "internal.corp.example": denied,
            }
        )
        h.factory.access = AccessControl(
            ACL.fromYAML(acl) if acl else None, allowMissingRole=True
        )
        return h

    def assertRefused(self, h: Harness, status: int, code: int, *words: str) -> bytes:
        got, headers, body = parseResponse(h.client.value())
        self.assertEqual(
            (got, headers[b"x-whsentry-reasoncode"]), (status, b"%d" % code)
        )
        for word in words:
            self.assertIn(word.encode(), headers[b"x-whsentry-reason"])
        self.assertEqual(h.reactor.tcpClients, [])
        return body

    def test_tunnelsThroughTheVettedProxyToTheVettedAddress(self) -> None:
        """
        An allowed external proxy is resolved once and connected to at a
        vetted address; it is asked for C{CONNECT <vetted-IP>:<port>}, with
        neither the destination's name nor the header; after its 200 the
        client's tunnel is up and carries bytes both ways.
        """
        h = self.harness()
        h.send(connect(b"http://proxy.example:3128"))
        self.assertEqual([c[:2] for c in h.reactor.tcpClients], [(PROXY, 3128)])
        self.assertEqual(
            h.resolver.calls, [("proxy.example", 3128), ("origin.example", 443)]
        )
        protocol, transport = h.connectUpstream()
        self.assertEqual(
            transport.value(),
            b"CONNECT 203.0.113.10:443 HTTP/1.1\r\nHost: 203.0.113.10:443\r\n\r\n",
        )
        self.assertEqual(h.client.value(), b"")
        transport.clear()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        status, _, _ = parseResponse(h.client.value())
        self.assertEqual(status, 200)
        h.send(b"hello")
        self.assertEqual(transport.value(), b"hello")

    def test_defaultPort(self) -> None:
        """
        Without a port the scheme's is used, as Smokescreen's client
        library does: 80 for C{http}.
        """
        h = self.harness()
        h.send(connect(b"http://proxy.example"))
        self.assertEqual([c[:2] for c in h.reactor.tcpClients], [(PROXY, 80)])

    def test_notAllowedByTheACL(self) -> None:
        """
        A proxy host the rule does not list is refused with 403, reason
        1011 and Smokescreen's wording, before anything is looked up.
        """
        h = self.harness()
        h.send(connect(b"http://other.example:3128"))
        self.assertRefused(
            h, 403, 1011, "connect proxy host not allowed in rule", "other.example"
        )
        self.assertEqual(h.resolver.calls, [])

    def test_noACL(self) -> None:
        """
        Without an ACL nothing grants an external proxy: 403, reason 1011.
        """
        h = self.harness(acl=None)
        h.send(connect(b"http://proxy.example:3128"))
        self.assertRefused(h, 403, 1011, "connect proxy host not allowed in rule")

    def test_unparseable(self) -> None:
        """
        A value that is not C{http(s)://HOST[:PORT]}, or the header sent
        twice, is a 400 with reason 1002, and the value (which may hold a
        password) is not echoed.
        """
        for value in (
            b"proxy.example:3128",
            b"socks5://proxy.example:1080",
            b"http://proxy.example:3128/path",
            b"http://proxy.example:99999",
            b"http://proxy.example:",
            b"http://:3128",
            b"http://u:s3cret@proxy.example:3128/x",
            b"http://pr\xffoxy.example",
        ):
            h = self.harness()
            h.send(connect(value))
            body = self.assertRefused(h, 400, 1002, "X-Upstream-Https-Proxy")
            self.assertNotIn(b"s3cret", h.client.value(), value)
            self.assertEqual(h.resolver.calls, [], value)
        h = self.harness()
        h.send(
            connect(b"http://proxy.example:3128").replace(
                b"\r\n\r\n",
                b"\r\nX-Upstream-Https-Proxy: http://a.corp.example\r\n\r\n",
            )
        )
        self.assertRefused(h, 400, 1002, "only once")
        del body

    def test_proxyAddressDenied(self) -> None:
        """
        The external proxy's addresses go through the address policy: one
        whose every address is denied is refused with 403, reason 1000,
        naming it, and nothing is connected.
        """
        h = self.harness()
        h.send(connect(b"http://internal.corp.example:3128"))
        self.assertRefused(
            h, 403, 1000, "external proxy http://internal.corp.example:3128"
        )

    def test_proxyRefusesTheTunnel(self) -> None:
        """
        An external proxy that refuses the tunnel gives 502, reason 1018,
        naming it as the external proxy.
        """
        h = self.harness()
        h.send(connect(b"http://proxy.example:3128"))
        protocol, _ = h.connectUpstream()
        protocol.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (502, b"1018"))
        self.assertIn(
            b"the external proxy http://proxy.example:3128",
            headers[b"x-whsentry-reason"],
        )

    def test_proxyUnreachable(self) -> None:
        """
        An external proxy that cannot be connected to gives 502, 1018.
        """
        h = self.harness()
        h.send(connect(b"http://proxy.example:3128"))
        h.failUpstream(ConnectionRefusedError())
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (502, b"1018"))

    def test_forwardedRequestsIgnoreAndStripIt(self) -> None:
        """
        On a forwarded (non-CONNECT) request the header is neither honoured
        nor passed on: the origin is connected to directly and does not see
        it.
        """
        h = self.harness()
        h.send(
            b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n"
            b"X-Upstream-Https-Proxy: http://evil.example:3128\r\n\r\n"
        )
        self.assertEqual([c[:2] for c in h.reactor.tcpClients], [(ORIGIN, 80)])
        _, transport = h.connectUpstream()
        self.assertTrue(transport.value().startswith(b"GET / HTTP/1.1\r\n"))
        self.assertNotIn(b"upstream-https-proxy", transport.value().lower())


class ConnectorOverrideTests(SynchronousTestCase):
    """
    L{Connector.connect}'s C{parent} override.
    """

    def test_overrideReplacesTheConfiguredParent(self) -> None:
        """
        A per-request parent is used instead of the configured one, even
        for a destination the configured one's bypass list sends direct.
        """
        reactor = MemoryReactorClock()
        configured = ParentProxy(
            parseParentURL("http://192.0.2.50:3128"),
            "192.0.2.50",
            None,
            Bypass.parse(("origin.example",)),
        )
        external = ParentProxy(
            parseParentURL("http://proxy.example:8080"),
            PROXY,
            kind="external proxy",
        )
        connector = Connector(reactor, 10, parent=configured, maxAttempts=1)
        connector.connect(
            VettedDestination("origin.example", 443, (ORIGIN,)),
            UpstreamTunnelFactory(),
            parent=external,
        )
        self.assertEqual([c[:2] for c in reactor.tcpClients], [(PROXY, 8080)])
        protocol = reactor.tcpClients[0][2].buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"CONNECT 203.0.113.10:443 "))


class HeaderTests(SynchronousTestCase):
    """
    L{externalProxyURL}.
    """

    def test_parse(self) -> None:
        """
        The scheme's port fills in a missing one, credentials become a
        C{Proxy-Authorization} value that is never shown, and an absent
        header is L{None}.
        """
        self.assertIsNone(externalProxyURL([(b"host", b"x")]))
        url: Any = externalProxyURL(
            [(b"x-upstream-https-proxy", b"https://u:p@Proxy.Example")]
        )
        self.assertEqual(
            (url.scheme, url.host, url.port), ("https", "proxy.example", 443)
        )
        self.assertEqual(url.authorization, b"Basic dTpw")
        self.assertEqual(str(url), "https://proxy.example:443")
        with self.assertRaises(ProxyError) as caught:
            externalProxyURL([(b"x-upstream-https-proxy", b"ftp://p")])
        self.assertIs(caught.exception.reason, Reason.BAD_TARGET)
