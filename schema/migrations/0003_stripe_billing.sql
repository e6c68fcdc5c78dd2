-- Stripe billing (docs/billing.md): cost in the rollups, the Kong custom_id of each consumer,
-- the outbox of meter-event deltas and what the sync knows of Stripe.

-- Cost per rollup window, so a `cost_micros` meter reads the rollups, never the raw events.
ALTER TABLE usage_hourly ADD COLUMN cost_nanos bigint NOT NULL DEFAULT 0;
ALTER TABLE usage_monthly ADD COLUMN cost_nanos bigint NOT NULL DEFAULT 0;
UPDATE usage_hourly h SET cost_nanos = e.cost_nanos
FROM (
    SELECT consumer COLLATE "C" AS consumer, coalesce(model, '') COLLATE "C" AS model,
           date_trunc('hour', time) AS hour, sum(cost_nanos) AS cost_nanos
    FROM usage_events WHERE cost_nanos IS NOT NULL GROUP BY 1, 2, 3
) e
WHERE h.consumer = e.consumer AND h.model = e.model AND h.hour = e.hour;
UPDATE usage_monthly m SET cost_nanos = e.cost_nanos
FROM (
    SELECT consumer COLLATE "C" AS consumer, coalesce(model, '') COLLATE "C" AS model,
           date_trunc('month', time) AS month, sum(cost_nanos) AS cost_nanos
    FROM usage_events WHERE cost_nanos IS NOT NULL GROUP BY 1, 2, 3
) e
WHERE m.consumer = e.consumer AND m.model = e.model AND m.month = e.month;

-- The consumer's Kong custom_id as last seen in its events: a `cus_...` one maps it to a Stripe
-- customer when no stripe_customer_id is set.
ALTER TABLE consumers ADD COLUMN custom_id text;
UPDATE consumers c SET custom_id = e.consumer_custom_id
FROM (
    SELECT DISTINCT ON (consumer) consumer COLLATE "C" AS consumer, consumer_custom_id
    FROM usage_events WHERE consumer_custom_id IS NOT NULL ORDER BY consumer, time DESC
) e
WHERE c.consumer = e.consumer;

-- Rollup windows with usage the outbox has not looked at yet (written with the usage).
CREATE TABLE stripe_dirty (
    consumer text COLLATE "C" NOT NULL,
    hour timestamptz NOT NULL,
    PRIMARY KEY (consumer, hour)
);

-- How much of each window and meter the outbox accounts for, in the field's own units.
CREATE TABLE stripe_windows (
    consumer text COLLATE "C" NOT NULL,
    event_name text COLLATE "C" NOT NULL,
    window_start timestamptz NOT NULL,
    covered bigint NOT NULL CHECK (covered >= 0),
    deltas integer NOT NULL CHECK (deltas >= 0),
    PRIMARY KEY (consumer, event_name, window_start)
);

-- Per consumer and meter, everything covered and sent: sent = floor(covered / scale) always, so
-- a remainder under one unit (a fraction of a micro of cost) waits for the next delta.
CREATE TABLE stripe_totals (
    consumer text COLLATE "C" NOT NULL,
    event_name text COLLATE "C" NOT NULL,
    covered bigint NOT NULL CHECK (covered >= 0),
    value bigint NOT NULL CHECK (value >= 0),
    PRIMARY KEY (consumer, event_name)
);

-- One immutable delta per row: what one meter event sends, under a deterministic identifier.
CREATE TABLE stripe_outbox (
    consumer text COLLATE "C" NOT NULL,
    event_name text COLLATE "C" NOT NULL,
    window_start timestamptz NOT NULL,
    seq integer NOT NULL CHECK (seq >= 1),
    identifier text NOT NULL UNIQUE CHECK (length(identifier) <= 100),
    value bigint NOT NULL CHECK (value > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'unbillable')),
    -- When a Stripe customer was first known for the row (null while the consumer is unmapped).
    sendable_at timestamptz,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT '-infinity',
    last_error text,
    customer text,
    sent_at timestamptz,
    answer text CHECK (answer IN ('created', 'duplicate')),
    PRIMARY KEY (consumer, event_name, window_start, seq)
);
CREATE INDEX stripe_outbox_pending ON stripe_outbox (window_start, seq) WHERE state = 'pending';
CREATE INDEX stripe_outbox_sent_day ON stripe_outbox (event_name, window_start)
    WHERE state = 'sent';

-- The meters found at Stripe by the last check, for every collector's status endpoint.
CREATE TABLE stripe_meters (
    event_name text COLLATE "C" PRIMARY KEY,
    field text NOT NULL,
    meter_id text,
    active boolean NOT NULL DEFAULT false,
    checked_at timestamptz NOT NULL DEFAULT now()
);

-- The sync's recent errors (the status shows the last 20).
CREATE TABLE stripe_errors (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    meter text,
    code text NOT NULL,
    message text NOT NULL
);

CREATE TABLE stripe_sync_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- Set once every window of the rollups has been marked for the outbox; cleared by a
    -- collector that runs without Stripe, so the next one with Stripe looks at all of them again.
    initialized_at timestamptz,
    leader text,
    leader_since timestamptz,
    last_cycle_at timestamptz
);
INSERT INTO stripe_sync_state (singleton) VALUES (true);
