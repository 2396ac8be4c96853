"""
Limits that keep hostile or greedy clients from hurting everyone else: a
guard on request heads (what h11 tolerates but a proxy should not), and the
per-role request rate as token buckets on the injected clock.
"""

from __future__ import annotations

import re
from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

from proxy_app.reasons import ProxyError, Reason

_BARE_LF = re.compile(rb"(?<!\r)\n")
_OBS_FOLD = re.compile(rb"\r\n[ \t]")


class HeadGuard:
    """
    Refuses request heads with bare LF line endings, obsolete line folding,
    NUL bytes, an over-long request line or too many header lines.

    h11 accepts bare LF and unfolds obs-fold; the proxy re-serializes every
    head it forwards, so neither can smuggle a request past it, but a head
    that different parsers read differently has no business passing through
    an egress proxy.  It watches the first head of each request cycle: call
    L{reset} when a new request may begin.
    """

    __slots__ = ("_buffer", "_scanning", "maxLine", "maxHeaders", "maxHead")

    def __init__(self, maxLine: int, maxHeaders: int, maxHead: int) -> None:
        self.maxLine = maxLine
        self.maxHeaders = maxHeaders
        self.maxHead = maxHead
        self._buffer = b""
        self._scanning = True

    def reset(self) -> None:
        self._buffer = b""
        self._scanning = True

    def feed(self, data: bytes) -> ProxyError | None:
        """
        Look at more bytes from the client.

        @return: the error to answer with, or L{None}.
        """
        if not self._scanning:
            return None
        buffer = self._buffer + data if self._buffer else data
        end = buffer.find(b"\r\n\r\n")
        head = buffer if end < 0 else buffer[: end + 2]
        if b"\x00" in head:
            return ProxyError(Reason.BAD_REQUEST, "NUL byte in the request head")
        if _BARE_LF.search(head):
            return ProxyError(
                Reason.BAD_REQUEST, "Request head uses a bare LF line ending; use CRLF"
            )
        if _OBS_FOLD.search(head.lstrip(b"\r\n")):
            return ProxyError(
                Reason.BAD_REQUEST, "Request head uses obsolete line folding"
            )
        stripped = head.lstrip(b"\r\n")
        lineEnd = stripped.find(b"\r\n")
        lineLength = len(stripped) if lineEnd < 0 else lineEnd
        if lineLength > self.maxLine:
            return ProxyError(
                Reason.BAD_REQUEST,
                f"Request line longer than {self.maxLine} bytes",
                status=414,
            )
        if stripped.count(b"\r\n") - 1 > self.maxHeaders:
            return ProxyError(
                Reason.BAD_REQUEST,
                f"More than {self.maxHeaders} request header lines",
                status=431,
            )
        if end >= 0 or len(buffer) > self.maxHead:
            # The head is complete (h11 takes it from here), or too large,
            # which h11 answers with 431.
            self._scanning = False
            self._buffer = b""
        else:
            self._buffer = buffer
        return None


class RateLimiter:
    """
    A token bucket per key (the role), refilled at C{rate} per second up to
    C{burst}, on an injected clock.  At most C{maxKeys} buckets are kept;
    the least recently used is forgotten first (it then starts full again).
    """

    def __init__(self, clock: IReactorTime, rate: float, burst: int, maxKeys: int = 10000) -> None:
        self._clock = clock
        self.rate = rate
        self.burst = max(1, burst)
        self._maxKeys = maxKeys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """
        Take one token for C{key}.

        @return: 0 if there was one; else the seconds until there will be.
        """
        now = self._clock.seconds()
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        if len(self._buckets) > self._maxKeys:
            self._buckets.popitem(last=False)
        return wait


class Overloaded(ProxyError):
    """
    A concurrency or rate limit was reached: 503 or 429 with C{Retry-After}
    and reason code 1014.
    """

    def __init__(self, message: str, status: int, retryAfter: float) -> None:
        super().__init__(Reason.OVERLOADED, message, status=status)
        seconds = max(1, int(retryAfter + 0.999))
        self.headers = ((b"Retry-After", str(seconds).encode("ascii")),)
