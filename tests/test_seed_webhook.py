"""
smithproxy's own example webhook receiver, the Flask app of its webhook
HOWTO (L{tests.seed_webhook_app}, kept exactly as published), run as a user
runs it (C{python -m flask --app … run}) in a subprocess on loopback, with
the proxy as twistd builds it sending it events and asking its gate.  The
app's printed output must show what smithproxy's would.

Every wait is on a condition (the app's output, a connection's end) under a
deadline on the reactor; nothing sleeps.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from proxy_app.tap import Options, makeService

from .certs import Authority

# How long any one condition may take before the test fails.
DEADLINE = 30.0
ROOT = FilePath(__file__).parent().parent()
_BANNER = "Received payload:\n"


class _Origin(Resource):
    isLeaf = True

    def render_GET(self, request):  # type: ignore[no-untyped-def]
        return b"hello from the origin"


class SeedApp(ProcessProtocol):
    """
    The Flask app in its subprocess: its output, and the payloads it
    printed (each C{Received payload:} then C{pprint}'s dict).

    @ivar port: the port the app listens on, once it said so.
    """

    def __init__(self) -> None:
        self.stdout = ""
        self.stderr = ""
        self.port: int | None = None
        self.ended: Deferred = Deferred()
        self._waiters: list[tuple[Callable[[], Any], Deferred]] = []

    def outReceived(self, data: bytes) -> None:
        self.stdout += data.decode("utf-8", "replace")
        self._check()

    def errReceived(self, data: bytes) -> None:
        self.stderr += data.decode("utf-8", "replace")
        if self.port is None:
            found = re.search(r"Running on http://127\.0\.0\.1:(\d+)", self.stderr)
            if found:
                self.port = int(found.group(1))
        self._check()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        for _, d in self._waiters:
            d.errback(
                AssertionError(f"the Flask app exited:\n{self.stderr}\n{self.stdout}")
            )
        self._waiters = []

    def payloads(self) -> list[dict[str, Any]]:
        """
        Every payload the app printed whole so far.
        """
        found = []
        for text in self.stdout.split(_BANNER)[1:]:
            try:
                found.append(ast.literal_eval(text.strip()))
            except (SyntaxError, ValueError):
                # Not all of it printed yet.
                pass
        return found

    def waitFor(self, condition: Callable[[], Any], what: str) -> Deferred:
        """
        A L{Deferred} firing with C{condition()}'s result once it is true
        (checked as output arrives), or failing after L{DEADLINE}.
        """
        d: Deferred = Deferred()
        result = condition()
        if result:
            d.callback(result)
            return d
        self._waiters.append((condition, d))

        def timedOut(failure: Any) -> Any:
            failure.trap(Exception)
            raise AssertionError(
                f"not seen within {DEADLINE} s: {what}\nstdout:\n{self.stdout}"
                f"\nstderr:\n{self.stderr}"
            )

        d.addTimeout(DEADLINE, reactor)
        d.addErrback(timedOut)
        return d

    def _check(self) -> None:
        for condition, d in list(self._waiters):
            result = condition()
            if result:
                self._waiters.remove((condition, d))
                d.callback(result)


class _Client(Protocol):
    """
    A client that sends C{request}, or with C{tls} first tunnels: a
    C{CONNECT}, then TLS over the tunnel, then C{request} inside it.
    """

    def __init__(self, request: bytes, connect: bytes = b"", tls: Any = None) -> None:
        self.request = request
        self.connect = connect
        self.tls = tls
        # Waiting for the CONNECT's answer (only when there is a CONNECT).
        self.connecting = bool(connect)
        self.data = b""
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.connect or self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.connecting or b"\r\n\r\n" not in self.data:
            return
        self.connecting = False
        if not self.data.startswith(b"HTTP/1.1 200 "):
            self.transport.loseConnection()
            return
        # Nothing follows the 200 until the client speaks TLS.
        self.data = b""
        self.transport.startTLS(self.tls)
        self.transport.write(self.request)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


class SeedWebhookTests(TestCase):
    """
    The seed's Flask app receives the proxy's events and answers its gate.
    """

    def setUp(self) -> Deferred:
        try:
            import flask  # noqa: F401
        except ImportError:
            raise SkipTest("Flask is not installed") from None
        self.ca = Authority()
        certPEM, keyPEM, _ = self.ca.issue("origin.test", ("origin.test",))
        origin = ssl.PrivateCertificate.loadPEM(certPEM + keyPEM)
        plain = reactor.listenTCP(0, Site(_Origin()), interface="127.0.0.1")
        self.addCleanup(plain.stopListening)
        self.plainPort = plain.getHost().port
        tls = reactor.listenSSL(
            0, Site(_Origin()), origin.options(), interface="127.0.0.1"
        )
        self.addCleanup(tls.stopListening)
        self.tlsPort = tls.getHost().port
        self.originTrust = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(self.ca.pem)]
        )
        return self.startApp()

    def startApp(self) -> Deferred:
        """
        Run the app as its HOWTO says, on a port of its choosing on
        127.0.0.1, with print's output unbuffered as on a terminal.
        """
        self.app = app = SeedApp()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("FLASK_APP", None)
        process = reactor.spawnProcess(
            app,
            sys.executable,
            [
                sys.executable,
                "-m",
                "flask",
                "--app",
                "tests.seed_webhook_app",
                "run",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                # One request at a time, so that one payload's printed
                # lines are not interleaved with another's.
                "--without-threads",
            ],
            env=env,
            path=ROOT.path,
        )

        def stop() -> Deferred:
            if not app.ended.called:
                process.signalProcess("TERM")
            return app.ended

        self.addCleanup(stop)
        return app.waitFor(lambda: app.port, "the app's 'Running on' line")

    def startProxy(self, *extra: str) -> int:
        """
        Start the proxy as twistd would, with the app as its webhook (the
        gate on) and loopback origins allowed; C{extra} are more
        command-line options (an intercepted-tunnel case adds its CA here).

        @return: the proxy's port.
        """
        from .test_integration import freePort

        port = freePort("127.0.0.1")
        options = Options(environ={})
        options.parseOptions(
            [
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--allow-range",
                "127.0.0.1/32",
                "--access-log",
                self.mktemp(),
                "--metrics",
                "none",
                "--webhook-url",
                f"http://127.0.0.1:{self.app.port}/webhook/KEY",
                "--webhook-access-request",
                "enabled=true,on_error=reject",
                "--hostid",
                "seed-test",
                *extra,
            ]
        )
        service = makeService(options)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        return port

    def request(self, port: int, request: bytes) -> Deferred:
        """
        Send one forwarded request through the proxy; fires with what the
        client received.
        """
        client = _Client(request)
        connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        return client.done

    def tunnelTLS(
        self,
        port: int,
        target: str,
        serverName: str,
        trustRoot: Any,
        request: bytes,
    ) -> Deferred:
        """
        The hook for tunnel cases: C{CONNECT target} through the proxy on
        C{port}, then TLS inside the tunnel to C{serverName} trusting
        C{trustRoot}, then C{request} over it.  A passthrough tunnel trusts
        the origin's CA; an intercepted one trusts the proxy's issuing CA
        (L{test_interceptedTunnel}).

        @return: a L{Deferred} firing with what came back over TLS.
        """
        client = _Client(
            request,
            connect=(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()),
            tls=ssl.optionsForClientTLS(serverName, trustRoot=trustRoot),
        )
        connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        return client.done.addTimeout(DEADLINE, reactor)

    def stopFor(self, connectionID: str) -> Callable[[], Any]:
        """
        A condition: the app printed the connection-stop of
        C{connectionID}.
        """

        def condition() -> Any:
            for payload in self.app.payloads():
                if (
                    payload.get("action") == "connection-stop"
                    and payload.get("id") == connectionID
                ):
                    return payload
            return None

        return condition

    def assertSessionEvents(self, connectionID: str) -> Deferred:
        """
        Wait until the app printed three events for C{connectionID}: the
        gate's access-request first (it is answered before anything else
        is sent), then connection-start and connection-stop, which are
        concurrent POSTs and may arrive in either order (docs/webhooks.md,
        "Ordering is not guaranteed").
        """

        def check(actions: list[str]) -> None:
            self.assertEqual(actions[0], "access-request", actions)
            self.assertEqual(
                sorted(actions[1:]), ["connection-start", "connection-stop"], actions
            )

        def threeEvents() -> list[str] | None:
            actions = self.actionsOf(connectionID)
            return actions if len(actions) >= 3 else None

        d = self.app.waitFor(threeEvents, f"three events of {connectionID}")
        d.addCallback(check)
        return d

    def actionsOf(self, connectionID: str) -> list[str]:
        """
        The actions the app printed for C{connectionID}, in order, but for
        C{connection-info}, which (as the HOWTO warns) may come before or
        after C{connection-stop}.
        """
        return [
            p["action"]
            for p in self.app.payloads()
            if p.get("id") == connectionID and p["action"] != "connection-info"
        ]

    @inlineCallbacks
    def test_forwardedAndTunnel(self):  # type: ignore[no-untyped-def]
        """
        For a forwarded GET and for a CONNECT tunnel carrying TLS, the app
        prints the access-request (and accepts it), the connection-start and
        the connection-stop, whose bytes_up counts the request head (above
        0) and, for the tunnel, whose tls.sni is the name the client's
        ClientHello carried.
        """
        port = self.startProxy()

        forward = (
            b"GET http://127.0.0.1:%d/seed HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Connection: close\r\n\r\n" % self.plainPort
        )
        received = yield self.request(port, forward)
        self.assertTrue(received.startswith(b"HTTP/1.1 200 "), received)
        self.assertTrue(received.endswith(b"hello from the origin"), received)
        connectionID = re.search(rb"Request-ID: (\S+)", received)
        self.assertIsNotNone(connectionID, received)
        forwarded = connectionID.group(1).decode()
        stop = yield self.app.waitFor(
            self.stopFor(forwarded), f"connection-stop of {forwarded}"
        )
        info = stop["details"]["info"]
        self.assertGreater(info["bytes_up"], 0)
        self.assertEqual(info["bytes_up"], len(forward))
        self.assertEqual(info["bytes_down"], len(received))
        self.assertEqual(info["l7"]["app"], "http/1.1")
        yield self.assertSessionEvents(forwarded)

        inside = yield self.tunnelTLS(
            port,
            f"127.0.0.1:{self.tlsPort}",
            "origin.test",
            self.originTrust,
            b"GET /inside HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n",
        )
        self.assertTrue(inside.endswith(b"hello from the origin"), inside)

        def tunnelStop() -> Any:
            for payload in self.app.payloads():
                info = payload.get("details", {}).get("info", {})
                if payload.get("action") == "connection-stop" and info.get("tls"):
                    return payload
            return None

        stop = yield self.app.waitFor(tunnelStop, "the tunnel's connection-stop")
        info = stop["details"]["info"]
        self.assertEqual(info["tls"], {"sni": "origin.test"})
        self.assertEqual(info["l7"]["app"], "tls")
        # The CONNECT head, then the TLS records; the 200, then theirs.
        target = f"127.0.0.1:{self.tlsPort}"
        connect = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"
        self.assertGreater(info["bytes_up"], len(connect))
        self.assertGreater(
            info["bytes_down"],
            len(b"HTTP/1.1 200 Connection established\r\n\r\n") + len(inside),
        )
        yield self.assertSessionEvents(stop["id"])
        # Every payload the app printed is the seed's reply path: no KeyError.
        self.assertNotIn("KeyError", self.app.stdout)

    @inlineCallbacks
    def test_interceptedTunnel(self):  # type: ignore[no-untyped-def]
        """
        For an intercepted tunnel (the client trusting the proxy's issuing
        CA, the proxy trusting the origin's through C{--extra-ca}), the app
        prints one access-request, one connection-start and one
        connection-stop, whose C{l7.details} lists the URL requested inside
        and whose C{tls.sni} is the name the client's ClientHello carried;
        the request inside prints nothing of its own.
        """
        from twisted.names import dns

        from .helpers import startNameServer

        here = FilePath(self.mktemp())
        here.makedirs()
        mitmCA = Authority("mitm CA")
        here.child("origin-ca.pem").setContent(self.ca.pem)
        here.child("mitm-ca.pem").setContent(mitmCA.pem)
        here.child("mitm-ca.key").setContent(mitmCA.keyPEM)
        names = startNameServer(
            reactor, b"test", {b"origin.test": [dns.Record_A("127.0.0.1")]}
        )
        self.addCleanup(names.stopListening)
        port = self.startProxy(
            "--nameserver",
            f"127.0.0.1:{names.getHost().port}",
            "--extra-ca",
            here.child("origin-ca.pem").path,
            "--mitm-ca-cert",
            here.child("mitm-ca.pem").path,
            "--mitm-ca-key",
            here.child("mitm-ca.key").path,
            "--mitm-domain",
            "origin.test",
        )
        target = f"origin.test:{self.tlsPort}"
        inside = yield self.tunnelTLS(
            port,
            target,
            "origin.test",
            ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(mitmCA.pem)]),
            b"GET /inside?key=v HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
            % target.encode(),
        )
        self.assertTrue(inside.endswith(b"hello from the origin"), inside)

        def tunnelStop() -> Any:
            for payload in self.app.payloads():
                if payload.get("action") == "connection-stop":
                    return payload
            return None

        stop = yield self.app.waitFor(tunnelStop, "the tunnel's connection-stop")
        info = stop["details"]["info"]
        self.assertEqual(info["tls"], {"sni": "origin.test"})
        self.assertEqual(
            info["l7"],
            {"app": "http/1.1", "details": [f"https://{target}/inside?key=\u2026"]},
        )
        self.assertTrue(info["session"].startswith("ssli_127.0.0.1:"), info)
        yield self.assertSessionEvents(stop["id"])
        # The request inside had no session of its own.
        ids = {p.get("id") for p in self.app.payloads() if p.get("id")}
        self.assertEqual(ids, {stop["id"]})
        self.assertNotIn("KeyError", self.app.stdout)
