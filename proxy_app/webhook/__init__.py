"""
The control webhook: the events the proxy POSTs to an operator's HTTP(S)
endpoint, in smithproxy's message format, and the access-request gate,
which asks that endpoint whether a connection may go ahead.

Events never delay traffic.  They go into a bounded queue that a treq
client drains, a few POSTs at a time, over persistent connections;
failures are retried with exponential backoff on the injected clock; a full
queue drops events and counts them.  Only the gate
(L{WebhookService.accessRequest}) makes a connection wait, and only for as
long as its own timeout.

This module is the package's public face; its private modules hold one
concern each:
  - C{_messages}: building the JSON events (pure);
  - C{_delivery}: the event queue, retries, drops and the counters;
  - C{_gate}: the access request and what its reply means;
  - C{_client}: the HTTP client, its TLS policy and pool, one POST with a
    deadline, and the URL's redaction;
  - C{_service}: L{WebhookService}, which puts them together.

The webhook client is not a proxy client: it connects with the reactor's
own resolver and endpoints, so an operator's URL on localhost works.

The URL's path may hold a secret (C{/webhook/<SECRET_ID>}); logs show only
L{redactURL}'s C{scheme://host:port/…}.

C{docs/webhooks.md} documents every message, the gate's semantics and the
delivery guarantees.  The gate's and the statistics' settings are
L{proxy_app.config.Gate} and L{proxy_app.config.Statistics}.
"""

from proxy_app.webhook._client import (
    MAX_REPLY_BYTES,
    UnverifiedPolicyForHTTPS,
    WebhookTimeout,
    buildClient,
    redactURL,
)
from proxy_app.webhook._delivery import MAX_BACKOFF
from proxy_app.webhook._gate import GateResult, approvedAddresses
from proxy_app.webhook._messages import (
    ACCESS_REQUEST,
    EVENT_ACTIONS,
    MAX_L7_DETAILS,
    connectionInfoDetails,
    connectionStopInfo,
    sessionLabel,
)
from proxy_app.webhook._service import WebhookService

__all__ = [
    "ACCESS_REQUEST",
    "EVENT_ACTIONS",
    "MAX_BACKOFF",
    "MAX_L7_DETAILS",
    "MAX_REPLY_BYTES",
    "GateResult",
    "UnverifiedPolicyForHTTPS",
    "WebhookService",
    "WebhookTimeout",
    "approvedAddresses",
    "buildClient",
    "connectionInfoDetails",
    "connectionStopInfo",
    "redactURL",
    "sessionLabel",
]
