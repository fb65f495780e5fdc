"""Summaries of repeated measurements, and order checks of received messages."""

import math
import statistics


def summary(values):
    """min, median and max of a list of repeats (plus the repeats)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "values": list(values),
    }


def percentile(sorted_values, q):
    """The q-th percentile (0-100) of sorted samples, nearest rank."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class SeqCheck:
    """Counts what a stream of sequence numbers says about loss and order.

    A stream is expected to carry 0, 1, 2, ... in order.  ``reordered``
    counts messages that arrived after a later one (or twice); ``lost``
    (from ``result``) those of the ``sent`` never seen.
    """

    __slots__ = ("expected", "received", "reordered", "_seen_max")

    def __init__(self, start=0):
        self.expected = start
        self.received = 0
        self.reordered = 0
        self._seen_max = start - 1

    def see(self, seq):
        self.received += 1
        if seq == self.expected:
            self.expected += 1
            self._seen_max = max(self._seen_max, seq)
        elif seq > self.expected:
            self.expected = seq + 1
            self._seen_max = seq
        elif seq <= self._seen_max:
            self.reordered += 1

    def result(self, sent):
        return {
            "sent": sent,
            "received": self.received,
            "lost": max(0, sent - self.received),
            "reordered": self.reordered,
        }


def merge_checks(checks):
    """Add up several check results (fan-out members, idle receivers)."""
    total = {"sent": 0, "received": 0, "lost": 0, "reordered": 0}
    for check in checks:
        for key in total:
            total[key] += check.get(key, 0)
    return total
