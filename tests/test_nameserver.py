"""
Tests for L{proxy_app.nameserver}: the nameserver resolver, nameserver
parsing and the choice of name resolver.

Everything but L{NameserverIntegrationTests} runs on fakes and a fake
clock; that one class starts a L{twisted.names} server on 127.0.0.1 and
sends it real queries over loopback, through both the bare
L{NameserverResolver} and a L{proxy_app.resolver.SafeResolver} wrapping it.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from twisted.names import error as names_error
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from proxy_app.interfaces import IExplainedHostResolution
from proxy_app.nameserver import NameserverResolver, makeNameResolver, parseNameserver
from proxy_app.resolver import DestinationDenied, ResolutionFailed, SafeResolver

from .helpers import PluggableMemoryReactor, startNameServer
from .test_resolver import (
    ALLOWED_V4,
    ALLOWED_V4_OTHER,
    ALLOWED_V6,
    DENIED_V4,
    DENIED_V4_PRIVATE,
    deniedMessage,
    makePolicy,
)


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
