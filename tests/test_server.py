"""
Tests for L{proxy_app.server}: forwarding, CONNECT tunnels, timeouts, limits
and malformed input, driven in memory.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.addresses import AddressDecision
from proxy_app.config import Config, Limits, Timeouts
from proxy_app.resolver import DestinationDenied, ResolutionFailed
from proxy_app.server import TUNNEL_BUFFER

from .helpers import HalfCloseStringTransport, makeHarness, parseResponse

GET = (
    b"GET http://origin.example/path?q=1 HTTP/1.1\r\n"
    b"Host: origin.example\r\n"
    b"User-Agent: test\r\n"
    b"\r\n"
)


class ForwardingTests(SynchronousTestCase):
    """
    Absolute-URI requests are forwarded in origin form to a vetted address.
    """

    def test_forwardsInOriginForm(self) -> None:
        """
        The request goes to the vetted address with an origin-form target,
        its method and end-to-end headers kept, and the response comes back.
        """
        h = makeHarness()
        h.send(GET)
        self.assertEqual(h.resolver.calls, [("origin.example", 80)])
        host, port = h.reactor.tcpClients[0][:2]
        self.assertEqual((host, port), ("203.0.113.10", 80))
        up, upTransport = h.connectUpstream()
        sent = upTransport.value()
        self.assertTrue(sent.startswith(b"GET /path?q=1 HTTP/1.1\r\n"), sent)
        self.assertIn(b"Host: origin.example\r\n", sent)
        self.assertIn(b"User-Agent: test\r\n", sent)
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello")
        status, headers, body = parseResponse(h.client.value())
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"x-a"], b"b")
        self.assertEqual(headers[b"content-length"], b"5")
        self.assertEqual(body, b"hello")
        self.assertEqual(h.access[-1]["response_code"], 200)
        self.assertEqual(h.access[-1]["bytes_down"], 5)
        self.assertEqual(h.access[-1]["client_addr"], "127.0.0.1:40000")

    def test_hopByHopHeadersStripped(self) -> None:
        """
        Connection and the headers it names, Keep-Alive, Proxy-*, TE,
        Trailer, Upgrade and every X-WhSentry-* header are not forwarded.
        """
        h = makeHarness()
        h.send(
            b"GET http://origin.example/ HTTP/1.1\r\n"
            b"Host: origin.example\r\n"
            b"Connection: keep-alive, X-Secret\r\n"
            b"X-Secret: 1\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"TE: trailers\r\n"
            b"Trailer: X-T\r\n"
            b"Upgrade: websocket\r\n"
            b"X-WhSentry-ClientCert: foo\r\n"
            b"X-Kept: yes\r\n"
            b"\r\n"
        )
        _, upTransport = h.connectUpstream()
        sent = upTransport.value().lower()
        for name in (
            b"connection:",
            b"x-secret",
            b"keep-alive:",
            b"proxy-authorization",
            b"proxy-connection",
            b"\r\nte:",
            b"trailer",
            b"upgrade",
            b"x-whsentry",
        ):
            self.assertNotIn(name, sent)
        self.assertIn(b"x-kept: yes", sent)

    def test_hopByHopResponseHeadersStripped(self) -> None:
        """
        Hop-by-hop headers of the origin's response are not passed back.
        """
        h = makeHarness()
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: X-Foo\r\nX-Foo: 1\r\n"
            b"Keep-Alive: timeout=3\r\nProxy-Authenticate: Basic\r\n\r\n"
        )
        _, headers, _ = parseResponse(h.client.value())
        self.assertNotIn(b"x-foo", headers)
        self.assertNotIn(b"keep-alive", headers)
        self.assertNotIn(b"proxy-authenticate", headers)

    def test_contentLengthBodyStreamed(self) -> None:
        """
        A request body with Content-Length is sent upstream with the same
        Content-Length, as it arrives.
        """
        h = makeHarness()
        h.send(
            b"POST http://origin.example/hook HTTP/1.1\r\nHost: origin.example\r\n"
            b"Content-Length: 10\r\n\r\n01234"
        )
        _, upTransport = h.connectUpstream()
        self.assertIn(b"Content-Length: 10\r\n", upTransport.value())
        self.assertTrue(upTransport.value().endswith(b"\r\n\r\n01234"))
        h.send(b"56789")
        self.assertTrue(upTransport.value().endswith(b"0123456789"))
        self.assertEqual(h.access, [])

    def test_chunkedBodyStaysChunked(self) -> None:
        """
        A chunked request body is forwarded chunked.
        """
        h = makeHarness()
        h.send(
            b"POST http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        _, upTransport = h.connectUpstream()
        sent = upTransport.value()
        self.assertIn(b"Transfer-Encoding: chunked\r\n", sent)
        self.assertNotIn(b"Content-Length", sent)
        self.assertTrue(sent.endswith(b"5\r\nhello\r\n0\r\n\r\n"), sent)

    def test_chunkedResponseStaysChunked(self) -> None:
        """
        A chunked response goes to an HTTP/1.1 client chunked.
        """
        h = makeHarness()
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: "
            b"chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        _, headers, body = parseResponse(h.client.value())
        self.assertEqual(headers[b"transfer-encoding"], b"chunked")
        self.assertEqual(body, b"3\r\nabc\r\n0\r\n\r\n")

    def test_keepAliveReusesUpstream(self) -> None:
        """
        Two requests on one client connection are answered in turn, and the
        second reuses the pooled upstream connection.
        """
        h = makeHarness()
        h.send(GET)
        up, upTransport = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        h.client.clear()
        upTransport.clear()
        h.send(GET)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertTrue(upTransport.value().startswith(b"GET /path?q=1 HTTP/1.1"))
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
        self.assertTrue(h.client.value().endswith(b"\r\n\r\nb"))
        self.assertFalse(h.client.disconnecting)
        self.assertEqual(len(h.access), 2)

    def test_staleReusedConnectionRetried(self) -> None:
        """
        A pooled connection that the origin closes just as it is reused is
        replaced by a new one, once, and the client never sees the failure.
        """
        h = makeHarness()
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        h.client.clear()
        h.send(GET)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        up.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(len(h.reactor.tcpClients), 2)
        fresh, freshTransport = h.connectUpstream()
        self.assertTrue(
            freshTransport.value().startswith(b"GET /path?q=1 HTTP/1.1\r\n")
        )
        fresh.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
        status, _, body = parseResponse(h.client.value())
        self.assertEqual((status, body), (200, b"b"))

    def test_oldPooledConnectionRetired(self) -> None:
        """
        A pooled connection older than the connection lifetime is not
        reused, and a long-lived pooled connection does not cut a request
        that just started on it.
        """
        h = makeHarness(
            config=Config(timeouts=Timeouts(read=100, lifetime=30, request_header=100))
        )
        h.send(GET)
        up, upTransport = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        h.reactor.advance(20)
        h.client.clear()
        h.send(GET)
        self.assertEqual(len(h.reactor.tcpClients), 1)
        # 25 s into this request, 45 s into the connection's life.
        h.reactor.advance(25)
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
        self.assertTrue(h.client.value().endswith(b"\r\n\r\nb"))
        h.client.clear()
        h.send(GET)
        self.assertEqual(len(h.reactor.tcpClients), 2)
        self.assertTrue(upTransport.disconnecting)

    def test_pipelinedRequestWaits(self) -> None:
        """
        A second request sent before the first is answered is read only
        after the first response is complete.
        """
        h = makeHarness()
        h.send(GET + GET)
        self.assertEqual(len(h.resolver.calls), 1)
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(len(h.resolver.calls), 2)

    def test_noRedirectFollowing(self) -> None:
        """
        A redirect is passed to the client, not followed.
        """
        h = makeHarness()
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(
            b"HTTP/1.1 302 Found\r\nLocation: "
            b"http://169.254.169.254/\r\nContent-Length: 0\r\n\r\n"
        )
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual(status, 302)
        self.assertEqual(len(h.resolver.calls), 1)

    def test_closeDelimitedResponse(self) -> None:
        """
        A response ended by the origin closing its connection reaches the
        client complete, re-framed as chunked.
        """
        h = makeHarness()
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome data")
        up.connectionLost(Failure(ConnectionRefusedError()))
        status, headers, body = parseResponse(h.client.value())
        self.assertEqual(headers[b"transfer-encoding"], b"chunked")
        self.assertEqual(body, b"9\r\nsome data\r\n0\r\n\r\n")

    def test_responseCutMidBodyAborts(self) -> None:
        """
        An origin that closes before a Content-Length body is complete makes
        the proxy abort the client connection, so the client cannot mistake
        the partial body for a whole one.
        """
        h = makeHarness()
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        up.connectionLost(Failure(ConnectionRefusedError()))
        self.assertTrue(h.client.disconnecting)
        self.assertTrue(h.client.value().endswith(b"\r\n\r\npartial"))


class InterfaceTests(SynchronousTestCase):
    """
    The proxy's parts provide the interfaces they claim.
    """

    def test_forwardExchangeIsResponseSink(self) -> None:
        """
        A forwarded request's exchange provides IResponseSink.
        """
        from zope.interface.verify import verifyObject

        from proxy_app.interfaces import IResponseSink

        h = makeHarness()
        h.send(GET)
        verifyObject(IResponseSink, h.protocol.exchange)


class BackpressureTests(SynchronousTestCase):
    """
    Each direction of a forwarded request is flow-controlled.
    """

    def test_responseBackpressure(self) -> None:
        """
        While a response streams, the upstream transport is registered as
        the client transport's streaming producer, and pausing the client
        pauses the upstream.
        """
        h = makeHarness()
        h.send(GET)
        up, upTransport = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
        self.assertIs(h.client.producer, upTransport)
        self.assertTrue(h.client.streaming)
        h.client.producer.pauseProducing()
        self.assertEqual(upTransport.producerState, "paused")
        up.dataReceived(b"56789")
        self.assertIsNone(h.client.producer)

    def test_wholeMessagesNotLinked(self) -> None:
        """
        A request read whole and a response that arrives whole in one read
        have nothing to hold back: neither transport becomes the other's
        producer for them.
        """
        registered: list[object] = []
        self.patch(
            HalfCloseStringTransport,
            "registerProducer",
            lambda transport, producer, streaming: registered.append(producer),
        )
        h = makeHarness()
        h.send(
            b"POST http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n"
            b"Content-Length: 4\r\n\r\nabcd"
        )
        up, upTransport = h.connectUpstream()
        self.assertTrue(upTransport.value().endswith(b"\r\n\r\nabcd"))
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(h.client.value().endswith(b"\r\n\r\nok"))
        self.assertEqual(registered, [])
        # A response in two reads is linked after the first.
        h.send(GET)
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no")
        self.assertEqual(registered, [upTransport])

    def test_requestBodyBackpressure(self) -> None:
        """
        While a request body streams, the client transport is the upstream
        transport's producer.
        """
        h = makeHarness()
        h.send(
            b"POST http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n"
            b"Content-Length: 4\r\n\r\nab"
        )
        _, upTransport = h.connectUpstream()
        self.assertIs(upTransport.producer, h.client)
        upTransport.producer.pauseProducing()
        self.assertEqual(h.client.producerState, "paused")
        h.client.resumeProducing()
        h.send(b"cd")
        self.assertIsNone(upTransport.producer)
        self.assertEqual(h.client.producerState, "producing")

    def test_clientPausedWhileVetting(self) -> None:
        """
        The client is not read while its destination is being vetted, so a
        body cannot pile up in memory meanwhile.
        """
        h = makeHarness(answers={})
        h.send(
            b"POST http://slow.example/ HTTP/1.1\r\nHost: slow.example\r\n"
            b"Content-Length: 4\r\n\r\n"
        )
        self.assertEqual(h.client.producerState, "paused")

    def test_waitingPath(self) -> None:
        """
        When vetting has to wait (a name not in the cache), the request goes
        through the same steps later: the origin gets the request and the
        client the response.
        """
        h = makeHarness()
        h.resolver.immediate = False
        h.send(b"GET http://origin.example/x HTTP/1.1\r\nHost: origin.example\r\n\r\n")
        self.assertEqual(h.resolver.calls, [("origin.example", 80)])
        up, upTransport = h.connectUpstream()
        self.assertTrue(upTransport.value().startswith(b"GET /x HTTP/1.1\r\n"))
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(h.client.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertEqual(h.access[0]["response_code"], 200)

    def test_immediatePathReusesWithoutDeferred(self) -> None:
        """
        A second request to the same vetted address, answered at once by
        the resolver, is written to the idle pooled connection within the
        call that delivered it.
        """
        h = makeHarness()
        request = b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n\r\n"
        h.send(request)
        up, upTransport = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        upTransport.clear()
        # No step may take the Deferred-returning way: not the lookup, not
        # a callback chain.
        self.patch(h.resolver, "vet", lambda host, port: self.fail("vet() called"))
        self.patch(
            Deferred, "addCallbacks", lambda *a, **k: self.fail("callback chain")
        )
        h.send(request)
        self.assertTrue(upTransport.value().startswith(b"GET / HTTP/1.1\r\n"))
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertIsNone(h.protocol.exchange._pending)  # type: ignore[union-attr]

    def test_wholeRequestNotPaused(self) -> None:
        """
        A request read whole needs no pause while it is vetted (each pause
        and resume costs two system calls); a request pipelined behind it
        pauses reading, and reading resumes when it is its turn.
        """
        h = makeHarness(answers={"slow.example": ["203.0.113.9"]})
        request = b"GET http://slow.example/ HTTP/1.1\r\nHost: slow.example\r\n\r\n"
        h.send(request)
        self.assertEqual(h.client.producerState, "producing")
        h.send(request)
        self.assertEqual(h.client.producerState, "paused")
        up, upTransport = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(h.client.producerState, "producing")
        self.assertEqual(h.client.value().count(b"HTTP/1.1 200 OK"), 1)
        self.assertEqual(upTransport.value().count(b"GET / HTTP/1.1"), 2)


class ErrorTests(SynchronousTestCase):
    """
    Every error the proxy makes has a status, the reason headers and a
    plain-text body.
    """

    def assertError(self, data: bytes, status: int, code: int) -> bytes:
        status_, headers, body = parseResponse(data)
        self.assertEqual(status_, status)
        self.assertEqual(headers[b"x-whsentry-reasoncode"], str(code).encode())
        self.assertTrue(headers[b"x-whsentry-reason"])
        self.assertEqual(headers[b"content-type"], b"text/plain; charset=utf-8")
        self.assertTrue(body.strip())
        return body

    def test_deniedDestination(self) -> None:
        """
        A destination the resolver denies gets 403 with reason code 1000 and
        Smokescreen's wording, and nothing is connected.
        """
        denied = DestinationDenied(
            "internal.example",
            80,
            AddressDecision(False, "10.0.0.1", "Deny: Private Range"),
        )
        h = makeHarness({"internal.example": denied})
        h.send(
            b"GET http://internal.example/ HTTP/1.1\r\nHost: internal.example\r\n\r\n"
        )
        body = self.assertError(h.client.value(), 403, 1000)
        self.assertEqual(
            body,
            b"Egress proxying is denied to host 'internal.example:80': The destination "
            b"address (10.0.0.1) was denied by rule 'Deny: Private Range'.\n",
        )
        self.assertEqual(h.reactor.tcpClients, [])
        self.assertEqual(h.access[-1]["reason_code"], 1000)

    def test_resolutionFailed(self) -> None:
        """
        A name that does not resolve gets 502 with reason code 1001.
        """
        h = makeHarness(
            {
                "nx.example": ResolutionFailed(
                    "nx.example", "DNS lookup of 'nx.example' failed"
                )
            }
        )
        h.send(b"GET http://nx.example/ HTTP/1.1\r\nHost: nx.example\r\n\r\n")
        self.assertError(h.client.value(), 502, 1001)

    def test_originForm(self) -> None:
        """
        An origin-form request to the proxy gets 400 with reason code 1002.
        """
        h = makeHarness()
        h.send(b"GET /path HTTP/1.1\r\nHost: origin.example\r\n\r\n")
        self.assertError(h.client.value(), 400, 1002)
        self.assertEqual(h.resolver.calls, [])

    def test_unsupportedScheme(self) -> None:
        """
        An ftp:// target gets 400 with reason code 1003.
        """
        h = makeHarness()
        h.send(b"GET ftp://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n\r\n")
        self.assertError(h.client.value(), 400, 1003)

    def test_badPorts(self) -> None:
        """
        Ports 0, 99999, abc and an empty port get 400 with reason code 1002.
        """
        for port in (b"0", b"99999", b"abc", b""):
            h = makeHarness()
            h.send(
                b"GET http://origin.example:" + port + b"/ HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            self.assertError(h.client.value(), 400, 1002)
            self.assertEqual(h.resolver.calls, [])

    def test_badRequestLine(self) -> None:
        """
        A request line that is not HTTP gets 400 and the connection closes.
        """
        h = makeHarness()
        h.send(b"HELLO THERE\r\n\r\n")
        self.assertError(h.client.value(), 400, 1015)
        self.assertTrue(h.client.disconnecting)

    def test_contentLengthAndTransferEncoding(self) -> None:
        """
        A request with both Content-Length and Transfer-Encoding is refused
        with 400 before anything is looked up, and the connection closes.
        """
        h = makeHarness()
        h.send(
            b"POST http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n"
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        self.assertError(h.client.value(), 400, 1015)
        self.assertEqual(h.resolver.calls, [])
        self.assertTrue(h.client.disconnecting)

    def test_duplicateContentLength(self) -> None:
        """
        Two different Content-Length values are refused with 400.
        """
        h = makeHarness()
        h.send(
            b"POST http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n"
            b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n"
        )
        self.assertError(h.client.value(), 400, 1015)

    def test_oversizedHeaders(self) -> None:
        """
        A request head larger than the limit gets 431.
        """
        h = makeHarness(config=Config(limits=Limits(max_request_header=1024)))
        h.send(b"GET http://origin.example/ HTTP/1.1\r\nX-Big: " + b"a" * 2000)
        self.assertError(h.client.value(), 431, 1015)
        self.assertTrue(h.client.disconnecting)

    def test_tlsOriginationRefused(self) -> None:
        """
        Until TLS origination exists, X-WhSentry-TLS is refused rather than
        silently sent in clear text.
        """
        h = makeHarness()
        h.send(
            b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n"
            b"X-WhSentry-TLS: true\r\n\r\n"
        )
        self.assertError(h.client.value(), 400, 1003)
        self.assertEqual(h.reactor.tcpClients, [])

    def test_connectionRefused(self) -> None:
        """
        A refused upstream connection gets 502 with reason code 1006.
        """
        h = makeHarness()
        h.send(GET)
        h.failUpstream(ConnectionRefusedError())
        self.assertError(h.client.value(), 502, 1006)

    def test_errorKeepsConnection(self) -> None:
        """
        After an error response to a bodiless request the client can send
        another request on the same connection.
        """
        h = makeHarness()
        h.send(b"GET /path HTTP/1.1\r\nHost: origin.example\r\n\r\n")
        self.assertFalse(h.client.disconnecting)
        h.client.clear()
        h.send(GET)
        self.assertEqual(h.resolver.calls, [("origin.example", 80)])


class LimitTests(SynchronousTestCase):
    """
    The response-body limit.
    """

    def config(self) -> Config:
        return Config(limits=Limits(max_response_body=10))

    def test_contentLengthOverLimit(self) -> None:
        """
        A response whose Content-Length exceeds the limit is refused with
        502 and reason code 1008, and the upstream connection is dropped.
        """
        h = makeHarness(config=self.config())
        h.send(GET)
        up, upTransport = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n")
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual(status, 502)
        self.assertEqual(headers[b"x-whsentry-reasoncode"], b"1008")
        self.assertTrue(upTransport.disconnecting)

    def test_headNotLimited(self) -> None:
        """
        A HEAD response announcing a large Content-Length is passed on: it
        has no body to be too large.
        """
        h = makeHarness(config=self.config())
        h.send(b"HEAD http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n\r\n")
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"content-length"]), (200, b"5000"))
        self.assertFalse(h.client.disconnecting)

    def test_chunkedOverLimitAborts(self) -> None:
        """
        A chunked response crossing the limit is cut by aborting the client
        connection; the terminating chunk is never sent.
        """
        h = makeHarness(config=self.config())
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        up.dataReceived(b"8\r\n01234567\r\n")
        self.assertFalse(h.client.disconnecting)
        up.dataReceived(b"8\r\n01234567\r\n")
        self.assertTrue(h.client.disconnecting)
        self.assertNotIn(b"0\r\n\r\n", h.client.value())
        self.assertEqual(h.access[-1]["reason_code"], 1008)


class TimeoutTests(SynchronousTestCase):
    """
    Timeouts, on the fake clock.
    """

    def test_connectTimeout(self) -> None:
        """
        A connect still pending at the connect timeout on the clock is
        stopped and gets 504 with reason code 1004.
        """
        h = makeHarness(config=Config(timeouts=Timeouts(connect=3)))
        h.send(GET)
        h.reactor.advance(2.9)
        self.assertEqual(h.client.value(), b"")
        h.reactor.advance(0.1)
        self.assertTrue(h.reactor.connectors[0].stoppedConnecting)
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual(status, 504)
        self.assertEqual(headers[b"x-whsentry-reasoncode"], b"1004")

    def test_reactorConnectTimeout(self) -> None:
        """
        A connect that the reactor itself times out gets 504 with reason
        code 1004 too.
        """
        h = makeHarness(config=Config(timeouts=Timeouts(connect=3)))
        h.send(GET)
        h.failUpstream(ConnectTimeoutError())
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual(status, 504)
        self.assertEqual(headers[b"x-whsentry-reasoncode"], b"1004")

    def test_readTimeout(self) -> None:
        """
        An origin that accepts but never answers gets 504/1004 after the
        read timeout.
        """
        h = makeHarness(config=Config(timeouts=Timeouts(read=4)))
        h.send(GET)
        _, upTransport = h.connectUpstream()
        h.reactor.advance(3.9)
        self.assertEqual(h.client.value(), b"")
        h.reactor.advance(0.2)
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (504, b"1004"))
        self.assertTrue(upTransport.disconnecting)

    def test_lifetime(self) -> None:
        """
        A response still streaming when the connection lifetime is up is
        cut, and the client connection aborted.
        """
        h = makeHarness(config=Config(timeouts=Timeouts(read=5, lifetime=12)))
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(3):
            h.reactor.advance(4)
            up.dataReceived(b"x")
        self.assertTrue(h.client.disconnecting)

    def test_requestHeaderTimeout(self) -> None:
        """
        A client that sends a partial head and stalls gets 408 after the
        request-header timeout and is disconnected.
        """
        h = makeHarness(config=Config(timeouts=Timeouts(request_header=10)))
        h.send(b"GET http://origin.example/ HTTP/1.1\r\nHost: ori")
        h.reactor.advance(10)
        status, _, _ = parseResponse(h.client.value())
        self.assertEqual(status, 408)
        self.assertTrue(h.client.disconnecting)

    def test_headerTimerSparesSlowExchange(self) -> None:
        """
        The request-header timer does not cut a request whose answer takes
        longer than it; once the answer is sent, it runs again for the next
        request, and an idle keep-alive connection is closed quietly.
        """
        h = makeHarness(config=Config(timeouts=Timeouts(request_header=10, read=60)))
        h.send(b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n\r\n")
        up, _ = h.connectUpstream()
        h.reactor.advance(25)
        self.assertFalse(h.client.disconnecting)
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(h.client.value().endswith(b"\r\n\r\nok"))
        h.reactor.advance(9)
        self.assertFalse(h.client.disconnecting)
        h.reactor.advance(1)
        self.assertTrue(h.client.disconnecting)
        self.assertEqual(h.client.value().count(b"HTTP/1.1 "), 1)

    def test_pooledConnectionIdleTimeout(self) -> None:
        """
        A connection back in the pool is closed after the read timeout with
        nothing to do, and is no longer offered.
        """
        h = makeHarness(config=Config(timeouts=Timeouts(read=30)))
        h.send(b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n\r\n")
        up, upTransport = h.connectUpstream()
        h.reactor.advance(20)
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(h.factory.pool.idleCount(), 1)
        h.reactor.advance(29)
        self.assertFalse(upTransport.disconnecting)
        h.reactor.advance(1)
        self.assertTrue(upTransport.disconnecting)
        self.assertEqual(h.factory.pool.idleCount(), 0)

    def test_dnsPendingClientGone(self) -> None:
        """
        A client that disconnects while its destination is being vetted
        cancels the lookup.
        """
        h = makeHarness(answers={})
        h.send(b"GET http://slow.example/ HTTP/1.1\r\nHost: slow.example\r\n\r\n")
        h.protocol.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(h.resolver.cancelled, [("slow.example", 80)])
        self.assertEqual(h.reactor.tcpClients, [])


CONNECT = b"CONNECT origin.example:443 HTTP/1.1\r\nHost: origin.example:443\r\n\r\n"


class ConnectTests(SynchronousTestCase):
    """
    CONNECT tunnels.
    """

    def test_establishedOnlyAfterConnect(self) -> None:
        """
        200 Connection established is sent only once the upstream
        connection is up, and bytes then flow both ways, including bytes
        the client sent right behind the CONNECT head.
        """
        h = makeHarness()
        h.send(CONNECT + b"early")
        self.assertEqual(h.reactor.tcpClients[0][:2], ("203.0.113.10", 443))
        self.assertEqual(h.client.value(), b"")
        up, upTransport = h.connectUpstream()
        self.assertEqual(
            h.client.value(), b"HTTP/1.1 200 Connection established\r\n\r\n"
        )
        self.assertEqual(upTransport.value(), b"early")
        h.send(b"\x16\x03\x01 client hello")
        self.assertEqual(upTransport.value(), b"early\x16\x03\x01 client hello")
        h.client.clear()
        up.dataReceived(b"server hello")
        self.assertEqual(h.client.value(), b"server hello")

    def test_tunnelBuffers(self) -> None:
        """
        An established tunnel's two connections read, and buffer before
        pausing the other side, in pieces of L{TUNNEL_BUFFER} bytes.
        """
        h = makeHarness()
        h.send(CONNECT)
        _, upTransport = h.connectUpstream()
        self.assertEqual(
            (h.client.bufferSize, upTransport.bufferSize),  # type: ignore[attr-defined]
            (TUNNEL_BUFFER, TUNNEL_BUFFER),
        )

    def test_tunnelBackpressure(self) -> None:
        """
        Each side of a tunnel is the other's streaming producer.
        """
        h = makeHarness()
        h.send(CONNECT)
        _, upTransport = h.connectUpstream()
        self.assertIs(h.client.producer, upTransport)
        self.assertIs(upTransport.producer, h.client)
        h.client.producer.pauseProducing()
        self.assertEqual(upTransport.producerState, "paused")

    def test_halfClose(self) -> None:
        """
        A client's half-close is passed to the origin, and the origin's to
        the client; the tunnel closes when both are done.
        """
        h = makeHarness()
        h.send(CONNECT)
        up, upTransport = h.connectUpstream()
        h.protocol.readConnectionLost()
        self.assertTrue(upTransport.writeClosed)
        self.assertFalse(h.client.disconnecting)
        up.dataReceived(b"last words")
        self.assertTrue(h.client.value().endswith(b"last words"))
        up.readConnectionLost()
        self.assertTrue(h.client.writeClosed)
        self.assertTrue(h.client.disconnecting)

    def test_deniedConnect(self) -> None:
        """
        A denied CONNECT gets 403/1000 and nothing is connected.
        """
        denied = DestinationDenied(
            "meta.example",
            443,
            AddressDecision(False, "169.254.169.254", "Deny: Not Global Unicast"),
        )
        h = makeHarness({"meta.example": denied})
        h.send(b"CONNECT meta.example:443 HTTP/1.1\r\nHost: meta.example:443\r\n\r\n")
        status, headers, body = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (403, b"1000"))
        self.assertIn(b"169.254.169.254", body)
        self.assertEqual(h.reactor.tcpClients, [])

    def test_connectWithoutPort(self) -> None:
        """
        A CONNECT target without a port gets 400/1002.
        """
        h = makeHarness()
        h.send(b"CONNECT origin.example HTTP/1.1\r\nHost: origin.example\r\n\r\n")
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (400, b"1002"))

    def test_headerTimeoutSparesTunnel(self) -> None:
        """
        The request-header timeout never cuts an established tunnel, which
        lives by its own idle timeout.
        """
        h = makeHarness(config=Config(timeouts=Timeouts(request_header=2, read=30)))
        h.send(CONNECT)
        up, _ = h.connectUpstream()
        for _ in range(10):
            h.reactor.advance(1.5)
            up.dataReceived(b".")
        self.assertFalse(h.client.disconnecting)
        h.reactor.pump([1] * 34)
        self.assertTrue(h.client.disconnecting)

    def test_tunnelAccessLog(self) -> None:
        """
        A tunnel's access-log line, written when it closes, counts the bytes
        each way.
        """
        h = makeHarness()
        h.send(CONNECT + b"abc")
        up, _ = h.connectUpstream()
        up.dataReceived(b"12345")
        h.protocol.connectionLost(Failure(ConnectionRefusedError()))
        line = h.access[-1]
        self.assertEqual(
            (line["method"], line["bytes_up"], line["bytes_down"]), ("CONNECT", 3, 5)
        )
        self.assertEqual(line["url"], "origin.example:443")

    def test_tunnelIdleTimeout(self) -> None:
        """
        An established tunnel with no bytes either way for the read timeout
        is closed (within an eighth of it after), and its line says why;
        every byte restarts the wait.
        """
        h = makeHarness(config=Config(timeouts=Timeouts(read=10, lifetime=3600)))
        h.send(CONNECT)
        up, upTransport = h.connectUpstream()
        h.reactor.pump([0.25] * 36)
        h.send(b"ping")
        h.reactor.pump([0.25] * 36)
        up.dataReceived(b"pong")
        h.reactor.pump([0.25] * 39)
        self.assertFalse(h.client.disconnecting)
        h.reactor.pump([0.25] * 6)
        self.assertTrue(h.client.disconnecting)
        self.assertTrue(upTransport.disconnecting)
        h.protocol.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(h.access[-1]["error"], "Tunnel idle for 10 s (read timeout)")

    def test_tunnelLifetime(self) -> None:
        """
        A busy tunnel is closed at the end of its lifetime all the same.
        """
        h = makeHarness(config=Config(timeouts=Timeouts(read=10, lifetime=25)))
        h.send(CONNECT)
        up, upTransport = h.connectUpstream()
        for _ in range(4):
            h.reactor.pump([0.5] * 12)
            h.send(b"data")
            self.assertFalse(h.client.disconnecting)
        h.reactor.pump([0.25] * 3)
        self.assertFalse(h.client.disconnecting)
        h.reactor.pump([0.25] * 6)
        self.assertTrue(h.client.disconnecting)
        self.assertTrue(upTransport.disconnecting)
        h.protocol.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(h.access[-1]["error"], "Tunnel exceeded its lifetime of 25 s")
