"""
Tests for L{proxy_app.resolver}: the safe resolver, the nameserver resolver
and nameserver parsing.

Everything but L{NameserverIntegrationTests} runs on fakes and a fake
clock; that one class starts a L{twisted.names} server on 127.0.0.1 and
sends it real queries over loopback.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from twisted.names import error as names_error
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from proxy_app.addresses import AddressPolicy
from proxy_app.interfaces import IDestinationResolver
from proxy_app.reasons import Reason
from proxy_app.resolver import (
    CachingResolver,
    DestinationDenied,
    IExplainedHostResolution,
    NameserverResolver,
    ResolutionFailed,
    SafeResolver,
    VettedDestination,
    makeNameResolver,
    parseNameserver,
)

from .helpers import PluggableMemoryReactor, startNameServer

# Loopback addresses stand in for public ones: the policy below allows
# exactly these, and everything else in 127/8 and 10/8 stays denied by the
# default rules.  Nothing is ever sent to any of them.
ALLOWED_V4 = "127.0.0.2"
ALLOWED_V4_OTHER = "127.0.0.3"
ALLOWED_V6 = "2001:db8::2"
DENIED_V4 = "127.0.0.1"
DENIED_V4_PRIVATE = "10.0.0.1"
DENIED_V6 = "::1"


def makePolicy() -> AddressPolicy:
    """
    The policy every test uses: the default rules, plus a few test
    addresses allowed.
    """
    return AddressPolicy(
        allowRanges=[f"{ALLOWED_V4}/32", f"{ALLOWED_V4_OTHER}/32", f"{ALLOWED_V6}/128"]
    )


def deniedMessage(host: str, port: int, address: str) -> str:
    """
    The deny message the policy's own decision for C{address} produces, in
    the format clients see.
    """
    rule = makePolicy().decide(address, port).rule
    return (
        f"Egress proxying is denied to host '{host}:{port}': "
        f"The destination address ({address}) was denied by rule '{rule}'."
    )


@implementer(IHostResolution)
class FakeResolution:
    """
    The resolution a L{FakeNameResolver} hands out.

    @ivar cancelled: whether C{cancel} was called.
    """

    def __init__(self, name: str, cancellable: bool) -> None:
        self.name = name
        self.cancelled = False
        self._cancellable = cancellable

    def cancel(self) -> None:
        if not self._cancellable:
            # As Twisted's GAIResolver does.
            raise NotImplementedError()
        self.cancelled = True


@implementer(IExplainedHostResolution)
class FakeExplainedResolution(FakeResolution):
    """
    A resolution that can say why it found nothing.
    """

    error = None


class FakeLookup:
    """
    One call to L{FakeNameResolver.resolveHostName}, which the test answers
    when it likes (or never).
    """

    def __init__(
        self,
        receiver,
        hostName,
        portNumber,
        addressTypes,
        transportSemantics,
        resolution,
    ):
        self.receiver = receiver
        self.hostName = hostName
        self.portNumber = portNumber
        self.addressTypes = addressTypes
        self.transportSemantics = transportSemantics
        self.resolution = resolution

    def answer(self, *hosts: str) -> None:
        """
        Deliver each of C{hosts} as an address.
        """
        for host in hosts:
            kind = IPv6Address if ":" in host else IPv4Address
            self.receiver.addressResolved(
                kind(self.transportSemantics, host, self.portNumber)
            )

    def complete(self) -> None:
        self.receiver.resolutionComplete()


@implementer(IHostnameResolver)
class FakeNameResolver:
    """
    An L{IHostnameResolver} that records every lookup and answers only
    when the test says so.

    @ivar calls: the L{FakeLookup}s, in order.
    """

    def __init__(self, cancellable: bool = True, explained: bool = False) -> None:
        self.calls: list[FakeLookup] = []
        self._cancellable = cancellable
        self._explained = explained

    def resolveHostName(
        self,
        resolutionReceiver,
        hostName,
        portNumber=0,
        addressTypes=None,
        transportSemantics="TCP",
    ):
        kind = FakeExplainedResolution if self._explained else FakeResolution
        resolution = kind(hostName, self._cancellable)
        self.calls.append(
            FakeLookup(
                resolutionReceiver,
                hostName,
                portNumber,
                addressTypes,
                transportSemantics,
                resolution,
            )
        )
        resolutionReceiver.resolutionBegan(resolution)
        return resolution


@implementer(IHostnameResolver)
class RebindingNameResolver:
    """
    A name resolver that answers at once, differently each time, as an
    attacker's DNS server would: first something harmless, then an internal
    address.
    """

    def __init__(self, *answers: tuple[str, ...]) -> None:
        self._answers = list(answers)
        self.calls = 0

    def resolveHostName(
        self,
        resolutionReceiver,
        hostName,
        portNumber=0,
        addressTypes=None,
        transportSemantics="TCP",
    ):
        self.calls += 1
        resolution = FakeResolution(hostName, True)
        resolutionReceiver.resolutionBegan(resolution)
        for host in self._answers.pop(0):
            kind = IPv6Address if ":" in host else IPv4Address
            resolutionReceiver.addressResolved(kind("TCP", host, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


@implementer(IHostnameResolver)
class RaisingNameResolver:
    """
    A name resolver that raises instead of starting a lookup.
    """

    def resolveHostName(
        self,
        resolutionReceiver,
        hostName,
        portNumber=0,
        addressTypes=None,
        transportSemantics="TCP",
    ):
        raise OSError("resolver thread pool is gone")


@implementer(IResolutionReceiver)
class RecordingReceiver:
    """
    An L{IResolutionReceiver} that records what it is told.

    @ivar events: C{("began", resolution)}, C{("address", address)} and
        C{("complete",)} tuples, in order.
    """

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def resolutionBegan(self, resolutionInProgress):
        self.events.append(("began", resolutionInProgress))

    def addressResolved(self, address):
        self.events.append(("address", address))

    def resolutionComplete(self):
        self.events.append(("complete",))

    @property
    def addresses(self) -> list:
        return [event[1] for event in self.events if event[0] == "address"]

    @property
    def completed(self) -> bool:
        return ("complete",) in self.events


class SafeResolverVetTests(SynchronousTestCase):
    """
    Tests for L{SafeResolver.vet}.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.names = FakeNameResolver()
        self.resolver = SafeResolver(makePolicy(), self.names, self.clock)

    def test_interfaces(self) -> None:
        """
        L{SafeResolver} provides L{IDestinationResolver} and
        L{IHostnameResolver}.
        """
        self.assertTrue(verifyObject(IDestinationResolver, self.resolver))
        self.assertTrue(verifyObject(IHostnameResolver, self.resolver))

    def test_resolvesOnceForBothFamilies(self) -> None:
        """
        C{vet} asks the name resolver once, for the host and port, over TCP,
        with no restriction on address family.
        """
        self.resolver.vet("www.example", 8443)
        [call] = self.names.calls
        self.assertEqual(
            (
                call.hostName,
                call.portNumber,
                call.addressTypes,
                call.transportSemantics,
            ),
            ("www.example", 8443, None, "TCP"),
        )

    def test_mixedAnswers(self) -> None:
        """
        When some answers are allowed and some denied, the allowed ones are
        kept in the order they came, once each, and the denied ones are
        recorded with the policy's decisions.
        """
        d = self.resolver.vet("mixed.example", 443)
        [call] = self.names.calls
        call.answer(
            DENIED_V4,
            ALLOWED_V4,
            ALLOWED_V6,
            DENIED_V4_PRIVATE,
            ALLOWED_V4_OTHER,
            ALLOWED_V4,
        )
        self.assertNoResult(d)
        call.complete()
        vetted = self.successResultOf(d)
        self.assertIsInstance(vetted, VettedDestination)
        self.assertEqual(
            (vetted.host, vetted.port, vetted.addresses),
            ("mixed.example", 443, (ALLOWED_V4, ALLOWED_V6, ALLOWED_V4_OTHER)),
        )
        self.assertEqual(
            [(decision.address, decision.allowed) for decision in vetted.denied],
            [(DENIED_V4, False), (DENIED_V4_PRIVATE, False)],
        )

    def test_answersCanonicalized(self) -> None:
        """
        Addresses are kept in canonical text, so the same address written
        two ways counts once.
        """
        d = self.resolver.vet("v6.example", 443)
        [call] = self.names.calls
        call.answer("2001:DB8:0:0:0:0:0:2", ALLOWED_V6)
        call.complete()
        self.assertEqual(self.successResultOf(d).addresses, (ALLOWED_V6,))

    def test_allDenied(self) -> None:
        """
        When every answer is denied, C{vet} fails with L{DestinationDenied}
        naming the host, the first denied address and its rule, with reason
        code 1000.
        """
        d = self.resolver.vet("internal.example", 443)
        [call] = self.names.calls
        call.answer(DENIED_V4, DENIED_V4_PRIVATE)
        call.complete()
        error = self.failureResultOf(d, DestinationDenied).value
        self.assertEqual(
            error.message, deniedMessage("internal.example", 443, DENIED_V4)
        )
        self.assertEqual(error.decision.address, DENIED_V4)
        self.assertEqual((error.host, error.port), ("internal.example", 443))
        self.assertEqual(error.reason, Reason.BLOCKED_ADDRESS)

    def test_noAnswers(self) -> None:
        """
        A lookup that completes with no answers fails with
        L{ResolutionFailed} saying so, with reason code 1001.
        """
        d = self.resolver.vet("empty.example", 80)
        self.names.calls[0].complete()
        error = self.failureResultOf(d, ResolutionFailed).value
        self.assertEqual(
            error.message, "DNS lookup of 'empty.example' returned no addresses"
        )
        self.assertEqual(error.reason, Reason.RESOLUTION_FAILED)

    def test_lookupErrorNamed(self) -> None:
        """
        When the name resolver's resolution explains why it found nothing,
        the failure names the name and the error.
        """
        names = FakeNameResolver(explained=True)
        resolver = SafeResolver(makePolicy(), names, self.clock)
        d = resolver.vet("x.example", 80)
        [call] = names.calls
        call.resolution.error = names_error.DNSNameError("x.example")
        call.complete()
        self.assertEqual(
            self.failureResultOf(d, ResolutionFailed).value.message,
            "DNS lookup of 'x.example' failed: domain name not found",
        )

    def test_lookupRaises(self) -> None:
        """
        A name resolver that raises instead of resolving makes C{vet} fail
        with L{ResolutionFailed} naming the name and the error, and leaves no
        timer behind.
        """
        resolver = SafeResolver(makePolicy(), RaisingNameResolver(), self.clock)
        d = resolver.vet("x.example", 80)
        self.assertEqual(
            self.failureResultOf(d, ResolutionFailed).value.message,
            "DNS lookup of 'x.example' failed: resolver thread pool is gone",
        )
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout(self) -> None:
        """
        A lookup still unanswered after the timeout fails with
        L{ResolutionFailed} saying so, and the underlying resolution is
        cancelled; answers arriving afterwards are ignored.
        """
        d = self.resolver.vet("slow.example", 443)
        [call] = self.names.calls
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.assertFalse(call.resolution.cancelled)
        self.clock.advance(0.1)
        self.assertEqual(
            self.failureResultOf(d, ResolutionFailed).value.message,
            "DNS lookup of 'slow.example' timed out after 5 s",
        )
        self.assertTrue(call.resolution.cancelled)
        call.answer(ALLOWED_V4)
        call.complete()

    def test_timeoutConfigurable(self) -> None:
        """
        The timeout is the one given, and the message shows it.
        """
        resolver = SafeResolver(makePolicy(), self.names, self.clock, timeout=0.25)
        d = resolver.vet("slow.example", 443)
        self.clock.advance(0.25)
        self.assertEqual(
            self.failureResultOf(d, ResolutionFailed).value.message,
            "DNS lookup of 'slow.example' timed out after 0.25 s",
        )

    def test_timeoutUncancellableResolution(self) -> None:
        """
        A resolution that cannot be cancelled (like Twisted's getaddrinfo
        one) still times out, and its late answers are ignored.
        """
        names = FakeNameResolver(cancellable=False)
        resolver = SafeResolver(makePolicy(), names, self.clock)
        d = resolver.vet("slow.example", 443)
        self.clock.advance(5)
        self.failureResultOf(d, ResolutionFailed)
        names.calls[0].answer(ALLOWED_V4)
        names.calls[0].complete()

    def test_timeoutKeepsVettedAnswers(self) -> None:
        """
        If some answers were allowed before the deadline, the lookup
        succeeds with those rather than failing for the slow rest.
        """
        d = self.resolver.vet("half.example", 443)
        [call] = self.names.calls
        call.answer(DENIED_V4, ALLOWED_V4)
        self.clock.advance(5)
        vetted = self.successResultOf(d)
        self.assertEqual(vetted.addresses, (ALLOWED_V4,))
        self.assertEqual(vetted.lookupTime, 5)
        self.assertTrue(call.resolution.cancelled)

    def test_lookupTime(self) -> None:
        """
        C{lookupTime} is the time the lookup took on the clock.
        """
        self.clock.advance(100)
        d = self.resolver.vet("www.example", 443)
        self.clock.advance(1.5)
        self.names.calls[0].answer(ALLOWED_V4)
        self.names.calls[0].complete()
        self.assertEqual(self.successResultOf(d).lookupTime, 1.5)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel(self) -> None:
        """
        Cancelling the L{Deferred} fails it with L{CancelledError}, cancels
        the lookup and its timer, and later answers cause no error.
        """
        d = self.resolver.vet("www.example", 443)
        [call] = self.names.calls
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(call.resolution.cancelled)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        call.answer(ALLOWED_V4)
        call.complete()
        self.clock.advance(10)

    def test_dnsRebinding(self) -> None:
        """
        C{vet} resolves once: a resolver that would answer differently the
        second time is asked only once, and the vetted destination holds
        only what the first answer said.
        """
        names = RebindingNameResolver((ALLOWED_V4,), (DENIED_V4,))
        resolver = SafeResolver(makePolicy(), names, self.clock)
        vetted = self.successResultOf(resolver.vet("rebind.example", 80))
        self.assertEqual(names.calls, 1)
        self.assertEqual(vetted.addresses, (ALLOWED_V4,))
        self.assertEqual(vetted.denied, ())

    def test_lateAnswersIgnored(self) -> None:
        """
        Answers the name resolver delivers after completing do not change
        anything and raise nothing.
        """
        d = self.resolver.vet("www.example", 443)
        [call] = self.names.calls
        call.answer(ALLOWED_V4)
        call.complete()
        call.answer(ALLOWED_V4_OTHER, DENIED_V4)
        call.complete()
        self.assertEqual(self.successResultOf(d).addresses, (ALLOWED_V4,))

    def test_ipLiteralAllowed(self) -> None:
        """
        An allowed IP literal is vetted as it is, without any lookup.
        """
        vetted = self.successResultOf(self.resolver.vet(ALLOWED_V4, 80))
        self.assertEqual(
            vetted, VettedDestination(ALLOWED_V4, 80, (ALLOWED_V4,), (), 0)
        )
        self.assertEqual(self.names.calls, [])

    def test_ipLiteralDenied(self) -> None:
        """
        A denied IP literal fails with L{DestinationDenied}, without any
        lookup.
        """
        d = self.resolver.vet(DENIED_V4, 80)
        self.assertEqual(
            self.failureResultOf(d, DestinationDenied).value.message,
            deniedMessage(DENIED_V4, 80, DENIED_V4),
        )
        self.assertEqual(self.names.calls, [])

    def test_ipLiteralNonCanonical(self) -> None:
        """
        An IP literal in a non-canonical form, with or without brackets, is
        vetted as its canonical address, without any lookup.
        """
        vetted = self.successResultOf(self.resolver.vet("2001:DB8:0::2", 443))
        self.assertEqual(vetted.addresses, (ALLOWED_V6,))
        vetted = self.successResultOf(self.resolver.vet(f"[{ALLOWED_V6}]", 443))
        self.assertEqual(vetted.addresses, (ALLOWED_V6,))
        error = self.failureResultOf(
            self.resolver.vet("0:0:0:0:0:0:0:1", 443), DestinationDenied
        ).value
        self.assertEqual(error.decision.address, DENIED_V6)
        self.assertIn("host '[0:0:0:0:0:0:0:1]:443'", error.message)
        self.assertEqual(self.names.calls, [])

    def test_vetNow(self) -> None:
        """
        C{vetNow} answers IP literals at once, as C{vet} does, raises for a
        denied or malformed one, and leaves names (None) to C{vet}.
        """
        self.assertEqual(
            self.resolver.vetNow(ALLOWED_V4, 80),
            VettedDestination(ALLOWED_V4, 80, (ALLOWED_V4,), (), 0),
        )
        self.assertEqual(self.resolver.vetNow(f"[{ALLOWED_V6}]", 443).addresses, (ALLOWED_V6,))  # type: ignore[union-attr]
        with self.assertRaises(DestinationDenied) as caught:
            self.resolver.vetNow(DENIED_V4, 80)
        self.assertEqual(caught.exception.message, deniedMessage(DENIED_V4, 80, DENIED_V4))
        self.assertRaises(DestinationDenied, self.resolver.vetNow, "1.2.3.999", 80)
        self.assertIsNone(self.resolver.vetNow("www.example", 443))
        self.assertEqual(self.names.calls, [])
        # An allowed literal is a value: vetted once, then remembered.
        self.assertIs(self.resolver.vetNow(ALLOWED_V4, 80), self.resolver.vetNow(ALLOWED_V4, 80))
        self.assertRaises(DestinationDenied, self.resolver.vetNow, DENIED_V4, 80)

    def test_malformedLiteral(self) -> None:
        """
        Numeric-looking garbage is denied without a lookup, rather than
        handed to a resolver that might treat it as a name.
        """
        d = self.resolver.vet("1.2.3.999", 80)
        self.assertEqual(
            self.failureResultOf(d, DestinationDenied).value.message,
            "Egress proxying is denied to host '1.2.3.999:80': The destination "
            "address (1.2.3.999) was denied by rule 'Deny: Not Global Unicast'.",
        )
        self.assertEqual(self.names.calls, [])


class SafeResolverResolveHostNameTests(SynchronousTestCase):
    """
    Tests for L{SafeResolver.resolveHostName}, the L{IHostnameResolver}
    side.
    """

    def setUp(self) -> None:
        self.clock = PluggableMemoryReactor()
        self.names = FakeNameResolver()
        self.resolver = SafeResolver(makePolicy(), self.names, self.clock)
        self.receiver = RecordingReceiver()

    def test_contract(self) -> None:
        """
        The receiver hears C{resolutionBegan} with the returned
        L{IHostResolution}, then C{addressResolved} for each allowed answer
        only, with the port, then C{resolutionComplete}.
        """
        resolution = self.resolver.resolveHostName(self.receiver, "www.example", 443)
        self.assertTrue(verifyObject(IHostResolution, resolution))
        self.assertEqual(resolution.name, "www.example")
        self.assertEqual(self.receiver.events, [("began", resolution)])
        [call] = self.names.calls
        call.answer(DENIED_V4, ALLOWED_V4, DENIED_V6, ALLOWED_V6, ALLOWED_V4)
        self.assertFalse(self.receiver.completed)
        call.complete()
        self.assertEqual(
            self.receiver.events,
            [
                ("began", resolution),
                ("address", IPv4Address("TCP", ALLOWED_V4, 443)),
                ("address", IPv6Address("TCP", ALLOWED_V6, 443)),
                ("complete",),
            ],
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_addressTypesIPv4(self) -> None:
        """
        With C{addressTypes} of only L{IPv4Address}, only IPv4 answers are
        delivered, and the restriction is passed on to the name resolver.
        """
        self.resolver.resolveHostName(
            self.receiver, "www.example", 80, addressTypes=[IPv4Address]
        )
        [call] = self.names.calls
        self.assertEqual(list(call.addressTypes), [IPv4Address])
        call.answer(ALLOWED_V6, ALLOWED_V4)
        call.complete()
        self.assertEqual(self.receiver.addresses, [IPv4Address("TCP", ALLOWED_V4, 80)])

    def test_addressTypesIPv6(self) -> None:
        """
        With C{addressTypes} of only L{IPv6Address}, only IPv6 answers are
        delivered.
        """
        self.resolver.resolveHostName(
            self.receiver, "www.example", 80, addressTypes=[IPv6Address]
        )
        self.names.calls[0].answer(ALLOWED_V4, ALLOWED_V6)
        self.names.calls[0].complete()
        self.assertEqual(self.receiver.addresses, [IPv6Address("TCP", ALLOWED_V6, 80)])

    def test_addressTypesNone(self) -> None:
        """
        With empty C{addressTypes}, nothing is delivered.
        """
        self.resolver.resolveHostName(self.receiver, "www.example", 80, addressTypes=[])
        self.names.calls[0].answer(ALLOWED_V4, ALLOWED_V6)
        self.names.calls[0].complete()
        self.assertEqual(self.receiver.addresses, [])
        self.assertTrue(self.receiver.completed)

    def test_transportSemantics(self) -> None:
        """
        Delivered addresses carry the requested transport semantics.
        """
        self.resolver.resolveHostName(
            self.receiver, "www.example", 53, transportSemantics="UDP"
        )
        [call] = self.names.calls
        self.assertEqual(call.transportSemantics, "UDP")
        call.answer(ALLOWED_V4)
        call.complete()
        self.assertEqual(self.receiver.addresses, [IPv4Address("UDP", ALLOWED_V4, 53)])

    def test_ipLiteral(self) -> None:
        """
        An IP literal is classified directly, without a lookup: an allowed
        one is delivered, a denied one is not, and both complete at once.
        """
        self.resolver.resolveHostName(self.receiver, ALLOWED_V4, 80)
        denied = RecordingReceiver()
        self.resolver.resolveHostName(denied, DENIED_V4, 80)
        self.assertEqual(self.names.calls, [])
        self.assertEqual(self.receiver.addresses, [IPv4Address("TCP", ALLOWED_V4, 80)])
        self.assertTrue(self.receiver.completed)
        self.assertEqual(denied.addresses, [])
        self.assertTrue(denied.completed)

    def test_ipLiteralAddressTypes(self) -> None:
        """
        An allowed IP literal of a family not in C{addressTypes} is not
        delivered.
        """
        self.resolver.resolveHostName(
            self.receiver, ALLOWED_V6, 80, addressTypes=[IPv4Address]
        )
        self.assertEqual(self.receiver.addresses, [])
        self.assertTrue(self.receiver.completed)

    def test_cancel(self) -> None:
        """
        Cancelling the resolution cancels the underlying one and its timer;
        the receiver hears nothing more.
        """
        resolution = self.resolver.resolveHostName(self.receiver, "www.example", 80)
        [call] = self.names.calls
        resolution.cancel()
        self.assertTrue(call.resolution.cancelled)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        call.answer(ALLOWED_V4)
        call.complete()
        self.assertEqual(self.receiver.events, [("began", resolution)])

    def test_cancelOnBegan(self) -> None:
        """
        A receiver that cancels from within C{resolutionBegan} starts no
        lookup and hears nothing more.
        """

        class Cancelling(RecordingReceiver):
            def resolutionBegan(self, resolutionInProgress):
                super().resolutionBegan(resolutionInProgress)
                resolutionInProgress.cancel()

        receiver = Cancelling()
        self.resolver.resolveHostName(receiver, "www.example", 80)
        self.resolver.resolveHostName(receiver, ALLOWED_V4, 80)
        self.assertEqual(self.names.calls, [])
        self.assertEqual([event[0] for event in receiver.events], ["began", "began"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout(self) -> None:
        """
        After the timeout the resolution completes with what was delivered
        so far, and the underlying resolution is cancelled.
        """
        self.resolver.resolveHostName(self.receiver, "www.example", 80)
        [call] = self.names.calls
        call.answer(ALLOWED_V4)
        self.clock.advance(5)
        self.assertTrue(call.resolution.cancelled)
        call.answer(ALLOWED_V4_OTHER)
        call.complete()
        self.assertEqual(self.receiver.addresses, [IPv4Address("TCP", ALLOWED_V4, 80)])
        self.assertEqual(self.receiver.events[-1], ("complete",))
        self.assertEqual(self.receiver.events.count(("complete",)), 1)

    def test_hostnameEndpoint(self) -> None:
        """
        Installed as a reactor's name resolver, L{SafeResolver} makes
        L{HostnameEndpoint} connect only to allowed addresses.
        """
        self.clock.installNameResolver(self.resolver)
        endpoint = HostnameEndpoint(self.clock, b"www.example", 443)
        d = endpoint.connect(Factory.forProtocol(Protocol))
        [call] = self.names.calls
        call.answer(DENIED_V4, ALLOWED_V4)
        call.complete()
        # Let the endpoint's connection attempts start.
        self.clock.advance(1)
        self.assertEqual(
            [(host, port) for host, port, *_ in self.clock.tcpClients],
            [(ALLOWED_V4, 443)],
        )
        d.cancel()
        self.failureResultOf(d)


class FakeDNSClient:
    """
    A stand-in for L{twisted.names.client.Resolver} that offers only the
    two lookups L{NameserverResolver} may use, and lets the test answer
    them.

    @ivar queries: C{(method, name, Deferred)} for each query.
    """

    def __init__(self) -> None:
        self.queries: list[tuple[str, str, Deferred]] = []

    def lookupAddress(self, name, timeout=None):
        d = Deferred()
        self.queries.append(("lookupAddress", name, d))
        return d

    def lookupIPV6Address(self, name, timeout=None):
        d = Deferred()
        self.queries.append(("lookupIPV6Address", name, d))
        return d


def rr(name: bytes, payload) -> dns.RRHeader:
    """
    An answer record.
    """
    return dns.RRHeader(name, payload.TYPE, dns.IN, 60, payload)


def answer(*records: dns.RRHeader) -> tuple[list, list, list]:
    return (list(records), [], [])


class NameserverResolverTests(SynchronousTestCase):
    """
    Tests for L{NameserverResolver} with a fake DNS client.
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.dnsClient = FakeDNSClient()
        self.resolver = NameserverResolver(
            [("127.0.0.1", 5353)], self.clock, dnsClient=self.dnsClient
        )
        self.receiver = RecordingReceiver()

    def query(self, method: str) -> Deferred:
        [d] = [d for m, _, d in self.dnsClient.queries if m == method]
        return d

    def test_interface(self) -> None:
        """
        L{NameserverResolver} provides L{IHostnameResolver}, and its
        resolutions provide L{IExplainedHostResolution}.
        """
        self.assertTrue(verifyObject(IHostnameResolver, self.resolver))
        resolution = self.resolver.resolveHostName(self.receiver, "www.example")
        self.assertTrue(verifyObject(IExplainedHostResolution, resolution))

    def test_queriesAAndAAAA(self) -> None:
        """
        One A and one AAAA query go out at once, and each answer is
        delivered as it comes back; the resolution completes when both are
        in.
        """
        resolution = self.resolver.resolveHostName(self.receiver, "www.example", 443)
        self.assertEqual(
            [(m, name) for m, name, _ in self.dnsClient.queries],
            [
                ("lookupAddress", "www.example"),
                ("lookupIPV6Address", "www.example"),
            ],
        )
        self.query("lookupIPV6Address").callback(
            answer(rr(b"www.example", dns.Record_AAAA("2001:db8::5")))
        )
        self.assertEqual(
            self.receiver.events,
            [
                ("began", resolution),
                ("address", IPv6Address("TCP", "2001:db8::5", 443)),
            ],
        )
        self.query("lookupAddress").callback(
            answer(
                rr(b"www.example", dns.Record_A("192.0.2.5")),
                rr(b"www.example", dns.Record_A("192.0.2.6")),
            )
        )
        self.assertEqual(
            self.receiver.events[2:],
            [
                ("address", IPv4Address("TCP", "192.0.2.5", 443)),
                ("address", IPv4Address("TCP", "192.0.2.6", 443)),
                ("complete",),
            ],
        )
        self.assertIsNone(resolution.error)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_followsCNAMEs(self) -> None:
        """
        Addresses are taken for the queried name and the names its CNAME
        chain leads to (in any order), and only of the queried type;
        records for other names are ignored.
        """
        self.resolver.resolveHostName(
            self.receiver, "Alias.Example.", 80, addressTypes=[IPv4Address]
        )
        self.query("lookupAddress").callback(
            answer(
                rr(b"other.example", dns.Record_A("192.0.2.66")),
                rr(b"middle.example", dns.Record_CNAME(b"edge.example.")),
                rr(b"edge.example", dns.Record_A("192.0.2.7")),
                rr(b"alias.example", dns.Record_CNAME(b"middle.example")),
                rr(b"edge.example", dns.Record_AAAA("2001:db8::7")),
                rr(b"EDGE.example", dns.Record_A("192.0.2.8")),
            )
        )
        self.assertEqual(
            self.receiver.addresses,
            [IPv4Address("TCP", "192.0.2.7", 80), IPv4Address("TCP", "192.0.2.8", 80)],
        )

    def test_addressTypes(self) -> None:
        """
        Only the queries C{addressTypes} asks for are sent; with none, the
        resolution completes at once.
        """
        self.resolver.resolveHostName(
            self.receiver, "www.example", addressTypes=[IPv6Address]
        )
        self.resolver.resolveHostName(
            RecordingReceiver(), "v4.example", addressTypes=[IPv4Address]
        )
        nothing = RecordingReceiver()
        self.resolver.resolveHostName(nothing, "none.example", addressTypes=[])
        self.assertEqual(
            [(m, name) for m, name, _ in self.dnsClient.queries],
            [("lookupIPV6Address", "www.example"), ("lookupAddress", "v4.example")],
        )
        self.assertEqual(nothing.events[1:], [("complete",)])

    def test_internationalName(self) -> None:
        """
        A name with non-ASCII characters is queried in its IDNA form, and
        answers for that form are delivered.
        """
        self.resolver.resolveHostName(
            self.receiver, "bücher.example", 80, addressTypes=[IPv4Address]
        )
        [(_, name, d)] = self.dnsClient.queries
        self.assertEqual(name, "xn--bcher-kva.example")
        d.callback(answer(rr(b"xn--bcher-kva.example", dns.Record_A("192.0.2.4"))))
        self.assertEqual(self.receiver.addresses, [IPv4Address("TCP", "192.0.2.4", 80)])

    def test_unencodableName(self) -> None:
        """
        A name that cannot be IDNA-encoded is not queried; the resolution
        completes at once, explaining why.
        """
        resolution = self.resolver.resolveHostName(
            self.receiver, "a" * 64 + ".example", 80
        )
        self.assertEqual(self.dnsClient.queries, [])
        self.assertEqual(self.receiver.events[1:], [("complete",)])
        self.assertIsInstance(resolution.error, UnicodeError)

    def test_oneFamilyFails(self) -> None:
        """
        If one query fails but the other answers, the answers count and the
        resolution reports no error.
        """
        resolution = self.resolver.resolveHostName(self.receiver, "v4.example", 80)
        self.query("lookupIPV6Address").errback(names_error.DNSNameError())
        self.query("lookupAddress").callback(
            answer(rr(b"v4.example", dns.Record_A("192.0.2.9")))
        )
        self.assertEqual(self.receiver.addresses, [IPv4Address("TCP", "192.0.2.9", 80)])
        self.assertTrue(self.receiver.completed)
        self.assertIsNone(resolution.error)

    def test_bothFail(self) -> None:
        """
        If both queries fail, the resolution completes with no addresses and
        its C{error} is the A query's failure.
        """
        resolution = self.resolver.resolveHostName(self.receiver, "x.example", 80)
        self.query("lookupAddress").errback(names_error.DNSNameError())
        self.query("lookupIPV6Address").errback(names_error.DNSServerError())
        self.assertEqual(self.receiver.events[1:], [("complete",)])
        self.assertIsInstance(resolution.error, names_error.DNSNameError)

    def test_vetNamesTheError(self) -> None:
        """
        Through L{SafeResolver.vet}, a name that does not exist fails with
        a message naming the name and the error.
        """
        safe = SafeResolver(makePolicy(), self.resolver, self.clock)
        d = safe.vet("x.example", 443)
        self.query("lookupAddress").errback(names_error.DNSNameError())
        self.query("lookupIPV6Address").errback(names_error.DNSNameError())
        self.assertEqual(
            self.failureResultOf(d, ResolutionFailed).value.message,
            "DNS lookup of 'x.example' failed: domain name not found",
        )

    def test_vetServerFailure(self) -> None:
        """
        A server failure is named as such.
        """
        safe = SafeResolver(makePolicy(), self.resolver, self.clock)
        d = safe.vet("x.example", 443)
        self.query("lookupAddress").errback(names_error.DNSServerError())
        self.query("lookupIPV6Address").callback(answer())
        self.assertEqual(
            self.failureResultOf(d, ResolutionFailed).value.message,
            "DNS lookup of 'x.example' failed: the server failed (SERVFAIL)",
        )

    def test_deadline(self) -> None:
        """
        If the queries are not all back within the timeout, the resolution
        completes with what came back, and says it timed out if nothing did.
        """
        resolution = self.resolver.resolveHostName(self.receiver, "slow.example")
        self.clock.advance(4.9)
        self.assertFalse(self.receiver.completed)
        self.clock.advance(0.1)
        self.assertTrue(self.receiver.completed)
        self.assertIsInstance(resolution.error, defer.TimeoutError)
        # Late answers are ignored.
        self.query("lookupAddress").callback(
            answer(rr(b"slow.example", dns.Record_A("192.0.2.9")))
        )
        self.assertEqual(self.receiver.addresses, [])

    def test_deadlineAfterFailure(self) -> None:
        """
        If one query failed and the other is still out at the deadline, the
        resolution's error is the failure, which says more than the timeout.
        """
        resolution = self.resolver.resolveHostName(self.receiver, "x.example")
        self.query("lookupAddress").errback(names_error.DNSNameError())
        self.clock.advance(5)
        self.assertTrue(self.receiver.completed)
        self.assertIsInstance(resolution.error, names_error.DNSNameError)

    def test_cancelDetaches(self) -> None:
        """
        Cancelling the resolution stops delivery but leaves the queries
        running, because L{twisted.names.client.Resolver} shares a query
        among identical lookups in flight.
        """
        resolution = self.resolver.resolveHostName(self.receiver, "www.example", 80)
        resolution.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        for _, _, d in self.dnsClient.queries:
            self.assertFalse(d.called)
            d.callback(answer(rr(b"www.example", dns.Record_A("192.0.2.5"))))
        self.assertEqual(self.receiver.events, [("began", resolution)])

    def test_ipLiteral(self) -> None:
        """
        An IP literal is reported as it is, without a query.
        """
        self.resolver.resolveHostName(self.receiver, "192.0.2.1", 80)
        self.assertEqual(self.dnsClient.queries, [])
        self.assertEqual(self.receiver.addresses, [IPv4Address("TCP", "192.0.2.1", 80)])
        self.assertTrue(self.receiver.completed)

    def test_realClientNeverReadsResolvConf(self) -> None:
        """
        The L{twisted.names.client.Resolver} built from the servers has no
        C{resolv.conf} to read, schedules no re-reading of one, and gives up
        retrying within the timeout.
        """
        resolver = NameserverResolver(
            [("127.0.0.1", 53), ("::1", 5353)], self.clock, timeout=4
        )
        dnsClient = resolver._dnsClient
        self.assertIsNone(dnsClient.resolv)
        self.assertEqual(dnsClient.servers, [("127.0.0.1", 53), ("::1", 5353)])
        self.assertEqual(list(dnsClient.dynServers), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertLessEqual(sum(dnsClient.timeout) * 2, 4)

    def test_noServers(self) -> None:
        """
        A L{NameserverResolver} needs at least one server.
        """
        self.assertRaises(ValueError, NameserverResolver, [], self.clock)


class ParseNameserverTests(SynchronousTestCase):
    """
    Tests for L{parseNameserver}.
    """

    def test_valid(self) -> None:
        """
        IPv4 with and without a port, IPv6 bare or bracketed with and
        without a port, are accepted; the port defaults to 53 and the
        address comes back canonical.
        """
        cases = {
            "192.0.2.53": ("192.0.2.53", 53),
            "192.0.2.53:5353": ("192.0.2.53", 5353),
            " 127.0.0.1:53 ": ("127.0.0.1", 53),
            "2001:DB8::53": ("2001:db8::53", 53),
            "::1": ("::1", 53),
            "[2001:db8::53]": ("2001:db8::53", 53),
            "[2001:db8:0::53]:5353": ("2001:db8::53", 5353),
        }
        self.assertEqual({text: parseNameserver(text) for text in cases}, cases)

    def test_hostName(self) -> None:
        """
        A host name is refused, saying the nameserver must be an IP address.
        """
        for text in ["dns.example", "dns.example:53", "[dns.example]:53"]:
            error = self.assertRaises(ValueError, parseNameserver, text)
            self.assertIn("must be an IP address", str(error))
            self.assertIn(repr(text), str(error))

    def test_badPort(self) -> None:
        """
        A port that is not a number from 1 to 65535 is refused.
        """
        for text in [
            "192.0.2.1:",
            "192.0.2.1:0",
            "192.0.2.1:65536",
            "192.0.2.1:dns",
            "192.0.2.1:+53",
            "192.0.2.1:٥٣",
            "[::1]:",
        ]:
            error = self.assertRaises(ValueError, parseNameserver, text)
            self.assertIn("invalid port", str(error))

    def test_malformed(self) -> None:
        """
        Empty input, unbalanced brackets, junk after the brackets and
        bracketed IPv4 are refused.
        """
        for text in ["", "  ", "[::1", "[::1]53", "[192.0.2.1]:53", "1.2.3.4:5:6"]:
            self.assertRaises(ValueError, parseNameserver, text)


class MakeNameResolverTests(SynchronousTestCase):
    """
    Tests for L{makeNameResolver}.
    """

    def test_system(self) -> None:
        """
        With no nameservers, the reactor's own name resolver is used.
        """
        reactor = PluggableMemoryReactor()
        self.assertIs(makeNameResolver([], reactor), reactor.nameResolver)

    def test_nameservers(self) -> None:
        """
        With nameservers, a L{NameserverResolver} asking them is returned.
        """
        reactor = MemoryReactorClock()
        resolver = makeNameResolver(["127.0.0.1:5353", "[::1]"], reactor)
        self.assertIsInstance(resolver, NameserverResolver)
        self.assertEqual(
            resolver._dnsClient.servers, [("127.0.0.1", 5353), ("::1", 53)]
        )

    def test_badNameserver(self) -> None:
        """
        A malformed nameserver is refused.
        """
        self.assertRaises(
            ValueError, makeNameResolver, ["dns.example"], MemoryReactorClock()
        )


ZONE = b"example.test"


RECORDS = {
    b"www." + ZONE: [
        dns.Record_A(ALLOWED_V4),
        dns.Record_A(DENIED_V4_PRIVATE),
        dns.Record_AAAA(ALLOWED_V6),
    ],
    b"alias." + ZONE: [dns.Record_CNAME(b"www." + ZONE)],
    b"v4only." + ZONE: [dns.Record_A(ALLOWED_V4_OTHER)],
    b"internal." + ZONE: [dns.Record_A(DENIED_V4)],
    b"ttl." + ZONE: [dns.Record_A(ALLOWED_V4, ttl=7)],
}


class NameserverIntegrationTests(TestCase):
    """
    L{NameserverResolver} and L{SafeResolver} against a real
    L{twisted.names} server on 127.0.0.1, over loopback UDP.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        port = startNameServer(reactor, ZONE, RECORDS)
        self.addCleanup(port.stopListening)
        names = NameserverResolver(
            [("127.0.0.1", port.getHost().port)], reactor, timeout=5
        )
        self.names = names
        self.safe = SafeResolver(makePolicy(), names, reactor, timeout=5)

    def resolve(self, name: str) -> Deferred[RecordingReceiver]:
        """
        Resolve C{name} through the bare L{NameserverResolver}.
        """
        done: Deferred[RecordingReceiver] = Deferred()

        class Receiver(RecordingReceiver):
            def resolutionComplete(self):
                super().resolutionComplete()
                done.callback(self)

        self.names.resolveHostName(Receiver(), name, 80)
        return done

    @defer.inlineCallbacks
    def test_aAndAAAA(self):
        """
        A and AAAA answers both come back through L{NameserverResolver},
        unfiltered.
        """
        receiver = yield self.resolve("www.example.test")
        self.assertEqual(
            sorted(address.host for address in receiver.addresses),
            sorted([ALLOWED_V4, DENIED_V4_PRIVATE, ALLOWED_V6]),
        )

    @defer.inlineCallbacks
    def test_vetThroughCNAME(self):
        """
        L{SafeResolver.vet} follows a CNAME to both families' addresses,
        keeping the allowed ones and recording the denied one.
        """
        vetted = yield self.safe.vet("alias.example.test", 443)
        self.assertEqual(sorted(vetted.addresses), sorted([ALLOWED_V4, ALLOWED_V6]))
        self.assertEqual(
            [decision.address for decision in vetted.denied], [DENIED_V4_PRIVATE]
        )

    @defer.inlineCallbacks
    def test_vetIPv4Only(self):
        """
        A name with no AAAA record vets to its A record.
        """
        vetted = yield self.safe.vet("v4only.example.test", 443)
        self.assertEqual(vetted.addresses, (ALLOWED_V4_OTHER,))

    @defer.inlineCallbacks
    def test_vetCarriesTTL(self):
        """
        The records' TTL comes back with the vetted answer, for the cache.
        """
        vetted = yield self.safe.vet("ttl.example.test", 443)
        self.assertEqual(vetted.ttl, 7)

    @defer.inlineCallbacks
    def test_vetDenied(self):
        """
        A name whose only address is denied fails with L{DestinationDenied}.
        """
        error = yield self.assertFailure(
            self.safe.vet("internal.example.test", 443), DestinationDenied
        )
        self.assertEqual(
            error.message, deniedMessage("internal.example.test", 443, DENIED_V4)
        )

    @defer.inlineCallbacks
    def test_vetNXDOMAIN(self):
        """
        A name the server does not know fails with L{ResolutionFailed}
        saying the domain name was not found.
        """
        error = yield self.assertFailure(
            self.safe.vet("missing.example.test", 443), ResolutionFailed
        )
        self.assertEqual(
            error.message,
            "DNS lookup of 'missing.example.test' failed: domain name not found",
        )


class _CountingResolver:
    """
    Vets from a table, counting lookups; C{answers[host]} is a
    VettedDestination factory result or an exception.
    """

    def __init__(self, ttl: float | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.ttl = ttl
        self.fail = False

    def vetNow(self, host: str, port: int) -> VettedDestination | None:
        # Names only: every answer takes a lookup.
        return None

    def vet(self, host: str, port: int) -> Deferred:
        self.calls.append((host, port))
        if self.fail:
            return defer.fail(ResolutionFailed(host, "nope"))
        return defer.succeed(
            VettedDestination(host, port, ("203.0.113.9",), lookupTime=0.2, ttl=self.ttl)
        )


class CachingResolverTests(SynchronousTestCase):
    """
    L{CachingResolver} reuses vetted answers, within their TTL.
    """

    def test_hitWithinTTL(self) -> None:
        """
        A second vet of the same host and port within the TTL does not look
        up again, and reports no lookup time; after it, it looks up again.
        """
        clock = MemoryReactorClock()
        inner = _CountingResolver()
        cache = CachingResolver(inner, clock, maxTTL=30)
        verifyObject(IDestinationResolver, cache)
        first = self.successResultOf(cache.vet("hooks.example", 443))
        clock.advance(29)
        second = self.successResultOf(cache.vet("hooks.example", 443))
        self.assertEqual(len(inner.calls), 1)
        self.assertEqual(second.addresses, first.addresses)
        self.assertEqual(second.lookupTime, 0.0)
        clock.advance(2)
        self.successResultOf(cache.vet("hooks.example", 443))
        self.assertEqual(len(inner.calls), 2)

    def test_vetNow(self) -> None:
        """
        C{vetNow} gives a cached answer within its TTL and nothing after it
        (or before the first lookup), without looking anything up.
        """
        clock = MemoryReactorClock()
        inner = _CountingResolver()
        cache = CachingResolver(inner, clock, maxTTL=30)
        self.assertIsNone(cache.vetNow("hooks.example", 443))
        first = self.successResultOf(cache.vet("hooks.example", 443))
        clock.advance(29)
        self.assertEqual(cache.vetNow("hooks.example", 443).addresses, first.addresses)  # type: ignore[union-attr]
        self.assertIsNone(cache.vetNow("hooks.example", 80))
        clock.advance(2)
        self.assertIsNone(cache.vetNow("hooks.example", 443))
        self.assertEqual(len(inner.calls), 1)

    def test_recordTTLShorter(self) -> None:
        """
        A DNS TTL shorter than the cap wins.
        """
        clock = MemoryReactorClock()
        inner = _CountingResolver(ttl=5)
        cache = CachingResolver(inner, clock, maxTTL=30)
        cache.vet("hooks.example", 443)
        clock.advance(6)
        cache.vet("hooks.example", 443)
        self.assertEqual(len(inner.calls), 2)

    def test_perPort(self) -> None:
        """
        Answers are kept per host and port, since port rules may differ.
        """
        inner = _CountingResolver()
        cache = CachingResolver(inner, MemoryReactorClock(), maxTTL=30)
        cache.vet("hooks.example", 443)
        cache.vet("hooks.example", 8443)
        self.assertEqual(len(inner.calls), 2)

    def test_notCached(self) -> None:
        """
        Failures and IP literals are not cached.
        """
        inner = _CountingResolver()
        cache = CachingResolver(inner, MemoryReactorClock(), maxTTL=30)
        inner.fail = True
        self.failureResultOf(cache.vet("hooks.example", 443), ResolutionFailed)
        inner.fail = False
        self.successResultOf(cache.vet("hooks.example", 443))
        cache.vet("203.0.113.9", 443)
        cache.vet("203.0.113.9", 443)
        self.assertEqual(len(inner.calls), 4)

    def test_bounded(self) -> None:
        """
        At most maxEntries answers are kept, least recently used out first.
        """
        inner = _CountingResolver()
        cache = CachingResolver(inner, MemoryReactorClock(), maxTTL=30, maxEntries=2)
        for host in ("a.example", "b.example", "a.example", "c.example", "a.example", "b.example"):
            cache.vet(host, 443)
        self.assertEqual(
            [host for host, _ in inner.calls],
            ["a.example", "b.example", "c.example", "b.example"],
        )
