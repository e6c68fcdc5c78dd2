"""PUT /v1/consumers/{consumer}: created or updated, fields kept unless given, errors."""

from __future__ import annotations

import asyncpg

from tests.collector.accounts_api import put_consumer
from tests.conftest import RunningCollector
from tests.factories import usage_event


async def test_created_then_updated_and_fields_not_given_stay(
    collector: RunningCollector,
) -> None:
    status, account = await put_consumer(
        collector,
        "acme",
        {"stripe_customer_id": "cus_123", "plan": "pro", "monthly_token_quota": 10_000},
    )
    assert status == 201
    assert account["consumer"] == "acme"
    assert account["prepaid"] is False
    assert account["balance_micros"] is None
    status, account = await put_consumer(
        collector, "acme", {"low_balance_micros": 5_000, "overdraft_micros": 2_000}
    )
    assert status == 200
    assert account["stripe_customer_id"] == "cus_123"
    assert account["plan"] == "pro"
    assert account["monthly_token_quota"] == 10_000
    assert account["low_balance_micros"] == 5_000
    assert account["overdraft_micros"] == 2_000
    status, usage = await collector.usage("acme")
    assert status == 200  # a consumer created by PUT has (empty) usage, not a 404
    assert usage["total_tokens"] == 0
    assert usage["quota_remaining_tokens"] == 10_000


async def test_a_consumer_seen_in_events_is_updated_not_created(
    collector: RunningCollector,
) -> None:
    await collector.post_events([usage_event("e1", "seen")])
    status, _ = await put_consumer(collector, "seen", {"plan": "free"})
    assert status == 200


async def test_an_empty_body_creates_with_defaults(collector: RunningCollector) -> None:
    status, account = await put_consumer(collector, "bare", {})
    assert status == 201
    assert account["monthly_token_quota"] is None
    assert account["overdraft_micros"] == 0


async def test_tokens_and_content_type(collector: RunningCollector, db: asyncpg.Connection) -> None:
    status, _ = await put_consumer(collector, "x", {}, token=collector.ingest_token)
    assert status == 403
    status, _ = await put_consumer(collector, "x", {}, token="wrong-token-wrong-token")
    assert status == 401
    async with collector.session.put(
        f"{collector.base_url}/v1/consumers/x",
        data=b"plan=pro",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            **collector.auth(collector.admin_token),
        },
    ) as r:
        assert r.status == 415
        assert r.content_type == "application/problem+json"
    too_long = "c" * 257
    status, _ = await put_consumer(collector, too_long, {})
    assert status == 400
    assert await db.fetchval("SELECT count(*) FROM consumers") == 0
