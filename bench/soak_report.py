"""What bench.soak makes of its samples: the table, the boundedness verdict, the CSV, JSON,
Markdown and the plot. Pure functions of the samples but for the writers; matplotlib is imported
only by `plot`, so the rest (and its unit test) needs nothing beyond the standard library.

Boundedness: each process's RSS is compared between the first and the last quarter of the run
(the median of each quarter's samples, so one spike moves nothing), and the four quarters'
medians tell a steady climb from a warm-up that levelled off. File descriptors and threads are
judged the same way, by count.
"""

from __future__ import annotations

import csv
import itertools
import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
# Growth below either figure is noise for a Python or PostgreSQL process (allocator arenas,
# caches filling): it counts only when it is larger than both.
SIGNIFICANT_MIB = 4.0
SIGNIFICANT_PCT = 5.0
# Descriptors and threads come and go with connections (pools, PostgreSQL backends): a climb
# counts only past this many.
SIGNIFICANT_COUNT = 8
MIN_SAMPLES = 8  # two a quarter


@dataclass(frozen=True)
class ProcessSample:
    """One process, or a process with its children (summed), at one moment."""

    rss: int  # bytes
    fds: int  # entries of /proc/PID/fd
    threads: int
    processes: int = 1
    # RssAnon of /proc/PID/status, bytes: the private heap and stacks, without the file mappings
    # and shared memory (PostgreSQL's shared buffers) that RSS also counts
    private: int = 0

    @property
    def rss_mib(self) -> float:
        return self.rss / MIB

    @property
    def private_mib(self) -> float:
        return self.private / MIB


@dataclass(frozen=True)
class Sample:
    """The whole stack at one moment. Rates are over the interval since the previous sample."""

    elapsed: float  # seconds since the traffic started
    requests: int  # requests sent through the plugin so far
    stored: int  # events the collector has stored so far
    request_rate: float  # requests/s
    event_rate: float  # events stored/s
    processes: dict[str, ProcessSample] = field(default_factory=dict)


def quarters(values: Sequence[float]) -> tuple[float, float, float, float]:
    """The medians of the four quarters of `values` (in time order; at least four of them)."""
    n = len(values)
    if n < 4:
        raise ValueError("at least four values")
    bounds = [round(i * n / 4) for i in range(5)]
    q1, q2, q3, q4 = (statistics.median(values[bounds[i] : bounds[i + 1]]) for i in range(4))
    return q1, q2, q3, q4


def rising(medians: Sequence[float], slack: float) -> bool:
    """Whether every quarter's median is above the previous one's by more than `slack`."""
    return all(b - a > slack for a, b in itertools.pairwise(medians))


def slope_per_hour(times: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of `values` over `times` (seconds), per hour."""
    if len(times) < 2:
        return 0.0
    mean_t, mean_v = statistics.fmean(times), statistics.fmean(values)
    var = sum((t - mean_t) ** 2 for t in times)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values, strict=True))
    return cov / var * 3600


def memory_verdict(medians: tuple[float, float, float, float]) -> str:
    """What four quarters' medians of a memory figure (MiB) suggest."""
    q1, _, q3, q4 = medians
    grew = q4 - q1
    if grew <= SIGNIFICANT_MIB or (q1 and grew / q1 * 100 <= SIGNIFICANT_PCT):
        return "bounded"
    # Each quarter above the previous by a share of the whole growth: a climb, not a step.
    if rising(medians, grew / 8):
        return "UNBOUNDED? grew in every quarter"
    if q4 - q3 <= max(SIGNIFICANT_MIB, grew / 8):
        return "grew, then levelled off (warm-up?)"
    return "grew unevenly: inconclusive"


def count_verdict(medians: tuple[float, float, float, float], low: int, high: int) -> str:
    """What four quarters' medians of a count (fds, threads) and its range suggest."""
    if high - low <= SIGNIFICANT_COUNT or medians[3] - medians[0] <= SIGNIFICANT_COUNT:
        return "bounded"
    if rising(medians, 0):
        return "UNBOUNDED? grew in every quarter"
    return "varied, no steady climb"


@dataclass(frozen=True)
class Memory:
    """One memory figure of one process over the run, in MiB."""

    quarters: tuple[float, float, float, float]  # medians
    per_hour: float  # least squares over the second half of the run

    @property
    def growth_mib(self) -> float:
        return self.quarters[3] - self.quarters[0]

    @property
    def growth_pct(self) -> float:
        first = self.quarters[0]
        return self.growth_mib / first * 100 if first else 0.0

    @property
    def verdict(self) -> str:
        return memory_verdict(self.quarters)

    def describe(self, label: str) -> str:
        q = " -> ".join(f"{v:.1f}" for v in self.quarters)
        return (
            f"{label} {self.growth_mib:+.1f} MiB ({self.growth_pct:+.1f} %) first to last quarter"
            f" (quarter medians {q}; second half {self.per_hour:+.1f} MiB/h)"
        )


@dataclass(frozen=True)
class Growth:
    """One process over the run: its memory, its counts' ranges, and what they suggest. The
    memory verdict is the private memory's (RssAnon): RSS also grows as PostgreSQL's backends
    touch more of the shared buffers, which shared_buffers bounds."""

    name: str
    rss: Memory
    private: Memory
    fds_min: int
    fds_max: int
    fds_quarters: tuple[float, float, float, float]
    threads_min: int
    threads_max: int
    threads_quarters: tuple[float, float, float, float]

    @property
    def memory_verdict(self) -> str:
        return self.private.verdict

    @property
    def fds_verdict(self) -> str:
        return count_verdict(self.fds_quarters, self.fds_min, self.fds_max)

    @property
    def threads_verdict(self) -> str:
        return count_verdict(self.threads_quarters, self.threads_min, self.threads_max)

    @property
    def unbounded(self) -> bool:
        verdicts = (self.memory_verdict, self.fds_verdict, self.threads_verdict)
        return any(v.startswith("UNBOUNDED") for v in verdicts)


def process_names(samples: Sequence[Sample]) -> list[str]:
    names: dict[str, None] = {}
    for s in samples:
        names.update(dict.fromkeys(s.processes))
    return list(names)


def under_load(samples: Sequence[Sample]) -> list[Sample]:
    """The samples taken while traffic ran: the one at 0 s is the idle stack before it."""
    return [s for s in samples if s.elapsed > 0]


def _memory(times: Sequence[float], mib: Sequence[float]) -> Memory:
    half = len(times) // 2
    return Memory(quarters(mib), slope_per_hour(times[half:], mib[half:]))


def growth(samples: Sequence[Sample], name: str) -> Growth | None:
    """`name`'s growth over the samples under load; None with fewer than MIN_SAMPLES of them."""
    points = [(s.elapsed, s.processes[name]) for s in under_load(samples) if name in s.processes]
    if len(points) < MIN_SAMPLES:
        return None
    times = [t for t, _ in points]
    fds = [float(p.fds) for _, p in points]
    threads = [float(p.threads) for _, p in points]
    return Growth(
        name=name,
        rss=_memory(times, [p.rss_mib for _, p in points]),
        private=_memory(times, [p.private_mib for _, p in points]),
        fds_min=int(min(fds)),
        fds_max=int(max(fds)),
        fds_quarters=quarters(fds),
        threads_min=int(min(threads)),
        threads_max=int(max(threads)),
        threads_quarters=quarters(threads),
    )


def verdict_lines(samples: Sequence[Sample]) -> list[str]:
    """One line per process, then the overall verdict."""
    lines = []
    growths = []
    for name in process_names(samples):
        g = growth(samples, name)
        if g is None:
            lines.append(f"{name}: too few samples under load (need {MIN_SAMPLES})")
            continue
        growths.append(g)
        lines.append(
            f"{name}: {g.rss.describe('RSS')}; {g.private.describe('private')}:"
            f" {g.memory_verdict}; fds {g.fds_min}..{g.fds_max} (max-min {g.fds_max - g.fds_min}):"
            f" {g.fds_verdict}; threads {g.threads_min}..{g.threads_max}: {g.threads_verdict}"
        )
    if not growths:
        lines.append("verdict: none (run longer, or sample more often)")
    elif any(g.unbounded for g in growths):
        names = ", ".join(g.name for g in growths if g.unbounded)
        lines.append(f"verdict: LOOKS UNBOUNDED ({names}): steady growth through the run")
    else:
        lines.append("verdict: bounded (no process grew steadily through the run)")
    return lines


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes:d}:{secs:02d}"


def table_rows(samples: Sequence[Sample]) -> tuple[list[str], list[list[str]]]:
    """The header and the rows: time, req/s, events/s, then RSS, fds and threads per process."""
    names = process_names(samples)
    header = ["time", "req/s", "events/s"]
    for name in names:
        header += [f"{name} MiB", "fds", "thr"]
    rows = []
    for s in samples:
        row = [_clock(s.elapsed)]
        row += ["-", "-"] if s.elapsed == 0 else [f"{s.request_rate:.0f}", f"{s.event_rate:.0f}"]
        for name in names:
            p = s.processes.get(name)
            row += ["-"] * 3 if p is None else [f"{p.rss_mib:.1f}", str(p.fds), str(p.threads)]
        rows.append(row)
    return header, rows


def text_table(samples: Sequence[Sample]) -> str:
    header, rows = table_rows(samples)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header]]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def markdown_table(samples: Sequence[Sample]) -> str:
    header, rows = table_rows(samples)
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def flat_rows(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """One flat dict per sample, for the CSV."""
    rows = []
    for s in samples:
        row: dict[str, Any] = {
            "elapsed_s": round(s.elapsed, 1),
            "requests": s.requests,
            "stored": s.stored,
            "requests_per_s": round(s.request_rate, 1),
            "events_per_s": round(s.event_rate, 1),
        }
        for name, p in s.processes.items():
            row |= {
                f"{name}_rss_bytes": p.rss,
                f"{name}_private_bytes": p.private,
                f"{name}_fds": p.fds,
                f"{name}_threads": p.threads,
                f"{name}_processes": p.processes,
            }
        rows.append(row)
    return rows


def write_csv(path: Path, samples: Sequence[Sample]) -> None:
    rows = flat_rows(samples)
    fields: dict[str, None] = {}
    for row in rows:
        fields.update(dict.fromkeys(row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, meta: dict[str, Any], samples: Sequence[Sample]) -> None:
    body = {
        "meta": meta,
        "verdict": verdict_lines(samples),
        "samples": [asdict(s) for s in samples],
    }
    path.write_text(json.dumps(body, indent=1) + "\n")


def plot(path: Path, samples: Sequence[Sample], title: str) -> None:
    """Throughput, RSS per process and fds per process over time, one panel each (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.elapsed / 60 for s in samples]
    loaded = [s for s in samples if s.elapsed > 0]
    fig, (rate, memory, fds) = plt.subplots(3, 1, sharex=True, figsize=(10, 9))
    fig.suptitle(title)
    rate.plot([s.elapsed / 60 for s in loaded], [s.request_rate for s in loaded], label="req/s")
    rate.plot([s.elapsed / 60 for s in loaded], [s.event_rate for s in loaded], label="events/s")
    rate.set_ylabel("per second")
    rate.set_ylim(bottom=0)
    for name in process_names(samples):
        ps = [s.processes[name] for s in samples]
        (line,) = memory.plot(minutes, [p.rss_mib for p in ps], label=name)
        # The process's other lines in the same colour: private memory and threads dashed.
        for axis, values, label, style in (
            (memory, [p.private_mib for p in ps], f"{name} private", "--"),
            (fds, [p.fds for p in ps], f"{name} fds", "-"),
            (fds, [p.threads for p in ps], f"{name} threads", "--"),
        ):
            axis.plot(minutes, values, color=line.get_color(), linestyle=style, label=label)
    memory.set_ylabel("MiB: RSS (solid), private (dashed)")
    memory.set_ylim(bottom=0)
    fds.set_ylabel("open fds (solid), threads (dashed)")
    fds.set_ylim(bottom=0)
    fds.set_xlabel("minutes")
    for axes in (rate, memory, fds):
        axes.grid(alpha=0.3)
        axes.legend(loc="upper left", fontsize="small", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
