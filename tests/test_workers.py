"""
C{--workers}: several processes sharing the listening port, run for real on
loopback.
"""

from __future__ import annotations

import os
import signal
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
from twisted.web.server import Site

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
    workerMetrics,
)
from proxy_app.upstream import Connector
from proxy_app.workers import WorkerSupervisor

from .helpers import PluggableMemoryReactor, ScriptedNameResolver, parseResponse
from .test_integration import Echo, freePort

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


class WorkersTests(TestCase):
    """
    A supervisor with two workers, as twistd runs it.
    """

    timeout = 60

    @inlineCallbacks
    def test_twoWorkers(self):  # type: ignore[no-untyped-def]
        """
        Both workers serve the shared port, each reports its own metrics on
        the metrics port plus its index, and SIGTERM to the supervisor stops
        them all.
        """
        origin = reactor.listenTCP(0, Site(Echo()), interface="127.0.0.2")
        self.addCleanup(origin.stopListening)
        port = freePort("127.0.0.1")
        metrics = _freePortRun("127.0.0.1", 2, avoid=port)
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

        agent = Agent(reactor)
        for metricsPort in (metrics, metrics + 1):
            for _ in range(100):
                try:
                    response = yield agent.request(
                        b"GET", f"http://127.0.0.1:{metricsPort}/healthcheck".encode()
                    )
                    yield readBody(response)
                    break
                except Exception:
                    yield deferLater(reactor, 0.1)
            else:
                self.fail(f"worker metrics on {metricsPort} never came up")

        pool = HTTPConnectionPool(reactor, persistent=False)
        proxy = ProxyAgent(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port), reactor, pool=pool
        )
        for _ in range(40):
            response = yield proxy.request(
                b"GET", f"http://127.0.0.2:{origin.getHost().port}/w".encode()
            )
            yield readBody(response)
            self.assertEqual(response.code, 200)

        served = []
        for metricsPort in (metrics, metrics + 1):
            response = yield agent.request(
                b"GET", f"http://127.0.0.1:{metricsPort}/metrics".encode()
            )
            body = yield readBody(response)
            line = [
                text
                for text in body.decode().splitlines()
                if text.startswith(
                    'egressproxy_requests_total{decision="allow",proxy_type="http"'
                )
            ]
            served.append(float(line[0].split()[-1]) if line else 0.0)
        self.assertEqual(sum(served), 40)
        self.assertTrue(all(count > 0 for count in served), served)

        process.signalProcess(signal.SIGTERM)
        yield exit.ended
        # twistd ends by re-raising the signal it stopped for.
        self.assertEqual(exit.reason.value.signal, signal.SIGTERM)  # type: ignore[attr-defined]
        # The supervisor waited for its workers: nothing listens any more.
        from twisted.internet.endpoints import connectProtocol
        from twisted.internet.error import ConnectionRefusedError
        from twisted.internet.protocol import Protocol

        yield self.assertFailure(
            connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol()),
            ConnectionRefusedError,
        )


class PartsTests(SynchronousTestCase):
    """
    The pieces of --workers.
    """

    def test_workerMetrics(self) -> None:
        """
        Worker N's metrics endpoint is the configured port plus N.
        """
        self.assertEqual(
            workerMetrics("tcp:2112:interface=127.0.0.1", 0),
            "tcp:2112:interface=127.0.0.1",
        )
        self.assertEqual(
            workerMetrics("tcp:2112:interface=127.0.0.1", 3),
            "tcp:2115:interface=127.0.0.1",
        )
        self.assertEqual(workerMetrics("tcp:port=2112", 1), "tcp:port=2113")

    def test_workerCommand(self) -> None:
        """
        Each worker runs twistd egressproxy with the supervisor's options
        and its index, on the same code.
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

    def test_everyWorkersMetrics(self) -> None:
        """
        The self addresses of a worker of three are the shared listener and
        the metrics ports of all three workers (the configured port plus 0,
        1 and 2), and the address policy denies each as a self-connection.
        """
        config = _workerOptions("--workers", "3").config
        self.assertEqual(
            sorted(proxySelfAddresses(config)),
            [
                ("127.0.0.1", 2112),
                ("127.0.0.1", 2113),
                ("127.0.0.1", 2114),
                ("127.0.0.1", 9090),
            ],
        )
        policy = buildPolicy(config)
        for port in (9090, 2112, 2113, 2114):
            self.assertEqual(
                policy.decide("127.0.0.1", port).rule, RULE_SELF_CONNECTION, port
            )
        self.assertTrue(policy.decide("127.0.0.1", 2115).allowed)

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

    def test_otherWorkersMetricsRefused(self) -> None:
        """
        Worker 1 of two refuses a request for worker 0's and its own
        C{/metrics} with 403 and reason code 1000 (self-connection) before
        any connection is attempted, while another port on the same allowed
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
        for port in (2112, 2113):
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
            b"GET http://127.0.0.1:2114/ HTTP/1.1\r\nHost: 127.0.0.1:2114\r\n\r\n"
        )
        self.assertEqual(
            [(host, port) for host, port, *_ in reactor.tcpClients],
            [("127.0.0.1", 2114)],
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
