"""The rollups (schema/migrations/0006): `usage_hourly` per consumer, model and UTC hour, grown
by every ingest transaction; months derived from it. A month is the sum of its closed hours,
kept per consumer and model in `usage_monthly_closed`, plus the hourly rows from
`closed_through` on (the `usage_monthly` view adds them up). So a month's total reads a few
rows however far into the month, and ingest never writes a month row except for an event of an
hour already closed.

Closing hours (the maintenance, `close_hours`) moves `closed_through` on and adds those hours
to the month rows in one transaction, under the exclusive side of ROLLUP_LOCK_ID. Every ingest
transaction holds the shared side from before it reads `closed_through` to its commit, so the
two never interleave: an ingest transaction that counted an event in an open hour only has
committed before the fold reads that hour, and one that starts after the fold sees the new
`closed_through` and adds a late event to the month row itself. Readers need no lock: one
statement's snapshot sees the fold entirely or not at all."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import structlog

log = structlog.get_logger("token_meter.usage")

ROLLUP_LOCK_ID = 0x746D2D726F6C6C75  # "tm-rollu"; any fixed 64-bit number
# The current hour and the one before stay open: late events, the common ones after a short
# outage, then never touch a month row.
OPEN_HOURS = timedelta(hours=1)
HOUR = timedelta(hours=1)

ROLLUP_FIELDS = (
    "events",
    "usage_missing_events",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_input_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost_nanos",
)
ROLLUP_COLUMNS = ", ".join(ROLLUP_FIELDS)


def rollup_add(table: str) -> str:
    """ON CONFLICT ... DO UPDATE SET: every counted field of `table` grows by the new row's."""
    return ", ".join(f"{f} = {table}.{f} + EXCLUDED.{f}" for f in ROLLUP_FIELDS)


FOLD_HOURS = f"""
INSERT INTO usage_monthly_closed (consumer, model, month, {ROLLUP_COLUMNS})
SELECT consumer, model, date_trunc('month', hour), {", ".join(f"sum({f})" for f in ROLLUP_FIELDS)}
FROM usage_hourly WHERE hour >= $1 AND hour < $2
GROUP BY 1, 2, 3 ORDER BY 1, 3, 2
ON CONFLICT (consumer, month, model) DO UPDATE SET {rollup_add("usage_monthly_closed")}
"""


def hour_floor(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


async def closed_through(conn: asyncpg.Connection) -> datetime:
    value = await conn.fetchval("SELECT closed_through FROM usage_rollup_state")
    assert isinstance(value, datetime)
    return value


async def close_hours(pool: asyncpg.Pool, *, now: datetime | None = None) -> int:
    """Close every hour before the previous one, an hour per transaction (each holds ingest
    back for as long as it sums that hour's rows). Any collector may run it; a second one waits
    for the first and finds nothing left. Returns the hours closed."""
    target = hour_floor(now or datetime.now(UTC)) - OPEN_HOURS
    closed = 0
    async with pool.acquire() as conn:
        while await closed_through(conn) < target:  # checked without the lock: usually done
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", ROLLUP_LOCK_ID)
                start = await closed_through(conn)
                if start >= target:
                    break
                end = min(hour_floor(start) + HOUR, target)
                await conn.execute(FOLD_HOURS, start, end)
                await conn.execute("UPDATE usage_rollup_state SET closed_through = $1", end)
            closed += 1
    if closed:
        log.info("hours_closed", hours=closed, closed_through=target.isoformat())
    return closed
