"""
Asking DNS servers directly: the L{NameserverResolver} used with
C{--nameserver}, and the choice between it and the system's resolver.

L{NameserverResolver} is an L{IHostnameResolver} on L{twisted.names}: it
sends A and AAAA queries (never ANY) to the servers it was given and
reports every answer unfiltered.  It knows nothing of the address policy;
L{proxy_app.resolver.SafeResolver} wraps it (or the system's resolver) and
vets what it reports.  Its resolutions provide
L{proxy_app.interfaces.IExplainedHostResolution}, so the safe resolver can
say why a lookup failed; L{describeLookupError} words the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Literal, cast

from twisted.internet import defer
from twisted.internet.address import IPv4Address as TwistedIPv4Address
from twisted.internet.address import IPv6Address as TwistedIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHostnameResolver,
    IHostResolution,
    IReactorTime,
    IResolutionReceiver,
    IResolver,
)
from twisted.names import client, dns
from twisted.names import error as names_error
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy_app.interfaces import IExplainedHostResolution

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


@implementer(IHostResolution, IExplainedHostResolution)
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
        clock: IReactorTime,
        timeout: float,
    ) -> None:
        """
        @param clock: enforces C{timeout}.
        @param timeout: seconds the queries may take, once started.
        """
        self.name = name
        self.error: BaseException | None = None
        # The shortest TTL of the answers used, for caches.
        self.ttl: float | None = None
        self._receiver = receiver
        self._port = port
        self._transportSemantics = transportSemantics
        self._clock = clock
        self._timeout = timeout
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

    def query(self, queries: Sequence[tuple[Deferred, int, bytes]]) -> None:
        """
        Report the answers of C{queries} as they come back, and complete
        when all are in or the timeout passes.

        @param queries: C{(Deferred, record type, queried name)} for each
            query sent; with none, complete at once.
        """
        self._pending = len(queries)
        if not queries:
            self._complete()
            return
        self._deadline = self._clock.callLater(self._timeout, self._timedOut)
        for index, (d, recordType, queried) in enumerate(queries):
            d.addCallbacks(
                self._answered,
                self._failed,
                callbackArgs=(recordType, queried),
                errbackArgs=(index,),
            )

    def answerAtOnce(self, ip: IPv4Address | IPv6Address | None) -> None:
        """
        Complete without a query, reporting C{ip} (if not L{None}) as the
        one answer.
        """
        if ip is not None:
            self._delivered += 1
            self._receiver.addressResolved(
                _twistedAddress(ip, self._port, self._transportSemantics)
            )
        self._complete()

    def failAtOnce(self, error: BaseException) -> None:
        """
        Complete without a query, explaining the empty answer with
        C{error}.
        """
        self._failures[0] = error
        self._complete()

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
    L{twisted.names.common.ResolverBase.getHostByName} would send), reports each
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
        @param reactor: an L{twisted.internet.interfaces.IReactorUDP},
            L{twisted.internet.interfaces.IReactorTCP} and
            L{twisted.internet.interfaces.IReactorTime} provider to send
            queries and time them with.
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
            hostName,
            resolutionReceiver,
            portNumber,
            transportSemantics,
            self._reactor,
            self._timeout,
        )
        resolutionReceiver.resolutionBegan(resolution)
        wantIPv4, wantIPv6 = _wanted(addressTypes)
        try:
            ip = ip_address(hostName)
        except ValueError:
            pass
        else:
            resolution.answerAtOnce(
                ip if (wantIPv4 if ip.version == 4 else wantIPv6) else None
            )
            return resolution
        try:
            # IDNA-encode here, so that a name that cannot be encoded fails
            # this resolution rather than raising out of the DNS client.
            queried = dns.domainString(hostName)
        except (UnicodeError, TypeError) as e:
            resolution.failAtOnce(e)
            return resolution
        name = queried.decode("ascii")
        queries: list[tuple[Deferred, int, bytes]] = []
        if wantIPv4:
            queries.append((self._dnsClient.lookupAddress(name), dns.A, queried))
        if wantIPv6:
            queries.append((self._dnsClient.lookupIPV6Address(name), dns.AAAA, queried))
        resolution.query(queries)
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
    The name resolver to wrap in a L{proxy_app.resolver.SafeResolver}.

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
