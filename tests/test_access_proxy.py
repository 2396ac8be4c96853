"""
Proxy authentication, roles and the ACL, wired into the proxy: 407 flows,
ACL denials, the ACL combined with the address policy, report mode, the
decision log, and reload.
"""

from __future__ import annotations

import base64
import io
import json

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.access import AccessControl
from proxy_app.acl import ACL
from proxy_app.addresses import AddressDecision
from proxy_app.identity import Authenticator
from proxy_app.observe import DecisionLog
from proxy_app.resolver import DestinationDenied

from .helpers import makeHarness, parseResponse

ACL_TEXT = """
version: v1
services:
  - name: alice
    project: payments
    action: enforce
    allowed_domains: [origin.example, internal.example]
  - name: bob
    project: search
    action: report
    allowed_domains: []
default:
  project: other
  action: enforce
"""


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def request(
    host: bytes = b"origin.example", auth: bytes | None = None, extra: bytes = b""
) -> bytes:
    lines = b"GET http://" + host + b"/ HTTP/1.1\r\nHost: " + host + b"\r\n"
    if auth is not None:
        lines += b"Proxy-Authorization: " + auth + b"\r\n"
    return lines + extra + b"\r\n"


class AccessProxyTests(SynchronousTestCase):
    """
    What a client sees, and what gets logged, with auth and an ACL.
    """

    def harness(self, acl: str | None = ACL_TEXT, auth: bool = True, **kwargs: object):  # type: ignore[no-untyped-def]
        denied = DestinationDenied(
            "internal.example",
            80,
            AddressDecision(False, "10.0.0.1", "Deny: Private Range"),
        )
        h = makeHarness(
            {
                "origin.example": ["203.0.113.10"],
                "other.example": ["203.0.113.11"],
                "internal.example": denied,
            }
        )
        authenticator = (
            Authenticator.fromStrings(["memory:alice:secret:bob:hunter2"])
            if auth
            else None
        )
        h.factory.access = AccessControl(
            ACL.fromYAML(acl) if acl else None, None, authenticator, **kwargs
        )
        self.decisions = io.StringIO()
        h.factory.decisionLog = DecisionLog(self.decisions, "json")
        return h

    def decisionLines(self) -> list[dict]:
        return [json.loads(line) for line in self.decisions.getvalue().splitlines()]

    def test_missingCredentials(self) -> None:
        """
        With auth configured, a request without credentials gets 407 with
        Proxy-Authenticate naming the realm, reason code 1013, and nothing
        is looked up.
        """
        h = self.harness()
        h.send(request())
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual(status, 407)
        self.assertEqual(headers[b"proxy-authenticate"], b'Basic realm="egressproxy"')
        self.assertEqual(headers[b"x-whsentry-reasoncode"], b"1013")
        self.assertEqual(h.resolver.calls, [])

    def test_wrongCredentials(self) -> None:
        """
        Wrong credentials get 407 and are counted.
        """
        h = self.harness()
        h.send(request(auth=basic("alice", "wrong")))
        status, _, _ = parseResponse(h.client.value())
        self.assertEqual(status, 407)
        self.assertEqual(
            h.factory.metrics.registry.get_sample_value(
                "egressproxy_proxy_auth_failures_total"
            ),
            1,
        )

    def test_failedAuthenticationsLimitedPerClient(self) -> None:
        """
        After too many failed authentications from the client's address, its
        next request is answered 429 with reason code 1014, Retry-After and
        a plain-text body, without checking the password or looking
        anything up.
        """
        h = self.harness()
        checkers = h.factory.access.authenticator.checkers  # type: ignore[union-attr]
        h.factory.access.authenticator = Authenticator(
            checkers, clock=h.reactor, failuresPerMinute=2
        )
        for _ in range(2):
            h.client.clear()
            h.send(request(auth=basic("alice", "wrong")))
            self.assertEqual(parseResponse(h.client.value())[0], 407)
        h.client.clear()
        h.send(request(auth=basic("alice", "secret")))
        status, headers, body = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (429, b"1014"))
        self.assertEqual(headers[b"retry-after"], b"30")
        self.assertEqual(headers[b"content-type"], b"text/plain; charset=utf-8")
        self.assertIn(b"Too many failed proxy authentications", body)
        self.assertEqual(h.resolver.calls, [])

    def test_goodCredentialsRole(self) -> None:
        """
        Good credentials make the username the role; Proxy-Authorization is
        not forwarded; the access log and decision log name the role.
        """
        h = self.harness()
        h.send(request(auth=basic("alice", "secret")))
        up, upTransport = h.connectUpstream()
        self.assertNotIn(b"proxy-authorization", upTransport.value().lower())
        up.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(h.access[-1]["role"], "alice")
        (line,) = self.decisionLines()
        self.assertEqual(
            {
                k: line[k]
                for k in (
                    "msg",
                    "role",
                    "project",
                    "decision_reason",
                    "allow",
                    "enforce_would_deny",
                    "status_code",
                    "requested_host",
                )
            },
            {
                "msg": "CANONICAL-PROXY-DECISION",
                "role": "alice",
                "project": "payments",
                "decision_reason": "host matched allowed domain in rule",
                "allow": True,
                "enforce_would_deny": False,
                "status_code": 204,
                "requested_host": "origin.example:80",
            },
        )
        self.assertEqual(line["outbound_remote_addr"], "203.0.113.10:80")

    def test_aclDenies(self) -> None:
        """
        A host outside the role's allowed domains under enforce gets 403
        with reason code 1011 and Smokescreen's wording; nothing is resolved.
        """
        h = self.harness()
        h.send(request(b"other.example", basic("alice", "secret")))
        status, headers, body = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (403, b"1011"))
        self.assertEqual(
            body,
            b"Egress proxying is denied to host 'other.example:80': rule has enforce "
            b"policy.\n",
        )
        self.assertEqual(h.resolver.calls, [])
        (line,) = self.decisionLines()
        self.assertEqual((line["allow"], line["enforce_would_deny"]), (False, True))

    def test_aclThenAddressPolicy(self) -> None:
        """
        A host the ACL allows is still refused when its address is denied.
        """
        h = self.harness()
        h.send(request(b"internal.example", basic("alice", "secret")))
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (403, b"1000"))

    def test_reportMode(self) -> None:
        """
        A report rule allows and records that enforce would deny.
        """
        h = self.harness()
        h.send(request(b"other.example", basic("bob", "hunter2")))
        self.assertEqual(len(h.reactor.tcpClients), 1)
        h.protocol.connectionLost(None)
        (line,) = self.decisionLines()
        self.assertEqual(
            (line["allow"], line["enforce_would_deny"], line["decision_reason"]),
            (True, True, "rule has allow and report policy"),
        )
        registry = h.factory.metrics.registry
        self.assertEqual(
            registry.get_sample_value(
                "egressproxy_acl_decisions_total",
                {"rule": "bob", "project": "search", "decision": "report"},
            ),
            1,
        )
        self.assertEqual(
            registry.get_sample_value(
                "egressproxy_requests_total",
                {"proxy_type": "http", "decision": "report", "reason_code": ""},
            ),
            1,
        )

    def test_missingRole(self) -> None:
        """
        Without auth and without allow_missing_role, an anonymous request is
        denied (1011); with it, the default rule judges it.
        """
        h = self.harness(auth=False)
        h.send(request())
        _, headers, body = parseResponse(h.client.value())
        self.assertEqual(headers[b"x-whsentry-reasoncode"], b"1011")
        self.assertIn(b"Client role cannot be determined", body)

        h = self.harness(auth=False, allowMissingRole=True)
        h.send(request())
        _, headers, body = parseResponse(h.client.value())
        self.assertIn(b"default rule policy used", body)

    def test_roleHeader(self) -> None:
        """
        A configured role header names the role and is not forwarded.
        """
        h = self.harness(auth=False, roleHeader="X-Egress-Role")
        h.send(request(extra=b"X-Egress-Role: alice\r\n"))
        _, upTransport = h.connectUpstream()
        self.assertNotIn(b"x-egress-role", upTransport.value().lower())

    def test_reload(self) -> None:
        """
        Reload swaps in a good new ACL; a bad one keeps the old in force.
        """
        path = FilePath(self.mktemp())
        path.setContent(ACL_TEXT.encode())
        from proxy_app.acl import loadACL

        access = AccessControl(loadACL(path.path), path.path)
        self.assertFalse(access.decide("alice", "new.example").allow)
        path.setContent(
            ACL_TEXT.replace(
                "internal.example]", "internal.example, new.example]"
            ).encode()
        )
        self.assertTrue(access.reload())
        self.assertTrue(access.decide("alice", "new.example").allow)
        path.setContent(
            b"version: v1\nservices:\n  - name: alice\n    allowed_hosts: [x]\n"
        )
        self.assertFalse(access.reload())
        self.assertTrue(access.decide("alice", "new.example").allow)

    def test_inFlightKeepsDecision(self) -> None:
        """
        A request decided before a reload keeps its decision.
        """
        h = self.harness()
        h.send(request(auth=basic("alice", "secret")))
        h.factory.access.acl = ACL.fromYAML(ACL_TEXT.replace("origin.example, ", ""))
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(h.access[-1]["response_code"], 204)
