"""
Destination safety end to end, in memory: the proxy protocol with the real
L{SafeResolver} and L{AddressPolicy} over a fake name resolver and a memory
reactor, so that refused destinations are checked by asserting that no
connection was even attempted.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from proxy_app.addresses import AddressPolicy
from proxy_app.resolver import SafeResolver

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
