"""
What SIGHUP (and, with C{acl.watch_interval}, a change on disk) reloads:
the ACL and password files, each TLS listener's certificate, key, client
CA and CRL, and the trust root and client certificates of TLS
origination; and, with a L{proxy_app.tap.ConfigSource}, the destination
rules of the configuration file (L{proxy_app.tap.DestinationRules}).

Each part reloads whole or not at all: a part whose files fail to load
keeps its old state, logs one line naming the file, and counts in
C{egressproxy_reload_failures_total{what=...}}; the other parts still
reload.  New connections use the new material; established ones keep
what they were made with.

Of the configuration file only the destination rules are applied; other
changed keys are logged as needing a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.logger import Logger

log = Logger()


class Reloader:
    """
    The reloadable parts of one proxy, reloaded in the order they were
    added.

    @ivar metrics: the L{proxy_app.observe.Metrics} whose
        C{reloadFailures} counts failed parts.
    """

    def __init__(self, access: Any, metrics: Any) -> None:
        """
        @param access: the L{proxy_app.access.AccessControl}, whose ACL
            and password files are the first parts (C{acl},
            C{credentials}).
        """
        self._access = access
        self.metrics = metrics
        self._parts: list[
            tuple[str, str, Callable[[], Sequence[str]], Callable[[], object]]
        ] = []

    def add(
        self,
        what: str,
        name: str,
        files: Callable[[], Sequence[str]],
        reload: Callable[[], object],
    ) -> None:
        """
        Add a part.

        @param what: the metric label (a small fixed set: C{listener},
            C{origination}, C{destinations}).
        @param name: what the log line calls it.
        @param files: the files it reads, for the watcher.
        @param reload: loads it again, raising L{ValueError} (naming the
            file) and changing nothing when it cannot.
        """
        self._parts.append((what, name, files, reload))

    def files(self) -> list[str]:
        """
        Every file a reload reads, once each, for L{proxy_app.watch}.
        """
        paths = list(self._access.files())
        for _, _, files, _ in self._parts:
            paths.extend(p for p in files() if p not in paths)
        return paths

    def _failed(self, what: str) -> None:
        self.metrics.reloadFailures.labels(what).inc()

    def reload(self) -> bool:
        """
        Reload every part.

        @return: whether every part reloaded.
        """
        ok = self._access.reload(self._failed)
        for what, name, _, reload in self._parts:
            try:
                reload()
            except ValueError as e:
                log.error(
                    "{name} not reloaded, the old one stays in force: {error}",
                    name=name,
                    error=str(e),
                )
                self._failed(what)
                ok = False
            else:
                log.info("{name} reloaded", name=name)
        return ok


__all__ = ["Reloader"]
