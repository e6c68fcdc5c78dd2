"""Ingest stays exact however events arrive (migration 0006: time-led dedupe keys, months
derived from hours): across batches and group commits, with racing duplicates, around the fold
of closed hours, and across restarts. Every total is checked three ways: the raw events, the
rollups (hourly and the derived monthly view) and the usage API."""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.collector.accounts_api import put_consumer
from tests.collector.test_collector_process import post as post_to
from tests.conftest import RunningCollector, make_settings, run_collector_app
from tests.factories import usage_event
from token_meter_collector.database import maintain
from token_meter_collector.ingest.dedupe import event_key
from token_meter_collector.keys import POOL
from token_meter_collector.usage.rollups import close_hours, hour_floor
from token_meter_collector.usage.store import month_bounds

MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4")


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def moments(now: datetime) -> list[datetime]:
    """Times in open hours, in hours closed already, and (inside the horizon) last month."""
    month_start, _ = month_bounds(now)
    last_month = month_start - timedelta(days=3, minutes=17)
    return [now, now - timedelta(minutes=50), now - timedelta(hours=5), last_month]


def random_events(rng: random.Random, count: int, now: datetime, prefix: str) -> list[Any]:
    times = moments(now)
    return [
        usage_event(
            f"{prefix}-{n}",
            f"c{rng.randrange(6)}",
            time=iso(rng.choice(times) - timedelta(seconds=rng.randrange(600))),
            model=rng.choice(MODELS),
            input_tokens=rng.randrange(1, 5000),
            output_tokens=rng.randrange(0, 900),
        )
        for n in range(count)
    ]


async def check_exact(
    collector: RunningCollector, db: asyncpg.Connection, events: list[Any]
) -> None:
    """Each distinct (source, id, time) counted once, everywhere."""
    distinct = {(e["source"], e["id"], e["time"]): e for e in events}
    hourly: Counter[tuple[str, str, datetime]] = Counter()
    monthly: Counter[tuple[str, str, datetime]] = Counter()
    for e in distinct.values():
        at = datetime.fromisoformat(e["time"])
        consumer, model = e["subject"], e["data"]["model"]
        hourly[consumer, model, hour_floor(at)] += e["data"]["total_tokens"]
        monthly[consumer, model, month_bounds(at)[0]] += e["data"]["total_tokens"]
    assert await db.fetchval("SELECT count(*) FROM usage_events") == len(distinct)
    assert await db.fetchval("SELECT count(*) FROM dedupe_keys") == len(distinct)
    rows = await db.fetch("SELECT consumer, model, hour, total_tokens FROM usage_hourly")
    assert {(r["consumer"], r["model"], r["hour"]): r["total_tokens"] for r in rows} == hourly
    rows = await db.fetch("SELECT consumer, model, month, total_tokens FROM usage_monthly")
    assert {(r["consumer"], r["model"], r["month"]): r["total_tokens"] for r in rows} == monthly
    this_month = month_bounds(datetime.now(UTC))[0]
    for consumer in {c for c, _, _ in monthly}:
        _, usage = await collector.usage(consumer)
        month = sum(v for (c, _, m), v in monthly.items() if c == consumer and m == this_month)
        assert usage["total_tokens"] == month
        assert usage["events"] == sum(
            1
            for e in distinct.values()
            if e["subject"] == consumer
            and month_bounds(datetime.fromisoformat(e["time"]))[0] == this_month
        )


async def test_totals_are_exact_across_many_concurrent_batches(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    """40 requests at once, group-committed by the writers in whatever transactions they make,
    over open hours, closed hours and last month."""
    rng = random.Random(1)
    now = datetime.now(UTC)
    batches = [random_events(rng, 150, now, f"b{b}") for b in range(40)]
    results = await asyncio.gather(*(collector.post_events(batch) for batch in batches))
    assert all(status == 200 and body["accepted"] == 150 for status, body in results)
    await check_exact(collector, db, [e for batch in batches for e in batch])


async def test_racing_duplicates_count_once(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    """The same events posted concurrently many times, whole and in overlapping slices in
    different orders (a plugin re-sending while its first attempt is still in flight): every
    event is accepted once in all, and the totals hold."""
    rng = random.Random(2)
    now = datetime.now(UTC)
    events = random_events(rng, 600, now, "race")
    posts: list[list[Any]] = [events, events[::-1], events[100:400], events[350:][::-1]]
    posts += [rng.sample(events, 200) for _ in range(8)]
    results = await asyncio.gather(*(collector.post_events(p) for p in posts))
    assert all(status == 200 for status, _ in results)
    assert sum(body["accepted"] for _, body in results) == 600
    assert sum(body["duplicates"] for _, body in results) == sum(len(p) for p in posts) - 600
    await check_exact(collector, db, events)
    # And again, one after the other: all known now.
    for again in posts[:3]:
        _, body = await collector.post_events(again)
        assert body == {"accepted": 0, "duplicates": len(again), "rejected": []}
    await check_exact(collector, db, events)


async def test_new_events_after_duplicates_are_counted(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    """Once duplicates were met, the next transactions look for them first: new events mixed
    with known ones are still each counted once, and new ones alone too."""
    now = datetime.now(UTC)
    first = random_events(random.Random(3), 100, now, "mix")
    await collector.post_events(first)
    later = random_events(random.Random(4), 100, now, "mix-later")
    _, body = await collector.post_events(first[:50] + later[:50])
    assert body == {"accepted": 50, "duplicates": 50, "rejected": []}
    assert collector.app is not None
    for n in range(50, 100, 10):  # each its own transaction
        _, body = await collector.post_events(later[n : n + 10])
        assert body["accepted"] == 10
    await check_exact(collector, db, first + later)


async def test_the_same_id_with_another_time_is_another_event(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    """The dedupe key is (source, id, time): an event's time never changes across the plugin's
    retries, so a re-send with another time is counted as a new event, in one batch or two."""
    at = datetime.now(UTC).replace(microsecond=0)
    one = usage_event("same", time=iso(at))
    other = usage_event("same", time=iso(at - timedelta(seconds=1)))
    _, body = await collector.post_events([one, other, one])
    assert body == {"accepted": 2, "duplicates": 1, "rejected": []}
    later = usage_event("same", time=iso(at - timedelta(seconds=2)))
    _, body = await collector.post_events([later, one])
    assert body == {"accepted": 1, "duplicates": 1, "rejected": []}
    assert await db.fetchval("SELECT count(*) FROM usage_events") == 3


async def test_closing_hours_while_events_arrive_keeps_every_total(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    """The fold of closed hours into the month rows runs while batches are being stored, some
    of them for the hours being closed: nothing is lost or counted twice, quotas included."""
    assert collector.app is not None
    pool = collector.app[POOL]
    now = datetime.now(UTC)
    # As if the collector had been down: four hours to close (nothing is stored yet, so
    # closed_through may move back).
    await db.execute(
        "UPDATE usage_rollup_state SET closed_through = $1", hour_floor(now) - timedelta(hours=5)
    )
    rng = random.Random(5)
    events = random_events(rng, 400, now, "fold")
    await collector.post_events(events[:200])
    await put_consumer(collector, "c1", {"monthly_token_quota": 10**8})
    batches = [events[n : n + 20] for n in range(200, 400, 20)]
    closed, *_ = await asyncio.gather(
        close_hours(pool), *(collector.post_events(batch) for batch in batches)
    )
    assert closed >= 4  # 5 if the hour turned meanwhile
    assert await db.fetchval("SELECT closed_through FROM usage_rollup_state") == hour_floor(
        datetime.now(UTC)
    ) - timedelta(hours=1)
    assert await close_hours(pool) == 0
    await check_exact(collector, db, events)
    # An event for a closed hour after the fold: in the hour and in the month.
    late = usage_event("late", "c1", time=iso(now - timedelta(hours=3)), input_tokens=10**8 - 20)
    await collector.post_events([late])
    await check_exact(collector, db, [*events, late])
    assert (
        await db.fetchval("SELECT reason FROM blocklist WHERE consumer = 'c1'") == "quota_exceeded"
    )


async def test_a_restarted_collector_keeps_the_count(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    """A collector stopped after some batches and another started on the same database, both
    re-sent everything the plugin had not seen acknowledged: each event once."""
    rng = random.Random(6)
    now = datetime.now(UTC)
    events = random_events(rng, 900, now, "restart")
    settings = make_settings(database_url, tmp_path)
    async with run_collector_app(settings) as first:
        await asyncio.gather(*(first.post_events(events[n : n + 100]) for n in range(0, 500, 100)))
    async with run_collector_app(settings) as second:
        results = await asyncio.gather(
            *(second.post_events(events[n : n + 150]) for n in range(0, 900, 150))
        )
        assert sum(body["accepted"] for _, body in results) == 400
        await check_exact(second, db, events)


@pytest.mark.slow
async def test_a_killed_collector_loses_nothing_and_counts_once(
    collector_process_factory: Any, database_url: str, db: asyncpg.Connection
) -> None:
    """SIGKILL while batches are in flight: what was acknowledged is stored, what was not is
    re-sent to the restarted collector, and each event counts once."""
    ingest, admin = "i" * 32, "a" * 32
    proc = collector_process_factory(
        database_url, TOKEN_METER_INGEST_TOKEN=ingest, TOKEN_METER_ADMIN_TOKEN=admin
    )
    proc.start()
    events = random_events(random.Random(7), 3000, datetime.now(UTC), "kill")
    batches = [events[n : n + 300] for n in range(0, 3000, 300)]
    tasks = [asyncio.ensure_future(post_to(proc, ingest, batch)) for batch in batches]
    await asyncio.sleep(0.05)
    proc.stop(signal.SIGKILL)
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    acknowledged = sum(o[1]["accepted"] for o in outcomes if isinstance(o, tuple) and o[0] == 200)
    assert await db.fetchval("SELECT count(*) FROM usage_events") >= acknowledged
    proc.start()
    for batch in batches:  # the plugin re-sends whatever it has no answer for: here, all
        status, _ = await post_to(proc, ingest, batch)
        assert status == 200
    async with run_collector_app(make_settings(database_url, proc.log_path.parent)) as reader:
        await check_exact(reader, db, events)


async def test_python_and_sql_make_the_same_key(db: asyncpg.Connection) -> None:
    """The migration made the keys of stored events in SQL; ingest makes them in Python."""
    pairs = [
        ("kong://dp-1/token-meter", "0192f0c4-8f1e-7c3a-9a52-3f4e5d6c7b8a"),
        ("kong://ünïcode/✓", "id with spaces and ünïcode"),
        ("a", "bc"),
        ("ab", "c"),
    ]
    for source, event_id in pairs:
        sql = await db.fetchval("SELECT token_meter_event_key($1, $2)", source, event_id)
        assert sql == event_key(source, event_id)
    assert event_key("a", "bc") != event_key("ab", "c")


async def test_the_quota_reads_the_month_as_hours_are_closed(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    """A quota crossing is seen by the transaction that makes it, whether the month's earlier
    usage sits in closed hours or open ones."""
    async with run_collector_app(make_settings(database_url, tmp_path)) as collector:
        assert collector.app is not None
        now = datetime.now(UTC)
        await put_consumer(collector, "ann", {"monthly_token_quota": 1000})
        early = now - timedelta(hours=4)
        if early < month_bounds(now)[0]:
            early = now  # the month is younger than that: all in open hours
        # Nothing stored yet, so closed_through may move back: q1 lands in an open hour,
        # then its hour is closed.
        await db.execute("UPDATE usage_rollup_state SET closed_through = $1", hour_floor(early))
        await collector.post_events(
            [usage_event("q1", "ann", time=iso(early), input_tokens=600, output_tokens=0)]
        )
        assert await close_hours(collector.app[POOL]) >= 3 or early == now
        blocked = "SELECT count(*) FROM blocklist WHERE consumer = 'ann'"
        await collector.post_events([usage_event("q2", "ann", input_tokens=399, output_tokens=0)])
        assert await db.fetchval(blocked) == 0
        # Committed with the event that reaches the quota, before its answer.
        await collector.post_events([usage_event("q3", "ann", input_tokens=1, output_tokens=0)])
        assert await db.fetchval(blocked) == 1
        _, usage = await collector.usage("ann")
        assert usage["quota_remaining_tokens"] == 0


async def test_a_round_of_maintenance_changes_no_total(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    """Partitions made ahead, keys past the horizon pruned, hours closed: totals unchanged, and
    a second round finds nothing to do."""
    assert collector.app is not None
    now = datetime.now(UTC)
    await db.execute(
        "UPDATE usage_rollup_state SET closed_through = $1", hour_floor(now) - timedelta(hours=3)
    )
    events = random_events(random.Random(8), 300, now, "maintained")
    await collector.post_events(events)
    done = await maintain(collector.app[POOL], timedelta(days=90))
    assert done.hours_closed >= 2
    today = now.date()
    for day in (today, today + timedelta(days=1), today + timedelta(days=2)):
        assert await db.fetchval("SELECT to_regclass($1)", f"dedupe_keys_{day:%Y%m%d}")
    await check_exact(collector, db, events)
    again = await maintain(collector.app[POOL], timedelta(days=90))
    assert (again.hours_closed, bool(again.pruned)) == (0, False)
