"""
Who is asking: proxy authentication through a L{twisted.cred} portal.

A client's role is the CN of its verified client certificate (taken where
the TLS listener hands it over), else the username of its
C{Proxy-Authorization: Basic} header checked here, else it has none.

Checkers come from C{--auth} strings in L{twisted.cred.strcred} syntax
(C{memory:user:pass:...}, C{file:PATH} and any other installed checker
factory that checks usernames and passwords), plus C{htpasswd:PATH}: an
Apache-style file of bcrypt hashes, checked in a L{PasswordCheckPool} so
that the 50-250 ms a bcrypt check costs never stalls the reactor nor the
reactor's own thread pool, which resolves names.  Successful checks are
remembered for a short while, so that a keep-alive client sending its
credentials on every request pays for bcrypt about once a minute; failed
ones are counted per client address, and an address with too many is
refused before any check.

Passwords are never logged and never put in a message; password
comparisons are constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import bcrypt
from twisted.application.service import Service
from twisted.cred import error as credError
from twisted.cred.checkers import (
    FilePasswordDB,
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.cred.strcred import InvalidAuthArgumentString, InvalidAuthType, makeChecker
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from proxy_app.limits import Overloaded, RateLimiter, clientKey
from proxy_app.reasons import ProxyError, Reason

REALM = "egressproxy"
PROXY_AUTHENTICATE = f'Basic realm="{REALM}"'.encode("ascii")

# No real credentials come near this; anything longer is refused unread.
_MAX_HEADER = 4096
# bcrypt only looks at the first 72 bytes, and Apache's htpasswd truncates
# there too; pyca/bcrypt 5 raises instead, so we truncate as Apache does.
_BCRYPT_MAX = 72
_BCRYPT_HASH = re.compile(rb"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
_BCRYPT_ALPHABET = b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")

DEFAULT_CACHE_TTL = 60.0
DEFAULT_CACHE_SIZE = 4096
DEFAULT_FAILURES_PER_MINUTE = 10
DEFAULT_CHECK_THREADS = 2
# Checks that may wait per checking thread before more are refused: with
# bcrypt at cost 12 (about 250 ms) a check waits 2 s at worst.
BACKLOG_PER_THREAD = 8

log = Logger()

_T = TypeVar("_T")


class AuthFailed(ProxyError):
    """
    Proxy authentication is configured and the request did not pass it.
    Answered 407 with reason code 1013 and the L{headers} below.

    @ivar missing: C{True} when the request sent no credentials at all,
        C{False} when they were malformed or wrong.
    @ivar headers: the header lines to add to the 407 response.
    """

    headers = ((b"Proxy-Authenticate", PROXY_AUTHENTICATE),)

    def __init__(self, message: str, missing: bool) -> None:
        super().__init__(Reason.PROXY_AUTH_REQUIRED, message)
        self.missing = missing

    @classmethod
    def noCredentials(cls) -> AuthFailed:
        return cls(
            "Proxy authentication required: send Proxy-Authorization with Basic "
            "credentials",
            missing=True,
        )

    @classmethod
    def malformed(cls) -> AuthFailed:
        return cls(
            "Proxy authentication failed: the Proxy-Authorization header is not "
            "valid Basic credentials",
            missing=False,
        )

    @classmethod
    def wrong(cls) -> AuthFailed:
        return cls(
            "Proxy authentication failed: wrong username or password", missing=False
        )


class _ConstantTimeUsernamePassword(UsernamePassword):
    """
    L{UsernamePassword} whose comparison with a stored plaintext password
    takes the same time wherever the two differ, and whose C{repr} hides
    the password.
    """

    def checkPassword(self, password: bytes | str) -> bool:
        if isinstance(password, str):
            password = password.encode("utf-8")
        return hmac.compare_digest(self.password, password)

    def __repr__(self) -> str:
        return f"<UsernamePassword username={self.username!r} password=<hidden>>"


def parseBasic(headerValue: bytes) -> UsernamePassword | None:
    """
    Parse a C{Proxy-Authorization} value of the C{Basic} scheme (RFC 7617).

    The scheme name is matched without regard to case and surrounding
    whitespace is ignored.  The token must be strict base64 with correct
    padding; the decoded user-id must be non-empty UTF-8 without control
    characters, and is separated from the password by the first colon.

    @return: the credentials (bytes username and password), or C{None}
        when the value is absent, another scheme, or malformed.
    """
    if not headerValue or len(headerValue) > _MAX_HEADER:
        return None
    parts = headerValue.strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() != b"basic":
        return None
    token = parts[1].strip()
    if not token or any(c in token for c in b" \t\r\n"):
        return None
    try:
        decoded = base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        return None
    username, sep, password = decoded.partition(b":")
    if not sep or not username or _CONTROL.search(username):
        return None
    try:
        username.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return _ConstantTimeUsernamePassword(username, password)


class _IRole(Interface):
    """
    The avatar interface of the proxy's portal: the avatar is the role, a
    L{str}.
    """


@implementer(IRealm)
class _RoleRealm:
    """
    The trivial realm: a checked username is the role.
    """

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any
    ) -> tuple[Any, str, Callable[[], None]]:
        # An anonymous avatar (the empty tuple) or a non-text one is no role.
        if not isinstance(avatarId, bytes) or not avatarId:
            raise credError.UnauthorizedLogin("the checker gave no username")
        role = avatarId.decode("utf-8")
        return (_IRole, role, lambda: None)


def _readLines(path: str, what: str) -> list[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read().splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read {what}: {e.strerror or e}") from None


def _describeNonBcrypt(value: bytes) -> str:
    # Say what kind of entry it is without ever echoing it: it may be a
    # plaintext password.
    if value.startswith(b"$apr1$"):
        return "an Apache MD5 ($apr1$) hash"
    if value.startswith(b"{SHA}"):
        return "a SHA-1 ({SHA}) hash"
    if value.startswith((b"$5$", b"$6$", b"$1$")):
        return "a crypt(3) SHA/MD5 hash"
    if value.startswith(b"$2"):
        return "a malformed bcrypt hash"
    return "plain text or an unsupported hash"


def _checkBcrypt(password: bytes, hashed: bytes) -> bool:
    """
    Check C{password} against a bcrypt hash.  Runs in a worker thread.
    """
    try:
        return bcrypt.checkpw(password[:_BCRYPT_MAX], hashed)
    except ValueError:
        return False


def bcryptCost(hashed: bytes) -> int:
    """
    The cost (log2 of the rounds) of a well-formed bcrypt hash.
    """
    return int(hashed[4:6])


def decoyHash(cost: int) -> bytes:
    """
    A bcrypt hash at C{cost} that no password matches, made without
    hashing anything: a fresh salt and a random digest.  Checking a
    password against it costs what checking one against any hash of that
    cost does, since bcrypt runs in full before comparing the digests.
    """
    digest = bytes(_BCRYPT_ALPHABET[b % 64] for b in os.urandom(31))
    return bcrypt.gensalt(rounds=cost, prefix=b"2b") + digest


class PasswordCheckPool(Service):
    """
    The threads that password checks run in: a few of their own, apart
    from the reactor's thread pool, so that a flood of checks cannot delay
    the system resolver (C{getaddrinfo} runs in the reactor's pool).

    At most C{threads + backlog} checks are running or waiting at once; a
    check beyond that is refused at once with L{Overloaded} (503, reason
    1014, C{Retry-After}) rather than queued.  The threads run while the
    service runs; a check asked for before it starts waits for the start,
    and one asked for after it stopped is refused.

    @ivar threads: the number of checking threads.
    @ivar backlog: how many checks may wait for a thread.
    @ivar pending: the checks running or waiting now.
    """

    def __init__(
        self,
        reactor: Any,
        threads: int = DEFAULT_CHECK_THREADS,
        backlog: int | None = None,
        threadpool: Any = None,
    ) -> None:
        """
        @param reactor: the reactor results are delivered to.
        @param backlog: by default L{BACKLOG_PER_THREAD} per thread.
        @param threadpool: the pool to run in, for tests; by default a new
            L{ThreadPool} of exactly C{threads} threads.
        """
        self._reactor = reactor
        self.threads = threads
        self.backlog = BACKLOG_PER_THREAD * threads if backlog is None else backlog
        self._pool = (
            ThreadPool(threads, threads, name="egressproxy-password-checks")
            if threadpool is None
            else threadpool
        )
        self.pending = 0
        self._stopped = False

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        self._stopped = True
        # Waits for a check in progress (a fraction of a second) to end.
        self._pool.stop()

    def run(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Call C{f(*args)} in a checking thread.

        @return: a L{Deferred} firing with its result on the reactor
            thread, or failing with L{Overloaded} when too many checks are
            running or waiting, or the service has stopped.
        """
        if self._stopped:
            return fail(Overloaded("The proxy is shutting down", 503, 1))
        if self.pending >= self.threads + self.backlog:
            # Not logged here: the refused request's own line says it, and
            # a flood would otherwise log everything twice.
            return fail(
                Overloaded(
                    "Too many password checks in progress; try again shortly", 503, 1
                )
            )
        self.pending += 1

        def done(result: Any) -> Any:
            self.pending -= 1
            return result

        return deferToThreadPool(self._reactor, self._pool, f, *args).addBoth(done)


@implementer(ICredentialsChecker)
class HtpasswdChecker:
    """
    Checks usernames and passwords against an Apache C{htpasswd} file of
    bcrypt hashes (C{user:$2y$...}; C{$2b$} and C{$2a$} too), as written by
    C{htpasswd -nbB user password}.  Blank lines and lines starting with
    C{#} are skipped; any other entry, plaintext included, is refused at
    load time.

    The file is read when the checker is made and on L{reload}, never while
    checking.  bcrypt runs in C{threadpool}: through its C{run} when it is
    a L{PasswordCheckPool}, else through C{deferToThreadPool(reactor,
    threadpool)} when both are given; without them it runs inline, which
    blocks the caller and is meant for tools and tests only.

    An unknown user costs a bcrypt check too, against a decoy hash at the
    highest cost in the file, so that it costs what the dearest known user
    costs.  Users whose own hashes are cheaper can still be told apart by
    timing, so a file whose costs differ is warned about when loaded.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, path: str, reactor: Any = None, threadpool: Any = None) -> None:
        self.path = path
        self._reactor = reactor
        self._threadpool = threadpool
        self._users: dict[bytes, bytes] = {}
        self.decoy: bytes | None = None
        self.install(self.read())

    def read(self) -> dict[bytes, bytes]:
        """
        Parse the file.

        @return: the hash of each user.
        @raise ValueError: naming the file and line of the first problem;
            the message never contains a password or hash.
        """
        users: dict[bytes, bytes] = {}
        firstLine: dict[bytes, int] = {}
        for number, line in enumerate(_readLines(self.path, "htpasswd file"), 1):
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            where = f"{self.path}, line {number}"
            username, sep, hashed = line.partition(b":")
            if not sep or not username:
                raise ValueError(f"{where}: expected user:bcrypt-hash")
            try:
                name = username.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where}: the username is not UTF-8") from None
            if _CONTROL.search(username):
                raise ValueError(f"{where}: the username contains control characters")
            if username in users:
                raise ValueError(
                    f"{where}: user {name!r} already appears on line "
                    f"{firstLine[username]}"
                )
            if not _BCRYPT_HASH.match(hashed):
                raise ValueError(
                    f"{where}: the entry for user {name!r} is "
                    f"{_describeNonBcrypt(hashed)}; "
                    "only bcrypt ($2y$, $2b$, $2a$) is accepted: create one with "
                    "htpasswd -nbB USER PASSWORD"
                )
            users[username] = hashed
            firstLine[username] = number
        return users

    def install(self, users: dict[bytes, bytes]) -> None:
        """
        Put users that L{read} returned in force, with a new decoy hash at
        their highest cost, and warn when their costs differ.
        """
        costs = {u: bcryptCost(h) for u, h in users.items()}
        highest = max(costs.values(), default=None)
        if highest is not None and min(costs.values()) < highest:
            cheaper = sorted(u.decode("utf-8") for u, c in costs.items() if c < highest)
            log.warn(
                "{path}: bcrypt costs differ ({lowest} to {highest}); response times "
                "tell the {count} user(s) below cost {highest} ({users}) from others: "
                "hash every entry at the same cost",
                path=self.path,
                lowest=min(costs.values()),
                highest=highest,
                count=len(cheaper),
                users=", ".join(cheaper[:5]) + (", ..." if len(cheaper) > 5 else ""),
            )
        self._users = users
        self.decoy = None if highest is None else decoyHash(highest)

    def reload(self) -> None:
        """
        Re-read the file.  On error the old entries stay in force.

        @raise ValueError: naming the file and line.
        """
        self.install(self.read())

    @property
    def usernames(self) -> frozenset[str]:
        """
        The users the file holds.
        """
        return frozenset(u.decode("utf-8") for u in self._users)

    def _inThread(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        if isinstance(self._threadpool, PasswordCheckPool):
            return self._threadpool.run(f, *args)
        if self._reactor is not None and self._threadpool is not None:
            return deferToThreadPool(self._reactor, self._threadpool, f, *args)
        return maybeDeferred(f, *args)

    def requestAvatarId(
        self, credentials: IUsernamePassword
    ) -> Deferred[bytes | tuple[()]]:
        username = credentials.username
        password = credentials.password
        if isinstance(username, str):
            username = username.encode("utf-8")
        if isinstance(password, str):
            password = password.encode("utf-8")
        stored = self._users.get(username)
        if stored is None:
            decoy = self.decoy
            if decoy is None:
                return fail(credError.UnauthorizedLogin())
            return self._inThread(_checkBcrypt, password, decoy).addCallback(
                lambda _: Failure(credError.UnauthorizedLogin())
            )

        def matched(ok: bool) -> bytes | tuple[()] | Failure:
            return username if ok else Failure(credError.UnauthorizedLogin())

        return self._inThread(_checkBcrypt, password, stored).addCallback(matched)


@implementer(ICredentialsChecker)
class _PasswordFileChecker:
    """
    The C{file:PATH} checker: L{FilePasswordDB}'s C{user:password} format,
    read when made and on L{reload} rather than on every request, so that a
    broken edit keeps the last good contents and no file is read on the
    reactor thread per request.  Comparisons are constant-time.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, db: FilePasswordDB) -> None:
        self.path = db.filename
        self._delim = db.delim
        self._ufield = db.ufield
        self._pfield = db.pfield
        self._caseSensitive = db.caseSensitive
        self._users = self.read()

    def read(self) -> dict[bytes, bytes]:
        """
        Parse the file.

        @return: the password of each user.
        @raise ValueError: the file cannot be read.
        """
        users: dict[bytes, bytes] = {}
        for line in _readLines(self.path, "password file"):
            parts = line.rstrip().split(self._delim)
            # As FilePasswordDB: lines without enough fields are skipped,
            # and the first entry for a user wins.
            if max(self._ufield, self._pfield) >= len(parts):
                continue
            username = parts[self._ufield]
            if not self._caseSensitive:
                username = username.lower()
            users.setdefault(username, parts[self._pfield])
        return users

    def install(self, users: dict[bytes, bytes]) -> None:
        """
        Put users that L{read} returned in force.
        """
        self._users = users

    def reload(self) -> None:
        self.install(self.read())

    def requestAvatarId(
        self, credentials: IUsernamePassword
    ) -> Deferred[bytes | tuple[()]]:
        username = credentials.username
        if not self._caseSensitive:
            username = username.lower()
        stored = self._users.get(username)
        if stored is None:
            return fail(credError.UnauthorizedLogin())
        if hmac.compare_digest(credentials.password, stored):
            return succeed(username)
        return fail(credError.UnauthorizedLogin())


@implementer(ICredentialsChecker)
class _FirstMatch:
    """
    Several checkers for one interface: a L{Portal} keeps only one checker
    per credentials interface, so this one asks each in turn and accepts
    the first that accepts.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, checkers: Sequence[ICredentialsChecker]) -> None:
        self.checkers = tuple(checkers)

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[Any]:
        return self._ask(credentials, 0)

    def _ask(self, credentials: IUsernamePassword, index: int) -> Deferred[Any]:
        checker = self.checkers[index]

        def refused(reason: Failure) -> Deferred[Any] | Failure:
            if reason.check(Overloaded):
                # No check was made: the answer is "not now", not "no".
                return reason
            if not reason.check(
                credError.UnauthorizedLogin, credError.UnhandledCredentials
            ):
                # A broken checker must not decide for the others; it is
                # logged and treated as a refusal.
                log.failure(
                    "Credentials checker {checker} failed for {username}",
                    reason,
                    checker=type(checker).__name__,
                    username=credentials.username.decode("utf-8", "replace"),
                )
            if index + 1 < len(self.checkers):
                return self._ask(credentials, index + 1)
            return Failure(credError.UnauthorizedLogin())

        return maybeDeferred(checker.requestAvatarId, credentials).addErrback(refused)


def _usernamePasswordChecker(
    checker: ICredentialsChecker, spec: str
) -> ICredentialsChecker:
    interfaces = getattr(checker, "credentialInterfaces", ())
    if IUsernamePassword not in interfaces:
        raise ValueError(
            f"--auth {spec.split(':', 1)[0]!r} cannot check a username and password; "
            "use htpasswd:PATH, file:PATH or memory:USER:PASSWORD"
        )
    return checker


def _checkerFromString(spec: str, reactor: Any, threadpool: Any) -> ICredentialsChecker:
    authType, _, argument = spec.partition(":")
    if authType == "htpasswd":
        if not argument:
            raise ValueError("--auth htpasswd needs a path: htpasswd:PATH")
        if reactor is None or threadpool is None:
            raise ValueError(
                "--auth htpasswd needs a reactor and a thread pool, so that bcrypt "
                "does not block the reactor"
            )
        return HtpasswdChecker(argument, reactor=reactor, threadpool=threadpool)
    if authType == "file":
        # Checked here because the strcred factory only prints a warning to
        # stderr and carries on with a file it cannot read.
        if not argument:
            raise ValueError("--auth file needs a path: file:PATH")
        if not os.path.isfile(argument):
            raise ValueError(f"{argument}: --auth file: no such file")
    try:
        checker = makeChecker(spec)
    except InvalidAuthType:
        raise ValueError(
            f"--auth {authType!r} is not a known checker type; use htpasswd:PATH, "
            "file:PATH, memory:USER:PASSWORD or an installed twisted.cred plugin"
        ) from None
    except InvalidAuthArgumentString as e:
        raise ValueError(f"--auth {authType!r}: {e}") from None
    if isinstance(checker, FilePasswordDB):
        return _PasswordFileChecker(checker)
    if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
        # The strcred factory stores str; credentials arrive as bytes.
        users = {
            (k.encode("utf-8") if isinstance(k, str) else k): (
                v.encode("utf-8") if isinstance(v, str) else v
            )
            for k, v in checker.users.items()
        }
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        checker.users = users
    return _usernamePasswordChecker(checker, spec)


class Authenticator:
    """
    Checks C{Proxy-Authorization: Basic} credentials through a
    L{twisted.cred} portal whose avatar is the role (the username).

    Successes are remembered for C{cacheTTL} seconds.  Failures are counted
    per client address (see L{clientKey}) in a token bucket of
    C{failuresPerMinute} tokens refilled at as many a minute: an address
    whose bucket is empty is refused with L{Overloaded} (429) before any
    check is made, except for credentials remembered as good.

    @ivar checkers: the credentials checkers, asked in order.
    @ivar generation: incremented by each L{reload}; a check that began in
        an earlier generation is not remembered.
    """

    def __init__(
        self,
        checkers: Sequence[ICredentialsChecker],
        clock: IReactorTime | None = None,
        cacheTTL: float = DEFAULT_CACHE_TTL,
        cacheSize: int = DEFAULT_CACHE_SIZE,
        failuresPerMinute: int = DEFAULT_FAILURES_PER_MINUTE,
    ) -> None:
        """
        @param checkers: at least one checker of L{IUsernamePassword}.
        @param clock: the clock for the cache of successful checks and the
            count of failures; without one nothing is cached or counted.
        @param cacheTTL: how long, in seconds, a successful check is
            remembered.
        @param cacheSize: at most this many are remembered.
        @param failuresPerMinute: failed checks allowed per client address,
            at once and then per minute; 0 for no limit.
        """
        if not checkers:
            raise ValueError("an Authenticator needs at least one checker")
        self.checkers = tuple(checkers)
        self._portal = Portal(_RoleRealm(), [_FirstMatch(self.checkers)])
        self._clock = clock
        self._cacheTTL = cacheTTL
        self._cacheSize = cacheSize
        # Keyed by an HMAC under a per-process secret rather than a bare
        # hash, so that the cache holds nothing worth brute-forcing.
        self._cacheKey = os.urandom(32)
        self._cache: dict[tuple[bytes, bytes], tuple[float, str]] = {}
        self.generation = 0
        self._failures = (
            RateLimiter(clock, failuresPerMinute / 60.0, failuresPerMinute)
            if clock is not None and failuresPerMinute > 0
            else None
        )

    @classmethod
    def fromStrings(
        cls,
        specs: Sequence[str],
        reactor: Any = None,
        threadpool: Any = None,
        clock: IReactorTime | None = None,
        cacheTTL: float = DEFAULT_CACHE_TTL,
        failuresPerMinute: int = DEFAULT_FAILURES_PER_MINUTE,
    ) -> Authenticator:
        """
        Build from C{--auth} strings: C{htpasswd:PATH}, or anything
        L{twisted.cred.strcred.makeChecker} accepts that checks usernames
        and passwords (C{file:PATH}, C{memory:USER:PASS:...}, ...).

        @param reactor: the reactor bcrypt results are delivered to, and
            the default C{clock}.
        @param threadpool: the pool bcrypt runs in: a L{PasswordCheckPool},
            never the reactor's own pool, which resolves names.  Required
            with C{htpasswd:}.
        @raise ValueError: one line naming the bad spec or file.
        """
        if not specs:
            raise ValueError("no --auth checkers given")
        checkers = [_checkerFromString(spec, reactor, threadpool) for spec in specs]
        return cls(
            checkers,
            clock=clock if clock is not None else reactor,
            cacheTTL=cacheTTL,
            failuresPerMinute=failuresPerMinute,
        )

    def _cacheKeyFor(self, credentials: UsernamePassword) -> tuple[bytes, bytes]:
        digest = hmac.new(self._cacheKey, credentials.password, hashlib.sha256).digest()
        return (credentials.username, digest)

    def _remember(self, key: tuple[bytes, bytes], role: str) -> None:
        if self._clock is None or self._cacheTTL <= 0:
            return
        now = self._clock.seconds()
        if len(self._cache) >= self._cacheSize:
            for stale in [k for k, (expiry, _) in self._cache.items() if expiry <= now]:
                del self._cache[stale]
            while len(self._cache) >= self._cacheSize:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = (now + self._cacheTTL, role)

    def _recall(self, key: tuple[bytes, bytes]) -> str | None:
        if self._clock is None:
            return None
        entry = self._cache.get(key)
        if entry is None:
            return None
        expiry, role = entry
        if expiry <= self._clock.seconds():
            del self._cache[key]
            return None
        return role

    def authenticate(
        self, headerValue: bytes | None, client: str | None = None
    ) -> Deferred[str]:
        """
        Check a request's C{Proxy-Authorization} value.

        @param client: the client's address, whose failures are counted;
            L{None} counts nothing.
        @return: a L{Deferred} firing with the role (the username), or
            failing with L{AuthFailed}: missing, malformed or wrong
            credentials, or a checker that broke (logged); or with
            L{Overloaded}: 429 when C{client} has failed too often, 503
            when too many password checks are waiting.
        """
        if headerValue is None or not headerValue.strip():
            return fail(AuthFailed.noCredentials())
        credentials = parseBasic(headerValue)
        if credentials is None:
            log.info("Proxy-Authorization is not valid Basic credentials")
            return fail(AuthFailed.malformed())
        key = self._cacheKeyFor(credentials)
        cached = self._recall(key)
        if cached is not None:
            return succeed(cached)
        failures = self._failures
        counted = None
        if failures is not None and client is not None:
            counted = clientKey(client)
            wait = failures.wait(counted)
            if wait:
                log.info(
                    "Proxy authentication from {client} refused unchecked: too many "
                    "failures",
                    client=counted,
                )
                return fail(
                    Overloaded(
                        "Too many failed proxy authentications from this address; "
                        "try again later",
                        429,
                        wait,
                    )
                )
        username = credentials.username.decode("utf-8", "replace")
        generation = self.generation

        def loggedIn(result: tuple[Any, str, Callable[[], None]]) -> str:
            _, role, logout = result
            logout()
            # A check that began before a reload was made against the old
            # users: good for this request, which began then too, but not
            # to be remembered past the reload.
            if generation == self.generation:
                self._remember(key, role)
            return role

        def failed(reason: Failure) -> Failure:
            if reason.check(Overloaded):
                return reason
            if reason.check(credError.LoginFailed):
                if failures is not None and counted is not None:
                    failures.take(counted)
                log.info(
                    "Proxy authentication failed for {username}", username=username
                )
            else:
                log.failure(
                    "Checking credentials failed for {username}",
                    reason,
                    username=username,
                )
            return Failure(AuthFailed.wrong())

        d = self._portal.login(credentials, None, _IRole)
        return d.addCallbacks(loggedIn, failed)

    def files(self) -> list[str]:
        """
        The password files L{reload} re-reads.
        """
        return [
            checker.path
            for checker in self.checkers
            if isinstance(checker, (HtpasswdChecker, _PasswordFileChecker))
        ]

    def reload(self) -> None:
        """
        Re-read every file-based checker.  All files are read before any is
        replaced, so on error every checker keeps its old data.  Remembered
        successes are forgotten, and checks still running are not
        remembered when they end, so removed users and changed passwords
        take effect at once.

        @raise ValueError: naming the file and line of the first problem.
        """
        staged = [
            (checker, checker.read())
            for checker in self.checkers
            if isinstance(checker, (HtpasswdChecker, _PasswordFileChecker))
        ]
        for checker, users in staged:
            checker.install(users)
        self.generation += 1
        self._cache.clear()


__all__ = [
    "AuthFailed",
    "Authenticator",
    "HtpasswdChecker",
    "PROXY_AUTHENTICATE",
    "PasswordCheckPool",
    "REALM",
    "parseBasic",
]
