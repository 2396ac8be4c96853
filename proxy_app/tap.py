"""
The C{twistd egressproxy} command: L{Options} and L{makeService}; and
L{buildProxy}, which builds the same proxy from a L{Config} for an
application that mounts it.

L{makeService} is the way to mount the proxy inside an existing Twisted
application with the command line's behaviour: a configuration mistake
prints one line and exits::

    from proxy_app.tap import Options, makeService
    options = Options()
    options.parseOptions(["--listen", "tcp:9090:interface=127.0.0.1"])
    makeService(options).setServiceParent(application)

L{buildProxy} raises L{ConfigError} instead::

    from proxy_app.config import ConfigError, load
    from proxy_app.tap import buildProxy
    try:
        proxy = buildProxy(load({}, {}, "egressproxy.yaml"), reactor)
    except ConfigError as e:
        ...

This is the only module that imports the global reactor, and only on the
command line's path (L{makeService} without a reactor).
"""

from __future__ import annotations

import ctypes
import gc
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import attr
from twisted.application.service import MultiService, Service
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.task import LoopingCall
from twisted.internet.testing import MemoryReactor
from twisted.logger import ILogObserver, Logger, jsonFileLogObserver
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.web.server import Site

from proxy_app import config as configModule
from proxy_app.access import AccessControl
from proxy_app.acl import ACLError, loadACL
from proxy_app.addresses import AddressPolicy, parseIPLiteral
from proxy_app.config import Config, ConfigError, TLSListener, splitDescription
from proxy_app.limits import workerLimits
from proxy_app.mitm import Interception, IssuingCA, MitmConfigError
from proxy_app.observe import (
    AccessLog,
    DecisionLog,
    Metrics,
    MetricsResource,
    TextProcessLog,
    instanceRegistry,
    multiprocessValues,
)
from proxy_app.parent import Bypass, ParentProxy, parseParentURL
from proxy_app.reload import Reloader
from proxy_app.resolver import CachingResolver, SafeResolver, makeNameResolver
from proxy_app.server import ProxyFactory
from proxy_app.tls import (
    CertificateRole,
    ListenerTLS,
    Origination,
    TLSConfigError,
    loadClientIdentity,
    loadTrustRoot,
    serverOptions,
)
from proxy_app.transport import leanPort
from proxy_app.upstream import Connector
from proxy_app.watch import FileWatcher
from proxy_app.webhook import WebhookService
from proxy_app.workers import WorkerStatus, WorkerSupervisor, sharedListen

log = Logger()


def _repeatable(field: configModule.Field) -> Any:
    def opt(self: Options, value: str) -> None:
        self.setdefault(field.setting.flag, []).append(value)

    opt.__doc__ = field.setting.doc
    return opt


def _isSwitch(field: configModule.Field) -> bool:
    return field.setting.parse is configModule.parseBoolean and field.default is False


# Not settings: the supervisor of --workers gives them to each worker.
_WORKER_INDEX: list[Any] = [
    "worker-index",
    None,
    None,
    "Internal: set by --workers for each worker process.",
    int,
]
_WORKER_STATUS_FD: list[Any] = [
    "worker-status-fd",
    None,
    None,
    "Internal: set by --workers for each worker process.",
    int,
]


class Options(usage.Options):
    """
    Command-line options of C{twistd egressproxy}, generated from
    L{proxy_app.config}'s fields.  After parsing, C{self.config} holds the
    merged L{Config}.
    """

    synopsis = "[options]"
    longdesc = (
        "An HTTP/1.1 egress proxy that never connects to private or "
        "unvetted destinations.  Every option can also be set with an "
        "EGRESSPROXY_<OPTION> environment variable or in the YAML file "
        "given with --config; flags win over the environment, which wins "
        "over the file."
    )
    optParameters: list[list[Any]] = [
        ["config", "c", None, "YAML configuration file."],
        _WORKER_INDEX,
        _WORKER_STATUS_FD,
    ] + [
        [f.setting.flag, None, None, f"{f.setting.doc} [default: {f.default}]"]
        for f in configModule.fields()
        if not f.setting.repeatable and not _isSwitch(f)
    ]
    # Booleans that default to off are plain switches, as in Smokescreen
    # (--allow-missing-role); the environment and YAML still take true/false.
    optFlags: list[list[Any]] = [
        [f.setting.flag, None, f.setting.doc]
        for f in configModule.fields()
        if _isSwitch(f)
    ]

    config: Config
    source: ConfigSource

    def __init__(self, environ: Any = None) -> None:
        super().__init__()
        import os

        self._environ = os.environ if environ is None else environ

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        Parse, and on any error print one line and stop: a configuration
        mistake is not a crash, and needs no usage dump or traceback.
        """
        self.argv = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)
        except (usage.UsageError, ConfigError) as e:
            _exit(e, 2)

    def postOptions(self) -> None:
        flags = {
            f.setting.flag: self.get(f.setting.flag) for f in configModule.fields()
        }
        for field in configModule.fields():
            if _isSwitch(field):
                flags[field.setting.flag] = (
                    "true" if self.get(field.setting.flag) else None
                )
        self.source = ConfigSource(flags, self._environ, self["config"])
        self.config = self.source.load()
        validate(self.config)
        index = self["worker-index"]
        if index is not None and not 0 <= index < self.config.workers:
            raise ConfigError(
                f"worker-index = {index}: expected 0 to {self.config.workers - 1} "
                f"(workers = {self.config.workers})"
            )


for _field in configModule.fields():
    if _field.setting.repeatable:
        setattr(
            Options, "opt_" + _field.setting.flag.replace("-", "_"), _repeatable(_field)
        )
del _field


def validate(config: Config) -> None:
    """
    Checks that need more than one value, or Twisted's own parsers.

    @raise ConfigError: naming the key and value.
    """
    # Endpoints are only parsed here, never listened on: a reactor that
    # records calls is enough, and keeps the global one out of library code.
    reactor = MemoryReactor()
    if not config.listen:
        raise ConfigError("listen = []: expected at least one endpoint")
    for listener in config.listen:
        if isinstance(listener, TLSListener):
            try:
                serverOptions(listener)
            except TLSConfigError as e:
                raise ConfigError(f"listen = {listener.description!r}: {e}") from None
            continue
        try:
            serverFromString(reactor, listener)
        except Exception as e:
            raise ConfigError(
                f"listen = {listener!r}: not a usable endpoint description ({e})"
            ) from None
    if config.workers > 1:
        for listener in config.listen:
            if isinstance(listener, str) and splitDescription(listener)[0][
                0
            ].lower() not in (
                "tcp",
                "tcp6",
            ):
                raise ConfigError(
                    f"listen = {listener!r}: only tcp, tcp6 and mtls listeners can be "
                    "shared between --workers"
                )
    for host, _port in selfAddresses(config.listen):
        if host and parseIPLiteral(host) is None:
            raise ConfigError(
                f"listen: interface={host!r}: expected an IP address "
                "(a name would need DNS before the proxy can vet anything)"
            )
    for host, _port in selfAddresses((config.metrics,) if config.metrics else ()):
        if host and parseIPLiteral(host) is None:
            raise ConfigError(
                f"metrics = {config.metrics!r}: interface={host!r}: expected an IP "
                "address "
                "(the proxy must know the address to refuse connections to itself)"
            )
    for address in config.destinations.bind_addresses:
        import socket

        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address, 0))
            except OSError as e:
                raise ConfigError(
                    f"destinations.bind_addresses = {address!r}: cannot bind: "
                    f"{e.strerror}"
                ) from None
    if not hasRoles(config):
        for entry in config.tls.client_certs:
            if entry.roles is not None:
                raise ConfigError(
                    f"tls.client_certs.{entry.alias}.roles = {list(entry.roles)!r}: "
                    "no client can have a role in this configuration (roles come "
                    "from auth, acl.role_header or a TLS listener with client_ca)"
                )
    acl = None
    if config.acl.file:
        try:
            acl = loadACL(config.acl.file)
        except ACLError as e:
            raise ConfigError(f"acl.file: {e}") from None
    checkInterception(config, acl is not None and acl.intercepts)
    checkDestinations(config.destinations)


def checkInterception(config: Config, aclIntercepts: bool) -> None:
    """
    Interception needs the CA, whole: C{mitm.ca_cert} and C{mitm.ca_key}
    together, and both for C{mitm.domains}, C{mitm.all} or the ACL's
    C{mitm_domains}.

    @raise ConfigError: naming the key.
    """
    mitm = config.mitm
    if (mitm.ca_cert is None) != (mitm.ca_key is None):
        given, missing = (
            ("ca_cert", "ca_key") if mitm.ca_cert is not None else ("ca_key", "ca_cert")
        )
        raise ConfigError(
            f"mitm.{given} = {getattr(mitm, given)!r}: mitm.{missing} must be "
            "given with it"
        )
    if mitm.ca_cert is not None:
        return
    needs = "needs mitm.ca_cert and mitm.ca_key (the CA that intercepts)"
    if mitm.domains:
        raise ConfigError(f"mitm.domains = {list(mitm.domains)!r}: {needs}")
    if mitm.all:
        raise ConfigError(f"mitm.all = True: {needs}")
    if aclIntercepts:
        raise ConfigError(f"acl.file = {config.acl.file!r}: mitm_domains {needs}")


def buildInterception(config: Config, clock: Any) -> Interception | None:
    """
    The L{Interception} of C{config}'s C{mitm} section, or L{None} without
    a CA.

    @raise ConfigError: naming the key and file at fault.
    """
    mitm = config.mitm
    if mitm.ca_cert is None or mitm.ca_key is None:
        return None
    try:
        authority = IssuingCA.load(
            mitm.ca_cert, mitm.ca_key, clock, mitm.leaf_lifetime, mitm.cache_size
        )
    except MitmConfigError as e:
        raise ConfigError(str(e)) from None
    return Interception(authority, mitm.domains, mitm.all)


def checkDestinations(destinations: configModule.Destinations) -> None:
    """
    Check the address rules the configuration's parsers leave to
    L{AddressPolicy}.

    @raise ConfigError: naming the key and value.
    """
    for key, kwarg in (
        ("allow_ranges", "allowRanges"),
        ("deny_ranges", "denyRanges"),
        ("allow_addresses", "allowAddresses"),
        ("deny_addresses", "denyAddresses"),
    ):
        try:
            AddressPolicy(**{kwarg: getattr(destinations, key)})
        except ValueError as e:
            raise ConfigError(f"destinations.{key}: {e}") from None


def hasRoles(config: Config) -> bool:
    """
    Whether clients of this configuration can have roles: proxy
    authentication, a trusted role header, a TLS listener asking for client
    certificates, or an ACL.  Client-certificate aliases are then presented
    only to the roles bound to them.
    """
    return bool(
        config.auth.checkers
        or config.acl.role_header
        or config.acl.file
        or any(
            isinstance(listener, TLSListener) and listener.clientCert != "none"
            for listener in config.listen
        )
    )


def buildParent(
    upstream: configModule.Upstream, origination: Origination
) -> ParentProxy | None:
    """
    The parent proxy of C{upstream.proxy}, or L{None}.  Its name is
    resolved here, once, with the system resolver and without the
    destination policy: the parent is the operator's choice, as the
    control webhook is (see C{docs/security.md}).

    @raise ConfigError: naming the key, for a name that does not resolve
        or a bad C{no_proxy} entry.
    """
    try:
        bypass = Bypass.parse(upstream.no_proxy)
    except ValueError as e:
        raise ConfigError(f"upstream.no_proxy: {e}") from None
    if upstream.proxy is None:
        if upstream.no_proxy:
            log.warn("upstream.no_proxy is set but upstream.proxy is not: ignored")
        return None
    url = parseParentURL(upstream.proxy)
    address = url.host
    if not (isIPAddress(address) or isIPv6Address(address)):
        try:
            answers = socket.getaddrinfo(
                url.host, url.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        except OSError as e:
            raise ConfigError(
                f"upstream.proxy = {str(url)!r}: cannot resolve {url.host!r}: "
                f"{e.strerror or e}"
            ) from None
        address = str(answers[0][4][0]).split("%")[0]
    tls = origination.creator(url.host, None) if url.scheme == "https" else None
    parent = ParentProxy(url, address, tls, bypass)
    log.info(
        "Tunnelling outbound connections through {parent} ({address}){bypass}",
        parent=str(url),
        address=address,
        bypass=", except upstream.no_proxy's" if upstream.no_proxy else "",
    )
    return parent


def buildOrigination(tls: configModule.TLS, rolesInUse: bool = False) -> Origination:
    """
    Load the trust root and client identities for TLS origination.

    @param rolesInUse: whether clients can have roles (L{hasRoles}).
    @raise TLSConfigError: naming the key and file at fault.
    """
    if (tls.client_cert is None) != (tls.client_key is None):
        raise TLSConfigError("client_cert and client_key must be given together")
    try:
        trustRoot = loadTrustRoot(tls.ca_bundle, tls.extra_ca)
    except TLSConfigError as e:
        raise TLSConfigError(f"ca_bundle/extra_ca: {e}") from None
    default = None
    if tls.client_cert is not None and tls.client_key is not None:
        try:
            default = loadClientIdentity("default", tls.client_cert, tls.client_key)
        except TLSConfigError as e:
            raise TLSConfigError(f"client_cert: {e}") from None
    aliases = {}
    for entry in tls.client_certs:
        alias, cert, key, roles = configModule.ClientCertAlias(*entry)
        if alias == configModule.RESERVED_ALIAS:
            raise TLSConfigError(
                f"client_certs.{alias}: the alias {alias!r} is reserved for client_cert"
            )
        try:
            aliases[alias] = loadClientIdentity(alias, cert, key, roles)
        except TLSConfigError as e:
            raise TLSConfigError(f"client_certs.{alias}: {e}") from None
    return Origination(trustRoot, default, aliases, rolesInUse)


def originationFiles(tls: configModule.TLS) -> list[str]:
    """
    The files L{buildOrigination} reads (certifi's bundle aside, which
    changes only with the package).
    """
    paths = [tls.ca_bundle] if tls.ca_bundle else []
    paths.extend(tls.extra_ca)
    paths.extend(p for p in (tls.client_cert, tls.client_key) if p)
    for entry in tls.client_certs:
        _, cert, key, _ = configModule.ClientCertAlias(*entry)
        paths.extend((cert, key))
    return paths


def selfAddresses(listeners: Sequence[str | TLSListener]) -> list[tuple[str, int]]:
    """
    The C{(host, port)} pairs the proxy listens on, from its listeners; an
    empty host is a wildcard.
    """
    result = []
    for listener in listeners:
        if isinstance(listener, TLSListener):
            host, port = listener.interface, str(listener.port)
        else:
            positional, keywords = splitDescription(listener)
            if (
                positional[0].lower() not in ("tcp", "tcp6", "ssl")
                or len(positional) + len(keywords) < 2
            ):
                continue
            host = keywords.get("interface", "")
            port = keywords.get("port") or (
                positional[1] if len(positional) > 1 else ""
            )
        if not port.isdigit() or int(port) == 0:
            # Port 0 is chosen by the kernel at bind time; there is nothing
            # to match yet.
            continue
        result.append((host, int(port)))
    return result


def proxySelfAddresses(config: Config) -> list[tuple[str, int]]:
    """
    The C{(host, port)} pairs that the processes of the proxy listen on:
    the listeners, which all workers of C{--workers} share, and the metrics
    endpoint, which the process serves itself or, with C{--workers}, the
    supervisor serves for all of them.  Every worker refuses all of them.
    """
    metrics = (config.metrics,) if config.metrics else ()
    return selfAddresses(config.listen + metrics)


def buildPolicy(config: Config) -> AddressPolicy:
    """
    The address policy of C{config}'s destinations, with every address the
    proxy itself listens on denied as a self-connection.
    """
    destinations = config.destinations
    return AddressPolicy(
        allowRanges=destinations.allow_ranges,
        denyRanges=destinations.deny_ranges,
        allowAddresses=destinations.allow_addresses,
        denyAddresses=destinations.deny_addresses,
        selfAddresses=proxySelfAddresses(config),
        allowPorts=destinations.allow_ports,
        denyPorts=destinations.deny_ports,
        allowHosts=destinations.allow_hosts,
    )


# The keys a reload applies: the rest of the file needs a restart.
RELOADED_KEYS = frozenset(
    "destinations." + name
    for name in (
        "allow_ranges",
        "deny_ranges",
        "allow_addresses",
        "deny_addresses",
        "allow_ports",
        "deny_ports",
        "allow_hosts",
    )
)


def changedKeys(old: Config, new: Config) -> list[str]:
    """
    The keys whose values differ between C{old} and C{new}, in the order
    of L{proxy_app.config.fields}.
    """
    changed = []
    for field in configModule.fields():
        if field.section is None:
            before, after = getattr(old, field.name), getattr(new, field.name)
        else:
            before = getattr(getattr(old, field.section), field.name)
            after = getattr(getattr(new, field.section), field.name)
        if before != after:
            changed.append(field.key)
    return changed


@attr.s(frozen=True, auto_attribs=True)
class ConfigSource:
    """
    Where a configuration came from, so that a reload reads it again the
    same way: the flags (keyed as L{proxy_app.config.load} takes them), the
    environment and the file.
    """

    flags: Mapping[str, Any]
    environ: Mapping[str, str]
    path: str | None = None

    @property
    def file(self) -> str | None:
        """
        The file L{load} reads: C{path}, else C{EGRESSPROXY_CONFIG}'s.
        """
        return self.path or self.environ.get(configModule.ENV_PREFIX + "CONFIG") or None

    def load(self) -> Config:
        """
        The configuration as it reads now.

        @raise ConfigError: naming the key and value.
        """
        return configModule.load(self.flags, self.environ, self.path)


class DestinationRules:
    """
    The reloadable part (see L{Reloader.add}) that re-reads the
    configuration and gives the destination resolver a new
    L{AddressPolicy} built from its C{destinations} rules: the address
    ranges and addresses, the ports and C{allow_hosts}.  The proxy's own
    addresses stay those it was started with.  Other changed keys are not
    applied; they are logged as needing a restart.
    """

    def __init__(self, started: Config, source: ConfigSource, resolver: Any) -> None:
        """
        @param started: the configuration the proxy was built from.
        @param source: where it came from, read again on each reload.
        @param resolver: the L{SafeResolver} or L{CachingResolver} whose
            C{replacePolicy} takes the new policy.
        """
        self._started = started
        self._source = source
        self._resolver = resolver

    def files(self) -> list[str]:
        """
        The configuration file, if there is one, for the watcher.
        """
        path = self._source.file
        return [path] if path else []

    def reload(self) -> None:
        """
        Read the configuration and replace the policy, or change nothing.

        @raise ValueError: the configuration did not load or its
            destination rules are invalid (L{ConfigError}'s message, which
            names the key and value).
        """
        started = self._started
        try:
            new = self._source.load()
            checkDestinations(new.destinations)
            # The listeners are the started ones: so are the addresses the
            # proxy refuses as itself.
            policy = buildPolicy(attr.evolve(started, destinations=new.destinations))
        except ConfigError as e:
            raise ValueError(str(e)) from None
        except ValueError as e:
            raise ValueError(f"destinations: {e}") from None
        self._resolver.replacePolicy(policy)
        restart = [key for key in changedKeys(started, new) if key not in RELOADED_KEYS]
        if restart:
            log.warn(
                "Changed in the configuration but not applied until a restart: {keys}",
                keys=", ".join(restart),
            )


class ProxyService(Service):
    """
    Owns the L{ProxyFactory}: on stop it drains, letting in-flight requests
    and tunnels finish for up to the drain timeout, then cuts what is left.

    @ivar installSignals: whether to act for the process while running:
        handle SIGUSR1 and SIGHUP (each chained to the handler it found, see
        L{chainSignal}, and given back once stopped) and freeze what is
        loaded out of the cyclic collector's way.  Set only when C{clock} is
        the global reactor, as under twistd.
    """

    installSignals = False

    def __init__(
        self, factory: ProxyFactory, clock: Any, reloader: Reloader | None = None
    ) -> None:
        self.factory = factory
        self.clock = clock
        self.reloader = reloader
        self._previousHandlers: list[tuple[int, Any, Any]] = []

    def startService(self) -> None:
        super().startService()
        if self.installSignals:
            # What is loaded by now (Twisted, the configuration, the
            # tables) lives as long as the process: keep it out of the
            # cyclic collector's way, so that its full collections, and the
            # pauses they make, cover only what requests allocate.
            gc.freeze()
            # The work runs in the reactor, not in the signal handler; the
            # clock is the global reactor whenever installSignals is set.
            call = self.clock.callFromThread
            # logrotate's postrotate sends SIGUSR1.  twistd has a handler
            # for it already, which rotates its --logfile: that one keeps
            # running, after ours.
            self._previousHandlers = [
                chainSignal(signal.SIGUSR1, lambda: call(self.reopenLogs)),
                chainSignal(signal.SIGHUP, lambda: call(self.reload)),
            ]

    def reload(self) -> bool:
        """
        What SIGHUP does: reload the ACL and password files, the TLS
        material and the destination rules (L{Reloader}); without a
        reloader, the ACL and password files only.

        @return: whether everything reloaded.
        """
        if self.reloader is not None:
            return self.reloader.reload()
        return self.factory.access.reload()

    def reopenLogs(self) -> None:
        self.factory.accessLog.reopen()
        self.factory.decisionLog.reopen()

    def stopService(self) -> Deferred:
        super().stopService()
        factory = self.factory
        drained = factory.drain()
        if drained.called:
            return drained.addBoth(self._stopLogs)
        log.info(
            "Draining {count} connection(s) for up to {seconds:g} s",
            count=len(factory.connections),
            seconds=factory.config.timeouts.drain,
        )

        def cut() -> None:
            log.info(
                "Drain time is up: cutting {count} connection(s)",
                count=len(factory.connections),
            )
            for connection in list(factory.connections):
                connection.abort()

        deadline = self.clock.callLater(factory.config.timeouts.drain, cut)

        def done(result: object) -> object:
            if deadline.active():
                deadline.cancel()
            return result

        return drained.addBoth(done).addBoth(self._stopLogs)

    def _stopLogs(self, result: object) -> object:
        self.factory.accessLog.stop()
        self.factory.decisionLog.stop()
        # The logs are closed: give the signals back to whoever had them,
        # so that a service started again later chains once, not twice.
        # (A handler installed after ours stays.)
        for signum, previous, ours in self._previousHandlers:
            if signal.getsignal(signum) is ours and previous is not None:
                signal.signal(signum, previous)
        self._previousHandlers = []
        return result


def chainSignal(signum: int, handler: Callable[[], object]) -> tuple[int, Any, Any]:
    """
    Run C{handler} when signal C{signum} arrives, then the Python handler
    that was there before, if any: installing ours must not silence
    someone else's (twistd rotates its C{--logfile} on SIGUSR1).

    @return: C{(signum, previous, installed)}: the handler that was there
        before (as L{signal.getsignal} gives it) and the one installed now,
        so that the caller can put the previous one back.
    """

    def chained(number: int, frame: Any) -> None:
        handler()
        if callable(previous):
            previous(number, frame)

    previous = signal.signal(signum, chained)
    return signum, previous, chained


# Endpoint kinds whose parsers take backlog=, with how many positional
# arguments a description may have before one of them would be the backlog.
_BACKLOG_KINDS = {"tcp": 2, "tcp6": 2, "ssl": 2, "unix": 2}


def withBacklog(description: str, backlog: int) -> str:
    """
    C{description} with C{backlog=} added, for the endpoint kinds that take
    one and unless it gives one itself; other kinds (C{systemd:}, whose
    socket listens already) are left as they are.
    """
    positional, keywords = splitDescription(description)
    most = _BACKLOG_KINDS.get(positional[0].lower())
    if most is None or "backlog" in keywords or len(positional) > most:
        return description
    return f"{description}:backlog={backlog}"


class _Listener(Service):
    """
    One listening endpoint.  Binding happens in C{privilegedStartService},
    and a failure to bind raises L{ConfigError} naming the endpoint (which
    the command line prints as its one line; see L{makeService}).

    @ivar backlog: the listen backlog, or L{None} for the endpoint's own
        default (the metrics listener).
    """

    def __init__(
        self,
        listener: str | TLSListener,
        factory: Any,
        reactor: Any,
        shared: bool = False,
        backlog: int | None = None,
        tls: ListenerTLS | None = None,
    ) -> None:
        self.factory = factory
        self.port: Any = None
        self.listener = listener
        self.reactor = reactor
        self.shared = shared
        self.backlog = backlog
        self.contextFactory: Any = None
        if isinstance(listener, TLSListener):
            self.description = listener.description
            try:
                self.contextFactory = tls if tls is not None else ListenerTLS(listener)
            except TLSConfigError as e:
                # validate() read these files already; this is for one
                # that changed since.
                raise ConfigError(f"listen = {listener.description!r}: {e}") from None
            self.endpoint: Any = SSL4ServerEndpoint(
                reactor,
                listener.port,
                self.contextFactory,
                interface=listener.interface,
                **({} if backlog is None else {"backlog": backlog}),
            )
        else:
            self.description = listener
            self.endpoint = serverFromString(
                reactor,
                listener if backlog is None else withBacklog(listener, backlog),
            )

    def _listen(self) -> Deferred:
        if not self.shared:
            return self.endpoint.listen(self.factory)
        # With --workers, every worker listens on the same port.
        from twisted.internet.defer import maybeDeferred

        return maybeDeferred(
            sharedListen,
            self.reactor,
            self.listener,
            self.factory,
            self.contextFactory,
            50 if self.backlog is None else self.backlog,
        )

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        results: list[Any] = []
        self._listen().addBoth(results.append)
        if not results or isinstance(results[0], Failure):
            error = results[0].value if results else "the endpoint did not bind at once"
            reason = getattr(error, "socketError", None) or error
            raise ConfigError(f"listen = {self.description!r}: cannot listen: {reason}")
        # Its connections send a read event's writes at the event's end.
        self.port = leanPort(results[0])

    def stopService(self) -> Deferred | None:
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """
    Build the proxy from parsed L{Options}: what C{twistd egressproxy}
    runs, and the way to mount the proxy in an application that wants the
    command line's behaviour.

    As on the command line, a configuration mistake stops the process: one
    found now, or one found when the returned service binds its listeners
    (in C{privilegedStartService}), is written as one line to standard
    error (which twistd sends to its log once logging has begun), naming
    the key and the value, and raises C{SystemExit(1)}.  To
    handle mistakes instead, use L{buildProxy}, which raises L{ConfigError}.

    On the global reactor, as under twistd, the proxy also acts for the
    process: it raises the open-file limit, tunes the allocator, and
    handles SIGHUP (reload the ACL, credentials, TLS material and the
    destination rules of the configuration) and
    SIGUSR1 (reopen the logs, then whatever handled SIGUSR1 before).

    With C{--workers} above 1 and no C{--worker-index}, the service runs
    the worker processes instead, each a C{twistd egressproxy} of its own,
    and serves the metrics endpoint for all of them.

    With C{log_format} C{json}, when C{options} are twistd's subcommand's
    (they have a C{parent}), the returned service, once given twistd's
    application as its parent, sets the application's log observer (see
    L{jsonProcessLog}), which twistd then logs to.

    @param options: parsed, hence validated, options.
    @param reactor: the reactor to use; the global one by default.
    """
    if reactor is None:
        from twisted.internet import reactor
    config = options.config
    workerIndex = options.get("worker-index")
    top = _CommandLineService()
    twistdOptions = getattr(options, "parent", None)
    if config.log_format == "json" and twistdOptions is not None:
        # Only twistd's own options say where its log goes; an application
        # mounting the proxy (a .tac) chooses its log observer itself.
        top.logOptions = twistdOptions
    elif twistdOptions is not None and ownsTextProcessLog(twistdOptions):
        top.logOptions = twistdOptions
        top.processLog = TextProcessLog()
    if config.workers > 1 and workerIndex is None:
        supervisor = WorkerSupervisor(
            reactor,
            config.workers,
            options.argv,
            collectMetrics=config.metrics is not None,
        )
        if config.metrics is not None:
            # Added first, so stopped last: /healthcheck says 503 while the
            # workers drain.
            registry = instanceRegistry(
                lambda: supervisor.metricsDirectory, supervisor.processes
            )
            _Listener(
                config.metrics,
                _metricsSite(
                    MetricsResource(
                        registry, supervisor.healthy, supervisor.unhealthyReason
                    ),
                    reactor,
                ),
                reactor,
            ).setServiceParent(top)
        supervisor.setServiceParent(top)
        return top
    try:
        return _build(
            top,
            config,
            reactor,
            workerIndex,
            reactor is _globalReactor(),
            options.get("worker-status-fd"),
            getattr(options, "source", None),
        )
    except ConfigError as e:
        _exit(e, 1)


def buildProxy(
    config: Config, reactor: Any, source: ConfigSource | None = None
) -> MultiService:
    """
    Build the proxy for C{config} on C{reactor}, for an application that
    mounts it and handles configuration mistakes itself.

    Nothing here prints or exits, and nothing acts for the process: no
    signal handlers, file limit or allocator tuning (L{makeService} does
    those under twistd).  To reopen the logs or reload as SIGHUP does, call
    L{ProxyService.reopenLogs} or L{ProxyService.reload} on the
    L{ProxyService} among the returned service's children.

    @param config: the configuration, as L{proxy_app.config.load} gives it;
        checked here with L{validate}.
    @param reactor: the reactor every part of the proxy uses.
    @param source: where C{config} came from; with it, a reload also reads
        it again and applies its destination rules (L{DestinationRules}).
    @return: a service whose children stop one after another: the
        listeners stop accepting, the proxy drains, the metrics listener
        goes last.  Its C{privilegedStartService} binds the listeners and
        raises L{ConfigError} naming the endpoint if one cannot bind.
    @raise ConfigError: one line naming the key and the value at fault.
    """
    if config.workers > 1:
        raise ConfigError(
            f"workers = {config.workers}: one process is built here; "
            "run twistd egressproxy for more than one worker"
        )
    validate(config)
    return _build(_SequentialService(), config, reactor, None, False, source=source)


def _exit(error: ConfigError | usage.UsageError, status: int) -> NoReturn:
    """
    End the command line with C{error}'s one line, and no traceback.
    """
    sys.stderr.write(f"egressproxy: {error}\n")
    raise SystemExit(status) from None


def _build(
    top: MultiService,
    config: Config,
    reactor: Any,
    workerIndex: int | None,
    processWide: bool,
    statusFD: int | None = None,
    source: ConfigSource | None = None,
) -> MultiService:
    """
    Build the proxy's services into C{top}; L{buildProxy} and
    L{makeService} differ only in what they pass.

    @param workerIndex: which worker of C{--workers} this process is, or
        L{None} for the only one.  A worker serves no metrics endpoint: its
        supervisor does, from the files the worker's metrics are kept in.
    @param processWide: whether to act for the process (signals, file
        limit, allocator), as under twistd.
    @param statusFD: where a worker tells its supervisor that it listens
        and that it drains (L{WorkerStatus}), or L{None}.
    @param source: where C{config} came from, for reloading the destination
        rules, or L{None} not to reload them.
    @raise ConfigError: naming the key and the value at fault.
    """
    started = config
    if workerIndex is not None:
        # The configured limits are the proxy's: each worker enforces its
        # share of them.
        config = attr.evolve(
            config, limits=workerLimits(config.limits, config.workers, workerIndex)
        )
        log.info(
            "Worker {index} of {count}: its share of the limits is {rate:g} requests/s "
            "per "
            "role (burst {burst}), {requests} concurrent requests, {tunnels} tunnels "
            "(0: no limit)",
            index=workerIndex,
            count=config.workers,
            rate=config.limits.max_request_rate,
            burst=config.limits.request_burst,
            requests=config.limits.max_concurrent_requests,
            tunnels=config.limits.max_concurrent_tunnels,
        )
    destinations = config.destinations
    resolver: Any = SafeResolver(
        buildPolicy(config),
        makeNameResolver(
            destinations.nameservers, reactor, timeout=config.timeouts.dns
        ),
        reactor,
        timeout=config.timeouts.dns,
    )
    if destinations.dns_cache_ttl:
        resolver = CachingResolver(resolver, reactor, destinations.dns_cache_ttl)
    try:
        origination = buildOrigination(config.tls, hasRoles(config))
    except TLSConfigError as e:
        raise ConfigError(f"tls: {e}") from None
    connector = Connector(
        reactor,
        config.timeouts.connect,
        destinations.bind_addresses,
        maxAttempts=config.limits.max_connect_attempts,
        parent=buildParent(config.upstream, origination),
    )
    try:
        accessLog = AccessLog.open(config.access_log.file, config.access_log.format)
    except OSError as e:
        raise ConfigError(
            f"access_log.file = {config.access_log.file!r}: cannot open it: "
            f"{e.strerror}"
        ) from None
    try:
        access = AccessControl.fromConfig(config.acl, config.auth, reactor)
    except ACLError as e:
        raise ConfigError(f"acl.file: {e}") from None
    except ValueError as e:
        raise ConfigError(f"auth.checkers: {e}") from None
    checkInterception(config, access.acl is not None and access.acl.intercepts)
    interception = buildInterception(config, reactor)
    access.intercepting = interception is not None
    if config.acl.role_header:
        log.warn(
            "Trusting the role named in the {header} header: only safe behind a "
            "trusted sidecar that sets it",
            header=config.acl.role_header,
        )
    try:
        decisionLog = (
            DecisionLog.open(config.access_log.decision_log, config.access_log.format)
            if config.access_log.decision_log
            else DecisionLog.toProcessLog(getattr(top, "processLog", None))
        )
    except OSError as e:
        raise ConfigError(
            f"access_log.decision_log = {config.access_log.decision_log!r}: "
            f"cannot open it: {e.strerror}"
        ) from None
    # Only a worker whose supervisor serves metrics has multiprocess values.
    multiprocess = workerIndex is not None and multiprocessValues()
    # With --metrics none nothing reads what requests and connections move
    # (neither a listener here nor a supervisor's): they are not counted.
    metrics = Metrics(multiprocess=multiprocess, counting=config.metrics is not None)
    webhook = buildWebhook(config, reactor)
    if webhook is not None:
        metrics.watchWebhook(webhook)
    factory = ProxyFactory(
        config,
        resolver,
        reactor,
        connector,
        accessLog,
        origination,
        metrics,
        webhook,
        access,
        decisionLog,
        interception,
    )

    # Children stop one at a time, last added first: the proxy listeners
    # stop accepting, then the proxy drains, and the metrics listener goes
    # last so that /healthcheck can say 503 throughout the drain.
    if config.metrics is not None and workerIndex is None:
        site = _metricsSite(
            MetricsResource(metrics.registry, lambda: not factory.draining), reactor
        )
        _Listener(config.metrics, site, reactor).setServiceParent(top)
    if multiprocess:
        # Stops last, after the webhook: its final counts are copied too.
        _MirrorService(metrics, reactor).setServiceParent(top)
    if webhook is not None:
        # Stops after the drain, so the last connection-stop events go out.
        webhook.setServiceParent(top)
    # One write per second of lines rather than one per request.
    accessLog.batchWrites(reactor)
    decisionLog.batchWrites(reactor)
    reloader = Reloader(access, metrics)
    listenerTLS: dict[TLSListener, ListenerTLS] = {}
    for listener in config.listen:
        if isinstance(listener, TLSListener) and listener not in listenerTLS:
            try:
                tls = listenerTLS[listener] = ListenerTLS(listener)
            except TLSConfigError as e:
                # validate() read these files already; this is for one
                # that changed since.
                raise ConfigError(f"listen = {listener.description!r}: {e}") from None
            reloader.add(
                "listener",
                f"TLS listener {listener.description}",
                tls.files,
                tls.reload,
            )
    if originationFiles(config.tls):
        rolesInUse = hasRoles(config)

        def reloadOrigination() -> None:
            assert origination is not None
            origination.replace(buildOrigination(config.tls, rolesInUse))

        reloader.add(
            "origination",
            "TLS origination (trust root and client certificates)",
            lambda: originationFiles(config.tls),
            reloadOrigination,
        )
    if source is not None:
        rules = DestinationRules(started, source, resolver)
        reloader.add("destinations", "Destination rules", rules.files, rules.reload)
    if config.acl.watch_interval and reloader.files():
        FileWatcher(
            reloader.files(), reloader.reload, reactor, config.acl.watch_interval
        ).setServiceParent(top)
    if access.passwordChecks is not None:
        # Starts before the listeners, and stops only once the drain is
        # over, so that requests in flight can still have passwords checked.
        access.passwordChecks.setServiceParent(top)
    service = ProxyService(factory, reactor, reloader)
    service.installSignals = processWide
    if processWide:
        raiseFileLimit()
        tuneAllocator()
        leanEventPath()
    service.setServiceParent(top)
    for listener in config.listen:
        name = listener.description if isinstance(listener, TLSListener) else listener
        _Listener(
            listener,
            factory.forListener(
                name,
                CertificateRole(listener.roleFrom, listener.roleFromPrefix)
                if isinstance(listener, TLSListener)
                else None,
            ),
            reactor,
            shared=workerIndex is not None,
            backlog=config.listen_backlog,
            tls=listenerTLS.get(listener)
            if isinstance(listener, TLSListener)
            else None,
        ).setServiceParent(top)
    if statusFD is not None:
        # Last: starts once everything listens, stops first.
        WorkerStatus(statusFD).setServiceParent(top)
    return top


def _metricsSite(resource: MetricsResource, reactor: Any) -> Site:
    site = Site(resource, reactor=reactor)
    site.noisy = False
    # Scrapes every few seconds would flood the process log.
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


class _MirrorService(Service):
    """
    In a worker of C{--workers}, copies the metrics read at scrape time into
    the multiprocess files every second (L{Metrics.syncMirror}), and once
    more when it stops.
    """

    interval = 1.0

    def __init__(self, metrics: Metrics, clock: Any) -> None:
        self.metrics = metrics
        self.clock = clock
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.metrics.syncMirror)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.metrics.syncMirror()


def buildWebhook(config: Config, reactor: Any) -> WebhookService | None:
    """
    The control webhook service, if a URL is configured and it is enabled.
    It talks to the operator's URL directly: it is not a proxy client, and
    the destination policy does not apply to it.
    """
    settings = config.webhook
    if settings.url is None or not settings.enabled:
        return None
    trustRoot = None
    if config.tls.ca_bundle or config.tls.extra_ca:
        trustRoot = loadTrustRoot(config.tls.ca_bundle, config.tls.extra_ca)
    return WebhookService(
        settings.url,
        clock=reactor,
        reactor=reactor,
        hostid=settings.hostid,
        tlsVerify=settings.tls_verify,
        trustRoot=trustRoot,
        pingInterval=settings.ping_interval,
        timeout=settings.timeout,
        queueSize=settings.queue_size,
        retries=settings.retries,
        events=settings.events or None,
        accessRequest=settings.access_request,
        statistics=settings.statistics,
    )


def raiseFileLimit() -> int:
    """
    Raise the soft limit on open files to the hard limit: every client and
    every upstream connection holds a descriptor.  (When they run out
    anyway, Twisted's listening ports accept and close the connection with
    a reserved descriptor instead of spinning.)

    @return: the soft limit now in force.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warn("Could not raise the open-file limit: {error}", error=e)
    log.info("Open-file limit: {limit}", limit=soft)
    return soft


# glibc's mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tuneAllocator() -> bool:
    """
    Keep glibc's malloc from mapping and unmapping memory for each large
    read.

    A tunnel reads up to 512 KiB at a time into a new bytes object.  Above
    glibc's threshold for it (128 KiB at first, moving with use) each such
    allocation is a fresh C{mmap}, its pages faulted in and zeroed, and an
    C{munmap} when it is freed; below it, heap memory freed at the top is
    given back to the kernel and asked for again.  Measured with 256 KiB
    reads on a tunnel relaying a 256 MiB file: 583-750 MB/s with the
    defaults, 1,190-1,253 MB/s with large reads served from the heap and up
    to 32 MiB of free heap kept.  Other C libraries are left alone.

    @return: whether the allocator was tuned.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    tuned = bool(mallopt(_M_MMAP_THRESHOLD, 4 * 1024 * 1024)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 32 * 1024 * 1024)
    )
    if tuned:
        log.info("Allocator tuned for large reads (glibc mallopt)")
    return tuned


def leanEventPath(legacy: Any = None) -> None:
    """
    Take the legacy log context out of the reactor's per-event path.

    The reactor runs each read and write of every connection under
    C{twisted.python.log.callWithLogger}, which asks the connection for its
    log prefix and pushes it, as the legacy log context's C{system}, around
    the call: eight Python calls per event, 13% of the instructions of a
    keep-alive request and 15% of a tunnel-per-request cycle (callgrind,
    docs/benchmarks.md).  Only the legacy C{log.msg} reads that context;
    egressproxy logs through C{twisted.logger}, whose events never see it.
    The replacement keeps what the context is for: an exception escaping an
    event is logged, labelled with the connection's log prefix, and the
    reactor goes on.

    @param legacy: the module to change, C{twisted.python.log} by default
        (the reactor looks the function up there on every event).
    """
    if legacy is None:
        from twisted.python import log as legacy
    err = legacy.err

    def callWithLogger(logger: Any, func: Any, *args: Any, **kw: Any) -> Any:
        try:
            return func(*args, **kw)
        except KeyboardInterrupt:
            raise
        except BaseException:
            try:
                system = logger.logPrefix()
            except BaseException:
                system = "(buggy logPrefix method)"
            err(system=system)
            return None

    legacy.callWithLogger = callWithLogger


def _globalReactor() -> Any:
    from twisted.internet import reactor

    return reactor


class _SequentialService(MultiService):
    """
    A L{MultiService} whose children stop one after another, in reverse
    order, each waiting for the one before.
    """

    def stopService(self) -> Deferred:
        Service.stopService(self)
        children = list(self)
        children.reverse()
        done: Deferred[Any] = succeed(None)
        for child in children:
            done.addBoth(_stopNext, child)
        return done


def _stopNext(result: object, child: Any) -> Any:
    return child.stopService()


class _CommandLineService(_SequentialService):
    """
    The proxy as the command line runs it (L{makeService}): a listener that
    cannot bind ends start-up with one line, like any other configuration
    mistake, instead of a traceback from twistd.

    @ivar logOptions: twistd's options, when the process log is ours: JSON
        (L{jsonProcessLog}), or text (L{processLog}); else L{None}.
    @ivar processLog: the text process log's observer, installed as the
        application's when twistd makes it the parent; else L{None}.
    """

    logOptions: Mapping[str, Any] | None = None
    processLog: TextProcessLog | None = None

    def setServiceParent(self, parent: Any) -> None:
        # twistd gives a plugin's service its application as the parent,
        # and logs to the application's ILogObserver when it has one (as a
        # .tac file would set it).
        if self.processLog is not None and isinstance(parent, Componentized):
            if parent.getComponent(ILogObserver, None) is None:
                assert self.logOptions is not None
                self.processLog.install(_processLogFile(self.logOptions))
                parent.setComponent(ILogObserver, self.processLog)
        elif self.logOptions is not None and isinstance(parent, Componentized):
            try:
                observer = jsonProcessLog(self.logOptions)
            except ConfigError as e:
                _exit(e, 1)
            parent.setComponent(ILogObserver, observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ConfigError as e:
            _exit(e, 1)

    def startService(self) -> None:
        try:
            super().startService()
        except ConfigError as e:
            _exit(e, 1)


def jsonProcessLog(twistdOptions: Mapping[str, Any]) -> ILogObserver:
    """
    The process log's observer for C{log_format: json}: one JSON object a
    line (L{twisted.logger.eventAsJSON}, with no record separator, so that
    each line parses on its own), written where twistd would write
    its text: standard output with C{-n} and no C{--logfile} (or
    C{--logfile -}), else the C{--logfile} (C{twistd.log} by default),
    which SIGUSR1 rotates as twistd's own does.

    @param twistdOptions: twistd's parsed options.
    @raise ConfigError: with C{--syslog} or C{--logger}, which choose the
        process log themselves.
    """
    for option in ("syslog", "logger"):
        if twistdOptions.get(option):
            raise ConfigError(
                f"log_format = 'json': twistd's --{option} chooses the process "
                "log's format itself; drop one of them"
            )
    return jsonFileLogObserver(_processLogFile(twistdOptions), recordSeparator="")


def ownsTextProcessLog(twistdOptions: Mapping[str, Any]) -> bool:
    """
    Whether the proxy writes the text process log itself
    (L{TextProcessLog}, in the file twistd would choose: see
    L{_processLogFile}), so that the decision log can write its lines to
    it cheaply: not where twistd chooses otherwise (C{--syslog},
    C{--logger}, or a daemon told to log to standard output, which twistd
    refuses).
    """
    if twistdOptions.get("syslog") or twistdOptions.get("logger"):
        return False
    return not (
        twistdOptions.get("logfile") == "-" and not twistdOptions.get("nodaemon")
    )


def _processLogFile(twistdOptions: Mapping[str, Any]) -> Any:
    """
    Where twistd writes its log: standard output with C{-n} and no
    C{--logfile} (or C{--logfile -}), else the C{--logfile} (C{twistd.log}
    by default), which SIGUSR1 rotates as twistd's own does.
    """
    path = twistdOptions.get("logfile")
    nodaemon = twistdOptions.get("nodaemon")
    if path == "-" or (nodaemon and not path):
        return sys.stdout
    logFile = LogFile.fromFullPath(path or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: Any) -> None:
            _globalReactor().callFromThread(logFile.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return logFile
