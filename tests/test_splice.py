"""
Tests for L{proxy_app.splice}: a plain tunnel's bulk bytes moved in the
kernel, over real sockets on 127.0.0.1 (a splice needs real descriptors),
and the tunnels that stay on the Python path.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from proxy_app import splice as splicemodule
from proxy_app.addresses import AddressPolicy
from proxy_app.config import Config, Timeouts
from proxy_app.observe import AccessLog, DecisionLog
from proxy_app.resolver import SafeResolver
from proxy_app.server import ProxyFactory
from proxy_app.splice import SPLICE_AFTER, Splice
from proxy_app.transport import leanPort, writeQueued
from proxy_app.upstream import Connector

from .helpers import makeHarness

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


def pattern(size: int, seed: int = 0) -> bytes:
    """
    C{size} bytes in which any reordering, loss or repetition shows.
    """
    block = b"".join(
        ((i + seed * 7919) % 2**32).to_bytes(4, "big") for i in range(65536 // 4)
    )
    return (block * (size // len(block) + 1))[:size]


@implementer(IHalfCloseableProtocol)
class Origin(Protocol):
    """
    Sends C{send} on connecting, then echoes what it receives; after the
    client's end of stream, sends C{after} and closes its writing half
    (or aborts, with C{abortAfter}).
    """

    def __init__(self, send: bytes, after: bytes, echo: bool) -> None:
        self.send = send
        self.after = after
        self.echo = echo
        self.received = 0

    def connectionMade(self) -> None:
        if self.send:
            self.transport.write(self.send)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.echo:
            self.transport.write(data)

    def readConnectionLost(self) -> None:
        if self.after:
            self.transport.write(self.after)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class Client(Protocol):
    """
    Sends a CONNECT (and C{leftover} in the same write) and collects
    everything the proxy sends back.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: Deferred = Deferred()
        self.readOpen = True
        # Close on the proxy's end of stream, or keep sending.
        self.closeOnEOF = True

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def readConnectionLost(self) -> None:
        self.readOpen = False
        if self.closeOnEOF:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(b"".join(self.chunks))


@inlineCallbacks
def until(condition: Any):  # type: ignore[no-untyped-def]
    """
    Let the reactor run until C{condition()} holds.
    """
    while not condition():
        yield deferLater(reactor, 0.005, lambda: None)


def openFDs() -> dict[str, str]:
    """
    This process's open descriptors and what each is.
    """
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            # The directory listing's own descriptor, closed by now.
            pass
    return fds


class SpliceLoopbackTests(TestCase):
    """
    Tunnels through the proxy between a real client and a real origin on
    127.0.0.1.
    """

    def setUp(self) -> None:
        self.origins: list[Origin] = []
        self.send = b""
        self.after = b""
        self.echo = True

        def build() -> Origin:
            origin = Origin(self.send, self.after, self.echo)
            self.origins.append(origin)
            return origin

        port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.originPort = port.getHost().port
        self.access: list[dict] = []
        accessLog = AccessLog(None)
        accessLog.addObserver(self.access.append)
        self.config = Config()
        resolver = SafeResolver(
            AddressPolicy(allowRanges=["127.0.0.0/8"]),
            reactor.nameResolver,
            reactor,
            timeout=5,
        )
        self.decisions: list[dict] = []
        decisionLog = DecisionLog(None)
        decisionLog.addObserver(self.decisions.append)
        self.factory = ProxyFactory(
            self.config,
            resolver,
            reactor,
            Connector(reactor, 5),
            accessLog,
            decisionLog=decisionLog,
        )
        # Lean transports, as every proxy listener has (proxy_app.transport).
        proxy = leanPort(reactor.listenTCP(0, self.factory, interface="127.0.0.1"))
        self.addCleanup(proxy.stopListening)
        self.proxyPort = proxy.getHost().port

    @inlineCallbacks
    def tunnel(self, leftover: bytes = b""):  # type: ignore[no-untyped-def]
        client = Client()
        yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxyPort), client
        )
        client.transport.write(
            b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % self.originPort
            + leftover
        )
        yield until(lambda: b"".join(client.chunks).startswith(ESTABLISHED))
        return client

    def assertSame(self, received: bytes, expected: bytes) -> None:
        """
        C{received} is C{expected}; if not, say where they part (rather
        than print megabytes).
        """
        if received != expected:
            where = next(
                (
                    i
                    for i, (a, b) in enumerate(zip(received, expected, strict=False))
                    if a != b
                ),
                min(len(received), len(expected)),
            )
            self.fail(
                f"{len(received)} bytes received, {len(expected)} expected; "
                f"they differ from byte {where}"
            )

    @inlineCallbacks
    def warmUp(self):  # type: ignore[no-untyped-def]
        """
        One small tunnel, so that whatever the first one opens for good
        (the resolver's) is open before descriptors are counted.
        """
        client = yield self.tunnel()
        client.transport.loseWriteConnection()
        yield client.done
        yield until(lambda: not self.factory.connections)

    def exchange(self) -> Any:
        (protocol,) = self.factory.connections
        return protocol.tunnel

    @inlineCallbacks
    def push(self, client: Client, data: bytes, chunk: int):  # type: ignore[no-untyped-def]
        """
        Write C{data} in C{chunk}-byte writes, letting the reactor run
        between them.
        """
        for start in range(0, len(data), chunk):
            client.transport.write(data[start : start + chunk])
            if start // chunk % 16 == 15:
                yield deferLater(reactor, 0, lambda: None)

    @inlineCallbacks
    def test_bothWaysInOrder(self):  # type: ignore[no-untyped-def]
        """
        Bytes sent both ways through a tunnel that switches to splicing
        arrive complete and in order, after the CONNECT 200 head; what
        the client sent with the CONNECT head comes first; the access
        log counts every byte each way.
        """
        for size, chunk in [(SPLICE_AFTER + 1, 1000), (3 * 1048576 + 17, 65536)]:
            self.echo = True
            head = b"leftover!"
            data = pattern(size, seed=size)
            client = yield self.tunnel(head)
            yield self.push(client, data, chunk)
            exchange = self.exchange()
            yield until(lambda e=exchange: e.bytesUp > SPLICE_AFTER)
            self.assertIsInstance(exchange.upstream.splice, Splice)
            client.transport.loseWriteConnection()
            received = yield client.done
            self.assertEqual(len(received), len(ESTABLISHED) + len(head) + size)
            self.assertSame(received, ESTABLISHED + head + data)
            yield deferLater(reactor, 0, lambda: None)
            line = self.access[-1]
            self.assertEqual(line["method"], "CONNECT")
            # As the Python path counts: the relayed bytes each way.
            self.assertEqual(
                (line["bytes_up"], line["bytes_down"]),
                (len(head) + size, len(head) + size),
            )
            close = [
                event
                for event in self.decisions
                if event.get("msg") == "CANONICAL-PROXY-CN-CLOSE"
            ][-1]
            self.assertEqual(
                (close["bytes_out"], close["bytes_in"]),
                (len(head) + size, len(head) + size),
            )

    @inlineCallbacks
    def uploading(self, data: bytes, chunk: int):  # type: ignore[no-untyped-def]
        """
        A tunnel whose client has pushed C{data} in C{chunk}-byte writes,
        once the proxy has relayed more than the switch's threshold up:
        C{(client, exchange)}.
        """
        client = yield self.tunnel()
        exchange = self.exchange()
        yield self.push(client, data, chunk)
        yield until(lambda: exchange.bytesUp > SPLICE_AFTER)
        return client, exchange

    @inlineCallbacks
    def downloading(self):  # type: ignore[no-untyped-def]
        """
        A tunnel whose origin sends C{self.send}, once the client has
        received twice the switch's threshold.
        """
        client = yield self.tunnel()
        while len(b"".join(client.chunks)) < SPLICE_AFTER * 2:
            yield deferLater(reactor, 0.01, lambda: None)
        return client

    @inlineCallbacks
    def finish(self, client: Client):  # type: ignore[no-untyped-def]
        """
        End the client's side and check that it received the 200 head and
        then all the origin sent.
        """
        client.transport.loseWriteConnection()
        received = yield client.done
        self.assertSame(received, ESTABLISHED + self.send)

    @inlineCallbacks
    def test_download(self):  # type: ignore[no-untyped-def]
        """
        A download from the origin, far past the switch, arrives whole and
        in order, and the tunnel was spliced.
        """
        self.echo = False
        self.send = pattern(16 * 1048576 + 5)
        client = yield self.downloading()
        self.assertIsInstance(self.exchange().upstream.splice, Splice)
        yield self.finish(client)

    @inlineCallbacks
    def test_switchAfterEveryWrite(self):  # type: ignore[no-untyped-def]
        """
        The switch to splicing happens only once both transports have
        handed the kernel every byte written to them: none is among the
        reactor's writers and none holds writes that the read event
        deciding the switch would send at its end (lean transports).
        Spliced bytes can then never overtake bytes the Python path took.
        """
        seen: list[tuple[bool, ...]] = []
        real = splicemodule._Direction

        def spy(splice, *args, **kwargs):  # type: ignore[no-untyped-def]
            writers = reactor.getWriters()
            seen.append(
                tuple(
                    t in writers or writeQueued(t)
                    for t in (splice._client, splice._server)
                )
            )
            return real(splice, *args, **kwargs)

        self.patch(splicemodule, "_Direction", spy)
        self.echo = False
        self.send = pattern(4 * 1048576 + 3)
        client = yield self.downloading()
        self.assertIsInstance(self.exchange().upstream.splice, Splice)
        yield self.finish(client)
        self.assertEqual(seen, [(False, False), (False, False)])

    @inlineCallbacks
    def test_descriptorShareBounded(self):  # type: ignore[no-untyped-def]
        """
        Spliced tunnels' pipes hold at most a quarter of the open-file
        limit: past it, a big tunnel goes on in Python, whole and in order,
        and takes no pipe; a spliced tunnel gives its share back when it
        closes.
        """
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.patch(splicemodule, "_spliced", [soft // 16])
        self.echo = False
        self.send = pattern(2 * 1048576 + 7)
        client = yield self.downloading()
        splice = self.exchange().upstream.splice
        self.assertIsInstance(splice, Splice)
        self.assertEqual(splice._pipes, ())
        yield self.finish(client)
        self.assertEqual(splicemodule._spliced, [soft // 16])
        # Room for one: spliced, and given back at the end.
        self.patch(splicemodule, "_spliced", [soft // 16 - 1])
        client = yield self.downloading()
        self.assertNotEqual(self.exchange().upstream.splice._pipes, ())
        self.assertEqual(splicemodule._spliced, [soft // 16])
        yield self.finish(client)
        yield until(lambda: not self.factory.connections)
        self.assertEqual(splicemodule._spliced, [soft // 16 - 1])

    @inlineCallbacks
    def test_halfCloseFromClient(self):  # type: ignore[no-untyped-def]
        """
        On a spliced tunnel, the client's end of stream reaches the
        origin, which can still answer after it: the answer arrives.
        """
        self.echo = True
        self.after = b"bye after your end"
        data = pattern(SPLICE_AFTER * 3)
        client, exchange = yield self.uploading(data, 32768)
        self.assertIsInstance(exchange.upstream.splice, Splice)
        client.transport.loseWriteConnection()
        received = yield client.done
        self.assertSame(received, ESTABLISHED + data + self.after)

    @inlineCallbacks
    def test_halfCloseFromOrigin(self):  # type: ignore[no-untyped-def]
        """
        On a spliced tunnel, the origin's end of stream reaches the
        client, whose later bytes still reach the origin.
        """
        self.echo = False
        self.send = pattern(SPLICE_AFTER * 2)
        client = yield self.tunnel()
        while len(b"".join(client.chunks)) < len(ESTABLISHED) + len(self.send):
            yield deferLater(reactor, 0.01, lambda: None)
        exchange = self.exchange()
        self.assertIsInstance(exchange.upstream.splice, Splice)
        # The origin closes its writing half: the client sees it.
        client.closeOnEOF = False
        self.origins[-1].transport.loseWriteConnection()
        yield until(lambda: not client.readOpen)
        client.transport.write(b"late bytes")
        yield until(lambda: self.origins[-1].received == len(b"late bytes"))
        client.transport.loseConnection()
        received = yield client.done
        self.assertSame(received, ESTABLISHED + self.send)

    @inlineCallbacks
    def test_originReset(self):  # type: ignore[no-untyped-def]
        """
        An origin that resets a spliced tunnel closes it for the client
        too, and its descriptors and pipes go.
        """
        self.echo = False
        self.send = pattern(SPLICE_AFTER * 2)
        yield self.warmUp()
        before = openFDs()
        client = yield self.tunnel()
        while len(b"".join(client.chunks)) < len(ESTABLISHED) + len(self.send):
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertIsInstance(self.exchange().upstream.splice, Splice)
        self.origins[-1].transport.abortConnection()
        yield client.done
        yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(openFDs(), before)

    @inlineCallbacks
    def test_backpressure(self):  # type: ignore[no-untyped-def]
        """
        A client that stops reading while the origin sends a lot: the
        proxy holds nothing in its transports' buffers (the bytes wait in
        the kernel, the pipe full and the origin's socket unread), and
        once the client reads again everything arrives.
        """
        self.echo = False
        self.send = pattern(64 * 1048576)
        client = yield self.downloading()
        client.transport.pauseProducing()
        exchange = self.exchange()
        for _ in range(20):
            yield deferLater(reactor, 0.01, lambda: None)
        splice = exchange.upstream.splice
        self.assertIsInstance(splice, Splice)
        writers = reactor.getWriters()
        self.assertNotIn(exchange.protocol.transport, writers)
        self.assertNotIn(exchange.upstream.transport, writers)
        # Waiting for the client to take bytes, not reading the origin.
        clientEnd, serverEnd = splice._ends
        self.assertTrue(clientEnd.writing)
        self.assertFalse(serverEnd.reading)
        moved = exchange.bytesDown
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(exchange.bytesDown, moved)
        self.assertLess(moved, len(self.send))
        client.transport.resumeProducing()
        yield self.finish(client)

    @inlineCallbacks
    def test_lifetime(self):  # type: ignore[no-untyped-def]
        """
        A spliced tunnel still ends at the end of its lifetime, and leaves
        no descriptor behind.
        """
        self.config = Config(timeouts=Timeouts(lifetime=0.5))
        self.factory.config = self.config
        self.factory.tunnelWatch = type(self.factory.tunnelWatch)(reactor, 30, 0.5)
        self.echo = True
        yield self.warmUp()
        before = openFDs()
        client = yield self.tunnel()
        exchange = self.exchange()
        yield self.push(client, pattern(SPLICE_AFTER * 2), 65536)
        yield until(lambda: exchange.bytesUp > SPLICE_AFTER)
        self.assertIsInstance(exchange.upstream.splice, Splice)
        yield client.done
        yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(openFDs(), before)

    @inlineCallbacks
    def test_idleTimeout(self):  # type: ignore[no-untyped-def]
        """
        A spliced tunnel on which nothing moves is closed by the read
        timeout, not before it (bytes that moved kept it open), and
        leaves no descriptor behind; the access log says why.
        """
        self.config = Config(timeouts=Timeouts(read=0.4))
        self.factory.config = self.config
        self.factory.tunnelWatch = type(self.factory.tunnelWatch)(reactor, 0.4, 60)
        self.echo = True
        yield self.warmUp()
        before = openFDs()
        client = yield self.tunnel()
        exchange = self.exchange()
        data = pattern(SPLICE_AFTER * 2)
        yield self.push(client, data, 65536)
        yield until(lambda: exchange.bytesUp > SPLICE_AFTER)
        self.assertIsInstance(exchange.upstream.splice, Splice)
        # Still moving, past the timeout: spliced bytes mark it active.
        for _ in range(4):
            yield deferLater(reactor, 0.2, lambda: None)
            client.transport.write(b"x" * 1000)
        self.assertTrue(client.transport.connected)
        started = reactor.seconds()
        received = yield client.done
        self.assertGreaterEqual(reactor.seconds() - started, 0.35)
        self.assertSame(received, ESTABLISHED + data + b"x" * 4000)
        yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(openFDs(), before)
        self.assertIn("idle", self.access[-1]["error"])

    @inlineCallbacks
    def test_noFDLeft(self):  # type: ignore[no-untyped-def]
        """
        After many spliced tunnels, each closed a different way, the
        process has the descriptors it had before.
        """
        self.echo = True
        yield self.warmUp()
        before = openFDs()
        for i in range(12):
            client = yield self.tunnel()
            exchange = self.exchange()
            yield self.push(client, pattern(SPLICE_AFTER + 1 + 4096 * i), 65536)
            yield until(lambda e=exchange: e.bytesUp > SPLICE_AFTER)
            self.assertIsInstance(exchange.upstream.splice, Splice)
            if i % 3 == 0:
                client.transport.loseWriteConnection()
            elif i % 3 == 1:
                client.transport.loseConnection()
            else:
                client.transport.abortConnection()
            yield client.done
        while self.factory.connections:
            yield deferLater(reactor, 0.01, lambda: None)
        yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(openFDs(), before)

    @inlineCallbacks
    def test_smallTunnelNotSpliced(self):  # type: ignore[no-untyped-def]
        """
        A tunnel that moves less than the threshold never switches: no
        pipe, no extra descriptor.
        """
        self.echo = True
        client = yield self.tunnel()
        data = pattern(SPLICE_AFTER // 2)
        yield self.push(client, data, 2048)
        while len(b"".join(client.chunks)) < len(ESTABLISHED) + len(data):
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertIsNone(self.exchange().upstream.splice)
        client.transport.loseWriteConnection()
        yield client.done

    @inlineCallbacks
    def test_noSplice(self):  # type: ignore[no-untyped-def]
        """
        Without C{os.splice}, a tunnel stays on the Python path and its
        bytes still arrive.
        """
        self.patch(splicemodule.os, "splice", None)
        delattr(splicemodule.os, "splice")
        self.echo = True
        data = pattern(SPLICE_AFTER * 2)
        client, exchange = yield self.uploading(data, 65536)
        self.assertIs(exchange.upstream.splice, False)
        client.transport.loseWriteConnection()
        received = yield client.done
        self.assertSame(received, ESTABLISHED + data)

    @inlineCallbacks
    def test_statisticsNotSpliced(self):  # type: ignore[no-untyped-def]
        """
        A tunnel whose statistics look at its bytes stays on the Python
        path.
        """
        self.echo = True
        data = pattern(SPLICE_AFTER * 2)
        client = yield self.tunnel()

        class Stats:
            def left(self, data: bytes) -> None:
                pass

            def right(self, data: bytes) -> None:
                pass

        self.exchange().statistics = Stats()
        exchange = self.exchange()
        yield self.push(client, data, 65536)
        yield until(lambda: exchange.bytesUp > SPLICE_AFTER)
        self.assertIs(exchange.upstream.splice, False)
        client.transport.loseWriteConnection()
        received = yield client.done
        self.assertSame(received, ESTABLISHED + data)


class NotEligibleTests(SynchronousTestCase):
    """
    Tunnels whose transports are not Twisted's plain TCP connections stay
    on the Python path.
    """

    def test_memoryTransports(self) -> None:
        """
        A tunnel over transports that are not plain TCP connections (here
        a memory reactor's; a TLS listener's or a wrapped one's alike) is
        not spliced, and relays its bytes in Python.
        """
        h = makeHarness()
        h.send(b"CONNECT origin.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        _, upstream = h.connectUpstream()
        data = b"x" * (SPLICE_AFTER + 1)
        h.send(data)
        exchange = h.protocol.tunnel
        self.assertIs(exchange.upstream.splice, False)
        self.assertEqual(upstream.value(), data)

    def test_sniffing(self) -> None:
        """
        A tunnel whose TLS sniffer has not decided yet is not eligible.
        """

        class Sniffer:
            done = False

        class Exchange:
            mitm = None
            _session = None
            statistics = None
            _sniffer = Sniffer()

        self.assertFalse(splicemodule.eligible(Exchange()))

    def test_intercepted(self) -> None:
        """
        An intercepted tunnel is not eligible.
        """

        class Exchange:
            mitm = object()
            _session = None

        self.assertFalse(splicemodule.eligible(Exchange()))


class _FakeFDSet:
    """
    What a L{_Direction} asks of the reactor, recorded.
    """

    def __init__(self) -> None:
        self.readers: set[Any] = set()
        self.writers: set[Any] = set()

    def addReader(self, end: Any) -> None:
        self.readers.add(end)

    def removeReader(self, end: Any) -> None:
        self.readers.discard(end)

    def addWriter(self, end: Any) -> None:
        self.writers.add(end)

    def removeWriter(self, end: Any) -> None:
        self.writers.discard(end)


class _FakeExchange:
    def __init__(self) -> None:
        self.bytesUp = self.bytesDown = 0
        self._idleSince: Any = 0.0
        self._clientReadOpen = self._upstreamReadOpen = True
        self.closed = 0

    def _closeIfDone(self) -> None:
        if not (self._clientReadOpen or self._upstreamReadOpen):
            self.closed += 1


class _FakeSplice:
    def __init__(self) -> None:
        self.reactor = _FakeFDSet()
        self.exchange = _FakeExchange()
        self.failures = 0

    def failed(self) -> None:
        self.failures += 1


class DirectionTests(SynchronousTestCase):
    """
    One direction of a spliced tunnel (L{splicemodule._Direction}) between
    two real socket pairs, driven by hand as the reactor would drive it.
    """

    def direction(self) -> tuple[Any, ...]:
        """
        The client's and the origin's sockets, and a direction from the
        proxy's socket facing the client to the one facing the origin
        (socket pairs, non-blocking), its source read: C{(client, origin,
        fake splice, source end, sink end, direction)}.
        """
        client, clientProxy = socket.socketpair()
        originProxy, origin = socket.socketpair()
        for s in (client, clientProxy, originProxy, origin):
            s.setblocking(False)
            self.addCleanup(s.close)
        fake = _FakeSplice()
        source = splicemodule._End(clientProxy.fileno(), fake)  # type: ignore[arg-type]
        sink = splicemodule._End(originProxy.fileno(), fake)  # type: ignore[arg-type]
        direction = splicemodule._Direction(
            fake,  # type: ignore[arg-type]
            source,
            sink,
            originProxy,
            True,
        )
        self.addCleanup(direction.close)
        source.reading = True
        return client, origin, fake, source, sink, direction

    @settings(max_examples=30, deadline=None)
    @given(
        size=st.integers(0, 3 * 1048576),
        chunk=st.integers(512, 300000),
        readSize=st.integers(1024, 400000),
    )
    def test_inOrderWithBackpressure(
        self, size: int, chunk: int, readSize: int
    ) -> None:
        """
        Whatever the sizes of the writes into the source and of the reads
        from the sink, every byte arrives once and in order, counted; the
        source is read only while the pipe is empty, and the sink is
        watched only while bytes wait in the pipe; the source's end of
        stream shuts the sink's writing down once the pipe is empty.
        """
        client, origin, fake, source, sink, direction = self.direction()
        # Small socket buffers, so that the sink often will not take all.
        direction._sinkSocket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        origin.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        fake.reactor.addReader(source)
        data = pattern(size, seed=chunk)
        sent = 0
        received = bytearray()
        # Bounded (writes of at least 512 bytes, reads of at least 1 KiB:
        # at most a pass per 512 bytes, with room to spare), so that a
        # direction that stalled fails the test, not hangs it.
        for _ in range(4 * (size // 512) + 100000):
            if sent < len(data):
                try:
                    sent += client.send(data[sent : sent + chunk])
                except BlockingIOError:
                    pass
                if sent == len(data):
                    client.shutdown(socket.SHUT_WR)
            elif size == 0 and sent == 0:
                client.shutdown(socket.SHUT_WR)
                sent = -1
            # One reactor pass: what is registered is told.
            if source in fake.reactor.readers:
                self.assertEqual(direction._pending, 0)
                source.doRead()
            if sink in fake.reactor.writers:
                self.assertGreater(direction._pending, 0)
                sink.doWrite()
            try:
                piece = origin.recv(readSize)
            except BlockingIOError:
                continue
            if not piece:
                break
            received += piece
        else:
            self.fail(f"stalled after {len(received)} of {size} bytes")
        self.assertEqual(fake.failures, 0)
        self.assertEqual(len(received), size)
        self.assertTrue(bytes(received) == data)
        self.assertEqual(fake.exchange.bytesUp, size)
        self.assertFalse(fake.exchange._clientReadOpen)
        self.assertEqual(fake.reactor.readers | fake.reactor.writers, set())

    def test_sinkGone(self) -> None:
        """
        A sink that is gone (reset) makes the direction report a failure,
        which aborts the tunnel.
        """
        client, origin, fake, source, sink, direction = self.direction()
        origin.close()
        client.send(b"x" * 1000)
        source.doRead()
        self.assertEqual(fake.failures, 1)
