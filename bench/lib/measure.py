#!/usr/bin/env python3
"""
Measurement helpers for bench/run.  Standard library only.

Every subcommand talks to loopback addresses only (127.0.0.1), is bounded in
count and in time, and prints one JSON object (or plain values) on stdout.

  freeport N                 N free TCP ports on 127.0.0.1
  waitport PORT [SECONDS]    wait until 127.0.0.1:PORT accepts connections
  rss PID                    VmRSS in KiB of PID and all its descendants
  tree PID                   PID and all its descendants
  wrk ...                    one wrk run, through a proxy or direct
  bulk ...                   curl download of /big, best of N
  tunnels ...                RSS cost of N idle CONNECT tunnels
  tunnelreq ...              tunnel per request (bench/lib/tunnelgen.c)
  tlsreq ...                 keep-alive GETs over TLS: intercepted CONNECT
                             tunnels, or straight to a TLS origin
  show RECORD                one record as a console line
  machine                    facts about this machine
  pyspy-top RAW [N]          top N functions by own time from py-spy raw output
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import re
import resource
import shlex
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter

LOOPBACK = "127.0.0.1"
HERE = os.path.dirname(os.path.abspath(__file__))
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- processes


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(pid: int) -> list[int]:
    """PID and all its descendants (proxy.py forks acceptor processes)."""
    tree = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def rss_kib(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_ticks(pid: int) -> int:
    """utime + stime of PID and its descendants, in clock ticks."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total


def core_ticks() -> dict[str, tuple[int, int, int]]:
    """Per CPU line of /proc/stat: (busy, total, steal) ticks."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *vals = line.split()
            v = [int(x) for x in vals]
            idle = v[3] + v[4]
            total = sum(v[:8])
            out[name] = (total - idle, total, v[7])
    return out


class CpuWatch:
    """
    CPU use over an interval: the proxy's own share of one core, how busy
    the proxy's core was with anything else (other work on a shared
    machine), and the hypervisor's steal time.
    """

    def __init__(self, pid: int | None, core: str | None, load_core: str | None = None):
        self.pid, self.core, self.load_core = pid, core, load_core

    def __enter__(self) -> CpuWatch:
        self.t0 = time.monotonic()
        self.c0 = core_ticks()
        self.p0 = cpu_ticks(self.pid) if self.pid else 0
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self.t0
        c1 = core_ticks()
        p1 = cpu_ticks(self.pid) if self.pid else 0
        proc = (p1 - self.p0) / CLK_TCK
        self.result = {
            "proxy_cpu_pct": round(100 * proc / wall, 1) if self.pid else None,
            "proxy_cpu_s": round(proc, 3) if self.pid else None,
        }
        b0, t0, s0 = self.c0["cpu"]
        b1, t1, s1 = c1["cpu"]
        self.result["steal_pct"] = round(100 * (s1 - s0) / max(t1 - t0, 1), 2)
        if self.core:
            b0, t0, _ = self.c0[self.core]
            b1, t1, _ = c1[self.core]
            busy = (b1 - b0) / CLK_TCK
            self.result["core_busy_pct"] = round(100 * busy / wall, 1)
            if self.pid:
                # What else ran on the proxy's core meanwhile.
                self.result["core_other_pct"] = round(
                    max(0.0, 100 * (busy - proc) / wall), 1
                )
        if self.load_core:
            # Headroom of the load generator's core (origin, wrk, curl).
            b0, t0, _ = self.c0[self.load_core]
            b1, t1, _ = c1[self.load_core]
            self.result["load_core_busy_pct"] = round(
                100 * (b1 - b0) / CLK_TCK / wall, 1
            )


# ---------------------------------------------------------------- ports


def cmd_freeport(a: argparse.Namespace) -> None:
    socks, ports = [], []
    for _ in range(a.n):
        s = socket.socket()
        s.bind((LOOPBACK, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    print(" ".join(map(str, ports)))


def cmd_waitport(a: argparse.Namespace) -> None:
    deadline = time.monotonic() + a.seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection((LOOPBACK, a.port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on {LOOPBACK}:{a.port} after {a.seconds}s")


def cmd_rss(a: argparse.Namespace) -> None:
    print(rss_kib(a.pid))


def cmd_tree(a: argparse.Namespace) -> None:
    print(" ".join(map(str, process_tree(a.pid))))


# ---------------------------------------------------------------- wrk


def cmd_wrk(a: argparse.Namespace) -> None:
    if a.direct:
        path = a.path
    else:
        path = f"http://{LOOPBACK}:{a.origin}{a.path}"
    env = dict(
        os.environ,
        BENCH_PATH=path,
        BENCH_HOST=f"{LOOPBACK}:{a.origin}",
        BENCH_METHOD=a.method,
        BENCH_BODY_SIZE=str(a.body),
        BENCH_CLOSE="1" if a.close else "0",
    )
    port = a.origin if a.direct else a.port
    cmd = shlex.split(a.pin) + [
        "wrk", "--latency", "-t", str(a.threads), "-c", str(a.conns),
        "-d", f"{a.duration}s", "--timeout", "10s",
        "-s", os.path.join(HERE, "wrk.lua"), f"http://{LOOPBACK}:{port}",
    ]  # fmt: skip
    with CpuWatch(a.pid, a.core, a.load_core) as watch:
        run = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=a.duration + 60
        )
    line = next(
        (x for x in run.stdout.splitlines() if x.startswith("BENCHJSON ")), None
    )
    rec = {"proxy": a.proxy, "row": a.row, "kind": "wrk"}
    if run.returncode != 0 or line is None:
        rec["error"] = f"wrk exited {run.returncode}: {run.stderr.strip()[-300:]}"
    else:
        w = json.loads(line[len("BENCHJSON ") :])
        secs = w["duration_us"] / 1e6
        errors = sum(w[k] for k in w if k.startswith("err_"))
        rec.update(
            rps=round(w["requests"] / secs, 1),
            p50_ms=round(w["lat_p50_us"] / 1000, 3),
            p99_ms=round(w["lat_p99_us"] / 1000, 3),
            requests=w["requests"],
            errors=errors,
            error_detail={k[4:]: w[k] for k in w if k.startswith("err_") and w[k]},
            wrk=w,
        )
    rec.update(watch.result)
    if rec.get("proxy_cpu_s") is not None and rec.get("requests"):
        # The figure to trust on a shared machine: the proxy's CPU time
        # per response, whatever else ran meanwhile.
        rec["cpu_us_per_req"] = round(1e6 * rec["proxy_cpu_s"] / rec["requests"], 1)
    rec.update(threads=a.threads, conns=a.conns, duration_s=a.duration,
               method=a.method, path=a.path, close=a.close)  # fmt: skip
    print(json.dumps(rec))


def cmd_tunnelreq(a: argparse.Namespace) -> None:
    """
    The tunnel-per-request row: bench/lib/tunnelgen (C, epoll), each client
    a new connection, a CONNECT, one request inside the tunnel, a close.
    """
    cmd = shlex.split(a.pin) + [
        a.bin, "-o", str(a.origin), "-c", str(a.conns), "-d", str(a.duration),
        "-b", str(a.body), "-P", a.path, "-s", str(a.sources),
    ]  # fmt: skip
    cmd += ["--direct"] if a.direct else ["-p", str(a.port)]
    with CpuWatch(a.pid, a.core, a.load_core) as watch:
        run = subprocess.run(
            cmd, capture_output=True, text=True, timeout=a.duration + 60
        )
    line = next(
        (x for x in run.stdout.splitlines() if x.startswith("BENCHJSON ")), None
    )
    rec = {"proxy": a.proxy, "row": "tunnel_request", "kind": "tunnelgen"}
    if run.returncode != 0 or line is None:
        rec["error"] = f"tunnelgen exited {run.returncode}: {run.stderr.strip()[-300:]}"
    else:
        w = json.loads(line[len("BENCHJSON ") :])
        secs = w["duration_us"] / 1e6
        rec.update(
            rps=round(w["requests"] / secs, 1),
            p50_ms=round(w["lat_p50_us"] / 1000, 3),
            p99_ms=round(w["lat_p99_us"] / 1000, 3),
            requests=w["requests"],
            errors=w["errors"],
            tunnelgen=w,
        )
    rec.update(watch.result)
    if rec.get("proxy_cpu_s") is not None and rec.get("requests"):
        rec["cpu_us_per_req"] = round(1e6 * rec["proxy_cpu_s"] / rec["requests"], 1)
    rec.update(conns=a.conns, duration_s=a.duration, method="POST" if a.body else "GET",
               path=a.path, body=a.body)  # fmt: skip
    print(json.dumps(rec))


# ---------------------------------------------------------------- tlsreq


async def _tls_worker(a: argparse.Namespace, conns: int, start, stop) -> dict:
    """
    CONNS connections of one worker process: each a CONNECT to the proxy
    (or a TCP connection straight to the TLS origin), a TLS handshake that
    verifies 127.0.0.1 against --cafile, then GET --path one after the
    other until STOP is set.  Only the requests after START are counted.
    """
    ctx = ssl.create_default_context(cafile=a.cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    target = f"{LOOPBACK}:{a.origin}"
    request = (
        f"GET {a.path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: bench-tlsreq\r\n\r\n"
    ).encode()
    latencies: list[int] = []
    errors: Counter[str] = Counter()
    issuers: set[str] = set()
    loop = asyncio.get_running_loop()

    async def setup() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            r, w = await asyncio.wait_for(
                asyncio.open_connection(LOOPBACK, a.origin if a.direct else a.port), 15
            )
            if not a.direct:
                w.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 15)
                if head.split(None, 2)[1] != b"200":
                    errors["CONNECT: " + head.split(b"\r\n", 1)[0].decode()] += 1
                    w.close()
                    return None
            await asyncio.wait_for(w.start_tls(ctx, server_hostname=LOOPBACK), 15)
            cert = w.get_extra_info("peercert")
            issuers.add(
                ", ".join(f"{k}={v}" for rdn in cert.get("issuer", ()) for k, v in rdn)
            )
            return r, w
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, IndexError) as e:  # fmt: skip
            errors[f"setup: {type(e).__name__}: {str(e)[:80]}"] += 1
            return None

    # The events are shared semaphores: polled here, not once per request.
    flags = {"start": False, "stop": False}

    async def poll() -> None:
        while not flags["stop"]:
            flags["start"], flags["stop"] = start.is_set(), stop.is_set()
            await asyncio.sleep(0.005)

    async def run(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        counting = flags["start"]
        try:
            while not flags["stop"]:
                t0 = time.perf_counter_ns()
                w.write(request)
                head = await r.readuntil(b"\r\n\r\n")
                length = None
                for line in head.split(b"\r\n")[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                if length is None or not head.startswith(b"HTTP/1.1 200"):
                    errors["response: " + head.split(b"\r\n", 1)[0].decode()[:60]] += 1
                    break
                await r.readexactly(length)
                if counting:
                    latencies.append((time.perf_counter_ns() - t0) // 1000)
                else:
                    counting = flags["start"]
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            errors[f"request: {type(e).__name__}"] += 1
        w.close()

    poller = loop.create_task(poll())
    streams = [s for s in await asyncio.gather(*(setup() for _ in range(conns))) if s]
    tasks = [loop.create_task(run(r, w)) for r, w in streams]
    await asyncio.gather(*tasks)
    flags["stop"] = True
    await poller
    return {"latencies": latencies, "errors": dict(errors), "issuers": sorted(issuers),
            "connections": len(streams)}  # fmt: skip


def _tls_process(a: argparse.Namespace, conns: int, start, stop, out) -> None:
    out.send(asyncio.run(_tls_worker(a, conns, start, stop)))


def cmd_tlsreq(a: argparse.Namespace) -> None:
    """
    The intercepted-request row: --procs processes share --conns
    connections; after a second of warm-up (handshakes, leaf issuance,
    the proxy's first upstream connections) the requests of --duration
    seconds are counted.
    """
    mp = multiprocessing.get_context("fork")
    start, stop = mp.Event(), mp.Event()
    workers = []
    for i in range(a.procs):
        share = a.conns // a.procs + (i < a.conns % a.procs)
        parent, child = mp.Pipe(duplex=False)
        proc = mp.Process(target=_tls_process, args=(a, share, start, stop, child))
        proc.start()
        workers.append((proc, parent))
    time.sleep(a.warmup)
    start.set()
    with CpuWatch(a.pid, a.core, a.load_core) as watch:
        t0 = time.monotonic()
        time.sleep(a.duration)
        stop.set()
        secs = time.monotonic() - t0
    latencies: list[int] = []
    errors: Counter[str] = Counter()
    issuers: set[str] = set()
    connections = 0
    for proc, parent in workers:
        if parent.poll(a.duration + 30):
            got = parent.recv()
            latencies += got["latencies"]
            errors.update(got["errors"])
            issuers.update(got["issuers"])
            connections += got["connections"]
        else:
            errors["worker gave no result"] += 1
        proc.join(5)
    rec: dict = {"proxy": a.proxy, "row": "intercept_get", "kind": "tlsreq"}
    latencies.sort()
    if not latencies:
        rec["error"] = f"no responses; {json.dumps(dict(errors))}"
    else:
        n = len(latencies)
        rec.update(
            rps=round(n / secs, 1),
            p50_ms=round(latencies[n // 2] / 1000, 3),
            p99_ms=round(latencies[min(n - 1, n * 99 // 100)] / 1000, 3),
            requests=n,
            errors=sum(errors.values()),
        )
    rec.update(
        error_detail=dict(errors), issuers=sorted(issuers), connections=connections
    )
    rec.update(watch.result)
    if rec.get("proxy_cpu_s") is not None and rec.get("requests"):
        rec["cpu_us_per_req"] = round(1e6 * rec["proxy_cpu_s"] / rec["requests"], 1)
    rec.update(conns=a.conns, procs=a.procs, duration_s=a.duration, method="GET",
               path=a.path)  # fmt: skip
    print(json.dumps(rec))


# ---------------------------------------------------------------- bulk


def cmd_bulk(a: argparse.Namespace) -> None:
    url = f"http://{LOOPBACK}:{a.origin}/big"
    if a.direct:
        via = ["--noproxy", "*"]
    else:
        via = ["-p", "-x", f"http://{LOOPBACK}:{a.port}"]
    cmd = shlex.split(a.pin) + [
        "curl", "-sS", "-o", "/dev/null", "--max-time", str(a.max_time),
        "-w", "%{http_code} %{size_download} %{speed_download}", *via, url,
    ]  # fmt: skip
    runs, problems = [], []
    with CpuWatch(a.pid, a.core, a.load_core) as watch:
        for _ in range(a.repeat):
            r = subprocess.run(
                cmd, capture_output=True, text=True, timeout=a.max_time + 30
            )
            try:
                code, size, speed = r.stdout.split()
            except ValueError:
                problems.append(
                    f"curl exited {r.returncode}: {r.stderr.strip()[-200:]}"
                )
                continue
            if code != "200" or int(size) != a.size:
                problems.append(
                    f"status {code}, {size} of {a.size} bytes: {r.stderr.strip()}"
                )
                continue
            runs.append(round(float(speed) / 1e6, 1))
    rec = {"proxy": a.proxy, "row": "connect_bulk", "kind": "bulk", "runs_mbps": runs,
           "size": a.size}  # fmt: skip
    if runs:
        rec["mbps"] = max(runs)
    if problems:
        rec["error" if not runs else "warning"] = "; ".join(problems)
    rec.update(watch.result)
    print(json.dumps(rec))


# ---------------------------------------------------------------- tunnels


async def _tunnels(a: argparse.Namespace) -> dict:
    target = f"{LOOPBACK}:{a.origin}"
    request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
    sem = asyncio.Semaphore(a.concurrency)
    open_: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    failures: Counter[str] = Counter()

    async def one() -> None:
        async with sem:
            try:
                r, w = await asyncio.wait_for(
                    asyncio.open_connection(LOOPBACK, a.port), a.step_timeout
                )
            except (OSError, asyncio.TimeoutError) as e:
                failures[f"connect: {type(e).__name__}"] += 1
                return
            try:
                w.write(request)
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), a.step_timeout)
                status = head.split(None, 2)[1].decode()
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, IndexError) as e:  # fmt: skip
                failures[f"CONNECT: {type(e).__name__}"] += 1
                w.close()
                return
            if status != "200":
                failures[f"CONNECT: status {status}"] += 1
                w.close()
                return
            open_.append((r, w))

    # Warm up (first tunnel, imports, pools), then settle and take the baseline.
    await one()
    for _r, w in open_:
        w.close()
    open_.clear()
    await asyncio.sleep(1.0)
    before = rss_kib(a.pid)

    t0 = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(a.n))), a.deadline)
    except asyncio.TimeoutError:
        failures[f"not open after the {a.deadline:.0f}s deadline"] += a.n - len(open_)
    opened = time.monotonic() - t0
    await asyncio.sleep(a.settle)
    after = rss_kib(a.pid)
    alive = sum(1 for r, _ in open_ if not r.at_eof())

    # Check that a few of the held tunnels still carry traffic end to end.
    checked = ok = 0
    for r, w in open_[: a.check]:
        checked += 1
        try:
            w.write(f"GET /small HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), a.step_timeout)
            if head.startswith(b"HTTP/1.1 200"):
                ok += 1
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass
    for _r, w in open_:
        w.close()
    await asyncio.sleep(0.2)

    good = len(open_)
    return {
        "proxy": a.proxy, "row": "tunnels", "kind": "tunnels",
        "n": a.n, "opened": good, "alive_at_sample": alive,
        "failures": dict(failures), "open_seconds": round(opened, 2),
        "rss_before_kib": before, "rss_after_kib": after,
        "kib_per_tunnel": round((after - before) / good, 1) if good else None,
        "checked": checked, "checked_ok": ok,
    }  # fmt: skip


def cmd_tunnels(a: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = a.n + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(want, soft)), hard))
    print(json.dumps(asyncio.run(_tunnels(a))))


# ---------------------------------------------------------------- machine


def _out(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (r.stdout + r.stderr).strip()


def cmd_machine(a: argparse.Namespace) -> None:
    model, mhz = "", ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("cpu MHz") and not mhz:
                mhz = line.split(":", 1)[1].strip()
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    print(json.dumps({
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "cpu_mhz": mhz,
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "os": _out(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "loadavg": open("/proc/loadavg").read().split()[:3],
    }))  # fmt: skip


# ---------------------------------------------------------------- py-spy


def cmd_pyspy_top(a: argparse.Namespace) -> None:
    """
    Own time (the sample's innermost frame) and total time (anywhere on the
    stack) per function, from `py-spy record --format raw` collapsed stacks;
    then own time by package.
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    samples = 0
    with open(a.raw) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            # The first frames may be the process and thread names.
            raw = [x for x in stack.split(";") if _FRAME.match(x)]
            frames = [_short(x) for x in raw]
            samples += n
            if frames:
                own[frames[-1]] += n
                by_package[_package(raw[-1])] += n
            for fr in set(frames):
                total[fr] += n
    if not samples:
        print("no samples")
        return
    width = max((len(f) for f, _ in own.most_common(a.n)), default=10)
    print(f"{samples} samples; own = innermost frame, total = anywhere on the stack")
    print(f"{'own%':>6} {'total%':>7}  function")
    for fn, n in own.most_common(a.n):
        print(
            f"{100 * n / samples:6.1f} {100 * total[fn] / samples:7.1f}  {fn:<{width}}".rstrip()
        )
    print()
    print("own time by package")
    for pkg, n in by_package.most_common():
        print(f"{100 * n / samples:6.1f}  {pkg}")


_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3":  # lib/python3.11/asyncio/... -> asyncio/...
                path = path.split("/", 1)[-1]
            break
    return f"{m['fn']} ({path})"


# Top-level names that are not the standard library, in egressproxy's venv.
_THIRD_PARTY = {
    "proxy_app", "twisted", "httptools", "h11", "attr", "attrs", "zope", "OpenSSL", "treq",
    "prometheus_client", "yaml", "hyperlink", "idna", "incremental", "automat",
    "constantly", "service_identity", "certifi", "cryptography", "typing_extensions",
}  # fmt: skip


def _package(frame: str) -> str:
    """twisted/internet, twisted/logger, h11, proxy_app, stdlib, ..."""
    m = _FRAME.match(frame)
    path = m["file"] if m else frame
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:  # py-spy --full-filenames
            path = path.split(marker, 1)[1]
    parts = path.split("/")
    if parts[0] in _THIRD_PARTY:
        return (
            "/".join(parts[:2])
            if parts[0] == "twisted" and len(parts) > 2
            else parts[0]
        )
    return "stdlib and builtins"


# ---------------------------------------------------------------- show


def cmd_show(a: argparse.Namespace) -> None:
    """One line for the console from one record."""
    r = json.loads(a.record)
    row = f"  {r['proxy']:12} {r['row']:15}"
    if "error" in r:
        print(f"{row} ERROR {r['error']}")
    elif r["kind"] in ("wrk", "tunnelgen", "tlsreq"):
        print(
            f"{row} {r['rps']:9.0f} req/s  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms"
            f"  errors {r['errors']}"
            + (
                f"  cpu {r['cpu_us_per_req']:.0f} us/req"
                if r.get("cpu_us_per_req") is not None
                else ""
            )
            + (
                f"  proxy cpu {r['proxy_cpu_pct']:.0f}%"
                if r.get("proxy_cpu_pct") is not None
                else ""
            )
            + (
                f"  other on its core {r['core_other_pct']:.0f}%"
                if r.get("core_other_pct") is not None
                else ""
            )
            + (
                f"  load core {r['load_core_busy_pct']:.0f}%"
                if r.get("load_core_busy_pct") is not None
                else ""
            )
        )
    elif r["kind"] == "bulk":
        print(f"{row} {r['mbps']} MB/s (runs {r['runs_mbps']})")
    elif r["kind"] == "tunnels":
        print(
            f"{row} {r['opened']}/{r['n']} open in {r['open_seconds']} s,"
            f" {r['kib_per_tunnel']} KiB each, idle RSS {r['rss_before_kib']} KiB,"
            f" failures {r['failures'] or 'none'}"
        )


# ---------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("freeport")
    s.add_argument("n", type=int)
    s.set_defaults(fn=cmd_freeport)

    s = sub.add_parser("waitport")
    s.add_argument("port", type=int)
    s.add_argument("seconds", type=float, nargs="?", default=20)
    s.set_defaults(fn=cmd_waitport)

    s = sub.add_parser("rss")
    s.add_argument("pid", type=int)
    s.set_defaults(fn=cmd_rss)

    s = sub.add_parser("tree")
    s.add_argument("pid", type=int)
    s.set_defaults(fn=cmd_tree)

    def common(s: argparse.ArgumentParser) -> None:
        s.add_argument("--proxy", required=True, help="name for the record")
        s.add_argument("--port", type=int, help="proxy port")
        s.add_argument("--origin", type=int, required=True, help="origin port")
        s.add_argument(
            "--direct", action="store_true", help="no proxy: the origin itself"
        )
        s.add_argument("--pid", type=int, help="proxy PID, for CPU accounting")
        s.add_argument("--core", help="the proxy's core in /proc/stat, e.g. cpu0")
        s.add_argument("--load-core", help="the load generator's core, e.g. cpu1")
        s.add_argument(
            "--pin",
            default="",
            help="prefix for the load generator, e.g. 'taskset -c 1'",
        )

    s = sub.add_parser("wrk")
    common(s)
    s.add_argument("--row", required=True)
    s.add_argument("--path", required=True)
    s.add_argument("--method", default="GET")
    s.add_argument("--body", type=int, default=0)
    s.add_argument("--close", action="store_true")
    s.add_argument("--duration", type=int, default=10)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--conns", type=int, default=50)
    s.set_defaults(fn=cmd_wrk)

    s = sub.add_parser("tunnelreq")
    common(s)
    s.add_argument("--bin", required=True, help="the compiled tunnelgen")
    s.add_argument("--path", default="/webhook")
    s.add_argument("--body", type=int, default=2048)
    s.add_argument("--duration", type=int, default=10)
    s.add_argument("--conns", type=int, default=50)
    s.add_argument(
        "--sources",
        type=int,
        default=64,
        help="client source addresses, 127.0.0.2 and up (TIME_WAIT spread)",
    )
    s.set_defaults(fn=cmd_tunnelreq)

    s = sub.add_parser("tlsreq")
    common(s)
    s.add_argument("--cafile", required=True, help="the CA the client trusts")
    s.add_argument("--path", default="/small")
    s.add_argument("--duration", type=int, default=10)
    s.add_argument("--warmup", type=float, default=1.0)
    s.add_argument("--conns", type=int, default=50)
    s.add_argument("--procs", type=int, default=2, help="client processes")
    s.set_defaults(fn=cmd_tlsreq)

    s = sub.add_parser("bulk")
    common(s)
    s.add_argument("--size", type=int, required=True, help="expected body size")
    s.add_argument("--repeat", type=int, default=3)
    s.add_argument("--max-time", type=int, default=120)
    s.set_defaults(fn=cmd_bulk)

    s = sub.add_parser("tunnels")
    s.add_argument("--proxy", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--origin", type=int, required=True)
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("-n", type=int, default=1000)
    s.add_argument("--concurrency", type=int, default=50)
    s.add_argument("--step-timeout", type=float, default=15)
    s.add_argument("--deadline", type=float, default=120)
    s.add_argument("--settle", type=float, default=1.0)
    s.add_argument("--check", type=int, default=5)
    s.set_defaults(fn=cmd_tunnels)

    s = sub.add_parser("show")
    s.add_argument("record")
    s.set_defaults(fn=cmd_show)

    s = sub.add_parser("machine")
    s.set_defaults(fn=cmd_machine)

    s = sub.add_parser("pyspy-top")
    s.add_argument("raw")
    s.add_argument("n", type=int, nargs="?", default=15)
    s.set_defaults(fn=cmd_pyspy_top)

    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
