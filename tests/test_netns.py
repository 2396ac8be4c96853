"""
C{destinations.allow_hosts} end to end with real sockets on a private
address, inside a network namespace whose only interface is C{lo}
(C{unshare --net}, as root): nothing is ever sent to a private address on
a real network.

The test runs this module as a child process in the namespace
(L{_child}); the child gives the private addresses to C{lo}, serves an
origin on 10.1.2.3 and a twisted.names server on 127.0.0.1, starts the
proxy as twistd would, makes its requests, and prints what it saw as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

_PRIVATE = "10.1.2.3"
# Azure's WireServer: a global address, denied by "Deny: Cloud Metadata".
_WIRESERVER = "168.63.129.16"


def _canUnshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    if shutil.which("ip") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--net", "true"], capture_output=True, timeout=10
    )
    return probe.returncode == 0


class AllowedHostInNamespaceTests(TestCase):
    """
    An allowed host reaches its private address over real sockets; another
    name for the same address, and the literal, do not.
    """

    def test_allowedHost(self) -> None:
        """
        Through the proxy as twistd builds it, with C{--allow-host}
        C{hooks.internal.test} and C{--nameserver}: the allowed name is
        served by the origin on 10.1.2.3; C{evil.test} (same address) and
        the literal get 403/1000 C{Deny: Private Range}, and the origin
        sees only the allowed request.  Azure's WireServer address, served
        in the namespace, is refused (403/1000 C{Deny: Cloud Metadata}) as a
        literal and by name, even under an allow range over it, and its
        origin sees nothing.
        """
        if not _canUnshare():
            raise SkipTest("needs root and unshare --net")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        result = subprocess.run(
            ["unshare", "--net", sys.executable, "-m", "tests.test_netns"],
            cwd=root,
            capture_output=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": root},
        )
        self.assertEqual(result.returncode, 0, result.stderr.decode()[-2000:])
        seen = json.loads(result.stdout.decode().strip().splitlines()[-1])
        self.assertEqual(seen["allowed"], [200, None, "Allow: Allowed Host"])
        for key in ("otherName", "literal"):
            status, code, body = seen[key]
            self.assertEqual((status, code), (403, "1000"), key)
            self.assertIn(f"({_PRIVATE}) was denied by rule 'Deny: Private", body)
        self.assertEqual(seen["origin"], ["/allowed"])
        for key in ("wireServer", "wireServerName"):
            status, code, body = seen[key]
            self.assertEqual((status, code), (403, "1000"), key)
            self.assertIn("'Deny: Cloud Metadata'", body)
        self.assertEqual(seen["wireOrigin"], [])


def _child() -> None:  # pragma: no cover - runs in the namespace
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for address in (_PRIVATE, _WIRESERVER):
        subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True)

    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.names import dns
    from twisted.web.client import HTTPConnectionPool, ProxyAgent, readBody
    from twisted.web.server import Site

    from proxy_app.tap import Options, makeService

    from .helpers import startNameServer
    from .test_integration import Echo, freePort

    origin: list[str] = []

    class Recorder(Echo):
        def render(self, request: Any) -> bytes:
            origin.append(request.uri.decode())
            return Echo.render(self, request)

    site = reactor.listenTCP(0, Site(Recorder()), interface=_PRIVATE)
    port = site.getHost().port
    wireOrigin: list[str] = []

    class WireRecorder(Echo):
        def render(self, request: Any) -> bytes:
            wireOrigin.append(request.uri.decode())
            return Echo.render(self, request)

    wirePort = (
        reactor.listenTCP(0, Site(WireRecorder()), interface=_WIRESERVER).getHost().port
    )
    names = startNameServer(
        reactor,
        b"test",
        {
            b"hooks.internal.test": [dns.Record_A(_PRIVATE)],
            b"evil.test": [dns.Record_A(_PRIVATE)],
            b"wire.test": [dns.Record_A(_WIRESERVER)],
        },
    )
    proxyPort = freePort("127.0.0.1")
    decisions = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"netns-{os.getpid()}")
    options = Options(environ={})
    options.parseOptions(
        [
            "--listen",
            f"tcp:{proxyPort}:interface=127.0.0.1",
            "--allow-host",
            "hooks.internal.test",
            # A range over the WireServer does not open it.
            "--allow-range",
            "168.63.0.0/16",
            "--nameserver",
            f"127.0.0.1:{names.getHost().port}",
            "--access-log",
            "none",
            "--decision-log",
            decisions,
            "--access-log-format",
            "json",
            "--metrics",
            "none",
        ]
    )
    service = makeService(options)
    service.privilegedStartService()
    service.startService()
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = ProxyAgent(
        TCP4ClientEndpoint(reactor, "127.0.0.1", proxyPort), reactor, pool=pool
    )

    async def get(url: str) -> list[Any]:
        response = await agent.request(b"GET", url.encode())
        body = await readBody(response)
        code = response.headers.getRawHeaders(b"x-whsentry-reasoncode")
        return [response.code, code[0].decode() if code else None, body.decode()]

    async def run() -> dict[str, Any]:
        seen = {
            "allowed": await get(f"http://hooks.internal.test:{port}/allowed"),
            "otherName": await get(f"http://evil.test:{port}/other"),
            "literal": await get(f"http://{_PRIVATE}:{port}/literal"),
            "wireServer": await get(f"http://{_WIRESERVER}:{wirePort}/wire"),
            "wireServerName": await get(f"http://wire.test:{wirePort}/wire"),
            "origin": origin,
            "wireOrigin": wireOrigin,
        }
        await service.stopService()
        with open(decisions) as f:
            lines = [json.loads(line) for line in f]
        allowed = [line for line in lines if line["status_code"] == 200]
        seen["allowed"] = [seen["allowed"][0], seen["allowed"][1]] + [
            allowed[0].get("address_rule") if allowed else None
        ]
        os.unlink(decisions)
        return seen

    result: dict[str, Any] = {}

    def done(seen: dict[str, Any]) -> None:
        result.update(seen)
        reactor.stop()

    def failed(failure: Any) -> None:
        failure.printTraceback(file=sys.stderr)
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(run()).addCallbacks(done, failed))
    reactor.run()
    if not result:
        sys.exit(1)
    print(json.dumps(result))


if __name__ == "__main__":  # pragma: no cover
    _child()
