"""
Tests for what operators see: metrics with exact values, the health check
during a drain, request ids, and JSON access-log lines.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, textFileLogObserver
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.addresses import AddressDecision
from proxy_app.observe import (
    ACCESS_FIELDS,
    ACCESS_KINDS,
    DECISION_FIELDS,
    DECISION_KINDS,
    AccessLog,
    DecisionLog,
    LineSpec,
    Metrics,
    MetricsResource,
    TextProcessLog,
    _decimal,
    instanceRegistry,
    linesWriter,
    lineWriter,
    multiprocessValues,
    recordFields,
    textFormatter,
)
from proxy_app.reasons import DENIALS, Reason
from proxy_app.resolver import DestinationDenied, VettedDestination
from proxy_app.tap import ProxyService

from .helpers import makeHarness, parseResponse


def scrape(resource: MetricsResource) -> dict[tuple[str, tuple], float]:
    """
    GET /metrics through treq's in-memory client and parse the samples.
    """
    treq = StubTreq(resource)
    d = treq.get("http://metrics.test/metrics")
    results: list = []
    d.addCallback(lambda r: treq.content(r)).addCallback(results.append)
    treq.flush()
    samples = {}
    for family in text_string_to_metric_families(results[0].decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


GET = b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n\r\n"


class MetricsTests(SynchronousTestCase):
    """
    Counters after traffic with known outcomes.
    """

    def test_everyDenialCountedAsDeny(self) -> None:
        """
        Every reason code that means the proxy said no, the client
        certificate alias refused (1016) included, is counted with
        C{decision="deny"}; a failed destination is not.
        """
        metrics = Metrics(process=False)
        for reason in Reason:
            metrics.requestDone("http", int(reason), 0, 0)
        registry = metrics.registry
        for reason in Reason:
            expected = "deny" if reason in DENIALS else "allow"
            value = registry.get_sample_value(
                "egressproxy_requests_total",
                {
                    "proxy_type": "http",
                    "decision": expected,
                    "reason_code": str(int(reason)),
                },
            )
            self.assertEqual(value, 1, reason)
        self.assertIn(Reason.CLIENT_CERT_NOT_PERMITTED, DENIALS)

    def test_countsOutcomes(self) -> None:
        """
        One allowed request, one denied by the address policy and one
        malformed target are counted by type, decision and reason code, with
        the bytes relayed and the resolver denial by rule.
        """
        denied = DestinationDenied(
            "internal.example",
            80,
            AddressDecision(False, "10.0.0.1", "Deny: Private Range"),
        )
        h = makeHarness(
            {"origin.example": ["203.0.113.10"], "internal.example": denied}
        )
        resource = MetricsResource(h.factory.metrics.registry, lambda: True)
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        h.send(
            b"GET http://internal.example/ HTTP/1.1\r\nHost: internal.example\r\n\r\n"
        )
        h.send(b"GET http://origin.example:0/ HTTP/1.1\r\nHost: x\r\n\r\n")

        samples = scrape(resource)
        requests = "egressproxy_requests_total"
        self.assertEqual(
            samples[
                (
                    requests,
                    (
                        ("decision", "allow"),
                        ("proxy_type", "http"),
                        ("reason_code", ""),
                    ),
                )
            ],
            1,
        )
        self.assertEqual(
            samples[
                (
                    requests,
                    (
                        ("decision", "deny"),
                        ("proxy_type", "http"),
                        ("reason_code", "1000"),
                    ),
                )
            ],
            1,
        )
        self.assertEqual(
            samples[
                (
                    requests,
                    (
                        ("decision", "allow"),
                        ("proxy_type", "http"),
                        ("reason_code", "1002"),
                    ),
                )
            ],
            1,
        )
        self.assertEqual(
            samples[("egressproxy_bytes_total", (("direction", "down"),))], 5
        )
        self.assertEqual(
            samples[
                ("egressproxy_resolver_denials_total", (("rule", "private_range"),))
            ],
            1,
        )
        self.assertEqual(
            samples[
                ("egressproxy_active_client_connections", (("listener", "default"),))
            ],
            1,
        )
        self.assertEqual(samples[("egressproxy_upstream_connect_seconds_count", ())], 1)

    def test_tunnelGauge(self) -> None:
        """
        The active-tunnel gauge rises when a tunnel is established and falls
        when it closes; the tunnel is then counted as a connect request.
        """
        h = makeHarness()
        resource = MetricsResource(h.factory.metrics.registry, lambda: True)
        h.send(
            b"CONNECT origin.example:443 HTTP/1.1\r\nHost: origin.example:443\r\n\r\n"
        )
        h.connectUpstream()
        self.assertEqual(scrape(resource)[("egressproxy_active_tunnels", ())], 1)
        h.protocol.connectionLost(None)
        samples = scrape(resource)
        self.assertEqual(samples[("egressproxy_active_tunnels", ())], 0)
        self.assertEqual(
            samples[
                (
                    "egressproxy_requests_total",
                    (
                        ("decision", "allow"),
                        ("proxy_type", "connect"),
                        ("reason_code", ""),
                    ),
                )
            ],
            1,
        )
        self.assertEqual(
            samples[
                ("egressproxy_active_client_connections", (("listener", "default"),))
            ],
            0,
        )

    def test_dnsTimeHistogram(self) -> None:
        """
        Lookup times of names are observed; mixed answers count the dropped
        ones by rule.
        """
        h = makeHarness()
        h.resolver.immediate = False
        resource = MetricsResource(h.factory.metrics.registry, lambda: True)
        decision = AddressDecision(False, "127.0.0.1", "Deny: Not Global Unicast")
        h.factory.resolver.vet = lambda host, port: succeed(  # type: ignore[method-assign]
            VettedDestination(host, port, ("203.0.113.10",), (decision,), 0.25)
        )
        h.send(GET)
        samples = scrape(resource)
        self.assertEqual(samples[("egressproxy_dns_lookup_seconds_count", ())], 1)
        self.assertEqual(samples[("egressproxy_dns_lookup_seconds_sum", ())], 0.25)
        self.assertEqual(
            samples[
                (
                    "egressproxy_resolver_denials_total",
                    (("rule", "not_global_unicast"),),
                )
            ],
            1,
        )


class HealthTests(SynchronousTestCase):
    """
    /healthcheck follows the drain.
    """

    def test_flipsDuringDrain(self) -> None:
        """
        /healthcheck answers 200 while the proxy accepts connections and 503
        once it drains.
        """
        h = makeHarness()
        resource = MetricsResource(
            h.factory.metrics.registry, lambda: not h.factory.draining
        )
        treq = StubTreq(resource)

        def status() -> int:
            codes: list[int] = []
            treq.get("http://metrics.test/healthcheck").addCallback(
                lambda r: codes.append(r.code)
            )
            treq.flush()
            return codes[0]

        self.assertEqual(status(), 200)
        service = ProxyService(h.factory, h.reactor)
        service.startService()
        h.send(GET)
        service.stopService()
        self.assertEqual(status(), 503)

    def test_livenessDuringDrain(self) -> None:
        """
        /livez answers 200 before and during the drain, while /healthcheck
        says 503: a liveness probe on it never kills a draining proxy.
        """
        h = makeHarness()
        resource = MetricsResource(
            h.factory.metrics.registry, lambda: not h.factory.draining
        )
        treq = StubTreq(resource)

        def get(path: str) -> tuple[int, bytes]:
            results: list = []
            d = treq.get("http://metrics.test" + path)
            d.addCallback(
                lambda r: treq.content(r).addCallback(lambda body: (r.code, body))
            )
            d.addCallback(results.append)
            treq.flush()
            return results[0]

        self.assertEqual(get("/livez"), (200, b"alive\n"))
        service = ProxyService(h.factory, h.reactor)
        service.startService()
        h.send(GET)
        service.stopService()
        self.assertTrue(h.factory.draining)
        self.assertEqual(get("/healthcheck")[0], 503)
        self.assertEqual(get("/livez"), (200, b"alive\n"))
        self.assertEqual(get("/nothing")[0], 404)

    def test_drainingGauge(self) -> None:
        """
        C{egressproxy_draining} is 0 while the proxy accepts connections and
        1 from the start of the drain, on the scrape that /healthcheck's 503
        goes with.
        """
        h = makeHarness()
        resource = MetricsResource(
            h.factory.metrics.registry, lambda: not h.factory.draining
        )
        self.assertEqual(scrape(resource)[("egressproxy_draining", ())], 0)
        service = ProxyService(h.factory, h.reactor)
        service.startService()
        h.send(GET)
        service.stopService()
        self.assertEqual(scrape(resource)[("egressproxy_draining", ())], 1)


class RequestIDTests(SynchronousTestCase):
    """
    Request ids are honoured, made, passed upstream and returned.
    """

    def test_honoured(self) -> None:
        """
        A well-formed incoming Request-ID is kept, sent upstream once, and
        returned to the client and logged.
        """
        h = makeHarness()
        h.send(
            b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n"
            b"Request-ID: abc-123\r\n\r\n"
        )
        up, upTransport = h.connectUpstream()
        self.assertEqual(upTransport.value().count(b"\r\nRequest-ID: abc-123\r\n"), 1)
        up.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        _, headers, _ = parseResponse(h.client.value())
        self.assertEqual(headers[b"request-id"], b"abc-123")
        self.assertEqual(h.access[-1]["rq_id"], "abc-123")

    def test_malformedReplaced(self) -> None:
        """
        A malformed incoming id is replaced by one of ours, everywhere.
        """
        h = makeHarness()
        h.send(
            b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n"
            b"Request-ID: bad id with spaces\r\n\r\n"
        )
        _, upTransport = h.connectUpstream()
        self.assertNotIn(b"bad id", upTransport.value())
        sent = [
            line
            for line in upTransport.value().split(b"\r\n")
            if line.lower().startswith(b"request-id")
        ]
        self.assertEqual(len(sent), 1)

    def test_onErrors(self) -> None:
        """
        Error responses made by the proxy carry the request id too.
        """
        h = makeHarness()
        h.send(b"GET ftp://x/ HTTP/1.1\r\nHost: x\r\nRequest-ID: e-1\r\n\r\n")
        _, headers, _ = parseResponse(h.client.value())
        self.assertEqual(headers[b"request-id"], b"e-1")


class AccessLogFileTests(SynchronousTestCase):
    """
    The access log file as operators read it.
    """

    def test_jsonLinesParse(self) -> None:
        """
        Each JSON access-log line parses on its own and carries the request
        id, status and byte counts.
        """
        out = io.StringIO()
        h = makeHarness()
        h.factory.accessLog = AccessLog(out, "json")
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        h.send(b"GET http://origin.example:0/ HTTP/1.1\r\nHost: x\r\n\r\n")
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([line["response_code"] for line in lines], [200, 400])
        self.assertEqual(lines[0]["bytes_down"], 2)
        self.assertEqual(lines[1]["reason_code"], 1002)
        self.assertTrue(all(line["rq_id"] for line in lines))

    def test_batchedWrites(self) -> None:
        """
        With batching on, lines reach the file when the timer flushes (once
        a second), not one write per line; stop() flushes the rest.
        """
        from twisted.internet.task import Clock

        clock = Clock()
        path = FilePath(self.mktemp())
        log = AccessLog.open(path.path, "text")
        log.batchWrites(clock)
        log.record(rq_id="one")
        log.record(rq_id="two")
        self.assertEqual(path.getContent(), b"")
        clock.advance(1)
        self.assertEqual(path.getContent(), b"rq_id=one\nrq_id=two\n")
        log.record(rq_id="three")
        log.stop()
        self.assertEqual(path.getContent(), b"rq_id=one\nrq_id=two\nrq_id=three\n")

    def test_reopen(self) -> None:
        """
        After the file is moved away (logrotate), reopen() writes to a new
        file at the same path.
        """
        path = FilePath(self.mktemp())
        log = AccessLog.open(path.path, "text")
        log.record(rq_id="one")
        path.moveTo(path.sibling("rotated"))
        log.reopen()
        log.record(rq_id="two")
        self.assertEqual(path.getContent(), b"rq_id=two\n")
        self.assertEqual(path.sibling("rotated").getContent(), b"rq_id=one\n")


class _Webhook:
    """
    The counters and queue depth L{Metrics.watchWebhook} reads.
    """

    def __init__(self, sent: int, failed: int, dropped: int, queueDepth: int) -> None:
        self.sent, self.failed, self.dropped = sent, failed, dropped
        self.queueDepth = queueDepth


def _exercise(metrics: Metrics, webhook: _Webhook) -> None:
    """
    Touch every metric family of L{Metrics} once, the same way each time.
    """
    metrics.requestDone("http", None, 10, 200)
    metrics.requestDone("http", 1000, 0, 0)
    metrics.requestDone("connect", None, 5, 7, report=True)
    metrics.listenerConnections("tcp:9090").inc()
    metrics.tunnels.inc()
    metrics.connectTime.observe(0.003)
    metrics.dnsTime.observe(0.02)
    metrics.resolverDenials.labels("private_range").inc()
    metrics.gateLatency.observe(0.1)
    metrics.gateOutcomes.labels("accept").inc()
    metrics.authFailures.inc()
    metrics.aclDecisions.labels("svc", "proj", "allow").inc()
    metrics.tlsFailures.labels("handshake").inc()
    metrics.reloadFailures.labels("listener").inc()
    metrics.watchWebhook(webhook)


def _single(webhook: _Webhook) -> Metrics:
    """
    The metrics of one process, with prometheus-client's ordinary values,
    exercised by L{_exercise}.
    """
    from prometheus_client import values

    patched = values.ValueClass
    values.ValueClass = values.MutexValue
    try:
        metrics = Metrics()
        _exercise(metrics, webhook)
    finally:
        values.ValueClass = patched
    return metrics


def _families(registry: Any) -> dict[str, tuple[str, dict[tuple, float]]]:
    """
    A registry's families by name: the type, and the value of each sample
    by its name and labels (no C{_created} samples, which the sums of
    several processes do not have).
    """
    result = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for s in family.samples
            if not s.name.endswith("_created")
        }
        if family.name.endswith("_created"):
            # The text format shows labelled counters' _created apart.
            continue
        result[family.name] = (family.type, samples)
    return result


class MultiprocessTests(SynchronousTestCase):
    """
    With --workers, the metrics of every worker, summed by the supervisor
    (L{instanceRegistry}).  prometheus-client's multiprocess mode is turned
    on in this process as its own tests do it: a value class keyed by a
    process id the test sets, writing in a directory of the test's.
    """

    def setUp(self) -> None:
        from prometheus_client import values

        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.pid = 1001
        valueClass = values.MultiProcessValue(lambda: self.pid)
        self.addCleanup(valueClass.close_all_files)
        self.patch(values, "ValueClass", valueClass)
        self.patch(
            os, "environ", dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self.directory)
        )
        self.assertTrue(multiprocessValues())

    def instance(self, processes: dict[str, int] | None = None) -> Any:
        return instanceRegistry(lambda: self.directory, lambda: processes or {})

    def test_sums(self) -> None:
        """
        Two workers' counters, histograms, live gauges and webhook figures
        add up in the supervisor's registry; a worker that ended keeps its
        counters in the sums and no longer counts in the gauges.
        """
        first = Metrics(multiprocess=True)
        _exercise(first, _Webhook(sent=2, failed=0, dropped=1, queueDepth=4))
        first.syncMirror()
        self.pid = 1002
        second = Metrics(multiprocess=True)
        _exercise(second, _Webhook(sent=5, failed=1, dropped=0, queueDepth=1))
        second.listenerConnections("tcp:9090").inc()
        second.syncMirror()

        registry = self.instance()
        value = registry.get_sample_value
        self.assertEqual(
            value(
                "egressproxy_requests_total",
                {"proxy_type": "http", "decision": "allow", "reason_code": ""},
            ),
            2,
        )
        self.assertEqual(
            value(
                "egressproxy_requests_total",
                {"proxy_type": "connect", "decision": "report", "reason_code": ""},
            ),
            2,
        )
        self.assertEqual(
            value("egressproxy_bytes_total", {"direction": "down"}), 2 * 207
        )
        self.assertEqual(value("egressproxy_upstream_connect_seconds_count"), 2)
        self.assertEqual(
            value("egressproxy_upstream_connect_seconds_bucket", {"le": "0.005"}), 2
        )
        self.assertEqual(
            value("egressproxy_active_client_connections", {"listener": "tcp:9090"}),
            3,
        )
        self.assertEqual(value("egressproxy_active_tunnels"), 2)
        self.assertEqual(
            value("egressproxy_webhook_events_total", {"outcome": "sent"}), 7
        )
        self.assertEqual(
            value("egressproxy_webhook_events_total", {"outcome": "dropped"}), 1
        )
        self.assertEqual(value("egressproxy_webhook_queue_depth"), 5)
        self.assertIsNotNone(value("python_gc_collections_total", {"generation": "0"}))

        mark_process_dead(1001, self.directory)
        self.assertEqual(
            value(
                "egressproxy_requests_total",
                {"proxy_type": "http", "decision": "allow", "reason_code": ""},
            ),
            2,
        )
        self.assertEqual(
            value("egressproxy_active_client_connections", {"listener": "tcp:9090"}),
            2,
        )
        self.assertEqual(value("egressproxy_active_tunnels"), 1)
        self.assertEqual(value("egressproxy_webhook_queue_depth"), 1)

    def test_mirrorCopiesGrowth(self) -> None:
        """
        Copying the webhook's counters again adds only what they grew by
        since; its queue depth is set to what it is now.
        """
        metrics = Metrics(multiprocess=True)
        webhook = _Webhook(sent=2, failed=0, dropped=0, queueDepth=4)
        metrics.watchWebhook(webhook)
        metrics.syncMirror()
        metrics.syncMirror()
        webhook.sent, webhook.queueDepth = 5, 0
        metrics.syncMirror()
        value = self.instance().get_sample_value
        self.assertEqual(
            value("egressproxy_webhook_events_total", {"outcome": "sent"}), 5
        )
        self.assertEqual(value("egressproxy_webhook_queue_depth"), 0)

    def test_sameFamilies(self) -> None:
        """
        Every family one process exports appears in the supervisor's page
        with the same name, type and labels, and, for one worker that saw
        the same as the one process, the same values; the process metrics
        gain the label worker, for the supervisor and each worker.
        """
        single = _single(_Webhook(sent=2, failed=1, dropped=1, queueDepth=4))
        worker = Metrics(multiprocess=True)
        _exercise(worker, _Webhook(sent=2, failed=1, dropped=1, queueDepth=4))
        worker.syncMirror()
        expected = _families(single.registry)
        got = _families(self.instance({"0": os.getpid()}))
        self.assertEqual(sorted(expected), sorted(got))
        for name, (kind, samples) in expected.items():
            self.assertEqual(got[name][0], kind, name)
            if name.startswith("egressproxy_"):
                self.assertEqual(got[name][1], samples, name)
            elif name.startswith("process_"):
                self.assertEqual(
                    {(sample, labels) for sample, labels in got[name][1]},
                    {
                        (sample, labels + (("worker", worker),))
                        for sample, labels in samples
                        for worker in ("0", "supervisor")
                    },
                    name,
                )
            else:
                self.assertEqual(set(got[name][1]), set(samples), name)


def _oldTextValue(value: Any) -> str:
    """
    How access and decision lines wrote a value before issue #19 (the
    reference the faster formatter must agree with, byte for byte).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text)
    return text


def _oldText(fields: tuple[str, ...], event: dict[str, Any]) -> str:
    parts = []
    for name in fields:
        value = event.get(name)
        if value is None:
            continue
        parts.append(f"{name}={_oldTextValue(value)}")
    return " ".join(parts) + "\n"


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(),
    st.sampled_from(["", " ", '"', "=", "\\", "a b", "\x00", "é", "GET"]),
)


# One to five rows of decision-line values of any type.
_decisionRows = st.lists(
    st.lists(_values, min_size=len(DECISION_FIELDS), max_size=len(DECISION_FIELDS)),
    min_size=1,
    max_size=5,
)


class LineFormatTests(SynchronousTestCase):
    """
    The lines keep their content and format exactly (issue #19).
    """

    @given(
        st.lists(_values, min_size=len(DECISION_FIELDS), max_size=len(DECISION_FIELDS))
    )
    def test_textAsBefore(self, values: list[Any]) -> None:
        """
        The generated text formatter writes any values as the formatter
        before issue #19 did.
        """
        event = dict(zip(DECISION_FIELDS, values, strict=True))
        self.assertEqual(
            textFormatter(DECISION_FIELDS)(event), _oldText(DECISION_FIELDS, event)
        )

    @given(_decisionRows)
    def test_writerAnyValues(self, lines: list[list[Any]]) -> None:
        """
        The line writer, given values of any type in any field, writes the
        line the formatter before issue #19 wrote from the values the
        record shows (rounded where the field's kind rounds), also for a
        value seen before, and for 1, 1.0 and True, which are equal as
        keys of its memories.
        """
        line = lineWriter(DECISION_FIELDS, DECISION_KINDS)
        asFields = recordFields(DECISION_FIELDS, DECISION_KINDS)
        width = len(DECISION_FIELDS)
        lines = lines + lines + [[1] * width, [1.0] * width, [True] * width]
        for values in lines:
            self.assertEqual(
                line(*values), _oldText(DECISION_FIELDS, asFields(*values))
            )

    @given(
        st.lists(
            st.tuples(
                st.text(),
                st.sampled_from(["127.0.0.1:1234", "[::1]:80", ""]),
                st.sampled_from([b"GET", b"POST", b"M\xff", b""]),
                st.sampled_from(["http://a.example/", "http://a.example/?q=a b"]),
                st.one_of(st.none(), st.integers(100, 599)),
                st.floats(min_value=-1, max_value=1e10),
                st.integers(0, 2**40),
                st.integers(0, 2**40),
                st.one_of(st.none(), st.integers(1000, 1020)),
                st.one_of(st.none(), st.text()),
                st.one_of(st.none(), st.sampled_from(["svc", "a b", ""])),
                st.none(),
                st.none(),
            ),
            min_size=1,
            max_size=5,
        )
    )
    def test_writerAccessLines(self, lines: list[tuple[Any, ...]]) -> None:
        """
        Access lines written from the values the proxy passes (the
        method's bytes, unrounded seconds) are the lines of the fields the
        proxy recorded before: the method decoded, the time rounded to
        microseconds.
        """
        line = lineWriter(ACCESS_FIELDS, ACCESS_KINDS)
        for values in lines + lines:
            fields = dict(zip(ACCESS_FIELDS, values, strict=True))
            fields["method"] = values[2].decode("ascii", "replace")
            fields["response_time"] = round(values[5], 6)
            self.assertEqual(line(*values), _oldText(ACCESS_FIELDS, fields))

    @given(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([3, 6]))
    def test_decimal(self, value: float, places: int) -> None:
        """
        The shorter way to a rounded float's text gives C{str(round(v, n))}.
        """
        self.assertEqual(_decimal(value, places), str(round(value, places)))

    def test_decimalEdges(self) -> None:
        """
        Rounded floats whose shortest text has an exponent, ties, and the
        bounds of the fixed-point way are written as C{str(round(v, n))}.
        """
        for value in [
            0.0,
            -0.0,
            1e-4,
            0.0000999996,
            0.00009999949,
            0.0000125,
            0.0001235,
            2.5e-7,
            99999999.9999995,
            1e8,
            0.1 + 0.2,
            1.0000005,
            123.4564999999,
        ]:
            for places in (3, 6):
                self.assertEqual(_decimal(value, places), str(round(value, places)))
        self.assertEqual(_decimal(0.000012, 6), "1.2e-05")
        self.assertEqual(_decimal(2.0, 6), "2.0")

    def test_writerBounded(self) -> None:
        """
        The remembered texts of a repeating field are bounded: past the
        bound they are forgotten, and lines stay right.
        """
        line = lineWriter(("url",), ("text",))
        written = [line(f"http://a.example/{i}") for i in range(600)]
        written.append(line("http://a.example/1"))
        self.assertEqual(written[-1], "url=http://a.example/1\n")
        self.assertEqual(written[599], "url=http://a.example/599\n")
        cache = line.__globals__["cache_0_0"]  # type: ignore[attr-defined]
        self.assertLessEqual(len(cache), 256)
        self.assertGreater(len(cache), 0)

    @given(
        st.lists(_values, min_size=len(ACCESS_FIELDS), max_size=len(ACCESS_FIELDS)),
        st.lists(_values, min_size=len(DECISION_FIELDS), max_size=len(DECISION_FIELDS)),
        st.floats(min_value=0, max_value=4e9),
    )
    def test_linesAsEach(
        self, access: list[Any], decision: list[Any], when: float
    ) -> None:
        """
        L{linesWriter}'s function writes each of its lines as the formatter
        before issue #19 wrote it, for values of any type, when
        the lines share expressions (the request id, read and checked once
        for both; an address) and when the second has the process log's
        time stamp; twice in a row (remembered texts).
        """
        stamp = TextProcessLog(io.StringIO()).formatTime
        stamping = dict(stamp=stamp, now=lambda: when, system="s#info")
        accessSources = [f"a[{i}]" for i in range(len(ACCESS_FIELDS))]
        decisionSources = [f"d[{i}]" for i in range(len(DECISION_FIELDS))]
        # The decision line's id and inbound address are the access line's
        # request id and client address, as in the proxy.
        decisionSources[DECISION_FIELDS.index("id")] = "a[0]"
        inbound = DECISION_FIELDS.index("inbound_remote_addr")
        decisionSources[inbound] = "a[1]"
        decision[DECISION_FIELDS.index("id")] = access[0]
        decision[inbound] = access[1]
        both = linesWriter(
            (
                LineSpec(ACCESS_FIELDS, ACCESS_KINDS, accessSources),
                LineSpec(DECISION_FIELDS, DECISION_KINDS, decisionSources, **stamping),
            ),
            arguments="a, d",
        )
        accessFields = recordFields(ACCESS_FIELDS, ACCESS_KINDS)(*access)
        decisionFields = recordFields(DECISION_FIELDS, DECISION_KINDS)(*decision)
        expected = (
            _oldText(ACCESS_FIELDS, accessFields),
            f"{stamp(when)} [s#info] " + _oldText(DECISION_FIELDS, decisionFields),
        )
        self.assertEqual(both(access, decision), expected)
        self.assertEqual(both(access, decision), expected)

    @given(_decisionRows, st.floats(min_value=0, max_value=4e9))
    def test_stampedAsBefore(self, lines: list[list[Any]], when: float) -> None:
        """
        Lines for the process log begin with the time stamp of their event
        and the system, as twistd's text observer wrote them before issue
        #19, whether a string needs quoting or not, and for a subclass of
        C{str}.
        """

        class Text(str):
            pass

        stamp = TextProcessLog(io.StringIO()).formatTime
        line = lineWriter(
            DECISION_FIELDS,
            DECISION_KINDS,
            stamp,
            lambda: when,
            "egressproxy.decision#info",
        )
        asFields = recordFields(DECISION_FIELDS, DECISION_KINDS)
        width = len(DECISION_FIELDS)
        lines = lines + lines + [["x"] * width, [Text("a b")] * width]
        for values in lines:
            self.assertEqual(
                line(*values),
                f"{stamp(when)} [egressproxy.decision#info] "
                + _oldText(DECISION_FIELDS, asFields(*values)),
            )

    def test_processLogLines(self) -> None:
        """
        Decision lines for the process log carry the time of their event,
        as twistd's text observer writes the line, and wait for the batch.
        """
        out = io.StringIO()
        clock = Clock()
        clock.advance(1700000000.5)
        processLog = TextProcessLog(out, now=clock.seconds)
        processLog.batchWrites(clock)
        decisions = DecisionLog.toProcessLog(processLog)
        decisions.record(msg="CANONICAL-PROXY-DECISION", id="a", allow=True)
        clock.advance(0.75)
        decisions.record(msg="CANONICAL-PROXY-DECISION", id="b", allow=False)
        self.assertEqual(out.getvalue(), "")
        processLog.flush()
        stamp = TextProcessLog(io.StringIO()).formatTime
        self.assertEqual(
            out.getvalue(),
            f"{stamp(1700000000.5)} [egressproxy.decision#info] "
            "msg=CANONICAL-PROXY-DECISION id=a allow=true\n"
            f"{stamp(1700000001.25)} [egressproxy.decision#info] "
            "msg=CANONICAL-PROXY-DECISION id=b allow=false\n",
        )

    def test_processLogInstalledLater(self) -> None:
        """
        Until the process log is installed, decision lines are events of
        the global log; once it is, they go into its buffer.
        """
        out = io.StringIO()
        processLog = TextProcessLog(None)
        decisions = DecisionLog.toProcessLog(processLog)
        self.assertIsNone(decisions.fastSink)
        values = {"msg": "CANONICAL-PROXY-DECISION", "id": "a"}
        with capturedLogs() as events:
            decisions.record(**values)
        self.assertEqual([e.get("id") for e in events], ["a"])
        processLog.install(out)
        self.assertIs(decisions.fastSink, processLog.buffer)
        with capturedLogs() as events:
            decisions.record(**values)
        self.assertEqual(events, [])
        processLog.flush()
        self.assertIn("msg=CANONICAL-PROXY-DECISION id=a\n", out.getvalue())

    def test_directAsPublished(self) -> None:
        """
        A line written straight from its fields (only the file listens) is
        the line written through the publisher (another observer listens).
        """
        fields = dict(
            rq_id="r-1",
            client_addr="127.0.0.1:5",
            method="GET",
            url="http://a.example/x y",
            response_code=200,
            response_time=0.25,
            bytes_up=0,
            bytes_down=7,
            error='a "b"',
        )
        for format in ("text", "json"):
            direct, published = io.StringIO(), io.StringIO()
            AccessLog(direct, format).record(**fields)
            log = AccessLog(published, format)
            events: list[dict[str, Any]] = []
            log.addObserver(events.append)
            log.record(**fields)
            self.assertEqual(len(events), 1)
            if format == "json":
                one, two = (
                    json.loads(direct.getvalue()),
                    json.loads(published.getvalue()),
                )
                self.assertIsInstance(one.pop("time"), float)
                self.assertIsInstance(two.pop("time"), float)
                self.assertEqual(one, two)
            else:
                self.assertEqual(direct.getvalue(), published.getvalue())
                self.assertEqual(direct.getvalue(), _oldText(ACCESS_FIELDS, fields))


class TextProcessLogTests(SynchronousTestCase):
    """
    The text process log the proxy writes itself: twistd's format, byte for
    byte, with decision lines batched.
    """

    def test_eventsAsTwistd(self) -> None:
        """
        Events are written as L{textFileLogObserver} writes them, the time
        stamp included (also a time datetime rounds up to the next second,
        and one with no time), and each at once.
        """
        ours, theirs = io.StringIO(), io.StringIO()
        observer = TextProcessLog(ours)
        reference = textFileLogObserver(theirs)
        for when in (1700000000.25, 1700000000.9999997, 1700000001.0, None):
            event = dict(
                log_format="Hello {who}\nthere",
                who="x",
                log_namespace="a.b",
                log_level=LogLevel.warn,
            )
            if when is not None:
                event["log_time"] = when
            observer(event)
            reference(event)
            self.assertEqual(ours.getvalue(), theirs.getvalue())

    def test_decisionLineAsBefore(self) -> None:
        """
        A decision line written through the process log's buffer is the line
        twistd's text observer wrote for the event the decision log emitted
        before (issue #19).
        """
        fields = dict(
            msg="CANONICAL-PROXY-DECISION",
            id="r-1",
            proxy_type="connect",
            requested_host="a.example:443",
            decision_reason="Egress ACL is not configured",
            enforce_would_deny=False,
            allow=True,
            inbound_remote_addr="127.0.0.1:5",
            dns_lookup_time_ms=0.5,
            status_code=200,
        )
        when = 1700000000.5
        ours = io.StringIO()
        decisions = DecisionLog.toProcessLog(TextProcessLog(ours, now=lambda: when))
        decisions.record(**fields)

        theirs = io.StringIO()
        reference = textFileLogObserver(theirs)
        before = DecisionLog.toProcessLog()

        def stamped(event: dict[str, Any]) -> None:
            event["log_time"] = when
            reference(event)

        with capturedLogs() as events:
            before.record(**fields)
        for event in events:
            stamped(event)
        self.assertEqual(ours.getvalue(), theirs.getvalue())
        self.assertTrue(ours.getvalue().endswith(_oldText(DECISION_FIELDS, fields)))

    def test_batched(self) -> None:
        """
        Batched, decision lines wait until the timer (armed by the first
        line) fires, or until the buffer holds its most lines; another
        event is written at once, after the lines that waited; flush()
        (as at shutdown) writes the rest.  Each batch is one write.
        """
        clock = Clock()
        out = io.StringIO()
        writes: list[str] = []
        write = out.write

        def counted(text: str) -> int:
            writes.append(text)
            return write(text)

        out.write = counted  # type: ignore[method-assign]
        processLog = TextProcessLog(out, now=clock.seconds)
        processLog.batchWrites(clock, interval=1.0)
        processLog.buffer._maxLines = 3
        processLog.addLine("d#info", "one\n")
        processLog.addLine("d#info", "two\n")
        self.assertEqual(out.getvalue(), "")
        clock.advance(0.5)
        self.assertEqual(out.getvalue(), "")
        clock.advance(0.5)
        self.assertEqual(len(writes), 1)
        self.assertEqual(
            [line.split(" ", 1)[1] for line in out.getvalue().splitlines()],
            ["[d#info] one", "[d#info] two"],
        )
        for text in ("3\n", "4\n", "5\n"):
            processLog.addLine("d#info", text)
        self.assertEqual(len(writes), 2)
        self.assertEqual(clock.getDelayedCalls(), [])
        processLog.addLine("d#info", "6\n")
        processLog(dict(log_format="other", log_namespace="x", log_level=LogLevel.info))
        self.assertEqual(len(writes), 3)
        self.assertEqual(
            [line.split(" ", 1)[1] for line in writes[-1].splitlines()],
            ["[d#info] 6", "[x#info] other"],
        )
        processLog.addLine("d#info", "7\n")
        decisions = DecisionLog.toProcessLog(processLog)
        decisions.stop()
        self.assertTrue(out.getvalue().endswith("[d#info] 7\n"))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_fileLogsBatched(self) -> None:
        """
        A file log's lines wait for the timer too, and at most the bound.
        """
        clock = Clock()
        out = io.StringIO()
        log = AccessLog(out, "text")
        log.batchWrites(clock, interval=2.0)
        log.record(rq_id="one")
        clock.advance(1.9)
        self.assertEqual(out.getvalue(), "")
        clock.advance(0.1)
        self.assertEqual(out.getvalue(), "rq_id=one\n")
        for i in range(256):
            log.record(rq_id=str(i))
        self.assertEqual(len(out.getvalue().splitlines()), 257)
