"""
Tests that an established, idle tunnel lets go of what only its setup
needed (idle tunnels are held by the thousand).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from .helpers import makeHarness

CONNECT = b"CONNECT origin.example:443 HTTP/1.1\r\nHost: origin.example:443\r\n\r\n"


class IdleTunnelTests(SynchronousTestCase):
    def test_headerTimerReleased(self) -> None:
        """
        Once the connection is a tunnel, its request-header timer, never
        needed again, no longer refers to the connection (through a bound
        method), and is not running.
        """
        h = makeHarness()
        h.send(CONNECT)
        h.connectUpstream()
        self.assertIsNotNone(h.protocol.tunnel)
        callback = h.protocol._headerTimer._onTimeout
        self.assertIsNot(getattr(callback, "__self__", None), h.protocol)
        self.assertIsNone(h.protocol._headerTimer._call)

    def test_headShared(self) -> None:
        """
        Established tunnels keep no parser's copy of their request's method
        and version: every tunnel's are the same objects, with the same
        values; the access line still says C{CONNECT}.
        """
        tunnels = []
        for version in (b"1.1", b"1.1", b"1.0", b"1.0"):
            h = makeHarness()
            h.send(CONNECT.replace(b"HTTP/1.1", b"HTTP/" + version))
            h.connectUpstream()
            tunnels.append((h, h.protocol.tunnel))
        heads = [tunnel.request for _, tunnel in tunnels]
        self.assertEqual(
            [(head.method, head.version) for head in heads],
            [(b"CONNECT", "1.1")] * 2 + [(b"CONNECT", "1.0")] * 2,
        )
        self.assertIs(heads[0].method, heads[1].method)
        self.assertIs(heads[0].method, heads[2].method)
        self.assertIs(heads[0].version, heads[1].version)
        self.assertIs(heads[2].version, heads[3].version)
        h, _ = tunnels[0]
        h.protocol.connectionLost(None)
        self.assertEqual(h.access[-1]["method"], "CONNECT")
