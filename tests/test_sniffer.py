"""
Tests for L{proxy_app.sniffer}: telling TLS and its server name from a
tunnel's first bytes.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.sniffer import TLSSniffer


def clientHello(sni: bytes | None) -> bytes:
    """
    A real ClientHello from OpenSSL, with or without SNI.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    connection = SSL.Connection(context, None)
    if sni is not None:
        connection.set_tlsext_host_name(sni)
    connection.set_connect_state()
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    return connection.bio_read(65536)


class TLSSnifferTests(SynchronousTestCase):
    def test_sni(self) -> None:
        """
        A ClientHello with SNI is TLS with that name.
        """
        sniffer = TLSSniffer()
        sniffer.feed(clientHello(b"Example.COM"))
        self.assertEqual(
            (sniffer.done, sniffer.isTLS, sniffer.sni), (True, True, "example.com")
        )

    def test_byteByByte(self) -> None:
        """
        A ClientHello arriving a byte at a time gives the same answer, once
        it is complete.
        """
        hello = clientHello(b"api.example.org")
        sniffer = TLSSniffer()
        for i in range(len(hello) - 1):
            sniffer.feed(hello[i : i + 1])
            self.assertFalse(sniffer.done)
        sniffer.feed(hello[-1:])
        self.assertEqual((sniffer.isTLS, sniffer.sni), (True, "api.example.org"))

    def test_noSNI(self) -> None:
        """
        A ClientHello without SNI is TLS with no name.
        """
        sniffer = TLSSniffer()
        sniffer.feed(clientHello(None))
        self.assertEqual((sniffer.done, sniffer.isTLS, sniffer.sni), (True, True, None))

    def test_notTLS(self) -> None:
        """
        Plain HTTP is not TLS, decided from the first byte.
        """
        sniffer = TLSSniffer()
        sniffer.feed(b"G")
        self.assertEqual(
            (sniffer.done, sniffer.isTLS, sniffer.sni), (True, False, None)
        )

    def test_splitRecords(self) -> None:
        """
        A ClientHello split over two handshake records is reassembled.
        """
        hello = clientHello(b"split.example")
        body = hello[5:]
        first, second = body[:40], body[40:]
        records = b"".join(
            b"\x16" + hello[1:3] + len(part).to_bytes(2, "big") + part
            for part in (first, second)
        )
        sniffer = TLSSniffer()
        sniffer.feed(records)
        self.assertEqual((sniffer.isTLS, sniffer.sni), (True, "split.example"))

    def test_limit(self) -> None:
        """
        A handshake that does not complete within the limit stops the
        sniffing (TLS, no name) and keeps no more bytes.
        """
        sniffer = TLSSniffer(limit=100)
        sniffer.feed(b"\x16\x03\x01\x40\x00" + b"\x01" + b"\x00" * 200)
        self.assertEqual((sniffer.done, sniffer.isTLS, sniffer.sni), (True, True, None))
        self.assertEqual(len(sniffer._buffer), 0)
