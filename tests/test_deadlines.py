"""
Tests for L{Deadlines} and L{QueuedTimer}: timeouts of one fixed duration
on one delayed call, each firing exactly when a delayed call of its own
would have.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.channel import ProxyFactory
from proxy_app.config import Config
from proxy_app.observe import AccessLog
from proxy_app.upstream import Connector, Deadlines, QueuedTimer
from tests.helpers import FakeDestinationResolver, HalfCloseStringTransport


class DeadlinesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.deadlines = Deadlines(self.clock, 10)
        self.fired: list[tuple[str, float]] = []

    def timer(self, name: str) -> QueuedTimer:
        return QueuedTimer(
            self.deadlines, lambda: self.fired.append((name, self.clock.seconds()))
        )

    def test_exact(self) -> None:
        """
        Each timer fires exactly its duration after it started, not
        before, in the order they started, on one delayed call.
        """
        a, b, c = self.timer("a"), self.timer("b"), self.timer("c")
        a.start()
        self.clock.advance(1)
        b.start()
        self.clock.advance(1.5)
        c.start()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(7)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.5)
        self.assertEqual(self.fired, [("a", 10)])
        self.clock.advance(1)
        self.assertEqual(self.fired, [("a", 10), ("b", 11)])
        self.clock.advance(1.5)
        self.assertEqual(self.fired, [("a", 10), ("b", 11), ("c", 12.5)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_restart(self) -> None:
        """
        A timer started again runs its full duration from then.
        """
        a = self.timer("a")
        a.start()
        self.clock.advance(4)
        a.start()
        self.clock.advance(6)
        self.assertEqual(self.fired, [])
        self.clock.advance(4)
        self.assertEqual(self.fired, [("a", 14)])

    def test_cancel(self) -> None:
        """
        A cancelled timer never fires; once no timer runs, no delayed call
        is left.
        """
        a, b = self.timer("a"), self.timer("b")
        a.start()
        b.start()
        a.cancel()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        b.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(20)
        self.assertEqual(self.fired, [])
        b.start()
        self.clock.advance(10)
        self.assertEqual(self.fired, [("b", 30)])

    def test_release(self) -> None:
        """
        A released timer is cancelled, lets go of its callback, and
        started again does nothing.
        """
        a = self.timer("a")
        a.start()
        a.release()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        a.start()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.fired, [])

    def test_callbacksChangeTheQueue(self) -> None:
        """
        A timer's callback may cancel a timer due at the same time, which
        then does not fire, and start one, which fires its duration later.
        """
        b = self.timer("b")
        c = self.timer("c")

        def expired() -> None:
            self.fired.append(("a", self.clock.seconds()))
            b.cancel()
            c.start()

        a = QueuedTimer(self.deadlines, expired)
        a.start()
        b.start()
        self.clock.advance(10)
        self.assertEqual(self.fired, [("a", 10)])
        self.clock.advance(10)
        self.assertEqual(self.fired, [("a", 10), ("c", 20)])

    def test_errorLogged(self) -> None:
        """
        A timer whose callback raises has its error logged, and the
        timers after it still fire.
        """

        def broken() -> None:
            raise ZeroDivisionError()

        a = QueuedTimer(self.deadlines, broken)
        b = self.timer("b")
        a.start()
        b.start()
        self.clock.advance(10)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.fired, [("b", 10)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bounded(self) -> None:
        """
        A timer restarted many times leaves a bounded queue behind, and
        still fires once, its duration after its last start.
        """
        a, b = self.timer("a"), self.timer("b")
        b.start()
        for _ in range(10_000):
            self.clock.advance(0.0001)
            a.start()
        self.assertLessEqual(len(self.deadlines._queue), 65)
        self.clock.advance(10)
        self.assertEqual([name for name, _ in self.fired], ["b", "a"])


class SharedDeadlinesTests(SynchronousTestCase):
    def test_headerTimersShareOneCall(self) -> None:
        """
        The request-header timers of a factory's connections share one
        delayed call: 1,000 connections waiting for their request heads
        make one, not 1,000.
        """
        reactor = MemoryReactorClock()
        config = Config()
        factory = ProxyFactory(
            config,
            FakeDestinationResolver({}),
            reactor,
            Connector(reactor, config.timeouts.connect),
            AccessLog(None),
        )
        protocols = []
        for port in range(1000):
            address = IPv4Address("TCP", "127.0.0.1", 40000 + port)
            protocol = factory.buildProtocol(address)
            protocol.makeConnection(HalfCloseStringTransport(peerAddress=address))
            protocols.append(protocol)
        self.assertEqual(len(reactor.getDelayedCalls()), 1)
        reactor.advance(config.timeouts.request_header)
        self.assertTrue(all(p.transport.disconnecting for p in protocols))
