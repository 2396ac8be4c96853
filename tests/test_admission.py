"""
Tests for L{proxy_app.admission}: the admission pipeline on its own, with
no client connection and no exchange behind it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.access import AccessControl
from proxy_app.acl import ACL
from proxy_app.admission import Admission
from proxy_app.http1 import RequestHead
from proxy_app.limits import Overloaded, RateLimiter
from proxy_app.observe import Metrics
from proxy_app.reasons import ProxyError, Reason
from proxy_app.target import parseAbsoluteTarget
from proxy_app.upstream import Connector

from .helpers import FakeDestinationResolver

ACL_TEXT = """
version: v1
services:
  - name: alice
    project: payments
    action: enforce
    allowed_domains: [origin.example]
default:
  project: other
  action: enforce
"""


class Parts:
    """
    What the pipeline reads its collaborators from, as it reads them from
    the proxy factory.
    """

    def __init__(self, access: AccessControl | None = None) -> None:
        self.clock = MemoryReactorClock()
        self.access = access if access is not None else AccessControl()
        self.rateLimiter: RateLimiter | None = None
        self.resolver = FakeDestinationResolver({"origin.example": ["203.0.113.10"]})
        self.connector = Connector(self.clock, 10)
        self.webhook = None
        self.origination = None
        self.metrics = Metrics(process=False)


class Peer:
    """
    The client connection as admission reads it.
    """

    role: str | None = None
    peerHost = "127.0.0.1"
    intercepted = False


class Subject:
    """
    An exchange as admission sees it: what it reads, what it sets, and the
    connect step, which records what it was given.
    """

    tls = None
    proxyType = "http"
    externalProxy: Any = None
    requestID = "rq-1"
    connectionID = ""
    policy = "default"

    def __init__(self, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.request = RequestHead()
        self.request.headers = headers or []
        self.target = parseAbsoluteTarget(b"http://origin.example/")
        self.protocol = Peer()
        self.connected: list[Any] = []
        self.role: str | None = None
        self.aclDecision: Any = None
        self.dnsTime: float | None = None
        self.connectStarted = 0.0
        self.gateResult: Any = None
        self.destination: Any = None

    def connectTo(self, destination: Any) -> str:
        self.connected.append(destination)
        return "upstream"


class AdmissionTests(SynchronousTestCase):
    """
    L{Admission.admit} runs identify, rate limit, ACL, vet, candidates,
    gate and connect, at once when every step can answer at once.
    """

    def test_immediate(self) -> None:
        """
        With no password to check and a vetted answer at hand, the
        pipeline returns what the connect step returned, with no
        L{Deferred}, and has set the destination it connected to.
        """
        parts, subject = Parts(), Subject()
        self.patch(Deferred, "addCallback", lambda *a, **k: self.fail("callback chain"))
        result = Admission(parts).admit(subject)
        self.assertEqual(result, "upstream")
        self.assertEqual(subject.connected, [subject.destination])
        self.assertEqual(subject.destination.addresses, ("203.0.113.10",))
        self.assertEqual(parts.resolver.calls, [("origin.example", 80)])

    def test_lookupWaits(self) -> None:
        """
        A name that must be looked up makes the rest a callback chain: a
        L{Deferred} that fires with what the connect step returned.
        """
        parts, subject = Parts(), Subject()
        parts.resolver.immediate = False
        result = Admission(parts).admit(subject)
        self.assertIsInstance(result, Deferred)
        self.assertEqual(self.successResultOf(result), "upstream")
        self.assertEqual(len(subject.connected), 1)

    def test_aclDenies(self) -> None:
        """
        An ACL denial raises 1011 before anything is looked up, records the
        decision on the exchange and counts it.
        """
        parts = Parts(AccessControl(ACL.fromYAML(ACL_TEXT)))
        subject = Subject()
        subject.protocol.role = "bob"
        with self.assertRaises(ProxyError) as caught:
            Admission(parts).admit(subject)
        self.assertIs(caught.exception.reason, Reason.DENIED_BY_ACL)
        self.assertEqual(parts.resolver.calls, [])
        self.assertEqual(subject.role, "bob")
        self.assertFalse(subject.aclDecision.allow)
        self.assertEqual(
            parts.metrics.registry.get_sample_value(
                "egressproxy_acl_decisions_total",
                {"rule": "default", "project": "other", "decision": "deny"},
            ),
            1.0,
        )

    def test_rateLimited(self) -> None:
        """
        The role's rate limit is taken before the ACL is asked: once it is
        spent the pipeline raises L{Overloaded} (429).
        """
        parts = Parts()
        parts.rateLimiter = RateLimiter(parts.clock, 1, 1)
        admission = Admission(parts)
        self.assertEqual(admission.admit(Subject()), "upstream")
        with self.assertRaises(Overloaded) as caught:
            admission.admit(Subject())
        self.assertEqual(caught.exception.status, 429)
