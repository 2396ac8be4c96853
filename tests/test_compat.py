"""
The compatibility switches (C{compat.*}): Smokescreen's
C{X-Smokescreen-Error} header and 407 denials, and webhook-sentry's
request-id header, through the proxy.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase

from proxy_app import config
from proxy_app.access import AccessControl
from proxy_app.acl import ACL
from proxy_app.addresses import AddressDecision
from proxy_app.identity import Authenticator
from proxy_app.resolver import DestinationDenied

from .helpers import Harness, makeHarness, parseResponse
from .test_access_proxy import ACL_TEXT, basic, request

EXTRA = "Ask for access at https://wiki.example/egress"
ALICE = basic("alice", "secret")


def harness(
    compat: config.Compat | None = None,
    extra: str | None = None,
    accessLog: config.AccessLog | None = None,
) -> Harness:
    """
    A proxy with alice's ACL and password, one private name, and the given
    compatibility settings.
    """
    denied = DestinationDenied(
        "internal.example",
        80,
        AddressDecision(False, "10.0.0.1", "Deny: Private Range"),
    )
    h = makeHarness(
        {
            "origin.example": ["203.0.113.10"],
            "other.example": ["203.0.113.11"],
            "internal.example": denied,
        },
        config.Config(
            acl=config.ACLSettings(deny_message_extra=extra),
            compat=compat or config.Compat(),
            access_log=accessLog or config.AccessLog(),
        ),
    )
    h.factory.access = AccessControl(
        ACL.fromYAML(ACL_TEXT),
        None,
        Authenticator.fromStrings(["memory:alice:secret"]),
    )
    return h


class SmokescreenErrorHeaderTests(SynchronousTestCase):
    """
    C{compat.smokescreen_error_header}: what Smokescreen's C{rejectResponse}
    puts in C{X-Smokescreen-Error} (its message, on every response it makes
    itself), and its stripping of the header from allowed responses.
    """

    on = config.Compat(smokescreen_error_header=True)

    def test_denial(self) -> None:
        """
        An ACL denial carries the header with the message, which is
        Smokescreen's C{Egress proxying is denied to host ...} sentence.
        """
        h = harness(self.on)
        h.send(request(b"other.example", auth=ALICE))
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual(status, 403)
        value = headers[b"x-smokescreen-error"]
        self.assertEqual(value, headers[b"x-whsentry-reason"])
        self.assertTrue(value.startswith(b"Egress proxying is denied to host"), value)

    def test_denialWithExtra(self) -> None:
        """
        With C{acl.deny_message_extra}, the header holds the message and the
        operator's text two spaces apart, as Go writes Smokescreen's
        C{"MSG\\n\\nEXTRA\\n"}; X-WhSentry-Reason stays the message alone.
        """
        h = harness(self.on, extra=EXTRA)
        h.send(request(b"other.example", auth=ALICE))
        _, headers, _ = parseResponse(h.client.value())
        self.assertEqual(
            headers[b"x-smokescreen-error"],
            headers[b"x-whsentry-reason"] + b"  " + EXTRA.encode(),
        )

    def test_failure(self) -> None:
        """
        A failed destination (502, 1006) carries it too: Smokescreen sets it
        on its 502s and 504s as on its 407s.
        """
        h = harness(self.on)
        h.send(request(b"origin.example", auth=ALICE))
        h.failUpstream(ConnectionRefusedError())
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (502, b"1006"))
        self.assertEqual(headers[b"x-smokescreen-error"], headers[b"x-whsentry-reason"])

    def test_originHeaderStripped(self) -> None:
        """
        An origin's own X-Smokescreen-Error is not passed on, so that the
        header still means the proxy made the response.
        """
        h = harness(self.on)
        h.send(request(b"origin.example", auth=ALICE))
        up, _ = h.connectUpstream()
        up.dataReceived(
            b"HTTP/1.1 204 No Content\r\nX-Smokescreen-Error: forged\r\n\r\n"
        )
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual(status, 204)
        self.assertNotIn(b"x-smokescreen-error", headers)

    def test_offByDefault(self) -> None:
        """
        Off, a denial has no such header and an origin's passes unchanged.
        """
        h = harness()
        h.send(request(b"other.example", auth=ALICE))
        self.assertNotIn(b"x-smokescreen-error", parseResponse(h.client.value())[1])
        h = harness()
        h.send(request(b"origin.example", auth=ALICE))
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 204 No Content\r\nX-Smokescreen-Error: x\r\n\r\n")
        self.assertEqual(
            parseResponse(h.client.value())[1][b"x-smokescreen-error"], b"x"
        )


class DenyStatusTests(SynchronousTestCase):
    """
    C{compat.deny_status: 407}: Smokescreen answers every C{denyError} (ACL
    and address-policy denials) with 407; so do we for every 403, and
    nothing else changes.
    """

    on = config.Compat(deny_status=407)

    def test_aclDenial(self) -> None:
        """
        An ACL denial is 407 with reason code 1011, without
        Proxy-Authenticate (Smokescreen sends none: the client is not asked
        for credentials), and the access log records 407.
        """
        h = harness(self.on)
        h.send(request(b"other.example", auth=ALICE))
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (407, b"1011"))
        self.assertNotIn(b"proxy-authenticate", headers)
        self.assertEqual(h.access[-1]["response_code"], 407)

    def test_addressDenial(self) -> None:
        """
        An address-policy denial (1000) is 407 too, and keeps
        C{acl.deny_message_extra}, which belongs to denials.
        """
        h = harness(self.on, extra=EXTRA)
        h.send(request(b"internal.example", auth=ALICE))
        status, headers, body = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (407, b"1000"))
        self.assertIn(EXTRA.encode(), body)

    def test_tunnel(self) -> None:
        """
        A CONNECT the address policy denies is 407 too, in the response and
        the access log.
        """
        h = harness(self.on)
        h.send(
            b"CONNECT internal.example:443 HTTP/1.1\r\nHost: internal.example:443"
            b"\r\nProxy-Authorization: " + ALICE + b"\r\n\r\n"
        )
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (407, b"1000"))
        self.assertEqual(h.access[-1]["response_code"], 407)

    def test_othersUnchanged(self) -> None:
        """
        Missing credentials stay 407 with Proxy-Authenticate (1013), and a
        failed destination stays 502.
        """
        h = harness(self.on)
        h.send(request(b"other.example"))
        status, headers, _ = parseResponse(h.client.value())
        self.assertEqual((status, headers[b"x-whsentry-reasoncode"]), (407, b"1013"))
        self.assertIn(b"proxy-authenticate", headers)
        h = harness(self.on)
        h.send(request(b"origin.example", auth=ALICE))
        h.failUpstream(ConnectionRefusedError())
        self.assertEqual(parseResponse(h.client.value())[0], 502)

    def test_default(self) -> None:
        """
        By default a denial is 403.
        """
        h = harness()
        h.send(request(b"other.example", auth=ALICE))
        self.assertEqual(parseResponse(h.client.value())[0], 403)

    def test_flags(self) -> None:
        """
        The two switches as twistd's options: --deny-status 407 and
        --smokescreen-error-header.
        """
        from proxy_app.tap import Options

        options = Options(environ={})
        options.parseOptions(["--deny-status", "407", "--smokescreen-error-header"])
        self.assertEqual(
            options.config.compat,
            config.Compat(smokescreen_error_header=True, deny_status=407),
        )

    def test_parse(self) -> None:
        """
        403 and 407 are accepted, from YAML numbers or text; anything else
        stops start-up with one line naming the setting.
        """
        for raw in (407, "407"):
            self.assertEqual(config.parseDenyStatus(raw), 407)
        with self.assertRaises(config.ConfigError) as raised:
            config.load({}, environ={"EGRESSPROXY_DENY_STATUS": "404"})
        self.assertEqual(
            str(raised.exception),
            "EGRESSPROXY_DENY_STATUS = '404': expected 403 or 407",
        )


class RequestIDHeaderTests(SynchronousTestCase):
    """
    webhook-sentry's C{requestIDHeader} is C{access_log.request_id_header}:
    the client's id under that name is the one logged and passed upstream,
    and a request without one gets a new one, as in webhook-sentry.
    """

    def test_clientID(self) -> None:
        """
        An id the client sends under the configured name is logged and sent
        upstream unchanged.
        """
        h = harness(accessLog=config.AccessLog(request_id_header="X-Request-Id"))
        h.send(request(b"origin.example", auth=ALICE, extra=b"X-Request-Id: ab-12\r\n"))
        up, transport = h.connectUpstream()
        self.assertIn(b"X-Request-Id: ab-12\r\n", transport.value())
        up.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(h.access[-1]["rq_id"], "ab-12")

    def test_generated(self) -> None:
        """
        Without one, an id is made and logged.
        """
        h = harness(accessLog=config.AccessLog(request_id_header="X-Request-Id"))
        h.send(request(b"origin.example", auth=ALICE))
        up, _ = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertTrue(h.access[-1]["rq_id"])
