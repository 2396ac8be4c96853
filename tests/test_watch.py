"""
Tests for L{proxy_app.watch}: the ACL and password files reload when
Kubernetes swaps a mounted ConfigMap or Secret, the way the kubelet does
it, on a fake clock.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.access import AccessControl
from proxy_app.acl import loadACL
from proxy_app.config import load
from proxy_app.identity import Authenticator
from proxy_app.tap import buildProxy
from proxy_app.watch import FileWatcher, fileIdentity

from .helpers import PluggableMemoryReactor

ACL_V1 = """\
version: v1
services:
  - name: alice
    action: enforce
    allowed_domains: [one.example]
"""

ACL_V2 = ACL_V1.replace("[one.example]", "[one.example, two.example]")

# Not an ACL: a key egressproxy refuses.
ACL_BAD = ACL_V1.replace("allowed_domains", "allowed_hosts")


class KubeletVolume:
    """
    A directory laid out and updated as the kubelet's atomic writer does
    for a ConfigMap or Secret volume: the files live in a timestamped
    hidden directory, C{..data} is a symlink to it, and each visible name
    is a symlink through C{..data}.  An update writes a new hidden
    directory, renames a new symlink over C{..data}, and removes the old
    directory.
    """

    def __init__(self, root: str, files: dict[str, str]) -> None:
        self.root = root
        self.generation = 0
        os.makedirs(root)
        self._current = self._writeGeneration(files)
        os.symlink(self._current, os.path.join(root, "..data"))
        for name in files:
            os.symlink(os.path.join("..data", name), os.path.join(root, name))

    def _writeGeneration(self, files: dict[str, str]) -> str:
        self.generation += 1
        name = f"..2024_05_01_12_00_{self.generation:02d}.000000001"
        os.mkdir(os.path.join(self.root, name))
        for filename, content in files.items():
            with open(os.path.join(self.root, name, filename), "w") as f:
                f.write(content)
        return name

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def update(self, files: dict[str, str]) -> None:
        old = self._current
        self._current = self._writeGeneration(files)
        tmp = os.path.join(self.root, "..data_tmp")
        os.symlink(self._current, tmp)
        os.rename(tmp, os.path.join(self.root, "..data"))
        for filename in os.listdir(os.path.join(self.root, old)):
            os.unlink(os.path.join(self.root, old, filename))
        os.rmdir(os.path.join(self.root, old))


class FileIdentityTests(SynchronousTestCase):
    """
    L{fileIdentity} tells versions of a file apart through symlinks.
    """

    def test_followsTheSwap(self) -> None:
        """
        The identity of a visible name changes when C{..data} is swapped,
        even when the new file has the same size and contents.
        """
        volume = KubeletVolume(self.mktemp(), {"acl.yaml": ACL_V1})
        before = fileIdentity(volume.path("acl.yaml"))
        self.assertIsNotNone(before)
        volume.update({"acl.yaml": ACL_V1})
        self.assertNotEqual(fileIdentity(volume.path("acl.yaml")), before)

    def test_missing(self) -> None:
        """
        A path that resolves to nothing has no identity.
        """
        self.assertIsNone(fileIdentity(self.mktemp()))


class FileWatcherTests(SynchronousTestCase):
    """
    L{FileWatcher} reloads once per check that finds a change.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.volume = KubeletVolume(
            self.mktemp(), {"acl.yaml": ACL_V1, "passwords": "alice:one\n"}
        )
        aclPath = self.volume.path("acl.yaml")
        self.access = AccessControl(
            loadACL(aclPath),
            aclPath,
            Authenticator.fromStrings(["file:" + self.volume.path("passwords")]),
        )
        self.watcher = FileWatcher(
            self.access.files(), self.access.reload, self.clock, 5
        )
        self.watcher.startService()
        self.addCleanup(self.stopWatcher)

    def stopWatcher(self) -> None:
        if self.watcher.running:
            self.watcher.stopService()

    def login(self, password: str) -> bool:
        from twisted.cred.credentials import UsernamePassword

        checker = self.access.authenticator.checkers[0]  # type: ignore[union-attr]
        result = checker.requestAvatarId(UsernamePassword(b"alice", password.encode()))
        outcome: list[Any] = []
        result.addBoth(outcome.append)
        return outcome[0] == b"alice"

    def test_watchesTheACLAndPasswordFiles(self) -> None:
        """
        The files watched are the ACL and the password files, as configured.
        """
        self.assertEqual(
            self.watcher.paths,
            (self.volume.path("acl.yaml"), self.volume.path("passwords")),
        )

    def test_kubeletSwapReloads(self) -> None:
        """
        After the kubelet swaps C{..data}, the next check reloads the ACL
        and the password file, exactly as SIGHUP does; nothing happens
        before the check.
        """
        self.assertFalse(self.access.decide("alice", "two.example").allow)
        self.assertTrue(self.login("one"))
        self.volume.update({"acl.yaml": ACL_V2, "passwords": "alice:two\n"})
        self.clock.advance(4.9)
        self.assertFalse(self.access.decide("alice", "two.example").allow)
        with capturedLogs() as events:
            self.clock.advance(0.1)
        self.assertTrue(self.access.decide("alice", "two.example").allow)
        self.assertFalse(self.login("one"))
        self.assertTrue(self.login("two"))
        messages = [e["log_format"] for e in events]
        self.assertIn("Reloading: {files} changed", messages)
        self.assertIn("ACL reloaded from {path}", messages)

    def test_secretOnlyChange(self) -> None:
        """
        A change to the password file alone is picked up too.
        """
        calls: list[None] = []
        watcher = FileWatcher(
            self.access.files(), lambda: calls.append(None), self.clock, 2
        )
        watcher.startService()
        self.addCleanup(watcher.stopService)
        self.clock.advance(2)
        self.assertEqual(calls, [])
        self.volume.update({"acl.yaml": ACL_V1, "passwords": "alice:three\n"})
        self.clock.advance(2)
        self.assertEqual(len(calls), 1)

    def test_unchangedFilesAreNotReloaded(self) -> None:
        """
        Checks that find nothing changed reload nothing.
        """
        calls: list[None] = []
        watcher = FileWatcher(
            self.access.files(), lambda: calls.append(None), self.clock, 1
        )
        watcher.startService()
        self.addCleanup(watcher.stopService)
        self.clock.pump([1] * 50)
        self.assertEqual(calls, [])
        self.volume.update({"acl.yaml": ACL_V2, "passwords": "alice:one\n"})
        self.clock.pump([1] * 50)
        self.assertEqual(len(calls), 1)

    def test_badUpdateKeepsTheOldACL(self) -> None:
        """
        An update that does not load keeps the old ACL in force, logged as
        SIGHUP logs it, and the next good update is loaded.
        """
        self.volume.update({"acl.yaml": ACL_BAD, "passwords": "alice:one\n"})
        with capturedLogs() as events:
            self.clock.advance(5)
        self.assertIn(
            "ACL not reloaded, the old one stays in force: {error}",
            [e["log_format"] for e in events],
        )
        self.assertTrue(self.access.decide("alice", "one.example").allow)
        self.volume.update({"acl.yaml": ACL_V2, "passwords": "alice:one\n"})
        self.clock.advance(5)
        self.assertTrue(self.access.decide("alice", "two.example").allow)

    def test_inPlaceEdit(self) -> None:
        """
        A file edited in place, outside Kubernetes, is reloaded too.
        """
        target = os.path.realpath(self.volume.path("acl.yaml"))
        os.chmod(target, 0o644)
        with open(target, "w") as f:
            f.write(ACL_V2)
        self.clock.advance(5)
        self.assertTrue(self.access.decide("alice", "two.example").allow)

    def test_failingReloadKeepsWatching(self) -> None:
        """
        A reload that raises is logged and the watcher keeps checking.
        """
        calls: list[None] = []

        def reload() -> None:
            calls.append(None)
            raise RuntimeError("boom")

        watcher = FileWatcher(self.access.files(), reload, self.clock, 1)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        self.volume.update({"acl.yaml": ACL_V2, "passwords": "alice:one\n"})
        self.clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.volume.update({"acl.yaml": ACL_V1, "passwords": "alice:one\n"})
        self.clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(calls), 2)

    def test_stopEndsChecks(self) -> None:
        """
        A stopped watcher leaves no timer behind and checks no more.
        """
        self.watcher.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.volume.update({"acl.yaml": ACL_V2, "passwords": "alice:one\n"})
        self.clock.advance(10)
        self.assertFalse(self.access.decide("alice", "two.example").allow)

    def test_intervalMustBePositive(self) -> None:
        """
        An interval of 0 or less is refused: 0 means no watcher at all.
        """
        self.assertRaises(ValueError, FileWatcher, [], lambda: None, self.clock, 0)


class BuildTests(SynchronousTestCase):
    """
    C{acl.watch_interval} puts a watcher in the built proxy.
    """

    def build(self, watch: str | None) -> list[FileWatcher]:
        acl = self.mktemp()
        with open(acl, "w") as f:
            f.write(ACL_V1)
        flags = {"acl": acl, "metrics": "none", "access-log": "none"}
        if watch is not None:
            flags["watch-interval"] = watch
        proxy = buildProxy(load(flags, {}), PluggableMemoryReactor())
        return [s for s in proxy if isinstance(s, FileWatcher)]

    def test_offByDefault(self) -> None:
        """
        Without C{acl.watch_interval} nothing watches the files.
        """
        self.assertEqual(self.build(None), [])
        self.assertEqual(self.build("0"), [])

    def test_watchInterval(self) -> None:
        """
        With C{acl.watch_interval} the ACL file is watched at that interval.
        """
        [watcher] = self.build("3s")
        self.assertEqual(watcher.interval, 3.0)
        self.assertEqual(len(watcher.paths), 1)
