"""
What a hostile client or origin can make of one exchange: retries that
would act twice, uploads cut as idle, framing nits, and bugs that must be
answered rather than end in a silent close.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.config import TLS, Config, Timeouts
from proxy_app.tap import buildOrigination

from .helpers import makeHarness, parseResponse

GET = b"GET http://origin.example/a HTTP/1.1\r\nHost: origin.example\r\n\r\n"


def _pooled() -> Any:
    """
    A harness whose first request left one idle pooled connection.
    """
    h = makeHarness()
    h.send(GET)
    up, upTransport = h.connectUpstream()
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    h.client.clear()
    upTransport.clear()
    return h, up, upTransport


def _broken(*args: Any, **kwargs: Any) -> Any:
    """
    Stands in for a step of the proxy that has a bug.
    """
    raise RuntimeError("bug")


class RetryTests(SynchronousTestCase):
    """
    A request is sent again on a new connection only when its method is
    idempotent and the reused connection closed without answering.
    """

    def test_postNotRetried(self) -> None:
        """
        A bodiless POST on a reused connection that closes before any
        response byte is answered 502 (1006), not sent a second time.
        """
        h, up, upTransport = _pooled()
        h.send(
            b"POST http://origin.example/charge?amount=100 HTTP/1.1\r\n"
            b"Host: origin.example\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertTrue(upTransport.value().startswith(b"POST /charge?amount=100 "))
        up.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(h.reactor.tcpClients), 1)
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (502, b"1006"))

    def test_putRetried(self) -> None:
        """
        A bodiless PUT is idempotent (RFC 9110, 9.2.2) and is retried once.
        """
        h, up, _ = _pooled()
        h.send(
            b"PUT http://origin.example/x HTTP/1.1\r\nHost: "
            b"origin.example\r\nContent-Length: 0\r\n\r\n"
        )
        up.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(h.reactor.tcpClients), 2)

    def test_answeredNotRetried(self) -> None:
        """
        A GET whose reused connection sent part of a response before closing
        is not retried: the origin had seen the request.
        """
        h, up, _ = _pooled()
        h.send(GET)
        up.dataReceived(b"HTTP/1.1 2")
        up.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(h.reactor.tcpClients), 1)
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (502, b"1006"))


class SlowUploadTests(SynchronousTestCase):
    """
    The upstream read timeout measures a connection on which nothing moves,
    either way.
    """

    def test_steadyUploadNotCut(self) -> None:
        """
        An upload that keeps sending, for longer than the read timeout,
        while the origin says nothing, is not cut with a 504.
        """
        h = makeHarness(config=Config(timeouts=Timeouts(read=5, request_header=60)))
        h.send(
            b"POST http://origin.example/up HTTP/1.1\r\nHost: origin.example\r\n"
            b"Content-Length: 100\r\n\r\n"
        )
        up, upTransport = h.connectUpstream()
        for _ in range(10):
            h.reactor.advance(3)
            h.send(b"x" * 10)
        self.assertFalse(upTransport.disconnecting)
        self.assertEqual(h.client.value(), b"")
        up.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(parseResponse(h.client.value())[0], 201)

    def test_stalledUploadCut(self) -> None:
        """
        Once neither side moves for the read timeout, the request is cut
        with a 504 (1004).
        """
        h = makeHarness(config=Config(timeouts=Timeouts(read=5, request_header=60)))
        h.send(
            b"POST http://origin.example/up HTTP/1.1\r\nHost: origin.example\r\n"
            b"Content-Length: 100\r\n\r\n"
        )
        h.connectUpstream()
        h.send(b"x" * 10)
        h.reactor.advance(5.5)
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (504, b"1004"))


class FramingNitTests(SynchronousTestCase):
    """
    Small framing rules that keep two readers of one stream in step.
    """

    def test_connectWithBodyRefused(self) -> None:
        """
        A CONNECT with a C{Content-Length} body is refused (400, 1015), and
        its body is not read as the next request: nothing is looked up.
        """
        h = makeHarness()
        smuggled = (
            b"GET http://origin.example/s HTTP/1.1\r\nHost: origin.example\r\n\r\n"
        )
        h.send(
            b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
            % len(smuggled)
            + smuggled
        )
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (400, b"1015"))
        self.assertEqual(h.resolver.calls, [])
        self.assertTrue(h.client.disconnecting)

    def test_204LosesContentLength(self) -> None:
        """
        A 204 is relayed without the C{Content-Length} its origin sent; a
        304 keeps its own.
        """
        h = makeHarness()
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n")
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual(status, 204)
        self.assertNotIn(b"content-length", headers)
        h.client.clear()
        h.send(GET)
        up.dataReceived(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n")
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers.get(b"content-length")), (304, b"5"))

    def test_noVersionIs400(self) -> None:
        """
        A request line without an HTTP version is malformed: 400, not 505.
        """
        h = makeHarness()
        h.send(b"GET http://origin.example/\r\nHost: origin.example\r\n\r\n")
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (400, b"1015"))


class SafetyNetTests(SynchronousTestCase):
    """
    A bug anywhere in an exchange is answered 500 (1009) with a logged
    traceback, or cuts the client off once a response has begun; never a
    silent close.
    """

    def assertInternalError(self, h: Any) -> None:
        status, headers, body = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (500, b"1009"))
        self.assertEqual(body, b"Internal error in the proxy\n")
        self.assertTrue(h.client.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(h.access[-1]["reason_code"], 1009)

    def test_immediatePath(self) -> None:
        """
        An exception on the Deferred-free path (the ACL decision here).
        """
        h = makeHarness()

        h.factory.access.decide = _broken  # type: ignore[method-assign]
        h.send(GET)
        self.assertInternalError(h)

    def test_callbackPath(self) -> None:
        """
        An exception once the lookup's L{Deferred} has fired (the pool
        here).
        """
        h = makeHarness()
        h.resolver.immediate = False

        h.factory.pool.acquire = _broken  # type: ignore[method-assign]
        h.send(GET)
        self.assertInternalError(h)

    def test_outsideSetup(self) -> None:
        """
        An exception in the protocol's own steps, outside any exchange's
        error handling (the concurrency check here).
        """
        h = makeHarness()

        h.factory.overloaded = _broken  # type: ignore[method-assign]
        h.send(GET)
        self.assertInternalError(h)

    def test_readingResponse(self) -> None:
        """
        An exception while relaying the response head is a 500 too.
        """
        h = makeHarness()
        h.send(GET)
        up, upTransport = h.connectUpstream()

        h.protocol.sendInformational = _broken  # type: ignore[method-assign]
        up.dataReceived(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: "
            b"1\r\n\r\na"
        )
        self.assertInternalError(h)
        self.assertTrue(upTransport.disconnecting)

    def test_afterHead(self) -> None:
        """
        Once a head has gone, a bug cuts the client off, and the exchange
        is logged with 1009.
        """
        h = makeHarness()
        h.send(GET)
        up, _ = h.connectUpstream()

        h.protocol.sendBody = _broken  # type: ignore[method-assign]
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        self.assertTrue(h.client.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(h.client.disconnected)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(h.access[-1]["reason_code"], 1009)

    def test_nameIDNA2008Refuses(self) -> None:
        """
        TLS origination to a name whose A-label IDNA 2008 refuses (an emoji
        label) is a clear 400 (1002), decided before any lookup.
        """
        host = b"xn--jv8h.example.com"
        h = makeHarness({host.decode(): ["203.0.113.10"]})
        h.factory.origination = buildOrigination(TLS())
        h.send(
            b"GET http://%s/ HTTP/1.1\r\nHost: %s\r\nX-WhSentry-TLS: true\r\n\r\n"
            % (host, host)
        )
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (400, b"1002"))
        self.assertIn(b"cannot be used for TLS", headers[b"x-whsentry-reason"])
        self.assertEqual(h.resolver.calls, [])

    def test_underscoreNameOriginates(self) -> None:
        """
        TLS origination to a name with an underscore, or with hyphens in
        its third and fourth places, which IDNA 2008 refuses but curl and
        browsers accept, goes on to the lookup like any other name.
        """
        for host in (b"foo_bar.example.com", b"r3---sn-x.example.com"):
            h = makeHarness({host.decode(): ["203.0.113.10"]})
            h.factory.origination = buildOrigination(TLS())
            h.send(
                b"GET http://%s/ HTTP/1.1\r\nHost: %s\r\nX-WhSentry-TLS: true\r\n\r\n"
                % (host, host)
            )
            self.assertEqual(h.client.value(), b"", host)
            self.assertEqual(len(h.resolver.calls), 1, host)
