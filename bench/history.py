"""History for the ingest benchmark: events already stored, as ingest and the maintenance
would have left them (raw events, their dedupe keys, the hourly rollup, the totals of closed
hours, the consumers), written by SQL on the server so that millions take a minute or two."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import asyncpg

MODELS = [
    ("openai", "gpt-4o-2024-08-06"),
    ("openai", "gpt-4o-mini"),
    ("openai", "gpt-4.1"),
    ("openai", "o3-mini"),
    ("anthropic", "claude-sonnet-4-20250514"),
    ("anthropic", "claude-3-5-haiku-20241022"),
]
CONSUMERS = 500
HISTORY = timedelta(days=30)

_PROVIDERS = ", ".join(f"'{p}'" for p, _ in MODELS)
_MODEL_NAMES = ", ".join(f"'{m}'" for _, m in MODELS)
# $1 events, evenly over [$2, $3); the rows look like make_events' (same consumers, models and
# sizes). Keys by the collector's own digest (token_meter_event_key, migration 0006).
PRELOAD_EVENTS = f"""
INSERT INTO usage_events (time, source, id, consumer, consumer_id, consumer_username, route_name,
    service_name, provider, model, status, streamed, input_tokens, output_tokens,
    cached_input_tokens, cache_write_input_tokens, reasoning_tokens, total_tokens, latency_ms,
    usage_missing, cost_nanos, price_book_version)
SELECT $2::timestamptz + ($3::timestamptz - $2::timestamptz) * (g::float8 / $1::bigint),
       'kong://dp-' || (g % 4) || '/token-meter', 'preload-' || g,
       'customer-' || lpad((g * 7919 % {CONSUMERS})::text, 4, '0'), md5(g::text),
       'customer-' || lpad((g * 7919 % {CONSUMERS})::text, 4, '0'), 'chat',
       m.provider, m.provider, m.model, 200, g % 5 < 2,
       t.input, t.output, 0, 0, 0, t.input + t.output, 1234.5, false,
       t.input * 2500 + t.output * 10000, 'preload'
FROM generate_series(0, $1::bigint - 1) AS g
CROSS JOIN LATERAL (SELECT 20 + (g * 2654435761 % 7980) AS input,
                           1 + (g * 40503 % 1999) AS output) AS t
CROSS JOIN LATERAL (SELECT (ARRAY[{_PROVIDERS}])[1 + g % 6] AS provider,
                           (ARRAY[{_MODEL_NAMES}])[1 + g % 6] AS model) AS m
"""
PRELOAD_ROLLUPS = """
INSERT INTO dedupe_keys (time, key)
SELECT time, token_meter_event_key(source, id) FROM usage_events;
INSERT INTO consumers (consumer) SELECT DISTINCT consumer FROM usage_events ON CONFLICT DO NOTHING;
INSERT INTO usage_hourly (consumer, model, hour, events, usage_missing_events, input_tokens,
    output_tokens, cached_input_tokens, cache_write_input_tokens, reasoning_tokens, total_tokens,
    cost_nanos)
SELECT consumer, model, date_trunc('hour', time), count(*), 0, sum(input_tokens),
       sum(output_tokens), 0, 0, 0, sum(total_tokens), sum(cost_nanos)
FROM usage_events GROUP BY 1, 2, 3;
INSERT INTO usage_monthly_closed (consumer, model, month, events, usage_missing_events,
    input_tokens, output_tokens, cached_input_tokens, cache_write_input_tokens, reasoning_tokens,
    total_tokens, cost_nanos)
SELECT consumer, model, date_trunc('month', hour), sum(events), 0, sum(input_tokens),
       sum(output_tokens), 0, 0, 0, sum(total_tokens), sum(cost_nanos)
FROM usage_hourly WHERE hour < (SELECT closed_through FROM usage_rollup_state) GROUP BY 1, 2, 3;
"""


async def preload(url: str, count: int, until: datetime) -> float:
    """Store `count` events over the HISTORY before `until`; returns the seconds it took."""
    started = time.perf_counter()
    conn = await asyncpg.connect(url, server_settings={"timezone": "UTC"})
    try:
        if count:
            first, last = (until - HISTORY).date(), until.date()
            await conn.execute("SELECT token_meter_ensure_key_partitions($1, $2)", first, last)
            await conn.execute(PRELOAD_EVENTS, count, until - HISTORY, until)
            await conn.execute(PRELOAD_ROLLUPS)
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return time.perf_counter() - started
