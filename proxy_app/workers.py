"""
Running the proxy as several processes sharing its listening ports
(C{--workers N}), so that it can use more than one core.

The process twistd starts becomes a supervisor: it runs N workers, each a
C{twistd egressproxy} of its own with the same options, which bind the
listening ports with C{SO_REUSEPORT} and hand the sockets to Twisted with
C{adoptStreamPort}; the kernel spreads new connections between them.  The
supervisor passes SIGHUP and SIGUSR1 on, stops the workers on SIGTERM (each
drains), and restarts a worker that dies.

The supervisor alone serves the metrics endpoint, for the whole instance:
the workers write their metrics with prometheus-client's multiprocess mode
into a private directory the supervisor made (L{WorkerSupervisor.
metricsDirectory}), which it reads at each scrape, and each worker tells
the supervisor on a pipe (L{STATUS_FD}) when it listens and when it starts
to drain, which is what the supervisor's C{/healthcheck} answers from.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client.multiprocess import mark_process_dead
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from proxy_app.config import ConfigError, TLSListener, splitDescription
from proxy_app.transport import leanPort

log = Logger()

# The descriptor on which a worker writes its state to the supervisor.
STATUS_FD = 3

# What a worker writes on STATUS_FD, one word a line.
READY = b"ready"
DRAINING = b"draining"


def sharedListen(
    reactor: Any,
    listener: str | TLSListener,
    factory: Any,
    contextFactory: Any = None,
    backlog: int = 50,
    socketFactory: Callable[..., socket.socket] = socket.socket,
) -> Any:
    """
    Listen on C{listener} with C{SO_REUSEPORT}, so that other workers can
    listen on the same port.

    @param contextFactory: TLS options, for a L{TLSListener}.
    @param backlog: the listen backlog, unless the description gives one.
    @param socketFactory: makes the socket; L{socket.socket} but in tests.
    @return: the listening port.
    @raise ConfigError: for endpoint kinds that cannot be shared.
    """
    if isinstance(listener, TLSListener):
        host, port = listener.interface, listener.port
        factory = TLSMemoryBIOFactory(contextFactory, False, factory)
    else:
        positional, keywords = splitDescription(listener)
        kind = positional[0].lower()
        if kind not in ("tcp", "tcp6"):
            raise ConfigError(
                f"listen = {listener!r}: only tcp, tcp6 and mtls listeners can be "
                "shared between --workers"
            )
        host = keywords.get("interface", "")
        port = int(keywords.get("port") or positional[1])
        backlog = int(keywords.get("backlog", backlog))
        if kind == "tcp6" and not host:
            host = "::"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socketFactory(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
        # Lean transports, as every listener of a single process has
        # (proxy_app.transport).
        return leanPort(reactor.adoptStreamPort(sock.fileno(), family, factory))
    finally:
        # Twisted holds its own duplicate of the descriptor.
        sock.close()


class WorkerStatus(Service):
    """
    A worker's side of L{STATUS_FD}: says L{READY} once the worker listens
    (it is the last service to start) and L{DRAINING} as soon as it stops
    (it is the first to stop, before the listeners close and the drain).

    @ivar fd: the descriptor to write to.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def startService(self) -> None:
        super().startService()
        self._say(READY)

    def stopService(self) -> None:
        super().stopService()
        self._say(DRAINING)

    def _say(self, word: bytes) -> None:
        try:
            os.write(self.fd, word + b"\n")
        except OSError as e:
            # The supervisor is gone; the worker serves on regardless.
            log.warn(
                "Could not tell the supervisor {word}: {error}",
                word=word.decode(),
                error=e,
            )


class _Worker(ProcessProtocol):
    """
    One worker process, as its supervisor sees it.

    @ivar state: C{"starting"} until the worker says it listens, then
        C{"ready"}, then C{"draining"} once it says it stops.
    @ivar pid: its process id, kept after it ends (Twisted forgets it) so
        that its live gauges can be dropped.
    @ivar pending: signals the supervisor passed on while the worker was
        starting, sent once it is ready: until then it may not have its
        handlers yet, and SIGHUP's default action would kill it.
    """

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: Deferred = Deferred()
        self.state = "starting"
        self.pid: int | None = None
        self.pending: list[int] = []
        self._status = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != STATUS_FD:
            return
        *lines, rest = (self._status + data).split(b"\n")
        # A worker writes one short word a line; anything longer is not one.
        self._status = rest[-64:]
        for line in lines:
            if line == READY and self.state == "starting":
                self.state = "ready"
                pending, self.pending = self.pending, []
                for signum in pending:
                    self.supervisor.signalWorker(self, signum)
            elif line == DRAINING:
                self.state = "draining"

    def processEnded(self, reason: Any) -> None:
        self.state = "ended"
        self.ended.callback(None)
        self.supervisor.workerEnded(self, reason)


def makeMetricsDirectory() -> str:
    """
    Make the private directory the workers write their metrics in: on the
    memory-backed C{/dev/shm} when it is there and writable (the workers
    update the files' pages with every metric, and no disk needs to see
    them), else in C{$TMPDIR} or the system's temporary directory.  It is
    new and its mode is 0700, so no other user can read the files or plant
    values in them.

    @raise ConfigError: when no such directory can be made.
    """
    parent = None
    if not os.environ.get("TMPDIR") and os.access("/dev/shm", os.W_OK | os.X_OK):
        parent = "/dev/shm"
    try:
        return tempfile.mkdtemp(prefix="egressproxy-metrics-", dir=parent)
    except OSError as e:
        raise ConfigError(
            f"workers: cannot make the directory for the workers' metrics in "
            f"{parent or tempfile.gettempdir()}: {e.strerror}; set TMPDIR to a "
            "writable directory (a tmpfs)"
        ) from None


class WorkerSupervisor(Service):
    """
    Runs and watches the worker processes.

    @ivar argv: the supervisor's own C{egressproxy} options, which the
        workers get too.
    @ivar collectMetrics: whether the workers write their metrics for the
        supervisor to serve (in L{metricsDirectory}).
    @ivar metricsDirectory: the directory the workers write their metrics
        in, from start until every worker has ended, or L{None}.
    """

    restartDelay = 1.0

    def __init__(
        self,
        reactor: Any,
        count: int,
        argv: Sequence[str],
        collectMetrics: bool = False,
    ) -> None:
        self.reactor = reactor
        self.count = count
        self.argv = list(argv)
        self.collectMetrics = collectMetrics
        self.metricsDirectory: str | None = None
        self.workers: dict[int, tuple[_Worker, Any]] = {}
        self._stopping = False

    def command(self, index: int) -> list[str]:
        """
        The command line of worker C{index}: twistd in the foreground, with
        the supervisor's options, then the number of workers, its index and
        the descriptor it reports its state on.

        The number is given as a number, after the supervisor's options so
        that it wins over them: a worker divides the limits by it, so it
        must not count the CPUs (C{auto}) again and come to another answer.
        """
        return [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "egressproxy",
            *self.argv,
            "--workers",
            str(self.count),
            "--worker-index",
            str(index),
            "--worker-status-fd",
            str(STATUS_FD),
        ]

    def environment(self) -> dict[str, str]:
        """
        The supervisor's environment, with the directory this package came
        from first on the path, so that workers run the very same code, and
        prometheus-client's multiprocess mode pointed at L{metricsDirectory}
        (and off when there is none, whatever the supervisor inherited).
        """
        env = dict(os.environ)
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = here + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
        env.pop("prometheus_multiproc_dir", None)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if self.metricsDirectory is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = self.metricsDirectory
        return env

    def spawn(self, index: int) -> None:
        worker = _Worker(self, index)
        process = self.reactor.spawnProcess(
            worker,
            sys.executable,
            self.command(index),
            env=self.environment(),
            childFDs={0: "w", 1: 1, 2: 2, STATUS_FD: "r"},
        )
        worker.pid = process.pid
        self.workers[index] = (worker, process)
        log.info("Started worker {index} (pid {pid})", index=index, pid=process.pid)

    def startService(self) -> None:
        # Made here, not in privilegedStartService: after twistd has given
        # up root (--uid), so that the workers can write in it.
        if self.collectMetrics and self.metricsDirectory is None:
            self.metricsDirectory = makeMetricsDirectory()
        super().startService()
        for index in range(self.count):
            self.spawn(index)
        signal.signal(
            signal.SIGHUP,
            lambda signum, frame: self.reactor.callFromThread(
                self.signal, signal.SIGHUP
            ),
        )
        signal.signal(
            signal.SIGUSR1,
            lambda signum, frame: self.reactor.callFromThread(
                self.signal, signal.SIGUSR1
            ),
        )

    def healthy(self) -> bool:
        """
        Whether the instance takes connections: every worker runs and
        listens, none drains, and the supervisor is not stopping.
        """
        return self.unhealthyReason() is None

    def unhealthyReason(self) -> str | None:
        """
        Why the instance is not L{healthy}, in a few words, or L{None}.
        """
        if self._stopping:
            return "draining"
        states = [worker.state for worker, _ in self.workers.values()]
        if "draining" in states:
            return "draining"
        ready = states.count("ready")
        if ready < self.count:
            return f"workers not ready: {ready} of {self.count} listening"
        return None

    def processes(self) -> dict[str, int]:
        """
        The process id of every running worker, by its index (as text).
        """
        return {
            str(index): worker.pid
            for index, (worker, _) in sorted(self.workers.items())
            if worker.pid is not None and worker.state != "ended"
        }

    def signal(self, signum: int) -> None:
        """
        Pass C{signum} on to every worker; a worker still starting gets it
        once it says it is ready (it has installed its handlers by then).
        """
        for worker, _ in self.workers.values():
            if worker.state == "starting":
                if signum not in worker.pending:
                    worker.pending.append(signum)
                continue
            self.signalWorker(worker, signum)

    def signalWorker(self, worker: _Worker, signum: int) -> None:
        """
        Send C{signum} to C{worker}'s process, if it still runs.
        """
        entry = self.workers.get(worker.index)
        if entry is None or entry[0] is not worker or worker.state == "ended":
            return
        try:
            entry[1].signalProcess(signum)
        except Exception as e:
            log.warn(
                "Could not signal worker {index}: {error}",
                index=worker.index,
                error=e,
            )

    def workerEnded(self, worker: _Worker, reason: Any) -> None:
        if self.metricsDirectory is not None and worker.pid is not None:
            # Its counters stay (a restarted worker must not take the sums
            # back); its live gauges (open connections, tunnels) go.
            mark_process_dead(worker.pid, self.metricsDirectory)
        if self.workers.get(worker.index, (None,))[0] is worker:
            del self.workers[worker.index]
        if self._stopping:
            return
        log.error(
            "Worker {index} ended ({reason}); restarting it in {delay:g} s",
            index=worker.index,
            reason=reason.getErrorMessage(),
            delay=self.restartDelay,
        )
        self.reactor.callLater(self.restartDelay, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if not self._stopping and index not in self.workers:
            self.spawn(index)

    def stopService(self) -> Deferred:
        """
        Stop every worker with SIGTERM (each drains), wait for them, and
        remove the metrics directory.
        """
        super().stopService()
        self._stopping = True
        ended = []
        for worker, process in list(self.workers.values()):
            ended.append(worker.ended)
            try:
                process.signalProcess("TERM")
            except Exception:
                pass
        done = DeferredList(ended) if ended else succeed(None)
        return done.addCallback(lambda _: self._removeMetricsDirectory())

    def _removeMetricsDirectory(self) -> None:
        if self.metricsDirectory is not None:
            shutil.rmtree(self.metricsDirectory, ignore_errors=True)
            self.metricsDirectory = None
