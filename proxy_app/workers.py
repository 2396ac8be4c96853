"""
Running the proxy as several processes sharing its listening ports
(C{--workers N}), so that it can use more than one core.

The process twistd starts becomes a supervisor: it binds nothing itself
and runs N workers, each a C{twistd egressproxy} of its own with the same
options, which bind the listening ports with C{SO_REUSEPORT} and hand the
sockets to Twisted with C{adoptStreamPort}; the kernel spreads new
connections between them.  The supervisor passes SIGHUP and SIGUSR1 on,
stops the workers on SIGTERM (each drains), and restarts a worker that
dies.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from proxy_app.config import ConfigError, TLSListener, splitDescription

log = Logger()


def sharedListen(
    reactor: Any, listener: str | TLSListener, factory: Any, contextFactory: Any = None
) -> Any:
    """
    Listen on C{listener} with C{SO_REUSEPORT}, so that other workers can
    listen on the same port.

    @param contextFactory: TLS options, for a L{TLSListener}.
    @return: the listening port.
    @raise ConfigError: for endpoint kinds that cannot be shared.
    """
    if isinstance(listener, TLSListener):
        host, port, backlog = listener.interface, listener.port, 50
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
        backlog = int(keywords.get("backlog", "50"))
        if kind == "tcp6" and not host:
            host = "::"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
        return reactor.adoptStreamPort(sock.fileno(), family, factory)
    finally:
        # Twisted holds its own duplicate of the descriptor.
        sock.close()


class _Worker(ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: Deferred = Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self.supervisor.workerEnded(self, reason)


class WorkerSupervisor(Service):
    """
    Runs and watches the worker processes.

    @ivar argv: the supervisor's own C{egressproxy} options, which the
        workers get too.
    """

    restartDelay = 1.0

    def __init__(self, reactor: Any, count: int, argv: Sequence[str]) -> None:
        self.reactor = reactor
        self.count = count
        self.argv = list(argv)
        self.workers: dict[int, tuple[_Worker, Any]] = {}
        self._stopping = False

    def command(self, index: int) -> list[str]:
        """
        The command line of worker C{index}: twistd in the foreground, with
        the supervisor's options, then the number of workers and its index.

        The number is given as a number, after the supervisor's options so
        that it wins over them: a worker divides the limits and derives
        every worker's metrics port from it, so it must not count the CPUs
        (C{auto}) again and come to another answer.
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
        ]

    def environment(self) -> dict[str, str]:
        """
        The supervisor's environment, with the directory this package came
        from first on the path, so that workers run the very same code.
        """
        env = dict(os.environ)
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = here + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
        return env

    def spawn(self, index: int) -> None:
        worker = _Worker(self, index)
        process = self.reactor.spawnProcess(
            worker,
            sys.executable,
            self.command(index),
            env=self.environment(),
            childFDs={0: "w", 1: 1, 2: 2},
        )
        self.workers[index] = (worker, process)
        log.info("Started worker {index} (pid {pid})", index=index, pid=process.pid)

    def startService(self) -> None:
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

    def signal(self, signum: int) -> None:
        """
        Pass C{signum} on to every worker.
        """
        for worker, process in self.workers.values():
            try:
                process.signalProcess(signum)
            except Exception as e:
                log.warn(
                    "Could not signal worker {index}: {error}",
                    index=worker.index,
                    error=e,
                )

    def workerEnded(self, worker: _Worker, reason: Any) -> None:
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
        Stop every worker with SIGTERM (each drains), and wait for them.
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
        if not ended:
            return succeed(None)
        return DeferredList(ended).addCallback(lambda _: None)
