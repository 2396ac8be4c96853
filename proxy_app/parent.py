"""
A parent proxy: the operator's C{upstream.proxy} setting, the hosts that
bypass it, and the CONNECT handshake that opens a tunnel through it.

The destination is vetted here before the parent is asked for anything, and
the parent is asked for the vetted address (C{CONNECT 192.0.2.1:443}),
never for the name, so that it cannot resolve the name again to something
the address policy would refuse.  L{proxy_app.upstream.Connector} is the
only user.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from typing import Any
from urllib.parse import unquote, urlsplit

import attr
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy_app.http1 import HeadError, ResponseHead, ResponseReader
from proxy_app.reasons import ProxyError, Reason
from proxy_app.target import hostPort
from proxy_app.tls import CertificateRefused, HostnameMismatch, tlsError

# The longest CONNECT answer head read from a parent.
MAX_ANSWER_HEAD = 16384


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ParentURL:
    """
    A parsed C{upstream.proxy} value.

    @ivar authorization: the C{Proxy-Authorization} value made from the
        URL's user information, or L{None}.  Never logged.
    """

    scheme: str
    host: str
    port: int
    authorization: bytes | None = attr.ib(default=None, repr=False)

    def __str__(self) -> str:
        # What messages and logs show: never the credentials.
        return f"{self.scheme}://{hostPort(self.host, self.port)}"


def parseParentURL(value: str) -> ParentURL:
    """
    Parse C{http://[user:pass@]host:port} or C{https://...}.

    @raise ValueError: with what was expected (never echoing a password).
    """
    expected = "expected http://[USER:PASS@]HOST:PORT or https://..."
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        raise ValueError(expected) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname or port is None:
        raise ValueError(expected)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(expected + " (no path, query or fragment)")
    if not 0 < port < 65536:
        raise ValueError(expected)
    host = parts.hostname.lower()
    if not (isIPAddress(host) or isIPv6Address(host)) and not re.match(
        r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$", host
    ):
        raise ValueError(expected + " (HOST: a name or an IP address)")
    authorization = None
    if parts.username is not None:
        user = unquote(parts.username)
        password = unquote(parts.password or "")
        if ":" in user:
            raise ValueError(expected + " (the user name may not hold ':')")
        credentials = f"{user}:{password}".encode()
        authorization = b"Basic " + base64.b64encode(credentials)
    return ParentURL(scheme, host, port, authorization)


def parseExternalProxyURL(value: str) -> ParentURL:
    """
    Parse a CONNECT's C{X-Upstream-Https-Proxy} value: as
    L{parseParentURL}, but the port may be left out (80 for C{http}, 443
    for C{https}), as Smokescreen's client library allows.

    @raise ValueError: with what was expected (never echoing a password).
    """
    text = value.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        port = -1
    if port is None and parts.hostname and parts.scheme.lower() in ("http", "https"):
        # Give the authority its scheme's port and let parseParentURL judge
        # the rest.
        default = 443 if parts.scheme.lower() == "https" else 80
        host = parts.netloc.rsplit("@", 1)[-1]
        if host.endswith(":"):
            raise ValueError("expected http://HOST[:PORT] or https://HOST[:PORT]")
        netloc = parts.netloc + f":{default}"
        text = parts._replace(netloc=netloc).geturl()
    try:
        return parseParentURL(text)
    except ValueError:
        raise ValueError(
            "expected http://HOST[:PORT] or https://HOST[:PORT] "
            "(no path, query or fragment)"
        ) from None


@attr.s(frozen=True, slots=True)
class Bypass:
    """
    The C{upstream.no_proxy} list: destinations reached directly rather
    than through the parent.  An entry is a host name (matching only that
    name), a C{*.} glob (matching any name below it, not the name itself),
    or an address or CIDR range (matching a vetted address in it, whatever
    the name).
    """

    names: frozenset[str] = attr.ib(factory=frozenset)
    suffixes: tuple[str, ...] = attr.ib(default=())
    networks: tuple[Any, ...] = attr.ib(default=())

    @classmethod
    def parse(cls, entries: tuple[str, ...]) -> Bypass:
        """
        @raise ValueError: naming the entry that is none of the three.
        """
        names = set()
        suffixes = []
        networks = []
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            name = entry[2:] if entry.startswith("*.") else entry
            if not re.match(r"^[a-z0-9_]([a-z0-9._-]*[a-z0-9])?$", name):
                raise ValueError(
                    f"{raw!r} is not a host name, *.glob, address or CIDR range"
                )
            if entry.startswith("*."):
                suffixes.append("." + name)
            else:
                names.add(name)
        return cls(frozenset(names), tuple(suffixes), tuple(networks))

    def __call__(self, host: str, address: str) -> bool:
        """
        Whether C{host}, vetted as C{address}, goes direct.
        """
        host = host.lower().rstrip(".")
        if host in self.names or host.endswith(self.suffixes):
            return True
        if self.networks:
            parsed = ipaddress.ip_address(address)
            return any(parsed in network for network in self.networks)
        return False


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ParentProxy:
    """
    The parent proxy outbound connections are tunnelled through.

    @ivar url: the parsed setting (its C{host} is the name the operator
        wrote, verified as the parent's certificate name with C{https}).
    @ivar address: the IP address connected to, resolved once at start-up:
        the parent is operator-configured, like the control webhook, and is
        the one connection not made to a vetted destination address.
    @ivar tls: the C{IOpenSSLClientConnectionCreator} for an C{https}
        parent, or L{None}.
    @ivar bypass: the destinations that go direct.
    @ivar kind: what messages call it: C{"parent proxy"} for the
        operator's, C{"external proxy"} for one a CONNECT asked for with
        C{X-Upstream-Https-Proxy} (its C{address} vetted like a
        destination's).
    """

    url: ParentURL
    address: str
    tls: Any = attr.ib(default=None, eq=False, repr=False)
    bypass: Bypass = attr.ib(factory=Bypass, eq=False)
    kind: str = attr.ib(default="parent proxy", eq=False)

    @property
    def key(self) -> tuple[str, str, int, bytes | None]:
        """
        What a pooled connection through this parent is known by: a
        connection through it is not a direct one, nor one through another
        parent or with other credentials.
        """
        url = self.url
        return (url.scheme, self.address, url.port, url.authorization)

    def __str__(self) -> str:
        return f"the {self.kind} {self.url}"


def connectRequest(parent: ParentProxy, address: str, port: int) -> bytes:
    """
    The CONNECT request head asking C{parent} for a tunnel to the vetted
    C{address} (an IP literal, bracketed if IPv6) and C{port}.
    """
    if isIPv6Address(address):
        authority = f"[{address}]:{port}".encode("ascii")
    elif isIPAddress(address):
        authority = f"{address}:{port}".encode("ascii")
    else:
        raise ValueError(f"refusing to ask the parent for non-address {address!r}")
    lines = [
        b"CONNECT " + authority + b" HTTP/1.1",
        b"Host: " + authority,
    ]
    if parent.url.authorization is not None:
        lines.append(b"Proxy-Authorization: " + parent.url.authorization)
    return b"\r\n".join(lines) + b"\r\n\r\n"


class _AnswerSink:
    """
    Collects the CONNECT answer's final head from a L{ResponseReader}.
    """

    def __init__(self) -> None:
        self.final: ResponseHead | None = None

    def informational(self, head: ResponseHead) -> None:
        pass

    def head(self, head: ResponseHead) -> None:
        self.final = head

    def body(self, data: bytes) -> None:
        pass

    def complete(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class ParentHandshake(Protocol):
    """
    The client side of a connection to a parent proxy: asks for a tunnel
    to a vetted address, reads the answer, and once the parent has agreed
    hands the connection to the protocol the caller asked for (over TLS
    to the destination if asked), passing on the bytes after the answer.

    @ivar answered: fires with the inner protocol once the tunnel is open;
        fails with a L{ProxyError} naming the parent and what it did.
        Cancelling it cuts the connection.
    @ivar state: C{"connecting"} until the connection to the parent is
        made, C{"asking"} while the CONNECT answer is awaited,
        C{"tunnel"} once the inner protocol owns the connection, and
        C{"failed"} after L{answered} failed.
    """

    transport: Any

    def __init__(
        self,
        parent: ParentProxy,
        address: str,
        port: int,
        host: str,
        factory: Factory,
        tls: Any = None,
    ) -> None:
        self.parent = parent
        self.address = address
        self.port = port
        self.host = host
        self.factory = factory
        self.tls = tls
        self.state = "connecting"
        self.inner: Any = None
        self.answered: Deferred = Deferred(self._cancel)
        self._buffer = b""
        self._sink = _AnswerSink()
        self._reader = ResponseReader(self._sink, MAX_ANSWER_HEAD)
        self._reader.expect(bodiless=True)

    def _where(self) -> str:
        return (
            f"{self.parent} for {hostPort(self.host, self.port)} "
            f"({hostPort(self.address, self.port)})"
        )

    def connectionMade(self) -> None:
        self.state = "asking"
        self.transport.write(connectRequest(self.parent, self.address, self.port))

    def dataReceived(self, data: bytes) -> None:
        if self.state == "tunnel":
            self.inner.dataReceived(data)
            return
        if self.state != "asking":
            return
        self._buffer += data
        while self.state == "asking":
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_ANSWER_HEAD:
                    self._fail(f"{self._where()} sent an answer head too large")
                return
            head, self._buffer = self._buffer[: end + 4], self._buffer[end + 4 :]
            try:
                self._reader.feed(head)
            except HeadError as e:
                self._fail(f"{self._where()} answered CONNECT with {e.message}")
                return
            final = self._sink.final
            if final is not None:
                self._answer(final)

    def _answer(self, head: ResponseHead) -> None:
        if head.status != 200:
            reason = head.reason.decode("ascii", "replace")[:100]
            self._fail(
                f"{self._where()} refused the tunnel: it answered CONNECT with "
                f"{head.status} {reason}".rstrip()
            )
            return
        if head.chunked or head.contentLength not in (None, 0):
            # A 2xx to CONNECT has no content (RFC 9110 9.3.6); one that
            # claims some leaves no way to tell where the tunnel starts.
            self._fail(f"{self._where()} answered CONNECT with 200 and a body")
            return
        leftover, self._buffer = self._buffer, b""
        self.state = "tunnel"
        factory = self.factory
        if self.tls is not None:
            factory = TLSMemoryBIOFactory(self.tls, True, factory)
        destination = (
            IPv6Address("TCP", self.address, self.port)
            if isIPv6Address(self.address)
            else IPv4Address("TCP", self.address, self.port)
        )
        self.inner = factory.buildProtocol(destination)
        self.inner.makeConnection(self.transport)
        # As wrapClientTLS's endpoint does, give the caller its own
        # protocol, not the TLS layer around it.
        application = self.inner.wrappedProtocol if self.tls is not None else self.inner
        # Its transport's peer is the parent; the logs, metrics and webhook
        # name the destination it reaches.
        application.destinationAddress = destination
        self.answered.callback(application)
        if leftover and self.state == "tunnel":
            self.inner.dataReceived(leftover)

    def _fail(self, message: str) -> None:
        self.state = "failed"
        self.transport.abortConnection()
        self.answered.errback(ProxyError(Reason.PARENT_PROXY_FAILED, message))

    def _cancel(self, answered: Deferred) -> None:
        self.state = "failed"
        if self.transport is not None:
            self.transport.abortConnection()

    def readConnectionLost(self) -> None:
        if self.state == "tunnel":
            half = IHalfCloseableProtocol(self.inner, None)
            if half is not None:
                half.readConnectionLost()
            else:
                self.transport.loseConnection()
        elif self.state == "asking":
            self.transport.abortConnection()

    def writeConnectionLost(self) -> None:
        if self.state == "tunnel":
            half = IHalfCloseableProtocol(self.inner, None)
            if half is not None:
                half.writeConnectionLost()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.state == "tunnel":
            self.inner.connectionLost(reason)
            return
        if self.state == "asking":
            self.state = "failed"
            if self.parent.tls is not None and reason.check(*_TLS_FAILURES):
                self.answered.errback(
                    tlsError(reason, self.parent.url.host, str(self.parent))
                )
                return
            self.answered.errback(
                ProxyError(
                    Reason.PARENT_PROXY_FAILED,
                    f"{self._where()} closed the connection without answering CONNECT",
                )
            )


# How a failed TLS handshake with an https parent shows.
_TLS_FAILURES = (SSL.Error, CertificateRefused, HostnameMismatch, VerificationError)


class ParentHandshakeFactory(Factory):
    """
    Builds the one L{ParentHandshake} of one connection attempt.
    """

    noisy = False

    def __init__(self, handshake: ParentHandshake) -> None:
        self.handshake = handshake

    def buildProtocol(self, addr: Any) -> ParentHandshake:
        return self.handshake
