#!/usr/bin/env python3
"""
Turn bench/run's records (one JSON object a line) into results/latest.json
and results/latest.md: the table, the ratios to the best peer and to direct,
CPU use and noise, and the machine.  Standard library only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

PROXIES = ["egressproxy", "squid", "tinyproxy", "proxy.py", "mitmproxy"]
# mitmproxy has figures on row (g) only, and is the only peer there.
PEERS = ["squid", "tinyproxy", "proxy.py", "mitmproxy"]
COLUMNS = ["direct"] + PROXIES

WRK_ROWS = [
    ("get_keepalive", "(a) GET /small, keep-alive"),
    ("post_keepalive", "(a) POST /webhook 2 KiB, keep-alive"),
    ("get_close", "(b) GET /close/small, Connection: close"),
    ("post_close", "(b) POST /close/webhook 2 KiB, Connection: close"),
]

# key, label, record row, value function, "higher" or "lower" is better
MEASURES: list[tuple[str, str, str, object, str]] = []
for _row, _label in WRK_ROWS:
    MEASURES += [
        (f"{_row}.rps", f"{_label}: req/s", _row, lambda r: r.get("rps"), "higher"),
        (f"{_row}.p50", f"{_label}: p50 ms", _row, lambda r: r.get("p50_ms"), "lower"),
        (f"{_row}.p99", f"{_label}: p99 ms", _row, lambda r: r.get("p99_ms"), "lower"),
    ]
MEASURES += [
    ("tunnel_request.rps", "(f) tunnel per request (CONNECT, POST /webhook 2 KiB "
     "inside, close): tunnels/s", "tunnel_request", lambda r: r.get("rps"), "higher"),
    ("tunnel_request.p99", "(f) tunnel per request: p99 ms", "tunnel_request",
     lambda r: r.get("p99_ms"), "lower"),
    ("connect_bulk.mbps", "(c) CONNECT tunnel, /big: MB/s, best of 3", "connect_bulk",
     lambda r: r.get("mbps"), "higher"),
    ("tunnels.kib", "(d) idle CONNECT tunnel: KiB of RSS each", "tunnels",
     lambda r: r.get("kib_per_tunnel"), "lower"),
    ("tunnels.idle_rss", "(d) idle process, before the tunnels: MiB RSS", "tunnels",
     lambda r: round(r["rss_before_kib"] / 1024, 1) if r.get("rss_before_kib") else None,
     "lower"),
    ("intercept_get.rps", "(g) intercepted HTTPS GET /small, keep-alive: req/s",
     "intercept_get", lambda r: r.get("rps"), "higher"),
    ("intercept_get.p50", "(g) intercepted HTTPS GET /small, keep-alive: p50 ms",
     "intercept_get", lambda r: r.get("p50_ms"), "lower"),
    ("intercept_get.p99", "(g) intercepted HTTPS GET /small, keep-alive: p99 ms",
     "intercept_get", lambda r: r.get("p99_ms"), "lower"),
]  # fmt: skip


def fmt(key: str, v: float | None) -> str:
    if v is None:
        return "–"
    if key.endswith(".rps") or key.endswith(".mbps"):
        return f"{v:,.0f}"
    if key.endswith((".p50", ".p99")):
        return f"{v:.2f}" if v < 100 else f"{v:,.0f}"
    return f"{v:.1f}"


def table(records: list[dict]) -> dict[str, dict[str, float | None]]:
    by = {(r["proxy"], r["row"]): r for r in records}
    out: dict[str, dict[str, float | None]] = {}
    for key, _label, row, value, _better in MEASURES:
        out[key] = {}
        for proxy in COLUMNS:
            r = by.get((proxy, row))
            v = None
            if r is not None and "error" not in r:
                v = value(r)  # type: ignore[operator]
            out[key][proxy] = v
    return out


def ratios(t: dict[str, dict[str, float | None]]) -> dict[str, dict[str, dict]]:
    better = {m[0]: m[4] for m in MEASURES}
    vs_peer: dict[str, dict] = {}
    vs_direct: dict[str, dict] = {}
    for key, vals in t.items():
        peers = [vals[p] for p in PEERS if vals.get(p)]
        best = (max if better[key] == "higher" else min)(peers) if peers else None
        best_name = next(
            (p for p in PEERS if best is not None and vals.get(p) == best), None
        )
        vs_peer[key] = {"best_peer": best_name, "best_value": best}
        vs_direct[key] = {}
        for p in PROXIES:
            v = vals.get(p)
            vs_peer[key][p] = round(v / best, 3) if v and best else None
            d = vals.get("direct")
            vs_direct[key][p] = round(v / d, 3) if v and d else None
    return {"vs_best_peer": vs_peer, "vs_direct": vs_direct}


LOG_ROWS = [
    ("logs_off", "logs off (--access-log none --decision-log none)"),
    ("logs_default", "default logging (access log to stdout, decisions in twistd.log)"),
    ("logs_files", "both logs to files"),
]

# The summary's rows: one figure per row of the list.
SUMMARY = [
    "get_keepalive.rps", "post_keepalive.rps", "get_close.rps", "post_close.rps",
    "tunnel_request.rps", "tunnel_request.p99", "connect_bulk.mbps", "tunnels.kib", "get_keepalive.p99",
    "intercept_get.rps", "intercept_get.p99",
]  # fmt: skip


def _median(values: list) -> float | None:
    values = sorted(v for v in values if v)
    if not values:
        return None
    middle = len(values) // 2
    if len(values) % 2:
        return values[middle]
    return (values[middle - 1] + values[middle]) / 2


def logging(records: list[dict]) -> dict[str, dict]:
    """
    egressproxy's logging rows: req/s, CPU per request, and both as ratios
    to the logs-off row of the same run (CPU: off / this, so that 0.90
    means logging costs 10%).  A row measured in several rounds (a full
    run's three) gives its median, and its rounds in "rounds".
    """
    rounds: dict[str, list[dict]] = {}
    for r in records:
        if r["proxy"] == "egressproxy" and "error" not in r:
            rounds.setdefault(r["row"], []).append(r)
    by = {
        row: {
            "rps": _median([r.get("rps") for r in rs]),
            "cpu_us_per_req": _median([r.get("cpu_us_per_req") for r in rs]),
            "rounds": [(r.get("rps"), r.get("cpu_us_per_req")) for r in rs],
        }
        for row, rs in rounds.items()
    }
    off = by.get("logs_off")
    out: dict[str, dict] = {}
    for row, _label in LOG_ROWS:
        r = by.get(row)
        if r is None:
            continue
        item = {
            "rps": r["rps"],
            "cpu_us_per_req": r["cpu_us_per_req"],
            "rounds": r["rounds"],
        }
        if off and off.get("rps") and r.get("rps"):
            item["rps_ratio"] = round(r["rps"] / off["rps"], 3)
        if off and off.get("cpu_us_per_req") and r.get("cpu_us_per_req"):
            item["cpu_ratio"] = round(off["cpu_us_per_req"] / r["cpu_us_per_req"], 3)
        out[row] = item
    return out


def summary(doc: dict) -> list[str]:
    """
    The table at the top: each row, egressproxy's figure, the best peer's,
    and the ratio (above 1 is better for egressproxy on every row: for
    latency and memory it is peer / egressproxy).
    """
    t, rat = doc["table"], doc["ratios"]["vs_best_peer"]
    labels = {m[0]: m[1] for m in MEASURES}
    better = {m[0]: m[4] for m in MEASURES}
    commit = doc["versions"].get("egressproxy", "?")
    out = [
        "## Summary",
        "",
        f"{doc['date']}, egressproxy {commit}; `{doc['command']}`. "
        "Ratio: egressproxy's figure against the best peer's, turned so "
        "that above 1.00 means egressproxy is ahead.",
        "",
        "| row | egressproxy | best peer | ratio |",
        "|---|---:|---|---:|",
    ]
    for key in SUMMARY:
        ours = t.get(key, {}).get("egressproxy")
        r = rat.get(key, {})
        best, name = r.get("best_value"), r.get("best_peer")
        ratio = None
        if ours and best:
            ratio = ours / best if better[key] == "higher" else best / ours
        peer = f"{name} ({fmt(key, best)})" if name else "–"
        shown = f"{ratio:.2f}" if ratio is not None else "–"
        out.append(f"| {labels[key]} | {fmt(key, ours)} | {peer} | {shown} |")
    logs = doc.get("logging") or {}
    for row, label in LOG_ROWS[1:]:
        item = logs.get(row)
        if item is None:
            continue
        out.append(
            f"| keep-alive GET, {label}: req/s | {item['rps']:,.0f} | "
            f"logs off ({logs.get('logs_off', {}).get('rps', 0):,.0f}) | "
            f"{item.get('rps_ratio', 0):.2f} (CPU per request: "
            f"{item.get('cpu_ratio', 0):.2f}) |"
        )
    first = True
    for key, what in [
        ("tunnel_request.rps", "the tunnel-per-request row"),
        ("intercept_get.rps", "the intercepted-request row (g)"),
    ]:
        direct = t.get(key, {}).get("direct")
        proxies = [v for p, v in t.get(key, {}).items() if p != "direct" and v]
        if direct and proxies:
            head = direct / max(proxies)
            out += [""] if first else []
            first = False
            out += [
                f"Load generator headroom on {what}: direct does "
                f"{head:.1f}× the best proxy"
                + (" (at least 2×: the generator is not the limit)." if head >= 2
                   else " — **less than 2×: the generator may be the limit**."),
            ]  # fmt: skip
    out.append("")
    return out


def markdown(doc: dict) -> str:
    t, rat = doc["table"], doc["ratios"]
    cols = [c for c in COLUMNS if any(t[k].get(c) is not None for k in t)]
    proxies = [c for c in cols if c != "direct"]
    m, s = doc["machine"], doc["settings"]
    out = [
        "# egressproxy benchmark: latest run",
        "",
        f"- **Date:** {doc['date']}",
        f"- **Command:** `{doc['command']}` ({doc['mode']} mode, "
        + ("pinned: each proxy on core 0, origin and load generators on core 1"
           if s["pinned"] else "unpinned") + f"; took {doc['elapsed_s']} s)",
        f"- **Machine:** {m['nproc']} × {m['cpu_model']} ({m.get('cpu_mhz', '?')} MHz), "
        f"{m['memory_gib']} GiB, "
        f"Linux {m['kernel']}, {m['os']}; load average at the end {' '.join(m['loadavg'])}",
        "- **Versions:** " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()),
        f"- **Load:** wrk {s['threads']} threads, {s['conns']} connections, {s['duration_s']} s "
        f"per row; {s['tunnels']} tunnels; /big is {s['big_mib']} MiB",
    ]  # fmt: skip
    if s.get("workers", 1) > 1:
        out.append(f"- **Workers:** egressproxy --workers {s['workers']}, "
                   f"squid workers {s['workers']}")  # fmt: skip
    if doc.get("merged_from"):
        out.append(
            "- **Merged:** rows of "
            + ", ".join(f"{p} from {d}" for p, d in doc["merged_from"].items())
            + " were kept from an earlier run"
        )
    out = out[:2] + summary(doc) + out[2:]
    out += ["", "## Results", ""]
    out.append("| measure | " + " | ".join(cols) + " |")
    out.append("|---|" + "---:|" * len(cols))
    by = {(r["proxy"], r["row"]): r for r in doc["records"]}

    def cell(key: str, row: str, proxy: str) -> str:
        text = fmt(key, t[key].get(proxy))
        r = by.get((proxy, row))
        if r and r.get("errors") and r["errors"] > 0.01 * max(r.get("requests", 0), 1):
            text += " ⚠"
        return text

    for key, label, row, *_ in MEASURES:
        out.append(f"| {label} | " + " | ".join(cell(key, row, c) for c in cols) + " |")
    out.extend(["", "⚠: more than 1% socket errors in that wrk run; see the end."])

    def ratio_table(title: str, which: str, keys: list[str], extra: str) -> None:
        out.extend(["", f"## {title}", "", extra, ""])
        head = (
            "| measure | "
            + ("best peer | " if which == "vs_best_peer" else "")
            + " | ".join(proxies)
            + " |"
        )
        out.append(head)
        out.append(
            "|---|"
            + ("---|" if which == "vs_best_peer" else "")
            + "---:|" * len(proxies)
        )
        for key, label, *_ in MEASURES:
            if key not in keys:
                continue
            r = rat[which][key]
            cells = [f"{r[p]:.2f}" if r.get(p) is not None else "–" for p in proxies]
            pre = ""
            if which == "vs_best_peer":
                pre = f"{r['best_peer'] or '–'} ({fmt(key, r['best_value'])}) | "
            out.append(f"| {label} | {pre}" + " | ".join(cells) + " |")

    all_keys = [k for k, *_ in MEASURES]
    ratio_table(
        "Ratio to the best peer", "vs_best_peer", all_keys,
        "Each figure divided by the best of squid, tinyproxy and proxy.py on that "
        "row (on row (g), intercepted requests, mitmproxy's). For req/s and MB/s above 1 is better; for latency and memory below 1 "
        "is better.",
    )  # fmt: skip
    ratio_table(
        "Ratio to direct",
        "vs_direct",
        [k for k in all_keys if not k.startswith("tunnels")],
        "Each figure divided by the same load sent straight to the origin (no proxy).",
    )

    logs = doc.get("logging") or {}
    if logs:
        out.extend([
            "", "## Logging cost (egressproxy, keep-alive GET /small)", "",
            "Each configuration on a fresh process, one after the other, in "
            "interleaved rounds (three in a full run); the figures are each "
            "configuration's medians, the rounds are listed. CPU per "
            "request is the proxy's CPU time over the row divided by the responses: "
            "the figure to trust on a shared machine. Ratios are to logs off "
            "(CPU: off / this, so 0.90 means logging costs 10%).",
            "",
            "| configuration | req/s | ratio | CPU µs per request | ratio | rounds (req/s, CPU µs) |",
            "|---|---:|---:|---:|---:|---|",
        ])  # fmt: skip
        for row, label in LOG_ROWS:
            item = logs.get(row)
            if item is None:
                continue
            rounds = "; ".join(
                f"{rps or 0:,.0f}, {cpu or 0:.0f}" for rps, cpu in item.get("rounds", [])
            )
            out.append(
                f"| {label} | {item['rps']:,.0f} | {item.get('rps_ratio', 1):.2f} | "
                f"{item.get('cpu_us_per_req') or 0:.1f} | "
                f"{item.get('cpu_ratio', 1):.2f} | {rounds} |"
            )
    icpt = [(p, by.get((p, "intercept_get"))) for p in proxies]
    icpt = [(p, r) for p, r in icpt if r and r.get("cpu_us_per_req") is not None]
    if icpt:
        out.extend([
            "", "## Intercepted requests (g): CPU per request", "",
            "The proxy's CPU time over the row divided by the responses: the figure "
            "to trust on a shared machine.",
            "",
            "| proxy | req/s | CPU µs per request |",
            "|---|---:|---:|",
        ])  # fmt: skip
        for p, r in icpt:
            out.append(f"| {p} | {r['rps']:,.0f} | {r['cpu_us_per_req']:,.0f} |")
    out.extend([
        "", "## CPU and noise", "",
        "Per row: the proxy's CPU use (100% = one core saturated) / what else ran "
        "on the proxy's core meanwhile (other work on the machine; 0 is clean) / "
        "how busy the load core was (origin, wrk, curl; below 100% means the load "
        "generator was not the limit) / the hypervisor's steal time.",
        "",
        "| row | " + " | ".join(proxies) + " |",
        "|---|" + "---:|" * len(proxies),
    ])  # fmt: skip
    extra = [
        ("tunnel_request", "(f) tunnel per request"),
        ("connect_bulk", "(c) CONNECT /big"),
        ("intercept_get", "(g) intercepted HTTPS GET"),
    ]
    extra += [(row, f"logging: {label}") for row, label in LOG_ROWS]
    for row, label in WRK_ROWS + extra:
        cells = []
        for p in proxies:
            r = by.get((p, row))
            if not r or r.get("proxy_cpu_pct") is None:
                cells.append("–")
                continue
            other, load = r.get("core_other_pct"), r.get("load_core_busy_pct")
            cells.append(
                f"{r['proxy_cpu_pct']:.0f}%"
                + (f" / {other:.0f}%" if other is not None else "")
                + (f" / {load:.0f}%" if load is not None else "")
                + f" / {r.get('steal_pct', 0):.1f}%"
            )
        out.append(f"| {label} | " + " | ".join(cells) + " |")

    notes = []
    for r in doc["records"]:
        where = f"{r['proxy']} {r['row']}"
        if r.get("error"):
            notes.append(f"{where}: **error**: {r['error']}")
        if r.get("warning"):
            notes.append(f"{where}: {r['warning']}")
        if r.get("errors"):
            notes.append(f"{where}: {r['errors']:,} wrk socket errors beside "
                         f"{r['requests']:,} completed responses "
                         f"({json.dumps(r.get('error_detail'))})")  # fmt: skip
        if r.get("kind") == "tunnels":
            if r.get("failures"):
                notes.append(f"{where}: tunnel failures {json.dumps(r['failures'])}")
            if r.get("alive_at_sample", r.get("opened")) != r.get("opened"):
                notes.append(f"{where}: only {r['alive_at_sample']} of {r['opened']} "
                             "tunnels still open when RSS was sampled")  # fmt: skip
            if r.get("checked") and r.get("checked_ok") != r.get("checked"):
                notes.append(f"{where}: {r['checked_ok']}/{r['checked']} held tunnels "
                             "carried a request afterwards")  # fmt: skip
    out.extend(["", "## Errors and warnings", ""])
    out.extend([f"- {n}" for n in notes] or ["None."])
    out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", required=True)
    p.add_argument("--machine", required=True)
    p.add_argument("--versions", required=True)
    p.add_argument("--out", required=True, help="path without .json/.md")
    p.add_argument("--command", required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--pinned", type=int, required=True)
    p.add_argument("--duration", type=int, required=True)
    p.add_argument("--tunnels", type=int, required=True)
    p.add_argument("--big-mib", type=int, required=True)
    p.add_argument("--elapsed", type=int, required=True)
    p.add_argument("--merge", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args()

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(a.results) as f:
        records = [json.loads(line) for line in f if line.strip()]
    for r in records:
        r["measured_at"] = now
    with open(a.machine) as f:
        machine = json.load(f)
    with open(a.versions) as f:
        versions = json.load(f)

    merged_from: dict[str, str] = {}
    if a.merge and os.path.exists(a.out + ".json"):
        with open(a.out + ".json") as f:
            old = json.load(f)
        fresh = {r["proxy"] for r in records}
        for r in old["records"]:
            if r["proxy"] not in fresh:
                records.append(r)
                merged_from[r["proxy"]] = r.get("measured_at", old["date"])

    t = table(records)
    doc = {
        "date": now,
        "command": a.command.strip(),
        "mode": a.mode,
        "settings": {
            "pinned": bool(a.pinned), "threads": 2, "conns": 50,
            "duration_s": a.duration, "tunnels": a.tunnels, "big_mib": a.big_mib,
            "post_body_bytes": 2048, "workers": a.workers,
        },
        "elapsed_s": a.elapsed,
        "machine": machine,
        "versions": versions,
        "merged_from": merged_from,
        "table": t,
        "ratios": ratios(t),
        "logging": logging(records),
        "records": records,
    }  # fmt: skip
    with open(a.out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    with open(a.out + ".md", "w") as f:
        f.write(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
