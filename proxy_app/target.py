"""
Parsing and normalizing what a client asks the proxy to reach.

A forwarded request names its destination with an absolute URI
(C{GET http://host:port/path}); a tunnel with an authority
(C{CONNECT host:port}).  Either way the host is normalized before anything
looks at it (IDNA/UTS-46, lower case, one trailing dot dropped), and an IP
literal in any form a C library accepts (C{2130706433}, C{0x7f.1},
C{[::ffff:127.0.0.1]}) becomes the canonical address it would dial, so
that the address policy judges what would be dialled rather than the text.
"""

from __future__ import annotations

import functools
import re

import attr
import idna

from proxy_app.addresses import parseIPLiteral
from proxy_app.reasons import ProxyError, Reason
from proxy_app.redact import loggedTarget

DEFAULT_PORTS = {"http": 80, "https": 443}

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
# Characters that never belong in a host, whatever IDNA would make of them:
# they are how parsers are told apart (userinfo, Windows paths, NULs).
_FORBIDDEN = set("\x00 \t\r\n@\\/?#%[]")
# Dots that UTS-46 maps to "." and that some parsers do not: refusing them
# keeps every part of the proxy seeing the same labels.
_ODD_DOTS = set("\u3002\uff0e\uff61")


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Target:
    """
    A parsed destination.

    @ivar host: the normalized host: an ASCII name, or a canonical IP
        literal without brackets.
    @ivar port: the destination port.
    @ivar scheme: C{"http"} or C{"https"} for forwarded requests, C{None}
        for CONNECT.
    @ivar path: the origin-form request target to send upstream (C{b"/"}
        at least), empty for CONNECT.
    @ivar explicitPort: whether the client named the port.
    """

    host: str
    port: int
    scheme: str | None = None
    path: bytes = b""
    explicitPort: bool = True

    @property
    def isIP(self) -> bool:
        return parseIPLiteral(self.host) is not None

    @property
    def authority(self) -> str:
        """
        C{host:port} as used in messages, IPv6 in brackets.
        """
        return hostPort(self.host, self.port)

    @property
    def hostHeader(self) -> bytes:
        """
        The C{Host} header value to send upstream.
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.explicitPort and self.port != DEFAULT_PORTS.get(self.scheme or ""):
            host = f"{host}:{self.port}"
        return host.encode("ascii")


def hostPort(host: str, port: int) -> str:
    """
    Format C{host} and C{port} as they appear in messages and logs, with
    IPv6 literals in brackets.
    """
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _bad(message: str) -> ProxyError:
    return ProxyError(Reason.BAD_TARGET, message)


def _credentials(where: str, instead: str) -> ProxyError:
    """
    The refusal of a target with userinfo (C{user:password@host}).  It
    quotes nothing of the target: the text before the C{@} is a password
    more often than not.
    """
    return _bad(
        f"Credentials in the {where} (user:password@host) are not accepted: "
        f"the proxy neither uses nor forwards them; {instead}"
    )


@functools.lru_cache(maxsize=4096)
def normalizeHost(raw: str) -> str:
    """
    Normalize a host as the proxy compares and resolves it.  Results are
    cached (the function is pure and runs for every request); refusals are
    not.

    @param raw: the host as the client wrote it, IPv6 literals with their
        brackets.
    @return: a lower-case ASCII name without trailing dot, or a canonical
        IP literal without brackets.
    @raise ProxyError: (1002) when it is not a usable host.
    """
    if not raw:
        raise _bad("The request names no host")
    if raw.startswith("["):
        if not raw.endswith("]"):
            raise _bad(f"Malformed IPv6 literal in host {raw!r}")
        inner = raw[1:-1]
        try:
            address = parseIPLiteral(inner)
        except ValueError:
            address = None
        if address is None or address.version != 6:
            raise _bad(f"Malformed IPv6 literal in host {raw!r}")
        return str(address)
    if ":" in raw:
        raise _bad(f"IPv6 literal {raw!r} must be written in brackets")
    if _FORBIDDEN.intersection(raw):
        raise _bad(f"Invalid character in host {raw!r}")
    if _ODD_DOTS.intersection(raw):
        raise _bad(f"Host {raw!r} uses a dot other than '.'")
    try:
        address = parseIPLiteral(raw)
    except ValueError:
        raise _bad(
            f"Host {raw!r} looks like an IP address but is not a valid one"
        ) from None
    if address is not None:
        return str(address)

    name = raw[:-1] if raw.endswith(".") else raw
    if not name:
        raise _bad(f"Invalid host {raw!r}")
    try:
        if name.isascii():
            ascii_ = name.lower()
        else:
            ascii_ = (
                idna.encode(name, uts46=True, std3_rules=False).decode("ascii").lower()
            )
    except idna.IDNAError as e:
        raise _bad(f"Host {raw!r} is not a valid internationalized name: {e}") from None
    if len(ascii_) > 253:
        raise _bad(f"Host name is longer than 253 characters: {raw[:64]!r}...")
    for label in ascii_.split("."):
        if not _LABEL.match(label):
            raise _bad(f"Invalid host {raw!r}: bad label {label!r}")
    # An IDNA name can decode to something that now parses as an address
    # ("１２７.0.0.1" in full-width digits); judge it as that address.
    try:
        address = parseIPLiteral(ascii_)
    except ValueError:
        raise _bad(
            f"Host {raw!r} looks like an IP address but is not a valid one"
        ) from None
    return str(address) if address is not None else ascii_


def _splitHostPort(authority: str) -> tuple[str, str | None]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise _bad(f"Malformed IPv6 literal in {authority!r}")
        rest = authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise _bad(f"Malformed authority {authority!r}")
        return authority[: end + 1], (rest[1:] if rest else None)
    if authority.count(":") > 1:
        raise _bad(f"IPv6 literal in {authority!r} must be written in brackets")
    host, sep, port = authority.partition(":")
    return host, (port if sep else None)


def _parsePort(text: str | None, authority: str) -> int:
    if text is None or not text.isdigit() or not text.isascii():
        raise _bad(f"Invalid port in {authority!r}")
    port = int(text)
    if not 0 < port < 65536:
        raise _bad(f"Port {text} in {authority!r} is out of range (1-65535)")
    return port


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("The request target is not valid UTF-8") from None


def parseConnectTarget(raw: bytes) -> Target:
    """
    Parse the authority-form target of a CONNECT request (C{host:port}).

    @raise ProxyError: (1002) for a malformed target or port.
    """
    authority = _decode(raw)
    if "@" in authority:
        raise _credentials(
            "CONNECT target", "authenticate to the proxy with Proxy-Authorization"
        )
    host, port = _splitHostPort(authority)
    if port is None:
        raise _bad(f"CONNECT target {authority!r} must be host:port")
    return Target(normalizeHost(host), _parsePort(port, authority))


def parseAbsoluteTarget(raw: bytes) -> Target:
    """
    Parse the absolute-form target of a forwarded request
    (C{http://host[:port]/path?query}).

    @raise ProxyError: 1002 for origin-form or malformed targets, 1003 for
        schemes other than http and https.
    """
    if raw.startswith(b"/") or raw == b"*":
        raise _bad(
            "The request target must be an absolute URI (http://host/path) "
            "when talking to a proxy"
        )
    scheme, sep, rest = raw.partition(b"://")
    if not sep or not _SCHEME.fullmatch(scheme):
        # Quoted as logs show it: no userinfo, no query values.
        raise _bad(
            f"The request target {loggedTarget(raw)[:200]!r} is not an absolute URI"
        )
    end = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        index = rest.find(delimiter)
        if 0 <= index < end:
            end = index
    path = rest[end:].split(b"#", 1)[0]
    if not path.startswith(b"/"):
        path = b"/" + path
    schemeText, host, portNumber, explicit = _origin(scheme, rest[:end])
    return Target(host, portNumber, schemeText, path, explicit)


_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*")


@functools.lru_cache(maxsize=4096)
def _origin(scheme: bytes, rawAuthority: bytes) -> tuple[str, str, int, bool]:
    """
    The scheme, normalized host, port and whether the port was explicit, of
    an absolute URI's scheme and authority; cached like L{normalizeHost}
    (refusals are not).
    """
    schemeText = scheme.decode("ascii").lower()
    if b"@" in rawAuthority:
        raise _credentials(
            "URL",
            "send them in a header (Authorization for the origin, "
            "Proxy-Authorization for the proxy)",
        )
    if schemeText not in DEFAULT_PORTS:
        raise ProxyError(
            Reason.BAD_SCHEME,
            f"URL scheme '{schemeText}' is not supported; use http or https",
        )
    authority = _decode(rawAuthority)
    host, port = _splitHostPort(authority)
    explicit = port is not None
    portNumber = _parsePort(port, authority) if explicit else DEFAULT_PORTS[schemeText]
    return schemeText, normalizeHost(host), portNumber, explicit
