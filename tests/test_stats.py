"""
Tests for L{proxy_app.stats}: per-connection entropy and flow statistics.
"""

from __future__ import annotations

import json
import math
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from proxy_app.stats import ConnectionStatistics, changeRatio, skew


def referenceEntropy(data: bytes) -> float:
    """
    Shannon entropy in bits per byte, computed the textbook way.
    """
    if not data:
        return 0.0
    n = len(data)
    return -sum(c / n * math.log2(c / n) for c in Counter(data).values())


class EntropyTests(SynchronousTestCase):
    def test_singleByteValue(self) -> None:
        """
        Bytes that are all the same value have entropy 0.0, and that value
        is the top byte with a ratio of 1.0.
        """
        stats = ConnectionStatistics(Clock(), maxBytes=65536)
        stats.left(b"A" * 1000)
        left = stats.report()["entropy"]["left"]
        self.assertEqual(
            left,
            {
                "bytes_accounted": 1000,
                "entropy": 0.0,
                "top_byte": 65,
                "top_byte_frequency": 1000,
                "top_byte_ratio": 1.0,
            },
        )

    def test_uniformBytes(self) -> None:
        """
        Every byte value equally often gives exactly 8.0 bits per byte.
        """
        stats = ConnectionStatistics(Clock())
        stats.right(bytes(range(256)) * 4)
        right = stats.report()["entropy"]["right"]
        self.assertEqual(right["entropy"], 8.0)
        self.assertEqual(right["bytes_accounted"], 1024)
        self.assertEqual(right["top_byte_frequency"], 4)
        self.assertEqual(right["top_byte_ratio"], 4 / 1024)

    def test_twoValues(self) -> None:
        """
        Two values equally often give 1.0 bit per byte; with a tie the top
        byte is the lower value, whatever the order of arrival.
        """
        stats = ConnectionStatistics(Clock())
        stats.left(b"zaza")
        left = stats.report()["entropy"]["left"]
        self.assertEqual(left["entropy"], 1.0)
        self.assertEqual(left["top_byte"], ord("a"))
        self.assertEqual(left["top_byte_frequency"], 2)
        self.assertEqual(left["top_byte_ratio"], 0.5)

    def test_topByte(self) -> None:
        """
        The top byte is the most frequent value, with its count and its
        share of the accounted bytes.
        """
        stats = ConnectionStatistics(Clock())
        stats.left(b"GET / HTTP/1.1\r\n")
        left = stats.report()["entropy"]["left"]
        self.assertEqual(left["top_byte"], ord("T"))
        self.assertEqual(left["top_byte_frequency"], 3)
        self.assertEqual(left["top_byte_ratio"], 3 / 16)

    def test_sidesSeparate(self) -> None:
        """
        Left counts what the client sent, right what came back; neither
        sees the other's bytes.
        """
        stats = ConnectionStatistics(Clock())
        stats.left(b"u" * 10)
        stats.right(b"d" * 30)
        report = stats.report()["entropy"]
        self.assertEqual(report["left"]["top_byte"], ord("u"))
        self.assertEqual(report["left"]["bytes_accounted"], 10)
        self.assertEqual(report["right"]["top_byte"], ord("d"))
        self.assertEqual(report["right"]["bytes_accounted"], 30)

    def test_maxBytesCap(self) -> None:
        """
        Only the first C{maxBytes} of a side are accounted, including a
        chunk that straddles the limit; later bytes change nothing in the
        entropy, but still count in the uncapped totals.
        """
        stats = ConnectionStatistics(Clock(), maxBytes=100)
        stats.left(b"a" * 60)
        stats.left(b"b" * 60)  # 40 of these are accounted
        stats.left(b"c" * 1000)
        left = stats.report()["entropy"]["left"]
        self.assertEqual(left["bytes_accounted"], 100)
        self.assertEqual(left["top_byte"], ord("a"))
        self.assertEqual(left["top_byte_frequency"], 60)
        self.assertAlmostEqual(left["entropy"], referenceEntropy(b"a" * 60 + b"b" * 40))
        self.assertEqual(stats.bytesUp, 1120)

    def test_maxBytesZero(self) -> None:
        """
        C{maxBytes} of 0 accounts nothing (an empty side's report).
        """
        stats = ConnectionStatistics(Clock(), maxBytes=0)
        stats.left(b"abc")
        self.assertEqual(stats.report()["entropy"]["left"]["bytes_accounted"], 0)

    def test_emptySide(self) -> None:
        """
        A side that saw no bytes reports zeros and no top byte.
        """
        report = ConnectionStatistics(Clock()).report()
        self.assertEqual(
            report["entropy"]["right"],
            {
                "bytes_accounted": 0,
                "entropy": 0.0,
                "top_byte": None,
                "top_byte_frequency": 0,
                "top_byte_ratio": 0.0,
            },
        )

    def test_negativeMaxBytes(self) -> None:
        """
        A negative C{maxBytes} is refused.
        """
        self.assertRaises(ValueError, ConnectionStatistics, Clock(), -1)

    @settings(max_examples=200, deadline=None)
    @given(
        chunks=st.lists(st.binary(max_size=300), max_size=20),
        maxBytes=st.integers(min_value=0, max_value=2000),
    )
    def test_matchesReference(self, chunks: list[bytes], maxBytes: int) -> None:
        """
        For any chunking, the side's report equals the textbook figures over
        the first C{maxBytes} of the concatenated bytes, and entropy stays
        within [0, 8].
        """
        stats = ConnectionStatistics(Clock(), maxBytes=maxBytes)
        for chunk in chunks:
            stats.left(chunk)
        data = b"".join(chunks)[:maxBytes]
        left = stats.report()["entropy"]["left"]
        self.assertEqual(left["bytes_accounted"], len(data))
        self.assertAlmostEqual(left["entropy"], referenceEntropy(data), places=9)
        self.assertTrue(0.0 <= left["entropy"] <= 8.0)
        if data:
            counts = Counter(data)
            self.assertEqual(left["top_byte_frequency"], max(counts.values()))
            self.assertEqual(counts[left["top_byte"]], left["top_byte_frequency"])


class FlowTests(SynchronousTestCase):
    def test_intervals(self) -> None:
        """
        Bytes fall into 1-second intervals counted from creation on the
        injected clock; only intervals with traffic are listed, each with
        its bytes up and down and their change against the interval just
        before (an empty one counting as zero).
        """
        clock = Clock()
        clock.advance(1000)
        stats = ConnectionStatistics(clock)
        stats.left(b"x" * 100)
        clock.advance(0.5)
        stats.right(b"y" * 300)
        clock.advance(0.9)  # 1.4 s: interval 1
        stats.left(b"x" * 50)
        stats.right(b"y" * 600)
        clock.advance(2.0)  # 3.4 s: interval 3
        stats.left(b"x" * 10)
        flow = stats.report()["flow"]
        self.assertEqual(
            flow["aggregate_rates"],
            [
                {
                    "interval_index": 0,
                    "aggBU": 100,
                    "aggBD": 300,
                    "aggRU": 1.0,
                    "aggRD": 1.0,
                },
                {
                    "interval_index": 1,
                    "aggBU": 50,
                    "aggBD": 600,
                    "aggRU": -0.5,
                    "aggRD": 0.5,
                },
                {
                    "interval_index": 3,
                    "aggBU": 10,
                    "aggBD": 0,
                    "aggRU": 1.0,
                    "aggRD": 0.0,
                },
            ],
        )
        self.assertEqual(flow["skew"], (300 - 100) / 400)
        self.assertEqual(flow["skew_all"], (900 - 160) / 1060)

    def test_skewOfFirstActiveInterval(self) -> None:
        """
        C{skew} is taken over the first interval with traffic, even when
        that is not interval 0; the seed's numbers (268 up, 785 down) give
        the seed's skew.
        """
        clock = Clock()
        stats = ConnectionStatistics(clock)
        clock.advance(2.5)
        stats.left(b"u" * 268)
        stats.right(b"d" * 785)
        clock.advance(1)
        stats.left(b"u" * 5000)
        flow = stats.report()["flow"]
        self.assertEqual(flow["aggregate_rates"][0]["interval_index"], 2)
        self.assertEqual(flow["skew"], 0.49097815764482433)
        self.assertEqual(flow["skew_all"], (785 - 5268) / (785 + 5268))

    def test_noTraffic(self) -> None:
        """
        With no bytes at all there are no intervals and both skews are 0.0;
        empty chunks count as no traffic.
        """
        stats = ConnectionStatistics(Clock())
        stats.left(b"")
        stats.right(b"")
        self.assertEqual(
            stats.report()["flow"],
            {"aggregate_rates": [], "skew": 0.0, "skew_all": 0.0},
        )

    def test_flowUncapped(self) -> None:
        """
        The flow counts every byte, beyond C{maxBytes}.
        """
        stats = ConnectionStatistics(Clock(), maxBytes=10)
        stats.left(b"a" * 1000)
        self.assertEqual(stats.report()["flow"]["aggregate_rates"][0]["aggBU"], 1000)

    def test_maxIntervals(self) -> None:
        """
        Only the first C{maxIntervals} intervals with traffic are listed;
        later bytes still count in C{skew_all}.
        """
        clock = Clock()
        stats = ConnectionStatistics(clock, maxIntervals=3)
        for _ in range(5):
            stats.right(b"d")
            clock.advance(1)
        flow = stats.report()["flow"]
        self.assertEqual(
            [r["interval_index"] for r in flow["aggregate_rates"]], [0, 1, 2]
        )
        self.assertEqual(flow["skew_all"], 1.0)
        self.assertEqual(stats.bytesDown, 5)

    def test_customInterval(self) -> None:
        """
        The interval length is a parameter.
        """
        clock = Clock()
        stats = ConnectionStatistics(clock, interval=10.0)
        clock.advance(25)
        stats.left(b"a")
        self.assertEqual(
            stats.report()["flow"]["aggregate_rates"][0]["interval_index"], 2
        )

    def test_clockBackwards(self) -> None:
        """
        A clock stepped back before the start counts as interval 0.
        """
        clock = Clock()
        clock.advance(100)
        stats = ConnectionStatistics(clock)
        clock.rightNow = 50.0
        stats.left(b"a")
        self.assertEqual(
            stats.report()["flow"]["aggregate_rates"][0]["interval_index"], 0
        )

    def test_changeRatio(self) -> None:
        """
        The change ratio is (current - previous) / max(current, previous):
        1.0 when traffic starts, -1.0 when it stops, 0.0 when unchanged or
        when both are zero.
        """
        self.assertEqual(changeRatio(10, 0), 1.0)
        self.assertEqual(changeRatio(0, 10), -1.0)
        self.assertEqual(changeRatio(20, 10), 0.5)
        self.assertEqual(changeRatio(10, 20), -0.5)
        self.assertEqual(changeRatio(7, 7), 0.0)
        self.assertEqual(changeRatio(0, 0), 0.0)

    def test_skewFunction(self) -> None:
        """
        Skew is (down - up) / (down + up), 0.0 for no bytes.
        """
        self.assertEqual(skew(0, 10), 1.0)
        self.assertEqual(skew(10, 0), -1.0)
        self.assertEqual(skew(5, 5), 0.0)
        self.assertEqual(skew(0, 0), 0.0)

    def test_reportIsJSON(self) -> None:
        """
        The report is plain JSON: it round-trips unchanged.
        """
        clock = Clock()
        stats = ConnectionStatistics(clock)
        stats.left(b"hello")
        stats.right(b"world!")
        report = stats.report()
        self.assertEqual(json.loads(json.dumps(report)), report)
        self.assertEqual(set(report), {"entropy", "flow"})

    def test_badInterval(self) -> None:
        """
        An interval of zero or less is refused.
        """
        self.assertRaises(ValueError, ConnectionStatistics, Clock(), 10, 0)
