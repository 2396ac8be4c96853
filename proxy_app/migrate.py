"""
C{egressproxy-migrate}: turn a Smokescreen or webhook-sentry configuration
into an egressproxy YAML file.

Each tool's settings are one table (L{SMOKESCREEN}, L{WEBHOOK_SENTRY}) with
one L{Row} per setting, so that each setting's fate (mapped, the same
without a key, left out) is read in one place; the docs'
mapping tables in C{docs/configuration.md} say the same, and a test keeps
every row's source key in them.

The output names, in a comment on each key, the setting it came from, and
states in comments where egressproxy behaves differently.  What cannot be
carried over is listed on standard error, one line a setting; the exit
status is then 1, unless C{--allow-partial}.  Input that the tool itself
would refuse (an unknown key or flag, a malformed value) is exit status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO

import attr
import yaml

from proxy_app import config as configModule


class InputError(Exception):
    """
    The input is not a configuration the other tool would accept.
    """


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Entry:
    """
    One egressproxy key in the output.

    @ivar key: the dotted egressproxy key (C{timeouts.connect}).
    @ivar source: where it came from, as a comment names it.
    @ivar notes: behaviour differences, written as comments above it.
    """

    key: str
    value: Any
    source: str
    notes: tuple[str, ...] = ()


@attr.s(slots=True, auto_attribs=True)
class Conversion:
    """
    What a conversion produced: the keys, what was left out, the notes for
    the whole file, and the values of settings that are combined into one
    key (a listener from an address, a port and certificates).
    """

    tool: str
    sources: list[str]
    entries: list[Entry] = attr.ib(factory=list)
    leftOut: list[str] = attr.ib(factory=list)
    notes: list[str] = attr.ib(factory=list)
    parts: dict[str, tuple[Any, str]] = attr.ib(factory=dict)

    def add(self, key: str, value: Any, source: str, *notes: str) -> None:
        self.entries.append(Entry(key, value, source, notes))

    def leave(self, source: str, why: str) -> None:
        self.leftOut.append(f"{source}: {why}")


# A row's action: given the value and its source label, add entries, leave
# the setting out, or keep it for a later combining step.
Action = Callable[[Conversion, Any, str], None]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Row:
    """
    One setting of another tool, and its fate here.

    @ivar yaml: its key in the tool's YAML file (dotted when nested), or
        L{None} when it is only a flag.
    @ivar flag: its command-line flag without dashes, or L{None}.
    @ivar fate: C{"mapped"}, C{"same"} (egressproxy does this without a
        key) or C{"left out"}; what the docs say.
    @ivar target: the egressproxy key(s) it maps to, for the docs.
    @ivar action: what a value of it does to a L{Conversion}.
    @ivar kind: how a flag takes its value: C{"value"}, C{"bool"} (no
        value) or C{"list"} (repeatable).
    """

    yaml: str | None
    flag: str | None
    fate: str
    target: str
    action: Action
    kind: str = "value"


# Value parsers.  Go writes durations as 1h2m3.5s; YAML numbers given for a
# time.Duration are nanoseconds, as yaml.v2 and viper read them.

_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|ms|s|m|h)")
_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def goDuration(value: Any) -> float:
    """
    Seconds in a Go duration (C{"1m30s"}, C{"500ms"}), or in a number of
    nanoseconds.
    """
    if isinstance(value, bool):
        raise InputError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        return float(value) / 1e9
    text = str(value).strip()
    if text in ("0", ""):
        return 0.0
    if re.fullmatch(r"\d+", text):
        return int(text) / 1e9
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise InputError(f"{value!r} is not a duration such as 10s or 1m30s")
    return sum(float(n) * _GO_UNITS[u] for n, u in parts)


def _seconds(value: float) -> int | float:
    return int(value) if value == int(value) else round(value, 9)


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "t", "1"):
        return True
    if text in ("false", "f", "0", ""):
        return False
    raise InputError(f"{value!r} is not true or false")


def _list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{value!r} is not a number") from None


def _count(value: Any) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise InputError(f"{value!r} is not a whole number") from None


# Actions.


def mapTo(key: str, convert: Callable[[Any], Any] = lambda v: v, *notes: str) -> Action:
    """
    The setting is C{key}, its value converted.
    """

    def action(c: Conversion, value: Any, source: str) -> None:
        c.add(key, convert(value), source, *notes)

    return action


def duration(key: str, *notes: str) -> Action:
    """
    The setting is the duration C{key}; 0 (Go's "none") leaves it out of
    the output, so that egressproxy's default applies, with a note.
    """

    def action(c: Conversion, value: Any, source: str) -> None:
        seconds = goDuration(value)
        if seconds <= 0:
            c.notes.append(
                f"{source} is 0 (no limit); {key} keeps egressproxy's default, "
                "which is a limit."
            )
            return
        c.add(key, _seconds(seconds), f"{source} = {value}", *notes)

    return action


def count(key: str, *notes: str) -> Action:
    """
    The setting is the whole number C{key}.
    """
    return mapTo(key, _count, *notes)


def leaveOut(why: str) -> Action:
    """
    The setting has no egressproxy equivalent: C{why}.
    """

    def action(c: Conversion, value: Any, source: str) -> None:
        c.leave(source, why)

    return action


def leaveOutIfTrue(why: str) -> Action:
    """
    A switch: off is egressproxy's behaviour; on has no equivalent.
    """

    def action(c: Conversion, value: Any, source: str) -> None:
        if _boolean(value):
            c.leave(source, why)

    return action


def mitmIssuer(key: str, *notes: str) -> Action:
    """
    webhook-sentry's MITM issuer: with it, webhook-sentry intercepts every
    CONNECT (without it, it refuses them), so the issuer becomes C{key} and
    C{mitm.all} is set.
    """

    def action(c: Conversion, value: Any, source: str) -> None:
        c.add(key, str(value), source, *notes)
        if key == "mitm.ca_cert":
            c.add(
                "mitm.all",
                True,
                source,
                "webhook-sentry intercepts every CONNECT tunnel when its "
                "issuer is set; mitm.all does the same here.",
            )

    return action


def part(name: str, convert: Callable[[Any], Any] = lambda v: v) -> Action:
    """
    Keep the value for a step that combines several settings into one key.
    """

    def action(c: Conversion, value: Any, source: str) -> None:
        c.parts[name] = (convert(value), source)

    return action


def ignore(c: Conversion, value: Any, source: str) -> None:
    """
    Not a setting (C{--help}, C{--config-file}).
    """


# Smokescreen.

_RATE_NOTE = (
    "Smokescreen's max_request_rate is one budget for the whole proxy; "
    "egressproxy's is per role (anonymous clients share one), so with N "
    "roles up to N times this rate gets through. Past it both answer 429 "
    "with Retry-After."
)
_TUNNEL_NOTE = (
    "Past the limit Smokescreen answers 429, egressproxy 503 (reason code "
    "1014), both with Retry-After."
)
_CONCURRENCY_NOTE = (
    "Smokescreen counts every request, a CONNECT until its tunnel is up; "
    "egressproxy counts forwarded requests here and tunnels in "
    "max_concurrent_tunnels."
)

SMOKESCREEN: tuple[Row, ...] = (
    Row(None, "help", "same", "", ignore, "bool"),
    Row(None, "config-file", "same", "(read by the tool)", ignore),
    Row("ip", "listen-ip", "mapped", "listen", part("ip")),
    Row("port", "listen-port", "mapped", "listen", part("port", _count)),
    Row("network", None, "mapped", "(none: ip is the default)", part("network")),
    Row(
        "tls.cert_file",
        "tls-server-bundle-file",
        "mapped",
        "listen[].cert",
        part("cert"),
    ),
    Row("tls.key_file", None, "mapped", "listen[].key", part("key")),
    Row(
        "tls.client_ca_files",
        "tls-client-ca-file",
        "mapped",
        "listen[].client_ca",
        part("client_ca", _list),
        "list",
    ),
    Row(
        "tls.crl_files",
        "tls-crl-file",
        "mapped",
        "listen[].crl",
        part("crl", _list),
        "list",
    ),
    Row(
        "support_proxy_protocol",
        "proxy-protocol",
        "left out",
        "(none)",
        leaveOutIfTrue(
            "read client addresses from a PROXY protocol header; egressproxy "
            "does not: run it where it sees clients' own addresses (auth "
            "limits, logs and the webhook use them)"
        ),
        "bool",
    ),
    Row(
        "connect_timeout",
        "timeout",
        "mapped",
        "timeouts.connect",
        duration("timeouts.connect"),
    ),
    Row(
        "dns_timeout", "dns-timeout", "mapped", "timeouts.dns", duration("timeouts.dns")
    ),
    Row(
        "idle_timeout",
        None,
        "mapped",
        "timeouts.read",
        duration(
            "timeouts.read",
            "Smokescreen's idle_timeout closes idle connections, tunnels "
            "included; timeouts.read is how long a destination may stay "
            "silent.",
        ),
    ),
    Row(
        "exit_timeout",
        None,
        "mapped",
        "timeouts.drain",
        duration("timeouts.drain"),
    ),
    Row(
        "read_header_timeout",
        None,
        "mapped",
        "timeouts.request_header",
        duration("timeouts.request_header"),
    ),
    Row(
        "read_timeout",
        None,
        "left out",
        "(none)",
        leaveOut(
            "bounded reading a whole client request, body included; "
            "egressproxy bounds the request head (timeouts.request_header), "
            "silence (timeouts.read) and the whole exchange (timeouts.lifetime)"
        ),
    ),
    Row(
        "write_timeout",
        None,
        "left out",
        "(none)",
        leaveOut(
            "bounded writing a response to the client; egressproxy bounds the "
            "whole exchange with timeouts.lifetime"
        ),
    ),
    Row(
        "deny_ranges",
        "deny-range",
        "mapped",
        "destinations.deny_ranges",
        mapTo("destinations.deny_ranges", _list),
        "list",
    ),
    Row(
        "allow_ranges",
        "allow-range",
        "mapped",
        "destinations.allow_ranges",
        mapTo(
            "destinations.allow_ranges",
            _list,
            "Smokescreen and egressproxy order allow and deny rules "
            "differently: see docs/security.md.",
        ),
        "list",
    ),
    Row(
        "deny_addresses",
        "deny-address",
        "mapped",
        "destinations.deny_addresses",
        mapTo("destinations.deny_addresses", _list),
        "list",
    ),
    Row(
        "allow_addresses",
        "allow-address",
        "mapped",
        "destinations.allow_addresses",
        mapTo("destinations.allow_addresses", _list),
        "list",
    ),
    Row(
        "resolver_addresses",
        "resolver-address",
        "mapped",
        "destinations.nameservers",
        mapTo("destinations.nameservers", _list),
        "list",
    ),
    Row(
        "unsafe_allow_private_ranges",
        "unsafe-allow-private-ranges",
        "left out",
        "(none)",
        leaveOutIfTrue(
            "allowed every private range; egressproxy has no such switch on "
            "purpose: list what must be reached in destinations.allow_ranges, "
            "or names in destinations.allow_hosts"
        ),
        "bool",
    ),
    Row("acl_file", "egress-acl-file", "mapped", "acl.file", mapTo("acl.file")),
    Row(
        "allow_missing_role",
        None,
        "mapped",
        "acl.allow_missing_role",
        mapTo("acl.allow_missing_role", _boolean),
    ),
    Row(
        "deny_message_extra",
        "additional-error-message-on-deny",
        "mapped",
        "acl.deny_message_extra",
        mapTo("acl.deny_message_extra", str),
    ),
    Row(
        None,
        "disable-acl-policy-action",
        "left out",
        "(none)",
        leaveOut(
            "refused to load an ACL with a rule using the named action; "
            "egressproxy loads every action: check the ACL before deploying it "
            "(acl.report_only is a different thing: denials logged, not made)"
        ),
        "list",
    ),
    Row(
        "statsd_address",
        "statsd-address",
        "left out",
        "(none)",
        leaveOut(
            "sent metrics to statsd; egressproxy serves Prometheus metrics "
            "only (metrics): scrape them, or bridge them to statsd"
        ),
    ),
    Row(
        None,
        "expose-prometheus-metrics",
        "mapped",
        "metrics",
        part("prom", _boolean),
        "bool",
    ),
    Row(None, "prometheus-endpoint", "mapped", "metrics", part("prom_path")),
    Row(None, "prometheus-listen-ip", "mapped", "metrics", part("prom_ip")),
    Row(None, "prometheus-port", "mapped", "metrics", part("prom_port", _count)),
    Row(
        "stats_socket_dir",
        "stats-socket-dir",
        "left out",
        "(none)",
        leaveOut(
            "served connection tracking on a Unix socket; egressproxy reports "
            "open tunnels in its metrics (egressproxy_active_tunnels) and each "
            "connection in the control webhook's connection-info events"
        ),
    ),
    Row(
        "stats_socket_file_mode",
        "stats-socket-file-mode",
        "left out",
        "(none)",
        leaveOut(
            "the mode of the connection-tracking socket, which egressproxy has not"
        ),
    ),
    Row(
        "transport_max_idle_conns",
        None,
        "left out",
        "(none)",
        leaveOut(
            "sized the pool of idle origin connections; egressproxy's pool is "
            "bounded by time (timeouts.read, timeouts.lifetime), not count"
        ),
    ),
    Row(
        "transport_max_idle_conns_per_host",
        None,
        "left out",
        "(none)",
        leaveOut(
            "sized the pool per host; egressproxy's pool is bounded by time "
            "(timeouts.read, timeouts.lifetime), not count"
        ),
    ),
    Row("time_connect", None, "same", "(always on)", ignore),
    Row(None, "upstream-http-proxy-addr", "mapped", "upstream.proxy", part("up_http")),
    Row(
        None, "upstream-https-proxy-addr", "mapped", "upstream.proxy", part("up_https")
    ),
    Row(
        "max_concurrent_requests",
        "max-concurrent-requests",
        "mapped",
        "limits.max_concurrent_requests",
        count("limits.max_concurrent_requests", _CONCURRENCY_NOTE),
    ),
    Row(
        "max_request_rate",
        "max-request-rate",
        "mapped",
        "limits.max_request_rate",
        part("rate", _number),
    ),
    Row(
        "max_request_burst",
        "max-request-burst",
        "mapped",
        "limits.request_burst",
        part("burst", _count),
    ),
    Row(
        "max_concurrent_connect_tunnels",
        "max-concurrent-connect-tunnels",
        "mapped",
        "limits.max_concurrent_tunnels",
        count("limits.max_concurrent_tunnels", _TUNNEL_NOTE),
    ),
    Row(
        "mitm_ca_cert_file",
        None,
        "mapped",
        "mitm.ca_cert",
        mapTo(
            "mitm.ca_cert",
            str,
            "Smokescreen intercepts only the ACL's mitm_domains; the same "
            "ACL file selects the same tunnels here.",
        ),
    ),
    Row(
        "mitm_ca_key_file",
        None,
        "mapped",
        "mitm.ca_key",
        mapTo("mitm.ca_key", str),
    ),
)


def _listenDescription(ip: str, port: int) -> str:
    """
    A Twisted endpoint description for an address and port (all IPv4
    interfaces when C{ip} is empty, as Go's C{:PORT} listens on both
    families there; see the note the callers add).
    """
    if not ip:
        return f"tcp:{port}"
    try:
        version = ipaddress.ip_address(ip).version
    except ValueError:
        raise InputError(f"{ip!r} is not an IP address") from None
    if version == 6:
        return f"tcp6:{port}:interface=" + ip.replace(":", "\\:")
    return f"tcp:{port}:interface={ip}"


_ALL_INTERFACES = (
    "Listening on every IPv4 interface, as {tool} did on every interface "
    "(add tcp6:{port} for IPv6 clients); narrow it to the interface clients "
    "use (e.g. tcp:{port}:interface=10.0.0.5)."
)


def _finishSmokescreen(c: Conversion) -> None:
    parts = c.parts
    ip, ipSource = parts.get("ip", ("", "Smokescreen's default (every interface)"))
    port, portSource = parts.get("port", (4750, "Smokescreen's default port"))
    if not 0 <= port < 65536:
        raise InputError(f"{portSource}: {port} is not a port")
    network = parts.get("network", ("ip", ""))[0]
    if network not in ("ip", "ip4", "ip6"):
        raise InputError(f"network: {network!r} is not ip, ip4 or ip6")
    if network != "ip":
        c.leave(
            parts["network"][1],
            f"resolved and connected over {network} only; egressproxy uses "
            "both families (limit them with destinations.deny_ranges: "
            "[::/0] or [0.0.0.0/0])",
        )
    source = f"{ipSource}, {portSource}"
    notes = [] if ip else [_ALL_INTERFACES.format(tool="Smokescreen", port=port)]
    if "cert" in parts:
        cert, certSource = parts["cert"]
        listener: dict[str, Any] = {"port": port, "cert": cert}
        if ip:
            listener["interface"] = ip
        key, keySource = parts.get("key", (cert, f"{certSource} (a cert+key bundle)"))
        listener["key"] = key
        source += f", {certSource}, {keySource}"
        for name, ours in (("client_ca", "client_ca"), ("crl", "crl")):
            files, fileSource = parts.get(name, ([], ""))
            if len(files) == 1:
                listener[ours] = files[0]
                source += f", {fileSource}"
            elif len(files) > 1:
                c.leave(
                    fileSource,
                    f"{len(files)} files; an egressproxy listener takes one "
                    f"{ours} PEM file: concatenate them (cat {' '.join(files)} "
                    f"> {ours}.pem) and set the listener's {ours}",
                )
        if "client_ca" in listener:
            # Smokescreen verifies a client certificate if one is given, and
            # takes the role from its CN.
            listener["client_cert"] = "optional"
            listener["role_from"] = "cn"
            notes.append(
                "Clients without a certificate are let in and have no role, "
                "as in Smokescreen (tls.VerifyClientCertIfGiven); the role is "
                "the certificate's CN, as Smokescreen's."
            )
        c.add("listen", [listener], source, *notes)
    else:
        for name in ("key", "client_ca", "crl"):
            if name in parts and parts[name][0]:
                c.leave(parts[name][1], "has no effect without a server certificate")
        c.add("listen", [_listenDescription(ip, port)], source, *notes)

    if parts.get("prom", (False, ""))[0]:
        promIP, _ = parts.get("prom_ip", ("0.0.0.0", ""))
        promPort, _ = parts.get("prom_port", (9810, ""))
        path, pathSource = parts.get("prom_path", ("/metrics", ""))
        if path != "/metrics":
            c.leave(
                pathSource,
                f"served metrics at {path}; egressproxy serves them at /metrics",
            )
        notes = []
        if promIP in ("", "0.0.0.0"):
            promIP = ""
            notes.append(_ALL_INTERFACES.format(tool="Smokescreen", port=promPort))
        c.add(
            "metrics",
            _listenDescription(promIP, promPort),
            "Smokescreen --expose-prometheus-metrics, --prometheus-listen-ip, "
            "--prometheus-port (and their defaults 0.0.0.0:9810)",
            *notes,
        )
    else:
        for name in ("prom_ip", "prom_port", "prom_path"):
            if name in parts:
                c.leave(
                    parts[name][1], "has no effect without --expose-prometheus-metrics"
                )

    http, httpSource = parts.get("up_http", ("", ""))
    https, httpsSource = parts.get("up_https", ("", ""))
    if http and https and http != https:
        c.leave(
            f"{httpSource}, {httpsSource}",
            "two parent proxies, one for http:// and one for CONNECT; "
            "egressproxy has one parent for every connection (upstream.proxy)",
        )
    elif http or https:
        address = http or https
        url = address if "://" in address else "http://" + address
        c.add("upstream.proxy", url, httpSource or httpsSource)

    if "rate" in parts:
        rate, rateSource = parts["rate"]
        if rate > 0:
            c.add("limits.max_request_rate", _seconds(rate), rateSource, _RATE_NOTE)
            if "burst" in parts:
                burst, burstSource = parts["burst"]
                if 0 <= burst <= rate:
                    raise InputError(
                        f"{burstSource}: Smokescreen requires a burst above the rate"
                    )
                if burst >= 0:
                    c.add("limits.request_burst", burst, burstSource)
            else:
                c.add(
                    "limits.request_burst",
                    int(rate * 2),
                    "Smokescreen's default burst, twice max_request_rate",
                    "egressproxy's own default burst is 10; Smokescreen's is "
                    "twice the rate, kept here.",
                )
    elif "burst" in parts:
        c.leave(parts["burst"][1], "has no effect without max_request_rate")

    c.notes.extend(
        [
            "Smokescreen answers denials with 407; egressproxy with 403 and "
            "X-WhSentry-ReasonCode 1000 (address policy) or 1011 (ACL). For "
            "clients that check for 407 or X-Smokescreen-Error, set "
            "compat.deny_status: 407 and compat.smokescreen_error_header: true "
            "(docs/errors.md).",
            "Smokescreen has no limit on a response's size or a connection's "
            "life; egressproxy cuts forwarded responses over "
            "limits.max_response_body (1 MiB) and requests and tunnels after "
            "timeouts.lifetime (60 s): raise them if clients need more.",
            "Smokescreen's deny_ranges add to its built-in private ranges, as "
            "destinations.deny_ranges add to egressproxy's address policy.",
        ]
    )


# webhook-sentry.

_WS_DEFAULT_DENY = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "0.0.0.0/8",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
)


def _cidrDenyList(c: Conversion, value: Any, source: str) -> None:
    listed = _list(value)
    extra = [cidr for cidr in listed if cidr not in _WS_DEFAULT_DENY]
    omitted = [cidr for cidr in _WS_DEFAULT_DENY if cidr not in listed]
    if extra:
        c.add(
            "destinations.deny_ranges",
            extra,
            source,
            "webhook-sentry's cidrDenyList replaces its default list; "
            "destinations.deny_ranges adds to egressproxy's address policy, "
            "which already denies every range of webhook-sentry's default "
            "list (and more), so only the ranges beyond it are here.",
        )
    for cidr in omitted:
        c.leave(
            source,
            f"omits {cidr} from the default list, so webhook-sentry reached "
            "it; egressproxy's address policy still denies it: add "
            f"destinations.allow_ranges: [{cidr}] if that was meant",
        )


def _wsListener(c: Conversion, value: Any, source: str) -> None:
    if not isinstance(value, list):
        raise InputError(f"{source}: expected a list of listeners")
    c.parts["listeners"] = (value, source)


_REQUEST_ID_NOTE = (
    "Both keep a request id the client sends under this header and make one "
    "when there is none. egressproxy keeps only a well-formed id (letters, "
    "digits, ._:/+=@-, up to 128) and replaces others, where webhook-sentry "
    "kept any value; egressproxy also sends its id upstream and returns it "
    "to the client, where webhook-sentry passed only the client's on, and "
    "logged made ids (UUIDs) only."
)

WEBHOOK_SENTRY: tuple[Row, ...] = (
    Row("listener.address", "listener-address", "mapped", "listen", part("address")),
    Row("listener.type", "listener-type", "mapped", "listen", part("type")),
    Row(
        "listener.certFile",
        "listener-cert-file",
        "mapped",
        "listen[].cert",
        part("certFile"),
    ),
    Row(
        "listener.keyFile",
        "listener-key-file",
        "mapped",
        "listen[].key",
        part("keyFile"),
    ),
    Row("listeners", None, "mapped", "listen", _wsListener),
    Row(
        "connectTimeout",
        "connect-timeout",
        "mapped",
        "timeouts.connect",
        duration("timeouts.connect"),
    ),
    Row(
        "connectionLifetime",
        "connection-lifetime",
        "mapped",
        "timeouts.lifetime",
        duration("timeouts.lifetime"),
    ),
    Row(
        "readTimeout",
        "read-timeout",
        "mapped",
        "timeouts.read",
        duration("timeouts.read"),
    ),
    Row(
        "maxResponseBodySize",
        "max-response-body-size",
        "mapped",
        "limits.max_response_body",
        count("limits.max_response_body"),
    ),
    Row(
        "insecureSkipCertVerification",
        "insecure-skip-cert-verification",
        "left out",
        "(none)",
        leaveOutIfTrue(
            "accepted any destination certificate; egressproxy always verifies, "
            "deliberately: trust a private CA with tls.extra_ca instead"
        ),
        "bool",
    ),
    Row(
        "insecureSkipCidrDenyList",
        "insecure-skip-cidr-deny-list",
        "left out",
        "(none)",
        leaveOutIfTrue(
            "turned the address policy off; egressproxy's cannot be, "
            "deliberately: allow the ranges needed with destinations.allow_ranges"
        ),
        "bool",
    ),
    Row(
        "cidrDenyList",
        "cidr-deny-list",
        "mapped",
        "destinations.deny_ranges",
        _cidrDenyList,
        "list",
    ),
    Row(
        "clientCertFile",
        None,
        "mapped",
        "tls.client_cert",
        mapTo("tls.client_cert", str),
    ),
    Row(
        "clientKeyFile",
        None,
        "mapped",
        "tls.client_key",
        mapTo("tls.client_key", str),
    ),
    Row(
        "mitmIssuerCertFile",
        None,
        "mapped",
        "mitm.ca_cert, mitm.all",
        mitmIssuer("mitm.ca_cert"),
    ),
    Row(
        "mitmIssuerKeyFile",
        None,
        "mapped",
        "mitm.ca_key",
        mitmIssuer("mitm.ca_key"),
    ),
    Row(
        "accessLog.type",
        "access-log-type",
        "mapped",
        "access_log.format",
        mapTo("access_log.format", lambda v: str(v).lower()),
    ),
    Row(
        "accessLog.file",
        "access-log-file",
        "mapped",
        "access_log.file",
        mapTo("access_log.file", lambda v: str(v) or "-"),
    ),
    Row(
        "proxyLog.type",
        "proxy-log-type",
        "mapped",
        "log_format",
        mapTo("log_format", lambda v: str(v).lower()),
    ),
    Row(
        "proxyLog.file",
        "proxy-log-file",
        "left out",
        "(twistd --logfile)",
        leaveOut(
            "wrote the process log to this file; egressproxy's process log "
            "goes where twistd sends it: run twistd --logfile FILE egressproxy"
        ),
    ),
    Row("metrics.address", "metrics-address", "mapped", "metrics", part("metrics")),
    Row("metricsAddress", None, "mapped", "metrics", part("metrics")),
    Row(
        "requestIDHeader",
        None,
        "mapped",
        "access_log.request_id_header",
        mapTo("access_log.request_id_header", str, _REQUEST_ID_NOTE),
    ),
)


def _goAddress(address: str, what: str) -> tuple[str, int]:
    host, colon, port = str(address).rpartition(":")
    if not colon:
        raise InputError(f"{what}: {address!r} is not HOST:PORT or :PORT")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise InputError(f"{what}: {address!r} has no port number") from None


def _finishWebhookSentry(c: Conversion) -> None:
    parts = c.parts
    if "listeners" in parts:
        raw, source = parts["listeners"]
        listeners = []
        for item in raw:
            if not isinstance(item, Mapping):
                raise InputError(f"{source}: a listener is a mapping")
            listeners.append({str(k).lower(): v for k, v in item.items()})
        sourceOf = [source] * len(listeners)
    else:
        single: dict[str, Any] = {"address": ":9090", "type": "http"}
        sourceOf = ["webhook-sentry's default listener :9090"]
        names = {
            "address": "address",
            "type": "type",
            "certFile": "certfile",
            "keyFile": "keyfile",
        }
        for name, key in names.items():
            if name in parts:
                single[key] = parts[name][0]
                sourceOf = [", ".join(parts[n][1] for n in names if n in parts)]
        listeners = [single]
    out: list[Any] = []
    notes: list[str] = []
    for spec, source in zip(listeners, sourceOf, strict=True):
        host, port = _goAddress(spec.get("address", ":9090"), source)
        kind = str(spec.get("type", "http")).lower()
        if not host:
            notes.append(_ALL_INTERFACES.format(tool="webhook-sentry", port=port))
        if kind == "https":
            if not spec.get("certfile") or not spec.get("keyfile"):
                raise InputError(
                    f"{source}: an https listener needs certFile and keyFile"
                )
            listener: dict[str, Any] = {
                "port": port,
                "cert": str(spec["certfile"]),
                "key": str(spec["keyfile"]),
            }
            if host:
                listener["interface"] = host
            out.append(listener)
        elif kind == "http":
            out.append(_listenDescription(host, port))
        else:
            raise InputError(f"{source}: listener type {kind!r} is not http or https")
    c.add("listen", out, "; ".join(dict.fromkeys(sourceOf)), *dict.fromkeys(notes))

    address, source = parts.get(
        "metrics", (":2112", "webhook-sentry's default metrics address :2112")
    )
    host, port = _goAddress(address, source)
    c.add(
        "metrics",
        _listenDescription(host, port),
        source,
        *([] if host else [_ALL_INTERFACES.format(tool="webhook-sentry", port=port)]),
    )
    c.notes.extend(
        [
            "webhook-sentry refuses CONNECT (405) unless it intercepts TLS; "
            "egressproxy tunnels CONNECT by default, under the same address "
            "policy. Clients that send X-WhSentry-TLS over plain http:// are "
            "served as before.",
            "Reason codes 1000-1010 and X-WhSentry-Reason keep webhook-sentry's "
            "meaning; codes above 1010 are egressproxy's (docs/errors.md).",
        ]
    )


# Reading the input.


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            result.update(_flatten(value, name + "."))
        else:
            result[name] = value
    return result


def _readYAML(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read it: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top")
    return data


def _fromYAML(
    rows: Sequence[Row],
    data: Mapping[str, Any],
    tool: str,
    path: str,
    caseless: bool = False,
) -> dict[Row, tuple[Any, str]]:
    """
    The values a YAML file gives, by row.

    @param caseless: keys match whatever their case (viper's rule).
    """
    fold = (lambda s: s.lower()) if caseless else (lambda s: s)
    byKey = {fold(row.yaml): row for row in rows if row.yaml}
    values: dict[Row, tuple[Any, str]] = {}
    flat = _flatten(data)
    for key, value in flat.items():
        row = byKey.get(fold(key))
        if row is None:
            # A nested key may be a whole value (a list of mappings).
            raise InputError(f"{path}: {key}: not a {tool} setting")
        if value is None:
            continue
        values[row] = (value, f"{tool} {row.yaml}")
    return values


def _fromFlags(
    rows: Sequence[Row], argv: Sequence[str], tool: str
) -> tuple[dict[Row, tuple[Any, str]], str | None]:
    """
    The values a command line gives, by row, as Go's flag package reads
    it (C{-flag}, C{--flag}, C{--flag=value}, C{--flag value}; a boolean
    flag takes a value only after C{=}), and its C{--config-file}.
    """
    byFlag = {row.flag: row for row in rows if row.flag}
    values: dict[Row, tuple[Any, str]] = {}
    configFile = None
    args = list(argv)
    if args and not args[0].startswith("-"):
        args.pop(0)  # the program
    while args:
        arg = args.pop(0)
        if arg == "--":
            break
        if not arg.startswith("-"):
            raise InputError(f"{tool} takes no argument {arg!r}")
        name, eq, value = arg.lstrip("-").partition("=")
        row = byFlag.get(name)
        if row is None:
            raise InputError(f"--{name}: not a {tool} flag")
        if row.kind == "bool":
            parsed: Any = value if eq else "true"
        elif eq:
            parsed = value
        elif args:
            parsed = args.pop(0)
        else:
            raise InputError(f"--{name} needs a value")
        source = f"{tool} --{name}"
        if name == "config-file":
            configFile = parsed
            continue
        if row.kind == "list":
            previous = values.get(row, ([], source))[0]
            values[row] = ([*previous, parsed], source)
        else:
            values[row] = (parsed, source)
    if args:
        raise InputError(f"{tool} takes no argument {args[0]!r}")
    return values, configFile


def execStart(unit: str) -> list[str]:
    """
    The command line of a systemd unit file's (last) C{ExecStart=}, split
    as systemd splits it, without its C{-@+!:} prefixes.
    """
    text = re.sub(r"\\\n", " ", unit)
    command = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("ExecStart="):
            command = stripped[len("ExecStart=") :].strip()
    if not command:
        raise InputError("the unit has no ExecStart= line")
    argv = shlex.split(command)
    argv[0] = argv[0].lstrip("-@+!:")
    return argv


def convertSmokescreen(
    configFile: str | None = None, argv: Sequence[str] = ()
) -> Conversion:
    """
    Convert a Smokescreen configuration: a YAML file, a command line, or a
    command line with C{--config-file} (its flags win, as in Smokescreen).
    """
    flags, fromFlags = _fromFlags(SMOKESCREEN, argv, "Smokescreen")
    path = configFile or fromFlags
    values: dict[Row, tuple[Any, str]] = {}
    sources = []
    if path:
        values.update(_fromYAML(SMOKESCREEN, _readYAML(path), "Smokescreen", path))
        sources.append(path)
    if argv:
        sources.append("command line")
    values.update(flags)
    c = Conversion("Smokescreen", sources)
    _apply(c, SMOKESCREEN, values)
    _finishSmokescreen(c)
    return c


def convertWebhookSentry(configFile: str) -> Conversion:
    """
    Convert a webhook-sentry YAML file (its command's C{listener:} form or
    its library's C{listeners:} list).
    """
    data = _readYAML(configFile)
    values = _fromYAML(
        WEBHOOK_SENTRY, data, "webhook-sentry", configFile, caseless=True
    )
    c = Conversion("webhook-sentry", [configFile])
    _apply(c, WEBHOOK_SENTRY, values)
    _finishWebhookSentry(c)
    return c


def _apply(c: Conversion, rows: Sequence[Row], values: Mapping[Row, Any]) -> None:
    for row in rows:
        if row in values:
            value, source = values[row]
            try:
                row.action(c, value, source)
            except InputError as e:
                raise InputError(f"{source}: {e}") from None


# Writing the output.


def _render(value: Any) -> str:
    # JSON is YAML's flow style, and quotes whatever needs quoting.
    return json.dumps(value, ensure_ascii=False)


def _comment(text: str, indent: str) -> Iterable[str]:
    words = text.split()
    line = indent + "#"
    for word in words:
        if len(line) + 1 + len(word) > 78 and line != indent + "#":
            yield line
            line = indent + "#"
        line += " " + word
    yield line


def _bullet(text: str) -> list[str]:
    first, *rest = _comment("- " + text, "")
    return [first, *("#  " + line[1:] for line in rest)]


def render(c: Conversion) -> str:
    """
    The egressproxy YAML for C{c}: keys in the order of
    L{proxy_app.config.fields}, each with a comment naming its source.
    """
    order = {f.key: i for i, f in enumerate(configModule.fields())}
    byKey: dict[str, Entry] = {}
    for entry in c.entries:
        if entry.key not in order:
            raise AssertionError(f"{entry.key} is not an egressproxy key")
        byKey[entry.key] = entry
    lines = [
        f"# egressproxy configuration converted from {c.tool} "
        f"({', '.join(c.sources)}) by egressproxy-migrate.",
        "# Each key names the setting it came from; see docs/migrating.md.",
    ]
    if c.notes:
        lines.append("#")
        lines.append(f"# Where egressproxy behaves differently from {c.tool}:")
        for note in c.notes:
            lines.extend(_bullet(note))
    if c.leftOut:
        lines.append("#")
        lines.append(f"# Left out ({len(c.leftOut)}), also listed on standard error:")
        for item in c.leftOut:
            lines.extend(_bullet(item))
    section = None
    for key in sorted(byKey, key=order.__getitem__):
        entry = byKey[key]
        name, _, sub = key.rpartition(".")
        if name != section:
            lines.append("")
            if name:
                lines.append(f"{name}:")
            section = name
        indent = "  " if name else ""
        for note in entry.notes:
            lines.extend(_comment(note, indent))
        if isinstance(entry.value, list) and any(
            isinstance(v, dict) for v in entry.value
        ):
            lines.append(f"{indent}{sub}:  # from {entry.source}")
            lines.extend(f"{indent}  - {_render(v)}" for v in entry.value)
        else:
            lines.append(
                f"{indent}{sub}: {_render(entry.value)}  # from {entry.source}"
            )
    return "\n".join(lines) + "\n"


def main(
    argv: Sequence[str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """
    The console script: convert, write, report; the exit status.
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    parser = argparse.ArgumentParser(
        prog="egressproxy-migrate",
        description="Convert a Smokescreen or webhook-sentry configuration "
        "into an egressproxy YAML file.",
    )
    tools = parser.add_subparsers(dest="tool", required=True)
    smokescreen = tools.add_parser("smokescreen", help="a Smokescreen configuration")
    smokescreen.add_argument("--config-file", help="Smokescreen's YAML file")
    smokescreen.add_argument(
        "--command-line", help="Smokescreen's command line, as one string"
    )
    smokescreen.add_argument(
        "--systemd-unit", help="a systemd unit file whose ExecStart runs Smokescreen"
    )
    sentry = tools.add_parser("webhook-sentry", help="a webhook-sentry configuration")
    sentry.add_argument("--config-file", required=True, help="its YAML file")
    for p in (smokescreen, sentry):
        p.add_argument("-o", "--output", help="write here instead of standard output")
        p.add_argument(
            "--allow-partial",
            action="store_true",
            help="exit 0 even when settings were left out",
        )
    args = parser.parse_args(argv)
    try:
        if args.tool == "smokescreen":
            command: list[str] = []
            if args.command_line:
                command = shlex.split(args.command_line)
            if args.systemd_unit:
                try:
                    with open(args.systemd_unit, encoding="utf-8") as f:
                        command = execStart(f.read())
                except OSError as e:
                    raise InputError(
                        f"{args.systemd_unit}: cannot read it: {e.strerror}"
                    ) from None
            if not (args.config_file or command):
                parser.error(
                    "smokescreen needs --config-file, --command-line or --systemd-unit"
                )
            conversion = convertSmokescreen(args.config_file, command)
        else:
            conversion = convertWebhookSentry(args.config_file)
    except InputError as e:
        print(f"egressproxy-migrate: {e}", file=err)
        return 2
    text = render(conversion)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        out.write(text)
    for item in conversion.leftOut:
        print(f"egressproxy-migrate: left out: {item}", file=err)
    if conversion.leftOut and not args.allow_partial:
        return 1
    return 0


def run() -> None:
    """
    The C{egressproxy-migrate} entry point.
    """
    sys.exit(main())


if __name__ == "__main__":
    run()
