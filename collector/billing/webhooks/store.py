"""The webhook tables (migration 0004), read and written inside the webhook's transaction.

Lock order, as everywhere (collector/accounts/store.py): the event's own row first (only its
duplicates wait on it), then `consumers` rows in consumer order, then this module's
subscription and invoice rows, then balances and the blocklist."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from ...blocklist.reasons import BlockReason
from ..store import CUSTOMER_SQL
from .events import InvoiceChange, SubscriptionState, WebhookEvent

UNPAID_STATES = ("failed", "overdue")


async def remember_event(conn: asyncpg.Connection, event: WebhookEvent) -> bool:
    """Record the event as taken; False when it was already (a replay). A concurrent delivery
    of the same id waits here for the first one's transaction, then finds it."""
    first = await conn.fetchval(
        """INSERT INTO stripe_webhook_events (event_id, type, created) VALUES ($1, $2, $3)
        ON CONFLICT DO NOTHING RETURNING true""",
        event.id,
        event.type,
        event.created,
    )
    return bool(first)


async def set_outcome(conn: asyncpg.Connection, event_id: str, outcome: str) -> None:
    await conn.execute(
        "UPDATE stripe_webhook_events SET outcome = $2 WHERE event_id = $1", event_id, outcome
    )


@dataclass(frozen=True, slots=True)
class CustomerConsumer:
    consumer: str
    explicit: bool  # mapped by stripe_customer_id (else by a `cus_` Kong custom_id)
    mapped: bool  # False: found only by a payment_overdue block naming the customer


async def lock_customer_consumers(
    conn: asyncpg.Connection, customer: str, *, with_overdue_blocks: bool = False
) -> list[CustomerConsumer]:
    """The consumers a Stripe customer maps to (contract 4: `stripe_customer_id`, else a `cus_`
    custom_id), their rows locked in consumer order; with `with_overdue_blocks`, also those
    blocked for an unpaid invoice of this customer (their mapping may have changed since)."""
    rows = await conn.fetch(
        f"""SELECT o.consumer, o.stripe_customer_id IS NOT NULL AS explicit,
                   o.consumer IN (SELECT c.consumer FROM consumers c WHERE {CUSTOMER_SQL} = $1)
                       AS mapped
        FROM consumers o
        WHERE o.consumer IN (
            SELECT c.consumer FROM consumers c WHERE {CUSTOMER_SQL} = $1
            UNION
            SELECT b.consumer FROM blocklist b
            WHERE $2 AND b.reason = $3 AND b.detail ->> 'stripe_customer_id' = $1)
        ORDER BY o.consumer
        FOR UPDATE OF o""",
        customer,
        with_overdue_blocks,
        BlockReason.PAYMENT_OVERDUE.value,
    )
    return [CustomerConsumer(r["consumer"], r["explicit"], r["mapped"]) for r in rows]


# -- subscriptions ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubscriptionRow:
    subscription_id: str
    live: bool
    started: datetime
    plan: str | None
    quota_set: bool
    monthly_token_quota: int | None


async def record_subscription(
    conn: asyncpg.Connection, state: SubscriptionState, event: WebhookEvent
) -> bool:
    """Store what the event says of its subscription unless a newer event already did
    (Stripe does not deliver in order). False: this event is older, nothing written."""
    written = await conn.fetchval(
        """INSERT INTO stripe_subscriptions AS s (subscription_id, customer, live, started,
            plan, quota_set, monthly_token_quota, event_created, event_id)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        ON CONFLICT (subscription_id) DO UPDATE SET customer = EXCLUDED.customer,
            live = EXCLUDED.live, started = EXCLUDED.started, plan = EXCLUDED.plan,
            quota_set = EXCLUDED.quota_set, monthly_token_quota = EXCLUDED.monthly_token_quota,
            event_created = EXCLUDED.event_created, event_id = EXCLUDED.event_id,
            updated_at = now()
        WHERE s.event_created <= EXCLUDED.event_created
        RETURNING true""",
        state.subscription_id,
        state.customer,
        state.live,
        state.started,
        state.plan,
        state.quota_set,
        state.monthly_token_quota,
        event.created,
        event.id,
    )
    return bool(written)


async def customer_subscriptions(conn: asyncpg.Connection, customer: str) -> list[SubscriptionRow]:
    rows = await conn.fetch(
        """SELECT subscription_id, live, started, plan, quota_set, monthly_token_quota
        FROM stripe_subscriptions WHERE customer = $1""",
        customer,
    )
    return [SubscriptionRow(**dict(row)) for row in rows]


# -- invoices ---------------------------------------------------------------------------------


async def record_invoice(
    conn: asyncpg.Connection, change: InvoiceChange, event_created: datetime
) -> bool:
    """Store an invoice's new state; `paid` and `voided` are final, so a late failure event
    of a settled invoice writes nothing (False)."""
    written = await conn.fetchval(
        """INSERT INTO stripe_invoices AS i (invoice_id, customer, state, event_created)
        VALUES ($1, $2, $3, $4)
        ON CONFLICT (invoice_id) DO UPDATE SET customer = EXCLUDED.customer,
            state = EXCLUDED.state, event_created = EXCLUDED.event_created, updated_at = now()
        WHERE i.state = ANY($5::text[])
        RETURNING true""",
        change.invoice_id,
        change.customer,
        change.state,
        event_created,
        list(UNPAID_STATES),
    )
    return bool(written)


async def unpaid_invoices(conn: asyncpg.Connection, customer: str) -> list[str]:
    """The customer's invoices still failed or overdue, oldest news first."""
    rows = await conn.fetch(
        """SELECT invoice_id FROM stripe_invoices
        WHERE customer = $1 AND state = ANY($2::text[])
        ORDER BY event_created, invoice_id""",
        customer,
        list(UNPAID_STATES),
    )
    return [row["invoice_id"] for row in rows]


async def overdue_blocked(conn: asyncpg.Connection, consumers: Sequence[str]) -> set[str]:
    """Which of `consumers` are on the blocklist for payment_overdue now."""
    rows = await conn.fetch(
        "SELECT consumer FROM blocklist WHERE reason = $2 AND consumer = ANY($1::text[])",
        list(consumers),
        BlockReason.PAYMENT_OVERDUE.value,
    )
    return {row["consumer"] for row in rows}
