"""
Docs that speak of the future go stale: "not yet", "will", "once the
access-control issue lands", "not implemented" were each true when written
and false a round later, and nothing noticed.

The mechanism: every sentence in C{README.md} and C{docs/*.md} that matches
L{FUTURE} must be listed here, either in L{NOT_ABOUT_FEATURES} (the words
describe run-time state, such as a certificate "not yet valid") or in
L{PROMISES}, where it is bound to a check that the thing it calls missing
is still missing (a configuration key absent from
L{proxy_app.config.fields}).  A new forward-looking sentence fails the
suite until it is listed with such a check, and the day the missing thing
arrives the check fails and names the sentence to rewrite.  See
C{CONTRIBUTING.md}.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from proxy_app import config

_ROOT = FilePath(__file__).parent().parent()

# "yet" after a comma is the conjunction ("one address, yet two
# connects"), not a promise.
FUTURE = re.compile(
    r"(?<!, )\byet\b|\bwill\b|\bonce\b[^.;|]{0,60}\b(?:lands|(?:is|are) merged)\b"
    r"|not implemented"
    r"|\bcoming soon\b|\bplanned\b",
    re.IGNORECASE,
)


def _keysAbsent(*keys: str) -> Callable[[], bool]:
    return lambda: not set(keys) & {f.key for f in config.fields()}


# (file, text around the match): why the words are not about a feature.
NOT_ABOUT_FEATURES = {
    ("docs/configuration.md", "the proxy not yet taken"): "a connection's state",
    ("docs/deployment.md", "not yet in the ACL file"): "an operator's ACL",
    ("docs/errors.md", "not yet valid"): "a certificate's validity",
    ("docs/webhooks.md", "not yet stopped"): "a connection's state",
}

# (file, text around the match): a check that is true while the sentence is.
PROMISES: dict[tuple[str, str], Callable[[], bool]] = {}


def _docs() -> list[FilePath]:
    return [_ROOT.child("README.md"), *sorted(_ROOT.child("docs").globChildren("*.md"))]


def _matches() -> list[tuple[str, str]]:
    """
    Every (file, line) in the docs with a forward-looking phrase.
    """
    found = []
    for doc in _docs():
        name = "/".join(doc.segmentsFrom(_ROOT))
        for line in doc.getContent().decode("utf-8").splitlines():
            if FUTURE.search(line):
                found.append((name, line))
    return found


class DocsCurrentTests(SynchronousTestCase):
    """
    Forward-looking sentences in the docs are listed, and each promise is
    still true.
    """

    def test_everyMatchListed(self) -> None:
        """
        Every line with "yet", "will", "once ... lands/merged", "not
        implemented", "coming soon" or "planned" contains a listed text.
        """
        listed = [*NOT_ABOUT_FEATURES, *PROMISES]
        unlisted = [
            f"{name}: {line.strip()}"
            for name, line in _matches()
            if not any(name == f and text in line for f, text in listed)
        ]
        self.assertEqual(unlisted, [], "rewrite in the present, or list it here")

    def test_listedTextsExist(self) -> None:
        """
        Every listed text is still in its file (a list of stale exceptions
        would hide nothing, but would rot).
        """
        for name, text in [*NOT_ABOUT_FEATURES, *PROMISES]:
            self.assertIn(text, _ROOT.preauthChild(name).getContent().decode(), name)

    def test_promisesStillTrue(self) -> None:
        """
        What each promise calls missing is still missing; when it arrives,
        rewrite the sentence and drop the entry.
        """
        broken = [
            f"{name}: {text}" for (name, text), check in PROMISES.items() if not check()
        ]
        self.assertEqual(broken, [], "these docs call something missing that exists")

    def test_catches(self) -> None:
        """
        The phrases the issue names are caught, so that the first test can
        fail.
        """
        for sentence in (
            "Roles will select ACL rules once the access-control issue lands.",
            "There is no hostname ACL yet.",
            "CRLs are not implemented.",
        ):
            self.assertIsNotNone(FUTURE.search(sentence), sentence)
