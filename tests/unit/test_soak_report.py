"""bench/soak_report.py: quarters, growth and the boundedness verdict of the soak benchmark."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bench.soak_report import (
    MIB,
    ProcessSample,
    Sample,
    count_verdict,
    growth,
    markdown_table,
    memory_verdict,
    quarters,
    slope_per_hour,
    text_table,
    verdict_lines,
    write_csv,
    write_json,
)


def run(rss_mib: list[float], fds: list[int] | None = None, step: float = 10.0) -> list[Sample]:
    """An idle sample at 0 s, then one per value under load; private memory = RSS - 20 MiB."""
    fds = fds or [30] * len(rss_mib)
    samples = [Sample(0.0, 0, 0, 0.0, 0.0, {"p": ProcessSample(10 * MIB, 5, 1, 1, 1 * MIB)})]
    for i, (mib, n) in enumerate(zip(rss_mib, fds, strict=True), start=1):
        p = ProcessSample(int(mib * MIB), n, 12, 2, int((mib - 20) * MIB))
        samples.append(Sample(i * step, i * 1000, i * 990, 100.0, 99.0, {"p": p}))
    return samples


def test_quarters_are_the_medians_of_four_equal_parts() -> None:
    assert quarters([1, 2, 3, 4, 5, 6, 7, 8]) == (1.5, 3.5, 5.5, 7.5)
    assert quarters([1, 100, 1, 1]) == (1, 100, 1, 1)
    with pytest.raises(ValueError):
        quarters([1, 2, 3])


def test_slope_is_per_hour() -> None:
    assert slope_per_hour([0, 60, 120], [0, 1, 2]) == pytest.approx(60)
    assert slope_per_hour([5], [1]) == 0.0


def test_flat_memory_is_bounded() -> None:
    g = growth(run([100.0, 100.5, 99.8, 100.2] * 4), "p")
    assert g is not None
    assert g.memory_verdict == "bounded"
    assert not g.unbounded


def test_steady_climb_looks_unbounded() -> None:
    g = growth(run([100.0 + 3 * i for i in range(16)]), "p")
    assert g is not None
    assert g.rss.growth_mib == pytest.approx(36.0)
    assert g.rss.growth_pct == pytest.approx(36.0 / 104.5 * 100)  # of the first quarter median
    assert g.private.growth_mib == pytest.approx(36.0)
    assert g.rss.per_hour == pytest.approx(3 / 10 * 3600)
    assert g.memory_verdict.startswith("UNBOUNDED")
    assert g.unbounded
    assert verdict_lines(run([100.0 + 3 * i for i in range(16)]))[-1].startswith(
        "verdict: LOOKS UNBOUNDED (p)"
    )


def test_warm_up_that_levels_off_is_not_called_unbounded() -> None:
    g = growth(run([60, 70, 80, 90, 100, 100, 101, 100, 100, 101, 100, 100]), "p")
    assert g is not None
    assert g.memory_verdict == "grew, then levelled off (warm-up?)"
    assert not g.unbounded


def test_growth_below_the_noise_floor_is_bounded() -> None:
    # rising every quarter, but by 3 MiB in all: allocator noise
    assert memory_verdict((100.0, 101.0, 102.0, 103.0)) == "bounded"
    # 6 MiB is under 5 % of 500 MiB
    assert memory_verdict((500.0, 502.0, 504.0, 506.0)) == "bounded"
    assert memory_verdict((100.0, 110.0, 120.0, 130.0)).startswith("UNBOUNDED")
    assert memory_verdict((100.0, 140.0, 100.0, 140.0)) == "grew unevenly: inconclusive"


def test_descriptor_counts() -> None:
    assert count_verdict((30, 31, 30, 32), 29, 33) == "bounded"
    assert count_verdict((30, 50, 70, 90), 30, 90).startswith("UNBOUNDED")
    assert count_verdict((30, 60, 40, 50), 30, 70) == "varied, no steady climb"
    g = growth(run([100.0] * 8, fds=[30, 30, 40, 50, 60, 70, 80, 90]), "p")
    assert g is not None
    assert (g.fds_min, g.fds_max) == (30, 90)
    assert g.fds_verdict.startswith("UNBOUNDED")


def test_the_idle_sample_is_left_out_and_short_runs_get_no_verdict() -> None:
    """The sample at 0 s (10 MiB, before traffic) would make any run look like it grew."""
    g = growth(run([100.0] * 8), "p")
    assert g is not None
    assert g.rss.quarters == (100.0, 100.0, 100.0, 100.0)
    assert growth(run([100.0] * 7), "p") is None
    assert verdict_lines(run([100.0] * 3))[-1] == "verdict: none (run longer, or sample more often)"


def test_tables_have_a_row_per_sample() -> None:
    samples = run([100.0] * 3)
    lines = text_table(samples).splitlines()
    assert lines[0].split() == ["time", "req/s", "events/s", "p", "MiB", "fds", "thr"]
    assert lines[2].split() == ["0:00", "-", "-", "10.0", "5", "1"]
    assert lines[3].split() == ["0:10", "100", "99", "100.0", "30", "12"]
    md = markdown_table(samples).splitlines()
    assert md[0] == "| time | req/s | events/s | p MiB | fds | thr |"
    assert len(md) == 2 + len(samples)


def test_csv_and_json_hold_every_sample(tmp_path: Path) -> None:
    samples = run([100.0] * 8)
    write_csv(tmp_path / "s.csv", samples)
    with (tmp_path / "s.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9
    assert rows[1]["p_rss_bytes"] == str(100 * MIB)
    assert rows[1]["p_private_bytes"] == str(80 * MIB)
    write_json(tmp_path / "s.json", {"command": "x"}, samples)
    body = json.loads((tmp_path / "s.json").read_text())
    assert body["meta"] == {"command": "x"}
    assert body["samples"][1]["processes"]["p"]["fds"] == 30
    assert body["verdict"][-1].startswith("verdict: bounded")
