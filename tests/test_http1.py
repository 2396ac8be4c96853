"""
Tests for L{proxy_app.http1}, the llhttp-based HTTP/1.1 readers and writers,
and for the framing the proxy's two sides build on them
(L{proxy_app.server.ProxyProtocol} and L{proxy_app.upstream.UpstreamHTTP}),
driven in memory.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.addresses import AddressDecision
from proxy_app.config import Config, Limits
from proxy_app.http1 import (
    DATA,
    END,
    ERROR,
    HEAD,
    LAST_CHUNK,
    HeadError,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    chunk,
    requestHead,
    responseHead,
)
from proxy_app.resolver import DestinationDenied

from .helpers import Harness, makeHarness, parseResponse

# The limits RequestReader gets by default in the proxy's configuration.
MAX_TARGET = 8192
MAX_HEADERS = 100
MAX_HEAD = 65536


def requestReader(
    maxTarget: int = MAX_TARGET, maxHeaders: int = MAX_HEADERS, maxHead: int = MAX_HEAD
) -> RequestReader:
    return RequestReader(maxTarget, maxHeaders, maxHead)


def kinds(reader: RequestReader) -> list[int]:
    """
    The kinds of the events in C{reader}'s queue, in order.
    """
    return [kind for kind, _ in reader.events]


def heads(reader: RequestReader) -> list[RequestHead]:
    """
    The request heads in C{reader}'s queue, in order.
    """
    return [value for kind, value in reader.events if kind == HEAD]


def body(reader: RequestReader) -> bytes:
    """
    The bytes of every DATA event in C{reader}'s queue, joined.
    """
    return b"".join(value for kind, value in reader.events if kind == DATA)


def error(reader: RequestReader) -> HeadError:
    """
    The ERROR event's error; it must be the last event in the queue.
    """
    kind, value = reader.events[-1]
    assert kind == ERROR, list(reader.events)
    assert isinstance(value, HeadError)
    return value


class RequestHeadTests(SynchronousTestCase):
    """
    L{RequestReader} reads a request head into a L{RequestHead}.
    """

    def test_simpleGet(self) -> None:
        """
        A bodiless GET gives a HEAD event then an END event; the head has
        the method, the target as sent, the version, the headers with the
        names in lower case in C{headers} and as sent in C{raw}, in order,
        and no body framing.
        """
        reader = requestReader()
        reader.feed(
            b"GET http://origin.example/p?q=1 HTTP/1.1\r\n"
            b"Host: origin.example\r\n"
            b"X-Mixed-Case: Value\r\n"
            b"\r\n"
        )
        self.assertEqual(kinds(reader), [HEAD, END])
        head = reader.events[0][1]
        self.assertIsInstance(head, RequestHead)
        self.assertEqual(head.method, b"GET")
        self.assertEqual(head.target, b"http://origin.example/p?q=1")
        self.assertEqual(head.version, "1.1")
        self.assertEqual(
            head.headers, [(b"host", b"origin.example"), (b"x-mixed-case", b"Value")]
        )
        self.assertEqual(
            head.raw, [(b"Host", b"origin.example"), (b"X-Mixed-Case", b"Value")]
        )
        self.assertTrue(head.keepAlive)
        self.assertFalse(head.chunked)
        self.assertIsNone(head.contentLength)
        self.assertEqual(head.get(b"x-mixed-case"), b"Value")
        self.assertIsNone(head.get(b"X-Mixed-Case"))
        self.assertIsNone(reader.events[1][1])
        self.assertFalse(reader.upgraded)

    def test_connectionClose(self) -> None:
        """
        An HTTP/1.1 request with C{Connection: close} is not keep-alive.
        """
        reader = requestReader()
        reader.feed(b"GET http://a.example/ HTTP/1.1\r\nConnection: close\r\n\r\n")
        self.assertEqual(kinds(reader), [HEAD, END])
        self.assertFalse(heads(reader)[0].keepAlive)

    def test_http10NotKeepAlive(self) -> None:
        """
        An HTTP/1.0 request is not keep-alive, even with
        C{Connection: keep-alive}: the proxy offers HTTP/1.0 clients one
        request per connection.
        """
        for extra in (b"", b"Connection: keep-alive\r\n"):
            reader = requestReader()
            reader.feed(b"GET http://a.example/ HTTP/1.0\r\n" + extra + b"\r\n")
            self.assertEqual(kinds(reader), [HEAD, END])
            head = heads(reader)[0]
            self.assertEqual(head.version, "1.0")
            self.assertFalse(head.keepAlive, extra)

    def test_trailingWhitespaceStripped(self) -> None:
        """
        Spaces and tabs after a header value are not part of the value, in
        C{headers} nor in C{raw}; whitespace inside the value is kept.
        """
        reader = requestReader()
        reader.feed(b"GET / HTTP/1.1\r\nX-A: one two \t \r\nX-B:\tb\t\r\n\r\n")
        head = heads(reader)[0]
        self.assertEqual(head.headers, [(b"x-a", b"one two"), (b"x-b", b"b")])
        self.assertEqual(head.raw, [(b"X-A", b"one two"), (b"X-B", b"b")])


class RequestBodyTests(SynchronousTestCase):
    """
    L{RequestReader} passes request bodies on as DATA events and keeps
    pipelined requests apart.
    """

    def test_contentLengthBody(self) -> None:
        """
        A Content-Length body is given as DATA events whose bytes are the
        body, then END; the head records the length.
        """
        reader = requestReader()
        reader.feed(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n01234")
        self.assertEqual(kinds(reader), [HEAD, DATA])
        reader.feed(b"56789")
        self.assertEqual(kinds(reader), [HEAD, DATA, DATA, END])
        self.assertEqual(body(reader), b"0123456789")
        head = heads(reader)[0]
        self.assertEqual(head.contentLength, 10)
        self.assertFalse(head.chunked)

    def test_chunkedBody(self) -> None:
        """
        A chunked body is given decoded, as DATA events, then END; the head
        is marked chunked and has no length.
        """
        reader = requestReader()
        reader.feed(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
        )
        self.assertEqual(kinds(reader)[0], HEAD)
        self.assertEqual(kinds(reader)[-1], END)
        self.assertEqual(set(kinds(reader)[1:-1]), {DATA})
        self.assertEqual(body(reader), b"hello world")
        head = heads(reader)[0]
        self.assertTrue(head.chunked)
        self.assertIsNone(head.contentLength)

    def test_trailersNotInHead(self) -> None:
        """
        Trailer fields after a chunked body are not added to the head's
        headers, and the message still ends.
        """
        reader = requestReader()
        reader.feed(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Trailer: t\r\nX-Other: o\r\n\r\n"
        )
        self.assertEqual(kinds(reader), [HEAD, DATA, END])
        head = heads(reader)[0]
        self.assertEqual(head.headers, [(b"transfer-encoding", b"chunked")])
        self.assertEqual(head.raw, [(b"Transfer-Encoding", b"chunked")])

    def test_pipelined(self) -> None:
        """
        Two requests in one read give their events in order: HEAD, END for
        the first, HEAD, DATA, END for the second.
        """
        reader = requestReader()
        reader.feed(
            b"GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz"
        )
        self.assertEqual(kinds(reader), [HEAD, END, HEAD, DATA, END])
        self.assertEqual([h.target for h in heads(reader)], [b"/a", b"/b"])
        self.assertEqual([h.method for h in heads(reader)], [b"GET", b"POST"])
        self.assertEqual(body(reader), b"xyz")

    def test_byteByByte(self) -> None:
        """
        A request arriving one byte at a time is read as if it came at
        once.
        """
        data = (
            b"POST http://a.example/x HTTP/1.1\r\n"
            b"Host: a.example\r\nX-Long-Name: some value  \r\n"
            b"Content-Length: 3\r\n\r\nxyz"
        )
        whole = requestReader()
        whole.feed(data)
        split = requestReader()
        for byte in data:
            split.feed(bytes([byte]))
        self.assertEqual(kinds(whole), [HEAD, DATA, END])
        self.assertEqual(set(kinds(split)), {HEAD, DATA, END})
        self.assertEqual(kinds(split)[0], HEAD)
        self.assertEqual(kinds(split)[-1], END)
        a, b = heads(whole)[0], heads(split)[0]
        self.assertEqual(
            (b.method, b.target, b.version, b.headers, b.raw, b.contentLength),
            (a.method, a.target, a.version, a.headers, a.raw, a.contentLength),
        )
        self.assertEqual(b.headers[1], (b"x-long-name", b"some value"))
        self.assertEqual(body(split), b"xyz")


class RequestUpgradeTests(SynchronousTestCase):
    """
    A CONNECT or upgrade request stops L{RequestReader} after its head;
    L{RequestReader.resume} goes on reading what followed as HTTP.
    """

    CONNECT = b"CONNECT origin.example:443 HTTP/1.1\r\nHost: origin.example:443\r\n\r\n"

    def test_connectStops(self) -> None:
        """
        After a CONNECT head the reader is C{upgraded}, the bytes after the
        head are in C{leftover} unparsed, and later reads are appended to
        it.
        """
        reader = requestReader()
        reader.feed(self.CONNECT + b"\x16\x03\x01")
        self.assertEqual(kinds(reader), [HEAD, END])
        self.assertEqual(heads(reader)[0].method, b"CONNECT")
        self.assertEqual(heads(reader)[0].target, b"origin.example:443")
        self.assertTrue(reader.upgraded)
        self.assertEqual(reader.leftover, b"\x16\x03\x01")
        reader.feed(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(reader.leftover, b"\x16\x03\x01GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(kinds(reader), [HEAD, END])

    def test_resumeAfterConnect(self) -> None:
        """
        L{RequestReader.resume} parses the leftover as the next request and
        goes on reading HTTP.
        """
        reader = requestReader()
        reader.feed(self.CONNECT + b"GET http://a.example/ HTTP/1.1\r\nHo")
        reader.feed(b"st: a.example\r\n\r\n")
        self.assertEqual(kinds(reader), [HEAD, END])
        reader.resume()
        self.assertFalse(reader.upgraded)
        self.assertEqual(reader.leftover, b"")
        self.assertEqual(kinds(reader), [HEAD, END, HEAD, END])
        second = heads(reader)[1]
        self.assertEqual((second.method, second.target), (b"GET", b"http://a.example/"))
        self.assertEqual(second.headers, [(b"host", b"a.example")])
        reader.feed(b"GET /third HTTP/1.1\r\n\r\n")
        self.assertEqual(heads(reader)[2].target, b"/third")

    def test_resumeWithoutLeftover(self) -> None:
        """
        Resuming with nothing left over waits for the next request.
        """
        reader = requestReader()
        reader.feed(self.CONNECT)
        self.assertEqual(reader.leftover, b"")
        reader.resume()
        self.assertEqual(kinds(reader), [HEAD, END])
        reader.feed(b"GET /n HTTP/1.1\r\n\r\n")
        self.assertEqual(kinds(reader), [HEAD, END, HEAD, END])

    def test_upgradeRequest(self) -> None:
        """
        A bodiless GET asking for a protocol upgrade stops the reader like
        a CONNECT; after L{RequestReader.resume} the request that followed
        it is read.
        """
        reader = requestReader()
        reader.feed(
            b"GET http://a.example/ws HTTP/1.1\r\nConnection: upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n"
            b"GET http://a.example/next HTTP/1.1\r\n\r\n"
        )
        self.assertEqual(kinds(reader), [HEAD, END])
        self.assertTrue(reader.upgraded)
        self.assertEqual(reader.leftover, b"GET http://a.example/next HTTP/1.1\r\n\r\n")
        reader.resume()
        self.assertEqual(kinds(reader), [HEAD, END, HEAD, END])
        self.assertEqual(heads(reader)[1].target, b"http://a.example/next")

    def test_upgradeRequestWithBody(self) -> None:
        """
        An upgrade request with a body is refused with 400: llhttp would
        skip the body, and the body must not be read as a request.
        """
        reader = requestReader()
        reader.feed(
            b"GET http://a.example/ws HTTP/1.1\r\nConnection: upgrade\r\n"
            b"Upgrade: websocket\r\nContent-Length: 5\r\n\r\n"
            b"GET http://a.example/smuggled HTTP/1.1\r\n\r\n"
        )
        self.assertEqual(error(reader).status, 400)
        # The refused request is not passed on either, without its body.
        self.assertEqual(kinds(reader), [ERROR])
        self.assertFalse(reader.upgraded)
        self.assertEqual(reader.leftover, b"")
        reader.resume()
        reader.feed(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(kinds(reader), [ERROR])


class RequestRefusalTests(SynchronousTestCase):
    """
    L{RequestReader} refuses what could be read two ways, and what exceeds
    its limits, with an ERROR event carrying the status to answer with.
    """

    def assertRefused(
        self, data: bytes, status: int, reader: RequestReader | None = None
    ) -> None:
        if reader is None:
            reader = requestReader()
        reader.feed(data)
        self.assertEqual(kinds(reader), [ERROR], data)
        self.assertEqual(error(reader).status, status, data)

    def test_bareLF(self) -> None:
        """
        Bare LF line endings: 400.
        """
        self.assertRefused(b"GET / HTTP/1.1\nHost: a\n\n", 400)

    def test_obsFold(self) -> None:
        """
        Obsolete line folding: 400.
        """
        self.assertRefused(b"GET / HTTP/1.1\r\nX-A: 1\r\n 2\r\n\r\n", 400)

    def test_spaceBeforeColon(self) -> None:
        """
        Whitespace between a header name and its colon: 400.
        """
        self.assertRefused(b"GET / HTTP/1.1\r\nX-A : 1\r\n\r\n", 400)

    def test_nulInValue(self) -> None:
        """
        A NUL byte in a header value: 400.
        """
        self.assertRefused(b"GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n", 400)

    def test_duplicateContentLength(self) -> None:
        """
        Two Content-Length headers, even equal: 400.
        """
        self.assertRefused(
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            400,
        )

    def test_contentLengthAndTransferEncoding(self) -> None:
        """
        Content-Length beside Transfer-Encoding: 400.
        """
        self.assertRefused(
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: "
            b"chunked\r\n\r\n"
            b"0\r\n\r\n",
            400,
        )

    def test_otherTransferCoding(self) -> None:
        """
        A transfer coding other than chunked alone, even one ending in
        chunked: 501.
        """
        self.assertRefused(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501
        )

    def test_http2RequestLine(self) -> None:
        """
        An HTTP/2.0 request line: 505.
        """
        self.assertRefused(b"GET / HTTP/2.0\r\n\r\n", 505)

    def test_longTarget(self) -> None:
        """
        A target longer than C{maxTarget}: 414, as soon as it is too long,
        before the head is complete, even when it arrives in pieces.
        """
        self.assertRefused(
            b"GET /" + b"a" * 20 + b" HTTP/1.1\r\n\r\n",
            414,
            requestReader(maxTarget=20),
        )
        self.assertRefused(b"GET /" + b"a" * 20, 414, requestReader(maxTarget=20))
        reader = requestReader(maxTarget=20)
        reader.feed(b"GET /" + b"a" * 15)
        self.assertEqual(kinds(reader), [])
        reader.feed(b"a" * 5)
        self.assertEqual(kinds(reader), [ERROR])
        self.assertEqual(error(reader).status, 414)

    def test_targetAtLimit(self) -> None:
        """
        A target exactly C{maxTarget} bytes long is accepted.
        """
        reader = requestReader(maxTarget=20)
        reader.feed(b"GET /" + b"a" * 19 + b" HTTP/1.1\r\n\r\n")
        self.assertEqual(kinds(reader), [HEAD, END])

    def test_tooManyHeaders(self) -> None:
        """
        More than C{maxHeaders} header lines: 431; exactly C{maxHeaders}
        are accepted.
        """
        self.assertRefused(
            b"GET / HTTP/1.1\r\n" + b"X-A: 1\r\n" * 4 + b"\r\n",
            431,
            requestReader(maxHeaders=3),
        )
        reader = requestReader(maxHeaders=3)
        reader.feed(b"GET / HTTP/1.1\r\n" + b"X-A: 1\r\n" * 3 + b"\r\n")
        self.assertEqual(kinds(reader), [HEAD, END])

    def test_endlessHead(self) -> None:
        """
        A head that never ends, arriving in small reads, is refused with
        431 by the first read that takes it past C{maxHead}.
        """
        reader = requestReader(maxHead=1024)
        start = b"GET / HTTP/1.1\r\nX-A: "
        reader.feed(start)
        received = len(start)
        while received + 10 <= 1024:
            reader.feed(b"a" * 10)
            received += 10
            self.assertEqual(kinds(reader), [])
        reader.feed(b"a" * 10)
        self.assertEqual(kinds(reader), [ERROR])
        self.assertEqual(error(reader).status, 431)

    def test_completeHeadOverLimit(self) -> None:
        """
        A head larger than C{maxHead} is refused with 431 even when it is
        complete in the read that takes it past the limit.
        """
        self.assertRefused(
            b"GET / HTTP/1.1\r\nX-A: " + b"a" * 5000 + b"\r\n\r\n",
            431,
            requestReader(maxHead=1024),
        )
        reader = requestReader(maxHead=1024)
        reader.feed(b"GET / HTTP/1.1\r\nX-A: " + b"a" * 900)
        self.assertEqual(kinds(reader), [])
        reader.feed(b"a" * 5000 + b"\r\n\r\n")
        self.assertEqual(kinds(reader), [ERROR])
        self.assertEqual(error(reader).status, 431)

    def test_pipelinedHeadOverLimit(self) -> None:
        """
        A second head that begins in the same read as the first is held to
        C{maxHead}: at once when its header lines are complete, and, while
        it is incomplete, once the reads after that one bring more than
        C{maxHead} bytes (what one read holds is bounded by the read size).
        """
        reader = requestReader(maxHead=1024)
        reader.feed(
            b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\nX-A: "
            + b"a" * 5000
            + b"\r\n\r\n"
        )
        self.assertEqual(kinds(reader), [HEAD, END, ERROR])
        self.assertEqual(error(reader).status, 431)

        reader = requestReader(maxHead=1024)
        reader.feed(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\nX-A: " + b"a" * 5000)
        self.assertEqual(kinds(reader), [HEAD, END])
        reader.feed(b"a" * 1000)
        self.assertEqual(kinds(reader), [HEAD, END])
        reader.feed(b"a" * 100)
        self.assertEqual(kinds(reader), [HEAD, END, ERROR])
        self.assertEqual(error(reader).status, 431)

    def test_pipelinedMalformed(self) -> None:
        """
        A malformed request after a good one in the same read: the good one
        is read whole, then the ERROR.
        """
        reader = requestReader()
        reader.feed(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\nHost: a\n\n")
        self.assertEqual(kinds(reader), [HEAD, END, ERROR])
        self.assertEqual(heads(reader)[0].target, b"/a")
        self.assertEqual(error(reader).status, 400)

    def test_nothingAfterError(self) -> None:
        """
        After an ERROR nothing more is parsed, and L{RequestReader.finish}
        adds nothing.
        """
        reader = requestReader()
        reader.feed(b"GET / HTTP/1.1\nHost: a\n\n")
        self.assertEqual(kinds(reader), [ERROR])
        reader.feed(b"GET / HTTP/1.1\r\n\r\n")
        reader.finish()
        self.assertEqual(kinds(reader), [ERROR])

    def test_finishMidBody(self) -> None:
        """
        The client closing in the middle of a body is an ERROR (400).
        """
        reader = requestReader()
        reader.feed(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nx")
        reader.finish()
        self.assertEqual(kinds(reader), [HEAD, DATA, ERROR])
        self.assertEqual(error(reader).status, 400)

    def test_finishMidHead(self) -> None:
        """
        The client closing in the middle of a head is an ERROR (400).
        """
        reader = requestReader()
        reader.feed(b"GET / HTTP/1.1\r\nHost: a")
        reader.finish()
        self.assertEqual(kinds(reader), [ERROR])
        self.assertEqual(error(reader).status, 400)

    def test_finishBetweenRequests(self) -> None:
        """
        The client closing between requests, or before any, is no error.
        """
        reader = requestReader()
        reader.finish()
        self.assertEqual(kinds(reader), [])
        reader = requestReader()
        reader.feed(b"GET / HTTP/1.1\r\n\r\n")
        reader.finish()
        self.assertEqual(kinds(reader), [HEAD, END])


class RecordingSink:
    """
    A L{ResponseReader} sink that records what it is told.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.heads: list[ResponseHead] = []

    def informational(self, head: ResponseHead) -> None:
        self.calls.append(("informational", head.status))
        self.heads.append(head)

    def head(self, head: ResponseHead) -> None:
        self.calls.append(("head", head.status))
        self.heads.append(head)

    def body(self, data: bytes) -> None:
        self.calls.append(("body", data))

    def complete(self) -> None:
        self.calls.append(("complete",))

    @property
    def received(self) -> bytes:
        return b"".join(call[1] for call in self.calls if call[0] == "body")

    def kinds(self) -> list[str]:
        return [call[0] for call in self.calls]


def responseReader(
    bodiless: bool = False, maxHead: int = 65536
) -> tuple[ResponseReader, RecordingSink]:
    sink = RecordingSink()
    reader = ResponseReader(sink, maxHead)
    reader.expect(bodiless=bodiless)
    return reader, sink


class ResponseReaderTests(SynchronousTestCase):
    """
    L{ResponseReader} reports an origin's response to its sink, knows when
    it is complete, and whether the connection can be reused.
    """

    def test_contentLength(self) -> None:
        """
        A Content-Length response: head, its body, complete; reusable.
        """
        reader, sink = responseReader()
        reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-A: b \r\n\r\n01234")
        self.assertEqual(sink.calls, [("head", 200), ("body", b"01234")])
        self.assertFalse(reader.complete)
        self.assertTrue(reader.started)
        reader.feed(b"56789")
        self.assertEqual(
            sink.calls,
            [("head", 200), ("body", b"01234"), ("body", b"56789"), ("complete",)],
        )
        self.assertTrue(reader.complete)
        self.assertTrue(reader.reusable)
        self.assertFalse(reader.untilClose)
        head = sink.heads[0]
        self.assertIsInstance(head, ResponseHead)
        self.assertEqual((head.status, head.reason, head.version), (200, b"OK", "1.1"))
        self.assertEqual(head.contentLength, 10)
        self.assertFalse(head.chunked)
        self.assertTrue(head.keepAlive)
        self.assertEqual(head.headers, [(b"content-length", b"10"), (b"x-a", b"b")])
        self.assertEqual(head.raw, [(b"Content-Length", b"10"), (b"X-A", b"b")])

    def test_chunked(self) -> None:
        """
        A chunked response is reported decoded, then complete; reusable.
        """
        reader, sink = responseReader()
        reader.feed(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        )
        self.assertFalse(reader.complete)
        reader.feed(b"2\r\nde\r\n0\r\n\r\n")
        self.assertEqual(sink.kinds()[0], "head")
        self.assertEqual(sink.kinds()[-1], "complete")
        self.assertEqual(sink.received, b"abcde")
        self.assertTrue(sink.heads[0].chunked)
        self.assertIsNone(sink.heads[0].contentLength)
        self.assertTrue(reader.complete)
        self.assertTrue(reader.reusable)

    def test_continueThenFinal(self) -> None:
        """
        A 100 Continue is reported once as informational, then the final
        response as the head, whether they arrive together or apart.
        """
        for reads in (
            [
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: "
                b"2\r\n\r\nok"
            ],
            [
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            ],
        ):
            reader, sink = responseReader()
            reader.feed(reads[0])
            if len(reads) > 1:
                self.assertEqual(sink.calls, [("informational", 100)])
                self.assertFalse(reader.started)
                self.assertFalse(reader.complete)
                reader.feed(reads[1])
            self.assertEqual(
                sink.calls,
                [("informational", 100), ("head", 200), ("body", b"ok"), ("complete",)],
            )
            self.assertEqual(sink.heads[0].reason, b"Continue")
            self.assertTrue(reader.complete)
            self.assertTrue(reader.reusable)

    def test_noBodyStatuses(self) -> None:
        """
        A 204 or 304 with a Content-Length completes at its head, without a
        body, and leaves the connection reusable.
        """
        for status, reason in ((204, b"No Content"), (304, b"Not Modified")):
            reader, sink = responseReader()
            reader.feed(
                b"HTTP/1.1 %d %s\r\nContent-Length: 10\r\n\r\n" % (status, reason)
            )
            self.assertEqual(sink.calls, [("head", status), ("complete",)])
            self.assertEqual(sink.heads[0].contentLength, 10)
            self.assertTrue(reader.complete)
            self.assertTrue(reader.reusable)

    def test_headResponse(self) -> None:
        """
        After C{expect(bodiless=True)}, for a HEAD request, a response with
        C{Content-Length: 10} completes at its head, and the connection is
        not reused.
        """
        reader, sink = responseReader(bodiless=True)
        reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        self.assertEqual(sink.calls, [("head", 200), ("complete",)])
        self.assertEqual(sink.heads[0].contentLength, 10)
        self.assertTrue(reader.complete)
        self.assertFalse(reader.reusable)
        self.assertFalse(reader.untilClose)

    def test_closeDelimited(self) -> None:
        """
        A response with neither length nor chunked framing lasts until the
        origin closes: C{untilClose}, not reusable, its body passed on, and
        L{ResponseReader.finish} completes it.
        """
        reader, sink = responseReader()
        reader.feed(b"HTTP/1.1 200 OK\r\n\r\nsome ")
        reader.feed(b"data")
        self.assertTrue(reader.untilClose)
        self.assertFalse(reader.reusable)
        self.assertFalse(reader.complete)
        self.assertEqual(
            sink.calls, [("head", 200), ("body", b"some "), ("body", b"data")]
        )
        self.assertTrue(reader.finish())
        self.assertTrue(reader.complete)
        self.assertFalse(reader.reusable)

    def test_finishMidBody(self) -> None:
        """
        The origin closing in the middle of a Content-Length body does not
        complete the response.
        """
        reader, sink = responseReader()
        reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        self.assertFalse(reader.finish())
        self.assertFalse(reader.complete)
        self.assertNotIn(("complete",), sink.calls)

    def test_finishBeforeHead(self) -> None:
        """
        The origin closing before any response does not complete one.
        """
        reader, _ = responseReader()
        self.assertFalse(reader.finish())
        reader.feed(b"HTTP/1.1 200 OK\r\nX-A:")
        self.assertFalse(reader.finish())

    def test_connectionCloseNotReusable(self) -> None:
        """
        C{Connection: close}, or HTTP/1.0 even with C{Connection:
        keep-alive}, leaves the connection not reusable.
        """
        for response in (
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n",
        ):
            reader, sink = responseReader()
            reader.feed(response)
            self.assertEqual(sink.calls, [("head", 200), ("complete",)], response)
            self.assertFalse(reader.reusable, response)
            self.assertFalse(sink.heads[0].keepAlive, response)

    def test_otherTransferCoding(self) -> None:
        """
        C{Transfer-Encoding: gzip} raises L{HeadError}; nothing is reported.
        """
        reader, sink = responseReader()
        with self.assertRaises(HeadError):
            reader.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
        self.assertEqual(sink.calls, [])

    def test_unrequestedSwitch(self) -> None:
        """
        A 101 Switching Protocols the proxy did not ask for raises
        L{HeadError}, and no final response is reported.
        """
        reader, sink = responseReader()
        with self.assertRaises(HeadError) as raised:
            reader.feed(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                b"Upgrade: websocket\r\n\r\n"
            )
        self.assertIn("protocol switch", raised.exception.message)
        self.assertNotIn("head", sink.kinds())
        self.assertFalse(reader.complete)

    def test_endlessHead(self) -> None:
        """
        A response head that never ends raises L{HeadError} once it is
        larger than C{maxHead}.
        """
        reader, sink = responseReader(maxHead=1024)
        reader.feed(b"HTTP/1.1 200 OK\r\nX-A: ")
        for _ in range(100):
            reader.feed(b"a" * 10)
        with self.assertRaises(HeadError):
            reader.feed(b"a" * 10)
        self.assertEqual(sink.calls, [])

    def test_completeHeadOverLimit(self) -> None:
        """
        A response head larger than C{maxHead} raises L{HeadError} even when
        it is complete in one read.
        """
        reader, sink = responseReader(maxHead=1024)
        with self.assertRaises(HeadError):
            reader.feed(
                b"HTTP/1.1 200 OK\r\nX-A: "
                + b"a" * 5000
                + b"\r\nContent-Length: 0\r\n\r\n"
            )

    def test_extraBytes(self) -> None:
        """
        Bytes after a complete response, in the same read or a later one,
        leave the connection not reusable and are not reported.
        """
        for reads in (
            [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"],
            [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"EXTRA"],
            [
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                b"HTTP/1.1 200 OK\r\n\r\n",
            ],
        ):
            reader, sink = responseReader()
            for data in reads:
                reader.feed(data)
            self.assertEqual(
                sink.calls, [("head", 200), ("body", b"ok"), ("complete",)], reads
            )
            self.assertTrue(reader.complete)
            self.assertFalse(reader.reusable, reads)

    def test_twoResponses(self) -> None:
        """
        One reader reads a response per C{expect()}: both parse, each
        complete and reusable.
        """
        reader, sink = responseReader()
        reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        self.assertTrue(reader.complete)
        self.assertTrue(reader.reusable)
        reader.expect(bodiless=False)
        self.assertFalse(reader.complete)
        self.assertFalse(reader.started)
        reader.feed(
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: "
            b"chunked\r\n\r\n1\r\nb\r\n0\r\n\r\n"
        )
        self.assertEqual(
            sink.calls,
            [
                ("head", 200),
                ("body", b"a"),
                ("complete",),
                ("head", 201),
                ("body", b"b"),
                ("complete",),
            ],
        )
        self.assertEqual(sink.heads[1].reason, b"Created")
        self.assertTrue(reader.complete)
        self.assertTrue(reader.reusable)


class WireFormatTests(SynchronousTestCase):
    """
    The heads and chunks the proxy writes.
    """

    def test_requestHead(self) -> None:
        """
        L{requestHead} writes an HTTP/1.1 request line and the headers in
        order, as given.
        """
        self.assertEqual(
            requestHead(
                b"POST",
                b"/p?q=1",
                [(b"Host", b"a.example"), (b"X-A", b"1"), (b"x-a", b"2")],
            ),
            b"POST /p?q=1 HTTP/1.1\r\nHost: a.example\r\nX-A: 1\r\nx-a: 2\r\n\r\n",
        )
        self.assertEqual(requestHead(b"GET", b"/", []), b"GET / HTTP/1.1\r\n\r\n")

    def test_responseHead(self) -> None:
        """
        L{responseHead} writes an HTTP/1.1 status line and the headers.
        """
        self.assertEqual(
            responseHead(404, b"Not Found", [(b"Content-Length", b"0")]),
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        )
        self.assertEqual(responseHead(200, b"OK", []), b"HTTP/1.1 200 OK\r\n\r\n")

    def test_chunk(self) -> None:
        """
        L{chunk} frames bytes with their length in lower-case hex;
        L{LAST_CHUNK} ends a chunked body without trailers.
        """
        self.assertEqual(chunk(b"hello"), b"5\r\nhello\r\n")
        self.assertEqual(chunk(b"x" * 26), b"1a\r\n" + b"x" * 26 + b"\r\n")
        self.assertEqual(chunk(b"x" * 4096), b"1000\r\n" + b"x" * 4096 + b"\r\n")
        self.assertEqual(LAST_CHUNK, b"0\r\n\r\n")

    def test_roundTrip(self) -> None:
        """
        What L{requestHead} and L{chunk} write, L{RequestReader} reads back.
        """
        reader = requestReader()
        reader.feed(
            requestHead(b"PUT", b"/x", [(b"Transfer-Encoding", b"chunked")])
            + chunk(b"abc")
            + chunk(b"x" * 300)
            + LAST_CHUNK
        )
        self.assertEqual(kinds(reader)[0], HEAD)
        self.assertEqual(kinds(reader)[-1], END)
        self.assertEqual(body(reader), b"abc" + b"x" * 300)


# Protocol-level tests: the framing of what goes upstream and back.

GET = b"GET http://origin.example/path HTTP/1.1\r\nHost: origin.example\r\n\r\n"


def requestIDLine(h: Harness) -> bytes:
    """
    The request-id header line the proxy adds for the exchange in progress.
    """
    exchange = h.protocol.exchange
    assert exchange is not None
    return b"%s: %s\r\n" % (h.factory.requestIDName, exchange.requestID.encode("ascii"))


def count(data: bytes, name: bytes) -> int:
    """
    How many header lines named C{name} (any case) are in C{data}'s head.
    """
    head = data.partition(b"\r\n\r\n")[0].lower()
    return head.count(b"\r\n" + name.lower() + b":")


class UpstreamFramingTests(SynchronousTestCase):
    """
    The request sent upstream is framed once, by the proxy.
    """

    def test_contentLengthOnce(self) -> None:
        """
        A POST with Content-Length goes upstream with exactly one
        Content-Length, the client's value, and its body as sent.
        """
        h = makeHarness()
        h.send(
            b"POST http://origin.example/hook HTTP/1.1\r\nHost: origin.example\r\n"
            b"content-length: 5\r\nX-A: 1\r\n\r\nhello"
        )
        _, upTransport = h.connectUpstream()
        self.assertEqual(
            upTransport.value(),
            b"POST /hook HTTP/1.1\r\nHost: origin.example\r\nX-A: 1\r\n"
            + requestIDLine(h)
            + b"Content-Length: 5\r\n\r\nhello",
        )
        self.assertEqual(count(upTransport.value(), b"content-length"), 1)
        self.assertEqual(count(upTransport.value(), b"transfer-encoding"), 0)

    def test_chunkedOnce(self) -> None:
        """
        A chunked POST goes upstream with exactly one
        C{Transfer-Encoding: chunked}, no Content-Length, and its body
        re-chunked as it was read: chunk extensions and trailers dropped,
        a chunk split across reads sent as two.
        """
        h = makeHarness()
        h.send(
            b"POST http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n"
            b"Transfer-Encoding: chunked\r\n\r\na;ext=1\r\n01234"
        )
        _, upTransport = h.connectUpstream()
        idLine = requestIDLine(h)
        h.send(b"56789\r\n3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n")
        self.assertEqual(
            upTransport.value(),
            b"POST / HTTP/1.1\r\nHost: origin.example\r\n"
            + idLine
            + b"Transfer-Encoding: chunked\r\n\r\n"
            b"5\r\n01234\r\n5\r\n56789\r\n3\r\nabc\r\n0\r\n\r\n",
        )
        self.assertEqual(count(upTransport.value(), b"transfer-encoding"), 1)
        self.assertEqual(count(upTransport.value(), b"content-length"), 0)

    def test_bodilessNoFraming(self) -> None:
        """
        A bodiless GET goes upstream without framing headers.
        """
        h = makeHarness()
        h.send(GET)
        _, upTransport = h.connectUpstream()
        self.assertEqual(
            upTransport.value(),
            b"GET /path HTTP/1.1\r\nHost: origin.example\r\n"
            + requestIDLine(h)
            + b"\r\n",
        )


class ClientFramingTests(SynchronousTestCase):
    """
    The response sent to the client is framed once, by the proxy, for the
    client's HTTP version.
    """

    def test_contentLengthOnce(self) -> None:
        """
        A Content-Length response reaches the client with exactly one
        Content-Length, and the connection stays open.
        """
        h = makeHarness()
        h.send(GET)
        up, _ = h.connectUpstream()
        idLine = requestIDLine(h)
        up.dataReceived(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nX-A: b\r\n\r\nhello")
        self.assertEqual(
            h.client.value(),
            b"HTTP/1.1 200 OK\r\nX-A: b\r\n"
            + idLine
            + b"Content-Length: 5\r\n\r\nhello",
        )
        self.assertEqual(count(h.client.value(), b"content-length"), 1)
        self.assertFalse(h.client.disconnecting)

    def test_closeDelimitedToHTTP11(self) -> None:
        """
        A close-delimited response goes to an HTTP/1.1 client chunked and
        ends with the last chunk; the client connection stays open for
        another request.
        """
        h = makeHarness()
        h.send(GET)
        up, upTransport = h.connectUpstream()
        idLine = requestIDLine(h)
        up.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome ")
        up.dataReceived(b"data")
        self.assertFalse(h.client.value().endswith(LAST_CHUNK))
        up.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            h.client.value(),
            b"HTTP/1.1 200 OK\r\n" + idLine + b"Transfer-Encoding: chunked\r\n\r\n"
            b"5\r\nsome \r\n4\r\ndata\r\n0\r\n\r\n",
        )
        self.assertFalse(h.client.disconnecting)
        self.assertEqual(h.access[-1]["response_code"], 200)
        self.assertIsNone(h.access[-1]["reason_code"])
        h.send(GET)
        self.assertEqual(len(h.resolver.calls), 2)

    def test_closeDelimitedToHTTP10(self) -> None:
        """
        A close-delimited response goes to an HTTP/1.0 client as it is,
        without Transfer-Encoding, with C{Connection: close}, and the client
        connection is closed after it.
        """
        h = makeHarness()
        h.send(b"GET http://origin.example/ HTTP/1.0\r\nHost: origin.example\r\n\r\n")
        up, _ = h.connectUpstream()
        idLine = requestIDLine(h)
        up.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome data")
        self.assertFalse(h.client.disconnecting)
        up.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            h.client.value(),
            b"HTTP/1.1 200 OK\r\n" + idLine + b"Connection: close\r\n\r\nsome data",
        )
        self.assertEqual(count(h.client.value(), b"transfer-encoding"), 0)
        self.assertTrue(h.client.disconnecting)

    def test_headResponse(self) -> None:
        """
        A response to HEAD announcing C{Content-Length: 10} reaches the
        client with that one Content-Length and no body; the exchange
        completes, and the upstream connection, on which the origin might
        yet send those 10 bytes, is closed rather than pooled.
        """
        h = makeHarness()
        h.send(b"HEAD http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n\r\n")
        up, upTransport = h.connectUpstream()
        idLine = requestIDLine(h)
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        self.assertEqual(
            h.client.value(),
            b"HTTP/1.1 200 OK\r\n" + idLine + b"Content-Length: 10\r\n\r\n",
        )
        self.assertEqual(len(h.access), 1)
        self.assertEqual(
            (h.access[0]["method"], h.access[0]["response_code"]), ("HEAD", 200)
        )
        self.assertTrue(upTransport.disconnecting)
        self.assertEqual(h.factory.pool.idleCount(), 0)
        self.assertFalse(h.client.disconnecting)
        h.client.clear()
        h.send(GET)
        self.assertEqual(len(h.reactor.tcpClients), 2)

    def test_continueToHTTP11(self) -> None:
        """
        A 100 Continue from the origin is passed to an HTTP/1.1 client
        before the final response.
        """
        h = makeHarness()
        h.send(
            b"POST http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n"
            b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n"
        )
        up, upTransport = h.connectUpstream()
        idLine = requestIDLine(h)
        up.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(h.client.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        h.send(b"hi")
        self.assertTrue(upTransport.value().endswith(b"\r\n\r\nhi"))
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(
            h.client.value(),
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\n" + idLine + b"Content-Length: 2\r\n\r\nok",
        )

    def test_noContinueToHTTP10(self) -> None:
        """
        A 100 Continue from the origin is not passed to an HTTP/1.0 client,
        which gets only the final response.
        """
        h = makeHarness()
        h.send(
            b"POST http://origin.example/ HTTP/1.0\r\nHost: origin.example\r\n"
            b"Content-Length: 2\r\n\r\nhi"
        )
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(h.client.value(), b"")
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(h.client.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertNotIn(b" 100 ", h.client.value())
        self.assertTrue(h.client.value().endswith(b"\r\n\r\nok"))

    def test_clientConnectionClose(self) -> None:
        """
        A request with C{Connection: close} gets a response with one
        C{Connection: close}, and the client connection is closed after it.
        """
        h = makeHarness()
        h.send(
            b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n"
            b"Connection: close\r\n\r\n"
        )
        up, _ = h.connectUpstream()
        idLine = requestIDLine(h)
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(
            h.client.value(),
            b"HTTP/1.1 200 OK\r\n"
            + idLine
            + b"Content-Length: 2\r\nConnection: close\r\n\r\nok",
        )
        self.assertEqual(count(h.client.value(), b"connection"), 1)
        self.assertTrue(h.client.disconnecting)


class ConnectionSequenceTests(SynchronousTestCase):
    """
    What follows a request on the same client connection is read as the
    next request, or refused, at the right moment.
    """

    def test_deniedConnectThenGet(self) -> None:
        """
        A CONNECT the policy refuses, followed in the same read by a GET:
        the CONNECT is answered 403 and the GET is then served as the next
        request on the same connection.
        """
        denied = DestinationDenied(
            "meta.example",
            443,
            AddressDecision(False, "169.254.169.254", "Deny: Not Global Unicast"),
        )
        h = makeHarness({"meta.example": denied, "origin.example": ["203.0.113.10"]})
        h.send(
            b"CONNECT meta.example:443 HTTP/1.1\r\nHost: meta.example:443\r\n\r\n"
            b"GET http://origin.example/next HTTP/1.1\r\nHost: origin.example\r\n\r\n"
        )
        self.assertEqual(
            h.resolver.calls, [("meta.example", 443), ("origin.example", 80)]
        )
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (403, b"1000"))
        self.assertEqual([c[:2] for c in h.reactor.tcpClients], [("203.0.113.10", 80)])
        up, upTransport = h.connectUpstream()
        self.assertTrue(upTransport.value().startswith(b"GET /next HTTP/1.1\r\n"))
        h.client.clear()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        status, _, rest = parseResponse(h.client.value())
        self.assertEqual((status, rest), (200, b"ok"))
        self.assertFalse(h.client.disconnecting)
        self.assertIsNone(h.protocol.tunnel)

    def test_malformedPipelinedRequest(self) -> None:
        """
        A malformed request pipelined in the same read behind a good one:
        the good one is forwarded and answered normally, then the client
        gets 400 (1015) and the connection is closed.
        """
        h = makeHarness()
        h.send(
            b"GET http://origin.example/a HTTP/1.1\r\nHost: origin.example\r\n\r\n"
            b"GET http://origin.example/b HTTP/1.1\nHost: origin.example\n\n"
        )
        self.assertEqual(h.resolver.calls, [("origin.example", 80)])
        up, upTransport = h.connectUpstream()
        self.assertTrue(upTransport.value().startswith(b"GET /a HTTP/1.1\r\n"))
        self.assertEqual(h.client.value(), b"")
        self.assertFalse(upTransport.disconnecting)
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        first, _, rest = h.client.value().partition(b"\r\n\r\nok")
        self.assertTrue(first.startswith(b"HTTP/1.1 200 OK\r\n"), h.client.value())
        status, headers, _ = parseResponse(rest)
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (400, b"1015"))
        self.assertTrue(h.client.disconnecting)
        self.assertEqual([line["response_code"] for line in h.access][:1], [200])

    def test_malformedRequestAfterResponse(self) -> None:
        """
        A malformed request sent after the previous response gets 400
        (1015) and the connection is closed.
        """
        h = makeHarness()
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        h.client.clear()
        h.send(b"GET http://origin.example/b HTTP/1.1\nHost: origin.example\n\n")
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (400, b"1015"))
        self.assertTrue(h.client.disconnecting)
        self.assertEqual(len(h.resolver.calls), 1)

    def test_completeHeadOverLimit(self) -> None:
        """
        A request head over C{max-request-header-size} that arrives whole in
        one read is refused with 431 before anything is looked up.
        """
        h = makeHarness(config=Config(limits=Limits(max_request_header=1024)))
        h.send(
            b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n"
            b"X-Big: " + b"a" * 5000 + b"\r\n\r\n"
        )
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (431, b"1015"))
        self.assertEqual(h.resolver.calls, [])
