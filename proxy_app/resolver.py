"""
The safe resolver: it resolves a destination once, classifies every answer
with the L{AddressPolicy}, and hands on only the addresses that were
allowed.  The proxy connects to those addresses and never to the name, so a
second DNS answer (rebinding) has nothing to act on.

L{SafeResolver} wraps whichever L{IHostnameResolver} L{makeNameResolver}
picks: the reactor's own (C{getaddrinfo}, honouring C{/etc/hosts}), or a
L{NameserverResolver} asking the C{--nameserver}s directly with
L{twisted.names}, A and AAAA only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Literal, Protocol, cast

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
    IResolver,
)
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.names import error as names_error
from twisted.python.failure import Failure
from zope.interface import Attribute, implementer

from proxy_app.addresses import (
    DECISION_CACHE_SIZE,
    AddressDecision,
    AddressPolicy,
    parseIPLiteral,
)
from proxy_app.interfaces import IDestinationResolver
from proxy_app.reasons import ProxyError, Reason
from proxy_app.target import hostPort

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
    """

    host: str
    port: int
    addresses: tuple[str, ...]
    denied: tuple = ()
    lookupTime: float = 0.0
    ttl: float | None = None


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


class IExplainedHostResolution(IHostResolution):
    """
    An L{IHostResolution} that can say why it found no addresses.

    L{IResolutionReceiver} has no way to report an error: a failed lookup
    simply completes with no addresses.  A resolver that knows what went
    wrong (NXDOMAIN, SERVFAIL, a timeout) provides this on the resolution it
    hands to C{resolutionBegan}, so that L{SafeResolver.vet} can name the
    error instead of saying only that there were no addresses.
    """

    error = Attribute(
        """
        L{None}, or the exception explaining why the resolution delivered no
        addresses.  Only meaningful once C{resolutionComplete} was called.
        """
    )


_NOT_FOUND = "domain name not found"

# Most specific first: DNSNameError and friends are DomainError subclasses.
_LOOKUP_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (names_error.DNSNameError, _NOT_FOUND),
    (names_error.AuthoritativeDomainError, _NOT_FOUND),
    (names_error.DNSServerError, "the server failed (SERVFAIL)"),
    (names_error.DNSQueryRefusedError, "the server refused the query (REFUSED)"),
    (names_error.DNSFormatError, "the server could not parse the query (FORMERR)"),
    (
        names_error.DNSNotImplementedError,
        "the server does not support the query (NOTIMP)",
    ),
    (names_error.DNSUnknownError, "the server answered with an unknown error code"),
    (names_error.DomainError, _NOT_FOUND),
    (TimeoutError, "timed out"),
    (defer.TimeoutError, "timed out"),
)


def describeLookupError(error: BaseException) -> str:
    """
    Say in a few words why a lookup failed, for the end of a sentence
    beginning C{"DNS lookup of 'NAME' failed: "}.

    @param error: an exception from a name resolver, typically one of
        L{twisted.names.error}'s.
    """
    for kind, text in _LOOKUP_ERRORS:
        if isinstance(error, kind):
            return text
    return str(error) or type(error).__name__


def _wanted(
    addressTypes: Sequence[type[IAddress]] | None,
) -> tuple[bool, bool]:
    """
    Which address families C{addressTypes} asks for, as
    C{(wantIPv4, wantIPv6)}.
    """
    if addressTypes is None:
        return True, True
    types = tuple(addressTypes)
    return TwistedIPv4Address in types, TwistedIPv6Address in types


def _twistedAddress(
    ip: IPv4Address | IPv6Address,
    port: int,
    transportSemantics: str,
    original: IAddress | None = None,
) -> TwistedIPv4Address | TwistedIPv6Address:
    """
    Build the Twisted address object for C{ip}, keeping the flow
    information and scope of an IPv6 answer.
    """
    semantics = cast(Literal["TCP", "UDP"], transportSemantics)
    if isinstance(ip, IPv4Address):
        return TwistedIPv4Address(semantics, str(ip), port)
    flowInfo = getattr(original, "flowInfo", 0)
    scopeID = getattr(original, "scopeID", 0)
    return TwistedIPv6Address(semantics, str(ip), port, flowInfo, scopeID)


class _Sink(Protocol):
    """
    Where a L{_VettingLookup} reports what it found.

    @ivar ttl: the lookup's shortest record TTL, set before L{finished}
        when the wrapped resolution knows it.
    """

    ttl: float | None

    def allowed(self, address: TwistedIPv4Address | TwistedIPv6Address) -> None:
        """
        An answer was allowed; C{address.host} is its canonical text.
        """

    def denied(self, decision: AddressDecision) -> None:
        """
        An answer was denied by the policy.
        """

    def finished(self, error: BaseException | None) -> None:
        """
        The lookup completed; C{error} says why, if it found nothing.
        """

    def timedOut(self) -> None:
        """
        The lookup took longer than the timeout and was abandoned.
        """


@implementer(IResolutionReceiver)
class _VettingLookup:
    """
    One lookup through the wrapped name resolver: it receives the raw
    answers, classifies each exactly once, and tells its sink.

    After it finishes, times out or is cancelled it ignores anything the
    wrapped resolver still delivers, so a late or second answer can never
    reach the sink.
    """

    def __init__(
        self,
        safe: SafeResolver,
        sink: _Sink,
        hostName: str,
        port: int,
        addressTypes: Sequence[type[IAddress]] | None,
        transportSemantics: str,
    ) -> None:
        self._safe = safe
        self._sink = sink
        self._hostName = hostName
        self._port = port
        self._addressTypes = None if addressTypes is None else tuple(addressTypes)
        self._transportSemantics = transportSemantics
        self._inner: IHostResolution | None = None
        self._timer: IDelayedCall | None = None
        self._seen: set[str] = set()
        self._done = False

    def start(self) -> None:
        """
        Ask the wrapped name resolver, with the deadline already running so
        that a resolver answering synchronously still stops it.
        """
        safe = self._safe
        self._timer = safe._clock.callLater(safe._timeout, self._timedOut)
        try:
            resolution = safe._nameResolver.resolveHostName(
                self,
                self._hostName,
                self._port,
                self._addressTypes,
                self._transportSemantics,
            )
        except Exception as e:
            log.failure("Name resolver raised resolving {host}", host=self._hostName)
            self._finish(e)
            return
        if self._inner is None:
            self._inner = resolution

    def cancel(self) -> None:
        """
        Abandon the lookup: the sink hears nothing more.
        """
        if not self._done:
            self._done = True
            self._stop()

    # IResolutionReceiver

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        self._inner = resolutionInProgress

    def addressResolved(self, address: IAddress) -> None:
        if self._done:
            return
        if self._addressTypes is not None and not isinstance(
            address, self._addressTypes
        ):
            return
        if not isinstance(address, (TwistedIPv4Address, TwistedIPv6Address)):
            log.warn(
                "Ignoring non-IP answer {address!r} for {host}",
                address=address,
                host=self._hostName,
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
        decision = self._safe._policy.decide(
            address.host if ip is None else ip, self._port
        )
        if ip is not None and decision.allowed:
            self._sink.allowed(
                _twistedAddress(ip, self._port, self._transportSemantics, address)
            )
        else:
            self._sink.denied(decision)

    def resolutionComplete(self) -> None:
        if self._done:
            return
        error = None
        if IExplainedHostResolution.providedBy(self._inner):
            error = self._inner.error
        self._sink.ttl = getattr(self._inner, "ttl", None)
        self._finish(error)

    # Internals

    def _finish(self, error: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._sink.finished(error)

    def _timedOut(self) -> None:
        self._timer = None
        if self._done:
            return
        self._done = True
        self._stop()
        self._sink.timedOut()

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
            log.failure("Cancelling the resolution of {host}", host=self._hostName)


@implementer(IHostResolution)
class _SafeHostResolution:
    """
    The resolution L{SafeResolver.resolveHostName} returns.

    @ivar name: the host name being resolved.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.cancelled = False
        self._lookup: _VettingLookup | None = None

    def cancel(self) -> None:
        """
        Stop the resolution: the receiver hears nothing more, not even
        C{resolutionComplete}.
        """
        self.cancelled = True
        if self._lookup is not None:
            self._lookup.cancel()


class _ForwardingSink:
    """
    Passes allowed answers on to an L{IResolutionReceiver}.
    """

    def __init__(self, receiver: IResolutionReceiver, host: str) -> None:
        self._receiver = receiver
        self._host = host
        self.ttl: float | None = None

    def allowed(self, address: TwistedIPv4Address | TwistedIPv6Address) -> None:
        self._receiver.addressResolved(address)

    def denied(self, decision: AddressDecision) -> None:
        log.info(
            "Blocked {address} for {host} by rule {rule!r}",
            address=decision.address,
            host=self._host,
            rule=decision.rule,
        )

    def finished(self, error: BaseException | None) -> None:
        self._receiver.resolutionComplete()

    def timedOut(self) -> None:
        # The receiver interface cannot carry an error, so complete with the
        # addresses delivered so far; a caller such as HostnameEndpoint
        # fails on its own when there are none.
        log.warn("DNS lookup of {host} timed out", host=self._host)
        self._receiver.resolutionComplete()


class _VettingSink:
    """
    Collects a L{SafeResolver.vet} lookup into a L{VettedDestination} or
    an error, and fires its L{Deferred}.
    """

    def __init__(
        self,
        safe: SafeResolver,
        deferred: Deferred[VettedDestination],
        host: str,
        port: int,
    ) -> None:
        self._safe = safe
        self._deferred = deferred
        self._host = host
        self._port = port
        self._started = safe._clock.seconds()
        self._allowed: list[str] = []
        self._denied: list[AddressDecision] = []
        self.ttl: float | None = None

    def allowed(self, address: TwistedIPv4Address | TwistedIPv6Address) -> None:
        self._allowed.append(address.host)

    def denied(self, decision: AddressDecision) -> None:
        self._denied.append(decision)

    def finished(self, error: BaseException | None) -> None:
        host = self._host
        if self._allowed:
            self._succeed()
        elif self._denied:
            self._deferred.errback(DestinationDenied(host, self._port, self._denied[0]))
        elif error is not None:
            self._deferred.errback(
                ResolutionFailed(
                    host,
                    f"DNS lookup of '{host}' failed: {describeLookupError(error)}",
                )
            )
        else:
            self._deferred.errback(
                ResolutionFailed(host, f"DNS lookup of '{host}' returned no addresses")
            )

    def timedOut(self) -> None:
        # Addresses that were vetted before the deadline are as good as any:
        # a slow AAAA query should not sink a name whose A answer is in.
        if self._allowed:
            self._succeed()
            return
        self._deferred.errback(
            ResolutionFailed(
                self._host,
                f"DNS lookup of '{self._host}' timed out after "
                f"{self._safe._timeout:g} s",
            )
        )

    def _succeed(self) -> None:
        self._deferred.callback(
            VettedDestination(
                host=self._host,
                port=self._port,
                addresses=tuple(self._allowed),
                denied=tuple(self._denied),
                lookupTime=self._safe._clock.seconds() - self._started,
                ttl=self.ttl,
            )
        )


@implementer(IHostnameResolver, IDestinationResolver)
class SafeResolver:
    """
    A name resolver that only ever reports addresses the address policy
    allows.

    It wraps another L{IHostnameResolver} (the system's, or a
    L{NameserverResolver}), asks it once per lookup, classifies every answer
    with the L{AddressPolicy} and drops denied ones.  IP literals are
    classified directly and never reach the wrapped resolver.

    The proxy uses L{vet}; L{resolveHostName} lets the same filter serve as a
    reactor's C{nameResolver}, for L{HostnameEndpoint}, which connects only
    to the addresses its receiver was given.
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
        # Vetted IP literals: values, as the policy is fixed.
        self._literals: dict[tuple[str, int], VettedDestination] = {}
        self._nameResolver = nameResolver
        self._clock = clock
        self._timeout = timeout

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """
        See L{IHostnameResolver.resolveHostName}.

        Only allowed answers reach C{resolutionReceiver}, each once, as
        L{twisted.internet.address.IPv4Address} or
        L{twisted.internet.address.IPv6Address} with C{portNumber}.  A lookup
        that times out completes with the answers delivered so far.
        """
        resolution = _SafeHostResolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        if resolution.cancelled:
            # The receiver cancelled from within resolutionBegan.
            return resolution
        sink = _ForwardingSink(resolutionReceiver, hostName)
        try:
            ip = parseIPLiteral(hostName)
        except ValueError:
            log.warn("Not resolving malformed address {host!r}", host=hostName)
            resolutionReceiver.resolutionComplete()
            return resolution
        if ip is not None:
            wantIPv4, wantIPv6 = _wanted(addressTypes)
            if wantIPv4 if isinstance(ip, IPv4Address) else wantIPv6:
                decision = self._policy.decide(ip, portNumber)
                if decision.allowed:
                    sink.allowed(_twistedAddress(ip, portNumber, transportSemantics))
                else:
                    sink.denied(decision)
            resolutionReceiver.resolutionComplete()
            return resolution
        lookup = _VettingLookup(
            self, sink, hostName, portNumber, addressTypes, transportSemantics
        )
        resolution._lookup = lookup
        lookup.start()
        return resolution

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
            raise DestinationDenied(host, port, self._policy.decide(host, port)) from None
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

        lookup: _VettingLookup | None = None

        def cancel(d: Deferred[VettedDestination]) -> None:
            if lookup is not None:
                lookup.cancel()

        d: Deferred[VettedDestination] = Deferred(cancel)
        lookup = _VettingLookup(
            self, _VettingSink(self, d, host, port), host, port, None, "TCP"
        )
        lookup.start()
        return d


def _retrySchedule(timeout: float, serverCount: int) -> tuple[float, ...]:
    """
    Per-attempt timeouts for L{twisted.names.client.Resolver} that finish
    within C{timeout} seconds.

    The client sends to each server in turn with the first timeout, then to
    each again with the second, and so on, so every step is spent
    C{serverCount} times.  Two steps in the ratio 1:3 follow the start of
    Twisted's own C{(1, 3, 11, 45)}: a quick retransmission for a lost
    datagram, then patience for a slow server.
    """
    share = timeout / max(serverCount, 1)
    return (share / 4, share * 3 / 4)


def _dnsName(name: bytes) -> bytes:
    """
    A domain name as compared in answers: lower case, no trailing dot.
    """
    return name.lower().rstrip(b".")


def _addressesInAnswer(
    queried: bytes, answers: Sequence[dns.RRHeader], recordType: int
) -> list[IPv4Address | IPv6Address]:
    """
    The addresses of type C{recordType} that an answer section gives for
    C{queried}, following CNAMEs within the section.

    Records for names outside the CNAME chain starting at C{queried} are
    ignored: a server has no business answering them, and taking them would
    let it slip in addresses for a name nobody asked about.
    """
    chain = {_dnsName(queried)}
    # CNAMEs usually come first and in order, but nothing promises it; go
    # round until the chain stops growing.
    grown = True
    while grown:
        grown = False
        for record in answers:
            if record.type == dns.CNAME and _dnsName(record.name.name) in chain:
                payload: Any = record.payload
                target = _dnsName(payload.name.name)
                if target not in chain:
                    chain.add(target)
                    grown = True
    found: list[IPv4Address | IPv6Address] = []
    for record in answers:
        if record.type == recordType and _dnsName(record.name.name) in chain:
            ip = ip_address(cast(Any, record.payload).address)
            if ip not in found:
                found.append(ip)
    return found


@implementer(IExplainedHostResolution)
class _NameserverResolution:
    """
    One lookup by L{NameserverResolver}: an A and an AAAA query in flight
    together, each reported as it comes back.

    @ivar name: the host name being resolved.
    @ivar error: see L{IExplainedHostResolution.error}.
    """

    def __init__(
        self,
        name: str,
        receiver: IResolutionReceiver,
        port: int,
        transportSemantics: str,
    ) -> None:
        self.name = name
        self.error: BaseException | None = None
        # The shortest TTL of the answers used, for caches.
        self.ttl: float | None = None
        self._receiver = receiver
        self._port = port
        self._transportSemantics = transportSemantics
        self._pending = 0
        self._failures: dict[int, BaseException] = {}
        self._delivered = 0
        self._done = False
        self._deadline: IDelayedCall | None = None

    def cancel(self) -> None:
        """
        Stop the resolution: the receiver hears nothing more.

        The queries themselves are left to finish or time out on their own
        (within the timeout) rather than cancelled: L{client.Resolver} shares
        one query among identical lookups in flight, so cancelling ours would
        fail somebody else's.
        """
        if not self._done:
            self._done = True
            self._stopDeadline()

    def _start(
        self,
        queries: Sequence[tuple[Deferred, int, bytes]],
        clock: IReactorTime,
        timeout: float,
    ) -> None:
        self._pending = len(queries)
        if not queries:
            self._complete()
            return
        self._deadline = clock.callLater(timeout, self._timedOut)
        for index, (d, recordType, queried) in enumerate(queries):
            d.addCallbacks(
                self._answered,
                self._failed,
                callbackArgs=(recordType, queried),
                errbackArgs=(index,),
            )

    def _answered(
        self,
        result: tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]],
        recordType: int,
        queried: bytes,
    ) -> None:
        if self._done:
            return
        ttls = [record.ttl for record in result[0]]
        if ttls:
            least = float(min(ttls))
            self.ttl = least if self.ttl is None else min(self.ttl, least)
        for ip in _addressesInAnswer(queried, result[0], recordType):
            self._delivered += 1
            self._receiver.addressResolved(
                _twistedAddress(ip, self._port, self._transportSemantics)
            )
        self._settled()

    def _failed(self, reason: Failure, index: int) -> None:
        if self._done:
            return
        self._failures[index] = cast(BaseException, reason.value)
        self._settled()

    def _settled(self) -> None:
        self._pending -= 1
        if self._pending == 0:
            self._complete()

    def _timedOut(self) -> None:
        self._deadline = None
        if self._done:
            return
        # Ranked after the queries' own failures, which say more.
        self._failures[2] = names_error.DNSQueryTimeoutError(None)
        self._complete()

    def _complete(self) -> None:
        self._done = True
        self._stopDeadline()
        if not self._delivered and self._failures:
            self.error = self._failures[min(self._failures)]
        self._receiver.resolutionComplete()

    def _stopDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None


@implementer(IHostnameResolver)
class NameserverResolver:
    """
    An L{IHostnameResolver} that asks the given DNS servers directly with
    L{twisted.names}, for when the proxy must not use the system's resolver.

    It sends an A and an AAAA query at once (never ANY, which is what
    L{twisted.names.client.Resolver.getHostByName} would send), reports each
    answer as it comes back, and completes when both are in, or when the
    timeout passes.  Its resolutions provide L{IExplainedHostResolution}.

    It reads neither C{/etc/resolv.conf} nor C{/etc/hosts} and installs
    nothing globally.
    """

    def __init__(
        self,
        servers: Sequence[tuple[str, int]],
        reactor: Any,
        timeout: float = 5.0,
        *,
        dnsClient: IResolver | None = None,
    ) -> None:
        """
        @param servers: C{(ip, port)} of each DNS server, tried in order.
        @param reactor: an L{IReactorUDP}, L{IReactorTCP} and
            L{IReactorTime} provider to send queries and time them with.
        @param timeout: seconds a lookup may take.
        @param dnsClient: the L{twisted.names} resolver to query, for tests;
            by default a L{twisted.names.client.Resolver} for C{servers}.

        @raise ValueError: C{servers} is empty.
        """
        servers = [(str(host), int(port)) for host, port in servers]
        if not servers:
            raise ValueError("NameserverResolver needs at least one server")
        self._reactor = reactor
        self._timeout = timeout
        if dnsClient is None:
            # resolv=None (with servers given) is what keeps client.Resolver
            # from reading /etc/resolv.conf and re-reading it every minute;
            # unlike client.createResolver it also leaves /etc/hosts alone,
            # and nothing is installed as the global resolver.
            dnsClient = client.Resolver(
                resolv=None,
                servers=servers,
                reactor=reactor,
                timeout=_retrySchedule(timeout, len(servers)),
            )
        # Typed loosely: IResolver's stubs want an explicit integral timeout,
        # but client.Resolver's own default (the schedule above) is the one
        # to use.
        self._dnsClient: Any = dnsClient

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """
        See L{IHostnameResolver.resolveHostName}.

        Only the queries C{addressTypes} asks for are sent.  An IP literal is
        reported as it is, without a query, as C{getaddrinfo} would.
        """
        resolution = _NameserverResolution(
            hostName, resolutionReceiver, portNumber, transportSemantics
        )
        resolutionReceiver.resolutionBegan(resolution)
        wantIPv4, wantIPv6 = _wanted(addressTypes)
        try:
            ip = ip_address(hostName)
        except ValueError:
            pass
        else:
            if wantIPv4 if ip.version == 4 else wantIPv6:
                resolution._delivered += 1
                resolutionReceiver.addressResolved(
                    _twistedAddress(ip, portNumber, transportSemantics)
                )
            resolution._start((), self._reactor, self._timeout)
            return resolution
        try:
            # IDNA-encode here, so that a name that cannot be encoded fails
            # this resolution rather than raising out of the DNS client.
            queried = dns.domainString(hostName)
        except (UnicodeError, TypeError) as e:
            resolution._failures[0] = e
            resolution._start((), self._reactor, self._timeout)
            return resolution
        name = queried.decode("ascii")
        queries: list[tuple[Deferred, int, bytes]] = []
        if wantIPv4:
            queries.append((self._dnsClient.lookupAddress(name), dns.A, queried))
        if wantIPv6:
            queries.append((self._dnsClient.lookupIPV6Address(name), dns.AAAA, queried))
        resolution._start(queries, self._reactor, self._timeout)
        return resolution


def parseNameserver(text: str) -> tuple[str, int]:
    """
    Parse a C{--nameserver} value.

    Accepted forms are C{IP}, C{IPv4:PORT}, C{[IPv6]:PORT}, C{[IPv6]} and a
    bare IPv6 address; the port defaults to 53.  The host must be an IP
    address: a nameserver given by name would need DNS to find DNS.

    @return: C{(canonical ip, port)}.
    @raise ValueError: C{text} is none of those.
    """
    original = text
    text = text.strip()
    if not text:
        raise ValueError("empty nameserver: expected HOST[:PORT]")
    port = "53"
    if text.startswith("["):
        close = text.find("]")
        if close == -1:
            raise ValueError(f"nameserver {original!r} has no closing ']'")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"nameserver {original!r}: expected ':PORT' after ']'")
            port = rest[1:]
    elif text.count(":") > 1:
        host = text
    elif ":" in text:
        host, port = text.split(":")
    else:
        host = text
    try:
        ip = ip_address(host)
    except ValueError:
        raise ValueError(
            f"nameserver {original!r} must be an IP address, not a host name "
            "(finding a nameserver by name would need DNS)"
        ) from None
    if text.startswith("[") and ip.version != 6:
        raise ValueError(
            f"nameserver {original!r}: brackets are only for IPv6 addresses"
        )
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(
            f"nameserver {original!r} has an invalid port {port!r}: "
            "expected a number from 1 to 65535"
        )
    return str(ip), int(port)


def makeNameResolver(
    nameservers: Sequence[str], reactor: Any, timeout: float = 5.0
) -> IHostnameResolver:
    """
    The name resolver to wrap in a L{SafeResolver}.

    @param nameservers: C{--nameserver} values; if any are given, they are
        asked directly through a L{NameserverResolver}.
    @param reactor: the reactor to resolve with.
    @param timeout: seconds a L{NameserverResolver} lookup may take.

    @return: a L{NameserverResolver}, or the reactor's own C{nameResolver}
        (Twisted's C{getaddrinfo} in a thread, which honours C{/etc/hosts}
        and C{nsswitch.conf}) when no nameservers are given.
    @raise ValueError: a nameserver is malformed.
    """
    if nameservers:
        return NameserverResolver(
            [parseNameserver(n) for n in nameservers], reactor, timeout
        )
    return reactor.nameResolver


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
    for a host and port), so a cached answer is as safe as a fresh one: the
    address policy does not change while the proxy runs.  An answer is kept
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
            d.addCallback(self._store, key)
        return d

    def _store(self, destination: VettedDestination, key: tuple[str, int]) -> VettedDestination:
        ttl = self.maxTTL if destination.ttl is None else min(destination.ttl, self.maxTTL)
        if ttl > 0:
            cached = attr.evolve(destination, denied=(), lookupTime=0.0)
            self._entries[key] = _CacheEntry(cached, self._clock.seconds() + ttl)
            if len(self._entries) > self._maxEntries:
                self._entries.popitem(last=False)
        return destination
