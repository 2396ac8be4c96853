"""
Secrets in request targets stay out of everything the proxy writes down:
userinfo (C{http://user:password@host/}) is refused without being quoted,
and query values are redacted in the logs and the control webhook's events
unless the operator asks for them.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.logger import capturedLogs, eventAsText
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.config import AccessLog as AccessLogSettings
from proxy_app.config import Config
from proxy_app.observe import (
    ACCESS_FIELDS,
    DECISION_FIELDS,
    DecisionLog,
    jsonFormatter,
    textFormatter,
)
from proxy_app.reasons import ProxyError, Reason
from proxy_app.redact import MAX_LOGGED_QUERY, loggedTarget, redactQuery
from proxy_app.tap import Options
from proxy_app.target import parseAbsoluteTarget, parseConnectTarget
from proxy_app.webhook import WebhookService

from .helpers import Harness, makeHarness, parseResponse
from .test_webhook import ControlServer

# Names: what a query parameter is usually called.
_names = st.text(
    st.characters(
        whitelist_categories=("Ll", "Lu", "Nd"), whitelist_characters="_-.[]%"
    ),
    min_size=1,
    max_size=12,
)
# Characters no name, host or separator holds: each value (and password)
# has one, so that finding it in the output can only mean it leaked.
_VALUE_ONLY = "!$'()*+,~^|\u20ac\u00a7\u00b1\u4e2d"


def _secrets(excluded: str) -> Any:
    """
    Text holding at least one of L{_VALUE_ONLY}, and anything else but
    C{excluded}.
    """
    anything = st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters=excluded),
        max_size=10,
    )
    return st.tuples(anything, st.sampled_from(_VALUE_ONLY), anything).map("".join)


# Values: anything short of the separators.
_values = _secrets("&#")


def _query(pairs: list[tuple[str, str | None]]) -> str:
    return "&".join(
        name if value is None else f"{name}={value}" for name, value in pairs
    )


class RedactQueryTests(SynchronousTestCase):
    """
    L{redactQuery} and L{loggedTarget}: what of a target may be written
    down.
    """

    def test_examples(self) -> None:
        """
        Values become C{…} and names stay; an empty value stays empty; a
        parameter without C{=} is redacted whole, and so is what precedes a
        C{;} in a name; percent-encoding is left as sent.
        """
        cases = [
            ("token=s3cr3t&page=2", "token=…&page=…"),
            ("a=&b=1", "a=&b=…"),
            ("s3cr3t", "…"),
            ("flag&x=1", "…&x=…"),
            ("a=1;token=s3cr3t", "a=…"),
            ("s3cr3t;x=1", "…;x=…"),
            ("a%3Db=c%26d", "a%3Db=…"),
            ("a=1&&b=2", "a=…&&b=…"),
            ("=s3cr3t", "=…"),
            ("x=a=b=c", "x=…"),
            ("", ""),
        ]
        for query, expected in cases:
            self.assertEqual(redactQuery(query), expected, query)

    def test_longQueryBounded(self) -> None:
        """
        An absurdly long query is written at bounded length, cut at a
        parameter and ending in C{…}; so is one enormous name.
        """
        redacted = redactQuery("&".join(f"n{i}=v" for i in range(5000)))
        self.assertLessEqual(len(redacted), MAX_LOGGED_QUERY + 2)
        self.assertTrue(redacted.startswith("n0=…&n1=…&"))
        self.assertTrue(redacted.endswith("&…"))
        self.assertEqual(redactQuery("N" * 100000 + "=1"), "…")

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.tuples(_names, st.one_of(st.none(), _values)), min_size=1, max_size=12
        )
    )
    def test_noValueWritten(self, pairs: list[tuple[str, str | None]]) -> None:
        """
        For any query, no value (nor a bare parameter) appears in the
        redacted form, and every name of a parameter with a value does, in
        order: the output is made of the names alone.
        """
        query = _query(pairs)
        redacted = redactQuery(query)
        for _, value in pairs:
            if value is not None:
                self.assertNotIn(value, redacted)
        expected = "&".join(n + "=…" if v is not None else "…" for n, v in pairs)
        self.assertEqual(redacted, expected)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(st.tuples(_names, _values), min_size=1, max_size=8),
        st.text(min_size=1, max_size=20),
        _secrets("/?#@"),
        st.sampled_from(["http://", "https://", ""]),
    )
    def test_loggedTarget(
        self, pairs: list[tuple[str, str]], fragment: str, password: str, scheme: str
    ) -> None:
        """
        For any absolute or CONNECT target with userinfo, a query and a
        fragment, the logged form holds no part of the password, no query
        value and no fragment; with the query kept, only the password is
        gone.
        """
        path = "/p" if scheme else ""
        target = (
            f"{scheme}user:{password}@origin.example:8080{path}"
            f"?{_query(pairs)}#{fragment}"
        )
        raw = target.encode("utf-8")
        logged = loggedTarget(raw)
        self.assertNotIn(password, logged)
        self.assertTrue(
            logged.startswith(f"{scheme}…@origin.example:8080{path}?"), logged
        )
        for _, value in pairs:
            self.assertNotIn(value, logged)
        self.assertTrue(logged.endswith("#…"))
        kept = loggedTarget(raw, keepQuery=True)
        self.assertEqual(
            kept, f"{scheme}…@origin.example:8080{path}?{_query(pairs)}#{fragment}"
        )

    def test_plainTargetUnchanged(self) -> None:
        """
        A target with nothing to redact is written as sent; an C{@} in the
        path or the query is not userinfo.
        """
        for raw in (
            b"http://origin.example/a/b",
            b"origin.example:443",
            b"http://origin.example/users/me@example.com",
        ):
            self.assertEqual(loggedTarget(raw), raw.decode())
        self.assertEqual(
            loggedTarget(b"http://origin.example/?to=me@example.com"),
            "http://origin.example/?to=…",
        )
        self.assertEqual(
            loggedTarget(b"http://origin.example/?to=me@example.com", keepQuery=True),
            "http://origin.example/?to=me@example.com",
        )


class UserinfoTargetTests(SynchronousTestCase):
    """
    Parsing refuses userinfo with a message that names the problem and
    quotes nothing of it.
    """

    def test_refusedWithoutEcho(self) -> None:
        """
        Absolute URIs with C{user:password@}, C{password@} or C{user@}, and
        CONNECT targets with userinfo, are refused with 1002 naming
        credentials; the message holds neither the user nor the password,
        and speaks of no IPv6 brackets.
        """
        for parse, raw in (
            (parseAbsoluteTarget, b"http://alice:s3cr3tpw@origin.example/"),
            (parseAbsoluteTarget, b"http://alice:s3cr3tpw@origin.example:8080/x?y=1"),
            (parseAbsoluteTarget, b"https://s3cr3tpw@origin.example"),
            (parseAbsoluteTarget, b"http://alice:s3cr3tpw@[::1]:80/"),
            (parseAbsoluteTarget, b"ftp://alice:s3cr3tpw@origin.example/"),
            (parseConnectTarget, b"alice:s3cr3tpw@origin.example:443"),
            (parseConnectTarget, b"s3cr3tpw@origin.example:443"),
        ):
            with self.assertRaises(ProxyError) as raised:
                parse(raw)
            error = raised.exception
            self.assertEqual(error.reason, Reason.BAD_TARGET, raw)
            self.assertIn("Credentials in the", error.message)
            self.assertNotIn("s3cr3tpw", error.message)
            self.assertNotIn("alice", error.message)
            self.assertNotIn("bracket", error.message)

    def test_notAbsoluteQuotedRedacted(self) -> None:
        """
        A target that is not an absolute URI is quoted as logs show it:
        without userinfo or query values.
        """
        with self.assertRaises(ProxyError) as raised:
            parseAbsoluteTarget(b"http:/alice:s3cr3tpw@origin.example?token=s3cr3t")
        message = raised.exception.message
        self.assertIn("not an absolute URI", message)
        self.assertNotIn("s3cr3t", message)


SECRET = "s3cr3t"


class ProxyRedactionTests(SynchronousTestCase):
    """
    Through the proxy: what the client, the logs and the webhook see of
    userinfo and query tokens.
    """

    def setUpProxy(self, config: Config | None = None) -> Harness:
        h = makeHarness(config=config)
        self.server = ControlServer("ok")
        self.stub = StubTreq(self.server)
        h.factory.webhook = WebhookService(
            "http://127.0.0.1:5000/webhook/X",
            clock=h.reactor,
            treqClient=self.stub,
            hostid="p",
        )
        h.protocol.connectionMade()
        self.decisions: list[dict[str, Any]] = []
        h.factory.decisionLog = DecisionLog.toProcessLog()
        h.factory.decisionLog.addObserver(self.decisions.append)
        return h

    def written(self, h: Harness, events: list[dict[str, Any]]) -> dict[str, str]:
        """
        Everything the proxy wrote, by where it went.
        """
        self.stub.flush()
        accessText = textFormatter(ACCESS_FIELDS)
        accessJSON = jsonFormatter(ACCESS_FIELDS)
        decisionText = textFormatter(DECISION_FIELDS)
        decisionJSON = jsonFormatter(DECISION_FIELDS)
        return {
            "access log (text)": "".join(accessText(e) for e in h.access),
            "access log (json)": "".join(accessJSON(e) for e in h.access),
            "decision log (text)": "".join(decisionText(e) for e in self.decisions),
            "decision log (json)": "".join(decisionJSON(e) for e in self.decisions),
            "process log": "".join(eventAsText(e) + repr(e) for e in events),
            "webhook": "".join(r.body.decode("utf-8") for r in self.server.requests),
        }

    def assertNowhere(self, secret: str, written: dict[str, str]) -> None:
        for where, text in written.items():
            self.assertNotIn(secret, text, where)
            # JSON escapes nothing in an ASCII secret, but be sure.
            self.assertNotIn(json.dumps(secret)[1:-1], text, where)

    def test_userinfoRefused(self) -> None:
        """
        A forwarded request or CONNECT with userinfo is refused 400/1002
        with a reason naming credentials; the password appears in none of
        the response bytes, the access log (text and JSON), the decision
        log, the process log and the webhook's events, and nothing is
        looked up or connected.
        """
        for request in (
            b"GET http://alice:s3cr3t@origin.example/a HTTP/1.1\r\nHost: "
            b"origin.example\r\n\r\n",
            b"GET http://alice:s3cr3t@origin.example:8080/a HTTP/1.1\r\nHost: "
            b"x\r\n\r\n",
            b"GET http://s3cr3t@origin.example/?q=1 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"CONNECT alice:s3cr3t@origin.example:443 HTTP/1.1\r\nHost: x\r\n\r\n",
        ):
            with capturedLogs() as events:
                h = self.setUpProxy()
                h.send(request)
                written = self.written(h, events)
            response = h.client.value()
            status, headers, body = parseResponse(response)
            self.assertEqual(
                (status, headers[b"x-whsentry-reasoncode"]), (400, b"1002"), request
            )
            self.assertIn(b"Credentials in the", headers[b"x-whsentry-reason"])
            self.assertNotIn(b"bracket", response)
            self.assertNotIn(SECRET.encode(), response)
            self.assertEqual(h.resolver.calls, [])
            self.assertEqual(h.reactor.tcpClients, [])
            self.assertIn("…@origin.example", h.access[-1]["url"])
            self.assertNowhere(SECRET, written)
            self.assertNowhere("alice", written)
            # The refusal was written down, just without the secret.
            self.assertIn("Credentials in the", written["access log (json)"])
            self.assertIn("Credentials in the", written["process log"])
            self.assertEqual(len(self.decisions), 1)

    def forwardWithToken(self, h: Harness) -> bytes:
        """
        Forward a request with a token in its query and a fragment; return
        what the origin received.
        """
        h.send(
            b"GET http://origin.example/a?token=s3cr3t&page=2#frag-s3cr3t HTTP/1.1\r\n"
            b"Host: origin.example\r\n\r\n"
        )
        up, upTransport = h.connectUpstream()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return upTransport.value()

    def test_queryTokenRedacted(self) -> None:
        """
        A request with C{?token=s3cr3t} reaches the origin with its query
        intact, and the token appears in no log line and no webhook event:
        the access log and C{connection-stop} show C{?token=…&page=…}.
        """
        with capturedLogs() as events:
            h = self.setUpProxy()
            sent = self.forwardWithToken(h)
            written = self.written(h, events)
        self.assertTrue(
            sent.startswith(b"GET /a?token=s3cr3t&page=2 HTTP/1.1\r\n"), sent
        )
        self.assertEqual(parseResponse(h.client.value())[0], 200)
        logged = "http://origin.example/a?token=…&page=…#…"
        self.assertEqual(h.access[-1]["url"], logged)
        (stop,) = [
            r.json
            for r in self.server.requests
            if r.json["action"] == "connection-stop"
        ]
        self.assertEqual(stop["details"]["info"]["l7"]["details"], [logged])
        self.assertNowhere(SECRET, written)

    def test_queryTokenRedactedOnFailure(self) -> None:
        """
        A request with a token that fails (the origin refuses the
        connection) logs its refusal without the token.
        """
        with capturedLogs() as events:
            h = self.setUpProxy()
            h.send(
                b"GET http://origin.example/a?token=s3cr3t HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            h.failUpstream(ConnectionRefusedError())
            written = self.written(h, events)
        self.assertEqual(parseResponse(h.client.value())[0], 502)
        self.assertIn("?token=…", written["process log"])
        self.assertNowhere(SECRET, written)

    def test_queryValuesKeptWhenConfigured(self) -> None:
        """
        With C{access_log.log_query_values} on, the access log and the
        webhook's C{connection-stop} show the query as sent.
        """
        config = Config(access_log=AccessLogSettings(log_query_values=True))
        with capturedLogs() as events:
            h = self.setUpProxy(config)
            sent = self.forwardWithToken(h)
            written = self.written(h, events)
        self.assertTrue(
            sent.startswith(b"GET /a?token=s3cr3t&page=2 HTTP/1.1\r\n"), sent
        )
        logged = "http://origin.example/a?token=s3cr3t&page=2#frag-s3cr3t"
        self.assertEqual(h.access[-1]["url"], logged)
        self.assertIn(logged, written["access log (text)"])
        self.assertIn(logged, written["webhook"])

    def test_rememberedURLsFollowTheSetting(self) -> None:
        """
        The logged URL remembered for a target is the one for the proxy's
        own C{log_query_values}: the same target asked for through a proxy
        that redacts, one that keeps query values, and the first again,
        is logged redacted, kept, redacted.
        """
        keeping = Config(access_log=AccessLogSettings(log_query_values=True))
        logged = []
        for config in (None, keeping, None):
            h = self.setUpProxy(config)
            self.forwardWithToken(h)
            logged.append(h.access[-1]["url"])
        redacted = "http://origin.example/a?token=…&page=…#…"
        kept = "http://origin.example/a?token=s3cr3t&page=2#frag-s3cr3t"
        self.assertEqual(logged, [redacted, kept, redacted])

    def test_rememberedURLsBounded(self) -> None:
        """
        However many targets clients name, at most 256 logged URLs are
        remembered for each setting, none of a target over 512 bytes, and
        each exchange's URL is its own target's.
        """
        from proxy_app import exchange

        h = self.setUpProxy()
        up = None
        for i in range(300):
            h.send(b"GET http://origin.example/%d?k=v HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            if up is None:
                up, _ = h.connectUpstream()
            up.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
            self.assertEqual(h.access[-1]["url"], f"http://origin.example/{i}?k=…")
            self.assertLessEqual(len(exchange._loggedURLs[False]), 256)
        long = b"http://origin.example/" + b"a" * 600
        h.send(b"GET " + long + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        up.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(h.access[-1]["url"], long.decode())
        self.assertNotIn(long, exchange._loggedURLs[False])

    def test_userinfoRefusedWithQueryValuesKept(self) -> None:
        """
        Keeping query values never keeps userinfo.
        """
        config = Config(access_log=AccessLogSettings(log_query_values=True))
        with capturedLogs() as events:
            h = self.setUpProxy(config)
            h.send(
                b"GET http://alice:s3cr3t@origin.example/?q=1 HTTP/1.1\r\nHost: "
                b"x\r\n\r\n"
            )
            written = self.written(h, events)
        self.assertEqual(h.access[-1]["url"], "http://…@origin.example/?q=1")
        self.assertNowhere(SECRET, written)

    def test_switch(self) -> None:
        """
        C{--log-query-values} is a switch, off by default; the environment
        takes true or false.
        """

        def parse(argv: list[str], environ: dict[str, str]) -> bool:
            options = Options(environ=environ)
            options.parseOptions(argv)
            return bool(options.config.access_log.log_query_values)

        self.assertFalse(parse([], {}))
        self.assertTrue(parse(["--log-query-values"], {}))
        self.assertTrue(parse([], {"EGRESSPROXY_LOG_QUERY_VALUES": "true"}))
