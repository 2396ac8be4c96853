"""
What the proxy tells operators: the access log, one line per request or
tunnel, and the Prometheus metrics.

The access log is a L{twisted.logger} publisher of its own, so its lines go
only where the operator sent them (a file or standard output), as text or
as one JSON object a line, and never mix with the process log's format.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any, cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client import values as prometheusValues
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger, LogPublisher
from twisted.web.resource import Resource
from zope.interface import implementer

from proxy_app.reasons import DENIALS

log = Logger()

# The fields of an access-log line, in the order text lines show them.
# The first six are webhook-sentry's.
ACCESS_FIELDS = (
    "rq_id",
    "client_addr",
    "method",
    "url",
    "response_code",
    "response_time",
    "bytes_up",
    "bytes_down",
    "reason_code",
    "error",
    "role",
    "client_cn",
    "client_ou",
)


# The fields of Smokescreen's canonical decision lines.
DECISION_FIELDS = (
    "msg",
    "id",
    "proxy_type",
    "requested_host",
    "role",
    "project",
    "decision_reason",
    "address_rule",
    "enforce_would_deny",
    "allow",
    "report_only",
    "inbound_remote_addr",
    "outbound_remote_addr",
    "dns_lookup_time_ms",
    "conn_establish_time_ms",
    "status_code",
    "bytes_in",
    "bytes_out",
    "duration",
    "end_time",
    "error",
)


def _textValue(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text)
    return text


def textFormatter(fields: tuple[str, ...]) -> Any:
    """
    A formatter writing C{fields} of an event as C{key=value} pairs
    (logfmt), quoting values that need it.
    """

    def formatText(event: dict[str, Any]) -> str:
        parts = []
        for name in fields:
            value = event.get(name)
            if value is None:
                continue
            parts.append(f"{name}={_textValue(value)}")
        return " ".join(parts) + "\n"

    return formatText


def jsonFormatter(fields: tuple[str, ...]) -> Any:
    """
    A formatter writing C{fields} of an event as one JSON object, with the
    event's time.
    """

    def formatJSON(event: dict[str, Any]) -> str:
        record = {name: event[name] for name in fields if event.get(name) is not None}
        record["time"] = event.get("log_time")
        return json.dumps(record, separators=(",", ":")) + "\n"

    return formatJSON


@implementer(ILogObserver)
class _LineObserver:
    """
    Writes formatted lines to a file; flushes after each line unless
    C{batched}, when the owner flushes on a timer instead (one write system
    call per batch rather than per request).
    """

    def __init__(self, outFile: IO[str], formatter: Any) -> None:
        self.outFile = outFile
        self._formatter = formatter
        self.batched = False

    def __call__(self, event: dict[str, Any]) -> None:
        self.outFile.write(self._formatter(event))
        if not self.batched:
            self.outFile.flush()


class LineLog:
    """
    A log of one line per event, with a fixed set of fields, written to a
    file or standard output as text or JSON.

    @ivar publisher: the L{LogPublisher} lines are emitted to; tests add
        observers to it.
    """

    fields: tuple[str, ...] = ACCESS_FIELDS
    namespace = "egressproxy.access"

    def __init__(
        self, outFile: IO[str] | None, format: str = "text", path: str | None = None
    ) -> None:
        self.publisher = LogPublisher()
        self._log = Logger(namespace=self.namespace, observer=self.publisher)
        self._formatter = (
            jsonFormatter(self.fields)
            if format == "json"
            else textFormatter(self.fields)
        )
        self._path = path
        self._file = outFile
        self._observer: _LineObserver | None = None
        self._flusher: LoopingCall | None = None
        # Nothing is built per event while nobody listens (logs off).
        self.enabled = False
        if outFile is not None:
            self._observer = _LineObserver(outFile, self._formatter)
            self.addObserver(self._observer)

    def batchWrites(self, clock: Any, interval: float = 1.0) -> None:
        """
        Write lines in batches, flushed every C{interval} seconds on
        C{clock} (and on L{flush}), instead of one write per line.
        """
        if self._observer is None or self._flusher is not None:
            return
        self._observer.batched = True
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = clock
        self._flusher.start(interval, now=False)

    def flush(self) -> None:
        """
        Write out what is buffered.
        """
        if self._file is not None:
            try:
                self._file.flush()
            except (OSError, ValueError) as e:
                log.error(
                    "Cannot write log {path}: {error}", path=self._path or "-", error=e
                )

    def stop(self) -> None:
        """
        Stop the batching timer and flush.
        """
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
        self.flush()

    def addObserver(self, observer: Any) -> None:
        """
        Send this log's events to C{observer} too.
        """
        self.publisher.addObserver(observer)
        self.enabled = True

    @classmethod
    def open(cls, path: str, format: str) -> Any:
        """
        Open the log at C{path} (C{-} is standard output, C{none} turns it
        off) for appending.
        """
        if path == "-":
            return cls(sys.stdout, format)
        if path.lower() == "none":
            return cls(None, format)
        return cls(open(path, "a", encoding="utf-8"), format, path)

    def reopen(self) -> None:
        """
        Reopen the log file (after logrotate moved it); standard output is
        left alone.
        """
        if self._path is None:
            return
        try:
            newFile = open(self._path, "a", encoding="utf-8")
        except OSError as e:
            log.error("Cannot reopen log {path}: {error}", path=self._path, error=e)
            return
        batched = self._observer is not None and self._observer.batched
        if self._observer is not None:
            self.publisher.removeObserver(self._observer)
        if self._file is not None:
            self._file.close()
        self._file = newFile
        self._observer = _LineObserver(newFile, self._formatter)
        self._observer.batched = batched
        self.addObserver(self._observer)
        log.info("Reopened log {path}", path=self._path)

    def record(self, **fields: Any) -> None:
        """
        Write one line with the given fields.
        """
        if self.enabled:
            self._log.info(self.namespace, **fields)


class AccessLog(LineLog):
    """
    The access log: one line per request or tunnel, with webhook-sentry's
    fields.
    """


class DecisionLog(LineLog):
    """
    Smokescreen's canonical decision lines: C{CANONICAL-PROXY-DECISION} for
    each request or tunnel, C{CANONICAL-PROXY-CN-CLOSE} when a tunnel
    closes.  Without a file of its own (L{toProcessLog}) each line goes to
    the process log, with its fields as the event's keys.
    """

    fields = DECISION_FIELDS
    namespace = "egressproxy.decision"

    @classmethod
    def toProcessLog(cls) -> DecisionLog:
        decisions = cls(None)
        text = textFormatter(DECISION_FIELDS)
        processLog = Logger(namespace=cls.namespace)

        def forward(event: dict[str, Any]) -> None:
            fields = {k: event[k] for k in DECISION_FIELDS if k in event}
            processLog.info("{line}", line=text(event).rstrip("\n"), **fields)

        decisions.addObserver(cast(ILogObserver, forward))
        return decisions


# Metrics.

# Reason codes that mean the proxy said no, as opposed to a destination
# that failed.
DENIAL_CODES = frozenset(int(reason) for reason in DENIALS)

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def multiprocessValues() -> bool:
    """
    Whether prometheus-client keeps metric values in its multiprocess mode's
    files (C{PROMETHEUS_MULTIPROC_DIR} was set when it was imported), as in
    a worker of C{--workers}.
    """
    return bool(getattr(prometheusValues.ValueClass, "_multiprocess", False))


class Metrics:
    """
    The proxy's Prometheus metrics, in an injected registry.

    Labels are kept low in cardinality: no host names and no client
    addresses.  Roles are bounded by the ACL file, so they may label.

    In a worker of C{--workers} (C{multiprocess}), the counters, histograms
    and gauges write their values to prometheus-client's multiprocess files,
    which the supervisor reads (L{instanceRegistry}); gauges are summed over
    the live workers there.  What collectors read at scrape time in one
    process (garbage collection, the webhook's counters and queue) cannot be
    read from another, so the worker copies it into such files every second
    (L{syncMirror}); the process metrics the supervisor reads from C{/proc}
    for every worker itself.

    @ivar mirrored: the registry of the collectors L{syncMirror} copies.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        process: bool = True,
        multiprocess: bool = False,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess = multiprocess
        self.mirrored = CollectorRegistry(auto_describe=False)
        self._mirror = _Mirror(self.mirrored)
        r = self.registry
        if multiprocess:
            GCCollector(registry=self.mirrored)
        elif process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.requests = Counter(
            "egressproxy_requests",
            "Forwarded requests and CONNECT tunnels, by outcome: decision is "
            "deny (the proxy refused), report (allowed by an ACL rule in "
            "report mode that enforce would deny) or allow.",
            ["proxy_type", "decision", "reason_code"],
            registry=r,
        )
        # With --workers, the instance's value is the sum over the workers
        # alive (multiprocess_mode has no effect in one process).
        self.connections = Gauge(
            "egressproxy_active_client_connections",
            "Open client connections, per listener.",
            ["listener"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self._listenerConnections: dict[str, Any] = {}
        self.tunnels = Gauge(
            "egressproxy_active_tunnels",
            "Established CONNECT tunnels.",
            registry=r,
            multiprocess_mode="livesum",
        )
        # What /healthcheck's 503 says, as a sample: alerts and dashboards
        # see a drain (and one that does not end) without probing.
        self.draining = Gauge(
            "egressproxy_draining",
            "1 from SIGTERM until the process exits (new requests are refused, "
            "in-flight ones finish), else 0.",
            registry=r,
            # Under --workers: draining if any worker is.
            multiprocess_mode="max",
        )
        self.bytes = Counter(
            "egressproxy_bytes",
            "Payload bytes relayed: up is client to destination, down the reverse.",
            ["direction"],
            registry=r,
        )
        self._bytesUp = self.bytes.labels("up")
        self._bytesDown = self.bytes.labels("down")
        self._requestChildren: dict[tuple[str, int | None, bool], Any] = {}
        self.connectTime = Histogram(
            "egressproxy_upstream_connect_seconds",
            "Time to connect to the destination (TLS handshake included).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.dnsTime = Histogram(
            "egressproxy_dns_lookup_seconds",
            "Time to resolve a destination name (IP literals are not counted).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.resolverDenials = Counter(
            "egressproxy_resolver_denials",
            "Destination addresses the address policy refused, by rule.",
            ["rule"],
            registry=r,
        )
        self.gateLatency = Histogram(
            "egressproxy_access_request_seconds",
            "Time the access-request gate took to decide.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.gateOutcomes = Counter(
            "egressproxy_access_request_outcomes",
            "Access-request gate outcomes: accept or reject.",
            ["outcome"],
            registry=r,
        )
        self.reloadFailures = Counter(
            "egressproxy_reload_failures",
            "Reloads (SIGHUP, or a watched file that changed) whose files did "
            "not load, by part: acl, credentials, listener (a TLS listener's "
            "certificate, key, client CA or CRL), origination (the trust root "
            "and client certificates), destinations (the configuration file's "
            "destination rules); the old state stays in force.",
            ["what"],
            registry=r,
        )
        self.authFailures = Counter(
            "egressproxy_proxy_auth_failures",
            "Requests with wrong or malformed proxy credentials (missing "
            "credentials are not counted).",
            registry=r,
        )
        self.aclDecisions = Counter(
            "egressproxy_acl_decisions",
            "ACL decisions by the rule that matched (a service name or "
            "default), its project, and the outcome: allow, report (allowed, "
            "enforce would deny) or deny.",
            ["rule", "project", "decision"],
            registry=r,
        )
        self.tlsFailures = Counter(
            "egressproxy_tls_origination_failures",
            "Failed TLS originations, by kind: handshake, certificate, timeout.",
            ["kind"],
            registry=r,
        )

    def watchWebhook(self, webhook: Any) -> None:
        """
        Export the webhook's delivery counters and queue depth.
        """
        collector = _WebhookCollector(webhook)
        self.registry.register(collector)
        if self.multiprocess:
            self.mirrored.register(collector)

    def syncMirror(self) -> None:
        """
        Copy what the L{mirrored} collectors say now into the multiprocess
        files, for the supervisor's scrapes.
        """
        self._mirror.sync()

    def listenerConnections(self, listener: str) -> Any:
        """
        The gauge of open client connections on C{listener}, looked up once.
        """
        gauge = self._listenerConnections.get(listener)
        if gauge is None:
            gauge = self._listenerConnections[listener] = self.connections.labels(
                listener
            )
        return gauge

    def requestDone(
        self,
        proxyType: str,
        reasonCode: int | None,
        bytesUp: int,
        bytesDown: int,
        report: bool = False,
    ) -> None:
        """
        Count one finished request or tunnel.

        @param report: it went through under an ACL rule in report mode
            that enforce mode would have denied.
        """
        key = (proxyType, reasonCode, report)
        child = self._requestChildren.get(key)
        if child is None:
            if reasonCode in DENIAL_CODES:
                decision = "deny"
            else:
                decision = "report" if report else "allow"
            # A handful of label sets, looked up once each: labels() takes
            # a lock and validates every time.
            child = self._requestChildren[key] = self.requests.labels(
                proxyType, decision, str(reasonCode or "")
            )
        child.inc()
        if bytesUp:
            self._bytesUp.inc(bytesUp)
        if bytesDown:
            self._bytesDown.inc(bytesDown)


class _Mirror:
    """
    Copies the families of a registry's scrape-time collectors into metrics
    of prometheus-client's multiprocess mode: a counter is raised by what
    it grew since the last copy, a gauge is set (and summed over the live
    workers by the supervisor).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._metrics: dict[str, Any] = {}
        self._children: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        self._copied: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def sync(self) -> None:
        for family in self.registry.collect():
            if family.type not in ("counter", "gauge"):
                continue
            for sample in family.samples:
                if family.type == "counter" and not sample.name.endswith("_total"):
                    # _created: the supervisor's sums have none.
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                child = self._children.get(key)
                if child is None:
                    child = self._children[key] = self._child(family, sample.labels)
                if family.type == "gauge":
                    child.set(sample.value)
                    continue
                grown = sample.value - self._copied.get(key, 0.0)
                if grown > 0:
                    child.inc(grown)
                    self._copied[key] = sample.value

    def _child(self, family: Metric, labels: Mapping[str, str]) -> Any:
        metric = self._metrics.get(family.name)
        if metric is None:
            names = sorted(labels)
            if family.type == "counter":
                metric = Counter(
                    family.name, family.documentation, names, registry=None
                )
            else:
                metric = Gauge(
                    family.name,
                    family.documentation,
                    names,
                    registry=None,
                    multiprocess_mode="livesum",
                )
            self._metrics[family.name] = metric
        return metric.labels(**labels) if labels else metric


class _WorkerProcesses(Collector):
    """
    The C{process_*} metrics of the supervisor and of every worker, read
    from C{/proc}, each labelled C{worker} (C{supervisor}, C{0}, C{1}, ...):
    a file-descriptor limit or a memory size means something per process,
    and C{sum} gives the instance's.
    """

    def __init__(self, processes: Callable[[], Mapping[str, int]]) -> None:
        self._processes = processes
        self._collectors: dict[int | str, ProcessCollector] = {}

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        wanted: dict[str, int | str] = {"supervisor": "self"}
        wanted.update(self._processes())
        collectors = {}
        for name, pid in wanted.items():
            collector = self._collectors.get(pid)
            if collector is None:
                collector = ProcessCollector(pid=_constant(pid), registry=None)
            collectors[pid] = collector
            for family in collector.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                for sample in family.samples:
                    merged.add_sample(
                        sample.name, {**sample.labels, "worker": name}, sample.value
                    )
        # Ended workers' collectors go.
        self._collectors = collectors
        yield from families.values()


def _constant(value: int | str) -> Callable[[], int | str]:
    return lambda: value


class _WorkerFiles(Collector):
    """
    The sums of what the workers wrote in prometheus-client's multiprocess
    files, in the directory C{directory()} names (none: nothing).
    """

    def __init__(self, directory: Callable[[], str | None]) -> None:
        self._directory = directory

    def collect(self) -> Iterator[Metric]:
        path = self._directory()
        if path is None:
            return
        try:
            yield from MultiProcessCollector.merge(
                glob.glob(os.path.join(path, "*.db")), accumulate=True
            )
        except FileNotFoundError:
            # The directory went while the supervisor stops.
            return


def instanceRegistry(
    directory: Callable[[], str | None], processes: Callable[[], Mapping[str, int]]
) -> CollectorRegistry:
    """
    The registry the supervisor of C{--workers} serves: the proxy's metrics
    summed over its workers, and the process metrics of every process.

    @param directory: gives the directory the workers write their metrics
        in, or L{None}.
    @param processes: gives the process id of each running worker, by index.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_WorkerFiles(directory))
    registry.register(_WorkerProcesses(processes))
    PlatformCollector(registry=registry)
    return registry


class _WebhookCollector(Collector):
    """
    Reads the webhook service's counters at scrape time.
    """

    def __init__(self, webhook: Any) -> None:
        self.webhook = webhook

    def collect(self) -> Any:
        events = CounterMetricFamily(
            "egressproxy_webhook_events",
            "Control-webhook POSTs by outcome: sent (2xx), failed (given up), "
            "dropped (queue full or left at shutdown).",
            labels=["outcome"],
        )
        for outcome in ("sent", "failed", "dropped"):
            events.add_metric([outcome], getattr(self.webhook, outcome))
        yield events
        yield GaugeMetricFamily(
            "egressproxy_webhook_queue_depth",
            "Events waiting to be sent, being retried or in flight.",
            value=self.webhook.queueDepth,
        )


class MetricsResource(Resource):
    """
    C{/metrics} in Prometheus' text format; C{/healthcheck}, which answers
    503 while the proxy drains (for readiness and load balancers); and
    C{/livez}, which answers 200 whenever the reactor serves it, draining
    or not (for a liveness probe, which must not kill a draining proxy).

    @ivar healthy: a callable saying whether the proxy accepts connections.
    @ivar reason: a callable giving the body of a 503, in a few words.
    """

    isLeaf = True

    def __init__(
        self,
        registry: CollectorRegistry,
        healthy: Callable[[], bool],
        reason: Callable[[], str | None] | None = None,
    ) -> None:
        super().__init__()
        self.registry = registry
        self.healthy = healthy
        self.reason = reason

    def render_GET(self, request: Any) -> bytes:
        if request.path == b"/metrics":
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
            return generate_latest(self.registry)
        if request.path == b"/healthcheck":
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            if self.healthy():
                return b"ok\n"
            request.setResponseCode(503)
            reason = (self.reason() if self.reason is not None else None) or "draining"
            return reason.encode("utf-8") + b"\n"
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        if request.path == b"/livez":
            return b"alive\n"
        request.setResponseCode(404)
        return b"not found: try /metrics, /healthcheck or /livez\n"
