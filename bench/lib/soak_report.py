#!/usr/bin/env python3
"""
Turn bench/soak's records (one JSON object a line) into results/soak.json
and results/soak.md: every figure, a verdict per step, the machine and the
versions.  Standard library only.
"""

from __future__ import annotations

import argparse
import datetime
import json

# Memory growth across the keep-alive run that still counts as flat: below
# this, allocator noise and h11/Twisted caches filling up explain it.
FLAT_KIB = 1024


def mib(kib: float | None) -> str:
    return "–" if kib is None else f"{kib / 1024:.1f}"


def ms(v: float | None) -> str:
    return "–" if v is None else (f"{v:.2f}" if v < 100 else f"{v:,.0f}")


def verdicts(steps: dict, proxies: dict) -> dict[str, str]:
    out = {}
    t = steps.get("tunnels")
    if t:
        ok = (t["opened"] == t["n"] and t["alive_at_sample"] == t["opened"]
              and t["fresh_requests"]["ok"] == t["fresh_requests"]["sent"]
              and t["held_checked_ok"] == t["held_checked"]
              and t["fresh_tunnels_ok"] == t["fresh_tunnels"])  # fmt: skip
        out["tunnels"] = (
            f"{'PASS' if ok else 'FAIL'}: {t['opened']:,} of {t['n']:,} tunnels held at "
            f"{t['kib_per_tunnel']} KiB each; fresh requests while held "
            f"{t['fresh_requests']['ok']}/{t['fresh_requests']['sent']}, "
            f"held tunnels carrying a GET {t['held_checked_ok']}/{t['held_checked']}"
        )
    k = steps.get("keepalive")
    if k:
        g = k.get("growth_kib")
        if g is None:
            out["keepalive"] = "NO VERDICT: too few samples after the warm-up"
        else:
            flat = g <= FLAT_KIB
            out["keepalive"] = (
                f"{'FLAT' if flat else 'GROWS'}: {g:+,} KiB ({k['growth_pct']:+.1f}%, "
                f"{k['growth_bytes_per_request']:+.1f} bytes/request) from request "
                f"{k['warm_sample']['requests']:,} to {k['samples'][-1]['requests']:,}"
                f"; {k['errors']} errors in {k['completed']:,} requests"
            )
    s = steps.get("slowloris")
    if s:
        cut_all = s["slow_cut_by_proxy"] == s["slow_opened"] and s["slow_opened"] > 0
        d, b = s["during_attack"], s["without_attack"]
        served = d["ok"] == d["sent"]
        out["slowloris"] = (
            f"{'PASS' if cut_all and served else 'FAIL'}: {s['slow_cut_by_proxy']} of "
            f"{s['slow_opened']} slow connections cut by the proxy after "
            f"{s['slow_cut_after_s']['min']}–{s['slow_cut_after_s']['max']} s "
            f"({', '.join(f'{v}× {k}' for k, v in s['slow_answers'].items())}); normal client "
            f"{d['success_pct']}% ok during, {b['success_pct']}% without; p99 "
            f"{ms(d['p99_ms'])} vs {ms(b['p99_ms'])} ms"
        )
    f = steps.get("faults")
    if f:
        bad = [name for name, r in f["faults"].items() if not r["as_promised"]]
        n = f["normal"]
        out["faults"] = (
            ("PASS: " if not bad and n["ok"] == n["sent"]
             else "FAIL (a normal request failed): " if not bad else "FAIL: ")
            + f"{len(f['faults']) - len(bad)} of {len(f['faults'])} faults answered as promised"
            + (f" (not: {', '.join(bad)})" if bad else "")
            + f"; normal requests {n['ok']}/{n['sent']} ok"
        )
    bl = steps.get("busy_lifetime")
    if bl:
        out["busy_lifetime"] = (
            f"{'PASS' if not bl['errors'] else 'FAIL'}: {bl['errors']} of "
            f"{bl['completed'] + bl['errors']:,} requests to the healthy origin failed"
            + (f" ({', '.join(f'{v}× {k}' for k, v in bl['failures'].items())})"
               if bl["failures"] else "")
        )
    dead = [p for p, r in proxies.items() if not r["alive_at_end"]]
    noisy = [p for p, r in proxies.items() if r["log_problem_lines"]]
    out["proxy"] = (
        ("died in: " + ", ".join(dead) if dead else "alive at the end of every step")
        + ("; log problems in: " + ", ".join(noisy) if noisy else "; nothing alarming logged")
    )
    return out


def describe(r: dict) -> str:
    if r.get("status") is None:
        return r.get("end") or "?"
    got = f"{r['status']}"
    if r.get("reason_code"):
        got += f" / {r['reason_code']}"
    return got


def body(r: dict) -> str:
    if r.get("status") is None:
        return "–"
    cl = r.get("content_length")
    return f"{r['body_bytes']:,} of {cl:,}" if cl is not None else f"{r['body_bytes']:,}"


def markdown(doc: dict) -> str:
    m, v, st, vd = doc["machine"], doc["versions"], doc["steps"], doc["verdicts"]
    out = [
        "# egressproxy soak and faults: latest run",
        "",
        f"- **Date:** {doc['date']}",
        f"- **Command:** `{doc['command']}` ({doc['mode']} mode, "
        + ("pinned: egressproxy on core 0, origins and clients on core 1"
           if doc["pinned"] else "unpinned")
        + f"; took {doc['elapsed_s']} s of its {doc['time_limit_s']} s limit)",
        f"- **Machine:** {m['nproc']} × {m['cpu_model']} ({m.get('cpu_mhz', '?')} MHz), "
        f"{m['memory_gib']} GiB, Linux {m['kernel']}, {m['os']}; load average at the end "
        f"{' '.join(m['loadavg'])}",
        f"- **egressproxy:** {v['egressproxy']} at commit {v['commit']}; Python "
        f"{v['python']}, Twisted {v['twisted']}, "
        + (f"httptools {v['httptools']}" if "httptools" in v else f"h11 {v['h11']}")
        + f"; origin nginx {v['nginx']}; "
        f"clients and fault origin: Python {v['client python (stdlib asyncio)']} asyncio",
        "- **Proxies:** " + vd["proxy"],
        "",
    ]  # fmt: skip

    t = st.get("tunnels")
    out += ["## 1. Idle CONNECT tunnels", ""]
    if t:
        lim = doc["proxies"].get("tunnels", {}).get("nofile") or {}
        fr = t["fresh_requests"]
        out += [
            "| measure | figure |",
            "|---|---:|",
            f"| tunnels asked for / opened / still open when sampled | {t['n']:,} / {t['opened']:,} / {t['alive_at_sample']:,} |",
            f"| time to open them all (50 handshakes at a time) | {t['open_seconds']} s |",
            f"| proxy VmRSS before / with them held | {mib(t['rss_before_kib'])} / {mib(t['rss_after_kib'])} MiB |",
            f"| **VmRSS per idle tunnel** | **{t['kib_per_tunnel']} KiB** |",
            f"| proxy descriptors before / with them held | {t['fds_before']:,} / {t['fds_after']:,} |",
            f"| proxy open-file limit: soft at start → soft while running / hard | {doc['proxies'].get('tunnels', {}).get('started_with_soft_nofile', '?'):,} → {lim.get('soft', '?'):,} / {lim.get('hard', '?'):,} |",
            f"| held tunnels that carried a GET afterwards | {t['held_checked_ok']} / {t['held_checked']} |",
            f"| fresh forwarded GETs while held: ok, p50, max | {fr['ok']} / {fr['sent']}, {ms(fr['p50_ms'])} ms, {ms(fr['max_ms'])} ms |",
            f"| fresh tunnels (with a GET) while held | {t['fresh_tunnels_ok']} / {t['fresh_tunnels']} |",
            f"| after closing: active tunnels (metric), seconds to get there | {t['active_tunnels_after_close']:g}, {t['drain_seconds']} s |",
            f"| proxy VmRSS after closing them | {mib(t['rss_after_close_kib'])} MiB |",
            f"| proxy descriptors after closing them | {t['fds_after_close']} |",
        ]  # fmt: skip
        if t["failures"]:
            out.append(f"\nFailures: `{json.dumps(t['failures'])}`")
        out += ["", f"**Verdict:** {vd['tunnels']}", ""]
    else:
        out += ["Not measured (the step failed; see the script's output).", ""]

    k = st.get("keepalive")
    out += ["## 2. Memory across keep-alive requests", ""]
    if k:
        out += [
            f"{k['completed']:,} GETs of a 1 KiB file over {k['conns']} keep-alive client "
            f"connections in {k['seconds']} s ({k['rps']:,.0f} req/s, proxy CPU "
            f"{k['proxy_cpu_pct']:.0f}% of a core), {k['errors']} errors"
            + (f" `{json.dumps(k['failures'])}`" if k["failures"] else "") + ".",
            "",
            "| requests done | seconds | VmRSS MiB | VmRSS KiB | descriptors |",
            "|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        for s in k["samples"]:
            out.append(f"| {s['requests']:,} | {s['t']} | {mib(s['rss_kib'])} | "
                       f"{s['rss_kib']:,} | {s['fds']} |")  # fmt: skip
        out += [
            "",
            f"After 2 s idle: {k['rss_after_2s_idle_kib']:,} KiB. Warm-up: the first "
            f"{k['warmup_requests']:,} requests; flat means at most {FLAT_KIB:,} KiB of "
            "growth after them.",
            "",
            f"**Verdict:** {vd['keepalive']}",
            "",
        ]  # fmt: skip
    else:
        out += ["Not measured (the step failed; see the script's output).", ""]

    s = st.get("slowloris")
    out += ["## 3. Slowloris beside normal traffic", ""]
    if s:
        b, d = s["without_attack"], s["during_attack"]
        out += [
            f"`--request-header-timeout {s['header_timeout_s']:g}`. The normal client opens a "
            f"fresh connection for each GET, one every {s['normal_interval_s'] * 1000:g} ms "
            "(open loop: each starts on time whatever the others do), 5 s timeout; "
            f"{s['baseline_s']:g} s alone, then {s['attack_s']:g} s beside {s['slow']} "
            f"connections that each send a partial request head a byte every "
            f"{s['byte_every_s']:g} s. A slow connection the proxy cuts is reopened while the "
            "attack lasts; after it, the last ones keep trickling until the proxy cuts them.",
            "",
            "| normal client | without the attack | during the attack |",
            "|---|---:|---:|",
            f"| requests ok / sent | {b['ok']} / {b['sent']} | {d['ok']} / {d['sent']} |",
            f"| success | {b['success_pct']}% | {d['success_pct']}% |",
            f"| p50 latency | {ms(b['p50_ms'])} ms | {ms(d['p50_ms'])} ms |",
            f"| p99 latency | {ms(b['p99_ms'])} ms | {ms(d['p99_ms'])} ms |",
            f"| max latency | {ms(b['max_ms'])} ms | {ms(d['max_ms'])} ms |",
            f"| failures | {json.dumps(b['failures']) if b['failures'] else 'none'} | "
            f"{json.dumps(d['failures']) if d['failures'] else 'none'} |",
            "",
            "| slow connections | figure |",
            "|---|---:|",
            f"| opened (first wave + reopened) | {s['slow_opened']} ({s['slow_first_wave']} + {s['slow_opened'] - s['slow_first_wave']}) |",
            f"| failed to connect | {s['slow_connect_failed']} |",
            f"| first wave cut by the proxy | {s['slow_first_wave_cut_by_proxy']} / {s['slow_first_wave']} |",
            f"| all cut by the proxy by the end | {s['slow_cut_by_proxy']} / {s['slow_opened']} |",
            f"| still open at the end (closed by the client) | {s['slow_still_open_at_end']} |",
            f"| cut after (min / p50 / max) | {s['slow_cut_after_s']['min']} / {s['slow_cut_after_s']['p50']} / {s['slow_cut_after_s']['max']} s |",
            f"| what they got (status / reason code) | {', '.join(f'{v} × {k}' for k, v in s['slow_answers'].items())} |",
            f"| most head bytes one sent | {s['slow_bytes_sent_max']} |",
            f"| proxy's open client connections / descriptors 1 s into the attack (metrics) | {s['client_connections_during_attack']:g} / {s.get('open_fds_during_attack') or 0:g} |",
            f"| `egressproxy_requests_total` with reason code 1015 (metric, change) | {s['metric_1015_delta']:g} |",
        ]  # fmt: skip
        out += ["", f"**Verdict:** {vd['slowloris']}", ""]
    else:
        out += ["Not measured (the step failed; see the script's output).", ""]

    f = st.get("faults")
    out += ["## 4. Upstream faults", ""]
    if f:
        n = f["normal"]
        out += [
            f"`--read-timeout {f['read_timeout_s']:g} --connection-lifetime {f['lifetime_s']:g}`. "
            "One request to each fault, one after another; \"origin side\" is when and how "
            "the proxy's connection to the fault origin ended, as the origin saw it.",
            "",
            "| fault | promised | client got | body bytes | ended | time | origin side | as promised |",
            "|---|---|---|---:|---|---:|---|---|",
        ]  # fmt: skip
        for name, r in f["faults"].items():
            o = r.get("origin_side") or {}
            if o.get("event") == "reset sent":
                side = f"origin sent its reset at {o['after_s']} s"
            elif o.get("event") == "peer gone":
                side = f"proxy closed it ({o.get('how')}) at {o['after_s']} s"
            else:
                side = o.get("event", "?")
            out.append(
                f"| {name} | {r['expected']} | {describe(r)} | {body(r)} | {r.get('end')} | "
                f"{r['t_end']:.2f} s | {side} | {'yes' if r['as_promised'] else '**NO**'} |"
            )
        out += [
            "",
            f"Normal requests beside them (a fresh connection and a GET every "
            f"{f['normal_every_s']:g} s): {n['ok']} / {n['sent']} ok, p50 {ms(n['p50_ms'])} ms, "
            f"p99 {ms(n['p99_ms'])} ms, max {ms(n['max_ms'])} ms"
            + (f", failures `{json.dumps(n['failures'])}`" if n["failures"] else "") + "."
            + (f" Their reasons: `{json.dumps(n['failure_reasons'])}`."
               if n.get("failure_reasons") else ""),
            "",
        ]  # fmt: skip
        reasons = [(name, r["reason"]) for name, r in f["faults"].items() if r.get("reason")]
        if reasons:
            out += ["The proxy's reasons (`X-WhSentry-Reason`):", ""]
            out += [f"- {name}: {text}" for name, text in reasons]
            out.append("")
        out += [f"**Verdict:** {vd['faults']}", ""]
    else:
        out += ["Not measured (the step failed; see the script's output).", ""]

    bl = st.get("busy_lifetime")
    if bl:
        out += [
            "### 4b. Busy traffic to the healthy origin, same proxy",
            "",
            f"Right after the faults, on the same proxy (lifetime "
            f"{f['lifetime_s'] if f else '?'} s): GETs of the 1 KiB file over {bl['conns']} "
            f"keep-alive connections for {bl['seconds']} s (about two lifetimes of a pooled "
            f"upstream connection): {bl['completed']:,} ok ({bl['rps']:,.0f} req/s), "
            f"{bl['errors']} failed"
            + (f": `{json.dumps(bl['failures'])}`" if bl["failures"] else "") + ".",
        ]  # fmt: skip
        if bl.get("failure_reasons"):
            out += ["", "Their reasons (`X-WhSentry-Reason`):", ""]
            out += [f"- {n} × {text}" for text, n in bl["failure_reasons"].items()]
        out += ["", f"**Verdict:** {vd['busy_lifetime']}", ""]

    out += ["## The proxy processes", "",
            "| step | alive at the end | open-file limit (soft at start → soft / hard; logged) | log lines | problem lines |",
            "|---|---|---|---:|---:|"]  # fmt: skip
    for step, p in doc["proxies"].items():
        lim = p.get("nofile") or {}
        out.append(
            f"| {step} | {'yes' if p['alive_at_end'] else '**no**'} | "
            f"{p.get('started_with_soft_nofile', '?')} → {lim.get('soft', '?')} / {lim.get('hard', '?')}; "
            f"{p.get('logged_open_file_limit')} | "
            f"{p['log_lines']} | {p['log_problem_lines']} |"
        )
    problems = [(s, line) for s, p in doc["proxies"].items() for line in p["log_problems"]]
    if problems:
        out += ["", "Problem lines from the proxies' logs (first ten of each):", ""]
        out += [f"- {s}: `{line[:200]}`" for s, line in problems]
    out += ["", "Every proxy was started as `twistd -n --pidfile= --logfile=FILE egressproxy` "
            "with the arguments recorded in soak.json (`proxies.STEP.args`).", ""]  # fmt: skip
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
    p.add_argument("--elapsed", type=int, required=True)
    p.add_argument("--time-limit", type=int, required=True)
    a = p.parse_args()

    with open(a.results) as f:
        records = [json.loads(line) for line in f if line.strip()]
    steps = {r["step"]: r for r in records if r.get("step") not in (None, "proxy")}
    proxies = {r["for"]: r for r in records if r.get("step") == "proxy"}
    with open(a.machine) as f:
        machine = json.load(f)
    with open(a.versions) as f:
        versions = json.load(f)
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": a.command.strip(),
        "mode": a.mode,
        "pinned": bool(a.pinned),
        "elapsed_s": a.elapsed,
        "time_limit_s": a.time_limit,
        "machine": machine,
        "versions": versions,
        "verdicts": verdicts(steps, proxies),
        "steps": steps,
        "proxies": proxies,
    }
    with open(a.out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    text = markdown(doc)
    with open(a.out + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
