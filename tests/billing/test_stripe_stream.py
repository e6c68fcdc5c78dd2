"""The v2 meter event stream transport: 100 events a call, session tokens renewed before they
expire and when Stripe says one has, no two calls in flight for one customer and meter, and
totals exact under faults. Against the Stripe fake through the real SDK, on real PostgreSQL."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import asyncpg

from tests.billing.conftest import direct_sync, eventually, run_cycle, stripe_env
from tests.billing.workload import fake_with_meters, hour_ago, local_totals, post_usage, rfc3339
from tests.collector.accounts_api import put_consumer
from tests.conftest import RunningCollector, make_settings, run_collector_app
from tests.harness.stripe import (
    CREATE_METER_EVENT,
    CREATE_METER_EVENT_SESSION,
    CREATE_METER_EVENT_STREAM,
    FakeStripe,
)
from token_meter_collector.billing import store
from token_meter_collector.billing.stripe_api import StreamEvent, StripeApi


async def settled(collector: RunningCollector) -> bool:
    code, body, _ = await collector.get("/v1/stripe/status")
    assert code == 200
    return bool(body["pending_rows"] == 0 and body["last_sent_at"])


def stream_batches(fake: FakeStripe) -> list[list[dict]]:
    return [r.params["events"] for r in fake.requests_to(CREATE_METER_EVENT_STREAM) if r.params]


async def test_more_than_100_rows_go_in_calls_of_100_on_one_session(
    collector: RunningCollector, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """210 sendable rows (70 customers, three meters, one window) make ceil(210/100) = 3 stream
    calls, all on one session, and Stripe takes every event once."""
    consumers = [f"s{i:02d}" for i in range(70)]
    fake = fake_with_meters()
    try:
        for consumer in consumers:
            fake.add_customer(f"cus_{consumer}")
        await post_usage(collector, consumers, "a", hour_ago(2))
        async with direct_sync(collector, fake, tmp_path) as sync:
            await run_cycle(sync)
        rows = await db.fetchval("SELECT count(*) FROM stripe_outbox")
        assert rows == 210
        assert fake.call_count(CREATE_METER_EVENT_STREAM) == math.ceil(rows / 100) == 3
        assert sorted(len(batch) for batch in stream_batches(fake)) == [10, 100, 100]
        assert fake.call_count(CREATE_METER_EVENT_SESSION) == 1
        assert fake.call_count(CREATE_METER_EVENT) == 0
        assert fake.totals() == await local_totals(db)
        accepted = fake.accepted_events()
        assert len(accepted) == rows and {e.api for e in accepted} == {"v2_stream"}
        answers = await db.fetch("SELECT state, answer, count(*) FROM stripe_outbox GROUP BY 1, 2")
        assert [tuple(r) for r in answers] == [("sent", "created", rows)]
        # The window's start is the event's time, sent as RFC 3339.
        first = stream_batches(fake)[0][0]
        assert first["timestamp"] == rfc3339(hour_ago(2).replace(minute=0))
        assert first["payload"]["value"].isdigit()
    finally:
        fake.stop()


async def test_calls_waiting_on_a_session_that_cannot_be_had_fail_with_it(
    collector: RunningCollector, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Three calls' worth of rows and the session creation times out: one attempt, not one per
    call in turn; every row waits with the reason, and the next cycle sends them."""
    consumers = [f"t{i:02d}" for i in range(70)]
    fake = fake_with_meters()
    try:
        for consumer in consumers:
            fake.add_customer(f"cus_{consumer}")
        fake.faults.timeout_next(1, seconds=5, after_work=False, route=CREATE_METER_EVENT_SESSION)
        await post_usage(collector, consumers, "t", hour_ago(2))
        async with direct_sync(collector, fake, tmp_path, TOKEN_METER_STRIPE_TIMEOUT="1") as sync:
            await run_cycle(sync)
            assert fake.call_count(CREATE_METER_EVENT_SESSION) == 1
            assert fake.call_count(CREATE_METER_EVENT_STREAM) == 0
            errors = await db.fetch("SELECT DISTINCT state, last_error FROM stripe_outbox")
            assert [r["state"] for r in errors] == ["pending"]
            assert errors[0]["last_error"].startswith("APIConnectionError")
            await db.execute("UPDATE stripe_outbox SET next_attempt_at = now()")
            await run_cycle(sync)
        assert fake.totals() == await local_totals(db)
        assert fake.call_count(CREATE_METER_EVENT_STREAM) == 3
    finally:
        fake.stop()


class WatchedApi(StripeApi):
    """Records which customer and meter each stream call in flight carries."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.in_flight: list[set[tuple[str, str]]] = []
        self.overlaps: list[tuple[str, str]] = []
        self.most_in_flight = 0
        self.sent_order: dict[tuple[str, str], list[datetime]] = {}

    async def stream_meter_events(self, token: str, events: Sequence[StreamEvent]) -> None:
        lanes = {(e.customer, e.event_name) for e in events}
        busy = set().union(*self.in_flight) if self.in_flight else set()
        self.overlaps.extend(sorted(lanes & busy))
        self.in_flight.append(lanes)
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
        for e in events:
            self.sent_order.setdefault((e.customer, e.event_name), []).append(e.timestamp)
        try:
            await super().stream_meter_events(token, events)
        finally:
            self.in_flight.remove(lanes)


async def test_no_two_calls_in_flight_carry_one_customer_and_meter(
    collector: RunningCollector, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Lanes of six rows each (six windows) spread over concurrent calls of 100: calls overlap
    in time, never in customer and meter, and each lane goes out oldest window first."""
    consumers = [f"w{i:02d}" for i in range(20)]
    fake = fake_with_meters(latency={CREATE_METER_EVENT_STREAM: 0.3})
    try:
        for consumer in consumers:
            fake.add_customer(f"cus_{consumer}")
        for hours in range(7, 1, -1):
            await post_usage(collector, consumers, f"h{hours}", hour_ago(hours))
        api = WatchedApi(fake.api_key, api_base=fake.url, timeout=5)
        async with direct_sync(collector, fake, tmp_path, api=api) as sync:
            await run_cycle(sync)
        assert await db.fetchval("SELECT count(*) FROM stripe_outbox") == 360
        assert fake.call_count(CREATE_METER_EVENT_STREAM) >= 4
        assert api.most_in_flight > 1
        assert api.overlaps == []
        assert all(times == sorted(times) for times in api.sent_order.values())
        assert fake.totals() == await local_totals(db)
    finally:
        fake.stop()


async def test_a_session_is_renewed_before_it_expires(
    collector: RunningCollector, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A 2-second session is replaced after three quarters of its life, before Stripe would
    refuse it: no call ever meets an expired token."""
    fake = fake_with_meters(session_ttl=2.0)
    try:
        fake.add_customer("cus_rene")
        async with direct_sync(collector, fake, tmp_path) as sync:
            for n in range(3):
                await post_usage(collector, ["rene"], f"r{n}", hour_ago(1))
                await run_cycle(sync)
                assert fake.totals() == await local_totals(db)
                await asyncio.sleep(1.6)
        assert fake.call_count(CREATE_METER_EVENT_SESSION) == 3
        assert fake.call_count(CREATE_METER_EVENT_STREAM) == 3
        assert fake.call_count(CREATE_METER_EVENT_STREAM, status=401) == 0
    finally:
        fake.stop()


async def test_an_expired_session_is_renewed_and_the_call_sent_again(
    collector: RunningCollector, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Stripe's clock runs past the session's end (ours has not): the call meets a 401
    `billing_meter_event_session_expired`, a new session is made and the same events go at
    once, in the same cycle, with nothing shown as an error."""
    fake = fake_with_meters()
    try:
        fake.add_customer("cus_exp")
        async with direct_sync(collector, fake, tmp_path) as sync:
            await post_usage(collector, ["exp"], "e0", hour_ago(1))
            await run_cycle(sync)
            fake.clock.advance(15 * 60 + 1)
            await post_usage(collector, ["exp"], "e1", hour_ago(1))
            await run_cycle(sync)
            status = await store.status(sync.pool, sync.settings.meters)
        assert fake.totals() == await local_totals(db)
        assert fake.call_count(CREATE_METER_EVENT_STREAM, status=401) == 1
        assert [r.error_code for r in fake.requests_to(CREATE_METER_EVENT_STREAM)] == [
            None,
            "billing_meter_event_session_expired",
            None,
        ]
        assert fake.call_count(CREATE_METER_EVENT_SESSION) == 2
        assert status["pending_rows"] == 0 and status["errors"] == []
    finally:
        fake.stop()


async def test_the_stream_is_exact_under_faults(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    """The collector on the stream while the fake fails a third of all calls (before and after
    doing the work), sessions expire every 3 s and the first session cannot be had: Stripe ends
    with exactly PostgreSQL's totals, no identifier taken twice, and the re-sent events it had
    already taken dropped as duplicates."""
    fake = fake_with_meters(session_ttl=3.0)
    try:
        customers = [f"x{i}" for i in range(30)]
        for c in customers:
            fake.add_customer(f"cus_{c}")
        fake.faults.fail_next(1, 500, route=CREATE_METER_EVENT_SESSION)
        fake.faults.timeout_next(1, seconds=3, after_work=True, route=CREATE_METER_EVENT_STREAM)
        fake.faults.drop_after_work_next(1, route=CREATE_METER_EVENT_STREAM)
        fake.faults.fail_next(1, 500, after_work=True, route=CREATE_METER_EVENT_STREAM)
        fake.faults.random(
            rate=0.3,
            seed=5,
            timeout_seconds=3,
            kinds=(
                "rate_limit",
                "error",
                "error_after_work",
                "timeout",
                "timeout_before_work",
                "drop",
                "drop_before_work",
            ),
        )
        env = stripe_env(fake, TOKEN_METER_STRIPE_TRANSPORT="meter_event_stream")
        settings = make_settings(database_url, tmp_path, **env)
        async with run_collector_app(settings) as collector:
            await put_consumer(collector, "x0", {"stripe_customer_id": "cus_x0"})
            for round_ in range(4):
                # This hour and, late, an earlier one: lanes of several rows.
                await post_usage(collector, customers, f"now{round_}", hour_ago(0))
                await post_usage(collector, customers[::2], f"late{round_}", hour_ago(3))
                await asyncio.sleep(0.3)
            expected = await local_totals(db)
            await eventually(lambda: fake.totals() == expected, within=90)
            fake.faults.stop_random()
            # Stripe may hold a row's events before the row is marked sent (an answer lost):
            # settled means nothing pending, and the totals still exact.
            await eventually(lambda: settled(collector), within=60)
            assert fake.totals() == expected
        rows = await db.fetchval("SELECT count(*) FROM stripe_outbox")
        assert rows > 100
        identifiers = [e.identifier for e in fake.accepted_events()]
        assert len(identifiers) == len(set(identifiers)) == rows
        assert fake.state.duplicates, "events applied before a lost answer were sent again"
        assert fake.call_count(CREATE_METER_EVENT_SESSION) >= 3
        kinds = {f.kind for route, f in fake.faults.injected if route == CREATE_METER_EVENT_STREAM}
        assert {"drop", "error", "timeout"} <= kinds
    finally:
        fake.stop()
