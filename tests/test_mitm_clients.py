"""
TLS interception as its users meet it: curl, requests and httpx, each
pointed at the proxy with its standard proxy setting and trusting the
interception CA, reach an HTTPS origin on loopback through CONNECT; the
proxy reads each request, originates verified TLS to the origin (whose
test CA it trusts through C{--extra-ca}), writes an access line per
request and reports the tunnel to the control webhook as one session.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.names import dns
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from proxy_app.tap import Options, makeService

from .certs import Authority
from .helpers import startNameServer
from .test_integration import freePort

# How long a client, an event or a log line may take before a test fails.
DEADLINE = 20.0


class _Origin(Resource):
    """
    Answers with what arrived (the method, the path and the headers), and
    keeps the paths it saw.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def render(self, request: Any) -> bytes:
        self.seen.append(request.uri.decode())
        headers = {
            name.decode().lower(): values[0].decode()
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {
                "method": request.method.decode(),
                "path": request.uri.decode(),
                "headers": headers,
            }
        ).encode()


class _Webhook(Resource):
    """
    The control webhook: records every event and accepts every access
    request, as the seed's app does.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []
        self.waiters: list[tuple[str, Deferred]] = []

    def render_POST(self, request: Any) -> bytes:
        event = json.loads(request.content.read())
        self.events.append(event)
        for action, d in list(self.waiters):
            if event.get("action") == action:
                self.waiters.remove((action, d))
                d.callback(event)
        request.setHeader(b"content-type", b"application/json")
        if event.get("action") == "access-request":
            return b'{"access-response": "accept"}'
        return b'{"status": "success"}'

    def next(self, action: str) -> Deferred:
        """
        The next event of C{action}, failing after L{DEADLINE}.
        """
        d: Deferred = Deferred()
        self.waiters.append((action, d))
        return d.addTimeout(DEADLINE, reactor)

    def actions(self, action: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event.get("action") == action]


@inlineCallbacks
def waitUntil(condition: Callable[[], Any], what: str) -> Any:
    """
    Wait, without blocking the reactor, until C{condition()} is true (a
    file another part of the process flushes on its own timer); fail
    naming C{what} once L{DEADLINE} has passed on the reactor's clock.
    """
    deadline = reactor.seconds() + DEADLINE
    while True:
        result = condition()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        yield deferLater(reactor, 0.02, lambda: None)


class InterceptingClientsTests(TestCase):
    """
    curl, requests and httpx through an intercepting proxy built as twistd
    builds it, against a TLS origin named C{origin.test} on 127.0.0.1
    (served by a twisted.names server the proxy asks), with the access
    request gate on.
    """

    def setUp(self) -> None:
        here = FilePath(self.mktemp())
        here.makedirs()
        # The origin's CA, trusted by the proxy only; the interception CA,
        # trusted by the clients only.
        originCA, self.mitmCA = Authority("origin CA"), Authority("mitm CA")
        certPEM, keyPEM, _ = originCA.issue("origin.test", names=("origin.test",))
        here.child("origin-ca.pem").setContent(originCA.pem)
        here.child("mitm-ca.pem").setContent(self.mitmCA.pem)
        here.child("mitm-ca.key").setContent(self.mitmCA.keyPEM)
        self.clientCA = here.child("mitm-ca.pem").path
        self.origin = _Origin()
        origin = reactor.listenSSL(
            0,
            Site(self.origin),
            ssl.PrivateCertificate.loadPEM(keyPEM + certPEM).options(),
            interface="127.0.0.1",
        )
        self.addCleanup(origin.stopListening)
        self.originPort = origin.getHost().port
        names = startNameServer(
            reactor, b"test", {b"origin.test": [dns.Record_A("127.0.0.1")]}
        )
        self.addCleanup(names.stopListening)
        self.webhook = _Webhook()
        hook = reactor.listenTCP(0, Site(self.webhook), interface="127.0.0.1")
        self.addCleanup(hook.stopListening)
        self.accessLog = here.child("access.log")
        self.proxyPort = freePort("127.0.0.1")
        options = Options(environ={})
        options.parseOptions(
            [
                "--listen",
                f"tcp:{self.proxyPort}:interface=127.0.0.1",
                "--metrics",
                "none",
                "--allow-range",
                "127.0.0.0/8",
                "--nameserver",
                f"127.0.0.1:{names.getHost().port}",
                "--extra-ca",
                here.child("origin-ca.pem").path,
                "--mitm-ca-cert",
                here.child("mitm-ca.pem").path,
                "--mitm-ca-key",
                here.child("mitm-ca.key").path,
                "--mitm-all",
                "--access-log",
                self.accessLog.path,
                "--access-log-format",
                "json",
                "--webhook-url",
                f"http://127.0.0.1:{hook.getHost().port}/webhook/k",
                "--webhook-access-request",
                "enabled=true,on_error=reject",
            ]
        )
        service = makeService(options)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        self.base = f"https://origin.test:{self.originPort}"
        self.url = self.base + "/hooks/1?token=s3cret"
        self.proxy = f"http://127.0.0.1:{self.proxyPort}"

    def environment(self) -> dict[str, str]:
        """
        This process's environment with the proxy as C{HTTPS_PROXY} and no
        other proxy setting that could send a client elsewhere.
        """
        env = {
            key: value
            for key, value in os.environ.items()
            if key.lower() not in ("no_proxy", "http_proxy", "https_proxy", "all_proxy")
        }
        env["HTTPS_PROXY"] = env["https_proxy"] = self.proxy
        return env

    def accessLines(self) -> list[dict[str, Any]]:
        if not self.accessLog.exists():
            return []
        return [json.loads(line) for line in self.accessLog.getContent().splitlines()]

    def inner(self, count: int) -> Deferred:
        """
        The access lines of the requests inside tunnels, once C{count}
        of them and the tunnel's own line have been flushed.
        """

        def ready() -> Any:
            lines = self.accessLines()
            inner = [line for line in lines if line.get("method") == "GET"]
            tunnels = [line for line in lines if line.get("method") == "CONNECT"]
            return inner if len(inner) >= count and tunnels else None

        return waitUntil(ready, f"{count} inner access lines")

    @inlineCallbacks
    def runClient(self, argv: list[str], env: dict[str, str]) -> Any:
        out, err, code = yield getProcessOutputAndValue(
            argv[0], argv[1:], env=env
        ).addTimeout(DEADLINE, reactor)
        return out, err, code

    @inlineCallbacks
    def intercepted(self, argv: list[str], env: dict[str, str], paths: list[str]):  # type: ignore[no-untyped-def]
        """
        Run a client that requests C{paths} (in one tunnel) and check what
        the origin saw, the access lines and the tunnel's one session.
        """
        stopped = self.webhook.next("connection-stop")
        out, err, code = yield self.runClient(argv, env)
        self.assertEqual(code, 0, (out, err))
        self.assertEqual(self.origin.seen, paths)
        body = json.loads(out.splitlines()[0])
        self.assertEqual(body["method"], "GET")
        # Proxy-* headers never reach the origin.
        self.assertFalse(
            [name for name in body["headers"] if name.startswith("proxy-")], body
        )
        stop = yield stopped
        info = stop["details"]["info"]
        logged = [self.base + p.replace("token=s3cret", "token=\u2026") for p in paths]
        self.assertEqual(info["tls"], {"sni": "origin.test"})
        self.assertEqual(info["l7"], {"app": "http/1.1", "details": logged})
        self.assertTrue(info["session"].startswith("ssli_127.0.0.1:"), info)
        self.assertIn("+ssli_127.0.0.1:", info["session"])
        self.assertGreater(info["bytes_up"], 0)
        self.assertGreater(info["bytes_down"], 0)
        inner = yield self.inner(len(paths))
        self.assertEqual([line["url"] for line in inner], logged)
        self.assertEqual([line["response_code"] for line in inner], [200] * len(paths))
        # One session: one access request, one start, one stop.
        self.assertEqual(len(self.webhook.actions("access-request")), 1)
        self.assertEqual(len(self.webhook.actions("connection-start")), 1)
        self.assertEqual(len(self.webhook.actions("connection-stop")), 1)
        return body

    def curl(self) -> str:
        # .ci/run installs curl where it is missing; a machine without it
        # fails here rather than skipping.
        curl = shutil.which("curl")
        self.assertIsNotNone(curl, "curl is not installed")
        assert curl is not None
        return curl

    def test_curl(self) -> Any:
        """
        curl with C{--proxy} and C{--cacert} naming the interception CA,
        two URLs on one command line: both go through one tunnel, each has
        its access line, and the tunnel's connection-stop lists both.
        """
        second = self.base + "/hooks/2"
        return self.intercepted(
            [
                self.curl(),
                "-sS",
                "--proxy",
                self.proxy,
                "--cacert",
                self.clientCA,
                self.url,
                "-w",
                "\\n",
                second,
            ],
            self.environment(),
            ["/hooks/1?token=s3cret", "/hooks/2"],
        )

    @inlineCallbacks
    def test_curlUntrusted(self):  # type: ignore[no-untyped-def]
        """
        curl that does not trust the interception CA fails its handshake
        (exit 60, certificate problem), and the origin sees nothing.
        """
        out, err, code = yield self.runClient(
            [self.curl(), "-sS", "--proxy", self.proxy, self.url],
            self.environment(),
        )
        self.assertEqual(code, 60, (out, err))
        self.assertIn(b"SSL certificate problem", err)
        self.assertEqual(self.origin.seen, [])
        lines = yield waitUntil(
            lambda: (
                [line for line in self.accessLines() if line["method"] == "CONNECT"]
                and self.accessLines()
            ),
            "the tunnel's access line",
        )
        self.assertEqual([line["method"] for line in lines], ["CONNECT"])

    def test_requests(self) -> Any:
        """
        requests with C{HTTPS_PROXY} and C{REQUESTS_CA_BUNDLE}.
        """
        env = self.environment()
        env["REQUESTS_CA_BUNDLE"] = self.clientCA
        code = (
            "import requests, sys; r = requests.get(sys.argv[1], timeout=10); "
            "r.raise_for_status(); sys.stdout.write(r.text)"
        )
        return self.intercepted(
            [sys.executable, "-c", code, self.url], env, ["/hooks/1?token=s3cret"]
        )

    def test_httpx(self) -> Any:
        """
        httpx with C{HTTPS_PROXY} and C{SSL_CERT_FILE}.
        """
        env = self.environment()
        env["SSL_CERT_FILE"] = self.clientCA
        code = (
            "import httpx, sys; r = httpx.get(sys.argv[1], timeout=10); "
            "r.raise_for_status(); sys.stdout.write(r.text)"
        )
        return self.intercepted(
            [sys.executable, "-c", code, self.url], env, ["/hooks/1?token=s3cret"]
        )

    @inlineCallbacks
    def test_http2Only(self):  # type: ignore[no-untyped-def]
        """
        A client offering only ALPN C{h2} (Python's C{http.client} through
        the proxy with C{set_tunnel}, trusting the interception CA) fails
        its handshake with the proxy's fatal C{internal_error} alert, and
        nothing reaches the origin.
        """
        code = (
            "import http.client, ssl, sys\n"
            "context = ssl.create_default_context(cafile=sys.argv[1])\n"
            "context.set_alpn_protocols(['h2'])\n"
            "c = http.client.HTTPSConnection('127.0.0.1', int(sys.argv[2]),"
            " context=context, timeout=10)\n"
            "c.set_tunnel('origin.test', int(sys.argv[3]))\n"
            "try:\n"
            "    c.request('GET', '/h2')\n"
            "except ssl.SSLError as e:\n"
            "    sys.exit(e.reason)\n"
        )
        out, err, status = yield self.runClient(
            [
                sys.executable,
                "-c",
                code,
                self.clientCA,
                str(self.proxyPort),
                str(self.originPort),
            ],
            self.environment(),
        )
        self.assertEqual((status, err.strip()), (1, b"TLSV1_ALERT_INTERNAL_ERROR"))
        self.assertEqual(self.origin.seen, [])
