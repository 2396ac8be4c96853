"""
Tests for L{proxy_app.transport}: the writes of a read event sent at its
end.

The unit tests accept real TCP connections on 127.0.0.1 through a real
C{tcp.Port} whose reactor is a memory reactor, and call C{doRead} and
C{doWrite} themselves: the memory reactor's C{writers} shows whether a
transport registered for write events, and the peer socket shows what was
sent.  The end-to-end tests run the proxy on the global reactor.
"""

from __future__ import annotations

import hashlib
import select
import socket
import struct
from typing import Any

from twisted.internet import reactor, tcp
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from proxy_app import transport as leanModule
from proxy_app.addresses import AddressPolicy
from proxy_app.config import Config
from proxy_app.observe import AccessLog
from proxy_app.resolver import SafeResolver
from proxy_app.server import ProxyFactory
from proxy_app.tap import _Listener
from proxy_app.transport import (
    LeanClient,
    LeanConnector,
    LeanServer,
    leanPort,
)
from proxy_app.upstream import Connector, _Connecting


class _CountingSends:
    """
    Records each send of a lean transport: its size, and whether it
    happened inside a lean read (rather than on a later reactor pass).
    """

    sends: list[tuple[int, bool]]

    def writeSomeData(self, data: bytes) -> Any:
        result = super().writeSomeData(data)  # type: ignore[misc]
        if not hasattr(self, "sends"):
            self.sends = []
        if isinstance(result, int):
            self.sends.append((result, leanModule._flush.active))
        return result


class CountingServer(_CountingSends, LeanServer):
    """
    A L{LeanServer} that records each send (L{_CountingSends}).
    """


class Scripted(Protocol):
    """
    Runs C{script(self, data)} for each C{dataReceived}.
    """

    def __init__(self, script: Any) -> None:
        self.script = script
        self.lost: list[Any] = []

    def dataReceived(self, data: bytes) -> None:
        self.script(self, data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.append(reason)


def recvAll(peer: socket.socket, size: int) -> bytes:
    """
    Read exactly C{size} bytes from the blocking C{peer}.
    """
    data = b""
    while len(data) < size:
        more = peer.recv(size - len(data))
        if not more:
            break
        data += more
    return data


def pending(peer: socket.socket) -> bytes:
    """
    What C{peer} has received so far, without waiting.
    """
    data = b""
    while select.select([peer], [], [], 0)[0]:
        more = peer.recv(1 << 20)
        if not more:
            break
        data += more
    return data


class Harness:
    """
    Accepts real connections on 127.0.0.1 as lean transports of a memory
    reactor.
    """

    def __init__(self, case: SynchronousTestCase, transportType: type) -> None:
        self.reactor = MemoryReactorClock()
        self.protocols: list[Scripted] = []
        self.script: Any = lambda protocol, data: None
        factory = Factory.forProtocol(lambda: Scripted(self.script))
        factory.noisy = False

        def build(addr: Any) -> Scripted:
            protocol = Scripted(lambda p, d: self.script(p, d))
            self.protocols.append(protocol)
            return protocol

        factory.buildProtocol = build  # type: ignore[method-assign]
        self.port = tcp.Port(0, factory, interface="127.0.0.1", reactor=self.reactor)
        self.port.startListening()
        case.addCleanup(self.port.connectionLost, None)
        self.port.transport = transportType
        self.case = case
        case.addCleanup(self.cleanup)
        self.peers: list[socket.socket] = []
        self.transports: list[Any] = []

    def cleanup(self) -> None:
        for peer in self.peers:
            peer.close()
        for transport in self.transports:
            if transport.connected:
                transport.connectionLost(Failure(ConnectionDone()))

    def accept(self) -> tuple[socket.socket, Any]:
        """
        Connect a blocking socket and accept it: the peer and the lean
        transport.
        """
        peer = socket.create_connection(("127.0.0.1", self.port.getHost().port))
        peer.settimeout(10)
        self.peers.append(peer)
        self.port.doRead()
        transport = self.protocols[-1].transport
        self.transports.append(transport)
        return peer, transport

    def read(self, transport: Any) -> Any:
        """
        Run C{transport.doRead} once there is something to read.
        """
        select.select([transport.getHandle()], [], [], 10)
        return transport.doRead()


def fillReceiver(transport: Any, peer: socket.socket) -> None:
    """
    Shrink the buffers between C{transport} and its unread C{peer}.
    """
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)


class LeanReadTests(SynchronousTestCase):
    """
    Writes made during a lean transport's read event.
    """

    def test_sentAtEndOfRead(self) -> None:
        """
        A head and a body written during one read go out at the end of that
        read, in one send, and the transport never registers for write
        events.
        """
        harness = Harness(self, CountingServer)
        peer, transport = harness.accept()

        def script(protocol: Scripted, data: bytes) -> None:
            protocol.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
            protocol.transport.write(b"body")
            # Nothing sent yet: still coalescing.
            self.assertEqual(getattr(protocol.transport, "sends", []), [])

        harness.script = script
        peer.sendall(b"GET / HTTP/1.1\r\n\r\n")
        self.assertIsNone(harness.read(transport))
        self.assertEqual(transport.sends, [(23, True)])
        self.assertNotIn(transport, harness.reactor.getWriters())
        self.assertEqual(recvAll(peer, 23), b"HTTP/1.1 200 OK\r\n\r\nbody")
        self.assertEqual(leanModule._flush.pending, [])
        self.assertFalse(leanModule._flush.active)

    def test_otherTransport(self) -> None:
        """
        A write to another lean transport during the read is sent at its
        end too, to that transport, each in its own order.
        """
        harness = Harness(self, CountingServer)
        peerA, a = harness.accept()
        peerB, b = harness.accept()

        def script(protocol: Scripted, data: bytes) -> None:
            b.write(b"1")
            a.write(b"x")
            b.write(b"2")

        harness.script = script
        peerA.sendall(b"go")
        harness.read(a)
        self.assertEqual((recvAll(peerA, 1), recvAll(peerB, 2)), (b"x", b"12"))
        self.assertEqual(b.sends, [(2, True)])
        self.assertEqual(harness.reactor.getWriters(), [])

    def test_outsideRead(self) -> None:
        """
        A write outside a read event (a timer, a Deferred's callback)
        registers for write events as usual, and the reactor's C{doWrite}
        sends it.
        """
        harness = Harness(self, LeanServer)
        peer, transport = harness.accept()
        transport.write(b"later")
        self.assertEqual(pending(peer), b"")
        self.assertIn(transport, harness.reactor.getWriters())
        self.assertIsNone(transport.doWrite())
        self.assertNotIn(transport, harness.reactor.getWriters())
        self.assertEqual(recvAll(peer, 5), b"later")

    def test_eagain(self) -> None:
        """
        When the peer does not read, the flush sends what the socket takes
        and the transport registers for the rest; the streaming producer
        is paused at the high-water mark; once the peer reads, the
        reactor's C{doWrite} sends the rest, in order, and resumes it.
        """
        harness = Harness(self, LeanServer)
        peer, transport = harness.accept()
        fillReceiver(transport, peer)
        producer = RecordingProducer()
        transport.registerProducer(producer, True)
        body = bytes(range(256)) * 1024  # 256 KiB, over bufferSize

        def script(protocol: Scripted, data: bytes) -> None:
            protocol.transport.write(body)

        harness.script = script
        peer.sendall(b"go")
        self.assertIsNone(harness.read(transport))
        self.assertEqual(producer.events, ["pause"])
        self.assertIn(transport, harness.reactor.getWriters())
        # What the socket took went at the end of the read.
        sent = len(pending(peer))
        self.assertGreater(sent, 0)
        self.assertLess(sent, len(body))
        self.assertEqual(leanModule._flush.pending, [])

    def test_eagainDrained(self) -> None:
        """
        After a flush that could not send everything, the reactor's
        C{doWrite} finishes the job: every byte arrives, in order, and the
        producer is resumed.
        """
        harness = Harness(self, LeanServer)
        peer, transport = harness.accept()
        fillReceiver(transport, peer)
        producer = RecordingProducer()
        transport.registerProducer(producer, True)
        body = hashlib.sha256(b"seed").digest() * 8192  # 256 KiB

        harness.script = lambda protocol, data: protocol.transport.write(body)
        peer.sendall(b"go")
        harness.read(transport)
        received = b""
        while transport in harness.reactor.getWriters():
            # The reactor's doWrite, as when the socket is writable again;
            # whatever it or the flush sent is in flight to the peer.
            self.assertIsNone(transport.doWrite())
            received += peer.recv(1 << 20)
        received += recvAll(peer, len(body) - len(received))
        self.assertEqual(received, body)
        self.assertEqual(producer.events, ["pause", "resume"])

    def test_resumedProducerWritesAgain(self) -> None:
        """
        A producer paused at the high-water mark and resumed by the flush
        that writes again is flushed in the same event: the flush runs until
        nothing is queued.
        """
        harness = Harness(self, CountingServer)
        peer, transport = harness.accept()
        body = b"a" * (transport.bufferSize + 1)

        @implementer(IPushProducer)
        class Again:
            def pauseProducing(self) -> None:
                pass

            def resumeProducing(self) -> None:
                transport.write(b"again")

            def stopProducing(self) -> None:
                pass

        transport.registerProducer(Again(), True)
        harness.script = lambda protocol, data: protocol.transport.write(body)
        peer.sendall(b"go")
        harness.read(transport)
        self.assertEqual(recvAll(peer, len(body) + 5), body + b"again")
        self.assertEqual([inRead for _, inRead in transport.sends], [True, True])
        self.assertEqual(harness.reactor.getWriters(), [])

    def test_exceptionInDataReceived(self) -> None:
        """
        When C{dataReceived} raises, the transports written to during the
        read register for write events as usual (nothing stays queued), and
        the exception goes on to the reactor.
        """
        harness = Harness(self, LeanServer)
        peerA, a = harness.accept()
        peerB, b = harness.accept()

        def script(protocol: Scripted, data: bytes) -> None:
            b.write(b"kept")
            a.write(b"too")
            raise ZeroDivisionError()

        harness.script = script
        peerA.sendall(b"go")
        self.assertRaises(ZeroDivisionError, harness.read, a)
        self.assertEqual(leanModule._flush.pending, [])
        self.assertFalse(leanModule._flush.active)
        self.assertEqual(set(harness.reactor.getWriters()), {a, b})
        self.assertIsNone(b.doWrite())
        self.assertEqual(recvAll(peerB, 4), b"kept")

    def test_loseConnection(self) -> None:
        """
        A response written and followed by C{loseConnection} in the same
        read is sent and the connection closed at the end of that read:
        the peer reads every byte and then the end of the stream, the
        transport never registers for write events and is no longer read
        from, and C{connectionLost} is called once, with L{ConnectionDone}.
        """
        harness = Harness(self, CountingServer)
        peer, transport = harness.accept()
        harness.reactor.addReader(transport)

        def script(protocol: Scripted, data: bytes) -> None:
            protocol.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
            protocol.transport.write(b"bye")
            protocol.transport.loseConnection()

        harness.script = script
        peer.sendall(b"go")
        self.assertIsNone(harness.read(transport))
        self.assertEqual(transport.sends, [(22, True)])
        self.assertFalse(transport.connected)
        [lost] = harness.protocols[0].lost
        self.assertIs(lost.type, ConnectionDone)
        self.assertEqual(harness.reactor.getWriters(), [])
        self.assertNotIn(transport, harness.reactor.getReaders())
        self.assertEqual(recvAll(peer, 100), b"HTTP/1.1 200 OK\r\n\r\nbye")
        self.assertEqual(peer.recv(10), b"")
        self.assertNotIn(transport, leanModule._flush.writing)
        self.assertEqual(leanModule._flush.pending, [])

    def test_loseConnectionNothingWritten(self) -> None:
        """
        A C{loseConnection} with nothing written during the read closes at
        its end too: the peer sees the end of the stream.
        """
        harness = Harness(self, LeanServer)
        peer, transport = harness.accept()
        harness.script = lambda protocol, data: protocol.transport.loseConnection()
        peer.sendall(b"go")
        harness.read(transport)
        self.assertFalse(transport.connected)
        self.assertEqual(len(harness.protocols[0].lost), 1)
        self.assertEqual(harness.reactor.getWriters(), [])
        self.assertEqual(peer.recv(10), b"")

    def test_loseConnectionOther(self) -> None:
        """
        Closing another lean transport during a read closes it at the end
        of the read; a close made by its C{connectionLost} (a proxy closing
        the other side) is done in the same flush; each C{connectionLost}
        is called once.
        """
        harness = Harness(self, LeanServer)
        peerA, a = harness.accept()
        peerB, b = harness.accept()
        protocolA, protocolB = harness.protocols

        def lostB(reason: Any = None) -> None:
            protocolB.lost.append(reason)
            a.write(b"closing")
            a.loseConnection()

        protocolB.connectionLost = lostB  # type: ignore[method-assign]

        def script(protocol: Scripted, data: bytes) -> None:
            b.write(b"last")
            b.loseConnection()

        harness.script = script
        peerA.sendall(b"go")
        harness.read(a)
        self.assertEqual((a.connected, b.connected), (False, False))
        self.assertEqual((len(protocolA.lost), len(protocolB.lost)), (1, 1))
        self.assertEqual(recvAll(peerB, 10), b"last")
        self.assertEqual(recvAll(peerA, 10), b"closing")
        self.assertEqual(harness.reactor.getWriters(), [])
        self.assertEqual(leanModule._flush.pending, [])

    def threeLosingB(self) -> tuple[Any, ...]:
        """
        A harness with three accepted lean connections, the second's
        protocol raising from C{connectionLost} (after recording it):
        C{(harness, (peerA, a), (peerB, b), (peerC, c))}.
        """
        harness = Harness(self, LeanServer)
        accepted = [harness.accept() for _ in range(3)]
        protocolB = harness.protocols[1]

        def lostB(reason: Any = None) -> None:
            protocolB.lost.append(reason)
            raise ZeroDivisionError()

        protocolB.connectionLost = lostB  # type: ignore[method-assign]
        return (harness, *accepted)

    def test_connectionLostRaises(self) -> None:
        """
        A C{connectionLost} that raises, run by the flush for a close, is
        logged, and the rest of the queue is still sent and closed.
        """
        harness, (peerA, a), (peerB, b), (peerC, c) = self.threeLosingB()

        def script(protocol: Scripted, data: bytes) -> None:
            b.write(b"first")
            b.loseConnection()
            c.write(b"second")
            c.loseConnection()

        harness.script = script
        peerA.sendall(b"go")
        self.assertIsNone(harness.read(a))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(recvAll(peerB, 10), b"first")
        self.assertEqual(recvAll(peerC, 10), b"second")
        self.assertEqual((b.connected, c.connected), (False, False))
        self.assertEqual(len(harness.protocols[2].lost), 1)
        self.assertEqual(leanModule._flush.pending, [])
        self.assertEqual(harness.reactor.getWriters(), [])

    def test_doWriteAndConnectionLostRaise(self) -> None:
        """
        A transport whose C{doWrite} raises during the flush, and whose
        C{connectionLost} then raises too, is logged twice and disconnected;
        the rest of the queue is still sent.
        """
        harness, (peerA, a), (peerB, b), (peerC, c) = self.threeLosingB()
        protocolB = harness.protocols[1]

        def doWriteB() -> None:
            raise KeyError("doWrite")

        b.doWrite = doWriteB  # type: ignore[method-assign]

        def script(protocol: Scripted, data: bytes) -> None:
            b.write(b"first")
            c.write(b"second")

        harness.script = script
        peerA.sendall(b"go")
        self.assertIsNone(harness.read(a))
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len(protocolB.lost), 1)
        self.assertFalse(b.connected)
        self.assertEqual(recvAll(peerC, 6), b"second")
        self.assertEqual(leanModule._flush.pending, [])

    def test_loseConnectionEagain(self) -> None:
        """
        A large write followed by C{loseConnection} in the same read, to a
        peer that does not read: the flush sends what the socket takes, the
        transport registers for the rest and stays open; the reactor's
        C{doWrite} then sends the rest and reports the close; every byte
        arrives, in order, and then the end of the stream.
        """
        harness = Harness(self, LeanServer)
        peer, transport = harness.accept()
        fillReceiver(transport, peer)
        body = hashlib.sha256(b"close").digest() * 8192  # 256 KiB

        def script(protocol: Scripted, data: bytes) -> None:
            protocol.transport.write(body)
            protocol.transport.loseConnection()

        harness.script = script
        peer.sendall(b"go")
        harness.read(transport)
        self.assertTrue(transport.connected)
        self.assertEqual(harness.protocols[0].lost, [])
        received = pending(peer)
        self.assertGreater(len(received), 0)
        why = None
        while why is None:
            self.assertIn(transport, harness.reactor.getWriters())
            why = transport.doWrite()
            received += peer.recv(1 << 20)
        self.assertIsInstance(why, ConnectionDone)
        # What the reactor then does.
        transport.connectionLost(Failure(why))
        received += recvAll(peer, len(body) - len(received))
        self.assertEqual(received, body)
        self.assertEqual(peer.recv(10), b"")

    def test_closeWhenDataReceivedRaises(self) -> None:
        """
        When C{dataReceived} writes, closes and then raises, the transport
        registers for write events as without lean transports and the
        exception goes on to the reactor, which then disconnects it; a
        transport closed in the same read is left to the reactor's
        C{doWrite}, which sends its bytes and then closes.
        """
        harness = Harness(self, LeanServer)
        peerA, a = harness.accept()
        peerB, b = harness.accept()

        def script(protocol: Scripted, data: bytes) -> None:
            b.write(b"kept")
            b.loseConnection()
            a.write(b"dropped")
            raise ZeroDivisionError()

        harness.script = script
        peerA.sendall(b"go")
        self.assertRaises(ZeroDivisionError, harness.read, a)
        self.assertEqual(set(harness.reactor.getWriters()), {a, b})
        self.assertTrue(b.connected)
        self.assertEqual(pending(peerB), b"")
        why = b.doWrite()
        self.assertIsInstance(why, ConnectionDone)
        self.assertEqual(recvAll(peerB, 4), b"kept")
        self.assertEqual(leanModule._flush.pending, [])

    def test_loseWriteConnection(self) -> None:
        """
        A half-close during the read is done at its end: the peer reads
        the bytes and then the end of the stream, the transport does not
        register for write events, and it goes on reading.
        """
        harness = Harness(self, CountingServer)
        peer, transport = harness.accept()
        received: list[bytes] = []

        def script(protocol: Scripted, data: bytes) -> None:
            received.append(data)
            if len(received) == 1:
                protocol.transport.write(b"half")
                protocol.transport.loseWriteConnection()

        harness.script = script
        peer.sendall(b"go")
        harness.read(transport)
        self.assertEqual(harness.reactor.getWriters(), [])
        self.assertEqual(transport.sends, [(4, True)])
        self.assertEqual(recvAll(peer, 10), b"half")
        self.assertTrue(transport.connected)
        peer.sendall(b"more")
        self.assertIsNone(harness.read(transport))
        self.assertEqual(received, [b"go", b"more"])
        self.assertEqual(harness.protocols[0].lost, [])

    def test_peerClosed(self) -> None:
        """
        When the peer closes, the lean read event does what the reactor
        would do next, inside the event: C{connectionLost} is called once,
        with L{ConnectionDone}, and what it writes to and closes (the other
        side of a proxied exchange) is sent and closed at the end of the
        event; C{doRead} returns L{None}, so the reactor does nothing more.
        """
        harness = Harness(self, CountingServer)
        peerA, a = harness.accept()
        peerB, b = harness.accept()
        harness.reactor.addReader(a)
        protocolA, protocolB = harness.protocols

        def lostA(reason: Any = None) -> None:
            protocolA.lost.append(reason)
            b.write(b"after")
            b.loseConnection()

        protocolA.connectionLost = lostA  # type: ignore[method-assign]
        peerA.shutdown(socket.SHUT_WR)
        self.assertIsNone(harness.read(a))
        [lost] = protocolA.lost
        self.assertIs(lost.type, ConnectionDone)
        self.assertFalse(a.connected)
        self.assertNotIn(a, harness.reactor.getReaders())
        self.assertEqual(b.sends, [(5, True)])
        self.assertFalse(b.connected)
        self.assertEqual(len(protocolB.lost), 1)
        self.assertEqual(harness.reactor.getWriters(), [])
        self.assertEqual(recvAll(peerB, 10), b"after")
        self.assertEqual(peerA.recv(10), b"")

    def test_peerClosedConnectionLostRaises(self) -> None:
        """
        When the peer closes and the protocol's C{connectionLost} raises,
        the error is logged and C{connectionLost} is not called again; what
        the event wrote to another transport is still sent.
        """
        harness = Harness(self, CountingServer)
        peerA, a = harness.accept()
        peerB, b = harness.accept()
        harness.reactor.addReader(a)
        protocolA = harness.protocols[0]

        def lostA(reason: Any = None) -> None:
            protocolA.lost.append(reason)
            b.write(b"after")
            raise ZeroDivisionError()

        protocolA.connectionLost = lostA  # type: ignore[method-assign]
        peerA.shutdown(socket.SHUT_WR)
        self.assertIsNone(harness.read(a))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len(protocolA.lost), 1)
        self.assertEqual(recvAll(peerB, 5), b"after")

    def test_peerHalfClosed(self) -> None:
        """
        When the peer half-closes a connection whose protocol takes
        half-closes, its C{readConnectionLost} runs inside the event and
        what it writes before closing is sent, and the close done, at its
        end.
        """
        harness = Harness(self, CountingServer)
        peer, transport = harness.accept()
        protocol = harness.protocols[0]
        calls: list[str] = []

        @implementer(IHalfCloseableProtocol)
        class HalfCloseable:
            def readConnectionLost(self) -> None:
                calls.append("read")
                transport.write(b"reply")
                transport.loseConnection()

            def writeConnectionLost(self) -> None:
                calls.append("write")

        transport.protocol = HalfCloseable()
        transport.protocol.connectionLost = protocol.connectionLost  # type: ignore[attr-defined]
        peer.shutdown(socket.SHUT_WR)
        self.assertIsNone(harness.read(transport))
        self.assertEqual(calls, ["read"])
        self.assertEqual(transport.sends, [(5, True)])
        self.assertFalse(transport.connected)
        self.assertEqual(len(protocol.lost), 1)
        self.assertEqual(harness.reactor.getWriters(), [])
        self.assertEqual(recvAll(peer, 10), b"reply")

    def test_peerReset(self) -> None:
        """
        When the peer resets a connection, the lean read event loses it at
        once, with L{ConnectionLost}.
        """
        harness = Harness(self, LeanServer)
        peer, transport = harness.accept()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        harness.peers.remove(peer)
        self.assertIsNone(harness.read(transport))
        [lost] = harness.protocols[0].lost
        self.assertIs(lost.type, ConnectionLost)
        self.assertFalse(transport.connected)

    def test_peerClosedWhileWriting(self) -> None:
        """
        A transport still waiting for write events when its peer closes
        returns the reason to the reactor, which disconnects it as usual.
        """
        harness = Harness(self, LeanServer)
        peer, transport = harness.accept()
        transport.write(b"later")
        self.assertIn(transport, harness.reactor.getWriters())
        peer.shutdown(socket.SHUT_WR)
        self.assertIsInstance(harness.read(transport), ConnectionDone)
        self.assertTrue(transport.connected)
        self.assertEqual(harness.protocols[0].lost, [])

    def test_abortConnection(self) -> None:
        """
        Bytes written before an C{abortConnection} in the same read are
        dropped, as without lean transports, and the aborted transport does
        not register for write events.
        """
        harness = Harness(self, LeanServer)
        peer, transport = harness.accept()

        def script(protocol: Scripted, data: bytes) -> None:
            protocol.transport.write(b"never")
            protocol.transport.abortConnection()

        harness.script = script
        peer.sendall(b"go")
        harness.read(transport)
        self.assertEqual(harness.reactor.getWriters(), [])
        harness.reactor.advance(0)
        self.assertFalse(transport.connected)
        try:
            received = pending(peer)
        except ConnectionResetError:
            received = b""
        self.assertEqual(received, b"")

    def test_peerResetFlush(self) -> None:
        """
        A peer that reset its connection makes the flush's send fail: that
        transport's connection is lost at once, with L{ConnectionLost}, as
        the reactor does when C{doWrite} fails; the other transports are
        unaffected.
        """
        harness = Harness(self, LeanServer)
        peerA, a = harness.accept()
        peerB, b = harness.accept()
        # An RST, not a FIN.
        peerB.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peerB.close()
        harness.peers.remove(peerB)

        def script(protocol: Scripted, data: bytes) -> None:
            b.write(b"gone")
            a.write(b"fine")

        harness.script = script
        peerA.sendall(b"go")
        # Let the reset arrive.
        select.select([b.getHandle()], [], [], 10)
        harness.read(a)
        self.assertEqual(recvAll(peerA, 4), b"fine")
        self.assertEqual(harness.reactor.getWriters(), [])
        self.assertTrue(a.connected)
        self.assertFalse(b.connected)
        [lost] = harness.protocols[1].lost
        self.assertIs(lost.type, ConnectionLost)

    def test_doWriteRaises(self) -> None:
        """
        An exception from the flush's C{doWrite} (a producer's
        C{resumeProducing}) is logged and the connection is lost, as the
        reactor does for one from C{doWrite}.
        """
        harness = Harness(self, LeanServer)
        peer, transport = harness.accept()

        @implementer(IPushProducer)
        class Broken:
            def pauseProducing(self) -> None:
                pass

            def resumeProducing(self) -> None:
                raise ZeroDivisionError()

            def stopProducing(self) -> None:
                pass

        transport.registerProducer(Broken(), True)
        big = b"x" * (transport.bufferSize + 1)
        harness.script = lambda protocol, data: protocol.transport.write(big)
        peer.sendall(b"go")
        harness.read(transport)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertFalse(transport.connected)
        self.assertEqual(len(harness.protocols[0].lost), 1)
        self.assertEqual(harness.reactor.getWriters(), [])


@implementer(IPushProducer)
class RecordingProducer:
    """
    A streaming producer that records what it is told.
    """

    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class InstallTests(TestCase):
    """
    Where the lean transports are used.
    """

    def test_leanPort(self) -> None:
        """
        L{leanPort} makes a TCP port build lean transports, and leaves any
        other listening port alone.
        """
        port = tcp.Port(0, Factory(), interface="127.0.0.1")
        self.assertIs(leanPort(port), port)
        self.assertIs(port.transport, LeanServer)
        other = object()
        self.assertIs(leanPort(other), other)

    def test_listener(self) -> None:
        """
        Every proxy listener (tap's C{_Listener}) makes its connections
        lean.
        """
        factory = Factory()
        factory.noisy = False
        listener = _Listener("tcp:0:interface=127.0.0.1", factory, reactor)
        listener.privilegedStartService()
        self.addCleanup(listener.port.stopListening)
        self.assertIs(listener.port.transport, LeanServer)

    def test_inheritedUnchanged(self) -> None:
        """
        The methods the lean transports call directly instead of through
        C{super()} are the ones Twisted's TCP server and client transports
        inherit.
        """
        for base in (tcp.Server, tcp.Client):
            self.assertIs(base.doRead, leanModule._doRead)
            self.assertIs(base.startWriting, leanModule._startWriting)
            self.assertIs(base.stopWriting, leanModule._stopWriting)
            self.assertIs(base.abortConnection, leanModule._abortConnection)
        self.assertIs(tcp.Client.doConnect, leanModule._doConnect)

    def test_noAttributes(self) -> None:
        """
        A lean transport has the instance attributes Twisted's own has
        after the same writes, reads and close, and no other: CPython 3.11
        shares at most 30 attribute names between a class's instances, and
        an instance past that gets a dictionary of its own, whose method
        loads do not specialize.
        """
        names = []
        for transportType in (tcp.Server, LeanServer):
            harness = Harness(self, transportType)
            peer, transport = harness.accept()
            harness.script = lambda protocol, data: protocol.transport.write(data)
            peer.sendall(b"go")
            harness.read(transport)
            transport.doWrite()
            transport.write(b"later")
            transport.doWrite()
            transport.loseConnection()
            transport.doWrite()
            self.assertEqual(recvAll(peer, 7), b"golater")
            names.append(set(vars(transport)))
        self.assertEqual(names[0], names[1])

    def test_memoryReactor(self) -> None:
        """
        On a reactor that is not a real one, the upstream connect is the
        reactor's own C{connectTCP}, which the memory reactor records.
        """
        memory = MemoryReactorClock()
        connecting = _Connecting(None)  # type: ignore[arg-type]
        connecting.connect(memory, "127.0.0.1", 80, 5, ("127.0.0.1", 0))
        self.assertEqual(
            memory.tcpClients,
            [("127.0.0.1", 80, connecting, 5, ("127.0.0.1", 0))],
        )

    def test_realReactor(self) -> None:
        """
        On a real reactor, the upstream connect connects with a
        L{LeanConnector}, whose transport is a L{LeanClient}.
        """
        connecting = _Connecting(None)  # type: ignore[arg-type]
        d = connecting.connect(reactor, "127.0.0.1", 9, 5, None)
        connector = connecting.connector
        self.assertIsInstance(connector, LeanConnector)
        self.assertIsInstance(connector.transport, LeanClient)
        d.addErrback(lambda f: f.trap(CancelledError))
        d.cancel()


class CountingClient(_CountingSends, LeanClient):
    """
    A L{LeanClient} that records each send (L{_CountingSends}).
    """


class CountingConnector(LeanConnector):
    """
    A L{LeanConnector} making L{CountingClient}s.
    """

    def _makeTransport(self) -> tcp.Client:
        return CountingClient(
            self.host, self.port, self.bindAddress, self, self.reactor
        )


class ConnectEventTests(TestCase):
    """
    The event that completes an outbound connect is a lean one.
    """

    @inlineCallbacks
    def connect(self, made: Any):  # type: ignore[no-untyped-def]
        """
        Connect a L{CountingClient} to a L{Collect} server on 127.0.0.1,
        running C{made(transport)} in its protocol's C{connectionMade}.

        @return: a L{Deferred} firing with the transport and the server's
            protocol.
        """
        received = Collect()
        serverFactory = Factory.forProtocol(lambda: received)
        serverFactory.noisy = False
        server = reactor.listenTCP(0, serverFactory, interface="127.0.0.1")
        self.addCleanup(server.stopListening)
        connected: Deferred = Deferred()

        class Greeter(Protocol):
            def connectionMade(self) -> None:
                made(self.transport)
                connected.callback(self.transport)

        factory = ClientFactory.forProtocol(Greeter)
        factory.noisy = False
        connector = CountingConnector(
            "127.0.0.1", server.getHost().port, factory, 5, None, reactor
        )
        connector.connect()
        transport = yield connected
        self.addCleanup(transport.loseConnection)
        return transport, received

    @inlineCallbacks
    def test_writeOnConnect(self):  # type: ignore[no-untyped-def]
        """
        What a protocol writes when its connection is made (a request on a
        new upstream connection) goes out in one send at the end of the
        connect event, not on a later reactor pass.
        """

        def made(transport: Any) -> None:
            transport.write(b"GET / HTTP/1.1\r\n")
            transport.write(b"\r\n")

        transport, received = yield self.connect(made)
        yield received.waitFor(18)
        self.assertEqual(received.data, b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(transport.sends, [(18, True)])
        self.assertNotIn(transport, leanModule._flush.writing)

    @inlineCallbacks
    def test_closeOnConnect(self):  # type: ignore[no-untyped-def]
        """
        A write and a close when the connection is made are done at the end
        of the connect event: the peer reads the bytes and then the end of
        the stream.
        """

        def made(transport: Any) -> None:
            transport.write(b"only")
            transport.loseConnection()

        transport, received = yield self.connect(made)
        data = yield received.done
        self.assertEqual(data, b"only")
        self.assertEqual(transport.sends, [(4, True)])
        self.assertFalse(transport.connected)


class Origin(Protocol):
    """
    A raw origin: answers each request head with a fixed response in two
    writes, or in a tunnel echoes everything and closes when the client
    half-closes.
    """

    def dataReceived(self, data: bytes) -> None:
        factory: Any = self.factory
        if factory.echo:
            self.transport.write(data)
            return
        self.buffer = getattr(self, "buffer", b"") + data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            self.buffer = self.buffer[length:]
            path = head.split(b" ")[1]
            close = path.startswith(b"/close")
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nX-Path: %s\r\nContent-Length: 5\r\n%s\r\n"
                % (path, b"Connection: close\r\n" if close else b"")
            )
            self.transport.write(b"hello")
            if close:
                self.transport.loseConnection()
                return

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.waiting: tuple[Any, Deferred] | None = None
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.waiting is not None and self.waiting[0](self.data):
            d = self.waiting[1]
            self.waiting = None
            d.callback(self.data)

    def waitFor(self, size: int) -> Deferred:
        """
        Fire with the data once C{size} bytes arrived.
        """
        return self.waitUntil(lambda data: len(data) >= size)

    def waitUntil(self, predicate: Any) -> Deferred:
        d: Deferred = Deferred()
        if predicate(self.data):
            d.callback(self.data)
        else:
            self.waiting = (predicate, d)
        return d

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


implementer(IHalfCloseableProtocol)(Origin)
implementer(IHalfCloseableProtocol)(Collect)


class ThroughTheProxyTests(TestCase):
    """
    The proxy on the global reactor, its listener lean, between a raw
    client and a raw origin on 127.0.0.1.
    """

    def setUp(self) -> None:
        originFactory = Factory.forProtocol(Origin)
        originFactory.echo = False  # type: ignore[attr-defined]
        self.originFactory = originFactory
        origin = reactor.listenTCP(0, originFactory, interface="127.0.0.1")
        self.addCleanup(origin.stopListening)
        self.originPort = origin.getHost().port
        policy = AddressPolicy(allowRanges=["127.0.0.0/8"])
        resolver = SafeResolver(policy, reactor.nameResolver, reactor, timeout=5)
        self.factory = ProxyFactory(
            Config(), resolver, reactor, Connector(reactor, 5), AccessLog(None)
        )
        self.addCleanup(self.factory.pool.closeIdle)
        proxy = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(proxy.stopListening)
        self.servers: list[CountingServer] = []
        servers = self.servers

        class Recorded(CountingServer):
            def __init__(self, *args: Any) -> None:
                super().__init__(*args)
                servers.append(self)

        proxy.transport = Recorded  # type: ignore[attr-defined]
        self.proxyPort = proxy.getHost().port
        self.clients: list[CountingClient] = []
        clients = self.clients

        class RecordedClient(CountingClient):
            def __init__(self, *args: Any) -> None:
                super().__init__(*args)
                clients.append(self)

        # What LeanConnector, which Connector's connects use, makes.
        self.patch(leanModule, "LeanClient", RecordedClient)

    @inlineCallbacks
    def client(self):  # type: ignore[no-untyped-def]
        client = Collect()
        yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxyPort), client
        )
        self.addCleanup(client.transport.loseConnection)
        return client

    @inlineCallbacks
    def test_keepAliveGetAndPost(self):  # type: ignore[no-untyped-def]
        """
        Keep-alive GETs and a POST through the proxy: each response, head
        and body, goes to the client in one send made at the end of the
        origin's read event, never on a later reactor pass.
        """
        client = yield self.client()
        url = b"http://127.0.0.1:%d/" % self.originPort
        for i, request in enumerate(
            [
                b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % url,
                b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % url,
                b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody" % url,
            ],
            1,
        ):
            client.transport.write(request)
            data = yield client.waitUntil(lambda data, i=i: data.count(b"hello") == i)
            self.assertEqual(data.count(b"HTTP/1.1 200 OK\r\n"), i)
            self.assertTrue(data.endswith(b"\r\n\r\nhello"), data)
        [server] = self.servers
        self.assertEqual(len(server.sends), 3)
        self.assertEqual(
            [inRead for _, inRead in server.sends], [True, True, True], server.sends
        )
        # The origin connection, made by Connector, is lean too: the first
        # request goes out at the end of the connect event, the next two at
        # the end of the client's read events.
        [upstream] = self.clients
        self.assertEqual(
            [inRead for _, inRead in upstream.sends],
            [True, True, True],
            upstream.sends,
        )

    @inlineCallbacks
    def test_close(self):  # type: ignore[no-untyped-def]
        """
        A C{Connection: close} request to an origin that closes: the
        response, written and followed by the close in the origin's read
        event, reaches the client whole, sent at the end of that event,
        and then the close.
        """
        client = yield self.client()
        url = b"http://127.0.0.1:%d/close" % self.originPort
        client.transport.write(
            b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % url
        )
        data = yield client.done
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK\r\n"), data)
        self.assertTrue(data.endswith(b"\r\n\r\nhello"), data)
        [server] = self.servers
        self.assertEqual([inRead for _, inRead in server.sends], [True])

    @inlineCallbacks
    def test_pipelined(self):  # type: ignore[no-untyped-def]
        """
        Pipelined requests get their responses in order, whole.
        """
        client = yield self.client()
        url = b"http://127.0.0.1:%d/" % self.originPort
        client.transport.write(
            b"".join(
                b"GET %s%d HTTP/1.1\r\nHost: x\r\n\r\n" % (url, i) for i in range(5)
            )
        )
        data = yield client.waitUntil(lambda data: data.count(b"hello") == 5)
        paths = [
            int(line.split(b" ")[1][1:])
            for line in data.split(b"\r\n")
            if line.startswith(b"X-Path")
        ]
        self.assertEqual(paths, [0, 1, 2, 3, 4])

    @inlineCallbacks
    def test_tunnelBigBodyAndHalfClose(self):  # type: ignore[no-untyped-def]
        """
        A tunnel carries 8 MiB each way intact, and a client's half-close
        reaches the origin, whose close then reaches the client after every
        byte.
        """
        self.originFactory.echo = True  # type: ignore[attr-defined]
        client = yield self.client()
        client.transport.write(
            b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % self.originPort
        )
        established = b"HTTP/1.1 200 Connection established\r\n\r\n"
        data = yield client.waitFor(len(established))
        self.assertEqual(data, established)
        body = hashlib.sha256(b"tunnel").digest() * (8 << 15)
        client.transport.write(body)
        client.transport.loseWriteConnection()
        data = yield client.done
        self.assertEqual(len(data), len(established) + len(body))
        self.assertEqual(data[len(established) :], body)

    @inlineCallbacks
    def test_tunnelSlowReader(self):  # type: ignore[no-untyped-def]
        """
        A client that stops reading a tunnel pushes back to the origin: the
        origin's producer is paused; when the client reads again every byte
        arrives in order.
        """
        paused: Deferred = Deferred()
        chunk = hashlib.sha256(b"slow").digest() * 2048  # 64 KiB
        total = 256

        @implementer(IPushProducer)
        class Source:
            def __init__(self, transport: Any) -> None:
                self.transport = transport
                self.sent = 0
                self.running = False

            def start(self) -> None:
                self.running = True
                while self.running and self.sent < total:
                    self.sent += 1
                    self.transport.write(chunk)
                if self.sent == total:
                    self.transport.unregisterProducer()
                    self.transport.loseConnection()

            def pauseProducing(self) -> None:
                self.running = False
                if not paused.called:
                    paused.callback(self.sent)

            def resumeProducing(self) -> None:
                reactor.callLater(0, self.start)

            def stopProducing(self) -> None:
                self.running = False

        class Pusher(Protocol):
            def dataReceived(self, data: bytes) -> None:
                source = Source(self.transport)
                self.transport.registerProducer(source, True)
                source.start()

        origin = reactor.listenTCP(
            0, Factory.forProtocol(Pusher), interface="127.0.0.1"
        )
        self.addCleanup(origin.stopListening)
        client = yield self.client()
        client.transport.write(
            b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % origin.getHost().port
        )
        established = b"HTTP/1.1 200 Connection established\r\n\r\n"
        yield client.waitFor(len(established))
        client.transport.pauseProducing()
        client.transport.write(b"go")
        sent = yield paused
        self.assertLess(sent, total)
        client.transport.resumeProducing()
        data = yield client.done
        self.assertEqual(data[len(established) :], chunk * total)
