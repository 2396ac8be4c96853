"""
Connecting out: the one seam through which every outbound connection is
made, the upstream HTTP/1.1 client protocol, its connection pool, and the
upstream leg of CONNECT tunnels.

The seam, L{Connector}, takes only addresses from a
L{proxy_app.resolver.VettedDestination}.  It refuses anything that is not an
IP literal, so no host name can reach C{connectTCP} by any path.  With a
parent proxy configured it connects to the parent instead (the one
connection not made to a vetted address) and asks it for a tunnel to the
vetted address (L{proxy_app.parent}).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from itertools import zip_longest
from typing import Any, NamedTuple

import attr
from OpenSSL import SSL
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import (
    TimeoutError as ConnectTimeoutError,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IReactorTime,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy_app.http1 import (
    LAST_CHUNK,
    HeadError,
    ResponseHead,
    ResponseReader,
    chunk,
    requestHead,
)
from proxy_app.parent import ParentHandshake, ParentHandshakeFactory, ParentProxy
from proxy_app.reasons import ProxyError, Reason
from proxy_app.resolver import VettedDestination
from proxy_app.target import hostPort
from proxy_app.tls import tlsError
from proxy_app.transport import LeanConnector

log = Logger()


# The delay before the next address is tried while earlier attempts are
# still pending: RFC 8305's recommended Connection Attempt Delay.
ATTEMPT_DELAY = 0.25


def attemptOrder(addresses: Sequence[str], limit: int) -> tuple[str, ...]:
    """
    The addresses to try, in the order to try them, at most C{limit}: the
    two families interleaved (RFC 8305 section 4), starting with the family
    of the first address (the resolver's preference), each family in the
    order it came.

    The cap applies after interleaving, so with both families present and
    C{limit >= 2} both are tried.
    """
    if len(addresses) <= 1:
        # The common case, on every request: nothing to order.
        return tuple(addresses[:limit])
    first = isIPv6Address(addresses[0])
    same = [a for a in addresses if isIPv6Address(a) == first]
    other = [a for a in addresses if isIPv6Address(a) != first]
    ordered = [a for pair in zip_longest(same, other) for a in pair if a is not None]
    return tuple(ordered[:limit])


class Connector:
    """
    Opens TCP connections to vetted addresses.

    @ivar reactor: provides C{IReactorTCP} and C{IReactorTime}.
    @ivar timeout: the connect timeout in seconds: a bound on the whole
        connect phase, however many addresses are tried.
    @ivar maxAttempts: the most addresses tried for one connection.
    @ivar attemptDelay: seconds between starting one attempt and the next
        while it is pending.
    @ivar parent: the L{ParentProxy} connections are tunnelled through
        (except those its C{bypass} sends direct), or L{None}.
    """

    def __init__(
        self,
        reactor: Any,
        timeout: float,
        bindAddresses: Sequence[str] = (),
        maxAttempts: int = 4,
        attemptDelay: float = ATTEMPT_DELAY,
        parent: ParentProxy | None = None,
    ) -> None:
        """
        @param bindAddresses: local addresses to connect from (at most one
            per family), for a fixed egress address; none lets the kernel
            choose.
        """
        self.parent = parent
        self.reactor = reactor
        self.timeout = timeout
        self.bind4 = next((a for a in bindAddresses if isIPAddress(a)), None)
        self.bind6 = next((a for a in bindAddresses if isIPv6Address(a)), None)
        self.maxAttempts = maxAttempts
        self.attemptDelay = attemptDelay

    def candidates(self, destination: VettedDestination) -> VettedDestination:
        """
        Narrow C{destination} to the addresses that L{connect} may try, in
        the order it tries them (L{attemptOrder}).  The proxy does this once,
        before the access-request gate is asked, so that the gate, the pool
        and every connect see the same addresses.
        """
        addresses = attemptOrder(destination.addresses, self.maxAttempts)
        if addresses == destination.addresses:
            return destination
        return attr.evolve(destination, addresses=addresses)

    def via(self, host: str, address: str) -> ParentProxy | None:
        """
        The parent proxy a connection to C{host}, vetted as C{address}, goes
        through, or L{None} for a direct one.
        """
        parent = self.parent
        if parent is None or parent.bypass(host, address):
            return None
        return parent

    def connectAddress(
        self,
        address: str,
        port: int,
        factory: Factory,
        tls: Any = None,
        host: str | None = None,
        parent: ParentProxy | None = None,
    ) -> Deferred:
        """
        Connect to one IP address, through the parent proxy if there is one
        for it (L{via}).

        @param tls: an C{IOpenSSLClientConnectionCreator} to speak TLS over
            the connection, or L{None}.
        @param host: the name C{address} was vetted for (by default the
            address itself), which L{via} decides by.
        @param parent: a proxy to go through instead of the configured
            one, whatever its bypass list says: a CONNECT's external proxy
            (C{X-Upstream-Https-Proxy}), its address already vetted.

        @raise ValueError: if C{address} is not an IP literal; the proxy
            never connects to a name.
        """
        if not (isIPAddress(address) or isIPv6Address(address)):
            raise ValueError(f"refusing to connect to non-address {address!r}")
        if parent is None and self.parent is not None:
            parent = self.via(host or address, address)
        if parent is not None:
            return self._connectThrough(
                parent, address, port, factory, tls, host or address
            )
        return self._connectTCP(address, port, factory, tls)

    def _connectThrough(
        self,
        parent: ParentProxy,
        address: str,
        port: int,
        factory: Factory,
        tls: Any,
        host: str,
    ) -> Deferred:
        """
        Connect to C{parent} and ask it for a tunnel to C{address}; the
        L{Deferred} fires with C{factory}'s protocol once the tunnel is
        open (and TLS to the destination, if asked, started in it).
        """
        handshake = ParentHandshake(parent, address, port, host, factory, tls)
        connecting = self._connectTCP(
            parent.address,
            parent.url.port,
            ParentHandshakeFactory(handshake),
            parent.tls,
        )

        def failed(failure: Failure) -> Failure:
            if failure.check(ProxyError, ConnectTimeoutError, CancelledError):
                return failure
            return Failure(
                ProxyError(
                    Reason.PARENT_PROXY_FAILED,
                    f"TCP connection to {parent} ({parent.address}) failed: "
                    f"{_describe(failure)}",
                )
            )

        # Cancelling the result while the handshake is awaited cancels the
        # handshake, which cuts the connection to the parent.
        return connecting.addCallback(lambda _: handshake.answered).addErrback(failed)

    def _connectTCP(
        self, address: str, port: int, factory: Factory, tls: Any
    ) -> Deferred:
        if isIPAddress(address):
            endpointType: Any = TCP4ClientEndpoint
            bind = self.bind4
        elif isIPv6Address(address):
            endpointType = TCP6ClientEndpoint
            bind = self.bind6
        else:
            raise ValueError(f"refusing to connect to non-address {address!r}")
        if tls is None and isinstance(factory, OutboundFactory):
            # Our own protocols say when they are connected (L{Outbound}):
            # no endpoint, wrapper factory and wrapper protocol to make for
            # each connection, keep for its life and pass every event
            # through.
            return _Connecting(factory).connect(
                self.reactor,
                address,
                port,
                self.timeout,
                (bind, 0) if bind is not None else None,
            )
        endpoint = endpointType(
            self.reactor,
            address,
            port,
            timeout=self.timeout,
            bindAddress=(bind, 0) if bind is not None else None,
        )
        if tls is not None:
            endpoint = wrapClientTLS(tls, endpoint)
        return endpoint.connect(factory)

    def connect(
        self,
        destination: VettedDestination,
        factory: Factory,
        tls: Any = None,
        parent: ParentProxy | None = None,
    ) -> Deferred:
        """
        Connect to one of C{destination}'s vetted addresses, racing them as
        RFC 8305 (happy eyeballs) does: the first address at once, the next
        when the previous fails or after C{attemptDelay}, the first to
        connect wins and the others are cancelled.  At most C{maxAttempts}
        addresses are tried, in the order of L{attemptOrder} (which keeps
        the order of addresses L{candidates} gave), and the whole phase ends
        after C{timeout} seconds.

        With C{tls}, each attempt is wrapped in TLS, which starts only once
        its TCP connection is made: only the winner's ever is.

        With C{parent}, every attempt goes through it (L{connectAddress}).

        @return: a L{Deferred} firing with the connected protocol, or failing
            with a L{ProxyError}: 1004 for a timeout, 1006 otherwise.

        @raise ValueError: if C{destination} has no address.
        """
        addresses = destination.addresses
        if not addresses:
            raise ValueError(f"no address to connect to for {destination.host!r}")
        if (
            len(addresses) == 1
            and tls is None
            and parent is None
            and self.parent is None
            and isinstance(factory, OutboundFactory)
        ):
            # Nothing to race: one connectTCP under the connect deadline.
            address = addresses[0]
            if isIPAddress(address):
                bind = self.bind4
            elif isIPv6Address(address):
                bind = self.bind6
            else:
                # Refused by connectAddress, and reported, as the race does.
                return _Race(self, destination, factory, tls, parent).result
            return _ConnectingOne(factory, destination, address, self.timeout).start(
                self.reactor, (bind, 0) if bind is not None else None
            )
        return _Race(self, destination, factory, tls, parent).result


class _Race:
    """
    One happy-eyeballs connect for L{Connector.connect}.

    Twisted's C{HostnameEndpoint} races addresses too, but it starts the
    next attempt only on its timer, never when an attempt fails, and learns
    that the last one failed only on its next tick: a refused address costs
    a full attempt delay.  It has no bound on the whole phase (its timeout
    is per attempt), one bind address for both families, and it takes a
    host name that it IDNA-encodes (refusing names such as C{foo_bar}), to
    be resolved again through the reactor.  Here the addresses are already
    vetted and each attempt is Twisted's own TCP connect (C{connectTCP}
    itself for our own protocols, L{Outbound}; an endpoint for others and
    for TLS); only the scheduling is ours.

    @ivar result: the L{Deferred} L{Connector.connect} returns.
    """

    def __init__(
        self,
        connector: Connector,
        destination: VettedDestination,
        factory: Factory,
        tls: Any,
        parent: ParentProxy | None = None,
    ) -> None:
        self._connector = connector
        self._destination = destination
        self._factory = factory
        self._tls = tls
        self._parent = parent
        self._waiting = list(attemptOrder(destination.addresses, connector.maxAttempts))
        self._tried: list[str] = []
        self._pending: list[tuple[str, Deferred]] = []
        self._done = False
        self._nextCall: IDelayedCall | None = None
        self.result: Deferred = Deferred(self._cancel)
        clock = connector.reactor
        self._deadline: IDelayedCall | None = clock.callLater(
            connector.timeout, self._timedOut
        )
        self._start()

    def _start(self) -> None:
        """
        Start an attempt on the next address, and plan the one after.
        """
        if self._nextCall is not None and self._nextCall.active():
            self._nextCall.cancel()
        self._nextCall = None
        address = self._waiting.pop(0)
        self._tried.append(address)
        if self._waiting:
            self._nextCall = self._connector.reactor.callLater(
                self._connector.attemptDelay, self._start
            )
        try:
            attempt = self._connector.connectAddress(
                address,
                self._destination.port,
                self._factory,
                self._tls,
                host=self._destination.host,
                parent=self._parent,
            )
        except Exception:
            self._failed(Failure(), address)
            return
        self._pending.append((address, attempt))
        attempt.addCallbacks(
            self._succeeded,
            self._failed,
            callbackArgs=(address,),
            errbackArgs=(address,),
        )

    def _forget(self, address: str) -> None:
        self._pending = [(a, d) for a, d in self._pending if a != address]

    def _succeeded(self, protocol: Any, address: str) -> None:
        self._forget(address)
        if self._done:
            # Cannot happen, as a loser is cancelled before it connects;
            # if it did, it must not live on unseen.
            protocol.transport.abortConnection()
            return
        self._stop()
        self.result.callback(protocol)

    def _failed(self, failure: Failure, address: str) -> None:
        self._forget(address)
        if self._done:
            # A loser, cancelled.
            return
        if failure.check(ConnectTimeoutError):
            # An attempt's own timeout is the whole phase's at the earliest.
            self._timedOut()
            return
        if self._waiting or self._pending:
            log.info(
                "Connecting to {address} for {host} failed ({error}); trying the other "
                "addresses",
                address=address,
                host=self._destination.host,
                error=failure.getErrorMessage(),
            )
        if self._waiting:
            self._start()
            return
        if not self._pending:
            self._stop()
            self.result.errback(self._error(failure, address))

    def _error(self, failure: Failure, address: str) -> Failure:
        destination = self._destination
        if len(self._tried) == 1 or failure.check(ProxyError):
            return connectError(
                failure,
                destination.host,
                address,
                destination.port,
                self._connector.timeout,
            )
        return Failure(
            ProxyError(
                Reason.CONNECT_FAILED,
                f"TCP connection to {hostPort(destination.host, destination.port)} "
                "failed "
                f"on all {len(self._tried)} addresses tried "
                f"({', '.join(self._tried)}), "
                f"the last: {_describe(failure)}",
            )
        )

    def _timedOut(self) -> None:
        self._deadline = None
        self._stop()
        destination = self._destination
        where = hostPort(destination.host, destination.port)
        timeout = self._connector.timeout
        parent = self._parent or self._connector.via(destination.host, self._tried[-1])
        through = f" through {parent}" if parent is not None else ""
        if len(self._tried) == 1:
            message = (
                f"Connecting to {where} ({self._tried[0]}){through} "
                f"timed out after {timeout:g} s"
            )
        else:
            message = (
                f"Connecting to {where}{through} timed out after {timeout:g} s "
                f"trying {len(self._tried)} addresses ({', '.join(self._tried)})"
            )
        self.result.errback(Failure(ProxyError(Reason.UPSTREAM_TIMEOUT, message)))

    def _stop(self) -> None:
        """
        No more attempts: cancel the timers and every pending attempt.
        """
        self._done = True
        for call in (self._nextCall, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._nextCall = self._deadline = None
        pending, self._pending = self._pending, []
        for _, attempt in pending:
            attempt.cancel()

    def _cancel(self, result: Deferred) -> None:
        # Our caller gave up (the client went away); the Deferred then
        # fails with CancelledError by itself.
        self._stop()


def connectError(
    failure: Failure, host: str, address: str, port: int, timeout: float
) -> Failure:
    """
    Translate a connection failure into the L{ProxyError} the client sees.
    """
    if failure.check(ProxyError):
        return failure
    where = hostPort(host, port)
    if failure.check(ConnectTimeoutError):
        return Failure(
            ProxyError(
                Reason.UPSTREAM_TIMEOUT,
                f"Connecting to {where} ({address}) timed out after {timeout:g} s",
            )
        )
    return Failure(
        ProxyError(
            Reason.CONNECT_FAILED,
            f"TCP connection to {where} ({address}) failed: {_describe(failure)}",
        )
    )


def _describe(failure: Failure) -> str:
    # ConnectionRefusedError's message is "Connection was refused by other
    # side: 111: Connection refused." -- keep the part a person reads.
    text = failure.getErrorMessage()
    return text.rstrip(".").split(": ")[-1] or failure.value.__class__.__name__


class Outbound(Protocol):
    """
    A protocol that L{Connector} connects with C{connectTCP} itself rather
    than through an endpoint: it fires the connect's L{Deferred} once it is
    connected, which is what the endpoint's wrapper protocol is for.
    """

    # The Deferred of the connect that built this protocol, until it fires.
    connecting: Deferred | None = None

    def makeConnection(self, transport: Any) -> None:
        Protocol.makeConnection(self, transport)
        connecting = self.connecting
        if connecting is not None:
            self.connecting = None
            connecting.callback(self)


class OutboundFactory(Factory):
    """
    A factory of L{Outbound} protocols, which L{Connector} connects
    without an endpoint (for plain TCP; TLS still goes through
    C{wrapClientTLS}).
    """

    noisy = False

    def buildProtocol(self, addr: Any) -> Outbound | None:
        raise NotImplementedError()


class _Connected(ClientFactory):
    """
    The factory of every connector whose connection L{_Connecting} made,
    once it is made: one shared instance, with nothing of any connection.
    """

    noisy = False

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        # The connector and its transport refer to each other, and Twisted
        # leaves that cycle (and through the transport the protocols and
        # exchanges of the connection) to the garbage collector; the
        # connection is over, so the connector's reference goes, as
        # stopConnecting drops it.
        connector.transport = None


_CONNECTED = _Connected()


class _Connecting(ClientFactory):
    """
    One C{connectTCP} of an L{OutboundFactory}'s protocol: what the
    endpoint's wrapper factory does, without a wrapper protocol.  The
    connector (and through it the transport) keeps this factory for the
    connection's life, so it lets go of everything once the connect is
    over.
    """

    noisy = False

    def __init__(self, factory: OutboundFactory) -> None:
        self.factory: OutboundFactory | None = factory
        self.connector: Any = None
        self.deferred: Deferred | None = None

    def connect(
        self,
        reactor: Any,
        address: str,
        port: int,
        timeout: float | None,
        bindAddress: tuple[str, int] | None,
    ) -> Deferred:
        """
        Start the connect.

        @return: a L{Deferred} that fires with the connected protocol, or
            fails with the connect's error; cancelling it stops the
            connect.
        """
        d = self.deferred = Deferred(self._cancel)
        if isinstance(reactor, PosixReactorBase):
            # reactor.connectTCP with a lean transport (proxy_app.transport).
            LeanConnector(address, port, self, timeout, bindAddress, reactor).connect()  # type: ignore[arg-type]
        else:
            # Any other reactor (the tests' memory reactors) as it is.
            reactor.connectTCP(
                address, port, self, timeout=timeout, bindAddress=bindAddress
            )
        return d

    def startedConnecting(self, connector: Any) -> None:
        self.connector = connector

    def buildProtocol(self, addr: Any) -> Outbound | None:
        factory, self.factory = self.factory, None
        d, self.deferred = self.deferred, None
        connector, self.connector = self.connector, None
        if factory is None or d is None or d.called:
            return None
        try:
            protocol = factory.buildProtocol(addr)
        except BaseException:
            d.errback()
            return None
        if protocol is None:
            d.errback(ValueError(f"{factory!r} built no protocol"))
            return None
        # It fires the Deferred once connected (Outbound.makeConnection).
        protocol.connecting = d
        if connector is not None:
            # The connector keeps its factory for the connection's life,
            # but this one has done its work: the shared one that ends
            # connections takes its place (idle tunnels are held by the
            # thousand).
            connector.factory = _CONNECTED
        return protocol

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        _Connected.clientConnectionLost(_CONNECTED, connector, reason)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.factory = self.connector = None
        d, self.deferred = self.deferred, None
        if d is not None and not d.called:
            d.errback(reason)

    def _cancel(self, d: Deferred) -> None:
        # Failed first, so that the failure stopping the connect reports
        # (UserError, through clientConnectionFailed) is not its result.
        self.factory = self.deferred = None
        d.errback(CancelledError())
        connector, self.connector = self.connector, None
        if connector is not None:
            connector.stopConnecting()


class _ConnectingOne(_Connecting):
    """
    The connect of a destination with a single vetted address, with no
    parent proxy and no TLS: one C{connectTCP}, without a L{_Race} around
    it.  The connect deadline is this object's one delayed call (the
    reactor is given no timeout of its own), and its failures are the
    race's: 504/1004 at the deadline, 502/1006 naming the address
    otherwise, L{CancelledError} when cancelled.
    """

    def __init__(
        self,
        factory: OutboundFactory,
        destination: VettedDestination,
        address: str,
        timeout: float,
    ) -> None:
        _Connecting.__init__(self, factory)
        self._destination = destination
        self._address = address
        self._timeout = timeout
        self._deadline: IDelayedCall | None = None

    def start(self, reactor: Any, bindAddress: tuple[str, int] | None) -> Deferred:
        """
        Start the connect and its deadline.

        @return: as L{_Connecting.connect}, but failing with the
            L{ProxyError} the client sees.
        """
        d = self.connect(
            reactor, self._address, self._destination.port, None, bindAddress
        )
        if self.deferred is not None:
            self._deadline = reactor.callLater(self._timeout, self._timedOut)
        return d

    def _stopDeadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def buildProtocol(self, addr: Any) -> Outbound | None:
        self._stopDeadline()
        return _Connecting.buildProtocol(self, addr)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self._stopDeadline()
        destination = self._destination
        _Connecting.clientConnectionFailed(
            self,
            connector,
            connectError(
                reason,
                destination.host,
                self._address,
                destination.port,
                self._timeout,
            ),
        )

    def _cancel(self, d: Deferred) -> None:
        self._stopDeadline()
        _Connecting._cancel(self, d)

    def _timedOut(self) -> None:
        self._deadline = None
        d, self.deferred = self.deferred, None
        self.factory = None
        connector, self.connector = self.connector, None
        if d is not None and not d.called:
            destination = self._destination
            where = hostPort(destination.host, destination.port)
            d.errback(
                ProxyError(
                    Reason.UPSTREAM_TIMEOUT,
                    f"Connecting to {where} ({self._address}) "
                    f"timed out after {self._timeout:g} s",
                )
            )
        if connector is not None:
            connector.stopConnecting()


class TLSHandshakeTimeout(ProxyError):
    """
    The TLS handshake with a destination did not finish in time.
    """


def _nothing() -> None:
    pass


class Timer:
    """
    One restartable timeout on an injected clock.
    """

    __slots__ = ("_clock", "seconds", "_onTimeout", "_call")

    def __init__(
        self, clock: IReactorTime, seconds: float, onTimeout: Callable[[], None]
    ) -> None:
        self._clock = clock
        self.seconds = seconds
        self._onTimeout = onTimeout
        self._call: IDelayedCall | None = None

    def start(self, seconds: float | None = None) -> None:
        """
        Start the timer, or restart it from now if it is running, to fire
        after its C{seconds} (or the C{seconds} given).
        """
        delay = self.seconds if seconds is None else seconds
        if self._call is not None and self._call.active():
            self._call.reset(delay)
        else:
            self._call = self._clock.callLater(delay, self._fire)

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def release(self) -> None:
        """
        Cancel the timer for good: it lets go of its callback (a bound
        method of its owner, which refers back to the timer), so that the
        owner is freed when its connection closes rather than left, a
        cycle, to the garbage collector.  Started again, it does nothing.
        """
        self.cancel()
        self._onTimeout = _nothing

    def _fire(self) -> None:
        self._call = None
        self._onTimeout()


class Deadlines:
    """
    The timeouts of one fixed duration (C{seconds}) on one delayed call.

    Each ends C{seconds} after it starts, so they end in the order they
    start: a queue in that order, with one delayed call at the end of its
    first, fires each exactly when a delayed call of its own would have,
    without making, sorting and cancelling one per timeout (about 18,000
    instructions each, by callgrind, per connection or request).  A
    cancelled timeout stays in the queue, dead, until it reaches the front
    or the queue is compacted; once no live timeout is left, the queue is
    emptied and its delayed call cancelled.
    """

    def __init__(self, clock: IReactorTime, seconds: float) -> None:
        self.clock = clock
        self.seconds = seconds
        # Entries [end, timer]; the timer None once dead.
        self._queue: deque[list[Any]] = deque()
        self._live = 0
        self._call: IDelayedCall | None = None
        self._firing = False

    def add(self, timer: QueuedTimer) -> list[Any]:
        entry = [self.clock.seconds() + self.seconds, timer]
        self._queue.append(entry)
        self._live += 1
        if self._call is None and not self._firing:
            self._call = self.clock.callLater(self.seconds, self._fire)
        return entry

    def renew(self, entry: list[Any]) -> list[Any]:
        """
        Restart the live C{entry}'s timer from now: the entry dies, and the
        new one returned takes its place (a keep-alive request's path).
        """
        timer = entry[1]
        entry[1] = None
        new = [self.clock.seconds() + self.seconds, timer]
        queue = self._queue
        queue.append(new)
        if len(queue) > 64 and len(queue) > 4 * self._live:
            self._queue = deque(e for e in queue if e[1] is not None)
        return new

    def remove(self, entry: list[Any]) -> None:
        if entry[1] is None:
            return
        entry[1] = None
        self._live -= 1
        queue = self._queue
        if not self._live:
            queue.clear()
            call, self._call = self._call, None
            if call is not None:
                call.cancel()
        elif len(queue) > 64 and len(queue) > 4 * self._live:
            self._queue = deque(e for e in queue if e[1] is not None)

    def _fire(self) -> None:
        self._call = None
        self._firing = True
        try:
            now = self.clock.seconds()
            while self._queue:
                entry = self._queue[0]
                timer = entry[1]
                if timer is not None and entry[0] > now:
                    break
                self._queue.popleft()
                if timer is not None:
                    entry[1] = None
                    self._live -= 1
                    try:
                        timer._expired()
                    except Exception:
                        # As the reactor does for a delayed call's error:
                        # logged, and the other timeouts still fire.
                        log.failure("Unhandled error in a timeout")
        finally:
            self._firing = False
        queue = self._queue
        if queue and self._call is None:
            self._call = self.clock.callLater(max(queue[0][0] - now, 0), self._fire)


class QueuedTimer:
    """
    A L{Timer} of its L{Deadlines}' fixed duration: the same C{start},
    C{cancel} and C{release}, without a delayed call of its own.
    """

    __slots__ = ("_deadlines", "_onTimeout", "_call")

    def __init__(self, deadlines: Deadlines, onTimeout: Callable[[], None]) -> None:
        self._deadlines = deadlines
        self._onTimeout = onTimeout
        # Its entry in the queue while it runs (where a L{Timer} has its
        # delayed call).
        self._call: list[Any] | None = None

    @property
    def seconds(self) -> float:
        return self._deadlines.seconds

    def start(self) -> None:
        """
        Start the timer, or restart it from now if it is running.
        """
        if self._onTimeout is _nothing:
            # Released.
            return
        entry = self._call
        if entry is not None and entry[1] is not None:
            self._call = self._deadlines.renew(entry)
        else:
            self._call = self._deadlines.add(self)

    def cancel(self) -> None:
        entry, self._call = self._call, None
        if entry is not None:
            self._deadlines.remove(entry)

    def release(self) -> None:
        """
        As L{Timer.release}: cancelled for good, its callback let go of.
        """
        self.cancel()
        self._onTimeout = _nothing

    def _expired(self) -> None:
        self._call = None
        self._onTimeout()


# Request headers and response headers that belong to one hop, never to be
# passed on.  Transfer-Encoding is re-created from the body's framing.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


# Never passed on: the hop-by-hop headers, Content-Length, since framing
# is re-created for the next hop (see framingHeaders), and Smokescreen's
# X-Upstream-Https-Proxy, which is for this proxy (and honoured on CONNECT
# only).
NOT_PASSED = HOP_BY_HOP | {b"content-length", b"x-upstream-https-proxy"}


def endToEndHeaders(
    head: Any, drop: frozenset[bytes] = NOT_PASSED
) -> list[tuple[bytes, bytes]]:
    """
    The headers of a message (a L{proxy_app.http1.RequestHead} or
    L{ResponseHead}) less those named in C{drop} (lower case; by default
    L{NOT_PASSED}, and callers that add names should start from it),
    C{Connection}'s named ones and C{X-WhSentry-*}, keeping the sender's
    casing and order.
    """
    for name, value in head.headers:
        if name == b"connection":
            drop = drop | {t.strip().lower() for t in value.split(b",") if t.strip()}
    return [
        raw
        for (name, _), raw in zip(head.headers, head.raw, strict=True)
        if name not in drop and not name.startswith(b"x-whsentry-")
    ]


def framingHeaders(head: Any) -> list[tuple[bytes, bytes]]:
    """
    The framing the sender used, to be repeated on the next hop: its
    C{Content-Length}, or C{Transfer-Encoding: chunked}.
    """
    if head.chunked:
        return [(b"Transfer-Encoding", b"chunked")]
    if head.contentLength is not None:
        return [(b"Content-Length", b"%d" % head.contentLength)]
    return []


class PoolKey(NamedTuple):
    """
    What two requests must share to share an upstream connection: the
    vetted address and port, (for TLS) the server name and client
    identity, and the parent proxy it goes through (its L{ParentProxy.key},
    or L{None} for a direct connection).  (A named tuple: one is made for
    every request.)
    """

    address: str
    port: int
    tls: Any = None
    via: Any = None


@attr.s(frozen=True, slots=True, auto_attribs=True)
class TLSSettings:
    """
    How to speak TLS to a destination.

    @ivar host: the name sent as SNI and verified.
    @ivar alias: the client identity's alias, or L{None}.
    @ivar creator: the C{IOpenSSLClientConnectionCreator}.
    """

    host: str
    alias: str | None
    creator: Any = attr.ib(eq=False, hash=False, repr=False)


@implementer(IHandshakeListener)
class UpstreamHTTP(Outbound):
    """
    One HTTP/1.1 connection to an origin, carrying one request at a time
    and kept in the L{UpstreamPool} between requests.

    @ivar ready: fires when the connection can carry a request: at once
        for plain TCP, after the handshake for TLS; fails with a
        L{ProxyError} if the connection is lost first.  (A plain
        connection's is made only when asked for.)
    @ivar closed: fires with L{None} once the connection is lost (made
        only when asked for).
    """

    # A TCP or TLS transport: producer, consumer, half-closeable, abortable.
    transport: Any
    # The address of the destination the connection leads to, set by the
    # factory that built it (through a parent proxy, the transport's peer
    # is the parent).
    destinationAddress: Any = None

    def __init__(
        self, pool: UpstreamPool, key: PoolKey, tls: TLSSettings | None = None
    ) -> None:
        self.pool = pool
        self.key = key
        self.tls = tls
        # Made when first asked for (L{ready}, L{closed}), except a TLS
        # connection's C{ready}, which its handshake's wait needs: a plain
        # connection's are never asked for on a request's path, and two
        # Deferreds fired for no one cost a Connection: close request 1.5%.
        self._ready: Deferred | None = Deferred() if tls is not None else None
        self._closed: Deferred | None = None
        self._lost = False
        self._reader = ResponseReader(self)
        self._chunked = False
        self._requestSent = False
        self.sink: Any = None
        self.reused = False
        self.created = 0.0
        self.responseStarted = False
        # Whether the origin sent anything for the request in progress, and
        # whether it closed the connection without having done so (the one
        # failure a retry may follow).
        self._answered = False
        self.closedUnanswered = False
        self._idle = Timer(pool.clock, pool.readTimeout, self._idleTimeout)
        self._lifetime = QueuedTimer(pool.lifetimes, self._lifetimeExpired)

    def connectionMade(self) -> None:
        self.created = self.pool.clock.seconds()
        # The lifetime covers the connect (and TLS handshake) and then each
        # request; an old pooled connection is retired by the pool rather
        # than cut under a request that just started on it.
        self._lifetime.start()
        if self.tls is None and self._ready is not None:
            self._ready.callback(self)

    def handshakeCompleted(self) -> None:
        if not self.ready.called:
            self.ready.callback(self)

    @property
    def ready(self) -> Deferred:
        ready = self._ready
        if ready is None:
            # Plain TCP: ready once connected.
            if self._lost:
                ready = succeed(None)
            elif self.connected:
                ready = succeed(self)
            else:
                ready = Deferred()
            self._ready = ready
        return ready

    @property
    def closed(self) -> Deferred:
        """
        A L{Deferred} that fires with L{None} once the connection is lost.
        """
        closed = self._closed
        if closed is None:
            closed = self._closed = succeed(None) if self._lost else Deferred()
        return closed

    # Sending the request.

    def sendRequest(
        self,
        sink: Any,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        chunked: bool = False,
    ) -> None:
        """
        Send a request head whose headers already say how the body is
        framed (C{chunked}, or a length, or none); the response is
        reported to C{sink}, an L{IResponseSink}.
        """
        self.sink = sink
        self.responseStarted = False
        self.closedUnanswered = False
        self._answered = False
        self._chunked = chunked
        self._requestSent = False
        self._reader.expect(bodiless=method == b"HEAD")
        self._lifetime.start()
        self._write(requestHead(method, target, headers))

    def sendData(self, data: bytes) -> None:
        if data:
            # (An empty chunk would end a chunked body.)
            self._write(chunk(data) if self._chunked else data)

    def sendEnd(self) -> None:
        self._requestSent = True
        if self._chunked:
            self._write(LAST_CHUNK)

    def _write(self, data: bytes) -> None:
        # The read timeout is for a connection on which nothing moves: an
        # upload in progress is not idle, however slow the origin's answer.
        # (An origin that stops reading stops the upload too, by
        # backpressure, and the timer then runs out.)
        self._idle.start()
        self.transport.write(data)

    # Receiving the response.

    def dataReceived(self, data: bytes) -> None:
        if self.sink is None:
            # An idle pooled connection has nothing to say; whatever it
            # sends makes it unusable: out of the pool at once, so that no
            # request is given it before it has closed.
            self.pool.forget(self)
            self.abort()
            return
        self._idle.start()
        self._answered = True
        try:
            self._reader.feed(data)
        except HeadError as e:
            self._fail(
                ProxyError(
                    Reason.CONNECT_FAILED,
                    f"{e.message} from {hostPort(self.key.address, self.key.port)}",
                )
            )
            return
        except Exception:
            # A bug in the exchange's handling of the response: the
            # exchange answers 500 (or cuts the client off), not Twisted's
            # "Unhandled Error" and a silent close.
            log.failure(
                "Internal error reading the response from {where}",
                where=hostPort(self.key.address, self.key.port),
            )
            self._fail(ProxyError(Reason.INTERNAL_ERROR, "Internal error in the proxy"))
            return
        if self._reader.complete:
            self._complete()
        elif self.sink is not None:
            self.sink.upstreamReadDone()

    # The ResponseReader's sink.

    def informational(self, head: ResponseHead) -> None:
        if self.sink is not None:
            self.sink.upstreamInformational(head)

    def head(self, head: ResponseHead) -> None:
        if self.sink is not None:
            self.responseStarted = True
            self.sink.upstreamResponse(head)

    def body(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink.upstreamData(data)

    def complete(self) -> None:
        # Reported once the read that completed it has been parsed; the
        # read timer goes on, as the idle timer of a pooled connection.
        pass

    def _complete(self) -> None:
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.upstreamDone()

    def finished(self) -> None:
        """
        The exchange is over: return the connection to the pool if both
        sides left it reusable, else close it.
        """
        self.sink = None
        reader = self._reader
        if (
            self.transport is not None
            and self._requestSent
            and reader.complete
            and reader.reusable
        ):
            self.reused = True
            # Its timers go on: the read timer restarts as the idle timer,
            # and the lifetime runs until the next request restarts it.
            self.pool.release(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.sink = None
        if self.transport is not None:
            self.transport.abortConnection()

    def _fail(self, error: ProxyError) -> None:
        sink, self.sink = self.sink, None
        self.abort()
        if sink is not None:
            sink.upstreamFailed(error)

    def _idleTimeout(self) -> None:
        where = hostPort(self.key.address, self.key.port)
        self._timedOut(
            f"{where} sent nothing for {self._idle.seconds:g} s (read timeout)"
        )

    def _lifetimeExpired(self) -> None:
        where = hostPort(self.key.address, self.key.port)
        self._timedOut(
            f"The connection to {where} exceeded its lifetime of "
            f"{self._lifetime.seconds:g} s"
        )

    def _timedOut(self, message: str) -> None:
        if self.sink is None:
            # Idle in the pool: out of it first, so that no request is
            # given a connection that is closing, then let it go quietly.
            self.pool.forget(self)
            self.transport.loseConnection()
            return
        self._fail(ProxyError(Reason.UPSTREAM_TIMEOUT, message))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        try:
            self._connectionLost(reason)
        finally:
            # What refers back to this connection lets go of it, so that it
            # is freed now rather than left, a cycle, to the garbage
            # collector: the timers' callbacks, the reader (and its
            # parser), and C{ready}'s result (this connection).
            self._idle.release()
            self._lifetime.release()
            self._reader.release()
            ready = self._ready
            if ready is not None and ready.called:
                self._ready = succeed(None)

    def _connectionLost(self, reason: Failure) -> None:
        self._idle.cancel()
        self._lifetime.cancel()
        self.pool.forget(self)
        self._lost = True
        if self._closed is not None:
            self._closed.callback(None)
        ready = self._ready
        if ready is not None and not ready.called:
            where = hostPort(
                self.tls.host if self.tls else self.key.address, self.key.port
            )
            self.ready.errback(
                tlsError(reason, self.tls.host if self.tls else "", where)
            )
            return
        if self.sink is None:
            return
        if (
            self.tls is not None
            and not self.responseStarted
            and reason.check(SSL.Error)
        ):
            # With TLS 1.3 a server refuses a client certificate (or its
            # absence) only after the client thinks the handshake is done.
            sink, self.sink = self.sink, None
            where = hostPort(self.tls.host, self.key.port)
            sink.upstreamFailed(tlsError(reason, self.tls.host, where))
            return
        # A close is how a close-delimited response ends; anything else
        # cuts the response short.
        self.closedUnanswered = not self._answered
        if self._reader.finish():
            self._complete()
        else:
            self._fail(self._cutShort())

    def _cutShort(self) -> ProxyError:
        return ProxyError(
            Reason.CONNECT_FAILED,
            f"The connection to {hostPort(self.key.address, self.key.port)} "
            "closed before the response was complete",
        )


class UpstreamPool:
    """
    Persistent upstream connections, kept idle between requests and keyed
    by L{PoolKey}, so that a request reuses a connection only to the very
    address (and TLS identity) it was vetted for.

    @ivar maxIdlePerKey: how many idle connections to keep for one key.
    """

    def __init__(
        self,
        connector: Connector,
        clock: IReactorTime,
        readTimeout: float,
        lifetime: float,
        maxIdlePerKey: int = 256,
    ) -> None:
        self.connector = connector
        self.clock = clock
        self.readTimeout = readTimeout
        self.lifetime = lifetime
        self.maxIdlePerKey = maxIdlePerKey
        self._idle: dict[PoolKey, list[UpstreamHTTP]] = {}
        # Every connection's lifetime, on one delayed call.
        self.lifetimes = Deadlines(clock, lifetime)

    def acquire(
        self,
        destination: VettedDestination,
        tls: TLSSettings | None = None,
        reuse: bool = True,
    ) -> UpstreamHTTP | Deferred:
        """
        Get a connection to one of C{destination}'s addresses: an idle one
        from the pool if there is one, else a new one (its TLS handshake
        done, if any).

        @return: an idle L{UpstreamHTTP}, or a L{Deferred} firing with a new
            one.
        """
        tlsKey = (tls.host, tls.alias) if tls is not None else None
        oldest = self.clock.seconds() - self.lifetime
        connector = self.connector
        for address in destination.addresses if reuse else ():
            parent = (
                connector.via(destination.host, address) if connector.parent else None
            )
            key = PoolKey(
                address,
                destination.port,
                tlsKey,
                parent.key if parent is not None else None,
            )
            idle = self._idle.get(key)
            while idle:
                connection = idle.pop()
                if connection.created <= oldest:
                    # Past its lifetime: retire it instead of reusing it.
                    connection.transport.loseConnection()
                    continue
                return connection
        factory = _KeyedFactory(self, destination, tls)
        d = self.connector.connect(
            destination, factory, tls.creator if tls is not None else None
        )
        if tls is None:
            return d

        def handshake(connection: UpstreamHTTP) -> Deferred:
            where = hostPort(tls.host, destination.port)
            timeout = self.connector.timeout

            def timedOut(result: Any, timeout: float) -> None:
                connection.abort()
                raise TLSHandshakeTimeout(
                    Reason.UPSTREAM_TIMEOUT,
                    f"TLS handshake with {where} timed out after {timeout:g} s",
                )

            return connection.ready.addTimeout(timeout, self.clock, timedOut)

        return d.addCallback(handshake)

    def release(self, connection: UpstreamHTTP) -> None:
        """
        Keep an idle connection for reuse, up to C{maxIdlePerKey}.
        """
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= self.maxIdlePerKey:
            connection.transport.loseConnection()
            return
        idle.append(connection)
        connection.transport.resumeProducing()
        connection._idle.start()

    def forget(self, connection: UpstreamHTTP) -> None:
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.key]

    def closeIdle(self) -> Deferred:
        """
        Close every idle connection (on shutdown).

        @return: a L{Deferred} that fires when they have all closed.
        """
        closing = []
        for connections in list(self._idle.values()):
            for connection in list(connections):
                closing.append(connection.closed)
                connection.transport.loseConnection()
        return DeferredList(closing)

    def idleCount(self) -> int:
        return sum(len(v) for v in self._idle.values())


class _KeyedFactory(OutboundFactory):
    """
    Builds an L{UpstreamHTTP} whose pool key names the address actually
    connected to.
    """

    noisy = False

    def __init__(
        self,
        pool: UpstreamPool,
        destination: VettedDestination,
        tls: TLSSettings | None,
    ) -> None:
        self.pool = pool
        self.host = destination.host
        self.port = destination.port
        self.tls = tls

    def buildProtocol(self, addr: Any) -> UpstreamHTTP:
        tlsKey = (self.tls.host, self.tls.alias) if self.tls is not None else None
        # Through a parent, addr is the vetted address the tunnel leads to.
        parent = self.pool.connector.via(self.host, addr.host)
        key = PoolKey(
            addr.host, self.port, tlsKey, parent.key if parent is not None else None
        )
        protocol = UpstreamHTTP(self.pool, key, self.tls)
        # Where it leads: the exchange names it without asking the
        # transport again (through a parent, the transport's peer is the
        # parent).
        protocol.destinationAddress = addr
        return protocol


@implementer(IHalfCloseableProtocol)
class UpstreamTunnel(Outbound):
    """
    The upstream leg of a CONNECT tunnel: bytes from the origin go straight
    to the client's transport.

    @ivar peer: the client-side protocol, with C{tunnelData(bytes)},
        C{tunnelReadClosed()} and C{tunnelLost(reason)}.
    """

    peer: Any = None
    transport: Any
    # Once the tunnel has moved proxy_app.splice.SPLICE_AFTER bytes one way:
    # its Splice, or False if it cannot be spliced (ConnectExchange).
    splice: Any = None
    # As UpstreamHTTP's (set by UpstreamTunnelFactory and ParentHandshake).
    destinationAddress: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.peer.upstreamTunnelData(data)

    def readConnectionLost(self) -> None:
        self.peer.upstreamTunnelReadClosed()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.peer is not None:
            self.peer.upstreamTunnelLost(reason)


class UpstreamTunnelFactory(OutboundFactory):
    def buildProtocol(self, addr: Any) -> UpstreamTunnel:
        protocol = UpstreamTunnel()
        # As _KeyedFactory's.
        protocol.destinationAddress = addr
        return protocol
