"""
How L{proxy_app.upstream.Connector} connects to a destination's vetted
addresses: a cap on the addresses tried, a bound on the whole connect phase,
and happy eyeballs (RFC 8305) across them, all on a memory reactor.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone, getConnectError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from proxy_app.config import Config, ConfigError, load
from proxy_app.reasons import ProxyError, Reason
from proxy_app.resolver import VettedDestination
from proxy_app.upstream import (
    Connector,
    UpstreamTunnel,
    UpstreamTunnelFactory,
    attemptOrder,
)

from .helpers import makeHarness, parseResponse


def v4(n: int) -> str:
    return f"203.0.113.{n}"


def v6(n: int) -> str:
    return f"2001:db8::{n:x}"


def destination(*addresses: str) -> VettedDestination:
    return VettedDestination("origin.example", 80, tuple(addresses))


class Race:
    """
    One L{Connector.connect} on a memory reactor, with helpers to finish
    its attempts.
    """

    def __init__(
        self,
        addresses: list[str],
        timeout: float = 10,
        maxAttempts: int = 4,
        tls: Any = None,
        factory: Factory | None = None,
        bindAddresses: tuple[str, ...] = (),
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.connector = Connector(
            self.reactor, timeout, bindAddresses, maxAttempts=maxAttempts
        )
        self.factory = factory or Factory.forProtocol(Protocol)
        self.result: Deferred = self.connector.connect(
            destination(*addresses), self.factory, tls
        )

    def attempted(self) -> list[str]:
        return [client[0] for client in self.reactor.tcpClients]

    def refuse(self, index: int) -> None:
        factory = self.reactor.tcpClients[index][2]
        factory.clientConnectionFailed(
            self.reactor.connectors[index],
            Failure(getConnectError((111, "Connection refused"))),
        )

    def accept(self, index: int) -> Protocol:
        host, port, factory = self.reactor.tcpClients[index][:3]
        kind = IPv6Address if ":" in host else IPv4Address
        protocol = factory.buildProtocol(kind("TCP", host, port))
        protocol.makeConnection(StringTransport(peerAddress=kind("TCP", host, port)))
        return protocol

    def stopped(self) -> list[bool]:
        return [c.stoppedConnecting for c in self.reactor.connectors]


class AttemptOrderTests(SynchronousTestCase):
    """
    L{attemptOrder}: which addresses are tried, in what order.
    """

    def test_interleavesFromFirstFamily(self) -> None:
        """
        The families alternate, starting with the first address's, each in
        the order it came; the longer family's rest comes last.
        """
        self.assertEqual(
            attemptOrder([v6(1), v6(2), v6(3), v4(1)], 10), (v6(1), v4(1), v6(2), v6(3))
        )
        self.assertEqual(
            attemptOrder([v4(1), v4(2), v6(1), v6(2)], 10), (v4(1), v6(1), v4(2), v6(2))
        )

    def test_capAfterInterleaving(self) -> None:
        """
        The cap applies after interleaving, so one IPv4 answer behind many
        IPv6 ones is still tried.
        """
        addresses = [v6(n) for n in range(1, 60)] + [v4(1)]
        self.assertEqual(attemptOrder(addresses, 2), (v6(1), v4(1)))
        self.assertEqual(len(attemptOrder(addresses, 4)), 4)

    def test_candidatesKeepsObject(self) -> None:
        """
        L{Connector.candidates} returns the destination itself when nothing
        changes, and otherwise the same destination with fewer addresses.
        """
        connector = Connector(MemoryReactorClock(), 10, maxAttempts=2)
        small = destination(v4(1), v6(1))
        self.assertIs(connector.candidates(small), small)
        narrowed = connector.candidates(destination(v4(1), v4(2), v6(1)))
        self.assertEqual(narrowed, destination(v4(1), v6(1)))


class HappyEyeballsTests(SynchronousTestCase):
    """
    L{Connector.connect} races the addresses with an attempt delay, a cap
    and one deadline.
    """

    def test_sixtyAddressesCapped(self) -> None:
        """
        Sixty silent addresses give at most C{maxAttempts} connection
        attempts over the whole connect phase.
        """
        race = Race([v4(n) for n in range(1, 61)], timeout=30)
        race.reactor.pump([0.25] * 200)
        self.assertEqual(race.attempted(), [v4(1), v4(2), v4(3), v4(4)])
        self.failureResultOf(race.result, ProxyError)

    def test_sixtyRefusedCapped(self) -> None:
        """
        Sixty refusing addresses give C{maxAttempts} attempts, each started
        as soon as the one before is refused, and a 502 naming them.
        """
        race = Race([v4(n) for n in range(1, 61)], maxAttempts=3)
        for index in range(3):
            race.refuse(index)
        self.assertEqual(race.attempted(), [v4(1), v4(2), v4(3)])
        error = self.failureResultOf(race.result, ProxyError).value
        self.assertEqual(error.reason, Reason.CONNECT_FAILED)
        self.assertEqual(
            error.message,
            "TCP connection to origin.example:80 failed on all 3 addresses tried "
            "(203.0.113.1, 203.0.113.2, 203.0.113.3), the last: Connection refused",
        )

    def test_attemptDelayAndOrder(self) -> None:
        """
        The first attempt starts at once, each next one after the attempt
        delay (250 ms) while the earlier ones are pending, the families
        interleaved.
        """
        race = Race([v6(1), v6(2), v4(1), v4(2)])
        self.assertEqual(race.attempted(), [v6(1)])
        race.reactor.advance(0.249)
        self.assertEqual(race.attempted(), [v6(1)])
        race.reactor.advance(0.001)
        self.assertEqual(race.attempted(), [v6(1), v4(1)])
        race.reactor.advance(0.25)
        self.assertEqual(race.attempted(), [v6(1), v4(1), v6(2)])
        race.reactor.advance(0.25)
        self.assertEqual(race.attempted(), [v6(1), v4(1), v6(2), v4(2)])
        race.reactor.advance(5)
        self.assertEqual(len(race.attempted()), 4)
        self.assertNoResult(race.result)

    def test_failureStartsNext(self) -> None:
        """
        A refused attempt starts the next one at once, and the delay
        restarts from then.
        """
        race = Race([v4(1), v4(2), v4(3)])
        race.reactor.advance(0.1)
        race.refuse(0)
        self.assertEqual(race.attempted(), [v4(1), v4(2)])
        race.reactor.advance(0.2)
        self.assertEqual(len(race.attempted()), 2)
        race.reactor.advance(0.05)
        self.assertEqual(race.attempted(), [v4(1), v4(2), v4(3)])

    def test_deadlineWithSilentAddresses(self) -> None:
        """
        Five silent addresses with a 1 s connect timeout: the phase ends at
        1 s, not 5 s, with 504/1004 saying how many addresses were tried,
        and every pending attempt is stopped.
        """
        race = Race([v4(n) for n in range(1, 6)], timeout=1, maxAttempts=5)
        race.reactor.pump([0.25, 0.25, 0.25, 0.249])
        self.assertNoResult(race.result)
        race.reactor.advance(0.001)
        error = self.failureResultOf(race.result, ProxyError).value
        self.assertEqual(error.reason, Reason.UPSTREAM_TIMEOUT)
        self.assertEqual(
            error.message,
            "Connecting to origin.example:80 timed out after 1 s trying 4 addresses "
            "(203.0.113.1, 203.0.113.2, 203.0.113.3, 203.0.113.4)",
        )
        self.assertEqual(race.stopped(), [True] * 4)
        self.assertEqual(race.reactor.getDelayedCalls(), [])

    def test_oneAddressTimeoutMessage(self) -> None:
        """
        With one address the timeout message names it, as before.
        """
        race = Race([v4(1)], timeout=2)
        race.reactor.advance(2)
        self.assertEqual(
            self.failureResultOf(race.result, ProxyError).value.message,
            "Connecting to origin.example:80 (203.0.113.1) timed out after 2 s",
        )

    def test_winnerCancelsLosers(self) -> None:
        """
        The first attempt to connect wins: the pending ones are stopped, no
        further attempt starts and no timer is left.
        """
        race = Race([v4(1), v6(1), v4(2), v6(2)])
        race.reactor.pump([0.25, 0.25])
        self.assertEqual(len(race.attempted()), 3)
        race.accept(1)
        self.assertEqual(
            self.successResultOf(race.result).transport.getPeer().host, v6(1)
        )
        self.assertEqual(race.stopped(), [True, False, True])
        self.assertEqual(race.reactor.getDelayedCalls(), [])
        race.reactor.advance(30)
        self.assertEqual(len(race.attempted()), 3)

    def test_tlsWrapsWinnerOnly(self) -> None:
        """
        With TLS, every attempt is wrapped, but TLS starts only on a made
        connection: the winner's protocol runs over TLS and its ClientHello
        is written, and a loser, stopped before it connected, never builds
        a protocol at all.
        """
        built: list[Protocol] = []

        class Recording(Protocol):
            def connectionMade(self) -> None:
                built.append(self)

        race = Race(
            [v4(1), v4(2)],
            tls=optionsForClientTLS("origin.example"),
            factory=Factory.forProtocol(Recording),
        )
        race.reactor.advance(0.25)
        self.assertEqual(race.attempted(), [v4(1), v4(2)])
        wire = race.accept(1).transport
        (protocol,) = built
        self.assertIs(self.successResultOf(race.result), protocol)
        self.assertTrue(ISSLTransport.providedBy(protocol.transport))
        # A TLS record (the ClientHello) went out on the winner's wire.
        self.assertEqual(wire.value()[:1], b"\x16")
        self.assertEqual(race.stopped(), [True, False])

    def test_nameNeverDialled(self) -> None:
        """
        A host name among the addresses (which vetting never lets through)
        is refused by C{connectAddress} and counted as a failed attempt:
        only the IP literal reaches C{connectTCP}.
        """
        race = Race(["evil.example", v4(1)])
        self.assertEqual(race.attempted(), [v4(1)])
        race.refuse(0)
        error = self.failureResultOf(race.result, ProxyError).value
        self.assertIn(
            "failed on all 2 addresses tried (evil.example, 203.0.113.1)", error.message
        )

    def test_cancel(self) -> None:
        """
        Cancelling the connect (the client left) stops every pending
        attempt and leaves no timer.
        """
        race = Race([v4(1), v4(2), v4(3)])
        race.reactor.advance(0.25)
        race.result.cancel()
        self.failureResultOf(race.result, CancelledError)
        self.assertEqual(race.stopped(), [True, True])
        self.assertEqual(race.reactor.getDelayedCalls(), [])
        race.reactor.advance(30)
        self.assertEqual(len(race.attempted()), 2)

    @settings(max_examples=200, deadline=None)
    @given(
        addresses=st.lists(
            st.one_of(
                st.integers(1, 254).map(v4),
                st.integers(1, 0xFFFF).map(v6),
            ),
            min_size=1,
            max_size=60,
            unique=True,
        ),
        maxAttempts=st.integers(1, 6),
        events=st.lists(
            st.tuples(
                st.sampled_from(["advance", "refuse", "accept"]), st.integers(0, 10)
            ),
            max_size=20,
        ),
    )
    def test_invariants(
        self, addresses: list[str], maxAttempts: int, events: list[Any]
    ) -> None:
        """
        Whatever the attempts do: only the given addresses reach
        C{connectTCP}, each at most once, at most C{maxAttempts} of them in
        the order of L{attemptOrder}; at most one connection is made; and
        once the result is in, nothing is pending and no timer is left.
        """
        ordered = list(attemptOrder(addresses, maxAttempts))
        race = Race(ordered, timeout=1, maxAttempts=maxAttempts)
        done: list[int] = []
        accepted = 0
        for kind, number in events:
            live = [
                i
                for i, c in enumerate(race.reactor.connectors)
                if not c.stoppedConnecting and i not in done
            ]
            if kind == "advance":
                race.reactor.advance(number / 20)
            elif live:
                index = live[number % len(live)]
                done.append(index)
                if kind == "refuse":
                    race.refuse(index)
                else:
                    race.accept(index)
                    accepted += 1
        attempted = race.attempted()
        self.assertEqual(attempted, ordered[: len(attempted)])
        self.assertLessEqual(accepted, 1)
        if race.result.called:
            self.assertEqual(race.reactor.getDelayedCalls(), [])
            self.assertTrue(
                all(
                    c.stoppedConnecting or i in done
                    for i, c in enumerate(race.reactor.connectors)
                )
            )
        race.result.addErrback(lambda f: None)


class ProxyConnectTests(SynchronousTestCase):
    """
    The cap and the deadline as a proxied client sees them.
    """

    def test_proxyCapsAttempts(self) -> None:
        """
        A name with sixty A records costs at most C{max_connect_attempts}
        connection attempts, and silent ones end in one 504 within the
        connect timeout.
        """
        h = makeHarness({"origin.example": [v4(n) for n in range(1, 61)]})
        h.send(b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n\r\n")
        h.reactor.pump([0.25] * 39 + [0.249])
        self.assertEqual(h.client.value(), b"")
        h.reactor.advance(0.001)
        self.assertEqual(
            [c[0] for c in h.reactor.tcpClients], [v4(1), v4(2), v4(3), v4(4)]
        )
        status, headers, body = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (504, b"1004"))
        self.assertIn(b"timed out after 10 s trying 4 addresses", body)

    def test_configuredCap(self) -> None:
        """
        C{limits.max_connect_attempts} defaults to 4 and must be at least 1.
        """
        self.assertEqual(Config().limits.max_connect_attempts, 4)
        with self.assertRaises(ConfigError) as raised:
            load({"max-connect-attempts": "0"}, {})
        self.assertIn("max-connect-attempts", str(raised.exception))


class RealSocketTests(TestCase):
    """
    The race over real loopback sockets.
    """

    @inlineCallbacks
    def test_refusedFamilyFallsBack(self) -> Any:
        """
        With an origin on [::1] only, an IPv4 loopback address tried first
        is refused and the IPv6 one connects, well before the attempt delay
        would have started it, and the protocol is connected to [::1].
        """
        from twisted.internet import reactor

        factory = Factory.forProtocol(Protocol)
        port = reactor.listenTCP(0, factory, interface="::1")
        self.addCleanup(port.stopListening)
        connector = Connector(reactor, 5, attemptDelay=2)
        started = reactor.seconds()
        protocol = yield connector.connect(
            VettedDestination(
                "origin.example", port.getHost().port, ("127.0.0.1", "::1")
            ),
            Factory.forProtocol(Protocol),
        )
        elapsed = reactor.seconds() - started
        self.assertEqual(protocol.transport.getPeer().host, "::1")
        self.assertLess(elapsed, 2)
        protocol.transport.loseConnection()


class _ConnectTCPTests:
    """
    What every connect attempt passes to C{connectTCP}, and how it ends,
    for one kind of factory (L{factory}).
    """

    def factory(self) -> Factory:
        raise NotImplementedError()

    def race(self, addresses: list[str], **kwargs: Any) -> Race:
        return Race(addresses, factory=self.factory(), **kwargs)

    def test_bindAddressAndTimeout(self) -> None:
        """
        Each attempt binds the configured address of its family, with the
        connect timeout, and connects to the vetted address itself.
        """
        race = self.race(
            [v4(1), v6(1)], timeout=7, bindAddresses=("2001:db8::99", "192.0.2.9")
        )
        race.reactor.advance(0.25)
        self.assertEqual(
            [(c[0], c[1], c[3], c[4]) for c in race.reactor.tcpClients],
            [
                (v4(1), 80, 7, ("192.0.2.9", 0)),
                (v6(1), 80, 7, ("2001:db8::99", 0)),
            ],
        )

    def test_noBindAddress(self) -> None:
        """
        With no bind address for a family, the kernel chooses the source.
        """
        race = self.race([v4(1), v6(1)], bindAddresses=("192.0.2.9",))
        race.reactor.advance(0.25)
        self.assertEqual(
            [c[4] for c in race.reactor.tcpClients], [("192.0.2.9", 0), None]
        )

    def test_connectTimeout(self) -> None:
        """
        A connect that the reactor times out ends the phase with 504/1004.
        """
        race = self.race([v4(1)], timeout=3)
        race.reactor.tcpClients[0][2].clientConnectionFailed(
            race.reactor.connectors[0], Failure(ConnectTimeoutError())
        )
        error = self.failureResultOf(race.result, ProxyError).value
        self.assertEqual(error.reason, Reason.UPSTREAM_TIMEOUT)
        self.assertEqual(
            error.message,
            "Connecting to origin.example:80 (203.0.113.1) timed out after 3 s",
        )

    def test_deadlineStopsConnecting(self) -> None:
        """
        At the connect timeout on the clock, the pending attempt is stopped.
        """
        race = self.race([v4(1)], timeout=3)
        race.reactor.advance(3)
        self.assertEqual(
            self.failureResultOf(race.result, ProxyError).value.reason,
            Reason.UPSTREAM_TIMEOUT,
        )
        self.assertEqual(race.stopped(), [True])

    def test_refused(self) -> None:
        """
        A refused connect fails with 502/1006 naming the address.
        """
        race = self.race([v4(1)])
        race.refuse(0)
        error = self.failureResultOf(race.result, ProxyError).value
        self.assertEqual(error.reason, Reason.CONNECT_FAILED)
        self.assertEqual(
            error.message,
            "TCP connection to origin.example:80 (203.0.113.1) failed: "
            "Connection refused",
        )

    def test_cancelStopsConnecting(self) -> None:
        """
        Cancelling the connect stops the attempt in progress; it fails with
        L{CancelledError}, however stopping it is reported.
        """
        race = self.race([v4(1)])
        race.result.cancel()
        self.failureResultOf(race.result, CancelledError)
        self.assertEqual(race.stopped(), [True])

    def test_nameNeverDialled(self) -> None:
        """
        Only IP literals reach C{connectTCP}, whatever the factory.
        """
        race = self.race(["evil.example", "203.0.113.1.example", v4(1)])
        self.assertEqual(race.attempted(), [v4(1)])


class EndpointConnectTests(_ConnectTCPTests, SynchronousTestCase):
    """
    A factory of someone else's protocols is connected through Twisted's
    TCP endpoints.
    """

    def factory(self) -> Factory:
        return Factory.forProtocol(Protocol)


class DirectConnectTests(_ConnectTCPTests, SynchronousTestCase):
    """
    An L{OutboundFactory}'s protocols are connected with C{connectTCP}
    itself, with no endpoint wrapper around them, and the same bind
    address, timeout, failures and cancelling.
    """

    def factory(self) -> Factory:
        return UpstreamTunnelFactory()

    def test_protocolIsOurs(self) -> None:
        """
        The connect fires, once the connection is made, with the factory's
        own protocol, which the reactor drives directly; the connect lets
        go of its factory.
        """
        race = self.race([v4(1)])
        self.assertNoResult(race.result)
        connecting = race.reactor.tcpClients[0][2]
        protocol = race.accept(0)
        self.assertIsInstance(protocol, UpstreamTunnel)
        self.assertIs(self.successResultOf(race.result), protocol)
        self.assertIsNone(protocol.connecting)
        self.assertIsNone(connecting.factory)

    def test_lateConnectionBuildsNothing(self) -> None:
        """
        A connection that completes after the connect was given up builds
        no protocol.
        """
        race = self.race([v4(1)], timeout=3)
        race.reactor.advance(3)
        self.failureResultOf(race.result, ProxyError)
        self.assertIsNone(
            race.reactor.tcpClients[0][2].buildProtocol(IPv4Address("TCP", v4(1), 80))
        )

    def test_notFiredBeforeConnectionMade(self) -> None:
        """
        The protocol is handed over only with its transport: a protocol
        built but not yet connected does not fire the connect.
        """
        race = self.race([v4(1)])
        protocol = race.reactor.tcpClients[0][2].buildProtocol(
            IPv4Address("TCP", v4(1), 80)
        )
        self.assertNoResult(race.result)
        protocol.makeConnection(StringTransport())
        self.assertIs(self.successResultOf(race.result), protocol)


class SingleAddressConnectTests(SynchronousTestCase):
    """
    A destination with one vetted address, connected without a parent proxy
    or TLS for an L{OutboundFactory}, is one C{connectTCP} with no race
    around it, under one deadline.
    """

    def test_oneDelayedCall(self) -> None:
        """
        The vetted address is dialled from the bind address of its family;
        the connect deadline is the only delayed call (the reactor gets no
        timeout of its own), and it goes once the connection is made.
        """
        race = Race(
            [v6(1)],
            timeout=7,
            factory=UpstreamTunnelFactory(),
            bindAddresses=("192.0.2.9", "2001:db8::99"),
        )
        self.assertEqual(
            [(c[0], c[1], c[3], c[4]) for c in race.reactor.tcpClients],
            [(v6(1), 80, None, ("2001:db8::99", 0))],
        )
        self.assertEqual(
            [call.getTime() for call in race.reactor.getDelayedCalls()], [7]
        )
        protocol = race.accept(0)
        self.assertIs(self.successResultOf(race.result), protocol)
        self.assertEqual(race.reactor.getDelayedCalls(), [])

    def test_connectorLetsGoOfConnect(self) -> None:
        """
        Once the connection is made, its connector keeps nothing of the
        connect (held for the connection's life, as idle tunnels are by the
        thousand): its factory is one shared by every connection, which
        ends a connection as the connect's own would (the connector lets go
        of its transport).
        """
        races = [Race([v4(1)], factory=UpstreamTunnelFactory()) for _ in range(2)]
        for race in races:
            race.accept(0)
        factories = [race.reactor.connectors[0].factory for race in races]
        self.assertIs(factories[0], factories[1])
        for race in races:
            self.assertIsNot(factories[0], race.reactor.tcpClients[0][2])

        class Connector:
            transport: object = object()

        connector = Connector()
        factories[0].clientConnectionLost(connector, Failure(ConnectionDone()))
        self.assertIsNone(connector.transport)

    def test_deadlineAfterFailure(self) -> None:
        """
        A refused connect cancels the deadline.
        """
        race = Race([v4(1)], factory=UpstreamTunnelFactory())
        race.refuse(0)
        self.failureResultOf(race.result, ProxyError)
        self.assertEqual(race.reactor.getDelayedCalls(), [])

    def test_cancelStopsDeadline(self) -> None:
        """
        Cancelling the connect cancels the deadline too.
        """
        race = Race([v4(1)], factory=UpstreamTunnelFactory())
        race.result.cancel()
        self.failureResultOf(race.result, CancelledError)
        self.assertEqual(race.reactor.getDelayedCalls(), [])
        self.assertEqual(race.stopped(), [True])

    def test_nameNeverDialled(self) -> None:
        """
        A single address that is not an IP literal is never dialled: 502
        with reason code 1006.
        """
        race = Race(["evil.example"], factory=UpstreamTunnelFactory())
        self.assertEqual(race.attempted(), [])
        error = self.failureResultOf(race.result, ProxyError).value
        self.assertEqual(error.reason, Reason.CONNECT_FAILED)


class DirectConnectLoopbackTests(TestCase):
    """
    The direct connect on a real reactor, on loopback.
    """

    @inlineCallbacks
    def test_refusedFamilyFallsBack(self) -> Any:
        """
        An L{UpstreamTunnel} refused on 127.0.0.1 connects on [::1], bound
        to the configured IPv6 address, and is the protocol the reactor
        drives.
        """
        from twisted.internet import reactor

        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="::1")
        self.addCleanup(port.stopListening)
        connector = Connector(reactor, 5, ("::1",), attemptDelay=2)
        protocol = yield connector.connect(
            VettedDestination(
                "origin.example", port.getHost().port, ("127.0.0.1", "::1")
            ),
            UpstreamTunnelFactory(),
        )
        self.assertIsInstance(protocol, UpstreamTunnel)
        self.assertIs(protocol.transport.protocol, protocol)
        self.assertEqual(protocol.transport.getPeer().host, "::1")
        self.assertEqual(protocol.transport.getHost().host, "::1")
        protocol.transport.loseConnection()
