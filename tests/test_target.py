"""
Tests for L{proxy_app.target}: target parsing and host normalization.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from proxy_app.reasons import ProxyError, Reason
from proxy_app.target import (
    Target,
    normalizeHost,
    parseAbsoluteTarget,
    parseConnectTarget,
)


class NormalizeHostTests(SynchronousTestCase):
    """
    Hosts are normalized before anything looks at them.
    """

    def test_names(self) -> None:
        """
        Names are lower-cased, lose one trailing dot, and are IDNA-encoded.
        """
        self.assertEqual(normalizeHost("Example.COM."), "example.com")
        self.assertEqual(normalizeHost("bücher.example"), "xn--bcher-kva.example")
        self.assertEqual(normalizeHost("under_score.example"), "under_score.example")

    def test_ipLiteralForms(self) -> None:
        """
        Every form of an IP literal a C library accepts becomes the address
        it would dial.
        """
        for text in (
            "2130706433",
            "0x7f000001",
            "0177.0.0.1",
            "127.1",
            "127.0.0.1",
            "0x7f.1",
        ):
            self.assertEqual(normalizeHost(text), "127.0.0.1", text)
        self.assertEqual(normalizeHost("[::ffff:127.0.0.1]"), "::ffff:7f00:1")
        self.assertEqual(normalizeHost("[0:0:0:0:0:0:0:1]"), "::1")

    def test_rejected(self) -> None:
        """
        Empty, over-long, NUL, space, @, backslash, full-width dots, bare
        IPv6, two trailing dots and numeric garbage are refused with 1002.
        """
        for text in (
            "",
            ".",
            "a" * 64 + ".example",
            ("a" * 60 + ".") * 5 + "example",
            "evil\x00.example",
            "evil .example",
            "user@evil.example",
            "evil\\.example",
            "evil\u3002example",
            "evil\uff0eexample",
            "::1",
            "example..",
            "a..b",
            "256.1.1.1",
            "[127.0.0.1]",
            "[::1",
            "-leading.example",
        ):
            with self.assertRaises(ProxyError, msg=repr(text)) as raised:
                normalizeHost(text)
            self.assertEqual(raised.exception.reason, Reason.BAD_TARGET)


class ParseTests(SynchronousTestCase):
    """
    Absolute-URI and CONNECT targets.
    """

    def test_absolute(self) -> None:
        """
        An absolute URI gives the normalized host, the port (default by
        scheme), and the origin-form path with its query.
        """
        self.assertEqual(
            parseAbsoluteTarget(b"http://Example.com/a/b?c=d#frag"),
            Target("example.com", 80, "http", b"/a/b?c=d", False),
        )
        self.assertEqual(
            parseAbsoluteTarget(b"HTTP://[::1]:8080"),
            Target("::1", 8080, "http", b"/", True),
        )
        self.assertEqual(parseAbsoluteTarget(b"https://example.com?x").path, b"/?x")
        self.assertEqual(parseAbsoluteTarget(b"https://example.com").port, 443)

    def test_hostHeader(self) -> None:
        """
        The Host sent upstream names a port only when it is not the
        scheme's default, and brackets IPv6.
        """
        self.assertEqual(
            parseAbsoluteTarget(b"http://example.com:80/").hostHeader, b"example.com"
        )
        self.assertEqual(
            parseAbsoluteTarget(b"http://example.com:81/").hostHeader, b"example.com:81"
        )
        self.assertEqual(
            parseAbsoluteTarget(b"http://[::1]:81/").hostHeader, b"[::1]:81"
        )

    def test_absoluteErrors(self) -> None:
        """
        Origin-form and malformed targets get 1002, other schemes 1003.
        """
        for raw, reason in [
            (b"/path", Reason.BAD_TARGET),
            (b"*", Reason.BAD_TARGET),
            (b"example.com/path", Reason.BAD_TARGET),
            (b"ftp://example.com/", Reason.BAD_SCHEME),
            (b"gopher://example.com/", Reason.BAD_SCHEME),
            (b"http://example.com:0/", Reason.BAD_TARGET),
            (b"http://example.com:99999/", Reason.BAD_TARGET),
            (b"http://example.com:abc/", Reason.BAD_TARGET),
            (b"http://example.com:/", Reason.BAD_TARGET),
            (b"http://user:pw@example.com/", Reason.BAD_TARGET),
            (b"http:///path", Reason.BAD_TARGET),
            (b"http://\xff/", Reason.BAD_TARGET),
        ]:
            with self.assertRaises(ProxyError, msg=repr(raw)) as raised:
                parseAbsoluteTarget(raw)
            self.assertEqual(raised.exception.reason, reason, raw)

    def test_connect(self) -> None:
        """
        CONNECT takes host:port, IPv6 in brackets; the port is required.
        """
        self.assertEqual(
            parseConnectTarget(b"Example.com:443"), Target("example.com", 443)
        )
        self.assertEqual(
            parseConnectTarget(b"[2001:db8::1]:8443"), Target("2001:db8::1", 8443)
        )
        self.assertEqual(parseConnectTarget(b"2130706433:443").host, "127.0.0.1")
        for raw in (
            b"example.com",
            b"example.com:",
            b"2001:db8::1:443",
            b"[::1]",
            b":443",
        ):
            with self.assertRaises(ProxyError, msg=repr(raw)):
                parseConnectTarget(raw)
