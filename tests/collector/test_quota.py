"""Monthly token quotas: a quota used up blocks, a raised or removed quota or a new month
unblocks, and both reasons can apply at once."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from tests.collector.accounts_api import (
    DEFAULT_EVENT_TOKENS,
    blocklist,
    grant,
    put_consumer,
    reasons,
    wait_for_blocklist,
)
from tests.conftest import RunningCollector
from tests.factories import usage_event
from token_meter_collector.keys import ACCOUNTS
from token_meter_collector.usage.store import month_bounds


async def test_a_used_up_quota_blocks_and_a_raised_one_unblocks(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    status, account = await put_consumer(collector, "ann", {"monthly_token_quota": 300})
    assert status == 201
    assert account["monthly_token_quota"] == 300
    await collector.post_events([usage_event("e1", "ann"), usage_event("e2", "ann")])  # 240
    assert await db.fetchval("SELECT count(*) FROM blocklist") == 0
    await collector.post_events([usage_event("e3", "ann")])  # 360 >= 300
    snapshot = await wait_for_blocklist(collector, lambda s: "ann" in reasons(s))
    entry = next(e for e in snapshot["entries"] if e["consumer"] == "ann")
    assert entry["reason"] == "quota_exceeded"
    assert entry["detail"]["used_tokens"] == 3 * DEFAULT_EVENT_TOKENS
    _, usage = await collector.usage("ann")
    assert usage["quota_remaining_tokens"] == 300 - 360
    status, _ = await put_consumer(collector, "ann", {"monthly_token_quota": 1_000})
    assert status == 200
    await wait_for_blocklist(collector, lambda s: "ann" not in reasons(s))


async def test_reaching_the_quota_exactly_blocks(collector: RunningCollector) -> None:
    await put_consumer(collector, "ann", {"monthly_token_quota": 240})
    await collector.post_events([usage_event("e1", "ann"), usage_event("e2", "ann")])
    await wait_for_blocklist(collector, lambda s: "ann" in reasons(s))


async def test_removing_the_quota_unblocks_and_lowering_it_blocks(
    collector: RunningCollector,
) -> None:
    await collector.post_events([usage_event("e1", "ann")])
    await put_consumer(collector, "ann", {"monthly_token_quota": 100})  # already over
    await wait_for_blocklist(collector, lambda s: "ann" in reasons(s))
    status, account = await put_consumer(collector, "ann", {"monthly_token_quota": None})
    assert status == 200
    assert account["monthly_token_quota"] is None
    await wait_for_blocklist(collector, lambda s: "ann" not in reasons(s))


async def test_usage_of_past_months_does_not_count(collector: RunningCollector) -> None:
    await collector.post_events([usage_event("old", "ann", time="2020-01-15T10:00:00Z")])
    await put_consumer(collector, "ann", {"monthly_token_quota": 100})
    await collector.post_events([usage_event("e1", "ann", input_tokens=50, output_tokens=0)])
    assert "ann" not in reasons(await blocklist(collector))


async def test_both_reasons_at_once_and_insufficient_credits_wins(
    collector: RunningCollector,
) -> None:
    await grant(collector, "ann", 100, "k")
    await put_consumer(collector, "ann", {"monthly_token_quota": 100})
    await collector.post_events([usage_event("e1", "ann")])
    snapshot = await wait_for_blocklist(collector, lambda s: len(reasons(s).get("ann", [])) == 2)
    entry = next(e for e in snapshot["entries"] if e["consumer"] == "ann")
    assert entry["reason"] == "insufficient_credits"
    await grant(collector, "ann", 10_000, "k2")  # pays: the quota still holds it
    snapshot = await wait_for_blocklist(
        collector, lambda s: reasons(s).get("ann") == ["quota_exceeded"]
    )


async def test_a_new_month_lifts_quota_blocks(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    """The sweep, run at the clock's time, takes quota blocks off when the month turns and
    leaves credit blocks where they are."""
    await put_consumer(collector, "ann", {"monthly_token_quota": 100})
    await grant(collector, "bob", 100, "k")
    await collector.post_events([usage_event("e1", "ann"), usage_event("e2", "bob")])
    await wait_for_blocklist(collector, lambda s: {"ann", "bob"} <= set(reasons(s)))
    assert collector.app is not None
    accounts = collector.app[ACCOUNTS]
    version = await db.fetchval("SELECT version FROM blocklist_state")
    # Same month: nothing to change, no version bump.
    assert await accounts.sweep(wait_for_lock=True) == 0
    assert await db.fetchval("SELECT version FROM blocklist_state") == version
    _, next_month = month_bounds(datetime.now(UTC))
    accounts.clock = lambda: next_month
    await accounts.sweep(wait_for_lock=True)
    rows = await db.fetch("SELECT consumer, reason FROM blocklist ORDER BY consumer")
    assert [tuple(r) for r in rows] == [("bob", "insufficient_credits")]
    snapshot = await wait_for_blocklist(collector, lambda s: "ann" not in reasons(s))
    assert reasons(snapshot) == {"bob": ["insufficient_credits"]}


def test_the_sweep_wakes_just_after_the_month_turns(collector: RunningCollector) -> None:
    assert collector.app is not None
    accounts = collector.app[ACCOUNTS]
    accounts.clock = lambda: datetime(2026, 1, 31, 23, 59, 59, 900_000, tzinfo=UTC)
    assert 0.1 < accounts.seconds_to_next_sweep() < 0.2
    accounts.clock = lambda: datetime(2026, 1, 15, tzinfo=UTC)
    assert accounts.seconds_to_next_sweep() == accounts.sweep_interval


async def test_bad_account_updates_are_400_and_change_nothing(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    await put_consumer(collector, "ann", {"monthly_token_quota": 500, "plan": "pro"})
    for body in (
        {"monthly_token_quota": -1},
        {"monthly_token_quota": "500"},
        {"monthly_token_quota": 1.5},
        {"overdraft_micros": -1},
        {"overdraft_micros": None},
        {"plan": 7},
        {"stripe_customer_id": ""},
        {"plan": "x", "colour": "blue"},
        [1, 2],
        b"{not json",
    ):
        status, problem = await put_consumer(collector, "ann", body)
        assert status == 400, body
        assert problem["detail"]
    row = await db.fetchrow(
        "SELECT monthly_token_quota, plan, overdraft_micros FROM consumers WHERE consumer = 'ann'"
    )
    assert tuple(row) == (500, "pro", 0)
    status, _ = await put_consumer(collector, "new-one", {"monthly_token_quota": "x"})
    assert status == 400
    assert await db.fetchval("SELECT count(*) FROM consumers WHERE consumer = 'new-one'") == 0
