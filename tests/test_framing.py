"""
Response framing and connection reuse against hostile origins: every byte a
client reads sits under a head the proxy wrote, and an origin connection goes
back to the pool only when it owes nothing and sent nothing more.
"""

from __future__ import annotations

import os
from typing import Any

import httptools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.config import Config, Timeouts
from proxy_app.http1 import ResponseReader

from .helpers import makeHarness, parseResponse

EVIL = b"GET http://evil.example/a HTTP/1.1\r\nHost: evil.example\r\n\r\n"
VICTIM = b"GET http://victim.example/b HTTP/1.1\r\nHost: victim.example\r\n\r\n"
ANSWERS = {"evil.example": ["203.0.113.66"], "victim.example": ["203.0.113.10"]}


class _Responses:
    """
    Reads a client's byte stream as a client would: a sequence of HTTP/1.1
    responses to GET requests.
    """

    def __init__(self) -> None:
        self.responses: list[dict[str, Any]] = []
        self._parser = httptools.HttpResponseParser(self)
        self._current: dict[str, Any] = {}

    def feed(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_message_begin(self) -> None:
        self._current = {"headers": {}, "body": b"", "complete": False}
        self.responses.append(self._current)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current["headers"][name.lower()] = value

    def on_headers_complete(self) -> None:
        self._current["status"] = self._parser.get_status_code()

    def on_body(self, data: bytes) -> None:
        self._current["body"] += data

    def on_message_complete(self) -> None:
        self._current["complete"] = True


def responses(data: bytes) -> list[dict[str, Any]]:
    """
    The responses in C{data}; a stream that is not well-formed HTTP/1.1
    fails the test through httptools' error.
    """
    reader = _Responses()
    reader.feed(data)
    return reader.responses


class InterimResponseTests(SynchronousTestCase):
    """
    An origin's interim (1xx) responses are relayed only when they are
    100, 102 or 103 and carry no body; any other status outside 200-599 is
    an invalid response.
    """

    def assertInvalid(self, answer: bytes) -> None:
        h = makeHarness(ANSWERS)
        h.send(EVIL)
        up, upTransport = h.connectUpstream()
        up.dataReceived(answer)
        status, headers, body = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (502, b"1006"))
        self.assertIn(b"Invalid HTTP response", headers[b"x-whsentry-reason"])
        self.assertNotIn(b"FORGED", h.client.value())
        self.assertTrue(upTransport.disconnecting)
        self.assertEqual(h.factory.pool.idleCount(), 0)

    def test_unknownInterimWithBody(self) -> None:
        """
        C{150} with a C{Content-Length} body, followed by the real response:
        a 502 (1006), and neither the interim head nor its body reach the
        client, who would otherwise read the body as the final response.
        """
        self.assertInvalid(
            b"HTTP/1.1 150 X\r\nContent-Length: 40\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nFORGED"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )

    def test_unknownInterimWithoutBody(self) -> None:
        """
        An interim status other than 100, 102 and 103 is refused even
        without a body.
        """
        self.assertInvalid(
            b"HTTP/1.1 199 X\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nFORGED"
        )

    def test_statusBelow100(self) -> None:
        """
        C{099} with a body is an invalid response, not an interim one.
        """
        self.assertInvalid(
            b"HTTP/1.1 099 X\r\nContent-Length: 6\r\n\r\nFORGED"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )

    def test_statusAbove599(self) -> None:
        """
        A status above 599 is an invalid response.
        """
        self.assertInvalid(b"HTTP/1.1 600 X\r\nContent-Length: 6\r\n\r\nFORGED")

    def test_continueWithBody(self) -> None:
        """
        Even a 100 that announces a body is refused: llhttp would read what
        follows as the next response, another parser as the body.
        """
        self.assertInvalid(
            b"HTTP/1.1 100 Continue\r\nContent-Length: 6\r\n\r\nFORGED"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )

    def test_earlyHintsRelayed(self) -> None:
        """
        A bodiless 103 is relayed ahead of the final response, and the
        client reads exactly two responses.
        """
        h = makeHarness(ANSWERS)
        h.send(EVIL)
        up, _ = h.connectUpstream()
        up.dataReceived(
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        got = responses(h.client.value())
        self.assertEqual([r["status"] for r in got], [103, 200])
        self.assertEqual(got[1]["body"], b"ok")


class ExtraBytesTests(SynchronousTestCase):
    """
    An origin that sends more than the response it owed loses its
    connection: it is closed, never pooled, and its bytes reach nobody.
    """

    def test_extraResponseInSameRead(self) -> None:
        """
        A response and the start of a second one in the same read: the
        first is relayed, the connection is aborted instead of pooled, and
        the next request to the same origin gets a new connection whose
        answer alone the client reads.
        """
        h = makeHarness(ANSWERS)
        h.send(EVIL)
        up, upTransport = h.connectUpstream()
        up.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA"
            b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\nFORGED"
        )
        self.assertTrue(upTransport.disconnecting)
        self.assertEqual(h.factory.pool.idleCount(), 0)
        h.send(EVIL)
        self.assertEqual(len(h.reactor.tcpClients), 2)
        fresh, _ = h.connectUpstream()
        fresh.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSECOND")
        got = responses(h.client.value())
        self.assertEqual(
            [(r["status"], r["body"]) for r in got], [(200, b"A"), (200, b"SECOND")]
        )
        self.assertNotIn(b"FORGED", h.client.value())

    def test_extraGarbageInSameRead(self) -> None:
        """
        Bytes after the response that are not even HTTP make the connection
        unusable too.
        """
        h = makeHarness(ANSWERS)
        h.send(EVIL)
        up, upTransport = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA\x00\x01garbage")
        self.assertTrue(upTransport.disconnecting)
        self.assertEqual(h.factory.pool.idleCount(), 0)

    def test_extraBytesInLaterRead(self) -> None:
        """
        Bytes that arrive after the response, in a later read while the
        connection is idle in the pool, close it.
        """
        h = makeHarness(ANSWERS)
        h.send(EVIL)
        up, upTransport = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA")
        self.assertEqual(h.factory.pool.idleCount(), 1)
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nFORGED")
        self.assertTrue(upTransport.disconnecting)
        self.assertEqual(h.factory.pool.idleCount(), 0)
        h.send(VICTIM)
        self.assertNotIn(b"FORGED", h.client.value())

    def test_readerFreshPerExchange(self) -> None:
        """
        Each exchange on a connection is read with a new llhttp parser, so
        that no parser state crosses from one response to the next.
        """
        sink = _Sink()
        reader = ResponseReader(sink)
        reader.expect(False)
        reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA")
        self.assertTrue(reader.reusable)
        first = reader._parser
        reader.expect(False)
        self.assertIsNot(reader._parser, first)
        reader.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(sink.heads, [200, 204])

    def test_readerNotReusableAfterExtraMessage(self) -> None:
        """
        The reader marks its connection unusable when another message
        begins in the read that completed the response.
        """
        reader = ResponseReader(_Sink())
        reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nAH")
        self.assertTrue(reader.complete)
        self.assertFalse(reader.reusable)


class _Sink:
    def __init__(self) -> None:
        self.heads: list[int] = []

    def informational(self, head: Any) -> None:
        self.heads.append(head.status)

    def head(self, head: Any) -> None:
        self.heads.append(head.status)

    def body(self, data: bytes) -> None:
        pass

    def complete(self) -> None:
        pass


class GuardTests(SynchronousTestCase):
    """
    The client-side protocol writes no body byte without a response head of
    its own before it, whatever the exchange asks.
    """

    def test_bodyWithoutHeadAborts(self) -> None:
        """
        A body byte asked for between responses cuts the connection instead
        of being written.
        """
        h = makeHarness(ANSWERS)
        h.send(EVIL)
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA")
        before = h.client.value()
        h.protocol.sendBody(b"FORGED")
        self.assertEqual(h.client.value(), before)
        self.assertTrue(h.client.disconnected)
        self.flushLoggedErrors()

    def test_bodyAfterBodilessHeadAborts(self) -> None:
        """
        A bodiless response (to HEAD) leaves no room for body bytes either.
        """
        h = makeHarness(ANSWERS)
        h.send(b"HEAD http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        before = h.client.value()
        h.protocol.sendBody(b"FORGED")
        self.assertEqual(h.client.value(), before)
        self.assertTrue(h.client.disconnected)
        self.flushLoggedErrors()


# Pieces a hostile origin puts together: heads of every kind of status,
# with and without framing, bodies, chunks, blank lines and noise.
_STATUS = st.sampled_from(
    [
        b"099",
        b"100",
        b"101",
        b"102",
        b"103",
        b"150",
        b"199",
        b"200",
        b"204",
        b"304",
        b"404",
        b"600",
    ]
)
_FRAMING = st.sampled_from(
    [
        b"",
        b"Content-Length: 0\r\n",
        b"Content-Length: 3\r\n",
        b"Content-Length: 40\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Connection: close\r\n",
        b"Request-ID: forged\r\n",
    ]
)


def _pieces(marker: bytes) -> Any:
    return st.one_of(
        st.builds(
            lambda s, f: b"HTTP/1.1 " + s + b" X\r\n" + f + b"\r\n", _STATUS, _FRAMING
        ),
        st.sampled_from(
            [marker, b"3\r\nabc\r\n", b"0\r\n\r\n", b"\r\n", b"HTTP/1.1 200"]
        ),
        st.binary(max_size=12),
    )


_VALID = st.builds(
    lambda body, chunked: (
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"%x\r\n%s\r\n" % (len(body), body) if body else b"")
            + b"0\r\n\r\n"
            if chunked
            else b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        ),
        body,
    ),
    st.binary(max_size=20).filter(lambda b: b"FORGED" not in b and b"VICTIM" not in b),
    st.booleans(),
)


class FramingPropertyTests(SynchronousTestCase):
    """
    Whatever an origin sends, in whatever pieces, through a pooled
    connection: no byte reaches a client except under a head the proxy
    wrote, and another origin's response is never displaced.
    """

    @settings(
        max_examples=int(os.environ.get("EGRESSPROXY_FUZZ_EXAMPLES", "150")),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        first=st.one_of(_VALID, st.none()),
        tail=st.lists(_pieces(b"FORGED"), max_size=6),
        second=st.lists(_pieces(b"OTHER"), max_size=6),
        splits=st.lists(st.integers(min_value=0, max_value=200), max_size=4),
        close=st.booleans(),
    )
    def test_noUnframedBytes(self, first, tail, second, splits, close) -> None:  # type: ignore[no-untyped-def]
        """
        The evil origin answers a first request with a response (or not)
        and any bytes after it, then a second request on the same client
        connection goes to the same origin (reusing the connection if the
        proxy kept it) and gets more hostile bytes, then a third goes to
        the victim origin.  The client's stream always parses as
        well-formed responses, each final one under the proxy's request id
        for its request, up to a cut; the victim's response, if read, is
        exactly the victim's.
        """
        h = makeHarness(
            ANSWERS, Config(timeouts=Timeouts(read=5, request_header=60, lifetime=600))
        )

        def originSends(up: Any, transport: Any, data: bytes, close: bool) -> None:
            start = 0
            for at in sorted(splits) + [len(data)]:
                if transport.disconnecting:
                    return
                up.dataReceived(data[start:at])
                start = max(start, at)
            if close and not transport.disconnecting:
                up.connectionLost(Failure(ConnectionDone()))

        h.send(EVIL)
        up, upTransport = h.connectUpstream()
        originSends(
            up, upTransport, (first[0] if first else b"") + b"".join(tail), close
        )
        h.reactor.advance(6)
        if not h.client.disconnecting:
            connections = len(h.reactor.tcpClients)
            h.send(EVIL)
            if len(h.reactor.tcpClients) > connections:
                up, upTransport = h.connectUpstream()
            originSends(up, upTransport, b"".join(second), False)
            h.reactor.advance(6)
        if not h.client.disconnecting:
            connections = len(h.reactor.tcpClients)
            h.send(VICTIM)
            self.assertEqual(len(h.reactor.tcpClients), connections + 1)
            victim, _ = h.connectUpstream()
            victim.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nVICTIM")

        out = h.client.value()
        got = responses(out)
        ids = [entry["rq_id"].encode("ascii") for entry in h.access]
        finals = [r for r in got if r.get("status", 0) >= 200]
        for r in got:
            status = r.get("status")
            if status is not None and status < 200:
                self.assertIn(status, (100, 102, 103), out)
                self.assertEqual(r["body"], b"", out)
        for index, r in enumerate(finals):
            self.assertLess(index, len(ids), out)
            self.assertEqual(r["headers"].get(b"request-id"), ids[index], out)
            if not r["complete"]:
                # Only a cut connection may leave a response unfinished.
                self.assertTrue(h.client.disconnecting, out)
        if len(finals) == 3 and finals[2]["complete"]:
            self.assertEqual((finals[2]["status"], finals[2]["body"]), (200, b"VICTIM"))
        if first is not None:
            # The response owed was whole: what came after it is relayed
            # to nobody.
            self.assertEqual(
                (finals[0]["status"], finals[0]["body"]), (200, first[1]), out
            )
            self.assertNotIn(b"FORGED", b"".join(r["body"] for r in finals[1:]), out)
        self.flushLoggedErrors()
