"""
Which IP addresses the proxy may connect to.

The proxy must never be talked into connecting into a private network
(server-side request forgery).  L{AddressPolicy.decide} classifies one
destination address and port and says whether a connection to it is
allowed, and by which rule.  L{parseIPLiteral} turns any spelling of an IP
address that a C library would accept (C{127.1}, C{0x7f000001},
C{0177.0.0.1}, ...) into the address that would really be dialled, so that
no spelling can slip past the classification.

Everything here is pure: no I/O, no global state, no clock.

Precedence
==========

L{AddressPolicy.decide} answers with the first of these that applies:

 1. The text is not an IP address, or it is an IPv6 address with a zone
    (C{fe80::1%eth0}): deny, L{RULE_NOT_GLOBAL_UNICAST}.  A zone picks an
    interface, which only makes sense for link-local destinations.
 2. An IPv4-mapped IPv6 address (C{::ffff:0:0/96}) is the very same socket
    destination as the IPv4 address it carries, so it is classified as that
    IPv4 address by every step below, user rules and self-connection
    included.  The decision still reports the IPv6 text that was given.
    User rules written in mapped form are turned into IPv4 rules when the
    policy is built, so C{::ffff:10.0.0.1} and C{10.0.0.1} mean the same.
 3. Self connection: the address and port are one of the proxy's own
    listeners, or a listener bound to a wildcard (C{0.0.0.0}, C{::}, or
    C{""}) is on that port and the built-in table says the address is not
    global.  Deny, L{RULE_SELF_CONNECTION}.  This beats every user rule: no
    configuration can make the proxy loop into itself.
 4. Exact address rules (C{denyAddresses}, C{allowAddresses}), with or
    without a port: deny beats allow.  L{RULE_DENY_USER} or
    L{RULE_ALLOW_USER}.
    Next (step 4a), cloud metadata and wire-server addresses
    (L{CLOUD_METADATA}): deny, L{RULE_CLOUD_METADATA}.  Only an exact
    allow rule opens one; no range does, nor an IPv6 allow range over a
    form that carries one.
 5. Range rules (C{denyRanges}, C{allowRanges}): deny beats allow whatever
    the prefix lengths.  L{RULE_DENY_USER} or L{RULE_ALLOW_USER}.
 6. The built-in table, taken from the IANA IPv4 and IPv6 Special-Purpose
    Address Registries (L{IPV4_SPECIAL_PURPOSE}, L{IPV6_SPECIAL_PURPOSE}),
    longest prefix first: everything that is not global unicast is denied.
    Then (step 6a), only for an answer to a name in C{allowHosts}, asked
    through L{AddressPolicy.liftForHost} on top of
    L{AddressPolicy.decide}'s decision: a C{RULE_PRIVATE_RANGE} denial
    (RFC 1918, unique local IPv6) becomes an allow, L{RULE_ALLOW_HOST},
    unless the address is one of the proxy's own listening addresses (any
    port).  Every other built-in denial stands, and so does every rule
    above.
 7. Otherwise allow, L{RULE_ALLOW_DEFAULT}.

Because exact rules (step 4) are consulted before any range (step 5), an
exact deny address always beats an allow range, and an exact allow address
always beats a deny range.  Smokescreen issue #236, where an allow range
let through an address that was explicitly denied, cannot happen here.

Port rules
==========

C{allowPorts} and C{denyPorts} limit the destination ports before any of
the above is asked: L{AddressPolicy.portAllowed} judges the request target
(a name, or an IP literal) before it is resolved.  A deny beats an allow;
without allow rules every port is allowed.  An exact allow address rule
that names the port (C{"10.0.0.5:6379"}) passes them for that address
written as a literal.  They only refuse: an allowed port is then judged by
L{AddressPolicy.decide} as always.

IPv6 forms that carry an IPv4 address
=====================================

An IPv6 destination can lead to an IPv4 one.  Such a form must never get a
more permissive answer than the IPv4 address it carries:

 - IPv4-mapped C{::ffff:0:0/96}: classified as the IPv4 address (step 2).
 - NAT64 well-known prefix C{64:ff9b::/96} (the last 32 bits) and 6to4
   C{2002::/16} (bits 16 to 47): the embedded IPv4 address is classified by
   steps 3 to 7.  If it is denied, so is the IPv6 address, with
   L{RULE_IPV6_EMBEDDING}; if it is allowed, so is the IPv6 address, with
   the IPv4 decision's rule.  DNS64 networks reach the IPv4 internet this
   way, so NAT64 has to keep working.
 - IPv4-compatible C{::/96}, IPv4-translated C{::ffff:0:0:0/96}, local-use
   NAT64 C{64:ff9b:1::/48} and Teredo C{2001::/32}: always denied with
   L{RULE_IPV6_EMBEDDING}.  They are obsolete or local, and the embedded
   address of a local-use NAT64 prefix is not even at a fixed position.

User rules on the IPv6 address itself (steps 4 and 5) are still consulted
first, so an operator can allow an embedded form explicitly.  One guard
applies: an IPv6 allow rule never overrides an explicit user deny rule
(exact or range) on an IPv4 address that the IPv6 address carries (the
last 32 bits of the compatible, translated and NAT64 forms, the 6to4
address, Teredo's server and client).  Allowing C{64:ff9b::/96} therefore
does not reopen an IPv4 address that was denied by name; the answer is a
deny with L{RULE_IPV6_EMBEDDING}.  Beware that a broad IPv6 allow range
such as C{::/0} or C{2000::/3} overrides the built-in table for every form
inside it, embedded ones included; allow ranges should be narrow.

IPv6 rules whose range merely overlaps C{::ffff:0:0/96} (C{::/0}, say) do
not apply to mapped addresses: those are IPv4 destinations and are judged
by the IPv4 rules only, which is never more permissive than the IPv4
address itself.

Why not L{ipaddress}' own C{is_global}
======================================

The tables in the Python this runs on (3.11.7) predate the fix for
CVE-2024-4032 and get several blocks wrong, and they change between Python
versions.  An explicit table, pinned here and tested edge by edge, says the
same thing everywhere.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from typing import cast

import attr

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

RULE_NOT_GLOBAL_UNICAST = "Deny: Not Global Unicast"
RULE_PRIVATE_RANGE = "Deny: Private Range"
RULE_CGNAT_RANGE = "Deny: CGNAT Range"
RULE_IPV6_EMBEDDING = "Deny: IPv6 Embedding"
RULE_SELF_CONNECTION = "Deny: Self Connection"
RULE_PORT_DENIED = "Deny: Port Not Allowed"
RULE_CLOUD_METADATA = "Deny: Cloud Metadata"
RULE_DENY_USER = "Deny: User Configured"
RULE_ALLOW_USER = "Allow: User Configured"
RULE_ALLOW_HOST = "Allow: Allowed Host"
RULE_ALLOW_DEFAULT = "Allow: Default"

# Metric labels must be few and fixed, so user rules share one label
# whichever way they went.
_LABELS = {
    RULE_NOT_GLOBAL_UNICAST: "not_global_unicast",
    RULE_PRIVATE_RANGE: "private_range",
    RULE_CGNAT_RANGE: "cgnat_range",
    RULE_IPV6_EMBEDDING: "ipv6_embedding",
    RULE_SELF_CONNECTION: "self_connection",
    RULE_PORT_DENIED: "port_denied",
    RULE_CLOUD_METADATA: "cloud_metadata",
    RULE_DENY_USER: "user_configured",
    RULE_ALLOW_USER: "user_configured",
    RULE_ALLOW_HOST: "allowed_host",
    RULE_ALLOW_DEFAULT: "default",
}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class AddressDecision:
    """
    The verdict of L{AddressPolicy.decide} on one address.

    @ivar allowed: whether the proxy may connect to the address.
    @ivar address: the canonical text (C{str()} of the L{ipaddress} object)
        of the address that was classified, that is the one that would be
        dialled; for text that is not an address at all, the text itself.
    @ivar rule: the rule that decided, one of the C{RULE_*} constants.
    """

    allowed: bool
    address: str
    rule: str = attr.ib(validator=attr.validators.in_(_LABELS))

    @property
    def label(self) -> str:
        """
        A low-cardinality name for the rule, fit for a metric label: one of
        C{not_global_unicast}, C{private_range}, C{cgnat_range},
        C{ipv6_embedding}, C{self_connection}, C{port_denied},
        C{cloud_metadata}, C{user_configured}, C{allowed_host},
        C{default}.
        """
        return _LABELS[self.rule]


class _Marker:
    """
    A value in a built-in table that is not a deny rule.
    """

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


# Globally reachable: allowed unless a user rule says otherwise.
GLOBAL = _Marker("GLOBAL")
# IPv4-mapped: never looked up, decide() unwraps it first.  Listed so that
# the table reads like the registry.
MAPPED = _Marker("MAPPED")
# Carries an IPv4 address that decides for it.
NAT64 = _Marker("NAT64")
SIXTOFOUR = _Marker("SIXTOFOUR")


# The IANA IPv4 Special-Purpose Address Registry, plus multicast and the
# old class E space, which live in other registries but are no more global
# unicast.  Longest prefix wins.
IPV4_SPECIAL_PURPOSE: tuple[tuple[str, str], ...] = (
    # "This network"; 0.0.0.0/32 "this host" (RFC 1122 s3.2.1.3).  Linux
    # connects 0.0.0.0 to the local host.
    ("0.0.0.0/8", RULE_NOT_GLOBAL_UNICAST),  # RFC 791
    ("10.0.0.0/8", RULE_PRIVATE_RANGE),  # RFC 1918
    ("100.64.0.0/10", RULE_CGNAT_RANGE),  # RFC 6598, shared address space
    ("127.0.0.0/8", RULE_NOT_GLOBAL_UNICAST),  # RFC 1122, loopback
    ("169.254.0.0/16", RULE_NOT_GLOBAL_UNICAST),  # RFC 3927, link local
    ("172.16.0.0/12", RULE_PRIVATE_RANGE),  # RFC 1918
    # IETF protocol assignments: 192.0.0.0/29 (RFC 7335), 192.0.0.8/32
    # (RFC 7600), 192.0.0.170-171 (RFC 8880).  IANA marks 192.0.0.9/32 (PCP
    # anycast, RFC 7723) and 192.0.0.10/32 (TURN anycast, RFC 8155)
    # globally reachable, but an anycast address reaches the nearest
    # instance, which is usually inside the operator's own network.
    ("192.0.0.0/24", RULE_NOT_GLOBAL_UNICAST),  # RFC 6890
    ("192.0.2.0/24", RULE_NOT_GLOBAL_UNICAST),  # RFC 5737, TEST-NET-1
    # The next three are anycast infrastructure (AS112 DNS sinks, AMT
    # relays) that IANA marks globally reachable.  A webhook has no
    # business there, and the nearest instance may be the operator's own.
    ("192.31.196.0/24", RULE_NOT_GLOBAL_UNICAST),  # RFC 7535, AS112-v4
    ("192.52.193.0/24", RULE_NOT_GLOBAL_UNICAST),  # RFC 7450, AMT
    ("192.88.99.0/24", RULE_NOT_GLOBAL_UNICAST),  # RFC 7526, ex-6to4 relay
    ("192.168.0.0/16", RULE_PRIVATE_RANGE),  # RFC 1918
    ("192.175.48.0/24", RULE_NOT_GLOBAL_UNICAST),  # RFC 7534, AS112 service
    ("198.18.0.0/15", RULE_NOT_GLOBAL_UNICAST),  # RFC 2544, benchmarking
    ("198.51.100.0/24", RULE_NOT_GLOBAL_UNICAST),  # RFC 5737, TEST-NET-2
    ("203.0.113.0/24", RULE_NOT_GLOBAL_UNICAST),  # RFC 5737, TEST-NET-3
    ("224.0.0.0/4", RULE_NOT_GLOBAL_UNICAST),  # RFC 5771, multicast
    ("240.0.0.0/4", RULE_NOT_GLOBAL_UNICAST),  # RFC 1112, reserved
    ("255.255.255.255/32", RULE_NOT_GLOBAL_UNICAST),  # RFC 919, broadcast
)

# The IANA IPv6 Special-Purpose Address Registry, inside the IPv6 address
# space where only 2000::/3 is global unicast.  Longest prefix wins, which
# is how the globally reachable blocks are carved out of 2001::/23.
IPV6_SPECIAL_PURPOSE: tuple[tuple[str, str | _Marker], ...] = (
    # Multicast ff00::/8, link-local fe80::/10, the deprecated site-local
    # fec0::/10 (RFC 3879) and all unassigned space: not global unicast.
    ("::/0", RULE_NOT_GLOBAL_UNICAST),  # RFC 4291 s2.4
    ("2000::/3", GLOBAL),  # RFC 4291 s2.4, RFC 3587
    ("::/128", RULE_NOT_GLOBAL_UNICAST),  # RFC 4291, unspecified
    ("::1/128", RULE_NOT_GLOBAL_UNICAST),  # RFC 4291, loopback
    ("::/96", RULE_IPV6_EMBEDDING),  # RFC 4291 s2.5.5.1, IPv4-compatible
    ("::ffff:0:0/96", MAPPED),  # RFC 4291 s2.5.5.2, IPv4-mapped
    ("::ffff:0:0:0/96", RULE_IPV6_EMBEDDING),  # RFC 2765 s2.1, translated
    ("64:ff9b::/96", NAT64),  # RFC 6052, NAT64 well-known prefix
    ("64:ff9b:1::/48", RULE_IPV6_EMBEDDING),  # RFC 8215, local-use NAT64
    ("100::/64", RULE_NOT_GLOBAL_UNICAST),  # RFC 6666, discard-only
    ("2001::/23", RULE_NOT_GLOBAL_UNICAST),  # RFC 2928, IETF protocol
    ("2001::/32", RULE_IPV6_EMBEDDING),  # RFC 4380, Teredo
    ("2001:1::1/128", GLOBAL),  # RFC 7723, PCP anycast
    ("2001:1::2/128", GLOBAL),  # RFC 8155, TURN anycast
    ("2001:1::3/128", GLOBAL),  # RFC 9665, DNS-SD SRP anycast
    ("2001:2::/48", RULE_NOT_GLOBAL_UNICAST),  # RFC 5180, benchmarking
    ("2001:3::/32", GLOBAL),  # RFC 7450, AMT
    ("2001:4:112::/48", GLOBAL),  # RFC 7535, AS112-v6
    ("2001:10::/28", RULE_NOT_GLOBAL_UNICAST),  # RFC 4843, old ORCHID
    ("2001:20::/28", GLOBAL),  # RFC 7343, ORCHIDv2
    ("2001:30::/28", GLOBAL),  # RFC 9374, drone remote ID (DETs)
    ("2001:db8::/32", RULE_NOT_GLOBAL_UNICAST),  # RFC 3849, documentation
    ("2002::/16", SIXTOFOUR),  # RFC 3056, 6to4
    ("2620:4f:8000::/48", RULE_NOT_GLOBAL_UNICAST),  # RFC 7534, AS112
    ("3fff::/20", RULE_NOT_GLOBAL_UNICAST),  # RFC 9637, documentation
    ("5f00::/16", RULE_NOT_GLOBAL_UNICAST),  # RFC 9602, SRv6 SIDs
    ("fc00::/7", RULE_PRIVATE_RANGE),  # RFC 4193, unique local
    ("fe80::/10", RULE_NOT_GLOBAL_UNICAST),  # RFC 4291, link-local
    ("fec0::/10", RULE_NOT_GLOBAL_UNICAST),  # RFC 3879, site-local
    ("ff00::/8", RULE_NOT_GLOBAL_UNICAST),  # RFC 4291, multicast
)


# Cloud metadata and wire-server addresses that the tables above would let
# through, or that a user range could open: "Deny: Cloud Metadata", which
# only an exact allow address rule overrides (see the module docstring).
# The link-local ones (169.254.169.254 for AWS, GCP, Azure IMDS, Oracle,
# OpenStack, DigitalOcean; 169.254.170.2 for ECS) stay "Deny: Not Global
# Unicast": nothing but a user rule opens them.
CLOUD_METADATA: tuple[tuple[str, str], ...] = (
    # Azure WireServer: a global unicast address (Microsoft's) answering
    # inside every Azure VM: VM agent, health probes, DHCP, DNS.
    # https://learn.microsoft.com/en-us/azure/virtual-network/what-is-ip-address-168-63-129-16
    ("168.63.129.16", "Azure WireServer"),
    # Alibaba Cloud ECS instance metadata (credentials included): in the
    # CGNAT range, which an allow range for a carrier or overlay network
    # (100.64.0.0/10) would open.
    # https://www.alibabacloud.com/help/en/ecs/user-guide/view-instance-metadata
    ("100.100.100.200", "Alibaba Cloud ECS metadata"),
    # AWS EC2 IMDS over IPv6: unique local (fc00::/7), which an allow
    # range for a private IPv6 network would open.
    # https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/configuring-instance-metadata-options.html
    ("fd00:ec2::254", "AWS EC2 instance metadata (IPv6)"),
    # AWS EKS Pod Identity Agent, which hands out IAM credentials to pods:
    # unique local as above (its IPv4 address, 169.254.170.23, is
    # link-local).
    # https://docs.aws.amazon.com/eks/latest/userguide/pod-id-agent-setup.html
    ("fd00:ec2::23", "AWS EKS Pod Identity Agent (IPv6)"),
)

_CLOUD_METADATA4 = frozenset(
    int(ipaddress.IPv4Address(a)) for a, _ in CLOUD_METADATA if ":" not in a
)
_CLOUD_METADATA6 = frozenset(
    int(ipaddress.IPv6Address(a)) for a, _ in CLOUD_METADATA if ":" in a
)


_MASK32 = 0xFFFFFFFF


class _PrefixTable:
    """
    A longest-prefix-match table over the integers of one address family.

    Each distinct prefix length is one dict from the masked prefix to its
    value, so a lookup costs one dict probe per prefix length in use, with
    no parsing and no object creation.
    """

    __slots__ = ("_levels",)

    def __init__(self, bits: int, entries: Iterable[tuple[_Network, object]]) -> None:
        """
        @param bits: 32 or 128.
        @param entries: C{(network, value)} pairs; a network listed twice
            keeps its last value.  No value may be L{None}.
        """
        byLength: dict[int, dict[int, object]] = {}
        for network, value in entries:
            shift = bits - network.prefixlen
            key = int(network.network_address) >> shift
            byLength.setdefault(network.prefixlen, {})[key] = value
        self._levels = tuple(
            (bits - length, byLength[length])
            for length in sorted(byLength, reverse=True)
        )

    def lookup(self, n: int) -> object | None:
        """
        The value of the longest prefix that contains C{n}, or L{None}.
        """
        for shift, entries in self._levels:
            value = entries.get(n >> shift)
            if value is not None:
                return value
        return None


def _table(bits: int, rows: Iterable[tuple[str, object]]) -> _PrefixTable:
    return _PrefixTable(bits, ((ipaddress.ip_network(cidr), v) for cidr, v in rows))


_BUILTIN4 = _table(32, IPV4_SPECIAL_PURPOSE)
_BUILTIN6 = _table(128, IPV6_SPECIAL_PURPOSE)


def _prefixKey(cidr: str) -> int:
    """
    The prefix of the IPv6 range C{cidr} as an integer: an address C{n} is
    in it when C{n >> (128 - prefixlen)} equals this.
    """
    network = ipaddress.IPv6Network(cidr)
    return int(network.network_address) >> (128 - network.prefixlen)


_MAPPED_KEY = _prefixKey("::ffff:0:0/96")
_COMPATIBLE_KEY = _prefixKey("::/96")
_TRANSLATED_KEY = _prefixKey("::ffff:0:0:0/96")
_NAT64_KEY = _prefixKey("64:ff9b::/96")
_SIXTOFOUR_KEY = _prefixKey("2002::/16")
_TEREDO_KEY = _prefixKey("2001::/32")


def _carriedIPv4(n: int) -> tuple[int, ...]:
    """
    The IPv4 addresses, as integers, that the IPv6 address C{n} carries at
    a known position; empty for an IPv6 address that carries none.
    """
    top96 = n >> 32
    if top96 in (_COMPATIBLE_KEY, _TRANSLATED_KEY, _NAT64_KEY):
        return (n & _MASK32,)
    if n >> 112 == _SIXTOFOUR_KEY:
        return ((n >> 80) & _MASK32,)
    if n >> 96 == _TEREDO_KEY:
        # RFC 4380 s4: the server in bits 32-63, the client obfuscated
        # (inverted) in the last 32 bits.
        return ((n >> 64) & _MASK32, ~n & _MASK32)
    return ()


# One part of an IPv4 literal as inet_aton reads it (strtoul with base 0):
# hexadecimal after 0x, octal after a leading 0, decimal otherwise.
_AT_PART = re.compile(
    r"0[xX](?P<hex>[0-9a-fA-F]+)|0(?P<oct>[0-7]*)|(?P<dec>[1-9][0-9]*)", re.ASCII
)
# A part that looks numeric, valid or not: decides between "not an address
# at all" and "a broken address".
_NUMERIC_PART = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]+", re.ASCII)
# The largest last part for 1, 2, 3 and 4 parts ("127.1" is 127.0.0.1).
_LAST_PART_MAX = (_MASK32, 0xFFFFFF, 0xFFFF, 0xFF)
_WHITESPACE = re.compile(r"[\x00-\x20\x7f]", re.ASCII)


def _looksNumeric(text: str) -> bool:
    """
    Whether C{text} is made of numeric parts and dots only, so that if it
    is not a valid IPv4 literal it is a broken one rather than a name.
    """
    parts = text.split(".")
    return any(parts) and all(
        not part or _NUMERIC_PART.fullmatch(part) for part in parts
    )


def _inetAton(text: str) -> int:
    """
    Read C{text}, which L{_looksNumeric}, as glibc's and musl's
    C{inet_aton} do.

    @return: the address as an integer.
    @raise ValueError: C{inet_aton} would reject it; the message says why.
    """
    parts = text.split(".")
    if not parts[-1]:
        # Browsers drop this dot; inet_aton does not, and a resolver would
        # look the text up as a name.  Neither is worth guessing between.
        raise ValueError(f"{text!r} ends in a dot")
    if not all(parts):
        raise ValueError(f"{text!r} has an empty part")
    if len(parts) > 4:
        raise ValueError(f"{text!r} has more than four parts")
    values = []
    for part in parts:
        match = _AT_PART.fullmatch(part)
        if match is None:
            raise ValueError(
                f"{text!r} has part {part!r}, which starts with 0 (octal) "
                "but has a digit 8 or 9"
            )
        digits, base = (
            (match["hex"], 16)
            if match["hex"] is not None
            else (match["oct"], 8)
            if match["oct"] is not None
            else (match["dec"], 10)
        )
        # Anything this long is out of range; checking first spares int()
        # a hostile megabyte of digits.
        if len(digits.lstrip("0")) > 11:
            raise ValueError(f"{text!r} has part {part!r}, which is out of range")
        values.append(int(digits, base) if digits else 0)
    *leading, last = values
    if any(value > 0xFF for value in leading) or last > _LAST_PART_MAX[len(leading)]:
        raise ValueError(f"{text!r} has a part that is out of range")
    result = last
    for position, value in enumerate(leading):
        result |= value << (24 - 8 * position)
    return result


@functools.lru_cache(maxsize=4096)
def parseIPLiteral(text: str) -> IPAddress | None:
    """
    Parse C{text} as an IP literal in any form a C library's C{inet_aton} or
    C{getaddrinfo} accepts, and return the address that would be dialled.

    IPv4 literals may have one to four parts, each decimal, octal (leading
    C{0}) or hexadecimal (leading C{0x}); the last part fills the remaining
    bytes, so C{127.1} is 127.0.0.1, C{10.1.2} is 10.1.0.2 and C{2130706433}
    is 127.0.0.1.  IPv6 literals may be wrapped in brackets and may carry a
    zone (C{fe80::1%eth0}); the zone is kept in C{scope_id} so that
    L{AddressPolicy.decide} can deny it.

    Text that is not ASCII is never an IP literal to a C library, so it
    gives L{None}; a caller that maps names through IDNA (full-width digits
    become ASCII ones) must parse the mapped name again.

    Results are cached (the function is pure and runs for every request);
    rejections are not.

    @param text: a host as a client wrote it.
    @return: the address, or L{None} when C{text} is not an IP literal at
        all but may be a host name (C{example.com}, C{1.2.3.com}, C{0x.1}).
    @raise ValueError: C{text} looks like an IP literal but is not a valid
        one (C{256.1.1.1}, C{0x100000000}, C{1.2.3.4.5}, C{08.1.1.1},
        C{1.2.3.4.}, C{[example.com]}, C{1.2.3.4:80}); the request should be
        rejected rather than resolved.
    """
    if not text.isascii():
        return None
    if _WHITESPACE.search(text):
        # inet_aton stops at whitespace and accepts "127.0.0.1 junk", so an
        # address followed by anything is refused, not resolved as a name.
        head = _WHITESPACE.split(text.strip(), maxsplit=1)[0]
        if head and (":" in head or head.startswith("[") or _looksNumeric(head)):
            raise ValueError(f"{text!r} is an IP literal with whitespace around it")
        return None
    bracketed = text.startswith("[")
    if bracketed:
        if not text.endswith("]"):
            raise ValueError(f"{text!r} has an unbalanced bracket")
        text = text[1:-1]
    if ":" in text or bracketed:
        # A host name never contains a colon, so this is an IPv6 literal
        # or a mistake; getaddrinfo reads it with inet_pton, which accepts
        # what ipaddress accepts.
        try:
            return ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a valid IPv6 address") from None
    if not _looksNumeric(text):
        return None
    return ipaddress.IPv4Address(_inetAton(text))


_RANGE_EXAMPLE = "such as 10.0.0.0/8"
_ADDRESS_EXAMPLE = "such as 192.0.2.1, 192.0.2.1:443, 2001:db8::1 or [2001:db8::1]:443"


def _unmapAddress(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _parseRange(text: object) -> _Network:
    """
    Parse a configured range; a mapped IPv6 range becomes the IPv4 range it
    covers (see the module docstring).
    """
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not an IP range (CIDR), {_RANGE_EXAMPLE}")
    try:
        network = ipaddress.ip_network(text)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(
                f"{text!r} is not an IP range (CIDR), {_RANGE_EXAMPLE}"
            ) from None
        # "10.0.0.1/8" is more likely a typo for a /32 than a wish for a
        # /8, so guessing either way would be wrong.
        raise ValueError(
            f"{text!r} is not an IP range (CIDR): it has bits set after the "
            f"/{loose.prefixlen} prefix; did you mean {loose}?"
        ) from None
    if isinstance(network, ipaddress.IPv6Network):
        if network.network_address.scope_id is not None:
            raise ValueError(
                f"{text!r} is not an IP range (CIDR) without a zone "
                f"(%...), {_RANGE_EXAMPLE}; addresses with a zone are always "
                "denied"
            )
        mapped = network.network_address.ipv4_mapped
        if mapped is not None and network.prefixlen >= 96:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _parseIP(text: str, original: str) -> IPAddress:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(
            f"{original!r} is not an IP address with an optional port, "
            f"{_ADDRESS_EXAMPLE}"
        ) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ValueError(
            f"{original!r} has a zone (%...); addresses with a zone are "
            "always denied, so they cannot be configured"
        )
    return ip


def _parsePort(port: object, original: object) -> int:
    # bool is an int, and True would quietly mean port 1.
    if isinstance(port, str) and re.fullmatch(r"[0-9]{1,5}", port, re.ASCII):
        port = int(port)
    if type(port) is not int or not 1 <= port <= 65535:
        raise ValueError(
            f"{original!r} has port {port!r}, but a port is a number from 1 to 65535"
        )
    return port


_ADDRESS_WITH_PORT = re.compile(r"\[(?P<host>[^\]]*)\](?::(?P<port>[^:]*))?")


def _parseAddressRule(text: object) -> tuple[IPAddress, int | None]:
    """
    Parse a configured address: C{IP}, C{IPv4:PORT}, C{[IPv6]:PORT},
    C{[IPv6]} or a bare IPv6 address.

    @return: the address (unmapped) and the port, or L{None} for any port.
    """
    if not isinstance(text, str):
        raise ValueError(
            f"{text!r} is not an IP address with an optional port, {_ADDRESS_EXAMPLE}"
        )
    port: int | None = None
    if text.startswith("["):
        match = _ADDRESS_WITH_PORT.fullmatch(text)
        if match is None:
            raise ValueError(
                f"{text!r} is not an IP address with an optional port, "
                f"{_ADDRESS_EXAMPLE}"
            )
        ip = _parseIP(match["host"], text)
        if ip.version != 6:
            raise ValueError(
                f"{text!r} puts an IPv4 address in brackets, which are only "
                f"for IPv6, {_ADDRESS_EXAMPLE}"
            )
        if match["port"] is not None:
            port = _parsePort(match["port"], text)
    elif text.count(":") == 1:
        host, portText = text.split(":")
        ip = _parseIP(host, text)
        if ip.version != 4:
            raise ValueError(
                f"{text!r} is not an IP address with an optional port, "
                f"{_ADDRESS_EXAMPLE}"
            )
        port = _parsePort(portText, text)
    else:
        ip = _parseIP(text, text)
    return _unmapAddress(ip), port


_PORT_RANGE = re.compile(r"(?P<low>[0-9]{1,5})(?:-(?P<high>[0-9]{1,5}))?", re.ASCII)
_PORT_EXAMPLE = "such as 443 or 8000-8100"


def parsePortRange(text: object) -> tuple[int, int]:
    """
    Parse a configured port or port range: C{443}, C{"443"} or
    C{"8000-8100"} (both ends included).

    @return: the lowest and the highest port of the range.
    @raise ValueError: naming the value and what was expected.
    """
    # bool is an int, and True would quietly mean port 1.
    if type(text) is int:
        text = str(text)
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a port or port range, {_PORT_EXAMPLE}")
    match = _PORT_RANGE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a port or port range, {_PORT_EXAMPLE}")
    low = int(match["low"])
    high = low if match["high"] is None else int(match["high"])
    if not 1 <= low <= 65535 or not 1 <= high <= 65535:
        raise ValueError(
            f"{text!r} is not a port or port range: a port is a number from 1 to 65535"
        )
    if high < low:
        raise ValueError(
            f"{text!r} is not a port range: its first port is above its last; "
            f"did you mean {high}-{low}?"
        )
    return low, high


class _PortRules:
    """
    The user's port rules: which destination ports may be connected to at
    all, whatever the address.

    One byte per port, so that a check is one index, whatever the number of
    ranges.
    """

    __slots__ = ("_allowed",)

    def __init__(
        self, allowPorts: Iterable[object], denyPorts: Iterable[object]
    ) -> None:
        allow = [parsePortRange(text) for text in allowPorts]
        deny = [parsePortRange(text) for text in denyPorts]
        # No allow rule: every port, as without any port rule.
        allowed = bytearray(b"\x00" if allow else b"\x01") * 65536
        for low, high in allow:
            allowed[low : high + 1] = b"\x01" * (high + 1 - low)
        # Deny beats allow, whatever the ranges' sizes.
        for low, high in deny:
            allowed[low : high + 1] = b"\x00" * (high + 1 - low)
        allowed[0] = 0
        self._allowed = bytes(allowed)

    def allows(self, port: int) -> bool:
        return 0 <= port <= 65535 and self._allowed[port] == 1


# A host name as target.normalizeHost leaves it: lower-case ASCII labels
# (A-labels for internationalized names), no trailing dot.
_HOST_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_ALLOW_HOST = re.compile(
    rf"(?P<glob>\*\.)?(?P<name>{_HOST_LABEL}(?:\.{_HOST_LABEL})*)(?::(?P<port>[^:]*))?",
    re.ASCII,
)
_HOST_EXAMPLE = "such as hooks.internal.example, *.svc.example or hooks.example:8443"
# In an allowed host's set of ports: every port.
_ANY_PORT = 0


def parseAllowHost(text: object) -> tuple[str, bool, int | None]:
    """
    Parse an allowed host as the policy takes it: C{NAME}, C{*.SUFFIX}, each
    optionally with C{:PORT}, the name lower-case ASCII (A-labels) without
    a trailing dot, as L{proxy_app.target.normalizeHost} writes names.

    @return: the name (for a glob, the suffix without C{*.}), whether it is
        a glob, and the port or L{None} for every port.
    @raise ValueError: naming the value and what was expected.
    """
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a host name, {_HOST_EXAMPLE}")
    match = _ALLOW_HOST.fullmatch(text)
    if match is None or len(match["name"]) > 253:
        raise ValueError(
            f"{text!r} is not a host name or *. glob with an optional port, "
            f"{_HOST_EXAMPLE} (lower case; internationalized names as "
            "A-labels)"
        )
    name = match["name"]
    try:
        literal = parseIPLiteral(name) is not None
    except ValueError:
        # Numeric-looking nonsense (1.2.3.999) is no name either.
        literal = True
    if literal:
        raise ValueError(
            f"{text!r} is an IP address, not a name; allow an address with "
            "--allow-address or --allow-range"
        )
    port = None if match["port"] is None else _parsePort(match["port"], text)
    return name, match["glob"] is not None, port


_WILDCARD_HOSTS = frozenset(["", "0.0.0.0", "::"])


def _parseSelfAddress(pair: object) -> tuple[IPAddress | None, int]:
    """
    Parse one of the proxy's own listening addresses.

    @return: the (unmapped) address, or L{None} for a wildcard listener,
        and the port.
    """
    host: object
    rawPort: object
    try:
        host, rawPort = pair  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(
            f"{pair!r} is not a listening address: expected a (host, port) "
            "pair such as ('127.0.0.1', 8080) or ('::', 8080)"
        ) from None
    port = _parsePort(rawPort, pair)
    if not isinstance(host, str):
        raise ValueError(f"{pair!r} has host {host!r}, which is not an IP address")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in _WILDCARD_HOSTS:
        return None, port
    try:
        ip = _unmapAddress(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(
            f"{pair!r} has host {host!r}, but a listening host must be an IP "
            "address, or 0.0.0.0, :: or '' for all interfaces"
        ) from None
    if ip.is_unspecified:
        return None, port
    return ip, port


class _FamilyRules:
    """
    The user's rules and the proxy's own listeners for one address family,
    with every address as an integer, ready to be read per connection.
    """

    __slots__ = (
        "denyAny",
        "denyPort",
        "allowAny",
        "allowPort",
        "denyRanges",
        "allowRanges",
        "selfExact",
    )

    def __init__(self, bits: int) -> None:
        self.denyAny: set[int] = set()
        self.denyPort: set[tuple[int, int]] = set()
        self.allowAny: set[int] = set()
        self.allowPort: set[tuple[int, int]] = set()
        self.denyRanges = _PrefixTable(bits, ())
        self.allowRanges = _PrefixTable(bits, ())
        self.selfExact: set[tuple[int, int]] = set()

    def userDenied(self, n: int, port: int) -> bool:
        """
        Whether a user deny rule, exact or range, matches C{n} on C{port}.
        """
        return (
            n in self.denyAny
            or (n, port) in self.denyPort
            or self.denyRanges.lookup(n) is not None
        )


_ALLOW_DEFAULT = (True, RULE_ALLOW_DEFAULT)
_ALLOW_USER = (True, RULE_ALLOW_USER)
_DENY_USER = (False, RULE_DENY_USER)
_DENY_SELF = (False, RULE_SELF_CONNECTION)
_DENY_EMBEDDING = (False, RULE_IPV6_EMBEDDING)
_DENY_METADATA = (False, RULE_CLOUD_METADATA)


# How many (address, port) decisions an AddressPolicy remembers before it
# starts over.
DECISION_CACHE_SIZE = 4096


class AddressPolicy:
    """
    Decides which addresses the proxy may connect to; see the module
    docstring for the rules and their precedence.

    A policy is immutable once built and safe to share.
    """

    def __init__(
        self,
        allowRanges: Iterable[str] = (),
        denyRanges: Iterable[str] = (),
        allowAddresses: Iterable[str] = (),
        denyAddresses: Iterable[str] = (),
        selfAddresses: Iterable[tuple[str, int]] = (),
        allowPorts: Iterable[str | int] = (),
        denyPorts: Iterable[str | int] = (),
        allowHosts: Iterable[str] = (),
    ) -> None:
        """
        @param allowRanges: CIDR ranges to allow even though the built-in
            table denies them (C{"10.1.0.0/16"}, C{"fd00::/8"}); a bare
            address is a /32 or /128.
        @param denyRanges: CIDR ranges to deny even though they are global.
        @param allowAddresses: single addresses to allow: C{"IP"},
            C{"IPv4:PORT"}, C{"[IPv6]:PORT"} or a bare IPv6 address; with a
            port the rule applies to that port only.
        @param denyAddresses: single addresses to deny, written the same
            way.
        @param selfAddresses: the proxy's own listening C{(host, port)}
            pairs, with the port actually bound; a host of C{"0.0.0.0"},
            C{"::"} or C{""} is a wildcard listener.  A wildcard cannot
            know this host's global addresses, so list those explicitly.
        @param allowPorts: the only destination ports that may be connected
            to (C{443}, C{"8000-8100"}); by default every port.  See
            L{portAllowed}.
        @param denyPorts: destination ports never to connect to, written
            the same way; a deny beats an allow.
        @param allowHosts: names (C{"hooks.internal.example"}) and globs
            (C{"*.svc.example"}, any depth below the suffix, not the suffix
            itself), each optionally with C{":PORT"}, whose answers may be
            in the private ranges; see L{hostAllowed} and L{liftForHost}.
            Written as L{parseAllowHost} reads them.

        @raise ValueError: a value is not what it should be; the message
            names the value and what was expected.
        @raise TypeError: one of the arguments is a single string rather
            than a collection of them.
        """
        arguments = {
            "allowRanges": allowRanges,
            "denyRanges": denyRanges,
            "allowAddresses": allowAddresses,
            "denyAddresses": denyAddresses,
            "selfAddresses": selfAddresses,
            "allowPorts": allowPorts,
            "denyPorts": denyPorts,
            "allowHosts": allowHosts,
        }
        for name, value in arguments.items():
            # A lone string would be read one character at a time.
            if isinstance(value, (str, bytes)):
                raise TypeError(
                    f"{name} must be a collection of values, not the single "
                    f"value {value!r}"
                )
        ranges: dict[tuple[int, bool], list[_Network]] = {
            (version, deny): [] for version in (4, 6) for deny in (False, True)
        }
        for deny, texts in ((True, denyRanges), (False, allowRanges)):
            for text in texts:
                network = _parseRange(text)
                ranges[network.version, deny].append(network)
        self._v4 = _FamilyRules(32)
        self._v6 = _FamilyRules(128)
        for deny, texts in ((True, denyAddresses), (False, allowAddresses)):
            for text in texts:
                ip, port = _parseAddressRule(text)
                rules = self._family(ip.version)
                if port is None:
                    (rules.denyAny if deny else rules.allowAny).add(int(ip))
                else:
                    (rules.denyPort if deny else rules.allowPort).add((int(ip), port))
        wildcardPorts: set[int] = set()
        for pair in selfAddresses:
            selfIP, port = _parseSelfAddress(pair)
            if selfIP is None:
                wildcardPorts.add(port)
            else:
                self._family(selfIP.version).selfExact.add((int(selfIP), port))
        for version, rules, bits in ((4, self._v4, 32), (6, self._v6, 128)):
            rules.denyRanges = _PrefixTable(
                bits, ((network, True) for network in ranges[version, True])
            )
            rules.allowRanges = _PrefixTable(
                bits, ((network, True) for network in ranges[version, False])
            )
        self._wildcardPorts = frozenset(wildcardPorts)
        # The proxy's own explicit addresses, whatever the port: an allowed
        # host never reaches them.
        self._selfHosts = frozenset(
            (version, n)
            for version, rules in ((4, self._v4), (6, self._v6))
            for n, _ in rules.selfExact
        )
        self._hostNames: dict[str, set[int]] = {}
        self._hostGlobs: dict[str, set[int]] = {}
        for text in allowHosts:
            name, glob, port = parseAllowHost(text)
            table = self._hostGlobs if glob else self._hostNames
            table.setdefault(name, set()).add(_ANY_PORT if port is None else port)
        allowPorts = tuple(allowPorts)
        denyPorts = tuple(denyPorts)
        self._ports: _PortRules | None = None
        if allowPorts or denyPorts:
            self._ports = _PortRules(allowPorts, denyPorts)
        self._decisions: dict[tuple[str | IPAddress, int], AddressDecision] = {}

    def _family(self, version: int) -> _FamilyRules:
        return self._v4 if version == 4 else self._v6

    @property
    def allowsHosts(self) -> bool:
        """
        Whether allowed hosts were given; without them L{hostAllowed} is
        always false and need not be asked.
        """
        return bool(self._hostNames or self._hostGlobs)

    def hostAllowed(self, host: str, port: int) -> bool:
        """
        Whether the name C{host} is an allowed host on C{port}: its answers
        may then be lifted out of the private ranges by L{liftForHost}.

        @param host: a normalized name (never an IP literal: an address
            written as a literal is never an allowed host).
        """
        ports = self._hostNames.get(host)
        if ports is not None and (_ANY_PORT in ports or port in ports):
            return True
        globs = self._hostGlobs
        if globs:
            dot = host.find(".")
            while dot != -1:
                ports = globs.get(host[dot + 1 :])
                if ports is not None and (_ANY_PORT in ports or port in ports):
                    return True
                dot = host.find(".", dot + 1)
        return False

    def liftForHost(self, decision: AddressDecision) -> AddressDecision:
        """
        The decision on an answer for a name that L{hostAllowed}: an address
        that only the built-in table denied as a private range (RFC 1918,
        unique local IPv6) is allowed with L{RULE_ALLOW_HOST}; any other
        decision stands.  So loopback, link-local, CGNAT and the other
        non-global blocks stay denied, and so does everything a rule of
        higher precedence decided (self-connection, user deny rules, cloud
        metadata).  One of the proxy's own listening addresses, on any
        port, is refused as a self-connection.

        The decision is not remembered: L{decide}'s cache holds only
        decisions that hold for every name.

        @param decision: L{decide}'s decision on the answer.
        """
        if decision.allowed or decision.rule != RULE_PRIVATE_RANGE:
            return decision
        ip = _unmapAddress(ipaddress.ip_address(decision.address))
        if (ip.version, int(ip)) in self._selfHosts:
            return AddressDecision(False, decision.address, RULE_SELF_CONNECTION)
        return AddressDecision(True, decision.address, RULE_ALLOW_HOST)

    @property
    def limitsPorts(self) -> bool:
        """
        Whether port rules were given; without them L{portAllowed} is
        always true and need not be asked.
        """
        return self._ports is not None

    def portAllowed(self, address: IPAddress | None, port: int) -> bool:
        """
        Whether the port rules let a connection to C{port} be made at all.
        They are asked before any lookup, with the target itself: a name
        (C{address} is L{None}) or an IP literal.

        An exact allow address rule that names this port
        (C{allowAddresses=["10.0.0.5:8443"]}) passes the port rules for a
        target that is that address written as a literal, since it names
        both.  A name is judged by the port rules alone, whatever it
        resolves to: nothing is looked up for a refused port.  Whether the
        address itself may be connected to is L{decide}'s answer, asked
        afterwards.

        @param address: the target's IP address (IPv4-mapped forms are
            read as the IPv4 address), or L{None} for a name.
        @param port: the destination port.
        """
        ports = self._ports
        if ports is None or ports.allows(port):
            return True
        if address is None:
            return False
        ip = _unmapAddress(address)
        return (int(ip), port) in self._family(ip.version).allowPort

    def decide(self, address: str | IPAddress, port: int) -> AddressDecision:
        """
        Classify a connection to C{address} on C{port}.

        Decisions are remembered (the policy does not change once built, and
        a decision is a value), up to L{DECISION_CACHE_SIZE} of them.

        @param address: an address object, or its text as
            L{ipaddress.ip_address} reads it (no brackets, no C{inet_aton}
            spellings: canonicalize those with L{parseIPLiteral} first).
            Text that does not parse is denied.
        @param port: the destination port.
        @return: the L{AddressDecision}.
        """
        key = (address, port)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decide(address, port)
            if len(self._decisions) >= DECISION_CACHE_SIZE:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision

    def _decide(self, address: str | IPAddress, port: int) -> AddressDecision:
        if isinstance(address, str):
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return AddressDecision(False, address, RULE_NOT_GLOBAL_UNICAST)
        elif isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            ip = address
        else:
            raise TypeError(f"{address!r} is neither an IP address nor text")
        n = int(ip)
        if ip.version == 4:
            allowed, rule = self._decide4(n, port)
        elif ip.scope_id is not None:
            allowed, rule = False, RULE_NOT_GLOBAL_UNICAST
        elif n >> 32 == _MAPPED_KEY:
            allowed, rule = self._decide4(n & _MASK32, port)
        else:
            allowed, rule = self._decide6(n, port)
        return AddressDecision(allowed, str(ip), rule)

    def _decide4(self, n: int, port: int) -> tuple[bool, str]:
        """
        Steps 3 to 7 for the IPv4 address C{n}.
        """
        rules = self._v4
        builtin = _BUILTIN4.lookup(n)
        if (n, port) in rules.selfExact or (
            builtin is not None and port in self._wildcardPorts
        ):
            return _DENY_SELF
        if n in rules.denyAny or (n, port) in rules.denyPort:
            return _DENY_USER
        if n in rules.allowAny or (n, port) in rules.allowPort:
            return _ALLOW_USER
        if n in _CLOUD_METADATA4:
            return _DENY_METADATA
        if rules.denyRanges.lookup(n) is not None:
            return _DENY_USER
        if rules.allowRanges.lookup(n) is not None:
            return _ALLOW_USER
        if builtin is not None:
            return (False, cast(str, builtin))
        return _ALLOW_DEFAULT

    def _decide6(self, n: int, port: int) -> tuple[bool, str]:
        """
        Steps 3 to 7 for the IPv6 address C{n}, which is neither mapped nor
        scoped.
        """
        rules = self._v6
        builtin = _BUILTIN6.lookup(n)
        # Only a plain deny entry marks an address that might be this host;
        # NAT64 and 6to4 addresses lead elsewhere and are judged by the
        # IPv4 address they carry, self-connection included.
        if (n, port) in rules.selfExact or (
            isinstance(builtin, str) and port in self._wildcardPorts
        ):
            return _DENY_SELF
        if n in rules.denyAny or (n, port) in rules.denyPort:
            return _DENY_USER
        if n in rules.allowAny or (n, port) in rules.allowPort:
            return self._allow6(n, port, True)
        if n in _CLOUD_METADATA6:
            return _DENY_METADATA
        if rules.denyRanges.lookup(n) is not None:
            return _DENY_USER
        if rules.allowRanges.lookup(n) is not None:
            return self._allow6(n, port, False)
        if builtin is GLOBAL:
            return _ALLOW_DEFAULT
        if builtin is NAT64:
            embedded = n & _MASK32
        elif builtin is SIXTOFOUR:
            embedded = (n >> 80) & _MASK32
        else:
            return (False, cast(str, builtin))
        verdict = self._decide4(embedded, port)
        return verdict if verdict[0] else _DENY_EMBEDDING

    def _allow6(self, n: int, port: int, exact: bool) -> tuple[bool, str]:
        """
        A user rule allows the IPv6 address C{n}, unless a user rule denies
        an IPv4 address it carries, or, when the rule is a range
        (C{exact} is false), that IPv4 address is a cloud metadata address
        that no exact IPv4 rule allows.
        """
        v4 = self._v4
        for embedded in _carriedIPv4(n):
            if v4.userDenied(embedded, port):
                return _DENY_EMBEDDING
            if (
                not exact
                and embedded in _CLOUD_METADATA4
                and embedded not in v4.allowAny
                and (embedded, port) not in v4.allowPort
            ):
                return _DENY_EMBEDDING
        return _ALLOW_USER
