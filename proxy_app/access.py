"""
Who a request comes from and whether its role may reach the host it asks
for: the live ACL and credentials, swapped whole on reload so that a
request in progress keeps the decision it was given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from proxy_app.acl import (
    ACL,
    REASON_EXTERNAL_PROXY,
    ACLDecision,
    ACLError,
    loadACL,
)
from proxy_app.http1 import headerValue
from proxy_app.identity import Authenticator, AuthFailed, PasswordCheckPool

log = Logger()


class AccessControl:
    """
    Identification and the ACL, as configured.

    @ivar acl: the ACL in force, or L{None} for none.
    @ivar authenticator: the L{Authenticator}, or L{None} when proxy
        authentication is off.
    @ivar passwordChecks: the L{PasswordCheckPool} the authenticator's
        password checks run in, or L{None}; a service its owner starts and
        stops.
    """

    def __init__(
        self,
        acl: ACL | None = None,
        aclPath: str | None = None,
        authenticator: Authenticator | None = None,
        allowMissingRole: bool = False,
        roleHeader: str | None = None,
        passwordChecks: PasswordCheckPool | None = None,
        reportOnly: bool = False,
    ) -> None:
        self.acl = acl
        self.passwordChecks = passwordChecks
        self.aclPath = aclPath
        self.authenticator = authenticator
        self.allowMissingRole = allowMissingRole
        self.roleHeader = roleHeader.lower().encode("ascii") if roleHeader else None
        self.reportOnly = reportOnly
        # Whether a CA for interception is configured: without one, an ACL
        # with mitm_domains is not taken on reload (start-up refuses it).
        self.intercepting = False

    @classmethod
    def fromConfig(cls, settings: Any, auth: Any, reactor: Any) -> AccessControl:
        """
        Build from the C{acl} and C{auth} configuration sections.

        @raise ValueError: one line naming the file or spec at fault.
        """
        acl = loadACL(settings.file) if settings.file else None
        authenticator = passwordChecks = None
        if auth.checkers:
            # Not the reactor's pool: the system resolver runs there, and
            # bad passwords must never make lookups wait.
            passwordChecks = PasswordCheckPool(reactor, threads=auth.check_threads)
            authenticator = Authenticator.fromStrings(
                auth.checkers,
                reactor=reactor,
                threadpool=passwordChecks,
                failuresPerMinute=auth.failures_per_minute,
            )
        return cls(
            acl,
            settings.file,
            authenticator,
            settings.allow_missing_role,
            settings.role_header,
            passwordChecks,
            settings.report_only,
        )

    def identify(
        self, certificateRole: str | None, headers: Any, client: str | None = None
    ) -> str | None | Deferred:
        """
        The request's role, highest source first: the verified client
        certificate's CN, the trusted role header (when configured), the
        username of C{Proxy-Authorization: Basic}; else L{None}.

        @param client: the client's address, whose failed authentications
            are counted and limited.
        @return: the role when it is known at once (no password to check),
            else a L{Deferred} firing with the role, or failing with
            L{AuthFailed} when the request did not pass authentication, or
            with L{proxy_app.limits.Overloaded} when it was not checked (too
            many failures from C{client}, or too many checks waiting).
        """
        if certificateRole:
            return certificateRole
        if self.roleHeader is not None:
            # The first value that is not blank, not merely the first
            # value (L{headerValue}): a blank role header does not hide a
            # set one behind it.
            for name, value in headers:
                if name == self.roleHeader and value.strip():
                    return value.strip().decode("latin-1")
        if self.authenticator is None:
            return None
        return self.authenticator.authenticate(
            headerValue(headers, b"proxy-authorization"), client
        )

    def decide(
        self, role: str | None, host: str, connectProxyHost: str | None = None
    ) -> ACLDecision:
        """
        The ACL's decision for C{role} and C{host}; everything is allowed
        without an ACL.  With C{reportOnly} a denial becomes an allowed
        would-deny decision (L{ACLDecision.reportedOnly}): only the ACL's
        own decision is relaxed, never authentication (decided before) nor
        the address policy and the gate (after).

        @param connectProxyHost: the external proxy's host a CONNECT asked
            for (L{ACL.decide}).  Without an ACL nothing grants one, so it
            is denied, where Smokescreen would allow it: the client would
            otherwise choose where the proxy connects.
        """
        acl = self.acl
        if acl is None:
            if connectProxyHost is not None:
                return ACLDecision(
                    False, REASON_EXTERNAL_PROXY, role, None, None, True, None
                )
            return ACLDecision.withoutACL(role)
        decision = acl.decide(role, host, self.allowMissingRole, connectProxyHost)
        if not decision.allow and self.reportOnly:
            return decision.reportedOnly()
        return decision

    def files(self) -> list[str]:
        """
        The files L{reload} re-reads: the ACL and every password file.
        """
        paths = [self.aclPath] if self.aclPath is not None else []
        if self.authenticator is not None:
            paths.extend(self.authenticator.files())
        return paths

    def reload(self, failed: Callable[[str], object] | None = None) -> bool:
        """
        Re-read the ACL and the password files.  A file that fails to load
        leaves the old one in force and logs one error line.

        @param failed: called with C{"acl"} or C{"credentials"} for the
            part that failed to load (the reload-failure metric).
        @return: whether everything reloaded.
        """
        ok = True
        if self.aclPath is not None:
            try:
                acl = loadACL(self.aclPath)
                if acl.intercepts and not self.intercepting:
                    raise ACLError(
                        f"{self.aclPath}: mitm_domains needs mitm.ca_cert and "
                        "mitm.ca_key (the CA that intercepts)"
                    )
            except ACLError as e:
                log.error(
                    "ACL not reloaded, the old one stays in force: {error}",
                    error=str(e),
                )
                if failed is not None:
                    failed("acl")
                ok = False
            else:
                self.acl = acl
                log.info("ACL reloaded from {path}", path=self.aclPath)
        if self.authenticator is not None:
            try:
                self.authenticator.reload()
            except ValueError as e:
                log.error(
                    "Credentials not reloaded, the old ones stay in force: {error}",
                    error=str(e),
                )
                if failed is not None:
                    failed("credentials")
                ok = False
        return ok


__all__ = ["AccessControl", "AuthFailed"]
