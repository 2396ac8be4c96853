"""
Accounting: what happened to each exchange, fanned out to the sinks that
record it.

An exchange produces one record, itself: no copy is made, since a request
on the Deferred-free path should allocate nothing it need not.  The fields
observers read are the exchange's (L{proxy_app.exchange.Exchange} lists
them).  The exchange calls each L{IExchangeObserver} in
L{ProxyFactory.observers <proxy_app.channel.ProxyFactory>}, in this order:
the control webhook's events, the metrics, the access and decision logs;
it imports none of them.

Each observer reads its sink from the factory when it is called, so that
a sink swapped while the proxy runs (or by a test) is the one written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from zope.interface import implementer

from proxy_app.interfaces import IExchangeObserver
from proxy_app.observe import (
    AccessLog,
    LineLog,
    LineSpec,
    linesWriter,
    lineWriter,
    recordFields,
)
from proxy_app.reasons import DENIALS, Reason
from proxy_app.upstream import TLSHandshakeTimeout
from proxy_app.webhook import connectionInfoDetails, connectionStopInfo, sessionLabel

_TLS_FAILURES = {
    Reason.TLS_HANDSHAKE_FAILED: "handshake",
    Reason.CERTIFICATE_INVALID: "certificate",
}


def webhookSession(record: Any, address: str) -> str:
    """
    The control webhook's session label for C{record} going to
    C{address}.
    """
    return sessionLabel(
        record.protocol.peerHost,
        record.protocol.peerPort,
        address,
        record.target.port,
        record.originatesTLS,
        clientTLS=record.protocol.overTLS or record.intercepted,
    )


def observers(parts: Any) -> tuple[IExchangeObserver, ...]:
    """
    The proxy's observers, in the order they are told, reading their
    sinks from C{parts} (the factory); no metrics observer when nothing
    reads the metrics.
    """
    if not parts.metrics.counting:
        # Nothing reads the counts (--metrics none).
        return (WebhookObserver(parts), LogObserver(parts))
    return (
        WebhookObserver(parts),
        MetricsObserver(parts),
        LogObserver(parts),
    )


class _Observer:
    __slots__ = ("_parts",)

    def __init__(self, parts: Any) -> None:
        self._parts = parts

    def exchangeConnected(self, record: Any, host: str, reused: bool) -> None:
        pass

    def tunnelEstablished(self, record: Any) -> None:
        pass

    def exchangeEnded(self, record: Any) -> None:
        pass

    def tunnelClosed(self, record: Any) -> None:
        pass


@implementer(IExchangeObserver)
class WebhookObserver(_Observer):
    """
    smithproxy's C{connection-start}, C{connection-stop} and
    C{connection-info} events, through the factory's C{webhook}.  The
    record's C{session} and C{webhookStarted} are this observer's own.
    A request inside an intercepted tunnel has none: the tunnel is the
    session, and its C{connection-stop} lists the request's URL.
    """

    __slots__ = ()

    def exchangeConnected(self, record: Any, host: str, reused: bool) -> None:
        webhook = self._parts.webhook
        if webhook is None or record.finished or record.protocol.intercepted:
            return
        record.session = webhookSession(record, host)
        webhook.connectionStarted(record.connectionID, record.session)
        record.webhookStarted = True

    def exchangeEnded(self, record: Any) -> None:
        webhook = self._parts.webhook
        if webhook is None or record.protocol.intercepted:
            return
        # Taken even when no connection-stop is sent, so that they are not
        # counted toward the next exchange on the connection.
        bytesUp, bytesDown = record.wireCounts()
        started = record.webhookStarted
        if started:
            webhook.connectionStopped(
                record.connectionID,
                connectionStopInfo(
                    record.session,
                    record.policy,
                    bytesUp,
                    bytesDown,
                    sni=record.sni,
                    app=record.application,
                    details=record.details,
                ),
            )
        details = connectionInfoDetails(
            record.statistics if started else None, record.gateResult
        )
        if details:
            webhook.connectionInfo(record.connectionID, details)


@implementer(IExchangeObserver)
class MetricsObserver(_Observer):
    """
    The Prometheus metrics an exchange moves, through the factory's
    C{metrics}.
    """

    __slots__ = ()

    def exchangeConnected(self, record: Any, host: str, reused: bool) -> None:
        if not reused:
            self._parts.metrics.connectTime.observe(record.connectTime)

    def tunnelEstablished(self, record: Any) -> None:
        self._parts.metrics.tunnels.inc()

    def exchangeEnded(self, record: Any) -> None:
        metrics = self._parts.metrics
        error = record.error
        decision = record.aclDecision
        report = decision is not None and decision.reported and error is None
        metrics.requestDone(
            record.proxyType,
            int(error.reason) if error is not None else None,
            record.bytesUp,
            record.bytesDown,
            report,
        )
        if error is not None:
            kind = _TLS_FAILURES.get(error.reason)
            if isinstance(error, TLSHandshakeTimeout):
                kind = "timeout"
            if kind is not None:
                metrics.tlsFailures.labels(kind).inc()

    def tunnelClosed(self, record: Any) -> None:
        self._parts.metrics.tunnels.dec()


# How the log lines' fields are read from an exchange's record, for the
# line functions written for them (observe.lineWriter): one expression a
# field, over the names of _LINE_SETUP, in the order of the log's fields
# and of the kinds observe.ACCESS_KINDS and DECISION_KINDS give them
# ("None": a field these lines never carry).
_LINE_SETUP = (
    "protocol = record.protocol",
    "error = record.error",
)

ACCESS_SOURCES = (
    "record.requestID",  # rq_id
    "protocol.clientAddress",  # client_addr
    "record.request.method",  # method (bytes)
    "record.url",  # url
    "record.status",  # response_code
    "t - record.started",  # response_time (seconds)
    "record.bytesUp",  # bytes_up
    "record.bytesDown",  # bytes_down
    "None if error is None else int(error.reason)",  # reason_code
    # error: why the exchange ended, if the client left; else its error.
    "record.endedBecause if record.endedBecause is not None"
    " else (None if error is None else error.message)",
    "record.role",  # role
    "protocol.certificateCN",  # client_cn
    "protocol.certificateOU",  # client_ou
)

# requested_host: the target's authority, made once per host and port.
_REQUESTED_HOST = (
    "record.url if target is None else"
    " authorities.get((target.host, target.port)) or authority(target)"
)

_DECISION_SETUP = (
    *_LINE_SETUP,
    "decision = record.aclDecision",
    "target = record.target",
    "destination = record.destination",
)

DECISION_SOURCES = (
    "'CANONICAL-PROXY-DECISION'",  # msg
    "record.requestID",  # id
    "record.proxyType",  # proxy_type
    _REQUESTED_HOST,
    "record.role",  # role
    "None if decision is None else decision.project",  # project
    # decision_reason: the ACL's reason, unless another error stopped it.
    "(None if decision is None else decision.reason)"
    " if error is None or error.reason is DENIED_BY_ACL else error.message",
    # address_rule: only when an allowed host's name opened an address;
    # absent otherwise, so that the line is as it always was.
    "None if destination is None else destination.allowedBy",
    "False if decision is None else decision.enforceWouldDeny",
    "error is None or error.reason not in DENIALS",  # allow
    "True if decision is not None and decision.reportOnly else None",
    "protocol.clientAddress",  # inbound_remote_addr
    "record.outboundAddress",  # outbound_remote_addr
    "record.dnsTime",  # dns_lookup_time_ms (seconds)
    "record.connectTime",  # conn_establish_time_ms (seconds)
    "record.status",  # status_code
    "None",  # bytes_in
    "None",  # bytes_out
    "None",  # duration
    "None",  # end_time
    "None",  # error
)

CLOSE_SOURCES = (
    "'CANONICAL-PROXY-CN-CLOSE'",  # msg
    "record.requestID",  # id
    "record.proxyType",  # proxy_type
    _REQUESTED_HOST,
    "record.role",  # role
    "None",  # project
    "None",  # decision_reason
    "None",  # address_rule
    "None",  # enforce_would_deny
    "None",  # allow
    "None",  # report_only
    "protocol.clientAddress",  # inbound_remote_addr
    "record.outboundAddress",  # outbound_remote_addr
    "None",  # dns_lookup_time_ms
    "None",  # conn_establish_time_ms
    "None",  # status_code
    "record.bytesDown",  # bytes_in
    "record.bytesUp",  # bytes_out
    "t - record.started",  # duration (seconds)
    "t",  # end_time
    "'' if error is None else error.message",  # error
)

# Authorities (host:port) by host and port, at most _AUTHORITIES of them.
_authorities: dict[tuple[str, int], str] = {}
_AUTHORITIES = 256


def _authority(target: Any) -> str:
    if len(_authorities) >= _AUTHORITIES:
        _authorities.clear()
    text = _authorities[target.host, target.port] = target.authority
    return text


_LINE_NAMES = {
    "DENIALS": DENIALS,
    "DENIED_BY_ACL": Reason.DENIED_BY_ACL,
    "authorities": _authorities,
    "authority": _authority,
}


def _lines(
    log: type[LineLog] | LineLog,
    sources: tuple[str, ...],
    setup: tuple[str, ...],
    stamping: Mapping[str, Any],
) -> tuple[Callable[..., str], Callable[..., dict[str, Any]]]:
    """
    The function writing C{log}'s line for an exchange's record at time
    C{t} (with the process log's time stamp given by C{stamping}: see
    L{LineLog.stamping}), and the one giving its fields (for
    L{LineLog.record}).
    """
    reading: dict[str, Any] = dict(
        sources=sources, setup=setup, arguments="record, t", names=_LINE_NAMES
    )
    return (
        lineWriter(log.fields, log.kinds, **reading, **stamping),
        recordFields(log.fields, log.kinds, **reading),
    )


@implementer(IExchangeObserver)
class LogObserver(_Observer):
    """
    One access-log line per exchange, through the factory's C{accessLog};
    Smokescreen's C{CANONICAL-PROXY-DECISION} line once per exchange (when
    a tunnel is established, else when the exchange ends), and
    C{CANONICAL-PROXY-CN-CLOSE} when a tunnel closes, through the
    factory's C{decisionLog}.

    While a log's file is its only listener, the line is made by code
    written for these fields, reading the record directly (L{lineWriter});
    otherwise the same values go to L{LineLog.record}.
    """

    __slots__ = ("_access", "_decisions", "_decisionLog", "_both")

    def __init__(self, parts: Any) -> None:
        _Observer.__init__(self, parts)
        self._access = _lines(AccessLog, ACCESS_SOURCES, _LINE_SETUP, {})
        self._decisionLog: LineLog | None = None
        self._decisions: Any = None
        self._both: Any = None

    def _forDecisions(self, decisionLog: LineLog) -> Any:
        # Lines for the process log carry its time stamp: made for the
        # decision log the factory has now.
        if decisionLog is not self._decisionLog:
            self._decisionLog = decisionLog
            stamping = decisionLog.stamping
            self._decisions = (
                _lines(decisionLog, DECISION_SOURCES, _DECISION_SETUP, stamping),
                _lines(decisionLog, CLOSE_SOURCES, _DECISION_SETUP, stamping),
            )
            # An exchange's access and decision lines, at once.
            self._both = linesWriter(
                (
                    LineSpec(AccessLog.fields, AccessLog.kinds, ACCESS_SOURCES),
                    LineSpec(
                        decisionLog.fields,
                        decisionLog.kinds,
                        DECISION_SOURCES,
                        **stamping,
                    ),
                ),
                _DECISION_SETUP,
                "record, t",
                _LINE_NAMES,
            )
        return self._decisions

    def tunnelEstablished(self, record: Any) -> None:
        self._decision(record, self._parts.clock.seconds())

    def exchangeEnded(self, record: Any) -> None:
        parts = self._parts
        t = parts.clock.seconds()
        accessLog = parts.accessLog
        sink = accessLog.fastSink
        if not record.decisionLogged and sink is not None:
            decisionLog = parts.decisionLog
            decisionSink = decisionLog.fastSink
            if decisionSink is not None:
                # Both lines made by one function (the common case: both
                # logs on, to their files or the process log).
                record.decisionLogged = True
                if decisionLog is not self._decisionLog:
                    self._forDecisions(decisionLog)
                access, decision = self._both(record, t)
                sink.add(access)
                decisionSink.add(decision)
                return
        if accessLog.enabled:
            line, fields = self._access
            if sink is not None:
                sink.add(line(record, t))
            else:
                accessLog.record(**fields(record, t))
        if not record.decisionLogged:
            self._decision(record, t)

    def _decision(self, record: Any, t: float) -> None:
        record.decisionLogged = True
        decisionLog = self._parts.decisionLog
        if not decisionLog.enabled:
            return
        line, fields = self._forDecisions(decisionLog)[0]
        sink = decisionLog.fastSink
        if sink is not None:
            sink.add(line(record, t))
        else:
            decisionLog.record(**fields(record, t))

    def tunnelClosed(self, record: Any) -> None:
        decisionLog = self._parts.decisionLog
        if not decisionLog.enabled:
            return
        line, fields = self._forDecisions(decisionLog)[1]
        t = self._parts.clock.seconds()
        sink = decisionLog.fastSink
        if sink is not None:
            sink.add(line(record, t))
        else:
            decisionLog.record(**fields(record, t))
