"""
The live half of deploy/test-monitoring: a loopback origin and control
webhook, traffic through a running proxy, and every PromQL expression of the
dashboard and the rules evaluated by a real Prometheus.

Standard library and PyYAML only (run it with the proxy's venv).  Usage:

  livecheck.py serve PORT
      an origin (GET answers 200) and a control webhook (POST /webhook;
      access requests are accepted) on 127.0.0.1:PORT, until killed.
  livecheck.py traffic PROXY_PORT ORIGIN_PORT
      allowed requests (by IP and by name), refused ones, a CONNECT tunnel
      and a malformed request; exits non-zero if an answer is not the one
      expected.
  livecheck.py hold-tunnel PROXY_PORT ORIGIN_PORT READY_FILE RELEASE_FILE
      opens a tunnel, writes READY_FILE, and closes it once RELEASE_FILE
      exists (a request in flight while the proxy drains).
  livecheck.py queries PROM_URL RULES DASHBOARD TIMEOUT
      evaluates every expression; prints PASS/FAIL for each; exits non-zero
      on any FAIL.
  livecheck.py expect PROM_URL EXPR TIMEOUT
      waits until EXPR returns a series (PASS) or TIMEOUT passes (FAIL).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

failures = 0


def report(ok: bool, what: str, detail: str = "") -> None:
    global failures
    if not ok:
        failures += 1
    print(f"{'PASS' if ok else 'FAIL'}: {what}{': ' + detail if detail else ''}")
    sys.stdout.flush()


# The origin and the control webhook.


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(b"hello from the origin\n")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        try:
            message = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            message = {}
        if message.get("action") == "access-request":
            self._answer(b'{"access-response": "accept"}', "application/json")
        else:
            self._answer(b"{}", "application/json")


def serve(port: int) -> None:
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


# Traffic through the proxy.


def exchange(proxyPort: int, data: bytes) -> bytes:
    """
    Send C{data} to the proxy and read the answer until the proxy closes or
    one response with a body has come.
    """
    with socket.create_connection(("127.0.0.1", proxyPort), timeout=10) as s:
        s.sendall(data)
        received = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return received
            received += chunk
            head, sep, body = received.partition(b"\r\n\r\n")
            if sep:
                match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                if match and len(body) >= int(match.group(1)):
                    return received


def status(response: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3})", response)
    return int(match.group(1)) if match else 0


def get(proxyPort: int, url: str) -> bytes:
    host = urllib.parse.urlsplit(url).netloc
    return exchange(
        proxyPort,
        f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
    )


def openTunnel(proxyPort: int, originPort: int) -> tuple[socket.socket, int]:
    s = socket.create_connection(("127.0.0.1", proxyPort), timeout=10)
    target = f"127.0.0.1:{originPort}"
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    return s, status(head)


def throughTunnel(s: socket.socket) -> int:
    s.sendall(b"GET / HTTP/1.1\r\nHost: origin\r\n\r\n")
    answer = b""
    while b"hello from the origin" not in answer:
        chunk = s.recv(4096)
        if not chunk:
            break
        answer += chunk
    return status(answer)


def traffic(proxyPort: int, originPort: int) -> None:
    for _ in range(20):
        code = status(get(proxyPort, f"http://127.0.0.1:{originPort}/"))
        if code != 200:
            break
    report(code == 200, "20 allowed GETs to the loopback origin", f"last {code}")
    code = status(get(proxyPort, f"http://localhost:{originPort}/"))
    report(code == 200, "an allowed GET by name (a name lookup)", str(code))
    for url in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/"):
        response = get(proxyPort, url)
        refused = status(response) == 403 and b"X-WhSentry-ReasonCode: 1000" in response
        report(refused, f"GET {url} refused (403, 1000)", str(status(response)))
    s, code = openTunnel(proxyPort, originPort)
    with s:
        inner = throughTunnel(s) if code == 200 else 0
    report(code == 200 and inner == 200, "a CONNECT tunnel and a GET through it")
    code = status(exchange(proxyPort, b"NOT A REQUEST\x00\r\n\r\n"))
    report(code == 400, "a malformed request answered 400", str(code))
    # A port nothing listens on: the destination fails (502, 1006).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closedPort = probe.getsockname()[1]
    response = get(proxyPort, f"http://127.0.0.1:{closedPort}/")
    failed = status(response) == 502 and b"X-WhSentry-ReasonCode: 1006" in response
    report(failed, "GET to a closed port fails (502, 1006)", str(status(response)))
    # The proxy runs with --max-concurrent-tunnels 2: a third is shed.
    held = [openTunnel(proxyPort, originPort) for _ in range(2)]
    third, code = openTunnel(proxyPort, originPort)
    third.close()
    for s, _ in held:
        s.close()
    report(
        [c for _, c in held] == [200, 200] and code == 503,
        "two tunnels held, a third shed (503, 1014)",
        f"{[c for _, c in held]} then {code}",
    )


def holdTunnel(proxyPort: int, originPort: int, ready: str, release: str) -> None:
    s, code = openTunnel(proxyPort, originPort)
    with s:
        if code != 200 or throughTunnel(s) != 200:
            sys.exit(f"the tunnel to hold failed ({code})")
        open(ready, "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.1)


# PromQL.

VARIABLES = {
    # Grafana's own: a window of several 1 s scrapes, as $__rate_interval
    # would be with this scrape interval.
    "$__rate_interval": "30s",
    "$__interval": "5s",
    "$__range": "5m",
    # The dashboard's: the job under test, and instance's "All" (allValue).
    "$job": "egressproxy",
    "$instance": ".*",
}

# Selectors that no traffic can give a sample to: their alert fires on an
# event that the proxy never causes on purpose.  For these the metric and
# each label named must exist, and the reason is printed.
MAY_BE_EMPTY = {
    'egressproxy_requests_total{reason_code="1009"}': "an internal error (1009)"
    " is a bug in the proxy, which the test cannot cause",
}

# A vector selector naming a metric of the proxy's target (no other
# exporter is scraped by the test's Prometheus).
SELECTOR = re.compile(
    r"\b((?:egressproxy|process|python)_[a-z_]+|up)\b(\{[^}]*\})?(?!\s*\()"
)


def query(prom: str, expr: str) -> tuple[str, Any]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as e:
        answer = json.load(e)
    if answer.get("status") != "success":
        return "error", answer.get("error", answer)
    return "success", answer["data"]["result"]


def substitute(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    return expr


def waitForData(prom: str, expr: str, deadline: float) -> tuple[str, Any]:
    while True:
        outcome, result = query(prom, expr)
        if outcome == "error" or result or time.monotonic() > deadline:
            return outcome, result
        time.sleep(1)


def dashboardExpressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append(
                    (f"panel {inner['title']!r} {target['refId']}", target["expr"])
                )
    return found


def checkLabels(prom: str, rule: str, selector: str, why: str) -> None:
    """
    Check that the metric of C{selector} is exported, with every label that
    C{selector} matches on.
    """
    metric = selector.split("{")[0]
    labels = re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector[len(metric) :])
    outcome, result = query(prom, metric)
    names = (
        set().union(*(r["metric"] for r in result)) if outcome == "success" else set()
    )
    missing = [label for label in labels if label not in names]
    report(
        bool(result) and not missing,
        f"rule {rule}: {selector}",
        f"{metric} exported with labels {labels}; no sample expected: {why}"
        if result and not missing
        else f"{metric}: {outcome}, labels missing {missing}",
    )


def checkQueries(prom: str, rulesPath: str, dashboardPath: str, timeout: float) -> None:
    import yaml

    deadline = time.monotonic() + timeout
    with open(dashboardPath) as f:
        dashboard = json.load(f)
    with open(rulesPath) as f:
        rules = yaml.safe_load(f)

    # The dashboard's variables: their queries must find the job and an
    # instance (label_values(METRIC{...}, LABEL) is Grafana's, not PromQL).
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["definition"])
        if match is None:
            report(False, f"variable {variable['name']}", variable["definition"])
            continue
        selector, label = substitute(match.group(1)), match.group(2)
        outcome, result = waitForData(
            prom, f"group by ({label}) ({selector})", deadline
        )
        values = (
            sorted(r["metric"].get(label, "") for r in result)
            if outcome == "success"
            else []
        )
        report(
            bool(values) and all(values),
            f"variable {variable['name']}: {variable['definition']}",
            str(values or result),
        )

    for what, raw in dashboardExpressions(dashboard):
        expr = substitute(raw)
        if "$" in expr:
            report(False, what, f"unknown variable in {raw}")
            continue
        outcome, result = waitForData(prom, expr, deadline)
        report(
            outcome == "success" and bool(result),
            f"{what}: {expr}",
            f"{len(result)} series" if outcome == "success" else f"error {result}",
        )

    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            expr = rule["expr"]
            outcome, result = query(prom, expr)
            report(
                outcome == "success",
                f"rule {name}: evaluates",
                (f"{'firing/pending' if result else 'not firing'} now")
                if outcome == "success"
                else f"error {result}",
            )
            # The alert fires on a threshold, so its expression may rightly
            # be empty; but every series it reads must exist.
            selectors = sorted({m.group(0) for m in SELECTOR.finditer(expr)})
            if not selectors:
                report(False, f"rule {name}: names no metric of the proxy")
            for selector in selectors:
                if selector in MAY_BE_EMPTY:
                    checkLabels(prom, name, selector, MAY_BE_EMPTY[selector])
                    continue
                outcome, result = waitForData(prom, selector, deadline)
                report(
                    outcome == "success" and bool(result),
                    f"rule {name}: {selector}",
                    f"{len(result)} series"
                    if outcome == "success"
                    else f"error {result}",
                )

    # Prometheus loaded the same file and evaluates every rule without error.
    with urllib.request.urlopen(f"{prom}/api/v1/rules", timeout=10) as response:
        loaded = {
            r["name"]: r
            for g in json.load(response)["data"]["groups"]
            for r in g["rules"]
        }
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            got = loaded.get(name)
            report(
                got is not None and got.get("health") == "ok",
                f"rule {name}: loaded by Prometheus, health ok",
                "missing"
                if got is None
                else f"{got.get('health')} {got.get('lastError', '')}".strip(),
            )


def main(argv: list[str]) -> int:
    command, args = argv[1], argv[2:]
    if command == "serve":
        serve(int(args[0]))
    elif command == "traffic":
        traffic(int(args[0]), int(args[1]))
    elif command == "hold-tunnel":
        holdTunnel(int(args[0]), int(args[1]), args[2], args[3])
    elif command == "queries":
        checkQueries(args[0], args[1], args[2], float(args[3]))
    elif command == "expect":
        outcome, result = waitForData(
            args[0], args[1], time.monotonic() + float(args[2])
        )
        report(outcome == "success" and bool(result), f"live: {args[1]}", str(result))
    else:
        sys.exit(f"unknown command {command!r}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
