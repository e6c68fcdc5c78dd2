"""The billing tests' workloads: consumers mapped to `cus_<consumer>`, usage in windows a test
chooses, and the totals Stripe must end with."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from tests.billing.conftest import COST, INPUT, OUTPUT
from tests.conftest import RunningCollector
from tests.factories import usage_event
from tests.harness.stripe import FakeStripe, RateLimits

METERS = (INPUT, OUTPUT, COST)


def fake_with_meters(**options: Any) -> FakeStripe:
    fake = FakeStripe(limits=RateLimits.test_mode(), **options)
    fake.start()
    for name in METERS:
        fake.create_meter(name)
    return fake


def rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def hour_ago(hours: int) -> datetime:
    """Ten past the hour, `hours` ago (every event of a test in windows it chose)."""
    return (datetime.now(UTC) - timedelta(hours=hours)).replace(minute=10, second=0, microsecond=0)


async def post_usage(
    collector: RunningCollector, consumers: Sequence[str], tag: str, when: datetime
) -> None:
    """One event per consumer, each mapped by a `cus_<consumer>` Kong custom_id."""
    events = [
        usage_event(f"{tag}-{c}", c, time=rfc3339(when), consumer_custom_id=f"cus_{c}")
        for c in consumers
    ]
    code, body = await collector.post_events(events)
    assert code == 200, body


async def local_totals(db: asyncpg.Connection) -> dict[tuple[str, str], Decimal]:
    rows = await db.fetch(
        """SELECT consumer, sum(input_tokens) AS i, sum(output_tokens) AS o,
                  sum(cost_nanos) AS c
        FROM usage_hourly GROUP BY consumer"""
    )
    totals: dict[tuple[str, str], Decimal] = {}
    for row in rows:
        customer = f"cus_{row['consumer']}"
        totals[(customer, INPUT)] = Decimal(row["i"])
        totals[(customer, OUTPUT)] = Decimal(row["o"])
        totals[(customer, COST)] = Decimal(row["c"] // 1000)
    return {key: value for key, value in totals.items() if value}
