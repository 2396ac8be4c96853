"""
The proxy's configuration: command-line flags, environment variables and a
YAML file merged into a tree of frozen attrs classes.

Every setting is declared once, as an attrs field made by L{setting}.  The
field's section and name give the YAML key (C{timeouts.connect}), its
C{flag} gives the command-line option (C{--connect-timeout}) and the
environment variable (C{EGRESSPROXY_CONNECT_TIMEOUT}).  Adding an option is
adding one field; the flags, the environment, the file loader and the
reference table in C{docs/configuration.md} all come from the fields.

Precedence, highest first: flag, environment, file, default.

Errors are L{ConfigError}s whose one-line message names the key, where the
value came from, the value and what was expected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import attr
import yaml

from proxy_app.acl import parseDomainGlob
from proxy_app.addresses import parseAllowHost, parsePortRange
from proxy_app.reasons import ProxyError
from proxy_app.target import normalizeHost

ENV_PREFIX = "EGRESSPROXY_"

_SETTING = "egressproxy.setting"


class ConfigError(Exception):
    """
    A configuration value that cannot be used.  C{str()} of it is the one
    line printed before start-up stops.
    """


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Setting:
    """
    How one configuration field is spelled and parsed.

    @ivar flag: the long option name without C{--}.
    @ivar parse: turns one raw value (a string from a flag or the
        environment, or any YAML scalar) into the field's value, raising
        L{ValueError} with what was expected.
    @ivar doc: one sentence for C{--help} and the documentation.
    @ivar repeatable: the flag may be given many times, the environment
        variable holds a comma-separated list and the YAML value is a list;
        the field holds a tuple.
    @ivar metavar: how the value is shown in help text.
    @ivar commas: a repeatable field whose every value, a flag's or a YAML
        list item, may itself be a comma-separated list
        (C{--allow-port 80,443}).
    """

    flag: str
    parse: Callable[[Any], Any]
    doc: str
    repeatable: bool = False
    metavar: str = "VALUE"
    commas: bool = False

    @property
    def envvar(self) -> str:
        return ENV_PREFIX + self.flag.upper().replace("-", "_")


def setting(
    flag: str,
    default: Any,
    parse: Callable[[Any], Any],
    doc: str,
    *,
    repeatable: bool = False,
    metavar: str = "VALUE",
    commas: bool = False,
) -> Any:
    """
    Declare a configuration field; see L{Setting}.
    """
    return attr.ib(
        default=default,
        metadata={_SETTING: Setting(flag, parse, doc, repeatable, metavar, commas)},
    )


# Parsers.  Each takes one raw value and raises ValueError("expected ...").
# Each is named parse..., so that none shares its name with a field it
# parses: a class body such as Webhook's would otherwise shadow the parser
# for every field declared after the field of the same name.

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parseSeconds(value: Any) -> float:
    """
    A positive duration: a number of seconds, or a string with a unit as
    webhook-sentry writes them (C{"10s"}, C{"500ms"}, C{"1m"}).
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10, 2.5 or 500ms")
    if isinstance(value, (int, float)):
        result = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError("expected a duration such as 10, 2.5 or 500ms")
        result = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not result > 0:
        raise ValueError("expected a duration greater than zero")
    return result


_SIZE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parseSize(value: Any) -> int:
    """
    A positive number of bytes, optionally with a unit (C{64KiB}, C{1MiB},
    C{1MB}).
    """
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes such as 1048576 or 1MiB")
    if isinstance(value, int):
        result = value
    else:
        match = _SIZE.match(str(value))
        if match is None:
            raise ValueError("expected a size in bytes such as 1048576 or 1MiB")
        unit = match.group(2).lower() if match.group(2) else None
        result = int(match.group(1)) * _SIZE_UNITS[unit]
    if result <= 0:
        raise ValueError("expected a size greater than zero")
    return result


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def parseBoolean(value: Any) -> bool:
    """
    A boolean: YAML's true/false, or yes/no/on/off/1/0 as text.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError("expected true or false")


def parseCount(value: Any) -> int:
    """
    A whole number, zero or more.
    """
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    try:
        result = int(str(value).strip())
    except ValueError:
        raise ValueError("expected a whole number") from None
    if result < 0:
        raise ValueError("expected a whole number, zero or more")
    return result


def parsePositive(value: Any) -> int:
    """
    A whole number, one or more.
    """
    result = parseCount(value)
    if result < 1:
        raise ValueError("expected a whole number, one or more")
    return result


def parseWorkers(value: Any) -> int:
    """
    A number of processes, or C{auto} for one per CPU.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return max(1, os.cpu_count() or 1)
    result = parseCount(value)
    if result < 1:
        raise ValueError("expected at least 1, or auto")
    return result


def parseBacklog(value: Any) -> int:
    """
    A listen backlog: 1 to 65535.
    """
    result = parsePositive(value)
    if result > 65535:
        raise ValueError("expected a whole number from 1 to 65535")
    return result


def parseIPAddress(value: Any) -> str:
    """
    An IPv4 or IPv6 address, canonical.
    """
    import ipaddress

    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise ValueError(
            "expected an IP address such as 192.0.2.10 or 2001:db8::10"
        ) from None


def parsePorts(value: Any) -> str:
    """
    A destination port or port range, canonical: C{443}, C{8000-8100}.
    """
    try:
        low, high = parsePortRange(value)
    except ValueError:
        raise ValueError(
            "expected a port (1-65535) or a range of them, such as 443 or 8000-8100"
        ) from None
    return str(low) if low == high else f"{low}-{high}"


def parseAllowedHost(value: Any) -> str:
    """
    A host name or C{*.} glob, optionally with C{:PORT}, normalized as the
    proxy normalizes request targets (lower case, IDNA A-labels, no
    trailing dot): C{hooks.internal.example}, C{*.svc.example:8443}.
    """
    expected = (
        "expected a host name or *. glob with an optional port, such as "
        "hooks.internal.example, *.svc.example or hooks.example:8443"
    )
    text = value.strip() if isinstance(value, str) else ""
    glob = text.startswith("*.")
    name, colon, port = (text[2:] if glob else text).partition(":")
    try:
        normalized = normalizeHost(name)
    except ProxyError:
        raise ValueError(expected) from None
    canonical = ("*." if glob else "") + normalized + colon + port
    try:
        parseAllowHost(canonical)
    except ValueError as e:
        raise ValueError(str(e)) from None
    return canonical


def parseSecondsOrZero(value: Any) -> float:
    """
    A duration, or 0 to turn something off.
    """
    if not isinstance(value, bool) and str(value).strip() in ("0", "0.0", "0s"):
        return 0.0
    return parseSeconds(value)


def parseRate(value: Any) -> float:
    """
    A rate per second, zero or more.
    """
    if isinstance(value, bool):
        raise ValueError("expected a number of requests per second")
    try:
        result = float(str(value).strip())
    except ValueError:
        raise ValueError("expected a number of requests per second") from None
    if not result >= 0:
        raise ValueError("expected a rate of zero or more")
    return result


def parseHeaderName(value: Any) -> str:
    """
    An HTTP header name.
    """
    result = parseText(value)
    if not _TOKEN.match(result):
        raise ValueError("expected an HTTP header name such as Request-ID")
    return result


def parseOptionalEndpoint(value: Any) -> str | None:
    """
    A server endpoint description, or C{none} for no listener.
    """
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    result = parseEndpoint(value)
    if not isinstance(result, str):
        raise ValueError(
            "expected an endpoint description such as tcp:2112:interface=127.0.0.1, or "
            "none"
        )
    return result


def parseChoice(*choices: str) -> Callable[[Any], str]:
    """
    A parser accepting one of C{choices}, case-insensitively.
    """

    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return text

    return parse


def parseText(value: Any) -> str:
    """
    A non-empty string.
    """
    if value is None or isinstance(value, (dict, list)) or not str(value).strip():
        raise ValueError("expected a non-empty string")
    return str(value).strip()


def parseDenyMessage(value: Any) -> str:
    """
    One line of printable text for a response body: a non-empty string
    without control characters (a line break in it would look like the
    start of something else to whoever reads the body).
    """
    text = parseText(value)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError("expected one line of text without control characters")
    return text


def splitDescription(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint description into its positional and keyword parts,
    honouring backslash-escaped colons (C{interface=\\:\\:1}).
    """
    parts = [p.replace("\0", ":") for p in description.replace("\\:", "\0").split(":")]
    positional = [p for p in parts if "=" not in p]
    keywords = dict(p.split("=", 1) for p in parts if "=" in p)
    return positional, keywords


@attr.s(frozen=True, slots=True, auto_attribs=True)
class TLSListener:
    """
    A TLS listener that can ask clients for certificates, which Twisted's
    C{ssl:} endpoint description cannot.  Written in YAML as a mapping, or
    on the command line as
    C{mtls:PORT:cert=PATH:key=PATH[:interface=IP][:client_ca=PATH]
    [:client_cert=required|optional][:crl=PATH][:role_from=cn|ou|uri-san]
    [:role_from_prefix=PREFIX]}.

    @ivar clientCert: C{"required"}, C{"optional"} or C{"none"}.
    @ivar roleFrom: where a client certificate's role comes from: C{"cn"},
        C{"ou"} or C{"uri-san"} (see L{proxy_app.tls.CertificateRole}).
    @ivar roleFromPrefix: with C{uri-san}, the URI prefix cut off to make
        the role, or L{None} for the whole SPIFFE ID.
    """

    port: int
    cert: str
    key: str
    interface: str = ""
    clientCA: str | None = None
    clientCert: str = "none"
    crl: str | None = None
    roleFrom: str = "cn"
    roleFromPrefix: str | None = None

    @property
    def description(self) -> str:
        return f"mtls:{self.port}:interface={self.interface}"


_LISTENER_KEYS = {
    "port",
    "interface",
    "cert",
    "key",
    "client_ca",
    "client_cert",
    "crl",
    "role_from",
    "role_from_prefix",
}


def _parseTLSListener(fields: dict[str, Any]) -> TLSListener:
    unknown = set(fields) - _LISTENER_KEYS
    if unknown:
        raise ValueError(
            f"unknown TLS listener key {sorted(unknown)[0]!r}; known: "
            + ", ".join(sorted(_LISTENER_KEYS))
        )
    try:
        port = int(fields.get("port", ""))
    except (TypeError, ValueError):
        raise ValueError("a TLS listener needs a port from 0 to 65535") from None
    if not 0 <= port < 65536:
        raise ValueError("a TLS listener needs a port from 0 to 65535")
    for required in ("cert", "key"):
        if not fields.get(required):
            raise ValueError(f"a TLS listener needs {required}=PATH")
    clientCert = parseChoice("required", "optional", "none")(
        fields.get("client_cert", "required" if fields.get("client_ca") else "none")
    )
    if clientCert != "none" and not fields.get("client_ca"):
        raise ValueError("client_cert=required|optional needs client_ca=PATH")
    roleFrom = parseChoice("cn", "ou", "uri-san")(fields.get("role_from", "cn"))
    if roleFrom != "cn" and clientCert == "none":
        raise ValueError(f"role_from={roleFrom} needs client_ca=PATH")
    prefix = fields.get("role_from_prefix")
    if prefix is not None:
        prefix = str(prefix)
        if roleFrom != "uri-san":
            raise ValueError("role_from_prefix needs role_from=uri-san")
        if "://" not in prefix or not prefix.endswith("/"):
            raise ValueError(
                "role_from_prefix must be a URI prefix ending in '/', such as "
                "spiffe://example.org/ns/"
            )
    return TLSListener(
        port=port,
        cert=str(fields["cert"]),
        key=str(fields["key"]),
        interface=str(fields.get("interface", "")),
        clientCA=fields.get("client_ca"),
        clientCert=clientCert,
        crl=fields.get("crl"),
        roleFrom=roleFrom,
        roleFromPrefix=prefix,
    )


def parseEndpoint(value: Any) -> str | TLSListener:
    """
    A Twisted server endpoint description such as
    C{tcp:9090:interface=127.0.0.1} (only its shape is checked here;
    L{proxy_app.tap} builds it and reports what Twisted objects to), or a
    L{TLSListener} given as a mapping or as an C{mtls:} description.
    """
    if isinstance(value, dict):
        return _parseTLSListener(value)
    result = parseText(value)
    if result.startswith("mtls:"):
        positional, fields = splitDescription(result)
        if len(positional) > 1:
            fields["port"] = positional[1]
        return _parseTLSListener(fields)
    if ":" not in result:
        raise ValueError(
            "expected a server endpoint description such as "
            "tcp:9090:interface=127.0.0.1"
        )
    return result


# The configuration tree.


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Timeouts:
    """
    How long the proxy waits, in seconds.
    """

    connect: float = setting(
        "connect-timeout",
        10.0,
        parseSeconds,
        "Timeout for the TCP connection to the destination: a bound on the "
        "whole connect phase, however many of its addresses are tried.",
        metavar="SECONDS",
    )
    read: float = setting(
        "read-timeout",
        10.0,
        parseSeconds,
        "How long a connection to the destination may stay idle (an idle "
        "CONNECT tunnel closes up to an eighth of it later).",
        metavar="SECONDS",
    )
    lifetime: float = setting(
        "connection-lifetime",
        60.0,
        parseSeconds,
        "Longest time a request may take from its connect (or a tunnel may "
        "live, closed up to an eighth of the shorter of this and the read "
        "timeout later); pooled connections older than this are not reused.",
        metavar="SECONDS",
    )
    dns: float = setting(
        "dns-timeout",
        5.0,
        parseSeconds,
        "Timeout for resolving the destination's name.",
        metavar="SECONDS",
    )
    request_header: float = setting(
        "request-header-timeout",
        10.0,
        parseSeconds,
        "Time a client has to send a complete request head; also how long "
        "an idle keep-alive client connection is kept (never applies to an "
        "established CONNECT tunnel).",
        metavar="SECONDS",
    )
    drain: float = setting(
        "drain-timeout",
        15.0,
        parseSeconds,
        "On SIGTERM, how long in-flight requests and tunnels may take to "
        "finish before they are cut.",
        metavar="SECONDS",
    )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Limits:
    """
    Size limits, in bytes.
    """

    max_response_body: int = setting(
        "max-response-body",
        1048576,
        parseSize,
        "Largest response body passed back to a client of a forwarded "
        "request; larger ones are refused (502, reason code 1008) or cut.",
        metavar="BYTES",
    )
    max_request_header: int = setting(
        "max-request-header-size",
        65536,
        parseSize,
        "Largest request head (request line and headers) accepted; larger "
        "ones are answered 431.",
        metavar="BYTES",
    )
    max_uri_length: int = setting(
        "max-uri-length",
        8192,
        parseSize,
        "Longest request line accepted; longer ones are answered 414.",
        metavar="BYTES",
    )
    max_header_count: int = setting(
        "max-header-count",
        100,
        parseCount,
        "Most request header lines accepted; more are answered 431.",
        metavar="N",
    )
    max_connect_attempts: int = setting(
        "max-connect-attempts",
        4,
        parsePositive,
        "Most of a destination's vetted addresses tried for one connection, "
        "IPv6 and IPv4 interleaved before the cap (so both families are "
        "tried when both answered); the access-request gate is asked about "
        "exactly these.",
        metavar="N",
    )
    max_concurrent_requests: int = setting(
        "max-concurrent-requests",
        0,
        parseCount,
        "Most forwarded requests in progress at once in the whole proxy (0: "
        "no limit; with --workers, each worker has its share); past it the "
        "answer is 503 with Retry-After (reason code 1014).",
        metavar="N",
    )
    max_concurrent_tunnels: int = setting(
        "max-concurrent-tunnels",
        0,
        parseCount,
        "Most CONNECT tunnels open at once in the whole proxy (0: no limit; "
        "with --workers, each worker has its share); past it the answer is "
        "503 with Retry-After (reason code 1014).",
        metavar="N",
    )
    max_request_rate: float = setting(
        "max-request-rate",
        0.0,
        parseRate,
        "Requests and tunnels per second allowed to each role (anonymous "
        "clients share one budget) by the whole proxy, as a token bucket (0: "
        "no limit; with --workers, each worker allows its share); past it the "
        "answer is 429 with Retry-After (reason code 1014).",
        metavar="PER_SECOND",
    )
    request_burst: int = setting(
        "request-burst",
        10,
        parseCount,
        "How many requests a role may make at once above its rate (with "
        "--workers, each worker has its share, at least 1).",
        metavar="N",
    )


class ClientCertAlias(NamedTuple):
    """
    One named client certificate (C{tls.client_certs}).

    @ivar roles: the roles that may present it, or L{None} when it is bound
        to none (then, in a deployment with roles, no client may present
        it; without roles, every client may: webhook-sentry's behaviour).
    """

    alias: str
    cert: str
    key: str
    roles: tuple[str, ...] | None = None


# webhook-sentry keeps its clientCertFile under this alias, so
# "X-WhSentry-ClientCert: default" means --client-cert; a configured alias
# of the same name would be a second certificate behind one name.
RESERVED_ALIAS = "default"


def _parseAliasRoles(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("roles: expected a list of one or more roles")
    return tuple(parseText(role) for role in value)


def parseClientCertAliases(value: Any) -> tuple[ClientCertAlias, ...]:
    """
    Named client certificates, each optionally bound to the roles that may
    present it: in YAML a mapping C{{ALIAS: {cert: PATH, key: PATH[, roles:
    [ROLE, ...]]}}}; on the command line or in the environment
    C{ALIAS=CERT:KEY[:ROLE+ROLE...]}, several separated by commas.  The
    alias C{default} is reserved for C{--client-cert}.
    """
    expected = (
        "expected {ALIAS: {cert: PATH, key: PATH, roles: [ROLE, ...]}} "
        "or ALIAS=CERT:KEY[:ROLE+ROLE...][,...]"
    )
    result = []
    if isinstance(value, dict):
        for alias, fields in value.items():
            if (
                not isinstance(fields, dict)
                or not {"cert", "key"} <= set(fields)
                or set(fields) - {"cert", "key", "roles"}
            ):
                raise ValueError(expected)
            roles = fields.get("roles")
            result.append(
                ClientCertAlias(
                    str(alias),
                    parseText(fields["cert"]),
                    parseText(fields["key"]),
                    None if roles is None else _parseAliasRoles(roles),
                )
            )
    elif isinstance(value, str):
        for item in value.split(","):
            alias, sep, paths = item.strip().partition("=")
            parts = paths.split(":", 2)
            if not (sep and alias and len(parts) >= 2 and all(parts)):
                raise ValueError(expected)
            roles = _parseAliasRoles(parts[2].split("+")) if len(parts) == 3 else None
            result.append(ClientCertAlias(alias, parts[0], parts[1], roles))
    else:
        raise ValueError(expected)
    seen = set()
    for entry in result:
        if entry.alias == RESERVED_ALIAS:
            raise ValueError(
                f"the alias {RESERVED_ALIAS!r} is reserved: "
                f"X-WhSentry-ClientCert: {RESERVED_ALIAS} selects tls.client_cert "
                "(--client-cert), as in webhook-sentry; rename this alias"
            )
        if entry.alias in seen:
            raise ValueError(f"the alias {entry.alias!r} is given twice")
        seen.add(entry.alias)
    return tuple(result)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class TLS:
    """
    TLS origination: what destinations are verified against and which
    client certificates are presented.
    """

    ca_bundle: str | None = setting(
        "ca-bundle",
        None,
        parseText,
        "PEM file of the CAs destinations are verified against, replacing "
        "certifi's Mozilla bundle.",
        metavar="PATH",
    )
    extra_ca: tuple[str, ...] = setting(
        "extra-ca",
        (),
        parseText,
        "PEM file of CAs trusted in addition to the bundle (repeatable).",
        repeatable=True,
        metavar="PATH",
    )
    client_cert: str | None = setting(
        "client-cert",
        None,
        parseText,
        "Client certificate (PEM) presented to every destination that asks "
        "for one, unless X-WhSentry-ClientCert names another; "
        "X-WhSentry-ClientCert: default names it. Any client may use it, "
        "roles or not.",
        metavar="PATH",
    )
    client_key: str | None = setting(
        "client-key",
        None,
        parseText,
        "Private key (PEM, unencrypted) of --client-cert.",
        metavar="PATH",
    )
    client_certs: tuple[ClientCertAlias, ...] = setting(
        "client-cert-alias",
        (),
        parseClientCertAliases,
        "Named client certificates, chosen per request with "
        "X-WhSentry-ClientCert: ALIAS, each presented only to the roles it "
        "lists; YAML {ALIAS: {cert: PATH, key: PATH, roles: [ROLE, ...]}}, "
        "flag ALIAS=CERT:KEY[:ROLE+ROLE...][,...]. With roles in the "
        "deployment, an alias without roles is refused (403, reason code "
        "1016); without roles, any client may name any alias. The alias "
        "default is reserved for --client-cert.",
        metavar="ALIAS=CERT:KEY[:ROLE+ROLE]",
    )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Mitm:
    """
    TLS interception of CONNECT tunnels (C{proxy_app.mitm}): the CA that
    issues the certificates shown to clients, and which tunnels are
    intercepted beside the ACL's per-role C{mitm_domains}.
    """

    ca_cert: str | None = setting(
        "mitm-ca-cert",
        None,
        parseText,
        "PEM certificate of the CA that issues the certificates intercepted "
        "tunnels show their clients (Smokescreen's mitm_ca_cert_file); with "
        "mitm.ca_key it turns interception on for the tunnels mitm.domains, "
        "mitm.all and the ACL's mitm_domains select. See docs/tls.md.",
        metavar="PATH",
    )
    ca_key: str | None = setting(
        "mitm-ca-key",
        None,
        parseText,
        "Private key (PEM, unencrypted) of mitm.ca_cert "
        "(Smokescreen's mitm_ca_key_file); never logged.",
        metavar="PATH",
    )
    domains: tuple[str, ...] = setting(
        "mitm-domain",
        (),
        parseDomainGlob,
        "Intercept tunnels to this host for every role (repeatable; written "
        "as the ACL's allowed_domains entries: api.example.com, "
        "*.example.com), beside the ACL's per-role mitm_domains.",
        repeatable=True,
        metavar="PATTERN",
    )
    all: bool = setting(
        "mitm-all",
        False,
        parseBoolean,
        "Intercept every CONNECT tunnel (except those through X-Upstream-Https-Proxy).",
        metavar="BOOL",
    )
    cache_size: int = setting(
        "mitm-cache-size",
        1000,
        parsePositive,
        "Issued certificates kept in memory, one per host name, least "
        "recently used dropped first; never written to disk.",
        metavar="N",
    )
    leaf_lifetime: float = setting(
        "mitm-leaf-lifetime",
        86400.0,
        parseSeconds,
        "Validity of an issued certificate (its notBefore is backdated 5 "
        "minutes for clock skew); re-issued when a quarter of it is left.",
        metavar="DURATION",
    )


def _parseSubkeys(
    value: Any, known: dict[str, Callable[[Any], Any]], example: str
) -> dict[str, Any]:
    """
    Parse a small mapping (YAML) or C{key=value,...} text (flag, environment)
    with a parser per key.
    """
    if isinstance(value, str):
        items: dict[str, Any] = {}
        for part in value.split(","):
            key, sep, item = part.strip().partition("=")
            if not sep:
                raise ValueError(f"expected {example}")
            items[key.strip()] = item.strip()
        value = items
    if not isinstance(value, dict):
        raise ValueError(f"expected {example}")
    result = {}
    for key, item in value.items():
        if key not in known:
            raise ValueError(f"unknown key {key!r}; known: " + ", ".join(known))
        try:
            result[key] = known[key](item)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    return result


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Gate:
    """
    The access-request gate: C{{enabled, timeout, on_error}}.  Python
    callers of L{proxy_app.webhook.WebhookService} build it directly.

    @ivar enabled: whether connections wait for the webhook's answer.
    @ivar timeout: how long one gate call may wait, in seconds; above zero.
    @ivar on_error: C{"accept"} or C{"reject"}: the outcome when the
        webhook gives no clear answer (see C{docs/webhooks.md}).
    """

    enabled: bool = False
    timeout: float = attr.ib(default=5.0)
    on_error: str = attr.ib(default="accept")

    @timeout.validator
    def _checkTimeout(self, attribute: Any, value: float) -> None:
        if not value > 0:
            raise ValueError(
                f"access_request.timeout must be above zero, not {value!r}"
            )

    @on_error.validator
    def _checkOnError(self, attribute: Any, value: str) -> None:
        if value not in ("accept", "reject"):
            raise ValueError(
                f"access_request.on_error must be accept or reject, not {value!r}"
            )


def parseGate(value: Any) -> Gate:
    """
    C{{enabled: true, timeout: 5, on_error: reject}} in YAML, or
    C{enabled=true,timeout=5,on_error=reject}.
    """
    return Gate(
        **_parseSubkeys(
            value,
            {
                "enabled": parseBoolean,
                "timeout": parseSeconds,
                "on_error": parseChoice("accept", "reject"),
            },
            "{enabled: true, timeout: 5, on_error: accept|reject}",
        )
    )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Statistics:
    """
    smithproxy's statistics feature: C{true}, or C{{enabled, max_bytes}}.
    Python callers of L{proxy_app.webhook.WebhookService} build it
    directly.

    @ivar enabled: whether connections collect
        L{proxy_app.stats.ConnectionStatistics}.
    @ivar max_bytes: how many bytes of each direction the entropy covers;
        0 or more.
    """

    enabled: bool = False
    max_bytes: int = attr.ib(default=65536)

    @max_bytes.validator
    def _checkMaxBytes(self, attribute: Any, value: int) -> None:
        if value < 0:
            raise ValueError(f"statistics.max_bytes must be 0 or more, not {value!r}")


def parseStatistics(value: Any) -> Statistics:
    """
    C{true}/C{false}, or C{{enabled: true, max_bytes: 65536}}.
    """
    if isinstance(value, bool) or (isinstance(value, str) and "=" not in value):
        return Statistics(enabled=parseBoolean(value))
    return Statistics(
        **_parseSubkeys(
            value,
            {"enabled": parseBoolean, "max_bytes": parseSize},
            "true, false, or {enabled: true, max_bytes: 65536}",
        )
    )


_WEBHOOK_ACTIONS = (
    "ping",
    "neighbor",
    "connection-start",
    "connection-stop",
    "connection-info",
    "access-request",
)


def parseURL(value: Any) -> str:
    """
    An http:// or https:// URL.
    """
    result = parseText(value)
    if not re.match(r"^https?://[^/\s]+", result, re.IGNORECASE):
        raise ValueError("expected an http:// or https:// URL")
    return result


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Webhook:
    """
    The control webhook (smithproxy's protocol): events, and the
    access-request gate.  See C{docs/webhooks.md}.
    """

    url: str | None = setting(
        "webhook-url",
        None,
        parseURL,
        "Control webhook URL; setting it enables the webhook. Its path may "
        "hold a secret: it is never logged.",
        metavar="URL",
    )
    enabled: bool = setting(
        "webhook-enabled",
        True,
        parseBoolean,
        "Whether the webhook is used when a URL is set (smithproxy's enabled).",
        metavar="BOOL",
    )
    hostid: str | None = setting(
        "hostid",
        None,
        parseText,
        "The source of every webhook message; the host name by default.",
        metavar="NAME",
    )
    tls_verify: bool = setting(
        "webhook-tls-verify",
        True,
        parseBoolean,
        "Verify an https:// webhook's certificate (against the CA bundle).",
        metavar="BOOL",
    )
    ping_interval: float = setting(
        "webhook-ping-interval",
        120.0,
        parseSeconds,
        "Seconds between ping messages; the first comes this long after "
        "start, or 10 s if that is sooner.",
        metavar="SECONDS",
    )
    timeout: float = setting(
        "webhook-timeout",
        5.0,
        parseSeconds,
        "Timeout of one POST of an event.",
        metavar="SECONDS",
    )
    queue_size: int = setting(
        "webhook-queue-size",
        10000,
        parseCount,
        "Events held for sending at most; more are dropped and counted.",
        metavar="N",
    )
    retries: int = setting(
        "webhook-retries",
        3,
        parseCount,
        "Retries of a failed event POST, with exponential backoff.",
        metavar="N",
    )
    events: tuple[str, ...] = setting(
        "webhook-events",
        (),
        parseChoice(*_WEBHOOK_ACTIONS),
        "Limit the events sent to these actions (repeatable); all by default.",
        repeatable=True,
        metavar="ACTION",
    )
    access_request: Gate = setting(
        "webhook-access-request",
        Gate(),
        parseGate,
        "The access-request gate: {enabled, timeout, on_error: accept|reject}; "
        "flag enabled=true,timeout=5,on_error=reject.",
        metavar="SETTINGS",
    )
    statistics: Statistics = setting(
        "webhook-statistics",
        Statistics(),
        parseStatistics,
        "Per-connection statistics in connection-info: true, or "
        "{enabled: true, max_bytes: 65536}.",
        metavar="SETTINGS",
    )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class AccessLog:
    """
    Where and how the access log is written.
    """

    file: str = setting(
        "access-log",
        "-",
        parseText,
        "File the access log is appended to; '-' is standard output, "
        "'none' turns it off.",
        metavar="PATH",
    )
    format: str = setting(
        "access-log-format",
        "text",
        parseChoice("text", "json"),
        "Access log format: text (key=value) or json (one object a line).",
        metavar="text|json",
    )
    decision_log: str | None = setting(
        "decision-log",
        None,
        parseText,
        "Where CANONICAL-PROXY-DECISION and CANONICAL-PROXY-CN-CLOSE lines go "
        "(a path, - for standard output, or none), in access_log.format; by "
        "default, the process log.",
        metavar="PATH",
    )
    request_id_header: str = setting(
        "request-id-header",
        "Request-ID",
        parseHeaderName,
        "Header carrying the request id: a well-formed incoming value is "
        "kept, else one is made; it is passed upstream and returned to the "
        "client.",
        metavar="NAME",
    )
    log_query_values: bool = setting(
        "log-query-values",
        False,
        parseBoolean,
        "Write query-string values and fragments of request targets as the "
        "client sent them in the logs and the webhook's connection-stop "
        "details; by default each value is written as … and names are "
        "kept (see docs/observability.md). Userinfo is never written.",
        metavar="BOOL",
    )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Destinations:
    """
    Where the proxy may connect, beyond the built-in address policy, and
    how names are resolved.  See C{docs/security.md} for the precedence.
    """

    allow_ranges: tuple[str, ...] = setting(
        "allow-range",
        (),
        parseText,
        "Allow destination addresses in this CIDR range, even if the "
        "built-in policy denies them (repeatable).",
        repeatable=True,
        metavar="CIDR",
    )
    deny_ranges: tuple[str, ...] = setting(
        "deny-range",
        (),
        parseText,
        "Deny destination addresses in this CIDR range (repeatable).",
        repeatable=True,
        metavar="CIDR",
    )
    allow_addresses: tuple[str, ...] = setting(
        "allow-address",
        (),
        parseText,
        "Allow this destination address, optionally only on one port: "
        "IP, IP:PORT or [IPv6]:PORT (repeatable).",
        repeatable=True,
        metavar="IP[:PORT]",
    )
    deny_addresses: tuple[str, ...] = setting(
        "deny-address",
        (),
        parseText,
        "Deny this destination address, optionally only on one port (repeatable).",
        repeatable=True,
        metavar="IP[:PORT]",
    )
    allow_ports: tuple[str, ...] = setting(
        "allow-port",
        (),
        parsePorts,
        "Connect only to these destination ports (comma-separated or "
        "repeatable: 80,443,8000-8100), for forwarded requests and CONNECT "
        "alike, before any lookup; all ports by default.",
        repeatable=True,
        metavar="PORT[-PORT]",
        commas=True,
    )
    deny_ports: tuple[str, ...] = setting(
        "deny-port",
        (),
        parsePorts,
        "Never connect to these destination ports (as --allow-port); a "
        "denied port beats an allowed one.",
        repeatable=True,
        metavar="PORT[-PORT]",
        commas=True,
    )
    allow_hosts: tuple[str, ...] = setting(
        "allow-host",
        (),
        parseAllowedHost,
        "Let this name reach the private ranges (RFC 1918, unique local "
        "IPv6) that the built-in policy denies: NAME or *.SUFFIX, optionally "
        "with :PORT (comma-separated or repeatable); never loopback, "
        "link-local, CGNAT, cloud metadata or the proxy's own addresses.",
        repeatable=True,
        metavar="HOST[:PORT]",
        commas=True,
    )
    bind_addresses: tuple[str, ...] = setting(
        "bind-address",
        (),
        parseIPAddress,
        "Local address outbound connections are made from, for a fixed "
        "egress address (repeatable: one IPv4 and one IPv6); the kernel "
        "chooses by default.",
        repeatable=True,
        metavar="IP",
    )
    dns_cache_ttl: float = setting(
        "dns-cache-ttl",
        30.0,
        parseSecondsOrZero,
        "Longest time a vetted DNS answer is reused for the same host and "
        "port (never longer than the records' TTL when --nameserver gives "
        "it); 0 resolves for every request.",
        metavar="SECONDS",
    )
    nameservers: tuple[str, ...] = setting(
        "nameserver",
        (),
        parseText,
        "Resolve destinations with this DNS server (HOST[:PORT], "
        "repeatable) instead of the system resolver.",
        repeatable=True,
        metavar="HOST[:PORT]",
    )


def parseParentProxy(value: Any) -> str:
    """
    A parent proxy URL, C{http://[USER:PASS@]HOST:PORT} or C{https://...}.
    """
    # Imported here: the parser lives beside the code that uses the value,
    # and this module imports no other of the proxy's.
    from proxy_app.parent import parseParentURL

    result = parseText(value)
    parseParentURL(result)
    return result


def parseBypassEntry(value: Any) -> str:
    """
    A host name, C{*.} glob, address or CIDR range.
    """
    # Imported here: the parser lives beside the code that uses the value,
    # and this module imports no other of the proxy's.
    from proxy_app.parent import Bypass

    result = parseText(value)
    try:
        Bypass.parse((result,))
    except ValueError:
        raise ValueError(
            "expected a host name, *.glob, address or CIDR range"
        ) from None
    return result


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Upstream:
    """
    A parent proxy that outbound connections are tunnelled through, after
    the destination is vetted here.  See C{docs/security.md}.
    """

    proxy: str | None = setting(
        "upstream-proxy",
        None,
        parseParentProxy,
        "Parent proxy to tunnel every outbound connection through, "
        "http://[USER:PASS@]HOST:PORT or https://... (verified with the "
        "trust root of tls); it is asked for the vetted address, never the "
        "name. Credentials are sent as Proxy-Authorization and never logged.",
        metavar="URL",
    )
    no_proxy: tuple[str, ...] = setting(
        "no-upstream-proxy",
        (),
        parseBypassEntry,
        "Destinations reached directly, not through the parent proxy "
        "(repeatable): a host name, a *.example.com glob, or an address or "
        "CIDR range matching the vetted address.",
        repeatable=True,
        metavar="HOST|*.DOMAIN|CIDR",
    )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ACLSettings:
    """
    Per-role access control with Smokescreen's v1 ACL files.  See
    C{docs/access-control.md}.
    """

    file: str | None = setting(
        "acl",
        None,
        parseText,
        "Smokescreen v1 ACL file deciding which hosts each role may reach; "
        "re-read on SIGHUP. No ACL: every role is allowed (the address "
        "policy still applies).",
        metavar="PATH",
    )
    allow_missing_role: bool = setting(
        "allow-missing-role",
        False,
        parseBoolean,
        "Judge requests without a role by the ACL's default rule instead of "
        "denying them (Smokescreen's YAML key allow_missing_role).",
        metavar="BOOL",
    )
    watch_interval: float = setting(
        "watch-interval",
        0.0,
        parseSecondsOrZero,
        "Check the files SIGHUP reloads (ACL, passwords, TLS listener "
        "certificates, keys, client CAs and CRLs, origination's client "
        "certificates, the configuration file for its destination rules) "
        "this often and reload, as on SIGHUP, when one changes "
        "or is replaced (as Kubernetes updates a mounted ConfigMap or Secret); "
        "0: only on SIGHUP.",
        metavar="SECONDS",
    )
    role_header: str | None = setting(
        "role-header",
        None,
        parseHeaderName,
        "DANGEROUS: trust the role named in this request header (for a "
        "trusted sidecar in front of the proxy); the header is stripped.",
        metavar="NAME",
    )
    report_only: bool = setting(
        "report-only",
        False,
        parseBoolean,
        "Let requests the ACL denies through, logged as would-deny decisions "
        "(enforce_would_deny, report_only) and counted as report, to roll out "
        "a new ACL, as a rule with action report does for one role; the address "
        "policy, port rules, authentication and the gate still refuse.",
        metavar="BOOL",
    )
    deny_message_extra: str | None = setting(
        "deny-message-extra",
        None,
        parseDenyMessage,
        "Text appended, on a line of its own, to the body of every 403 the "
        "proxy makes, e.g. where to ask for access (Smokescreen's "
        "--additional-error-message-on-deny); not added to X-WhSentry-Reason.",
        metavar="TEXT",
    )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Auth:
    """
    Proxy authentication with Proxy-Authorization: Basic.
    """

    checkers: tuple[str, ...] = setting(
        "auth",
        (),
        parseText,
        "Credentials checker (repeatable): twisted.cred strcred strings "
        "such as file:PATH or memory:USER:PASS, or htpasswd:PATH for bcrypt "
        "htpasswd files; files are re-read on SIGHUP. None: no proxy auth.",
        repeatable=True,
        metavar="STRCRED",
    )
    failures_per_minute: int = setting(
        "auth-failures-per-minute",
        10,
        parseCount,
        "Failed password checks allowed per client address (per /64 for "
        "IPv6) at once and then per minute; beyond them its attempts get 429 "
        "without a check, except credentials that recently succeeded. 0: no "
        "limit.",
        metavar="N",
    )
    check_threads: int = setting(
        "auth-check-threads",
        2,
        parsePositive,
        "Threads that check passwords (bcrypt), apart from the threads "
        "resolving names; 8 checks per thread may wait, more get 503.",
        metavar="N",
    )


def parseDenyStatus(value: Any) -> int:
    """
    The status of a denial: 403, or 407 as Smokescreen answers.
    """
    text = str(value).strip()
    if isinstance(value, bool) or text not in ("403", "407"):
        raise ValueError("expected 403 or 407")
    return int(text)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Compat:
    """
    Another proxy's wire behaviour, for clients that depend on it while
    they move over.  All off by default.  See C{docs/migrating.md}.
    """

    smokescreen_error_header: bool = setting(
        "smokescreen-error-header",
        False,
        parseBoolean,
        "Add Smokescreen's X-Smokescreen-Error header, the body's text on "
        "one line, to every response the proxy makes itself, and strip it "
        "from origins' responses, as Smokescreen does.",
        metavar="BOOL",
    )
    deny_status: int = setting(
        "deny-status",
        403,
        parseDenyStatus,
        "Status of every denial the proxy makes (the 403s: reason codes "
        "1000, 1011, 1012, 1016, 1017): 403, or 407 as Smokescreen answers "
        "its denials (without Proxy-Authenticate, as Smokescreen); reason "
        "codes and headers stay.",
        metavar="403|407",
    )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Config:
    """
    The whole configuration.  Fields made by L{setting} are top-level keys;
    fields holding attrs classes are YAML sections.
    """

    listen: tuple[str | TLSListener, ...] = setting(
        "listen",
        ("tcp:9090:interface=127.0.0.1",),
        parseEndpoint,
        "Endpoint the proxy listens on (repeatable), e.g. "
        "tcp:9090:interface=127.0.0.1, tcp6:9090:interface=\\:\\:1, or a TLS "
        "listener asking for client certificates: "
        "mtls:9443:cert=PATH:key=PATH:client_ca=PATH (see docs/tls.md).",
        repeatable=True,
        metavar="ENDPOINT",
    )
    workers: int = setting(
        "workers",
        1,
        parseWorkers,
        "Processes sharing the listening ports (SO_REUSEPORT), or auto for "
        "one per CPU; each enforces its share of the rate and concurrency "
        "limits, and the supervisor serves the metrics of all of them.",
        metavar="N|auto",
    )
    metrics: str | None = setting(
        "metrics",
        "tcp:2112:interface=127.0.0.1",
        parseOptionalEndpoint,
        "Endpoint serving Prometheus /metrics and /healthcheck, or none.",
        metavar="ENDPOINT|none",
    )
    listen_backlog: int = setting(
        "listen-backlog",
        1024,
        parseBacklog,
        "Connections the kernel queues on each proxy listener before the "
        "proxy accepts them (listen(2)'s backlog; the kernel caps it at "
        "net.core.somaxconn). A backlog= in a listen description wins.",
        metavar="N",
    )
    log_format: str = setting(
        "log-format",
        "text",
        parseChoice("text", "json"),
        "Process log format under twistd: text, or json (one JSON object a "
        "line, twisted.logger's event with its fields) to standard output or "
        "twistd's --logfile.",
        metavar="text|json",
    )
    timeouts: Timeouts = attr.ib(factory=Timeouts)
    limits: Limits = attr.ib(factory=Limits)
    destinations: Destinations = attr.ib(factory=Destinations)
    upstream: Upstream = attr.ib(factory=Upstream)
    tls: TLS = attr.ib(factory=TLS)
    mitm: Mitm = attr.ib(factory=Mitm)
    acl: ACLSettings = attr.ib(factory=ACLSettings)
    auth: Auth = attr.ib(factory=Auth)
    webhook: Webhook = attr.ib(factory=Webhook)
    access_log: AccessLog = attr.ib(factory=AccessLog)
    compat: Compat = attr.ib(factory=Compat)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Field:
    """
    One configuration field, located in the tree.

    @ivar section: the YAML section, or C{None} for a top-level key.
    @ivar name: the attrs field name, which is the YAML key.
    """

    section: str | None
    name: str
    setting: Setting
    default: Any

    @property
    def key(self) -> str:
        return self.name if self.section is None else f"{self.section}.{self.name}"


def _sections() -> Iterator[tuple[str, type]]:
    """
    The YAML sections: the fields of L{Config} whose default is a factory
    of another attrs class.
    """
    for a in attr.fields(Config):
        default: Any = a.default
        if isinstance(default, attr.Factory) and attr.has(default.factory):  # type: ignore[arg-type]
            yield a.name, default.factory


def fields() -> list[Field]:
    """
    Every configuration field, top-level ones first, in declaration order.
    """
    result = []
    for a in attr.fields(Config):
        if _SETTING in a.metadata:
            result.append(Field(None, a.name, a.metadata[_SETTING], a.default))
    for sectionName, cls in _sections():
        for a in attr.fields(cls):
            result.append(Field(sectionName, a.name, a.metadata[_SETTING], a.default))
    return result


def _parseOne(field: Field, raw: Any, source: str) -> Any:
    setting = field.setting
    try:
        if setting.repeatable:
            if isinstance(raw, str):
                items: Iterable[Any] = [p for p in raw.split(",") if p.strip()]
            elif isinstance(raw, (list, tuple)):
                items = raw
                if setting.commas:
                    items = [
                        part
                        for item in raw
                        for part in (
                            item.split(",") if isinstance(item, str) else (item,)
                        )
                        if not isinstance(part, str) or part.strip()
                    ]
            else:
                raise ValueError("expected a list")
            return tuple(setting.parse(item) for item in items)
        return setting.parse(raw)
    except ValueError as e:
        raise ConfigError(f"{source} = {_withoutUserinfo(raw)!r}: {e}") from None


def _withoutUserinfo(raw: Any) -> Any:
    """
    C{raw} with any URL's user information (upstream.proxy's password)
    replaced by C{…}: an error message is printed, and may be logged.
    """
    if isinstance(raw, str) and "@" in raw:
        return re.sub(r"(://)[^/@\s]*@", "\\1\u2026@", raw)
    return raw


def _flagSource(field: Field) -> str:
    return f"--{field.setting.flag}"


def loadFile(path: str) -> dict[str, Any]:
    """
    Read a YAML configuration file into a mapping, or raise L{ConfigError}.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(
            f"--config = {path!r}: cannot read it: {e.strerror}"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            f"--config = {path!r}: not valid YAML{where}: {problem}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"--config = {path!r}: expected a mapping of sections at the top"
        )
    return data


# Sections that may be written as their main value alone in YAML.
_SHORTHAND = {"acl": "file", "auth": "checkers", "webhook": "url"}


def _fileValues(data: Mapping[str, Any], path: str) -> dict[str, Any]:
    """
    Flatten a loaded YAML mapping to C{{key: value}}, refusing unknown keys.
    """
    byKey = {f.key: f for f in fields()}
    sections = {name for name, _ in _sections()}
    result: dict[str, Any] = {}
    for name, value in data.items():
        if name in sections:
            if value is None:
                continue
            if not isinstance(value, dict) and name in _SHORTHAND:
                # acl: PATH, auth: [SPEC, ...], webhook: URL
                value = {_SHORTHAND[name]: value}
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{name} in {path}: expected a mapping of keys, got {value!r}"
                )
            for sub, subValue in value.items():
                key = f"{name}.{sub}"
                if key not in byKey:
                    raise ConfigError(
                        f"{key} in {path}: unknown key; known keys in {name}: "
                        + ", ".join(
                            sorted(
                                k.split(".", 1)[1]
                                for k in byKey
                                if k.startswith(name + ".")
                            )
                        )
                    )
                result[key] = subValue
        elif name in byKey:
            result[name] = value
        else:
            raise ConfigError(
                f"{name} in {path}: unknown key; known top-level keys: "
                + ", ".join(sorted({k.split(".")[0] for k in byKey}))
            )
    return result


def load(
    flags: Mapping[str, Any],
    environ: Mapping[str, str] = os.environ,
    configPath: str | None = None,
) -> Config:
    """
    Merge flags, environment and file into a L{Config}.

    @param flags: option values given on the command line, keyed by flag
        name without C{--}; a value of C{None} (or an empty list for a
        repeatable flag) means not given.
    @param environ: the environment to read C{EGRESSPROXY_*} from.
    @param configPath: the YAML file, if any.  When it is C{None} the
        environment's C{EGRESSPROXY_CONFIG} is used.

    @raise ConfigError: for any value that cannot be used.
    """
    if configPath is None:
        configPath = environ.get(ENV_PREFIX + "CONFIG") or None
    fileValues = _fileValues(loadFile(configPath), configPath) if configPath else {}

    values: dict[str | None, dict[str, Any]] = {}
    for field in fields():
        s = field.setting
        flagValue = flags.get(s.flag)
        if flagValue not in (None, [], ()):
            value = _parseOne(field, flagValue, _flagSource(field))
        elif environ.get(s.envvar, "").strip():
            value = _parseOne(field, environ[s.envvar], s.envvar)
        elif fileValues.get(field.key) is not None:
            # An empty YAML value (key: or key: null) leaves the default.
            value = _parseOne(
                field, fileValues[field.key], f"{field.key} in {configPath}"
            )
        else:
            continue
        values.setdefault(field.section, {})[field.name] = value

    sections = {name: cls(**values.get(name, {})) for name, cls in _sections()}
    return Config(**values.get(None, {}), **sections)


def referenceTable() -> str:
    """
    The Markdown table of every setting, as C{docs/configuration.md} shows
    it (a test keeps the two identical).
    """
    lines = [
        "| key | flag | environment variable | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for field in fields():
        default = field.default
        if default is None or default == ():
            shown = "(none)"
        elif isinstance(default, tuple):
            shown = ", ".join(default)
        elif attr.has(type(default)):
            shown = ", ".join(f"{k}: {v}" for k, v in attr.asdict(default).items())
        else:
            shown = str(default)
        doc = field.setting.doc.replace("|", "\\|")
        switch = field.setting.parse is parseBoolean and field.default is False
        flag = (
            f"--{field.setting.flag}"
            if switch
            else f"--{field.setting.flag} {field.setting.metavar}"
        )
        lines.append(
            f"| `{field.key}` | `{flag}` "
            f"| `{field.setting.envvar}` | `{shown}` | {doc} |"
        )
    return "\n".join(lines) + "\n"
