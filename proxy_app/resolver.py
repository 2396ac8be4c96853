"""
The safe resolver: it resolves a destination once, classifies every answer
with the L{AddressPolicy}, and hands on only the addresses that were
allowed.  The proxy connects to those addresses and never to the name, so a
second DNS answer (rebinding) has nothing to act on.

L{SafeResolver} wraps whichever L{IHostnameResolver}
L{proxy_app.nameserver.makeNameResolver} picks: the reactor's own
(C{getaddrinfo}, honouring C{/etc/hosts}), or a
L{proxy_app.nameserver.NameserverResolver} asking the C{--nameserver}s
directly.  L{CachingResolver} keeps its vetted answers within their TTL.

The nameserver resolver, L{makeNameResolver} and L{parseNameserver} live in
L{proxy_app.nameserver}, and L{IExplainedHostResolution} in
L{proxy_app.interfaces}; they are importable from here too.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import attr
from twisted.internet import defer
from twisted.internet.address import IPv4Address as TwistedIPv4Address
from twisted.internet.address import IPv6Address as TwistedIPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHostnameResolver,
    IHostResolution,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.logger import Logger
from zope.interface import implementer

from proxy_app.addresses import (
    DECISION_CACHE_SIZE,
    RULE_ALLOW_HOST,
    RULE_PORT_DENIED,
    AddressDecision,
    AddressPolicy,
    parseIPLiteral,
)
from proxy_app.interfaces import IDestinationResolver, IExplainedHostResolution
from proxy_app.nameserver import (
    NameserverResolver,
    describeLookupError,
    makeNameResolver,
    parseNameserver,
)
from proxy_app.reasons import ProxyError, Reason
from proxy_app.target import hostPort

__all__ = [
    "CachingResolver",
    "DestinationDenied",
    "IExplainedHostResolution",
    "NameserverResolver",
    "PortDenied",
    "ResolutionFailed",
    "SafeResolver",
    "VettedDestination",
    "describeLookupError",
    "makeNameResolver",
    "parseNameserver",
]

log = Logger()


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
    @ivar lookupTime: seconds spent resolving (0 for IP literals and cached
        answers).
    @ivar ttl: the shortest TTL of the DNS records behind the answer, when
        the resolver knows it (L{NameserverResolver} does; the system's
        getaddrinfo does not), else L{None}.
    @ivar allowedBy: L{proxy_app.addresses.RULE_ALLOW_HOST} when the name
        is an allowed host and at least one of C{addresses} is allowed only
        because of that, else L{None}.
    """

    host: str
    port: int
    addresses: tuple[str, ...]
    denied: tuple = ()
    lookupTime: float = 0.0
    ttl: float | None = None
    allowedBy: str | None = None


class DestinationDenied(ProxyError):
    """
    Every address of the destination was denied by the address policy.

    @ivar decision: the L{proxy_app.addresses.AddressDecision} reported to
        the client (the first denied answer).
    """

    def __init__(self, host: str, port: int, decision: AddressDecision) -> None:
        self.host = host
        self.port = port
        self.decision = decision
        super().__init__(
            Reason.BLOCKED_ADDRESS,
            f"Egress proxying is denied to host '{hostPort(host, port)}': "
            f"The destination address ({decision.address}) was denied by "
            f"rule '{decision.rule}'.",
        )


class PortDenied(DestinationDenied):
    """
    The port rules (C{destinations.allow_ports} and C{deny_ports}) refuse
    the destination's port; nothing was looked up.

    @ivar decision: an L{proxy_app.addresses.AddressDecision} with the rule
        L{proxy_app.addresses.RULE_PORT_DENIED}, for the metrics.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.decision = AddressDecision(False, host, RULE_PORT_DENIED)
        ProxyError.__init__(
            self,
            Reason.PORT_DENIED,
            f"Egress proxying is denied to host '{hostPort(host, port)}': "
            f"The destination port ({port}) is not allowed.",
        )


class ResolutionFailed(ProxyError):
    """
    The name did not resolve to any address, the lookup failed, or it timed
    out.
    """

    def __init__(self, host: str, message: str) -> None:
        self.host = host
        super().__init__(Reason.RESOLUTION_FAILED, message)


@implementer(IResolutionReceiver)
class _Vetting:
    """
    One lookup for L{SafeResolver.vet}: it asks the wrapped name resolver
    once, over both families, classifies each answer exactly once, and
    fires L{deferred} with a L{VettedDestination} or an error.

    After it finishes, times out or is cancelled it ignores anything the
    wrapped resolver still delivers, so a late or second answer can never
    reach the result.

    @ivar deferred: fires with the L{VettedDestination}, or fails with
        L{DestinationDenied} or L{ResolutionFailed}; cancelling it abandons
        the lookup.
    """

    def __init__(
        self,
        nameResolver: IHostnameResolver,
        policy: AddressPolicy,
        clock: IReactorTime,
        timeout: float,
        host: str,
        port: int,
        allowedHost: bool = False,
    ) -> None:
        """
        @param nameResolver: does the lookup.
        @param policy: classifies each answer.
        @param clock: times the lookup and enforces C{timeout}.
        @param timeout: seconds the lookup may take before it is abandoned.
        @param host: the name to resolve.
        @param port: the destination port, for the policy's port rules.
        @param allowedHost: C{host} is an allowed host on C{port}
            (L{AddressPolicy.hostAllowed}): each answer's decision goes
            through L{AddressPolicy.liftForHost}.
        """
        self._nameResolver = nameResolver
        self._policy = policy
        self._clock = clock
        self._timeout = timeout
        self._host = host
        self._port = port
        self.deferred: Deferred[VettedDestination] = Deferred(self._cancel)
        self._started = clock.seconds()
        self._inner: IHostResolution | None = None
        self._timer: IDelayedCall | None = None
        self._seen: set[str] = set()
        self._allowed: list[str] = []
        self._denied: list[AddressDecision] = []
        self._ttl: float | None = None
        self._allowedHost = allowedHost
        self._allowedBy: str | None = None
        self._done = False

    def start(self) -> None:
        """
        Ask the wrapped name resolver, with the deadline already running so
        that a resolver answering synchronously still stops it.
        """
        self._timer = self._clock.callLater(self._timeout, self._timedOut)
        try:
            resolution = self._nameResolver.resolveHostName(
                self, self._host, self._port, None, "TCP"
            )
        except Exception as e:
            log.failure("Name resolver raised resolving {host}", host=self._host)
            self._finish(e)
            return
        if self._inner is None:
            self._inner = resolution

    # IResolutionReceiver

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        self._inner = resolutionInProgress

    def addressResolved(self, address: IAddress) -> None:
        if self._done:
            return
        if not isinstance(address, (TwistedIPv4Address, TwistedIPv6Address)):
            log.warn(
                "Ignoring non-IP answer {address!r} for {host}",
                address=address,
                host=self._host,
            )
            return
        try:
            ip = parseIPLiteral(address.host)
        except ValueError:
            ip = None
        # No resolver should answer with something that is not an address;
        # if one does, the policy denies the text as it is.
        key = address.host if ip is None else str(ip)
        if key in self._seen:
            return
        self._seen.add(key)
        decision = self._policy.decide(address.host if ip is None else ip, self._port)
        if self._allowedHost and ip is not None and not decision.allowed:
            decision = self._policy.liftForHost(decision)
            if decision.rule == RULE_ALLOW_HOST:
                self._allowedBy = RULE_ALLOW_HOST
        if ip is not None and decision.allowed:
            self._allowed.append(key)
        else:
            self._denied.append(decision)

    def resolutionComplete(self) -> None:
        if self._done:
            return
        error = None
        if IExplainedHostResolution.providedBy(self._inner):
            error = self._inner.error
        self._ttl = getattr(self._inner, "ttl", None)
        self._finish(error)

    # Internals

    def _cancel(self, deferred: Deferred[VettedDestination]) -> None:
        """
        Abandon the lookup: nothing more is heard from it.
        """
        if not self._done:
            self._done = True
            self._stop()

    def _finish(self, error: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        host = self._host
        if self._allowed:
            self._succeed()
        elif self._denied:
            self.deferred.errback(DestinationDenied(host, self._port, self._denied[0]))
        elif error is not None:
            self.deferred.errback(
                ResolutionFailed(
                    host,
                    f"DNS lookup of '{host}' failed: {describeLookupError(error)}",
                )
            )
        else:
            self.deferred.errback(
                ResolutionFailed(host, f"DNS lookup of '{host}' returned no addresses")
            )

    def _timedOut(self) -> None:
        self._timer = None
        if self._done:
            return
        self._done = True
        self._stop()
        # Addresses that were vetted before the deadline are as good as any:
        # a slow AAAA query should not sink a name whose A answer is in.
        if self._allowed:
            self._succeed()
            return
        self.deferred.errback(
            ResolutionFailed(
                self._host,
                f"DNS lookup of '{self._host}' timed out after {self._timeout:g} s",
            )
        )

    def _succeed(self) -> None:
        self.deferred.callback(
            VettedDestination(
                host=self._host,
                port=self._port,
                addresses=tuple(self._allowed),
                denied=tuple(self._denied),
                lookupTime=self._clock.seconds() - self._started,
                ttl=self._ttl,
                allowedBy=self._allowedBy,
            )
        )

    def _stop(self) -> None:
        """
        Stop the deadline and the wrapped resolution, if it can be stopped.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        inner, self._inner = self._inner, None
        if inner is None:
            return
        try:
            inner.cancel()
        except NotImplementedError:
            # GAIResolver's lookups run in a thread and cannot be stopped;
            # their answers will arrive and be ignored.
            pass
        except Exception:
            log.failure("Cancelling the resolution of {host}", host=self._host)


@implementer(IDestinationResolver)
class SafeResolver:
    """
    Vets destinations: resolves a name once through another
    L{IHostnameResolver} (the system's, or a
    L{proxy_app.nameserver.NameserverResolver}), classifies every answer
    with the L{AddressPolicy} and keeps only the allowed ones.  IP literals
    are classified directly and never reach the wrapped resolver.
    """

    def __init__(
        self,
        policy: AddressPolicy,
        nameResolver: IHostnameResolver,
        clock: IReactorTime,
        timeout: float = 5.0,
    ) -> None:
        """
        @param policy: classifies each address.
        @param nameResolver: does the actual lookups.
        @param clock: enforces C{timeout}.
        @param timeout: seconds a lookup may take before it is abandoned.
        """
        self._policy = policy
        self._limitsPorts = policy.limitsPorts
        self._allowsHosts = policy.allowsHosts
        # Vetted IP literals: values, as long as the policy is not replaced.
        self._literals: dict[tuple[str, int], VettedDestination] = {}
        self._nameResolver = nameResolver
        self._clock = clock
        self._timeout = timeout

    def replacePolicy(self, policy: AddressPolicy) -> None:
        """
        Vet from now on with C{policy} (a reload of the destination rules).
        Lookups already under way finish with the policy they started with,
        so a request in flight keeps the destination it was given; every
        later call uses the new one.  Vetted literals, decided by the old
        policy, are forgotten.
        """
        # One synchronous step in the reactor thread: no request can see
        # the new policy with the old flags or the old literals.
        self._policy = policy
        self._limitsPorts = policy.limitsPorts
        self._allowsHosts = policy.allowsHosts
        self._literals = {}

    def vetNow(self, host: str, port: int) -> VettedDestination | None:
        """
        See L{IDestinationResolver.vetNow}: an IP literal is classified as it
        is; a name needs a lookup.
        """
        vetted = self._literals.get((host, port))
        if vetted is not None:
            return vetted
        try:
            ip = parseIPLiteral(host)
        except ValueError:
            # Numeric-looking garbage: no lookup, lest a resolver read it as
            # a name; the policy denies text that is not an address.
            raise DestinationDenied(
                host, port, self._policy.decide(host, port)
            ) from None
        # Before any lookup, and before a name's cached answer is ever
        # stored: CachingResolver keeps only what got past this.
        if self._limitsPorts and not self._policy.portAllowed(ip, port):
            raise PortDenied(host, port)
        if ip is None:
            return None
        decision = self._policy.decide(ip, port)
        if not decision.allowed:
            raise DestinationDenied(host, port, decision)
        vetted = VettedDestination(host=host, port=port, addresses=(decision.address,))
        if len(self._literals) >= DECISION_CACHE_SIZE:
            self._literals.clear()
        self._literals[host, port] = vetted
        return vetted

    def vet(self, host: str, port: int) -> Deferred[VettedDestination]:
        """
        See L{IDestinationResolver.vet}.

        An IP literal is classified as it is.  A name is resolved once, over
        both families; the allowed answers are kept in the order they came,
        and the denied ones are recorded in
        L{VettedDestination.denied}.  If the deadline passes after some
        answers were allowed, those are used.
        """
        try:
            destination = self.vetNow(host, port)
        except DestinationDenied:
            return defer.fail()
        if destination is not None:
            return defer.succeed(destination)

        policy = self._policy
        vetting = _Vetting(
            self._nameResolver,
            policy,
            self._clock,
            self._timeout,
            host,
            port,
            # Decided once per lookup, on the name the client asked for:
            # answers are lifted for this name only, never cached by
            # address, so nothing carries over to another name.
            self._allowsHosts and policy.hostAllowed(host, port),
        )
        vetting.start()
        return vetting.deferred


class _CacheEntry:
    __slots__ = ("destination", "expires")

    def __init__(self, destination: VettedDestination, expires: float) -> None:
        self.destination = destination
        self.expires = expires


@implementer(IDestinationResolver)
class CachingResolver:
    """
    Keeps vetted answers for names, so that repeated requests to the same
    destination skip the lookup.

    Only what the wrapped resolver vetted is kept (the allowed addresses
    for a host and port), so a cached answer is as safe as a fresh one;
    L{replacePolicy} forgets every answer the old policy vetted.  An answer is kept
    for its DNS TTL when the resolver knows it, never longer than C{maxTTL};
    IP literals and failures are not cached.  At most C{maxEntries} are
    kept, the least recently used going first.
    """

    def __init__(
        self,
        resolver: Any,
        clock: IReactorTime,
        maxTTL: float,
        maxEntries: int = 10000,
    ) -> None:
        self._resolver = resolver
        self._clock = clock
        self.maxTTL = maxTTL
        self._maxEntries = maxEntries
        self._entries: OrderedDict[tuple[str, int], _CacheEntry] = OrderedDict()
        # Which policy a lookup was vetted by: one that started before
        # replacePolicy must not be stored after it.
        self._generation = 0

    def replacePolicy(self, policy: AddressPolicy) -> None:
        """
        Vet from now on with C{policy} (see L{SafeResolver.replacePolicy}),
        and forget every cached answer: each was vetted by the old policy.
        A lookup still under way when this is called answers its own
        request but is not cached.
        """
        self._resolver.replacePolicy(policy)
        self._entries.clear()
        self._generation += 1

    def vetNow(self, host: str, port: int) -> VettedDestination | None:
        key = (host, port)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.expires > self._clock.seconds():
                self._entries.move_to_end(key)
                return entry.destination
            del self._entries[key]
        return self._resolver.vetNow(host, port)

    def vet(self, host: str, port: int) -> Deferred[VettedDestination]:
        try:
            destination = self.vetNow(host, port)
        except DestinationDenied:
            return defer.fail()
        if destination is not None:
            return succeed(destination)
        key = (host, port)
        d = self._resolver.vet(host, port)
        try:
            literal = parseIPLiteral(host) is not None
        except ValueError:
            literal = True
        if not literal:
            d.addCallback(self._store, key, self._generation)
        return d

    def _store(
        self, destination: VettedDestination, key: tuple[str, int], generation: int
    ) -> VettedDestination:
        if generation != self._generation:
            return destination
        ttl = (
            self.maxTTL
            if destination.ttl is None
            else min(destination.ttl, self.maxTTL)
        )
        if ttl > 0:
            cached = attr.evolve(destination, denied=(), lookupTime=0.0)
            self._entries[key] = _CacheEntry(cached, self._clock.seconds() + ttl)
            if len(self._entries) > self._maxEntries:
                self._entries.popitem(last=False)
        return destination
