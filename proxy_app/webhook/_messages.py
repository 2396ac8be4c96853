"""
smithproxy's JSON events, built: the envelope every message shares, the
session label, C{connection-stop}'s info, C{connection-info}'s details and
the connection ids.  Pure: no I/O and no clock; delivery is someone else's
concern.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from proxy_app.target import hostPort

if TYPE_CHECKING:
    from proxy_app.webhook._gate import GateResult

#: The actions the event queue carries, which C{events} may name.
EVENT_ACTIONS = frozenset(
    {"ping", "neighbor", "connection-start", "connection-stop", "connection-info"}
)

#: The action of the gate's request; C{events} may name it, to no effect:
#: the gate is governed by L{proxy_app.config.Gate.enabled} alone.
ACCESS_REQUEST = "access-request"

#: How many URLs a connection-stop's C{l7.details} lists at most.
MAX_L7_DETAILS = 100


def sessionLabel(
    clientHost: str,
    clientPort: int,
    destHost: str,
    destPort: int,
    originatedTLS: bool,
    *,
    clientTLS: bool = False,
) -> str:
    """
    The session label of smithproxy's messages:
    C{<L>_<client>:<port>+<R>_<destination>:<port>}.

    Each prefix names its leg's protocol: C{tcp} for plain TCP, C{ssli} for
    TLS that the proxy itself speaks on that leg (TLS it originates toward
    the destination, or a TLS listener's connection from the client); IPv6
    addresses are bracketed.  For example
    C{tcp_127.0.0.1:40000+ssli_[2001:db8::1]:443}.

    @param destHost: the vetted address connected to (or, before one is
        chosen, the host name).
    """
    left = "ssli" if clientTLS else "tcp"
    right = "ssli" if originatedTLS else "tcp"
    client = hostPort(clientHost, clientPort)
    return f"{left}_{client}+{right}_{hostPort(destHost, destPort)}"


def connectionStopInfo(
    session: str,
    policy: Any,
    bytesUp: int,
    bytesDown: int,
    *,
    sni: str | None = None,
    app: str | None = None,
    details: Iterable[str] = (),
) -> dict[str, Any]:
    """
    The C{details.info} of a C{connection-stop} message.

    @param policy: the ACL rule or role that allowed the connection.
    @param sni: the server name of the TLS session nearest the destination
        that carried one: TLS the proxy originated, else a tunnel's
        ClientHello (see L{proxy_app.sniffer.TLSSniffer}), else a TLS
        listener's ClientHello; L{None} for none.
    @param app: the L7 protocol seen: C{"http/1.1"} for forwarded requests,
        C{"tls"} for a tunnel carrying TLS; L{None} to leave C{l7} out.
    @param details: for C{http/1.1}, the URLs requested, of which the first
        L{MAX_L7_DETAILS} are listed.
    """
    info: dict[str, Any] = {
        "session": session,
        "policy": policy,
        "bytes_up": bytesUp,
        "bytes_down": bytesDown,
    }
    if sni:
        info["tls"] = {"sni": sni}
    if app:
        listed: list[str] = []
        for url in details:
            if len(listed) >= MAX_L7_DETAILS:
                break
            listed.append(url)
        info["l7"] = {"app": app, "details": listed}
    return info


def connectionInfoDetails(
    statistics: Any = None, gate: GateResult | None = None
) -> dict[str, Any]:
    """
    The C{details} of a C{connection-info} message: one key per feature
    that collected something.  Empty when none did, and then
    L{WebhookService.connectionInfo
    <proxy_app.webhook.WebhookService.connectionInfo>} sends nothing.

    @param statistics: the connection's
        L{proxy_app.stats.ConnectionStatistics}, or L{None}.
    @param gate: the connection's L{GateResult
        <proxy_app.webhook.GateResult>}, or L{None}; its reply, if any,
        becomes C{access-request}.
    """
    details: dict[str, Any] = {}
    if statistics is not None:
        details["statistics"] = statistics.report()
    if gate is not None and gate.reply is not None:
        details["access-request"] = gate.reply
    return details


class Messages:
    """
    Builds one proxy's messages.  Each is a JSON object beginning
    C{{"type": "proxy", "action": …, "source": …}}, then C{id} for a
    connection's messages, then the action's own fields.

    @ivar source: the C{source} of every message (the hostid).
    """

    def __init__(self, source: str) -> None:
        self.source = source

    def _envelope(
        self, action: str, connectionID: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        message: dict[str, Any] = {
            "type": "proxy",
            "action": action,
            "source": self.source,
        }
        if connectionID is not None:
            message["id"] = connectionID
        message.update(fields)
        return message

    def ping(self, proxies: Sequence[str]) -> dict[str, Any]:
        """
        C{ping}, listing the live connections' ids.
        """
        return self._envelope("ping", proxies=list(proxies))

    def neighbor(self, address: str) -> dict[str, Any]:
        """
        C{neighbor}: a client address seen for the first time.
        """
        return self._envelope(
            "neighbor", address=address, addresses=[address], state="new"
        )

    def connectionStart(self, connectionID: str, session: str) -> dict[str, Any]:
        """
        C{connection-start}, with the session label.
        """
        return self._envelope(
            "connection-start", connectionID, details={"info": {"session": session}}
        )

    def connectionStop(
        self, connectionID: str, info: Mapping[str, Any]
    ) -> dict[str, Any]:
        """
        C{connection-stop}, with L{connectionStopInfo}'s C{info}.
        """
        return self._envelope(
            "connection-stop", connectionID, details={"info": dict(info)}
        )

    def connectionInfo(
        self, connectionID: str, details: Mapping[str, Any]
    ) -> dict[str, Any]:
        """
        C{connection-info}, with L{connectionInfoDetails}' C{details}.
        """
        return self._envelope("connection-info", connectionID, details=dict(details))

    def accessRequest(
        self,
        connectionID: str,
        policy: Any,
        session: str,
        addresses: Sequence[str] | None,
    ) -> dict[str, Any]:
        """
        C{access-request}: the gate's question, naming every address the
        connection may be made to if C{addresses} is given.
        """
        details: dict[str, Any] = {"policy": policy, "session": session}
        if addresses is not None:
            details["addresses"] = list(addresses)
        return self._envelope(ACCESS_REQUEST, connectionID, details=details)


class ConnectionIDs:
    """
    Connection ids, C{Proxy-<8 hex>-OID-<12 hex>}: the first part is random
    per process, the second unique per connection within it (a counter from
    a random start, modulo 2**48).
    """

    def __init__(self, idSource: Callable[[int], bytes] = os.urandom) -> None:
        """
        @param idSource: C{os.urandom}'s signature, for the random parts.
        """
        self._instance = idSource(4).hex().upper()
        self._nextOID = int.from_bytes(idSource(6), "big")

    def next(self) -> str:
        """
        The next id.
        """
        oid = self._nextOID
        self._nextOID = (oid + 1) % (1 << 48)
        return f"Proxy-{self._instance}-OID-{oid:012X}"


def serialize(message: Mapping[str, Any]) -> bytes:
    """
    A message as compact JSON.  A value JSON cannot hold (an object the
    caller passed as a policy, say) is written as its C{str} rather than
    raising into the proxy's connection handling.
    """
    return json.dumps(message, separators=(",", ":"), default=str).encode("utf-8")
