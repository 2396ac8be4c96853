"""
Tests for L{proxy_app.channel}: the client connection's interface to its
exchanges, and its one lifecycle state.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from proxy_app.interfaces import IClientChannel
from proxy_app.reasons import ProxyError, Reason

from .helpers import makeHarness

POST = (
    b"POST http://origin.example/ HTTP/1.1\r\nHost: origin.example\r\n"
    b"Content-Length: 4\r\n\r\n"
)
CONNECT = b"CONNECT origin.example:443 HTTP/1.1\r\nHost: origin.example:443\r\n\r\n"


class ClientChannelTests(SynchronousTestCase):
    """
    L{ProxyProtocol} is what exchanges see of the client connection.
    """

    def test_providesIClientChannel(self) -> None:
        """
        The client protocol provides every method and attribute of
        L{IClientChannel}.
        """
        h = makeHarness()
        verifyObject(IClientChannel, h.protocol)


class LifecycleTests(SynchronousTestCase):
    """
    The connection's C{_state} walks through the transitions its
    docstring lists.
    """

    def test_forwardedRequest(self) -> None:
        """
        A forwarded request goes IDLE, SETTING_UP (while it is connected),
        RECEIVING (its body arriving), RECEIVED (its end read), and back
        to IDLE once answered.
        """
        h = makeHarness()
        self.assertEqual(h.protocol._state, "IDLE")
        h.send(POST)
        self.assertEqual(h.protocol._state, "SETTING_UP")
        up, _ = h.connectUpstream()
        self.assertEqual(h.protocol._state, "RECEIVING")
        h.send(b"abcd")
        self.assertEqual(h.protocol._state, "RECEIVED")
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(h.protocol._state, "IDLE")
        self.assertIsNone(h.protocol.exchange)

    def test_answeredBeforeBody(self) -> None:
        """
        A request answered before its body was read leaves the connection
        DISCARDING the rest, then IDLE for the next request.
        """
        h = makeHarness(
            answers={"origin.example": ProxyError(Reason.RESOLUTION_FAILED, "no")}
        )
        h.send(POST)
        self.assertEqual(h.protocol._state, "DISCARDING")
        h.send(b"abcd")
        self.assertEqual(h.protocol._state, "IDLE")
        self.assertFalse(h.client.disconnecting)

    def test_tunnel(self) -> None:
        """
        A CONNECT goes SETTING_UP, then TUNNEL once the upstream connection
        is up; the connection's loss makes it CLOSED.
        """
        h = makeHarness()
        h.send(CONNECT)
        self.assertEqual(h.protocol._state, "SETTING_UP")
        h.connectUpstream()
        self.assertEqual(h.protocol._state, "TUNNEL")
        self.assertIs(h.protocol.tunnel, h.protocol.exchange)
        h.protocol.connectionLost(None)
        self.assertEqual(h.protocol._state, "CLOSED")
