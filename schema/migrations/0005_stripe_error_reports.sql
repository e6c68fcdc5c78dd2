-- Stripe's asynchronous error reports (docs/billing.md, "The v2 meter event stream"): each
-- `v1.billing.meter.error_report_triggered` thin event the webhook endpoint took, kept until the
-- sync leader has fetched it from Stripe (a thin event carries no data, and the webhook makes no
-- Stripe call) and applied it to the outbox, in one transaction with the outbox's changes.
CREATE TABLE stripe_error_reports (
    event_id text COLLATE "C" PRIMARY KEY,
    meter_id text,
    received_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    -- Set once applied (or once Stripe no longer has the event); applied rows are pruned.
    applied_at timestamptz
);
CREATE INDEX stripe_error_reports_due ON stripe_error_reports (next_attempt_at)
    WHERE applied_at IS NULL;
