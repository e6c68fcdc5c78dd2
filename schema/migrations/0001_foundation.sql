-- token-meter foundation: consumers, raw events (partitioned by time), dedupe keys, rollups,
-- and the versioned blocklist. SQL kept within what Citus supports, so the same schema can be
-- distributed by consumer later.

-- Identifiers compare byte-wise (COLLATE "C"): faster than a locale's rules for the sorts and
-- index lookups of every batch, and the same on every server whatever its locale.
CREATE TABLE consumers (
    consumer text COLLATE "C" PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    monthly_token_quota bigint CHECK (monthly_token_quota IS NULL OR monthly_token_quota >= 0),
    stripe_customer_id text,
    plan text,
    prepaid boolean NOT NULL DEFAULT false,
    overdraft_micros bigint NOT NULL DEFAULT 0 CHECK (overdraft_micros >= 0),
    low_balance_micros bigint,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Dedupe lives in its own small table: a unique index on the partitioned events table would
-- have to include the partition key. Pruned past the replay horizon by received_at. The key is
-- a 16-byte BLAKE2b digest of (source, id), made by the collector (ingest/store.py): a short
-- fixed-size key keeps the index small and its inserts fast, whatever the ids look like.
CREATE TABLE event_keys (
    key bytea PRIMARY KEY CHECK (length(key) = 16),
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX event_keys_received_at ON event_keys USING brin (received_at);

CREATE TABLE usage_events (
    time timestamptz NOT NULL,
    source text NOT NULL,
    id text NOT NULL,
    consumer text NOT NULL,
    consumer_id text,
    consumer_username text,
    consumer_custom_id text,
    route_id text,
    route_name text,
    service_id text,
    service_name text,
    provider text,
    model text,
    status smallint,
    streamed boolean NOT NULL,
    input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    cached_input_tokens bigint NOT NULL,
    cache_write_input_tokens bigint NOT NULL,
    reasoning_tokens bigint NOT NULL,
    total_tokens bigint NOT NULL,
    latency_ms double precision,
    usage_missing boolean NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (time);
CREATE TABLE usage_events_default PARTITION OF usage_events DEFAULT;
CREATE INDEX usage_events_time ON usage_events USING brin (time);

-- Creates the monthly partitions around `at` (previous, current, next month) if missing.
CREATE FUNCTION token_meter_ensure_partitions(at timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamptz;
    part text;
BEGIN
    PERFORM pg_advisory_xact_lock(7310312979478672499);
    FOR i IN -1..1 LOOP
        month_start := date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                       + make_interval(months => i);
        part := 'usage_events_' || to_char(month_start AT TIME ZONE 'UTC', 'YYYYMM');
        IF to_regclass(part) IS NULL THEN
            BEGIN
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF usage_events FOR VALUES FROM (%L) TO (%L)',
                    part, month_start, month_start + interval '1 month');
            EXCEPTION WHEN check_violation THEN
                -- Rows for that month already sit in the default partition: leave them there.
                RAISE NOTICE 'partition % not created: default partition holds its rows', part;
            END;
        END IF;
    END LOOP;
END $$;
SELECT token_meter_ensure_partitions(now());

-- Rollups: one row per consumer, model ('' when unknown) and UTC hour / month. Every batch
-- updates most of the current rows; half-empty pages let those updates stay on their page
-- (HOT: no new index entry), which makes them several times cheaper.
CREATE TABLE usage_hourly (
    consumer text COLLATE "C" NOT NULL,
    model text COLLATE "C" NOT NULL,
    hour timestamptz NOT NULL,
    events bigint NOT NULL,
    usage_missing_events bigint NOT NULL,
    input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    cached_input_tokens bigint NOT NULL,
    cache_write_input_tokens bigint NOT NULL,
    reasoning_tokens bigint NOT NULL,
    total_tokens bigint NOT NULL,
    PRIMARY KEY (consumer, hour, model)
) WITH (fillfactor = 50);

CREATE TABLE usage_monthly (
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
    PRIMARY KEY (consumer, month, model)
) WITH (fillfactor = 50);

-- The blocklist: one row per consumer and reason. Every change bumps the single version
-- counter and notifies every collector listening on the channel, in the same transaction.
CREATE TABLE blocklist (
    consumer text COLLATE "C" NOT NULL,
    reason text NOT NULL CHECK (reason IN ('insufficient_credits', 'quota_exceeded')),
    detail jsonb NOT NULL DEFAULT '{}'::jsonb,
    since timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, reason)
);

CREATE TABLE blocklist_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version bigint NOT NULL
);
INSERT INTO blocklist_state (singleton, version) VALUES (true, 1);

CREATE FUNCTION token_meter_blocklist_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    new_version bigint;
BEGIN
    UPDATE blocklist_state SET version = version + 1 RETURNING version INTO new_version;
    PERFORM pg_notify('token_meter_blocklist', new_version::text);
    RETURN NULL;
END $$;

CREATE TRIGGER blocklist_changed
AFTER INSERT OR UPDATE OR DELETE ON blocklist
FOR EACH ROW EXECUTE FUNCTION token_meter_blocklist_changed();
