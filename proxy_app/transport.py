"""
TCP transports that send what a read event wrote at the end of that event.

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
    C{dataReceived} and everything it calls; a lean event, as is a
    connect's, below), C{startWriting} on any lean
    transport that is connected and not already waiting for write events
    does not register with the reactor: the transport is queued, once.
  - When the outermost such C{doRead} ends, each queued transport runs
    C{doWrite} at once: one send for everything written to it during the
    event.  If it still wants writing afterwards (C{doWrite} did not call
    C{stopWriting}: data left over, C{EAGAIN}), it registers as it always
    would, and the reactor's next C{doWrite} takes over exactly as it does
    without this module: errors, closes and producers.  A producer
    resumed by the flush that writes again queues its transport again; the
    flush runs until the queue is empty.
  - A close made during the event (Twisted's own C{loseConnection} and
    C{loseWriteConnection}, which ask for write events: the transport is
    queued) is done by the flush too: its C{doWrite} sends what is left
    and then shuts the write side (a half-close) or returns the close's
    reason.  Given a reason (that close, or a failed send: the peer reset),
    the flush does what the reactor's C{_disconnectSelectable} does with a
    C{doWrite}'s reason (the same in Twisted 23.10 and 26.10): the
    descriptor leaves the reactor's readers and writers
    (C{removeReader}, C{removeWriter}) and C{connectionLost} gets the
    reactor's own L{Failure} of L{ConnectionDone} or L{ConnectionLost}.
    A close that cannot send everything at once (C{EAGAIN}) registers, and
    the reactor's C{doWrite} sends the rest and then closes, as before.
  - A lean C{doRead} that reads the end of the stream or a reset (Twisted's
    C{doRead} returns a reason) does what the reactor would do next inside
    the event, as C{_disconnectSelectable} does for a read: C{removeReader}
    and, for the end of the stream, C{readConnectionLost} (a half-close),
    otherwise C{removeWriter} and C{connectionLost}; it then returns
    L{None}.  So the closes and writes the protocol makes then (a proxy
    closing the other side) are done at the end of the event.  Only for a
    transport not waiting for write events: the reactor polled that one
    for reads alone, so it calls no C{doWrite} after the C{doRead}; one
    waiting for write events returns the reason to the reactor as before.
  - The event completing an outbound connect (L{LeanClient.doConnect},
    which Twisted runs as the transport's C{doRead} and C{doWrite} until
    it is connected) is a lean event too: a new origin connection's
    request, a tunnel's 200 to its client, are sent at its end.
  - If C{dataReceived} raises, every queued transport registers as usual
    (what happens without this module) before the exception goes on to the
    reactor.
  - Everything else goes the usual way: writes from timers and Deferred
    callbacks outside an event, a hang-up the reactor's poll reports
    without data to read, and every transport not made here (TLS
    origination and the parent proxy, which connect through endpoints).
    An C{abortConnection} takes the transport out of the queue: what was
    written is dropped, as it would have been.

The bytes of one transport stay in its own buffer and go out in order,
through Twisted's own C{doWrite}; the queue only decides when that runs, so
nothing can reach another transport, overtake earlier bytes, or follow a
close, and a close still sends everything written before it.  The state
tracked here (waiting for write events, queued, being flushed) is our own,
from our own overrides, and kept on the flush rather than on the
transports (see L{_Flush}): no private attribute of Twisted's is read or
written, and a lean transport has exactly the instance attributes of
Twisted's own.

How they are installed, with public Twisted API where there is one:

  - Accepted connections: a listening C{tcp.Port} builds each connection's
    transport from its public C{transport} attribute; L{leanPort} sets it on
    the port instance, for every listener the proxy opens (with
    C{--workers}, each worker's shared listeners too).
  - Outbound connections: C{reactor.connectTCP} is
    C{tcp.Connector(...)} and C{connect()}; L{LeanConnector} is that
    connector with C{_makeTransport}, C{BaseConnector}'s hook for its
    subclasses (the same in Twisted 23.10 and 26; the one private name
    used, as the fifth session's branch did), building a L{LeanClient}.
    L{proxy_app.upstream}'s connect (the one way out to a destination)
    uses it on a real reactor (a C{PosixReactorBase}); any other reactor,
    such as the memory reactors of the tests, gets C{reactor.connectTCP}
    as before.  Nothing here connects anywhere.

Why every connection, not only kept-alive ones: switching a kept-alive
connection's class (C{__class__} assignment) gives it, in CPython 3.11, an
instance dictionary of its own, whose method loads no longer specialize;
that alone cost a keep-alive GET 3.4% more instructions, more than the
lean path saves there (docs/benchmarks.md, sixth session).  With no
attribute of their own, the lean transports cost a C{Connection: close}
request nothing measurable.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class _Flush:
    """
    The process-wide state of the lean transports: one reactor thread runs
    them all.  It is kept here rather than on the transports: an attribute
    name more on a transport can take its class past the 30 names CPython
    3.11 shares between instances, and every instance then gets a dictionary
    of its own (its method loads no longer specialize: +3% instructions on a
    C{Connection: close} request, measured).

    @ivar active: whether a lean C{doRead} is running (and then its flush).
    @ivar pending: the transports queued to write at the end of it, in the
        order they were first written to.
    @ivar writing: the lean transports waiting for write events: their
        C{startWriting} went through and they have not given them back
        (C{stopWriting}).  Every registration goes through C{startWriting},
        so a lean transport not in it is not registered.
    @ivar current: the transport whose C{doWrite} the flush is running,
        until that calls C{stopWriting} (all sent).
    """

    def __init__(self) -> None:
        self.active = False
        self.pending: list[_LeanMixin] = []
        self.writing: set[_LeanMixin] = set()
        self.current: _LeanMixin | None = None


_flush = _Flush()

# The reactor's (posixbase's _disconnectSelectable's faildict): one Failure
# each, shared by every connection.
_reasons = {
    ConnectionDone: Failure(ConnectionDone()),
    ConnectionLost: Failure(ConnectionLost()),
}

# The methods the overrides below extend, called directly: super() from the
# mixin walks the rest of a long MRO (a dictionary lookup per class) on
# every call, which cost more than the reactor round trip this module saves.
# Twisted's tcp.Server and tcp.Client both inherit these unchanged (a test
# checks it).
_doRead = tcp.Connection.doRead
_startWriting = tcp.Connection.startWriting
_stopWriting = tcp.Connection.stopWriting
_abortConnection = tcp.Connection.abortConnection
_doConnect = tcp.BaseClient.doConnect


class _LeanMixin(tcp.Connection):
    """
    What L{LeanServer} and L{LeanClient} add to Twisted's TCP transports:
    methods only, no attribute (see L{_Flush}).
    """

    def doRead(self) -> Any:
        # _leanEvent, inlined: this runs for every read.
        state = _flush
        if state.active:
            return _doRead(self)
        state.active = True
        try:
            try:
                why = _doRead(self)
                if why and self not in state.writing:
                    # The peer closed or reset: what the reactor would do
                    # next, done inside the event (its closes and writes are
                    # sent at its end).  Not waiting for write events, the
                    # descriptor was not polled for them, so the reactor
                    # calls no doWrite after this.
                    try:
                        _readLost(self, why)
                    except BaseException:
                        # A connectionLost that raises: logged, as the
                        # reactor would; returned, it would be called again.
                        log.failure("Closing {transport}", transport=self)
                    why = None
            except BaseException:
                _registerAll(state)
                raise
            if state.pending:
                _run(state)
        finally:
            state.active = False
        return why

    def startWriting(self) -> None:
        state = _flush
        if state.active and self not in state.writing and self.connected:
            pending = state.pending
            if self not in pending:
                pending.append(self)
            return
        state.writing.add(self)
        _startWriting(self)

    def stopWriting(self) -> None:
        # Only a transport that registered has anything to give back (the
        # flush's doWrite calls this on one that did not).
        state = _flush
        writing = state.writing
        if self in writing:
            writing.remove(self)
            _stopWriting(self)
        elif state.current is self:
            state.current = None

    # loseConnection and loseWriteConnection are Twisted's own: they ask for
    # write events (startWriting, above: queued during a read), and the
    # flush's doWrite then sends what is left and closes, as the reactor's
    # would.

    def abortConnection(self) -> None:
        # What was written is dropped: nothing to send, at the end of the
        # read or later.
        _abortConnection(self)
        pending = _flush.pending
        if self in pending:
            pending.remove(self)


def _register(transport: _LeanMixin) -> None:
    """
    Ask the reactor for write events, as C{startWriting} does outside a
    read.
    """
    _flush.writing.add(transport)
    _startWriting(transport)


def _readLost(transport: _LeanMixin, why: Any) -> None:
    """
    What the reactor does with a reason returned by C{transport.doRead}
    (C{_disconnectSelectable} with C{isRead} true, the same in Twisted 23.10
    and 26.10): stop reading and, for the end of the stream, tell the
    transport only its read side is lost (a half-close); otherwise stop
    writing too and tell it its connection is lost.
    """
    reactor = transport.reactor
    reactor.removeReader(transport)  # type: ignore[attr-defined]
    reason = _reasons.get(why.__class__)
    if reason is not None:
        if why.__class__ is ConnectionDone and IHalfCloseableDescriptor.providedBy(
            transport
        ):
            transport.readConnectionLost(reason)
            return
    else:
        reason = Failure(why)
    reactor.removeWriter(transport)  # type: ignore[attr-defined]
    transport.connectionLost(reason)


def _leanEvent(handler: Any, transport: Any) -> Any:
    """
    Run C{handler(transport)} (a connect event's C{doConnect}) as a lean
    C{doRead} runs: the lean transports' writes queued, and sent at its end.

    @return: what C{handler} returns.
    """
    state = _flush
    if state.active:
        return handler(transport)
    state.active = True
    try:
        try:
            why = handler(transport)
        except BaseException:
            _registerAll(state)
            raise
        if state.pending:
            _run(state)
    finally:
        state.active = False
    return why


def _registerAll(state: _Flush) -> None:
    """
    Let every queued transport wait for write events the usual way.
    """
    pending, state.pending = state.pending, []
    for transport in pending:
        if transport.connected and transport not in state.writing:
            _register(transport)


def _run(state: _Flush) -> None:
    """
    Write what the queued transports hold, until none is queued.
    """
    pending = state.pending
    while pending:
        transport = pending.pop(0)
        if not transport.connected or transport in state.writing:
            # Lost meanwhile (its buffer went with it, as it would have), or
            # registered since it was queued: nothing to do here.
            continue
        # Not registered, and doWrite's stopWriting (all sent) says that it
        # need not be.
        state.current = transport
        try:
            why = transport.doWrite()
        except BaseException:
            state.current = None
            # What the reactor does when doWrite raises.
            log.failure("Writing to {transport}", transport=transport)
            try:
                transport.stopReading()
                transport.stopWriting()
                transport.connectionLost(Failure())
            except BaseException:
                # As below: logged, and the rest of the queue still sent.
                log.failure("Closing {transport}", transport=transport)
            continue
        if why:
            # Sent everything and closed (loseConnection), or the connection
            # is lost (a failed send): what the reactor does with a
            # doWrite's reason.
            state.current = None
            try:
                _disconnect(transport, why)
            except BaseException:
                # A connectionLost that raises: the reactor's main loop
                # would log it; the rest of the queue is still sent.
                log.failure("Closing {transport}", transport=transport)
        elif why is not None or state.current is transport:
            state.current = None
            if transport not in state.writing:
                _register(transport)


def writeQueued(transport: Any) -> bool:
    """
    Whether C{transport} holds writes that the running read event will
    send at its end (it is not among the reactor's writers meanwhile).
    """
    return transport in _flush.pending


def _disconnect(transport: _LeanMixin, why: Any) -> None:
    """
    What the reactor does with a reason returned by C{transport.doWrite}
    (C{_disconnectSelectable} with C{isRead} false, the same in Twisted
    23.10 and 26.10): stop watching the descriptor and tell the transport
    its connection is lost, with the same L{Failure} for L{ConnectionDone}
    and L{ConnectionLost} as the reactor's.
    """
    reactor = transport.reactor
    reactor.removeReader(transport)  # type: ignore[attr-defined]
    reactor.removeWriter(transport)  # type: ignore[attr-defined]
    transport.connectionLost(_reasons.get(why.__class__) or Failure(why))


class LeanServer(_LeanMixin, tcp.Server):
    """
    An accepted TCP connection whose writes during a read event are sent at
    its end (see the module docstring).
    """


class LeanClient(_LeanMixin, tcp.Client):
    """
    An outbound TCP connection whose writes during a read event are sent at
    its end (see the module docstring).

    The event that completes the connect is one too: the protocol's
    C{connectionMade} and what it runs (a request written to a new upstream
    connection, a tunnel's 200 to its client) are sent at its end.
    """

    def doConnect(self) -> Any:
        # tcp.BaseClient.doConnect sets this method, bound, as the
        # transport's doRead and doWrite until the connect is over (instance
        # attributes Twisted's own transport has then too), so the reactor's
        # connect event runs it.
        return _leanEvent(_doConnect, self)


class LeanConnector(tcp.Connector):
    """
    C{reactor.connectTCP}'s connector, making a L{LeanClient}.
    """

    def _makeTransport(self) -> tcp.Client:
        return LeanClient(self.host, self.port, self.bindAddress, self, self.reactor)


def leanPort(port: Any) -> Any:
    """
    Make the connections C{port} accepts from now on lean, if it is a
    Twisted TCP port (a TLS listener's is too: TLS is a protocol over it);
    any other listening port is left as it is.

    @return: C{port}.
    """
    if isinstance(port, tcp.Port):
        port.transport = LeanServer
    return port
