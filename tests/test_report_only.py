"""
Operator text on denials (C{acl.deny_message_extra}) and the ACL's
report-only mode (C{acl.report_only}), through the proxy.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from proxy_app import config
from proxy_app.access import AccessControl
from proxy_app.acl import ACL, REASON_ENFORCE, REASON_NO_ROLE
from proxy_app.addresses import AddressDecision
from proxy_app.identity import Authenticator
from proxy_app.observe import DecisionLog
from proxy_app.resolver import DestinationDenied
from proxy_app.tap import Options

from .helpers import Harness, makeHarness, parseResponse
from .test_access_proxy import ACL_TEXT, basic, request

EXTRA = "Ask for access at https://wiki.example/egress"


class ReportOnlyTests(SynchronousTestCase):
    """
    C{acl.report_only}: ACL denials become logged would-deny decisions, and
    nothing else is relaxed.
    """

    def harness(
        self,
        reportOnly: bool = True,
        auth: bool = True,
        extra: str | None = None,
    ) -> Harness:
        denied = DestinationDenied(
            "private.example",
            80,
            AddressDecision(False, "10.0.0.1", "Deny: Private Range"),
        )
        h = makeHarness(
            {
                "origin.example": ["203.0.113.10"],
                "other.example": ["203.0.113.11"],
                "private.example": denied,
            },
            config.Config(
                acl=config.ACLSettings(report_only=reportOnly, deny_message_extra=extra)
            ),
        )
        authenticator = (
            Authenticator.fromStrings(["memory:alice:secret"]) if auth else None
        )
        h.factory.access = AccessControl(
            ACL.fromYAML(ACL_TEXT), None, authenticator, reportOnly=reportOnly
        )
        self.decisions = io.StringIO()
        h.factory.decisionLog = DecisionLog(self.decisions, "json")
        return h

    def decisionLines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.decisions.getvalue().splitlines()]

    def sample(self, h: Harness, name: str, labels: dict[str, str]) -> Any:
        return h.factory.metrics.registry.get_sample_value(name, labels)

    def test_denialGoesThrough(self) -> None:
        """
        A request the ACL denies (alice's enforce rule does not list
        other.example) is forwarded; the decision log says allow=true,
        enforce_would_deny=true, report_only=true with the ACL's own
        reason, and the metrics count it as report.
        """
        h = self.harness()
        h.send(request(b"other.example", auth=basic("alice", "secret")))
        up, upTransport = h.connectUpstream()
        self.assertIn(b"GET / HTTP/1.1", upTransport.value())
        up.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(parseResponse(h.client.value())[0], 204)
        [line] = self.decisionLines()
        self.assertEqual(
            {k: line.get(k) for k in ("allow", "enforce_would_deny", "report_only")},
            {"allow": True, "enforce_would_deny": True, "report_only": True},
        )
        self.assertEqual(line["decision_reason"], REASON_ENFORCE)
        self.assertEqual(
            self.sample(
                h,
                "egressproxy_acl_decisions_total",
                {"rule": "alice", "project": "payments", "decision": "report"},
            ),
            1,
        )
        self.assertEqual(
            self.sample(
                h,
                "egressproxy_requests_total",
                {"proxy_type": "http", "decision": "report", "reason_code": ""},
            ),
            1,
        )

    def test_enforcedWithout(self) -> None:
        """
        Without report-only the same request is refused (403, 1011), and an
        allowed request's decision log line has no report_only field.
        """
        h = self.harness(reportOnly=False)
        h.send(request(b"other.example", auth=basic("alice", "secret")))
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (403, b"1011"))
        self.assertNotIn("report_only", self.decisionLines()[0])

    def test_missingRoleReported(self) -> None:
        """
        Without authentication, an anonymous request (which the ACL denies
        for want of a role) goes through as a would-deny decision too.
        """
        h = self.harness(auth=False)
        h.send(request(b"origin.example"))
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        [line] = self.decisionLines()
        self.assertEqual(line["decision_reason"], REASON_NO_ROLE)
        self.assertTrue(line["report_only"])

    def test_authenticationStillRequired(self) -> None:
        """
        Report-only never relaxes authentication: no credentials, 407.
        """
        h = self.harness()
        h.send(request(b"other.example"))
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (407, b"1013"))
        self.assertEqual(h.reactor.tcpClients, [])

    def test_addressPolicyStillApplies(self) -> None:
        """
        Report-only never relaxes the address policy: a name the ACL would
        deny that resolves to a private address gets 403 with 1000, and
        nothing is connected.
        """
        h = self.harness()
        h.send(request(b"private.example", auth=basic("alice", "secret")))
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (403, b"1000"))
        self.assertEqual(h.reactor.tcpClients, [])
        [line] = self.decisionLines()
        self.assertFalse(line["allow"])

    def test_accessControlDecision(self) -> None:
        """
        L{AccessControl.decide} turns only a denial into a report-only
        decision (allowed, marked, the rule kept); an allowed decision is
        left as it was.
        """
        access = AccessControl(ACL.fromYAML(ACL_TEXT), None, reportOnly=True)
        decision = access.decide("alice", "other.example")
        self.assertEqual(
            (decision.allow, decision.reportOnly, decision.rule), (True, True, "alice")
        )
        self.assertFalse(access.decide("alice", "origin.example").reportOnly)


class DenyMessageExtraTests(SynchronousTestCase):
    """
    C{acl.deny_message_extra}: the operator's line in every 403 body.
    """

    harness = ReportOnlyTests.harness

    def test_aclDenial(self) -> None:
        """
        An ACL denial's body ends with the operator's text on a line of its
        own; X-WhSentry-Reason stays the one sentence without it.
        """
        h = self.harness(reportOnly=False, extra=EXTRA)
        h.send(request(b"other.example", auth=basic("alice", "secret")))
        status, headers, body = parseResponse(h.client.value())
        self.assertEqual(status, 403)
        self.assertTrue(body.endswith(b".\n" + EXTRA.encode() + b"\n"), body)
        self.assertNotIn(b"wiki", headers[b"x-whsentry-reason"])
        self.assertEqual(int(headers[b"content-length"]), len(body))

    def test_addressDenial(self) -> None:
        """
        A 403 from the address policy (1000) carries the text too.
        """
        h = self.harness(reportOnly=True, extra=EXTRA)
        h.send(request(b"private.example", auth=basic("alice", "secret")))
        status, _, body = parseResponse(h.client.value())
        self.assertEqual(status, 403)
        self.assertIn(EXTRA.encode(), body)

    def test_notOnOtherErrors(self) -> None:
        """
        Responses other than 403 (a 407 here) do not carry it.
        """
        h = self.harness(extra=EXTRA)
        h.send(request(b"other.example"))
        status, _, body = parseResponse(h.client.value())
        self.assertEqual(status, 407)
        self.assertNotIn(EXTRA.encode(), body)

    def test_withoutIt(self) -> None:
        """
        Unset, a 403 body is the message alone.
        """
        h = self.harness(reportOnly=False)
        h.send(request(b"other.example", auth=basic("alice", "secret")))
        _, headers, body = parseResponse(h.client.value())
        self.assertEqual(body, headers[b"x-whsentry-reason"] + b"\n")


class ConfigTests(SynchronousTestCase):
    """
    The two settings as flags and environment variables.
    """

    def test_flags(self) -> None:
        """
        --report-only and --deny-message-extra reach acl.report_only and
        acl.deny_message_extra.
        """
        options = Options(environ={})
        options.parseOptions(["--report-only", "--deny-message-extra", EXTRA])
        loaded = options.config
        self.assertTrue(loaded.acl.report_only)
        self.assertEqual(loaded.acl.deny_message_extra, EXTRA)

    def test_lineBreakRefused(self) -> None:
        """
        Text with a line break (or any control character) is refused with
        one line naming the key.
        """
        with self.assertRaises(config.ConfigError) as raised:
            config.load({}, environ={"EGRESSPROXY_DENY_MESSAGE_EXTRA": "a\r\nb"})
        self.assertIn("DENY_MESSAGE_EXTRA", str(raised.exception))
