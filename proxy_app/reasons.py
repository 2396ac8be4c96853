"""
The reason codes the proxy puts on every response it makes itself.

The numbers up to 1009 are webhook-sentry's and keep its meaning; 1010 and
above are ours.  Every error response carries C{X-WhSentry-Reason} and
C{X-WhSentry-ReasonCode} and a plain-text body saying what happened.
"""

from __future__ import annotations

import enum


class Reason(enum.IntEnum):
    """
    A reason code, with the HTTP status the proxy answers it with.
    """

    status: int

    def __new__(cls, code: int, status: int) -> Reason:
        member = int.__new__(cls, code)
        member._value_ = code
        member.status = status
        return member

    BLOCKED_ADDRESS = (1000, 403)
    RESOLUTION_FAILED = (1001, 502)
    BAD_TARGET = (1002, 400)
    BAD_SCHEME = (1003, 400)
    UPSTREAM_TIMEOUT = (1004, 504)
    TLS_HANDSHAKE_FAILED = (1005, 502)
    CONNECT_FAILED = (1006, 502)
    CERTIFICATE_INVALID = (1007, 502)
    RESPONSE_TOO_LARGE = (1008, 502)
    INTERNAL_ERROR = (1009, 500)
    UNKNOWN_CLIENT_CERT = (1010, 400)
    DENIED_BY_ACL = (1011, 403)
    REJECTED_BY_WEBHOOK = (1012, 403)
    PROXY_AUTH_REQUIRED = (1013, 407)
    OVERLOADED = (1014, 503)
    # Malformed requests that are not about the target: bad framing,
    # smuggling attempts, oversized heads.  webhook-sentry has no code for
    # these; they share 1002's family of client errors.
    BAD_REQUEST = (1015, 400)
    # A configured alias this client's role may not present: with roles in
    # the deployment, tenant A must not present tenant B's certificate.
    CLIENT_CERT_NOT_PERMITTED = (1016, 403)
    # The destination port is refused by destinations.allow_ports or
    # deny_ports, before any lookup.
    PORT_DENIED = (1017, 403)
    # The parent proxy (upstream.proxy) could not be reached or refused
    # the tunnel: told apart from 1006, a destination that failed.
    PARENT_PROXY_FAILED = (1018, 502)


# The reasons that mean the proxy said no (a policy, a limit, the gate),
# as opposed to a destination or a request that failed: the decision log's
# allow=false and the metrics' decision="deny".
DENIALS = frozenset(
    {
        Reason.BLOCKED_ADDRESS,
        Reason.DENIED_BY_ACL,
        Reason.REJECTED_BY_WEBHOOK,
        Reason.PROXY_AUTH_REQUIRED,
        Reason.OVERLOADED,
        Reason.CLIENT_CERT_NOT_PERMITTED,
        Reason.PORT_DENIED,
    }
)


class ProxyError(Exception):
    """
    A failure that the proxy answers with an error response of its own.

    @ivar reason: the L{Reason} code.
    @ivar message: one human-readable sentence, used as the
        C{X-WhSentry-Reason} header and as the response body.
    @ivar status: the HTTP status; defaults to the reason's own.
    """

    def __init__(self, reason: Reason, message: str, status: int | None = None):
        super().__init__(reason, message)
        self.reason = reason
        self.message = message
        self.status = reason.status if status is None else status

    def __str__(self) -> str:
        return f"{self.message} (reason code {int(self.reason)})"
