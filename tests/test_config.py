"""
Tests for L{proxy_app.config} and the command line of L{proxy_app.tap}.
"""

from __future__ import annotations

import io
import os
import sys

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from proxy_app import config
from proxy_app.config import Config, ConfigError
from proxy_app.tap import Options, buildPolicy, selfAddresses


class LoadTests(SynchronousTestCase):
    """
    Merging flags, environment, file and defaults.
    """

    def writeConfig(self, text: str) -> str:
        path = FilePath(self.mktemp())
        path.setContent(text.encode("utf-8"))
        return path.path

    def test_defaults(self) -> None:
        """
        With nothing given, the defaults are webhook-sentry's.
        """
        loaded = config.load({}, {})
        self.assertEqual(loaded, Config())
        self.assertEqual(loaded.listen, ("tcp:9090:interface=127.0.0.1",))
        self.assertEqual(
            (
                loaded.timeouts.connect,
                loaded.timeouts.read,
                loaded.timeouts.lifetime,
                loaded.timeouts.dns,
                loaded.timeouts.request_header,
            ),
            (10.0, 10.0, 60.0, 5.0, 10.0),
        )
        self.assertEqual(loaded.limits.max_response_body, 1048576)
        self.assertEqual(loaded.limits.max_request_header, 65536)
        self.assertEqual(
            (loaded.access_log.file, loaded.access_log.format), ("-", "text")
        )

    def test_precedence(self) -> None:
        """
        A flag beats the environment, which beats the file, which beats the
        default.
        """
        path = self.writeConfig("timeouts:\n  connect: 1\n  read: 2\n  lifetime: 3\n")
        loaded = config.load(
            {"connect-timeout": "7"},
            {"EGRESSPROXY_CONNECT_TIMEOUT": "8", "EGRESSPROXY_READ_TIMEOUT": "9"},
            path,
        )
        self.assertEqual(
            (
                loaded.timeouts.connect,
                loaded.timeouts.read,
                loaded.timeouts.lifetime,
                loaded.timeouts.dns,
            ),
            (7.0, 9.0, 3.0, 5.0),
        )

    def test_configFromEnvironment(self) -> None:
        """
        EGRESSPROXY_CONFIG names the file when --config is not given.
        """
        path = self.writeConfig("limits:\n  max_response_body: 2MiB\n")
        loaded = config.load({}, {"EGRESSPROXY_CONFIG": path})
        self.assertEqual(loaded.limits.max_response_body, 2 * 1024 * 1024)

    def test_repeatable(self) -> None:
        """
        A repeatable option is a list in YAML, a comma-separated list in the
        environment, and many flags on the command line.
        """
        path = self.writeConfig("listen:\n  - tcp:1\n  - tcp:2\n")
        self.assertEqual(config.load({}, {}, path).listen, ("tcp:1", "tcp:2"))
        self.assertEqual(
            config.load({}, {"EGRESSPROXY_LISTEN": "tcp:3, tcp:4"}).listen,
            ("tcp:3", "tcp:4"),
        )
        self.assertEqual(
            config.load({"listen": ["tcp:5"]}, {}, path).listen, ("tcp:5",)
        )

    def test_shorthand(self) -> None:
        """
        acl, auth and webhook may be written as their main value alone, as
        Smokescreen users write their ACL path.
        """
        path = self.writeConfig(
            "acl: /etc/egressproxy/acl.yaml\nauth: [memory:a:b]\n"
            "webhook: http://127.0.0.1:5000/webhook/x\n"
        )
        loaded = config.load({}, {}, path)
        self.assertEqual(loaded.acl.file, "/etc/egressproxy/acl.yaml")
        self.assertEqual(loaded.auth.checkers, ("memory:a:b",))
        self.assertEqual(loaded.webhook.url, "http://127.0.0.1:5000/webhook/x")

    def test_units(self) -> None:
        """
        Durations take webhook-sentry's units and sizes take binary and
        decimal units.
        """
        self.assertEqual(config.parseSeconds("500ms"), 0.5)
        self.assertEqual(config.parseSeconds("1m"), 60.0)
        self.assertEqual(config.parseSeconds(2), 2.0)
        self.assertEqual(config.parseSize("64KiB"), 65536)
        self.assertEqual(config.parseSize("1MB"), 1000000)
        self.assertRaises(ValueError, config.parseSeconds, "0")
        self.assertRaises(ValueError, config.parseSeconds, True)
        self.assertRaises(ValueError, config.parseSize, "-1")

    def test_workers(self) -> None:
        """
        C{--workers} is a whole number, one or more, or C{auto} for one per
        CPU; anything else is refused.
        """
        self.assertEqual(config.parseWorkers("auto"), max(1, os.cpu_count() or 1))
        self.assertEqual(config.parseWorkers(" Auto "), config.parseWorkers("auto"))
        self.assertEqual(config.parseWorkers("3"), 3)
        self.assertEqual(config.parseWorkers(2), 2)
        for bad in ("0", "-1", "many", True):
            self.assertRaises(ValueError, config.parseWorkers, bad)

    def test_badValueNamesSource(self) -> None:
        """
        A bad value's error names where it came from, the value and what was
        expected.
        """
        path = self.writeConfig("timeouts:\n  connect: soon\n")
        cases = [
            (
                {"connect-timeout": "abc"},
                {},
                None,
                "--connect-timeout = 'abc': expected a duration",
            ),
            (
                {},
                {"EGRESSPROXY_CONNECT_TIMEOUT": "abc"},
                None,
                "EGRESSPROXY_CONNECT_TIMEOUT = 'abc'",
            ),
            ({}, {}, path, f"timeouts.connect in {path} = 'soon'"),
            ({"access-log-format": "xml"}, {}, None, "expected one of text, json"),
        ]
        for flags, environ, configPath, expected in cases:
            with self.assertRaises(ConfigError) as raised:
                config.load(flags, environ, configPath)
            self.assertIn(expected, str(raised.exception))
            self.assertNotIn("\n", str(raised.exception))

    def test_unknownKeys(self) -> None:
        """
        Unknown keys, at the top or in a section, are errors naming them.
        """
        for text, expected in [
            ("timeout:\n  connect: 1\n", "timeout in"),
            ("timeouts:\n  conect: 1\n", "timeouts.conect in"),
        ]:
            with self.assertRaises(ConfigError) as raised:
                config.load({}, {}, self.writeConfig(text))
            self.assertIn(expected, str(raised.exception))
            self.assertIn("unknown key", str(raised.exception))

    def test_badFiles(self) -> None:
        """
        A missing file, invalid YAML, or a file that is not a mapping are
        errors naming the file.
        """
        for path, expected in [
            ("/nonexistent/egressproxy.yaml", "cannot read it"),
            (self.writeConfig("a: [1, 2\n"), "not valid YAML"),
            (self.writeConfig("- 1\n"), "expected a mapping"),
        ]:
            with self.assertRaises(ConfigError) as raised:
                config.load({}, {}, path)
            self.assertIn(expected, str(raised.exception))

    def test_everyFieldDocumented(self) -> None:
        """
        Every key, flag and environment variable appears in
        docs/configuration.md, and every key in etc/egressproxy.yaml.
        """
        root = FilePath(__file__).parent().parent()
        doc = root.descendant(["docs", "configuration.md"]).getContent().decode("utf-8")
        sample = (
            root.descendant(["etc", "egressproxy.yaml"]).getContent().decode("utf-8")
        )
        self.assertIn(config.referenceTable(), doc)
        for field in config.fields():
            self.assertIn(f"`{field.setting.envvar}`", doc)
            self.assertIn(f"{field.name}:", sample)

    def test_sampleConfigLoads(self) -> None:
        """
        The sample configuration loads without error.
        """
        root = FilePath(__file__).parent().parent()
        config.load({}, {}, root.descendant(["etc", "egressproxy.yaml"]).path)


class OptionsTests(SynchronousTestCase):
    """
    The twistd command line.
    """

    def parse(self, argv: list[str], environ: dict[str, str] | None = None) -> Options:
        options = Options(environ=environ or {})
        options.parseOptions(argv)
        return options

    def test_flags(self) -> None:
        """
        Flags, repeatable ones included, end up in the merged configuration.
        """
        options = self.parse(
            [
                "--listen",
                "tcp:9091:interface=127.0.0.1",
                "--listen",
                "tcp6:9091:interface=\\:\\:1",
                "--max-response-body",
                "10",
                "--allow-range",
                "127.0.0.2/32",
            ]
        )
        self.assertEqual(
            options.config.listen,
            ("tcp:9091:interface=127.0.0.1", "tcp6:9091:interface=\\:\\:1"),
        )
        self.assertEqual(options.config.limits.max_response_body, 10)
        self.assertEqual(options.config.destinations.allow_ranges, ("127.0.0.2/32",))

    def test_ports(self) -> None:
        """
        C{--allow-port} and C{--deny-port} take ports and ranges,
        comma-separated or repeated, as do their environment variables and
        YAML keys; the proxy's address policy applies them.
        """
        options = self.parse(
            ["--allow-port", "80,443", "--allow-port", "8000-8100"],
            {"EGRESSPROXY_DENY_PORT": "8080, 8081"},
        )
        destinations = options.config.destinations
        self.assertEqual(destinations.allow_ports, ("80", "443", "8000-8100"))
        self.assertEqual(destinations.deny_ports, ("8080", "8081"))
        policy = buildPolicy(options.config)
        self.assertEqual(
            [p for p in (22, 80, 443, 8000, 8080, 8100) if policy.portAllowed(None, p)],
            [80, 443, 8000, 8100],
        )
        path = FilePath(self.mktemp())
        path.setContent(b"destinations:\n  allow_ports: [80, 443, ' 8000-8100']\n")
        loaded = config.load({}, {}, path.path)
        self.assertEqual(loaded.destinations.allow_ports, ("80", "443", "8000-8100"))
        self.assertFalse(buildPolicy(Config()).limitsPorts)

    def test_badPort(self) -> None:
        """
        A port rule that is not a port or a range of them stops start-up
        with one line naming the flag and the value.
        """
        for argv in (["--allow-port", "80,https"], ["--deny-port", "0-80"]):
            self.assertOneLineExit(argv, f"{argv[0]} = {[argv[1]]!r}")
            self.assertOneLineExit(argv, "expected a port (1-65535)")

    def test_allowHosts(self) -> None:
        """
        C{--allow-host} takes names and globs, each with an optional port,
        normalized as request targets are; the proxy's address policy
        applies them.  An IP address or a malformed name stops start-up
        with one line.
        """
        options = self.parse(
            ["--allow-host", "Hooks.Internal.Example.,*.svc.example:8443"],
            {"EGRESSPROXY_ALLOW_HOST": "ignored.example"},
        )
        self.assertEqual(
            options.config.destinations.allow_hosts,
            ("hooks.internal.example", "*.svc.example:8443"),
        )
        policy = buildPolicy(options.config)
        self.assertTrue(policy.hostAllowed("hooks.internal.example", 80))
        self.assertTrue(policy.hostAllowed("a.svc.example", 8443))
        self.assertFalse(policy.hostAllowed("a.svc.example", 443))
        self.assertFalse(buildPolicy(Config()).allowsHosts)
        path = FilePath(self.mktemp())
        path.setContent("destinations:\n  allow_hosts: [bücher.example]\n".encode())
        self.assertEqual(
            config.load({}, {}, path.path).destinations.allow_hosts,
            ("xn--bcher-kva.example",),
        )
        self.assertOneLineExit(["--allow-host", "10.0.0.1"], "is an IP address")
        self.assertOneLineExit(["--allow-host", "a..b"], "expected a host name")

    def test_badBindAddress(self) -> None:
        """
        A bind address this machine does not have stops start-up with one
        line.
        """
        self.assertOneLineExit(["--bind-address", "192.0.2.77"], "cannot bind")

    def test_switch(self) -> None:
        """
        --allow-missing-role is a switch (Smokescreen has only the YAML
        key); the environment still takes true or false.
        """
        self.assertTrue(
            self.parse(["--allow-missing-role"]).config.acl.allow_missing_role
        )
        self.assertFalse(self.parse([]).config.acl.allow_missing_role)
        self.assertTrue(
            self.parse(
                [], {"EGRESSPROXY_ALLOW_MISSING_ROLE": "true"}
            ).config.acl.allow_missing_role
        )

    def assertOneLineExit(self, argv: list[str], expected: str) -> None:
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as raised:
            self.parse(argv)
        self.assertNotEqual(raised.exception.code, 0)
        output = stderr.getvalue()
        self.assertEqual(output.count("\n"), 1, output)
        self.assertTrue(output.startswith("egressproxy: "), output)
        self.assertIn(expected, output)

    def test_badValueOneLine(self) -> None:
        """
        A bad flag value stops with one line naming flag and value, and a
        non-zero status.
        """
        self.assertOneLineExit(["--read-timeout", "never"], "--read-timeout = 'never'")

    def test_unknownFlagOneLine(self) -> None:
        """
        An unknown flag stops with one line naming it.
        """
        self.assertOneLineExit(["--conect-timeout", "1"], "--conect-timeout")

    def test_badEndpointOneLine(self) -> None:
        """
        An endpoint description Twisted cannot parse stops with one line.
        """
        self.assertOneLineExit(["--listen", "tcp:abc"], "listen = 'tcp:abc'")

    def test_badRangeOneLine(self) -> None:
        """
        An invalid CIDR range stops with one line naming the key.
        """
        self.assertOneLineExit(
            ["--deny-range", "10.0.0.0/33"], "destinations.deny_ranges"
        )

    def test_workersNeedSharableListeners(self) -> None:
        """
        With --workers, a listener that cannot be shared stops start-up
        with one line.
        """
        self.assertOneLineExit(
            ["--workers", "2", "--listen", "unix:/tmp/egressproxy.sock"],
            "shared between --workers",
        )

    def test_metricsInterfaceName(self) -> None:
        """
        A metrics endpoint on a host name, which the address policy could
        not refuse as the proxy itself, stops start-up with one line.
        """
        self.assertOneLineExit(
            ["--metrics", "tcp:2112:interface=localhost"],
            "interface='localhost': expected an IP address",
        )

    def test_workerIndexInRange(self) -> None:
        """
        A worker index outside 0 to workers - 1 stops with one line.
        """
        self.assertOneLineExit(
            ["--workers", "2", "--worker-index", "2"],
            "worker-index = 2: expected 0 to 1",
        )
        self.assertOneLineExit(
            ["--worker-index", "1"], "worker-index = 1: expected 0 to 0"
        )
        self.assertOneLineExit(
            ["--workers", "2", "--worker-index", "-1"], "worker-index = -1"
        )
        self.assertEqual(
            self.parse(["--workers", "2", "--worker-index", "1"])["worker-index"], 1
        )

    def test_selfAddresses(self) -> None:
        """
        The proxy's own listening addresses are derived from its endpoint
        descriptions, wildcards as empty hosts.
        """
        self.assertEqual(
            selfAddresses(
                [
                    "tcp:9090:interface=127.0.0.1",
                    "tcp6:port=9091:interface=\\:\\:1",
                    "tcp:9092",
                    "unix:/tmp/sock",
                ]
            ),
            [("127.0.0.1", 9090), ("::1", 9091), ("", 9092)],
        )
