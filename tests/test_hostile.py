"""
Hostile clients and misbehaving origins: smuggling-prone heads, size and
count limits, concurrency and rate limits, upstream faults, and a bounded
fuzz of request heads.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.addresses import AddressDecision
from proxy_app.config import Config, Limits, Timeouts
from proxy_app.resolver import DestinationDenied

from .helpers import makeHarness, parseResponse

GET = b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n\r\n"


class HeadTests(SynchronousTestCase):
    """
    Heads that different parsers could read differently are refused.
    """

    def assertRefused(self, data: bytes, status: int = 400) -> None:
        h = makeHarness()
        h.send(data)
        got, headers, _ = parseResponse(h.client.value())
        self.assertEqual(
            (got, headers[b"x-whsentry-reasoncode"]), (status, b"1015"), data
        )
        counted = h.factory.metrics.registry.get_sample_value(
            "egressproxy_requests_total",
            {"proxy_type": "http", "decision": "allow", "reason_code": "1015"},
        )
        self.assertEqual(counted, 1)
        self.assertEqual(h.resolver.calls, [])
        self.assertTrue(h.client.disconnecting)

    def test_bareLF(self) -> None:
        """
        Bare LF line endings are refused.
        """
        self.assertRefused(
            b"GET http://origin.example/ HTTP/1.1\nHost: origin.example\n\n"
        )

    def test_obsFold(self) -> None:
        """
        Obsolete line folding is refused.
        """
        self.assertRefused(
            b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\nX-A: "
            b"1\r\n 2\r\n\r\n"
        )

    def test_nul(self) -> None:
        """
        A NUL byte anywhere in the head is refused, even split across reads.
        """
        self.assertRefused(
            b"GET http://origin.example/ HTTP/1.1\r\nX-A: a\x00b\r\n\r\n"
        )

    def test_longURI(self) -> None:
        """
        A request line over the limit gets 414.
        """
        self.assertRefused(
            b"GET http://origin.example/" + b"a" * 9000 + b" HTTP/1.1\r\n", 414
        )

    def test_tooManyHeaders(self) -> None:
        """
        More header lines than the limit get 431.
        """
        self.assertRefused(
            b"GET http://origin.example/ HTTP/1.1\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n",
            431,
        )

    def test_upgradeWithBody(self) -> None:
        """
        A protocol upgrade request with a body is refused, and nothing of it
        (not even its head) goes anywhere.
        """
        self.assertRefused(
            b"POST http://origin.example/ws HTTP/1.1\r\nHost: origin.example\r\n"
            b"Connection: upgrade\r\nUpgrade: websocket\r\nContent-Length: "
            b"5\r\n\r\nhello"
        )

    def test_splitAcrossReads(self) -> None:
        """
        The guard sees a head that arrives a byte at a time.
        """
        h = makeHarness()
        for byte in b"GET http://origin.example/ HTTP/1.1\r\nX-A: 1\n\r\n":
            if h.client.disconnecting:
                break
            h.send(bytes([byte]))
        self.assertTrue(h.client.value().startswith(b"HTTP/1.1 400 "))

    def test_invalidChunkSize(self) -> None:
        """
        An invalid chunk size in a request body gets 400 (1015), and the
        upstream connection is dropped rather than left half-written.
        """
        h = makeHarness()
        h.send(
            b"POST http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        up, upTransport = h.connectUpstream()
        h.send(b"zz\r\nhello\r\n")
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (400, b"1015"))
        h.protocol.connectionLost(None)
        self.assertTrue(upTransport.disconnecting)

    def test_bodyNotScanned(self) -> None:
        """
        Bodies may hold any bytes; only heads are guarded.
        """
        h = makeHarness()
        h.send(
            b"POST http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n"
            b"Content-Length: 6\r\n\r\na\nb\x00\r\n"
        )
        _, upTransport = h.connectUpstream()
        self.assertTrue(upTransport.value().endswith(b"a\nb\x00\r\n"))

    def test_smuggledRequestNeverReachesOrigin(self) -> None:
        """
        A second request hidden in a body is forwarded as body bytes, never
        as a request of its own.
        """
        hidden = (
            b"GET http://origin.example/admin HTTP/1.1\r\nHost: origin.example\r\n\r\n"
        )
        h = makeHarness()
        h.send(
            b"POST http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n"
            b"Content-Length: %d\r\n\r\n" % len(hidden) + hidden
        )
        up, upTransport = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(h.resolver.calls, [("origin.example", 80)])
        self.assertEqual(upTransport.value().count(b"HTTP/1.1\r\n"), 2)
        self.assertEqual(len(h.access), 1)


class LimitTests(SynchronousTestCase):
    """
    Concurrency and rate limits answer quickly, never hang.
    """

    def test_concurrentRequests(self) -> None:
        """
        Past max_concurrent_requests, a request gets 503 with Retry-After
        and reason code 1014; once one finishes, requests go through again.
        """
        config = Config(limits=Limits(max_concurrent_requests=1))
        first = makeHarness(config=config)
        first.send(GET)
        second = makeHarness(config=config)
        second.protocol.factory = first.factory
        second.send(GET)
        status, headers, _ = parseResponse(second.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (503, b"1014"))
        self.assertEqual(headers[b"retry-after"], b"1")
        up, _ = first.connectUpstream()
        up.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(first.factory.active["http"], 0)

    def test_concurrentTunnels(self) -> None:
        """
        Past max_concurrent_tunnels, a CONNECT gets 503 (1014).
        """
        config = Config(limits=Limits(max_concurrent_tunnels=1))
        h = makeHarness(config=config)
        h.send(
            b"CONNECT origin.example:443 HTTP/1.1\r\nHost: origin.example:443\r\n\r\n"
        )
        h.connectUpstream()
        other = makeHarness(config=config)
        other.protocol.factory = h.factory
        other.send(
            b"CONNECT origin.example:443 HTTP/1.1\r\nHost: origin.example:443\r\n\r\n"
        )
        self.assertTrue(other.client.value().startswith(b"HTTP/1.1 503 "))
        h.protocol.connectionLost(None)
        self.assertEqual(h.factory.active["connect"], 0)

    def test_rateLimit(self) -> None:
        """
        A role that spends its burst gets 429 with Retry-After and reason
        code 1014; the bucket refills on the clock.
        """
        denied = DestinationDenied(
            "origin.example",
            80,
            AddressDecision(False, "10.0.0.1", "Deny: Private Range"),
        )
        h = makeHarness(
            {"origin.example": denied},
            config=Config(limits=Limits(max_request_rate=1, request_burst=2)),
        )

        def status() -> tuple[int, dict]:
            h.client.clear()
            h.send(GET)
            code, headers, _ = parseResponse(h.client.value())
            return code, headers

        self.assertEqual([status()[0] for _ in range(2)], [403, 403])
        code, headers = status()
        self.assertEqual((code, headers[b"x-whsentry-reasoncode"]), (429, b"1014"))
        self.assertEqual(headers[b"retry-after"], b"1")
        h.reactor.advance(1)
        self.assertEqual(status()[0], 403)


class UpstreamFaultTests(SynchronousTestCase):
    """
    Origins that misbehave get a reason code, and the proxy goes on.
    """

    def test_malformedStatusLine(self) -> None:
        """
        A malformed status line is 502 with reason code 1006.
        """
        h = makeHarness()
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 OK-ish\r\n\r\n")
        status, headers, body = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (502, b"1006"))
        self.assertIn(b"Invalid HTTP response", body)

    def test_trickle(self) -> None:
        """
        An origin trickling a byte a second is cut by the connection
        lifetime, and the client connection is aborted.
        """
        h = makeHarness(config=Config(timeouts=Timeouts(read=5, lifetime=30)))
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(40):
            if h.client.disconnecting:
                break
            h.reactor.advance(1)
            up.dataReceived(b"x")
        self.assertTrue(h.client.disconnecting)
        self.assertLessEqual(h.reactor.seconds(), 31)


_METHODS = st.sampled_from([b"GET", b"POST", b"CONNECT", b"HEAD", b"G ET", b""])
_TARGETS = st.sampled_from(
    [
        b"http://origin.example/",
        b"origin.example:443",
        b"/",
        b"http://[::1/",
        b"http://a:b:c/",
        b"*",
    ]
)
_HEADERS = st.lists(
    st.tuples(
        st.sampled_from(
            [b"Host", b"Content-Length", b"Transfer-Encoding", b"X", b"", b"Connection"]
        ),
        st.binary(max_size=12),
    ),
    max_size=5,
)


class FuzzTests(SynchronousTestCase):
    """
    Mutated request heads never crash the proxy: each is answered with a
    well-formed response, forwarded, or the connection is closed.
    """

    @settings(
        max_examples=int(os.environ.get("EGRESSPROXY_FUZZ_EXAMPLES", "150")),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        method=_METHODS,
        target=_TARGETS,
        headers=_HEADERS,
        tail=st.binary(max_size=20),
        cut=st.integers(min_value=0, max_value=200),
        flip=st.integers(min_value=0, max_value=200),
    )
    def test_fuzzHeads(self, method, target, headers, tail, cut, flip) -> None:  # type: ignore[no-untyped-def]
        """
        Whatever the head, the proxy answers it, connects for it, or closes;
        it never raises.
        """
        head = method + b" " + target + b" HTTP/1.1\r\n"
        head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        data = bytearray(head + b"\r\n" + tail)
        if flip < len(data):
            data[flip] ^= 0x20
        data = data[: max(cut, 1)] if cut < len(data) else data
        h = makeHarness()
        h.send(bytes(data))
        h.reactor.advance(h.factory.config.timeouts.request_header + 1)
        out = h.client.value()
        answered = out.startswith(b"HTTP/1.1 ") and b"\r\n\r\n" in out
        self.assertTrue(
            answered
            or h.reactor.tcpClients
            or h.client.disconnecting
            or h.resolver.pending,
            (bytes(data), out),
        )
        if answered:
            status = int(out.split(b" ", 2)[1])
            self.assertTrue(100 <= status < 600)

    @settings(
        max_examples=int(os.environ.get("EGRESSPROXY_FUZZ_EXAMPLES", "150")),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        status=st.sampled_from(
            [
                b"200 OK",
                b"204 No",
                b"304 NM",
                b"100 Continue",
                b"101 S",
                b"999 X",
                b"abc",
            ]
        ),
        headers=_HEADERS,
        body=st.binary(max_size=40),
        head=st.booleans(),
        flip=st.integers(min_value=0, max_value=150),
        splits=st.lists(st.integers(min_value=1, max_value=150), max_size=3),
        close=st.booleans(),
    )
    def test_fuzzResponses(
        self, status, headers, body, head, flip, splits, close
    ) -> None:  # type: ignore[no-untyped-def]
        """
        Whatever an origin answers, in whatever pieces, and whether it then
        closes: the client gets a well-formed response head or a cut
        connection, the exchange is accounted for once, and nothing raises.
        """
        response = b"HTTP/1.1 " + status + b"\r\n"
        response += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        data = bytearray(response + b"\r\n" + body)
        if flip < len(data):
            data[flip] ^= 0x20
        h = makeHarness()
        method = b"HEAD" if head else b"GET"
        h.send(
            method + b" http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n\r\n"
        )
        up, upTransport = h.connectUpstream()
        start = 0
        for at in sorted(splits) + [len(data)]:
            if upTransport.disconnecting:
                break
            up.dataReceived(bytes(data[start:at]))
            start = max(start, at)
        if close and not upTransport.disconnecting:
            up.connectionLost(Failure(ConnectionDone()))
        h.reactor.advance(h.factory.config.timeouts.read + 1)
        out = h.client.value()
        if out:
            self.assertTrue(out.startswith(b"HTTP/1.1 "), (bytes(data), out))
        if h.access:
            self.assertEqual(len(h.access), 1, (bytes(data), h.access))
        self.assertTrue(out or h.client.disconnecting, (bytes(data), out))
