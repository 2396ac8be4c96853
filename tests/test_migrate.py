"""
C{egressproxy-migrate} (L{proxy_app.migrate}): example configurations
covering every key of Smokescreen and webhook-sentry, written from their
documented keys, converted and loaded with egressproxy's own loader (the
C{twistd egressproxy} options); and a converted Smokescreen setup with an
ACL, run on loopback.
"""

from __future__ import annotations

import io
import ipaddress
from typing import Any

from twisted.internet import reactor, ssl
from twisted.internet.defer import inlineCallbacks
from twisted.names import dns
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from proxy_app import migrate
from proxy_app.addresses import AddressPolicy
from proxy_app.config import Config, TLSListener
from proxy_app.tap import Options, makeService

from .certs import Authority
from .helpers import startNameServer

ACL_TEXT = """\
version: v1
services:
  - name: enforcer
    project: payments
    action: enforce
    allowed_domains: [allowed.test, "*.glob.test"]
  - name: reporter
    project: search
    action: report
    allowed_domains: [allowed.test]
  - name: opener
    project: tools
    action: open
global_deny_list: [banned.test]
default:
  project: other
  action: enforce
  allowed_domains: [default-ok.test]
"""


class Files:
    """
    The files a configuration names, made for real so that egressproxy's
    loader (which opens listener certificates and the ACL) can check them.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.dir = FilePath(case.mktemp())
        self.dir.makedirs()
        self.serverCA = Authority("server CA")
        self.clientCA = Authority("client CA")
        cert, key, _ = self.serverCA.issue("proxy.test", ("proxy.test",))
        self.cert = self.write("server.pem", cert)
        self.key = self.write("server.key", key)
        self.bundle = self.write("bundle.pem", cert + key)
        self.ca = self.write("clients.pem", self.clientCA.pem)
        self.revokedClient = self.clientCA.issue("enforcer", client=True)
        self.clientCA.revoked.append(self.revokedClient[2])
        self.crl = self.write("crl.pem", self.clientCA.crl())
        self.acl = self.write("acl.yaml", ACL_TEXT.encode())
        self.originCert = self.write("origin-client.pem", cert)
        self.originKey = self.write("origin-client.key", key)
        self.mitmCA = Authority("interception CA")
        self.mitmCert = self.write("mitm.pem", self.mitmCA.pem)
        self.mitmKey = self.write("mitm.key", self.mitmCA.keyPEM)

    def write(self, name: str, data: bytes) -> str:
        child = self.dir.child(name)
        child.setContent(data)
        return child.path

    def path(self, name: str) -> str:
        return self.dir.child(name).path


def run(*argv: str) -> tuple[int, str, list[str]]:
    """
    Run the console script's main; its status, output and stderr lines.
    """
    out, err = io.StringIO(), io.StringIO()
    status = migrate.main(list(argv), out, err)
    return status, out.getvalue(), err.getvalue().splitlines()


def load(text: str, case: SynchronousTestCase) -> Config:
    """
    Load converted YAML as C{twistd egressproxy --config} does, checks
    included.
    """
    path = FilePath(case.mktemp())
    path.setContent(text.encode())
    options = Options(environ={})
    options.parseOptions(["--config", path.path])
    return options.config  # type: ignore[no-any-return]


def leftOut(lines: list[str]) -> list[str]:
    """
    The source keys named by the stderr lines, in order.
    """
    prefix = "egressproxy-migrate: left out: "
    assert all(line.startswith(prefix) for line in lines), lines
    return [line[len(prefix) :].split(":", 1)[0] for line in lines]


class SmokescreenYAMLTests(SynchronousTestCase):
    """
    A Smokescreen YAML file with every key.
    """

    def setUp(self) -> None:
        self.files = f = Files(self)
        self.config = f.write(
            "smokescreen.yaml",
            f"""\
ip: 127.0.0.1
port: 4750
network: ip
connect_timeout: 5s
idle_timeout: 2m
exit_timeout: 30s
read_header_timeout: 15s
read_timeout: 60s
write_timeout: 60s
dns_timeout: 3s
deny_ranges: [203.0.113.0/24]
allow_ranges: [10.20.0.0/16]
deny_addresses: [198.51.100.7]
allow_addresses: ["10.30.0.5:8443"]
resolver_addresses: ["127.0.0.53:53"]
statsd_address: 127.0.0.1:8200
acl_file: {f.acl}
support_proxy_protocol: false
deny_message_extra: "Ask in #egress"
allow_missing_role: true
stats_socket_dir: /run/smokescreen
stats_socket_file_mode: "700"
transport_max_idle_conns: 100
transport_max_idle_conns_per_host: 10
time_connect: true
unsafe_allow_private_ranges: false
tls:
  cert_file: {f.cert}
  key_file: {f.key}
  client_ca_files: [{f.ca}]
  crl_files: [{f.crl}]
mitm_ca_cert_file: {f.mitmCert}
mitm_ca_key_file: {f.mitmKey}
max_concurrent_requests: 200
max_request_rate: 50
max_request_burst: 120
max_concurrent_connect_tunnels: 300
""".encode(),
        )

    def test_loadsAndMeansTheSame(self) -> None:
        """
        The output loads, and has the same listener (TLS, client
        certificates verified if given, the role from the CN, the CRL),
        timeouts, ranges, addresses, resolvers, limits and ACL settings.
        """
        f = self.files
        status, text, _ = run("smokescreen", "--config-file", self.config)
        loaded = load(text, self)
        self.assertEqual(
            loaded.listen,
            (
                TLSListener(
                    port=4750,
                    cert=f.cert,
                    key=f.key,
                    interface="127.0.0.1",
                    clientCA=f.ca,
                    clientCert="optional",
                    crl=f.crl,
                    roleFrom="cn",
                ),
            ),
        )
        t = loaded.timeouts
        self.assertEqual(
            (t.connect, t.read, t.drain, t.request_header, t.dns),
            (5.0, 120.0, 30.0, 15.0, 3.0),
        )
        d = loaded.destinations
        self.assertEqual(
            (
                d.deny_ranges,
                d.allow_ranges,
                d.deny_addresses,
                d.allow_addresses,
                d.nameservers,
            ),
            (
                ("203.0.113.0/24",),
                ("10.20.0.0/16",),
                ("198.51.100.7",),
                ("10.30.0.5:8443",),
                ("127.0.0.53:53",),
            ),
        )
        lim = loaded.limits
        self.assertEqual(
            (
                lim.max_concurrent_requests,
                lim.max_request_rate,
                lim.request_burst,
                lim.max_concurrent_tunnels,
            ),
            (200, 50.0, 120, 300),
        )
        self.assertEqual(
            (
                loaded.acl.file,
                loaded.acl.allow_missing_role,
                loaded.acl.deny_message_extra,
            ),
            (f.acl, True, "Ask in #egress"),
        )
        # The interception CA; the ACL's mitm_domains choose the tunnels.
        self.assertEqual(
            (loaded.mitm.ca_cert, loaded.mitm.ca_key, loaded.mitm.all),
            (f.mitmCert, f.mitmKey, False),
        )

    def test_leftOut(self) -> None:
        """
        What has no equivalent is named on stderr, one line each, in the
        table's order, and the exit status is 1; with --allow-partial, 0.
        """
        status, text, lines = run("smokescreen", "--config-file", self.config)
        self.assertEqual(status, 1)
        self.assertEqual(
            leftOut(lines),
            [
                "Smokescreen read_timeout",
                "Smokescreen write_timeout",
                "Smokescreen statsd_address",
                "Smokescreen stats_socket_dir",
                "Smokescreen stats_socket_file_mode",
                "Smokescreen transport_max_idle_conns",
                "Smokescreen transport_max_idle_conns_per_host",
            ],
        )
        status, _, _ = run(
            "smokescreen", "--config-file", self.config, "--allow-partial"
        )
        self.assertEqual(status, 0)

    def test_comments(self) -> None:
        """
        Every key names its source, and the differences that change
        behaviour are stated: 407 against 403 (naming compat.deny_status),
        the global against the per-role rate.
        """
        _, text, _ = run("smokescreen", "--config-file", self.config)
        self.assertIn("  connect: 5  # from Smokescreen connect_timeout = 5s", text)
        self.assertIn(
            "  request_burst: 120  # from Smokescreen max_request_burst", text
        )
        self.assertIn("compat.deny_status: 407", text)
        self.assertIn("one budget for the whole proxy", text)
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith(("#", "- ")):
                if not line.endswith(":"):
                    self.assertIn("  # from ", line)

    def test_defaultBurst(self) -> None:
        """
        A rate without a burst gets Smokescreen's default burst, twice the
        rate, with a comment, not egressproxy's 10.
        """
        path = self.files.write("rate.yaml", b"max_request_rate: 25\n")
        _, text, _ = run("smokescreen", "--config-file", path)
        self.assertEqual(load(text, self).limits.request_burst, 50)
        self.assertIn("egressproxy's own default burst is 10", text)


class SmokescreenFlagTests(SynchronousTestCase):
    """
    A Smokescreen command line with every flag, as a string and as a
    systemd unit's ExecStart.
    """

    def setUp(self) -> None:
        self.files = f = Files(self)
        fileConfig = f.write("base.yaml", b"port: 4000\nallow_missing_role: true\n")
        self.command = (
            f"/usr/local/bin/smokescreen --config-file {fileConfig} "
            "--listen-ip 127.0.0.1 --listen-port 4750 --timeout 7s "
            "--deny-range 203.0.113.0/24 --deny-range 198.51.100.0/24 "
            "--allow-range 10.20.0.0/16 --deny-address 198.51.100.7 "
            "--allow-address 10.30.0.5:8443 "
            f"--egress-acl-file {f.acl} --expose-prometheus-metrics "
            "--prometheus-endpoint /metrics --prometheus-listen-ip 127.0.0.1 "
            "--prometheus-port 9811 --resolver-address 127.0.0.53:53 "
            "--statsd-address 127.0.0.1:8200 "
            f"--tls-server-bundle-file {f.bundle} --tls-client-ca-file {f.ca} "
            f"--tls-crl-file={f.crl} "
            "--additional-error-message-on-deny 'Ask in #egress' "
            "--disable-acl-policy-action open --stats-socket-dir /run/s "
            "--stats-socket-file-mode 700 "
            "--upstream-http-proxy-addr proxy.corp.example:3128 "
            "--upstream-https-proxy-addr proxy.corp.example:3128 "
            "--max-concurrent-requests 200 --max-request-rate 50 "
            "--max-request-burst 120 --max-concurrent-connect-tunnels 300 "
            "-dns-timeout 3s"
        )

    def check(self, status: int, text: str, lines: list[str]) -> None:
        f = self.files
        loaded = load(text, self)
        self.assertEqual(
            loaded.listen,
            (
                TLSListener(
                    port=4750,
                    cert=f.bundle,
                    key=f.bundle,
                    interface="127.0.0.1",
                    clientCA=f.ca,
                    clientCert="optional",
                    crl=f.crl,
                    roleFrom="cn",
                ),
            ),
        )
        self.assertEqual(loaded.metrics, "tcp:9811:interface=127.0.0.1")
        self.assertEqual((loaded.timeouts.connect, loaded.timeouts.dns), (7.0, 3.0))
        self.assertEqual(
            loaded.destinations.deny_ranges, ("203.0.113.0/24", "198.51.100.0/24")
        )
        self.assertEqual(loaded.upstream.proxy, "http://proxy.corp.example:3128")
        self.assertEqual(
            (loaded.limits.max_request_rate, loaded.limits.request_burst), (50.0, 120)
        )
        # The file's allow_missing_role stays; its port is overridden.
        self.assertTrue(loaded.acl.allow_missing_role)
        self.assertEqual(loaded.acl.deny_message_extra, "Ask in #egress")
        self.assertEqual(status, 1)
        self.assertEqual(
            leftOut(lines),
            [
                "Smokescreen --disable-acl-policy-action",
                "Smokescreen --statsd-address",
                "Smokescreen --stats-socket-dir",
                "Smokescreen --stats-socket-file-mode",
            ],
        )

    def test_commandLine(self) -> None:
        """
        The command line as one string.
        """
        self.check(*run("smokescreen", "--command-line", self.command))

    def test_systemdUnit(self) -> None:
        """
        The same command line from a unit's ExecStart, with systemd's line
        continuations and a C{-} prefix.
        """
        unit = self.files.write(
            "smokescreen.service",
            (
                "[Unit]\nDescription=Smokescreen\n\n[Service]\n"
                "ExecStart=-"
                + self.command.replace(" --listen-ip", " \\\n  --listen-ip")
                + "\nRestart=always\n"
            ).encode(),
        )
        self.check(*run("smokescreen", "--systemd-unit", unit))

    def test_switches(self) -> None:
        """
        The switches whose "on" has no equivalent are left out when on
        (PROXY protocol, private ranges), and so are an IPv6-only network
        and two different parent proxies.
        """
        path = self.files.write(
            "on.yaml",
            b"support_proxy_protocol: true\nunsafe_allow_private_ranges: true\n"
            b"network: ip6\n",
        )
        status, text, lines = run(
            "smokescreen",
            "--config-file",
            path,
            "--command-line",
            "smokescreen --upstream-http-proxy-addr a:1 "
            "--upstream-https-proxy-addr b:2",
        )
        self.assertEqual(status, 1)
        self.assertEqual(
            leftOut(lines),
            [
                "Smokescreen support_proxy_protocol",
                "Smokescreen unsafe_allow_private_ranges",
                "Smokescreen network",
                "Smokescreen --upstream-http-proxy-addr, Smokescreen "
                "--upstream-https-proxy-addr",
            ],
        )
        self.assertEqual(load(text, self).listen, ("tcp:4750",))

    def test_unknownFlag(self) -> None:
        """
        A flag Smokescreen does not have is an input error: exit 2, one
        line, no output.
        """
        status, text, lines = run(
            "smokescreen", "--command-line", "smokescreen --nope 1"
        )
        self.assertEqual((status, text), (2, ""))
        self.assertEqual(lines, ["egressproxy-migrate: --nope: not a Smokescreen flag"])


class WebhookSentryTests(SynchronousTestCase):
    """
    webhook-sentry YAML files with every key, in its command's form
    (C{listener:}, C{metrics.address}) and its library's (C{listeners:},
    C{metricsAddress}).
    """

    def setUp(self) -> None:
        self.files = Files(self)

    def test_everyKey(self) -> None:
        """
        The output loads with the same listener, timeouts, size limit,
        ranges, client certificate, logs, metrics address and request-id
        header, the MITM issuer (every tunnel intercepted); the process log
        file is left out.
        """
        f = self.files
        deny = ", ".join(f'"{c}"' for c in migrate._WS_DEFAULT_DENY)
        path = f.write(
            "config.yaml",
            f"""\
listener:
  address: 127.0.0.1:9091
  type: https
  certFile: {f.cert}
  keyFile: {f.key}
connectTimeout: 5s
connectionLifetime: 2m
readTimeout: 15s
insecureSkipCertVerification: false
insecureSkipCidrDenyList: false
maxResponseBodySize: 2097152
cidrDenyList: [{deny}, "203.0.113.0/24"]
clientCertFile: {f.originCert}
clientKeyFile: {f.originKey}
mitmIssuerCertFile: {f.mitmCert}
mitmIssuerKeyFile: {f.mitmKey}
accessLog:
  type: json
  file: /var/log/whsentry/access.log
proxyLog:
  type: json
  file: /var/log/whsentry/proxy.log
metrics:
  address: 127.0.0.1:2113
requestIDHeader: X-Request-Id
""".encode(),
        )
        status, text, lines = run("webhook-sentry", "--config-file", path)
        loaded = load(text, self)
        self.assertEqual(
            loaded.listen,
            (TLSListener(port=9091, cert=f.cert, key=f.key, interface="127.0.0.1"),),
        )
        t = loaded.timeouts
        self.assertEqual((t.connect, t.lifetime, t.read), (5.0, 120.0, 15.0))
        self.assertEqual(loaded.limits.max_response_body, 2097152)
        self.assertEqual(loaded.destinations.deny_ranges, ("203.0.113.0/24",))
        self.assertEqual(
            (loaded.tls.client_cert, loaded.tls.client_key), (f.originCert, f.originKey)
        )
        self.assertEqual(
            (loaded.access_log.format, loaded.access_log.file, loaded.log_format),
            ("json", "/var/log/whsentry/access.log", "json"),
        )
        self.assertEqual(loaded.metrics, "tcp:2113:interface=127.0.0.1")
        self.assertEqual(loaded.access_log.request_id_header, "X-Request-Id")
        self.assertEqual(status, 1)
        self.assertEqual(
            leftOut(lines),
            ["webhook-sentry proxyLog.file"],
        )
        # Its issuer intercepts every tunnel, as webhook-sentry does.
        self.assertEqual(
            (loaded.mitm.ca_cert, loaded.mitm.ca_key, loaded.mitm.all),
            (f.mitmCert, f.mitmKey, True),
        )
        self.assertIn("cidrDenyList replaces its default list", text)

    def test_libraryForm(self) -> None:
        """
        The C{listeners:} list and C{metricsAddress}; C{:PORT} is every
        interface, with a comment saying so.
        """
        f = self.files
        path = f.write(
            "config.yaml",
            f"""\
listeners:
  - type: http
    address: ":9090"
  - type: https
    address: 127.0.0.1:9443
    certFile: {f.cert}
    keyFile: {f.key}
metricsAddress: ":2112"
""".encode(),
        )
        status, text, lines = run("webhook-sentry", "--config-file", path)
        self.assertEqual((status, lines), (0, []))
        loaded = load(text, self)
        self.assertEqual(
            loaded.listen,
            (
                "tcp:9090",
                TLSListener(port=9443, cert=f.cert, key=f.key, interface="127.0.0.1"),
            ),
        )
        self.assertEqual(loaded.metrics, "tcp:2112")
        self.assertIn("Listening on every IPv4 interface, as webhook-sentry", text)

    def test_defaults(self) -> None:
        """
        An empty file keeps webhook-sentry's listener and metrics address
        (every interface, 9090 and 2112), which differ from egressproxy's.
        """
        path = self.files.write("config.yaml", b"{}\n")
        status, text, _ = run("webhook-sentry", "--config-file", path)
        loaded = load(text, self)
        self.assertEqual((loaded.listen, loaded.metrics), (("tcp:9090",), "tcp:2112"))

    def test_cidrDenyListNarrowed(self) -> None:
        """
        A cidrDenyList that leaves out ranges of the default list (which
        webhook-sentry then reached) is named for each such range, since
        egressproxy still denies them; the insecure switches, on, are left
        out.
        """
        path = self.files.write(
            "config.yaml",
            b"cidrDenyList: [127.0.0.0/8]\ninsecureSkipCertVerification: true\n"
            b"insecureSkipCidrDenyList: true\n",
        )
        status, text, lines = run("webhook-sentry", "--config-file", path)
        self.assertEqual(status, 1)
        names = leftOut(lines)
        self.assertEqual(
            names[:2],
            [
                "webhook-sentry insecureSkipCertVerification",
                "webhook-sentry insecureSkipCidrDenyList",
            ],
        )
        self.assertEqual(names[2:], ["webhook-sentry cidrDenyList"] * 9)
        self.assertIn("omits 10.0.0.0/8 from the default list", lines[2])
        self.assertEqual(load(text, self).destinations.deny_ranges, ())

    def test_defaultListDenied(self) -> None:
        """
        egressproxy's address policy denies every range of webhook-sentry's
        default cidrDenyList (its first, last and middle addresses), which
        is why a cidrDenyList's default ranges need no deny_ranges.
        """
        policy = AddressPolicy()
        for cidr in migrate._WS_DEFAULT_DENY:
            network = ipaddress.ip_network(cidr)
            for address in (
                network[0],
                network[-1],
                network[network.num_addresses // 2],
            ):
                self.assertFalse(
                    policy.decide(str(address), 443).allowed, f"{address} in {cidr}"
                )

    def test_unknownKey(self) -> None:
        """
        A key webhook-sentry does not have is an input error (exit 2);
        keys match whatever their case, as viper reads them.
        """
        path = self.files.write("config.yaml", b"ConnectTimeout: 5s\nproxy: x\n")
        status, _, lines = run("webhook-sentry", "--config-file", path)
        self.assertEqual(status, 2)
        self.assertIn("proxy: not a webhook-sentry setting", lines[0])


class DurationTests(SynchronousTestCase):
    """
    Go's durations, as both tools write them.
    """

    def test_goDuration(self) -> None:
        """
        Units and compound durations; a bare number is nanoseconds.
        """
        self.assertEqual(migrate.goDuration("1m30s"), 90.0)
        self.assertEqual(migrate.goDuration("500ms"), 0.5)
        self.assertEqual(migrate.goDuration("1h"), 3600.0)
        self.assertEqual(migrate.goDuration(5_000_000_000), 5.0)
        with self.assertRaises(migrate.InputError):
            migrate.goDuration("5 seconds")


class Who(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"origin " + request.getRequestHostname()


class ConvertedACLTests(TestCase):
    """
    A Smokescreen setup (TLS listener whose client certificates give the
    role by CN, a CRL, an ACL with enforce, report and open rules, globs, a
    global deny list, a default rule, C{allow_missing_role}) converted and
    run on loopback: it decides as Smokescreen's documented semantics do.
    """

    def setUp(self) -> None:
        from .test_integration import freePort

        self.files = f = Files(self)
        origin = reactor.listenTCP(0, Site(Who()), interface="127.0.0.2")
        self.addCleanup(origin.stopListening)
        self.originPort = origin.getHost().port
        names = [
            b"allowed.test",
            b"a.glob.test",
            b"glob.test",
            b"other.test",
            b"default-ok.test",
            b"banned.test",
        ]
        nameServer = startNameServer(
            reactor, b"test", {n: [dns.Record_A("127.0.0.2")] for n in names}
        )
        self.addCleanup(nameServer.stopListening)
        self.port = freePort("127.0.0.1")
        smokescreen = f.write(
            "smokescreen.yaml",
            f"""\
ip: 127.0.0.1
port: {self.port}
acl_file: {f.acl}
allow_missing_role: true
allow_ranges: [127.0.0.2/32]
resolver_addresses: ["127.0.0.1:{nameServer.getHost().port}"]
tls:
  cert_file: {f.cert}
  key_file: {f.key}
  client_ca_files: [{f.ca}]
  crl_files: [{f.crl}]
""".encode(),
        )
        status, text, lines = run("smokescreen", "--config-file", smokescreen)
        self.assertEqual((status, lines), (0, []))
        converted = f.write("egressproxy.yaml", text.encode())
        options = Options(environ={})
        options.parseOptions(
            [
                "--config",
                converted,
                "--access-log",
                "none",
                "--decision-log",
                "none",
                "--metrics",
                "none",
            ]
        )
        service = makeService(options)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)

    def request(self, role: str | None, host: str, client: Any = None) -> Any:
        from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol

        from .test_integration import _Collect

        certificate = None
        if client is None and role is not None:
            client = self.files.clientCA.issue(role, client=True)
        if client is not None:
            certificate = ssl.PrivateCertificate.loadPEM(client[0] + client[1])
        options = ssl.optionsForClientTLS(
            "proxy.test",
            trustRoot=ssl.Certificate.loadPEM(self.files.serverCA.pem),
            clientCertificate=certificate,
        )
        collector = _Collect()
        d = connectProtocol(
            SSL4ClientEndpoint(reactor, "127.0.0.1", self.port, options), collector
        )

        def connected(protocol: Any) -> Any:
            protocol.transport.write(
                f"GET http://{host}:{self.originPort}/ HTTP/1.1\r\nHost: {host}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            return collector.done

        return d.addCallback(connected)

    @inlineCallbacks
    def test_decisions(self):  # type: ignore[no-untyped-def]
        """
        enforce: listed names and glob subdomains pass, the glob's apex and
        others are denied; report and open: others pass; a global-deny
        name is denied to all; an unknown role and a client without a
        certificate (allow_missing_role) get the default rule.
        """
        cases = [
            ("enforcer", "allowed.test", True),
            ("enforcer", "a.glob.test", True),
            ("enforcer", "glob.test", False),
            ("enforcer", "other.test", False),
            ("reporter", "other.test", True),
            ("opener", "other.test", True),
            ("opener", "banned.test", False),
            ("stranger", "default-ok.test", True),
            ("stranger", "other.test", False),
            (None, "default-ok.test", True),
            (None, "other.test", False),
        ]
        for role, host, allowed in cases:
            data = yield self.request(role, host)
            if allowed:
                self.assertIn(b" 200 ", data.split(b"\r\n")[0], (role, host, data))
                self.assertIn(b"origin " + host.encode(), data)
            else:
                self.assertIn(b" 403 ", data.split(b"\r\n")[0], (role, host, data))
                self.assertIn(b"X-WhSentry-ReasonCode: 1011", data, (role, host))

    @inlineCallbacks
    def test_revoked(self):  # type: ignore[no-untyped-def]
        """
        A client certificate the CRL revokes is refused at the handshake,
        as Smokescreen refuses it since its CRL enforcement (#293).
        """
        try:
            data = yield self.request(None, "allowed.test", self.files.revokedClient)
        except Exception:
            return
        self.assertNotIn(b" 200 ", data)


class DocsTableTests(SynchronousTestCase):
    """
    docs/configuration.md's mapping tables and the converter's tables agree
    on which settings exist.
    """

    def test_everyRowDocumented(self) -> None:
        """
        Every YAML key and flag in L{migrate.SMOKESCREEN} and
        L{migrate.WEBHOOK_SENTRY} appears in the mapping section, so that a
        row added to a table is documented.
        """
        doc = FilePath(__file__).parent().parent().child("docs")
        text = doc.child("configuration.md").getContent().decode()
        section = text[text.index("## Coming from webhook-sentry or Smokescreen") :]
        missing = []
        for row in (*migrate.SMOKESCREEN, *migrate.WEBHOOK_SENTRY):
            if row.yaml and f"`{row.yaml}" not in section:
                missing.append(row.yaml)
            if row.flag and f"`--{row.flag}" not in section:
                missing.append("--" + row.flag)
        self.assertEqual(missing, [])

    def test_entryPoint(self) -> None:
        """
        setup.cfg installs C{egressproxy-migrate} as L{migrate.run}.
        """
        from configparser import ConfigParser

        parser = ConfigParser()
        parser.read(FilePath(__file__).parent().parent().child("setup.cfg").path)
        scripts = parser["options.entry_points"]["console_scripts"]
        self.assertIn("egressproxy-migrate = proxy_app.migrate:run", scripts)
