"""
Tests of the work a short connection is spared: objects made only when
someone asks for them, and what the proxy already knows not asked of the
transport again (docs/benchmarks.md, "Fifth session: less work per
connection").
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.upstream import UpstreamTunnel, UpstreamTunnelFactory
from tests.helpers import HalfCloseStringTransport, makeHarness

GET = b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n\r\n"
CONNECT = b"CONNECT origin.example:443 HTTP/1.1\r\nHost: origin.example:443\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
DONE = Failure(ConnectionDone())


class _CountingTransport(HalfCloseStringTransport):
    """
    A transport that counts the calls of C{getPeer}.
    """

    peerAsked = 0

    def getPeer(self) -> Any:
        self.peerAsked += 1
        return HalfCloseStringTransport.getPeer(self)


def _deferreds(obj: object) -> list[Deferred]:
    return [v for v in vars(obj).values() if isinstance(v, Deferred)]


class LazyDeferredTests(SynchronousTestCase):
    def test_plainConnectionMakesNone(self) -> None:
        """
        A plain origin connection that carries a request and is lost holds
        no L{Deferred} that nobody asked for: neither C{ready} nor
        C{closed} is made on the way.
        """
        h = makeHarness()
        h.send(GET)
        upstream, transport = h.connectUpstream()
        self.assertEqual(_deferreds(upstream), [])
        upstream.dataReceived(RESPONSE)
        upstream.connectionLost(DONE)
        self.assertTrue(h.client.value().endswith(b"\r\n\r\nok"))
        self.assertEqual(_deferreds(upstream), [])

    def test_readyAskedLate(self) -> None:
        """
        C{ready}, first asked for once a plain connection is made, has
        fired with the connection; asked for once it is lost, with
        L{None}.
        """
        h = makeHarness()
        h.send(GET)
        upstream, _ = h.connectUpstream()
        self.assertIs(self.successResultOf(upstream.ready), upstream)
        upstream.connectionLost(DONE)
        self.assertIsNone(self.successResultOf(upstream.ready))

        h = makeHarness()
        h.send(GET)
        upstream, _ = h.connectUpstream()
        upstream.connectionLost(DONE)
        self.assertIsNone(self.successResultOf(upstream.ready))

    def test_readyAskedBeforeConnected(self) -> None:
        """
        C{ready} asked for before the connection is made fires with the
        connection when it is made.
        """
        h = makeHarness()
        h.send(GET)
        host, port, factory, _, _ = h.reactor.tcpClients[-1]
        address = IPv4Address("TCP", host, port)
        protocol = factory.buildProtocol(address)
        ready = protocol.ready
        self.assertNoResult(ready)
        protocol.makeConnection(HalfCloseStringTransport(peerAddress=address))
        self.assertIs(self.successResultOf(ready), protocol)

    def test_closed(self) -> None:
        """
        C{closed} fires with L{None} when the connection is lost, whether
        it was asked for before or after.
        """
        h = makeHarness()
        h.send(GET)
        upstream, _ = h.connectUpstream()
        closed = upstream.closed
        self.assertNoResult(closed)
        upstream.connectionLost(DONE)
        self.assertIsNone(self.successResultOf(closed))
        self.assertIsNone(self.successResultOf(upstream.closed))


class DestinationAddressTests(SynchronousTestCase):
    def _connect(self, h: Any) -> tuple[Any, _CountingTransport]:
        host, port, factory, _, _ = h.reactor.tcpClients[-1]
        address = IPv4Address("TCP", host, port)
        protocol = factory.buildProtocol(address)
        transport = _CountingTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def test_forwardedRequest(self) -> None:
        """
        A forwarded request's origin connection names the address it was
        built for without asking its transport for its peer.
        """
        h = makeHarness()
        h.send(GET)
        upstream, transport = self._connect(h)
        self.assertEqual(
            upstream.destinationAddress, IPv4Address("TCP", "203.0.113.10", 80)
        )
        self.assertEqual(h.protocol.exchange.outboundAddress, "203.0.113.10:80")
        self.assertEqual(transport.peerAsked, 0)

    def test_tunnel(self) -> None:
        """
        A tunnel's origin connection names the address it was built for
        without asking its transport for its peer.
        """
        h = makeHarness()
        h.send(CONNECT)
        upstream, transport = self._connect(h)
        self.assertIsInstance(upstream, UpstreamTunnel)
        self.assertEqual(h.protocol.tunnel.outboundAddress, "203.0.113.10:443")
        self.assertEqual(transport.peerAsked, 0)

    def test_factory(self) -> None:
        """
        L{UpstreamTunnelFactory} records the address it builds for.
        """
        address = IPv4Address("TCP", "192.0.2.1", 443)
        protocol = UpstreamTunnelFactory().buildProtocol(address)
        self.assertIs(protocol.destinationAddress, address)
