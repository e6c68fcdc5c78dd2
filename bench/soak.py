"""Load and soak benchmark: sustained metered traffic through the token-meter plugin server into
the real collector on PostgreSQL, sampling every process's memory, descriptors and threads.

    make bench-soak                                   # 30 minutes
    .venv/bin/python -m bench.soak --minutes 2 --sample-seconds 5

The stack is bench/stack.py's: the embedded PostgreSQL (fsync and synchronous_commit on) and
one real collector process. The plugin server is the real `token-meter-plugin` (its supervisor
and serving process), started and driven by the Kong-side harness (tests/harness/kong.py) with
`--workers` Kong workers, each with its pool of connections, and `--senders` client threads
spread over them, for `--minutes`. The requests are OpenAI chat completions of a mix of
consumers, body sizes (one over nginx's client_body_buffer_size) and answers: JSON, gzipped
JSON and SSE streams that did not ask for usage (the plugin injects `include_usage`), each
answer made once at the start by the demo upstream (tests/harness/openai_upstream.py).

Every `--sample-seconds`: RSS, open descriptors (/proc/PID/fd) and threads of the collector,
the plugin server (supervisor and serving process, summed) and PostgreSQL (postmaster and every
backend, summed: RSS counts the shared buffers each backend has touched), with the requests/s
sent over the interval and the events/s the collector stored (its /metrics). The table is
printed as the samples come. At the end, once the plugin has shipped everything: every request
must be stored exactly once (per consumer, events and tokens in PostgreSQL against what was
sent), then the boundedness verdict (bench/soak_report.py) and the files in `--out`: soak.csv,
soak.json, soak.png and soak.md. Exits 1 when a request failed or a count differs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gzip
import itertools
import json
import os
import platform
import random
import re
import shlex
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil

from bench.soak_report import (
    ProcessSample,
    Sample,
    markdown_table,
    plot,
    table_rows,
    verdict_lines,
    write_csv,
    write_json,
)
from bench.stack import Stack, collector_stack

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "soak"
ACCEPTED = re.compile(r'^token_meter_events_total\{outcome="(\w+)"\} (\S+)$', re.M)


@dataclass(frozen=True)
class Variant:
    """One kind of request and the upstream's answer to it."""

    name: str
    weight: int
    request_body: bytes
    upstream_headers: dict[str, str]
    upstream_body: bytes
    total_tokens: int


# (name, weight, request size, stream, gzip): 60 % JSON answers, 40 % streams; 12 KiB is over
# client_body_buffer_size, so Kong hands that body over from its temp file.
MIX = (
    ("json-1k", 25, 1024, False, False),
    ("json-4k", 15, 4096, False, False),
    ("json-gzip-4k", 10, 4096, False, True),
    ("json-12k", 10, 12 * 1024, False, False),
    ("sse-1k", 20, 1024, True, False),
    ("sse-4k", 15, 4096, True, False),
    ("sse-12k", 5, 12 * 1024, True, False),
)


async def build_variants() -> list[Variant]:
    """The demo upstream's answer to each request of MIX (a stream with include_usage, as the
    plugin asks for it)."""
    from aiohttp.test_utils import TestClient, TestServer

    from tests.factories import chat_request_body
    from tests.harness.openai_upstream import create_app

    variants = []
    async with TestClient(TestServer(create_app())) as client:
        for name, weight, size, stream, compressed in MIX:
            body = chat_request_body(size, stream=stream)
            upstream_request = json.loads(body)
            upstream_request.pop("stream")
            headers = {"Authorization": "Bearer soak"}
            async with client.post(
                "/v1/chat/completions", json=upstream_request, headers=headers
            ) as r:
                tokens = (await r.json())["usage"]["total_tokens"]
            upstream_headers = {"content-type": "application/json"}
            if stream:
                upstream_request |= {"stream": True, "stream_options": {"include_usage": True}}
                upstream_headers = {"content-type": "text/event-stream"}
            async with client.post(
                "/v1/chat/completions", json=upstream_request, headers=headers
            ) as r:
                answer = await r.read()
            if compressed:
                answer = gzip.compress(answer, 6)
                upstream_headers["content-encoding"] = "gzip"
            variants.append(Variant(name, weight, body, upstream_headers, answer, tokens))
    return variants


def kong_consumers(count: int) -> list[dict[str, Any]]:
    return [
        {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"soak-{i}")),
            "username": f"soak-{i:03d}",
            "custom_id": f"cus_soak_{i:03d}",
            "created_at": 1700000000,
        }
        for i in range(count)
    ]


@dataclass
class Tally:
    """What the senders did, per consumer; shared by the sender threads."""

    sent: int = 0
    failed: int = 0
    events: collections.Counter[str] = field(default_factory=collections.Counter)
    tokens: collections.Counter[str] = field(default_factory=collections.Counter)
    by_variant: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def metered(self) -> int:
        return self.sent - self.failed


@dataclass
class Traffic:
    """The sender threads: each sends through one Kong worker, one request after another."""

    harness: Any
    config: dict[str, Any]
    variants: list[Variant]
    consumers: list[dict[str, Any]]
    interval: float  # seconds between one sender's requests; 0: as fast as it can
    tally: Tally = field(default_factory=Tally)
    stop: threading.Event = field(default_factory=threading.Event)

    def send_one(self, rng: random.Random, worker: int) -> None:
        from tests.harness.kong import ScriptedRequest

        variant = rng.choices(self.variants, [v.weight for v in self.variants])[0]
        consumer = rng.choice(self.consumers)
        request = ScriptedRequest(
            body=variant.request_body,
            consumer=consumer,
            upstream_headers=variant.upstream_headers,
            upstream_body=variant.upstream_body,
        )
        try:
            outcome = self.harness.request(request, self.config, worker=worker)
            ok = outcome.status == 200 and outcome.phases == {"access": "ret", "response": "ret"}
            problem = f"{outcome.status} {outcome.phases} {outcome.error_log[-1:]}"
        except Exception as exc:  # one failed request is counted, the soak goes on
            ok, problem = False, repr(exc)
        with self.tally.lock:
            self.tally.sent += 1
            self.tally.by_variant[variant.name] += 1
            if ok:
                self.tally.events[consumer["username"]] += 1
                self.tally.tokens[consumer["username"]] += variant.total_tokens
            else:
                self.tally.failed += 1
                if len(self.tally.failures) < 5:
                    self.tally.failures.append(f"{variant.name}: {problem}")

    def sender(self, index: int, worker: int) -> None:
        rng = random.Random(index)
        due = time.monotonic()
        while not self.stop.is_set():
            self.send_one(rng, worker)
            if self.interval:
                due += self.interval
                self.stop.wait(max(0.0, due - time.monotonic()))

    def start(self, senders: int, workers: int) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self.sender, args=(i, i % workers), name=f"sender-{i}")
            for i in range(senders)
        ]
        for thread in threads:
            thread.start()
        return threads


def measure(pid: int, *, children: bool) -> tuple[ProcessSample, set[int]] | None:
    """RSS, fds and threads of `pid` (with its descendants, summed); and the pids counted."""
    try:
        root = psutil.Process(pid)
        procs = [root, *(root.children(recursive=True) if children else [])]
    except psutil.NoSuchProcess:
        return None
    rss = fds = threads = private = 0
    pids = set()
    for proc in procs:
        try:
            with proc.oneshot():
                rss += proc.memory_info().rss
                fds += proc.num_fds()
                threads += proc.num_threads()
            private += rss_anon(proc.pid)
            pids.add(proc.pid)
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):  # just exited
            continue
    return ProcessSample(rss, fds, threads, len(pids), private), pids


def rss_anon(pid: int) -> int:
    """RssAnon of /proc/PID/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


async def stored_events(session: aiohttp.ClientSession, stack: Stack) -> dict[str, float]:
    """The collector's token_meter_events_total by outcome."""
    async with session.get(f"{stack.urls[0]}/metrics", headers=stack.admin) as r:
        text = await r.text()
    return {outcome: float(value) for outcome, value in ACCEPTED.findall(text)}


@dataclass
class Sampler:
    stack: Stack
    harness: Any
    tally: Tally
    session: aiohttp.ClientSession
    samples: list[Sample] = field(default_factory=list)
    serving_pids: list[set[int]] = field(default_factory=list)  # plugin server's, per sample
    started: float = 0.0

    async def take(self) -> Sample:
        now = time.monotonic()
        stored = int((await stored_events(self.session, self.stack)).get("accepted", 0))
        requests = self.tally.sent
        processes = {}
        groups = [
            ("collector", self.stack.collector_pids[0], False),
            ("plugin", self.harness.pid, True),
        ]
        if self.stack.postmaster_pid is not None:
            groups.append(("postgres", self.stack.postmaster_pid, True))
        for name, pid, children in groups:
            measured = measure(pid, children=children)
            if measured is None:
                continue
            processes[name], pids = measured
            if name == "plugin":
                self.serving_pids.append(pids)
        elapsed = now - self.started if self.samples else 0.0
        if self.samples:
            last = self.samples[-1]
            dt = max(elapsed - last.elapsed, 1e-9)
            rates = ((requests - last.requests) / dt, (stored - last.stored) / dt)
        else:
            rates = (0.0, 0.0)
        sample = Sample(elapsed, requests, stored, *rates, processes=processes)
        self.samples.append(sample)
        return sample

    @property
    def plugin_restarts(self) -> int:
        return sum(1 for a, b in itertools.pairwise(self.serving_pids) if a != b)


def print_row(sample: Sample, *, header: bool) -> None:
    head, (row,) = table_rows([sample])
    widths = [max(len(h), 7) for h in head]
    if header:
        line = "  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))
        print(line)
        print("-" * len(line))
    print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)), flush=True)


async def wait_stored(
    session: aiohttp.ClientSession, stack: Stack, count: int, seconds: float
) -> float | None:
    """Seconds until the collector has stored `count` events; None if it did not in `seconds`."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if (await stored_events(session, stack)).get("accepted", 0) >= count:
            return time.monotonic() - started
        await asyncio.sleep(0.25)
    return None


async def check_stored(stack: Stack, tally: Tally) -> list[str]:
    """Every metered request stored exactly once: per consumer, events and tokens."""
    conn = await asyncpg.connect(stack.database_url)
    try:
        rows = await conn.fetch(
            "SELECT consumer, count(*) AS events, sum(total_tokens) AS tokens"
            " FROM usage_events GROUP BY consumer"
        )
        total, distinct = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT (source, id)) FROM usage_events"
        )
    finally:
        await conn.close()
    problems = []
    if total != tally.metered:
        problems.append(f"{total} events stored for {tally.metered} metered requests")
    if distinct != total:
        problems.append(f"{total - distinct} events stored twice")
    stored = {r["consumer"]: (r["events"], r["tokens"]) for r in rows}
    for consumer in sorted(set(stored) | set(tally.events)):
        sent = (tally.events[consumer], tally.tokens[consumer])
        if stored.get(consumer, (0, 0)) != sent:
            problems.append(
                f"{consumer}: stored (events, tokens) {stored.get(consumer)}, sent {sent}"
            )
    return problems


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


async def run(args: argparse.Namespace) -> int:
    from tests.harness.kong import KongHarness
    from tests.harness.paths import VENV_BIN

    command = shlex.join([".venv/bin/python", "-m", "bench.soak", *sys.argv[1:]])
    started_at = datetime.now(UTC)
    seconds = args.minutes * 60
    variants = await build_variants()
    async with collector_stack(args, ("collector",)) as stack:
        tmp = stack.tmp
        config = {
            "collector_url": stack.urls[0],
            "collector_token": stack.ingest_token,
            "spool_dir": str(tmp / "spool"),  # this run's own (the default is the machine's)
        }
        harness = KongHarness(
            [str(VENV_BIN / "token-meter-plugin")],
            tmp / "kong",
            extra_args=["-g"] if args.gevent else [],
            workers=args.workers,
        )
        await asyncio.to_thread(harness.start)
        interval = args.senders / args.rate if args.rate else 0.0
        traffic = Traffic(harness, config, variants, kong_consumers(args.consumers), interval)
        try:
            async with aiohttp.ClientSession() as session:
                conn = await asyncpg.connect(stack.database_url)
                shared_buffers = await conn.fetchval("SHOW shared_buffers")
                await conn.close()
                # Warm: every worker's instance, the server's journal, shipper and blocklist poll.
                rng = random.Random(-1)
                for worker in range(args.workers):
                    await asyncio.to_thread(traffic.send_one, rng, worker)
                await wait_stored(session, stack, traffic.tally.metered, 30)
                print(
                    f"{args.minutes:g} min: {args.workers} Kong workers, {args.senders} senders,"
                    f" {args.consumers} consumers, rate "
                    f"{f'{args.rate:g} req/s' if args.rate else 'as fast as they go'};"
                    f" sample every {args.sample_seconds:g} s\n"
                )
                sampler = Sampler(stack, harness, traffic.tally, session)
                print_row(await sampler.take(), header=True)
                sampler.started = time.monotonic()
                threads = traffic.start(args.senders, args.workers)
                try:
                    deadline = sampler.started + seconds
                    due = sampler.started
                    while (now := time.monotonic()) < deadline:
                        due = min(due + args.sample_seconds, deadline)
                        await asyncio.sleep(max(0.0, due - now))
                        print_row(await sampler.take(), header=False)
                finally:
                    traffic.stop.set()
                    for thread in threads:
                        await asyncio.to_thread(thread.join)
                drain = await wait_stored(session, stack, traffic.tally.metered, args.drain_seconds)
                outcomes = await stored_events(session, stack)
            problems = await check_stored(stack, traffic.tally)
        finally:
            await asyncio.to_thread(harness.stop)
    tally = traffic.tally
    samples = sampler.samples
    if tally.failed:
        problems.insert(0, f"{tally.failed} requests failed, e.g. {tally.failures}")
    if sampler.plugin_restarts:
        problems.append(f"the plugin server's processes changed {sampler.plugin_restarts} times")
    loaded = samples[-1].elapsed or 1.0
    mix = ", ".join(f"{v.name} {tally.by_variant[v.name]:,}" for v in variants)
    facts = [
        ("command", f"`{command}`"),
        ("date", started_at.strftime("%Y-%m-%d %H:%M UTC")),
        ("machine", f"{os.cpu_count()} cores ({cpu_model()}), shared with other work"),
        (
            "run length",
            f"{loaded / 60:.1f} min of traffic, a sample every {args.sample_seconds:g} s",
        ),
        (
            "load",
            f"{args.workers} Kong workers, {args.senders} sender threads, {args.consumers}"
            f" consumers, {'-g (gevent)' if args.gevent else 'threading'} plugin server",
        ),
        ("requests", f"{tally.sent:,} ({tally.sent / loaded:,.0f}/s on average): {mix}"),
        (
            "stored",
            f"{int(outcomes.get('accepted', 0)):,} events, {int(outcomes.get('duplicate', 0)):,}"
            f" duplicates absorbed; "
            + (
                f"drained {drain:.1f} s after the traffic stopped"
                if drain is not None
                else f"NOT drained within {args.drain_seconds:g} s"
            ),
        ),
        ("exactly once", "yes" if not problems else "NO: " + "; ".join(problems)),
        ("PostgreSQL", f"shared_buffers {shared_buffers} (its RSS sums every process's)"),
    ]
    verdict = verdict_lines(samples)
    print()
    for name, value in facts[4:]:
        print(f"{name}: {value.strip('`')}")
    print()
    for line in verdict:
        print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {name: value.strip("`") for name, value in facts}
    write_csv(args.out / "soak.csv", samples)
    write_json(args.out / "soak.json", meta, samples)
    title = (
        f"token-meter soak: {loaded / 60:.1f} min, {os.cpu_count()} cores ({started_at:%Y-%m-%d})"
    )
    plot(args.out / "soak.png", samples, title)
    lines = [f"# {title}", ""]
    lines += [f"- {name}: {value}" for name, value in facts]
    lines += ["", "## Verdict", "", *(f"- {line}" for line in verdict)]
    lines += ["", "![throughput, memory and descriptors over time](soak.png)", ""]
    lines += ["## Samples", "", markdown_table(samples), ""]
    (args.out / "soak.md").write_text("\n".join(lines))
    written = (args.out / name for name in ("soak.md", "soak.png", "soak.csv", "soak.json"))
    print(f"\nwritten: {', '.join(map(str, written))}")
    if problems:
        print(f"logs kept in {tmp}")
        return 1
    shutil.rmtree(tmp, ignore_errors=True)  # the logs, the spool, the harness's socket
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30, help="traffic for this long")
    parser.add_argument("--sample-seconds", type=float, default=10, help="seconds between samples")
    parser.add_argument("--workers", type=int, default=4, help="Kong workers (each its own pool)")
    parser.add_argument("--senders", type=int, default=8, help="client threads over the workers")
    parser.add_argument("--consumers", type=int, default=50, help="distinct Kong consumers")
    parser.add_argument(
        "--rate", type=float, default=0, help="requests/s in all (default: as fast as they go)"
    )
    parser.add_argument("-g", "--gevent", action="store_true", help="serve with -g")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the report")
    parser.add_argument(
        "--drain-seconds", type=float, default=120, help="how long shipping may take at the end"
    )
    parser.add_argument("--database-url", help="an existing PostgreSQL (admin URL)")
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
