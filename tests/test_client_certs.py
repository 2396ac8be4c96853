"""
Client-certificate aliases and roles: which client may present which
certificate (issue 13, items 5 and 6), tried as a hostile tenant would.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from zope.interface import implementer

from proxy_app import config
from proxy_app.access import AccessControl
from proxy_app.addresses import AddressPolicy
from proxy_app.config import TLS, ClientCertAlias, Config, ConfigError
from proxy_app.identity import Authenticator
from proxy_app.observe import AccessLog, DecisionLog
from proxy_app.reasons import ProxyError, Reason
from proxy_app.resolver import SafeResolver
from proxy_app.server import ProxyFactory
from proxy_app.tap import Options, buildOrigination, hasRoles
from proxy_app.tls import ClientIdentity, Origination, TLSConfigError
from proxy_app.upstream import Connector

from . import test_tls
from .certs import Authority
from .helpers import Harness, ScriptedNameResolver, makeHarness, parseResponse

_CA = Authority("client CA")


def identity(alias: str, roles: tuple[str, ...] | None = None) -> ClientIdentity:
    """
    A client identity with a fresh certificate whose CN is C{alias}.
    """
    certPEM, keyPEM, _ = _CA.issue(alias, client=True)
    certificate = ssl.PrivateCertificate.loadPEM(certPEM + keyPEM)
    return ClientIdentity(
        alias, certificate, None if roles is None else frozenset(roles)
    )


def tlsRequest(alias: str | None = None, extra: bytes = b"") -> bytes:
    """
    A request asking the proxy to originate TLS, naming C{alias}.
    """
    lines = (
        b"GET http://origin.example/hook HTTP/1.1\r\nHost: origin.example\r\n"
        b"X-WhSentry-TLS: true\r\n"
    )
    if alias is not None:
        lines += b"X-WhSentry-ClientCert: " + alias.encode() + b"\r\n"
    return lines + extra + b"\r\n"


def basic(user: str, password: str) -> bytes:
    return (
        b"Proxy-Authorization: Basic "
        + base64.b64encode(f"{user}:{password}".encode())
        + b"\r\n"
    )


@implementer(ICredentialsChecker)
class PendingChecker:
    """
    A password checker whose answers wait until the test gives them, as a
    bcrypt check in a thread does.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.pending: list[Deferred] = []

    def requestAvatarId(self, credentials: Any) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append(d)
        return d


class AliasRoleTests(SynchronousTestCase):
    """
    In memory: the alias a client names is checked against its role after
    identification and the ACL, before anything is resolved or connected.
    """

    def harness(
        self,
        rolesInUse: bool = True,
        access: AccessControl | None = None,
        default: bool = True,
    ) -> Harness:
        h = makeHarness()
        h.factory.origination = Origination(
            ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(_CA.pem)]),
            identity("default") if default else None,
            {
                "tenant-a": identity("tenant-a", ("role-a",)),
                "tenant-b": identity("tenant-b", ("role-b", "role-b2")),
                "unbound": identity("unbound"),
            },
            rolesInUse=rolesInUse,
        )
        h.factory.access = (
            access if access is not None else AccessControl(roleHeader="X-Tenant")
        )
        return h

    def assertRefused(self, h: Harness, alias: str, who: str) -> None:
        self.assertEqual(h.reactor.tcpClients, [])
        status, headers, body = parseResponse(h.client.value())
        self.assertEqual(status, 403)
        self.assertEqual(headers[b"x-whsentry-reasoncode"], b"1016")
        self.assertEqual(headers[b"content-type"], b"text/plain; charset=utf-8")
        message = f"Client certificate alias '{alias}' is not permitted for {who}"
        self.assertEqual(headers[b"x-whsentry-reason"], message.encode())
        self.assertEqual(body, message.encode() + b"\n")
        self.assertEqual(h.factory.pool.idleCount(), 0)
        self.assertEqual(h.access[-1]["response_code"], 403)

    def test_otherTenantsAliasRefused(self) -> None:
        """
        Tenant A naming tenant B's alias gets 403/1016, and nothing is
        resolved or connected (immediate path: a trusted role header).
        """
        h = self.harness()
        h.send(tlsRequest("tenant-b", b"X-Tenant: role-a\r\n"))
        self.assertRefused(h, "tenant-b", "role 'role-a'")
        self.assertEqual(h.resolver.calls, [])

    def test_decisionLogged(self) -> None:
        """
        The decision log records a refused alias as a denial, with the
        refusal as its reason, though the ACL allowed the host.
        """
        h = self.harness()
        lines = io.StringIO()
        h.factory.decisionLog = DecisionLog(lines, "json")
        h.send(tlsRequest("tenant-b", b"X-Tenant: role-a\r\n"))
        (line,) = [json.loads(text) for text in lines.getvalue().splitlines()]
        self.assertEqual(
            (line["allow"], line["role"], line["status_code"], line["decision_reason"]),
            (
                False,
                "role-a",
                403,
                "Client certificate alias 'tenant-b' is not permitted for role "
                "'role-a'",
            ),
        )

    def test_anonymousBoundAliasRefused(self) -> None:
        """
        A client without a role gets no bound alias once roles exist.
        """
        h = self.harness()
        h.send(tlsRequest("tenant-a"))
        self.assertRefused(h, "tenant-a", "a client without a role")

    def test_unboundAliasRefusedWithRoles(self) -> None:
        """
        Once roles exist, an alias bound to no role is refused to every
        role.
        """
        h = self.harness()
        h.send(tlsRequest("unbound", b"X-Tenant: role-a\r\n"))
        self.assertRefused(h, "unbound", "role 'role-a'")

    def test_certificateRoleRefused(self) -> None:
        """
        A role from a TLS listener's client certificate is held to the same
        binding (immediate path, no header involved).
        """
        h = self.harness(access=AccessControl())
        h.protocol.role = "role-a"
        h.send(tlsRequest("tenant-b"))
        self.assertRefused(h, "tenant-b", "role 'role-a'")

    def test_ownAliasServed(self) -> None:
        """
        A role naming an alias bound to it is connected, on port 443, to
        the vetted address; so is every role an alias lists.
        """
        h = self.harness()
        h.send(tlsRequest("tenant-a", b"X-Tenant: role-a\r\n"))
        self.assertEqual(h.client.value(), b"")
        self.assertEqual([c[:2] for c in h.reactor.tcpClients], [("203.0.113.10", 443)])
        h = self.harness()
        h.send(tlsRequest("tenant-b", b"X-Tenant: role-b2\r\n"))
        self.assertEqual(len(h.reactor.tcpClients), 1)

    def test_roleNamesAreExact(self) -> None:
        """
        Roles match exactly: no case folding, no prefix match.
        """
        for role in ("Role-A", "role-a2", "role"):
            h = self.harness()
            h.send(tlsRequest("tenant-a", b"X-Tenant: " + role.encode() + b"\r\n"))
            self.assertRefused(h, "tenant-a", f"role {role!r}")

    def test_aclDecidesFirst(self) -> None:
        """
        An ACL denial is answered as such (1011): the alias check comes
        right after the ACL's decision.
        """
        from proxy_app.acl import ACL

        acl = ACL.fromYAML(
            "version: v1\nservices:\n  - name: role-a\n    project: p\n"
            "    action: enforce\n    allowed_domains: [other.example]\n"
        )
        h = self.harness(access=AccessControl(acl, roleHeader="X-Tenant"))
        h.send(tlsRequest("tenant-b", b"X-Tenant: role-a\r\n"))
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (403, b"1011"))
        self.assertEqual(h.reactor.tcpClients, [])

    def test_waitingPathRefused(self) -> None:
        """
        With a password check in flight, nothing is connected while it
        runs, and once it names tenant A, tenant B's alias is refused with
        403/1016 and still nothing is connected.
        """
        checker = PendingChecker()
        h = self.harness(access=AccessControl(authenticator=Authenticator([checker])))
        h.send(tlsRequest("tenant-b", basic("role-a", "pw")))
        self.assertEqual(len(checker.pending), 1)
        self.assertEqual((h.client.value(), h.reactor.tcpClients), (b"", []))
        checker.pending[0].callback(b"role-a")
        self.assertRefused(h, "tenant-b", "role 'role-a'")

    def test_waitingPathServed(self) -> None:
        """
        With a password check in flight, a role naming its own alias is
        connected once the check names it.
        """
        checker = PendingChecker()
        h = self.harness(access=AccessControl(authenticator=Authenticator([checker])))
        h.send(tlsRequest("tenant-b", basic("role-b", "pw")))
        self.assertEqual(h.reactor.tcpClients, [])
        checker.pending[0].callback(b"role-b")
        self.assertEqual(h.client.value(), b"")
        self.assertEqual(len(h.reactor.tcpClients), 1)

    def test_checkedCredentialRefused(self) -> None:
        """
        Credentials checked at once (an in-memory checker, or a cached
        bcrypt result) are held to the binding too.
        """
        h = self.harness(
            access=AccessControl(
                authenticator=Authenticator.fromStrings(
                    ["memory:role-a:pw"], clock=makeHarness().reactor
                )
            )
        )
        h.send(tlsRequest("tenant-b", basic("role-a", "pw")))
        self.assertRefused(h, "tenant-b", "role 'role-a'")

    def test_noRolesAnyAlias(self) -> None:
        """
        A deployment without roles keeps webhook-sentry's behaviour: any
        client may name any alias without a binding.
        """
        h = self.harness(rolesInUse=False, access=AccessControl())
        h.send(tlsRequest("unbound"))
        self.assertEqual(h.client.value(), b"")
        self.assertEqual(len(h.reactor.tcpClients), 1)

    def test_defaultForEveryone(self) -> None:
        """
        The default certificate is the proxy's own: with roles in use, a
        client without a role still gets it, by default or by naming
        C{default}.
        """
        for alias in (None, "default"):
            h = self.harness()
            h.send(tlsRequest(alias))
            self.assertEqual(h.client.value(), b"")
            self.assertEqual(len(h.reactor.tcpClients), 1)

    def test_unknownAliasStill1010(self) -> None:
        """
        An alias that is not configured is 400/1010, and C{default} is
        unknown when there is no --client-cert.
        """
        for alias in ("nope", "default"):
            h = self.harness(default=False)
            h.send(tlsRequest(alias, b"X-Tenant: role-a\r\n"))
            status, headers, body = parseResponse(h.client.value())
            self.assertEqual(
                (status, headers[b"x-whsentry-reasoncode"]), (400, b"1010")
            )
            self.assertIn(f"'{alias}'".encode(), body)
            self.assertEqual(h.reactor.tcpClients, [])

    def test_plainHTTPIgnoresAlias(self) -> None:
        """
        Without TLS origination no certificate is presented, so naming one
        is neither checked nor forwarded.
        """
        h = self.harness()
        h.send(
            b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n"
            b"X-WhSentry-ClientCert: tenant-b\r\nX-Tenant: role-a\r\n\r\n"
        )
        self.assertEqual(h.client.value(), b"")
        self.assertEqual([c[:2] for c in h.reactor.tcpClients], [("203.0.113.10", 80)])


class OriginationPermitTests(SynchronousTestCase):
    """
    L{Origination.identity} and L{Origination.permit} on their own.
    """

    def test_defaultAlias(self) -> None:
        """
        C{default} names the --client-cert identity, as in webhook-sentry.
        """
        default = identity("default")
        origination = Origination(None, default, {"a": identity("a")})
        self.assertIs(origination.identity("default"), default)
        self.assertIs(origination.identity(None), default)

    def test_reservedAliasRefused(self) -> None:
        """
        An alias named C{default} beside the default identity is refused.
        """
        self.assertRaises(
            ValueError,
            Origination,
            None,
            identity("x"),
            {"default": identity("default")},
        )

    def test_permit(self) -> None:
        """
        The binding rules, with and without roles in the deployment.
        """
        bound = identity("a", ("role-a",))
        unbound = identity("u")
        default = identity("default")
        withRoles = Origination(
            None, default, {"a": bound, "u": unbound}, rolesInUse=True
        )
        withoutRoles = Origination(None, default, {"a": bound, "u": unbound})
        for origination, ident, role, allowed in [
            (withRoles, bound, "role-a", True),
            (withRoles, bound, "role-b", False),
            (withRoles, bound, None, False),
            (withRoles, unbound, "role-a", False),
            (withRoles, unbound, None, False),
            (withRoles, default, None, True),
            (withRoles, None, None, True),
            (withoutRoles, unbound, None, True),
            (withoutRoles, bound, None, False),
        ]:
            if allowed:
                origination.permit(ident, role)
            else:
                with self.assertRaises(ProxyError) as raised:
                    origination.permit(ident, role)
                self.assertEqual(
                    raised.exception.reason, Reason.CLIENT_CERT_NOT_PERMITTED
                )
                self.assertEqual(raised.exception.status, 403)


class AliasConfigTests(SynchronousTestCase):
    """
    Declaring aliases and their roles, and what stops start-up.
    """

    def writeConfig(self, text: str) -> str:
        path = FilePath(self.mktemp())
        path.setContent(text.encode("utf-8"))
        return path.path

    def test_yamlRoles(self) -> None:
        """
        In YAML each alias may list the roles that may present it.
        """
        path = self.writeConfig(
            "tls:\n  client_certs:\n"
            "    a: {cert: a.pem, key: a.key, roles: [role-a, role-a2]}\n"
            "    b: {cert: b.pem, key: b.key}\n"
        )
        loaded = config.load({}, {}, path)
        self.assertEqual(
            loaded.tls.client_certs,
            (
                ClientCertAlias("a", "a.pem", "a.key", ("role-a", "role-a2")),
                ClientCertAlias("b", "b.pem", "b.key", None),
            ),
        )

    def test_flagRoles(self) -> None:
        """
        On the command line and in the environment, roles follow the key
        after a colon, joined by C{+}.
        """
        loaded = config.load(
            {"client-cert-alias": "a=a.pem:a.key:r1+r2,b=b.pem:b.key"}, {}
        )
        self.assertEqual(
            loaded.tls.client_certs,
            (
                ClientCertAlias("a", "a.pem", "a.key", ("r1", "r2")),
                ClientCertAlias("b", "b.pem", "b.key", None),
            ),
        )

    def test_badRoles(self) -> None:
        """
        An empty or malformed role list, an unknown key or a repeated alias
        stops start-up with a line naming the key.
        """
        for value, expected in [
            ({"a": {"cert": "c", "key": "k", "roles": []}}, "one or more roles"),
            ({"a": {"cert": "c", "key": "k", "roles": "role-a"}}, "one or more roles"),
            ({"a": {"cert": "c", "key": "k", "roles": [""]}}, "non-empty"),
            ({"a": {"cert": "c", "key": "k", "role": ["x"]}}, "expected {ALIAS"),
            ("a=c:k:,b=c:k", "expected {ALIAS"),
            ("a=c:k:r+", "non-empty"),
            ("a=c:k,a=d:l", "'a' is given twice"),
        ]:
            with self.assertRaises(ConfigError) as raised:
                config.load({"client-cert-alias": value}, {})
            self.assertIn("--client-cert-alias", str(raised.exception))
            self.assertIn(expected, str(raised.exception))

    def test_defaultAliasRefused(self) -> None:
        """
        A configured alias named C{default} stops start-up with one line
        naming the key and the value, from YAML, a flag, or a TLS section
        built in code.
        """
        path = self.writeConfig(
            "tls:\n  client_certs:\n    default: {cert: d.pem, key: d.key}\n"
        )
        with self.assertRaises(ConfigError) as raised:
            config.load({}, {}, path)
        message = str(raised.exception)
        self.assertIn(f"tls.client_certs in {path}", message)
        self.assertIn("'default'", message)
        self.assertIn("reserved", message)
        self.assertNotIn("\n", message)
        self.assertOneLineExit(
            ["--client-cert-alias", "default=d.pem:d.key"],
            "--client-cert-alias = 'default=d.pem:d.key'",
        )
        with self.assertRaises(TLSConfigError) as tlsRaised:
            buildOrigination(TLS(client_certs=(("default", "d.pem", "d.key"),)))
        self.assertIn("client_certs.default", str(tlsRaised.exception))

    def assertOneLineExit(self, argv: list[str], expected: str) -> None:
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit):
            Options(environ={}).parseOptions(argv)
        output = stderr.getvalue()
        self.assertEqual(output.count("\n"), 1, output)
        self.assertIn(expected, output)

    def test_rolesWithoutRoleSource(self) -> None:
        """
        Roles bound to an alias in a deployment where no client can have a
        role stop start-up with one line naming the alias's roles; with a
        source of roles the same configuration is accepted.
        """
        self.assertOneLineExit(
            ["--client-cert-alias", "a=a.pem:a.key:role-a"],
            "tls.client_certs.a.roles = ['role-a']: no client can have a role",
        )
        options = Options(environ={})
        options.parseOptions(
            [
                "--client-cert-alias",
                "a=a.pem:a.key:role-a",
                "--auth",
                "memory:role-a:pw",
            ]
        )
        self.assertTrue(hasRoles(options.config))

    def test_hasRoles(self) -> None:
        """
        Roles exist with proxy auth, a trusted role header, a TLS listener
        asking for client certificates, or an ACL; not otherwise.
        """
        self.assertFalse(hasRoles(Config()))
        self.assertFalse(hasRoles(Config(listen=(config.TLSListener(9443, "c", "k"),))))
        for settings in [
            Config(auth=config.Auth(checkers=("memory:a:b",))),
            Config(acl=config.ACLSettings(role_header="X-Role")),
            Config(acl=config.ACLSettings(file="acl.yaml")),
            Config(
                listen=(
                    config.TLSListener(
                        9443, "c", "k", clientCA="ca", clientCert="optional"
                    ),
                )
            ),
        ]:
            self.assertTrue(hasRoles(settings), settings)


class TenantsOnLoopbackTests(TestCase):
    """
    Two tenants sharing one proxy, against an origin on 127.0.0.1 that
    requires a client certificate and answers with the CN it was shown.
    """

    # The certificates, origin and client of the origination tests,
    # without running those tests again here.
    setUp = test_tls.OriginationTests.setUp
    write = test_tls.OriginationTests.write
    origin = test_tls.OriginationTests.origin
    get = test_tls.OriginationTests.get
    assertReason = test_tls.OriginationTests.assertReason

    def proxy(self) -> int:
        for alias in ("tenant-a", "tenant-b"):
            cert, key, _ = self.clientCA.issue(f"proxy-{alias}", client=True)
            self.write(f"{alias}.pem", cert)
            self.write(f"{alias}.key", key)
        tls = TLS(
            ca_bundle=self.dir.child("ca.pem").path,
            client_cert=self.dir.child("default.pem").path,
            client_key=self.dir.child("default.key").path,
            client_certs=tuple(
                ClientCertAlias(
                    alias,
                    self.dir.child(f"{alias}.pem").path,
                    self.dir.child(f"{alias}.key").path,
                    (f"role-{alias[-1]}",),
                )
                for alias in ("tenant-a", "tenant-b")
            ),
        )
        names = ScriptedNameResolver({"origin.test": [["127.0.0.1"]]})
        resolver = SafeResolver(
            AddressPolicy(allowRanges=["127.0.0.1/32"]), names, reactor
        )
        self.access: list[dict] = []
        accessLog = AccessLog(None)
        accessLog.addObserver(self.access.append)
        self.factory = ProxyFactory(
            Config(tls=tls),
            resolver,
            reactor,
            Connector(reactor, 5),
            accessLog,
            buildOrigination(tls, rolesInUse=True),
            access=AccessControl(roleHeader="X-Tenant"),
        )
        self.addCleanup(self.factory.pool.closeIdle)
        port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.pool.closeCachedConnections)
        return port.getHost().port

    @inlineCallbacks
    def test_tenantsKeepTheirCertificates(self):  # type: ignore[no-untyped-def]
        """
        Each tenant's request shows the origin its own certificate, even
        when the other tenant's connection to the same origin sits idle in
        the pool (the pool key holds the alias); a tenant naming the
        other's alias, and a client without a role naming either, get
        403/1016; C{default} selects --client-cert.
        """
        originPort = self.origin(requireClient=True)
        url = f"http://origin.test:{originPort}/t"
        proxyPort = self.proxy()
        expected = b"/t origin.test:%d proxy-" % originPort
        for tenant in ("a", "b", "a", "b"):
            response, body = yield self.get(
                proxyPort,
                url,
                X_WhSentry_TLS="true",
                X_WhSentry_ClientCert=f"tenant-{tenant}",
                X_Tenant=f"role-{tenant}",
            )
            self.assertEqual(body, expected + b"tenant-" + tenant.encode())
        # One idle connection per identity, each reused once.
        self.assertEqual(self.factory.pool.idleCount(), 2)
        response, body = yield self.get(
            proxyPort,
            url,
            X_WhSentry_TLS="true",
            X_WhSentry_ClientCert="tenant-b",
            X_Tenant="role-a",
        )
        self.assertReason(
            response, body, 403, 1016, "'tenant-b' is not permitted for role 'role-a'"
        )
        response, body = yield self.get(
            proxyPort, url, X_WhSentry_TLS="true", X_WhSentry_ClientCert="tenant-a"
        )
        self.assertReason(
            response, body, 403, 1016, "not permitted for a client without a role"
        )
        response, body = yield self.get(
            proxyPort, url, X_WhSentry_TLS="true", X_WhSentry_ClientCert="default"
        )
        self.assertEqual(body, expected + b"default")
        self.assertEqual(self.factory.pool.idleCount(), 3)
