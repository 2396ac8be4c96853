"""
Tests for L{proxy_app.webhook}: the messages, the delivery queue, the
access-request gate and the redaction of the webhook's URL.

Most tests run the service against a fake control server (a twisted.web
resource) through C{treq.testing.StubTreq}, with a L{Clock} for pings,
timeouts and backoff.  A few at the end use a real server on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import json
import re
import socket
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor as globalReactor
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from proxy_app.config import Gate, Statistics
from proxy_app.stats import ConnectionStatistics
from proxy_app.webhook import (
    MAX_BACKOFF,
    MAX_L7_DETAILS,
    GateResult,
    WebhookService,
    approvedAddresses,
    connectionInfoDetails,
    connectionStopInfo,
    redactURL,
    sessionLabel,
)

SECRET = "s3cr3t-5f0a9c"
URL = f"http://hook.example:5000/webhook/{SECRET}"
HOSTID = "oneofmany1"


class Recorded:
    """
    One request the control server received.
    """

    def __init__(self, request: Any, body: bytes) -> None:
        self.request = request
        self.path = request.path
        self.method = request.method
        self.contentType = request.getHeader("content-type")
        self.body = body
        self.json = json.loads(body)
        self.lost: list[Any] = []
        request.notifyFinish().addErrback(self.lost.append)

    def answer(self, status: int, body: bytes) -> None:
        self.request.setResponseCode(status)
        self.request.write(body)
        self.request.finish()


class ControlServer(Resource):
    """
    A fake control webhook: it records every POST and answers according
    to C{mode} (or, first, the scripted C{modes}):

      - C{ok}: 200 C{{"status": "success"}}, as the seed's Flask server
        answers events;
      - C{accept} / C{reject}: 200 with that access-response;
      - C{500}, C{404}: that status;
      - C{garbage}: 200 with a body that is not JSON;
      - C{big}: 200 with a body past the reply limit;
      - C{never}: no answer until a test calls L{Recorded.answer}.
    """

    isLeaf = True

    def __init__(self, mode: str = "ok") -> None:
        super().__init__()
        self.mode = mode
        self.modes: list[str] = []
        self.requests: list[Recorded] = []

    def render_POST(self, request: Any) -> Any:
        recorded = Recorded(request, request.content.read())
        self.requests.append(recorded)
        mode = self.modes.pop(0) if self.modes else self.mode
        if mode == "never":
            return NOT_DONE_YET
        if mode in ("accept", "reject"):
            return json.dumps({"access-response": mode}).encode()
        if mode == "500":
            request.setResponseCode(500)
            return b"internal error"
        if mode == "404":
            request.setResponseCode(404)
            return b'{"error": "no such hook"}'
        if mode == "garbage":
            return b"<html>not json</html>"
        if mode == "big":
            return b'{"access-response": "reject", "pad": "' + b"x" * 70000 + b'"}'
        return b'{"status": "success"}'

    def actions(self) -> list[str]:
        return [r.json["action"] for r in self.requests]

    def pending(self) -> list[Recorded]:
        return [r for r in self.requests if not r.request.finished and not r.lost]


def fixedIDs(*chunks: bytes) -> Any:
    """
    An C{os.urandom} stand-in returning C{chunks} in turn.
    """
    queue = list(chunks)

    def idSource(n: int) -> bytes:
        chunk = queue.pop(0)
        assert len(chunk) == n
        return chunk

    return idSource


class ServiceMixin:
    """
    Builds a L{WebhookService} on a L{ControlServer} and a L{Clock}.
    """

    def makeService(
        self, mode: str = "ok", **kwargs: Any
    ) -> tuple[WebhookService, ControlServer, StubTreq]:
        self.clock = Clock()
        self.server = ControlServer(mode)
        self.stub = StubTreq(self.server)
        kwargs.setdefault("hostid", HOSTID)
        service = WebhookService(URL, clock=self.clock, treqClient=self.stub, **kwargs)
        return service, self.server, self.stub

    def gate(self, onError: str = "accept", timeout: float = 5.0) -> Gate:
        return Gate(enabled=True, timeout=timeout, on_error=onError)


class FailingClient:
    """
    A treq stand-in whose POSTs fail with errors from C{errors} in turn
    (then succeed with C{then}, a treq-like response).
    """

    def __init__(self, errors: list[Exception], then: Any = None) -> None:
        self.errors = errors
        self.then = then
        self.calls = 0

    def post(self, url: str, **kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        if self.errors:
            return fail(self.errors.pop(0))
        return succeed(self.then)


class FakeResponse:
    """
    Just enough of a treq response: a status and a body.
    """

    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self.length = len(body)
        self._body = body

    def deliverBody(self, protocol: Any) -> None:
        from twisted.internet.testing import StringTransport
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseDone

        protocol.makeConnection(StringTransport())
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


class MessageTests(ServiceMixin, SynchronousTestCase):
    """
    Every action's exact JSON.
    """

    def test_ping(self) -> None:
        """
        A ping is C{type}, C{action}, C{source} and C{proxies}, the ids of
        connections started and not stopped, and nothing else.
        """
        service, server, _ = self.makeService()
        a, b, c = (service.newConnectionID() for _ in range(3))
        for cid in (a, b, c):
            service.connectionStarted(cid, "s")
        service.connectionStopped(b, connectionStopInfo("s", 1, 0, 0))
        service.ping()
        self.assertEqual(
            server.requests[-1].json,
            {"type": "proxy", "action": "ping", "source": HOSTID, "proxies": [a, c]},
        )
        self.assertEqual(service.liveConnections, [a, c])

    def test_neighbor(self) -> None:
        """
        A neighbor message carries the address, as C{address} and as a
        one-element C{addresses}, with C{state} C{new}.
        """
        service, server, _ = self.makeService()
        service.neighbor("172.30.1.10")
        self.assertEqual(
            server.requests[0].json,
            {
                "type": "proxy",
                "action": "neighbor",
                "source": HOSTID,
                "address": "172.30.1.10",
                "addresses": ["172.30.1.10"],
                "state": "new",
            },
        )

    def test_connectionStart(self) -> None:
        """
        A connection-start carries the id and C{details.info.session}.
        """
        service, server, _ = self.makeService()
        cid = service.newConnectionID()
        session = sessionLabel("172.30.1.10", 32954, "1.2.3.4", 443, True)
        service.connectionStarted(cid, session)
        self.assertEqual(
            server.requests[0].json,
            {
                "type": "proxy",
                "action": "connection-start",
                "source": HOSTID,
                "id": cid,
                "details": {
                    "info": {"session": "tcp_172.30.1.10:32954+ssli_1.2.3.4:443"}
                },
            },
        )

    def test_connectionStop(self) -> None:
        """
        A connection-stop carries session, policy, bytes each way, the SNI
        and the L7 application with the URLs requested.
        """
        service, server, _ = self.makeService()
        cid = service.newConnectionID()
        session = sessionLabel("172.30.1.10", 32954, "1.2.3.4", 443, True)
        service.connectionStopped(
            cid,
            connectionStopInfo(
                session,
                3,
                1367,
                610,
                sni="example.com",
                app="http/1.1",
                details=["https://example.com/a", "https://example.com/b"],
            ),
        )
        self.assertEqual(
            server.requests[0].json,
            {
                "type": "proxy",
                "action": "connection-stop",
                "source": HOSTID,
                "id": cid,
                "details": {
                    "info": {
                        "session": session,
                        "policy": 3,
                        "bytes_up": 1367,
                        "bytes_down": 610,
                        "tls": {"sni": "example.com"},
                        "l7": {
                            "app": "http/1.1",
                            "details": [
                                "https://example.com/a",
                                "https://example.com/b",
                            ],
                        },
                    }
                },
            },
        )

    def test_connectionStopInfoOptionalParts(self) -> None:
        """
        Without SNI or L7 the info has neither C{tls} nor C{l7}; a tunnel's
        C{tls} app has an empty detail list; at most L{MAX_L7_DETAILS} URLs
        are listed.
        """
        self.assertEqual(
            connectionStopInfo("s", "role", 1, 2),
            {"session": "s", "policy": "role", "bytes_up": 1, "bytes_down": 2},
        )
        self.assertEqual(
            connectionStopInfo("s", "role", 1, 2, sni="a.example", app="tls")["l7"],
            {"app": "tls", "details": []},
        )
        urls = (f"http://a.example/{i}" for i in range(1000))
        info = connectionStopInfo("s", "role", 1, 2, app="http/1.1", details=urls)
        self.assertEqual(len(info["l7"]["details"]), MAX_L7_DETAILS)

    def test_connectionInfo(self) -> None:
        """
        A connection-info's details have one key per feature: the
        statistics report and the gate's stored reply.
        """
        service, server, _ = self.makeService(accessRequest=self.gate())
        server.mode = "accept"
        cid = service.newConnectionID()
        result = self.successResultOf(service.accessRequest(cid, 3, "s"))
        stats = ConnectionStatistics(self.clock)
        stats.left(b"GET / HTTP/1.1\r\n\r\n")
        stats.right(b"HTTP/1.1 200 OK\r\n\r\n")
        server.mode = "ok"
        service.connectionInfo(cid, connectionInfoDetails(stats, result))
        message = server.requests[-1].json
        self.assertEqual(
            message,
            {
                "type": "proxy",
                "action": "connection-info",
                "source": HOSTID,
                "id": cid,
                "details": {
                    "statistics": json.loads(json.dumps(stats.report())),
                    "access-request": {"access-response": "accept"},
                },
            },
        )

    def test_connectionInfoEmpty(self) -> None:
        """
        When no feature collected anything, no connection-info is sent.
        """
        service, server, _ = self.makeService()
        service.connectionInfo(
            service.newConnectionID(), connectionInfoDetails(None, None)
        )
        service.connectionInfo(
            service.newConnectionID(),
            connectionInfoDetails(None, GateResult(True, "x")),
        )
        self.assertEqual(server.requests, [])

    def test_accessRequest(self) -> None:
        """
        An access-request carries the id and C{details} of policy and
        session.
        """
        service, server, _ = self.makeService(accessRequest=self.gate())
        cid = service.newConnectionID()
        service.accessRequest(cid, 3, "tcp_10.0.0.1:5000+tcp_1.2.3.4:80")
        self.assertEqual(
            server.requests[0].json,
            {
                "type": "proxy",
                "action": "access-request",
                "source": HOSTID,
                "id": cid,
                "details": {"policy": 3, "session": "tcp_10.0.0.1:5000+tcp_1.2.3.4:80"},
            },
        )

    def test_accessRequestAddresses(self) -> None:
        """
        Given the addresses a connection may be made to, the access request
        lists them as C{details.addresses}, after smithproxy's fields, which
        stay as they were.
        """
        service, server, _ = self.makeService(accessRequest=self.gate())
        service.accessRequest(
            "id",
            3,
            "tcp_10.0.0.1:5000+tcp_1.2.3.4:80",
            addresses=("1.2.3.4", "2001:db8::1"),
        )
        self.assertEqual(
            server.requests[0].json["details"],
            {
                "policy": 3,
                "session": "tcp_10.0.0.1:5000+tcp_1.2.3.4:80",
                "addresses": ["1.2.3.4", "2001:db8::1"],
            },
        )

    def test_approvedAddresses(self) -> None:
        """
        A reply approves all the addresses asked about unless it lists some
        in C{addresses}; it can only narrow them, never add one, and a list
        it cannot read approves nothing.
        """
        asked = ("1.2.3.4", "2001:db8::1", "5.6.7.8")
        self.assertEqual(approvedAddresses({"access-response": "accept"}, asked), asked)
        self.assertEqual(approvedAddresses("not json", asked), asked)
        self.assertEqual(
            approvedAddresses(
                {"addresses": ["5.6.7.8", "2001:DB8:0::1", "9.9.9.9"]}, asked
            ),
            ("2001:db8::1", "5.6.7.8"),
        )
        for listed in ([], ["example.com"], "1.2.3.4", [16909060], None):
            self.assertEqual(
                approvedAddresses({"addresses": listed}, asked), (), listed
            )

    def test_postedAsJSON(self) -> None:
        """
        Messages are POSTed to the configured path with C{Content-Type:
        application/json}.
        """
        service, server, _ = self.makeService()
        service.ping()
        self.assertEqual(server.requests[0].method, b"POST")
        self.assertEqual(server.requests[0].path, f"/webhook/{SECRET}".encode())
        self.assertEqual(server.requests[0].contentType, "application/json")

    def test_hostidDefault(self) -> None:
        """
        Without a hostid, C{source} is the host name.
        """
        service, server, _ = self.makeService(hostid=None)
        service.ping()
        self.assertEqual(server.requests[0].json["source"], socket.gethostname())


class NeighborTests(ServiceMixin, SynchronousTestCase):
    def test_oncePerAddress(self) -> None:
        """
        Each client address is reported once, the first time it is seen.
        """
        service, server, _ = self.makeService()
        for address in [
            "10.0.0.1",
            "10.0.0.1",
            "2001:db8::1",
            "10.0.0.1",
            "2001:db8::1",
        ]:
            service.neighbor(address)
        self.assertEqual(
            [r.json["address"] for r in server.requests], ["10.0.0.1", "2001:db8::1"]
        )

    def test_memoryBounded(self) -> None:
        """
        Only C{neighborMemory} addresses are remembered: the least recently
        seen is forgotten and reported again when it comes back, while one
        seen recently is not.
        """
        service, server, _ = self.makeService(neighborMemory=2)
        for address in ["a", "b", "a", "c", "a", "b"]:
            service.neighbor(address)
        self.assertEqual(
            [r.json["address"] for r in server.requests], ["a", "b", "c", "b"]
        )


class IdentityTests(ServiceMixin, SynchronousTestCase):
    def test_format(self) -> None:
        """
        Connection ids are C{Proxy-<8 hex>-OID-<12 hex>}, upper case, with
        one process part and a different OID for every connection.
        """
        service, _, _ = self.makeService()
        ids = [service.newConnectionID() for _ in range(1000)]
        pattern = re.compile(r"^Proxy-[0-9A-F]{8}-OID-[0-9A-F]{12}$")
        for cid in ids:
            self.assertRegex(cid, pattern)
        self.assertEqual(len(set(ids)), 1000)
        self.assertEqual(len({cid[:14] for cid in ids}), 1)

    def test_fromIDSource(self) -> None:
        """
        The process part is 4 random bytes and the OIDs count up from 6
        random bytes, wrapping at 48 bits.
        """
        service, _, _ = self.makeService(
            idSource=fixedIDs(bytes.fromhex("A65E609B"), bytes.fromhex("FEE9B1098109"))
        )
        self.assertEqual(service.newConnectionID(), "Proxy-A65E609B-OID-FEE9B1098109")
        self.assertEqual(service.newConnectionID(), "Proxy-A65E609B-OID-FEE9B109810A")
        wrapping, _, _ = self.makeService(idSource=fixedIDs(b"\x00" * 4, b"\xff" * 6))
        self.assertEqual(wrapping.newConnectionID(), "Proxy-00000000-OID-FFFFFFFFFFFF")
        self.assertEqual(wrapping.newConnectionID(), "Proxy-00000000-OID-000000000000")

    def test_processesDiffer(self) -> None:
        """
        Two services (two process starts) get different process parts.
        """
        first, _, _ = self.makeService()
        second, _, _ = self.makeService()
        self.assertNotEqual(first.newConnectionID()[:14], second.newConnectionID()[:14])


class SessionLabelTests(SynchronousTestCase):
    def test_plainIPv4(self) -> None:
        """
        Plain TCP both ways, IPv4: C{tcp_client:port+tcp_destination:port}.
        """
        self.assertEqual(
            sessionLabel("127.0.0.1", 40000, "93.184.216.34", 80, False),
            "tcp_127.0.0.1:40000+tcp_93.184.216.34:80",
        )

    def test_originatedTLSIPv6(self) -> None:
        """
        TLS the proxy originates makes the right prefix C{ssli}; IPv6
        addresses are bracketed.
        """
        self.assertEqual(
            sessionLabel("127.0.0.1", 40000, "2001:db8::1", 443, True),
            "tcp_127.0.0.1:40000+ssli_[2001:db8::1]:443",
        )
        self.assertEqual(
            sessionLabel("::1", 5, "10.0.0.1", 443, False),
            "tcp_[::1]:5+tcp_10.0.0.1:443",
        )

    def test_clientTLS(self) -> None:
        """
        A client leg over a TLS listener makes the left prefix C{ssli}.
        """
        self.assertEqual(
            sessionLabel("172.30.1.10", 32954, "1.2.3.4", 443, True, clientTLS=True),
            "ssli_172.30.1.10:32954+ssli_1.2.3.4:443",
        )


class PingTimingTests(ServiceMixin, SynchronousTestCase):
    def test_schedule(self) -> None:
        """
        The first ping goes C{firstPing} seconds after start, then one
        every C{pingInterval}; stopping ends them.
        """
        service, server, _ = self.makeService()
        service.startService()
        self.clock.advance(9.9)
        self.assertEqual(server.actions(), [])
        self.clock.advance(0.1)
        self.assertEqual(server.actions(), ["ping"])
        self.clock.advance(119.9)
        self.assertEqual(server.actions(), ["ping"])
        self.clock.advance(0.1)
        self.assertEqual(server.actions(), ["ping", "ping"])
        self.clock.advance(120)
        self.clock.advance(120)
        self.assertEqual(server.actions(), ["ping"] * 4)
        self.successResultOf(service.stopService())
        self.clock.advance(1000)
        self.assertEqual(server.actions(), ["ping"] * 4)

    def test_firstPingWithinShortInterval(self) -> None:
        """
        With a 1 s interval the first ping goes 1 s after start (not 10 s),
        then one every second; with the default interval (120 s) it still
        goes at 10 s.
        """
        for interval, first in ((1.0, 1.0), (120.0, 10.0)):
            service, server, _ = self.makeService(pingInterval=interval)
            service.startService()
            self.clock.advance(first - 0.01)
            self.assertEqual(server.actions(), [], interval)
            self.clock.advance(0.01)
            self.assertEqual(server.actions(), ["ping"], interval)
            self.clock.advance(interval - 0.01)
            self.assertEqual(server.actions(), ["ping"], interval)
            self.clock.advance(0.01)
            self.assertEqual(server.actions(), ["ping", "ping"], interval)
            self.clock.advance(interval)
            self.assertEqual(server.actions(), ["ping"] * 3, interval)
            self.successResultOf(service.stopService())

    def test_stopBeforeFirst(self) -> None:
        """
        Stopping before the first ping cancels it.
        """
        service, server, _ = self.makeService(firstPing=10, pingInterval=30)
        service.startService()
        self.clock.advance(5)
        self.successResultOf(service.stopService())
        self.clock.advance(100)
        self.assertEqual(server.requests, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class GateTests(ServiceMixin, SynchronousTestCase):
    """
    The access-request gate's outcomes, in both C{on_error} modes.
    """

    def ask(self, mode: str, onError: str, timeout: float = 5.0) -> GateResult:
        service, server, _ = self.makeService(
            mode, accessRequest=self.gate(onError, timeout)
        )
        self.service = service
        d = service.accessRequest(
            service.newConnectionID(), 3, "tcp_10.0.0.1:1+tcp_1.2.3.4:80"
        )
        if mode == "never":
            self.assertNoResult(d)
            self.clock.advance(timeout)
        return self.successResultOf(d)

    def test_reject(self) -> None:
        """
        C{{"access-response": "reject"}} with 200 rejects, whatever
        C{on_error} says; the reply is kept.
        """
        for onError in ("accept", "reject"):
            result = self.ask("reject", onError)
            self.assertEqual(
                result,
                GateResult(
                    False, "rejected by webhook", {"access-response": "reject"}, 0.0
                ),
            )
            self.assertEqual((self.service.sent, self.service.failed), (1, 0))

    def test_accept(self) -> None:
        """
        C{{"access-response": "accept"}} with 200 accepts in both modes.
        """
        for onError in ("accept", "reject"):
            result = self.ask("accept", onError)
            self.assertEqual(
                result,
                GateResult(
                    True, "accepted by webhook", {"access-response": "accept"}, 0.0
                ),
            )

    def test_timeout(self) -> None:
        """
        No answer within the gate's own timeout: accepted with
        C{on_error: accept}, rejected with C{on_error: reject}; counted as
        failed; the latency is the timeout.
        """
        result = self.ask("never", "accept", timeout=2.5)
        self.assertEqual(
            result,
            GateResult(
                True, "webhook timed out after 2.5 s; on_error=accept", None, 2.5
            ),
        )
        self.assertEqual(self.service.failed, 1)
        result = self.ask("never", "reject", timeout=2.5)
        self.assertEqual(
            result,
            GateResult(
                False, "webhook timed out after 2.5 s; on_error=reject", None, 2.5
            ),
        )

    def test_timeoutCancelsRequest(self) -> None:
        """
        A timed-out gate call closes its request's connection.
        """
        self.ask("never", "reject")
        self.stub.flush()
        self.assertEqual(len(self.server.requests[0].lost), 1)

    def test_serverError(self) -> None:
        """
        A non-2xx status is an error: accepted with C{on_error: accept},
        rejected with C{on_error: reject}; the body is kept as text.
        """
        result = self.ask("500", "accept")
        self.assertEqual(
            result,
            GateResult(
                True,
                "webhook answered HTTP 500; on_error=accept",
                "internal error",
                0.0,
            ),
        )
        self.assertEqual((self.service.sent, self.service.failed), (0, 1))
        self.assertFalse(self.ask("500", "reject").accepted)

    def test_nonSuccessRejectIsError(self) -> None:
        """
        A reject in the body of a non-2xx answer does not count as the
        webhook's decision: C{on_error} decides.
        """
        service, server, _ = self.makeService(accessRequest=self.gate("accept"))
        server.render_POST = lambda request: (  # type: ignore[method-assign]
            request.setResponseCode(503),
            b'{"access-response": "reject"}',
        )[1]
        result = self.successResultOf(service.accessRequest("id", 1, "s"))
        self.assertTrue(result.accepted)
        self.assertEqual(result.reply, {"access-response": "reject"})

    def test_garbage(self) -> None:
        """
        A 2xx body that is not JSON is an error: accepted or rejected by
        C{on_error}; the raw text is kept.
        """
        result = self.ask("garbage", "accept")
        self.assertEqual(
            result,
            GateResult(
                True,
                "webhook reply is not JSON; on_error=accept",
                "<html>not json</html>",
                0.0,
            ),
        )
        self.assertEqual((self.service.sent, self.service.failed), (1, 0))
        self.assertFalse(self.ask("garbage", "reject").accepted)

    def test_otherJSON(self) -> None:
        """
        JSON without an accept or reject (the seed server's event answer)
        accepts with C{on_error: accept}, as smithproxy does, and rejects
        with C{on_error: reject}.
        """
        result = self.ask("ok", "accept")
        self.assertEqual(
            result,
            GateResult(
                True,
                "webhook reply has no access-response accept or reject; "
                "on_error=accept",
                {"status": "success"},
                0.0,
            ),
        )
        self.assertFalse(self.ask("ok", "reject").accepted)

    def test_tooLarge(self) -> None:
        """
        A reply past the size limit is an error, even if it begins with a
        reject, and nothing of it is kept.
        """
        result = self.ask("big", "accept")
        self.assertTrue(result.accepted)
        self.assertIn("longer than 65536 bytes", result.reason)
        self.assertIsNone(result.reply)
        self.assertFalse(self.ask("big", "reject").accepted)

    def test_connectionError(self) -> None:
        """
        A connection error is decided by C{on_error} and counted as failed.
        """
        for onError, accepted in (("accept", True), ("reject", False)):
            service = WebhookService(
                URL,
                clock=Clock(),
                treqClient=FailingClient([ConnectionRefusedError()]),
                accessRequest=self.gate(onError),
            )
            result = self.successResultOf(service.accessRequest("id", 1, "s"))
            self.assertEqual(result.accepted, accepted)
            self.assertTrue(
                result.reason.startswith(
                    "webhook request failed: ConnectionRefusedError"
                )
            )
            self.assertTrue(result.reason.endswith(f"; on_error={onError}"))
            self.assertEqual(service.failed, 1)

    def test_staleConnectionRetried(self) -> None:
        """
        A request lost on a stale pooled connection is sent once more at
        once, within the same timeout, and its answer counts.
        """
        client = FailingClient(
            [ResponseNeverReceived([ConnectionRefusedError()])],
            then=FakeResponse(200, b'{"access-response": "reject"}'),
        )
        service = WebhookService(
            URL, clock=Clock(), treqClient=client, accessRequest=self.gate()
        )
        result = self.successResultOf(service.accessRequest("id", 1, "s"))
        self.assertEqual(result.reason, "rejected by webhook")
        self.assertEqual(client.calls, 2)

    def test_latency(self) -> None:
        """
        The latency is the time from sending to the answer.
        """
        service, server, stub = self.makeService("never", accessRequest=self.gate())
        d = service.accessRequest("id", 1, "s")
        self.clock.advance(1.25)
        server.requests[0].answer(200, b'{"access-response": "accept"}')
        stub.flush()
        self.assertEqual(self.successResultOf(d).latency, 1.25)

    def test_off(self) -> None:
        """
        With the gate off, every call accepts at once without a request.
        """
        service, server, _ = self.makeService()
        result = self.successResultOf(service.accessRequest("id", 1, "s"))
        self.assertEqual(
            result, GateResult(True, "access-request gate is off", None, 0.0)
        )
        self.assertEqual(server.requests, [])
        self.assertFalse(service.gateEnabled)

    def test_cancel(self) -> None:
        """
        Cancelling a gate call (the client left) fails it with
        C{CancelledError}, closes its request's connection, counts nothing,
        and leaves no timer behind.
        """
        service, server, stub = self.makeService("never", accessRequest=self.gate())
        d = service.accessRequest("id", 1, "s")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        stub.flush()
        self.assertEqual(len(server.requests[0].lost), 1)
        self.assertEqual((service.sent, service.failed), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_manyAtOnce(self) -> None:
        """
        Many gate calls wait at once, and each gets the answer to its own
        request, in whatever order the answers come.
        """
        service, server, stub = self.makeService(
            "never", accessRequest=self.gate("reject")
        )
        calls = {}
        for i in range(20):
            cid = service.newConnectionID()
            calls[cid] = service.accessRequest(cid, i, f"session-{i}")
        self.assertEqual(len(server.pending()), 20)
        for recorded in reversed(server.requests):
            i = recorded.json["details"]["policy"]
            recorded.answer(
                200,
                json.dumps(
                    {"access-response": "reject" if i % 2 else "accept"}
                ).encode(),
            )
            stub.flush()
        for recorded in server.requests:
            result = self.successResultOf(calls[recorded.json["id"]])
            self.assertEqual(
                result.accepted, recorded.json["details"]["policy"] % 2 == 0
            )
        self.assertEqual(service.sent, 20)


class QueueTests(ServiceMixin, SynchronousTestCase):
    """
    Event delivery: concurrency, the bounded queue, retries and shutdown.
    """

    def test_concurrencyCap(self) -> None:
        """
        At most C{maxConcurrent} event POSTs are in flight; the rest wait
        and go as answers come.
        """
        service, server, stub = self.makeService("never", maxConcurrent=4)
        for i in range(10):
            service.neighbor(f"10.0.0.{i}")
        self.assertEqual(len(server.requests), 4)
        self.assertEqual(service.queueDepth, 10)
        server.requests[0].answer(200, b"{}")
        stub.flush()
        self.assertEqual(len(server.requests), 5)
        self.assertEqual((service.sent, service.queueDepth), (1, 9))

    def test_fullQueueDrops(self) -> None:
        """
        When C{queueSize} events are held, new ones are dropped and counted,
        and the queue never grows past its size; once it drains, events are
        taken again.
        """
        service, server, stub = self.makeService("never", queueSize=5, maxConcurrent=2)
        for i in range(8):
            service.neighbor(f"10.0.0.{i}")
        self.assertEqual((service.queueDepth, service.dropped), (5, 3))
        self.assertEqual(len(server.requests), 2)
        for _ in range(5):
            server.pending()[0].answer(200, b"{}")
            stub.flush()
        self.assertEqual((service.sent, service.queueDepth), (5, 0))
        self.assertEqual(
            [r.json["address"] for r in server.requests],
            [f"10.0.0.{i}" for i in range(5)],
        )
        service.neighbor("10.0.0.99")
        self.assertEqual(server.requests[-1].json["address"], "10.0.0.99")
        self.assertEqual(service.dropped, 3)

    def test_deadServerDoesNotBlock(self) -> None:
        """
        A webhook that never answers holds up nothing: event calls return
        at once, event POSTs time out after C{timeout}, and a gate call made
        meanwhile is decided by its own timeout.
        """
        service, server, _ = self.makeService(
            "never",
            timeout=5.0,
            retries=0,
            maxConcurrent=2,
            accessRequest=self.gate("accept", 1.0),
        )
        for i in range(4):
            service.neighbor(f"10.0.0.{i}")
        gate = service.accessRequest("id", 1, "s")
        self.assertNoResult(gate)
        self.clock.advance(1.0)
        self.assertEqual(
            self.successResultOf(gate).reason,
            "webhook timed out after 1 s; on_error=accept",
        )
        self.assertEqual(service.queueDepth, 4)
        self.clock.advance(4.0)
        self.assertEqual((service.failed, service.queueDepth), (3, 2))
        self.clock.advance(5.0)
        self.assertEqual((service.failed, service.queueDepth), (5, 0))
        self.assertEqual(server.actions().count("neighbor"), 4)

    def test_retryBackoff(self) -> None:
        """
        A failing event is tried again after 1, 2 and 4 seconds (doubling
        from C{retryDelay}), then given up and counted as failed.
        """
        service, server, _ = self.makeService("500", retries=3, retryDelay=1.0)
        service.neighbor("10.0.0.1")
        times = [0.0]
        for step in [0.5, 0.5, 1.0, 1.0, 2.0, 2.0, 10.0]:
            before = len(server.requests)
            self.clock.advance(step)
            if len(server.requests) > before:
                times.append(self.clock.seconds())
        self.assertEqual(times, [0.0, 1.0, 3.0, 7.0])
        self.assertEqual(len(server.requests), 4)
        self.assertEqual((service.sent, service.failed, service.queueDepth), (0, 1, 0))
        self.clock.advance(1000)
        self.assertEqual(len(server.requests), 4)

    def test_backoffCapped(self) -> None:
        """
        The wait between tries never exceeds L{MAX_BACKOFF}.
        """
        service, server, _ = self.makeService("500", retries=10, retryDelay=30.0)
        service.neighbor("10.0.0.1")
        self.clock.advance(30)
        self.clock.advance(59.9)
        self.assertEqual(len(server.requests), 2)
        self.clock.advance(0.1)
        self.assertEqual(len(server.requests), 3)
        self.assertEqual(MAX_BACKOFF, 60.0)

    def test_retryThenSuccess(self) -> None:
        """
        An event that fails and then gets through counts as sent only.
        """
        service, server, _ = self.makeService("ok")
        server.modes = ["500", "500"]
        service.ping()
        self.clock.advance(1)
        self.clock.advance(2)
        self.assertEqual(len(server.requests), 3)
        self.assertEqual((service.sent, service.failed, service.queueDepth), (1, 0, 0))

    def test_timeoutRetried(self) -> None:
        """
        An event POST that gets no answer within C{timeout} is cut and
        tried again after the backoff.
        """
        service, server, stub = self.makeService("never", timeout=5.0, retries=1)
        service.ping()
        self.clock.advance(5.0)
        stub.flush()
        self.assertEqual(len(server.requests[0].lost), 1)
        self.clock.advance(1.0)
        self.assertEqual(len(server.requests), 2)
        self.clock.advance(5.0)
        self.assertEqual((service.failed, service.queueDepth), (1, 0))

    def test_clientErrorNotRetried(self) -> None:
        """
        A 4xx other than 408, 425 and 429 (say, a wrong secret's 404) is
        given up at once.
        """
        service, server, _ = self.makeService("404", retries=3)
        service.ping()
        self.clock.advance(100)
        self.assertEqual(len(server.requests), 1)
        self.assertEqual(service.failed, 1)

    def test_tooManyRequestsRetried(self) -> None:
        """
        A 429 is tried again.
        """
        service, server, _ = self.makeService("ok")
        server.render_POST = self._answerOnce(server, 429)  # type: ignore[method-assign]
        service.ping()
        self.clock.advance(1)
        self.assertEqual(service.sent, 1)

    def _answerOnce(self, server: ControlServer, status: int) -> Any:
        original = ControlServer.render_POST
        answered: list[int] = []

        def render(request: Any) -> Any:
            if not answered:
                answered.append(status)
                server.requests.append(Recorded(request, request.content.read()))
                request.setResponseCode(status)
                return b""
            return original(server, request)

        return render

    def test_eventsFilter(self) -> None:
        """
        With C{events} given, only those actions are sent; the others are
        neither sent nor counted, and the gate still works.
        """
        service, server, _ = self.makeService(
            events=["connection-stop", "access-request"], accessRequest=self.gate()
        )
        service.startService()
        cid = service.newConnectionID()
        service.neighbor("10.0.0.1")
        service.connectionStarted(cid, "s")
        service.connectionInfo(cid, {"statistics": {}})
        self.clock.advance(10)
        service.accessRequest(cid, 1, "s")
        service.connectionStopped(cid, connectionStopInfo("s", 1, 0, 0))
        self.assertEqual(server.actions(), ["access-request", "connection-stop"])
        self.assertEqual(service.dropped, 0)
        self.assertEqual(service.liveConnections, [])

    def test_eventsFilterUnknown(self) -> None:
        """
        An unknown action in C{events} is refused, naming it.
        """
        error = self.assertRaises(ValueError, self.makeService, events=["ping", "pong"])
        self.assertIn("'pong'", str(error))

    def test_stopFlushes(self) -> None:
        """
        Stopping waits for queued events to be sent, then fires; events
        after that are dropped and counted.
        """
        service, server, stub = self.makeService("never", maxConcurrent=1)
        service.startService()
        service.neighbor("10.0.0.1")
        service.neighbor("10.0.0.2")
        d = service.stopService()
        self.assertNoResult(d)
        server.requests[0].answer(200, b"{}")
        stub.flush()
        self.assertNoResult(d)
        server.requests[1].answer(200, b"{}")
        stub.flush()
        self.successResultOf(d)
        self.assertEqual(service.sent, 2)
        service.neighbor("10.0.0.3")
        self.assertEqual((service.dropped, len(server.requests)), (1, 2))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopGivesUp(self) -> None:
        """
        A webhook that never answers holds shutdown for C{flushTimeout} at
        most; what is left is dropped and counted, and its requests cut.
        """
        service, server, stub = self.makeService(
            "never", maxConcurrent=2, flushTimeout=3.0, timeout=10.0
        )
        for i in range(5):
            service.neighbor(f"10.0.0.{i}")
        d = service.stopService()
        self.clock.advance(2.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual(
            (service.dropped, service.failed, service.queueDepth), (5, 0, 0)
        )
        stub.flush()
        self.assertEqual([len(r.lost) for r in server.requests], [1, 1])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopSendsRetriesNow(self) -> None:
        """
        Events waiting for a retry are tried at once on stop (and not
        again after that).
        """
        service, server, _ = self.makeService("500", retries=5, retryDelay=30.0)
        service.ping()
        self.assertEqual(len(server.requests), 1)
        d = service.stopService()
        self.assertEqual(len(server.requests), 2)
        self.successResultOf(d)
        self.assertEqual(service.failed, 1)

    def test_newStatistics(self) -> None:
        """
        C{newStatistics} gives a collector with the configured byte limit
        when the feature is on, and L{None} when it is off.
        """
        off, _, _ = self.makeService()
        self.assertIsNone(off.newStatistics())
        on, _, _ = self.makeService(statistics=Statistics(enabled=True, max_bytes=4))
        stats = on.newStatistics()
        assert stats is not None
        stats.left(b"abcdefgh")
        self.assertEqual(stats.report()["entropy"]["left"]["bytes_accounted"], 4)


class SettingsTests(SynchronousTestCase):
    def test_gateSettings(self) -> None:
        """
        The gate's defaults are smithproxy's (off, 5 s, accept); other
        C{on_error} values and non-positive timeouts are refused.
        """
        self.assertEqual(Gate(), Gate(False, 5.0, "accept"))
        self.assertRaises(ValueError, Gate, True, 5.0, "maybe")
        self.assertRaises(ValueError, Gate, True, 0)

    def test_serviceSettings(self) -> None:
        """
        Settings out of range are refused; the message names the setting
        and never shows the URL's path.
        """
        clock = Clock()
        stub = StubTreq(ControlServer())
        for kwargs in (
            {"timeout": 0},
            {"pingInterval": -1},
            {"queueSize": 0},
            {"retries": -1},
            {"maxConcurrent": 0},
        ):
            error = self.assertRaises(
                ValueError, WebhookService, URL, clock=clock, treqClient=stub, **kwargs
            )
            self.assertNotIn(SECRET, str(error))
        for bad in (
            f"ftp://h/{SECRET}",
            f"http:///{SECRET}",
            f"http://h:99999/{SECRET}",
        ):
            error = self.assertRaises(
                ValueError, WebhookService, bad, clock=clock, treqClient=stub
            )
            self.assertNotIn(SECRET, str(error))

    def test_needsClientOrReactor(self) -> None:
        """
        Without a treq client, a reactor is needed to build one.
        """
        self.assertRaises(ValueError, WebhookService, URL, clock=Clock())


class RedactionTests(ServiceMixin, SynchronousTestCase):
    def test_redactURL(self) -> None:
        """
        Only C{scheme://host:port} is shown, with the default port filled
        in, IPv6 bracketed, credentials, path and query hidden.
        """
        self.assertEqual(redactURL(URL), "http://hook.example:5000/…")
        self.assertEqual(
            redactURL("https://h.example/webhook/x?k=v"), "https://h.example:443/…"
        )
        self.assertEqual(
            redactURL("http://user:pw@[::1]:8080/a"), "http://[::1]:8080/…"
        )
        self.assertEqual(redactURL("http://h.example"), "http://h.example:80/")
        self.assertEqual(
            redactURL("http://h.example/?token=x"), "http://h.example:80/…"
        )
        self.assertEqual(redactURL("http://h:bad/x"), "<unparseable URL>")

    def test_noSecretInLogs(self) -> None:
        """
        Through failures, timeouts, retries, drops, gate decisions and a
        shutdown that gives up, no log event mentions the URL's path, even
        when an error's own message contains the URL.
        """
        with capturedLogs() as events:
            service, server, stub = self.makeService(
                "500", queueSize=3, retries=1, accessRequest=self.gate()
            )
            service.startService()
            for i in range(5):
                service.neighbor(f"10.0.0.{i}")
            self.clock.advance(10)
            server.mode = "never"
            self.clock.advance(10)
            server.mode = "ok"
            service.ping()
            for mode in ("reject", "garbage", "never"):
                server.mode = mode
                service.accessRequest("id", 1, "s")
            self.clock.advance(5)
            server.mode = "never"
            service.ping()
            self.successResultOf(self._stopAfter(service, 10))
            failing = WebhookService(
                URL,
                clock=self.clock,
                treqClient=FailingClient([ValueError(f"cannot reach {URL}")] * 2),
                retries=0,
                accessRequest=self.gate(),
            )
            failing.ping()
            result = self.successResultOf(failing.accessRequest("id", 1, "s"))
        self.assertNotIn(SECRET, result.reason)
        self.assertIn("http://hook.example:5000/…", result.reason)
        self.assertGreater(len(events), 5)
        for event in events:
            text = formatEvent(event) + repr(event)
            self.assertNotIn(SECRET, text)
        texts = [formatEvent(e) for e in events]
        self.assertTrue(
            any("http://hook.example:5000/…" in t and "failing" in t for t in texts)
        )
        self.assertTrue(any("queue full" in t for t in texts))

    def _stopAfter(self, service: WebhookService, seconds: float) -> Deferred[None]:
        d = service.stopService()
        self.clock.advance(seconds)
        return d


class _QuietSite(Site):
    """
    A site that writes no access log (its lines would show the path).
    """

    def log(self, request: Any) -> None:
        pass


class RealServerTests(TestCase):
    """
    Against a real twisted.web server on 127.0.0.1, with the real reactor
    and the client built by the service itself.
    """

    def listen(self, server: ControlServer, tls: Any = None) -> int:
        site = _QuietSite(server)
        if tls is None:
            port = globalReactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
        else:
            port = globalReactor.listenSSL(0, site, tls, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return port.getHost().port  # type: ignore[attr-defined,no-any-return]

    def service(self, url: str, **kwargs: Any) -> WebhookService:
        service = WebhookService(
            url, clock=globalReactor, reactor=globalReactor, **kwargs
        )
        self.addCleanup(service.stopService)
        return service

    async def test_realServer(self) -> None:
        """
        Events and a gate call reach a real server on loopback over one
        persistent connection; no log line (ours or Twisted's) shows the
        URL's path, and the pool logs no line per connection.
        """
        server = ControlServer("ok")
        port = self.listen(server)
        url = f"http://127.0.0.1:{port}/webhook/{SECRET}"
        with capturedLogs() as events:
            service = self.service(
                url, accessRequest=Gate(enabled=True), maxConcurrent=1
            )
            cid = service.newConnectionID()
            service.neighbor("10.0.0.1")
            service.connectionStarted(cid, "s")
            server.mode = "reject"
            result = await service.accessRequest(cid, 1, "s")
            server.mode = "ok"
            await queueEmptied(service)
            service.connectionStopped(cid, connectionStopInfo("s", 1, 2, 3))
            await service.stopService()
        self.assertEqual(result.reason, "rejected by webhook")
        self.assertEqual(
            sorted(server.actions()),
            sorted(
                ["neighbor", "connection-start", "access-request", "connection-stop"]
            ),
        )
        self.assertEqual((service.sent, service.failed, service.dropped), (4, 0, 0))
        ports = {
            r.request.getClientAddress().port
            for r in server.requests
            if r.json["action"] != "access-request"
        }
        # Three events on fresh connections would use three ports; the gate
        # call may borrow the pooled connection meanwhile, so allow two.
        self.assertLessEqual(
            len(ports), 2, "events should reuse persistent connections"
        )
        for event in events:
            self.assertNotIn(SECRET, formatEvent(event) + repr(event))
        self.assertFalse(
            [e for e in events if "HTTP11ClientFactory" in formatEvent(e)],
            "the pool's per-connection factory lines should be silenced",
        )

    async def test_refusedConnection(self) -> None:
        """
        A webhook port with nothing listening fails the gate by
        C{on_error} and the event after its tries, without delaying
        anything else.
        """
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        service = self.service(
            f"http://127.0.0.1:{port}/webhook/{SECRET}",
            retries=1,
            retryDelay=0.01,
            accessRequest=Gate(enabled=True, on_error="reject"),
        )
        service.ping()
        result = await service.accessRequest("id", 1, "s")
        self.assertFalse(result.accepted)
        self.assertIn("webhook request failed", result.reason)
        await queueEmptied(service)
        self.assertEqual((service.sent, service.failed), (0, 2))

    async def test_tlsVerify(self) -> None:
        """
        With C{tls_verify} on, a self-signed certificate is refused unless
        it is the trust root given; with it off, it is accepted.
        """
        key, cert = selfSigned("localhost")
        server = ControlServer("accept")
        port = self.listen(server, ssl.PrivateCertificate.loadPEM(key + cert).options())
        url = f"https://localhost:{port}/webhook/{SECRET}"
        gate = Gate(enabled=True, on_error="reject")

        verified = self.service(url, accessRequest=gate)
        result = await verified.accessRequest("id", 1, "s")
        self.assertFalse(result.accepted)
        self.assertIn("webhook request failed", result.reason)

        trusting = self.service(
            url,
            accessRequest=gate,
            trustRoot=ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(cert)]),
        )
        self.assertEqual(
            (await trusting.accessRequest("id", 1, "s")).reason, "accepted by webhook"
        )

        unverified = self.service(url, accessRequest=gate, tlsVerify=False)
        self.assertEqual(
            (await unverified.accessRequest("id", 1, "s")).reason, "accepted by webhook"
        )
        self.assertEqual(len(server.requests), 2)

    async def test_quietOverTLS(self) -> None:
        """
        Over C{https://} too, the pool's per-connection factory logs no
        "Starting factory" or "Stopping factory" line.
        """
        key, cert = selfSigned("localhost")
        port = self.listen(
            ControlServer("accept"),
            ssl.PrivateCertificate.loadPEM(key + cert).options(),
        )
        with capturedLogs() as events:
            service = self.service(
                f"https://localhost:{port}/webhook/{SECRET}",
                accessRequest=Gate(enabled=True, on_error="reject"),
                tlsVerify=False,
            )
            result = await service.accessRequest("id", 1, "s")
            await service.stopService()
        self.assertEqual(result.reason, "accepted by webhook")
        self.assertFalse([e for e in events if "factory" in formatEvent(e).lower()])


async def queueEmptied(service: Any, within: float = 10.0) -> None:
    """
    Wait until C{service}'s event queue is empty, checking every 10 ms, for
    at most C{within} seconds (then fail the test): the queue has no event
    to wait on, and a poll with no bound would hang a broken run.
    """
    from twisted.internet.task import deferLater

    for _ in range(int(within / 0.01)):
        if not service.queueDepth:
            return
        await deferLater(globalReactor, 0.01)  # type: ignore[arg-type]
    raise AssertionError(
        f"the webhook queue still held {service.queueDepth} events after {within} s"
    )


def selfSigned(name: str) -> tuple[bytes, bytes]:
    """
    A fresh self-signed certificate for C{name} (and 127.0.0.1): its key
    and certificate as PEM.
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
        certificate.public_bytes(serialization.Encoding.PEM),
    )


class SerializationTests(ServiceMixin, SynchronousTestCase):
    def test_unserializableValue(self) -> None:
        """
        A value JSON cannot hold is sent as its text instead of raising
        into the caller.
        """
        service, server, _ = self.makeService()

        class Rule:
            def __str__(self) -> str:
                return "rule-7"

        service.connectionStopped("id", connectionStopInfo("s", Rule(), 1, 2))
        self.assertEqual(server.requests[0].json["details"]["info"]["policy"], "rule-7")
