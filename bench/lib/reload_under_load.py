"""
SIGHUP reloads under keep-alive load: 20 clients send GETs through the
proxy for a fixed time while the proxy is sent SIGHUP every 0.25 s; every
answer must be a 200.  Loopback only, bounded in time.

Usage: python bench/lib/reload_under_load.py PROXY_PORT PROXY_PID URL [SECONDS]
(URL is an http:// URL on 127.0.0.0/8 that the proxy allows.)
"""

import asyncio
import os
import signal
import sys
import time
from urllib.parse import urlsplit


async def client(port: int, request: bytes, deadline: float, counts: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.monotonic() < deadline:
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            counts["ok" if head.startswith(b"HTTP/1.1 200") else "bad"] += 1
    finally:
        writer.close()


async def hup(pid: int, deadline: float) -> int:
    sent = 0
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        os.kill(pid, signal.SIGHUP)
        sent += 1
    return sent


async def main() -> None:
    port, pid, url = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    seconds = float(sys.argv[4]) if len(sys.argv) > 4 else 10.0
    host = urlsplit(url).netloc
    assert urlsplit(url).hostname.startswith("127."), "loopback only"
    request = f"GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    counts = {"ok": 0, "bad": 0}
    deadline = time.monotonic() + min(seconds, 60.0)
    results = await asyncio.gather(
        *[client(port, request, deadline, counts) for _ in range(20)],
        hup(pid, deadline),
        return_exceptions=True,
    )
    errors = [r for r in results[:-1] if isinstance(r, BaseException)]
    print(f"ok={counts['ok']} bad={counts['bad']} client_errors={len(errors)} reloads={results[-1]}")


asyncio.run(main())
