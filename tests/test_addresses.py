"""
Tests for L{proxy_app.addresses}.
"""

from __future__ import annotations

import ipaddress

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.addresses import (
    CLOUD_METADATA,
    DECISION_CACHE_SIZE,
    GLOBAL,
    IPV4_SPECIAL_PURPOSE,
    IPV6_SPECIAL_PURPOSE,
    MAPPED,
    NAT64,
    RULE_ALLOW_DEFAULT,
    RULE_ALLOW_HOST,
    RULE_ALLOW_USER,
    RULE_CGNAT_RANGE,
    RULE_CLOUD_METADATA,
    RULE_DENY_USER,
    RULE_IPV6_EMBEDDING,
    RULE_NOT_GLOBAL_UNICAST,
    RULE_PRIVATE_RANGE,
    RULE_SELF_CONNECTION,
    SIXTOFOUR,
    AddressDecision,
    AddressPolicy,
    parseAllowHost,
    parseIPLiteral,
    parsePortRange,
)

METADATA_TEXTS = frozenset(address for address, _ in CLOUD_METADATA)

NGU = RULE_NOT_GLOBAL_UNICAST
PRIVATE = RULE_PRIVATE_RANGE
CGNAT = RULE_CGNAT_RANGE
EMBED = RULE_IPV6_EMBEDDING
ALLOW = RULE_ALLOW_DEFAULT

# Written out by hand from the registries rather than derived from the
# module's tables, so that a wrong table entry shows up as a mismatch.  For
# every built-in range: its first and last address, and the addresses just
# before and after it, with the rule each must get from a default policy.
IPV4_EDGES = [
    # 0.0.0.0/8
    ("0.0.0.0", NGU),
    ("0.255.255.255", NGU),
    ("1.0.0.0", ALLOW),
    # 10.0.0.0/8
    ("9.255.255.255", ALLOW),
    ("10.0.0.0", PRIVATE),
    ("10.255.255.255", PRIVATE),
    ("11.0.0.0", ALLOW),
    # 100.64.0.0/10
    ("100.63.255.255", ALLOW),
    ("100.64.0.0", CGNAT),
    ("100.127.255.255", CGNAT),
    ("100.128.0.0", ALLOW),
    # 127.0.0.0/8
    ("126.255.255.255", ALLOW),
    ("127.0.0.0", NGU),
    ("127.255.255.255", NGU),
    ("128.0.0.0", ALLOW),
    # 169.254.0.0/16
    ("169.253.255.255", ALLOW),
    ("169.254.0.0", NGU),
    ("169.254.255.255", NGU),
    ("169.255.0.0", ALLOW),
    # 172.16.0.0/12
    ("172.15.255.255", ALLOW),
    ("172.16.0.0", PRIVATE),
    ("172.31.255.255", PRIVATE),
    ("172.32.0.0", ALLOW),
    # 192.0.0.0/24, including the anycast addresses IANA calls global
    ("191.255.255.255", ALLOW),
    ("192.0.0.0", NGU),
    ("192.0.0.9", NGU),
    ("192.0.0.10", NGU),
    ("192.0.0.255", NGU),
    ("192.0.1.0", ALLOW),
    # 192.0.2.0/24
    ("192.0.1.255", ALLOW),
    ("192.0.2.0", NGU),
    ("192.0.2.255", NGU),
    ("192.0.3.0", ALLOW),
    # 192.31.196.0/24
    ("192.31.195.255", ALLOW),
    ("192.31.196.0", NGU),
    ("192.31.196.255", NGU),
    ("192.31.197.0", ALLOW),
    # 192.52.193.0/24
    ("192.52.192.255", ALLOW),
    ("192.52.193.0", NGU),
    ("192.52.193.255", NGU),
    ("192.52.194.0", ALLOW),
    # 192.88.99.0/24
    ("192.88.98.255", ALLOW),
    ("192.88.99.0", NGU),
    ("192.88.99.255", NGU),
    ("192.88.100.0", ALLOW),
    # 192.168.0.0/16
    ("192.167.255.255", ALLOW),
    ("192.168.0.0", PRIVATE),
    ("192.168.255.255", PRIVATE),
    ("192.169.0.0", ALLOW),
    # 192.175.48.0/24
    ("192.175.47.255", ALLOW),
    ("192.175.48.0", NGU),
    ("192.175.48.255", NGU),
    ("192.175.49.0", ALLOW),
    # 198.18.0.0/15
    ("198.17.255.255", ALLOW),
    ("198.18.0.0", NGU),
    ("198.19.255.255", NGU),
    ("198.20.0.0", ALLOW),
    # 198.51.100.0/24
    ("198.51.99.255", ALLOW),
    ("198.51.100.0", NGU),
    ("198.51.100.255", NGU),
    ("198.51.101.0", ALLOW),
    # 203.0.113.0/24
    ("203.0.112.255", ALLOW),
    ("203.0.113.0", NGU),
    ("203.0.113.255", NGU),
    ("203.0.114.0", ALLOW),
    # 224.0.0.0/4, 240.0.0.0/4 and 255.255.255.255/32
    ("223.255.255.255", ALLOW),
    ("224.0.0.0", NGU),
    ("239.255.255.255", NGU),
    ("240.0.0.0", NGU),
    ("255.255.255.254", NGU),
    ("255.255.255.255", NGU),
]

F7 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff"
IPV6_EDGES = [
    # ::/0 outside 2000::/3, ::/128, ::1/128, IPv4-compatible ::/96
    ("::", NGU),
    ("::1", NGU),
    ("::2", EMBED),
    ("::ffff:ffff", EMBED),
    ("::1:0:0", NGU),
    ("ffff:" + F7, NGU),
    # IPv4-mapped ::ffff:0:0/96, judged as 0.0.0.0 and 255.255.255.255
    ("::fffe:ffff:ffff", NGU),
    ("::ffff:0:0", NGU),
    ("::ffff:ffff:ffff", NGU),
    ("::1:0:0:0", NGU),
    # IPv4-translated ::ffff:0:0:0/96
    ("::fffe:ffff:ffff:ffff", NGU),
    ("::ffff:0:0:0", EMBED),
    ("::ffff:0:ffff:ffff", EMBED),
    ("::ffff:1:0:0", NGU),
    # NAT64 64:ff9b::/96, carrying 0.0.0.0 and 255.255.255.255
    ("64:ff9a:ffff:ffff:ffff:ffff:ffff:ffff", NGU),
    ("64:ff9b::", EMBED),
    ("64:ff9b::ffff:ffff", EMBED),
    ("64:ff9b::1:0:0", NGU),
    # Local-use NAT64 64:ff9b:1::/48
    ("64:ff9b:0:ffff:ffff:ffff:ffff:ffff", NGU),
    ("64:ff9b:1::", EMBED),
    ("64:ff9b:1:ffff:ffff:ffff:ffff:ffff", EMBED),
    ("64:ff9b:2::", NGU),
    # Discard-only 100::/64
    ("ff:" + F7, NGU),
    ("100::", NGU),
    ("100::ffff:ffff:ffff:ffff", NGU),
    ("100:0:0:1::", NGU),
    # Global unicast 2000::/3
    ("1fff:" + F7, NGU),
    ("2000::", ALLOW),
    ("3fff:" + F7, ALLOW),
    ("4000::", NGU),
    # IETF protocol assignments 2001::/23, Teredo 2001::/32
    ("2000:" + F7, ALLOW),
    ("2001::", EMBED),
    ("2001:0:ffff:ffff:ffff:ffff:ffff:ffff", EMBED),
    ("2001:1::", NGU),
    ("2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", NGU),
    ("2001:200::", ALLOW),
    # PCP, TURN and DNS-SD SRP anycast, one address each
    ("2001:1::1", ALLOW),
    ("2001:1::2", ALLOW),
    ("2001:1::3", ALLOW),
    ("2001:1::4", NGU),
    # Benchmarking 2001:2::/48
    ("2001:1:ffff:ffff:ffff:ffff:ffff:ffff", NGU),
    ("2001:2::", NGU),
    ("2001:2:0:ffff:ffff:ffff:ffff:ffff", NGU),
    ("2001:2:1::", NGU),
    # AMT 2001:3::/32
    ("2001:2:ffff:ffff:ffff:ffff:ffff:ffff", NGU),
    ("2001:3::", ALLOW),
    ("2001:3:ffff:ffff:ffff:ffff:ffff:ffff", ALLOW),
    ("2001:4::", NGU),
    # AS112-v6 2001:4:112::/48
    ("2001:4:111:ffff:ffff:ffff:ffff:ffff", NGU),
    ("2001:4:112::", ALLOW),
    ("2001:4:112:ffff:ffff:ffff:ffff:ffff", ALLOW),
    ("2001:4:113::", NGU),
    # Deprecated ORCHID 2001:10::/28, ORCHIDv2 2001:20::/28, DETs 2001:30::/28
    ("2001:f:ffff:ffff:ffff:ffff:ffff:ffff", NGU),
    ("2001:10::", NGU),
    ("2001:1f:ffff:ffff:ffff:ffff:ffff:ffff", NGU),
    ("2001:20::", ALLOW),
    ("2001:2f:ffff:ffff:ffff:ffff:ffff:ffff", ALLOW),
    ("2001:30::", ALLOW),
    ("2001:3f:ffff:ffff:ffff:ffff:ffff:ffff", ALLOW),
    ("2001:40::", NGU),
    # Documentation 2001:db8::/32
    ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", ALLOW),
    ("2001:db8::", NGU),
    ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", NGU),
    ("2001:db9::", ALLOW),
    # 6to4 2002::/16, carrying 0.0.0.0 and 255.255.255.255
    ("2001:" + F7, ALLOW),
    ("2002::", EMBED),
    ("2002:" + F7, EMBED),
    ("2003::", ALLOW),
    # Direct delegation AS112 2620:4f:8000::/48
    ("2620:4f:7fff:ffff:ffff:ffff:ffff:ffff", ALLOW),
    ("2620:4f:8000::", NGU),
    ("2620:4f:8000:ffff:ffff:ffff:ffff:ffff", NGU),
    ("2620:4f:8001::", ALLOW),
    # Documentation 3fff::/20
    ("3ffe:" + F7, ALLOW),
    ("3fff::", NGU),
    ("3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", NGU),
    ("3fff:1000::", ALLOW),
    # SRv6 SIDs 5f00::/16
    ("5eff:" + F7, NGU),
    ("5f00::", NGU),
    ("5f00:" + F7, NGU),
    ("5f01::", NGU),
    # Unique local fc00::/7
    ("fbff:" + F7, NGU),
    ("fc00::", PRIVATE),
    ("fdff:" + F7, PRIVATE),
    ("fe00::", NGU),
    # Link-local fe80::/10, site-local fec0::/10, multicast ff00::/8
    ("fe7f:" + F7, NGU),
    ("fe80::", NGU),
    ("febf:" + F7, NGU),
    ("fec0::", NGU),
    ("feff:" + F7, NGU),
    ("ff00::", NGU),
]


def mapped(v4: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    """
    The IPv4-mapped IPv6 form of C{v4}.
    """
    return ipaddress.IPv6Address((0xFFFF << 32) | int(v4))


def nat64(v4: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    """
    The NAT64 well-known-prefix form of C{v4}.
    """
    return ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(v4))


def sixToFour(v4: ipaddress.IPv4Address, tail: int = 1) -> ipaddress.IPv6Address:
    """
    A 6to4 address for C{v4}, with C{tail} as its last 80 bits.
    """
    return ipaddress.IPv6Address((0x2002 << 112) | (int(v4) << 80) | tail)


def teredo(
    server: ipaddress.IPv4Address, client: ipaddress.IPv4Address
) -> ipaddress.IPv6Address:
    """
    The Teredo address of C{client} behind C{server} (RFC 4380 s4).
    """
    return ipaddress.IPv6Address(
        (0x20010000 << 96)
        | (int(server) << 64)
        | (0xFFFF << 32)  # obfuscated external port
        | (~int(client) & 0xFFFFFFFF)
    )


def canonical(text: str) -> str:
    """
    The canonical text of an address, as this Python writes it (3.13 writes
    mapped addresses differently from 3.11).
    """
    return str(ipaddress.ip_address(text))


def edgesMissing(table, edges, version: int) -> list[str]:
    """
    The first, last and neighbouring addresses of C{table}'s ranges that
    C{edges} does not list.
    """
    listed = {int(ipaddress.ip_address(text)) for text, _ in edges}
    top = (1 << (32 if version == 4 else 128)) - 1
    missing = []
    for cidr, _ in table:
        network = ipaddress.ip_network(cidr)
        first = int(network.network_address)
        last = int(network.broadcast_address)
        for n in (first - 1, first, last, last + 1):
            if 0 <= n <= top and n not in listed:
                missing.append(f"{network}: {ipaddress.ip_address(n)}")
    return missing


def mismatches(policy: AddressPolicy, edges) -> list[tuple[str, str, str]]:
    """
    The C{(address, expected, actual)} rules where C{policy} disagrees with
    C{edges}.
    """
    wrong = []
    for text, rule in edges:
        decision = policy.decide(text, 443)
        if decision.rule != rule or decision.allowed != rule.startswith("Allow"):
            wrong.append((text, rule, decision.rule))
    return wrong


class AddressDecisionTests(SynchronousTestCase):
    """
    Tests for L{AddressDecision}.
    """

    def test_labels(self) -> None:
        """
        Every rule has a fixed low-cardinality metric label, and both user
        rules share one.
        """
        expected = {
            RULE_NOT_GLOBAL_UNICAST: "not_global_unicast",
            RULE_PRIVATE_RANGE: "private_range",
            RULE_CGNAT_RANGE: "cgnat_range",
            RULE_IPV6_EMBEDDING: "ipv6_embedding",
            RULE_SELF_CONNECTION: "self_connection",
            RULE_DENY_USER: "user_configured",
            RULE_ALLOW_USER: "user_configured",
            RULE_ALLOW_DEFAULT: "default",
        }
        self.assertEqual(
            {rule: AddressDecision(False, "x", rule).label for rule in expected},
            expected,
        )

    def test_unknownRule(self) -> None:
        """
        A decision cannot be made with a rule that has no label, so the
        label is always one of the fixed set.
        """
        self.assertRaises(ValueError, AddressDecision, False, "10.0.0.1", "Deny: Oops")

    def test_frozen(self) -> None:
        """
        A decision cannot be changed after it is made.
        """
        decision = AddressDecision(True, "8.8.8.8", RULE_ALLOW_DEFAULT)
        self.assertRaises(AttributeError, setattr, decision, "allowed", False)


class BuiltinTableTests(SynchronousTestCase):
    """
    Tests for the built-in table of L{AddressPolicy.decide}.
    """

    def test_ipv4Edges(self) -> None:
        """
        Both ends of every IPv4 special-purpose range get the range's rule,
        and the addresses just outside get the rule of where they land.
        """
        self.assertEqual(mismatches(AddressPolicy(), IPV4_EDGES), [])

    def test_ipv6Edges(self) -> None:
        """
        Both ends of every IPv6 special-purpose range get the range's rule,
        and the addresses just outside get the rule of where they land; the
        globally reachable blocks inside 2001::/23 are allowed.
        """
        self.assertEqual(mismatches(AddressPolicy(), IPV6_EDGES), [])

    def test_edgesCoverTables(self) -> None:
        """
        The edge lists above cover both ends, and both neighbours, of every
        range in the module's tables, so a range added to a table without
        tests fails here.
        """
        self.assertEqual(edgesMissing(IPV4_SPECIAL_PURPOSE, IPV4_EDGES, 4), [])
        self.assertEqual(edgesMissing(IPV6_SPECIAL_PURPOSE, IPV6_EDGES, 6), [])

    def test_tablesHaveNoDuplicates(self) -> None:
        """
        No range appears twice in a table, where the second would silently
        replace the first.
        """
        for table in (IPV4_SPECIAL_PURPOSE, IPV6_SPECIAL_PURPOSE):
            networks = [ipaddress.ip_network(cidr) for cidr, _ in table]
            self.assertEqual(len(networks), len(set(networks)))

    def test_decisionReportsCanonicalAddress(self) -> None:
        """
        The decision names the address in canonical text, whatever
        spelling L{ipaddress} accepted.
        """
        decision = AddressPolicy().decide("2001:DB8:0:0::1", 443)
        self.assertEqual(decision, AddressDecision(False, "2001:db8::1", NGU))

    def test_addressObjects(self) -> None:
        """
        L{AddressPolicy.decide} takes address objects as well as text.
        """
        policy = AddressPolicy()
        self.assertEqual(
            policy.decide(ipaddress.IPv4Address("10.0.0.1"), 80),
            AddressDecision(False, "10.0.0.1", PRIVATE),
        )
        self.assertEqual(
            policy.decide(ipaddress.IPv6Address("2606:4700::1"), 80),
            AddressDecision(True, "2606:4700::1", ALLOW),
        )

    def test_notAnAddressObject(self) -> None:
        """
        Anything other than text or an address object is a programming
        error, not something to classify.
        """
        self.assertRaises(TypeError, AddressPolicy().decide, 2130706433, 80)


class UnparseableTests(SynchronousTestCase):
    """
    Tests for what L{AddressPolicy.decide} does with text that is not a
    plain address.
    """

    def test_garbage(self) -> None:
        """
        Text that is not an address is denied as not global unicast, and
        the decision names the text as given.
        """
        policy = AddressPolicy()
        for text in ["garbage", "", "example.com", "1.2.3.4.5", "::g"]:
            self.assertEqual(policy.decide(text, 80), AddressDecision(False, text, NGU))

    def test_looseSpellings(self) -> None:
        """
        C{decide} reads only the strict notation (what resolvers give);
        C{inet_aton} spellings, leading zeros and brackets are denied rather
        than guessed at, even for a global address.
        """
        policy = AddressPolicy()
        for text in [
            "134744072",
            "8.8.2056",
            "010.0.0.1",
            "[2606:4700::1]",
            " 8.8.8.8",
        ]:
            self.assertEqual(policy.decide(text, 80), AddressDecision(False, text, NGU))

    def test_scoped(self) -> None:
        """
        An IPv6 address with a zone is denied as not global unicast, even
        if the address itself is global, and whether it comes as text or
        as an object.
        """
        policy = AddressPolicy(allowAddresses=["fe80::1"], allowRanges=["::/0"])
        for text in ["fe80::1%eth0", "2606:4700::1%1", "::ffff:8.8.8.8%eth0"]:
            decision = policy.decide(text, 443)
            self.assertEqual((decision.allowed, decision.rule), (False, NGU))
            self.assertEqual(decision.address, canonical(text))
            self.assertEqual(policy.decide(ipaddress.IPv6Address(text), 443), decision)


class EmbeddingTests(SynchronousTestCase):
    """
    Tests for IPv6 forms that carry an IPv4 address.
    """

    def assertDecides(
        self, policy: AddressPolicy, text: str, allowed: bool, rule: str, port=443
    ) -> None:
        self.assertEqual(
            policy.decide(text, port), AddressDecision(allowed, canonical(text), rule)
        )

    def test_mapped(self) -> None:
        """
        An IPv4-mapped address gets exactly the IPv4 address's decision,
        reported under the IPv6 text.
        """
        policy = AddressPolicy()
        self.assertDecides(policy, "::ffff:10.0.0.1", False, PRIVATE)
        self.assertDecides(policy, "::ffff:100.64.0.1", False, CGNAT)
        self.assertDecides(policy, "::ffff:127.0.0.1", False, NGU)
        self.assertDecides(policy, "::ffff:8.8.8.8", True, ALLOW)

    def test_mappedUserRules(self) -> None:
        """
        User rules on the IPv4 address apply to its mapped form, and rules
        written in mapped form apply to the IPv4 address: the two are one
        socket destination.
        """
        policy = AddressPolicy(
            allowRanges=["10.0.0.0/8", "::ffff:172.16.0.0/108"],
            denyAddresses=["8.8.8.8", "::ffff:1.1.1.1"],
        )
        self.assertDecides(policy, "::ffff:10.0.0.1", True, RULE_ALLOW_USER)
        self.assertDecides(policy, "::ffff:8.8.8.8", False, RULE_DENY_USER)
        self.assertDecides(policy, "1.1.1.1", False, RULE_DENY_USER)
        self.assertDecides(policy, "::ffff:1.1.1.1", False, RULE_DENY_USER)
        self.assertDecides(policy, "172.16.0.1", True, RULE_ALLOW_USER)
        self.assertDecides(policy, "172.32.0.1", True, ALLOW)

    def test_mappedIgnoresOverlappingIPv6Ranges(self) -> None:
        """
        An IPv6 range that merely overlaps the mapped block does not apply
        to mapped addresses, which are judged as the IPv4 address alone:
        allowing C{::/0} does not open mapped private addresses.
        """
        policy = AddressPolicy(allowRanges=["::/0"])
        self.assertDecides(policy, "::ffff:10.0.0.1", False, PRIVATE)
        self.assertDecides(policy, "::1", True, RULE_ALLOW_USER)

    def test_mappedSelfConnection(self) -> None:
        """
        A mapped form of the proxy's own listening address is a self
        connection.
        """
        policy = AddressPolicy(selfAddresses=[("127.0.0.1", 8080)])
        self.assertDecides(
            policy, "::ffff:127.0.0.1", False, RULE_SELF_CONNECTION, 8080
        )

    def test_compatible(self) -> None:
        """
        IPv4-compatible addresses are denied as an embedding whatever they
        carry.
        """
        policy = AddressPolicy()
        self.assertDecides(policy, "::10.0.0.1", False, EMBED)
        self.assertDecides(policy, "::8.8.8.8", False, EMBED)

    def test_translated(self) -> None:
        """
        IPv4-translated addresses are denied as an embedding whatever they
        carry.
        """
        policy = AddressPolicy()
        self.assertDecides(policy, "::ffff:0:10.0.0.1", False, EMBED)
        self.assertDecides(policy, "::ffff:0:8.8.8.8", False, EMBED)

    def test_nat64WellKnown(self) -> None:
        """
        A NAT64 address is denied as an embedding when the IPv4 address it
        carries is denied, and allowed with that address's rule when it is
        allowed, so DNS64 networks keep working.
        """
        policy = AddressPolicy()
        self.assertDecides(policy, "64:ff9b::10.0.0.1", False, EMBED)
        self.assertDecides(policy, "64:ff9b::127.0.0.1", False, EMBED)
        self.assertDecides(policy, "64:ff9b::100.64.0.1", False, EMBED)
        self.assertDecides(policy, "64:ff9b::8.8.8.8", True, ALLOW)

    def test_nat64IPv4UserRules(self) -> None:
        """
        User rules on the IPv4 address carry over to its NAT64 form: an
        allowed private address is reachable through NAT64 with the user
        rule, a denied global one is not.
        """
        policy = AddressPolicy(allowRanges=["10.0.0.0/8"], denyAddresses=["8.8.8.8"])
        self.assertDecides(policy, "64:ff9b::10.0.0.1", True, RULE_ALLOW_USER)
        self.assertDecides(policy, "64:ff9b::8.8.8.8", False, EMBED)

    def test_nat64LocalUse(self) -> None:
        """
        Local-use NAT64 addresses are denied as an embedding whatever they
        carry.
        """
        policy = AddressPolicy()
        self.assertDecides(policy, "64:ff9b:1::10.0.0.1", False, EMBED)
        self.assertDecides(policy, "64:ff9b:1::8.8.8.8", False, EMBED)
        self.assertDecides(policy, "64:ff9b:1:808:808::", False, EMBED)

    def test_6to4(self) -> None:
        """
        A 6to4 address is judged by the IPv4 address in bits 16 to 47:
        denied as an embedding when that is denied, allowed when it is
        allowed.
        """
        policy = AddressPolicy()
        self.assertDecides(policy, "2002:a00:1::1", False, EMBED)
        self.assertDecides(policy, "2002:7f00:1::", False, EMBED)
        self.assertDecides(policy, "2002:c0a8:101:1::1", False, EMBED)
        self.assertDecides(policy, "2002:808:808::1", True, ALLOW)

    def test_teredo(self) -> None:
        """
        Teredo addresses are denied as an embedding, with private or global
        server and client.
        """
        policy = AddressPolicy()
        private = ipaddress.IPv4Address("10.0.0.1")
        public = ipaddress.IPv4Address("8.8.8.8")
        for server, client in [(public, public), (public, private), (private, public)]:
            self.assertDecides(policy, str(teredo(server, client)), False, EMBED)

    def test_userAllowOnIPv6Form(self) -> None:
        """
        An operator may allow an embedded form explicitly, by address or by
        range; the rule on the IPv6 address is consulted before the IPv4
        address it carries.
        """
        policy = AddressPolicy(
            allowAddresses=["64:ff9b::10.0.0.1", "::ffff:0:10.0.0.2"],
            allowRanges=["2002:a00:3::/48"],
        )
        self.assertDecides(policy, "64:ff9b::10.0.0.1", True, RULE_ALLOW_USER)
        self.assertDecides(policy, "::ffff:0:10.0.0.2", True, RULE_ALLOW_USER)
        self.assertDecides(policy, "2002:a00:3::1", True, RULE_ALLOW_USER)
        self.assertDecides(policy, "64:ff9b::10.0.0.2", False, EMBED)

    def test_userDenyOnIPv6Form(self) -> None:
        """
        A user deny rule on an IPv6 form denies it, even when the IPv4
        address it carries is allowed.
        """
        policy = AddressPolicy(denyRanges=["64:ff9b::/96"])
        self.assertDecides(policy, "64:ff9b::8.8.8.8", False, RULE_DENY_USER)
        self.assertDecides(policy, "8.8.8.8", True, ALLOW)

    def test_ipv6AllowDoesNotBeatIPv4Deny(self) -> None:
        """
        Allowing an IPv6 form never reopens an IPv4 address that a user
        rule denies: deny beats allow across the embedding too.
        """
        policy = AddressPolicy(
            allowRanges=["64:ff9b::/96", "2002::/16", "2001::/32", "::/96"],
            denyAddresses=["10.0.0.5"],
            denyRanges=["8.8.8.0/24"],
        )
        self.assertDecides(policy, "64:ff9b::10.0.0.5", False, EMBED)
        self.assertDecides(policy, "64:ff9b::8.8.8.8", False, EMBED)
        self.assertDecides(policy, "64:ff9b::10.0.0.6", True, RULE_ALLOW_USER)
        self.assertDecides(policy, "2002:a00:5::1", False, EMBED)
        self.assertDecides(policy, "::10.0.0.5", False, EMBED)
        denied = ipaddress.IPv4Address("10.0.0.5")
        other = ipaddress.IPv4Address("1.1.1.1")
        self.assertDecides(policy, str(teredo(other, denied)), False, EMBED)
        self.assertDecides(policy, str(teredo(denied, other)), False, EMBED)
        self.assertDecides(policy, str(teredo(other, other)), True, RULE_ALLOW_USER)


class PrecedenceTests(SynchronousTestCase):
    """
    Tests for the order in which L{AddressPolicy.decide} applies its rules.
    """

    def assertRule(self, policy, address, port, allowed, rule) -> None:
        decision = policy.decide(address, port)
        self.assertEqual((decision.allowed, decision.rule), (allowed, rule))

    def test_denyAddressBeatsAllowRange(self) -> None:
        """
        An exact deny address beats an allow range that contains it
        (Smokescreen issue #236), while the rest of the range stays
        allowed.
        """
        policy = AddressPolicy(
            allowRanges=["10.0.0.0/8", "fd00::/8"],
            denyAddresses=["10.0.0.5", "fd00::5"],
        )
        self.assertRule(policy, "10.0.0.5", 80, False, RULE_DENY_USER)
        self.assertRule(policy, "10.0.0.6", 80, True, RULE_ALLOW_USER)
        self.assertRule(policy, "fd00::5", 80, False, RULE_DENY_USER)
        self.assertRule(policy, "fd00::6", 80, True, RULE_ALLOW_USER)

    def test_allowAddressBeatsDenyRange(self) -> None:
        """
        An exact allow address beats a deny range that contains it.
        """
        policy = AddressPolicy(denyRanges=["8.8.0.0/16"], allowAddresses=["8.8.8.8"])
        self.assertRule(policy, "8.8.8.8", 443, True, RULE_ALLOW_USER)
        self.assertRule(policy, "8.8.4.4", 443, False, RULE_DENY_USER)

    def test_denyRangeBeatsAllowRange(self) -> None:
        """
        Between ranges, deny beats allow whichever is more specific.
        """
        wide = AddressPolicy(denyRanges=["10.0.0.0/8"], allowRanges=["10.1.0.0/16"])
        self.assertRule(wide, "10.1.0.1", 80, False, RULE_DENY_USER)
        narrow = AddressPolicy(allowRanges=["10.0.0.0/8"], denyRanges=["10.1.0.0/16"])
        self.assertRule(narrow, "10.1.0.1", 80, False, RULE_DENY_USER)
        self.assertRule(narrow, "10.2.0.1", 80, True, RULE_ALLOW_USER)
        same = AddressPolicy(allowRanges=["10.0.0.0/8"], denyRanges=["10.0.0.0/8"])
        self.assertRule(same, "10.0.0.1", 80, False, RULE_DENY_USER)

    def test_denyAddressBeatsAllowAddress(self) -> None:
        """
        Between exact addresses, deny beats allow, with or without ports.
        """
        both = AddressPolicy(allowAddresses=["10.0.0.1"], denyAddresses=["10.0.0.1"])
        self.assertRule(both, "10.0.0.1", 80, False, RULE_DENY_USER)
        portDeny = AddressPolicy(
            allowAddresses=["10.0.0.1"], denyAddresses=["10.0.0.1:443"]
        )
        self.assertRule(portDeny, "10.0.0.1", 443, False, RULE_DENY_USER)
        self.assertRule(portDeny, "10.0.0.1", 80, True, RULE_ALLOW_USER)
        portAllow = AddressPolicy(
            allowAddresses=["10.0.0.1:443"], denyAddresses=["10.0.0.1"]
        )
        self.assertRule(portAllow, "10.0.0.1", 443, False, RULE_DENY_USER)

    def test_portSpecificAddresses(self) -> None:
        """
        An address rule with a port matches that port only; other ports
        fall through to the rest of the rules.
        """
        policy = AddressPolicy(
            allowAddresses=["10.0.0.1:443", "[fd00::1]:443"],
            denyAddresses=["8.8.8.8:53", "[2606:4700::1]:53"],
        )
        self.assertRule(policy, "10.0.0.1", 443, True, RULE_ALLOW_USER)
        self.assertRule(policy, "10.0.0.1", 80, False, PRIVATE)
        self.assertRule(policy, "fd00::1", 443, True, RULE_ALLOW_USER)
        self.assertRule(policy, "fd00::1", 80, False, PRIVATE)
        self.assertRule(policy, "8.8.8.8", 53, False, RULE_DENY_USER)
        self.assertRule(policy, "8.8.8.8", 443, True, ALLOW)
        self.assertRule(policy, "2606:4700::1", 53, False, RULE_DENY_USER)
        self.assertRule(policy, "2606:4700::1", 443, True, ALLOW)

    def test_bareAndBracketedIPv6Addresses(self) -> None:
        """
        A bare IPv6 address rule has no port, even when it ends in
        something that looks like one; a bracketed one may have a port.
        """
        policy = AddressPolicy(allowAddresses=["fd00::1:80", "[fd00::2]"])
        self.assertRule(policy, "fd00::1:80", 443, True, RULE_ALLOW_USER)
        self.assertRule(policy, "fd00::1", 80, False, PRIVATE)
        self.assertRule(policy, "fd00::2", 8443, True, RULE_ALLOW_USER)

    def test_bareAddressAsRange(self) -> None:
        """
        A range written as a bare address covers that address alone.
        """
        policy = AddressPolicy(allowRanges=["10.0.0.1", "fd00::1"])
        self.assertRule(policy, "10.0.0.1", 80, True, RULE_ALLOW_USER)
        self.assertRule(policy, "10.0.0.2", 80, False, PRIVATE)
        self.assertRule(policy, "fd00::1", 80, True, RULE_ALLOW_USER)
        self.assertRule(policy, "fd00::2", 80, False, PRIVATE)

    def test_denyGlobalRange(self) -> None:
        """
        A user deny range denies global addresses that would otherwise be
        allowed.
        """
        policy = AddressPolicy(denyRanges=["1.1.1.0/24", "2606:4700::/32"])
        self.assertRule(policy, "1.1.1.1", 443, False, RULE_DENY_USER)
        self.assertRule(policy, "1.1.2.1", 443, True, ALLOW)
        self.assertRule(policy, "2606:4700::1111", 443, False, RULE_DENY_USER)

    def test_selfBeatsUserAllows(self) -> None:
        """
        The proxy's own listening address and port are denied as a self
        connection even when an allow address or an allow range covers
        them; other ports of that address follow the user rules.
        """
        policy = AddressPolicy(
            allowAddresses=["127.0.0.1", "[::1]:8080"],
            allowRanges=["10.0.0.0/8"],
            selfAddresses=[("127.0.0.1", 8080), ("10.1.2.3", 3128), ("::1", 8080)],
        )
        self.assertRule(policy, "127.0.0.1", 8080, False, RULE_SELF_CONNECTION)
        self.assertRule(policy, "127.0.0.1", 80, True, RULE_ALLOW_USER)
        self.assertRule(policy, "10.1.2.3", 3128, False, RULE_SELF_CONNECTION)
        self.assertRule(policy, "10.1.2.3", 443, True, RULE_ALLOW_USER)
        self.assertRule(policy, "::1", 8080, False, RULE_SELF_CONNECTION)

    def test_selfGlobalAddress(self) -> None:
        """
        A listener on a global address is a self connection on its port
        only.
        """
        policy = AddressPolicy(selfAddresses=[("8.8.8.8", 3128)])
        self.assertRule(policy, "8.8.8.8", 3128, False, RULE_SELF_CONNECTION)
        self.assertRule(policy, "8.8.8.8", 443, True, ALLOW)

    def test_wildcardListener(self) -> None:
        """
        A wildcard listener on port P makes port P on any non-global
        address a self connection, of either family (a C{::} listener
        usually takes IPv4 too), even when a user rule allows it; global
        addresses and other ports are unaffected.
        """
        for host in ["0.0.0.0", "::", "", "[::]"]:
            policy = AddressPolicy(
                allowRanges=["10.0.0.0/8"], selfAddresses=[(host, 8080)]
            )
            for address in ["127.0.0.1", "10.1.2.3", "0.0.0.0", "::1", "::", "fd00::1"]:
                self.assertRule(policy, address, 8080, False, RULE_SELF_CONNECTION)
            self.assertRule(
                policy, "::ffff:127.0.0.1", 8080, False, RULE_SELF_CONNECTION
            )
            self.assertRule(policy, "8.8.8.8", 8080, True, ALLOW)
            self.assertRule(policy, "2606:4700::1", 8080, True, ALLOW)
            self.assertRule(policy, "127.0.0.1", 8081, False, NGU)
            self.assertRule(policy, "10.1.2.3", 8081, True, RULE_ALLOW_USER)

    def test_wildcardListenerThroughNAT64(self) -> None:
        """
        A NAT64 or 6to4 address is judged by the IPv4 address it carries,
        self connection included, and is denied as an embedding when that
        address would be one.
        """
        policy = AddressPolicy(
            allowRanges=["10.0.0.0/8"], selfAddresses=[("0.0.0.0", 8080)]
        )
        self.assertRule(policy, "64:ff9b::10.0.0.1", 8080, False, EMBED)
        self.assertRule(policy, "64:ff9b::10.0.0.1", 80, True, RULE_ALLOW_USER)
        self.assertRule(policy, "2002:a00:1::1", 8080, False, EMBED)
        self.assertRule(policy, "64:ff9b::8.8.8.8", 8080, True, ALLOW)


class ConstructorErrorTests(SynchronousTestCase):
    """
    Tests for the errors L{AddressPolicy} raises for bad configuration.
    """

    def assertMessage(self, expected: str, **kwargs) -> None:
        error = self.assertRaises(ValueError, AddressPolicy, **kwargs)
        self.assertEqual(str(error), expected)

    def test_badRange(self) -> None:
        """
        A range that is not CIDR is refused, naming the value and giving an
        example of what is expected.
        """
        for text in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "example.com",
            "fd00::/129",
            "010.0.0.0/8",
        ]:
            self.assertMessage(
                f"{text!r} is not an IP range (CIDR), such as 10.0.0.0/8",
                denyRanges=[text],
            )
        self.assertMessage(
            "42 is not an IP range (CIDR), such as 10.0.0.0/8", allowRanges=[42]
        )

    def test_rangeWithHostBits(self) -> None:
        """
        A range with bits set after its prefix is refused with a suggested
        correction, rather than silently widened.
        """
        self.assertMessage(
            "'10.0.0.1/8' is not an IP range (CIDR): it has bits set after the "
            "/8 prefix; did you mean 10.0.0.0/8?",
            allowRanges=["10.0.0.1/8"],
        )

    def test_scopedRange(self) -> None:
        """
        A range with a zone is refused: scoped addresses are always denied,
        so it could never match.
        """
        error = self.assertRaises(
            ValueError, AddressPolicy, allowRanges=["fe80::%eth0/64"]
        )
        self.assertIn("'fe80::%eth0/64'", str(error))
        self.assertIn("zone", str(error))

    def test_badAddress(self) -> None:
        """
        An address rule that is not an address with an optional port is
        refused, naming the value and giving examples.
        """
        example = "such as 192.0.2.1, 192.0.2.1:443, 2001:db8::1 or [2001:db8::1]:443"
        for text in [
            "example.com",
            "10.0.0.0/8",
            "[::1",
            "[::1]80",
            "::g",
            "1.2.3.4.5",
        ]:
            self.assertMessage(
                f"{text!r} is not an IP address with an optional port, {example}",
                denyAddresses=[text],
            )
        self.assertMessage(
            f"'[10.0.0.1]:80' puts an IPv4 address in brackets, which are only "
            f"for IPv6, {example}",
            allowAddresses=["[10.0.0.1]:80"],
        )

    def test_badPort(self) -> None:
        """
        An address rule's port must be a number from 1 to 65535.
        """
        for text, port in [
            ("10.0.0.1:0", "0"),
            ("10.0.0.1:65536", "65536"),
            ("10.0.0.1:http", "'http'"),
            ("[::1]:-1", "'-1'"),
            ("1.2.3.4:", "''"),
        ]:
            self.assertMessage(
                f"{text!r} has port {port}, but a port is a number from 1 to 65535",
                allowAddresses=[text],
            )

    def test_scopedAddress(self) -> None:
        """
        An address rule with a zone is refused.
        """
        error = self.assertRaises(
            ValueError, AddressPolicy, allowAddresses=["fe80::1%eth0"]
        )
        self.assertIn("'fe80::1%eth0' has a zone", str(error))

    def test_badSelfAddress(self) -> None:
        """
        A listening address must be a (host, port) pair whose host is an IP
        address or a wildcard and whose port is a number from 1 to 65535.
        """
        error = self.assertRaises(
            ValueError, AddressPolicy, selfAddresses=[("localhost", 8080)]
        )
        self.assertEqual(
            str(error),
            "('localhost', 8080) has host 'localhost', but a listening host must "
            "be an IP address, or 0.0.0.0, :: or '' for all interfaces",
        )
        for pair in [("127.0.0.1", 0), ("127.0.0.1", True), ("127.0.0.1", 70000)]:
            error = self.assertRaises(ValueError, AddressPolicy, selfAddresses=[pair])
            self.assertIn("a port is a number from 1 to 65535", str(error))
        error = self.assertRaises(
            ValueError, AddressPolicy, selfAddresses=["127.0.0.1:8080"]
        )
        self.assertIn("expected a (host, port) pair", str(error))

    def test_singleString(self) -> None:
        """
        Passing one string where a collection is expected is refused rather
        than read one character at a time.
        """
        error = self.assertRaises(TypeError, AddressPolicy, denyRanges="10.0.0.0/8")
        self.assertIn("denyRanges", str(error))


class ParseIPLiteralTests(SynchronousTestCase):
    """
    Tests for L{parseIPLiteral}.
    """

    def test_inetAtonSpellings(self) -> None:
        """
        Every spelling C{inet_aton} accepts gives the address it would
        dial.
        """
        cases = {
            "127.0.0.1": "127.0.0.1",
            "2130706433": "127.0.0.1",
            "0x7f000001": "127.0.0.1",
            "0X7F000001": "127.0.0.1",
            "0177.0.0.1": "127.0.0.1",
            "0x7f.0.0.1": "127.0.0.1",
            "0x7f.1": "127.0.0.1",
            "127.1": "127.0.0.1",
            "10.1.2": "10.1.0.2",
            "1.16777215": "1.255.255.255",
            "1.2.65535": "1.2.255.255",
            "4294967295": "255.255.255.255",
            "0": "0.0.0.0",
            "00000000000177.0.0.1": "127.0.0.1",
            "0x00000000007f.0.0.1": "127.0.0.1",
        }
        self.assertEqual(
            {text: parseIPLiteral(text) for text in cases},
            {text: ipaddress.IPv4Address(a) for text, a in cases.items()},
        )

    def test_ipv6(self) -> None:
        """
        IPv6 literals parse with or without brackets.
        """
        self.assertEqual(parseIPLiteral("::1"), ipaddress.IPv6Address("::1"))
        self.assertEqual(parseIPLiteral("[::1]"), ipaddress.IPv6Address("::1"))
        self.assertEqual(
            parseIPLiteral("[::ffff:127.0.0.1]"),
            ipaddress.IPv6Address("::ffff:7f00:1"),
        )

    def test_scoped(self) -> None:
        """
        A zone is kept, so that the policy can deny it.
        """
        for text in ["fe80::1%eth0", "[fe80::1%eth0]"]:
            address = parseIPLiteral(text)
            assert isinstance(address, ipaddress.IPv6Address)
            self.assertEqual(address.scope_id, "eth0")
            self.assertFalse(AddressPolicy().decide(address, 80).allowed)

    def test_names(self) -> None:
        """
        Host names, including ones that start with digits or have a label
        that is only C{0x}, are not literals.
        """
        for text in ["example.com", "1.2.3.com", "0x.1", "0x", "0x1g.2.3.4", "1e3", ""]:
            self.assertIsNone(parseIPLiteral(text), text)

    def test_nonASCII(self) -> None:
        """
        No C library reads non-ASCII text as an address, so it is a name;
        the caller maps it through IDNA and asks again.
        """
        self.assertIsNone(parseIPLiteral("\uff11\uff12\uff17.0.0.1"))
        self.assertIsNone(parseIPLiteral("b\u00fccher.example"))

    def test_invalidNumeric(self) -> None:
        """
        Text made of numbers and dots that C{inet_aton} rejects is an
        error, not a name to look up.
        """
        for text in [
            "256.1.1.1",
            "1.256.1.1",
            "1.2.3.256",
            "0x100000000",
            "4294967296",
            "1.16777216",
            "1.2.65536",
            "1.2.3.4.5",
            "1.2.3.4.",
            "1..2",
            ".1",
            "08.1.1.1",
            "0x100.1",
            "9" * 5000,
        ]:
            self.assertRaises(ValueError, parseIPLiteral, text)

    def test_invalidNumericMessages(self) -> None:
        """
        The error for a broken numeric literal names the text and what is
        wrong with it, so that the client can be told.
        """
        cases = {
            "08.1.1.1": "'08.1.1.1' has part '08', which starts with 0 (octal) "
            "but has a digit 8 or 9",
            "256.1.1.1": "'256.1.1.1' has a part that is out of range",
            "1.2.3.4.5": "'1.2.3.4.5' has more than four parts",
            "1.2.3.4.": "'1.2.3.4.' ends in a dot",
            "1..2": "'1..2' has an empty part",
            "1" * 40: f"{'1' * 40!r} has part {'1' * 40!r}, which is out of range",
        }
        for text, message in cases.items():
            error = self.assertRaises(ValueError, parseIPLiteral, text)
            self.assertEqual(str(error), message)

    def test_invalidOther(self) -> None:
        """
        Brackets around anything but IPv6, colons outside an IPv6 address,
        and addresses with whitespace around them are errors.
        """
        for text in [
            "[1.2.3.4]",
            "[example.com]",
            "[::1",
            "1.2.3.4:80",
            "::g",
            "127.0.0.1 junk",
            "127.0.0.1\n",
            " 127.0.0.1",
            "::1 x",
        ]:
            self.assertRaises(ValueError, parseIPLiteral, text)

    def test_namesWithWhitespace(self) -> None:
        """
        A name with whitespace is not a literal; what to do about the
        whitespace is the caller's business.
        """
        self.assertIsNone(parseIPLiteral("example.com "))

    @settings(max_examples=200, deadline=None)
    @given(st.integers(0, 0xFFFFFFFF))
    def test_everySpelling(self, n: int) -> None:
        """
        Every C{inet_aton} spelling of an address parses to that address.
        """
        a, b, c, d = ipaddress.IPv4Address(n).packed
        expected = ipaddress.IPv4Address(n)
        spellings = [
            f"{a}.{b}.{c}.{d}",
            f"{n}",
            f"{n:#x}",
            f"0{n:o}",
            f"{a:#x}.{b:#x}.{c:#x}.{d:#x}",
            f"0{a:o}.0{b:o}.0{c:o}.0{d:o}",
            f"{a}.{n & 0xFFFFFF}",
            f"{a}.{b}.{n & 0xFFFF}",
            f"{a:#x}.0{b:o}.{n & 0xFFFF:#x}",
        ]
        for text in spellings:
            self.assertEqual(parseIPLiteral(text), expected, text)


IPV4_DENIED = [
    (ipaddress.IPv4Network(cidr), rule) for cidr, rule in IPV4_SPECIAL_PURPOSE
]
IPV6_ENTRIES = [
    (ipaddress.IPv6Network(cidr), value) for cidr, value in IPV6_SPECIAL_PURPOSE
]
IPV6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
IPV6_DENIED = [network for network, value in IPV6_ENTRIES if isinstance(value, str)]
IPV6_CARVED_OUT = [
    network
    for network, value in IPV6_ENTRIES
    if value is GLOBAL and network != IPV6_GLOBAL_UNICAST
]
IPV6_UNWRAPPED = [
    network for network, value in IPV6_ENTRIES if value in (MAPPED, NAT64, SIXTOFOUR)
]

ipv4s = st.integers(0, 0xFFFFFFFF).map(ipaddress.IPv4Address)


def inside(network) -> st.SearchStrategy:
    """
    Addresses inside C{network}.
    """
    # ipaddress.ip_address(n) would make an IPv4 address of a small n.
    return st.integers(
        int(network.network_address), int(network.broadcast_address)
    ).map(type(network.network_address))


def complement(universe, holes) -> list:
    """
    The networks that cover C{universe} except for C{holes}, worked out
    with L{ipaddress}' own arithmetic rather than the module's tables.
    """
    pieces = [universe]
    for hole in holes:
        remaining = []
        for piece in pieces:
            if hole.version != piece.version or not piece.overlaps(hole):
                remaining.append(piece)
            elif hole.subnet_of(piece):
                remaining.extend(piece.address_exclude(hole))
        pieces = remaining
    return pieces


IPV4_GAPS = complement(
    ipaddress.IPv4Network("0.0.0.0/0"), [network for network, _ in IPV4_DENIED]
)
IPV6_GAPS = (
    complement(
        IPV6_GLOBAL_UNICAST,
        [network for network in IPV6_DENIED + IPV6_UNWRAPPED if network.prefixlen],
    )
    + IPV6_CARVED_OUT
)


POLICIES = [
    AddressPolicy(),
    AddressPolicy(
        allowRanges=["10.0.0.0/8", "127.0.0.0/24"],
        denyRanges=["8.0.0.0/8", "10.9.0.0/16"],
        allowAddresses=["192.168.1.1", "100.64.0.1:443"],
        denyAddresses=["1.1.1.1", "9.9.9.9:443"],
        selfAddresses=[("0.0.0.0", 443), ("9.8.7.6", 443)],
    ),
]


class PropertyTests(SynchronousTestCase):
    """
    Properties of L{AddressPolicy.decide} over many addresses.
    """

    @settings(max_examples=200, deadline=None)
    @given(ipv4s, st.sampled_from(POLICIES), st.sampled_from([80, 443]))
    def test_embeddingNeverMorePermissive(self, v4, policy, port) -> None:
        """
        The mapped, NAT64 and 6to4 forms of an IPv4 address are never
        allowed when the address is denied; the mapped form gets exactly
        the same decision, and the others the same rule when allowed.
        """
        direct = policy.decide(v4, port)
        forms = {
            "mapped": policy.decide(mapped(v4), port),
            "nat64": policy.decide(nat64(v4), port),
            "6to4": policy.decide(sixToFour(v4), port),
        }
        self.assertEqual(
            (forms["mapped"].allowed, forms["mapped"].rule),
            (direct.allowed, direct.rule),
        )
        for name, decision in forms.items():
            if not direct.allowed:
                self.assertFalse(decision.allowed, name)
            else:
                self.assertEqual(decision.rule, direct.rule, name)

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from(IPV4_GAPS).flatmap(inside))
    def test_ipv4OutsideTableAllowed(self, v4) -> None:
        """
        An IPv4 address outside every table entry is allowed by default
        (the cloud metadata addresses are listed on their own).
        """
        assume(str(v4) not in METADATA_TEXTS)
        self.assertEqual(
            AddressPolicy().decide(v4, 443), AddressDecision(True, str(v4), ALLOW)
        )

    @settings(max_examples=200, deadline=None)
    @given(
        st.sampled_from(IPV4_DENIED).flatmap(
            lambda entry: st.tuples(inside(entry[0]), st.just(entry[1]))
        )
    )
    def test_ipv4InsideTableDenied(self, case) -> None:
        """
        An IPv4 address inside a table entry is denied with its rule
        (the cloud metadata addresses with their own).
        """
        v4, rule = case
        assume(str(v4) not in METADATA_TEXTS)
        self.assertEqual(
            AddressPolicy().decide(v4, 443), AddressDecision(False, str(v4), rule)
        )

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from(IPV6_GAPS).flatmap(inside))
    def test_ipv6OutsideTableAllowed(self, v6) -> None:
        """
        An IPv6 global unicast address outside every deny entry, or inside
        one of the globally reachable blocks carved out of 2001::/23, is
        allowed by default.
        """
        self.assertEqual(
            AddressPolicy().decide(v6, 443), AddressDecision(True, str(v6), ALLOW)
        )

    @settings(max_examples=200, deadline=None)
    @given(
        st.sampled_from(IPV6_DENIED).flatmap(
            lambda network: st.tuples(inside(network), st.just(network))
        )
    )
    def test_ipv6InsideTableDenied(self, case) -> None:
        """
        An IPv6 address inside a deny entry is denied, unless a more
        specific entry carves it out or unwraps it.
        """
        v6, network = case
        assume(
            not any(
                v6 in other and other.prefixlen > network.prefixlen
                for other in IPV6_CARVED_OUT + IPV6_UNWRAPPED + [IPV6_GLOBAL_UNICAST]
            )
        )
        self.assertFalse(AddressPolicy().decide(v6, 443).allowed)


class DecisionCacheTests(SynchronousTestCase):
    """
    Decisions are remembered per address and port, within a bound.
    """

    def test_sameDecision(self) -> None:
        """
        Asking twice gives the same decision, for text and address objects,
        and each port is decided on its own.
        """
        policy = AddressPolicy(
            allowRanges=["127.0.0.0/8"], denyAddresses=["127.0.0.1:8443"]
        )
        first = policy.decide("127.0.0.1", 80)
        self.assertIs(policy.decide("127.0.0.1", 80), first)
        self.assertTrue(first.allowed)
        self.assertFalse(policy.decide("127.0.0.1", 8443).allowed)
        self.assertFalse(policy.decide(ipaddress.ip_address("127.0.0.1"), 8443).allowed)
        self.assertTrue(policy.decide(ipaddress.ip_address("127.0.0.1"), 80).allowed)

    def test_bounded(self) -> None:
        """
        The cache never holds more than L{DECISION_CACHE_SIZE} decisions,
        and decisions stay right when it starts over.
        """
        policy = AddressPolicy()
        for i in range(DECISION_CACHE_SIZE + 10):
            self.assertTrue(
                policy.decide(f"8.8.{i // 256 % 256}.{i % 256}", 443).allowed
            )
        self.assertLessEqual(len(policy._decisions), DECISION_CACHE_SIZE)
        self.assertFalse(policy.decide("10.0.0.1", 443).allowed)


class PortRuleTests(SynchronousTestCase):
    """
    C{allowPorts} and C{denyPorts}: which destination ports may be
    connected to at all, asked through L{AddressPolicy.portAllowed}.
    """

    def test_defaultAllPorts(self) -> None:
        """
        Without port rules every port is allowed, and the policy says it
        need not be asked.
        """
        policy = AddressPolicy()
        self.assertFalse(policy.limitsPorts)
        for port in (1, 22, 80, 443, 65535):
            self.assertTrue(policy.portAllowed(None, port))

    def test_allowPortsOnly(self) -> None:
        """
        With allow rules, only the listed ports and ranges (both ends
        included) are allowed, for names and literals alike.
        """
        policy = AddressPolicy(allowPorts=["80", 443, "8000-8100"])
        self.assertTrue(policy.limitsPorts)
        allowed = [
            port
            for port in (22, 79, 80, 81, 443, 7999, 8000, 8050, 8100, 8101)
            if policy.portAllowed(None, port)
        ]
        self.assertEqual(allowed, [80, 443, 8000, 8050, 8100])
        literal = ipaddress.ip_address("93.184.215.14")
        self.assertFalse(policy.portAllowed(literal, 22))
        self.assertTrue(policy.portAllowed(literal, 443))

    def test_denyBeatsAllow(self) -> None:
        """
        A denied port is refused even inside an allowed range; deny rules
        alone leave every other port allowed.
        """
        policy = AddressPolicy(allowPorts=["1-65535"], denyPorts=["25", "6000-6063"])
        self.assertEqual(
            [p for p in (24, 25, 26, 6000, 6063, 6064) if policy.portAllowed(None, p)],
            [24, 26, 6064],
        )
        policy = AddressPolicy(denyPorts=["25"])
        self.assertEqual(
            [p for p in (24, 25, 26) if policy.portAllowed(None, p)], [24, 26]
        )

    def test_exactAllowAddressWithPort(self) -> None:
        """
        An exact allow address rule that names the port passes the port
        rules for that address written as a literal (its mapped form
        included), not for another address, another port, a name, nor for
        an allow address without a port.
        """
        policy = AddressPolicy(
            allowPorts=["443"],
            allowAddresses=["10.0.0.5:6379", "10.0.0.6", "[fd00::5]:6379"],
        )
        ip = ipaddress.ip_address
        self.assertTrue(policy.portAllowed(ip("10.0.0.5"), 6379))
        self.assertTrue(policy.portAllowed(ip("::ffff:10.0.0.5"), 6379))
        self.assertTrue(policy.portAllowed(ip("fd00::5"), 6379))
        self.assertFalse(policy.portAllowed(ip("10.0.0.5"), 6380))
        self.assertFalse(policy.portAllowed(ip("10.0.0.7"), 6379))
        self.assertFalse(policy.portAllowed(ip("10.0.0.6"), 6379))
        self.assertFalse(policy.portAllowed(None, 6379))
        self.assertEqual(
            policy.decide("10.0.0.5", 6379),
            AddressDecision(True, "10.0.0.5", RULE_ALLOW_USER),
        )

    def test_badPorts(self) -> None:
        """
        A port rule that is not a port or an ordered range of them is a
        L{ValueError} naming it.
        """
        for bad, expected in [
            ("0", "from 1 to 65535"),
            ("65536", "from 1 to 65535"),
            ("http", "not a port or port range"),
            ("80-", "not a port or port range"),
            ("-80", "not a port or port range"),
            ("8100-8000", "did you mean 8000-8100?"),
            (True, "not a port or port range"),
            (80.0, "not a port or port range"),
        ]:
            for kwarg in ("allowPorts", "denyPorts"):
                with self.assertRaises(ValueError) as raised:
                    AddressPolicy(**{kwarg: [bad]})  # type: ignore[arg-type]
                self.assertIn(expected, str(raised.exception))
                self.assertIn(repr(bad), str(raised.exception))
        self.assertRaises(TypeError, AddressPolicy, allowPorts="443")

    def test_parsePortRange(self) -> None:
        """
        L{parsePortRange} reads a port or a range, both ends included.
        """
        self.assertEqual(parsePortRange("443"), (443, 443))
        self.assertEqual(parsePortRange(443), (443, 443))
        self.assertEqual(parsePortRange(" 8000-8100 "), (8000, 8100))
        self.assertEqual(parsePortRange("1-65535"), (1, 65535))


class CloudMetadataTests(SynchronousTestCase):
    """
    C{Deny: Cloud Metadata}: cloud metadata and wire-server addresses that
    the IANA tables allow or that a user range could open, overridable only
    by an exact allow address rule.
    """

    def test_listed(self) -> None:
        """
        Azure's WireServer, Alibaba's metadata address and AWS's IPv6
        metadata and Pod Identity addresses are denied by default, in every
        IPv4 or IPv6 form; the link-local metadata address keeps its rule.
        """
        policy = AddressPolicy()
        for address in ["168.63.129.16", "100.100.100.200"]:
            for form in (address, f"::ffff:{address}"):
                self.assertEqual(
                    (policy.decide(form, 80).allowed, policy.decide(form, 80).rule),
                    (False, RULE_CLOUD_METADATA),
                    form,
                )
            for form in (f"64:ff9b::{address}", "2002:a83f:8110::1"):
                self.assertFalse(policy.decide(form, 80).allowed, form)
        for address in ["fd00:ec2::254", "fd00:ec2::23"]:
            self.assertEqual(
                policy.decide(address, 80),
                AddressDecision(False, address, RULE_CLOUD_METADATA),
            )
        self.assertEqual(policy.decide("168.63.129.17", 80).rule, ALLOW)
        self.assertEqual(policy.decide("169.254.169.254", 80).rule, NGU)
        self.assertEqual(policy.decide("fd00:ec2::253", 80).rule, PRIVATE)

    def test_rangesDoNotOpen(self) -> None:
        """
        An allow range never opens a metadata address, however it covers
        it (IPv4, IPv6, or an IPv6 range over the NAT64 form), while the
        addresses around it are opened as before.
        """
        policy = AddressPolicy(
            allowRanges=[
                "168.63.0.0/16",
                "100.64.0.0/10",
                "fd00::/8",
                "64:ff9b::/96",
                "::ffff:0:0/96",
            ]
        )
        for address in [
            "168.63.129.16",
            "100.100.100.200",
            "fd00:ec2::254",
            "fd00:ec2::23",
            "::ffff:168.63.129.16",
        ]:
            self.assertEqual(policy.decide(address, 80).rule, RULE_CLOUD_METADATA)
        self.assertEqual(
            policy.decide("64:ff9b::168.63.129.16", 80).rule, RULE_IPV6_EMBEDDING
        )
        for address in ["100.100.100.201", "fd00:ec2::1", "64:ff9b::100.64.0.1"]:
            self.assertEqual(policy.decide(address, 80).rule, RULE_ALLOW_USER)

    def test_exactAllowOverrides(self) -> None:
        """
        An exact allow address rule opens a metadata address (on its port
        only, when it names one), and its NAT64 form through an IPv6 allow
        range; an exact deny rule still names itself.
        """
        policy = AddressPolicy(
            allowAddresses=["168.63.129.16:32526", "100.100.100.200", "fd00:ec2::254"],
            allowRanges=["64:ff9b::/96"],
            denyAddresses=["fd00:ec2::23"],
        )
        self.assertEqual(policy.decide("168.63.129.16", 32526).rule, RULE_ALLOW_USER)
        self.assertEqual(policy.decide("168.63.129.16", 80).rule, RULE_CLOUD_METADATA)
        self.assertEqual(
            policy.decide("64:ff9b::168.63.129.16", 80).rule, RULE_IPV6_EMBEDDING
        )
        self.assertEqual(
            policy.decide("64:ff9b::100.100.100.200", 80).rule, RULE_ALLOW_USER
        )
        self.assertEqual(policy.decide("100.100.100.200", 80).rule, RULE_ALLOW_USER)
        self.assertEqual(policy.decide("fd00:ec2::254", 80).rule, RULE_ALLOW_USER)
        self.assertEqual(policy.decide("fd00:ec2::23", 80).rule, RULE_DENY_USER)

    def test_label(self) -> None:
        """
        The rule has its own metric label.
        """
        self.assertEqual(
            AddressPolicy().decide("168.63.129.16", 80).label, "cloud_metadata"
        )

    def test_sourcesCited(self) -> None:
        """
        Every entry of the table is an address, with its source URL in a
        comment next to it in the module.
        """
        import inspect

        from proxy_app import addresses

        source = inspect.getsource(addresses)
        for address, _ in CLOUD_METADATA:
            ipaddress.ip_address(address)
            before = source[: source.index(f'("{address}"')]
            self.assertIn("# https://", before.rsplit("\n    (", 1)[-1])


class AllowedHostTests(SynchronousTestCase):
    """
    C{allowHosts}: names whose answers may be in the private ranges, and
    nothing more.
    """

    def test_hostAllowed(self) -> None:
        """
        A name matches itself (on its port, when it names one); a glob
        matches names below its suffix at any depth, not the suffix itself
        nor a name that merely ends with the same letters.
        """
        policy = AddressPolicy(
            allowHosts=["hooks.internal.example", "*.svc.example", "db.example:5432"]
        )
        self.assertTrue(policy.allowsHosts)
        for host, port, expected in [
            ("hooks.internal.example", 443, True),
            ("x.hooks.internal.example", 443, False),
            ("internal.example", 443, False),
            ("a.svc.example", 80, True),
            ("a.b.svc.example", 80, True),
            ("svc.example", 80, False),
            ("evilsvc.example", 80, False),
            ("svc.example.evil", 80, False),
            ("db.example", 5432, True),
            ("db.example", 5433, False),
        ]:
            self.assertEqual(policy.hostAllowed(host, port), expected, (host, port))
        self.assertFalse(AddressPolicy().allowsHosts)
        self.assertFalse(AddressPolicy().hostAllowed("hooks.internal.example", 80))

    def test_liftsPrivateRangesOnly(self) -> None:
        """
        For an allowed host, RFC 1918 and unique local answers are allowed
        with C{Allow: Allowed Host}; loopback, link-local, CGNAT, cloud
        metadata and embedded forms keep their denial.
        """
        policy = AddressPolicy(allowHosts=["hooks.internal.example"])

        def lifted(address: str) -> AddressDecision:
            return policy.liftForHost(policy.decide(address, 443))

        for address in ["10.1.2.3", "172.16.0.1", "192.168.1.1", "fd00::1"]:
            self.assertEqual(
                lifted(address),
                AddressDecision(True, address, RULE_ALLOW_HOST),
            )
        self.assertEqual(lifted("::ffff:10.0.0.1").rule, RULE_ALLOW_HOST)
        for address, rule in [
            ("127.0.0.1", NGU),
            ("::1", NGU),
            ("169.254.169.254", NGU),
            ("fe80::1", NGU),
            ("100.64.0.1", CGNAT),
            ("100.100.100.200", RULE_CLOUD_METADATA),
            ("fd00:ec2::254", RULE_CLOUD_METADATA),
            ("64:ff9b::10.0.0.1", EMBED),
            ("0.0.0.0", NGU),
        ]:
            self.assertEqual(lifted(address), policy.decide(address, 443), address)
            self.assertEqual(lifted(address).rule, rule, address)
        self.assertEqual(lifted("93.184.215.14").rule, ALLOW)

    def test_userDenyAndSelfBeatIt(self) -> None:
        """
        Explicit deny rules, exact or range, stand; the proxy's own
        listening address is refused on every port, as a self-connection.
        """
        policy = AddressPolicy(
            allowHosts=["*.internal.example"],
            denyAddresses=["10.0.0.5"],
            denyRanges=["10.9.0.0/16"],
            selfAddresses=[("10.0.0.2", 9090)],
        )
        for address, rule in [
            ("10.0.0.5", RULE_DENY_USER),
            ("10.9.1.1", RULE_DENY_USER),
            ("10.0.0.2", RULE_SELF_CONNECTION),
        ]:
            for port in (22, 9090):
                self.assertEqual(
                    policy.liftForHost(policy.decide(address, port)),
                    AddressDecision(False, address, rule),
                )

    def test_cacheDoesNotLeak(self) -> None:
        """
        Lifting leaves L{AddressPolicy.decide} and its cache alone: the
        same address asked without the host is still denied.
        """
        policy = AddressPolicy(allowHosts=["hooks.internal.example"])
        self.assertTrue(policy.liftForHost(policy.decide("10.1.2.3", 443)).allowed)
        self.assertEqual(
            policy.decide("10.1.2.3", 443),
            AddressDecision(False, "10.1.2.3", PRIVATE),
        )

    def test_badHosts(self) -> None:
        """
        An allowed host that is not a lower-case name or glob, or that is
        an IP address, is a L{ValueError} naming it.
        """
        for bad, expected in [
            ("10.0.0.1", "is an IP address"),
            ("1.2.3.999", "is an IP address"),
            ("*", "is not a host name"),
            ("*.", "is not a host name"),
            ("Hooks.example", "is not a host name"),
            ("a..b", "is not a host name"),
            ("a.b:0", "from 1 to 65535"),
            ("[::1]", "is not a host name"),
            (5, "is not a host name"),
        ]:
            with self.assertRaises(ValueError) as raised:
                AddressPolicy(allowHosts=[bad])  # type: ignore[list-item]
            self.assertIn(expected, str(raised.exception))
            self.assertIn(repr(bad), str(raised.exception))
        self.assertEqual(
            parseAllowHost("*.svc.example:8443"), ("svc.example", True, 8443)
        )
        self.assertEqual(parseAllowHost("a_b.example"), ("a_b.example", False, None))
