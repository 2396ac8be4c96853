"""
The control webhook's C{connection-stop} as smithproxy fills it: byte counts
of what crossed the client's connection each way, heads included, and
C{tls.sni} for every TLS session.  In memory: the proxy on a memory reactor,
the webhook client on treq's StubTreq against a fake control server.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from proxy_app.channel import ProxyFactory
from proxy_app.config import Config, Limits
from proxy_app.observe import AccessLog
from proxy_app.tls import Origination
from proxy_app.upstream import Connector
from proxy_app.webhook import WebhookService

from .certs import Authority
from .helpers import FakeDestinationResolver, Harness, makeHarness, parseResponse
from .test_sniffer import clientHello
from .test_webhook import ControlServer

URL = "http://127.0.0.1:5000/webhook/SECRET"
GET = b"GET http://origin.example/a HTTP/1.1\r\nHost: origin.example\r\n\r\n"
CONNECT = b"CONNECT origin.example:443 HTTP/1.1\r\nHost: origin.example:443\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class _WebhookHarness:
    """
    A proxy with a webhook whose events a test reads back.
    """

    def setUpProxy(self, config: Config | None = None, answers: Any = None) -> Harness:
        self.server = ControlServer("ok")
        self.stub = StubTreq(self.server)
        h = makeHarness(answers, config)
        h.factory.webhook = WebhookService(
            URL, clock=h.reactor, treqClient=self.stub, hostid="proxy-1"
        )
        return h

    def stops(self) -> list[dict[str, Any]]:
        """
        The C{details.info} of every connection-stop sent so far.
        """
        self.stub.flush()
        return [
            r.json["details"]["info"]
            for r in self.server.requests
            if r.json["action"] == "connection-stop"
        ]

    def counts(self) -> list[tuple[int, int]]:
        return [(info["bytes_up"], info["bytes_down"]) for info in self.stops()]


class WireCountTests(_WebhookHarness, SynchronousTestCase):
    """
    C{bytes_up} is every byte read from the client for the session (heads
    as received, bodies as framed, a tunnel's bytes); C{bytes_down} every
    byte written to it.  The access log's counts stay the bodies'.
    """

    def test_getCountsHeads(self) -> None:
        """
        A GET's bytes_up is the length of the request head the client sent
        (not 0), and its bytes_down is every byte the client received; the
        access log still counts the bodies only.
        """
        h = self.setUpProxy()
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(OK)
        self.assertEqual(self.counts(), [(len(GET), len(h.client.value()))])
        self.assertGreater(len(h.client.value()), len(OK))
        line = h.access[-1]
        self.assertEqual((line["bytes_up"], line["bytes_down"]), (0, 5))

    @settings(max_examples=30, deadline=None)
    @given(st.lists(st.integers(min_value=1, max_value=len(GET)), max_size=8))
    def test_splitReads(self, cuts: list[int]) -> None:
        """
        However the request arrives in pieces, bytes_up is its length.
        """
        h = self.setUpProxy()
        start = 0
        for end in sorted(set(cuts)) + [len(GET)]:
            if end > start:
                h.send(GET[start:end])
                start = end
        up, _ = h.connectUpstream()
        up.dataReceived(OK)
        self.assertEqual(self.counts(), [(len(GET), len(h.client.value()))])

    def test_chunkedResponse(self) -> None:
        """
        A response relayed chunked counts the chunk framing the proxy wrote,
        last chunk included.
        """
        h = self.setUpProxy()
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        up.dataReceived(b"3\r\nabc\r\n")
        up.dataReceived(b"a\r\n0123456789\r\n0\r\n\r\n")
        received = h.client.value()
        self.assertTrue(received.endswith(b"0\r\n\r\n"))
        self.assertEqual(self.counts(), [(len(GET), len(received))])
        self.assertEqual(h.access[-1]["bytes_down"], 13)

    def test_chunkedRequestBody(self) -> None:
        """
        A chunked request body counts as it was received, framing included.
        """
        h = self.setUpProxy()
        head = (
            b"POST http://origin.example/in HTTP/1.1\r\nHost: origin.example\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        body = b"4\r\nwxyz\r\n0\r\n\r\n"
        h.send(head)
        up, _ = h.connectUpstream()
        h.send(body)
        up.dataReceived(OK)
        self.assertEqual(self.counts(), [(len(head + body), len(h.client.value()))])
        self.assertEqual(h.access[-1]["bytes_up"], 4)

    def test_proxyMadeError(self) -> None:
        """
        An error response the proxy made (here a response too large for the
        limit, after the connect) counts as written.
        """
        h = self.setUpProxy(config=Config(limits=Limits(max_response_body=3)))
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(OK)
        received = h.client.value()
        status, headers, _ = parseResponse(received)
        self.assertEqual(status, 502)
        self.assertIn(b"x-whsentry-reasoncode", headers)
        self.assertEqual(self.counts(), [(len(GET), len(received))])

    def test_keepAliveSessions(self) -> None:
        """
        Each request on a kept-alive connection counts only its own bytes,
        even after one that was refused before any connection-start.
        """
        h = self.setUpProxy(answers={"origin.example": ["203.0.113.10"]})
        refused = b"GET http://bad..name/ HTTP/1.1\r\nHost: bad..name\r\n\r\n"
        h.send(refused)
        status, _, _ = parseResponse(h.client.value())
        self.assertEqual(status, 400)
        self.assertEqual(self.stops(), [])
        h.client.clear()
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(OK)
        first = len(h.client.value())
        second = (
            b"GET http://origin.example/bb HTTP/1.1\r\nHost: origin.example\r\n\r\n"
        )
        h.send(second)
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(
            self.counts(),
            [(len(GET), first), (len(second), len(h.client.value()) - first)],
        )

    def test_tunnelCountsTheConnectExchange(self) -> None:
        """
        A tunnel's counts are the CONNECT head and the 200 the proxy wrote
        plus the relayed bytes; bytes sent in the same read as the CONNECT
        head are counted once.  The access log counts the relayed bytes.
        """
        h = self.setUpProxy()
        hello = clientHello(b"api.example.com")
        h.send(CONNECT + hello[:10])
        up, upTransport = h.connectUpstream()
        h.send(hello[10:])
        up.dataReceived(b"\x16\x03\x03server")
        h.protocol.connectionLost(None)
        self.assertEqual(upTransport.value(), hello)
        received = h.client.value()
        self.assertTrue(received.startswith(b"HTTP/1.1 200 Connection established"))
        self.assertEqual(self.counts(), [(len(CONNECT + hello), len(received))])
        line = h.access[-1]
        self.assertEqual((line["bytes_up"], line["bytes_down"]), (len(hello), 9))


class SNIPrecedenceTests(_WebhookHarness, SynchronousTestCase):
    """
    C{tls.sni} is the server name of the TLS session nearest the
    destination that has one: the one the proxy sent originating TLS, else
    the ClientHello's through a tunnel, else the one the client sent to a
    TLS listener.
    """

    def test_plainForwardNoSNI(self) -> None:
        """
        A plain-HTTP request over plain TCP involves no TLS: no C{tls}.
        """
        h = self.setUpProxy()
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(OK)
        (info,) = self.stops()
        self.assertNotIn("tls", info)

    def test_listenerSNIForPlainForward(self) -> None:
        """
        A plain-HTTP request that came over a TLS listener reports the
        name the client sent to the listener.
        """
        h = self.setUpProxy()
        h.protocol.serverName = "proxy.test"
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(OK)
        (info,) = self.stops()
        self.assertEqual(info["tls"], {"sni": "proxy.test"})

    def test_tunnelSNIBeforeListener(self) -> None:
        """
        A tunnel over a TLS listener reports its ClientHello's name, and
        the listener's only when the tunnel carries no name.
        """
        for hello, expected in (
            (clientHello(b"api.example.com"), "api.example.com"),
            (b"SSH-2.0-OpenSSH_9.6\r\n", "proxy.test"),
        ):
            h = self.setUpProxy()
            h.protocol.serverName = "proxy.test"
            h.send(CONNECT + hello)
            h.connectUpstream()
            h.protocol.connectionLost(None)
            (info,) = self.stops()
            self.assertEqual(info["tls"], {"sni": expected})

    def test_tunnelSNIReadWhenWebhookConfigured(self) -> None:
        """
        A tunnel's ClientHello is read whenever a webhook is configured,
        whatever the events sent (the sniffer is the webhook's alone), and
        when the ClientHello comes byte by byte.
        """
        h = self.setUpProxy()
        hello = clientHello(b"api.example.com")
        h.send(CONNECT)
        h.connectUpstream()
        for i in range(len(hello)):
            h.send(hello[i : i + 1])
        h.protocol.connectionLost(None)
        (info,) = self.stops()
        self.assertEqual(info["tls"], {"sni": "api.example.com"})
        self.assertEqual(info["l7"]["app"], "tls")


class _SNIRecorder(Resource):
    """
    A TLS origin that answers with the SNI its client sent.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes | None] = []

    def render_GET(self, request):  # type: ignore[no-untyped-def]
        handle = request.channel.transport.getHandle()
        # A TLS transport's handle is its OpenSSL connection, a TCP one's its
        # socket.
        name = getattr(handle, "get_servername", lambda: None)()
        self.seen.append(name)
        return name or b"-"


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(self.data)


class SNILoopbackTests(_WebhookHarness, TestCase):
    """
    On loopback, with real TLS: what C{tls.sni} reports is the name that
    crossed the wire.
    """

    def setUp(self) -> None:
        self.ca = Authority()
        certPEM, keyPEM, _ = self.ca.issue("origin.test", ("origin.test",))
        origin = ssl.PrivateCertificate.loadPEM(certPEM + keyPEM)
        self.recorder = _SNIRecorder()
        listening = reactor.listenSSL(
            0, Site(self.recorder), origin.options(), interface="127.0.0.1"
        )
        self.addCleanup(listening.stopListening)
        self.originPort = listening.getHost().port
        plain = reactor.listenTCP(0, Site(self.recorder), interface="127.0.0.1")
        self.addCleanup(plain.stopListening)
        self.plainPort = plain.getHost().port

    def proxyFactory(self) -> ProxyFactory:
        self.server = ControlServer("ok")
        self.stub = StubTreq(self.server)
        config = Config()
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(self.ca.pem)])
        factory = ProxyFactory(
            config,
            FakeDestinationResolver({"origin.test": ["127.0.0.1"]}),
            reactor,
            Connector(reactor, 5),
            AccessLog(None),
            origination=Origination(trust),
            webhook=WebhookService(
                URL, clock=reactor, treqClient=self.stub, hostid="proxy-1"
            ),
        )
        self.addCleanup(factory.pool.closeIdle)
        return factory

    @inlineCallbacks
    def request(self, endpoint, request):  # type: ignore[no-untyped-def]
        client = _Collect()
        yield connectProtocol(endpoint, client)
        client.transport.write(request)
        received = yield client.done
        return received

    @inlineCallbacks
    def test_originationSNI(self):  # type: ignore[no-untyped-def]
        """
        A forwarded request with TLS origination reports the SNI the origin
        received.
        """
        factory = self.proxyFactory()
        proxy = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(proxy.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.getHost().port)
        received = yield self.request(
            endpoint,
            b"GET http://origin.test:%d/ HTTP/1.1\r\nHost: origin.test\r\n"
            b"X-WhSentry-TLS: 1\r\nConnection: close\r\n\r\n" % self.originPort,
        )
        self.assertTrue(received.endswith(b"origin.test"), received)
        self.assertEqual(self.recorder.seen, [b"origin.test"])
        (info,) = self.stops()
        self.assertEqual(info["tls"], {"sni": "origin.test"})
        self.assertTrue(info["session"].startswith("tcp_127.0.0.1:"))
        self.assertIn("+ssli_127.0.0.1:", info["session"])

    @inlineCallbacks
    def test_listenerSNI(self):  # type: ignore[no-untyped-def]
        """
        A plain-HTTP request over a TLS listener reports the SNI the client
        sent to the listener, in lower case.
        """
        certPEM, keyPEM, _ = self.ca.issue("proxy.test", ("proxy.test",))
        listenerCert = ssl.PrivateCertificate.loadPEM(certPEM + keyPEM)
        factory = self.proxyFactory()
        proxy = reactor.listenSSL(
            0, factory, listenerCert.options(), interface="127.0.0.1"
        )
        self.addCleanup(proxy.stopListening)
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(self.ca.pem)])
        endpoint = wrapClientTLS(
            ssl.optionsForClientTLS("Proxy.Test", trustRoot=trust),
            TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.getHost().port),
        )
        received = yield self.request(
            endpoint,
            b"GET http://origin.test:%d/ HTTP/1.1\r\nHost: origin.test\r\n"
            b"Connection: close\r\n\r\n" % self.plainPort,
        )
        self.assertTrue(received.endswith(b"-"), received)
        (info,) = self.stops()
        self.assertEqual(info["tls"], {"sni": "proxy.test"})
        self.assertTrue(info["session"].startswith("ssli_127.0.0.1:"))
