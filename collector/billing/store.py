"""The billing tables (migrations 0003 and 0005): every read and write of them is here."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeAlias

import asyncpg

from .meters import FIELDS, Meter
from .outbox import Coverage, Plan, Totals, TotalsKey, WindowKey, WindowUsage, plan
from .reconcile import LocalDay, SentRow

# Where a query runs: the leader's connection, or the pool for the sends' bookkeeping.
Executor: TypeAlias = asyncpg.Connection | asyncpg.Pool

# A consumer's Stripe customer: the id set through the admin API, else a `cus_` custom_id.
CUSTOMER_SQL = (
    "coalesce(c.stripe_customer_id, CASE WHEN c.custom_id LIKE 'cus\\_%' THEN c.custom_id END)"
)


async def note_fresh_usage(
    conn: asyncpg.Connection,
    id_consumers: Sequence[str],
    custom_ids: Sequence[str],
    dirty_consumers: Sequence[str],
    dirty_hours: Sequence[datetime],
) -> None:
    """In the ingest transaction, one round trip: the custom_id each consumer's latest events
    carry (a consumer row changes only when it does), and the rollup windows that grew, for the
    outbox to look at."""
    await conn.execute(
        """WITH ids AS (
            UPDATE consumers c SET custom_id = t.custom_id
            FROM unnest($1::text[], $2::text[]) AS t(consumer, custom_id)
            WHERE c.consumer = t.consumer AND c.custom_id IS DISTINCT FROM t.custom_id
        )
        INSERT INTO stripe_dirty (consumer, hour)
        SELECT * FROM unnest($3::text[], $4::timestamptz[]) ORDER BY 1, 2
        ON CONFLICT DO NOTHING""",
        id_consumers,
        custom_ids,
        dirty_consumers,
        dirty_hours,
    )


async def forget_initialization(conn: asyncpg.Connection) -> None:
    """A collector without Stripe marks no windows: the next one with Stripe rescans them."""
    await conn.execute("UPDATE stripe_sync_state SET initialized_at = NULL")


async def initialize(conn: asyncpg.Connection) -> int:
    """Once: mark every rollup window, so usage from before Stripe was enabled is looked at."""
    async with conn.transaction():
        done = await conn.fetchval(
            "SELECT initialized_at IS NOT NULL FROM stripe_sync_state FOR UPDATE"
        )
        if done:
            return 0
        status = await conn.execute(
            """INSERT INTO stripe_dirty (consumer, hour)
            SELECT DISTINCT consumer, hour FROM usage_hourly ON CONFLICT DO NOTHING"""
        )
        await conn.execute("UPDATE stripe_sync_state SET initialized_at = now()")
    return int(status.split()[-1])


async def derive(conn: asyncpg.Connection, meters: Sequence[Meter], limit: int) -> Plan | None:
    """Take up to `limit` dirty windows and write the deltas their new usage makes, in one
    transaction (a crash leaves the windows dirty and nothing written). None when none."""
    async with conn.transaction():
        dirty = await conn.fetch(
            """DELETE FROM stripe_dirty WHERE (consumer, hour) IN (
                SELECT consumer, hour FROM stripe_dirty ORDER BY hour, consumer
                LIMIT $1 FOR UPDATE SKIP LOCKED)
            RETURNING consumer, hour""",
            limit,
        )
        if not dirty:
            return None
        consumers = [row["consumer"] for row in dirty]
        hours = [row["hour"] for row in dirty]
        sums = ", ".join(f"{field.sql} AS {name}" for name, field in FIELDS.items())
        rows = await conn.fetch(
            f"""SELECT h.consumer, h.hour, {sums}
            FROM usage_hourly h
            JOIN unnest($1::text[], $2::timestamptz[]) AS d(consumer, hour)
              ON h.consumer = d.consumer AND h.hour = d.hour
            GROUP BY h.consumer, h.hour""",
            consumers,
            hours,
        )
        windows = [
            WindowUsage(row["consumer"], row["hour"], {name: int(row[name]) for name in FIELDS})
            for row in rows
        ]
        names = [meter.event_name for meter in meters]
        coverage = {
            (row["consumer"], row["event_name"], row["window_start"]): Coverage(
                row["covered"], row["deltas"]
            )
            for row in await conn.fetch(
                """SELECT w.* FROM stripe_windows w
                JOIN unnest($1::text[], $2::timestamptz[]) AS d(consumer, hour)
                  ON w.consumer = d.consumer AND w.window_start = d.hour
                WHERE w.event_name = ANY($3::text[])""",
                consumers,
                hours,
                names,
            )
        }
        totals = {
            (row["consumer"], row["event_name"]): Totals(row["covered"], row["value"])
            for row in await conn.fetch(
                """SELECT * FROM stripe_totals
                WHERE consumer = ANY($1::text[]) AND event_name = ANY($2::text[])
                FOR UPDATE""",
                sorted(set(consumers)),
                names,
            )
        }
        result = plan(windows, meters, coverage, totals)
        await _write_plan(conn, result)
    return result


async def _write_plan(conn: asyncpg.Connection, result: Plan) -> None:
    if result.coverage:
        keys: list[WindowKey] = sorted(result.coverage)
        await conn.execute(
            """INSERT INTO stripe_windows (consumer, event_name, window_start, covered, deltas)
            SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::int8[],
                                 $5::int4[])
            ON CONFLICT (consumer, event_name, window_start)
            DO UPDATE SET covered = EXCLUDED.covered, deltas = EXCLUDED.deltas""",
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            [result.coverage[k].covered for k in keys],
            [result.coverage[k].deltas for k in keys],
        )
    if result.totals:
        tkeys: list[TotalsKey] = sorted(result.totals)
        await conn.execute(
            """INSERT INTO stripe_totals (consumer, event_name, covered, value)
            SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[])
            ON CONFLICT (consumer, event_name)
            DO UPDATE SET covered = EXCLUDED.covered, value = EXCLUDED.value""",
            [k[0] for k in tkeys],
            [k[1] for k in tkeys],
            [result.totals[k].covered for k in tkeys],
            [result.totals[k].value for k in tkeys],
        )
    if result.deltas:
        await conn.execute(
            f"""INSERT INTO stripe_outbox
                (consumer, event_name, window_start, seq, identifier, value, sendable_at)
            SELECT t.*, CASE WHEN {CUSTOMER_SQL} IS NOT NULL THEN now() END
            FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::int4[], $5::text[],
                        $6::int8[]) AS t(consumer, event_name, window_start, seq, identifier,
                                         value)
            LEFT JOIN consumers c ON c.consumer = t.consumer""",
            [d.consumer for d in result.deltas],
            [d.event_name for d in result.deltas],
            [d.window_start for d in result.deltas],
            [d.seq for d in result.deltas],
            [d.identifier for d in result.deltas],
            [d.value for d in result.deltas],
        )


@dataclass(frozen=True, slots=True)
class PendingRow:
    consumer: str
    event_name: str
    window_start: datetime
    seq: int
    identifier: str
    value: int
    attempts: int
    customer: str

    @property
    def key(self) -> tuple[str, str, datetime, int]:
        return (self.consumer, self.event_name, self.window_start, self.seq)


async def prepare_sending(conn: asyncpg.Connection, oldest_allowed: datetime) -> int:
    """Rows of consumers mapped since become sendable; rows older than Stripe takes become
    unbillable (returns how many did, this time)."""
    await conn.execute(
        f"""UPDATE stripe_outbox o SET sendable_at = now()
        FROM consumers c
        WHERE o.state = 'pending' AND o.sendable_at IS NULL AND c.consumer = o.consumer
          AND {CUSTOMER_SQL} IS NOT NULL"""
    )
    status = await conn.execute(
        """UPDATE stripe_outbox SET state = 'unbillable'
        WHERE state = 'pending' AND window_start < $1""",
        oldest_allowed,
    )
    return int(status.split()[-1])


async def pending(
    conn: asyncpg.Connection, event_names: Sequence[str], newest_allowed: datetime, limit: int
) -> list[PendingRow]:
    """Sendable rows due now, oldest window first, for the given meters."""
    rows = await conn.fetch(
        f"""SELECT o.consumer, o.event_name, o.window_start, o.seq, o.identifier, o.value,
                   o.attempts, {CUSTOMER_SQL} AS customer
        FROM stripe_outbox o JOIN consumers c ON c.consumer = o.consumer
        WHERE o.state = 'pending' AND o.sendable_at IS NOT NULL
          AND o.next_attempt_at <= now() AND o.window_start <= $2
          AND o.event_name = ANY($1::text[])
        ORDER BY o.window_start, o.seq LIMIT $3""",
        list(event_names),
        newest_allowed,
        limit,
    )
    return [PendingRow(**dict(row)) for row in rows if row["customer"] is not None]


async def mark_sent(conn: Executor, row: PendingRow, answer: str) -> None:
    await mark_rows_sent(conn, [row], answer)


async def mark_retry(conn: Executor, row: PendingRow, error: str, delay: timedelta) -> None:
    await mark_rows_retry(conn, [row], error, delay)


# The rows of one Stripe call (one for v1, up to 100 on the stream), by primary key and the
# identifier they were sent under: a row an error report renamed meanwhile (error_reports.py)
# is not taken for delivered by the answer to its old identifier.
_ROWS_SQL = """unnest($1::text[], $2::text[], $3::timestamptz[], $4::int4[], $5::text[],
                   $6::text[])
            AS t(consumer, event_name, window_start, seq, identifier, customer)"""
_ROWS_MATCH = """o.consumer = t.consumer AND o.event_name = t.event_name
          AND o.window_start = t.window_start AND o.seq = t.seq
          AND o.identifier = t.identifier AND o.state = 'pending'"""


def _row_columns(rows: Sequence[PendingRow]) -> list[list[Any]]:
    return [
        [r.consumer for r in rows],
        [r.event_name for r in rows],
        [r.window_start for r in rows],
        [r.seq for r in rows],
        [r.identifier for r in rows],
        [r.customer for r in rows],
    ]


async def mark_rows_sent(conn: Executor, rows: Sequence[PendingRow], answer: str) -> None:
    await conn.execute(
        f"""UPDATE stripe_outbox o
        SET state = 'sent', sent_at = now(), customer = t.customer, answer = $7,
            attempts = o.attempts + 1, last_error = NULL
        FROM {_ROWS_SQL}
        WHERE {_ROWS_MATCH}""",
        *_row_columns(rows),
        answer,
    )


async def mark_rows_retry(
    conn: Executor, rows: Sequence[PendingRow], error: str, delay: timedelta
) -> None:
    await conn.execute(
        f"""UPDATE stripe_outbox o
        SET attempts = o.attempts + 1, last_error = $7, next_attempt_at = now() + $8
        FROM {_ROWS_SQL}
        WHERE {_ROWS_MATCH}""",
        *_row_columns(rows),
        error[:500],
        delay,
    )


async def meter_event_name(conn: Executor, meter_id: str) -> str | None:
    """The configured meter a Stripe meter id belongs to, as the last meter check found it."""
    name: str | None = await conn.fetchval(
        "SELECT event_name FROM stripe_meters WHERE meter_id = $1", meter_id
    )
    return name


async def resend_dropped(
    conn: Executor,
    renames: Sequence[tuple[str, str]],
    event_name: str | None,
    error: str,
    delay: timedelta,
) -> int:
    """Rows Stripe dropped (an error report named their identifiers) become pending again
    under their next identifier (`(old, new)` pairs), due after `delay`; rows already
    unbillable, or no longer under the old identifier, are left alone. Returns how many."""
    status = await conn.execute(
        """UPDATE stripe_outbox o
        SET state = 'pending', identifier = t.new, sent_at = NULL, answer = NULL,
            last_error = $4, next_attempt_at = now() + $5
        FROM unnest($1::text[], $2::text[]) AS t(old, new)
        WHERE o.identifier = t.old AND o.state IN ('pending', 'sent')
          AND ($3::text IS NULL OR o.event_name = $3)""",
        [old for old, _ in renames],
        [new for _, new in renames],
        event_name,
        error[:500],
        delay,
    )
    return int(status.split()[-1])


async def mark_dropped_unbillable(
    conn: Executor, identifiers: Sequence[str], event_name: str | None, error: str
) -> int:
    """Rows Stripe dropped for a reason no re-send can fix (their time is too old)."""
    status = await conn.execute(
        """UPDATE stripe_outbox
        SET state = 'unbillable', last_error = $3
        WHERE identifier = ANY($1::text[]) AND state IN ('pending', 'sent')
          AND ($2::text IS NULL OR event_name = $2)""",
        list(identifiers),
        event_name,
        error[:500],
    )
    return int(status.split()[-1])


# Error reports taken by the webhook, waiting to be fetched from Stripe (migration 0005).
ERROR_REPORTS_KEPT = timedelta(days=30)  # as long as Stripe keeps v2 events


async def queue_error_report(conn: Executor, event_id: str, meter_id: str | None) -> None:
    await conn.execute(
        """INSERT INTO stripe_error_reports (event_id, meter_id) VALUES ($1, $2)
        ON CONFLICT DO NOTHING""",
        event_id,
        meter_id,
    )


@dataclass(frozen=True, slots=True)
class QueuedReport:
    event_id: str
    attempts: int


async def due_error_reports(conn: Executor, limit: int) -> list[QueuedReport]:
    """Queued error reports due for a fetch, oldest first; applied ones past their keeping
    time are pruned on the way."""
    await conn.execute(
        "DELETE FROM stripe_error_reports WHERE applied_at < now() - $1::interval",
        ERROR_REPORTS_KEPT,
    )
    rows = await conn.fetch(
        """SELECT event_id, attempts FROM stripe_error_reports
        WHERE applied_at IS NULL AND next_attempt_at <= now()
        ORDER BY received_at, event_id LIMIT $1""",
        limit,
    )
    return [QueuedReport(row["event_id"], row["attempts"]) for row in rows]


async def error_report_applied(conn: Executor, event_id: str, error: str | None = None) -> None:
    await conn.execute(
        """UPDATE stripe_error_reports
        SET applied_at = now(), attempts = attempts + 1, last_error = $2
        WHERE event_id = $1""",
        event_id,
        None if error is None else error[:500],
    )


async def error_report_retry(conn: Executor, event_id: str, error: str, delay: timedelta) -> None:
    await conn.execute(
        """UPDATE stripe_error_reports
        SET attempts = attempts + 1, last_error = $2, next_attempt_at = now() + $3
        WHERE event_id = $1""",
        event_id,
        error[:500],
        delay,
    )


async def record_error(conn: Executor, meter: str | None, code: str, message: str) -> None:
    await conn.execute(
        "INSERT INTO stripe_errors (meter, code, message) VALUES ($1, $2, $3)",
        meter,
        code,
        message[:500],
    )
    await conn.execute(
        "DELETE FROM stripe_errors WHERE id <= (SELECT max(id) - 100 FROM stripe_errors)"
    )


async def record_meters(conn: asyncpg.Connection, found: Iterable[tuple[Meter, Any]]) -> None:
    """What the last check found at Stripe for each configured meter (None: missing)."""
    items = list(found)
    await conn.execute(
        """INSERT INTO stripe_meters (event_name, field, meter_id, active, checked_at)
        SELECT t.*, now() FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[]) AS t
        ON CONFLICT (event_name) DO UPDATE SET field = EXCLUDED.field,
            meter_id = EXCLUDED.meter_id, active = EXCLUDED.active, checked_at = now()""",
        [meter.event_name for meter, _ in items],
        [meter.field for meter, _ in items],
        [None if found is None else found.id for _, found in items],
        [found is not None and found.active for _, found in items],
    )


async def record_cycle(conn: asyncpg.Connection, leader: str) -> None:
    await conn.execute(
        """UPDATE stripe_sync_state SET last_cycle_at = now(), leader = $1,
            leader_since = CASE WHEN leader IS DISTINCT FROM $1 THEN now() ELSE leader_since END""",
        leader,
    )


MAX_HELD_SHOWN = 100
MAX_ERRORS_SHOWN = 20


async def status(pool: asyncpg.Pool, meters: Sequence[Meter]) -> dict[str, Any]:
    """The outbox and sync as `GET /v1/stripe/status` shows them (contract 4), every figure
    from one snapshot: a sync committing between two of the queries cannot make them disagree."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        return await _status(conn, meters)


async def _status(conn: asyncpg.Connection, meters: Sequence[Meter]) -> dict[str, Any]:
    found = {
        row["event_name"]: row
        for row in await conn.fetch("SELECT event_name, meter_id, active FROM stripe_meters")
    }
    counts = await conn.fetchrow(
        """SELECT count(*) FILTER (WHERE state = 'pending') AS pending_rows,
            count(*) FILTER (WHERE state = 'unbillable') AS unbillable_rows,
            extract(epoch FROM now() - min(sendable_at) FILTER (WHERE state = 'pending'))
                AS oldest_pending_seconds,
            max(sent_at) AS last_sent_at
        FROM stripe_outbox"""
    )
    held_rows = await conn.fetch(
        """SELECT consumer, reason FROM (
            SELECT DISTINCT consumer, 'no_stripe_customer' AS reason FROM stripe_outbox
            WHERE state = 'pending' AND sendable_at IS NULL
            UNION
            SELECT DISTINCT consumer, 'unbillable_too_old' FROM stripe_outbox
            WHERE state = 'unbillable') h
        ORDER BY consumer, reason"""
    )
    errors = await conn.fetch(
        "SELECT at, meter, code, message FROM stripe_errors ORDER BY id DESC LIMIT $1",
        MAX_ERRORS_SHOWN,
    )
    sync = await conn.fetchrow("SELECT leader, leader_since, last_cycle_at FROM stripe_sync_state")
    oldest = counts["oldest_pending_seconds"]
    return {
        "meters": [
            {
                "event_name": meter.event_name,
                "field": meter.field,
                "meter_id": found[meter.event_name]["meter_id"]
                if meter.event_name in found
                else None,
                "active": bool(found[meter.event_name]["active"])
                if meter.event_name in found
                else False,
            }
            for meter in meters
        ],
        "pending_rows": counts["pending_rows"],
        "oldest_pending_seconds": None if oldest is None else round(float(oldest), 3),
        "held_consumers": len({row["consumer"] for row in held_rows}),
        "held": [dict(row) for row in held_rows[:MAX_HELD_SHOWN]],
        "unbillable_rows": counts["unbillable_rows"],
        "last_sent_at": _iso(counts["last_sent_at"]),
        "errors": [
            {
                "at": _iso(row["at"]),
                "meter": row["meter"],
                "code": row["code"],
                "message": row["message"],
            }
            for row in errors
        ],
        "leader": sync["leader"] if sync else None,
        "last_cycle_at": _iso(sync["last_cycle_at"]) if sync else None,
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


# -- reconcile (reconcile.py, reconciler.py) ---------------------------------------------------

# The customer a row counts for: the one it was sent to, else (not sent yet) the one it would go to.
_ROW_CUSTOMER_SQL = f"CASE WHEN o.state = 'sent' THEN o.customer ELSE {CUSTOMER_SQL} END"


async def reconcile_days(
    conn: Executor, lo: datetime, hi: datetime, settle: timedelta
) -> list[LocalDay]:
    """Per customer, meter and UTC day of the windows starting in [lo, hi): what was delivered,
    what is still pending, what is unbillable, and what was delivered within `settle`."""
    rows = await conn.fetch(
        f"""SELECT customer, event_name, day,
            coalesce(sum(value) FILTER (WHERE state = 'sent'), 0) AS sent,
            coalesce(sum(value) FILTER (WHERE state = 'pending'), 0) AS pending,
            coalesce(sum(value) FILTER (WHERE state = 'unbillable'), 0) AS unbillable,
            coalesce(
                sum(value) FILTER (WHERE state = 'sent' AND sent_at > now() - $3::interval), 0
            ) AS settling
        FROM (
            SELECT {_ROW_CUSTOMER_SQL} AS customer, o.event_name,
                   (o.window_start AT TIME ZONE 'UTC')::date AS day, o.state, o.value, o.sent_at
            FROM stripe_outbox o LEFT JOIN consumers c ON c.consumer = o.consumer
            WHERE o.window_start >= $1 AND o.window_start < $2
        ) t
        GROUP BY customer, event_name, day
        ORDER BY customer, event_name, day""",
        lo,
        hi,
        settle,
    )
    return [
        LocalDay(
            customer=row["customer"],
            meter=row["event_name"],
            day=row["day"],
            sent=int(row["sent"]),
            pending=int(row["pending"]),
            unbillable=int(row["unbillable"]),
            settling=int(row["settling"]),
        )
        for row in rows
    ]


async def reconcile_rows(
    conn: Executor, customer: str, event_name: str, lo: datetime, hi: datetime
) -> tuple[list[SentRow], set[datetime]]:
    """The delivered rows of one customer and meter with windows in [lo, hi), and the windows
    that also have rows still pending for that customer."""
    rows = await conn.fetch(
        f"""SELECT o.identifier, o.window_start, o.value, o.state, o.sent_at,
                   {CUSTOMER_SQL} AS current_customer
        FROM stripe_outbox o LEFT JOIN consumers c ON c.consumer = o.consumer
        WHERE o.event_name = $2 AND o.window_start >= $3 AND o.window_start < $4
          AND o.state IN ('sent', 'pending') AND {_ROW_CUSTOMER_SQL} = $1
        ORDER BY o.window_start, o.seq""",
        customer,
        event_name,
        lo,
        hi,
    )
    sent = [
        SentRow(
            identifier=row["identifier"],
            customer=customer,
            meter=event_name,
            window_start=row["window_start"],
            value=row["value"],
            sent_at=row["sent_at"],
            current_customer=row["current_customer"],
        )
        for row in rows
        if row["state"] == "sent"
    ]
    pending = {row["window_start"] for row in rows if row["state"] == "pending"}
    return sent, pending
