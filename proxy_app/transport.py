"""
Keep-alive TCP connections that send what a read event wrote at the end of
that event.

Twisted's C{write} only buffers and asks the reactor for write events
(C{startWriting}: an C{epoll_ctl}); the send happens on the reactor's next
pass, in C{doWrite}, which then gives the write events back (another
C{epoll_ctl}).  A forwarded keep-alive request is two such writes (the
request to the origin, the response to the client): four C{epoll_ctl}, two
extra event dispatches and some forty Python calls, for bytes the socket
could have taken at once.

Sending inside C{write} itself is no better: a response head and its body
written in one event would then go out as two sends (the second session
measured that, docs/benchmarks.md).  So the transports here keep Twisted's
coalescing and only drop the round trip through the reactor:

  - While a lean transport's C{doRead} runs (the protocol's
    C{dataReceived} and everything it calls), C{startWriting} on any lean
    transport that is connected, not closing and not already waiting for
    write events does not register with the reactor: the transport is
    queued, once.
  - When the outermost such C{doRead} ends, each queued transport runs
    C{doWrite} at once: one send for everything written to it during the
    event.  If it still wants writing afterwards (C{doWrite} did not call
    C{stopWriting}: data left over, C{EAGAIN}) or C{doWrite} returned
    anything but L{None} (the connection is lost), it registers as it
    always would, and the reactor's next C{doWrite} takes over exactly as
    it does without this module: errors, closes and producers.  A producer
    resumed by the flush that writes again queues its transport again; the
    flush runs until the queue is empty.
  - If C{dataReceived} raises, every queued transport registers as usual
    (what happens without this module) before the exception goes on to the
    reactor.
  - Everything else goes the usual way: writes from timers and Deferred
    callbacks outside a read, writes to a transport that is closing
    (C{loseConnection}, C{loseWriteConnection}, C{abortConnection}), and
    every transport that has not become lean.

Only connections that have shown they are kept alive become lean (the
fifth session made every connection lean, and a C{Connection: close}
request paid 4% more instructions for the overrides, where only one write
in two could take the lean path; docs/benchmarks.md): L{becomeLean}
switches the class of a plain C{tcp.Server} or C{tcp.Client} to
L{LeanServer} or L{LeanClient}, subclasses that add no slots (so the
assignment is legal and the instance keeps every attribute), when a client
connection's exchange is over and it waits for the next request, and when
an origin connection goes back to the pool.  A short connection runs
Twisted's own code, untouched; a lean one pays for one reactor round trip
fewer per write.

The bytes of one transport stay in its own buffer and go out in order,
through Twisted's own C{doWrite}; the queue only decides when that runs, so
nothing can reach another transport, overtake earlier bytes, or follow a
close.  The state tracked here (closing, waiting for write events) is our
own, from our own overrides: no private attribute of Twisted's is read or
written.  Twisted's own registration before the switch is not known, so a
transport that becomes lean is taken as waiting for write events: its next
write registers the usual way, and the C{stopWriting} of the C{doWrite}
that sends it (which gives the write events back, registered or not)
makes the state exact from then on.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class _Flush:
    """
    The process-wide state of the lean transports: one reactor thread runs
    them all.

    @ivar active: whether a lean C{doRead} is running (and then its flush).
    @ivar pending: the transports queued to write at the end of it, in the
        order they were first written to.
    """

    def __init__(self) -> None:
        self.active = False
        self.pending: list[_LeanMixin] = []


_flush = _Flush()

# The methods the hot overrides below extend, called directly: super() from
# the mixin walks the rest of a long MRO (a dictionary lookup per class) on
# every call, which cost more than the reactor round trip this module saves.
# Twisted's tcp.Server and tcp.Client both inherit these unchanged (a test
# checks it).
_doRead = tcp.Connection.doRead
_startWriting = tcp.Connection.startWriting
_stopWriting = tcp.Connection.stopWriting


class _LeanMixin(tcp.Connection):
    """
    What L{LeanServer} and L{LeanClient} add to Twisted's TCP transports.
    No instance is made of it: L{becomeLean} switches a transport's class
    and sets its attributes.

    @ivar _leanWriting: C{True} when this transport may be waiting for
        write events (C{startWriting} went through, or it became lean
        while Twisted's own state was unknown) and has not given them back
        (C{stopWriting}); C{False} when it is not; L{None} while the flush
        runs its C{doWrite}, until that calls C{stopWriting} (all sent).
        Every registration goes through C{startWriting}, so it is never
        C{False} while the transport is registered.
    @ivar _leanQueued: whether it is in the queue of the running flush.
    @ivar _leanClosing: whether C{loseConnection}, C{loseWriteConnection}
        or C{abortConnection} was called: from then on it writes the usual
        way.
    """

    _leanWriting: bool | None
    _leanQueued: bool
    _leanClosing: bool

    def doRead(self) -> Any:
        # _leanEvent, inlined: this runs for every read.
        state = _flush
        if state.active:
            return _doRead(self)
        state.active = True
        try:
            try:
                why = _doRead(self)
            except BaseException:
                _registerAll(state)
                raise
            if state.pending:
                _run(state)
        finally:
            state.active = False
        return why

    def startWriting(self) -> None:
        if (
            _flush.active
            and not self._leanWriting
            and not self._leanClosing
            and self.connected
        ):
            if not self._leanQueued:
                self._leanQueued = True
                _flush.pending.append(self)
            return
        self._leanWriting = True
        _startWriting(self)

    def stopWriting(self) -> None:
        # Only a transport that may have registered has anything to give
        # back (the flush's doWrite calls this on one that never did).
        registered = self._leanWriting
        self._leanWriting = False
        if registered:
            _stopWriting(self)

    def loseConnection(self, *args: Any, **kwargs: Any) -> None:
        self._leanClosing = True
        super().loseConnection(*args, **kwargs)

    def loseWriteConnection(self) -> None:
        self._leanClosing = True
        super().loseWriteConnection()

    def abortConnection(self) -> None:
        self._leanClosing = True
        super().abortConnection()

    def _leanRegister(self) -> None:
        """
        Ask the reactor for write events, as C{startWriting} does outside a
        read.
        """
        self._leanWriting = True
        _startWriting(self)


def _registerAll(state: _Flush) -> None:
    """
    Let every queued transport wait for write events the usual way.
    """
    pending, state.pending = state.pending, []
    for transport in pending:
        transport._leanQueued = False
        if not (
            transport._leanClosing or transport._leanWriting or not transport.connected
        ):
            transport._leanRegister()


def _run(state: _Flush) -> None:
    """
    Write what the queued transports hold, until none is queued.
    """
    pending = state.pending
    while pending:
        transport = pending.pop(0)
        transport._leanQueued = False
        if not transport.connected:
            # Lost meanwhile: its buffer went with it, as it would have.
            continue
        if transport._leanClosing or transport._leanWriting:
            # Registered since it was queued (a close registers: the
            # reactor finishes it), or aborted: nothing to do here.
            continue
        # Not registered, and doWrite's stopWriting (all sent) says that it
        # need not be.
        transport._leanWriting = None
        try:
            why = transport.doWrite()
        except BaseException:
            # What the reactor does when doWrite raises.
            log.failure("Writing to {transport}", transport=transport)
            transport.stopReading()
            transport.stopWriting()
            transport.connectionLost(Failure())
            continue
        if why is not None or transport._leanWriting is not False:
            transport._leanRegister()


class LeanServer(_LeanMixin, tcp.Server):
    """
    An accepted TCP connection whose writes during a read event are sent at
    its end (see the module docstring).
    """


class LeanClient(_LeanMixin, tcp.Client):
    """
    An outbound TCP connection whose writes during a read event are sent at
    its end (see the module docstring).
    """


# The classes that become lean, exactly (a subclass of Twisted's may
# override what the lean ones do), and what they become.
_lean: dict[type, type] = {tcp.Server: LeanServer, tcp.Client: LeanClient}


def becomeLean(transport: Any) -> None:
    """
    From now on, send what a read event writes to C{transport} at the
    event's end, if it is a plain Twisted TCP transport that is connected
    and not closing; any other transport (TLS, a test's, one already lean)
    is left as it is.

    Called for connections that have shown they are kept alive: a client
    connection waiting for its next request, an origin connection going
    back to the pool.
    """
    lean = _lean.get(transport.__class__)
    if lean is None or not transport.connected or transport.disconnecting:
        return
    # Twisted's registration for write events is not known here: taken as
    # registered (see the module docstring).
    transport._leanWriting = True
    transport._leanQueued = False
    transport._leanClosing = False
    transport.__class__ = lean
