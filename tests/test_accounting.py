"""
Tests for L{proxy_app.accounting}: the observers an exchange's record is
fanned out to.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from proxy_app.accounting import (
    LogObserver,
    MetricsObserver,
    WebhookObserver,
)
from proxy_app.interfaces import IExchangeObserver

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
