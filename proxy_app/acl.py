"""
Smokescreen-compatible egress ACLs: which role may reach which host names.

The file format is Smokescreen's C{acl/v1} YAML::

    version: v1
    services:
      - name: billing            # the role, e.g. a client certificate's CN
        project: payments        # an owner label, reported with decisions
        action: enforce          # open | report | enforce
        allowed_domains:
          - api.stripe.com
          - "*.example.com"
    default:                     # optional: the rule for every other role
      project: other
      action: report
    global_allow_list: [status.example.net]
    global_deny_list: ["*.evil.example"]

A rule may also list C{mitm_domains}, Smokescreen's TLS interception of
CONNECT tunnels (L{proxy_app.mitm})::

        mitm_domains:
          - domain: api.example.com      # also in allowed_domains
            add_headers: {Accept-Language: el}
            detailed_http_logs: true
            detailed_http_logs_full_headers: [User-Agent]

As in Smokescreen, each C{domain} must be one of the rule's
C{allowed_domains} entries, written the same way, and it applies only
when the host was allowed by C{allowed_domains} (L{ACL.mitmFor}).

A decision is made the way Smokescreen's C{ACL.Decide} makes it, and carries
Smokescreen's C{decision_reason} strings verbatim so that dashboards and log
queries written for Smokescreen keep working:

 1. The role's rule, else the C{default} rule, else deny
    (C{"no rule matched"}).  Then (step 1a) a CONNECT that asks to go
    through an external proxy (C{X-Upstream-Https-Proxy}) whose host
    matches none of the rule's C{allowed_external_proxies}: deny, whatever
    the action (C{"connect proxy host not allowed in rule"}).
 2. The host matches the rule's C{allowed_domains}: allow.
 3. The host matches C{global_deny_list}: deny.
 4. The host matches C{global_allow_list}: allow.
 5. The rule's action: C{open} allows, C{report} allows but records that
    C{enforce} would have denied, C{enforce} denies.

Where Smokescreen is silent we are stricter: unknown keys, duplicate service
names, duplicate YAML keys, values of the wrong type and entries that are
not already in normalized form are load errors, each naming where it is and
what to write instead.

L{ACL} objects are immutable: reloading builds a new one, and a request that
already has its L{ACLDecision} keeps it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attr
import yaml

from proxy_app.addresses import parseIPLiteral
from proxy_app.reasons import ProxyError
from proxy_app.target import normalizeHost

# Smokescreen's decision_reason strings, verbatim (acl/v1/acl.go and
# smokescreen.go's checkACLsForRequest).
REASON_ALLOWED_DOMAIN = "host matched allowed domain in rule"
REASON_GLOBAL_DENY = "host matched rule in global deny list"
REASON_GLOBAL_ALLOW = "host matched rule in global allow list"
REASON_OPEN = "rule has open enforcement policy"
REASON_REPORT = "rule has allow and report policy"
REASON_ENFORCE = "rule has enforce policy"
REASON_DEFAULT = "default rule policy used"
REASON_NO_RULE = "no rule matched"
REASON_NO_ROLE = "Client role cannot be determined"
REASON_NO_ACL = "Egress ACL is not configured"
REASON_EXTERNAL_PROXY = "connect proxy host not allowed in rule"

ACTIONS = ("open", "report", "enforce")
DEFAULT_RULE = "default"

_TOP_KEYS = ("version", "services", "default", "global_allow_list", "global_deny_list")
_SERVICE_KEYS = (
    "name",
    "project",
    "action",
    "allowed_domains",
    "allowed_external_proxies",
    "mitm_domains",
)
_MITM_KEYS = (
    "domain",
    "add_headers",
    "detailed_http_logs",
    "detailed_http_logs_full_headers",
)
# Smokescreen ignores a name on the default rule; files migrated from it may
# carry one, and it is harmless.
_DEFAULT_KEYS = _SERVICE_KEYS
# Keys that Smokescreen knows and we do not implement.  Ignoring them would
# silently change what a migrated file means, so they are errors too.
_UNSUPPORTED: dict[str, str] = {}
# Likely slips, named after Smokescreen's own Go field (AllowedHosts).
_HINTS = {
    "allowed_hosts": "allowed_domains",
    "allowed_domain": "allowed_domains",
    "domains": "allowed_domains",
    "policy": "action",
    "service": "name",
    "role": "name",
    "global_allowlist": "global_allow_list",
    "global_denylist": "global_deny_list",
    "allow_list": "global_allow_list",
    "deny_list": "global_deny_list",
}


class ACLError(ValueError):
    """
    The ACL is unusable.  The message is one line that names the file, the
    key or service, and what to write instead.
    """


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ACLDecision:
    """
    The outcome of L{ACL.decide}, in the terms of Smokescreen's
    C{CANONICAL-PROXY-DECISION} log line.

    @ivar allow: whether the request may proceed (the address policy still
        applies afterwards).
    @ivar reason: Smokescreen's C{decision_reason} string.
    @ivar role: the role the decision was made for; C{None} for an
        anonymous request.
    @ivar project: the matched rule's project (C{""} when the rule names
        none), or C{None} when no rule matched.
    @ivar action: the matched rule's action, or C{None} when no rule
        matched.
    @ivar enforceWouldDeny: whether C{enforce} would have denied this
        request, as Smokescreen's C{enforce_would_deny}.
    @ivar rule: the name of the service whose rule matched, C{"default"},
        or C{None}.  Unlike C{role} it is drawn from a bounded set, so it
        suits a metric label.
    @ivar reportOnly: the ACL denied this request and C{acl.report_only}
        let it through: a would-deny decision, logged and counted as
        C{report}.
    """

    allow: bool
    reason: str
    role: str | None
    project: str | None
    action: str | None
    enforceWouldDeny: bool
    rule: str | None
    reportOnly: bool = False

    @property
    def reported(self) -> bool:
        """
        Whether the request went through although C{enforce} would have
        denied it (a rule in C{report} mode, or C{acl.report_only}): the
        metrics' C{report} outcome.
        """
        return self.allow and self.enforceWouldDeny

    def reportedOnly(self) -> ACLDecision:
        """
        This denial, turned into an allowed would-deny decision
        (C{acl.report_only}); the reason stays the ACL's own.
        """
        return attr.evolve(self, allow=True, enforceWouldDeny=True, reportOnly=True)

    @classmethod
    def withoutACL(cls, role: str | None) -> ACLDecision:
        """
        The decision to record when no ACL is configured: everything is
        allowed, as Smokescreen does.
        """
        return cls(True, REASON_NO_ACL, role, None, None, False, None)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _DomainSet:
    """
    Normalized exact names and C{*.} suffixes, matched in time linear in
    the host's length rather than the list's.
    """

    exact: frozenset[str]
    suffixes: frozenset[str]

    def matches(self, host: str) -> bool:
        if host in self.exact:
            return True
        if not self.suffixes:
            return False
        # "*.example.com" matches every name strictly below example.com, at
        # any depth, and never example.com itself.
        index = host.find(".")
        while index >= 0:
            if host[index + 1 :] in self.suffixes:
                return True
            index = host.find(".", index + 1)
        return False


@attr.s(frozen=True, slots=True, auto_attribs=True)
class MitmDomain:
    """
    One C{mitm_domains} entry: intercept tunnels to hosts matching
    C{domain} (L{proxy_app.mitm}).

    @ivar domain: the glob, as in C{allowed_domains}.
    @ivar addHeaders: C{(name, value)} pairs set on every request inside
        the tunnel (Smokescreen's C{add_headers}), replacing headers of the
        same name.
    @ivar detailedLogs: log each inner request's method, URL and headers
        (C{detailed_http_logs}).
    @ivar fullHeaders: the lower-cased names of the headers whose values
        those logs show; every other value is C{[REDACTED]}
        (C{detailed_http_logs_full_headers}).
    """

    domain: str
    addHeaders: tuple[tuple[str, str], ...] = ()
    detailedLogs: bool = False
    fullHeaders: frozenset[str] = frozenset()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Rule:
    name: str
    project: str
    action: str
    domains: _DomainSet
    externalProxies: _DomainSet
    # (matching set, entry) for each mitm_domains entry, in order.
    mitm: tuple[tuple[_DomainSet, MitmDomain], ...] = ()


def _canonical(text: str) -> str:
    """
    Normalize a host or ACL entry exactly as the proxy normalizes request
    targets (L{normalizeHost}), accepting IPv6 literals with or without
    brackets.

    @raise ProxyError: if it is not a usable host.
    """
    if ":" in text and not text.startswith("["):
        text = f"[{text}]"
    return normalizeHost(text)


def _validateGlob(glob: str) -> tuple[str, bool]:
    """
    Check one C{allowed_domains} or global-list entry with Smokescreen's
    rules, and require it to be written in normalized form.

    @return: the domain part and whether it had a C{*.} prefix.
    @raise ValueError: with Smokescreen's wording for the problem.
    """
    if glob == "":
        raise ValueError("glob cannot be empty")
    if glob in ("*", "*."):
        raise ValueError(
            "domain glob must not match everything; list the domains, or use "
            "action: open"
        )
    if glob.startswith("*") and not glob.startswith("*."):
        raise ValueError(
            "domain glob must represent a full prefix (sub)domain; write "
            f"'*.{glob[1:].lstrip('.')}'"
        )
    wildcard = glob.startswith("*.")
    domain = glob[2:] if wildcard else glob
    if "*" in domain:
        raise ValueError(
            "domain globs are only supported as prefix: only a leading '*.' is allowed"
        )
    try:
        normalized = _canonical(domain)
    except ProxyError as e:
        raise ValueError(f"incorrect ACL entry: {e.message}") from None
    if wildcard and parseIPLiteral(normalized) is not None:
        raise ValueError("a '*.' glob cannot apply to an IP address")
    if normalized != domain:
        suggestion = f"*.{normalized}" if wildcard else normalized
        raise ValueError(f'incorrect ACL entry; use "{suggestion}"')
    return domain, wildcard


_TOKEN = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def _headerSafe(name: str, value: str) -> bool:
    """
    Whether C{name: value} can be written as a header line as it is: a
    token name, and a value of visible Latin-1 characters, spaces and tabs
    (no CR or LF that would start another line).
    """
    if not name or not set(name) <= _TOKEN:
        return False
    return all(c == "\t" or " " <= c <= "~" or "\x80" <= c <= "\xff" for c in value)


def domainSet(globs: Any) -> _DomainSet:
    """
    A matcher for already validated domains and C{*.} globs
    (L{parseDomainGlob}): its C{matches(host)} says whether a normalized
    host matches one of them, as C{allowed_domains} entries match.
    """
    exact = frozenset(g for g in globs if not g.startswith("*."))
    suffixes = frozenset(g[2:] for g in globs if g.startswith("*."))
    return _DomainSet(exact, suffixes)


def parseDomainGlob(glob: Any) -> str:
    """
    One domain or C{*.} glob written as C{allowed_domains} entries are
    (C{mitm.domains}).

    @raise ValueError: naming what is wrong.
    """
    if not isinstance(glob, str):
        raise ValueError("expected a domain or *.domain glob")
    _validateGlob(glob)
    return glob


class _Loader:
    """
    Turns parsed YAML into an L{ACL}, raising L{ACLError} with the source
    and location of the first problem.
    """

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> ACLError:
        return ACLError(f"{self.source}: {where}: {problem}")

    def checkKeys(
        self, data: Mapping[Any, Any], allowed: tuple[str, ...], where: str
    ) -> None:
        for key in data:
            if not isinstance(key, str):
                raise self.fail(where, f"key {key!r} is not a string")
            if key in allowed:
                continue
            if key in _UNSUPPORTED:
                raise self.fail(
                    where,
                    f"'{key}' ({_UNSUPPORTED[key]}) is not supported by egressproxy; "
                    "remove it",
                )
            hint = _HINTS.get(key)
            if hint is None or hint not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = close[0] if close else None
            advice = (
                f"did you mean '{hint}'?"
                if hint
                else f"expected one of {', '.join(allowed)}"
            )
            raise self.fail(where, f"unknown key '{key}'; {advice}")

    def string(self, value: Any, where: str, required: bool = True) -> str:
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            what = "missing" if value is None else f"{type(value).__name__} {value!r}"
            raise self.fail(where, f"expected a string, got {what}")
        return value

    def domains(self, value: Any, where: str) -> _DomainSet:
        if value is None:
            return _DomainSet(frozenset(), frozenset())
        if not isinstance(value, list):
            raise self.fail(
                where,
                f"expected a list of domains, got {type(value).__name__} {value!r}; "
                "write one '- domain' per line",
            )
        exact: set[str] = set()
        suffixes: set[str] = set()
        for index, entry in enumerate(value):
            here = f"{where}[{index}]"
            if not isinstance(entry, str):
                raise self.fail(
                    here,
                    f"expected a domain string, got {type(entry).__name__} {entry!r}",
                )
            try:
                domain, wildcard = _validateGlob(entry)
            except ValueError as e:
                raise self.fail(f"{here} '{entry}'", str(e)) from None
            (suffixes if wildcard else exact).add(domain)
        return _DomainSet(frozenset(exact), frozenset(suffixes))

    def rule(self, data: Any, where: str, keys: tuple[str, ...], name: str) -> _Rule:
        if not isinstance(data, Mapping):
            raise self.fail(
                where, f"expected a mapping, got {type(data).__name__} {data!r}"
            )
        self.checkKeys(data, keys, where)
        project = self.string(data.get("project"), f"{where}: project", required=False)
        action = data.get("action")
        if action not in ACTIONS:
            got = "no action" if action is None else f"unknown action {action!r}"
            raise self.fail(where, f"{got}; write action: open, report or enforce")
        domains = self.domains(data.get("allowed_domains"), f"{where}: allowed_domains")
        proxies = self.domains(
            data.get("allowed_external_proxies"), f"{where}: allowed_external_proxies"
        )
        mitm = self.mitmDomains(
            data.get("mitm_domains"),
            data.get("allowed_domains") or [],
            f"{where}: mitm_domains",
        )
        return _Rule(name, project, action, domains, proxies, mitm)

    def mitmDomains(
        self, value: Any, allowed: list[Any], where: str
    ) -> tuple[tuple[_DomainSet, MitmDomain], ...]:
        """
        A rule's C{mitm_domains}, read with Smokescreen's keys; each domain
        must also be one of the rule's C{allowed_domains} (Smokescreen's
        C{ValidateRule}).
        """
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(
                where,
                f"expected a list of entries, got {type(value).__name__} {value!r}; "
                "write one '- domain: NAME' per entry",
            )
        entries = []
        for index, entry in enumerate(value):
            here = f"{where}[{index}]"
            if not isinstance(entry, Mapping):
                raise self.fail(
                    here,
                    f"expected a mapping with domain:, got {type(entry).__name__} "
                    f"{entry!r}",
                )
            self.checkKeys(entry, _MITM_KEYS, here)
            domain = self.string(entry.get("domain"), f"{here}: domain")
            matching = self.domains([domain], f"{here}: domain")
            if domain not in allowed:
                raise self.fail(
                    f"{here}: domain '{domain}'",
                    "was added to mitm_domains but is missing in allowed_domains",
                )
            headers = entry.get("add_headers")
            if headers is None:
                headers = {}
            if not isinstance(headers, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) and _headerSafe(k, v)
                for k, v in headers.items()
            ):
                raise self.fail(
                    f"{here}: add_headers",
                    "expected a mapping of header names to string values, "
                    "without control characters",
                )
            detailed = entry.get("detailed_http_logs", False)
            if not isinstance(detailed, bool):
                raise self.fail(
                    f"{here}: detailed_http_logs",
                    f"expected true or false, got {detailed!r}",
                )
            full = entry.get("detailed_http_logs_full_headers")
            if full is None:
                full = []
            if not isinstance(full, list) or not all(isinstance(h, str) for h in full):
                raise self.fail(
                    f"{here}: detailed_http_logs_full_headers",
                    "expected a list of header names",
                )
            entries.append(
                (
                    matching,
                    MitmDomain(
                        domain,
                        tuple(headers.items()),
                        detailed,
                        frozenset(h.lower() for h in full),
                    ),
                )
            )
        return tuple(entries)

    def load(self, data: Any) -> ACL:
        if not isinstance(data, Mapping):
            raise self.fail(
                "top level",
                f"expected a mapping with version: v1 and services, got "
                f"{type(data).__name__}",
            )
        self.checkKeys(data, _TOP_KEYS, "top level")
        version = data.get("version")
        if version != "v1":
            raise self.fail(
                "version", f'expected "v1", got {version!r}; write version: v1'
            )
        services = data.get("services")
        if not isinstance(services, list):
            problem = (
                "top level list 'services' is missing"
                if services is None
                else f"expected a list of services, got {type(services).__name__}"
            )
            raise self.fail("services", f"{problem}; write services: [] for none")
        rules: dict[str, _Rule] = {}
        for index, service in enumerate(services):
            where = f"services[{index}]"
            if not isinstance(service, Mapping):
                raise self.fail(
                    where,
                    f"expected a mapping, got {type(service).__name__} {service!r}",
                )
            name = service.get("name")
            if not isinstance(name, str) or not name:
                got = "no name" if name is None else f"name {name!r}"
                raise self.fail(
                    where, f"{got}; every service needs a non-empty string name"
                )
            where = f"service '{name}'"
            if name == DEFAULT_RULE:
                raise self.fail(
                    where,
                    "the name 'default' is reserved for the top-level default rule; "
                    "rename the service or move it under default:",
                )
            if name in rules:
                raise self.fail(
                    where, "duplicate service name; each name may appear once"
                )
            rules[name] = self.rule(service, where, _SERVICE_KEYS, name)
        default = None
        if data.get("default") is not None:
            default = self.rule(data["default"], "default", _DEFAULT_KEYS, DEFAULT_RULE)
        return ACL(
            source=self.source,
            roles=frozenset(rules),
            rules=MappingProxyType(rules),
            default=default,
            globalDeny=self.domains(data.get("global_deny_list"), "global_deny_list"),
            globalAllow=self.domains(
                data.get("global_allow_list"), "global_allow_list"
            ),
        )


class _StrictLoader(yaml.SafeLoader):
    """
    A safe YAML loader that refuses duplicate keys, which plain YAML
    loaders resolve silently in favour of the last one.
    """

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for keyNode, _ in node.value:
            key = self.construct_object(keyNode, deep=deep)  # type: ignore[no-untyped-call]
            line = keyNode.start_mark.line + 1
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first at line {seen[key]})",
                        keyNode.start_mark,
                    )
            except TypeError:
                continue
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ACL:
    """
    A loaded, validated and immutable ACL.

    @ivar source: where it came from, for messages.
    @ivar roles: the service names that have rules of their own.
    """

    source: str
    roles: frozenset[str]
    _rules: Mapping[str, _Rule]
    _default: _Rule | None
    _globalDeny: _DomainSet
    _globalAllow: _DomainSet

    @classmethod
    def fromMapping(cls, data: Mapping[str, Any], source: str = "<acl>") -> ACL:
        """
        Build an ACL from already-parsed data (as YAML would give).

        @raise ACLError: naming the first problem.
        """
        return _Loader(source).load(data)

    @classmethod
    def fromYAML(cls, text: str, source: str = "<acl>") -> ACL:
        """
        Parse and build an ACL from Smokescreen v1 YAML text.

        @raise ACLError: for invalid YAML or an invalid ACL.
        """
        try:
            data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = (
                f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
            )
            problem = e.problem or e.context or "invalid YAML"
            raise ACLError(f"{source}: {where}: invalid YAML: {problem}") from None
        except yaml.YAMLError as e:
            raise ACLError(f"{source}: invalid YAML: {e}") from None
        return cls.fromMapping(data, source)

    @property
    def intercepts(self) -> bool:
        """
        Whether any rule lists C{mitm_domains}.
        """
        rules = list(self._rules.values())
        if self._default is not None:
            rules.append(self._default)
        return any(rule.mitm for rule in rules)

    def mitmFor(
        self, role: str | None, host: str, allowMissingRole: bool = False
    ) -> MitmDomain | None:
        """
        The C{mitm_domains} entry that intercepts C{role}'s tunnel to
        C{host}, as Smokescreen's C{Decide} finds it: from the rule
        L{decide} uses, and only when the host matched that rule's
        C{allowed_domains}; the first matching entry wins.

        @param host: a normalized host, as in a request's target.
        """
        if not role:
            if not allowMissingRole:
                return None
            role = None
        rule = self._rules.get(role) if role is not None else None
        if rule is None:
            rule = self._default
        if rule is None or not rule.mitm or not rule.domains.matches(host):
            return None
        for matching, entry in rule.mitm:
            if matching.matches(host):
                return entry
        return None

    @property
    def hasDefault(self) -> bool:
        """
        Whether roles without a rule of their own fall back to C{default}.
        """
        return self._default is not None

    def decide(
        self,
        role: str | None,
        host: str,
        allowMissingRole: bool = False,
        connectProxyHost: str | None = None,
    ) -> ACLDecision:
        """
        Decide whether C{role} may reach C{host}, as Smokescreen would.

        @param role: the client's role, or C{None} (or C{""}) when the
            client could not be identified.
        @param host: the requested host, normalized here the same way
            request targets are; a host that cannot be normalized matches
            no entry, so only the rule's action can allow it.
        @param allowMissingRole: Smokescreen's C{--allow-missing-role}: an
            anonymous request is judged by the C{default} rule instead of
            being denied.
        @param connectProxyHost: the host of the external proxy a CONNECT
            asked to be tunnelled through (C{X-Upstream-Https-Proxy}), or
            L{None}.  As in Smokescreen, it must match the rule's
            C{allowed_external_proxies}, whatever the rule's action, and
            the destination C{host} is then judged as usual.
        """
        if not role:
            if not allowMissingRole:
                # Smokescreen returns before consulting the ACL here, so it
                # does not report enforce_would_deny either.
                return ACLDecision(False, REASON_NO_ROLE, None, None, None, False, None)
            role = None
        rule = self._rules.get(role) if role is not None else None
        if rule is None:
            rule = self._default
        if rule is None:
            return ACLDecision(False, REASON_NO_RULE, role, None, None, True, None)

        def decision(allow: bool, reason: str, wouldDeny: bool) -> ACLDecision:
            return ACLDecision(
                allow, reason, role, rule.project, rule.action, wouldDeny, rule.name
            )

        if connectProxyHost is not None:
            try:
                proxyHost: str | None = _canonical(connectProxyHost)
            except ProxyError:
                proxyHost = None
            if proxyHost is None or not rule.externalProxies.matches(proxyHost):
                return decision(False, REASON_EXTERNAL_PROXY, True)
        try:
            normalized: str | None = _canonical(host)
        except ProxyError:
            normalized = None
        if normalized is not None:
            if rule.domains.matches(normalized):
                return decision(True, REASON_ALLOWED_DOMAIN, False)
            if self._globalDeny.matches(normalized):
                return decision(False, REASON_GLOBAL_DENY, True)
            if self._globalAllow.matches(normalized):
                return decision(True, REASON_GLOBAL_ALLOW, False)
        isDefault = rule is self._default
        if rule.action == "open":
            allow, reason, wouldDeny = True, REASON_OPEN, False
        elif rule.action == "report":
            allow, reason, wouldDeny = True, REASON_REPORT, True
        else:
            allow, reason, wouldDeny = False, REASON_ENFORCE, True
        return decision(allow, REASON_DEFAULT if isDefault else reason, wouldDeny)


def loadACL(path: str) -> ACL:
    """
    Read and build the ACL in the file at C{path}.

    @raise ACLError: naming C{path} when it cannot be read or is invalid.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ACLError(f"{path}: cannot read ACL file: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ACLError(f"{path}: the ACL file is not UTF-8 (byte {e.start})") from None
    return ACL.fromYAML(text, source=path)


__all__ = [
    "ACL",
    "ACLDecision",
    "ACLError",
    "ACTIONS",
    "loadACL",
    "MitmDomain",
    "domainSet",
    "parseDomainGlob",
    "REASON_ALLOWED_DOMAIN",
    "REASON_DEFAULT",
    "REASON_ENFORCE",
    "REASON_EXTERNAL_PROXY",
    "REASON_GLOBAL_ALLOW",
    "REASON_GLOBAL_DENY",
    "REASON_NO_ACL",
    "REASON_NO_ROLE",
    "REASON_NO_RULE",
    "REASON_OPEN",
    "REASON_REPORT",
]
