"""
The safe resolver: it resolves a destination once, classifies every answer
with the L{AddressPolicy}, and hands on only the addresses that were
allowed.  The proxy connects to those addresses and never to the name, so a
second DNS answer (rebinding) has nothing to act on.
"""

from __future__ import annotations

import attr

from proxy_app.reasons import ProxyError, Reason


@attr.s(frozen=True, slots=True, auto_attribs=True)
class VettedDestination:
    """
    The result of vetting one destination.

    @ivar host: the requested host, normalized.
    @ivar port: the requested port.
    @ivar addresses: the allowed IP addresses, as canonical text, in the
        order to try them; never empty.
    @ivar denied: the L{proxy_app.addresses.AddressDecision}s of answers
        that were dropped.
    @ivar lookupTime: seconds spent resolving (0 for IP literals).
    """

    host: str
    port: int
    addresses: tuple[str, ...]
    denied: tuple = ()
    lookupTime: float = 0.0


def hostPort(host: str, port: int) -> str:
    """
    Format C{host} and C{port} as they appear in messages, with IPv6
    literals in brackets.
    """
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class DestinationDenied(ProxyError):
    """
    Every address of the destination was denied by the address policy.

    @ivar decision: the L{proxy_app.addresses.AddressDecision} reported to
        the client (the first denied answer).
    """

    def __init__(self, host: str, port: int, decision) -> None:
        self.host = host
        self.port = port
        self.decision = decision
        super().__init__(
            Reason.BLOCKED_ADDRESS,
            f"Egress proxying is denied to host '{hostPort(host, port)}': "
            f"The destination address ({decision.address}) was denied by "
            f"rule '{decision.rule}'.",
        )


class ResolutionFailed(ProxyError):
    """
    The name did not resolve to any address, the lookup failed, or it timed
    out.
    """

    def __init__(self, host: str, message: str) -> None:
        self.host = host
        super().__init__(Reason.RESOLUTION_FAILED, message)
