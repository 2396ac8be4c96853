"""
Rotation without restart: SIGHUP (L{ProxyService.reload}) and the file
watcher reload a TLS listener's certificate, key, client CA and CRL, and
TLS origination's trust root and client certificates; a part that fails
to load keeps its old state, logs one line and is counted.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.logger import capturedLogs
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site
from zope.interface import implementer

from proxy_app.access import AccessControl
from proxy_app.config import TLS, ClientCertAlias
from proxy_app.observe import Metrics
from proxy_app.reload import Reloader
from proxy_app.tap import Options, ProxyService, buildOrigination, makeService
from proxy_app.watch import FileWatcher

from .certs import Authority
from .helpers import PluggableMemoryReactor
from .test_tls import WhoAmI


@implementer(IHandshakeListener)
class _Client(Protocol):
    """
    A TLS client that records the server certificate it was shown, and can
    then send one request on the same connection.
    """

    def __init__(self) -> None:
        self.handshake: Deferred = Deferred()
        self.done: Deferred = Deferred()
        self.data = b""

    def handshakeCompleted(self) -> None:
        self.handshake.callback(self.transport.getPeerCertificate())

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        if not self.handshake.called:
            self.handshake.errback(reason)
        self.done.callback(self.data)


class ListenerRotationTests(TestCase):
    """
    A real mtls listener on loopback whose files are replaced and reloaded
    as SIGHUP does.
    """

    def setUp(self) -> None:
        self.dir = FilePath(self.mktemp())
        self.dir.makedirs()
        self.serverCA = Authority("server CA")
        self.clientCA = Authority("client CA")
        self.serial = self.newServerCertificate()
        self.write("clients.pem", self.clientCA.pem)
        self.client = self.clientCA.issue("billing", client=True)
        self.write("clients.crl", self.clientCA.crl())
        origin = reactor.listenTCP(0, Site(WhoAmI()), interface="127.0.0.2")
        self.addCleanup(origin.stopListening)
        self.originPort = origin.getHost().port

        from .test_integration import freePort

        self.port = freePort("127.0.0.1")
        options = Options(environ={})
        options.parseOptions(
            [
                "--listen",
                f"mtls:{self.port}:interface=127.0.0.1"
                f":cert={self.path('server.pem')}:key={self.path('server.key')}"
                f":client_ca={self.path('clients.pem')}"
                f":crl={self.path('clients.crl')}",
                "--allow-range",
                "127.0.0.2/32",
                "--access-log",
                "none",
                "--metrics",
                "none",
            ]
        )
        self.service = makeService(options)
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)
        [self.proxy] = [c for c in self.service if isinstance(c, ProxyService)]

    def path(self, name: str) -> str:
        return self.dir.child(name).path

    def write(self, name: str, data: bytes) -> None:
        # Replaced by renaming a whole file over it, as the kubelet does.
        temporary = self.dir.child(name + ".new")
        temporary.setContent(data)
        temporary.moveTo(self.dir.child(name))

    def newServerCertificate(self) -> int:
        cert, key, serial = self.serverCA.issue(
            "proxy.test", ("proxy.test", "127.0.0.1")
        )
        self.write("server.pem", cert)
        self.write("server.key", key)
        return serial

    def connect(self, client: tuple[bytes, bytes, int] | None = None) -> Deferred:
        """
        Connect and complete the handshake.

        @return: a L{Deferred} firing with the protocol once the server
            certificate has been seen.
        """
        client = client or self.client
        options = ssl.optionsForClientTLS(
            "proxy.test",
            trustRoot=ssl.Certificate.loadPEM(self.serverCA.pem),
            clientCertificate=ssl.PrivateCertificate.loadPEM(client[0] + client[1]),
        )
        protocol = _Client()
        d = connectProtocol(
            SSL4ClientEndpoint(reactor, "127.0.0.1", self.port, options), protocol
        )
        return d.addCallback(lambda p: p.handshake).addCallback(lambda _: protocol)

    def get(self, protocol: _Client) -> Deferred:
        protocol.transport.write(
            b"GET http://127.0.0.2:%d/who HTTP/1.1\r\nHost: x\r\nConnection: "
            b"close\r\n\r\n" % self.originPort
        )
        return protocol.done

    def serverSerial(self, protocol: _Client) -> int:
        return protocol.transport.getPeerCertificate().get_serial_number()  # type: ignore[no-any-return]

    def failures(self, what: str) -> Any:
        return self.proxy.factory.metrics.registry.get_sample_value(
            "egressproxy_reload_failures_total", {"what": what}
        )

    @inlineCallbacks
    def test_newCertificateForNewHandshakes(self):  # type: ignore[no-untyped-def]
        """
        After the certificate and key are replaced and reloaded, a new
        handshake sees the new certificate; a connection made before keeps
        the old one and is still served.
        """
        before = yield self.connect()
        self.assertEqual(self.serverSerial(before), self.serial)
        newSerial = self.newServerCertificate()
        self.assertTrue(self.proxy.reload())
        after = yield self.connect()
        self.assertEqual(self.serverSerial(after), newSerial)
        after.transport.loseConnection()
        data = yield self.get(before)
        self.assertIn(b"200 OK", data)
        self.assertEqual(self.failures("listener"), None)

    @inlineCallbacks
    def test_badFileKeepsOldState(self):  # type: ignore[no-untyped-def]
        """
        A key that does not match the certificate keeps the old certificate
        in force, logs one line naming the listener and the file, and is
        counted; a good pair after it is loaded.
        """
        cert, _, _ = self.serverCA.issue("proxy.test", ("proxy.test",))
        self.write("server.pem", cert)
        with capturedLogs() as events:
            self.assertFalse(self.proxy.reload())
        errors = [e for e in events if e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertIn("not reloaded", errors[0]["log_format"])
        self.assertIn("server.key", errors[0]["error"])
        self.assertEqual(self.failures("listener"), 1)
        protocol = yield self.connect()
        self.assertEqual(self.serverSerial(protocol), self.serial)
        protocol.transport.loseConnection()
        newSerial = self.newServerCertificate()
        self.assertTrue(self.proxy.reload())
        protocol = yield self.connect()
        self.assertEqual(self.serverSerial(protocol), newSerial)
        protocol.transport.loseConnection()

    @inlineCallbacks
    def test_clientCARotated(self):  # type: ignore[no-untyped-def]
        """
        A new client CA, reloaded, admits its certificates and no longer
        the old CA's.
        """
        newCA = Authority("client CA 2")
        self.write("clients.pem", newCA.pem)
        self.write("clients.crl", newCA.crl())
        self.assertTrue(self.proxy.reload())
        refused = False
        try:
            protocol = yield self.connect()
            data = yield self.get(protocol)
            refused = b"HTTP/1.1" not in data
        except Exception:
            refused = True
        self.assertTrue(refused)
        protocol = yield self.connect(newCA.issue("billing", client=True))
        data = yield self.get(protocol)
        self.assertIn(b"200 OK", data)

    @inlineCallbacks
    def test_crlReloaded(self):  # type: ignore[no-untyped-def]
        """
        A client certificate revoked in a reloaded CRL is refused from the
        next handshake on.
        """
        protocol = yield self.connect()
        data = yield self.get(protocol)
        self.assertIn(b"200 OK", data)
        self.clientCA.revoked.append(self.client[2])
        self.write("clients.crl", self.clientCA.crl())
        self.assertTrue(self.proxy.reload())
        refused = False
        try:
            protocol = yield self.connect()
            data = yield self.get(protocol)
            refused = b"HTTP/1.1" not in data
        except Exception:
            refused = True
        self.assertTrue(refused)


class OriginationReloadTests(SynchronousTestCase):
    """
    TLS origination's client certificates, reloaded through a L{Reloader}.
    """

    def setUp(self) -> None:
        self.dir = FilePath(self.mktemp())
        self.dir.makedirs()
        self.ca = Authority("origin client CA")
        self.issue("tenant")
        self.settings = TLS(
            client_certs=(
                ClientCertAlias(
                    "tenant", self.path("tenant.pem"), self.path("tenant.key")
                ),
            )
        )
        self.origination = buildOrigination(self.settings)
        self.metrics = Metrics(process=False)
        self.reloader = Reloader(AccessControl(), self.metrics)
        self.reloader.add(
            "origination",
            "TLS origination",
            lambda: [self.path("tenant.pem"), self.path("tenant.key")],
            lambda: self.origination.replace(buildOrigination(self.settings)),
        )

    def path(self, name: str) -> str:
        return self.dir.child(name).path

    def issue(self, alias: str) -> int:
        cert, key, serial = self.ca.issue(alias, client=True)
        self.dir.child(alias + ".pem").setContent(cert)
        self.dir.child(alias + ".key").setContent(key)
        return serial

    def serial(self) -> int:
        identity = self.origination.identity("tenant")
        assert identity is not None
        return identity.certificate.original.get_serial_number()  # type: ignore[no-any-return]

    def test_swapped(self) -> None:
        """
        After a reload the alias presents the new certificate, and the
        connection creators made with the old one are dropped.
        """
        identity = self.origination.identity("tenant")
        creator = self.origination.creator("origin.example", identity)
        serial = self.issue("tenant")
        self.assertTrue(self.reloader.reload())
        self.assertEqual(self.serial(), serial)
        self.assertIsNot(
            self.origination.creator(
                "origin.example", self.origination.identity("tenant")
            ),
            creator,
        )

    def test_failureKeepsOld(self) -> None:
        """
        A key that does not belong to the certificate keeps the old
        identity, and counts one origination failure.
        """
        before = self.serial()
        self.dir.child("tenant.key").setContent(self.ca.issue("other", client=True)[1])
        self.assertFalse(self.reloader.reload())
        self.assertEqual(self.serial(), before)
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "egressproxy_reload_failures_total", {"what": "origination"}
            ),
            1,
        )


class WiringTests(SynchronousTestCase):
    """
    What L{proxy_app.tap} hands the watcher and SIGHUP.
    """

    def test_watcherWatchesTLSFiles(self) -> None:
        """
        With acl.watch_interval, the watcher watches the ACL, the TLS
        listener's files and origination's client certificates, and reloads
        through the same L{Reloader} as SIGHUP.
        """
        from proxy_app.config import load
        from proxy_app.tap import buildProxy

        directory = FilePath(self.mktemp())
        directory.makedirs()
        ca = Authority()
        cert, key, _ = ca.issue("proxy.test", ("proxy.test",))
        for name, data in [
            ("s.pem", cert),
            ("s.key", key),
            ("ca.pem", ca.pem),
            ("c.pem", cert),
            ("c.key", key),
            ("acl.yaml", b"version: v1\nservices: []\n"),
        ]:
            directory.child(name).setContent(data)
        p = lambda name: directory.child(name).path  # noqa: E731
        config = load(
            {
                "listen": [
                    f"mtls:0:interface=127.0.0.1:cert={p('s.pem')}:key={p('s.key')}"
                    f":client_ca={p('ca.pem')}"
                ],
                "acl": p("acl.yaml"),
                "watch-interval": "5",
                "client-cert": p("c.pem"),
                "client-key": p("c.key"),
                "metrics": "none",
            },
            environ={},
        )

        top = buildProxy(config, PluggableMemoryReactor())
        [watcher] = [c for c in top if isinstance(c, FileWatcher)]
        [proxy] = [c for c in top if isinstance(c, ProxyService)]
        self.assertEqual(
            watcher.paths,
            tuple(
                p(n) for n in ("acl.yaml", "s.pem", "s.key", "ca.pem", "c.pem", "c.key")
            ),
        )
        assert proxy.reloader is not None
        self.assertEqual(watcher._onChange, proxy.reloader.reload)
