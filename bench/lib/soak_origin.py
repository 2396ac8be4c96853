#!/usr/bin/env python3
"""
The fault origin of bench/soak: one misbehaving HTTP/1.1 server per port,
on 127.0.0.1 only.  Standard library only (asyncio).

  reset         a head with Content-Length: 100000, half the body, then a
                TCP reset (SO_LINGER 0)
  hang          accepts and reads the request, never answers
  malformed     answers the status line "HTTP/1.1 2OO OK" (letters O)
  trickle_head  sends a valid response head one byte a second
  trickle_body  sends a head with Content-Length: 100 at once, then the
                body one byte a second
  oversize      a head with Content-Length: 2 MiB (over the proxy's default
                1 MiB limit), then the body

Usage: soak_origin.py --ports-file FILE --events FILE --max-seconds S

The ports chosen are written to --ports-file as one JSON object once every
port listens.  Each connection's fate (when the request came, what was sent,
when and how the peer went away) is appended to --events as a JSON line, so
that the report can say when the proxy gave up on the origin.  The server
stops by itself after --max-seconds, and every connection it holds is
bounded by --hold seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import time

LOOPBACK = "127.0.0.1"
FAULTS = ["reset", "hang", "malformed", "trickle_head", "trickle_body", "oversize"]
T0 = time.monotonic()


class Events:
    def __init__(self, path: str) -> None:
        self.f = open(path, "a", buffering=1)

    def __call__(self, **rec: object) -> None:
        rec["t"] = round(time.monotonic() - T0, 3)
        # CLOCK_MONOTONIC is system-wide: the client compares it with its own.
        rec["mono"] = round(time.monotonic(), 3)
        self.f.write(json.dumps(rec) + "\n")


async def read_head(reader: asyncio.StreamReader, timeout: float) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)


async def wait_gone(reader: asyncio.StreamReader, limit: float) -> str:
    """Read and drop whatever comes until the peer closes or resets."""
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            data = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
            if not data:
                return "eof"
    except asyncio.TimeoutError:
        return "held to the limit"
    except (ConnectionError, OSError) as e:
        return type(e).__name__
    return "held to the limit"


async def trickle(
    data: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, every: float
) -> tuple[int, str]:
    """Send C{data} one byte each C{every} seconds; stop when the peer goes."""
    gone = asyncio.ensure_future(wait_gone(reader, every * len(data) + 5))
    sent = 0
    try:
        for i in range(len(data)):
            if gone.done():
                break
            writer.write(data[i : i + 1])
            await writer.drain()
            sent += 1
            await asyncio.wait([gone], timeout=every)
    except (ConnectionError, OSError) as e:
        gone.cancel()
        return sent, type(e).__name__
    how = await gone if gone.done() else "all sent"
    if not gone.done():
        gone.cancel()
    return sent, how


def make_handler(fault: str, events: Events, hold: float):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        conn = f"{fault}:{peer[1]}"
        events(fault=fault, conn=conn, event="accepted")
        try:
            try:
                head = await read_head(reader, 10)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ConnectionError) as e:  # fmt: skip
                events(fault=fault, conn=conn, event="no request", detail=type(e).__name__)
                return
            events(fault=fault, conn=conn, event="request",
                   line=head.split(b"\r\n", 1)[0].decode("latin-1"))  # fmt: skip
            if fault == "reset":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n"
                             b"Content-Type: application/octet-stream\r\n\r\n")  # fmt: skip
                writer.write(b"r" * 50000)
                await writer.drain()
                await asyncio.sleep(0.3)
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                events(fault=fault, conn=conn, event="reset sent", body_sent=50000)
                return
            if fault == "hang":
                how = await wait_gone(reader, hold)
                events(fault=fault, conn=conn, event="peer gone", how=how)
                return
            if fault == "malformed":
                writer.write(b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                how = await wait_gone(reader, hold)
                events(fault=fault, conn=conn, event="peer gone", how=how)
                return
            if fault == "trickle_head":
                data = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Trickle: yes\r\n\r\nok"
                sent, how = await trickle(data, reader, writer, 1.0)
                events(fault=fault, conn=conn, event="peer gone", how=how, bytes_sent=sent,
                       of=len(data))  # fmt: skip
                return
            if fault == "trickle_body":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
                await writer.drain()
                sent, how = await trickle(b"t" * 100, reader, writer, 1.0)
                events(fault=fault, conn=conn, event="peer gone", how=how, body_sent=sent,
                       of=100)  # fmt: skip
                return
            if fault == "oversize":
                size = 2 * 1024 * 1024
                writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
                sent = 0
                try:
                    while sent < size:
                        writer.write(b"o" * 65536)
                        sent += 65536
                        await asyncio.wait_for(writer.drain(), 5)
                except (ConnectionError, OSError, asyncio.TimeoutError) as e:
                    events(fault=fault, conn=conn, event="peer gone", how=type(e).__name__,
                           body_sent=sent)  # fmt: skip
                    return
                how = await wait_gone(reader, hold)
                events(fault=fault, conn=conn, event="peer gone", how=how, body_sent=sent)
                return
        except (ConnectionError, OSError) as e:
            events(fault=fault, conn=conn, event="error", detail=repr(e))
        finally:
            writer.close()

    return handle


async def main(a: argparse.Namespace) -> None:
    events = Events(a.events)
    servers, ports = [], {}
    for fault in FAULTS:
        server = await asyncio.start_server(make_handler(fault, events, a.hold), LOOPBACK, 0)
        servers.append(server)
        ports[fault] = server.sockets[0].getsockname()[1]
    with open(a.ports_file + ".tmp", "w") as f:
        json.dump(ports, f)
    # Renamed into place, so a reader never sees half a file.
    os.replace(a.ports_file + ".tmp", a.ports_file)
    events(event="listening", ports=ports)
    await asyncio.sleep(a.max_seconds)
    for server in servers:
        server.close()
    events(event="stopped after max-seconds")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ports-file", required=True)
    p.add_argument("--events", required=True)
    p.add_argument("--max-seconds", type=float, default=180)
    p.add_argument("--hold", type=float, default=60, help="longest a connection is held")
    asyncio.run(main(p.parse_args()))
