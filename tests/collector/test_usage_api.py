"""GET /v1/consumers/{consumer}/usage: periods, breakdowns, errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import asyncpg

from tests.conftest import RunningCollector
from tests.factories import usage_event


async def test_unknown_consumer_is_404(collector: RunningCollector) -> None:
    status, body = await collector.usage("nobody")
    assert status == 404
    assert "nobody" in body["detail"]


async def test_needs_the_admin_token(collector: RunningCollector) -> None:
    await collector.post_events([usage_event("a1")])
    status, _, headers = await collector.get("/v1/consumers/alice/usage", token="nope-nope-nope-1")
    assert status == 401
    assert "Bearer" in headers["WWW-Authenticate"]
    status, _, _ = await collector.get("/v1/consumers/alice/usage", token=collector.ingest_token)
    assert status == 403


async def test_current_month_fields_for_a_post_paid_consumer(collector: RunningCollector) -> None:
    await collector.post_events(
        [
            usage_event("u1", input_tokens=1000, output_tokens=300, reasoning_tokens=200),
            usage_event(
                "u2",
                model="claude-sonnet-4",
                input_tokens=500,
                cached_input_tokens=300,
                cache_write_input_tokens=100,
                output_tokens=50,
            ),
            usage_event("u3", "bob", input_tokens=1, output_tokens=1),
        ]
    )
    status, usage = await collector.usage("alice")
    assert status == 200
    assert usage["consumer"] == "alice"
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (
        1500,
        350,
        1850,
    )
    assert usage["balance_micros"] is None
    assert usage["quota_remaining_tokens"] is None
    assert usage["by_kind"] == {
        "uncached_input_tokens": 1100,
        "cached_input_tokens": 300,
        "cache_write_input_tokens": 100,
        "output_tokens_excluding_reasoning": 150,
        "reasoning_tokens": 200,
    }
    assert [m["model"] for m in usage["by_model"]] == ["claude-sonnet-4", "gpt-4o"]


async def test_quota_remaining_may_go_negative(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    await collector.post_events([usage_event("q1", input_tokens=900, output_tokens=200)])
    await db.execute("UPDATE consumers SET monthly_token_quota = 1000 WHERE consumer = 'alice'")
    _, usage = await collector.usage("alice")
    assert usage["monthly_token_quota"] == 1000
    assert usage["quota_remaining_tokens"] == -100


async def test_periods_use_half_open_hour_ranges(collector: RunningCollector) -> None:
    """Last month (inside the dedupe horizon, whatever today is): [from, to) on whole hours;
    whole months read the monthly rollup, other spans the hourly one."""
    this_month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    last = (this_month - timedelta(days=1)).replace(day=10)

    def at(day_offset: int, hour: int, minute: int = 0, second: int = 0) -> str:
        moment = last + timedelta(days=day_offset, hours=hour, minutes=minute, seconds=second)
        return moment.isoformat().replace("+00:00", "Z")

    await collector.post_events(
        [
            usage_event("h1", time=at(0, 9, 59, 59), input_tokens=1, output_tokens=0),
            usage_event("h2", time=at(0, 10), input_tokens=10, output_tokens=0),
            usage_event("h3", time=at(0, 10, 30), input_tokens=100, output_tokens=0),
            usage_event("h4", time=at(0, 11), input_tokens=1000, output_tokens=0),
            usage_event("h5", time=iso(this_month), input_tokens=10000, output_tokens=0),
        ]
    )
    _, usage = await collector.usage("alice", **{"from": at(0, 10), "to": at(0, 11)})
    assert usage["input_tokens"] == 110
    _, usage = await collector.usage(
        "alice", **{"from": iso(last.replace(day=1)), "to": iso(this_month)}
    )
    assert usage["input_tokens"] == 1111
    two_hours_later_in_plus_two = (last + timedelta(hours=12, minutes=0)).astimezone(
        timezone(timedelta(hours=2))
    )
    _, usage = await collector.usage(
        "alice",
        **{
            "from": two_hours_later_in_plus_two.isoformat(),
            "to": iso(this_month + timedelta(days=40)),
        },
    )
    assert usage["input_tokens"] == 10000
    _, usage = await collector.usage(
        "alice", **{"from": at(0, 10), "to": iso(this_month + timedelta(hours=1))}
    )
    assert usage["input_tokens"] == 11110


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def test_bad_periods_are_400(collector: RunningCollector) -> None:
    await collector.post_events([usage_event("p1")])
    for params in (
        {"from": "yesterday"},
        {"from": "2026-03-10T10:00:00"},
        {"from": "2026-03-10T10:30:00Z"},
        {"from": "2026-03-10T10:00:00Z", "to": "2026-03-10T09:00:00Z"},
    ):
        status, body = await collector.usage("alice", **params)
        assert status == 400, params
        assert body["detail"]
