"""
Tests for the optional compiled build: which compiled modules
L{proxy_app} loads (only those built from the source beside them, none with
C{EGRESSPROXY_NO_EXTENSIONS}), and, in C{tox -e tests-compiled}, that the
build really is compiled.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader

from twisted.trial.unittest import SkipTest, SynchronousTestCase

import proxy_app
from proxy_app import CompiledFinder, compilable, compiledModules, findCompiled

SUFFIX = EXTENSION_SUFFIXES[0]
PACKAGE = os.path.dirname(os.path.abspath(proxy_app.__file__))


def digestOf(path: str) -> str:
    """
    The hex SHA-256 of the file at C{path}.
    """
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class FindCompiledTests(SynchronousTestCase):
    """
    L{findCompiled} chooses, in a package directory, the compiled files
    built from the sources beside them (the files here stand in for
    compiled modules: only their names are looked at).
    """

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.source = os.path.join(self.directory, "hot.py")
        with open(self.source, "w") as f:
            f.write("X = 1\n")

    def compiledFile(self, digest: str) -> str:
        """
        Put a stand-in compiled file for C{hot} with C{digest} in its name.
        """
        path = os.path.join(self.directory, f"hot.{digest}{SUFFIX}")
        with open(path, "wb") as f:
            f.write(b"\x7fELF")
        return path

    def test_builtFromThisSource(self) -> None:
        """
        A compiled file named after the hash of the source beside it is
        found, for its module.
        """
        path = self.compiledFile(digestOf(self.source))
        self.assertEqual(findCompiled(self.directory, ["hot"], {}), {"hot": path})

    def test_editedSource(self) -> None:
        """
        Once the source is edited, the file compiled from it before is not
        found: a stale compiled module never shadows the edited source.
        """
        self.compiledFile(digestOf(self.source))
        with open(self.source, "a") as f:
            f.write("X = 2\n")
        self.assertEqual(findCompiled(self.directory, ["hot"], {}), {})

    def test_otherHashes(self) -> None:
        """
        Of several compiled files for one module (earlier builds), only the
        one built from the current source is found.
        """
        self.compiledFile("0" * 64)
        path = self.compiledFile(digestOf(self.source))
        self.compiledFile("f" * 64)
        self.assertEqual(findCompiled(self.directory, ["hot"], {}), {"hot": path})

    def test_plainName(self) -> None:
        """
        A compiled file with the plain name Python's own import system would
        load (C{hot.EXT_SUFFIX}) is not ours, and not found.
        """
        with open(os.path.join(self.directory, "hot" + SUFFIX), "wb") as f:
            f.write(b"\x7fELF")
        self.assertEqual(findCompiled(self.directory, ["hot"], {}), {})

    def test_notListed(self) -> None:
        """
        Only the modules named are looked for.
        """
        self.compiledFile(digestOf(self.source))
        self.assertEqual(findCompiled(self.directory, ["cold"], {}), {})

    def test_noExtensions(self) -> None:
        """
        With C{EGRESSPROXY_NO_EXTENSIONS} set, nothing is found; set to the
        empty string, it does not count.
        """
        path = self.compiledFile(digestOf(self.source))
        self.assertEqual(
            findCompiled(self.directory, ["hot"], {"EGRESSPROXY_NO_EXTENSIONS": "1"}),
            {},
        )
        self.assertEqual(
            findCompiled(self.directory, ["hot"], {"EGRESSPROXY_NO_EXTENSIONS": ""}),
            {"hot": path},
        )

    def test_noDirectory(self) -> None:
        """
        A directory that cannot be listed has no compiled modules.
        """
        self.assertEqual(findCompiled(self.mktemp(), ["hot"], {}), {})


class CompiledFinderTests(SynchronousTestCase):
    """
    L{CompiledFinder} gives the import system an extension-module spec for
    the modules it was given, and nothing for others.
    """

    def test_spec(self) -> None:
        """
        A listed module's spec loads the compiled file as an extension
        module, under the module's own name.
        """
        finder = CompiledFinder({"proxy_app.hot": "/x/hot.abc.so"})
        spec = finder.find_spec("proxy_app.hot", None)
        assert spec is not None
        self.assertEqual(spec.name, "proxy_app.hot")
        self.assertEqual(spec.origin, "/x/hot.abc.so")
        self.assertIsInstance(spec.loader, ExtensionFileLoader)

    def test_others(self) -> None:
        """
        Any other module is left to the rest of the import system.
        """
        finder = CompiledFinder({"proxy_app.hot": "/x/hot.abc.so"})
        self.assertIsNone(finder.find_spec("proxy_app.cold", None))


class BuildTests(SynchronousTestCase):
    """
    The build this suite runs on.
    """

    def test_expected(self) -> None:
        """
        With C{EGRESSPROXY_EXPECT_COMPILED=1} (C{tox -e tests-compiled})
        every module in L{proxy_app.compilable} is loaded from a compiled
        file; with C{EGRESSPROXY_EXPECT_COMPILED=0} (the other test
        environments) none is.
        """
        expect = os.environ.get("EGRESSPROXY_EXPECT_COMPILED")
        if expect not in ("0", "1"):
            raise SkipTest("EGRESSPROXY_EXPECT_COMPILED is not set")
        names = [f"proxy_app.{name}" for name in compilable]
        compiled = [
            name
            for name in names
            if isinstance(importlib.import_module(name).__loader__, ExtensionFileLoader)
        ]
        if expect == "1":
            self.assertEqual(compiled, names)
            self.assertEqual(compiledModules(), tuple(sorted(names)))
        else:
            self.assertEqual(compiled, [])
            self.assertEqual(compiledModules(), ())


def importedIn(package: str, environ: dict[str, str]) -> dict[str, str]:
    """
    Import every compilable module of a copy of the package, in a new
    interpreter.

    @param package: the directory holding the copy of C{proxy_app}.
    @return: each module's C{__file__}, by name.
    """
    script = (
        "import importlib, json, proxy_app\n"
        "print(json.dumps({n: importlib.import_module('proxy_app.' + n).__file__"
        " for n in proxy_app.compilable}))\n"
    )
    env = dict(os.environ, **environ)
    env["PYTHONPATH"] = package
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        check=True,
        capture_output=True,
        cwd=package,
    ).stdout
    files: dict[str, str] = json.loads(out)
    return files


class CompiledCopyTests(SynchronousTestCase):
    """
    With a compiled build present, in a copy of the package run by a new
    interpreter: an edited source is loaded as Python, and
    C{EGRESSPROXY_NO_EXTENSIONS} loads every module as Python.
    """

    def setUp(self) -> None:
        if not compiledModules():
            raise SkipTest("no compiled build here (tox -e tests-compiled)")
        self.root = os.path.abspath(self.mktemp())
        shutil.copytree(
            PACKAGE,
            os.path.join(self.root, "proxy_app"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )

    def test_copyCompiled(self) -> None:
        """
        The copy, unchanged, loads its compiled modules.
        """
        files = importedIn(self.root, {"EGRESSPROXY_NO_EXTENSIONS": ""})
        for name in compilable:
            self.assertTrue(files[name].endswith(SUFFIX), files[name])

    def test_editedSource(self) -> None:
        """
        After an edit to one source, that module is loaded from the edited
        source and the others stay compiled.
        """
        with open(os.path.join(self.root, "proxy_app", "target.py"), "a") as f:
            f.write("\nEDITED = True\n")
        files = importedIn(self.root, {"EGRESSPROXY_NO_EXTENSIONS": ""})
        self.assertEqual(
            files["target"], os.path.join(self.root, "proxy_app", "target.py")
        )
        for name in compilable:
            if name != "target":
                self.assertTrue(files[name].endswith(SUFFIX), files[name])

    def test_noExtensions(self) -> None:
        """
        With C{EGRESSPROXY_NO_EXTENSIONS=1}, every module is loaded from its
        source, though the compiled files are there.
        """
        files = importedIn(self.root, {"EGRESSPROXY_NO_EXTENSIONS": "1"})
        for name in compilable:
            self.assertEqual(
                files[name], os.path.join(self.root, "proxy_app", name + ".py")
            )
