"""
Accounting: what happened to each exchange, fanned out to the sinks that
record it.

An exchange produces one record, itself: no copy is made, since a request
on the Deferred-free path should allocate nothing it need not.  The fields
observers read are the exchange's (L{proxy_app.exchange.Exchange} lists
them).  The exchange calls each L{IExchangeObserver} in
L{ProxyFactory.observers <proxy_app.channel.ProxyFactory>}, in this order:
the control webhook's events, the metrics, the access log, the decision
log; it imports none of them.

Each observer reads its sink from the factory when it is called, so that
a sink swapped while the proxy runs (or by a test) is the one written.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from proxy_app.interfaces import IExchangeObserver
from proxy_app.reasons import DENIALS, Reason
from proxy_app.upstream import TLSHandshakeTimeout
from proxy_app.webhook import connectionInfoDetails, connectionStopInfo, sessionLabel

_TLS_FAILURES = {
    Reason.TLS_HANDSHAKE_FAILED: "handshake",
    Reason.CERTIFICATE_INVALID: "certificate",
}


def errorText(record: Any) -> str | None:
    """
    The error an exchange's log line shows: why it ended, if it ended
    without an error of its own (the client left), else its error's
    message.
    """
    if record.endedBecause is not None:
        return record.endedBecause
    error = record.error
    return error.message if error is not None else None


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
    sinks from C{parts} (the factory).
    """
    return (
        WebhookObserver(parts),
        MetricsObserver(parts),
        AccessLogObserver(parts),
        DecisionLogObserver(parts),
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


@implementer(IExchangeObserver)
class AccessLogObserver(_Observer):
    """
    One access-log line per exchange, through the factory's C{accessLog}.
    """

    __slots__ = ()

    def exchangeEnded(self, record: Any) -> None:
        parts = self._parts
        accessLog = parts.accessLog
        if not accessLog.enabled:
            return
        error = record.error
        protocol = record.protocol
        accessLog.write(
            record.requestID,
            protocol.clientAddress,
            record.request.method,
            record.url,
            record.status,
            parts.clock.seconds() - record.started,
            record.bytesUp,
            record.bytesDown,
            int(error.reason) if error is not None else None,
            errorText(record),
            record.role,
            protocol.certificateCN,
            protocol.certificateOU,
        )


@implementer(IExchangeObserver)
class DecisionLogObserver(_Observer):
    """
    Smokescreen's C{CANONICAL-PROXY-DECISION} line once per exchange (when
    a tunnel is established, else when the exchange ends), and
    C{CANONICAL-PROXY-CN-CLOSE} when a tunnel closes, through the
    factory's C{decisionLog}.
    """

    __slots__ = ()

    def tunnelEstablished(self, record: Any) -> None:
        self._decision(record)

    def exchangeEnded(self, record: Any) -> None:
        if not record.decisionLogged:
            self._decision(record)

    def _decision(self, record: Any) -> None:
        record.decisionLogged = True
        decisionLog = self._parts.decisionLog
        if not decisionLog.enabled:
            return
        decision = record.aclDecision
        error = record.error
        reason: str | None
        if error is not None and error.reason is not Reason.DENIED_BY_ACL:
            reason = error.message
        else:
            reason = decision.reason if decision is not None else None
        target = record.target
        destination = record.destination
        # The fields in DECISION_FIELDS' order (observe.DECISION_KINDS).
        decisionLog.write(
            "CANONICAL-PROXY-DECISION",
            record.requestID,
            record.proxyType,
            target.authority if target is not None else record.url,
            record.role,
            decision.project if decision is not None else None,
            reason,
            # Only when an allowed host's name opened an address; absent
            # otherwise, so that the line is as it always was.
            destination.allowedBy if destination is not None else None,
            decision.enforceWouldDeny if decision is not None else False,
            error is None or error.reason not in DENIALS,
            True if decision is not None and decision.reportOnly else None,
            record.protocol.clientAddress,
            record.outboundAddress,
            record.dnsTime,
            record.connectTime,
            record.status,
            None,
            None,
            None,
            None,
            None,
        )

    def tunnelClosed(self, record: Any) -> None:
        now = self._parts.clock.seconds()
        target = record.target
        error = record.error
        self._parts.decisionLog.write(
            "CANONICAL-PROXY-CN-CLOSE",
            record.requestID,
            record.proxyType,
            target.authority if target is not None else record.url,
            record.role,
            None,
            None,
            None,
            None,
            None,
            None,
            record.protocol.clientAddress,
            record.outboundAddress,
            None,
            None,
            None,
            record.bytesDown,
            record.bytesUp,
            now - record.started,
            now,
            error.message if error is not None else "",
        )
