"""
Limits that keep greedy clients from hurting everyone else: the per-role
request rate as token buckets on the injected clock, and the refusal made
when a concurrency limit is reached.  (Limits on request heads are enforced
while parsing, in L{proxy_app.http1}.)
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime

from proxy_app.reasons import ProxyError, Reason


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
