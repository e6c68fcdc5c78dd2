-- token-meter 0006: ingest that stays fast as history grows (docs/architecture.md, "How usage
-- is stored"). Dedupe keys led by the event's time, in daily partitions dropped past the
-- horizon; month totals derived from the hourly rollup instead of written by every batch.

-- 1. Dedupe keys. The 0001 keys were bare digests: each new one landed at a random place in an
-- index as large as the horizon, which stops fitting in memory after a few days of a busy
-- gateway. Led by the event's time (exact, to the microsecond), new keys land at the right edge
-- of the index of today's partition, the only part that stays hot. An event's time never
-- changes across the plugin's retries; the same (source, id) sent again with another time is
-- another key, hence counted again (docs/architecture.md, "Nothing counted twice").

-- The digest the collector makes (collector/ingest/dedupe.py, which a test holds to this one):
-- 16 bytes of SHA-256 over the length-prefixed source and the id, all UTF-8.
CREATE FUNCTION token_meter_event_key(source text, id text) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT substring(sha256(int4send(octet_length(convert_to(source, 'UTF8')))
                            || convert_to(source, 'UTF8') || convert_to(id, 'UTF8'))
                     FROM 1 FOR 16)
$$;

CREATE TABLE dedupe_keys (
    time timestamptz NOT NULL,
    key bytea NOT NULL,
    PRIMARY KEY (time, key)
) PARTITION BY RANGE (time);
-- Catches a key whose day has no partition (one older than the partitions made, after a longer
-- horizon was set): the maintenance deletes its old rows by range.
CREATE TABLE dedupe_keys_default PARTITION OF dedupe_keys DEFAULT;

-- Creates the UTC days' partitions dedupe_keys_YYYYMMDD from first_day to last_day if missing;
-- returns how many it made. A day whose keys already sit in the default partition keeps them
-- there.
CREATE FUNCTION token_meter_ensure_key_partitions(first_day date, last_day date) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    day date := first_day;
    part text;
    made integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(7310312979478672500);
    WHILE day <= last_day LOOP
        part := 'dedupe_keys_' || to_char(day, 'YYYYMMDD');
        IF to_regclass(part) IS NULL THEN
            BEGIN
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF dedupe_keys FOR VALUES FROM (%L) TO (%L)',
                    part, day::timestamp AT TIME ZONE 'UTC',
                    (day + 1)::timestamp AT TIME ZONE 'UTC');
                made := made + 1;
            EXCEPTION WHEN check_violation THEN
                RAISE NOTICE 'partition % not created: the default partition holds its keys', part;
            END;
        END IF;
        day := day + 1;
    END LOOP;
    RETURN made;
END $$;

-- The keys held today are those of the events received since the oldest key still kept
-- (0001 pruned by arrival); their days get partitions, then the keys move, made anew from the
-- events' (source, id) with the digest above.
DO $$
DECLARE
    since timestamptz := (SELECT min(received_at) FROM event_keys);
    day date;
BEGIN
    PERFORM token_meter_ensure_key_partitions(
        (now() AT TIME ZONE 'UTC')::date - 1, (now() AT TIME ZONE 'UTC')::date + 2);
    IF since IS NULL THEN
        RETURN;
    END IF;
    FOR day IN
        SELECT DISTINCT (time AT TIME ZONE 'UTC')::date FROM usage_events
        WHERE received_at >= since
    LOOP
        PERFORM token_meter_ensure_key_partitions(day, day);
    END LOOP;
    INSERT INTO dedupe_keys (time, key)
    SELECT time, token_meter_event_key(source, id) FROM usage_events WHERE received_at >= since
    ON CONFLICT DO NOTHING;
END $$;
DROP TABLE event_keys;

-- 2. Month totals. Ingest adds to the hourly rollup only; the month is its closed hours (the
-- hours before closed_through, summed per consumer and model by the maintenance, which moves
-- closed_through on while ingest waits: collector/usage/rollups.py) plus the hourly rows from
-- closed_through on. An event for a closed hour adds to both, in its ingest transaction.
CREATE TABLE usage_rollup_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    closed_through timestamptz NOT NULL
);
INSERT INTO usage_rollup_state (closed_through)
VALUES (date_trunc('hour', now(), 'UTC') - interval '1 hour');

-- The hours the maintenance folds are found by time.
CREATE INDEX usage_hourly_hour ON usage_hourly (hour);

CREATE TABLE usage_monthly_closed (
    consumer text COLLATE "C" NOT NULL,
    model text COLLATE "C" NOT NULL,
    month timestamptz NOT NULL,
    events bigint NOT NULL,
    usage_missing_events bigint NOT NULL,
    input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    cached_input_tokens bigint NOT NULL,
    cache_write_input_tokens bigint NOT NULL,
    reasoning_tokens bigint NOT NULL,
    total_tokens bigint NOT NULL,
    cost_nanos bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (consumer, month, model)
);

-- The 0001 month rows, less what their still open hours hold: the derived totals below then
-- equal the old ones exactly.
INSERT INTO usage_monthly_closed
SELECT m.consumer, m.model, m.month,
       m.events - coalesce(o.events, 0),
       m.usage_missing_events - coalesce(o.usage_missing_events, 0),
       m.input_tokens - coalesce(o.input_tokens, 0),
       m.output_tokens - coalesce(o.output_tokens, 0),
       m.cached_input_tokens - coalesce(o.cached_input_tokens, 0),
       m.cache_write_input_tokens - coalesce(o.cache_write_input_tokens, 0),
       m.reasoning_tokens - coalesce(o.reasoning_tokens, 0),
       m.total_tokens - coalesce(o.total_tokens, 0),
       m.cost_nanos - coalesce(o.cost_nanos, 0)
FROM usage_monthly m
LEFT JOIN (
    SELECT consumer, model, date_trunc('month', hour, 'UTC') AS month,
           sum(events) AS events, sum(usage_missing_events) AS usage_missing_events,
           sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
           sum(cached_input_tokens) AS cached_input_tokens,
           sum(cache_write_input_tokens) AS cache_write_input_tokens,
           sum(reasoning_tokens) AS reasoning_tokens, sum(total_tokens) AS total_tokens,
           sum(cost_nanos) AS cost_nanos
    FROM usage_hourly
    WHERE hour >= (SELECT closed_through FROM usage_rollup_state)
    GROUP BY 1, 2, 3
) o ON o.consumer = m.consumer AND o.model = m.model AND o.month = m.month;
DELETE FROM usage_monthly_closed
WHERE events = 0 AND usage_missing_events = 0 AND input_tokens = 0 AND output_tokens = 0
  AND cached_input_tokens = 0 AND cache_write_input_tokens = 0 AND reasoning_tokens = 0
  AND total_tokens = 0 AND cost_nanos = 0;
DROP TABLE usage_monthly;

-- What usage_monthly held, derived: one row per consumer, model and UTC month.
CREATE VIEW usage_monthly AS
SELECT consumer, model, month,
       sum(events)::bigint AS events,
       sum(usage_missing_events)::bigint AS usage_missing_events,
       sum(input_tokens)::bigint AS input_tokens,
       sum(output_tokens)::bigint AS output_tokens,
       sum(cached_input_tokens)::bigint AS cached_input_tokens,
       sum(cache_write_input_tokens)::bigint AS cache_write_input_tokens,
       sum(reasoning_tokens)::bigint AS reasoning_tokens,
       sum(total_tokens)::bigint AS total_tokens,
       sum(cost_nanos)::bigint AS cost_nanos
FROM (
    SELECT consumer, model, month, events, usage_missing_events, input_tokens, output_tokens,
           cached_input_tokens, cache_write_input_tokens, reasoning_tokens, total_tokens,
           cost_nanos
    FROM usage_monthly_closed
    UNION ALL
    SELECT consumer, model, date_trunc('month', hour, 'UTC'), events, usage_missing_events,
           input_tokens, output_tokens, cached_input_tokens, cache_write_input_tokens,
           reasoning_tokens, total_tokens, cost_nanos
    FROM usage_hourly
    WHERE hour >= (SELECT closed_through FROM usage_rollup_state)
) parts
GROUP BY consumer, model, month;
