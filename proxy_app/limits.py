"""
Limits that keep greedy clients from hurting everyone else: the per-role
request rate as token buckets on the injected clock, the refusal made
when a concurrency limit is reached, and each worker's share of those
limits under C{--workers}.  (Limits on request heads are enforced while
parsing, in L{proxy_app.http1}.)
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

import attr
from twisted.internet.interfaces import IReactorTime

from proxy_app.config import Limits
from proxy_app.reasons import ProxyError, Reason

# The limits in the C{limits} section that count what the whole proxy
# does, and that the workers of C{--workers} therefore divide between them;
# and those that bound one request, which every worker applies whole.  A
# new limit goes in one or the other (a test checks).
PROXY_WIDE = frozenset(
    [
        "max_request_rate",
        "request_burst",
        "max_concurrent_requests",
        "max_concurrent_tunnels",
    ]
)
PER_REQUEST = frozenset(
    [
        "max_response_body",
        "max_request_header",
        "max_uri_length",
        "max_header_count",
        "max_connect_attempts",
    ]
)


def workerShare(total: int, workers: int, index: int) -> int:
    """
    Worker C{index}'s share of a whole-number limit that C{workers} workers
    divide between them.

    The shares differ by at most one and add up to C{total}, the first
    workers taking the remainder.  A share is never 0, which would mean no
    limit (or no burst) at all: below one per worker every worker gets 1,
    and the proxy as a whole then allows C{workers}, more than C{total}.

    @param total: the configured limit; 0 (no limit) stays 0.
    """
    if total <= 0:
        return total
    share, remainder = divmod(total, workers)
    return max(1, share + (1 if index < remainder else 0))


def workerLimits(limits: Limits, workers: int, index: int) -> Limits:
    """
    The limits that worker C{index} of C{workers} enforces, so that the
    configured values hold for the proxy as a whole: the request rate is
    divided evenly, the burst and the concurrency limits by
    L{workerShare}; the limits of one request are kept whole.
    """
    if workers <= 1:
        return limits
    return attr.evolve(
        limits,
        max_request_rate=limits.max_request_rate / workers,
        request_burst=workerShare(limits.request_burst, workers, index),
        max_concurrent_requests=workerShare(
            limits.max_concurrent_requests, workers, index
        ),
        max_concurrent_tunnels=workerShare(
            limits.max_concurrent_tunnels, workers, index
        ),
    )


class RateLimiter:
    """
    A token bucket per key (the role), refilled at C{rate} per second up to
    C{burst}, on an injected clock.  At most C{maxKeys} buckets are kept;
    the least recently used is forgotten first (it then starts full again).
    """

    def __init__(
        self, clock: IReactorTime, rate: float, burst: int, maxKeys: int = 10000
    ) -> None:
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
        tokens = min(
            float(self.burst), tokens + (self._clock.seconds() - last) * self.rate
        )
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
