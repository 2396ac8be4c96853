"""
What an idle tunnel and a finished connection keep: the HTTP parser is let
go of rather than left, in a reference cycle with its reader, to the
garbage collector.
"""

from __future__ import annotations

import gc

import httptools
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.http1 import RequestReader

from .helpers import makeHarness

CONNECT = b"CONNECT origin.example:443 HTTP/1.1\r\nHost: origin.example:443\r\n\r\n"


def holdsParser(reader: RequestReader) -> bool:
    return any(
        isinstance(o, httptools.HttpRequestParser) for o in gc.get_referents(reader)
    )


class ReaderReleaseTests(SynchronousTestCase):
    """
    L{RequestReader.release}.
    """

    def test_releaseDropsParser(self) -> None:
        """
        A released reader refers to no parser (the parser refers back to
        its reader, a cycle refcounting alone cannot free) and no queued
        events.
        """
        reader = RequestReader(8192, 100, 65536)
        reader.feed(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        self.assertTrue(holdsParser(reader))
        reader.release()
        self.assertFalse(holdsParser(reader))
        self.assertEqual(list(reader.events), [])

    def test_tunnelReleasesParser(self) -> None:
        """
        A connection that becomes a tunnel lets go of its parser, and the
        bytes the client sent behind the CONNECT head still reach the
        origin.
        """
        h = makeHarness()
        reader = h.protocol._reader
        assert reader is not None
        h.send(CONNECT + b"early")
        _, upstream = h.connectUpstream()
        self.assertIsNone(h.protocol._reader)
        self.assertFalse(holdsParser(reader))
        self.assertEqual(upstream.value(), b"early")

    def test_closedConnectionReleasesParser(self) -> None:
        """
        A client connection that closes lets go of its parser.
        """
        h = makeHarness()
        reader = h.protocol._reader
        assert reader is not None
        h.send(b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n")
        h.protocol.connectionLost(None)
        self.assertFalse(holdsParser(reader))
