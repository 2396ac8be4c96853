"""
Tests that a closed connection's objects do not refer back to each other in
cycles, which would leave them to the cyclic garbage collector (whose
collections, under a connection per request, take milliseconds each).
"""

from __future__ import annotations

import gc
import weakref

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.upstream import Timer, UpstreamTunnelFactory, _Connecting
from tests.helpers import makeHarness

GET = b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n\r\n"
CONNECT = b"CONNECT origin.example:443 HTTP/1.1\r\nHost: origin.example:443\r\n\r\n"
DONE = Failure(ConnectionDone())


class _Owner:
    def __init__(self, clock: Clock) -> None:
        self.timer = Timer(clock, 5, self.expired)

    def expired(self) -> None:
        raise AssertionError("a released timer fired")


class TimerReleaseTests(SynchronousTestCase):
    def test_ownerFreedWithoutCollector(self) -> None:
        """
        A released timer lets go of its owner's bound method: the owner is
        freed by reference counting alone, and the timer, started again,
        does nothing.
        """
        clock = Clock()
        owner = _Owner(clock)
        timer = owner.timer
        timer.start()
        timer.release()
        self.assertEqual(clock.getDelayedCalls(), [])
        ref = weakref.ref(owner)
        enabled = gc.isenabled()
        gc.disable()
        try:
            del owner
            self.assertIsNone(ref())
        finally:
            if enabled:
                gc.enable()
        timer.start()
        clock.advance(5)


class ClosedConnectionTests(SynchronousTestCase):
    def test_tunnelLetGo(self) -> None:
        """
        A closed client connection keeps neither its tunnel (which refers
        back to it) nor a header timer bound to it.
        """
        h = makeHarness()
        h.send(CONNECT)
        h.connectUpstream()
        self.assertIsNotNone(h.protocol.tunnel)
        h.protocol.connectionLost(DONE)
        self.assertIsNone(h.protocol.tunnel)
        callback = h.protocol._headerTimer._onTimeout
        self.assertIsNot(getattr(callback, "__self__", None), h.protocol)

    def test_upstreamLetGo(self) -> None:
        """
        A closed origin connection's timers, reader and C{ready} no longer
        refer to it.
        """
        h = makeHarness()
        h.send(GET)
        upstream, _ = h.connectUpstream()
        self.assertIs(upstream.ready.result, upstream)
        upstream.connectionLost(DONE)
        self.assertIsNot(upstream.ready.result, upstream)
        self.assertIsNone(upstream._reader.sink)
        for timer in (upstream._idle, upstream._lifetime):
            self.assertIsNot(getattr(timer._onTimeout, "__self__", None), upstream)

    def test_connectorLetsGoOfTransport(self) -> None:
        """
        When a directly connected connection is lost, its connector no
        longer refers to the transport (which refers to the connector).
        """

        class Connector:
            transport: object = object()

        connector = Connector()
        _Connecting(UpstreamTunnelFactory()).clientConnectionLost(connector, DONE)
        self.assertIsNone(connector.transport)
