"""SQL for accounts and the credit ledger, and what the blocklist rules read, all run inside the
caller's transaction. (The blocklist's rows are written by collector/blocklist/store.py.)

Lock order, the same in every transaction so they wait for, never deadlock with, each other:
rollup rows (ingest only), then `consumers` rows in consumer order (the per-consumer point where
balance and quota decisions serialize), then `balances` rows, then the blocklist (whose trigger
updates the single version row)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from ..ingest.fresh import FreshUsage
from .model import ACCOUNT_FIELDS, Account, CreditGrant
from .rules import ConsumerState

# Only consumers a rule may apply to are locked (and in consumer order): locking every consumer
# of every batch would cost each ingest transaction a row write per consumer. The one race this
# leaves (a PUT giving a consumer its first quota while that consumer's first event of a new
# model this month is being stored: the PUT cannot see that rollup row yet) is closed by the
# next event of that consumer or by the periodic sweep, whichever comes first.
LOCK_GOVERNED = """
SELECT c.consumer, c.prepaid
FROM consumers c
WHERE c.consumer = ANY($1::text[])
  AND (c.prepaid OR c.monthly_token_quota IS NOT NULL
       OR EXISTS (SELECT 1 FROM blocklist bl WHERE bl.consumer = c.consumer))
ORDER BY c.consumer
FOR UPDATE OF c
"""

BURN = """
WITH burn AS (
    SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[]) AS b(consumer, nanos, events)
), burned AS (
    UPDATE balances SET balance_nanos = balances.balance_nanos - burn.nanos,
                        burned_nanos = balances.burned_nanos + burn.nanos,
                        updated_at = now()
    FROM burn WHERE balances.consumer = burn.consumer
    RETURNING balances.consumer, balances.balance_nanos, burn.nanos, burn.events
)
INSERT INTO credit_ledger
    (consumer, kind, amount_nanos, balance_after_nanos, events, price_book_version, source)
SELECT consumer, 'burn', -nanos, balance_nanos, events, $4, 'usage' FROM burned
"""

READ_STATES = """
SELECT c.consumer, c.prepaid, c.monthly_token_quota, c.overdraft_micros, c.low_balance_micros,
       b.balance_nanos, coalesce(b.low_balance, false) AS low_balance,
       CASE WHEN c.monthly_token_quota IS NULL THEN 0 ELSE coalesce(
           (SELECT sum(u.total_tokens) FROM usage_monthly u
            WHERE u.consumer = c.consumer AND u.month = $2), 0)::int8
       END AS month_tokens,
       ARRAY(SELECT bl.reason FROM blocklist bl WHERE bl.consumer = c.consumer) AS blocked
FROM consumers c LEFT JOIN balances b ON b.consumer = c.consumer
WHERE c.consumer = ANY($1::text[])
ORDER BY c.consumer
FOR UPDATE OF c
"""

SET_LOW_BALANCE = """
UPDATE balances b SET low_balance = t.low
FROM unnest($1::text[], $2::bool[]) AS t(consumer, low)
WHERE b.consumer = t.consumer
"""

GOVERNED_CONSUMERS = """
SELECT consumer FROM consumers WHERE prepaid OR monthly_token_quota IS NOT NULL
UNION
SELECT consumer FROM blocklist
ORDER BY 1
"""

ACCOUNT = """
SELECT c.consumer, c.prepaid, b.balance_nanos, coalesce(b.low_balance, false) AS low_balance,
       c.monthly_token_quota, c.stripe_customer_id, c.plan, c.overdraft_micros,
       c.low_balance_micros, c.created_at, c.updated_at
FROM consumers c LEFT JOIN balances b ON b.consumer = c.consumer
WHERE c.consumer = $1
"""


async def lock_governed(conn: asyncpg.Connection, consumers: Sequence[str]) -> dict[str, bool]:
    """Of `consumers`, those a rule applies to, their rows locked: consumer -> prepaid."""
    return {r["consumer"]: r["prepaid"] for r in await conn.fetch(LOCK_GOVERNED, consumers)}


async def burn(
    conn: asyncpg.Connection, burns: Sequence[FreshUsage], price_book_version: str | None
) -> None:
    """One ledger entry per consumer for the whole transaction, not one per event."""
    await conn.execute(
        BURN,
        [b.consumer for b in burns],
        [b.cost_nanos for b in burns],
        [b.events for b in burns],
        price_book_version,
    )


async def lock_consumer(conn: asyncpg.Connection, consumer: str) -> bool:
    """Create the consumer if missing (True when created) and lock its row."""
    created = await conn.fetchval(
        "INSERT INTO consumers (consumer) VALUES ($1) ON CONFLICT DO NOTHING RETURNING true",
        consumer,
    )
    await conn.execute("SELECT 1 FROM consumers WHERE consumer = $1 FOR UPDATE", consumer)
    return bool(created)


async def update_account(conn: asyncpg.Connection, consumer: str, changes: dict[str, Any]) -> None:
    columns = [name for name in ACCOUNT_FIELDS if name in changes]  # fixed names only
    if not columns:
        return
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(columns, start=2))
    await conn.execute(
        f"UPDATE consumers SET {assignments}, updated_at = now() WHERE consumer = $1",
        consumer,
        *(changes[name] for name in columns),
    )


async def read_account(conn: asyncpg.Connection, consumer: str) -> Account | None:
    row = await conn.fetchrow(ACCOUNT, consumer)
    return None if row is None else Account(**dict(row))


async def balance_nanos(conn: asyncpg.Connection, consumer: str) -> int | None:
    value = await conn.fetchval("SELECT balance_nanos FROM balances WHERE consumer = $1", consumer)
    return None if value is None else int(value)


async def find_grant(conn: asyncpg.Connection, consumer: str, key: str) -> CreditGrant | None:
    row = await conn.fetchrow(
        "SELECT entry_id, amount_nanos, balance_after_nanos, created_at FROM credit_ledger"
        " WHERE consumer = $1 AND idempotency_key = $2",
        consumer,
        key,
    )
    if row is None:
        return None
    return CreditGrant(
        consumer=consumer,
        grant_id=row["entry_id"],
        amount_nanos=row["amount_nanos"],
        idempotency_key=key,
        balance_after_nanos=row["balance_after_nanos"],
        granted_at=row["created_at"],
        replayed=True,
    )


async def record_grant(
    conn: asyncpg.Connection, consumer: str, amount_nanos: int, key: str, source: str
) -> CreditGrant:
    """Credit the balance and write the ledger entry. The caller holds the consumer's lock
    and has checked the key."""
    await conn.execute(
        "UPDATE consumers SET prepaid = true, updated_at = now()"
        " WHERE consumer = $1 AND NOT prepaid",
        consumer,
    )
    balance = await conn.fetchval(
        "INSERT INTO balances (consumer, balance_nanos, granted_nanos) VALUES ($1, $2, $2)"
        " ON CONFLICT (consumer) DO UPDATE SET"
        "  balance_nanos = balances.balance_nanos + EXCLUDED.balance_nanos,"
        "  granted_nanos = balances.granted_nanos + EXCLUDED.granted_nanos,"
        "  updated_at = now()"
        " RETURNING balance_nanos",
        consumer,
        amount_nanos,
    )
    row = await conn.fetchrow(
        "INSERT INTO credit_ledger"
        " (consumer, kind, amount_nanos, balance_after_nanos, idempotency_key, source)"
        " VALUES ($1, 'grant', $2, $3, $4, $5) RETURNING entry_id, created_at",
        consumer,
        amount_nanos,
        balance,
        key,
        source,
    )
    return CreditGrant(
        consumer=consumer,
        grant_id=row["entry_id"],
        amount_nanos=amount_nanos,
        idempotency_key=key,
        balance_after_nanos=int(balance),
        granted_at=row["created_at"],
        replayed=False,
    )


async def read_states(
    conn: asyncpg.Connection, consumers: Sequence[str], month: datetime
) -> list[ConsumerState]:
    """Lock the consumers' rows (in order) and read what the rules need."""
    rows = await conn.fetch(READ_STATES, list(consumers), month)
    return [
        ConsumerState(
            consumer=r["consumer"],
            prepaid=r["prepaid"],
            balance_nanos=r["balance_nanos"],
            overdraft_micros=r["overdraft_micros"],
            low_balance_micros=r["low_balance_micros"],
            low_balance_flag=r["low_balance"],
            monthly_token_quota=r["monthly_token_quota"],
            month_tokens=r["month_tokens"],
            blocked=frozenset(r["blocked"]),
        )
        for r in rows
    ]


async def set_low_balance(conn: asyncpg.Connection, flags: Sequence[tuple[str, bool]]) -> None:
    if flags:
        await conn.execute(SET_LOW_BALANCE, [c for c, _ in flags], [f for _, f in flags])


async def governed_consumers(conn: asyncpg.Connection) -> list[str]:
    """Consumers a rule may apply to: prepaid, with a quota, or on the blocklist now."""
    return [r["consumer"] for r in await conn.fetch(GOVERNED_CONSUMERS)]


async def count_low_balance(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM balances WHERE low_balance"))
