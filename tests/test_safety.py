"""
Destination safety end to end, in memory: the proxy protocol with the real
L{SafeResolver} and L{AddressPolicy} over a fake name resolver and a memory
reactor, so that refused destinations are checked by asserting that no
connection was even attempted.
"""

from __future__ import annotations

import io
import ipaddress
import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from proxy_app.addresses import AddressPolicy
from proxy_app.observe import DecisionLog
from proxy_app.resolver import CachingResolver, SafeResolver

from .helpers import ScriptedNameResolver, makeHarness, parseResponse


def safeHarness(scripts: dict[str, list[list[str]]], **policy: Any) -> Any:
    h = makeHarness()
    names = ScriptedNameResolver(scripts)
    h.factory.resolver = SafeResolver(
        AddressPolicy(**policy), names, h.reactor, timeout=5
    )
    return h, names


class SafetyTests(SynchronousTestCase):
    """
    What reaches the reactor is only ever a vetted address.
    """

    def assertRefused(self, h: Any, address: str) -> None:
        status, headers, body = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (403, b"1000"))
        self.assertIn(f"({address})".encode(), body)
        self.assertEqual(h.reactor.tcpClients, [])

    def test_privateAndMetadataNeverDialled(self) -> None:
        """
        Names resolving to 10.x, 169.254.169.254 and fd00::/8 are refused
        and no connection is attempted.
        """
        for answer in ("10.1.2.3", "169.254.169.254", "fd00::1", "::ffff:10.0.0.1"):
            h, _ = safeHarness({"evil.example": [[answer]]})
            h.send(b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n")
            self.assertRefused(h, str(ipaddress.ip_address(answer)))

    def test_literalSpellings(self) -> None:
        """
        IP literals in any spelling are judged as the address they dial,
        without a lookup, and refused.
        """
        for spelling, address in [
            (b"2130706433", "127.0.0.1"),
            (b"0x7f000001", "127.0.0.1"),
            (b"0177.0.0.1", "127.0.0.1"),
            (b"127.1", "127.0.0.1"),
            (b"0xa9.254.169.254", "169.254.169.254"),
            (b"[::ffff:127.0.0.1]", "::ffff:7f00:1"),
            (b"[64:ff9b::a00:1]", "64:ff9b::a00:1"),
        ]:
            h, names = safeHarness({})
            h.send(b"GET http://" + spelling + b"/ HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertRefused(h, address)
            self.assertEqual(names.lookups, [])

    def test_mixedAnswersUseAllowed(self) -> None:
        """
        With one denied and one allowed answer, the connection goes to the
        allowed one only.
        """
        h, _ = safeHarness({"mixed.example": [["10.0.0.1", "198.51.200.7"]]})
        h.send(b"GET http://mixed.example/ HTTP/1.1\r\nHost: mixed.example\r\n\r\n")
        self.assertEqual([c[:2] for c in h.reactor.tcpClients], [("198.51.200.7", 80)])

    def test_rebinding(self) -> None:
        """
        A name that would answer with a private address on a second lookup
        is resolved once, and the connection goes to the first, vetted
        answer.
        """
        h, names = safeHarness(
            {"rebind.example": [["198.51.200.7"], ["127.0.0.1"], ["127.0.0.1"]]}
        )
        h.send(
            b"CONNECT rebind.example:443 HTTP/1.1\r\nHost: rebind.example:443\r\n\r\n"
        )
        self.assertEqual(names.lookups, ["rebind.example"])
        self.assertEqual([c[:2] for c in h.reactor.tcpClients], [("198.51.200.7", 443)])
        h.connectUpstream()
        self.assertEqual(names.lookups, ["rebind.example"])
        self.assertEqual(
            h.client.value(), b"HTTP/1.1 200 Connection established\r\n\r\n"
        )

    def test_noAnswers(self) -> None:
        """
        A name with no addresses gets 502/1001 and no connection.
        """
        h, _ = safeHarness({"empty.example": [[]]})
        h.send(b"GET http://empty.example/ HTTP/1.1\r\nHost: empty.example\r\n\r\n")
        status, headers, body = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (502, b"1001"))
        self.assertIn(b"empty.example", body)
        self.assertEqual(h.reactor.tcpClients, [])

    def test_connectorRefusesNames(self) -> None:
        """
        The connector itself refuses a host name, whatever called it.
        """
        h = makeHarness()
        self.assertRaises(
            ValueError, h.factory.connector.connectAddress, "example.com", 80, None
        )
        self.assertEqual(h.reactor.tcpClients, [])


class BindAddressTests(SynchronousTestCase):
    """
    Outbound connections can come from a fixed local address.
    """

    def test_bindPerFamily(self) -> None:
        """
        The IPv4 bind address is used for IPv4 destinations, the IPv6 one
        for IPv6 destinations, and none when that family has none.
        """
        from twisted.internet.protocol import Factory
        from twisted.internet.testing import MemoryReactorClock

        from proxy_app.upstream import Connector

        reactor = MemoryReactorClock()
        connector = Connector(reactor, 5, ["127.0.0.5"])
        connector.connectAddress("203.0.113.10", 80, Factory())
        connector.connectAddress("2001:db8::1", 80, Factory())
        self.assertEqual(reactor.tcpClients[0][4], ("127.0.0.5", 0))
        self.assertIsNone(reactor.tcpClients[1][4])
        both = Connector(reactor, 5, ["::1", "127.0.0.5"])
        both.connectAddress("2001:db8::1", 80, Factory())
        self.assertEqual(reactor.tcpClients[2][4], ("::1", 0))


class PortRuleTests(SynchronousTestCase):
    """
    C{destinations.allow_ports} and C{deny_ports} through the proxy: a
    refused port gets 403 with reason code 1017, before any lookup and
    without a connection attempt.
    """

    def assertPortRefused(self, h: Any, authority: bytes) -> None:
        status, headers, body = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (403, b"1017"))
        port = authority.rsplit(b":", 1)[1]
        self.assertEqual(
            body.strip(),
            b"Egress proxying is denied to host '"
            + authority
            + b"': The destination port ("
            + port
            + b") is not allowed.",
        )
        self.assertEqual(headers[b"x-whsentry-reason"], body.strip())
        self.assertEqual(h.reactor.tcpClients, [])

    def test_forwardedAndConnectRefused(self) -> None:
        """
        A forwarded request and a CONNECT to a port outside C{allowPorts}
        (or inside C{denyPorts}) are refused; the name is not looked up.
        """
        requests = [
            (
                b"GET http://origin.example:8080/ HTTP/1.1\r\nHost: x\r\n\r\n",
                b"origin.example:8080",
            ),
            (
                b"CONNECT origin.example:22 HTTP/1.1\r\nHost: x\r\n\r\n",
                b"origin.example:22",
            ),
        ]
        for request, authority in requests:
            for policy in ({"allowPorts": ["80", "443"]}, {"denyPorts": ["22", 8080]}):
                h, names = safeHarness({"origin.example": [["198.51.200.7"]]}, **policy)
                h.send(request)
                self.assertPortRefused(h, authority)
                self.assertEqual(names.lookups, [])

    def test_allowedPortsConnect(self) -> None:
        """
        Requests to an allowed port go on as without port rules: resolved,
        vetted and connected, GET and CONNECT alike.
        """
        h, names = safeHarness(
            {"origin.example": [["198.51.200.7"]]}, allowPorts=["80", "443"]
        )
        h.send(b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n\r\n")
        self.assertEqual([c[:2] for c in h.reactor.tcpClients], [("198.51.200.7", 80)])
        h, names = safeHarness(
            {"origin.example": [["198.51.200.7"]]}, allowPorts=["80", "443"]
        )
        h.send(b"CONNECT origin.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual([c[:2] for c in h.reactor.tcpClients], [("198.51.200.7", 443)])

    def test_literalRefused(self) -> None:
        """
        An IP literal on a refused port gets 1017, not the address
        policy's 1000: the port is judged first.
        """
        h, _ = safeHarness({}, allowPorts=["443"])
        h.send(b"GET http://198.51.200.7:8443/ HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertPortRefused(h, b"198.51.200.7:8443")

    def test_exactAllowAddressPasses(self) -> None:
        """
        C{--allow-address IP:PORT} passes the port rules for that literal;
        the same port on a name, or on another address, stays refused.
        """
        policy = {"allowPorts": ["443"], "allowAddresses": ["10.0.0.5:6379"]}
        h, _ = safeHarness({}, **policy)
        h.send(b"CONNECT 10.0.0.5:6379 HTTP/1.1\r\nHost: 10.0.0.5:6379\r\n\r\n")
        self.assertEqual([c[:2] for c in h.reactor.tcpClients], [("10.0.0.5", 6379)])
        h, _ = safeHarness({}, **policy)
        h.send(b"CONNECT 10.0.0.6:6379 HTTP/1.1\r\nHost: 10.0.0.6:6379\r\n\r\n")
        self.assertPortRefused(h, b"10.0.0.6:6379")
        h, names = safeHarness({"redis.example": [["10.0.0.5"]]}, **policy)
        h.send(b"CONNECT redis.example:6379 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertPortRefused(h, b"redis.example:6379")
        self.assertEqual(names.lookups, [])

    def test_cachingResolver(self) -> None:
        """
        Behind the L{CachingResolver}, a name vetted on an allowed port
        does not open its other ports.
        """
        h, names = safeHarness(
            {"origin.example": [["198.51.200.7"]]}, allowPorts=["443"]
        )
        h.factory.resolver = CachingResolver(h.factory.resolver, h.reactor, 30)
        h.send(b"CONNECT origin.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(len(h.reactor.tcpClients), 1)
        h2 = makeHarness()
        h2.factory.resolver = h.factory.resolver
        h2.send(b"CONNECT origin.example:8443 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertPortRefused(h2, b"origin.example:8443")
        self.assertEqual(names.lookups, ["origin.example"])


class CloudMetadataTests(SynchronousTestCase):
    """
    C{Deny: Cloud Metadata} through the proxy.
    """

    def test_wireServerRefused(self) -> None:
        """
        A name resolving to Azure's WireServer (a global address) is
        refused with the rule named, even with an allow range over it, and
        nothing is dialled; an exact allow address opens it.
        """
        for policy in ({}, {"allowRanges": ["168.63.0.0/16"]}):
            h, _ = safeHarness({"wire.example": [["168.63.129.16"]]}, **policy)
            h.send(b"GET http://wire.example/ HTTP/1.1\r\nHost: wire.example\r\n\r\n")
            status, headers, body = parseResponse(h.client.value())
            self.assertEqual(
                (status, headers[b"x-whsentry-reasoncode"]), (403, b"1000")
            )
            self.assertIn(
                b"The destination address (168.63.129.16) was denied by rule "
                b"'Deny: Cloud Metadata'.",
                body,
            )
            self.assertEqual(h.reactor.tcpClients, [])
        h, _ = safeHarness(
            {"wire.example": [["168.63.129.16"]]}, allowAddresses=["168.63.129.16:80"]
        )
        h.send(b"GET http://wire.example/ HTTP/1.1\r\nHost: wire.example\r\n\r\n")
        self.assertEqual([c[:2] for c in h.reactor.tcpClients], [("168.63.129.16", 80)])


class AllowedHostTests(SynchronousTestCase):
    """
    C{destinations.allow_hosts} through the proxy, over a fake name
    resolver answering with private addresses (in memory only).
    """

    def harness(self, scripts: dict[str, list[list[str]]], **policy: Any) -> Any:
        h, names = safeHarness(
            scripts, allowHosts=["hooks.internal.example", "*.svc.example"], **policy
        )
        h.factory.resolver = CachingResolver(h.factory.resolver, h.reactor, 30)
        decisions = io.StringIO()
        h.factory.decisionLog = DecisionLog(decisions, "json")
        return h, names, decisions

    def test_allowedHostConnects(self) -> None:
        """
        An allowed host resolving to 10.x is connected to that vetted
        answer, resolved once; the decision log names the rule.
        """
        h, names, decisions = self.harness(
            {"hooks.internal.example": [["10.1.2.3"], ["127.0.0.1"]]}
        )
        h.send(
            b"GET http://hooks.internal.example/x HTTP/1.1\r\n"
            b"Host: hooks.internal.example\r\n\r\n"
        )
        self.assertEqual([c[:2] for c in h.reactor.tcpClients], [("10.1.2.3", 80)])
        self.assertEqual(names.lookups, ["hooks.internal.example"])
        upstream, _ = h.connectUpstream()
        upstream.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        (line,) = [json.loads(x) for x in decisions.getvalue().splitlines()]
        self.assertEqual(
            (line["allow"], line["address_rule"]), (True, "Allow: Allowed Host")
        )

    def test_onlyPrivateAnswersLifted(self) -> None:
        """
        Of an allowed host's answers, only the private one is used:
        loopback, link-local, CGNAT and cloud metadata answers are dropped.
        """
        h, _, _ = self.harness(
            {
                "a.svc.example": [
                    [
                        "127.0.0.1",
                        "169.254.169.254",
                        "100.64.0.1",
                        "fd00:ec2::254",
                        "168.63.129.16",
                        "10.0.0.9",
                    ]
                ]
            }
        )
        h.send(b"CONNECT a.svc.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual([c[:2] for c in h.reactor.tcpClients], [("10.0.0.9", 443)])

    def test_noLeakToOtherNameOrLiteral(self) -> None:
        """
        Once an allowed host was vetted (and its answer cached), another
        name resolving to the same address, and the address written as a
        literal, are still refused, and nothing is dialled for them.
        """
        h, names, decisions = self.harness(
            {
                "hooks.internal.example": [["10.1.2.3"]],
                "evil.example": [["10.1.2.3"]],
                "svc.example": [["10.1.2.3"]],
            }
        )
        h.send(b"CONNECT hooks.internal.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(len(h.reactor.tcpClients), 1)
        resolver = h.factory.resolver
        for request in [
            b"CONNECT evil.example:443 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"CONNECT svc.example:443 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"CONNECT 10.1.2.3:443 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET http://10.1.2.3/ HTTP/1.1\r\nHost: x\r\n\r\n",
        ]:
            other = makeHarness()
            other.factory.resolver = resolver
            other.send(request)
            status, headers, body = parseResponse(other.client.value())
            self.assertEqual(
                (status, headers[b"x-whsentry-reasoncode"]), (403, b"1000"), request
            )
            self.assertIn(b"'Deny: Private Range'", body)
            self.assertEqual(other.reactor.tcpClients, [])
        self.assertEqual(
            names.lookups, ["hooks.internal.example", "evil.example", "svc.example"]
        )
