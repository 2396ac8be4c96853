"""
The control webhook wired into the proxy: the events a proxied request or
tunnel produces, and the access-request gate in front of the connect.
Everything runs in memory: the proxy on a memory reactor, the webhook
client on treq's StubTreq against a fake control server.
"""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.config import Gate, Statistics
from proxy_app.webhook import WebhookService

from .helpers import Harness, makeHarness, parseResponse
from .test_sniffer import clientHello
from .test_webhook import ControlServer

URL = "http://127.0.0.1:5000/webhook/SECRET"
GET = b"GET http://origin.example/a?b=1 HTTP/1.1\r\nHost: origin.example\r\n\r\n"


class WebhookProxyTests(SynchronousTestCase):
    """
    Events and the gate as a proxied client sees and causes them.
    """

    def setUpProxy(self, mode: str = "ok", answers: Any = None, **settings: Any) -> Any:
        self.server = ControlServer(mode)
        self.stub = StubTreq(self.server)
        h = makeHarness(answers)
        self.webhook = WebhookService(
            URL, clock=h.reactor, treqClient=self.stub, hostid="proxy-1", **settings
        )
        h.factory.webhook = self.webhook
        # The client connected before the webhook was set: say hello again.
        h.protocol.connectionMade()
        return h

    def messages(self, action: str) -> list[dict[str, Any]]:
        self.stub.flush()
        return [r.json for r in self.server.requests if r.json["action"] == action]

    def test_forwardedRequestEvents(self) -> None:
        """
        A forwarded request produces neighbor, connection-start and
        connection-stop with the session label, the bytes that crossed the
        client's connection (heads included) and the URL, its query values
        redacted.
        """
        h = self.setUpProxy()
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        (neighbor,) = self.messages("neighbor")
        self.assertEqual(
            neighbor,
            {
                "type": "proxy",
                "action": "neighbor",
                "source": "proxy-1",
                "address": "127.0.0.1",
                "addresses": ["127.0.0.1"],
                "state": "new",
            },
        )
        (start,) = self.messages("connection-start")
        session = "tcp_127.0.0.1:40000+tcp_203.0.113.10:80"
        self.assertEqual(start["details"], {"info": {"session": session}})
        self.assertRegex(start["id"], r"^Proxy-[0-9A-F]{8}-OID-[0-9A-F]{12}$")
        (stop,) = self.messages("connection-stop")
        self.assertEqual(stop["id"], start["id"])
        # The request id the proxy made is the webhook's id.
        self.assertEqual(h.access[-1]["rq_id"], start["id"])
        self.assertEqual(
            stop["details"]["info"],
            {
                "session": session,
                "policy": "default",
                "bytes_up": len(GET),
                "bytes_down": len(h.client.value()),
                "l7": {"app": "http/1.1", "details": ["http://origin.example/a?b=…"]},
            },
        )

    def test_gateReject(self) -> None:
        """
        A webhook that rejects the access request gets the client 403 with
        reason code 1012, and nothing is connected.
        """
        h = self.setUpProxy("reject", accessRequest=Gate(enabled=True))
        h.send(GET)
        self.stub.flush()
        status, headers, body = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (403, b"1012"))
        self.assertIn(b"rejected by", body)
        self.assertEqual(h.reactor.tcpClients, [])
        (request,) = self.messages("access-request")
        self.assertEqual(
            request["details"],
            {
                "policy": "default",
                "session": "tcp_127.0.0.1:40000+tcp_203.0.113.10:80",
                "addresses": ["203.0.113.10"],
            },
        )
        self.assertEqual(self.messages("connection-start"), [])

    def test_gateWaitsThenAccepts(self) -> None:
        """
        Nothing is connected until the webhook accepts; its reply is then
        reported in connection-info.
        """
        h = self.setUpProxy("never", accessRequest=Gate(enabled=True, timeout=30))
        h.send(GET)
        self.stub.flush()
        self.assertEqual(h.reactor.tcpClients, [])
        (pending,) = [
            r for r in self.server.pending() if r.json["action"] == "access-request"
        ]
        pending.answer(200, b'{"access-response": "accept", "note": "ok by me"}')
        self.stub.flush()
        self.assertEqual(len(h.reactor.tcpClients), 1)
        up, _ = h.connectUpstream()
        self.server.mode = "ok"
        up.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        (info,) = self.messages("connection-info")
        self.assertEqual(
            info["details"]["access-request"],
            {"access-response": "accept", "note": "ok by me"},
        )

    def test_gateTimeoutBothModes(self) -> None:
        """
        A webhook that never answers: with on_error accept the connection
        goes ahead after the gate's timeout; with on_error reject it is
        refused with 1012.
        """
        for onError, connects in (("accept", 1), ("reject", 0)):
            h = self.setUpProxy(
                "never", accessRequest=Gate(enabled=True, timeout=2, on_error=onError)
            )
            h.send(GET)
            self.stub.flush()
            h.reactor.advance(2)
            self.stub.flush()
            self.assertEqual(len(h.reactor.tcpClients), connects, onError)
            if not connects:
                status, headers, _ = parseResponse(h.client.value())
                self.assertEqual(headers[b"x-whsentry-reasoncode"], b"1012")

    def test_clientLeavesDuringGate(self) -> None:
        """
        A client that disconnects while its access request waits cancels
        the wait, and nothing is ever connected.
        """
        h = self.setUpProxy("never", accessRequest=Gate(enabled=True, timeout=30))
        h.send(GET)
        self.stub.flush()
        h.protocol.connectionLost(None)
        self.stub.flush()
        (pending,) = [
            r for r in self.server.requests if r.json["action"] == "access-request"
        ]
        self.assertTrue(pending.lost)
        h.reactor.advance(60)
        self.assertEqual(h.reactor.tcpClients, [])

    def test_deadWebhookTrafficFlows(self) -> None:
        """
        A webhook server that never answers changes nothing for traffic
        when the gate is off.
        """
        h = self.setUpProxy("never")
        h.send(GET)
        up, _ = h.connectUpstream()
        for _ in range(3):
            if h.client.value():
                # Later requests reuse the pooled upstream connection.
                h.client.clear()
                h.send(GET)
            up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            self.assertTrue(h.client.value().endswith(b"ok"))
        self.assertEqual([line["response_code"] for line in h.access], [200, 200, 200])

    def test_tunnelSNIAndStatistics(self) -> None:
        """
        A tunnel carrying TLS reports the ClientHello's SNI and app tls in
        connection-stop, its bytes counting the CONNECT exchange too, and
        statistics counting exactly the relayed bytes.
        """
        h = self.setUpProxy(statistics=Statistics(enabled=True))
        hello = clientHello(b"api.example.com")
        connect = (
            b"CONNECT origin.example:443 HTTP/1.1\r\nHost: origin.example:443\r\n\r\n"
        )
        h.send(connect)
        up, _ = h.connectUpstream()
        h.send(hello)
        up.dataReceived(b"\x16\x03\x03server")
        h.protocol.connectionLost(None)
        (stop,) = self.messages("connection-stop")
        info = stop["details"]["info"]
        self.assertEqual(info["tls"], {"sni": "api.example.com"})
        self.assertEqual(info["l7"]["app"], "tls")
        self.assertEqual(
            (info["bytes_up"], info["bytes_down"]),
            (len(connect) + len(hello), len(h.client.value())),
        )
        (details,) = self.messages("connection-info")
        entropy = details["details"]["statistics"]["entropy"]
        self.assertEqual(entropy["left"]["bytes_accounted"], len(hello))
        self.assertEqual(entropy["right"]["bytes_accounted"], 9)


A, B, C = "203.0.113.10", "203.0.113.11", "2001:db8::10"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class GateAddressTests(SynchronousTestCase):
    """
    The proxy connects only to addresses the access-request gate approved:
    the request names every address that may be tried, a reply may narrow
    them, and new, pooled and retried connections keep to that set.
    """

    def setUp(self) -> None:
        self.server = ControlServer("never")
        self.stub = StubTreq(self.server)
        self.h = makeHarness({"origin.example": [A, B, C]})
        self.webhook = WebhookService(
            URL,
            clock=self.h.reactor,
            treqClient=self.stub,
            hostid="proxy-1",
            accessRequest=Gate(enabled=True, timeout=30),
        )
        self.h.factory.webhook = self.webhook

    def ask(self, reply: bytes) -> dict[str, Any]:
        """
        Send a request, answer its access request with C{reply}, and return
        the access request.
        """
        self.h.send(GET)
        self.stub.flush()
        (pending,) = [
            r for r in self.server.pending() if r.json["action"] == "access-request"
        ]
        pending.answer(200, reply)
        self.stub.flush()
        return pending.json

    def attempted(self) -> list[str]:
        return [client[0] for client in self.h.reactor.tcpClients]

    def test_requestNamesEveryAddress(self) -> None:
        """
        The access request lists every address that may be tried, in the
        order they would be (families interleaved), and its session names
        the first of them, as before.
        """
        request = self.ask(b'{"access-response": "accept"}')
        self.assertEqual(request["details"]["addresses"], [A, C, B])
        self.assertEqual(
            request["details"]["session"], f"tcp_127.0.0.1:40000+tcp_{A}:80"
        )

    def test_capBeforeGate(self) -> None:
        """
        With sixty vetted addresses the gate is asked about the capped set
        only, and an accept without C{addresses} lets exactly that set be
        tried.
        """
        many = [f"203.0.113.{n}" for n in range(1, 61)]
        self.h.resolver.answers["origin.example"] = many
        request = self.ask(b'{"access-response": "accept"}')
        self.assertEqual(request["details"]["addresses"], many[:4])
        self.h.reactor.pump([0.25] * 40)
        self.assertEqual(self.attempted(), many[:4])

    def test_refusedFirstTriesOnlyApproved(self) -> None:
        """
        A gate that approves the first address only: when it refuses, the
        proxy answers 502 and never tries the other vetted addresses.
        """
        self.ask(b'{"access-response": "accept", "addresses": ["203.0.113.10"]}')
        self.assertEqual(self.attempted(), [A])
        self.h.failUpstream(ConnectionRefusedError())
        self.h.reactor.advance(30)
        self.assertEqual(self.attempted(), [A])
        status, headers, _ = parseResponse(self.h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (502, b"1006"))

    def test_refusedFirstTriesNextApproved(self) -> None:
        """
        A gate that approves two of three addresses: when the first
        refuses, the other approved one is tried, and the unapproved one
        never is.
        """
        self.ask(
            b'{"access-response": "accept", '
            b'"addresses": ["203.0.113.11", "203.0.113.10"]}'
        )
        self.assertEqual(self.attempted(), [A])
        self.h.failUpstream(ConnectionRefusedError())
        self.assertEqual(self.attempted(), [A, B])
        self.h.reactor.advance(30)
        self.assertEqual(self.attempted(), [A, B])

    def test_approvesNone(self) -> None:
        """
        An accept whose C{addresses} names none of the vetted addresses (or
        is not a list) rejects the request with 403/1012, and nothing is
        connected.
        """
        for reply in (
            b'{"access-response": "accept", "addresses": ["198.51.100.1"]}',
            b'{"access-response": "accept", "addresses": "203.0.113.10"}',
            b'{"access-response": "accept", "addresses": [3405803786]}',
        ):
            self.setUp()
            self.ask(reply)
            self.assertEqual(self.h.reactor.tcpClients, [], reply)
            status, headers, body = parseResponse(self.h.client.value())
            self.assertEqual(
                (status, headers[b"x-whsentry-reasoncode"]), (403, b"1012"), reply
            )
            self.assertIn(b"approved none of the addresses", body)

    def poolConnectionTo(self, address: str) -> Harness:
        """
        Leave an idle pooled connection to C{address} behind one request
        whose gate approved it alone.
        """
        self.ask(
            b'{"access-response": "accept", "addresses": ["%s"]}' % address.encode()
        )
        self.assertEqual(self.attempted()[-1], address)
        up, _ = self.h.connectUpstream()
        up.dataReceived(OK)
        self.assertEqual(self.h.factory.pool.idleCount(), 1)
        self.h.client.clear()
        return up

    def test_pooledOutsideApprovedUnused(self) -> None:
        """
        An idle pooled connection to a vetted address the gate did not
        approve for this request is not used: a new connection is made to
        the approved address.
        """
        self.poolConnectionTo(B)
        self.ask(b'{"access-response": "accept", "addresses": ["203.0.113.10"]}')
        self.assertEqual(self.attempted(), [B, A])
        self.assertEqual(self.h.factory.pool.idleCount(), 1)

    def test_retryStaysInApprovedSet(self) -> None:
        """
        The stale-connection retry reconnects only within the set approved
        for this request: when a reused connection to the approved address
        fails and the new connection to it is refused, the other vetted
        addresses are never tried.
        """
        up = self.poolConnectionTo(A)
        self.ask(b'{"access-response": "accept", "addresses": ["203.0.113.10"]}')
        self.assertEqual(self.h.factory.pool.idleCount(), 0)
        # The origin had closed the pooled connection: the request is
        # retried on a new one.
        up.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.attempted(), [A, A])
        self.h.failUpstream(ConnectionRefusedError())
        self.h.reactor.advance(30)
        self.assertEqual(self.attempted(), [A, A])
        status, _, _ = parseResponse(self.h.client.value())
        self.assertEqual(status, 502)
