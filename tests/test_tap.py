"""
Tests for L{proxy_app.tap}: building the service, draining on stop, and the
access log's formats.
"""

from __future__ import annotations

import io
import json
import platform
import threading

import bcrypt
from twisted.application.service import IServiceCollection, IServiceMaker
from twisted.plugin import getPlugins
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.config import Config, Timeouts
from proxy_app.identity import PasswordCheckPool
from proxy_app.observe import AccessLog
from proxy_app.tap import Options, ProxyService, makeService

from .helpers import PluggableMemoryReactor, makeHarness


class MakeServiceTests(SynchronousTestCase):
    """
    L{makeService} builds the proxy from options.
    """

    def test_plugin(self) -> None:
        """
        The twistd plugin named egressproxy points at L{proxy_app.tap}.
        """
        import twisted.plugins

        makers = {p.tapname: p for p in getPlugins(IServiceMaker, twisted.plugins)}
        self.assertIn("egressproxy", makers)
        self.assertEqual(makers["egressproxy"].module, "proxy_app.tap")

    def test_listeners(self) -> None:
        """
        Each --listen endpoint becomes a listener, bound on start.
        """
        reactor = PluggableMemoryReactor()
        options = Options(environ={})
        options.parseOptions(
            ["--listen", "tcp:9090:interface=127.0.0.1", "--listen", "tcp:9091", "--access-log", self.mktemp()]
        )
        service = makeService(options, reactor=reactor)
        self.assertTrue(IServiceCollection.providedBy(service))
        service.privilegedStartService()
        service.startService()
        ports = [(port, interface) for port, _, _, interface in reactor.tcpServers]
        self.assertEqual(ports, [(2112, "127.0.0.1"), (9090, "127.0.0.1"), (9091, "")])
        service.stopService()


    def test_passwordCheckThreads(self) -> None:
        """
        With --auth, password checks get threads of their own, which start
        with the service and stop with it, after the drain.
        """
        path = FilePath(self.mktemp())
        path.setContent(b"alice:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)) + b"\n")
        options = Options(environ={})
        options.parseOptions(
            ["--auth", f"htpasswd:{path.path}", "--auth-check-threads", "3", "--access-log", "none"]
        )
        service = makeService(options, reactor=PluggableMemoryReactor())
        (checks,) = [s for s in service if isinstance(s, PasswordCheckPool)]
        (proxy,) = [s for s in service if isinstance(s, ProxyService)]
        self.assertIs(proxy.factory.access.passwordChecks, checks)
        children = list(service)
        self.assertLess(children.index(checks), children.index(proxy))
        self.assertEqual(checks.threads, 3)

        def checkThreads() -> list[threading.Thread]:
            return [t for t in threading.enumerate() if "egressproxy-password-checks" in t.name]

        before = len(checkThreads())
        service.privilegedStartService()
        service.startService()
        try:
            self.assertEqual(len(checkThreads()) - before, 3)
        finally:
            self.successResultOf(service.stopService())
        self.assertEqual(len(checkThreads()), before)


class DrainTests(SynchronousTestCase):
    """
    Stopping the service drains connections for a bounded time.
    """

    def test_drainWaitsForInFlight(self) -> None:
        """
        A request in flight when the service stops may finish; the stop
        completes once it has, and the connection closes after the response.
        """
        h = makeHarness()
        service = ProxyService(h.factory, h.reactor)
        service.startService()
        h.send(b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n\r\n")
        up, _ = h.connectUpstream()
        stopped = service.stopService()
        self.assertNoResult(stopped)
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(h.client.value().endswith(b"ok"))
        self.assertTrue(h.client.disconnecting)
        h.protocol.connectionLost(None)
        self.successResultOf(stopped)

    def test_drainTimeout(self) -> None:
        """
        What has not finished when the drain time is up is aborted.
        """
        h = makeHarness(config=Config(timeouts=Timeouts(read=60, lifetime=100, drain=15)))
        service = ProxyService(h.factory, h.reactor)
        service.startService()
        h.send(b"CONNECT origin.example:443 HTTP/1.1\r\nHost: origin.example:443\r\n\r\n")
        h.connectUpstream()
        stopped = service.stopService()
        h.reactor.advance(h.factory.config.timeouts.drain - 1)
        self.assertNoResult(stopped)
        self.assertFalse(h.client.disconnecting)
        h.reactor.advance(1.1)
        self.assertTrue(h.client.disconnecting)
        h.protocol.connectionLost(None)
        self.successResultOf(stopped)

    def test_idleClosesAtOnce(self) -> None:
        """
        An idle keep-alive connection is closed as soon as draining starts,
        and the stop completes at once when nothing is left.
        """
        h = makeHarness()
        service = ProxyService(h.factory, h.reactor)
        service.startService()
        stopped = service.stopService()
        self.assertTrue(h.client.disconnecting)
        h.protocol.connectionLost(None)
        self.successResultOf(stopped)


class AccessLogTests(SynchronousTestCase):
    """
    The access log's two formats.
    """

    def test_json(self) -> None:
        """
        JSON lines are one object each, with webhook-sentry's field names.
        """
        out = io.StringIO()
        log = AccessLog(out, "json")
        log.record(
            rq_id="a-1", client_addr="127.0.0.1:1", method="GET", url="http://x/",
            response_code=200, response_time=0.5, bytes_up=1, bytes_down=2,
        )
        record = json.loads(out.getvalue())
        self.assertEqual(
            {k: v for k, v in record.items() if k != "time"},
            {
                "rq_id": "a-1", "client_addr": "127.0.0.1:1", "method": "GET",
                "url": "http://x/", "response_code": 200, "response_time": 0.5,
                "bytes_up": 1, "bytes_down": 2,
            },
        )
        self.assertIsInstance(record["time"], float)

    def test_text(self) -> None:
        """
        Text lines are key=value pairs, quoting values with spaces.
        """
        out = io.StringIO()
        AccessLog(out, "text").record(rq_id="a-1", method="GET", error="it broke", response_code=502)
        self.assertEqual(out.getvalue(), 'rq_id=a-1 method=GET response_code=502 error="it broke"\n')


class FileLimitTests(SynchronousTestCase):
    """
    The open-file limit at start.
    """

    def test_raisedToHard(self) -> None:
        """
        The soft limit is raised to the hard limit.
        """
        import resource

        from proxy_app.tap import raiseFileLimit

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        if soft == hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft // 2, 64), hard))
        self.assertEqual(raiseFileLimit(), hard)
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)


class AllocatorTests(SynchronousTestCase):
    """
    Running as the process, the proxy tunes glibc's allocator for large
    reads.
    """

    def test_tuned(self) -> None:
        """
        On glibc, L{tuneAllocator} sets its thresholds (mallopt says so);
        elsewhere it does nothing and says so.
        """
        from proxy_app.tap import tuneAllocator

        self.assertEqual(tuneAllocator(), platform.libc_ver()[0] == "glibc")

    def test_calledAsTheProcess(self) -> None:
        """
        makeService tunes the allocator (and raises the file limit) only when
        it runs on the global reactor, as under twistd, not in tests.
        """
        import proxy_app.tap as tap

        calls: list[str] = []
        self.patch(tap, "tuneAllocator", lambda: calls.append("allocator"))
        self.patch(tap, "raiseFileLimit", lambda: calls.append("files"))
        options = Options(environ={})
        options.parseOptions(["--metrics", "none", "--access-log", "none"])
        reactor = PluggableMemoryReactor()
        tap.makeService(options, reactor=reactor)
        self.assertEqual(calls, [])
        self.patch(tap, "_globalReactor", lambda: reactor)
        tap.makeService(options, reactor=reactor)
        self.assertEqual(calls, ["files", "allocator"])
