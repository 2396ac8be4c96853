#!/usr/bin/env python3
"""
The load and fault clients of bench/soak.  Standard library only (asyncio).

Every subcommand talks to 127.0.0.1 only, is bounded in count and in time
(each has a --deadline it cannot outlive), and prints one JSON record on
stdout.

  tunnels    hold N idle CONNECT tunnels; VmRSS before and after; a fresh
             request while they are held
  keepalive  N keep-alive GETs over C connections, VmRSS every S requests
  slowloris  a normal client alone, then beside slow connections that send
             a partial request head a byte at a time
  faults     one request to each port of soak_origin.py, with a normal
             request every 0.5 s beside them
  limits     the proxy's open-file limits, from /proc/PID/limits
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import cpu_ticks, rss_kib  # noqa: E402  (bench/lib/measure.py)

LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def now() -> float:
    return time.monotonic()


def raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, want), hard))


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def pct(values: list[float], p: float) -> float | None:
    """The p-th percentile (nearest rank) of C{values}, or None."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return round(s[k], 2)


# ---------------------------------------------------------------- HTTP


def proxy_get(origin: int, path: str, close: bool = True) -> bytes:
    """An absolute-form GET, as a client sends it to a forward proxy."""
    host = f"{LOOPBACK}:{origin}"
    extra = "Connection: close\r\n" if close else ""
    return f"GET http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


async def read_response(reader: asyncio.StreamReader, t0: float, deadline: float) -> dict:
    """
    Read one response and say how it ended.  C{end} is "complete", or why
    not: "eof" or "reset" (the connection ended before the framing said
    the body was complete), "timeout", or the same before the head.
    """
    res: dict = {"status": None, "reason_code": None, "reason": None,
                 "content_length": None, "body_bytes": 0, "end": None,
                 "t_head": None, "t_end": None}  # fmt: skip

    def left() -> float:
        return max(0.001, deadline - now())

    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), left())
    except asyncio.IncompleteReadError as e:
        res["end"] = "eof before head"
        res["partial_head_bytes"] = len(e.partial)
    except asyncio.LimitOverrunError:
        res["end"] = "head too long"
    except asyncio.TimeoutError:
        res["end"] = "timeout before head"
    except (ConnectionError, OSError) as e:
        res["end"] = f"reset before head ({type(e).__name__})"
    if res["end"]:
        res["t_end"] = round(now() - t0, 4)
        return res
    res["t_head"] = round(now() - t0, 4)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    try:
        res["status"] = int(parts[1])
    except (IndexError, ValueError):
        res["end"] = "bad status line: " + lines[0][:80]
        return res
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers.setdefault(k.strip().lower(), v.strip())
    if "x-whsentry-reasoncode" in headers:
        res["reason_code"] = int(headers["x-whsentry-reasoncode"])
        res["reason"] = headers.get("x-whsentry-reason")
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    length = None if chunked else headers.get("content-length")
    if length is not None:
        res["content_length"] = int(length)
    try:
        if chunked:
            res["end"] = await _read_chunked(reader, res, left)
        elif length is not None:
            want = int(length)
            while res["body_bytes"] < want:
                data = await asyncio.wait_for(
                    reader.read(min(65536, want - res["body_bytes"])), left()
                )
                if not data:
                    res["end"] = "eof"
                    break
                res["body_bytes"] += len(data)
            else:
                res["end"] = "complete"
        else:  # close-delimited
            while True:
                data = await asyncio.wait_for(reader.read(65536), left())
                if not data:
                    res["end"] = "complete"
                    break
                res["body_bytes"] += len(data)
    except asyncio.TimeoutError:
        res["end"] = "timeout"
    except (ConnectionError, OSError):
        res["end"] = "reset"
    except asyncio.IncompleteReadError:
        res["end"] = "eof"
    res["t_end"] = round(now() - t0, 4)
    return res


async def _read_chunked(reader: asyncio.StreamReader, res: dict, left) -> str:
    while True:
        line = await asyncio.wait_for(reader.readuntil(b"\r\n"), left())
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await asyncio.wait_for(reader.readuntil(b"\r\n"), left())
            return "complete"
        data = await asyncio.wait_for(reader.readexactly(size + 2), left())
        res["body_bytes"] += len(data) - 2


async def one_request(port: int, request: bytes, timeout: float) -> dict:
    """A fresh connection to the proxy, one request, its response, close."""
    t0 = now()
    deadline = t0 + timeout
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(LOOPBACK, port), timeout
        )
    except (OSError, asyncio.TimeoutError) as e:
        return {"end": f"connect: {type(e).__name__}", "ok": False,
                "t_end": round(now() - t0, 4)}  # fmt: skip
    try:
        writer.write(request)
        res = await read_response(reader, t0, deadline)
    finally:
        writer.transport.abort()
    res["ok"] = res["status"] == 200 and res["end"] == "complete"
    return res


async def fetch_metrics(port: int | None) -> dict[str, float]:
    """The proxy's egressproxy_* and process_* metrics, by sample name."""
    if not port:
        return {}
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 5)
    except (OSError, asyncio.TimeoutError):
        return {}
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        body = await asyncio.wait_for(reader.read(-1), 10)
    except (OSError, asyncio.TimeoutError):
        return {}
    finally:
        writer.transport.abort()
    out = {}
    text = body.split(b"\r\n\r\n", 1)[-1].decode("utf-8", "replace")
    for line in text.splitlines():
        if line.startswith(("egressproxy_", "process_")) and not line.endswith("_created"):
            name, _, value = line.rpartition(" ")
            if "_created{" in name or "_bucket{" in name:
                continue
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def metric_sum(metrics: dict[str, float], prefix: str, contains: str = "") -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix) and contains in k)


def summarize(results: list[dict]) -> dict:
    ok = [r for r in results if r.get("ok")]
    lat = [1000 * r["t_end"] for r in ok]
    return {
        "sent": len(results),
        "ok": len(ok),
        "success_pct": round(100 * len(ok) / len(results), 2) if results else None,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "max_ms": round(max(lat), 2) if lat else None,
        "failures": dict(Counter(_failure(r) for r in results if not r.get("ok"))),
        "failure_reasons": dict(Counter(r["reason"] for r in results
                                        if not r.get("ok") and r.get("reason"))),
    }


def _failure(r: dict) -> str:
    if r.get("status") and r.get("status") != 200:
        return f"status {r['status']} / {r.get('reason_code')}"
    return r.get("end") or "unknown"


async def normal_load(port: int, origin: int, interval: float, start: float, end: float,
                      timeout: float) -> list[dict]:  # fmt: skip
    """
    Open loop: a fresh connection with one GET every C{interval} seconds
    from C{start} to C{end}, each started on time whatever the others do
    (so that a slow answer does not hide the ones behind it).
    """
    tasks = []
    request = proxy_get(origin, "/small")
    i = 0
    while True:
        t = start + i * interval
        if t >= end:
            break
        await asyncio.sleep(max(0.0, t - now()))
        tasks.append(asyncio.ensure_future(_timed(port, request, timeout)))
        i += 1
    return list(await asyncio.gather(*tasks))


async def _timed(port: int, request: bytes, timeout: float) -> dict:
    started = now()
    r = await one_request(port, request, timeout)
    r["started"] = started
    return r


# ---------------------------------------------------------------- tunnels


async def _open_tunnel(port: int, origin: int, timeout: float):
    target = f"{LOOPBACK}:{origin}"
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), timeout)
    except (OSError, asyncio.TimeoutError) as e:
        return None, f"connect: {type(e).__name__}"
    try:
        w.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), timeout)
        status = head.split(None, 2)[1].decode()
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError, IndexError) as e:  # fmt: skip
        w.transport.abort()
        return None, f"CONNECT: {type(e).__name__}"
    if status != "200":
        w.transport.abort()
        return None, f"CONNECT: status {status}"
    return (r, w), None


async def _through_tunnel(rw, origin: int, timeout: float) -> bool:
    r, w = rw
    t0 = now()
    w.write(f"GET /small HTTP/1.1\r\nHost: {LOOPBACK}:{origin}\r\n\r\n".encode())
    res = await read_response(r, t0, t0 + timeout)
    return res["status"] == 200 and res["end"] == "complete" and res["body_bytes"] == 1024


async def _tunnels(a: argparse.Namespace) -> dict:
    hard_end = now() + a.deadline
    failures: Counter[str] = Counter()
    held: list = []

    # Warm-up: one tunnel and one forwarded request, then settle.
    rw, err = await _open_tunnel(a.port, a.origin, a.step_timeout)
    if rw:
        await _through_tunnel(rw, a.origin, a.step_timeout)
        rw[1].transport.abort()
    await one_request(a.port, proxy_get(a.origin, "/small"), a.step_timeout)
    await asyncio.sleep(a.settle)
    rss_before, fds_before = rss_kib(a.pid), open_fds(a.pid)

    sem = asyncio.Semaphore(a.concurrency)

    async def one() -> None:
        async with sem:
            rw, err = await _open_tunnel(a.port, a.origin, a.step_timeout)
        if rw:
            held.append(rw)
        else:
            failures[err] += 1

    t0 = now()
    jobs = [asyncio.ensure_future(one()) for _ in range(a.n)]
    done, pending = await asyncio.wait(jobs, timeout=max(1.0, hard_end - now() - 30))
    for j in pending:
        j.cancel()
    if pending:
        failures["not open by the deadline"] += len(pending)
    open_seconds = now() - t0
    await asyncio.sleep(a.settle)
    rss_after, fds_after = rss_kib(a.pid), open_fds(a.pid)
    metrics_held = await fetch_metrics(a.metrics)
    alive = sum(1 for r, _ in held if not r.at_eof())

    # While they are held: some of them still carry traffic, and a fresh
    # client is still served (a forwarded GET, and a new tunnel).
    step = max(1, len(held) // a.check) if held else 1
    sample = held[::step][: a.check]
    checked_ok = 0
    for rw in sample:
        try:
            checked_ok += await _through_tunnel(rw, a.origin, a.step_timeout)
        except (OSError, asyncio.TimeoutError):
            pass
    fresh = [await one_request(a.port, proxy_get(a.origin, "/small"), a.step_timeout)
             for _ in range(a.fresh)]  # fmt: skip
    fresh_tunnels_ok = 0
    for _ in range(3):
        rw, err = await _open_tunnel(a.port, a.origin, a.step_timeout)
        if rw:
            fresh_tunnels_ok += await _through_tunnel(rw, a.origin, a.step_timeout)
            rw[1].transport.abort()

    # Close them and see what the proxy gives back.
    for _r, w in held:
        w.close()
    closed_at = now()
    active = None
    while now() - closed_at < 20 and now() < hard_end:
        await asyncio.sleep(0.5)
        m = await fetch_metrics(a.metrics)
        active = m.get("egressproxy_active_tunnels")
        if active == 0:
            break
    drained_seconds = now() - closed_at
    await asyncio.sleep(a.settle)
    rss_closed, fds_closed = rss_kib(a.pid), open_fds(a.pid)

    opened = len(held)
    fresh_sum = summarize(fresh)
    return {
        "step": "tunnels", "n": a.n, "opened": opened, "alive_at_sample": alive,
        "failures": dict(failures), "open_seconds": round(open_seconds, 2),
        "rss_before_kib": rss_before, "rss_after_kib": rss_after,
        "kib_per_tunnel": round((rss_after - rss_before) / opened, 2) if opened else None,
        "fds_before": fds_before, "fds_after": fds_after, "fds_after_close": fds_closed,
        "metrics_while_held": {k: v for k, v in metrics_held.items()
                               if k.startswith(("egressproxy_active", "process_open_fds",
                                                "process_max_fds", "process_resident"))},
        "held_checked": len(sample), "held_checked_ok": checked_ok,
        "fresh_requests": fresh_sum, "fresh_tunnels": 3, "fresh_tunnels_ok": fresh_tunnels_ok,
        "active_tunnels_after_close": active, "drain_seconds": round(drained_seconds, 2),
        "rss_after_close_kib": rss_closed,
    }  # fmt: skip


def cmd_tunnels(a: argparse.Namespace) -> None:
    raise_nofile(a.n + 512)
    print(json.dumps(asyncio.run(_tunnels(a))))


# ---------------------------------------------------------------- keep-alive


async def _keepalive(a: argparse.Namespace) -> dict:
    hard_end = now() + a.deadline
    request = proxy_get(a.origin, "/small", close=False)
    issued = done = errors = 0
    failures: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    samples = []
    cpu0, t0 = cpu_ticks(a.pid), now()

    def sample() -> None:
        samples.append({"requests": done, "t": round(now() - t0, 2),
                        "rss_kib": rss_kib(a.pid), "fds": open_fds(a.pid)})  # fmt: skip

    sample()

    async def worker() -> None:
        nonlocal issued, done, errors
        conn = None
        while issued < a.n and now() < hard_end and errors < a.max_errors:
            if conn is None:
                try:
                    conn = await asyncio.wait_for(
                        asyncio.open_connection(LOOPBACK, a.port), a.step_timeout
                    )
                except (OSError, asyncio.TimeoutError) as e:
                    errors += 1
                    failures[f"connect: {type(e).__name__}"] += 1
                    await asyncio.sleep(0.1)
                    continue
            issued += 1
            r, w = conn
            t = now()
            w.write(request)
            res = await read_response(r, t, t + a.step_timeout)
            if res["status"] != 200 or res["end"] != "complete":
                errors += 1
                failures[_failure(res)] += 1
                if res.get("reason"):
                    reasons[res["reason"]] += 1
                w.transport.abort()
                conn = None
                continue
            done += 1
            if done % a.sample_every == 0:
                sample()
        if conn is not None:
            conn[1].transport.abort()

    await asyncio.gather(*(worker() for _ in range(a.conns)))
    wall = now() - t0
    cpu = (cpu_ticks(a.pid) - cpu0) / CLK_TCK
    if samples[-1]["requests"] != done:
        sample()
    await asyncio.sleep(2.0)
    idle_rss = rss_kib(a.pid)
    metrics = await fetch_metrics(a.metrics)

    warm = next((s for s in samples if s["requests"] >= a.warmup), None)
    last = samples[-1]
    growth = last["rss_kib"] - warm["rss_kib"] if warm and warm is not last else None
    span = last["requests"] - warm["requests"] if warm and warm is not last else 0
    return {
        "step": a.name, "n": a.n, "conns": a.conns, "completed": done,
        "errors": errors, "failures": dict(failures), "failure_reasons": dict(reasons),
        "seconds": round(wall, 2),
        "rps": round(done / wall, 1), "proxy_cpu_pct": round(100 * cpu / wall, 1),
        "sample_every": a.sample_every, "warmup_requests": a.warmup, "samples": samples,
        "warm_sample": warm, "growth_kib": growth,
        "growth_bytes_per_request": round(1024 * growth / span, 3) if span else None,
        "growth_pct": round(100 * growth / warm["rss_kib"], 2) if growth is not None else None,
        "rss_after_2s_idle_kib": idle_rss,
        "requests_by_outcome": {k: v for k, v in metrics.items()
                                if k.startswith("egressproxy_requests_total")},
    }  # fmt: skip


def cmd_keepalive(a: argparse.Namespace) -> None:
    raise_nofile(a.conns + 256)
    print(json.dumps(asyncio.run(_keepalive(a))))


# ---------------------------------------------------------------- slowloris


async def _slowloris(a: argparse.Namespace) -> dict:
    hard_end = now() + a.deadline
    target = f"{LOOPBACK}:{a.origin}"
    # A head that is never finished: a byte every --byte-every seconds.
    partial = (f"GET http://{target}/small HTTP/1.1\r\nHost: {target}\r\n"
               "User-Agent: slowloris\r\nX-Slow: ").encode() + b"a" * 4096  # fmt: skip

    # 1. The normal client alone.
    m0 = await fetch_metrics(a.metrics)
    t = now() + 0.2
    baseline = await normal_load(a.port, a.origin, a.interval, t, t + a.baseline, a.timeout)

    # 2. The same, beside the slow connections.
    attack_start = now()
    attack_end = attack_start + a.attack
    final = attack_end + a.header_timeout + 5  # the last slow ones get this long
    connect_sem = asyncio.Semaphore(50)
    records: list[dict] = []
    max_gen = 1 + int(a.attack / max(a.header_timeout, 1)) + 2

    async def slow_conn(gen: int) -> dict:
        rec: dict = {"gen": gen, "bytes_sent": 0, "end": None, "status": None,
                     "reason_code": None, "seconds": None}  # fmt: skip
        records.append(rec)
        try:
            async with connect_sem:
                r, w = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, a.port), 5)
        except (OSError, asyncio.TimeoutError) as e:
            rec["end"] = f"connect failed: {type(e).__name__}"
            return rec
        t_open = now()

        async def read_all() -> tuple[bytes, str]:
            buf = b""
            try:
                while True:
                    data = await r.read(4096)
                    if not data:
                        return buf, "eof"
                    buf = (buf + data)[:65536]
            except (ConnectionError, OSError):
                return buf, "reset"

        reading = asyncio.ensure_future(read_all())
        i = 0
        while not reading.done() and now() < final and now() < hard_end:
            try:
                w.write(partial[i : i + 1])
            except (ConnectionError, OSError):
                break
            i += 1
            await asyncio.wait([reading], timeout=a.byte_every)
        rec["bytes_sent"] = i
        if reading.done():
            buf, how = reading.result()
            rec["end"] = f"closed by proxy ({how})"
            rec["seconds"] = round(now() - t_open, 2)
            if buf.startswith(b"HTTP/"):
                rec["status"] = int(buf.split(None, 2)[1])
                for line in buf.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
                    if line.lower().startswith(b"x-whsentry-reasoncode:"):
                        rec["reason_code"] = int(line.split(b":", 1)[1])
        else:
            reading.cancel()
            rec["end"] = "still open at the end (closed by us)"
        w.transport.abort()
        return rec

    async def slot() -> None:
        gen = 0
        while gen < max_gen:
            rec = await slow_conn(gen)
            gen += 1
            if not rec["end"].startswith("closed by proxy") or now() >= attack_end:
                break

    slots = [asyncio.ensure_future(slot()) for _ in range(a.slow)]
    await asyncio.sleep(a.ramp)  # the first 500 are connected and trickling
    m_attack = await fetch_metrics(a.metrics)
    during = await normal_load(a.port, a.origin, a.interval, now(), attack_end, a.timeout)
    await asyncio.wait(slots, timeout=max(1.0, min(final, hard_end) - now() + 5))
    for s in slots:
        s.cancel()
    m1 = await fetch_metrics(a.metrics)

    first = [r for r in records if r["gen"] == 0]
    cut = [r for r in records if (r["end"] or "").startswith("closed by proxy")]
    secs = [r["seconds"] for r in cut if r["seconds"] is not None]
    code_408 = (metric_sum(m1, "egressproxy_requests_total", 'reason_code="1015"')
                - metric_sum(m0, "egressproxy_requests_total", 'reason_code="1015"'))  # fmt: skip
    return {
        "step": "slowloris", "slow": a.slow, "byte_every_s": a.byte_every,
        "header_timeout_s": a.header_timeout, "normal_interval_s": a.interval,
        "baseline_s": a.baseline, "attack_s": a.attack,
        "without_attack": summarize(baseline), "during_attack": summarize(during),
        "slow_opened": sum(1 for r in records if not (r["end"] or "").startswith("connect")),
        "slow_connect_failed": sum(1 for r in records if (r["end"] or "").startswith("connect")),
        "slow_first_wave": len(first),
        "slow_first_wave_cut_by_proxy": sum(1 for r in first if r in cut),
        "slow_cut_by_proxy": len(cut),
        "slow_still_open_at_end": sum(1 for r in records if (r["end"] or "").startswith("still")),
        "slow_cut_after_s": {"min": min(secs, default=None), "p50": pct(secs, 50),
                             "max": max(secs, default=None)},
        "slow_bytes_sent_max": max((r["bytes_sent"] for r in records), default=0),
        "slow_answers": dict(Counter(f"{r['status']} / {r['reason_code']}" for r in cut)),
        "slow_ends": dict(Counter(r["end"] for r in records)),
        "client_connections_during_attack":
            metric_sum(m_attack, "egressproxy_active_client_connections"),
        "open_fds_during_attack": m_attack.get("process_open_fds"),
        "metric_1015_delta": code_408,
        "rss_end_kib": rss_kib(a.pid),
    }  # fmt: skip


def cmd_slowloris(a: argparse.Namespace) -> None:
    raise_nofile(a.slow + 1024)
    print(json.dumps(asyncio.run(_slowloris(a))))


# ---------------------------------------------------------------- faults

# fault: (what the client should get, check(result, read_timeout, lifetime))
EXPECT = {
    "reset": ("the head (200), then the connection cut before Content-Length bytes",
              lambda r, rt, lt: r["status"] == 200 and r["end"] in ("reset", "eof")
              and r["body_bytes"] < (r["content_length"] or 0)),
    "hang": ("504 / 1004 after the read timeout",
             lambda r, rt, lt: r["status"] == 504 and r["reason_code"] == 1004
             and rt - 0.5 <= r["t_end"] <= rt + 1.5),
    "malformed": ("502 / 1006 at once",
                  lambda r, rt, lt: r["status"] == 502 and r["reason_code"] == 1006
                  and r["t_end"] < 1),
    "trickle_head": ("504 / 1004 when the lifetime runs out",
                     lambda r, rt, lt: r["status"] == 504 and r["reason_code"] == 1004
                     and lt - 0.5 <= r["t_end"] <= lt + 2),
    "trickle_body": ("the head (200), then the connection cut when the lifetime runs out",
                     lambda r, rt, lt: r["status"] == 200 and r["end"] in ("reset", "eof")
                     and lt - 0.5 <= r["t_end"] <= lt + 2),
    "oversize": ("502 / 1008 at once",
                 lambda r, rt, lt: r["status"] == 502 and r["reason_code"] == 1008
                 and r["t_end"] < 1),
}  # fmt: skip


def cmd_faults(a: argparse.Namespace) -> None:
    # The faults one after another, and beside them a normal request every
    # --normal-every seconds, until the last fault is answered.
    async def run() -> dict:
        with open(a.ports_file) as f:
            ports = json.load(f)
        start = now()
        stop_normal = asyncio.Event()
        normal: list[asyncio.Future] = []
        request = proxy_get(a.origin, "/small")

        async def normal_client() -> None:
            i = 0
            while not stop_normal.is_set() and now() < start + a.deadline - 5:
                t = start + i * a.normal_every
                await asyncio.sleep(max(0.0, t - now()))
                normal.append(asyncio.ensure_future(_timed(a.port, request, a.timeout)))
                i += 1

        client = asyncio.ensure_future(normal_client())
        await asyncio.sleep(1.0)
        results = {}
        for fault, port in ports.items():
            if fault not in EXPECT or now() > start + a.deadline - a.fault_timeout - 10:
                continue
            sent_at = time.monotonic()
            r = await one_request(a.port, proxy_get(port, "/fault", close=False), a.fault_timeout)
            r["sent_mono"] = round(sent_at, 3)
            promise, check = EXPECT[fault]
            r["expected"] = promise
            r["as_promised"] = bool(check(r, a.read_timeout, a.lifetime))
            results[fault] = r
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        stop_normal.set()
        await client
        done = list(await asyncio.gather(*normal))
        await asyncio.sleep(1.0)  # let the origin log how each connection ended
        events = []
        if a.events and os.path.exists(a.events):
            with open(a.events) as f:
                events = [json.loads(line) for line in f if line.strip()]
        for fault, r in results.items():
            gone = [e for e in events if e.get("fault") == fault and e.get("event") != "accepted"
                    and e.get("mono", 0) >= r["sent_mono"] - 0.01]  # fmt: skip
            last = gone[-1] if gone else None
            if last:
                r["origin_side"] = {k: v for k, v in last.items() if k not in ("t", "mono", "conn")}
                r["origin_side"]["after_s"] = round(last["mono"] - r["sent_mono"], 2)
        metrics = await fetch_metrics(a.metrics)
        return {
            "step": "faults", "read_timeout_s": a.read_timeout, "lifetime_s": a.lifetime,
            "normal_every_s": a.normal_every, "faults": results,
            "normal": summarize(done), "seconds": round(now() - start, 2),
            "requests_by_outcome": {k: v for k, v in metrics.items()
                                    if k.startswith("egressproxy_requests_total")},
            "rss_end_kib": rss_kib(a.pid),
        }  # fmt: skip

    print(json.dumps(asyncio.run(run())))


# ---------------------------------------------------------------- limits


def cmd_limits(a: argparse.Namespace) -> None:
    out = {}
    with open(f"/proc/{a.pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                out = {"soft": int(soft), "hard": int(hard)}
    print(json.dumps(out))


# ---------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(s: argparse.ArgumentParser) -> None:
        s.add_argument("--port", type=int, required=True, help="proxy port")
        s.add_argument("--origin", type=int, required=True, help="nginx origin port")
        s.add_argument("--pid", type=int, required=True, help="proxy PID")
        s.add_argument("--metrics", type=int, help="proxy metrics port")
        s.add_argument("--deadline", type=float, default=120, help="hard limit, seconds")
        s.add_argument("--step-timeout", type=float, default=15)

    s = sub.add_parser("tunnels")
    common(s)
    s.add_argument("-n", type=int, default=5000)
    s.add_argument("--concurrency", type=int, default=50)
    s.add_argument("--settle", type=float, default=2.0)
    s.add_argument("--check", type=int, default=20, help="held tunnels to send a GET through")
    s.add_argument("--fresh", type=int, default=10, help="fresh requests while held")
    s.set_defaults(fn=cmd_tunnels)

    s = sub.add_parser("keepalive")
    common(s)
    s.add_argument("-n", type=int, default=50000)
    s.add_argument("--conns", type=int, default=50)
    s.add_argument("--sample-every", type=int, default=10000)
    s.add_argument("--warmup", type=int, default=10000)
    s.add_argument("--max-errors", type=int, default=1000)
    s.add_argument("--name", default="keepalive", help="the record's step name")
    s.set_defaults(fn=cmd_keepalive)

    s = sub.add_parser("slowloris")
    common(s)
    s.add_argument("--slow", type=int, default=500)
    s.add_argument("--byte-every", type=float, default=2.0)
    s.add_argument("--header-timeout", type=float, default=5.0)
    s.add_argument("--interval", type=float, default=0.02, help="normal client's pace")
    s.add_argument("--timeout", type=float, default=5.0, help="normal request timeout")
    s.add_argument("--baseline", type=float, default=10)
    s.add_argument("--attack", type=float, default=15)
    s.add_argument("--ramp", type=float, default=1.0)
    s.set_defaults(fn=cmd_slowloris)

    s = sub.add_parser("faults")
    common(s)
    s.add_argument("--ports-file", required=True)
    s.add_argument("--events")
    s.add_argument("--read-timeout", type=float, required=True)
    s.add_argument("--lifetime", type=float, required=True)
    s.add_argument("--normal-every", type=float, default=0.5)
    s.add_argument("--timeout", type=float, default=5.0, help="normal request timeout")
    s.add_argument("--fault-timeout", type=float, default=20.0)
    s.set_defaults(fn=cmd_faults)

    s = sub.add_parser("limits")
    s.add_argument("pid", type=int)
    s.set_defaults(fn=cmd_limits)

    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
