"""
The test matrix: tox's C{tests-lowest} env pins exactly the floors that
C{setup.cfg} declares, so that CI proves the floors we promise.
"""

from __future__ import annotations

import re
from configparser import ConfigParser

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

_ROOT = FilePath(__file__).parent().parent()
_REQUIREMENT = re.compile(
    r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(>=|==)\s*([0-9.]+)\s*$"
)


def _version(text: str) -> tuple[int, ...]:
    parts = [int(p) for p in text.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _requirements(
    lines: str, operator: str, prefix: str = ""
) -> dict[str, tuple[int, ...]]:
    found = {}
    for line in lines.splitlines():
        line = line.strip()
        if not line.startswith(prefix):
            continue
        match = _REQUIREMENT.match(line[len(prefix) :].strip())
        if match and match.group(2) == operator:
            found[match.group(1).lower()] = _version(match.group(3))
    return found


class LowestPinsTests(SynchronousTestCase):
    """
    C{tox.ini}'s C{lowest} pins against C{setup.cfg}'s floors.
    """

    def test_pinsAreTheFloors(self) -> None:
        """
        Every package C{tests-lowest} pins is pinned to the floor
        C{setup.cfg} declares for it, and Twisted, treq, pyOpenSSL and
        service-identity are among them.
        """
        setup = ConfigParser()
        setup.read(_ROOT.child("setup.cfg").path)
        floors = _requirements(setup["options"]["install_requires"], ">=")
        tox = ConfigParser(interpolation=None)
        tox.read(_ROOT.child("tox.ini").path)
        pins = _requirements(tox["testenv"]["deps"], "==", "lowest:")
        self.assertTrue(
            {"twisted", "treq", "pyopenssl", "service-identity"} <= set(pins), pins
        )
        self.assertEqual({name: floors.get(name) for name in pins}, pins)
