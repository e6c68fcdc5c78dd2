-- token-meter 0002: the cost of each event, prepaid balances and the credit ledger.
-- Money is counted in nano-units (10^-9 of the price book's currency) as integers: every
-- published per-token price is a whole number of nano-units, so no rounding ever happens.

-- NULL cost: the event's model is not in the price book and the book says "flag" (counted in
-- a metric, logged); 0 for an event with no tokens. The version says which book priced it.
ALTER TABLE usage_events
    ADD COLUMN cost_nanos bigint,
    ADD COLUMN price_book_version text;

-- One row per prepaid consumer, updated in the same transaction as the events or the grant
-- that change it, so the balance is always exactly the sum of the ledger.
CREATE TABLE balances (
    consumer text COLLATE "C" PRIMARY KEY,
    balance_nanos bigint NOT NULL DEFAULT 0,
    granted_nanos bigint NOT NULL DEFAULT 0 CHECK (granted_nanos >= 0),
    burned_nanos bigint NOT NULL DEFAULT 0 CHECK (burned_nanos >= 0),
    -- At or under the consumer's low_balance_micros: set when crossing down (one warning per
    -- crossing, whichever collector sees it), cleared when a top-up lifts it above.
    low_balance boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK (balance_nanos = granted_nanos - burned_nanos)
);

-- The audit trail: every grant (once per idempotency key and consumer) and one burn per
-- consumer per ingest transaction (not per event). amount_nanos is signed: grants add,
-- burns subtract; balance_after_nanos is the balance once this entry applied.
CREATE TABLE credit_ledger (
    consumer text COLLATE "C" NOT NULL,
    entry_id bigint GENERATED ALWAYS AS IDENTITY,
    kind text NOT NULL CHECK (kind IN ('grant', 'burn')),
    amount_nanos bigint NOT NULL,
    balance_after_nanos bigint NOT NULL,
    idempotency_key text COLLATE "C",
    source text NOT NULL DEFAULT 'admin',
    events bigint,
    price_book_version text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, entry_id),
    CHECK ((kind = 'grant' AND amount_nanos > 0 AND idempotency_key IS NOT NULL)
        OR (kind = 'burn' AND amount_nanos < 0 AND idempotency_key IS NULL))
);
CREATE UNIQUE INDEX credit_ledger_grant_key ON credit_ledger (consumer, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
