"""
SIGHUP (L{ProxyService.reload}) and the file watcher reload the destination
rules of the configuration file (C{destinations.*}: ranges, addresses,
ports, C{allow_hosts}): atomically, or not at all.

Private addresses appear here only as answers of a fake name resolver, in
memory: nothing is sent to them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.addresses import AddressPolicy
from proxy_app.resolver import (
    CachingResolver,
    DestinationDenied,
    PortDenied,
    VettedDestination,
)
from proxy_app.tap import (
    ConfigSource,
    Options,
    ProxyService,
    buildProxy,
    changedKeys,
    makeService,
)
from proxy_app.watch import FileWatcher

from .helpers import (
    HalfCloseStringTransport,
    PluggableMemoryReactor,
    ScriptedNameResolver,
    parseResponse,
)

_BASE = "listen: [tcp:9090:interface=127.0.0.1]\nmetrics: none\n"


class DestinationReloadTests(SynchronousTestCase):
    """
    A proxy built from a configuration file, in memory, whose destination
    rules are changed in the file and reloaded.
    """

    def setUp(self) -> None:
        self.file = FilePath(self.mktemp())
        self.accessLog = self.mktemp()
        self.write("")
        self.names = ScriptedNameResolver(
            {
                "origin.example": [["93.184.215.14"]],
                "hooks.internal.example": [["10.1.2.3"]],
            }
        )
        self.reactor = PluggableMemoryReactor()
        self.reactor.installNameResolver(self.names)
        source = ConfigSource({}, {}, self.file.path)
        top = buildProxy(source.load(), self.reactor, source)
        [self.proxy] = [c for c in top if isinstance(c, ProxyService)]
        self.top = top

    def write(self, extra: str) -> None:
        # The access log goes to a file: its lines would fill the output.
        log = f"access_log:\n  file: {self.accessLog}\n"
        self.file.setContent((_BASE + log + extra).encode())

    def request(self, host: str) -> tuple[Any, HalfCloseStringTransport]:
        protocol = self.proxy.factory.buildProtocol(
            IPv4Address("TCP", "127.0.0.1", 40000)
        )
        client = HalfCloseStringTransport(
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000)
        )
        protocol.makeConnection(client)
        protocol.dataReceived(
            b"GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n"
            % (host.encode(), host.encode())
        )
        return protocol, client

    def failures(self) -> Any:
        return self.proxy.factory.metrics.registry.get_sample_value(
            "egressproxy_reload_failures_total", {"what": "destinations"}
        )

    def test_denyRangeRefusesCachedName(self) -> None:
        """
        A reload that adds a deny range refuses, on the next request, the
        address of a name whose vetted answer was cached before it: the
        cache is forgotten and the name vetted again by the new rules.
        """
        self.request("origin.example")
        self.assertEqual(self.reactor.tcpClients[-1][0], "93.184.215.14")
        self.request("origin.example")
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(self.names.lookups, ["origin.example"])

        self.write("destinations:\n  deny_ranges: [93.184.215.0/24]\n")
        self.assertTrue(self.proxy.reload())

        _, client = self.request("origin.example")
        status, headers, body = parseResponse(client.value())
        self.assertEqual(status, 403)
        self.assertIn(b"93.184.215.14", body)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_denyPortAndLiteral(self) -> None:
        """
        A reloaded port rule applies to an IP literal already vetted
        under the old rules.
        """
        self.request("93.184.215.14")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.write("destinations:\n  allow_ports: [443]\n")
        self.assertTrue(self.proxy.reload())
        _, client = self.request("93.184.215.14")
        self.assertEqual(parseResponse(client.value())[0], 403)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_allowHostsTakesEffect(self) -> None:
        """
        A name added to C{allow_hosts} by a reload reaches its private
        answer from the next request on.
        """
        _, client = self.request("hooks.internal.example")
        self.assertEqual(parseResponse(client.value())[0], 403)
        self.assertEqual(self.reactor.tcpClients, [])

        self.write("destinations:\n  allow_hosts: [hooks.internal.example]\n")
        self.assertTrue(self.proxy.reload())
        self.request("hooks.internal.example")
        self.assertEqual(self.reactor.tcpClients[-1][0], "10.1.2.3")

    def test_brokenFileKeepsOldRules(self) -> None:
        """
        A file whose destination rules do not load keeps the old rules,
        logs one line naming the key and value, and counts
        C{what="destinations"}; the cached answers stay too.
        """
        self.write("destinations:\n  deny_ranges: [93.184.215.0/24]\n")
        self.assertTrue(self.proxy.reload())
        self.write("destinations:\n  deny_ranges: [93.184.215.0/24, bogus]\n")
        with capturedLogs() as events:
            self.assertFalse(self.proxy.reload())
        errors = [e for e in events if "not reloaded" in e.get("log_format", "")]
        self.assertEqual(len(errors), 1)
        self.assertIn("destinations.deny_ranges", errors[0]["error"])
        self.assertIn("bogus", errors[0]["error"])
        self.assertEqual(self.failures(), 1)
        _, client = self.request("origin.example")
        self.assertEqual(parseResponse(client.value())[0], 403)

    def test_unparseableFileKeepsOldRules(self) -> None:
        """
        A file that is not YAML at all fails the reload the same way.
        """
        self.file.setContent(b"destinations: [\n")
        self.assertFalse(self.proxy.reload())
        self.assertEqual(self.failures(), 1)
        self.request("origin.example")
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_inFlightRequestUnaffected(self) -> None:
        """
        A request whose destination was vetted before the reload keeps it:
        its connection completes and its response reaches the client.
        """
        _, client = self.request("origin.example")
        self.write("destinations:\n  deny_ranges: [93.184.215.0/24]\n")
        self.assertTrue(self.proxy.reload())
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        upstream = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = HalfCloseStringTransport(peerAddress=IPv4Address("TCP", host, port))
        upstream.makeConnection(transport)
        self.assertIn(b"GET / HTTP/1.1", transport.value())
        upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        status, _, body = parseResponse(client.value())
        self.assertEqual((status, body), (200, b"ok"))

    def test_restartKeysLogged(self) -> None:
        """
        Keys that a reload does not apply are named in one warning, and
        the destination rules are applied all the same.
        """
        self.write(
            "timeouts:\n  connect: 3\ndestinations:\n  deny_ranges: [93.184.215.0/24]\n"
        )
        with capturedLogs() as events:
            self.assertTrue(self.proxy.reload())
        warnings = [e for e in events if "restart" in e.get("log_format", "")]
        self.assertEqual([e["keys"] for e in warnings], ["timeouts.connect"])
        _, client = self.request("origin.example")
        self.assertEqual(parseResponse(client.value())[0], 403)

    def test_watcherWatchesConfigFile(self) -> None:
        """
        With C{acl.watch_interval}, the watcher also watches the
        configuration file.
        """
        self.write("acl:\n  watch_interval: 5\n")
        source = ConfigSource({}, {}, self.file.path)
        top = buildProxy(source.load(), PluggableMemoryReactor(), source)
        [watcher] = [c for c in top if isinstance(c, FileWatcher)]
        self.assertEqual(watcher.paths, (self.file.path,))


class CommandLineTests(SynchronousTestCase):
    """
    The command line reloads the destination rules from the flags,
    environment and file it started with.
    """

    def test_flagsKeptOnReload(self) -> None:
        """
        A rule given as a flag stays in force across a reload, which also
        applies the file's new rules; for the same key the flag still wins
        over the file, as at start.
        """
        path = FilePath(self.mktemp())
        path.setContent(b"metrics: none\n")
        options = Options(environ={})
        options.parseOptions(["--config", path.path, "--deny-port", "8080"])
        top = makeService(options, reactor=PluggableMemoryReactor())
        [proxy] = [c for c in top if isinstance(c, ProxyService)]
        resolver = proxy.factory.resolver
        self.assertIsNotNone(resolver.vetNow("93.184.215.14", 443))
        path.setContent(
            b"metrics: none\ndestinations:\n  deny_ports: [8443]\n"
            b"  deny_ranges: [93.184.215.0/24]\n"
        )
        self.assertTrue(proxy.reload())
        self.assertRaises(PortDenied, resolver.vetNow, "198.51.100.1", 8080)
        self.assertIsNotNone(resolver.vetNow("8.8.8.8", 8443))
        self.assertRaises(DestinationDenied, resolver.vetNow, "93.184.215.14", 443)


class ChangedKeysTests(SynchronousTestCase):
    """
    L{changedKeys}.
    """

    def test_changed(self) -> None:
        """
        Only keys whose values differ are named, as C{section.key}.
        """
        a = ConfigSource({}, {}).load()
        b = ConfigSource({"connect-timeout": "3", "deny-range": ["1.2.3.0/24"]}, {})
        self.assertEqual(
            changedKeys(a, b.load()),
            ["timeouts.connect", "destinations.deny_ranges"],
        )


class _PendingResolver:
    """
    A destination resolver whose lookups wait for the test.
    """

    def __init__(self) -> None:
        self.pending: list[Deferred[VettedDestination]] = []
        self.policies: list[AddressPolicy] = []

    def vetNow(self, host: str, port: int) -> None:
        return None

    def vet(self, host: str, port: int) -> Deferred[VettedDestination]:
        d: Deferred[VettedDestination] = Deferred()
        self.pending.append(d)
        return d

    def replacePolicy(self, policy: AddressPolicy) -> None:
        self.policies.append(policy)


class CachingResolverReplaceTests(SynchronousTestCase):
    """
    L{CachingResolver.replacePolicy}.
    """

    def test_lookupUnderWayNotCached(self) -> None:
        """
        A lookup that started before the policy was replaced answers its
        own request but is not cached: it was vetted by the old policy.
        """
        inner = _PendingResolver()
        cache = CachingResolver(inner, MemoryReactorClock(), maxTTL=30)
        d = cache.vet("origin.example", 80)
        policy = AddressPolicy()
        cache.replacePolicy(policy)
        self.assertEqual(inner.policies, [policy])
        answer = VettedDestination("origin.example", 80, ("93.184.215.14",))
        inner.pending[0].callback(answer)
        self.assertIs(self.successResultOf(d), answer)
        self.assertIsNone(cache.vetNow("origin.example", 80))
