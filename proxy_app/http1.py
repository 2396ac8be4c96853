"""
HTTP/1.1 on the wire, for both of the proxy's sides.

Heads are parsed by llhttp (Node.js's parser, through httptools): request
heads from clients in L{RequestReader}, response heads from origins in
L{ResponseReader}.  llhttp in its default, strict mode refuses what lets two
parsers read one message differently: bare LF line endings, obsolete line
folding, whitespace before a colon, NUL and other control bytes, duplicate
C{Content-Length}, C{Content-Length} beside C{Transfer-Encoding}, a
C{Transfer-Encoding} that does not end in C{chunked}, malformed chunk sizes.
What llhttp does not limit, the readers do: the size of a head, the length of
the request target and the number of header lines.

The proxy writes every head itself (L{requestHead}, L{responseHead}); it
never passes a head on as received.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import httptools

# Event kinds in a RequestReader's queue.
HEAD = 0
DATA = 1
END = 2
ERROR = 3

_CHUNKED = b"chunked"

# The interim (1xx) responses read from origins and relayed to clients:
# 100 Continue, 102 Processing, 103 Early Hints.  101 is a protocol switch,
# which the proxy never asks for.
INTERIM_STATUSES = frozenset({100, 102, 103})


class HeadError(Exception):
    """
    A message the proxy refuses to read.

    @ivar status: the HTTP status to answer with.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def headerValue(headers: Any, name: bytes) -> bytes | None:
    """
    The first value of header C{name} among C{headers}, or L{None}: the one
    way the proxy looks a header up.

    @param headers: C{(name, value)} pairs with the names in lower case, as
        L{_Head.headers} holds them.
    @param name: the header's name, in lower case.
    """
    for key, value in headers:
        if key == name:
            return value
    return None


class _Head:
    """
    What request and response heads share: the header lines, in order.

    @ivar headers: C{(name, value)} pairs with the name in lower case, for
        looking headers up.
    @ivar raw: the same pairs with the names as the sender spelled them, for
        passing headers on.
    @ivar keepAlive: whether the sender lets the connection carry another
        message after this one.
    @ivar chunked: whether the body is chunked.
    @ivar contentLength: the declared length, or L{None}.
    """

    __slots__ = ("headers", "raw", "version", "keepAlive", "chunked", "contentLength")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.raw: list[tuple[bytes, bytes]] = []
        self.version = "1.1"
        self.keepAlive = True
        self.chunked = False
        self.contentLength: int | None = None

    def get(self, name: bytes) -> bytes | None:
        """
        The first value of header C{name} (in lower case), or L{None}.
        """
        return headerValue(self.headers, name)

    def _framing(self) -> str | None:
        """
        Read the body's framing from the headers.

        @return: why the framing is refused, or L{None}.
        """
        # llhttp has checked that there is one valid Content-Length at
        # most, and not beside Transfer-Encoding.
        for name, value in self.headers:
            if name == b"transfer-encoding":
                if self.chunked or value.strip().lower() != _CHUNKED:
                    # Another coding would be passed on decoded but still
                    # labelled; the proxy deals in chunked only, like h11.
                    return f"unsupported Transfer-Encoding {value.decode('latin-1')!r}"
                self.chunked = True
            elif name == b"content-length":
                self.contentLength = int(value)
        return None


class RequestHead(_Head):
    """
    A request head from a client.
    """

    __slots__ = ("method", "target")

    def __init__(self) -> None:
        super().__init__()
        self.method = b""
        self.target = b""


class ResponseHead(_Head):
    """
    A response head from an origin.
    """

    __slots__ = ("status", "reason")

    def __init__(self) -> None:
        super().__init__()
        self.status = 0
        self.reason = b""


class RequestReader:
    """
    Parses a client's byte stream into a queue of events: C{(HEAD,
    RequestHead)}, C{(DATA, bytes)}, C{(END, None)}, and C{(ERROR,
    HeadError)}, after which nothing more is parsed.

    The queue lets the protocol take a request at its own pace: a pipelined
    request parsed from the same read as the one before it waits there.  A
    CONNECT (or another protocol upgrade) stops parsing after its head; the
    bytes after it are in L{leftover}, and L{resume} goes on parsing them as
    HTTP if the tunnel was refused.

    @ivar events: the queue, for the protocol to pop from the left.
    @ivar upgraded: L{True} after a CONNECT or upgrade head, until
        L{resume}.
    @ivar leftover: the bytes received after the upgrade head.
    """

    __slots__ = (
        "events",
        "maxTarget",
        "maxHeaders",
        "maxHead",
        "upgraded",
        "leftover",
        "_parser",
        "_head",
        "_lastHead",
        "_inHead",
        "_headBytes",
        "_headSize",
        "_failed",
    )

    def __init__(self, maxTarget: int, maxHeaders: int, maxHead: int) -> None:
        self.events: deque[tuple[int, Any]] = deque()
        self.maxTarget = maxTarget
        self.maxHeaders = maxHeaders
        self.maxHead = maxHead
        self.upgraded = False
        self.leftover = b""
        self._parser = httptools.HttpRequestParser(self)
        self._head: RequestHead | None = None
        # Between messages or inside a head: bytes count against maxHead.
        self._inHead = True
        self._headBytes = 0
        self._headSize = 0
        self._failed = False
        self._lastHead: RequestHead | None = None

    @property
    def inHead(self) -> bool:
        """
        Whether some of a request head has arrived and not all of it.
        """
        return self._head is not None

    def feed(self, data: bytes) -> None:
        """
        Parse more bytes; the events they make are appended to L{events}.
        """
        if self._failed:
            return
        if self.upgraded:
            self.leftover += data
            return
        if self._inHead:
            self._headBytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade(data[upgrade.args[0] :])
            return
        except httptools.HttpParserCallbackError as e:
            # A limit checked in a callback; anything else is a bug.
            if not isinstance(e.__context__, HeadError):
                raise
            self._fail(e.__context__)
            return
        except httptools.HttpParserError as e:
            self._fail(HeadError(f"Malformed request: {e}"))
            return
        if self._inHead and self._headBytes > self.maxHead and self._head is not None:
            self._fail(HeadError(f"Request head larger than {self.maxHead} bytes", 431))

    def finish(self) -> None:
        """
        The client closed its side.  A request cut short is an error; between
        requests, nothing is.
        """
        if self._failed or self.upgraded:
            return
        if self._head is not None or not self._inHead:
            self._fail(
                HeadError("Client closed the connection in the middle of a request")
            )

    def release(self) -> None:
        """
        The connection is done with HTTP (it became a tunnel, or closed):
        let go of the parser, which refers back to this reader, so that the
        pair is freed with the connection rather than left, a cycle, to the
        garbage collector (idle tunnels are held by the thousand).  Nothing
        more may be fed.
        """
        self.events.clear()
        self.leftover = b""
        del self._parser

    def resume(self) -> None:
        """
        After a refused CONNECT or a forwarded upgrade request: parse what
        followed its head as the next request.
        """
        if not self.upgraded:
            return
        self.upgraded = False
        leftover, self.leftover = self.leftover, b""
        self._parser = httptools.HttpRequestParser(self)
        self._inHead = True
        self._headBytes = 0
        if leftover:
            self.feed(leftover)

    def _upgrade(self, leftover: bytes) -> None:
        head = self._lastHead
        if head is not None and (head.chunked or head.contentLength):
            # llhttp skips the body of an upgrade request or a CONNECT;
            # reading it as the next request (after a refused CONNECT, say)
            # would let a body smuggle a request in.  The request itself is
            # refused too: it must not go on without the body its head
            # announces, and a CONNECT has no content (RFC 9110, 9.3.6).
            events = self.events
            while events and events[-1][1] is not head:
                events.pop()
            if events:
                events.pop()
            what = (
                "A CONNECT request"
                if head.method == b"CONNECT"
                else "A protocol upgrade request"
            )
            self._fail(HeadError(f"{what} cannot have a body"))
            return
        self.upgraded = True
        self.leftover = leftover

    def _fail(self, error: HeadError) -> None:
        self._failed = True
        self._head = None
        self.events.append((ERROR, error))

    # llhttp's callbacks.

    def on_message_begin(self) -> None:
        self._head = RequestHead()
        # The request line's method, spaces, version and CRLF.
        self._headSize = 20

    def on_url(self, url: bytes) -> None:
        head = self._head
        assert head is not None
        head.target += url
        if len(head.target) > self.maxTarget:
            raise HeadError(f"Request line longer than {self.maxTarget} bytes", 414)
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self._head
        if head is None:
            # A trailer field after a chunked body: not passed on.
            return
        value = value.rstrip(b" \t")
        head.raw.append((name, value))
        head.headers.append((name.lower(), value))
        if len(head.headers) > self.maxHeaders:
            raise HeadError(f"More than {self.maxHeaders} request header lines", 431)
        self._grow(len(name) + len(value) + 4)

    def _grow(self, size: int) -> None:
        # The head as parsed so far; a head still incomplete at the end of a
        # read is also measured in bytes received (see feed).
        self._headSize += size
        if self._headSize > self.maxHead:
            raise HeadError(f"Request head larger than {self.maxHead} bytes", 431)

    def on_headers_complete(self) -> None:
        head = self._head
        assert head is not None
        parser = self._parser
        head.method = parser.get_method()
        head.version = parser.get_http_version()
        if head.version not in ("1.1", "1.0"):
            if head.version == "0.9":
                # llhttp's reading of a request line without a version:
                # malformed (RFC 9112, section 3), not a version we lack.
                raise HeadError(
                    "Malformed request: the request line has no HTTP version"
                )
            raise HeadError(f"HTTP version {head.version} is not supported", 505)
        # HTTP/1.0 keep-alive is not offered: such a client gets one request.
        head.keepAlive = head.version == "1.1" and parser.should_keep_alive()
        refused = head._framing()
        if refused is not None:
            raise HeadError(f"Malformed request: {refused}", 501)
        self._head = None
        self._lastHead = head
        self._inHead = False
        self._headBytes = 0
        self.events.append((HEAD, head))

    def on_body(self, data: bytes) -> None:
        self.events.append((DATA, data))

    def on_message_complete(self) -> None:
        self._inHead = True
        self.events.append((END, None))


class ResponseReader:
    """
    Parses an origin's responses, one per request, and reports them to a
    sink with C{informational(head)}, C{head(head)}, C{body(bytes)} and
    C{complete()} methods.

    @ivar bodiless: set for a response to HEAD: it ends with its head.
    @ivar untilClose: the response in progress has no length; it ends when
        the origin closes.
    @ivar reusable: whether the connection can carry another request once
        the response in progress is complete.
    """

    __slots__ = (
        "sink",
        "maxHead",
        "bodiless",
        "untilClose",
        "reusable",
        "complete",
        "_parser",
        "_head",
        "_inHead",
        "_headBytes",
        "_headSize",
        "_afterBody",
    )

    def __init__(self, sink: Any, maxHead: int = 65536) -> None:
        self.sink = sink
        self.maxHead = maxHead
        self._parser = httptools.HttpResponseParser(self)
        self._reset(False)

    def release(self) -> None:
        """
        The connection closed: let go of the parser and the sink, which
        refer back to this reader, so that they are freed with the
        connection rather than left, a cycle, to the garbage collector.
        Nothing more may be fed.
        """
        self.sink = None
        del self._parser

    def expect(self, bodiless: bool) -> None:
        """
        A request has been sent: read its response, with a fresh parser, so
        that no parser state crosses from one exchange to the next.
        """
        self._parser = httptools.HttpResponseParser(self)
        self._reset(bodiless)

    def _reset(self, bodiless: bool) -> None:
        self.bodiless = bodiless
        self.untilClose = False
        self.reusable = True
        self.complete = False
        self._head: ResponseHead | None = None
        self._inHead = True
        self._headBytes = 0
        self._headSize = 0
        self._afterBody = False

    @property
    def started(self) -> bool:
        """
        Whether any of the final response has been parsed.
        """
        return self._head is not None and self._head.status >= 200

    def feed(self, data: bytes) -> None:
        """
        Parse more bytes.

        @raise HeadError: if the origin broke the protocol.
        """
        if self._afterBody:
            # The origin sent more than the response it was asked for.
            self.reusable = False
            return
        if self._inHead:
            self._headBytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if not self._afterBody:
                raise HeadError(
                    "Invalid HTTP response: unrequested protocol switch"
                ) from None
            self.reusable = False
        except httptools.HttpParserCallbackError as e:
            # Raised by the sink or by a check in a callback: pass it on as
            # it is.
            raise (e.__context__ or HeadError("Invalid HTTP response")) from None
        except httptools.HttpParserError as e:
            if self._afterBody:
                self.reusable = False
                return
            raise HeadError(f"Invalid HTTP response: {e}") from None
        if self._inHead and self._headBytes > self.maxHead:
            raise HeadError(f"Response head larger than {self.maxHead} bytes")

    def finish(self) -> bool:
        """
        The origin closed the connection.

        @return: whether that completed the response (one delimited by the
            close).
        """
        if self.complete:
            return True
        if self.untilClose and self._head is not None:
            self._afterBody = True
            self.complete = True
            return True
        return False

    # llhttp's callbacks.

    def on_message_begin(self) -> None:
        if self._afterBody:
            # The origin sent more than the response it owed, in the same
            # read: the connection cannot be trusted with another request.
            self.reusable = False
            return
        self._head = ResponseHead()
        # The status line's version, code, spaces and CRLF.
        self._headSize = 15

    def on_status(self, reason: bytes) -> None:
        head = self._head
        if head is not None and not self._afterBody:
            head.reason += reason
            self._grow(len(reason))

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self._head
        if head is None or not self._inHead or self._afterBody:
            return
        value = value.rstrip(b" \t")
        head.raw.append((name, value))
        head.headers.append((name.lower(), value))
        self._grow(len(name) + len(value) + 4)

    def _grow(self, size: int) -> None:
        self._headSize += size
        if self._headSize > self.maxHead:
            raise HeadError(f"Response head larger than {self.maxHead} bytes")

    def on_headers_complete(self) -> None:
        head = self._head
        if head is None or self._afterBody:
            return
        parser = self._parser
        head.status = parser.get_status_code()
        head.version = parser.get_http_version()
        if head.version not in ("1.1", "1.0"):
            raise HeadError(f"HTTP version {head.version} is not supported")
        refused = head._framing()
        if refused is not None:
            raise HeadError(f"Invalid HTTP response: {refused}")
        head.keepAlive = head.version == "1.1" and parser.should_keep_alive()
        status = head.status
        if not 100 <= status <= 599:
            raise HeadError(f"Invalid HTTP response: status code {status}")
        if status < 200:
            # Informational: the final response follows.  Only those a
            # client can act on are read; any other is refused, since
            # llhttp would read a body for some, which no reader after us
            # would expect.
            if status == 101:
                raise HeadError("Invalid HTTP response: unrequested protocol switch")
            if status not in INTERIM_STATUSES:
                raise HeadError(
                    f"Invalid HTTP response: unexpected interim status {status}"
                )
            if head.chunked or head.contentLength is not None:
                raise HeadError(
                    f"Invalid HTTP response: interim response {status} with a body"
                )
            self._headBytes = 0
            self.sink.informational(head)
            return
        self._inHead = False
        self.reusable = head.keepAlive
        noBody = self.bodiless or head.status in (204, 304)
        if not noBody and not head.chunked and head.contentLength is None:
            self.untilClose = True
            self.reusable = False
        self.sink.head(head)
        if self.bodiless:
            # llhttp would wait for the body a HEAD response announces; the
            # connection is not reused, so what follows does not matter.
            self.reusable = False
            self._done()

    def on_body(self, data: bytes) -> None:
        if self._afterBody:
            return
        if self._inHead:
            # Body bytes with no final head before them: never passed on.
            raise HeadError("Invalid HTTP response: body without a final response head")
        self.sink.body(data)

    def on_message_complete(self) -> None:
        head = self._head
        if head is None or head.status < 200 or self._afterBody:
            if head is not None and head.status < 200:
                self._head = None
                self._inHead = True
            return
        self._done()

    def _done(self) -> None:
        self._afterBody = True
        self.complete = True
        self.sink.complete()


def _headerLines(headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join([b"%s: %s\r\n" % field for field in headers])


def requestHead(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
) -> bytes:
    """
    The bytes of a request head.
    """
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, _headerLines(headers))


def responseHead(
    status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
) -> bytes:
    """
    The bytes of a response head.
    """
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, _headerLines(headers))


def chunk(data: bytes) -> bytes:
    """
    C{data} as one chunk of a chunked body.
    """
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
