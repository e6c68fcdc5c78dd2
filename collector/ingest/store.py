"""Storing events: per transaction, a binary COPY of the events of every waiting request into a
session staging table, then one statement that registers their dedupe keys, appends the raw
events, registers new consumers and adds to the hourly rollup (and, for an hour already folded
into the month-so-far totals, to those too: collector/usage/rollups.py). No per-event round
trip. (COPY measured faster than one statement over unnested arrays at every batch size.) The
staging table is this module's own: what others need of a transaction leaves it as FreshUsage
values, summed here from the rows that were new.

Duplicates are rare (a plugin re-sends a batch whose answer it lost), so the statement first
runs as if there were none: plain inserts, which cost far less than ON CONFLICT and a join back
to the new rows. A key already stored makes it fail (unique violation) and roll back to a
savepoint; the same rows then go through the statement that skips known keys. Each request's
rows and tally are made as it arrives (stage_events), while it waits for a writer; a transaction
may copy several requests' rows in turn (copy_staged) before it stores them (finish_store)."""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from ..usage.rollups import ROLLUP_COLUMNS, ROLLUP_FIELDS, ROLLUP_LOCK_ID, rollup_add
from .dedupe import event_key
from .events import UsageEvent
from .fresh import FreshUsage, Pricing, UsageTally

# (column, SQL type) of the staging table, in COPY order.
BATCH_COLUMNS = (
    ("key", "bytea"),
    ("time", "timestamptz"),
    ("source", "text"),
    ("id", "text"),
    ("consumer", "text"),
    ("consumer_id", "text"),
    ("consumer_username", "text"),
    ("consumer_custom_id", "text"),
    ("route_id", "text"),
    ("route_name", "text"),
    ("service_id", "text"),
    ("service_name", "text"),
    ("provider", "text"),
    ("model", "text"),
    ("status", "int2"),
    ("streamed", "bool"),
    ("input_tokens", "int8"),
    ("output_tokens", "int8"),
    ("cached_input_tokens", "int8"),
    ("cache_write_input_tokens", "int8"),
    ("reasoning_tokens", "int8"),
    ("total_tokens", "int8"),
    ("latency_ms", "float8"),
    ("usage_missing", "bool"),
    ("cost_nanos", "int8"),
    ("price_book_version", "text"),
)
COPY_COLUMNS = tuple(name for name, _ in BATCH_COLUMNS)
EVENT_COLUMNS = ", ".join(COPY_COLUMNS[1:])
_KEY_COLUMNS = ("source", "id", "consumer", "model")  # compared byte-wise, as in the tables

# Private to each session and emptied at every commit; created when a connection opens.
_BYTEWISE = ' COLLATE "C"'
STAGING_DDL = "CREATE TEMP TABLE IF NOT EXISTS staging_events ({}) ON COMMIT DELETE ROWS".format(
    ", ".join(
        f"{name} {kind}{_BYTEWISE if name in _KEY_COLUMNS else ''}" for name, kind in BATCH_COLUMNS
    )
)

_SUMS = ", ".join(
    f"{expr} AS {name}"
    for expr, name in (
        ("count(*)", "events"),
        ("count(*) FILTER (WHERE usage_missing)", "usage_missing_events"),
        ("sum(input_tokens)", "input_tokens"),
        ("sum(output_tokens)", "output_tokens"),
        ("sum(cached_input_tokens)", "cached_input_tokens"),
        ("sum(cache_write_input_tokens)", "cache_write_input_tokens"),
        ("sum(reasoning_tokens)", "reasoning_tokens"),
        ("sum(total_tokens)", "total_tokens"),
        ("coalesce(sum(cost_nanos), 0)", "cost_nanos"),
    )
)
# From the rows that are new (`{fresh}`): the raw events, the consumers not known to exist ($1,
# in order), the hourly rollup, and the month-so-far totals for hours already closed (rare: late
# events). Rows are taken in key order so transactions of collectors sharing a database lock
# rollup rows in the same order and wait rather than deadlock.
_STORE_FRESH = f"""stored AS (
    INSERT INTO usage_events ({EVENT_COLUMNS}) SELECT {EVENT_COLUMNS} FROM {{fresh}}
), grown AS (
    SELECT consumer, coalesce(model, '') AS model, date_trunc('hour', time) AS hour, {_SUMS}
    FROM {{fresh}} GROUP BY 1, 2, 3
), seen AS (
    INSERT INTO consumers (consumer) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING
), hourly AS (
    INSERT INTO usage_hourly (consumer, model, hour, {ROLLUP_COLUMNS})
    SELECT consumer, model, hour, {ROLLUP_COLUMNS} FROM grown ORDER BY consumer, hour, model
    ON CONFLICT (consumer, hour, model) DO UPDATE SET {rollup_add("usage_hourly")}
), closed AS (
    INSERT INTO usage_monthly_closed (consumer, model, month, {ROLLUP_COLUMNS})
    SELECT consumer, model, date_trunc('month', hour),
           {", ".join(f"sum({f})" for f in ROLLUP_FIELDS)}
    FROM grown WHERE hour < (SELECT closed_through FROM usage_rollup_state)
    GROUP BY 1, 2, 3 ORDER BY 1, 3, 2
    ON CONFLICT (consumer, month, model) DO UPDATE SET {rollup_add("usage_monthly_closed")}
)"""

# No key stored before: every staged row is new. Keys go in (time, key) order, so two
# transactions racing with the same keys wait for each other rather than deadlock.
STORE_ALL_NEW = f"""WITH keys AS (
    INSERT INTO dedupe_keys (time, key) SELECT time, key FROM staging_events ORDER BY time, key
), {_STORE_FRESH.format(fresh="staging_events")}
SELECT time, key FROM staging_events WHERE false
"""

# Some keys may be stored: those are skipped; answers with the keys of the duplicates. Keys in a
# transaction are unique already (see stage_events), so the new ones join back to their rows
# without a DISTINCT, by a hash join (see BEGIN_STORE).
STORE_SKIPPING_KNOWN = f"""WITH new_keys AS (
    INSERT INTO dedupe_keys (time, key) SELECT time, key FROM staging_events ORDER BY time, key
    ON CONFLICT DO NOTHING
    RETURNING time, key
), fresh AS (
    SELECT s.* FROM staging_events s JOIN new_keys USING (time, key)
), {_STORE_FRESH.format(fresh="fresh")}
SELECT s.time, s.key FROM staging_events s
WHERE NOT EXISTS (SELECT 1 FROM new_keys n WHERE n.time = s.time AND n.key = s.key)
"""

# The temp table is never analyzed, so the planner misjudges the join of new keys back to their
# rows and picks a merge join that sorts every wide row; a hash join is far cheaper. The shared
# lock keeps the fold of closed hours (collector/usage/rollups.py) out while this transaction
# decides, by closed_through, where its events are counted; taken before the statement that
# reads closed_through, whose snapshot then sees any fold that finished. The savepoint is where
# a statement that met a stored key rolls back to.
BEGIN_STORE = (
    "SET LOCAL enable_mergejoin = off;"
    f" SELECT pg_advisory_xact_lock_shared({ROLLUP_LOCK_ID}); SAVEPOINT staged"
)

_KEY = COPY_COLUMNS.index("key")
_TIME = COPY_COLUMNS.index("time")
_CONSUMER = COPY_COLUMNS.index("consumer")
_CUSTOM_ID = COPY_COLUMNS.index("consumer_custom_id")
_MODEL = COPY_COLUMNS.index("model")
_TOTAL = COPY_COLUMNS.index("total_tokens")
_COST = COPY_COLUMNS.index("cost_nanos")
UNPRICED_MODELS_SHOWN = 100

EventRecord = tuple[object, ...]
Duplicates = set[tuple[bytes, datetime]]  # (key, time) of staged events stored before


@dataclass(frozen=True, slots=True)
class StoreResult:
    accepted: int
    duplicates: int


@dataclass(frozen=True, slots=True)
class StoredEvents:
    """One transaction's events, stored (not yet committed)."""

    results: list[StoreResult]  # one per request, in order
    fresh: list[FreshUsage]  # one per consumer with new events, in consumer order
    unpriced_models: list[str]  # models of the events the book could not price (at most 100)
    new_consumers: list[str] = field(default_factory=list)  # rows inserted if missing
    skipped_known: bool = False  # some keys might have been stored: duplicates were looked for
    known: int = 0  # events whose keys were stored before this transaction

    @property
    def unpriced_events(self) -> int:
        return sum(f.unpriced_events for f in self.fresh)


@dataclass(frozen=True, slots=True)
class StagedEvents:
    """The COPY rows of one or more requests' events, each (source, id, time) once, and their
    tally as if none was stored before: made as a request arrives, while it waits for a writer,
    so a writer only joins them up."""

    records: list[EventRecord]
    owners: list[int]  # the request of each row
    sizes: list[int]  # events per request, duplicates included
    tally: UsageTally
    keys: set[bytes]  # of the rows
    book: Pricing | None  # the one that priced them


def stage_events(
    requests: Sequence[Sequence[UsageEvent]], pricing: Pricing | None = None
) -> StagedEvents:
    """COPY rows for the events of several requests, each (source, id, time) once: the earliest
    copy wins and later ones count as duplicates. Without `pricing` events are stored with no
    cost."""
    records: list[EventRecord] = []
    owners: list[int] = []
    tally = UsageTally(len(requests))
    keys: set[bytes] = set()
    version = pricing.version if pricing is not None else None
    seen: set[tuple[bytes, datetime]] = set()
    for request, events in enumerate(requests):
        for e in events:
            key = event_key(e.source, e.id)
            if key in keys and (key, e.time) in seen:
                continue
            keys.add(key)
            seen.add((key, e.time))
            d = e.data
            cost = pricing.cost_nanos(d) if pricing is not None else None
            tally.add(request, e.subject, e.time, d.total_tokens, cost, d.consumer_custom_id)
            owners.append(request)
            records.append(
                (
                    key,
                    e.time,
                    e.source,
                    e.id,
                    e.subject,
                    d.consumer_id,
                    d.consumer_username,
                    d.consumer_custom_id,
                    d.route_id,
                    d.route_name,
                    d.service_id,
                    d.service_name,
                    d.provider,
                    d.model,
                    d.status,
                    d.streamed,
                    d.input_tokens,
                    d.output_tokens,
                    d.cached_input_tokens,
                    d.cache_write_input_tokens,
                    d.reasoning_tokens,
                    d.total_tokens,
                    d.latency_ms,
                    d.usage_missing,
                    cost,
                    version,
                )
            )
    return StagedEvents(records, owners, [len(e) for e in requests], tally, keys, pricing)


def joins(keys: set[bytes], part: StagedEvents, pricing: Pricing | None) -> bool:
    """Whether `part` can join rows of `keys` priced by `pricing` as they are: it holds none of
    their events and the same book priced it."""
    return part.book is pricing and keys.isdisjoint(part.keys)


def join_staged(
    parts: Sequence[StagedEvents],
    requests: Sequence[Sequence[UsageEvent]],
    pricing: Pricing | None,
) -> StagedEvents:
    """The staged requests of one transaction as one, priced by `pricing` (`requests` are all
    their events, in order). Staged apart, two requests may hold the same event, or a reload may
    have swapped the book between them: then (rarely) the requests are staged again together."""
    if len(parts) == 1 and parts[0].book is pricing:
        return parts[0]
    keys: set[bytes] = set()
    for part in parts:
        if not joins(keys, part, pricing):
            return stage_events(requests, pricing)
        keys |= part.keys
    owners: list[int] = []
    first = 0  # the first request of the part, in the joined numbering
    for part in parts:
        owners += [first + owner for owner in part.owners]
        first += len(part.sizes)
    return StagedEvents(
        [r for part in parts for r in part.records],
        owners,
        [size for part in parts for size in part.sizes],
        UsageTally.combine([part.tally for part in parts]),
        keys,
        pricing,
    )


def tally_new(staged: StagedEvents, duplicates: Duplicates) -> UsageTally:
    """The tally of the rows not in `duplicates` (after a transaction met stored keys)."""
    tally = UsageTally(len(staged.sizes))
    for r, request in zip(staged.records, staged.owners, strict=True):
        if (r[_KEY], r[_TIME]) not in duplicates:
            tally.add(request, r[_CONSUMER], r[_TIME], r[_TOTAL], r[_COST], r[_CUSTOM_ID])  # type: ignore[arg-type]
    return tally


async def begin_store(conn: asyncpg.Connection) -> None:
    """First in the transaction, before any copy_staged."""
    await conn.execute(BEGIN_STORE)


async def copy_staged(conn: asyncpg.Connection, staged: StagedEvents) -> None:
    """Stage rows; a transaction may copy several parts (joined afterwards for finish_store)."""
    if staged.records:
        await conn.copy_records_to_table(
            "staging_events", records=staged.records, columns=COPY_COLUMNS
        )


async def finish_store(
    conn: asyncpg.Connection,
    staged: StagedEvents,
    *,
    skip_known: bool = False,
    known_consumers: Container[str] = frozenset(),
) -> StoredEvents:
    """Store the staged events (all of `staged` copied) durably, one result per request, and sum
    up the new ones per consumer. The caller's commit is what makes the events acknowledged.
    `skip_known` goes straight to the statement that looks for duplicates (the caller saw some
    lately); `known_consumers` have a row already (committed), so none is inserted for them."""
    records, tally = staged.records, staged.tally
    if not records:
        return StoredEvents([StoreResult(0, size) for size in staged.sizes], [], [])
    new_consumers = sorted(c for c in tally.consumers() if c not in known_consumers)
    if not skip_known:
        try:
            await conn.fetch(STORE_ALL_NEW, new_consumers)
        except asyncpg.UniqueViolationError:
            skip_known = True
            # Back to before the COPY (one round trip less on the usual way than a savepoint
            # after it), and the rows staged again.
            await conn.execute("ROLLBACK TO SAVEPOINT staged")
            await copy_staged(conn, staged)
    duplicates: Duplicates = set()
    if skip_known:
        found = await conn.fetch(STORE_SKIPPING_KNOWN, new_consumers)
        duplicates = {(r["key"], r["time"]) for r in found}
        if duplicates:
            tally = tally_new(staged, duplicates)
    fresh = tally.fresh()
    results = [
        StoreResult(accepted, size - accepted)
        for accepted, size in zip(tally.accepted, staged.sizes, strict=True)
    ]
    unpriced: list[str] = []
    if any(f.unpriced_events for f in fresh):
        # Rare, so looked for only then: every event the book did not price, duplicates too.
        unpriced = list(dict.fromkeys(str(r[_MODEL] or "") for r in records if r[_COST] is None))[
            :UNPRICED_MODELS_SHOWN
        ]
    return StoredEvents(
        results, fresh, unpriced, new_consumers, skipped_known=skip_known, known=len(duplicates)
    )
