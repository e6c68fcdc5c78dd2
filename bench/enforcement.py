"""Enforcement benchmark: from the ingest request that crosses a limit to the new blocklist
version reaching a long-polling client, over many crossings, through real collector processes
on one PostgreSQL (the request goes to collector A; clients long-poll A and B).

Each crossing is a prepaid consumer granted exactly the cost of one event, then sent that
event: its balance reaches zero and the same transaction puts it on the blocklist. Each is then
topped up, and the time until the clients see it leave is measured too.

Baselines, same run: a bare PostgreSQL NOTIFY round trip (LISTEN on one connection, NOTIFY from
another), the floor of any push through PostgreSQL; and an ingest request that crosses nothing.

`--through-plugin` measures the whole path instead: the `token-meter` plugin server, started and
driven by the Kong-side harness (tests/harness/kong.py) with default settings, in front of one
collector. Each crossing is a metered request of a consumer granted exactly its cost; the time
runs from the return of that request's response phase (the plugin has queued its usage) to the
first later request of the consumer that the plugin answers 402, with requests sent every
`--probe-interval` (they carry no usage, so they cost nothing; the time includes shipping with
the coalescing delay, ingest, the blocklist push and the plugin's long poll). The plugin's
shipper is left idle before each crossing, so the crossing event waits the whole coalescing
delay: the worst case. Then a top-up, and the time to the first request let through. Baselines,
same run and interleaved: an HTTP round trip to the collector, the harness's own request times,
and the same crossing posted to the collector directly (the default mode's figure).

    .venv/bin/python -m bench.enforcement                  # 1,000 crossings
    .venv/bin/python -m bench.enforcement --crossings 200 --database-url postgresql://...
    .venv/bin/python -m bench.enforcement --through-plugin # 200 crossings, about 2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg

from bench.stack import Stack, collector_stack
from bench.stats import percentile

# gpt-4o at the built-in book's $2.50 / $10.00 per million: 100 * 2,500 + 20 * 10,000 nano.
EVENT_COST_MICROS = 450


def event(consumer: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "kong://bench/token-meter",
        "type": "ai.usage",
        "subject": consumer,
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "data": {
            "model": "gpt-4o-2024-08-06",
            "provider": "openai",
            "input_tokens": 100,
            "output_tokens": 20,
            "total_tokens": 120,
            "status": 200,
        },
    }


def line(name: str, samples: list[float]) -> str:
    ms = [s * 1000 for s in samples]
    return (
        f"{name:<52} {percentile(ms, 50):>8.2f} {percentile(ms, 99):>8.2f}"
        f" {max(ms):>8.2f} {statistics.fmean(ms):>8.2f}  (n={len(ms)})"
    )


@dataclass
class Poller:
    """A plugin's view: one long poll after another, noting when each consumer appears in or
    leaves the list."""

    base_url: str
    token: str
    seen: dict[str, float] = field(default_factory=dict)
    gone: dict[str, float] = field(default_factory=dict)
    current: set[str] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, session: aiohttp.ClientSession) -> None:
        etag = None
        while True:
            headers = {"Authorization": f"Bearer {self.token}"}
            if etag:
                headers["If-None-Match"] = etag
            async with session.get(
                f"{self.base_url}/v1/blocklist", params={"wait": "30"}, headers=headers
            ) as r:
                if r.status == 304:
                    continue
                body = await r.json()
                now = time.perf_counter()
                etag = r.headers["ETag"]
            names = {e["consumer"] for e in body["entries"]}
            for name in names - self.current:
                self.seen.setdefault(name, now)
            for name in self.current - names:
                self.gone.setdefault(name, now)
            self.current = names
            self.changed.set()

    async def wait(self, check: Callable[[], bool]) -> None:
        async with asyncio.timeout(10.0):  # a lost change fails the run rather than hang it
            while not check():
                self.changed.clear()
                await self.changed.wait()

    async def seen_at(self, consumer: str) -> float:
        """When `consumer` appeared in the list (waiting for it if it has not yet)."""
        await self.wait(lambda: consumer in self.seen)
        return self.seen[consumer]

    async def gone_at(self, consumer: str) -> float:
        """When `consumer` left the list (waiting for it if it has not yet)."""
        await self.wait(lambda: consumer in self.gone)
        return self.gone[consumer]


async def notify_baseline(url: str, rounds: int) -> list[float]:
    listener = await asyncpg.connect(url)
    sender = await asyncpg.connect(url)
    got: asyncio.Queue[float] = asyncio.Queue()
    await listener.add_listener("bench_rtt", lambda *_: got.put_nowait(time.perf_counter()))
    samples = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            await sender.execute("SELECT pg_notify('bench_rtt', '')")
            samples.append(await asyncio.wait_for(got.get(), 5) - started)
    finally:
        await listener.close()
        await sender.close()
    return samples


async def post(
    session: aiohttp.ClientSession, url: str, body: object, headers: dict[str, str]
) -> float:
    """POST `body` as JSON; returns when the request started (perf_counter)."""
    started = time.perf_counter()
    async with session.post(url, data=json.dumps(body), headers=headers) as r:
        await r.read()
        if r.status not in (200, 201):
            raise RuntimeError(f"{url}: {r.status}")
    return started


async def grant(
    session: aiohttp.ClientSession, stack: Stack, consumer: str, micros: int, key: str
) -> float:
    credit = {"amount_micros": micros, "idempotency_key": key}
    return await post(
        session, f"{stack.urls[0]}/v1/consumers/{consumer}/credits", credit, stack.admin
    )


@dataclass
class CollectorCrossing:
    """One crossing through the collector alone, seen by each poller."""

    ack: float
    blocked: list[float]
    unblocked: list[float]


async def collector_crossing(
    session: aiohttp.ClientSession, stack: Stack, consumer: str, pollers: list[Poller]
) -> CollectorCrossing:
    """`consumer`, granted exactly EVENT_COST_MICROS, sends one event through collector A; each
    poller sees the block; then a top-up, and each poller sees the unblock."""
    started = await post(session, f"{stack.urls[0]}/v1/events", [event(consumer)], stack.ingest)
    result = CollectorCrossing(time.perf_counter() - started, [], [])
    for p in pollers:
        result.blocked.append(await p.seen_at(consumer) - started)
    started = await grant(session, stack, consumer, EVENT_COST_MICROS, "top-up")
    for p in pollers:
        result.unblocked.append(await p.gone_at(consumer) - started)
    return result


def print_table(rows: list[tuple[str, list[float]]]) -> None:
    header = f"{'milliseconds':<52} {'p50':>8} {'p99':>8} {'max':>8} {'mean':>8}"
    print(header)
    print("-" * len(header))
    for name, samples in rows:
        print(line(name, samples))


async def run(args: argparse.Namespace) -> None:
    async with collector_stack(args, ("a", "b")) as stack:
        url_a, url_b = stack.urls
        print(f"crossings: {args.crossings}; ingest through collector A, long polls on A and B\n")
        consumers = [f"bench-{i:05d}" for i in range(args.crossings)]
        async with aiohttp.ClientSession() as session:
            for c in consumers:  # setup, not timed
                await grant(session, stack, c, EVENT_COST_MICROS, "seed")
            pollers = [Poller(url_a, stack.ingest_token), Poller(url_b, stack.ingest_token)]
            tasks = [asyncio.create_task(p.run(session)) for p in pollers]
            await asyncio.sleep(0.5)  # both long polls are waiting

            plain_acks = []
            for i in range(args.crossings):  # baseline: an ingest request that crosses nothing
                body = [event(f"postpaid-{i % 50}")]
                started = await post(session, f"{url_a}/v1/events", body, stack.ingest)
                plain_acks.append(time.perf_counter() - started)

            crossings = [await collector_crossing(session, stack, c, pollers) for c in consumers]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        rtt = await notify_baseline(stack.database_url, args.crossings)
    block_a, block_b = ([x.blocked[i] for x in crossings] for i in (0, 1))
    unblock_a, unblock_b = ([x.unblocked[i] for x in crossings] for i in (0, 1))
    print_table(
        [
            ("baseline: bare NOTIFY round trip (PostgreSQL)", rtt),
            ("baseline: ingest request crossing nothing (ack)", plain_acks),
            ("crossing ingest request (ack, block committed)", [x.ack for x in crossings]),
            ("crossing -> long poll on collector A sees block", block_a),
            ("crossing -> long poll on collector B sees block", block_b),
            ("top-up grant -> long poll on A sees unblock", unblock_a),
            ("top-up grant -> long poll on B sees unblock", unblock_b),
        ]
    )
    worst = [max(a, b) for a, b in zip(block_a, block_b, strict=True)]
    p99 = percentile(worst, 99) * 1000
    print(f"\ngoal: p99 under 100 ms; measured p99 (slower of A and B per crossing) {p99:.2f} ms")


# --- through the plugin ------------------------------------------------------------------------


def chat_completion(*, with_usage: bool) -> bytes:
    """The upstream's answer. With usage: the same tokens as event(), so the same cost; without:
    the event is stored as usage_missing and costs nothing."""
    body: dict[str, Any] = {"id": "chatcmpl-bench", "object": "chat.completion", "choices": []}
    if with_usage:
        body["model"] = "gpt-4o-2024-08-06"
        body["usage"] = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
    return json.dumps(body).encode()


@dataclass
class PluginProber:
    """Requests of one consumer through the plugin server (Kong-side harness), one after
    another, `interval` apart; runs in a worker thread (the harness is synchronous)."""

    harness: Any
    config: dict[str, Any]
    interval: float
    passed: list[float] = field(default_factory=list)  # durations of requests let through
    refused: list[float] = field(default_factory=list)  # durations of requests answered 402

    def request(self, consumer: str, *, metered: bool) -> bool:
        """One request; True if answered 402 by the plugin, False if let through."""
        from tests.harness.kong import ScriptedRequest

        scripted = ScriptedRequest(
            headers={"content-type": "text/plain"},  # not JSON: no stream-usage injection
            consumer={"id": consumer, "username": consumer},
            upstream_body=chat_completion(with_usage=metered),
        )
        started = time.perf_counter()
        outcome = self.harness.request(scripted, self.config)
        took = time.perf_counter() - started
        if outcome.exit_status is None:
            self.passed.append(took)
            return False
        if outcome.exit_status != 402 or outcome.upstream_called:
            raise RuntimeError(f"{consumer}: unexpected outcome {outcome.exit_status}")
        self.refused.append(took)
        return True

    def until(self, consumer: str, *, blocked: bool) -> float:
        """Probes (usage-free requests) until one is blocked (or let through); when its answer
        came (perf_counter)."""
        deadline = time.perf_counter() + 10.0  # a lost change fails the run rather than hang it
        while True:
            if self.request(consumer, metered=False) == blocked:
                return time.perf_counter()
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{consumer}: never {'blocked' if blocked else 'let through'}")
            time.sleep(self.interval)

    def cross(self, consumer: str) -> tuple[float, float]:
        """The crossing request (metered, let through), then probes until the first 402: when
        the crossing request's response phase returned, and when the 402 came."""
        if self.request(consumer, metered=True):
            raise RuntimeError(f"{consumer}: blocked before crossing")
        crossed = time.perf_counter()
        return crossed, self.until(consumer, blocked=True)


async def http_baseline(session: aiohttp.ClientSession, url: str, rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        async with session.get(f"{url}/healthz") as r:
            await r.read()
        samples.append(time.perf_counter() - started)
    return samples


async def run_through_plugin(args: argparse.Namespace) -> None:
    from tests.harness.kong import KongHarness
    from tests.harness.paths import VENV_BIN
    from token_meter_plugin.config import TOKEN_METER, PluginConfig

    async with collector_stack(args, ("a",)) as stack:
        (url,) = stack.urls
        # The two required fields, nothing else tuned; a spool of this run's own (the default
        # directory is shared by every plugin server of the machine, which replays what it finds).
        config = {
            "collector_url": url,
            "collector_token": stack.ingest_token,
            "spool_dir": str(stack.tmp / "spool"),
        }
        defaults = PluginConfig.from_kong(TOKEN_METER, config)
        quiet = defaults.max_coalescing_delay + 0.05
        print(
            f"crossings: {args.crossings}; token-meter plugin server behind the Kong-side harness,"
            f" default settings (max_coalescing_delay {defaults.max_coalescing_delay} s,"
            f" max_batch_size {defaults.max_batch_size}, blocklist_max_stale"
            f" {defaults.blocklist_max_stale} s); probe every {args.probe_interval * 1000:g} ms;"
            f" {quiet:.2f} s quiet before each crossing\n"
        )
        harness = KongHarness([str(VENV_BIN / "token-meter-plugin")], stack.tmp / "kong")
        await asyncio.to_thread(harness.start)
        prober = PluginProber(harness, config, args.probe_interval)
        plugin_consumers = [f"plugin-{i:05d}" for i in range(args.crossings)]
        direct_consumers = [f"direct-{i:05d}" for i in range(args.crossings)]
        try:
            async with aiohttp.ClientSession() as session:
                for c in plugin_consumers + direct_consumers:  # setup, not timed
                    await grant(session, stack, c, EVENT_COST_MICROS, "seed")
                poller = Poller(url, stack.ingest_token)
                task = asyncio.create_task(poller.run(session))
                rtt = await http_baseline(session, url, args.crossings)
                # The plugin server's first request starts its blocklist poll and shipper.
                await asyncio.to_thread(prober.request, "warm-up", metered=True)
                await asyncio.sleep(0.5)

                direct: list[CollectorCrossing] = []
                to_collector, to_402, to_pass = [], [], []
                for plugin_c, direct_c in zip(plugin_consumers, direct_consumers, strict=True):
                    # Baseline, interleaved: the same crossing posted to the collector directly.
                    direct.append(await collector_crossing(session, stack, direct_c, [poller]))
                    # Nothing pending in the plugin's shipper: the crossing event opens a batch
                    # and waits the whole coalescing delay (the worst case).
                    await asyncio.sleep(quiet)
                    crossed, refused = await asyncio.to_thread(prober.cross, plugin_c)
                    to_collector.append(await poller.seen_at(plugin_c) - crossed)
                    to_402.append(refused - crossed)
                    started = await grant(session, stack, plugin_c, EVENT_COST_MICROS, "top-up")
                    passed = await asyncio.to_thread(prober.until, plugin_c, blocked=False)
                    to_pass.append(passed - started)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                wrong = await check_balances(session, stack, plugin_consumers)
        finally:
            await asyncio.to_thread(harness.stop)
    print_table(
        [
            ("baseline: HTTP round trip to the collector (healthz)", rtt),
            ("baseline: request through the plugin, let through", prober.passed),
            ("baseline: request through the plugin, answered 402", prober.refused),
            (
                "collector only: crossing ingest -> long poll sees it",
                [x.blocked[0] for x in direct],
            ),
            ("plugin: crossing -> collector's long poll sees block", to_collector),
            ("plugin: crossing -> first request answered 402", to_402),
            ("plugin: top-up grant -> first request let through", to_pass),
        ]
    )
    p99 = percentile(to_402, 99) * 1000
    print(f"\ngoal: p99 under 1 s; measured p99 (crossing -> first 402) {p99:.0f} ms")
    if wrong:
        print(f"ERROR: {wrong} consumers' balances differ from the expected {EVENT_COST_MICROS}")
        raise SystemExit(1)


async def check_balances(session: aiohttp.ClientSession, stack: Stack, consumers: list[str]) -> int:
    """Each consumer was granted one event's cost, spent it with the crossing request, and got
    it back with the top-up (the probes carried no usage): its balance is one event's cost."""
    wrong = 0
    for c in consumers:
        headers = {"Authorization": f"Bearer {stack.admin_token}"}
        async with session.get(f"{stack.urls[0]}/v1/consumers/{c}/usage", headers=headers) as r:
            body = await r.json()
        wrong += body["balance_micros"] != EVENT_COST_MICROS
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crossings", type=int, help="default 1000, or 200 with --through-plugin")
    parser.add_argument("--database-url", help="an existing PostgreSQL (admin URL)")
    parser.add_argument(
        "--through-plugin",
        action="store_true",
        help="measure from the crossing request through the token-meter plugin server to the "
        "first request it answers 402",
    )
    parser.add_argument(
        "--probe-interval",
        type=float,
        default=0.005,
        help="seconds between requests while waiting for the block (--through-plugin)",
    )
    args = parser.parse_args()
    if args.through_plugin:
        args.crossings = args.crossings or 200
        asyncio.run(run_through_plugin(args))
    else:
        args.crossings = args.crossings or 1000
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
