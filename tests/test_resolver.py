"""
Tests for L{proxy_app.resolver}: the safe resolver and the caching
resolver, on fakes and a fake clock.  The nameserver resolver's tests are
in L{tests.test_nameserver}.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.names import error as names_error
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from proxy_app.addresses import AddressPolicy
from proxy_app.interfaces import IDestinationResolver
from proxy_app.reasons import Reason
from proxy_app.resolver import (
    CachingResolver,
    DestinationDenied,
    IExplainedHostResolution,
    ResolutionFailed,
    SafeResolver,
    VettedDestination,
)

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


@implementer(IHostResolution, IExplainedHostResolution)
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
        L{SafeResolver} provides L{IDestinationResolver}.
        """
        self.assertTrue(verifyObject(IDestinationResolver, self.resolver))

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
        self.assertEqual(
            self.resolver.vetNow(f"[{ALLOWED_V6}]", 443).addresses, (ALLOWED_V6,)
        )  # type: ignore[union-attr]
        with self.assertRaises(DestinationDenied) as caught:
            self.resolver.vetNow(DENIED_V4, 80)
        self.assertEqual(
            caught.exception.message, deniedMessage(DENIED_V4, 80, DENIED_V4)
        )
        self.assertRaises(DestinationDenied, self.resolver.vetNow, "1.2.3.999", 80)
        self.assertIsNone(self.resolver.vetNow("www.example", 443))
        self.assertEqual(self.names.calls, [])
        # An allowed literal is a value: vetted once, then remembered.
        self.assertIs(
            self.resolver.vetNow(ALLOWED_V4, 80), self.resolver.vetNow(ALLOWED_V4, 80)
        )
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
            VettedDestination(
                host, port, ("203.0.113.9",), lookupTime=0.2, ttl=self.ttl
            )
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
        for host in (
            "a.example",
            "b.example",
            "a.example",
            "c.example",
            "a.example",
            "b.example",
        ):
            cache.vet(host, 443)
        self.assertEqual(
            [host for host, _ in inner.calls],
            ["a.example", "b.example", "c.example", "b.example"],
        )
