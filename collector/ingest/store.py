"""Storing a batch: one transaction, a COPY into a session staging table, then one statement
that dedupes by (source, id), appends the raw events, registers new consumers and updates the
hourly and monthly rollups. No per-event round trip."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from .events import UsageEvent

STAGING_COLUMNS = (
    "ord",
    "time",
    "source",
    "id",
    "consumer",
    "consumer_id",
    "consumer_username",
    "consumer_custom_id",
    "route_id",
    "route_name",
    "service_id",
    "service_name",
    "provider",
    "model",
    "status",
    "streamed",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_input_tokens",
    "reasoning_tokens",
    "total_tokens",
    "latency_ms",
    "usage_missing",
)
EVENT_COLUMNS = ", ".join(STAGING_COLUMNS[1:])

_ROLLUP_SUMS = """count(*), count(*) FILTER (WHERE usage_missing),
        sum(input_tokens), sum(output_tokens), sum(cached_input_tokens),
        sum(cache_write_input_tokens), sum(reasoning_tokens), sum(total_tokens)"""
_ROLLUP_ADD = """events = {t}.events + EXCLUDED.events,
        usage_missing_events = {t}.usage_missing_events + EXCLUDED.usage_missing_events,
        input_tokens = {t}.input_tokens + EXCLUDED.input_tokens,
        output_tokens = {t}.output_tokens + EXCLUDED.output_tokens,
        cached_input_tokens = {t}.cached_input_tokens + EXCLUDED.cached_input_tokens,
        cache_write_input_tokens = {t}.cache_write_input_tokens
                                   + EXCLUDED.cache_write_input_tokens,
        reasoning_tokens = {t}.reasoning_tokens + EXCLUDED.reasoning_tokens,
        total_tokens = {t}.total_tokens + EXCLUDED.total_tokens"""
_ROLLUP_COLUMNS = """events, usage_missing_events, input_tokens, output_tokens,
        cached_input_tokens, cache_write_input_tokens, reasoning_tokens, total_tokens"""

# Rows are taken in key order everywhere so concurrent batches lock in the same order. The
# first occurrence of a key inside one batch wins; a later one counts as a duplicate.
STORE_STAGED = f"""
WITH new_keys AS (
    INSERT INTO event_keys (source, id)
    SELECT source, id FROM staging_events ORDER BY source, id
    ON CONFLICT DO NOTHING
    RETURNING source, id
), fresh AS (
    SELECT DISTINCT ON (s.source, s.id) s.*
    FROM staging_events s JOIN new_keys k ON s.source = k.source AND s.id = k.id
    ORDER BY s.source, s.id, s.ord
), stored AS (
    INSERT INTO usage_events ({EVENT_COLUMNS}) SELECT {EVENT_COLUMNS} FROM fresh
), seen AS (
    INSERT INTO consumers (consumer)
    SELECT DISTINCT consumer FROM fresh ORDER BY consumer
    ON CONFLICT DO NOTHING
), hourly AS (
    INSERT INTO usage_hourly (consumer, model, hour, {_ROLLUP_COLUMNS})
    SELECT consumer, coalesce(model, ''), date_trunc('hour', time), {_ROLLUP_SUMS}
    FROM fresh GROUP BY 1, 2, 3 ORDER BY 1, 3, 2
    ON CONFLICT (consumer, hour, model) DO UPDATE SET {_ROLLUP_ADD.format(t="usage_hourly")}
), monthly AS (
    INSERT INTO usage_monthly (consumer, model, month, {_ROLLUP_COLUMNS})
    SELECT consumer, coalesce(model, ''), date_trunc('month', time), {_ROLLUP_SUMS}
    FROM fresh GROUP BY 1, 2, 3 ORDER BY 1, 3, 2
    ON CONFLICT (consumer, month, model) DO UPDATE SET {_ROLLUP_ADD.format(t="usage_monthly")}
)
SELECT count(*) FROM fresh
"""


@dataclass(frozen=True, slots=True)
class StoreResult:
    accepted: int
    duplicates: int
    consumers: frozenset[str]


def event_records(events: Sequence[UsageEvent]) -> list[tuple[object, ...]]:
    records: list[tuple[object, ...]] = []
    for ordinal, e in enumerate(events):
        d = e.data
        records.append(
            (
                ordinal,
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
            )
        )
    return records


async def store_events(conn: asyncpg.Connection, events: Sequence[UsageEvent]) -> StoreResult:
    """Store `events` durably; must run inside a transaction on a pool connection (whose
    staging table empties at commit). Returns how many were new."""
    if not events:
        return StoreResult(0, 0, frozenset())
    await conn.copy_records_to_table(
        "staging_events", records=event_records(events), columns=STAGING_COLUMNS
    )
    accepted = await conn.fetchval(STORE_STAGED)
    return StoreResult(
        accepted=accepted,
        duplicates=len(events) - accepted,
        consumers=frozenset(e.subject for e in events),
    )
