"""Usage reaches Stripe exactly once per customer and meter: the collector's sync against the
Stripe fake through the real SDK, on real PostgreSQL."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from tests.billing.conftest import (
    COST,
    EVENT_ROUTE,
    INPUT,
    OUTPUT,
    TRANSPORTS,
    direct_sync,
    events_sent,
    eventually,
    run_cycle,
    stripe_env,
)
from tests.billing.workload import fake_with_meters, hour_ago, post_usage
from tests.billing.workload import local_totals as all_local_totals
from tests.collector.accounts_api import put_consumer
from tests.conftest import RunningCollector, make_settings, run_collector_app
from tests.contract.test_openapi import check_response
from tests.factories import usage_event
from tests.harness.stripe import CREATE_METER_EVENT, FakeStripe, RateLimits
from token_meter_collector.billing.store import PendingRow
from token_meter_collector.billing.transport import idempotency_key
from token_meter_collector.keys import STRIPE_SYNC


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Every test here runs over both transports (`billing_collector` takes this too)."""
    return str(request.param)


async def local_totals(db: asyncpg.Connection, consumer: str) -> dict[str, Decimal]:
    row = await db.fetchrow(
        """SELECT coalesce(sum(input_tokens), 0) AS i, coalesce(sum(output_tokens), 0) AS o,
                  coalesce(sum(cost_nanos), 0) AS c
        FROM usage_hourly WHERE consumer = $1""",
        consumer,
    )
    return {INPUT: Decimal(row["i"]), OUTPUT: Decimal(row["o"]), COST: Decimal(row["c"] // 1000)}


def stripe_totals(fake: FakeStripe, customer: str) -> dict[str, Decimal]:
    return {name: fake.total(customer, name) for name in (INPUT, OUTPUT, COST)}


async def status(collector: RunningCollector) -> dict:
    code, body, _ = await collector.get("/v1/stripe/status")
    assert code == 200
    return body


async def test_usage_of_a_mapped_consumer_reaches_stripe_once_per_meter(
    billing_collector: RunningCollector,
    stripe_fake: FakeStripe,
    db: asyncpg.Connection,
    transport: str,
) -> None:
    stripe_fake.add_customer("cus_alice")
    await put_consumer(billing_collector, "alice", {"stripe_customer_id": "cus_alice"})
    for batch in range(3):
        events = [usage_event(f"a{batch}-{i}", "alice", input_tokens=100 + i) for i in range(50)]
        code, _ = await billing_collector.post_events(events)
        assert code == 200
    expected = await local_totals(db, "alice")
    assert expected[INPUT] == sum(100 + i for i in range(50)) * 3
    await eventually(lambda: stripe_totals(stripe_fake, "cus_alice") == expected)
    body = await eventually(lambda: _settled(billing_collector), within=10)
    check_response("GET", "/v1/stripe/status", 200, "application/json", json.dumps(body).encode())
    assert body["enabled"] is True and body["transport"] == transport
    assert [(m["event_name"], m["active"]) for m in body["meters"]] == [
        (INPUT, True),
        (OUTPUT, True),
        (COST, True),
    ]
    assert all(m["meter_id"].startswith("mtr_") for m in body["meters"])
    assert body["pending_rows"] == 0 and body["oldest_pending_seconds"] is None
    assert body["held_consumers"] == 0 and body["held"] == []
    assert body["last_sent_at"] is not None and body["errors"] == []
    # Every identifier went to Stripe once: no duplicates were needed without faults.
    identifiers = [e.identifier for e in stripe_fake.accepted_events(customer="cus_alice")]
    assert len(identifiers) == len(set(identifiers))


async def _settled(collector: RunningCollector) -> dict | None:
    body = await status(collector)
    return body if body["pending_rows"] == 0 and body["last_sent_at"] else None


async def test_an_unmapped_consumer_is_held_then_sent_once_mapped(
    billing_collector: RunningCollector,
    stripe_fake: FakeStripe,
    db: asyncpg.Connection,
    transport: str,
) -> None:
    await billing_collector.post_events([usage_event(f"b{i}", "bob") for i in range(5)])
    body = await eventually(lambda: _held(billing_collector, "bob"), within=10)
    assert body["held_consumers"] == 1
    assert body["pending_rows"] > 0 and body["oldest_pending_seconds"] is None
    assert stripe_fake.call_count(EVENT_ROUTE[transport]) == 0
    # A `cus_` custom_id in Kong maps the consumer (no admin call needed).
    stripe_fake.add_customer("cus_bob")
    await billing_collector.post_events(
        [usage_event("b-late", "bob", consumer_custom_id="cus_bob")]
    )
    expected = await local_totals(db, "bob")
    await eventually(lambda: stripe_totals(stripe_fake, "cus_bob") == expected)
    body = await eventually(lambda: _settled(billing_collector))
    assert body["held"] == []


async def _held(collector: RunningCollector, consumer: str) -> dict | None:
    body = await status(collector)
    held = {h["consumer"]: h["reason"] for h in body["held"]}
    return body if held.get(consumer) == "no_stripe_customer" else None


async def test_late_events_become_new_deltas_and_the_cost_remainder_is_carried(
    billing_collector: RunningCollector, stripe_fake: FakeStripe, db: asyncpg.Connection
) -> None:
    stripe_fake.add_customer("cus_carol")
    await put_consumer(billing_collector, "carol", {"stripe_customer_id": "cus_carol"})
    # One token of gpt-4o-mini input costs a fraction of a micro: it must not be lost.
    small = [
        usage_event(f"c{i}", "carol", model="gpt-4o-mini", input_tokens=1, output_tokens=0)
        for i in range(7)
    ]
    await billing_collector.post_events(small)
    await eventually(lambda: stripe_fake.total("cus_carol", INPUT) == 7)
    earlier = (datetime.now(UTC) - timedelta(hours=5)).replace(minute=3, second=0, microsecond=0)
    late = [
        usage_event(f"late{i}", "carol", time=earlier.isoformat().replace("+00:00", "Z"))
        for i in range(3)
    ]
    await billing_collector.post_events(late)
    expected = await local_totals(db, "carol")
    await eventually(lambda: stripe_totals(stripe_fake, "cus_carol") == expected)
    windows = {e.timestamp for e in stripe_fake.accepted_events(customer="cus_carol")}
    assert int(earlier.replace(minute=0).timestamp()) in {int(w) for w in windows}
    nanos = await db.fetchval("SELECT sum(cost_nanos) FROM usage_hourly WHERE consumer='carol'")
    assert stripe_fake.total("cus_carol", COST) == nanos // 1000


async def test_random_faults_change_nothing_in_the_totals(
    database_url: str, tmp_path: Path, db: asyncpg.Connection, transport: str
) -> None:
    with FakeStripe(limits=RateLimits.test_mode()) as fake:
        for name in (INPUT, OUTPUT, COST):
            fake.create_meter(name)
        customers = [f"cus_f{i}" for i in range(4)]
        for c in customers:
            fake.add_customer(c)
        fake.faults.random(rate=0.3, seed=7, timeout_seconds=3)
        env = stripe_env(fake, TOKEN_METER_STRIPE_TRANSPORT=transport)
        settings = make_settings(database_url, tmp_path, **env)
        async with run_collector_app(settings) as collector:
            for i, c in enumerate(customers):
                await put_consumer(collector, f"f{i}", {"stripe_customer_id": c})
            for round_ in range(4):
                events = [
                    usage_event(f"r{round_}-{i}-{n}", f"f{i}", input_tokens=10 + n)
                    for i in range(4)
                    for n in range(25)
                ]
                await collector.post_events(events)
            expected = {c: await local_totals(db, f"f{i}") for i, c in enumerate(customers)}
            await eventually(
                lambda: all(stripe_totals(fake, c) == expected[c] for c in customers),
                within=60,
            )
            assert len(fake.faults.injected) > 0
            fake.faults.stop_random()
            body = await eventually(lambda: _settled(collector), within=30)
            assert body["pending_rows"] == 0


async def test_two_collectors_never_double_send(
    database_url: str,
    tmp_path: Path,
    stripe_fake: FakeStripe,
    db: asyncpg.Connection,
    transport: str,
) -> None:
    stripe_fake.add_customer("cus_dan")
    env = stripe_env(stripe_fake, TOKEN_METER_STRIPE_TRANSPORT=transport)
    one = make_settings(database_url, tmp_path / "one", **env)
    two = make_settings(database_url, tmp_path / "two", **env)
    async with run_collector_app(one) as first, run_collector_app(two) as second:
        await put_consumer(first, "dan", {"stripe_customer_id": "cus_dan"})
        for n in range(10):
            target = first if n % 2 else second
            await target.post_events([usage_event(f"d{n}-{i}", "dan") for i in range(20)])
        expected = await local_totals(db, "dan")
        await eventually(lambda: stripe_totals(stripe_fake, "cus_dan") == expected)
        identifiers = [e.identifier for e in stripe_fake.accepted_events(customer="cus_dan")]
        assert len(identifiers) == len(set(identifiers))
        meter_events = events_sent(stripe_fake, transport)
        assert meter_events == len(identifiers)  # nobody sent a row twice
        leaders = [c.app[STRIPE_SYNC].is_leader for c in (first, second) if c.app]
        assert sorted(leaders) == [False, True]


async def test_a_missing_meter_holds_its_usage_and_says_so(
    database_url: str, tmp_path: Path, db: asyncpg.Connection, transport: str
) -> None:
    with FakeStripe() as fake:
        fake.create_meter(INPUT)  # the other two are missing
        fake.add_customer("cus_eve")
        env = stripe_env(fake, TOKEN_METER_STRIPE_TRANSPORT=transport)
        settings = make_settings(database_url, tmp_path, **env)
        async with run_collector_app(settings) as collector:
            await put_consumer(collector, "eve", {"stripe_customer_id": "cus_eve"})
            await collector.post_events([usage_event("e1", "eve")])
            await eventually(lambda: fake.total("cus_eve", INPUT) == 100)
            # Stripe has the event a moment before the collector records its answer.
            body = await eventually(lambda: _sent_once(collector))
            codes = {(e["meter"], e["code"]) for e in body["errors"]}
            assert (OUTPUT, "meter_missing") in codes and (COST, "meter_missing") in codes
            assert body["pending_rows"] == 2  # one delta each for the two missing meters
            assert fake.total("cus_eve", OUTPUT) == 0


async def _sent_once(collector: RunningCollector) -> dict | None:
    body = await status(collector)
    return body if body["last_sent_at"] else None


async def test_usage_too_old_for_stripe_is_unbillable_and_never_sent(
    billing_collector: RunningCollector, stripe_fake: FakeStripe, db: asyncpg.Connection
) -> None:
    stripe_fake.add_customer("cus_old")
    old = (datetime.now(UTC) - timedelta(days=40)).isoformat().replace("+00:00", "Z")
    await billing_collector.post_events([usage_event("o1", "olga", time=old)])
    await put_consumer(billing_collector, "olga", {"stripe_customer_id": "cus_old"})
    body = await eventually(
        lambda: _reason(billing_collector, "olga", "unbillable_too_old"), within=10
    )
    assert body["unbillable_rows"] == 3
    assert stripe_fake.accepted_events(customer="cus_old") == []


async def _reason(collector: RunningCollector, consumer: str, reason: str) -> dict | None:
    body = await status(collector)
    return body if {"consumer": consumer, "reason": reason} in body["held"] else None


async def test_a_500_after_stripe_took_the_events_is_delivered_by_the_next_cycle(
    collector: RunningCollector, db: asyncpg.Connection, tmp_path: Path, transport: str
) -> None:
    """Stripe takes a call's events, then answers 500 (and saves that 500 for the call's
    idempotency key): the rows wait, and the next cycle's attempt delivers them, each event
    counted once at Stripe. On v1 the retry goes under a new idempotency key (the old one would
    get the saved 500 back for 24 hours) with the same identifier, which Stripe refuses as a
    duplicate; the stream's SDK-drawn key is new on every call and it drops a known identifier
    silently."""
    fake = fake_with_meters()
    try:
        fake.add_customer("cus_g500")
        await post_usage(collector, ["g500"], "g", hour_ago(1))
        fake.faults.fail_next(1, 500, after_work=True, route=EVENT_ROUTE[transport])
        env = {"TOKEN_METER_STRIPE_TRANSPORT": transport}
        async with direct_sync(collector, fake, tmp_path, **env) as sync:
            await run_cycle(sync)
            failed = await db.fetch(
                "SELECT identifier, attempts FROM stripe_outbox WHERE state = 'pending'"
            )
            assert failed, "the call Stripe answered 500 left its rows pending"
            assert all(row["attempts"] == 1 for row in failed)
            assert fake.totals() == await all_local_totals(db)  # Stripe has them already
            await db.execute("UPDATE stripe_outbox SET next_attempt_at = now()")
            await run_cycle(sync)
        states = await db.fetch("SELECT identifier, state, answer FROM stripe_outbox")
        assert len(states) == 3 and {row["state"] for row in states} == {"sent"}
        assert fake.totals() == await all_local_totals(db)
        identifiers = [e.identifier for e in fake.accepted_events()]
        assert sorted(identifiers) == sorted(row["identifier"] for row in states)
        retried = {row["identifier"] for row in failed}
        answers = {row["identifier"]: row["answer"] for row in states}
        if transport == "meter_events":
            assert {answers[i] for i in retried} == {"duplicate"}
            (identifier,) = retried
            calls = [r for r in fake.requests_to(CREATE_METER_EVENT) if r.params]
            sent = [r for r in calls if r.params["identifier"] == identifier]
            assert [r.status for r in sent] == [500, 400]
            assert [r.idempotency_key for r in sent] == [identifier, f"{identifier}-a1"]
            assert not any(r.replayed for r in sent)
        else:
            assert {answers[i] for i in retried} == {"created"}
            assert sorted(d["identifier"] for d in fake.state.duplicates) == sorted(retried)
    finally:
        fake.stop()


def test_a_v1_idempotency_key_is_new_per_attempt_and_the_same_for_a_repeated_one() -> None:
    """The key follows the outbox's attempt count: a call the outbox never recorded an answer
    for (a crash) is sent again under its key, a recorded failure moves to the next key, and
    the identifier stays in every key."""
    row = PendingRow("c", INPUT, hour_ago(1), 1, "tm1-1-1-abc", 5, 0, "cus_c")
    assert idempotency_key(row) == row.identifier  # the key of every attempt before
    keys = [idempotency_key(replace(row, attempts=n)) for n in (1, 2, 3)]
    assert keys == ["tm1-1-1-abc-a1", "tm1-1-1-abc-a2", "tm1-1-1-abc-a3"]
    assert idempotency_key(replace(row, attempts=2)) == keys[1]
