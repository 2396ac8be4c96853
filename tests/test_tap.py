"""
Tests for L{proxy_app.tap}: building the service, each way start-up can
fail, signals, draining on stop, and the access log's formats.
"""

from __future__ import annotations

import errno
import gc
import io
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from typing import Any

import bcrypt
from twisted.application.service import IServiceCollection, IServiceMaker
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel
from twisted.plugin import getPlugins
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.python.log import callWithLogger as legacyCallWithLogger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from proxy_app import tap
from proxy_app.accounting import MetricsObserver
from proxy_app.config import Config, ConfigError, Timeouts, load
from proxy_app.identity import PasswordCheckPool
from proxy_app.observe import AccessLog
from proxy_app.tap import (
    Options,
    ProxyService,
    buildProxy,
    chainSignal,
    makeService,
    validate,
    withBacklog,
)

from .certs import Authority
from .helpers import PluggableMemoryReactor, makeHarness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
            [
                "--listen",
                "tcp:9090:interface=127.0.0.1",
                "--listen",
                "tcp:9091",
                "--access-log",
                self.mktemp(),
            ]
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
        path.setContent(
            b"alice:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)) + b"\n"
        )
        options = Options(environ={})
        options.parseOptions(
            [
                "--auth",
                f"htpasswd:{path.path}",
                "--auth-check-threads",
                "3",
                "--access-log",
                "none",
            ]
        )
        service = makeService(options, reactor=PluggableMemoryReactor())
        (checks,) = [s for s in service if isinstance(s, PasswordCheckPool)]
        (proxy,) = [s for s in service if isinstance(s, ProxyService)]
        self.assertIs(proxy.factory.access.passwordChecks, checks)
        children = list(service)
        self.assertLess(children.index(checks), children.index(proxy))
        self.assertEqual(checks.threads, 3)

        def checkThreads() -> list[threading.Thread]:
            return [
                t
                for t in threading.enumerate()
                if "egressproxy-password-checks" in t.name
            ]

        before = len(checkThreads())
        service.privilegedStartService()
        service.startService()
        try:
            self.assertEqual(len(checkThreads()) - before, 3)
        finally:
            self.successResultOf(service.stopService())
        self.assertEqual(len(checkThreads()), before)

    def test_noMetricsNoCounting(self) -> None:
        """
        With C{--metrics none} nothing can read what requests and
        connections move, so the proxy does not count it: no metrics
        observer, and an open client connection is not counted; with a
        metrics listener both are.
        """
        for metrics, counting in (("none", False), ("tcp:0", True)):
            options = Options(environ={})
            options.parseOptions(["--metrics", metrics, "--access-log", "none"])
            service = makeService(options, reactor=PluggableMemoryReactor())
            (proxy,) = [s for s in service if isinstance(s, ProxyService)]
            factory = proxy.factory
            self.assertIs(factory.metrics.counting, counting)
            self.assertEqual(
                [type(o) for o in factory.observers if isinstance(o, MetricsObserver)],
                [MetricsObserver] if counting else [],
            )
            protocol = factory.buildProtocol(None)
            protocol.makeConnection(StringTransport())
            self.assertEqual(
                factory.metrics.registry.get_sample_value(
                    "egressproxy_active_client_connections", {"listener": "default"}
                ),
                1.0 if counting else None,
            )
            protocol.connectionLost(Failure(ConnectionDone()))


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
        h = makeHarness(
            config=Config(timeouts=Timeouts(read=60, lifetime=100, drain=15))
        )
        service = ProxyService(h.factory, h.reactor)
        service.startService()
        h.send(
            b"CONNECT origin.example:443 HTTP/1.1\r\nHost: origin.example:443\r\n\r\n"
        )
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
            rq_id="a-1",
            client_addr="127.0.0.1:1",
            method="GET",
            url="http://x/",
            response_code=200,
            response_time=0.5,
            bytes_up=1,
            bytes_down=2,
        )
        record = json.loads(out.getvalue())
        self.assertEqual(
            {k: v for k, v in record.items() if k != "time"},
            {
                "rq_id": "a-1",
                "client_addr": "127.0.0.1:1",
                "method": "GET",
                "url": "http://x/",
                "response_code": 200,
                "response_time": 0.5,
                "bytes_up": 1,
                "bytes_down": 2,
            },
        )
        self.assertIsInstance(record["time"], float)

    def test_text(self) -> None:
        """
        Text lines are key=value pairs, quoting values with spaces.
        """
        out = io.StringIO()
        AccessLog(out, "text").record(
            rq_id="a-1", method="GET", error="it broke", response_code=502
        )
        self.assertEqual(
            out.getvalue(), 'rq_id=a-1 method=GET response_code=502 error="it broke"\n'
        )


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
        self.patch(tap, "leanEventPath", lambda: calls.append("event path"))
        options = Options(environ={})
        options.parseOptions(["--metrics", "none", "--access-log", "none"])
        reactor = PluggableMemoryReactor()
        tap.makeService(options, reactor=reactor)
        self.assertEqual(calls, [])
        self.patch(tap, "_globalReactor", lambda: reactor)
        tap.makeService(options, reactor=reactor)
        self.assertEqual(calls, ["files", "allocator", "event path"])


class _Selectable:
    def __init__(self, prefix: str | None) -> None:
        self.prefix = prefix

    def logPrefix(self) -> str:
        if self.prefix is None:
            raise RuntimeError("no prefix")
        return self.prefix


class EventPathTests(TestCase):
    """
    L{leanEventPath}: the reactor's per-event wrapper without the legacy
    log context, still logging what escapes an event.
    """

    def lean(self) -> tuple[Any, list[dict[str, Any]]]:
        from proxy_app.tap import leanEventPath

        errors: list[dict[str, Any]] = []
        legacy = types.SimpleNamespace(
            err=lambda **kw: errors.append(kw), callWithLogger=None
        )
        leanEventPath(legacy)
        return legacy.callWithLogger, errors

    def test_callsThrough(self) -> None:
        """
        The event's function is called with its arguments and its result
        returned, without asking for the log prefix.
        """
        callWithLogger, errors = self.lean()
        self.assertEqual(
            callWithLogger(_Selectable(None), lambda a, b: (a, b), 1, b=2), (1, 2)
        )
        self.assertEqual(errors, [])

    def test_logsEscapingError(self) -> None:
        """
        An exception escaping the event is logged under the selectable's
        log prefix (or Twisted's words for a broken one), not raised.
        """
        callWithLogger, errors = self.lean()

        def fail() -> None:
            raise ZeroDivisionError()

        self.assertIsNone(callWithLogger(_Selectable("Proto,1,127.0.0.1"), fail))
        self.assertIsNone(callWithLogger(_Selectable(None), fail))
        self.assertEqual(
            errors,
            [{"system": "Proto,1,127.0.0.1"}, {"system": "(buggy logPrefix method)"}],
        )

    def test_keyboardInterrupt(self) -> None:
        """
        A KeyboardInterrupt is not swallowed.
        """
        callWithLogger, _ = self.lean()

        def interrupt() -> None:
            raise KeyboardInterrupt()

        self.assertRaises(
            KeyboardInterrupt, callWithLogger, _Selectable("x"), interrupt
        )

    @inlineCallbacks
    def test_realReactor(self) -> Any:
        """
        On the real reactor, with the lean path installed, a connection
        whose protocol raises is logged and closed, and the reactor goes on
        serving the next connection.
        """
        from twisted.internet import reactor
        from twisted.python import log as legacy

        from proxy_app.tap import leanEventPath

        self.patch(legacy, "callWithLogger", legacy.callWithLogger)
        leanEventPath()
        self.assertIsNot(legacy.callWithLogger, legacyCallWithLogger)

        class Broken(Protocol):
            def dataReceived(self, data: bytes) -> None:
                if data == b"boom":
                    raise ZeroDivisionError()
                self.transport.write(data)

        port = reactor.listenTCP(0, Factory.forProtocol(Broken), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)

        class Client(Protocol):
            def __init__(self) -> None:
                self.lost: Deferred = Deferred()
                self.received: Deferred = Deferred()

            def dataReceived(self, data: bytes) -> None:
                self.received.callback(data)

            def connectionLost(self, reason: Any = None) -> None:
                self.lost.callback(None)

        first = yield connectProtocol(endpoint, Client())
        first.transport.write(b"boom")
        yield first.lost
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        second = yield connectProtocol(endpoint, Client())
        second.transport.write(b"echo")
        self.assertEqual((yield second.received), b"echo")
        second.transport.loseConnection()
        yield second.lost


class _PortTaken(PluggableMemoryReactor):
    """
    A memory reactor on which every TCP port is already taken.
    """

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:
        raise CannotListenError(
            interface, port, OSError(errno.EADDRINUSE, "Address already in use")
        )


class StartupFailureTests(SynchronousTestCase):
    """
    Each way start-up can fail: L{buildProxy} raises L{ConfigError} with one
    line naming the key and the value, and the command line's
    L{makeService} prints that line and exits with status 1.
    """

    def parse(self, *argv: str) -> Options:
        options = Options(environ={})
        options.parseOptions(["--metrics", "none", "--access-log", "none", *argv])
        return options

    def assertFails(self, options: Options, line: str, reactor: Any = None) -> None:
        """
        Building C{options} (or starting what was built) raises
        L{ConfigError} with C{line} from L{buildProxy}, and prints
        C{egressproxy: line} and exits with status 1 from L{makeService}.
        """
        if reactor is None:
            error = self.assertRaises(
                ConfigError, buildProxy, options.config, PluggableMemoryReactor()
            )
        else:
            built = buildProxy(options.config, reactor)
            error = self.assertRaises(ConfigError, built.privilegedStartService)
        self.assertEqual(str(error), line)

        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        if reactor is None:
            exited = self.assertRaises(
                SystemExit, makeService, options, PluggableMemoryReactor()
            )
        else:
            service = makeService(options, reactor)
            exited = self.assertRaises(SystemExit, service.privilegedStartService)
        self.assertEqual(exited.code, 1)
        self.assertEqual(stderr.getvalue(), f"egressproxy: {line}\n")

    def test_accessLogUnopenable(self) -> None:
        """
        An access log that cannot be opened names access_log.file, the path
        and the reason.
        """
        path = FilePath(self.mktemp()).child("access.log").path
        self.assertFails(
            self.parse("--access-log", path),
            f"access_log.file = {path!r}: cannot open it: No such file or directory",
        )

    def test_decisionLogUnopenable(self) -> None:
        """
        A decision log that cannot be opened names access_log.decision_log,
        the path and the reason.
        """
        path = FilePath(self.mktemp()).child("decisions.log").path
        self.assertFails(
            self.parse("--decision-log", path),
            f"access_log.decision_log = {path!r}: cannot open it: No such file or "
            "directory",
        )

    def test_tlsUnreadable(self) -> None:
        """
        A CA bundle for TLS origination that cannot be read names the tls
        keys and the path.
        """
        path = FilePath(self.mktemp()).path
        self.assertFails(
            self.parse("--ca-bundle", path),
            f"tls: ca_bundle/extra_ca: {path!r}: cannot read it: No such file or "
            "directory",
        )

    def test_aclBroken(self) -> None:
        """
        An ACL file that is broken by the time the proxy is built names
        acl.file, the path and the problem.  (L{Options} checks it too, so
        it is broken after parsing here, as by a deploy racing start-up.)
        """
        acl = FilePath(self.mktemp())
        acl.setContent(
            b"version: v1\nservices: []\ndefault:\n  project: p\n  action: open\n"
        )
        options = self.parse("--acl", acl.path)
        acl.remove()
        self.assertFails(
            options,
            f"acl.file: {acl.path}: cannot read ACL file: No such file or directory",
        )

    def test_authUnreadable(self) -> None:
        """
        A password file that cannot be read names auth.checkers, the path
        and the reason.
        """
        path = FilePath(self.mktemp()).path
        self.assertFails(
            self.parse("--auth", f"htpasswd:{path}"),
            f"auth.checkers: {path}: cannot read htpasswd file: No such file or "
            "directory",
        )

    def test_listenerCannotBind(self) -> None:
        """
        A listener whose port is taken names the endpoint and the socket
        error, when the built service binds it.
        """
        self.assertFails(
            self.parse("--listen", "tcp:9090:interface=127.0.0.1"),
            "listen = 'tcp:9090:interface=127.0.0.1': cannot listen: "
            f"[Errno {errno.EADDRINUSE}] Address already in use",
            reactor=_PortTaken(),
        )

    def test_tlsListenerBroken(self) -> None:
        """
        A TLS listener whose files are broken by the time the proxy is built
        names the listener and the file, as L{validate} does.
        """
        directory = FilePath(self.mktemp())
        directory.makedirs()
        authority = Authority()
        cert, key, _ = authority.issue("proxy.test", ("127.0.0.1",))
        directory.child("server.pem").setContent(cert)
        directory.child("server.key").setContent(key)
        directory.child("clients.pem").setContent(authority.pem)
        listener = (
            f"mtls:9443:interface=127.0.0.1:cert={directory.child('server.pem').path}"
            f":key={directory.child('server.key').path}"
            f":client_ca={directory.child('clients.pem').path}"
        )
        options = self.parse("--listen", listener)
        directory.child("clients.pem").remove()
        error = self.assertRaises(ConfigError, validate, options.config)
        self.assertEqual(
            str(error),
            f"listen = 'mtls:9443:interface=127.0.0.1': "
            f"{directory.child('clients.pem').path!r}: cannot read it: No such file or "
            "directory",
        )
        self.assertFails(options, str(error))

    def test_workersOnlyOnTheCommandLine(self) -> None:
        """
        L{buildProxy} builds one process: a configuration with more workers
        is refused with one line naming the key and the value.
        """
        config = load({"workers": "2", "access-log": "none", "metrics": "none"}, {})
        error = self.assertRaises(
            ConfigError, buildProxy, config, PluggableMemoryReactor()
        )
        self.assertEqual(
            str(error),
            "workers = 2: one process is built here; run twistd egressproxy for more "
            "than one worker",
        )

    def test_buildProxyValidates(self) -> None:
        """
        L{buildProxy} checks the configuration as L{Options} does, so that a
        configuration loaded without L{Options} cannot skip those checks.
        """
        config = load({"access-log": "none", "listen": ["tcp:notaport"]}, {})
        error = self.assertRaises(
            ConfigError, buildProxy, config, PluggableMemoryReactor()
        )
        self.assertTrue(str(error).startswith("listen = 'tcp:notaport': "), str(error))

    def runTwistd(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """
        Run C{twistd -n egressproxy} with C{argv} to its end.
        """
        return subprocess.run(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "egressproxy",
                "--metrics",
                "none",
                *argv,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )

    def test_twistdBuildFailure(self) -> None:
        """
        Under twistd, a mistake found while building prints its one line on
        standard error, with no traceback, and the exit status is 1.
        """
        path = FilePath(self.mktemp()).child("access.log").path
        result = self.runTwistd("--access-log", path)
        self.assertEqual(
            (result.returncode, result.stderr),
            (
                1,
                f"egressproxy: access_log.file = {path!r}: cannot open it: No such "
                "file or directory\n",
            ),
        )

    def test_twistdListenFailure(self) -> None:
        """
        Under twistd, a listener that cannot bind ends start-up with its one
        line (in twistd's log, which has standard error by then), with no
        traceback, and the exit status is 1.
        """
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = self.runTwistd(
                "--access-log", "none", "--listen", f"tcp:{port}:interface=127.0.0.1"
            )
        self.assertEqual(result.returncode, 1)
        output = result.stdout + result.stderr
        self.assertNotIn("Traceback", output)
        [line] = [line for line in output.splitlines() if "egressproxy: " in line]
        self.assertIn(
            f"egressproxy: listen = 'tcp:{port}:interface=127.0.0.1': cannot listen: "
            f"[Errno {errno.EADDRINUSE}]",
            line,
        )


class ValidateTests(SynchronousTestCase):
    """
    L{validate} checks endpoint descriptions without the global reactor.
    """

    def test_noGlobalReactor(self) -> None:
        """
        Validating, building and binding the proxy (with its metrics
        listener, webhook and nameservers) on a memory reactor never imports
        the global reactor (checked in a fresh process, since trial has
        one).
        """
        script = (
            "import sys\n"
            "from twisted.internet.testing import MemoryReactorClock\n"
            "from proxy_app.config import load\n"
            "from proxy_app.tap import buildProxy\n"
            "config = "
            "load({'access-log': 'none', 'listen': ['tcp:9090', 'tcp6:9091'],\n"
            "               'webhook-url': 'http://127.0.0.1:1/', 'nameserver': "
            "['127.0.0.1:53'],\n"
            "               'dns-cache-ttl': '30'}, {})\n"
            "buildProxy(config, MemoryReactorClock()).privilegedStartService()\n"
            "print('twisted.internet.reactor' in sys.modules)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )
        self.assertEqual((result.stdout, result.stderr), ("False\n", ""))

    def test_badEndpoint(self) -> None:
        """
        A description Twisted cannot parse is refused with one line naming
        it.
        """
        config = load({"listen": ["tcp:9090:interface=127.0.0.1", "tcp:nope"]}, {})
        error = self.assertRaises(ConfigError, validate, config)
        self.assertTrue(
            str(error).startswith(
                "listen = 'tcp:nope': not a usable endpoint description ("
            ),
            str(error),
        )


class SignalTests(SynchronousTestCase):
    """
    Running as the process, the proxy handles SIGUSR1 and SIGHUP without
    silencing the handlers that were there before it.
    """

    def setUp(self) -> None:
        for signum in (signal.SIGUSR1, signal.SIGHUP):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        # What startService freezes would stay frozen for every later test.
        self.patch(gc, "freeze", lambda: None)

    def test_sigusr1Chains(self) -> None:
        """
        SIGUSR1 reopens the proxy's logs (in the reactor thread), then runs
        the handler installed before it, such as twistd's, which rotates
        C{--logfile}; once the service has stopped, that handler is back.
        """
        calls: list[str] = []

        def twistdHandler(signum: int, frame: Any) -> None:
            calls.append(f"previous {signum}")

        signal.signal(signal.SIGUSR1, twistdHandler)
        h = makeHarness()
        h.reactor.callFromThread = lambda f, *a: calls.append("in reactor") or f(*a)  # type: ignore[attr-defined]
        service = ProxyService(h.factory, h.reactor)
        service.reopenLogs = lambda: calls.append("reopen")  # type: ignore[method-assign]
        service.installSignals = True
        service.startService()

        signal.getsignal(signal.SIGUSR1)(signal.SIGUSR1, None)  # type: ignore[operator]
        self.assertEqual(calls, ["in reactor", "reopen", f"previous {signal.SIGUSR1}"])

        stopped = service.stopService()
        h.protocol.connectionLost(None)
        self.successResultOf(stopped)
        self.assertIs(signal.getsignal(signal.SIGUSR1), twistdHandler)

    def test_noPreviousHandler(self) -> None:
        """
        With only the default action before it (SIGHUP's), the proxy's
        handler reloads the ACL and credentials and runs nothing else; the
        default is back once the service has stopped.
        """
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        calls: list[str] = []
        h = makeHarness()
        h.reactor.callFromThread = lambda f, *a: f(*a)  # type: ignore[attr-defined]
        self.patch(h.factory.access, "reload", lambda: calls.append("reload"))
        service = ProxyService(h.factory, h.reactor)
        service.installSignals = True
        service.startService()

        signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)  # type: ignore[operator]
        self.assertEqual(calls, ["reload"])

        stopped = service.stopService()
        h.protocol.connectionLost(None)
        self.successResultOf(stopped)
        self.assertEqual(signal.getsignal(signal.SIGHUP), signal.SIG_DFL)

    def test_chainSignal(self) -> None:
        """
        L{chainSignal} installs a handler that runs the new one, then the
        old one, and returns what it needs to put the old one back.
        """
        calls: list[str] = []

        def old(signum: int, frame: Any) -> None:
            calls.append("old")

        signal.signal(signal.SIGUSR1, old)
        signum, previous, installed = chainSignal(
            signal.SIGUSR1, lambda: calls.append("new")
        )
        self.assertEqual((signum, previous), (signal.SIGUSR1, old))
        self.assertIs(signal.getsignal(signal.SIGUSR1), installed)
        installed(signal.SIGUSR1, None)
        self.assertEqual(calls, ["new", "old"])


class BacklogTests(SynchronousTestCase):
    """
    The listen backlog of the proxy's listeners (C{listen_backlog}).
    """

    def listen(self, *argv: str) -> PluggableMemoryReactor:
        reactor = PluggableMemoryReactor()
        options = Options(environ={})
        options.parseOptions(["--access-log", "none", "--metrics", "none", *argv])
        service = makeService(options, reactor=reactor)
        service.privilegedStartService()
        self.addCleanup(service.stopService)
        return reactor

    def test_default(self) -> None:
        """
        Every tcp and tcp6 listener listens with a backlog of 1024 by
        default, not Twisted's 50.
        """
        reactor = self.listen(
            "--listen", "tcp:9090:interface=127.0.0.1", "--listen", "tcp6:9091"
        )
        self.assertEqual(
            [(port, backlog) for port, _, backlog, _ in reactor.tcpServers],
            [(9090, 1024), (9091, 1024)],
        )

    def test_configured(self) -> None:
        """
        C{--listen-backlog} (or its variable or key) reaches every listener,
        the TLS listener asking for client certificates too, except one
        whose description gives its own; the metrics listener keeps
        Twisted's.
        """
        directory = FilePath(self.mktemp())
        directory.makedirs()
        authority = Authority()
        cert, key, _ = authority.issue("proxy.test", ("127.0.0.1",))
        directory.child("server.pem").setContent(cert)
        directory.child("server.key").setContent(key)
        directory.child("clients.pem").setContent(authority.pem)
        mtls = (
            f"mtls:9443:interface=127.0.0.1:cert={directory.child('server.pem').path}"
            f":key={directory.child('server.key').path}"
            f":client_ca={directory.child('clients.pem').path}"
        )
        reactor = PluggableMemoryReactor()
        options = Options(environ={"EGRESSPROXY_LISTEN_BACKLOG": "4096"})
        options.parseOptions(
            [
                "--access-log",
                "none",
                "--listen",
                "tcp:9090:interface=127.0.0.1",
                "--listen",
                "tcp:9092:interface=127.0.0.1:backlog=7",
                "--listen",
                mtls,
            ]
        )
        self.assertEqual(options.config.listen_backlog, 4096)
        service = makeService(options, reactor=reactor)
        service.privilegedStartService()
        self.addCleanup(service.stopService)
        self.assertEqual(
            [(port, backlog) for port, _, backlog, _ in reactor.tcpServers],
            [(2112, 50), (9090, 4096), (9092, 7)],
        )
        self.assertEqual(
            [(port, backlog) for port, _, _, backlog, _ in reactor.sslServers],
            [(9443, 4096)],
        )

    def test_descriptions(self) -> None:
        """
        C{backlog=} is added to the kinds of endpoint that take it, unless
        given, and not to others (a systemd socket listens already), nor
        where a positional argument may already be the backlog.
        """
        self.assertEqual(withBacklog("tcp:9090", 9), "tcp:9090:backlog=9")
        self.assertEqual(
            withBacklog("unix:/run/p.sock:mode=600", 9),
            "unix:/run/p.sock:mode=600:backlog=9",
        )
        for unchanged in (
            "tcp:9090:backlog=3",
            "tcp:9090:127.0.0.1",
            "systemd:domain=INET:index=0",
        ):
            self.assertEqual(withBacklog(unchanged, 9), unchanged)

    def test_bounds(self) -> None:
        """
        A backlog must be 1 to 65535.
        """
        for bad in ("0", "65536", "many"):
            with self.assertRaises(ConfigError) as raised:
                load({"listen-backlog": bad}, {})
            self.assertIn("--listen-backlog", str(raised.exception))
        self.assertEqual(load({}, {}).listen_backlog, 1024)


def _catches(pid: int, signum: int) -> bool:
    """
    Whether process C{pid} has a handler for C{signum} (Linux).
    """
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    return False


class JSONProcessLogTests(SynchronousTestCase):
    """
    C{log_format: json}: the process log as one JSON object a line.
    """

    def event(self, observer: Any) -> None:
        observer(
            {
                "log_format": "Blocked {address}",
                "address": "10.0.0.1",
                "log_level": LogLevel.warn,
                "log_namespace": "test",
                "log_time": 1795000000.0,
            }
        )

    def test_standardOutput(self) -> None:
        """
        With C{-n} and no C{--logfile} (or C{--logfile -}), each event is one
        line of JSON on standard output, with its fields, and no record
        separator.
        """
        for twistdOptions in ({"nodaemon": True, "logfile": None}, {"logfile": "-"}):
            out = io.StringIO()
            self.patch(sys, "stdout", out)
            observer = tap.jsonProcessLog(twistdOptions)
            self.event(observer)
            self.event(observer)
            lines = out.getvalue().split("\n")
            self.assertEqual(lines[2:], [""])
            for line in lines[:2]:
                event = json.loads(line)
                self.assertEqual(
                    (event["log_format"], event["address"], event["log_time"]),
                    ("Blocked {address}", "10.0.0.1", 1795000000.0),
                )
                self.assertEqual(event["log_level"]["name"], "warn")

    def test_logFile(self) -> None:
        """
        With C{--logfile PATH}, the JSON lines go to that file.
        """
        path = self.mktemp()
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        observer = tap.jsonProcessLog({"nodaemon": False, "logfile": path})
        self.event(observer)
        with open(path, encoding="utf-8") as f:
            [line] = f.read().splitlines()
        self.assertEqual(json.loads(line)["address"], "10.0.0.1")

    def test_otherLoggers(self) -> None:
        """
        twistd's C{--syslog} and C{--logger} choose the process log
        themselves: with C{log_format: json}, start-up stops with one line.
        """
        for option in ("syslog", "logger"):
            error = self.assertRaises(
                ConfigError, tap.jsonProcessLog, {"nodaemon": True, option: "x"}
            )
            self.assertIn(f"twistd's --{option}", str(error))

    def test_application(self) -> None:
        """
        Given twistd's application as its parent, the service of
        C{--log-format json} sets the application's log observer, which
        twistd then logs to; with the default, text, it sets its own
        L{TextProcessLog} (twistd's format, written where twistd would),
        except where twistd chooses the log itself (C{--syslog}); for
        options not parsed by twistd it sets none.
        """
        from twisted.application.service import Application
        from twisted.logger import ILogObserver

        from proxy_app.observe import TextProcessLog

        for argv, parent, expected in (
            (["--log-format", "json"], {"nodaemon": True, "logfile": None}, True),
            ([], {"nodaemon": True, "logfile": None}, True),
            ([], {"nodaemon": True, "logfile": None, "syslog": True}, False),
            # Not under twistd (a .tac mounting the proxy): its choice.
            (["--log-format", "json"], None, False),
            ([], None, False),
        ):
            options = Options(environ={})
            options.parseOptions(["--access-log", "none", *argv])
            if parent is not None:
                options.parent = parent  # type: ignore[attr-defined]
            application = Application("egressproxy")
            makeService(options, reactor=PluggableMemoryReactor()).setServiceParent(
                application
            )
            observer = application.getComponent(ILogObserver, None)
            self.assertEqual(observer is not None, expected, argv)
            if expected and not argv:
                self.assertIsInstance(observer, TextProcessLog)

    def test_twistdTextDecisionLines(self) -> None:
        """
        Under twistd, in text, a decision line written while the proxy runs
        reaches the process log, in twistd's format, and is written out
        when SIGTERM stops the proxy, not lost with the batch it waited in.
        """
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "egressproxy",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--metrics",
                "none",
                "--access-log",
                "none",
            ],
            env=dict(os.environ, PYTHONPATH=ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(process.wait, 10)
        self.addCleanup(process.kill)
        assert process.stdout is not None
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            line = process.stdout.readline().decode("utf-8")
            if not line:
                break
            found = re.search(r"starting on (\d+)", line)
            if found:
                port = int(found.group(1))
        self.assertIsNotNone(port)
        while time.monotonic() < deadline and not _catches(process.pid, signal.SIGTERM):
            time.sleep(0.02)
        # Refused by the address policy: nothing is connected to.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(client.recv(65536).startswith(b"HTTP/1.1 403"))
        process.send_signal(signal.SIGTERM)
        rest, errors = process.communicate(timeout=20)
        decisions = [
            line
            for line in rest.decode("utf-8").splitlines()
            if "CANONICAL-PROXY-DECISION" in line
        ]
        self.assertEqual(len(decisions), 1, rest)
        self.assertRegex(
            decisions[0],
            r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} "
            r"\[egressproxy\.decision#info\] msg=CANONICAL-PROXY-DECISION id=\S+ "
            r"proxy_type=http requested_host=127\.0\.0\.1:1 ",
        )

    def test_ownsTextProcessLog(self) -> None:
        """
        The proxy writes the text process log itself only where twistd
        would write a file or standard output: not with C{--syslog} or
        C{--logger}, nor for a daemon told to log to standard output (which
        twistd refuses).
        """
        from proxy_app.tap import ownsTextProcessLog

        for options, expected in (
            ({"nodaemon": True, "logfile": None}, True),
            ({"nodaemon": False, "logfile": "x.log"}, True),
            ({"nodaemon": True, "logfile": "-"}, True),
            ({"nodaemon": False, "logfile": "-"}, False),
            ({"nodaemon": True, "logfile": None, "syslog": True}, False),
            ({"nodaemon": True, "logfile": None, "logger": "m.f"}, False),
        ):
            self.assertEqual(ownsTextProcessLog(options), expected, options)

    def test_twistd(self) -> None:
        """
        Under twistd, with C{EGRESSPROXY_LOG_FORMAT=json}, every line the
        process writes is one JSON object, an event with its fields: the
        proxy's open-file limit line has its C{limit} as a number.
        """
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "egressproxy",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--metrics",
                "none",
                "--access-log",
                "none",
            ],
            env=dict(os.environ, PYTHONPATH=ROOT, EGRESSPROXY_LOG_FORMAT="json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(process.wait, 10)
        self.addCleanup(process.kill)
        assert process.stdout is not None
        events = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            events.append(json.loads(line))
            if "starting on" in events[-1].get("log_text", ""):
                break
        # SIGTERM only once the reactor runs and handles it (before, it
        # would kill the process, which would write nothing more).
        while time.monotonic() < deadline and not _catches(process.pid, signal.SIGTERM):
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        rest, errors = process.communicate(timeout=20)
        for line in rest.splitlines():
            events.append(json.loads(line))
        self.assertEqual(errors, b"")
        [limit] = [
            e for e in events if e.get("log_format") == "Open-file limit: {limit}"
        ]
        self.assertIsInstance(limit["limit"], int)
        self.assertEqual(limit["log_namespace"], "proxy_app.tap")
        # Twisted logs the signal through its new logger from 24.7 on, and
        # through the legacy log (as log_text) before.
        self.assertTrue(
            [
                e
                for e in events
                if "Received SIGTERM" in str(e.get("log_format", ""))
                or "Received SIGTERM" in str(e.get("log_text", ""))
            ],
            events,
        )
        for event in events:
            self.assertIn("log_time", event)
            self.assertIn("log_level", event)
