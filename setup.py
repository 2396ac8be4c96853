"""
The optional compiled build's extension modules; the metadata is in setup.cfg.

Without C{EGRESSPROXY_COMPILE=1} in the environment this declares nothing
and the package is pure Python, exactly as without this file.  With it, the
modules named by C{proxy_app.compilable} are compiled, unchanged, by Cython 3
(pure-Python mode), and the build fails if Cython or a C compiler is
missing: asking for the compiled build never quietly yields a pure one.

Each compiled module is written as C{proxy_app/NAME.SHA256.EXT_SUFFIX}, where
SHA256 is the hex SHA-256 of the C{NAME.py} it was compiled from.  Python's
own import system never finds a file named so; C{proxy_app/__init__.py}
loads it, for C{proxy_app.NAME}, only when the C{NAME.py} beside it still
has that hash (docs/architecture.md, "The optional compiled build").
"""

import ast
import glob
import hashlib
import os
import sys
from sysconfig import get_config_var

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
SUFFIX = get_config_var("EXT_SUFFIX")


def compilable() -> list[str]:
    """
    The names in C{proxy_app.compilable}, read without importing the package
    (as setup.cfg reads C{__version__}).
    """
    with open(os.path.join(HERE, "proxy_app", "__init__.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "compilable" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise SystemExit("setup.py: proxy_app/__init__.py has no `compilable` tuple")


def sourceHash(name: str) -> str:
    """
    The hex SHA-256 of C{proxy_app/NAME.py}.
    """
    with open(os.path.join(HERE, "proxy_app", name + ".py"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class CompileHashed(build_ext):
    """
    Cythonize at build time (so that only a compiling build needs Cython),
    name each module's file after its source's hash, and check that no
    source changed while it was being compiled.
    """

    def finalize_options(self) -> None:
        try:
            from Cython.Build import cythonize
        except ImportError:
            raise SystemExit(
                "EGRESSPROXY_COMPILE=1: Cython 3 is not installed (pip install"
                " 'Cython>=3'), and a compiled build was asked for"
            ) from None
        self.hashes = {name: sourceHash(name) for name in compilable()}
        self.distribution.ext_modules = cythonize(
            self.distribution.ext_modules,
            compiler_directives={
                "language_level": "3",
                # The code is compiled unchanged: annotations stay
                # annotations (C types from them could change what an
                # int or float does).
                "annotation_typing": False,
            },
            quiet=True,
        )
        super().finalize_options()

    def get_ext_filename(self, fullname: str) -> str:
        # Called with the full name, and with only its last part (distutils'
        # get_ext_fullpath).
        filename = super().get_ext_filename(fullname)
        digest = getattr(self, "hashes", {}).get(fullname.rpartition(".")[2])
        if digest:
            if not filename.endswith(SUFFIX):
                raise SystemExit(f"setup.py: {filename} does not end in {SUFFIX}")
            stem = filename[: -len(SUFFIX)]
            filename = f"{stem}.{digest}{SUFFIX}"
        return filename

    def run(self) -> None:
        super().run()
        for name, digest in self.hashes.items():
            if sourceHash(name) != digest:
                raise SystemExit(
                    f"setup.py: proxy_app/{name}.py changed while it was being"
                    " compiled; build again"
                )
        if self.inplace:
            # Earlier in-place builds' files are never loaded (their hash is
            # not the source's), but they need not stay.
            for name, digest in self.hashes.items():
                for old in glob.glob(os.path.join(HERE, "proxy_app", name + ".*")):
                    parts = os.path.basename(old).split(".")
                    if len(parts) > 2 and len(parts[1]) == 64 and parts[1] != digest:
                        os.remove(old)


if os.environ.get("EGRESSPROXY_COMPILE") == "1":
    setup(
        # setuptools' PEP 517 backend asks for these before building, so that
        # pip installs Cython into an isolated build environment.
        setup_requires=["Cython >= 3.0"],
        ext_modules=[
            Extension(f"proxy_app.{name}", [f"proxy_app/{name}.py"])
            for name in compilable()
        ],
        cmdclass={"build_ext": CompileHashed},
    )
elif os.environ.get("EGRESSPROXY_COMPILE", "0") not in ("", "0"):
    sys.exit(
        f"setup.py: EGRESSPROXY_COMPILE={os.environ['EGRESSPROXY_COMPILE']!r}:"
        " set it to 1 (compile) or 0 (pure Python)"
    )
else:
    setup()
