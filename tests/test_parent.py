"""
The parent proxy (L{proxy_app.parent}) through the L{Connector}: the CONNECT
it sends (the vetted address, never the name), how it reads the parent's
answer, the destinations that go direct, the pool keys, and the settings.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import getConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.config import ConfigError, load
from proxy_app.parent import Bypass, ParentProxy, parseParentURL
from proxy_app.reasons import ProxyError, Reason
from proxy_app.resolver import VettedDestination
from proxy_app.tap import buildParent
from proxy_app.upstream import Connector, PoolKey, UpstreamPool, UpstreamTunnelFactory

PARENT = "192.0.2.50"


class Recorder(Protocol):
    """
    The protocol the caller asked for: records what reaches it.
    """

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


def parent(url: str = f"http://{PARENT}:3128", bypass: tuple[str, ...] = ()) -> Any:
    return ParentProxy(parseParentURL(url), PARENT, None, Bypass.parse(bypass))


class Through:
    """
    One connect through a parent on a memory reactor.
    """

    def __init__(
        self,
        addresses: tuple[str, ...] = ("203.0.113.7",),
        host: str = "origin.example",
        port: int = 443,
        url: str = f"http://{PARENT}:3128",
        bypass: tuple[str, ...] = (),
        timeout: float = 10,
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.connector = Connector(
            self.reactor, timeout, parent=parent(url, bypass), maxAttempts=1
        )
        self.factory = Factory.forProtocol(Recorder)
        self.result: Deferred = self.connector.connect(
            VettedDestination(host, port, addresses), self.factory
        )
        self.transport = StringTransport()

    def accept(self) -> Any:
        host, port, factory = self.reactor.tcpClients[0][:3]
        address = IPv4Address("TCP", host, port)
        protocol = factory.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address)
        protocol.makeConnection(self.transport)
        return protocol


class HandshakeTests(SynchronousTestCase):
    """
    The CONNECT handshake with the parent.
    """

    def test_connectsToTheParentAndAsksForTheVettedAddress(self) -> None:
        """
        The TCP connection goes to the parent's address, and the parent is
        asked for the vetted address and port, never for the name.
        """
        through = Through(url=f"http://user:p%40ss@{PARENT}:3128")
        self.assertEqual(through.reactor.tcpClients[0][:2], (PARENT, 3128))
        protocol = through.accept()
        credentials = base64.b64encode(b"user:p@ss")
        self.assertEqual(
            through.transport.value(),
            b"CONNECT 203.0.113.7:443 HTTP/1.1\r\n"
            b"Host: 203.0.113.7:443\r\n"
            b"Proxy-Authorization: Basic " + credentials + b"\r\n\r\n",
        )
        self.assertNotIn(b"origin.example", through.transport.value())
        self.assertNoResult(through.result)
        protocol.dataReceived(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.assertIsInstance(self.successResultOf(through.result), Recorder)

    def test_ipv6InBrackets(self) -> None:
        """
        An IPv6 destination is asked for in brackets, without credentials
        when the URL has none.
        """
        through = Through(addresses=("2001:db8::7",), port=80)
        through.accept()
        self.assertEqual(
            through.transport.value(),
            b"CONNECT [2001:db8::7]:80 HTTP/1.1\r\nHost: [2001:db8::7]:80\r\n\r\n",
        )

    def test_bytesAfterThe200BelongToTheTunnel(self) -> None:
        """
        What the parent sends after its 200 head, in the same read or later,
        reaches the requested protocol; the inner protocol is told the
        vetted destination's address.
        """
        through = Through()
        protocol = through.accept()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nVia: parent\r\n\r\nhello")
        inner = self.successResultOf(through.result)
        self.assertEqual(
            inner.destinationAddress, IPv4Address("TCP", "203.0.113.7", 443)
        )
        protocol.dataReceived(b" world")
        self.assertEqual(inner.received, b"hello world")
        self.assertIs(inner.transport, through.transport)
        inner.transport.write(b"GET / HTTP/1.1\r\n")
        self.assertTrue(through.transport.value().endswith(b"GET / HTTP/1.1\r\n"))

    def test_answerInPieces(self) -> None:
        """
        An answer head split across reads is assembled.
        """
        through = Through()
        protocol = through.accept()
        for piece in (b"HTTP/1.1 2", b"00 OK\r\n", b"\r", b"\nx"):
            protocol.dataReceived(piece)
        self.assertEqual(self.successResultOf(through.result).received, b"x")

    def test_interimThen200(self) -> None:
        """
        An interim 100 before the 200 is skipped, as from an origin.
        """
        through = Through()
        through.accept().dataReceived(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\ntunnel"
        )
        self.assertEqual(self.successResultOf(through.result).received, b"tunnel")

    def assertParentFailed(self, through: Through, *words: str) -> ProxyError:
        failure = self.failureResultOf(through.result, ProxyError)
        error = failure.value
        self.assertEqual(error.reason, Reason.PARENT_PROXY_FAILED)
        self.assertEqual(error.status, 502)
        self.assertIn(f"the parent proxy http://{PARENT}:3128", error.message)
        for word in words:
            self.assertIn(word, error.message)
        return error

    def test_407(self) -> None:
        """
        A 407 is a failure naming the parent and its status; the connection
        is cut and nothing reaches the inner protocol.
        """
        through = Through()
        protocol = through.accept()
        protocol.dataReceived(
            b"HTTP/1.1 407 Proxy Authentication Required\r\n"
            b"Proxy-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertParentFailed(
            through, "407 Proxy Authentication Required", "origin.example:443"
        )
        self.assertTrue(through.transport.disconnecting)

    def test_403And502(self) -> None:
        """
        A parent's 403 or 502 to the CONNECT is reported as that status.
        """
        for status in (b"403 Forbidden", b"502 Bad Gateway"):
            through = Through()
            through.accept().dataReceived(b"HTTP/1.1 " + status + b"\r\n\r\n")
            self.assertParentFailed(through, status.decode())

    def test_otherSuccessIsAFailure(self) -> None:
        """
        Only a 200 opens the tunnel: a 204 or a 200 with a body does not.
        """
        through = Through()
        through.accept().dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertParentFailed(through, "204")
        through = Through()
        through.accept().dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        self.assertParentFailed(through, "200 and a body")

    def test_garbage(self) -> None:
        """
        An answer that is not HTTP is a failure.
        """
        through = Through()
        through.accept().dataReceived(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        self.assertParentFailed(through, "Invalid HTTP response")

    def test_headTooLarge(self) -> None:
        """
        An answer head that never ends is refused once too large.
        """
        through = Through()
        protocol = through.accept()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        for _ in range(20):
            protocol.dataReceived(b"X-Pad: " + b"a" * 1000 + b"\r\n")
        self.assertParentFailed(through, "too large")

    def test_closeBeforeAnswer(self) -> None:
        """
        A parent that closes before answering is a failure saying so.
        """
        through = Through()
        protocol = through.accept()
        protocol.connectionLost(Failure(ConnectionError()))
        self.assertParentFailed(through, "closed the connection without answering")

    def test_refused(self) -> None:
        """
        A parent refusing the TCP connection is a failure naming the parent.
        """
        through = Through()
        factory = through.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(
            through.reactor.connectors[0],
            Failure(getConnectError((111, "Connection refused"))),
        )
        self.assertParentFailed(through, "Connection refused")

    def test_timeoutCoversTheAnswer(self) -> None:
        """
        The connect timeout covers the CONNECT answer: a parent that
        accepts and never answers gets 504 naming it, and is cut.
        """
        through = Through(timeout=5)
        through.accept()
        through.reactor.advance(4.9)
        self.assertNoResult(through.result)
        through.reactor.advance(0.1)
        error = self.failureResultOf(through.result, ProxyError).value
        self.assertEqual(error.reason, Reason.UPSTREAM_TIMEOUT)
        self.assertEqual(error.status, 504)
        self.assertIn(f"through the parent proxy http://{PARENT}:3128", error.message)
        self.assertTrue(through.transport.disconnecting)


class BypassTests(SynchronousTestCase):
    """
    C{upstream.no_proxy}: destinations that go direct.
    """

    def test_matches(self) -> None:
        """
        A name matches itself only, a glob the names below it, a CIDR the
        vetted address whatever the name.
        """
        bypass = Bypass.parse(
            ("hooks.internal.example", "*.corp.example", "10.0.0.0/8")
        )
        self.assertTrue(bypass("hooks.internal.example", "198.51.100.1"))
        self.assertFalse(bypass("x.hooks.internal.example", "198.51.100.1"))
        self.assertTrue(bypass("a.b.corp.example", "198.51.100.1"))
        self.assertFalse(bypass("corp.example", "198.51.100.1"))
        self.assertFalse(bypass("evilcorp.example", "198.51.100.1"))
        self.assertTrue(bypass("anything.example", "10.1.2.3"))
        self.assertFalse(bypass("anything.example", "11.1.2.3"))

    def test_bypassedGoesDirect(self) -> None:
        """
        A bypassed destination is connected to directly, at its vetted
        address; the others through the parent.
        """
        through = Through(bypass=("origin.example",))
        self.assertEqual(through.reactor.tcpClients[0][:2], ("203.0.113.7", 443))
        through = Through(bypass=("other.example",))
        self.assertEqual(through.reactor.tcpClients[0][:2], (PARENT, 3128))

    def test_badEntry(self) -> None:
        """
        An entry that is none of the forms stops start-up with one line
        naming the key.
        """
        with self.assertRaises(ConfigError) as caught:
            load({}, {"EGRESSPROXY_NO_UPSTREAM_PROXY": "http://x/"})
        self.assertIn("EGRESSPROXY_NO_UPSTREAM_PROXY", str(caught.exception))


class PoolKeyTests(SynchronousTestCase):
    """
    A connection through the parent is pooled apart from a direct one.
    """

    def test_keyNamesTheParent(self) -> None:
        """
        The pool key of a connection through the parent carries the
        parent's key; a bypassed destination's carries none.
        """
        reactor = MemoryReactorClock()
        proxy = parent(bypass=("direct.example",))
        connector = Connector(reactor, 10, parent=proxy)
        pool = UpstreamPool(connector, reactor, 10, 60)
        pool.acquire(VettedDestination("origin.example", 80, ("203.0.113.7",)))
        pool.acquire(VettedDestination("direct.example", 80, ("203.0.113.7",)))
        viaParent, direct = reactor.tcpClients
        wrapper = viaParent[2].buildProtocol(IPv4Address("TCP", PARENT, 3128))
        wrapper.makeConnection(StringTransport())
        wrapper.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        handshake = wrapper._wrappedProtocol
        self.assertEqual(
            handshake.inner.key, PoolKey("203.0.113.7", 80, None, proxy.key)
        )
        plain = direct[2].buildProtocol(IPv4Address("TCP", "203.0.113.7", 80))
        plain.makeConnection(StringTransport())
        self.assertEqual(plain.key, PoolKey("203.0.113.7", 80))
        self.assertNotEqual(handshake.inner.key, plain.key)


class SettingTests(SynchronousTestCase):
    """
    C{upstream.proxy}.
    """

    def test_parse(self) -> None:
        """
        The URL gives the scheme, host, port and the Basic credentials,
        which its text form leaves out.
        """
        url = parseParentURL("HTTPS://u:x%3Apw@Proxy.Corp.Example:3129")
        self.assertEqual(
            (url.scheme, url.host, url.port), ("https", "proxy.corp.example", 3129)
        )
        self.assertEqual(url.authorization, b"Basic " + base64.b64encode(b"u:x:pw"))
        self.assertEqual(str(url), "https://proxy.corp.example:3129")
        self.assertNotIn("pw", repr(url))
        ipv6 = parseParentURL("http://[2001:db8::5]:8080")
        self.assertEqual((ipv6.host, ipv6.port), ("2001:db8::5", 8080))

    def test_badValuesStopStartUp(self) -> None:
        """
        A bad URL stops start-up with one line naming the key, and without
        the password.
        """
        for value in (
            "proxy.corp:3128",
            "socks5://proxy:1080",
            "http://proxy",
            "http://proxy:3128/path",
            "http://user:hunter2@proxy:99999",
        ):
            with self.assertRaises(ConfigError) as caught:
                load({}, {"EGRESSPROXY_UPSTREAM_PROXY": value})
            message = str(caught.exception)
            self.assertIn("EGRESSPROXY_UPSTREAM_PROXY", message)
            self.assertNotIn("\n", message)
            self.assertNotIn("hunter2", message)

    def test_buildParent(self) -> None:
        """
        An IP literal parent is used as it is; none configured is none.
        """
        config = load({}, {"EGRESSPROXY_UPSTREAM_PROXY": "http://127.0.0.1:3128"})
        built = buildParent(config.upstream, None)  # type: ignore[arg-type]
        self.assertEqual(
            (built.address, built.url.port, built.tls), ("127.0.0.1", 3128, None)
        )
        self.assertIsNone(buildParent(load({}, {}).upstream, None))  # type: ignore[arg-type]

    def test_unresolvableParent(self) -> None:
        """
        A parent name that does not resolve stops start-up naming it.
        """
        config = load(
            {}, {"EGRESSPROXY_UPSTREAM_PROXY": "http://no-such-parent.invalid:3128"}
        )
        with self.assertRaises(ConfigError) as caught:
            buildParent(config.upstream, None)  # type: ignore[arg-type]
        self.assertIn("no-such-parent.invalid", str(caught.exception))


class IPv6ParentDestinationTests(SynchronousTestCase):
    """
    The inner protocol learns the vetted destination's address.
    """

    def test_innerAddress(self) -> None:
        """
        For an IPv6 destination, the inner factory is given an
        C{IPv6Address} of the vetted address and port.
        """
        seen = []

        class Remember(Factory):
            def buildProtocol(self, addr: Any) -> Protocol:
                seen.append(addr)
                return Protocol()

        reactor = MemoryReactorClock()
        connector = Connector(reactor, 10, parent=parent())
        connector.connect(
            VettedDestination("o.example", 80, ("2001:db8::7",)), Remember()
        )
        handshake = reactor.tcpClients[0][2].buildProtocol(None)
        handshake.makeConnection(StringTransport())
        handshake.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(seen, [IPv6Address("TCP", "2001:db8::7", 80)])


class HalfCloseTests(SynchronousTestCase):
    """
    The parent's half-close reaches the requested protocol as the direct
    connection's would.
    """

    def test_tunnelSeesReadClosed(self) -> None:
        """
        A half-closeable inner protocol (a CONNECT tunnel's upstream leg) is
        told the parent stopped sending, and the connection stays open.
        """
        reactor = MemoryReactorClock()
        connector = Connector(reactor, 10, parent=parent())
        result = connector.connect(
            VettedDestination("o.example", 443, ("203.0.113.7",)),
            UpstreamTunnelFactory(),
        )
        handshake = reactor.tcpClients[0][2].buildProtocol(None)
        transport = StringTransport()
        handshake.makeConnection(transport)
        handshake.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        tunnel = self.successResultOf(result)
        events = []

        class Peer:
            def upstreamTunnelReadClosed(self) -> None:
                events.append("read closed")

        tunnel.peer = Peer()
        handshake._wrappedProtocol.readConnectionLost()
        self.assertEqual(events, ["read closed"])
        self.assertFalse(transport.disconnecting)

    def test_otherProtocolsAreClosed(self) -> None:
        """
        An inner protocol that is not half-closeable (a forwarded request's)
        has the connection closed when the parent stops sending, as TCP
        would close it.
        """
        through = Through()
        protocol = through.accept()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.successResultOf(through.result)
        protocol.readConnectionLost()
        self.assertTrue(through.transport.disconnecting)
