"""
C{--workers}: several processes sharing the listening port, run for real on
loopback.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

import attr
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ProxyAgent, readBody
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from proxy_app.addresses import RULE_SELF_CONNECTION
from proxy_app.config import Limits
from proxy_app.limits import PER_REQUEST, PROXY_WIDE, workerLimits, workerShare
from proxy_app.observe import AccessLog
from proxy_app.resolver import SafeResolver
from proxy_app.server import ProxyFactory
from proxy_app.tap import (
    Options,
    ProxyService,
    buildPolicy,
    makeService,
    proxySelfAddresses,
)
from proxy_app.upstream import Connector
from proxy_app.workers import WorkerSupervisor

from .helpers import PluggableMemoryReactor, ScriptedNameResolver, parseResponse
from .test_integration import Echo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Exit(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred = Deferred()

    def processEnded(self, reason: object) -> None:
        self.reason = reason
        self.ended.callback(None)


def _freePortRun(host: str, count: int, avoid: int) -> int:
    """
    The first of C{count} consecutive TCP ports free on C{host}, taken below
    the kernel's ephemeral range (32768 and up on Linux), where the
    outgoing connections of whatever else runs on the machine would take
    them between our check and the workers' bind.
    """
    import random
    import socket

    for _ in range(200):
        first = random.randrange(20000, 32000)
        ports = range(first, first + count)
        if avoid in ports:
            continue
        sockets = []
        try:
            for candidate in ports:
                s = socket.socket(socket.AF_INET)
                sockets.append(s)
                s.bind((host, candidate))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return first
    raise RuntimeError(f"no {count} consecutive free ports on {host}")


def _stop(process: Any, exit: _Exit) -> Deferred:
    """
    Stop a supervisor that a failed test left running: SIGTERM, so that it
    stops its workers too (SIGKILL would orphan them), and SIGKILL only if
    it has not ended in 10 s.
    """
    if exit.ended.called:
        return exit.ended
    process.signalProcess("TERM")
    killer = reactor.callLater(
        10, lambda: exit.ended.called or process.signalProcess("KILL")
    )
    return exit.ended.addBoth(lambda result: killer.active() and killer.cancel())


class _Held(Resource):
    """
    An origin whose answers wait until the test releases them, so that a
    request can be in flight while the proxy drains.

    @ivar arrived: fires when a request has arrived.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Any] = []
        self.arrived: Deferred = Deferred()

    def render_GET(self, request):  # type: ignore[no-untyped-def]
        self.waiting.append(request)
        if not self.arrived.called:
            self.arrived.callback(None)
        return NOT_DONE_YET

    def release(self) -> None:
        for request in self.waiting:
            request.write(b"held")
            request.finish()
        self.waiting = []


@inlineCallbacks
def _fetch(agent: Agent, url: str):  # type: ignore[no-untyped-def]
    """
    GET C{url}; the status and the body.
    """
    response = yield agent.request(b"GET", url.encode())
    body = yield readBody(response)
    return response.code, body


def _samples(text: bytes, name: str) -> dict[str, float]:
    """
    The samples named C{name} in a Prometheus text page, by their labels.
    """
    result = {}
    for line in text.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, value = line.rsplit(" ", 1)
            result[series[len(name) :]] = float(value)
    return result


class WorkersTests(TestCase):
    """
    A supervisor with two workers, as twistd runs it.
    """

    timeout = 60

    @inlineCallbacks
    def test_twoWorkers(self):  # type: ignore[no-untyped-def]
        """
        Both workers serve the shared port; one scrape of the configured
        metrics port counts the requests of both, and shows each process;
        /healthcheck there answers 503 until both workers listen, 200 then,
        and 503 from SIGTERM to the supervisor until its workers have
        drained, while a request in flight still completes; then nothing
        listens any more.
        """
        held = _Held()
        root = Resource()
        root.putChild(b"w", Echo())
        root.putChild(b"held", held)
        origin = reactor.listenTCP(0, Site(root), interface="127.0.0.2")
        self.addCleanup(origin.stopListening)
        originURL = f"http://127.0.0.2:{origin.getHost().port}"
        port = _freePortRun("127.0.0.1", 1, avoid=0)
        metrics = _freePortRun("127.0.0.1", 1, avoid=port)
        env = dict(os.environ, PYTHONPATH=ROOT)
        exit = _Exit()
        process = reactor.spawnProcess(
            exit,
            sys.executable,
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "--logfile",
                self.mktemp(),
                "egressproxy",
                "--workers",
                "2",
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--metrics",
                f"tcp:{metrics}:interface=127.0.0.1",
                "--allow-range",
                "127.0.0.2/32",
                "--access-log",
                "none",
            ],
            env=env,
        )
        self.addCleanup(_stop, process, exit)

        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        health = f"http://127.0.0.1:{metrics}/healthcheck"
        seen = set()
        for _ in range(200):
            try:
                status, body = yield _fetch(agent, health)
            except Exception as e:
                status, body = None, repr(e).encode()
            seen.add((status, body))
            if status == 200:
                break
            yield deferLater(reactor, 0.05)
        else:
            self.fail(f"the instance never became healthy: {seen}")
        self.assertEqual(body, b"ok\n")
        # While the workers start, the supervisor already answers, with 503.
        for status, body in seen - {(200, b"ok\n")}:
            if status is None:
                # Not listening yet: the connection was refused.
                self.assertIn(b"ConnectionRefusedError", body)
                continue
            self.assertEqual(status, 503)
            self.assertTrue(body.startswith(b"workers not ready: "), body)

        proxy = ProxyAgent(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port),
            reactor,
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        servedBy = set()
        for _ in range(40):
            response = yield proxy.request(b"GET", f"{originURL}/w".encode())
            yield readBody(response)
            self.assertEqual(response.code, 200)
            # The id's first part is the serving process's.
            [requestID] = response.headers.getRawHeaders(b"request-id")
            servedBy.add(requestID.split(b"-")[0])
        self.assertEqual(len(servedBy), 2, servedBy)

        status, page = yield _fetch(agent, f"http://127.0.0.1:{metrics}/metrics")
        self.assertEqual(status, 200)
        self.assertEqual(
            _samples(page, "egressproxy_requests_total"),
            {'{decision="allow",proxy_type="http",reason_code=""}': 40.0},
        )
        self.assertEqual(
            _samples(page, "egressproxy_active_client_connections"),
            {f'{{listener="tcp:{port}:interface=127.0.0.1"}}': 0.0},
        )
        self.assertEqual(
            sorted(_samples(page, "process_open_fds")),
            ['{worker="0"}', '{worker="1"}', '{worker="supervisor"}'],
        )

        # A request in flight when SIGTERM comes.
        inFlight = proxy.request(b"GET", f"{originURL}/held".encode())
        yield held.arrived
        process.signalProcess(signal.SIGTERM)
        for _ in range(100):
            status, body = yield _fetch(agent, health)
            if status == 503:
                break
            yield deferLater(reactor, 0.05)
        self.assertEqual((status, body), (503, b"draining\n"))
        self.assertFalse(exit.ended.called)
        held.release()
        response = yield inFlight
        self.assertEqual((response.code, (yield readBody(response))), (200, b"held"))

        yield exit.ended
        # twistd ends by re-raising the signal it stopped for.
        self.assertEqual(exit.reason.value.signal, signal.SIGTERM)  # type: ignore[attr-defined]
        # The supervisor waited for its workers: nothing listens any more.
        from twisted.internet.endpoints import connectProtocol
        from twisted.internet.error import ConnectionRefusedError
        from twisted.internet.protocol import Protocol

        for closed in (port, metrics):
            yield self.assertFailure(
                connectProtocol(
                    TCP4ClientEndpoint(reactor, "127.0.0.1", closed), Protocol()
                ),
                ConnectionRefusedError,
            )


class PartsTests(SynchronousTestCase):
    """
    The pieces of --workers.
    """

    def test_workerCommand(self) -> None:
        """
        Each worker runs twistd egressproxy with the supervisor's options,
        its index and the descriptor it reports its state on, on the same
        code.
        """
        supervisor = WorkerSupervisor(
            reactor, 2, ["--workers", "2", "--listen", "tcp:9090"]
        )
        command = supervisor.command(1)
        self.assertEqual(
            command[command.index("egressproxy") :],
            [
                "egressproxy",
                "--workers",
                "2",
                "--listen",
                "tcp:9090",
                "--workers",
                "2",
                "--worker-index",
                "1",
                "--worker-status-fd",
                "3",
            ],
        )
        self.assertTrue(supervisor.environment()["PYTHONPATH"].startswith(ROOT))

    def test_workerLearnsCount(self) -> None:
        """
        A worker reads the number of workers the supervisor runs from its
        command line, whatever the supervisor's own options say (C{auto}
        is not counted again), and its own index.
        """
        supervisor = WorkerSupervisor(
            reactor, 3, ["--workers", "auto", "--listen", "tcp:9090"]
        )
        command = supervisor.command(2)
        options = Options(environ={"EGRESSPROXY_WORKERS": "5"})
        options.parseOptions(command[command.index("egressproxy") + 1 :])
        self.assertEqual((options.config.workers, options["worker-index"]), (3, 2))


def _workerOptions(*argv: str) -> Options:
    """
    The options of worker 1 of a C{--workers} proxy, as the supervisor
    starts it, with loopback allowed so that only self-connection denies.
    """
    options = Options(environ={})
    options.parseOptions(
        [
            "--listen",
            "tcp:9090:interface=127.0.0.1",
            "--metrics",
            "tcp:2112:interface=127.0.0.1",
            "--allow-range",
            "127.0.0.0/8",
            *argv,
            "--worker-index",
            "1",
        ]
    )
    return options


class SelfConnectionTests(SynchronousTestCase):
    """
    Every port any worker listens on is a self-connection for every worker,
    not only that worker's own.
    """

    def test_supervisorsMetrics(self) -> None:
        """
        The self addresses of a worker of three are the shared listener and
        the configured metrics endpoint, which the supervisor serves for
        them all, and the address policy denies each as a self-connection;
        the ports after the metrics port are not the proxy's.
        """
        config = _workerOptions("--workers", "3").config
        self.assertEqual(
            sorted(proxySelfAddresses(config)),
            [("127.0.0.1", 2112), ("127.0.0.1", 9090)],
        )
        policy = buildPolicy(config)
        for port in (9090, 2112):
            self.assertEqual(
                policy.decide("127.0.0.1", port).rule, RULE_SELF_CONNECTION, port
            )
        self.assertTrue(policy.decide("127.0.0.1", 2113).allowed)

    def test_highMetricsPort(self) -> None:
        """
        Any metrics port will do with --workers: the workers need no ports
        after it.
        """
        options = Options(environ={})
        options.parseOptions(
            ["--workers", "4", "--metrics", "tcp:65535:interface=127.0.0.1"]
        )
        self.assertEqual(options.config.metrics, "tcp:65535:interface=127.0.0.1")

    def test_singleProcess(self) -> None:
        """
        Without --workers, the self addresses are the listeners and the
        configured metrics endpoint, and nothing else.
        """
        options = Options(environ={})
        options.parseOptions(
            ["--listen", "tcp:9090", "--metrics", "tcp:2112:interface=127.0.0.1"]
        )
        self.assertEqual(
            sorted(proxySelfAddresses(options.config)),
            [("", 9090), ("127.0.0.1", 2112)],
        )
        options = Options(environ={})
        options.parseOptions(["--listen", "tcp:9090", "--metrics", "none"])
        self.assertEqual(proxySelfAddresses(options.config), [("", 9090)])

    def test_metricsRefused(self) -> None:
        """
        Worker 1 of two refuses a request for the supervisor's C{/metrics}
        with 403 and reason code 1000 (self-connection) before any
        connection is attempted, while another port on the same allowed
        address is connected to.
        """
        config = _workerOptions("--workers", "2").config
        reactor = PluggableMemoryReactor()
        resolver = SafeResolver(buildPolicy(config), ScriptedNameResolver({}), reactor)
        factory = ProxyFactory(
            config,
            resolver,
            reactor,
            Connector(reactor, config.timeouts.connect),
            AccessLog(None),
        )
        for port in (2112,):
            client = StringTransport()
            protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
            protocol.makeConnection(client)
            protocol.dataReceived(
                b"GET http://127.0.0.1:%d/metrics HTTP/1.1\r\nHost: "
                b"127.0.0.1:%d\r\n\r\n" % (port, port)
            )
            self.assertEqual(reactor.tcpClients, [], port)
            status, headers, _ = parseResponse(client.value())
            self.assertEqual(
                (status, headers[b"x-whsentry-reasoncode"]), (403, b"1000"), port
            )
            self.assertIn(b"Self Connection", headers[b"x-whsentry-reason"])
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(
            b"GET http://127.0.0.1:2113/ HTTP/1.1\r\nHost: 127.0.0.1:2113\r\n\r\n"
        )
        self.assertEqual(
            [(host, port) for host, port, *_ in reactor.tcpClients],
            [("127.0.0.1", 2113)],
        )


def _workerService(index: int, *argv: str) -> tuple[MemoryReactorClock, ProxyFactory]:
    """
    Build worker C{index} of a C{--workers} proxy with L{makeService} on a
    memory reactor.

    @return: the reactor and the worker's proxy factory.
    """
    reactor = PluggableMemoryReactor()
    options = Options(environ={})
    options.parseOptions(["--access-log", "none", *argv, "--worker-index", str(index)])
    service = makeService(options, reactor=reactor)
    [proxy] = [child for child in service if isinstance(child, ProxyService)]
    return reactor, proxy.factory


def _get(factory: ProxyFactory, url: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """
    Send one request for C{url} on a new client connection to C{factory}.

    @return: what L{parseResponse} makes of the answer so far.
    """
    client = StringTransport()
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(client)
    protocol.dataReceived(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % (url,))
    return parseResponse(client.value()) if client.value() else (0, {}, b"")


class LimitShareTests(SynchronousTestCase):
    """
    The configured rate and concurrency limits are the proxy's: the workers
    of --workers divide them.
    """

    def test_shares(self) -> None:
        """
        Whole-number shares differ by at most one and add up to the total;
        0 (no limit) stays 0; a share is never 0 for a limit below the
        number of workers, so burst 1 with two workers is 1 in each.
        """
        self.assertEqual([workerShare(10, 3, i) for i in range(3)], [4, 3, 3])
        self.assertEqual([workerShare(7, 7, i) for i in range(7)], [1] * 7)
        self.assertEqual([workerShare(1, 2, i) for i in range(2)], [1, 1])
        self.assertEqual([workerShare(2, 4, i) for i in range(4)], [1, 1, 1, 1])
        self.assertEqual([workerShare(0, 3, i) for i in range(3)], [0, 0, 0])
        for total in range(1, 50):
            for workers in range(1, 9):
                shares = [workerShare(total, workers, i) for i in range(workers)]
                self.assertEqual(sum(shares), max(total, workers), (total, workers))
                self.assertLessEqual(max(shares) - min(shares), 1)

    def test_workerLimits(self) -> None:
        """
        A worker's limits: the rate divided by the number of workers, the
        burst and the concurrency limits shared out, and the limits of a
        single request kept whole.  One process keeps them all.
        """
        limits = Limits(
            max_request_rate=10,
            request_burst=1,
            max_concurrent_requests=5,
            max_concurrent_tunnels=0,
            max_response_body=1000,
            max_header_count=7,
        )
        first, second = (workerLimits(limits, 2, index) for index in range(2))
        self.assertEqual(
            [
                (
                    w.max_request_rate,
                    w.request_burst,
                    w.max_concurrent_requests,
                    w.max_concurrent_tunnels,
                )
                for w in (first, second)
            ],
            [(5.0, 1, 3, 0), (5.0, 1, 2, 0)],
        )
        for name in PER_REQUEST:
            self.assertEqual(getattr(second, name), getattr(limits, name), name)
        self.assertIs(workerLimits(limits, 1, 0), limits)

    def test_everyLimitDecided(self) -> None:
        """
        Every key of the limits section is either divided between workers
        or applied whole to each request: a new limit needs that decision.
        """
        names = {a.name for a in attr.fields(Limits)}
        self.assertEqual(PROXY_WIDE | PER_REQUEST, names)
        self.assertEqual(PROXY_WIDE & PER_REQUEST, set())

    def test_workerEnforcesItsRate(self) -> None:
        """
        Worker 1 of two, with max_request_rate 10 and request_burst 1,
        allows one request and refuses the next with 429 (reason code
        1014), and refills at 5 per second: 0.1 s later it still refuses,
        0.2 s later it allows one again.
        """
        reactor, factory = _workerService(
            1, "--workers", "2", "--max-request-rate", "10", "--request-burst", "1"
        )
        assert factory.rateLimiter is not None
        self.assertEqual(
            (factory.rateLimiter.rate, factory.rateLimiter.burst), (5.0, 1)
        )
        # 10.0.0.1 is denied by the address policy, after the rate limit.
        self.assertEqual(_get(factory, b"http://10.0.0.1/")[0], 403)
        status, headers, _ = _get(factory, b"http://10.0.0.1/")
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (429, b"1014"))
        reactor.advance(0.1)
        self.assertEqual(_get(factory, b"http://10.0.0.1/")[0], 429)
        reactor.advance(0.1)
        self.assertEqual(_get(factory, b"http://10.0.0.1/")[0], 403)

    def test_workerEnforcesItsConcurrency(self) -> None:
        """
        With max_concurrent_requests 3 and two workers, worker 0 runs two
        requests at once and worker 1 one; the next gets 503 (1014).
        """
        for index, share in ((0, 2), (1, 1)):
            reactor, factory = _workerService(
                index,
                "--workers",
                "2",
                "--max-concurrent-requests",
                "3",
                "--allow-range",
                "10.0.0.0/8",
            )
            for _ in range(share):
                self.assertEqual(_get(factory, b"http://10.0.0.1/")[0], 0)
            self.assertEqual(len(reactor.tcpClients), share)
            status, headers, _ = _get(factory, b"http://10.0.0.1/")
            self.assertEqual(status, 503, index)
            self.assertEqual(headers[b"x-whsentry-reasoncode"], b"1014")


class _FakeProcess:
    """
    What L{_SpawningReactor.spawnProcess} returns: a process that records
    the signals sent to it.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[Any] = []

    def signalProcess(self, signum: Any) -> None:
        self.signals.append(signum)


class _SpawningReactor(MemoryReactorClock):
    """
    A memory reactor whose C{spawnProcess} records each worker started.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, dict[str, str], dict[int, Any], Any]] = []

    def spawnProcess(  # type: ignore[override]
        self,
        protocol: Any,
        executable: str,
        args: list[str],
        env: dict[str, str],
        childFDs: dict[int, Any],
    ) -> _FakeProcess:
        process = _FakeProcess(40000 + len(self.spawned))
        self.spawned.append((protocol, env, childFDs, process))
        return process


def _ended(protocol: Any) -> None:
    """
    Tell the supervisor that the worker of C{protocol} ended, killed.
    """
    from twisted.internet.error import ProcessTerminated
    from twisted.python.failure import Failure

    protocol.processEnded(Failure(ProcessTerminated(signal=9)))


class SupervisorTests(SynchronousTestCase):
    """
    The supervisor's side of metrics and health: the directory the workers
    write their metrics in, and what /healthcheck answers.
    """

    def setUp(self) -> None:
        # startService installs handlers for these; give them back.
        for signum in (signal.SIGHUP, signal.SIGUSR1):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        self.reactor = _SpawningReactor()

    def supervisor(self, count: int = 2) -> WorkerSupervisor:
        supervisor = WorkerSupervisor(
            self.reactor, count, ["--workers", str(count)], collectMetrics=True
        )
        supervisor.startService()
        self.addCleanup(supervisor._removeMetricsDirectory)
        return supervisor

    def test_metricsDirectory(self) -> None:
        """
        On start the supervisor makes a new directory only its user can
        enter, points every worker's prometheus-client at it
        (PROMETHEUS_MULTIPROC_DIR, whatever it inherited) and opens a pipe
        for each worker's state on descriptor 3; once every worker has
        ended after SIGTERM, the directory is gone.
        """
        self.patch(os, "environ", dict(os.environ, PROMETHEUS_MULTIPROC_DIR="/x"))
        supervisor = self.supervisor()
        directory = supervisor.metricsDirectory
        assert directory is not None
        info = os.stat(directory)
        self.assertEqual(info.st_mode & 0o777, 0o700)
        self.assertEqual(info.st_uid, os.getuid())
        self.assertEqual(len(self.reactor.spawned), 2)
        for _, env, childFDs, _ in self.reactor.spawned:
            self.assertEqual(env["PROMETHEUS_MULTIPROC_DIR"], directory)
            self.assertEqual(childFDs, {0: "w", 1: 1, 2: 2, 3: "r"})
        stopped = supervisor.stopService()
        self.assertTrue(os.path.isdir(directory))
        for protocol, _, _, process in self.reactor.spawned:
            self.assertEqual(process.signals, ["TERM"])
            _ended(protocol)
        self.successResultOf(stopped)
        self.assertFalse(os.path.exists(directory))
        self.assertIsNone(supervisor.metricsDirectory)

    def test_signalWaitsForReady(self) -> None:
        """
        SIGHUP sent while a worker starts reaches it only once it says it
        listens (its handlers are installed by then; SIGHUP's default action
        would kill it); a ready worker gets it at once, and a worker that
        ends before it is ready is not signalled.
        """
        supervisor = self.supervisor()
        (first, _, _, firstProcess), (second, _, _, secondProcess) = (
            self.reactor.spawned
        )
        first.childDataReceived(3, b"ready\n")
        supervisor.signal(signal.SIGHUP)
        supervisor.signal(signal.SIGHUP)
        self.assertEqual(firstProcess.signals, [signal.SIGHUP, signal.SIGHUP])
        self.assertEqual(secondProcess.signals, [])
        second.childDataReceived(3, b"ready\n")
        self.assertEqual(secondProcess.signals, [signal.SIGHUP])
        supervisor.stopService()
        for protocol, _, _, _ in self.reactor.spawned:
            _ended(protocol)

    def test_noMetrics(self) -> None:
        """
        Without a metrics endpoint there is no directory, and the workers'
        prometheus-client is not in multiprocess mode even if the
        supervisor's environment says so.
        """
        self.patch(os, "environ", dict(os.environ, PROMETHEUS_MULTIPROC_DIR="/x"))
        supervisor = WorkerSupervisor(self.reactor, 1, [])
        supervisor.startService()
        self.assertIsNone(supervisor.metricsDirectory)
        [(_, env, _, _)] = self.reactor.spawned
        self.assertNotIn("PROMETHEUS_MULTIPROC_DIR", env)

    def test_health(self) -> None:
        """
        The instance is healthy once every worker has said it listens, and
        not while one is missing (ended, not yet restarted, or restarted
        and not yet listening), while one drains, or from the supervisor's
        stop.
        """
        supervisor = self.supervisor()
        first, second = (spawned[0] for spawned in self.reactor.spawned)
        self.assertEqual(
            supervisor.unhealthyReason(), "workers not ready: 0 of 2 listening"
        )
        first.childDataReceived(3, b"rea")
        first.childDataReceived(3, b"dy\n")
        self.assertEqual(
            supervisor.unhealthyReason(), "workers not ready: 1 of 2 listening"
        )
        # Only the status pipe counts.
        second.childDataReceived(1, b"ready\n")
        self.assertFalse(supervisor.healthy())
        second.childDataReceived(3, b"ready\n")
        self.assertTrue(supervisor.healthy())
        self.assertIsNone(supervisor.unhealthyReason())

        second.childDataReceived(3, b"draining\n")
        self.assertEqual(supervisor.unhealthyReason(), "draining")
        _ended(second)
        self.assertEqual(
            supervisor.unhealthyReason(), "workers not ready: 1 of 2 listening"
        )
        self.reactor.advance(supervisor.restartDelay)
        restarted = self.reactor.spawned[-1][0]
        self.assertFalse(supervisor.healthy())
        restarted.childDataReceived(3, b"ready\n")
        self.assertTrue(supervisor.healthy())

        supervisor.stopService()
        self.assertEqual(supervisor.unhealthyReason(), "draining")

    def test_healthcheckResource(self) -> None:
        """
        The supervisor's /healthcheck answers 503 with the reason until the
        instance is healthy, then 200.
        """
        from twisted.web.test.requesthelper import DummyRequest

        from proxy_app.observe import MetricsResource, instanceRegistry

        supervisor = self.supervisor(1)
        resource = MetricsResource(
            instanceRegistry(lambda: None, supervisor.processes),
            supervisor.healthy,
            supervisor.unhealthyReason,
        )

        def get() -> tuple[int, bytes]:
            request = DummyRequest([b"healthcheck"])
            request.path = b"/healthcheck"
            body = resource.render_GET(request)
            return request.responseCode or 200, body

        self.assertEqual(get(), (503, b"workers not ready: 0 of 1 listening\n"))
        self.reactor.spawned[0][0].childDataReceived(3, b"ready\n")
        self.assertEqual(get(), (200, b"ok\n"))
        supervisor.stopService()
        self.assertEqual(get(), (503, b"draining\n"))

    def test_deadWorkersGauges(self) -> None:
        """
        When a worker ends, its live gauges' file goes (its open connections
        are no longer counted) and its counters' file stays (the sums never
        go back); the worker is no longer among the processes whose
        metrics are read.
        """
        supervisor = self.supervisor(1)
        directory = supervisor.metricsDirectory
        assert directory is not None
        [(protocol, _, _, process)] = self.reactor.spawned
        self.assertEqual(supervisor.processes(), {"0": process.pid})
        for name in (f"gauge_livesum_{process.pid}.db", f"counter_{process.pid}.db"):
            with open(os.path.join(directory, name), "wb"):
                pass
        _ended(protocol)
        self.assertEqual(sorted(os.listdir(directory)), [f"counter_{process.pid}.db"])
        self.assertEqual(supervisor.processes(), {})


class WorkerStatusTests(SynchronousTestCase):
    """
    A worker's side of the status pipe.
    """

    def test_readyThenDraining(self) -> None:
        """
        L{WorkerStatus} writes C{ready} when it starts and C{draining} when
        it stops; a worker built with a status descriptor has it as its
        last service, so that it starts after the listeners and stops
        before them.
        """
        from proxy_app.workers import WorkerStatus

        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        reactor = PluggableMemoryReactor()
        options = Options(environ={})
        options.parseOptions(
            [
                "--access-log",
                "none",
                "--workers",
                "2",
                "--worker-index",
                "0",
                "--worker-status-fd",
                str(write),
            ]
        )
        service = makeService(options, reactor=reactor)
        status = list(service)[-1]
        self.assertIsInstance(status, WorkerStatus)
        service.privilegedStartService()
        service.startService()
        self.assertEqual(os.read(read, 100), b"ready\n")
        service.stopService()
        self.assertEqual(os.read(read, 100), b"draining\n")

    def test_workerServesNoMetrics(self) -> None:
        """
        A worker binds its shared listener but no metrics port: the
        supervisor serves the metrics.
        """
        reactor = PluggableMemoryReactor()
        options = Options(environ={})
        options.parseOptions(
            ["--access-log", "none", "--workers", "2", "--worker-index", "1"]
        )
        service = makeService(options, reactor=reactor)
        listeners = [child for child in service if hasattr(child, "listener")]
        self.assertEqual(
            [(child.listener, child.shared) for child in listeners],
            [("tcp:9090:interface=127.0.0.1", True)],
        )

    def test_supervisorServesMetrics(self) -> None:
        """
        The supervisor binds the configured metrics endpoint, and nothing
        else, before it starts any worker; it is stopped after the workers.
        """
        reactor = _SpawningReactor()
        options = Options(environ={})
        options.parseOptions(
            ["--workers", "2", "--metrics", "tcp:2112:interface=127.0.0.1"]
        )
        service = makeService(options, reactor=reactor)
        children = list(service)
        self.assertEqual(
            [type(child).__name__ for child in children],
            ["_Listener", "WorkerSupervisor"],
        )
        service.privilegedStartService()
        self.assertEqual(
            [(port, interface) for port, _, _, interface in reactor.tcpServers],
            [(2112, "127.0.0.1")],
        )
        self.assertEqual(reactor.spawned, [])


class SharedListenTests(SynchronousTestCase):
    """
    L{sharedListen}, the listener of a worker.
    """

    def test_backlog(self) -> None:
        """
        The shared socket listens with the configured backlog, or with the
        one the description gives.
        """
        from proxy_app.workers import sharedListen

        backlogs = []

        class Recording(socket.socket):
            def listen(self, backlog: int = 0) -> None:
                backlogs.append(backlog)
                super().listen(backlog)

        class Adopting(MemoryReactorClock):
            def adoptStreamPort(self, fd: int, family: Any, factory: Any) -> None:
                pass

        for description in (
            "tcp:0:interface=127.0.0.1",
            "tcp:0:interface=127.0.0.1:backlog=7",
        ):
            sharedListen(
                Adopting(), description, None, backlog=1024, socketFactory=Recording
            )
        self.assertEqual(backlogs, [1024, 7])


class SharedListenLeanTests(TestCase):
    """
    A worker's listener makes lean transports, as a single process's do.
    """

    def test_lean(self) -> None:
        """
        L{sharedListen} on the real reactor returns a TCP port whose
        connections are L{proxy_app.transport.LeanServer}s.
        """
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory

        from proxy_app.transport import LeanServer
        from proxy_app.workers import sharedListen

        factory = Factory()
        factory.noisy = False
        port = sharedListen(reactor, "tcp:0:interface=127.0.0.1", factory)
        self.addCleanup(port.stopListening)
        self.assertIs(port.transport, LeanServer)
