-- Stripe webhooks (docs/billing.md, "Webhooks"): the events already taken, the subscriptions
-- and unpaid invoices they tell of, the `payment_overdue` block, and the consumer lookup by
-- Stripe customer.

-- A new reason. Precedence lives in the collector (collector/blocklist/reasons.py):
-- insufficient_credits > payment_overdue > quota_exceeded.
ALTER TABLE blocklist DROP CONSTRAINT blocklist_reason_check;
ALTER TABLE blocklist ADD CONSTRAINT blocklist_reason_check
    CHECK (reason IN ('insufficient_credits', 'payment_overdue', 'quota_exceeded'));

-- A webhook names a Stripe customer; this finds its consumers without a scan. The expression
-- is collector/billing/store.py CUSTOMER_SQL's, so a query written with it uses the index.
CREATE INDEX consumers_stripe_customer ON consumers (
    (coalesce(stripe_customer_id, CASE WHEN custom_id LIKE 'cus\_%' THEN custom_id END))
);

-- Every signed event taken, by Stripe's event id, written in the transaction that applies it:
-- a replay finds its id here and changes nothing. A refused event (bad signature) is never
-- written, so the same id sent again, validly signed, is taken.
CREATE TABLE stripe_webhook_events (
    event_id text COLLATE "C" PRIMARY KEY,
    type text NOT NULL,
    created timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    outcome text
);

-- What the latest event of each subscription said (Stripe does not deliver events in order:
-- an older event than the one recorded is not applied).
CREATE TABLE stripe_subscriptions (
    subscription_id text COLLATE "C" PRIMARY KEY,
    customer text COLLATE "C" NOT NULL,
    live boolean NOT NULL,
    started timestamptz NOT NULL,
    plan text,
    -- Whether the subscription's prices carry `token_meter_monthly_quota`; if so,
    -- monthly_token_quota is what they say (NULL: unlimited).
    quota_set boolean NOT NULL,
    monthly_token_quota bigint CHECK (monthly_token_quota IS NULL OR monthly_token_quota >= 0),
    event_created timestamptz NOT NULL,
    event_id text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_subscriptions_customer ON stripe_subscriptions (customer);

-- Invoices whose payment failed or that are overdue, and what became of them: `paid` and
-- `voided` are final (a late failure event of a paid invoice changes nothing). A customer with
-- a `failed` or `overdue` invoice is blocked with payment_overdue (TOKEN_METER_BLOCK_ON_OVERDUE).
CREATE TABLE stripe_invoices (
    invoice_id text COLLATE "C" PRIMARY KEY,
    customer text COLLATE "C" NOT NULL,
    state text NOT NULL CHECK (state IN ('failed', 'overdue', 'paid', 'voided')),
    event_created timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stripe_invoices_unpaid ON stripe_invoices (customer)
    WHERE state IN ('failed', 'overdue');
