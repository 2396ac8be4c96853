"""
Tests for L{proxy_app.tunnel.TunnelWatch}: the read timeout and lifetime of
established tunnels, kept by one coarse timer per factory.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.config import Config, Timeouts

from .helpers import HalfCloseStringTransport, Harness, makeHarness

CONNECT = b"CONNECT origin.example:443 HTTP/1.1\r\nHost: origin.example:443\r\n\r\n"

# A step well under the watch's interval (read 8 s: an interval of 1 s).
STEP = 0.125


def harness(read: float = 8, lifetime: float = 3600) -> Harness:
    return makeHarness(config=Config(timeouts=Timeouts(read=read, lifetime=lifetime)))


def openTunnel(h: Harness) -> tuple[Any, HalfCloseStringTransport]:
    """
    Open one more tunnel on C{h}'s factory, from a client of its own.

    @return: the client's protocol and transport.
    """
    peer = IPv4Address("TCP", "127.0.0.1", 40001 + len(h.factory.connections))
    protocol = h.factory.buildProtocol(peer)
    client = HalfCloseStringTransport(peerAddress=peer)
    protocol.makeConnection(client)
    protocol.dataReceived(CONNECT)
    h.connectUpstream()
    return protocol, client


def run(h: Harness, seconds: float) -> None:
    """
    Let C{seconds} pass on C{h}'s clock in small steps, as a reactor would.
    """
    h.reactor.pump([STEP] * round(seconds / STEP))


class TunnelWatchTests(SynchronousTestCase):
    def test_interval(self) -> None:
        """
        The watch looks every eighth of the shorter of the read timeout
        and the lifetime.
        """
        self.assertEqual(harness(8, 3600).factory.tunnelWatch.interval, 1)
        self.assertEqual(harness(60, 4).factory.tunnelWatch.interval, 0.5)

    def test_idleNeverBeforeTimeout(self) -> None:
        """
        An idle tunnel is not closed before the read timeout, and is closed
        at most an eighth of it after, with the idle message.
        """
        for offset in (0.0, 0.375, 0.5, 0.875):
            h = harness(read=8)
            run(h, offset)
            h.send(CONNECT)
            up, upTransport = h.connectUpstream()
            run(h, 2)
            up.dataReceived(b"last")
            run(h, 8 - STEP)
            self.assertFalse(h.client.disconnecting, offset)
            run(h, 1 + STEP)
            self.assertTrue(h.client.disconnecting, offset)
            self.assertTrue(upTransport.disconnecting)
            h.protocol.connectionLost(Failure(ConnectionError()))
            self.assertEqual(
                h.access[-1]["error"], "Tunnel idle for 8 s (read timeout)"
            )

    def test_idleFromEstablishment(self) -> None:
        """
        A tunnel that never carries a byte is idle from its establishment.
        """
        h = harness(read=8)
        h.send(CONNECT)
        h.connectUpstream()
        run(h, 8 - STEP)
        self.assertFalse(h.client.disconnecting)
        run(h, 1 + STEP)
        self.assertTrue(h.client.disconnecting)

    def test_activityPostpones(self) -> None:
        """
        A byte either way, however small and however near the deadline,
        restarts the read timeout.
        """
        h = harness(read=8)
        h.send(CONNECT)
        up, _ = h.connectUpstream()
        for i in range(6):
            run(h, 7.5)
            if i % 2:
                h.send(b".")
            else:
                up.dataReceived(b".")
        self.assertFalse(h.client.disconnecting)
        run(h, 8 - STEP)
        self.assertFalse(h.client.disconnecting)
        run(h, 1 + STEP)
        self.assertTrue(h.client.disconnecting)

    def test_tricklingClientKeptOnlyToLifetime(self) -> None:
        """
        A hostile client sending one byte every T - 1 s keeps its tunnel
        only until the lifetime ends (and at most an interval after), when
        it is closed with the lifetime message.
        """
        h = harness(read=8, lifetime=40)
        h.send(CONNECT)
        _, upTransport = h.connectUpstream()
        while h.reactor.seconds() < 40 - STEP:
            self.assertFalse(h.client.disconnecting, h.reactor.seconds())
            h.send(b".")
            run(h, min(7, 40 - STEP - h.reactor.seconds()))
        self.assertFalse(h.client.disconnecting)
        run(h, 1 + STEP)
        self.assertTrue(h.client.disconnecting)
        self.assertTrue(upTransport.disconnecting)
        h.protocol.connectionLost(Failure(ConnectionError()))
        self.assertEqual(h.access[-1]["error"], "Tunnel exceeded its lifetime of 40 s")

    def test_stopsWhenNoTunnelLeft(self) -> None:
        """
        The watch's timer runs only while a tunnel is established: none
        before, one during, none once the last tunnel has closed.
        """
        h = harness(read=8)
        calls = h.reactor.getDelayedCalls
        h.send(CONNECT)
        connecting = set(calls())
        h.connectUpstream()
        watching = [c for c in calls() if c not in connecting]
        self.assertEqual(len(watching), 1)
        self.assertEqual(len(h.factory.tunnelWatch), 1)
        h.protocol.connectionLost(Failure(ConnectionError()))
        self.assertEqual(len(h.factory.tunnelWatch), 0)
        self.assertFalse(watching[0].active())
        self.assertEqual([c for c in calls() if c.active()], [])

    def test_stopsAfterTimingOut(self) -> None:
        """
        Once it has closed the last tunnel, the watch leaves no delayed call
        in the clock.
        """
        h = harness(read=8)
        h.send(CONNECT)
        h.connectUpstream()
        run(h, 9 + STEP)
        self.assertTrue(h.client.disconnecting)
        h.protocol.connectionLost(Failure(ConnectionError()))
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_thousandsOfTunnelsOneCall(self) -> None:
        """
        Two thousand idle tunnels cost the clock one delayed call between
        them, and each is closed by the read timeout.
        """
        h = harness(read=8)
        before = len(h.reactor.getDelayedCalls())
        clients = [openTunnel(h)[1] for _ in range(2000)]
        self.assertEqual(len(h.factory.tunnelWatch), 2000)
        self.assertEqual(len(h.reactor.getDelayedCalls()), before + 1)
        run(h, 9 + STEP)
        self.assertTrue(all(client.disconnecting for client in clients))
