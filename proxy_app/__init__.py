"""
egressproxy: an HTTP/1.1 egress proxy on Twisted that never connects to a
destination its policy has not vetted.

The package may carry an optional compiled build of its hot modules
(C{EGRESSPROXY_COMPILE=1} at build time; setup.py).  Each compiled module is
a file C{NAME.SHA256.EXT_SUFFIX} beside C{NAME.py}, SHA256 being the hash of
the source it was compiled from.  Python's import system never finds a file
named so, whatever it holds; the finder installed here loads it for
C{proxy_app.NAME} only when C{NAME.py} still has that hash, so a compiled
module left from before an edit never shadows the edited source.  With
C{EGRESSPROXY_NO_EXTENSIONS} set (to anything but the empty string) every
module is the pure-Python one.
"""

import hashlib
import os
import sys
from collections.abc import Mapping, Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader, ModuleSpec
from importlib.util import spec_from_file_location
from types import ModuleType

__version__ = "0.1.0"

compilable = ("http1", "target", "redact")
"""
The modules an C{EGRESSPROXY_COMPILE=1} build compiles (setup.py reads this
tuple), by their names in this package: the ones that paid, measured in
instructions per request (docs/benchmarks.md, "Fifth session: an optional
compiled build").  Compiled unchanged, the modules that mostly call into
Twisted and attrs (channel, exchange, forward, tunnel, upstream, admission)
cost more instructions than CPython 3.11's specializing interpreter does.
"""


def findCompiled(
    directory: str, names: Sequence[str], environ: Mapping[str, str]
) -> dict[str, str]:
    """
    Find the compiled modules in C{directory} that were built from the
    sources beside them.

    @param directory: the package's directory.
    @param names: the module names that may be compiled.
    @param environ: the process environment; C{EGRESSPROXY_NO_EXTENSIONS}
        set in it to anything but the empty string finds none.
    @return: for each name whose C{NAME.SHA256.EXT_SUFFIX} file exists and
        whose C{NAME.py} hashes to SHA256, the path of that file.
    """
    if environ.get("EGRESSPROXY_NO_EXTENSIONS"):
        return {}
    suffix = EXTENSION_SUFFIXES[0]
    try:
        files = {f for f in os.listdir(directory) if f.endswith(suffix)}
    except OSError:
        return {}
    found = {}
    for name in names:
        if not any(f.startswith(name + ".") for f in files):
            continue
        try:
            with open(os.path.join(directory, name + ".py"), "rb") as source:
                digest = hashlib.sha256(source.read()).hexdigest()
        except OSError:
            continue
        compiled = f"{name}.{digest}{suffix}"
        if compiled in files:
            found[name] = os.path.join(directory, compiled)
    return found


class CompiledFinder(MetaPathFinder):
    """
    Find this package's compiled modules, for the import system, ahead of
    its path finder (which would find only the C{.py} files).

    @ivar paths: the compiled file of each module, by its full name.
    """

    def __init__(self, paths: Mapping[str, str]) -> None:
        self.paths = dict(paths)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        compiled = self.paths.get(fullname)
        if compiled is None:
            return None
        return spec_from_file_location(
            fullname, compiled, loader=ExtensionFileLoader(fullname, compiled)
        )


_compiled = {
    f"{__name__}.{name}": path
    for name, path in findCompiled(
        os.path.dirname(os.path.abspath(__file__)), compilable, os.environ
    ).items()
}
if _compiled:
    sys.meta_path.insert(0, CompiledFinder(_compiled))


def compiledModules() -> tuple[str, ...]:
    """
    The modules of this package that are, or will be when imported, loaded
    from the compiled build.

    @return: their full names, sorted; empty when the package runs as pure
        Python.
    """
    return tuple(sorted(_compiled))
