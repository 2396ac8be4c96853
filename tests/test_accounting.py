"""
Tests for L{proxy_app.accounting}: the observers an exchange's record is
fanned out to.
"""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from proxy_app.accounting import (
    LogObserver,
    MetricsObserver,
    WebhookObserver,
)
from proxy_app.interfaces import IExchangeObserver
from proxy_app.observe import AccessLog, DecisionLog, TextProcessLog
from proxy_app.reasons import ProxyError, Reason
from proxy_app.target import Target

from .helpers import makeHarness

GET = b"GET http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n\r\n"


@implementer(IExchangeObserver)
class Recorder:
    """
    An observer that records what it is told.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def exchangeConnected(self, record: Any, host: str, reused: bool) -> None:
        self.events.append(("connected", host))

    def tunnelEstablished(self, record: Any) -> None:
        self.events.append(("established", record.requestID))

    def exchangeEnded(self, record: Any) -> None:
        self.events.append(("ended", record.status))

    def tunnelClosed(self, record: Any) -> None:
        self.events.append(("closed", record.requestID))


class ObserverTests(SynchronousTestCase):
    """
    The proxy's sinks are L{IExchangeObserver}s, told in a fixed order.
    """

    def test_observersProvideInterface(self) -> None:
        """
        The factory's observers are the webhook, metrics and log (access
        and decision lines) observers, in that order, and each provides
        L{IExchangeObserver}.
        """
        h = makeHarness()
        self.assertEqual(
            [type(o) for o in h.factory.observers],
            [WebhookObserver, MetricsObserver, LogObserver],
        )
        for observer in h.factory.observers:
            verifyObject(IExchangeObserver, observer)

    def test_forwardedRequestFannedOut(self) -> None:
        """
        A forwarded request tells every observer once that it connected,
        and once that it ended.
        """
        h = makeHarness()
        recorder = Recorder()
        h.factory.observers = (*h.factory.observers, recorder)
        h.send(GET)
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(
            recorder.events, [("connected", "203.0.113.10"), ("ended", 204)]
        )
        self.assertEqual(len(h.access), 1)


class AuthorityMemoryTests(SynchronousTestCase):
    """
    The decision line's remembered authorities cannot be grown without
    bound by a client naming many hosts.
    """

    def test_bounded(self) -> None:
        """
        However many hosts and ports are named, at most 256 authorities are
        remembered, and each one given is its target's.
        """
        from proxy_app import accounting
        from proxy_app.target import Target

        accounting._authorities.clear()
        for port in range(1, 601):
            target = Target(f"h{port}.example", port)
            self.assertEqual(accounting._authority(target), f"h{port}.example:{port}")
            self.assertLessEqual(len(accounting._authorities), 256)
        self.assertEqual(accounting._authority(Target("::1", 443)), "[::1]:443")


# Records are many values each: drawing them is slow on a loaded machine.
_recordSettings = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

_texts = st.one_of(st.none(), st.text(max_size=8), st.sampled_from(["a b", "x=y", ""]))


@st.composite
def _records(draw: Any) -> Any:
    """
    An exchange's record as the log observer reads it, with values of the
    kinds the proxy gives (and hostile strings where a client or origin
    chooses them).
    """
    reason = draw(st.sampled_from([None, *Reason]))
    error = None if reason is None else ProxyError(reason, draw(st.text(max_size=8)))
    decision = draw(
        st.one_of(
            st.none(),
            st.builds(
                SimpleNamespace,
                reason=_texts,
                project=_texts,
                enforceWouldDeny=st.booleans(),
                reportOnly=st.booleans(),
            ),
        )
    )
    return SimpleNamespace(
        requestID=draw(st.sampled_from(["c5b3f2a1-0000002a", "a=b", "id with space"])),
        protocol=SimpleNamespace(
            clientAddress=draw(st.sampled_from(["127.0.0.1:4321", "[::1]:80"])),
            certificateCN=draw(_texts),
            certificateOU=draw(_texts),
        ),
        request=SimpleNamespace(method=draw(st.sampled_from([b"GET", b"P\xffST"]))),
        url=draw(st.sampled_from(["http://a.example/x", "http://a.example/?q=a b"])),
        status=draw(st.one_of(st.none(), st.integers(100, 599))),
        started=draw(st.floats(0, 1e6)),
        bytesUp=draw(st.integers(0, 2**40)),
        bytesDown=draw(st.integers(0, 2**40)),
        error=error,
        endedBecause=draw(_texts),
        role=draw(_texts),
        aclDecision=decision,
        target=draw(
            st.one_of(
                st.none(),
                st.builds(
                    Target, st.sampled_from(["a.example", "::1"]), st.integers(1, 65535)
                ),
            )
        ),
        destination=draw(
            st.one_of(st.none(), st.builds(SimpleNamespace, allowedBy=_texts))
        ),
        proxyType=draw(st.sampled_from(["http", "connect"])),
        outboundAddress=draw(st.sampled_from([None, "127.0.0.1:80", "[::1]:443"])),
        dnsTime=draw(st.one_of(st.none(), st.floats(0, 10))),
        connectTime=draw(st.one_of(st.none(), st.floats(0, 10))),
        decisionLogged=False,
    )


class BothLinesTests(SynchronousTestCase):
    """
    While both logs take finished lines, one function makes an exchange's
    access and decision lines (issue #19); the lines are those the logs'
    formatters write from the same record.
    """

    def _logs(self, fast: bool) -> tuple[Any, io.StringIO, io.StringIO]:
        accessOut, decisionOut = io.StringIO(), io.StringIO()
        parts = SimpleNamespace(
            accessLog=AccessLog(accessOut),
            decisionLog=DecisionLog(decisionOut),
            clock=Clock(),
        )
        parts.clock.advance(1700000000.25)
        if not fast:
            # Another listener: each line goes through the log's formatter.
            parts.decisionLog.addObserver(lambda event: None)
            parts.accessLog.addObserver(lambda event: None)
        return LogObserver(parts), accessOut, decisionOut

    @_recordSettings
    @given(st.lists(_records(), min_size=1, max_size=4))
    def test_sameLines(self, records: list[Any]) -> None:
        """
        Exchanges of any values (errors of every reason, with and without an
        ACL decision, target, role, hostile request ids and strings) get
        the same access and decision lines from the one function as from
        the formatters, twice (remembered texts).
        """
        fused, accessFast, decisionFast = self._logs(fast=True)
        reference, accessSlow, decisionSlow = self._logs(fast=False)
        for record in records + records:
            for observer in (fused, reference):
                record.decisionLogged = False
                observer.exchangeEnded(record)
                self.assertTrue(record.decisionLogged)
        self.assertEqual(accessFast.getvalue(), accessSlow.getvalue())
        self.assertEqual(decisionFast.getvalue(), decisionSlow.getvalue())
        self.assertEqual(len(accessFast.getvalue().splitlines()), 2 * len(records))
        self.assertEqual(len(decisionFast.getvalue().splitlines()), 2 * len(records))

    @_recordSettings
    @given(_records())
    def test_decisionAlreadyLogged(self, record: Any) -> None:
        """
        An exchange whose decision line was written when its tunnel was
        established gets only its access line when it ends.
        """
        observer, accessOut, decisionOut = self._logs(fast=True)
        record.decisionLogged = True
        observer.exchangeEnded(record)
        self.assertEqual(len(accessOut.getvalue().splitlines()), 1)
        self.assertEqual(decisionOut.getvalue(), "")

    @_recordSettings
    @given(st.lists(_records(), min_size=1, max_size=4))
    def test_processLogLines(self, records: list[Any]) -> None:
        """
        With the decision lines in the process log (the default), the one
        function writes each decision line as the decision log's file would,
        after the process log's time stamp and system.
        """
        stamped, _, _ = self._logs(fast=True)
        out = io.StringIO()
        clock = stamped._parts.clock
        processLog = TextProcessLog(out, now=clock.seconds)
        stamped._parts.decisionLog = DecisionLog.toProcessLog(processLog)
        plain, _, decisionOut = self._logs(fast=True)
        for record in records:
            for observer in (stamped, plain):
                record.decisionLogged = False
                observer.exchangeEnded(record)
        head = f"{processLog.formatTime(clock.seconds())} [egressproxy.decision#info] "
        self.assertEqual(
            out.getvalue(),
            "".join(head + line + "\n" for line in decisionOut.getvalue().splitlines()),
        )
