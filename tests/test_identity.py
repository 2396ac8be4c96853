"""
Tests for L{proxy_app.identity}: Basic proxy credentials checked through a
twisted.cred portal, bcrypt htpasswd files, and the cache of good checks.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from typing import Any

import bcrypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IResolutionReceiver
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from proxy_app import identity
from proxy_app.access import AccessControl
from proxy_app.config import ACLSettings, Auth
from proxy_app.identity import (
    PROXY_AUTHENTICATE,
    REALM,
    Authenticator,
    AuthFailed,
    HtpasswdChecker,
    PasswordCheckPool,
    bcryptCost,
    parseBasic,
)
from proxy_app.limits import Overloaded, clientKey
from proxy_app.reasons import ProxyError, Reason


def basic(username: bytes, password: bytes) -> bytes:
    return b"Basic " + base64.b64encode(username + b":" + password)


def bcryptHash(password: bytes, prefix: bytes = b"$2b$", cost: int = 4) -> bytes:
    """
    A cheap bcrypt hash (cost 4 unless told) with the given prefix, as
    htpasswd (2y), OpenBSD (2b) or older libraries (2a) write it.
    """
    hashed = bcrypt.hashpw(password, bcrypt.gensalt(rounds=cost))
    return prefix + hashed[4:]


class FakeThreadReactor(Clock):
    """
    A clock that delivers results "from the thread" at once.
    """

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


class SyncThreadPool:
    """
    A thread pool that runs each call at once, counting them.
    """

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.args: list[tuple[Any, ...]] = []
        self.running = False

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, Any], None],
        f: Callable[..., Any],
        *a: Any,
        **kw: Any,
    ) -> None:
        self.calls.append(f)
        self.args.append(a)
        try:
            result = f(*a, **kw)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class QueuedThreadPool(SyncThreadPool):
    """
    A thread pool whose calls wait until L{runAll}, like a busy real one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[Any, ...]] = []

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, Any], None],
        f: Callable[..., Any],
        *a: Any,
        **kw: Any,
    ) -> None:
        self.pending.append((onResult, f, a, kw))

    def runAll(self) -> None:
        pending, self.pending = self.pending, []
        for onResult, f, a, kw in pending:
            super().callInThreadWithCallback(onResult, f, *a, **kw)


@implementer(ICredentialsChecker)
class BrokenChecker:
    """
    A checker that fails with an unexpected error.
    """

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return fail(RuntimeError("database unavailable"))


@implementer(ICredentialsChecker)
class AnonymousAvatarChecker:
    """
    A checker that accepts anyone as the anonymous avatar.
    """

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return succeed(())


class ParseBasicTests(SynchronousTestCase):
    """
    L{parseBasic} reads RFC 7617 Basic credentials strictly.
    """

    def test_valid(self) -> None:
        """
        A Basic value gives byte credentials that provide
        L{IUsernamePassword}.
        """
        creds = parseBasic(basic(b"alice", b"s3cret"))
        assert creds is not None
        self.assertTrue(verifyObject(IUsernamePassword, creds))
        self.assertEqual((creds.username, creds.password), (b"alice", b"s3cret"))

    def test_schemeCaseAndWhitespace(self) -> None:
        """
        The scheme is matched without regard to case, and surrounding and
        separating whitespace is ignored.
        """
        token = base64.b64encode(b"alice:pw")
        for value in (
            b"basic " + token,
            b"BASIC " + token,
            b"bAsIc " + token,
            b"  Basic   " + token + b"  ",
            b"\tBasic\t" + token + b"\r\n",
        ):
            creds = parseBasic(value)
            assert creds is not None, value
            self.assertEqual((creds.username, creds.password), (b"alice", b"pw"))

    def test_passwordSplitAtFirstColon(self) -> None:
        """
        The user-id ends at the first colon; the password may hold colons,
        or be empty, and may be any bytes.
        """
        creds = parseBasic(basic(b"alice", b"a:b:c"))
        assert creds is not None
        self.assertEqual((creds.username, creds.password), (b"alice", b"a:b:c"))
        creds = parseBasic(basic(b"alice", b""))
        assert creds is not None
        self.assertEqual(creds.password, b"")
        creds = parseBasic(basic("jürgen".encode(), "pässwörd\xff".encode("latin-1")))
        assert creds is not None
        self.assertEqual(creds.username, "jürgen".encode())

    def test_invalid(self) -> None:
        """
        Other schemes, missing tokens, non-strict base64, missing colons,
        empty or non-UTF-8 or control-character user-ids and over-long
        values give C{None}.
        """
        good = base64.b64encode(b"alice:pw")
        for value in (
            b"",
            b"   ",
            b"Basic",
            b"Basic ",
            b"Bearer " + good,
            b"Digest " + good,
            b"Basicx " + good,
            good,
            b"Basic " + good[:-1],  # bad padding
            b"Basic " + good.rstrip(b"="),
            b"Basic " + good[:4] + b" " + good[4:],
            b"Basic " + good + b" extra",
            b"Basic !!!!",
            b"Basic " + base64.b64encode(b"alicepw"),
            b"Basic " + base64.b64encode(b":pw"),
            b"Basic " + base64.b64encode(b"\xffalice:pw"),
            b"Basic " + base64.b64encode(b"ali\nce:pw"),
            b"Basic " + base64.b64encode(b"ali\x00ce:pw"),
            b"Basic " + base64.b64encode(b"alice:" + b"p" * 5000),
        ):
            self.assertIsNone(parseBasic(value), value[:80])

    def test_credentialsHidePasswordAndCompareExactly(self) -> None:
        """
        The credentials' repr hides the password, and C{checkPassword}
        accepts exactly the same password, as bytes or text.
        """
        creds = parseBasic(basic(b"alice", b"hunter2"))
        assert creds is not None
        self.assertNotIn("hunter2", repr(creds))
        self.assertIn("alice", repr(creds))
        self.assertTrue(creds.checkPassword(b"hunter2"))
        self.assertTrue(creds.checkPassword("hunter2"))  # type: ignore[arg-type]
        self.assertFalse(creds.checkPassword(b"hunter3"))
        self.assertFalse(creds.checkPassword(b"hunter2 "))
        self.assertFalse(creds.checkPassword(b""))


class AuthFailedTests(SynchronousTestCase):
    """
    L{AuthFailed} is answered 407 with reason 1013 and a Basic challenge.
    """

    def test_codeStatusAndChallenge(self) -> None:
        """
        Every kind of failure is a L{ProxyError} with reason 1013, status
        407 and C{Proxy-Authenticate: Basic realm="egressproxy"}.
        """
        self.assertEqual(REALM, "egressproxy")
        self.assertEqual(PROXY_AUTHENTICATE, b'Basic realm="egressproxy"')
        for error in (
            AuthFailed.noCredentials(),
            AuthFailed.malformed(),
            AuthFailed.wrong(),
        ):
            self.assertIsInstance(error, ProxyError)
            self.assertIs(error.reason, Reason.PROXY_AUTH_REQUIRED)
            self.assertEqual(int(error.reason), 1013)
            self.assertEqual(error.status, 407)
            self.assertIn(
                (b"Proxy-Authenticate", b'Basic realm="egressproxy"'), error.headers
            )

    def test_missingVersusWrong(self) -> None:
        """
        The message and the C{missing} flag tell missing credentials from
        malformed or wrong ones.
        """
        self.assertTrue(AuthFailed.noCredentials().missing)
        self.assertIn("required", AuthFailed.noCredentials().message)
        self.assertFalse(AuthFailed.wrong().missing)
        self.assertIn("wrong username or password", AuthFailed.wrong().message)
        self.assertFalse(AuthFailed.malformed().missing)
        self.assertIn("not valid Basic", AuthFailed.malformed().message)


class AuthenticatorTests(SynchronousTestCase):
    """
    L{Authenticator} checks credentials through its portal.
    """

    def authFailed(self, d: Deferred[str]) -> AuthFailed:
        error = self.failureResultOf(d, AuthFailed).value
        assert isinstance(error, AuthFailed)
        return error

    def test_memoryChecker(self) -> None:
        """
        A C{memory:} strcred checker accepts its users and gives the
        username as the role, as text.
        """
        auth = Authenticator.fromStrings(["memory:alice:pw1:bob:pw2"])
        self.assertEqual(
            self.successResultOf(auth.authenticate(basic(b"alice", b"pw1"))), "alice"
        )
        self.assertEqual(
            self.successResultOf(auth.authenticate(basic(b"bob", b"pw2"))), "bob"
        )

    def test_wrongCredentials(self) -> None:
        """
        A wrong password, an unknown user or another user's password fail
        with AuthFailed, not missing.
        """
        auth = Authenticator.fromStrings(["memory:alice:pw1:bob:pw2"])
        for header in (
            basic(b"alice", b"pw2"),
            basic(b"alice", b"PW1"),
            basic(b"carol", b"pw1"),
            basic(b"alice", b""),
        ):
            error = self.authFailed(auth.authenticate(header))
            self.assertFalse(error.missing)
            self.assertEqual(error.status, 407)

    def test_missingCredentials(self) -> None:
        """
        No header, or an empty one, fails with AuthFailed marked missing.
        """
        auth = Authenticator.fromStrings(["memory:alice:pw"])
        for header in (None, b"", b"  "):
            self.assertTrue(self.authFailed(auth.authenticate(header)).missing)

    def test_malformedCredentials(self) -> None:
        """
        A header that is not valid Basic credentials fails, not as missing.
        """
        auth = Authenticator.fromStrings(["memory:alice:pw"])
        error = self.authFailed(auth.authenticate(b"Bearer abc"))
        self.assertFalse(error.missing)
        self.assertIn("not valid Basic", error.message)

    def test_severalCheckersAreAllAsked(self) -> None:
        """
        With several C{--auth} checkers, a user known to any of them is
        accepted (a Portal alone would keep only the last one).
        """
        auth = Authenticator.fromStrings(["memory:alice:pw1", "memory:bob:pw2"])
        self.assertEqual(
            self.successResultOf(auth.authenticate(basic(b"alice", b"pw1"))), "alice"
        )
        self.assertEqual(
            self.successResultOf(auth.authenticate(basic(b"bob", b"pw2"))), "bob"
        )
        self.authFailed(auth.authenticate(basic(b"bob", b"pw1")))

    def test_brokenCheckerIsLoggedAndSkipped(self) -> None:
        """
        A checker failing unexpectedly is logged and treated as a refusal,
        and the next checker is still asked.
        """
        memory = Authenticator.fromStrings(["memory:alice:pw"]).checkers[0]
        auth = Authenticator([BrokenChecker(), memory])
        self.assertEqual(
            self.successResultOf(auth.authenticate(basic(b"alice", b"pw"))), "alice"
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.authFailed(
            Authenticator([BrokenChecker()]).authenticate(basic(b"alice", b"pw"))
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_anonymousAvatarIsNoRole(self) -> None:
        """
        A checker that yields the anonymous avatar does not authenticate
        anyone.
        """
        auth = Authenticator([AnonymousAvatarChecker()])
        self.authFailed(auth.authenticate(basic(b"alice", b"pw")))

    def test_badSpecs(self) -> None:
        """
        Unknown types, checkers that cannot check passwords, malformed
        arguments and no checkers at all are ValueErrors naming the problem.
        """
        for specs, fragment in (
            (["nosuchtype:x"], "'nosuchtype' is not a known checker type"),
            (["anonymous"], "cannot check a username and password"),
            (["memory:alice"], "'memory'"),
            (["file:"], "needs a path"),
            (["htpasswd:"], "needs a path"),
            ([], "no --auth"),
        ):
            with self.assertRaises(ValueError) as caught:
                Authenticator.fromStrings(specs)
            self.assertIn(fragment, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))
        self.assertRaises(ValueError, Authenticator, [])

    def test_noPasswordInLogs(self) -> None:
        """
        Neither a password nor the base64 header carrying it appears in any
        log event, whether the check succeeds, fails or is malformed.
        """
        path = FilePath(self.mktemp())
        path.setContent(b"alice:" + bcryptHash(b"correct-horse") + b"\n")
        auth = Authenticator.fromStrings(
            ["memory:bob:battery-staple", f"htpasswd:{path.path}"],
            reactor=FakeThreadReactor(),
            threadpool=SyncThreadPool(),
        )
        headers = [
            basic(b"alice", b"correct-horse"),
            basic(b"alice", b"wrong-horse"),
            basic(b"bob", b"battery-staple"),
            basic(b"bob", b"battery-wrong"),
            basic(b"nobody", b"nobody-pass"),
            b"Basic " + base64.b64encode(b"secretnocolon"),
        ]
        with capturedLogs() as events:
            for header in headers:
                auth.authenticate(header).addErrback(lambda f: None)
            memory = auth.checkers[0]
            Authenticator([BrokenChecker(), memory]).authenticate(
                basic(b"carol", b"broken-pass")
            ).addErrback(lambda f: None)
        self.flushLoggedErrors(RuntimeError)
        self.assertTrue(events)
        text = "\n".join(formatEvent(e) + repr(e) for e in events)
        for secret in (
            "correct-horse",
            "wrong-horse",
            "battery-staple",
            "battery-wrong",
            "nobody-pass",
            "secretnocolon",
            "broken-pass",
        ):
            self.assertNotIn(secret, text)
        for header in headers:
            self.assertNotIn(header.split()[1].decode(), text)
        self.assertIn("alice", text)


class FileCheckerTests(SynchronousTestCase):
    """
    C{file:PATH} reads twisted.cred's plain C{user:password} file when made
    and on reload.
    """

    def setUp(self) -> None:
        self.path = FilePath(self.mktemp())
        self.path.setContent(b"alice:pw1\nbob:pw2\n")

    def test_checks(self) -> None:
        """
        Users in the file authenticate with their password and no other.
        """
        auth = Authenticator.fromStrings([f"file:{self.path.path}"])
        self.assertEqual(
            self.successResultOf(auth.authenticate(basic(b"bob", b"pw2"))), "bob"
        )
        self.failureResultOf(auth.authenticate(basic(b"bob", b"pw1")), AuthFailed)
        self.failureResultOf(auth.authenticate(basic(b"carol", b"pw1")), AuthFailed)

    def test_missingFile(self) -> None:
        """
        A missing file is a ValueError naming it.
        """
        missing = self.mktemp()
        with self.assertRaises(ValueError) as caught:
            Authenticator.fromStrings([f"file:{missing}"])
        self.assertIn(missing, str(caught.exception))

    def test_readOnceAndOnReload(self) -> None:
        """
        Edits take effect on reload, not before.
        """
        auth = Authenticator.fromStrings([f"file:{self.path.path}"])
        self.path.setContent(b"alice:new\n")
        self.assertEqual(
            self.successResultOf(auth.authenticate(basic(b"bob", b"pw2"))), "bob"
        )
        auth.reload()
        self.failureResultOf(auth.authenticate(basic(b"bob", b"pw2")), AuthFailed)
        self.assertEqual(
            self.successResultOf(auth.authenticate(basic(b"alice", b"new"))), "alice"
        )

    def test_reloadKeepsOldDataOnError(self) -> None:
        """
        A reload that cannot read the file raises ValueError naming it and
        keeps the users it had.
        """
        auth = Authenticator.fromStrings([f"file:{self.path.path}"])
        self.path.remove()
        with self.assertRaises(ValueError) as caught:
            auth.reload()
        self.assertIn(self.path.path, str(caught.exception))
        self.assertEqual(
            self.successResultOf(auth.authenticate(basic(b"alice", b"pw1"))), "alice"
        )


class HtpasswdTests(SynchronousTestCase):
    """
    C{htpasswd:PATH} checks bcrypt hashes in a thread pool.
    """

    def setUp(self) -> None:
        self.path = FilePath(self.mktemp())
        self.reactor = FakeThreadReactor()
        self.pool = SyncThreadPool()
        self.clock = Clock()

    def write(self, *lines: bytes) -> str:
        self.path.setContent(b"\n".join(lines) + b"\n")
        return self.path.path

    def authenticator(self, **kw: Any) -> Authenticator:
        return Authenticator.fromStrings(
            [f"htpasswd:{self.path.path}"],
            reactor=self.reactor,
            threadpool=self.pool,
            clock=kw.pop("clock", self.clock),
            **kw,
        )

    def test_bcryptVariants(self) -> None:
        """
        C{$2y$} (Apache htpasswd), C{$2b$} and C{$2a$} hashes are all
        checked; comments and blank lines are skipped.
        """
        self.write(
            b"# users",
            b"",
            b"yan:" + bcryptHash(b"pw-y", b"$2y$"),
            b"bea:" + bcryptHash(b"pw-b", b"$2b$"),
            b"  ",
            b"ada:" + bcryptHash(b"pw-a", b"$2a$"),
        )
        auth = self.authenticator()
        for user, password in ((b"yan", b"pw-y"), (b"bea", b"pw-b"), (b"ada", b"pw-a")):
            self.assertEqual(
                self.successResultOf(auth.authenticate(basic(user, password))),
                user.decode(),
            )
            self.failureResultOf(
                auth.authenticate(basic(user, password + b"x")), AuthFailed
            )

    def test_checkerInterface(self) -> None:
        """
        L{HtpasswdChecker} is an L{ICredentialsChecker} of
        L{IUsernamePassword} and lists its users.
        """
        self.write(b"alice:" + bcryptHash(b"pw"))
        checker = HtpasswdChecker(self.path.path)
        self.assertTrue(verifyObject(ICredentialsChecker, checker))
        self.assertEqual(checker.credentialInterfaces, (IUsernamePassword,))
        self.assertEqual(checker.usernames, frozenset({"alice"}))
        # Without a thread pool it checks inline (for tools and tests).
        self.assertEqual(
            self.successResultOf(
                checker.requestAvatarId(UsernamePassword(b"alice", b"pw"))
            ),
            b"alice",
        )

    def test_bcryptRunsInThreadPool(self) -> None:
        """
        The bcrypt check runs in the thread pool: the result waits for the
        pool, never computed on the caller's thread.
        """
        self.write(b"alice:" + bcryptHash(b"pw"))
        pool = QueuedThreadPool()
        auth = Authenticator.fromStrings(
            [f"htpasswd:{self.path.path}"], reactor=self.reactor, threadpool=pool
        )
        d = auth.authenticate(basic(b"alice", b"pw"))
        self.assertNoResult(d)
        self.assertEqual(len(pool.pending), 1)
        pool.runAll()
        self.assertEqual(self.successResultOf(d), "alice")

    def test_requiresThreadPool(self) -> None:
        """
        C{htpasswd:} without a reactor and thread pool is refused rather
        than left to block the reactor.
        """
        self.write(b"alice:" + bcryptHash(b"pw"))
        with self.assertRaises(ValueError) as caught:
            Authenticator.fromStrings([f"htpasswd:{self.path.path}"])
        self.assertIn("thread pool", str(caught.exception))

    def test_unknownUserCostsABcryptCheck(self) -> None:
        """
        An unknown user is refused only after a bcrypt check, so timing
        does not reveal which users exist.
        """
        self.write(b"alice:" + bcryptHash(b"pw"))
        auth = self.authenticator()
        self.failureResultOf(auth.authenticate(basic(b"mallory", b"pw")), AuthFailed)
        self.assertEqual(len(self.pool.calls), 1)

    def test_unknownUserCheckedAtHighestCost(self) -> None:
        """
        An unknown user is checked against a decoy hash at the highest
        bcrypt cost in the file, whichever entry comes first, and not
        against any user's own hash; a reload that raises the highest cost
        raises the decoy's with it.
        """
        cheap, dear = bcryptHash(b"pw", cost=4), bcryptHash(b"pw", cost=6)
        self.write(b"alice:" + cheap, b"bob:" + dear)
        auth = self.authenticator()
        self.failureResultOf(auth.authenticate(basic(b"mallory", b"pw")), AuthFailed)
        ((password, checkedAgainst),) = self.pool.args
        self.assertEqual(password, b"pw")
        self.assertEqual(bcryptCost(checkedAgainst), 6)
        self.assertNotIn(checkedAgainst, (cheap, dear))
        self.failureResultOf(auth.authenticate(basic(b"bob", b"wrong")), AuthFailed)
        self.assertEqual(bcryptCost(self.pool.args[-1][1]), bcryptCost(checkedAgainst))

        self.write(b"alice:" + cheap, b"carol:" + bcryptHash(b"pw", cost=7))
        auth.reload()
        self.failureResultOf(auth.authenticate(basic(b"bob", b"pw")), AuthFailed)
        self.assertEqual(bcryptCost(self.pool.args[-1][1]), 7)

    def test_decoyMatchesNoPassword(self) -> None:
        """
        The decoy hash is a well-formed bcrypt hash that the checker really
        computes bcrypt for, and that no password matches: not even the
        password of the user whose cost it copies.
        """
        self.write(b"alice:" + bcryptHash(b"pw", cost=5))
        checker = HtpasswdChecker(self.path.path)
        assert checker.decoy is not None
        self.assertRegex(checker.decoy, rb"^\$2b\$05\$[./A-Za-z0-9]{53}$")
        self.assertFalse(identity._checkBcrypt(b"pw", checker.decoy))
        self.assertFalse(identity._checkBcrypt(b"", checker.decoy))

    def test_differentCostsWarned(self) -> None:
        """
        A file whose entries have different bcrypt costs loads with a
        warning naming the file, the costs and the cheaper users, since
        timing still tells those users from the others; no hash is logged.
        A file of one cost loads without it.
        """
        cheap = bcryptHash(b"pw", cost=4)
        self.write(b"alice:" + cheap, b"bob:" + bcryptHash(b"pw", cost=5))
        with capturedLogs() as events:
            HtpasswdChecker(self.path.path)
        (warning,) = [e for e in events if e["log_level"].name == "warn"]
        text = formatEvent(warning)
        self.assertIn(self.path.path, text)
        self.assertIn("(4 to 5)", text)
        self.assertIn("alice", text)
        self.assertNotIn("bob", text)
        self.assertNotIn(cheap.decode(), text)
        self.write(b"alice:" + cheap, b"bob:" + bcryptHash(b"pw", cost=4))
        with capturedLogs() as events:
            HtpasswdChecker(self.path.path)
        self.assertEqual([e for e in events if e["log_level"].name == "warn"], [])

    def test_emptyFile(self) -> None:
        """
        A file with no users loads and refuses everyone.
        """
        self.write(b"# nobody yet")
        auth = self.authenticator()
        self.failureResultOf(auth.authenticate(basic(b"alice", b"pw")), AuthFailed)

    def test_longPasswordsTruncatedAsApache(self) -> None:
        """
        Passwords longer than bcrypt's 72 bytes are checked on their first
        72 bytes, as Apache's htpasswd does, instead of raising.
        """
        password = b"p" * 100
        self.write(b"alice:" + bcrypt.hashpw(password[:72], bcrypt.gensalt(rounds=4)))
        auth = self.authenticator()
        self.assertEqual(
            self.successResultOf(auth.authenticate(basic(b"alice", password))), "alice"
        )
        self.failureResultOf(auth.authenticate(basic(b"alice", b"q" * 100)), AuthFailed)

    def test_rejectedEntries(self) -> None:
        """
        Plaintext, other hash schemes, malformed lines and duplicate users
        are load errors naming the file and line, never showing the entry.
        """
        good = b"alice:" + bcryptHash(b"pw")
        for line, fragment in (
            (b"bob:plaintext-secret", "plain text or an unsupported hash"),
            (b"bob:$apr1$abcdefgh$plaintext-secret", "Apache MD5"),
            (b"bob:{SHA}plaintext-secret=", "SHA-1"),
            (b"bob:$2y$04$plaintext-secret", "malformed bcrypt hash"),
            (b"bob:$2y$03$" + b"a" * 53, "malformed bcrypt hash"),
            (b"plaintext-secret", "expected user:bcrypt-hash"),
            (b":" + bcryptHash(b"pw"), "expected user:bcrypt-hash"),
            (b"alice:" + bcryptHash(b"pw"), "already appears on line 1"),
            (b"\xff:" + bcryptHash(b"pw"), "not UTF-8"),
        ):
            self.write(good, line)
            with self.assertRaises(ValueError) as caught:
                HtpasswdChecker(self.path.path)
            message = str(caught.exception)
            self.assertIn(f"{self.path.path}, line 2", message)
            self.assertIn(fragment, message)
            self.assertNotIn("plaintext-secret", message)
            self.assertNotIn("\n", message)

    def test_plaintextRefusedWithAdvice(self) -> None:
        """
        A plaintext entry is refused with advice on making a bcrypt hash.
        """
        self.write(b"bob:hunter2")
        with self.assertRaises(ValueError) as caught:
            HtpasswdChecker(self.path.path)
        self.assertIn("htpasswd -nbB USER PASSWORD", str(caught.exception))
        self.assertIn("user 'bob'", str(caught.exception))
        self.assertNotIn("hunter2", str(caught.exception))

    def test_missingFile(self) -> None:
        """
        An unreadable htpasswd file is a ValueError naming it.
        """
        missing = self.mktemp()
        with self.assertRaises(ValueError) as caught:
            HtpasswdChecker(missing)
        self.assertIn(missing, str(caught.exception))

    def test_reload(self) -> None:
        """
        Reload picks up added users and changed passwords, and forgets
        remembered successes.
        """
        self.write(b"alice:" + bcryptHash(b"old"))
        auth = self.authenticator()
        self.successResultOf(auth.authenticate(basic(b"alice", b"old")))
        self.write(b"alice:" + bcryptHash(b"new"), b"bob:" + bcryptHash(b"pw"))
        auth.reload()
        self.failureResultOf(auth.authenticate(basic(b"alice", b"old")), AuthFailed)
        self.assertEqual(
            self.successResultOf(auth.authenticate(basic(b"alice", b"new"))), "alice"
        )
        self.assertEqual(
            self.successResultOf(auth.authenticate(basic(b"bob", b"pw"))), "bob"
        )

    def test_reloadKeepsOldDataOnBadFile(self) -> None:
        """
        A reload of a broken file raises ValueError naming file and line,
        and every checker keeps its old users, even one whose own file was
        fine.
        """
        self.write(b"alice:" + bcryptHash(b"pw"))
        other = FilePath(self.mktemp())
        other.setContent(b"bob:" + bcryptHash(b"pw2") + b"\n")
        auth = Authenticator.fromStrings(
            [f"htpasswd:{other.path}", f"htpasswd:{self.path.path}"],
            reactor=self.reactor,
            threadpool=self.pool,
        )
        other.setContent(b"carol:" + bcryptHash(b"pw3") + b"\n")
        self.write(b"alice:" + bcryptHash(b"pw"), b"bob:not-a-hash")
        with self.assertRaises(ValueError) as caught:
            auth.reload()
        self.assertIn(f"{self.path.path}, line 2", str(caught.exception))
        self.assertEqual(
            self.successResultOf(auth.authenticate(basic(b"alice", b"pw"))), "alice"
        )
        self.assertEqual(
            self.successResultOf(auth.authenticate(basic(b"bob", b"pw2"))), "bob"
        )
        self.failureResultOf(auth.authenticate(basic(b"carol", b"pw3")), AuthFailed)
        checker = HtpasswdChecker(other.path)
        other.setContent(b"broken\n")
        self.assertRaises(ValueError, checker.reload)
        self.assertEqual(checker.usernames, frozenset({"carol"}))


class CacheTests(SynchronousTestCase):
    """
    Successful checks are remembered for a short time on the injected
    clock.
    """

    def setUp(self) -> None:
        path = FilePath(self.mktemp())
        path.setContent(b"alice:" + bcryptHash(b"pw") + b"\n")
        self.pool = SyncThreadPool()
        self.clock = Clock()
        self.auth = Authenticator.fromStrings(
            [f"htpasswd:{path.path}"],
            reactor=FakeThreadReactor(),
            threadpool=self.pool,
            clock=self.clock,
            cacheTTL=60,
        )

    def test_successRememberedForTTL(self) -> None:
        """
        A repeat of good credentials within the TTL is answered without
        bcrypt; after the TTL bcrypt runs again.
        """
        header = basic(b"alice", b"pw")
        self.assertEqual(self.successResultOf(self.auth.authenticate(header)), "alice")
        self.assertEqual(len(self.pool.calls), 1)
        self.clock.advance(59)
        self.assertEqual(self.successResultOf(self.auth.authenticate(header)), "alice")
        self.assertEqual(len(self.pool.calls), 1)
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(self.auth.authenticate(header)), "alice")
        self.assertEqual(len(self.pool.calls), 2)

    def test_otherPasswordNotServedFromCache(self) -> None:
        """
        The cache is keyed by the password too: a wrong password for a
        remembered user is still checked, and refused.
        """
        self.successResultOf(self.auth.authenticate(basic(b"alice", b"pw")))
        self.failureResultOf(
            self.auth.authenticate(basic(b"alice", b"pw2")), AuthFailed
        )
        self.assertEqual(len(self.pool.calls), 2)

    def test_failuresNotRemembered(self) -> None:
        """
        A failed check is not remembered: each wrong attempt is checked.
        """
        for _ in range(3):
            self.failureResultOf(
                self.auth.authenticate(basic(b"alice", b"no")), AuthFailed
            )
        self.assertEqual(len(self.pool.calls), 3)

    def test_noClockNoCache(self) -> None:
        """
        Without a clock nothing is remembered.
        """
        checker = self.auth.checkers[0]
        auth = Authenticator([checker])
        for _ in range(2):
            self.successResultOf(auth.authenticate(basic(b"alice", b"pw")))
        self.assertEqual(len(self.pool.calls), 2)

    def test_bounded(self) -> None:
        """
        The cache holds at most C{cacheSize} entries, dropping the oldest.
        """
        memory = Authenticator.fromStrings(["memory:a:1:b:2:c:3"]).checkers[0]
        auth = Authenticator([memory], clock=self.clock, cacheSize=2)
        for user, password in ((b"a", b"1"), (b"b", b"2"), (b"c", b"3")):
            self.successResultOf(auth.authenticate(basic(user, password)))
        self.assertEqual(len(auth._cache), 2)
        self.assertEqual({key[0] for key in auth._cache}, {b"b", b"c"})

    def test_cacheHoldsNoPassword(self) -> None:
        """
        The cache keys hold a keyed digest, not the password or its plain
        SHA-256.
        """
        import hashlib

        self.successResultOf(self.auth.authenticate(basic(b"alice", b"pw")))
        ((username, digest),) = self.auth._cache
        self.assertEqual(username, b"alice")
        # A 32-byte digest, not the password; keyed, so neither the plain
        # SHA-256 nor another authenticator's digest of the same password.
        # (Not "b'pw' not in digest": two random bytes in 32 match one run
        # in about two thousand.)
        self.assertEqual(len(digest), 32)
        self.assertNotEqual(digest, hashlib.sha256(b"pw").digest())
        other = Authenticator([self.auth.checkers[0]], clock=self.clock)
        self.successResultOf(other.authenticate(basic(b"alice", b"pw")))
        ((_, otherDigest),) = other._cache
        self.assertNotEqual(digest, otherDigest)

    def test_notRememberedAcrossAuthenticators(self) -> None:
        """
        Each authenticator has its own cache secret and contents.
        """
        self.successResultOf(self.auth.authenticate(basic(b"alice", b"pw")))
        other = Authenticator([self.auth.checkers[0]], clock=self.clock)
        self.successResultOf(other.authenticate(basic(b"alice", b"pw")))
        self.assertEqual(len(self.pool.calls), 2)


class UnauthorizedLoginIsAFailureTests(SynchronousTestCase):
    """
    Checkers report refusals as L{UnauthorizedLogin}.
    """

    def test_htpasswdRefusal(self) -> None:
        """
        L{HtpasswdChecker} refuses a wrong password with
        L{UnauthorizedLogin}, as twisted.cred checkers must.
        """
        path = FilePath(self.mktemp())
        path.setContent(b"alice:" + bcryptHash(b"pw") + b"\n")
        checker = HtpasswdChecker(
            path.path, reactor=FakeThreadReactor(), threadpool=SyncThreadPool()
        )
        self.failureResultOf(
            checker.requestAvatarId(UsernamePassword(b"alice", b"nope")),
            UnauthorizedLogin,
        )
        self.failureResultOf(
            checker.requestAvatarId(UsernamePassword(b"bob", b"pw")), UnauthorizedLogin
        )


class ReloadInFlightTests(SynchronousTestCase):
    """
    A reload while a password check is running: the check's result must
    not outlive the users it was checked against.
    """

    def setUp(self) -> None:
        self.path = FilePath(self.mktemp())
        self.path.setContent(
            b"alice:" + bcryptHash(b"pw") + b"\n" + b"bob:" + bcryptHash(b"pw2") + b"\n"
        )
        self.pool = QueuedThreadPool()
        self.auth = Authenticator.fromStrings(
            [f"htpasswd:{self.path.path}"],
            reactor=FakeThreadReactor(),
            threadpool=self.pool,
            clock=Clock(),
        )

    def test_removedUserRefusedAfterReload(self) -> None:
        """
        A check of a user's password that began before a reload removed
        the user is not remembered when it ends after it: the user's next
        request is checked against the new file and refused.
        """
        header = basic(b"alice", b"pw")
        inFlight = self.auth.authenticate(header)
        self.assertNoResult(inFlight)
        self.path.setContent(b"bob:" + bcryptHash(b"pw2") + b"\n")
        self.auth.reload()
        self.pool.runAll()
        # The request that began before the reload keeps its answer.
        self.assertEqual(self.successResultOf(inFlight), "alice")
        after = self.auth.authenticate(header)
        self.pool.runAll()
        self.failureResultOf(after, AuthFailed)

    def test_checkAfterReloadRemembered(self) -> None:
        """
        A check that began after the last reload is remembered as before.
        """
        self.auth.reload()
        first = self.auth.authenticate(basic(b"bob", b"pw2"))
        self.pool.runAll()
        self.assertEqual(self.successResultOf(first), "bob")
        self.assertEqual(
            self.successResultOf(self.auth.authenticate(basic(b"bob", b"pw2"))), "bob"
        )
        self.assertEqual(self.pool.pending, [])


class PasswordCheckPoolTests(SynchronousTestCase):
    """
    L{PasswordCheckPool} runs checks in a thread pool of its own, with a
    bounded backlog.
    """

    def setUp(self) -> None:
        self.threads = QueuedThreadPool()
        self.pool = PasswordCheckPool(
            FakeThreadReactor(), threads=2, backlog=3, threadpool=self.threads
        )
        self.pool.startService()

    def test_backlogBounded(self) -> None:
        """
        With C{threads + backlog} checks running or waiting, the next is
        refused at once with 503, reason code 1014 and C{Retry-After}, and
        never reaches the threads; once checks end, new ones are taken.
        """
        waiting = [self.pool.run(lambda i=i: i) for i in range(5)]
        self.assertEqual(self.pool.pending, 5)
        refused = self.failureResultOf(self.pool.run(lambda: 99), Overloaded).value
        self.assertEqual((refused.status, int(refused.reason)), (503, 1014))
        self.assertEqual(dict(refused.headers)[b"Retry-After"], b"1")
        self.assertEqual(len(self.threads.pending), 5)
        self.threads.runAll()
        self.assertEqual([self.successResultOf(d) for d in waiting], [0, 1, 2, 3, 4])
        self.assertEqual(self.pool.pending, 0)
        self.assertEqual(self.successResultOf(self._runNow(lambda: 7)), 7)

    def _runNow(self, f: Callable[[], Any]) -> Deferred[Any]:
        d = self.pool.run(f)
        self.threads.runAll()
        return d

    def test_failuresFreeTheirPlace(self) -> None:
        """
        A check that raises frees its place in the backlog too.
        """

        def broken() -> None:
            raise RuntimeError("boom")

        for _ in range(5):
            self.pool.run(broken).addErrback(lambda f: f.trap(RuntimeError))
        self.threads.runAll()
        self.assertEqual(self.pool.pending, 0)

    def test_serviceStartsAndStopsThreads(self) -> None:
        """
        The threads run while the service does; after it stops, a check is
        refused (503) instead of being queued where nothing will run it.
        """
        self.assertTrue(self.threads.running)
        self.pool.stopService()
        self.assertFalse(self.threads.running)
        refused = self.failureResultOf(self.pool.run(lambda: 1), Overloaded).value
        self.assertEqual(refused.status, 503)
        self.assertEqual(self.threads.pending, [])

    def test_fullPoolIsNotAFailedLogin(self) -> None:
        """
        A check refused by a full pool fails authentication with
        L{Overloaded} (503), not L{AuthFailed}, and does not count as a
        failure of the client's address.
        """
        path = FilePath(self.mktemp())
        path.setContent(b"alice:" + bcryptHash(b"pw") + b"\n")
        auth = Authenticator.fromStrings(
            [f"htpasswd:{path.path}"],
            reactor=FakeThreadReactor(),
            threadpool=self.pool,
            clock=Clock(),
            failuresPerMinute=1,
        )
        for _ in range(5):
            auth.authenticate(basic(b"alice", b"pw"), "192.0.2.1")
        refused = self.failureResultOf(
            auth.authenticate(basic(b"alice", b"no"), "192.0.2.9"), Overloaded
        )
        self.assertEqual(refused.value.status, 503)
        self.threads.runAll()
        # The refusal did not use up 192.0.2.9's only allowed failure.
        d = auth.authenticate(basic(b"alice", b"no"), "192.0.2.9")
        self.threads.runAll()
        self.failureResultOf(d, AuthFailed)


class FailureLimitTests(SynchronousTestCase):
    """
    Failed authentications are counted per client address, and an address
    with too many is refused before any password is checked.
    """

    def setUp(self) -> None:
        path = FilePath(self.mktemp())
        path.setContent(b"alice:" + bcryptHash(b"pw") + b"\n")
        self.pool = SyncThreadPool()
        self.clock = Clock()
        self.auth = Authenticator.fromStrings(
            [f"htpasswd:{path.path}"],
            reactor=FakeThreadReactor(),
            threadpool=self.pool,
            clock=self.clock,
            failuresPerMinute=3,
        )

    def attempt(
        self, password: bytes, client: str = "192.0.2.1", user: bytes = b"alice"
    ) -> Deferred[str]:
        return self.auth.authenticate(basic(user, password), client)

    def accepted(self, client: str = "192.0.2.1") -> str:
        return self.successResultOf(self.attempt(b"pw", client))

    def test_refusedUncheckedAfterFailures(self) -> None:
        """
        After C{failuresPerMinute} failures from one address, its next
        attempt, even with the right password, is refused with 429, reason
        code 1014 and C{Retry-After} without a bcrypt check; another
        address is still checked; the budget refills at the configured rate.
        """
        for password in (b"a", b"b"):
            self.failureResultOf(self.attempt(password), AuthFailed)
        # Unknown users count as known ones do.
        self.failureResultOf(self.attempt(b"c", user=b"mallory"), AuthFailed)
        self.assertEqual(len(self.pool.calls), 3)
        for password in (b"d", b"pw"):
            refused = self.failureResultOf(self.attempt(password), Overloaded).value
            self.assertEqual((refused.status, int(refused.reason)), (429, 1014))
            self.assertEqual(dict(refused.headers)[b"Retry-After"], b"20")
        self.assertEqual(len(self.pool.calls), 3)
        self.clock.advance(19)
        self.failureResultOf(self.attempt(b"pw"), Overloaded)
        self.assertEqual(self.accepted("192.0.2.2"), "alice")
        self.assertEqual(len(self.pool.calls), 4)
        self.clock.advance(1)
        # One failure's worth has come back: the next attempt is checked.
        self.failureResultOf(self.attempt(b"e"), AuthFailed)
        self.failureResultOf(self.attempt(b"f"), Overloaded)
        self.assertEqual(len(self.pool.calls), 5)

    def test_cachedCredentialsStillPass(self) -> None:
        """
        Credentials remembered as good are accepted from a refused address,
        since they cost no check.
        """
        self.assertEqual(self.accepted(), "alice")
        for password in (b"a", b"b", b"c"):
            self.failureResultOf(self.attempt(password), AuthFailed)
        self.failureResultOf(self.attempt(b"d"), Overloaded)
        self.assertEqual(self.accepted(), "alice")
        self.assertEqual(len(self.pool.calls), 4)

    def test_missingAndMalformedNotCounted(self) -> None:
        """
        Missing and malformed credentials cost no check and are not
        counted: a client's first, credential-less request never uses up
        its budget.
        """
        for _ in range(5):
            self.failureResultOf(self.auth.authenticate(None, "192.0.2.1"), AuthFailed)
            self.failureResultOf(
                self.auth.authenticate(b"Basic !!", "192.0.2.1"), AuthFailed
            )
        self.assertEqual(self.accepted(), "alice")

    def test_counterPerAddressAndPrefix(self) -> None:
        """
        IPv6 clients are counted per /64, and an IPv4-mapped address as its
        IPv4 address.
        """
        for client in ("2001:db8::1", "2001:db8::2", "2001:db8::3"):
            self.failureResultOf(self.attempt(b"x", client=client), AuthFailed)
        self.failureResultOf(self.attempt(b"pw", client="2001:db8::ffff"), Overloaded)
        self.assertEqual(self.accepted("2001:db8:0:1::1"), "alice")
        for client in ("192.0.2.7", "::ffff:192.0.2.7", "192.0.2.7"):
            self.failureResultOf(self.attempt(b"x", client=client), AuthFailed)
        self.failureResultOf(self.attempt(b"y", client="192.0.2.7"), Overloaded)

    def test_clientKey(self) -> None:
        """
        L{clientKey} gives the IPv4 address, the IPv6 /64, or the host as
        it is when it is not an address.
        """
        self.assertEqual(clientKey("192.0.2.1"), "192.0.2.1")
        self.assertEqual(clientKey("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64")
        self.assertEqual(clientKey("fe80::1%eth0"), "fe80::/64")
        self.assertEqual(clientKey("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(clientKey(""), "")

    def test_zeroTurnsItOff(self) -> None:
        """
        C{failuresPerMinute=0} counts nothing.
        """
        auth = Authenticator(self.auth.checkers, clock=self.clock, failuresPerMinute=0)
        for _ in range(10):
            self.failureResultOf(
                auth.authenticate(basic(b"alice", b"x"), "192.0.2.1"), AuthFailed
            )
        self.assertEqual(
            self.successResultOf(
                auth.authenticate(basic(b"alice", b"pw"), "192.0.2.1")
            ),
            "alice",
        )


@implementer(IResolutionReceiver)
class _Addresses:
    """
    An L{IResolutionReceiver} collecting addresses, firing C{done} at the
    end.
    """

    def __init__(self) -> None:
        self.addresses: list[Any] = []
        self.done: Deferred[list[Any]] = Deferred()

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


class ResolutionNotStarvedTests(TestCase):
    """
    Password checks cannot make name resolution wait: with the real
    reactor and real threads.
    """

    def test_resolutionServedWhileChecksWait(self) -> None:
        """
        With the proxy's password checks as built by
        L{AccessControl.fromConfig}, every checking thread stuck in a slow
        check and the backlog full, a name is still resolved by the
        reactor's resolver (C{getaddrinfo} in the reactor's thread pool),
        and checks beyond the backlog are refused at once with 503.
        """
        from twisted.internet import reactor

        release = threading.Event()

        def slowCheck(password: bytes, hashed: bytes) -> bool:
            release.wait(30)
            return False

        self.patch(identity, "_checkBcrypt", slowCheck)
        path = FilePath(self.mktemp())
        path.setContent(b"alice:" + bcryptHash(b"pw") + b"\n")
        access = AccessControl.fromConfig(
            ACLSettings(), Auth(checkers=(f"htpasswd:{path.path}",)), reactor
        )
        checks = access.passwordChecks
        assert checks is not None
        checks.startService()
        self.addCleanup(checks.stopService)
        capacity = checks.threads + checks.backlog
        # Enough to hold every thread of the reactor's pool as well, were
        # the checks run there.
        count = max(capacity, reactor.getThreadPool().max) + 2  # type: ignore[attr-defined]
        outcomes = []
        for i in range(count):
            header = basic(f"user{i}".encode(), b"wrong")
            d = access.identify(
                None, [(b"proxy-authorization", header)], f"192.0.2.{i}"
            )
            outcomes.append(
                d.addErrback(lambda f: f.trap(AuthFailed, Overloaded) and f.value)
            )
        refused = [self.successResultOf(d) for d in outcomes[capacity:]]
        self.assertEqual({e.status for e in refused}, {503})
        for d in outcomes[:capacity]:
            self.assertNoResult(d)
        # Cleanups run last first: release the checks, wait for them to
        # end, then stop the threads.
        self.addCleanup(gatherResults, outcomes[:capacity])
        self.addCleanup(release.set)

        receiver = _Addresses()
        reactor.nameResolver.resolveHostName(receiver, "localhost", 0)  # type: ignore[attr-defined]
        done = receiver.done.addTimeout(10, reactor)

        def resolved(addresses: list[Any]) -> None:
            self.assertTrue(addresses)
            self.assertFalse(release.is_set())
            for d in outcomes[:capacity]:
                self.assertNoResult(d)

        return done.addCallback(resolved)  # type: ignore[return-value]
