"""
Reloading what SIGHUP reloads (the ACL and password files, and the TLS
certificates, keys, CAs and CRLs: L{proxy_app.reload}) when one of its
files changes on disk, for deployments that replace them without sending
SIGHUP.

Kubernetes updates a mounted ConfigMap or Secret without touching the
files the proxy opened: the kubelet writes the new contents into a fresh
hidden directory (C{..2024_05_01_12_00_00.123}), points a temporary symlink
at it and renames that over C{..data}, so that C{acl.yaml}, a symlink to
C{..data/acl.yaml}, now resolves to another file.  Watching the path for
writes (inotify on the file) would miss this; comparing the identity of
the file the path resolves to, every few seconds, does not.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

Identity = tuple[int, int, int, int]


def fileIdentity(path: str) -> Identity | None:
    """
    What tells one version of the file at C{path} from another: the
    device, inode, modification time and size of the file it resolves to
    (symlinks followed, as the kubelet's swap needs).

    @return: the identity, or L{None} when the path does not resolve to a
        file that can be examined.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class FileWatcher(Service):
    """
    Checks the identity (L{fileIdentity}) of some files every C{interval}
    seconds, and calls C{onChange} once per check that finds any of them
    changed, replaced, gone or back.

    A file that changes is reloaded whole, as on SIGHUP: C{onChange} is
    meant to be L{proxy_app.reload.Reloader.reload}, which keeps the old
    contents in force when the new ones do not load.  A file written
    in place, slowly, can be seen half-written; replace files by renaming
    a complete one over them (as the kubelet does) to rule that out.

    @ivar paths: the files watched.
    @ivar interval: seconds between checks.
    """

    def __init__(
        self,
        paths: Sequence[str],
        onChange: Callable[[], object],
        clock: Any,
        interval: float,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be above 0, not {interval!r}")
        self.paths = tuple(paths)
        self.interval = interval
        self._onChange = onChange
        self._clock = clock
        self._identities = self._snapshot()
        self._loop: LoopingCall | None = None

    def _snapshot(self) -> tuple[Identity | None, ...]:
        return tuple(fileIdentity(path) for path in self.paths)

    def startService(self) -> None:
        super().startService()
        # Changes made before start (while the proxy read the files) are
        # already loaded.
        self._identities = self._snapshot()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda failure: log.failure("File watcher stopped", failure)
        )

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def check(self) -> bool:
        """
        Compare the files with the last check, and reload if any differs.

        @return: whether a reload was started.
        """
        current = self._snapshot()
        if current == self._identities:
            return False
        before = self._identities
        changed = [path for i, path in enumerate(self.paths) if before[i] != current[i]]
        self._identities = current
        log.info(
            "Reloading: {files} changed",
            files=", ".join(changed),
        )
        try:
            self._onChange()
        except Exception:
            # Never let one bad reload stop the watching.
            log.failure("Reload after {files} changed failed", files=changed)
        return True
