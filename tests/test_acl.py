"""
Tests for L{proxy_app.acl}: Smokescreen v1 ACL loading and decisions.

The decision cases follow Smokescreen's own C{acl/v1} tests and README, so
that a file moved from Smokescreen decides the same way and logs the same
C{decision_reason}.
"""

from __future__ import annotations

import os
from typing import Any

import attr
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.acl import (
    ACL,
    REASON_ALLOWED_DOMAIN,
    REASON_DEFAULT,
    REASON_ENFORCE,
    REASON_EXTERNAL_PROXY,
    REASON_GLOBAL_ALLOW,
    REASON_GLOBAL_DENY,
    REASON_NO_ACL,
    REASON_NO_ROLE,
    REASON_NO_RULE,
    REASON_OPEN,
    REASON_REPORT,
    ACLDecision,
    ACLError,
    loadACL,
)

# The shape of Smokescreen's sample_config.yaml test fixture.
SAMPLE = """\
---
version: v1
services:
  - name: enforce-dummy-srv
    project: usersec
    action: enforce
    allowed_domains:
      - example1.com
      - example2.com

  - name: report-dummy-srv
    project: security
    action: report
    allowed_domains:
      - example3.com

  - name: open-dummy-srv
    project: automation
    action: open

  - name: dummy-glob
    project: phony
    action: enforce
    allowed_domains:
      - "*.example.com"

default:
    project: other
    action: enforce
    allowed_domains:
      - default.example.com
"""

# The shape of Smokescreen's sample_config_with_global.yaml.
WITH_GLOBAL = """\
version: v1
services:
  - name: enforce-dummy-srv
    project: usersec
    action: enforce
    allowed_domains:
      - example1.com
      - example2.com
      - badexample1.com   # overrides the global deny list

  - name: report-dummy-srv
    project: security
    action: report
    allowed_domains:
      - example3.com

  - name: open-dummy-srv
    project: automation
    action: open

  - name: dummy-glob
    project: phony
    action: enforce
    allowed_domains:
      - "*.example.com"

default:
    project: other
    action: report
    allowed_domains:
      - default.example.com

global_allow_list:
  - goodexample1.com
  - goodexample2.com
  - goodexample3.com
  - conflictingexample.com

global_deny_list:
  - badexample1.com
  - badexample2.com
  - conflictingexample.com
"""

NO_DEFAULT = """\
version: v1
services:
  - name: open-srv
    project: automation
    action: open
"""


def service(**fields: Any) -> dict[str, Any]:
    """
    A services entry, open by default.
    """
    entry: dict[str, Any] = {"name": "svc", "project": "proj", "action": "open"}
    entry.update(fields)
    return entry


def document(*services: dict[str, Any], **top: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"version": "v1", "services": list(services)}
    data.update(top)
    return data


class DecisionTests(SynchronousTestCase):
    """
    Decisions follow Smokescreen's order and carry its reason strings.
    """

    def setUp(self) -> None:
        self.sample = ACL.fromYAML(SAMPLE, "sample")
        self.withGlobal = ACL.fromYAML(WITH_GLOBAL, "with-global")

    def assertDecision(
        self,
        acl: ACL,
        role: str | None,
        host: str,
        allow: bool,
        reason: str,
        project: str | None,
        enforceWouldDeny: bool,
        **kw: Any,
    ) -> ACLDecision:
        decision = acl.decide(role, host, **kw)
        self.assertEqual(
            (
                decision.allow,
                decision.reason,
                decision.project,
                decision.enforceWouldDeny,
            ),
            (allow, reason, project, enforceWouldDeny),
            f"{role} -> {host}",
        )
        return decision

    def test_allowedByListWhenEnforcing(self) -> None:
        """
        An enforce rule allows a host in its allowed_domains, and enforce
        would not have denied it.
        """
        d = self.assertDecision(
            self.sample,
            "enforce-dummy-srv",
            "example1.com",
            True,
            REASON_ALLOWED_DOMAIN,
            "usersec",
            False,
        )
        self.assertEqual(
            (d.role, d.action, d.rule),
            ("enforce-dummy-srv", "enforce", "enforce-dummy-srv"),
        )

    def test_disallowedWhenEnforcing(self) -> None:
        """
        An enforce rule denies a host outside its list, even a subdomain of
        a listed one.
        """
        self.assertDecision(
            self.sample,
            "enforce-dummy-srv",
            "www.example1.com",
            False,
            REASON_ENFORCE,
            "usersec",
            True,
        )

    def test_allowedByListWhenReporting(self) -> None:
        """
        A report rule allows a listed host without reporting it.
        """
        self.assertDecision(
            self.sample,
            "report-dummy-srv",
            "example3.com",
            True,
            REASON_ALLOWED_DOMAIN,
            "security",
            False,
        )

    def test_reportedWhenReporting(self) -> None:
        """
        A report rule allows an unlisted host and records that enforce
        would have denied it.
        """
        d = self.assertDecision(
            self.sample,
            "report-dummy-srv",
            "example1.com",
            True,
            REASON_REPORT,
            "security",
            True,
        )
        self.assertEqual(d.action, "report")

    def test_allowedWhenOpen(self) -> None:
        """
        An open rule allows any host and does not report it.
        """
        self.assertDecision(
            self.sample,
            "open-dummy-srv",
            "anythingisgoodreally.com",
            True,
            REASON_OPEN,
            "automation",
            False,
        )

    def test_globMatchesSubdomainsAtAnyDepth(self) -> None:
        """
        C{*.example.com} matches one, two or more labels below example.com.
        """
        for host in (
            "api.example.com",
            "contrived.example.com",
            "more.contrived.example.com",
        ):
            self.assertDecision(
                self.sample,
                "dummy-glob",
                host,
                True,
                REASON_ALLOWED_DOMAIN,
                "phony",
                False,
            )

    def test_globDoesNotMatchApex(self) -> None:
        """
        C{*.example.com} does not match example.com itself.
        """
        self.assertDecision(
            self.sample,
            "dummy-glob",
            "example.com",
            False,
            REASON_ENFORCE,
            "phony",
            True,
        )

    def test_globIsNotASuffixMatch(self) -> None:
        """
        C{*.example.com} matches only at a label boundary: not
        C{notexample.com}, nor an unrelated host.
        """
        for host in (
            "shouldbreak.com",
            "notexample.com",
            "example.com.evil.net",
            "xexample.com",
        ):
            self.assertDecision(
                self.sample, "dummy-glob", host, False, REASON_ENFORCE, "phony", True
            )

    def test_denyFromDefault(self) -> None:
        """
        A role without a rule is judged by the default rule, whose policy
        outcome is reported as C{"default rule policy used"}.
        """
        d = self.assertDecision(
            self.sample,
            "unknown-service",
            "nope.example.com",
            False,
            REASON_DEFAULT,
            "other",
            True,
        )
        self.assertEqual(
            (d.rule, d.action, d.role), ("default", "enforce", "unknown-service")
        )

    def test_allowFromDefaultList(self) -> None:
        """
        The default rule's allowed_domains allow, with the allowed-domain
        reason rather than the default-policy one.
        """
        d = self.assertDecision(
            self.sample,
            "unknown-service",
            "default.example.com",
            True,
            REASON_ALLOWED_DOMAIN,
            "other",
            False,
        )
        self.assertEqual(d.rule, "default")

    def test_defaultReportAndOpen(self) -> None:
        """
        A default rule's report or open action also gives the default-policy
        reason, with enforce_would_deny as the action implies.
        """
        self.assertDecision(
            self.withGlobal,
            "unknown-service",
            "elsewhere.example.net",
            True,
            REASON_DEFAULT,
            "other",
            True,
        )
        acl = ACL.fromMapping(document(default={"project": "p", "action": "open"}))
        self.assertDecision(
            acl, "anyone", "elsewhere.example.net", True, REASON_DEFAULT, "p", False
        )

    def test_globalAllowList(self) -> None:
        """
        The global allow list overrides an enforce rule and the default
        rule.
        """
        self.assertDecision(
            self.withGlobal,
            "enforce-dummy-srv",
            "goodexample1.com",
            True,
            REASON_GLOBAL_ALLOW,
            "usersec",
            False,
        )
        self.assertDecision(
            self.withGlobal,
            "unknown-service",
            "goodexample2.com",
            True,
            REASON_GLOBAL_ALLOW,
            "other",
            False,
        )

    def test_allowedDomainsOverrideGlobalDeny(self) -> None:
        """
        A rule's own allowed_domains win over the global deny list.
        """
        self.assertDecision(
            self.withGlobal,
            "enforce-dummy-srv",
            "badexample1.com",
            True,
            REASON_ALLOWED_DOMAIN,
            "usersec",
            False,
        )

    def test_globalDenyList(self) -> None:
        """
        The global deny list denies even under report, open and the default
        rule.
        """
        for role, host, project in (
            ("report-dummy-srv", "badexample1.com", "security"),
            ("unknown-service", "badexample2.com", "other"),
            ("open-dummy-srv", "badexample2.com", "automation"),
        ):
            self.assertDecision(
                self.withGlobal, role, host, False, REASON_GLOBAL_DENY, project, True
            )

    def test_globalDenyNormalizesHost(self) -> None:
        """
        The global deny list matches whatever the case and with a trailing
        dot.
        """
        for host in ("badexample2.com.", "bAdExAmPlE2.cOm", "BADEXAMPLE2.COM."):
            self.assertDecision(
                self.withGlobal,
                "open-dummy-srv",
                host,
                False,
                REASON_GLOBAL_DENY,
                "automation",
                True,
            )

    def test_globalDenyBeatsGlobalAllow(self) -> None:
        """
        A host on both global lists is denied.
        """
        self.assertDecision(
            self.withGlobal,
            "open-dummy-srv",
            "conflictingexample.com",
            False,
            REASON_GLOBAL_DENY,
            "automation",
            True,
        )

    def test_globalListGlobs(self) -> None:
        """
        Global lists take C{*.} globs with the same meaning as allowed_domains.
        """
        acl = ACL.fromMapping(
            document(
                service(action="open"),
                global_deny_list=["*.evil.example"],
                global_allow_list=["*.good.example"],
                default={"project": "d", "action": "enforce"},
            )
        )
        self.assertDecision(
            acl, "svc", "a.b.evil.example", False, REASON_GLOBAL_DENY, "proj", True
        )
        self.assertDecision(
            acl, "svc", "evil.example", True, REASON_OPEN, "proj", False
        )
        self.assertDecision(
            acl, "x", "api.good.example", True, REASON_GLOBAL_ALLOW, "d", False
        )
        self.assertDecision(acl, "x", "good.example", False, REASON_DEFAULT, "d", True)

    def test_noRuleMatched(self) -> None:
        """
        Without a default rule, a role without a rule is denied with
        C{"no rule matched"} and no project, action or rule.
        """
        acl = ACL.fromYAML(NO_DEFAULT)
        d = self.assertDecision(
            acl, "unk", "example.com", False, REASON_NO_RULE, None, True
        )
        self.assertEqual((d.action, d.rule, d.role), (None, None, "unk"))
        self.assertFalse(acl.hasDefault)
        self.assertTrue(self.sample.hasDefault)

    def test_rolesAreCaseSensitive(self) -> None:
        """
        Roles are matched exactly, as Smokescreen's map lookup does.
        """
        d = self.sample.decide("ENFORCE-DUMMY-SRV", "example1.com")
        self.assertEqual(d.rule, "default")

    def test_missingRoleDenied(self) -> None:
        """
        Without allowMissingRole an anonymous request is denied before the
        ACL is consulted, with Smokescreen's reason and no
        enforce_would_deny; an empty role counts as missing.
        """
        for role in (None, ""):
            d = self.sample.decide(role, "default.example.com")
            self.assertEqual(
                d, ACLDecision(False, REASON_NO_ROLE, None, None, None, False, None)
            )

    def test_missingRoleAllowedUsesDefault(self) -> None:
        """
        With allowMissingRole an anonymous request is judged by the default
        rule.
        """
        d = self.assertDecision(
            self.sample,
            None,
            "default.example.com",
            True,
            REASON_ALLOWED_DOMAIN,
            "other",
            False,
            allowMissingRole=True,
        )
        self.assertEqual((d.role, d.rule), (None, "default"))
        self.assertDecision(
            self.sample,
            None,
            "example1.com",
            False,
            REASON_DEFAULT,
            "other",
            True,
            allowMissingRole=True,
        )

    def test_missingRoleAllowedWithoutDefault(self) -> None:
        """
        With allowMissingRole but no default rule, an anonymous request
        matches no rule and is denied.
        """
        acl = ACL.fromYAML(NO_DEFAULT)
        self.assertDecision(
            acl,
            None,
            "example.com",
            False,
            REASON_NO_RULE,
            None,
            True,
            allowMissingRole=True,
        )

    def test_allowMissingRoleLeavesKnownRolesAlone(self) -> None:
        """
        allowMissingRole changes nothing for a request that has a role.
        """
        self.assertEqual(
            self.sample.decide(
                "enforce-dummy-srv", "www.example1.com", allowMissingRole=True
            ),
            self.sample.decide("enforce-dummy-srv", "www.example1.com"),
        )

    def test_requestedHostIsNormalized(self) -> None:
        """
        The requested host is normalized like request targets: case,
        trailing dot and IDNA.
        """
        acl = ACL.fromMapping(
            document(
                service(
                    action="enforce",
                    allowed_domains=["xn--bcher-kva.example", "*.example.com"],
                )
            )
        )
        for host in (
            "bücher.example",
            "BÜCHER.example.",
            "xn--bcher-kva.example",
            "API.Example.COM.",
        ):
            self.assertTrue(acl.decide("svc", host).allow, host)
        self.assertFalse(acl.decide("svc", "bucher.example").allow)

    def test_ipLiterals(self) -> None:
        """
        IP literals are listed in canonical form and match every spelling
        of the same address, IPv6 with or without brackets.
        """
        acl = ACL.fromMapping(
            document(
                service(action="enforce", allowed_domains=["192.0.2.1", "2001:db8::1"])
            )
        )
        for host in (
            "192.0.2.1",
            "0xc0.0.2.1",
            "3221225985",
            "[2001:DB8::1]",
            "2001:db8:0::1",
        ):
            self.assertTrue(acl.decide("svc", host).allow, host)
        self.assertFalse(acl.decide("svc", "192.0.2.2").allow)

    def test_unusableHostMatchesNothing(self) -> None:
        """
        A host that cannot be normalized matches no entry, as in
        Smokescreen: enforce denies it, and it never matches a global deny
        entry.
        """
        acl = ACL.fromMapping(
            document(
                service(name="e", action="enforce", allowed_domains=["example.com"]),
                service(name="o", action="open"),
                global_deny_list=["example.com"],
            )
        )
        for host in ("", "a..b", "exa mple.com", "example.com.."):
            self.assertEqual(acl.decide("e", host).reason, REASON_ENFORCE, host)
            self.assertEqual(acl.decide("o", host).reason, REASON_OPEN, host)

    def test_roles(self) -> None:
        """
        C{roles} holds the service names, not the default rule.
        """
        self.assertEqual(
            self.sample.roles,
            frozenset(
                {
                    "enforce-dummy-srv",
                    "report-dummy-srv",
                    "open-dummy-srv",
                    "dummy-glob",
                }
            ),
        )
        self.assertIsInstance(self.sample.roles, frozenset)

    def test_immutable(self) -> None:
        """
        Neither an ACL nor a decision can be changed after the fact, so a
        request keeps the decision it got when the ACL is swapped.
        """
        d = self.sample.decide("dummy-glob", "api.example.com")
        self.assertRaises(
            attr.exceptions.FrozenInstanceError, setattr, d, "allow", False
        )
        self.assertRaises(
            attr.exceptions.FrozenInstanceError,
            setattr,
            self.sample,
            "roles",
            frozenset(),
        )
        rules: Any = self.sample._rules
        with self.assertRaises(TypeError):
            rules["x"] = None
        replacement = ACL.fromYAML(NO_DEFAULT)
        self.assertEqual(
            replacement.decide("dummy-glob", "api.example.com").reason, REASON_NO_RULE
        )
        self.assertTrue(d.allow)
        self.assertEqual(self.sample.decide("dummy-glob", "api.example.com"), d)

    def test_withoutACL(self) -> None:
        """
        The decision recorded without an ACL allows, with Smokescreen's
        reason.
        """
        self.assertEqual(
            ACLDecision.withoutACL("r"),
            ACLDecision(True, REASON_NO_ACL, "r", None, None, False, None),
        )

    def test_reasonStrings(self) -> None:
        """
        The reason strings are Smokescreen's, verbatim.
        """
        self.assertEqual(
            [
                REASON_ALLOWED_DOMAIN,
                REASON_GLOBAL_DENY,
                REASON_GLOBAL_ALLOW,
                REASON_OPEN,
                REASON_REPORT,
                REASON_ENFORCE,
                REASON_DEFAULT,
                REASON_NO_RULE,
                REASON_NO_ROLE,
                REASON_NO_ACL,
            ],
            [
                "host matched allowed domain in rule",
                "host matched rule in global deny list",
                "host matched rule in global allow list",
                "rule has open enforcement policy",
                "rule has allow and report policy",
                "rule has enforce policy",
                "default rule policy used",
                "no rule matched",
                "Client role cannot be determined",
                "Egress ACL is not configured",
            ],
        )


class LoadErrorTests(SynchronousTestCase):
    """
    Invalid ACLs fail to load with one line naming where and what to write.
    """

    def assertLoadError(
        self, data: Any, *fragments: str, source: str = "acl.yaml"
    ) -> str:
        with self.assertRaises(ACLError) as caught:
            if isinstance(data, str):
                ACL.fromYAML(data, source)
            else:
                ACL.fromMapping(data, source)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(f"{source}: "), message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_invalidGlobs(self) -> None:
        """
        Wildcards other than one leading C{*.}, and globs matching
        everything, are refused with Smokescreen's wording.
        """
        for glob, fragment in (
            ("*.*.stripe.com", "domain globs are only supported as prefix"),
            ("api.*.example.com", "domain globs are only supported as prefix"),
            ("login.*.example.com", "domain globs are only supported as prefix"),
            ("ex*ample.com", "domain globs are only supported as prefix"),
            ("example.*", "domain globs are only supported as prefix"),
            (
                "*example.com",
                "domain glob must represent a full prefix (sub)domain; write "
                "'*.example.com'",
            ),
            ("*", "domain glob must not match everything"),
            ("*.", "domain glob must not match everything"),
            ("", "glob cannot be empty"),
        ):
            self.assertLoadError(
                document(service(name="svc", allowed_domains=[glob])),
                "service 'svc'",
                "allowed_domains[0]",
                fragment,
            )

    def test_unnormalizedEntries(self) -> None:
        """
        Entries not in normalized form are refused, and the message says
        exactly what to write instead.
        """
        for glob, suggestion in (
            ("Example.com", "example.com"),
            ("example.com.", "example.com"),
            ("*.Example.COM", "*.example.com"),
            ("*.example.com.", "*.example.com"),
            ("éxämple.com", "xn--xmple-gra7a.com"),
            ("bücher.example", "xn--bcher-kva.example"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("2001:DB8::1", "2001:db8::1"),
            ("0x7f.1", "127.0.0.1"),
        ):
            self.assertLoadError(
                document(service(allowed_domains=["ok.example", glob])),
                "allowed_domains[1]",
                f'incorrect ACL entry; use "{suggestion}"',
            )

    def test_invalidEntries(self) -> None:
        """
        Entries that are not hosts at all are refused as incorrect, and a
        wildcard cannot apply to an IP address.
        """
        for glob in ("exa mple.com", "a..b", "user@example.com", "example.com/path"):
            self.assertLoadError(
                document(service(allowed_domains=[glob])), "incorrect ACL entry:"
            )
        self.assertLoadError(
            document(service(allowed_domains=["*.192.0.2.1"])),
            "cannot apply to an IP address",
        )

    def test_entriesCheckedEverywhere(self) -> None:
        """
        The default rule and both global lists are checked too, and the
        message names which.
        """
        self.assertLoadError(
            document(default={"action": "open", "allowed_domains": ["Bad.example"]}),
            "default: allowed_domains[0]",
            'use "bad.example"',
        )
        self.assertLoadError(
            document(global_deny_list=["ok.example", "*"]),
            "global_deny_list[1]",
            "match everything",
        )
        self.assertLoadError(
            document(global_allow_list=["x.example."]),
            "global_allow_list[0]",
            'use "x.example"',
        )

    def test_unknownKeys(self) -> None:
        """
        A misspelt key is an error naming it, where it is, and the likely
        intended key.
        """
        self.assertLoadError(
            document(service(name="api", allowed_hosts=["example.com"])),
            "service 'api'",
            "unknown key 'allowed_hosts'",
            "did you mean 'allowed_domains'",
        )
        self.assertLoadError(
            document(service(name="api", acton="open")),
            "service 'api'",
            "unknown key 'acton'",
            "'action'",
        )
        self.assertLoadError(
            document(default={"action": "open", "allowed_domain": []}),
            "default",
            "unknown key 'allowed_domain'",
            "allowed_domains",
        )
        self.assertLoadError(
            document(global_denylist=[]),
            "top level",
            "unknown key 'global_denylist'",
            "global_deny_list",
        )
        self.assertLoadError(
            document(zzz=1), "top level", "unknown key 'zzz'", "expected one of version"
        )

    def test_duplicateServiceNames(self) -> None:
        """
        A service name may appear once.
        """
        self.assertLoadError(
            document(service(name="api"), service(name="other"), service(name="api")),
            "service 'api'",
            "duplicate service name",
        )

    def test_reservedDefaultName(self) -> None:
        """
        A service may not be named C{default}, which would make the
        decision's rule ambiguous.
        """
        self.assertLoadError(
            document(service(name="default")), "service 'default'", "reserved"
        )

    def test_badActions(self) -> None:
        """
        An action other than open, report or enforce, or none, is refused
        with the accepted values.
        """
        for action in ("allow", "Enforce", "", 1, None):
            fields = {"action": action}
            self.assertLoadError(
                document(service(name="api", **fields)),
                "service 'api'",
                "write action: open, report or enforce",
            )
        self.assertLoadError(
            document(default={"action": "deny"}), "default", "unknown action 'deny'"
        )

    def test_wrongTypes(self) -> None:
        """
        Values of the wrong type are refused, naming the key.
        """
        self.assertLoadError(
            document(service(name="api", allowed_domains="example.com")),
            "service 'api': allowed_domains",
            "expected a list",
        )
        self.assertLoadError(
            document(service(name="api", allowed_domains=[3])),
            "allowed_domains[0]",
            "expected a domain string",
        )
        self.assertLoadError(
            document(service(name="api", project=["p"])),
            "service 'api': project",
            "expected a string",
        )
        self.assertLoadError(document(service(name=7)), "services[0]", "name 7")
        self.assertLoadError(document(service(name="")), "services[0]", "non-empty")
        self.assertLoadError(
            {"version": "v1", "services": ["api"]}, "services[0]", "expected a mapping"
        )
        self.assertLoadError(
            {"version": "v1", "services": {"api": {}}}, "services", "expected a list"
        )
        self.assertLoadError(
            document(default=["open"]), "default", "expected a mapping"
        )
        self.assertLoadError(
            document(global_allow_list="x.example"),
            "global_allow_list",
            "expected a list",
        )
        self.assertLoadError(["version", "v1"], "top level", "expected a mapping")
        self.assertLoadError("", "top level", "expected a mapping")

    def test_version(self) -> None:
        """
        C{version: v1} is required.
        """
        for version in (None, "v2", 1):
            data: dict[str, Any] = {"services": []}
            if version is not None:
                data["version"] = version
            self.assertLoadError(data, "version", 'expected "v1"', "write version: v1")

    def test_servicesRequired(self) -> None:
        """
        The top-level services list is required, as in Smokescreen, but may
        be empty.
        """
        self.assertLoadError({"version": "v1"}, "services", "'services' is missing")
        self.assertLoadError(
            "version: v1\nservices:\n", "services", "'services' is missing"
        )
        acl = ACL.fromYAML("version: v1\nservices: []\ndefault: {action: enforce}\n")
        self.assertEqual(acl.roles, frozenset())
        self.assertEqual(acl.decide("x", "example.com").reason, REASON_DEFAULT)

    def test_yamlErrors(self) -> None:
        """
        Invalid YAML and duplicate YAML keys are errors naming the line.
        """
        self.assertLoadError(
            "version: v1\nservices: []\nservices: []\n",
            "line 3",
            "duplicate key 'services'",
        )
        self.assertLoadError(
            "version: v1\nservices:\n  - name: a\n    action: open\n    action: "
            "enforce\n",
            "line 5",
            "duplicate key 'action'",
        )
        self.assertLoadError("version: v1\nservices: [\n", "invalid YAML")
        self.assertLoadError("version: v1\n\tservices: []\n", "invalid YAML", "line 2")

    def test_defaultMayCarryAName(self) -> None:
        """
        A name on the default rule, which Smokescreen ignores, is accepted
        and does not become a role.
        """
        acl = ACL.fromMapping(document(default={"name": "fallback", "action": "open"}))
        self.assertEqual(acl.roles, frozenset())
        self.assertEqual(acl.decide("fallback", "x.example").rule, "default")


class LoadACLTests(SynchronousTestCase):
    """
    L{loadACL} reads a file and names it in every error.
    """

    def path(self, content: bytes) -> str:
        fp = FilePath(self.mktemp())
        fp.setContent(content)
        return fp.path

    def test_loads(self) -> None:
        """
        A valid file loads and records its path as the source.
        """
        path = self.path(SAMPLE.encode("utf-8"))
        acl = loadACL(path)
        self.assertEqual(acl.source, path)
        self.assertEqual(len(acl.roles), 4)

    def test_missingFile(self) -> None:
        """
        An unreadable file is an ACLError naming the path.
        """
        path = self.mktemp()
        with self.assertRaises(ACLError) as caught:
            loadACL(path)
        self.assertIn(path, str(caught.exception))
        self.assertIn("cannot read", str(caught.exception))

    def test_invalidFile(self) -> None:
        """
        Invalid YAML, bad encoding and invalid content all name the path.
        """
        for content, fragment in (
            (b"version: v1\nservices: [\n", "invalid YAML"),
            (b"version: v1\nservices: []\n\xff\n", "not UTF-8"),
            (
                b"version: v1\nservices:\n - {name: a, action: allow}\n",
                "unknown action",
            ),
        ):
            path = self.path(content)
            with self.assertRaises(ACLError) as caught:
                loadACL(path)
            self.assertTrue(str(caught.exception).startswith(f"{path}: "))
            self.assertIn(fragment, str(caught.exception))

    def test_shippedExample(self) -> None:
        """
        The example etc/acl.yaml loads and decides as its comments say.
        """
        path = os.path.join(
            os.path.dirname(os.path.dirname(__file__)), "etc", "acl.yaml"
        )
        acl = loadACL(path)
        self.assertEqual(
            acl.roles, frozenset({"billing", "webhooks", "ci-runner", "batch"})
        )
        self.assertEqual(
            acl.decide("billing", "api.stripe.com").reason, REASON_ALLOWED_DOMAIN
        )
        self.assertEqual(
            acl.decide("billing", "files.stripe.com").reason, REASON_ALLOWED_DOMAIN
        )
        self.assertEqual(acl.decide("billing", "stripe.com").reason, REASON_ENFORCE)
        self.assertEqual(acl.decide("billing", "pypi.org").reason, REASON_GLOBAL_ALLOW)
        webhooks = acl.decide("webhooks", "customer.example")
        self.assertEqual((webhooks.allow, webhooks.enforceWouldDeny), (True, True))
        self.assertEqual(
            acl.decide("webhooks", "abc.ngrok.io").reason, REASON_GLOBAL_DENY
        )
        self.assertEqual(
            acl.decide("ci-runner", "pastebin.com").reason, REASON_GLOBAL_DENY
        )
        self.assertEqual(
            acl.decide("ci-runner", "anything.example").reason, REASON_OPEN
        )
        self.assertEqual(
            acl.decide("stranger", "anything.example").reason, REASON_DEFAULT
        )
        self.assertFalse(acl.decide("stranger", "anything.example").allow)


class ExternalProxyTests(SynchronousTestCase):
    """
    C{allowed_external_proxies}: the external proxies (Smokescreen's
    C{X-Upstream-Https-Proxy}) a role's CONNECT may go through.
    """

    def acl(self, **fields: Any) -> ACL:
        return ACL.fromMapping(
            document(
                service(name="api", allowed_domains=["api.example"], **fields),
                default={"project": "other", "action": "open"},
            )
        )

    def test_loaded(self) -> None:
        """
        The key loads (it was refused before), and a listed host or one
        below a C{*.} glob may be the external proxy; the destination is
        then judged as usual.
        """
        acl = self.acl(allowed_external_proxies=["proxy.example", "*.corp.example"])
        for proxy in ("proxy.example", "PROXY.example", "p1.corp.example"):
            decision = acl.decide("api", "api.example", connectProxyHost=proxy)
            self.assertEqual(
                (decision.allow, decision.reason), (True, REASON_ALLOWED_DOMAIN)
            )

    def test_notListedDenied(self) -> None:
        """
        An external proxy matching none of the rule's globs is denied with
        Smokescreen's reason, even for an allowed destination and for a
        rule whose action is C{open}; C{*.corp.example} does not match
        C{corp.example} itself.
        """
        acl = self.acl(allowed_external_proxies=["*.corp.example"])
        for role in ("api", "someone-else"):
            for proxy in ("corp.example", "evil.example", "", "bad host"):
                decision = acl.decide(role, "api.example", connectProxyHost=proxy)
                self.assertEqual(
                    (decision.allow, decision.reason, decision.enforceWouldDeny),
                    (False, REASON_EXTERNAL_PROXY, True),
                )

    def test_noListDeniesEveryProxy(self) -> None:
        """
        A rule without the key allows no external proxy, while the same
        request without one is allowed.
        """
        acl = self.acl()
        self.assertFalse(
            acl.decide("api", "api.example", connectProxyHost="p.example").allow
        )
        self.assertTrue(acl.decide("api", "api.example").allow)

    def test_destinationStillJudged(self) -> None:
        """
        An allowed external proxy does not allow the destination: an
        enforcing rule still denies a host it does not list.
        """
        acl = ACL.fromMapping(
            document(
                service(
                    name="api",
                    action="enforce",
                    allowed_domains=["api.example"],
                    allowed_external_proxies=["proxy.example"],
                )
            )
        )
        decision = acl.decide("api", "other.example", connectProxyHost="proxy.example")
        self.assertEqual((decision.allow, decision.reason), (False, REASON_ENFORCE))

    def test_globRules(self) -> None:
        """
        The entries follow the same glob rules as C{allowed_domains}.
        """
        for entry, problem in (
            ("*", "must not match everything"),
            ("*proxy.example", "full prefix"),
            ("Proxy.example", "incorrect ACL entry"),
        ):
            with self.assertRaises(ACLError) as caught:
                self.acl(allowed_external_proxies=[entry])
            self.assertIn("allowed_external_proxies[0]", str(caught.exception))
            self.assertIn(problem, str(caught.exception))
        with self.assertRaises(ACLError):
            self.acl(allowed_external_proxies="proxy.example")

    def test_defaultRule(self) -> None:
        """
        The C{default} rule may list external proxies too.
        """
        acl = ACL.fromMapping(
            document(
                default={
                    "action": "open",
                    "allowed_external_proxies": ["proxy.example"],
                }
            )
        )
        self.assertTrue(
            acl.decide("x", "a.example", connectProxyHost="proxy.example").allow
        )
