"""Ingest benchmark: events per second into PostgreSQL through the real collector process,
with dedupe and durable commits (fsync and synchronous_commit on), at several batch sizes, and
where the CPU goes (collector, PostgreSQL, load generator).

Baseline, same run, same machine: PostgreSQL alone taking the same rows by COPY into a plain
table (no HTTP, no validation, no dedupe, no rollups), so the figure reads as a ratio.

    make bench-ingest                      # or: .venv/bin/python -m bench.ingest --events 200000
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


def make_events(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    base = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    events = []
    for _ in range(count):
        provider, model = rng.choice(MODELS)
        consumer = f"customer-{rng.randrange(500):04d}"
        input_tokens = rng.randrange(20, 8000)
        cached = rng.randrange(0, input_tokens // 2) if rng.random() < 0.3 else 0
        output_tokens = rng.randrange(1, 2000)
        reasoning = rng.randrange(0, output_tokens) if model.startswith("o") else 0
        when = base + timedelta(seconds=rng.randrange(0, 3000))
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


async def run(args: argparse.Namespace) -> None:
    async with collector_stack(args, ("collector",)) as stack:
        url = stack.database_url
        postmaster = psutil.Process(stack.postmaster_pid) if stack.postmaster_pid else None
        ingest_token = stack.ingest_token
        print(f"events per run: {args.events}; concurrency: {args.concurrency}\n")
        ingest_url = f"{stack.urls[0]}/v1/events"
        proc = psutil.Process(stack.collector_pids[0])
        header = (
            f"{'batch':>6} {'events/s':>10} {'seconds':>8}  "
            f"{'cpu collector':>14} {'cpu postgres':>13} {'cpu loadgen':>12}"
        )
        print(header)
        print("-" * len(header))
        results = {}
        for seed, batch_size in enumerate(args.batch_sizes):
            events = make_events(args.events, seed=seed + 1)
            bodies = [
                json.dumps(events[i : i + batch_size]).encode()
                for i in range(0, len(events), batch_size)
            ]
            before = sample(proc, postmaster)
            started = time.perf_counter()
            accepted = await send_all(ingest_url, ingest_token, bodies, args.concurrency)
            elapsed = time.perf_counter() - started
            after = sample(proc, postmaster)
            assert accepted == len(events), (accepted, len(events))
            rate = accepted / elapsed
            results[batch_size] = rate
            c = after.collector - before.collector
            p = after.postgres - before.postgres
            g = after.generator - before.generator
            total = c + p + g
            print(
                f"{batch_size:>6} {rate:>10,.0f} {elapsed:>8.2f}  "
                f"{c:>7.2f}s {c / total:>5.0%} {p:>6.2f}s {p / total:>5.0%} "
                f"{g:>5.2f}s {g / total:>5.0%}"
            )
        baseline = await copy_baseline(url, make_events(args.events, seed=99))
        print(f"\nbaseline, bare COPY of the same rows (batches of 5000): {baseline:,.0f} rows/s")
        for batch_size, rate in results.items():
            print(f"  batch {batch_size:>5}: collector ingest = {rate / baseline:.2f} x bare COPY")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events per batch size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--concurrency", type=int, default=8, help="parallel requests")
    parser.add_argument("--database-url", help="an existing PostgreSQL (admin URL)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
