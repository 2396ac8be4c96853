"""
Per-connection statistics for the webhook's C{connection-info} message:
the byte entropy of each direction and the flow of bytes over time, in the
shape smithproxy's C{statistics} feature reports.

Every number is defined in C{docs/webhooks.md}; in short:

  - I{left} is what the client sent toward the destination (up), I{right}
    what came back (down).
  - C{entropy.<side>} looks at the first C{maxBytes} bytes of that side
    only, then stops counting, so a long transfer costs nothing more.
  - C{flow.aggregate_rates} lists the intervals (of C{interval} seconds on
    the injected clock, counted from the object's creation) in which any
    byte moved, the first C{maxIntervals} of them.

Accounting a chunk is one C{collections.Counter.update} over at most the
bytes still wanted (C code, linear in the bytes) plus a few integer
additions; a report is computed only when asked for.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from twisted.internet.interfaces import IReactorTime


class _Side:
    """
    The byte histogram of one direction, over its first C{maxBytes} bytes.
    """

    __slots__ = ("counts", "accounted", "maxBytes")

    def __init__(self, maxBytes: int) -> None:
        self.counts: Counter[int] = Counter()
        self.accounted = 0
        self.maxBytes = maxBytes

    def add(self, data: bytes) -> None:
        room = self.maxBytes - self.accounted
        if room <= 0:
            return
        if len(data) > room:
            data = data[:room]
        self.counts.update(data)
        self.accounted += len(data)

    def report(self) -> dict[str, Any]:
        n = self.accounted
        if n == 0:
            return {
                "bytes_accounted": 0,
                "entropy": 0.0,
                "top_byte": None,
                "top_byte_frequency": 0,
                "top_byte_ratio": 0.0,
            }
        entropy = 0.0
        for count in self.counts.values():
            p = count / n
            entropy -= p * math.log2(p)
        # The most frequent byte; among equals, the lowest value, so that
        # the report does not depend on arrival order.
        top, frequency = min(self.counts.items(), key=lambda item: (-item[1], item[0]))
        return {
            "bytes_accounted": n,
            "entropy": entropy,
            "top_byte": top,
            "top_byte_frequency": frequency,
            "top_byte_ratio": frequency / n,
        }


def changeRatio(current: int, previous: int) -> float:
    """
    The relative change from C{previous} to C{current}, scaled into
    [-1.0, 1.0]: C{(current - previous) / max(current, previous)}, and 0.0
    when both are zero.

    So 1.0 means traffic started (nothing before), -1.0 that it stopped,
    0.5 that it doubled, -0.5 that it halved.
    """
    largest = max(current, previous)
    if largest == 0:
        return 0.0
    return (current - previous) / largest


def skew(up: int, down: int) -> float:
    """
    C{(down - up) / (down + up)}: 1.0 when bytes only came back, -1.0 when
    they only went out, 0.0 when balanced or when nothing moved.
    """
    total = up + down
    if total == 0:
        return 0.0
    return (down - up) / total


class ConnectionStatistics:
    """
    Statistics of one proxied connection, fed with every chunk each way.

    @ivar bytesUp: every byte seen from the client (left), uncapped.
    @ivar bytesDown: every byte seen toward the client (right), uncapped.
    """

    def __init__(
        self,
        clock: IReactorTime,
        maxBytes: int = 65536,
        interval: float = 1.0,
        maxIntervals: int = 60,
    ) -> None:
        """
        @param clock: the clock intervals are measured on; the first
            interval starts now.
        @param maxBytes: how many bytes of each side the entropy covers.
        @param interval: the length of one flow interval, in seconds.
        @param maxIntervals: how many intervals with traffic are listed in
            C{aggregate_rates}; later ones still count in C{skew_all}.
        """
        if maxBytes < 0:
            raise ValueError(f"maxBytes must be 0 or more, not {maxBytes!r}")
        if interval <= 0:
            raise ValueError(f"interval must be above zero, not {interval!r}")
        self._clock = clock
        self._start = clock.seconds()
        self._interval = interval
        self._maxIntervals = maxIntervals
        self._left = _Side(maxBytes)
        self._right = _Side(maxBytes)
        # interval index -> [bytes up, bytes down], in order of first use,
        # which is time order.
        self._intervals: dict[int, list[int]] = {}
        self.bytesUp = 0
        self.bytesDown = 0

    def _bucket(self) -> list[int] | None:
        # A wall clock stepped backwards counts as the first interval.
        index = max(0, int((self._clock.seconds() - self._start) // self._interval))
        bucket = self._intervals.get(index)
        if bucket is None and len(self._intervals) < self._maxIntervals:
            bucket = self._intervals[index] = [0, 0]
        return bucket

    def left(self, data: bytes) -> None:
        """
        Account bytes the client sent toward the destination.
        """
        if not data:
            return
        self.bytesUp += len(data)
        self._left.add(data)
        bucket = self._bucket()
        if bucket is not None:
            bucket[0] += len(data)

    def right(self, data: bytes) -> None:
        """
        Account bytes the destination sent toward the client.
        """
        if not data:
            return
        self.bytesDown += len(data)
        self._right.add(data)
        bucket = self._bucket()
        if bucket is not None:
            bucket[1] += len(data)

    def report(self) -> dict[str, Any]:
        """
        The C{statistics} object of a C{connection-info} message::

            {"entropy": {"left": SIDE, "right": SIDE},
             "flow": {"aggregate_rates": [INTERVAL, ...],
                      "skew": float, "skew_all": float}}

        where SIDE is C{bytes_accounted}, C{entropy}, C{top_byte},
        C{top_byte_frequency}, C{top_byte_ratio} and INTERVAL is
        C{interval_index}, C{aggBU}, C{aggBD}, C{aggRU}, C{aggRD}.
        """
        rates: list[dict[str, Any]] = []
        firstUp = firstDown = 0
        for index, (up, down) in self._intervals.items():
            if not rates:
                firstUp, firstDown = up, down
            previousUp, previousDown = self._intervals.get(index - 1, (0, 0))
            rates.append(
                {
                    "interval_index": index,
                    "aggBU": up,
                    "aggBD": down,
                    "aggRU": changeRatio(up, previousUp),
                    "aggRD": changeRatio(down, previousDown),
                }
            )
        return {
            "entropy": {"left": self._left.report(), "right": self._right.report()},
            "flow": {
                "aggregate_rates": rates,
                "skew": skew(firstUp, firstDown),
                "skew_all": skew(self.bytesUp, self.bytesDown),
            },
        }
