"""Migration 0006 on a database that a collector at migration 0003 filled: the dedupe keys it
held move to the time-led keys (the same events stay duplicates), the month totals stay what
they were, now derived from the hourly rollup, and ingest goes on exactly from there."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest_asyncio

from tests.conftest import make_settings, recreate_database, run_collector_app
from tests.factories import usage_event
from token_meter_collector.database import create_pool, migrate
from token_meter_collector.usage.rollups import hour_floor
from token_meter_collector.usage.store import month_bounds


@dataclass(frozen=True)
class OldEvent:
    id: str
    consumer: str
    model: str
    time: datetime
    input_tokens: int
    received_at: datetime
    source: str = "kong://dp-old/token-meter"
    output_tokens: int = 20
    cost_nanos: int = 1234

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def blake2b_key(source: str, event_id: str) -> bytes:
    """0001's dedupe key, made by the collector of that time."""
    raw = source.encode()
    return hashlib.blake2b(
        len(raw).to_bytes(4, "big") + raw + event_id.encode(), digest_size=16
    ).digest()


async def store_as_0003(
    conn: asyncpg.Connection, events: list[OldEvent], pruned_before: datetime
) -> None:
    """What the 0003 ingest statement wrote: raw events, a key per event received since
    `pruned_before` (older ones were pruned), consumers and both rollups."""
    for e in events:
        await conn.execute(
            """INSERT INTO usage_events (time, source, id, consumer, provider, model, status,
                streamed, input_tokens, output_tokens, cached_input_tokens,
                cache_write_input_tokens, reasoning_tokens, total_tokens, usage_missing,
                received_at, cost_nanos, price_book_version)
            VALUES ($1, $2, $3, $4, 'openai', $5, 200, false, $6, $7, 0, 0, 0, $8, false, $9, $10,
                    'old')""",
            e.time,
            e.source,
            e.id,
            e.consumer,
            e.model,
            e.input_tokens,
            e.output_tokens,
            e.total_tokens,
            e.received_at,
            e.cost_nanos,
        )
        if e.received_at >= pruned_before:
            await conn.execute(
                "INSERT INTO event_keys (key, received_at) VALUES ($1, $2)",
                blake2b_key(e.source, e.id),
                e.received_at,
            )
    await conn.execute(
        "INSERT INTO consumers (consumer) SELECT DISTINCT consumer FROM usage_events"
    )
    for table, unit in (("usage_hourly", "hour"), ("usage_monthly", "month")):
        await conn.execute(
            f"""INSERT INTO {table} (consumer, model, {unit}, events, usage_missing_events,
                input_tokens, output_tokens, cached_input_tokens, cache_write_input_tokens,
                reasoning_tokens, total_tokens, cost_nanos)
            SELECT consumer, model, date_trunc('{unit}', time), count(*), 0, sum(input_tokens),
                   sum(output_tokens), 0, 0, 0, sum(total_tokens), sum(cost_nanos)
            FROM usage_events GROUP BY 1, 2, 3"""
        )


@pytest_asyncio.fixture(loop_scope="session")
async def old_database(pg_admin_url: str) -> AsyncIterator[str]:
    """An empty database migrated to 0003 only, dropped afterwards."""
    name = f"tm_old_{uuid.uuid4().hex[:12]}"
    url = await recreate_database(pg_admin_url, name)
    pool = await create_pool(url, min_size=1, max_size=1)
    try:
        assert (await migrate(pool, up_to=3))[-1] == "0003_stripe_billing.sql"
    finally:
        await pool.close()
    yield url
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def history(now: datetime) -> list[OldEvent]:
    """Last month, earlier this month (hours to be closed), this hour (open), and events
    received so long ago that their keys were pruned."""
    month_start, _ = month_bounds(now)
    earlier = max(month_start, now - timedelta(days=2))
    events = []
    for n in range(30):
        at = [month_start - timedelta(days=5, hours=n), earlier + timedelta(minutes=n), now][n % 3]
        events.append(
            OldEvent(f"e{n}", f"c{n % 2}", ["gpt-4o", "o3-mini"][n % 4 // 2], at, 100 + n, at)
        )
    long_ago = now - timedelta(days=80)
    events += [OldEvent(f"old{n}", "c0", "gpt-4o", long_ago, 7, long_ago) for n in range(3)]
    return events


MONTHLY = """SELECT consumer, model, month, events, usage_missing_events, input_tokens,
    output_tokens, cached_input_tokens, cache_write_input_tokens, reasoning_tokens,
    total_tokens, cost_nanos FROM usage_monthly ORDER BY 1, 2, 3"""


async def test_a_filled_0003_database_upgrades_with_every_total_and_key(
    old_database: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    events = history(now)
    pruned_before = now - timedelta(days=60)
    conn = await asyncpg.connect(old_database, server_settings={"timezone": "UTC"})
    try:
        await store_as_0003(conn, events, pruned_before)
        await conn.execute("UPDATE consumers SET monthly_token_quota = 2000 WHERE consumer = 'c0'")
        monthly_before = [tuple(r) for r in await conn.fetch(MONTHLY)]
        hourly_before = await conn.fetch("SELECT * FROM usage_hourly ORDER BY 1, 2, 3")
        events_before = await conn.fetchval("SELECT count(*) FROM usage_events")
    finally:
        await conn.close()

    pool = await create_pool(old_database, min_size=1, max_size=1)
    try:
        applied = await migrate(pool)
    finally:
        await pool.close()
    assert "0006_time_ordered_dedupe.sql" in applied

    conn = await asyncpg.connect(old_database, server_settings={"timezone": "UTC"})
    try:
        assert await conn.fetchval("SELECT to_regclass('event_keys')") is None
        # The keys held before, and only those, now time-led.
        keyed = [e for e in events if e.received_at >= pruned_before]
        assert await conn.fetchval("SELECT count(*) FROM dedupe_keys") == len(keyed)
        assert await conn.fetchval("SELECT count(*) FROM dedupe_keys_default") == 0
        # Every month as it was; the hours untouched; closed hours in the month rows.
        assert [tuple(r) for r in await conn.fetch(MONTHLY)] == monthly_before
        assert await conn.fetch("SELECT * FROM usage_hourly ORDER BY 1, 2, 3") == hourly_before
        closed_through = await conn.fetchval("SELECT closed_through FROM usage_rollup_state")
        assert closed_through in {
            hour_floor(at) - timedelta(hours=1) for at in (now, datetime.now(UTC))
        }
        open_rows = await conn.fetchval(
            "SELECT count(*) FROM usage_monthly_closed m WHERE m.events <= 0"
        )
        assert open_rows == 0
        assert await conn.fetchval("SELECT count(*) FROM usage_events") == events_before
    finally:
        await conn.close()

    # A collector on the upgraded database: old events re-sent are duplicates (except those
    # whose keys 0001 had pruned, which the horizon refuses anyway), new ones count on top.
    async with run_collector_app(make_settings(old_database, tmp_path)) as collector:
        resent = [
            usage_event(
                e.id,
                e.consumer,
                source=e.source,
                time=e.time.isoformat(),
                model=e.model,
                input_tokens=e.input_tokens,
                output_tokens=e.output_tokens,
            )
            for e in events
            if e.received_at >= pruned_before
        ]
        status, body = await collector.post_events(resent)
        assert (status, body["accepted"], body["duplicates"]) == (200, 0, len(resent))
        this_month = month_bounds(now)[0]
        used = sum(e.total_tokens for e in events if e.consumer == "c0" and e.time >= this_month)
        _, usage = await collector.usage("c0")
        assert usage["total_tokens"] == used
        assert usage["quota_remaining_tokens"] == 2000 - used
        fresh = [usage_event("new-1", "c0", input_tokens=2000 - used - 20)]
        _, body = await collector.post_events(fresh)
        assert body["accepted"] == 1
        _, usage = await collector.usage("c0")
        assert usage["quota_remaining_tokens"] == 0
        conn = await asyncpg.connect(old_database)
        try:
            assert await conn.fetchval("SELECT reason FROM blocklist WHERE consumer = 'c0'") == (
                "quota_exceeded"
            )
        finally:
            await conn.close()


async def test_an_empty_0003_database_upgrades(old_database: str) -> None:
    pool = await create_pool(old_database, min_size=1, max_size=1)
    try:
        assert "0006_time_ordered_dedupe.sql" in await migrate(pool)
        today = datetime.now(UTC).date()
        names = {
            r["relname"]
            for r in await pool.fetch(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'dedupe_keys'::regclass"
            )
        }
        for day in (today - timedelta(days=1), today, today + timedelta(days=2)):
            assert f"dedupe_keys_{day:%Y%m%d}" in names
        assert await pool.fetchval("SELECT count(*) FROM usage_monthly") == 0
    finally:
        await pool.close()
