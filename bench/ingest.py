"""Ingest benchmark: events per second into PostgreSQL through the real collector process,
with dedupe and durable commits (fsync and synchronous_commit on), at several batch sizes, and
where the CPU goes (collector, PostgreSQL, load generator), on an empty database and on one
that already holds history.

History (`--preload N`, bench/history.py): N events spread evenly over the 30 days before the
run, written straight into the tables (no HTTP), then VACUUM ANALYZE and a checkpoint, the same
as on the empty database. Each preload gets its own server, database and collector, all kept
running; every round measures each batch size on each of them in turn, so a shared machine that
slows down or speeds up weighs on all alike. The events sent arrive as a gateway's do: times
rising with the sequence, a few seconds of jitter, 500 consumers and 6 models.

Baseline, same run: right after each measurement, PostgreSQL alone taking the same number of
rows by COPY into a plain table on the same server (no HTTP, no validation, no dedupe, no
rollups), so each figure also reads as a ratio; compare ratios rather than absolute rates
between runs.

    make bench-ingest                      # 0 and 5 million stored, a few minutes
    .venv/bin/python -m bench.ingest --preload 0 1000000 --events 100000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from statistics import median
from typing import Any

import aiohttp
import asyncpg
import psutil

from bench.history import CONSUMERS, MODELS, preload
from bench.stack import Stack, collector_stack

SENT_PER_SECOND = 50_000  # how fast the sent events' times advance
JITTER_SECONDS = 5.0


def make_events(count: int, seed: int, start: datetime) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    events = []
    for n in range(count):
        provider, model = rng.choice(MODELS)
        consumer = f"customer-{rng.randrange(CONSUMERS):04d}"
        input_tokens = rng.randrange(20, 8000)
        cached = rng.randrange(0, input_tokens // 2) if rng.random() < 0.3 else 0
        output_tokens = rng.randrange(1, 2000)
        reasoning = rng.randrange(0, output_tokens) if model.startswith("o") else 0
        when = start + timedelta(seconds=n / SENT_PER_SECOND + rng.uniform(0, JITTER_SECONDS))
        events.append(
            {
                "specversion": "1.0",
                "id": str(uuid.UUID(int=rng.getrandbits(128))),
                "source": f"kong://dp-{rng.randrange(4)}/token-meter",
                "type": "ai.usage",
                "subject": consumer,
                "time": when.isoformat().replace("+00:00", "Z"),
                "data": {
                    "consumer_id": str(uuid.UUID(int=rng.getrandbits(128))),
                    "consumer_username": consumer,
                    "route_name": "chat",
                    "service_name": provider,
                    "provider": provider,
                    "model": model,
                    "status": 200,
                    "streamed": rng.random() < 0.4,
                    "input_tokens": input_tokens,
                    "cached_input_tokens": cached,
                    "output_tokens": output_tokens,
                    "reasoning_tokens": reasoning,
                    "total_tokens": input_tokens + output_tokens,
                    "latency_ms": round(rng.uniform(200, 30000), 1),
                },
            }
        )
    return events


@dataclass
class CpuSample:
    collector: float
    postgres: float
    generator: float
    machine_busy: float  # every process on the machine, ours too

    @property
    def ours(self) -> float:
        return self.collector + self.postgres + self.generator


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def postgres_cpu(postmaster: psutil.Process) -> float:
    total = cpu_seconds(postmaster)
    for child in postmaster.children(recursive=True):
        try:
            total += cpu_seconds(child)
        except psutil.NoSuchProcess:
            pass
    return total


def sample(collector: psutil.Process, postmaster: psutil.Process | None) -> CpuSample:
    machine = psutil.cpu_times()
    return CpuSample(
        collector=cpu_seconds(collector),
        postgres=postgres_cpu(postmaster) if postmaster else float("nan"),
        generator=cpu_seconds(psutil.Process()),
        machine_busy=float(sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)),
    )


async def send_all(url: str, token: str, bodies: list[bytes], concurrency: int) -> int:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    accepted = 0
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/cloudevents-batch+json",
    }
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal accepted
            while not queue.empty():
                body = queue.get_nowait()
                async with session.post(url, data=body, headers=headers) as r:
                    result = await r.json()
                    if r.status != 200 or result["rejected"]:
                        raise RuntimeError(f"ingest failed: {r.status} {result}")
                    accepted += result["accepted"]

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return accepted


async def copy_baseline(url: str, events: list[dict[str, Any]]) -> float:
    """PostgreSQL alone: the same rows COPYed into a plain table in batches of 5000."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_baseline (time timestamptz, source text, id text,"
            " consumer text, model text, input_tokens bigint, output_tokens bigint,"
            " total_tokens bigint)"
        )
        rows = [
            (
                datetime.fromisoformat(e["time"]),
                e["source"],
                e["id"],
                e["subject"],
                e["data"]["model"],
                e["data"]["input_tokens"],
                e["data"]["output_tokens"],
                e["data"]["total_tokens"],
            )
            for e in events
        ]
        started = time.perf_counter()
        for i in range(0, len(rows), 5000):
            async with conn.transaction():
                await conn.copy_records_to_table("bench_baseline", records=rows[i : i + 5000])
        return len(rows) / (time.perf_counter() - started)
    finally:
        await conn.close()


@dataclass
class Measured:
    """One batch size on one database, one round."""

    rate: float  # events/s
    baseline: float  # rows/s of the bare COPY right after, on the same server
    cpu: float  # µs of CPU per event: collector, PostgreSQL and load generator

    @property
    def vs_copy(self) -> float:
        return self.rate / self.baseline


@dataclass
class Target:
    """A database with `stored` events already in it, and its collector."""

    stored: int
    stack: Stack
    collector: psutil.Process
    postmaster: psutil.Process | None
    results: dict[int, list[Measured]] = field(default_factory=dict)  # per batch size


HEADER = (
    f"{'stored':>10} {'batch':>6} {'events/s':>9} {'x COPY':>7}  {'cpu collector':>14}"
    f" {'cpu postgres':>13} {'cpu loadgen':>12}  {'µs/event: collector':>19} {'postgres':>8}"
    f" {'all':>5} {'others':>7}"
)


async def measure(args: argparse.Namespace, target: Target, batch_size: int, seed: int) -> None:
    events = make_events(args.events, seed, datetime.now(UTC) - timedelta(seconds=10))
    bodies = [
        json.dumps(events[i : i + batch_size]).encode() for i in range(0, len(events), batch_size)
    ]
    before = sample(target.collector, target.postmaster)
    started = time.perf_counter()
    accepted = await send_all(
        f"{target.stack.urls[0]}/v1/events", target.stack.ingest_token, bodies, args.concurrency
    )
    elapsed = time.perf_counter() - started
    after = sample(target.collector, target.postmaster)
    assert accepted == len(events), (accepted, len(events))
    baseline = await copy_baseline(
        target.stack.database_url, make_events(args.events, -seed, now())
    )
    c = after.collector - before.collector
    p = after.postgres - before.postgres
    g = after.generator - before.generator
    total = c + p + g
    m = Measured(accepted / elapsed, baseline, total / accepted * 1e6)
    target.results.setdefault(batch_size, []).append(m)
    others = (after.machine_busy - before.machine_busy) - total
    print(
        f"{target.stored:>10,} {batch_size:>6} {m.rate:>9,.0f} {m.vs_copy:>7.3f}  "
        f"{c:>7.2f}s {c / total:>5.0%} {p:>6.2f}s {p / total:>5.0%} "
        f"{g:>5.2f}s {g / total:>5.0%}  {c / accepted * 1e6:>19.1f}"
        f" {p / accepted * 1e6:>8.1f} {m.cpu:>5.1f} {max(others, 0.0):>6.1f}s"
    )


def now() -> datetime:
    return datetime.now(UTC)


def report(targets: list[Target], cores: int) -> None:
    batches = list(targets[0].results)
    print(
        "\n== summary, medians of the rounds: events/s (x the bare COPY measured right after"
        " on the same server) [CPU µs per event, collector + PostgreSQL + load generator] =="
    )
    print(f"{'stored':>12} " + " ".join(f"{'batch ' + str(b):>32}" for b in batches))
    for t in targets:
        cells = []
        for b in batches:
            rate = median(m.rate for m in t.results[b])
            vs = median(m.vs_copy for m in t.results[b])
            cells.append(f"{rate:,.0f} ({vs:.3f} x) [{median(m.cpu for m in t.results[b]):.1f}]")
        print(f"{t.stored:>12,} " + " ".join(f"{c:>32}" for c in cells))
    print(
        f"CPU-bound ceiling on {cores} idle cores (cores / CPU per event), events/s: "
        + "; ".join(
            f"{t.stored:,} stored "
            + ", ".join(
                f"{cores / median(m.cpu for m in t.results[b]) * 1e6:,.0f}" for b in batches
            )
            for t in targets
        )
    )
    empty = next((t for t in targets if t.stored == 0), None)
    for t in targets:
        if empty is None or t is empty:
            continue
        # Each round measured both databases one after the other: ratios within a round.
        parts = []
        for b in batches:
            pairs = list(zip(t.results[b], empty.results[b], strict=True))
            parts.append(
                f"batch {b}: {median(x.rate / e.rate for x, e in pairs):.2f}"
                f" (vs COPY {median(x.vs_copy / e.vs_copy for x, e in pairs):.2f},"
                f" CPU per event {median(e.cpu / x.cpu for x, e in pairs):.2f})"
            )
        print(f"{t.stored:,} stored / empty, median of the rounds' ratios: " + ", ".join(parts))


async def run(args: argparse.Namespace) -> None:
    print(
        f"events per measurement: {args.events:,}; concurrency: {args.concurrency};"
        f" rounds: {args.rounds}"
    )
    async with contextlib.AsyncExitStack() as stacks:
        targets = []
        for stored in args.preload:
            stack = await stacks.enter_async_context(collector_stack(args, ("collector",)))
            postmaster = psutil.Process(stack.postmaster_pid) if stack.postmaster_pid else None
            seconds = await preload(stack.database_url, stored, now() - timedelta(minutes=5))
            print(f"{stored:,} events stored (preloaded in {seconds:.0f} s)")
            targets.append(
                Target(stored, stack, psutil.Process(stack.collector_pids[0]), postmaster)
            )
        # Interleaved: every round measures each batch size on every database in turn, so a
        # machine that slows down or speeds up (it is shared) weighs on all alike.
        print()
        print(HEADER)
        print("-" * len(HEADER))
        seed = 1
        for _ in range(args.rounds):
            for batch_size in args.batch_sizes:
                for target in targets:
                    await measure(args, target, batch_size, seed)
                    seed += 1
        print("others: CPU seconds of the machine's other processes meanwhile")
        report(targets, psutil.cpu_count() or 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events per batch size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--concurrency", type=int, default=8, help="parallel requests")
    parser.add_argument(
        "--preload",
        type=int,
        nargs="+",
        default=[0, 5_000_000],
        metavar="N",
        help="events already stored, one run each (default: 0 and 5 million)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each, interleaved")
    parser.add_argument("--database-url", help="an existing PostgreSQL (admin URL)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
