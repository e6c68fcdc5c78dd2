"""Summaries the benchmarks print."""

from __future__ import annotations


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile (q in 0..100) of `values`."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]
