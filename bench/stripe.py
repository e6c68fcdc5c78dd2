"""Stripe calls per million events, and how long a backlog takes to drain at Stripe's limits.

    python -m bench.stripe [--events 1000000] [--customers 10000] [--transport both]

For each transport (v1 `meter_events`, v2 `meter_event_stream`): a fresh database and a real
collector process with Stripe billing pointed at the Stripe fake (no rate limits, so the run is
as fast as this machine allows); the events, spread evenly over the customers (each mapped by a
`cus_` Kong custom_id) in the current hour, are ingested as one backlog; the sync drains it; the
fake's totals are checked against PostgreSQL's. What is reported comes from the calls the fake
counted: calls per million events, and the time the same calls take at Stripe's test-mode and
live limits (meter events: 25/s in test mode, counted with writes, and 1,000/s live; the stream:
25/s in test mode, 10,000 calls/s live). Stripe's limits bound the drain long before this
machine does, so those are the figures that matter; the measured drain time is beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request
from typing import Any

import asyncpg

from bench.stack import collector_stack
from tests.factories import usage_event
from tests.harness.stripe import (
    CREATE_METER_EVENT,
    CREATE_METER_EVENT_SESSION,
    CREATE_METER_EVENT_STREAM,
    FakeStripe,
    RateLimits,
)

METERS = ("token_meter_input_tokens", "token_meter_output_tokens")
BATCH = 10_000
LIMITS = {  # calls per second, per route kind
    "meter_events": {"test": 25, "live": 1000},
    "meter_event_stream": {"test": 25, "live": 10_000},
}


def post(url: str, path: str, token: str, body: Any = None) -> Any:
    request = urllib.request.Request(  # noqa: S310 - the benchmark's own collector
        url + path,
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310
        return json.loads(response.read())


async def run_one(args: argparse.Namespace, transport: str) -> dict[str, Any]:
    with FakeStripe(limits=RateLimits.unlimited()) as fake:
        for name in METERS:
            fake.create_meter(name)
        for c in range(args.customers):
            fake.add_customer(f"cus_bench{c}")
        args.extra_env = {
            "STRIPE_API_KEY": fake.api_key,
            "STRIPE_API_BASE": fake.url,
            "TOKEN_METER_STRIPE_TRANSPORT": transport,
            "TOKEN_METER_STRIPE_SYNC_INTERVAL": "1",
            "TOKEN_METER_STRIPE_MAX_RATE": "10000",
        }
        async with collector_stack(args, ("bench-stripe",)) as stack:
            url = stack.urls[0]
            started = time.monotonic()
            sent = 0
            while sent < args.events:
                n = min(BATCH, args.events - sent)
                batch = [
                    usage_event(
                        f"e{sent + i}",
                        f"c{(sent + i) % args.customers}",
                        consumer_custom_id=f"cus_bench{(sent + i) % args.customers}",
                    )
                    for i in range(n)
                ]
                await asyncio.to_thread(post, url, "/v1/events", stack.ingest_token, batch)
                sent += n
            ingested = time.monotonic() - started
            conn = await asyncpg.connect(stack.database_url)
            try:
                local = {
                    row["consumer"]: (row["i"], row["o"])
                    for row in await conn.fetch(
                        "SELECT consumer, sum(input_tokens) AS i, sum(output_tokens) AS o "
                        "FROM usage_hourly GROUP BY consumer"
                    )
                }
            finally:
                await conn.close()
            drain_started = time.monotonic()
            while True:
                status = await asyncio.to_thread(post, url, "/v1/stripe/status", stack.admin_token)
                if status["pending_rows"] == 0 and status["last_sent_at"]:
                    totals = fake.totals()  # one pass over the fake's events, not one per customer
                    if all(
                        totals.get((f"cus_bench{c[1:]}", METERS[0])) == i
                        and totals.get((f"cus_bench{c[1:]}", METERS[1])) == o
                        for c, (i, o) in local.items()
                    ):
                        break
                await asyncio.sleep(2)
            drained = time.monotonic() - drain_started
        route = CREATE_METER_EVENT if transport == "meter_events" else CREATE_METER_EVENT_STREAM
        calls = fake.call_count(route)
        sessions = fake.call_count(CREATE_METER_EVENT_SESSION)
        events_to_stripe = len(fake.accepted_events())
        return {
            "transport": transport,
            "events": args.events,
            "customers": args.customers,
            "meter_events_at_stripe": events_to_stripe,
            "calls": calls,
            "session_calls": sessions,
            "calls_per_million_events": round(calls * 1_000_000 / args.events),
            "drain_test_mode_s": round((calls + sessions) / LIMITS[transport]["test"], 1),
            "drain_live_s": round((calls + sessions) / LIMITS[transport]["live"], 2),
            "measured_drain_s": round(drained, 1),
            "ingest_s": round(ingested, 1),
        }


async def run(args: argparse.Namespace) -> None:
    transports = (
        ("meter_events", "meter_event_stream") if args.transport == "both" else (args.transport,)
    )
    results = [await run_one(args, t) for t in transports]
    print(
        f"{'transport':<20} {'events':>9} {'customers':>9} {'calls':>7} {'calls/1M':>9}"
        f" {'drain test':>11} {'drain live':>11} {'measured':>9}"
    )
    for r in results:
        print(
            f"{r['transport']:<20} {r['events']:>9} {r['customers']:>9} {r['calls']:>7}"
            f" {r['calls_per_million_events']:>9} {r['drain_test_mode_s']:>10}s"
            f" {r['drain_live_s']:>10}s {r['measured_drain_s']:>8}s"
        )
    if args.json:
        print(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument(
        "--transport", choices=("meter_events", "meter_event_stream", "both"), default="both"
    )
    parser.add_argument("--database-url", help="an existing PostgreSQL (admin URL)")
    parser.add_argument("--json", action="store_true")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
