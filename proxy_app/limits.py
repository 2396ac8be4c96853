"""
Limits that keep greedy clients from hurting everyone else: the per-role
request rate as token buckets on the injected clock, and the refusal made
when a concurrency limit is reached.  (Limits on request heads are enforced
while parsing, in L{proxy_app.http1}.)
"""

from __future__ import annotations

import ipaddress
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

    def wait(self, key: str) -> float:
        """
        How long until C{key} has a token, without taking one.

        @return: 0 if it has one now; else the seconds until it will.
        """
        entry = self._buckets.get(key)
        if entry is None:
            return 0.0
        tokens, last = entry
        tokens = min(float(self.burst), tokens + (self._clock.seconds() - last) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate


def clientKey(host: str) -> str:
    """
    The key a per-client limit counts C{host} (a peer address) under: the
    address itself for IPv4 (an IPv4-mapped IPv6 address counts as its IPv4
    address), its /64 for IPv6, since one host commonly holds a whole /64;
    anything else (a UNIX socket's empty host) as it is.
    """
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class Overloaded(ProxyError):
    """
    A concurrency or rate limit was reached: 503 or 429 with C{Retry-After}
    and reason code 1014.
    """

    def __init__(self, message: str, status: int, retryAfter: float) -> None:
        super().__init__(Reason.OVERLOADED, message, status=status)
        seconds = max(1, int(retryAfter + 0.999))
        self.headers = ((b"Retry-After", str(seconds).encode("ascii")),)
