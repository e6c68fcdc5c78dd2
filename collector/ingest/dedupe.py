"""Dedupe keys (schema/migrations/0006): (event time, digest of source and id), unique in
`dedupe_keys`, partitioned by UTC day. New keys land at the right edge of today's index, so the
part of the index that ingest touches stays small however much history is kept; keys past the
horizon go with their day's partition.

The horizon, kept consistent on both sides: ingest refuses an event older than
TOKEN_METER_DEDUPE_HORIZON_DAYS (events.py), and pruning forgets only keys a day older than that
(PRUNE_MARGIN: room for clocks that differ between collectors and for transactions in flight),
so a replay is either refused or finds its key."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg
import structlog

PRUNE_MARGIN = timedelta(days=1)
PRUNE_BATCH = 10_000
# Partitions made ahead: yesterday (a collector whose clock is behind) to the day after tomorrow
# (events may be up to 24 hours in the future).
DAYS_BEHIND, DAYS_AHEAD = 1, 2
# Dropping a partition locks the whole table for a moment (once a day): it waits for the ingest
# transactions in flight, and new ones wait behind it. Rather than hold ingest back behind a long
# transaction, give up after this and try at the next maintenance.
DROP_LOCK_TIMEOUT = "500ms"
# A gateway has a few sources (its data planes); the prefixes of more are made afresh.
SOURCES_REMEMBERED = 1024
_DAY_PARTITION = re.compile(r"^dedupe_keys_(\d{8})$")
_source_prefixes: dict[str, bytes] = {}

log = structlog.get_logger("token_meter.ingest")


def event_key(source: str, event_id: str) -> bytes:
    """The digest part of an event's dedupe key: 16 bytes of SHA-256 over (source, id), the
    source length-prefixed so that no two pairs hash the same input. The same as SQL's
    token_meter_event_key, which the migration used for the keys it moved."""
    prefix = _source_prefixes.get(source)
    if prefix is None:
        raw = source.encode("utf-8", "surrogatepass")
        prefix = len(raw).to_bytes(4, "big") + raw
        if len(_source_prefixes) < SOURCES_REMEMBERED:
            _source_prefixes[source] = prefix
    return hashlib.sha256(prefix + event_id.encode("utf-8", "surrogatepass")).digest()[:16]


# Any fixed 64-bit number, the one token_meter_ensure_key_partitions (migration 0006) takes:
# collectors making partitions at once take turns.
PARTITIONS_LOCK_ID = 7310312979478672500


async def ensure_key_partitions(conn: asyncpg.Connection, now: datetime) -> int:
    """Daily partitions around `now` (UTC); returns how many were made. Each is made on its own
    and then attached: attaching takes a lock that ingest's inserts do not wait for, where
    CREATE TABLE ... PARTITION OF (migration 0006's token_meter_ensure_key_partitions, for a
    database nobody writes to yet) would hold every insert back until the transactions in
    flight end. A day whose keys already sit in the default partition keeps them there."""
    today = now.astimezone(UTC).date()
    made = 0
    for n in range(-DAYS_BEHIND, DAYS_AHEAD + 1):
        day = today + timedelta(days=n)
        name = f"dedupe_keys_{day:%Y%m%d}"
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name):
            continue
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", PARTITIONS_LOCK_ID)
                if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name):
                    continue  # another collector made it meanwhile
                await conn.execute(f"CREATE TABLE {name} (LIKE dedupe_keys)")
                await conn.execute(
                    f"ALTER TABLE dedupe_keys ATTACH PARTITION {name}"
                    f" FOR VALUES FROM ('{_day_start(day).isoformat()}')"
                    f" TO ('{_day_start(day + timedelta(days=1)).isoformat()}')"
                )
        except asyncpg.CheckViolationError:
            log.warning(
                "dedupe_partition_not_made", partition=name, reason="default holds its keys"
            )
            continue
        made += 1
    return made


@dataclass(frozen=True, slots=True)
class Pruned:
    partitions: int  # whole days dropped
    keys: int  # keys deleted one by one from the default partition

    def __bool__(self) -> bool:
        return bool(self.partitions or self.keys)


def prune_cutoff(now: datetime, horizon: timedelta) -> datetime:
    """Keys of events before this instant are forgotten."""
    return now - horizon - PRUNE_MARGIN


async def prune_dedupe_keys(
    pool: asyncpg.Pool, horizon: timedelta, *, now: datetime | None = None
) -> Pruned:
    """Forget the keys of events older than the horizon plus a day: drop each day's partition
    once all of it is that old, and delete such keys from the default partition a bounded batch
    per transaction, so ingest never waits long on it. Safe: ingest refuses an event that old."""
    cutoff = prune_cutoff(now or datetime.now(UTC), horizon)
    dropped = 0
    async with pool.acquire() as conn:
        for day in await _day_partitions(conn):
            if _day_start(day + timedelta(days=1)) > cutoff:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL lock_timeout = '{DROP_LOCK_TIMEOUT}'")
                    await conn.execute(f"DROP TABLE dedupe_keys_{day:%Y%m%d}")
            except asyncpg.LockNotAvailableError:
                break  # busy: the next maintenance tries again
            dropped += 1
    deleted = 0
    while True:
        async with pool.acquire() as conn:
            count = await conn.fetchval(
                "WITH old AS (SELECT ctid FROM dedupe_keys_default WHERE time < $1 LIMIT $2),"
                " gone AS (DELETE FROM dedupe_keys_default d USING old WHERE d.ctid = old.ctid"
                " RETURNING 1) SELECT count(*) FROM gone",
                cutoff,
                PRUNE_BATCH,
            )
        deleted += int(count)
        if count < PRUNE_BATCH:
            return Pruned(dropped, deleted)


async def _day_partitions(conn: asyncpg.Connection) -> list[date]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'dedupe_keys'::regclass"
    )
    days = []
    for row in rows:
        match = _DAY_PARTITION.match(row["relname"])
        if match:
            days.append(datetime.strptime(match.group(1), "%Y%m%d").date())
    return sorted(days)


def _day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)
