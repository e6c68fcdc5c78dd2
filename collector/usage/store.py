"""Reading usage from the hourly and monthly rollups."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

TOKEN_KINDS = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_input_tokens",
    "reasoning_tokens",
    "total_tokens",
)
COUNTED = ("events", "usage_missing_events", *TOKEN_KINDS)
_SUMS = ", ".join(f"sum({k})::bigint AS {k}" for k in COUNTED)


@dataclass(frozen=True)
class Account:
    consumer: str
    monthly_token_quota: int | None
    prepaid: bool


def month_bounds(at: datetime) -> tuple[datetime, datetime]:
    start = at.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


async def load_account(conn: asyncpg.Connection, consumer: str) -> Account | None:
    row = await conn.fetchrow(
        "SELECT consumer, monthly_token_quota, prepaid FROM consumers WHERE consumer = $1",
        consumer,
    )
    if row is None:
        return None
    return Account(row["consumer"], row["monthly_token_quota"], row["prepaid"])


async def usage_by_model(
    conn: asyncpg.Connection, consumer: str, start: datetime, end: datetime
) -> list[dict[str, int | str | None]]:
    """Sums per model over [start, end). Whole months read the monthly rollup, anything else
    the hourly one (callers pass hour-aligned bounds)."""
    whole_months = _is_month_start(start) and _is_month_start(end)
    table, column = ("usage_monthly", "month") if whole_months else ("usage_hourly", "hour")
    rows = await conn.fetch(
        f"SELECT model, {_SUMS} FROM {table}"
        f" WHERE consumer = $1 AND {column} >= $2 AND {column} < $3"
        " GROUP BY model ORDER BY model",
        consumer,
        start,
        end,
    )
    return [{**dict(r), "model": r["model"] or None} for r in rows]


async def month_total_tokens(conn: asyncpg.Connection, consumer: str, at: datetime) -> int:
    start, _ = month_bounds(at)
    value = await conn.fetchval(
        "SELECT coalesce(sum(total_tokens), 0)::bigint FROM usage_monthly"
        " WHERE consumer = $1 AND month = $2",
        consumer,
        start,
    )
    return int(value)


def _is_month_start(at: datetime) -> bool:
    return month_bounds(at)[0] == at
