"""
The tunnel exchange: a CONNECT request and, once the upstream connection
is up, the tunnel it becomes, two transports joined as each other's
producer with half-close passed through.
"""

from __future__ import annotations

from math import inf
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from proxy_app.exchange import Exchange
from proxy_app.http1 import RequestHead
from proxy_app.interfaces import IClientChannel
from proxy_app.reasons import ProxyError, Reason
from proxy_app.resolver import VettedDestination
from proxy_app.sniffer import TLSSniffer
from proxy_app.splice import SPLICE_AFTER, Splice, eligible
from proxy_app.target import Target
from proxy_app.upstream import UpstreamTunnel, UpstreamTunnelFactory

if TYPE_CHECKING:
    from proxy_app.channel import ProxyFactory

# The read size and write-buffer threshold of an established tunnel's two
# connections: a busy tunnel with a slow reader holds up to about twice this
# per direction.  (Relaying a 256 MiB file with glibc's allocator tuned:
# 64 KiB 690-716 MB/s, 256 KiB 837-907, 512 KiB 997-1,148, 2 MiB
# 1,355-1,365.)
TUNNEL_BUFFER = 524288

# What connectTo gives for a tunnel to intercept instead of a connection.
_INTERCEPT = object()


class ConnectExchange(Exchange):
    """
    A CONNECT request and, once the upstream connection is up, the tunnel
    it becomes: two transports joined as each other's producer, with
    half-close passed through.
    """

    proxyType = "connect"
    __slots__ = (
        "upstream",
        "_idleSince",
        "_expires",
        "_clientReadOpen",
        "_upstreamReadOpen",
        "_sniffer",
        "externalProxy",
        "mitm",
        "_session",
    )

    def __init__(
        self,
        protocol: IClientChannel,
        factory: ProxyFactory,
        request: RequestHead,
        target: Target,
    ) -> None:
        super().__init__(protocol, factory, request, target)
        self.upstream: UpstreamTunnel | None = None
        # Both limits of an established tunnel are kept by its factory's
        # TunnelWatch: when it was last seen idle (None: bytes moved since
        # the watch last looked; inf: idleness is not the tunnel's to
        # judge), and the end of its lifetime.
        self._idleSince: float | None = inf
        self._expires = inf
        self._clientReadOpen = True
        self._upstreamReadOpen = True
        # Only the control webhook wants the SNI.
        self._sniffer = TLSSniffer() if self.factory.webhook is not None else None
        # The proxy X-Upstream-Https-Proxy named: its parsed URL, then, once
        # admission has allowed and vetted it, the ParentProxy the tunnel
        # goes through.
        self.externalProxy: Any = None
        # With interception: the mitm_domains entry that selected this
        # tunnel, then the session inside it (proxy_app.mitm).
        self.mitm: Any = None
        self._session: Any = None

    def start(self) -> None:
        self._admit()

    def connectTo(self, destination: VettedDestination) -> Any:
        interception = self.factory.interception
        if interception is not None and self.externalProxy is None:
            # Decided once the CONNECT is admitted, for the role it
            # established; nothing is connected now: each request inside
            # is judged of its own and connects to what was admitted here
            # (proxy_app.mitm keeps it).
            assert self.target is not None
            self.mitm = interception.select(
                self.factory.access, self.role, self.target.host
            )
            if self.mitm is not None:
                return _INTERCEPT
        return self.factory.connector.connect(
            destination, UpstreamTunnelFactory(), parent=self.externalProxy
        )

    def _connectedOrStale(self, upstream: Any) -> None:
        if upstream is _INTERCEPT:
            self._pending = None
            self._intercept()
            return
        super()._connectedOrStale(upstream)

    @property
    def intercepted(self) -> bool:
        return self.mitm is not None

    @property
    def originatesTLS(self) -> bool:
        # An intercepted tunnel's inner requests leave over TLS.
        return self.mitm is not None

    def _intercept(self) -> None:
        """
        Answer the CONNECT and speak TLS to the client (L{proxy_app.mitm}).
        """
        if self.finished:
            return
        destination = self.destination
        assert destination is not None
        # The leaf first: should issuing it fail, the client is still
        # answered with an error, not a tunnel.
        session = self.factory.interception.start(self, self.mitm)
        # No connection was made: nothing to time, nothing to pool.
        for observer in self.factory.observers:
            observer.exchangeConnected(self, destination.addresses[0], True)
        self.status = 200
        if not self.protocol.sendTunnelEstablished():
            session.connectionLost(None)
            return
        self._session = session
        leftover = self.protocol.becomeTunnel(session)
        self.decisionLogged = True
        for observer in self.factory.observers:
            observer.tunnelEstablished(self)
        self.request.headers = self.request.raw = []
        self.destination = None
        # Idleness is the channel inside's to judge (between requests, as
        # on any keep-alive connection; within one, its exchange's read
        # timeout); the tunnel's lifetime still bounds the whole.
        self.factory.tunnelWatch.add(self, idle=False)
        if leftover:
            session.fromClient(leftover)
        self.protocol.resumeReading()

    def _connected(self, upstream: UpstreamTunnel) -> None:
        self.upstream = upstream
        upstream.peer = self
        self.status = 200
        if not self.protocol.sendTunnelEstablished():
            upstream.transport.loseConnection()
            return
        leftover = self.protocol.becomeTunnel(self)
        self.decisionLogged = True
        for observer in self.factory.observers:
            observer.tunnelEstablished(self)
        client = self.protocol.transport
        # Bulk data moves in larger reads (and is let pile up as far before
        # the other side is paused) than a request's 64 KiB.
        client.bufferSize = upstream.transport.bufferSize = TUNNEL_BUFFER
        # Wire the two transports together for flow control, as
        # twisted.protocols.portforward does.
        client.registerProducer(upstream.transport, True)
        upstream.transport.registerProducer(client, True)
        self.factory.tunnelWatch.add(self, idle=True)
        # What set the tunnel up is not needed any more (idle tunnels are
        # held by the thousand): the head's header lines, the connect step;
        # and the parser's copies of its method and version give way to
        # constants.
        request = self.request
        request.headers = request.raw = []
        request.method = b"CONNECT"
        request.version = "1.1" if request.version == "1.1" else "1.0"
        self.destination = None
        if leftover:
            self.fromClient(leftover)
        self.protocol.resumeReading()

    # Bytes each way.

    @property
    def sni(self) -> str | None:
        # An intercepted tunnel's: the SNI the client sent to the proxy's
        # own TLS, else the CONNECT host.
        session = self._session
        if session is not None:
            assert self.target is not None
            return session.sni or self.target.host
        # The ClientHello's through the tunnel, else the listener's.
        sniffer = self._sniffer
        sni = sniffer.sni if sniffer is not None else None
        return sni or self.protocol.serverName

    @property
    def application(self) -> str | None:
        if self._session is not None:
            return "http/1.1"
        sniffer = self._sniffer
        return "tls" if sniffer is not None and sniffer.isTLS else None

    @property
    def details(self) -> list[str] | tuple[()]:
        session = self._session
        return list(session.urls) if session is not None else ()

    def wireCounts(self) -> tuple[int, int]:
        # The CONNECT exchange, then the relayed bytes the connection left
        # to the tunnel to count.
        up, down = super().wireCounts()
        return up + self.bytesUp, down + self.bytesDown

    def _cancelTimer(self) -> None:
        self.factory.tunnelWatch.discard(self)

    def fromClient(self, data: bytes) -> None:
        self.bytesUp += len(data)
        if self._sniffer is not None:
            self._sniffer.feed(data)
            if self.statistics is not None:
                self.statistics.left(data)
        # Not idle (TunnelWatch): no clock read, no timer moved per chunk.
        self._idleSince = None
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.write(data)
            if self.bytesUp > SPLICE_AFTER:
                self._startSplice()

    def upstreamTunnelData(self, data: bytes) -> None:
        self.bytesDown += len(data)
        if self.statistics is not None:
            self.statistics.right(data)
        self._idleSince = None
        self.protocol.transport.write(data)
        if self.bytesDown > SPLICE_AFTER:
            self._startSplice()

    def _startSplice(self) -> None:
        """
        The tunnel has moved enough one way to be worth moving in the
        kernel, if it can be (L{proxy_app.splice}); it is decided once.
        The decision is kept on the upstream leg, whose instance dict
        holds it only for the tunnels that get this far: a slot here
        would make every tunnel, idle ones included, 16 bytes larger.
        """
        upstream = self.upstream
        if upstream is not None and upstream.splice is None:
            upstream.splice = Splice(self) if eligible(self) else False

    def _stopSplice(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.splice:
            upstream.splice.stop()

    # Closing, one direction at a time.

    def clientReadClosed(self) -> None:
        self._clientReadOpen = False
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseWriteConnection()
        self._closeIfDone()

    def clientWriteClosed(self) -> None:
        pass

    def upstreamTunnelReadClosed(self) -> None:
        self._upstreamReadOpen = False
        self.protocol.transport.loseWriteConnection()
        self._closeIfDone()

    def _closeIfDone(self) -> None:
        if not self._clientReadOpen and not self._upstreamReadOpen:
            self._close()

    def _close(self, abort: bool = False) -> None:
        self._cancelTimer()
        self._stopSplice()
        for transport in (
            self.protocol.transport,
            self.upstream.transport if self.upstream is not None else None,
        ):
            if transport is not None:
                if abort:
                    transport.abortConnection()
                else:
                    transport.loseConnection()

    def upstreamTunnelLost(self, reason: Failure | None) -> None:
        self._cancelTimer()
        self._stopSplice()
        if self.protocol.transport is not None:
            self.protocol.transport.loseConnection()

    def clientLost(self, reason: Failure | None) -> None:
        self._cancelTimer()
        self._stopSplice()
        session = self._session
        if session is not None:
            # What is inside ends first, so that its URLs are all listed.
            session.connectionLost(reason)
        if self.upstream is not None:
            self.upstream.peer = None
            if self.upstream.transport is not None:
                self.upstream.transport.loseConnection()
        if self.status == 200 and self.protocol.tunnel is not None:
            # The tunnel's line is written when it ends.
            self.record()
            for observer in self.factory.observers:
                observer.tunnelClosed(self)
            return
        super().clientLost(reason)

    def _timedOut(self, lifetime: bool) -> None:
        """
        Close the tunnel for the reason its L{TunnelWatch} found: its
        lifetime ended, or it was idle for the read timeout.
        """
        timeouts = self.factory.config.timeouts
        if lifetime:
            message = f"Tunnel exceeded its lifetime of {timeouts.lifetime:g} s"
        else:
            message = f"Tunnel idle for {timeouts.read:g} s (read timeout)"
        self.error = ProxyError(Reason.UPSTREAM_TIMEOUT, message)
        self._close()


class TunnelWatch:
    """
    The read (idle) timeout and the lifetime of one factory's established
    tunnels, kept by one coarse timer rather than a delayed call per
    tunnel: idle tunnels are held by the thousand, and a C{DelayedCall}
    with its bound methods is about half a KiB.

    A tunnel that moves bytes only notes it (its C{_idleSince} goes to
    L{None}: no clock read and no timer moved per chunk).  Every
    C{interval} seconds, an eighth of the shorter of the read timeout and
    the lifetime, the watch looks at each tunnel: one that moved bytes
    since the last look counts as idle from now; one idle for the read
    timeout, or past the end of its lifetime, is closed.  So an idle
    tunnel closes between T and T + T/8 after its last byte (T the read
    timeout; never before T), and any tunnel between the end of its
    lifetime and one interval after; later only by as much as the
    reactor runs a look late (the looks keep to their grid).  The timer
    runs only while there are tunnels.

    @ivar interval: seconds between looks.
    """

    __slots__ = (
        "_clock",
        "_read",
        "_lifetime",
        "interval",
        "_tunnels",
        "_call",
        "_next",
    )

    def __init__(self, clock: Any, read: float, lifetime: float) -> None:
        self._clock = clock
        self._read = read
        self._lifetime = lifetime
        self.interval = min(read, lifetime) / 8
        # A dict (its keys), not a set: about half the bytes per tunnel.
        self._tunnels: dict[ConnectExchange, None] = {}
        self._call: IDelayedCall | None = None
        self._next = 0.0

    def __len__(self) -> int:
        return len(self._tunnels)

    def add(self, tunnel: ConnectExchange, idle: bool) -> None:
        """
        Watch a tunnel established now: its lifetime starts, and with
        C{idle}, its read timeout too.
        """
        now = self._clock.seconds()
        tunnel._expires = now + self._lifetime
        tunnel._idleSince = now if idle else inf
        self._tunnels[tunnel] = None
        if self._call is None:
            self._next = now + self.interval
            self._call = self._clock.callLater(self.interval, self._look)

    def discard(self, tunnel: ConnectExchange) -> None:
        """
        Stop watching a tunnel (closing or closed); nothing if not watched.
        With the last tunnel gone, the timer stops.
        """
        tunnels = self._tunnels
        tunnels.pop(tunnel, None)
        if not tunnels:
            call, self._call = self._call, None
            if call is not None:
                call.cancel()

    def _look(self) -> None:
        self._call = None
        tunnels = self._tunnels
        now = self._clock.seconds()
        read = self._read
        over: list[tuple[ConnectExchange, bool]] = []
        for tunnel in tunnels:
            since = tunnel._idleSince
            if now >= tunnel._expires:
                over.append((tunnel, True))
            elif since is None:
                tunnel._idleSince = now
            elif now - since >= read:
                over.append((tunnel, False))
        # Closed after the look: closing one can end (and unwatch) others.
        for tunnel, lifetime in over:
            if tunnel in tunnels:
                del tunnels[tunnel]
                tunnel._timedOut(lifetime)
        if self._call is not None:
            # A tunnel added while closing others started the timer.
            return
        if tunnels:
            # On the interval's grid, so that a late look does not make
            # the next ones late too.
            interval = self.interval
            due = self._next + interval
            if due <= now:
                due = now + interval
            self._next = due
            self._call = self._clock.callLater(due - now, self._look)
