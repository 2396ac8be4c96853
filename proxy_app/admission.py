"""
The admission pipeline: whether a request may go where it asks, and to
which addresses.  Its steps, in order:

  1. identify the client (certificate, trusted role header, or
     C{Proxy-Authorization} through the cred portal);
  2. take from the role's rate limit;
  3. the ACL's decision on the host name (and, for TLS origination, that
     the role may present the client certificate it named; for a CONNECT
     naming an external proxy with C{X-Upstream-Https-Proxy}, that the
     role may use it); then, for such a CONNECT, vet the external
     proxy's own address as a destination's, once;
  4. vet the destination through the L{IDestinationResolver} (inside an
     intercepted tunnel, steps 4 to 6 are the CONNECT's: its requests
     go to the addresses it was admitted to);
  5. narrow it to the addresses the L{Connector} may try
     (L{Connector.candidates});
  6. with the access-request gate on, the control webhook's word;
  7. connect, through the exchange's own way (the pool, or a tunnel).

Each step answers at once when it can (no password to check, an IP
literal or a cached name, no gate, an idle pooled connection), and the
request then goes through without a single L{Deferred}: most requests do.
A step that has to wait makes the rest a callback chain.  Both paths run
the same steps in the same order, and raise the same errors.

The pipeline writes no access or decision log; what it learns (the role,
the ACL decision, the lookup time, the gate's answer, the destination) is
written on the exchange, whose record accounting reads.
"""

from __future__ import annotations

from typing import Any

import attr
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from proxy_app.accounting import webhookSession
from proxy_app.limits import Overloaded
from proxy_app.parent import ParentProxy, ParentURL, parseExternalProxyURL
from proxy_app.reasons import ProxyError, Reason
from proxy_app.resolver import VettedDestination
from proxy_app.webhook import GateResult, approvedAddresses

# The process log's namespace is still that of the module this was split
# from, so that filters on it keep working.
log = Logger(namespace="proxy_app.server")

# Smokescreen's per-request parent: a CONNECT may ask to be tunnelled
# through a proxy of its own choosing, which its role's ACL rule must list.
EXTERNAL_PROXY_HEADER = b"x-upstream-https-proxy"


def externalProxyURL(headers: Any) -> ParentURL | None:
    """
    The external proxy a CONNECT's C{X-Upstream-Https-Proxy} names, or
    L{None} without the header.

    @raise ProxyError: 1002 for a value that is not C{http://HOST[:PORT]}
        or C{https://HOST[:PORT]}, or for the header sent more than once
        (which value would be meant is anyone's guess).  The value is not
        echoed: it may hold a password.
    """
    values = [value for name, value in headers if name == EXTERNAL_PROXY_HEADER]
    if not values:
        return None
    if len(values) > 1:
        raise ProxyError(
            Reason.BAD_TARGET, "X-Upstream-Https-Proxy may be sent only once"
        )
    try:
        return parseExternalProxyURL(values[0].decode("ascii"))
    except UnicodeDecodeError:
        problem = "not ASCII"
    except ValueError as e:
        problem = str(e)
    raise ProxyError(
        Reason.BAD_TARGET, f"Invalid X-Upstream-Https-Proxy header: {problem}"
    )


class Admission:
    """
    The admission pipeline of one proxy.

    Its collaborators are read from C{parts} (the L{ProxyFactory}) at each
    step rather than kept, so that one swapped while the proxy runs (the
    access control on reload, or a test's stand-in) takes effect for the
    next request: C{access} (L{proxy_app.access.AccessControl}),
    C{rateLimiter} (a L{proxy_app.limits.RateLimiter} or L{None}),
    C{resolver} (an L{IDestinationResolver}), C{connector}
    (L{proxy_app.upstream.Connector}), C{webhook} (its gate, or L{None}),
    C{origination} (L{proxy_app.tls.Origination} or L{None}), C{metrics}
    and C{clock}.

    The exchange being admitted gives C{target}, C{request}, C{protocol}
    (its C{role} and C{peerHost}), C{requestID}, C{connectionID},
    C{policy}, C{tls}, C{proxyType} and C{connectTo(destination)} (and
    what L{webhookSession} reads);
    the pipeline sets its C{role}, C{aclDecision}, C{dnsTime},
    C{connectStarted}, C{gateResult} and C{destination}, and on a CONNECT
    its C{externalProxy} (the parsed URL, then the vetted L{ParentProxy}).
    """

    __slots__ = ("_parts",)

    def __init__(self, parts: Any) -> None:
        self._parts = parts

    def admit(self, exchange: Any) -> Any:
        """
        Run the pipeline for C{exchange}.

        @return: what C{exchange.connectTo} returned (an upstream protocol,
            or a L{Deferred} of one) when every step answered at once, else
            a L{Deferred} firing with it after the rest of the steps.
        @raise ProxyError: a step refused the request at once (the
            L{Deferred}, on the callback path, fails the same way).
        """
        parts = self._parts
        target = exchange.target
        protocol = exchange.protocol
        if protocol.intercepted:
            # Inside an intercepted tunnel: one tunnel, one identity, the
            # one its CONNECT established; no header inside changes it.
            # One tunnel, one destination too: the addresses its CONNECT
            # was vetted to and the gate approved, not a new lookup (which
            # could answer an address the gate never saw) nor a new
            # access request (smithproxy asks once per session).
            self.decide(exchange, protocol.role)
            exchange.connectStarted = parts.clock.seconds()
            return self._approved(protocol.tunnelDestination, exchange)
        role = parts.access.identify(
            protocol.role, exchange.request.headers, protocol.peerHost
        )
        if isinstance(role, Deferred):
            return role.addCallback(self._identified, exchange)
        self.decide(exchange, role)
        if exchange.externalProxy is not None:
            return self._vetExternalProxy(exchange)
        destination = parts.resolver.vetNow(target.host, target.port)
        if destination is None:
            return parts.resolver.vet(target.host, target.port).addCallback(
                self._vettedThenConnect, exchange
            )
        return self._vettedThenConnect(destination, exchange)

    def _identified(self, role: str | None, exchange: Any) -> Any:
        target = exchange.target
        self.decide(exchange, role)
        if exchange.externalProxy is not None:
            return self._vetExternalProxy(exchange)
        return self._parts.resolver.vet(target.host, target.port).addCallback(
            self._vettedThenConnect, exchange
        )

    def decide(self, exchange: Any, role: str | None) -> None:
        """
        The rate limit, then the ACL's decision on the name; the address
        policy decides later on the addresses, so neither check can be
        passed through the other.  A request that names a client
        certificate for TLS origination must also be one its role may
        present: the role is known only now, and nothing has been
        connected yet (nor taken from the pool).

        @raise Overloaded: the role's rate limit is reached.
        @raise ProxyError: the ACL denies the host, or the role may not
            present the certificate.
        """
        parts = self._parts
        target = exchange.target
        exchange.role = role
        limiter = parts.rateLimiter
        if limiter is not None:
            wait = limiter.take(role or "")
            if wait:
                raise Overloaded(
                    f"Request rate limit reached for role '{role or 'anonymous'}'",
                    429,
                    wait,
                )
        access = parts.access
        proxyHost = None
        if exchange.proxyType == "connect":
            # Read here, on CONNECT only (as Smokescreen does); the tunnel
            # never passes request headers on, and forwarding drops it.
            url = exchange.externalProxy = externalProxyURL(exchange.request.headers)
            if url is not None:
                proxyHost = url.host
        decision = exchange.aclDecision = access.decide(role, target.host, proxyHost)
        if access.acl is not None:
            outcome = "deny"
            if decision.allow:
                outcome = "report" if decision.reported else "allow"
            parts.metrics.aclDecisions.labels(
                decision.rule or "", decision.project or "", outcome
            ).inc()
        if not decision.allow:
            through = f" through {proxyHost}" if proxyHost is not None else ""
            raise ProxyError(
                Reason.DENIED_BY_ACL,
                f"Egress proxying is denied to host '{target.authority}'{through}: "
                f"{decision.reason}.",
            )
        tls = exchange.tls
        if tls is not None and tls.alias is not None:
            origination = parts.origination
            if origination is not None:
                origination.permit(origination.identity(tls.alias), role)

    def _vetExternalProxy(self, exchange: Any) -> Deferred:
        """
        Vet the external proxy the ACL allowed as a destination is vetted
        (the client chose it, so it must not open an address the policy
        denies), resolved once; then the destination, as usual.  The
        exchange's C{externalProxy} becomes the L{ParentProxy} its tunnel
        goes through.
        """
        parts = self._parts
        url = exchange.externalProxy
        target = exchange.target

        def denied(failure: Any) -> Any:
            error = failure.check(ProxyError) and failure.value
            if error and error.reason in (Reason.BLOCKED_ADDRESS, Reason.PORT_DENIED):
                raise ProxyError(
                    error.reason, f"The external proxy {url} is denied: {error.message}"
                )
            return failure

        def vetted(proxy: VettedDestination) -> Deferred:
            self._vetted(proxy, exchange)
            address = parts.connector.candidates(proxy).addresses[0]
            tls = None
            if url.scheme == "https":
                origination = parts.origination
                if origination is None:
                    raise ProxyError(
                        Reason.PARENT_PROXY_FAILED,
                        f"The external proxy {url} cannot be verified: TLS "
                        "origination is not configured",
                    )
                tls = origination.creator(url.host, None)
            exchange.externalProxy = ParentProxy(
                url, address, tls, kind="external proxy"
            )
            return parts.resolver.vet(target.host, target.port)

        return (
            parts.resolver.vet(url.host, url.port)
            .addCallbacks(vetted, denied)
            .addCallback(self._vettedThenConnect, exchange)
        )

    def _vettedThenConnect(self, destination: VettedDestination, exchange: Any) -> Any:
        parts = self._parts
        self._vetted(destination, exchange)
        # The addresses that may be tried (capped, in connect order) are
        # fixed here, before the gate is asked: the gate judges exactly
        # these, and the connector, the pool and a retry get only what it
        # approved, as one object.
        destination = parts.connector.candidates(destination)
        webhook = parts.webhook
        if webhook is not None and webhook.gateEnabled:
            return self._askGate(destination, exchange).addCallback(
                self._approved, exchange
            )
        return self._approved(destination, exchange)

    def _approved(self, destination: VettedDestination, exchange: Any) -> Any:
        exchange.destination = destination
        return exchange.connectTo(destination)

    def _vetted(self, destination: VettedDestination, exchange: Any) -> None:
        parts = self._parts
        metrics = parts.metrics
        exchange.dnsTime = destination.lookupTime
        if destination.lookupTime:
            metrics.dnsTime.observe(destination.lookupTime)
        for decision in destination.denied:
            metrics.resolverDenials.labels(decision.label).inc()
            log.info(
                "{rq_id}: dropped answer {address} for {host}: {rule}",
                rq_id=exchange.requestID,
                address=decision.address,
                host=destination.host,
                rule=decision.rule,
            )
        exchange.connectStarted = parts.clock.seconds()

    def _askGate(self, destination: VettedDestination, exchange: Any) -> Deferred:
        """
        Wait for the control webhook's word before connecting.  The request
        names every address that may be tried; the webhook may accept only
        some of them.

        @return: a L{Deferred} firing with C{destination} narrowed to the
            addresses the webhook approved.
        """
        session = webhookSession(exchange, destination.addresses[0])
        return self._parts.webhook.accessRequest(
            exchange.connectionID,
            exchange.policy,
            session,
            addresses=destination.addresses,
        ).addCallback(self._gateDecided, exchange, destination)

    def _gateDecided(
        self, result: GateResult, exchange: Any, destination: VettedDestination
    ) -> VettedDestination:
        exchange.gateResult = result
        metrics = self._parts.metrics
        metrics.gateLatency.observe(result.latency)
        metrics.gateOutcomes.labels("accept" if result.accepted else "reject").inc()
        target = exchange.target
        if not result.accepted:
            raise ProxyError(
                Reason.REJECTED_BY_WEBHOOK,
                f"Connection to {target.authority if target else ''} "
                f"rejected by the access-request webhook: {result.reason}",
            )
        approved = approvedAddresses(result.reply, destination.addresses)
        if not approved:
            raise ProxyError(
                Reason.REJECTED_BY_WEBHOOK,
                f"Connection to {target.authority if target else ''} "
                "rejected by the access-request webhook: it approved none of "
                f"the addresses {', '.join(destination.addresses)}",
            )
        if approved == destination.addresses:
            return destination
        return attr.evolve(destination, addresses=approved)
