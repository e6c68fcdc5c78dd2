"""Ingest benchmark: events per second into PostgreSQL through the real collector process,
with dedupe and durable commits (fsync and synchronous_commit on), at several batch sizes, and
where the CPU goes (collector, PostgreSQL, load generator), on an empty database and on one
that already holds history.

History (`--preload N`): N events spread evenly over the 30 days before the run, written
straight into the tables by SQL on the server (events, their dedupe keys, the hourly rollup and
the month totals, as ingest and the maintenance would have left them; no HTTP), then VACUUM
ANALYZE and a checkpoint, the same as on the empty database. Each preload gets a fresh database
and collector. The events sent arrive as a gateway's do: times rising with the sequence, a few
seconds of jitter, 500 consumers and 6 models.

Baseline, same run, same machine: PostgreSQL alone taking the same rows by COPY into a plain
table (no HTTP, no validation, no dedupe, no rollups), so the figures read as ratios; the
machine is shared, so compare ratios rather than absolute rates between runs.

    make bench-ingest                      # 0 and 5 million stored, a few minutes
    .venv/bin/python -m bench.ingest --preload 0 1000000 --events 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import psutil

from bench.stack import collector_stack

MODELS = [
    ("openai", "gpt-4o-2024-08-06"),
    ("openai", "gpt-4o-mini"),
    ("openai", "gpt-4.1"),
    ("openai", "o3-mini"),
    ("anthropic", "claude-sonnet-4-20250514"),
    ("anthropic", "claude-3-5-haiku-20241022"),
]
CONSUMERS = 500
HISTORY = timedelta(days=30)
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


_PROVIDERS = ", ".join(f"'{p}'" for p, _ in MODELS)
_MODEL_NAMES = ", ".join(f"'{m}'" for _, m in MODELS)
# $1 events, evenly over [$2, $3); the rows look like make_events' (same consumers, models and
# sizes). Keys by the collector's own digest (token_meter_event_key, migration 0006).
PRELOAD_EVENTS = f"""
INSERT INTO usage_events (time, source, id, consumer, consumer_id, consumer_username, route_name,
    service_name, provider, model, status, streamed, input_tokens, output_tokens,
    cached_input_tokens, cache_write_input_tokens, reasoning_tokens, total_tokens, latency_ms,
    usage_missing, cost_nanos, price_book_version)
SELECT $2::timestamptz + ($3::timestamptz - $2::timestamptz) * (g::float8 / $1::bigint),
       'kong://dp-' || (g % 4) || '/token-meter', 'preload-' || g,
       'customer-' || lpad((g * 7919 % {CONSUMERS})::text, 4, '0'), md5(g::text),
       'customer-' || lpad((g * 7919 % {CONSUMERS})::text, 4, '0'), 'chat',
       m.provider, m.provider, m.model, 200, g % 5 < 2,
       t.input, t.output, 0, 0, 0, t.input + t.output, 1234.5, false,
       t.input * 2500 + t.output * 10000, 'preload'
FROM generate_series(0, $1::bigint - 1) AS g
CROSS JOIN LATERAL (SELECT 20 + (g * 2654435761 % 7980) AS input,
                           1 + (g * 40503 % 1999) AS output) AS t
CROSS JOIN LATERAL (SELECT (ARRAY[{_PROVIDERS}])[1 + g % 6] AS provider,
                           (ARRAY[{_MODEL_NAMES}])[1 + g % 6] AS model) AS m
"""
PRELOAD_ROLLUPS = """
INSERT INTO dedupe_keys (time, key)
SELECT time, token_meter_event_key(source, id) FROM usage_events;
INSERT INTO consumers (consumer) SELECT DISTINCT consumer FROM usage_events ON CONFLICT DO NOTHING;
INSERT INTO usage_hourly (consumer, model, hour, events, usage_missing_events, input_tokens,
    output_tokens, cached_input_tokens, cache_write_input_tokens, reasoning_tokens, total_tokens,
    cost_nanos)
SELECT consumer, model, date_trunc('hour', time), count(*), 0, sum(input_tokens),
       sum(output_tokens), 0, 0, 0, sum(total_tokens), sum(cost_nanos)
FROM usage_events GROUP BY 1, 2, 3;
INSERT INTO usage_monthly_closed (consumer, model, month, events, usage_missing_events,
    input_tokens, output_tokens, cached_input_tokens, cache_write_input_tokens, reasoning_tokens,
    total_tokens, cost_nanos)
SELECT consumer, model, date_trunc('month', hour), sum(events), 0, sum(input_tokens),
       sum(output_tokens), 0, 0, 0, sum(total_tokens), sum(cost_nanos)
FROM usage_hourly WHERE hour < (SELECT closed_through FROM usage_rollup_state) GROUP BY 1, 2, 3;
"""


async def preload(url: str, count: int, until: datetime) -> float:
    """Store `count` events over the HISTORY before `until`; returns the seconds it took."""
    started = time.perf_counter()
    conn = await asyncpg.connect(url, server_settings={"timezone": "UTC"})
    try:
        if count:
            first, last = (until - HISTORY).date(), until.date()
            await conn.execute("SELECT token_meter_ensure_key_partitions($1, $2)", first, last)
            await conn.execute(PRELOAD_EVENTS, count, until - HISTORY, until)
            await conn.execute(PRELOAD_ROLLUPS)
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return time.perf_counter() - started


@dataclass
class CpuSample:
    collector: float
    postgres: float
    generator: float


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
    return CpuSample(
        collector=cpu_seconds(collector),
        postgres=postgres_cpu(postmaster) if postmaster else float("nan"),
        generator=cpu_seconds(psutil.Process()),
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
class Run:
    """One preload's figures: events/s per batch size and the same run's bare COPY."""

    preload: int
    rates: dict[int, float]
    baseline: float


async def measure(args: argparse.Namespace, stored: int) -> Run:
    async with collector_stack(args, ("collector",)) as stack:
        url = stack.database_url
        postmaster = psutil.Process(stack.postmaster_pid) if stack.postmaster_pid else None
        proc = psutil.Process(stack.collector_pids[0])
        now = datetime.now(UTC)
        seconds = await preload(url, stored, now - timedelta(minutes=5))
        print(f"\n== {stored:,} events stored (preloaded in {seconds:.0f} s) ==")
        header = (
            f"{'batch':>6} {'events/s':>10} {'seconds':>8}  "
            f"{'cpu collector':>14} {'cpu postgres':>13} {'cpu loadgen':>12} {'pg µs/event':>12}"
        )
        print(header)
        print("-" * len(header))
        rates = {}
        for seed, batch_size in enumerate(args.batch_sizes):
            events = make_events(args.events, seed + 1, datetime.now(UTC) - timedelta(seconds=10))
            bodies = [
                json.dumps(events[i : i + batch_size]).encode()
                for i in range(0, len(events), batch_size)
            ]
            before = sample(proc, postmaster)
            started = time.perf_counter()
            accepted = await send_all(
                f"{stack.urls[0]}/v1/events", stack.ingest_token, bodies, args.concurrency
            )
            elapsed = time.perf_counter() - started
            after = sample(proc, postmaster)
            assert accepted == len(events), (accepted, len(events))
            rates[batch_size] = rate = accepted / elapsed
            c = after.collector - before.collector
            p = after.postgres - before.postgres
            g = after.generator - before.generator
            total = c + p + g
            print(
                f"{batch_size:>6} {rate:>10,.0f} {elapsed:>8.2f}  "
                f"{c:>7.2f}s {c / total:>5.0%} {p:>6.2f}s {p / total:>5.0%} "
                f"{g:>5.2f}s {g / total:>5.0%} {p / accepted * 1e6:>12.1f}"
            )
        baseline = await copy_baseline(url, make_events(args.events, 99, now))
        print(f"baseline, bare COPY of the same rows (batches of 5000): {baseline:,.0f} rows/s")
        return Run(stored, rates, baseline)


def report(runs: list[Run]) -> None:
    print("\n== summary: events/s (x bare COPY of the same run) ==")
    print(f"{'stored':>12} " + " ".join(f"{'batch ' + str(b):>22}" for b in runs[0].rates))
    for run in runs:
        cells = [f"{rate:>9,.0f} ({rate / run.baseline:.3f} x)" for rate in run.rates.values()]
        print(f"{run.preload:>12,} " + " ".join(f"{c:>22}" for c in cells))
    empty = next((r for r in runs if r.preload == 0), None)
    if empty is None:
        return
    for run in runs:
        if run is empty:
            continue
        ratios = ", ".join(
            f"batch {b}: {run.rates[b] / empty.rates[b]:.2f}"
            f" ({(run.rates[b] / run.baseline) / (empty.rates[b] / empty.baseline):.2f} vs COPY)"
            for b in run.rates
        )
        print(f"{run.preload:,} stored / empty: {ratios}")


async def run(args: argparse.Namespace) -> None:
    print(f"events per batch size: {args.events:,}; concurrency: {args.concurrency}")
    runs = [await measure(args, stored) for stored in args.preload]
    report(runs)


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
    parser.add_argument("--database-url", help="an existing PostgreSQL (admin URL)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
