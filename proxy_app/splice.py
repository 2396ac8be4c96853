"""
A plain tunnel's bulk bytes moved in the kernel: C{os.splice} from one
socket into a pipe and from the pipe into the other socket, so that no
byte of a big download passes through Python.

A tunnel starts on the Python path (L{proxy_app.tunnel.ConnectExchange}'s
C{fromClient} and C{upstreamTunnelData}); once it has moved more than
L{SPLICE_AFTER} bytes in either direction, and only if it is eligible
(L{eligible}), both directions switch here together.  Small and idle
tunnels therefore never get pipes, nor any extra file descriptor.

The switch, in order:

  1. Both transports stop reading (C{pauseProducing}) and their producers
     (each other) are unregistered; a pull producer (L{_Flushed}) is
     registered on each instead, which Twisted's C{FileDescriptor} asks to
     resume whenever that transport's write buffer runs empty.  A
     transport whose buffer is empty is not among the reactor's writers
     (C{IReactorFDSet.getWriters}), nor holds writes a read event will send
     at its end (L{proxy_app.transport.writeQueued}: the switch is decided
     inside such an event, right after a write).  So every byte the Python path took
     in, the CONNECT 200 head first, reaches the kernel before the first
     spliced byte: nothing is lost or reordered.
  2. With both buffers empty, the pull producers go, two pipes are made,
     and one L{_End} per socket is registered with the reactor in place
     of its transport (which stays connected, neither reading nor
     writing).  One object per file descriptor because Twisted's epoll
     reactor keeps a single selectable per descriptor for reads and
     writes alike: an C{_End} reads its socket for the direction leaving
     it and writes its socket for the direction arriving.

Each direction (L{_Direction}) splices at most a pipe's worth from its
source into its pipe, then from the pipe into its sink.  Bytes the sink
will not take now stay in the pipe: the source is not read again until
the sink has taken them all (backpressure in the kernel; a reactor event
per step, never a loop that spins).  The source's end of stream, with
the pipe empty, shuts the sink's writing down and leaves the other
direction running; the tunnel closes when both are done, as on the
Python path.  A socket error aborts the tunnel.  L{Splice.stop} takes the
descriptors out of the reactor and closes the pipes; the tunnel calls it
on every way it closes, before its transports close as before.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorFDSet, ISSLTransport
from twisted.python.failure import Failure

from proxy_app.transport import writeQueued

# After how many bytes in one direction a tunnel switches to splicing.
# A 2 KiB webhook, or any exchange of a few requests, never does.
SPLICE_AFTER = 262144

# The pipe size asked for (F_SETPIPE_SZ; fs.pipe-max-size is 1 MiB by
# default).  Should the kernel refuse (an unprivileged user past
# fs.pipe-user-pages-soft), the pipe keeps its default size.
PIPE_SIZE = 1048576

_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0
# F_SETPIPE_SZ / F_GETPIPE_SZ (Linux): in fcntl from Python 3.10.
_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


def eligible(exchange: Any) -> bool:
    """
    Whether a tunnel's bytes may move in the kernel from now on: Linux's
    C{os.splice}; both legs plain TCP connections of Twisted's own
    (not TLS, not wrapped by any protocol wrapper) on a reactor providing
    L{IReactorFDSet}; not intercepted; its TLS sniffer (if any) decided;
    no per-connection statistics (they look at the bytes); both
    directions still open and neither connection closing.
    """
    if not hasattr(os, "splice"):
        return False
    if exchange.mitm is not None or exchange._session is not None:
        return False
    if exchange.statistics is not None:
        return False
    sniffer = exchange._sniffer
    if sniffer is not None and not sniffer.done:
        return False
    if not (exchange._clientReadOpen and exchange._upstreamReadOpen):
        return False
    upstream = exchange.upstream
    if upstream is None:
        return False
    client = exchange.protocol.transport
    server = upstream.transport
    for transport in (client, server):
        # The class itself: a TLS connection is a wrapper's transport,
        # and startTLS marks the connection ISSLTransport.
        if not isinstance(transport, tcp.Connection):
            return False
        if ISSLTransport.providedBy(transport):
            return False
        if not transport.connected or transport.disconnecting:
            return False
    reactor = client.reactor
    return server.reactor is reactor and IReactorFDSet.providedBy(reactor)


# Spliced tunnels now (each holds two pipes: four descriptors).
_spliced = [0]


def _room() -> bool:
    """
    Whether one more tunnel may take four descriptors for its pipes: the
    pipes of all spliced tunnels together hold at most a quarter of the
    open-file limit, so that a client opening many big tunnels cannot use
    them to leave no descriptor for connections (it gets the Python path
    instead).
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return True
    return (_spliced[0] + 1) * 4 <= soft // 4


def _pipe() -> tuple[int, int, int]:
    """
    A pipe for one direction: its read end, its write end, its size.
    """
    readFD, writeFD = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.fcntl(writeFD, _SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
    size = fcntl.fcntl(writeFD, _GETPIPE_SZ)
    return readFD, writeFD, size


class _End:
    """
    One socket of a spliced tunnel as the reactor sees it: read for the
    direction leaving it, written for the direction arriving.
    """

    __slots__ = ("_fd", "outgoing", "incoming", "reading", "writing", "_splice")

    def __init__(self, fd: int, splice: Splice) -> None:
        self._fd = fd
        self._splice = splice
        self.outgoing: Any = None
        self.incoming: Any = None
        self.reading = False
        self.writing = False

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "SpliceEnd"

    def doRead(self) -> None:
        if self.reading:
            self.outgoing.pump()

    def doWrite(self) -> None:
        if self.writing:
            self.incoming.drain()

    def connectionLost(self, reason: Failure) -> None:
        # The reactor found the socket hung up or in error.
        self._splice.failed()


class _Direction:
    """
    One direction of a spliced tunnel: source socket, pipe, sink socket.
    """

    __slots__ = (
        "_splice",
        "_source",
        "_sink",
        "_sourceFD",
        "_sinkFD",
        "_sinkSocket",
        "_readFD",
        "_writeFD",
        "_size",
        "_pending",
        "_eof",
        "_up",
    )

    def __init__(
        self, splice: Splice, source: _End, sink: _End, sinkSocket: Any, up: bool
    ) -> None:
        self._splice = splice
        self._source = source
        self._sink = sink
        self._sourceFD = source.fileno()
        self._sinkFD = sink.fileno()
        self._sinkSocket = sinkSocket
        self._readFD, self._writeFD, self._size = _pipe()
        self._pending = 0
        self._eof = False
        self._up = up
        source.outgoing = self
        sink.incoming = self

    def close(self) -> None:
        for fd in (self._readFD, self._writeFD):
            os.close(fd)
        self._readFD = self._writeFD = -1

    def pump(self) -> None:
        """
        The source is readable: move what it has (up to a pipe's worth)
        into the pipe, then on to the sink.
        """
        try:
            n = os.splice(self._sourceFD, self._writeFD, self._size, flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError:
            self._splice.failed()
            return
        splice = self._splice
        if n == 0:
            self._eof = True
            splice.reactor.removeReader(self._source)
            self._source.reading = False
            self._finish()
            return
        exchange = splice.exchange
        if self._up:
            exchange.bytesUp += n
        else:
            exchange.bytesDown += n
        # Not idle (TunnelWatch).
        exchange._idleSince = None
        self._pending = n
        self.drain()

    def drain(self) -> None:
        """
        Move what is in the pipe into the sink, as far as it takes it;
        then read the source again, or wait until the sink is writable.
        """
        pending = self._pending
        while pending:
            try:
                n = os.splice(self._readFD, self._sinkFD, pending, flags=_FLAGS)
            except BlockingIOError:
                break
            except OSError:
                self._splice.failed()
                return
            if n == 0:
                break
            pending -= n
        self._pending = pending
        reactor = self._splice.reactor
        source, sink = self._source, self._sink
        if pending:
            if source.reading:
                source.reading = False
                reactor.removeReader(source)
            if not sink.writing:
                sink.writing = True
                reactor.addWriter(sink)
            return
        if sink.writing:
            sink.writing = False
            reactor.removeWriter(sink)
        if self._eof:
            self._finish()
        elif not source.reading:
            source.reading = True
            reactor.addReader(source)

    def _finish(self) -> None:
        """
        The source ended and the pipe is empty: pass the half-close on.
        """
        if self._pending:
            return
        try:
            self._sinkSocket.shutdown(socket.SHUT_WR)
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                self._splice.failed()
                return
        exchange = self._splice.exchange
        if self._up:
            exchange._clientReadOpen = False
        else:
            exchange._upstreamReadOpen = False
        exchange._closeIfDone()


class _Flushed:
    """
    A pull producer on one transport while a tunnel switches: Twisted asks
    it to resume whenever the transport's write buffer runs empty.
    """

    __slots__ = ("_splice", "_transport")

    def __init__(self, splice: Splice, transport: Any) -> None:
        self._splice = splice
        self._transport = transport

    def resumeProducing(self) -> None:
        self._splice.flushed()

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        # The connection went while switching; the tunnel closes as
        # usual, and stops this.
        pass


class Splice:
    """
    A tunnel switching to, then moving its bytes by, C{os.splice}.

    @ivar exchange: the L{proxy_app.tunnel.ConnectExchange}.
    @ivar reactor: the reactor (an L{IReactorFDSet}) of both connections.
    """

    __slots__ = ("exchange", "reactor", "_client", "_server", "_ends", "_pipes")

    def __init__(self, exchange: Any) -> None:
        self.exchange = exchange
        self._client = client = exchange.protocol.transport
        self._server = server = exchange.upstream.transport
        self.reactor = client.reactor
        self._ends: tuple[_End, _End] | None = None
        self._pipes: tuple[_Direction, ...] = ()
        for transport in (client, server):
            transport.pauseProducing()
            transport.unregisterProducer()
        # Registering a pull producer asks it to resume at once (then
        # again each time the buffer runs empty): flushed() looks.
        for transport in (client, server):
            transport.registerProducer(_Flushed(self, transport), False)

    def flushed(self) -> None:
        """
        One transport's write buffer may have run empty: once both have,
        splice.
        """
        if self._ends is not None or self._client is None:
            return
        writers = self.reactor.getWriters()
        client, server = self._client, self._server
        if client in writers or server in writers:
            return
        # Written during this read event, sent at its end (a lean
        # transport, proxy_app.transport): its doWrite will ask again.
        if writeQueued(client) or writeQueued(server):
            return
        if client.disconnecting or server.disconnecting:
            return
        client.unregisterProducer()
        server.unregisterProducer()
        if not _room():
            # Connections come first: go on as before, in Python.
            self._fallBack()
            return
        clientEnd = _End(client.fileno(), self)
        serverEnd = _End(server.fileno(), self)
        self._ends = (clientEnd, serverEnd)
        try:
            self._pipes = (
                _Direction(self, clientEnd, serverEnd, server.getHandle(), True),
            )
            self._pipes += (
                _Direction(self, serverEnd, clientEnd, client.getHandle(), False),
            )
        except OSError:
            # Out of file descriptors: go on as before, in Python.
            self._fallBack()
            return
        _spliced[0] += 1
        for end in self._ends:
            end.reading = True
            self.reactor.addReader(end)

    def _fallBack(self) -> None:
        for direction in self._pipes:
            direction.close()
        self._pipes = ()
        self._ends = None
        self._client = self._server = None
        client, server = (
            self.exchange.protocol.transport,
            self.exchange.upstream.transport,
        )
        client.registerProducer(server, True)
        server.registerProducer(client, True)
        client.resumeProducing()
        server.resumeProducing()

    def failed(self) -> None:
        """
        A socket error: abort the tunnel, as the Python path's
        transports would.
        """
        self.exchange._close(abort=True)

    def stop(self) -> None:
        """
        Take the descriptors out of the reactor and close the pipes (the
        tunnel is closing); the transports then close as on the Python
        path.  Safe to call more than once.
        """
        client, server = self._client, self._server
        if client is None:
            return
        self._client = self._server = None
        ends, self._ends = self._ends, None
        if ends is None:
            # Still switching: the pull producers go.
            for transport in (client, server):
                if transport.producer is not None:
                    transport.unregisterProducer()
            return
        reactor = self.reactor
        for end in ends:
            if end.reading:
                end.reading = False
                reactor.removeReader(end)
            if end.writing:
                end.writing = False
                reactor.removeWriter(end)
        for direction in self._pipes:
            direction.close()
        self._pipes = ()
        _spliced[0] -= 1


__all__ = ["SPLICE_AFTER", "Splice", "eligible"]
