"""`token-meter-admin stripe reconcile` as an operator runs it: the outbox against the Stripe
fake's meter event summaries, after a faulty sync, with differences made in the fake, and
`--resend` repairing exactly what Stripe lost, nothing else."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.billing.conftest import COST, INPUT, OUTPUT, eventually, stripe_env
from tests.billing.test_stripe_sync import local_totals, stripe_totals
from tests.collector.accounts_api import put_consumer
from tests.collector.test_admin_cli import admin
from tests.conftest import RunningCollector, make_settings, run_collector_app
from tests.contract.test_openapi import check_response
from tests.factories import usage_event
from tests.harness.stripe import (
    CREATE_METER_EVENT,
    LIST_EVENT_SUMMARIES,
    LIST_METERS,
    FakeStripe,
    MeterEvent,
    RateLimits,
)
from token_meter_collector.billing.stripe_api import StripeApi

SETTLED = ("--settle", "0")  # the fake's summaries do not lag unless told to


def days_around_now() -> tuple[str, str]:
    """--from and --to as dates: yesterday (an event two hours old may fall on it) to
    tomorrow, whatever the time of day."""
    now = datetime.now(UTC)
    return (now - timedelta(days=1)).date().isoformat(), (
        now + timedelta(days=1)
    ).date().isoformat()


def drop_at_stripe(fake: FakeStripe, event: MeterEvent) -> None:
    """Stripe loses an event it took (its identifier stays known to its dedupe, as it would)."""
    with fake.state.lock:
        fake.state.events.remove(event)


async def settled(collector: RunningCollector) -> dict[str, Any] | None:
    _, body, _ = await collector.get("/v1/stripe/status")
    return body if body["pending_rows"] == 0 and body["last_sent_at"] else None


def lines_with(out: str, *words: str) -> list[str]:
    return [line for line in out.splitlines() if all(word in line for word in words)]


@pytest.fixture
def faulty_fake() -> Iterator[FakeStripe]:
    with FakeStripe(limits=RateLimits.test_mode()) as fake:
        for name in (INPUT, OUTPUT, COST):
            fake.create_meter(name)
        yield fake


async def test_reconcile_agrees_after_a_faulty_sync_and_resend_repairs_exactly_a_lost_event(
    database_url: str, tmp_path: Path, db: asyncpg.Connection, faulty_fake: FakeStripe
) -> None:
    fake = faulty_fake
    customers = [f"cus_g{i}" for i in range(3)]
    for customer in [*customers, "cus_lost"]:
        fake.add_customer(customer)
    fake.faults.random(rate=0.3, seed=11, timeout_seconds=3)
    settings = make_settings(database_url, tmp_path, **stripe_env(fake))
    async with run_collector_app(settings) as collector:
        for i, customer in enumerate(customers):
            await put_consumer(collector, f"g{i}", {"stripe_customer_id": customer})
        await put_consumer(collector, "lost", {"stripe_customer_id": "cus_lost"})
        for round_ in range(3):
            await collector.post_events(
                [
                    usage_event(f"g{round_}-{i}-{n}", f"g{i}", input_tokens=10 + n)
                    for i in range(3)
                    for n in range(20)
                ]
            )
        # One batch for `lost`: one delta per meter in its hour.
        await collector.post_events([usage_event(f"l{n}", "lost") for n in range(4)])
        consumers = {**{c: f"g{i}" for i, c in enumerate(customers)}, "cus_lost": "lost"}
        expected = {c: await local_totals(db, consumer) for c, consumer in consumers.items()}
        await eventually(
            lambda: all(stripe_totals(fake, c) == expected[c] for c in consumers), within=60
        )
        assert fake.faults.injected, "the sync met no fault"
        fake.faults.stop_random()
        await eventually(lambda: settled(collector), within=30)

        # The current UTC month up to now: everything delivered, Stripe agrees.
        code, out, err = await admin(collector, "stripe", "reconcile", *SETTLED)
        assert code == 0, err + out
        assert "Stripe agrees with the outbox" in out
        assert len(lines_with(out, "cus_lost", " ok")) == 3  # one line per meter

        # Stripe loses one event it took: the `lost` consumer's input tokens.
        [event] = fake.accepted_events(customer="cus_lost", event_name=INPUT)
        drop_at_stripe(fake, event)
        today = datetime.fromtimestamp(event.timestamp, UTC).date().isoformat()
        code, out, _ = await admin(collector, "stripe", "reconcile", *SETTLED)
        assert code == 1
        [line] = lines_with(out, "cus_lost", "missing")
        assert line.split()[:3] == ["cus_lost", INPUT, today]
        assert "400" in line and "-400" in line
        assert "1 difference(s)" in out, out
        code, out, _ = await admin(collector, "--json", "stripe", "reconcile", *SETTLED)
        answer = json.loads(out)
        assert code == 1 and answer["agree"] is False and answer["differences"] == 1
        [missing] = [d for d in answer["days"] if d["status"] == "missing"]
        assert (missing["customer"], missing["meter"], missing["day"]) == ("cus_lost", INPUT, today)
        assert (missing["sent"], missing["stripe"]) == (400, 0)

        calls = fake.call_count(CREATE_METER_EVENT)
        code, out, err = await admin(collector, "stripe", "reconcile", *SETTLED, "--resend")
        assert code == 0, err + out
        assert event.identifier in out and f"{event.identifier}-r1" in out
        await eventually(lambda: fake.total("cus_lost", INPUT) == 400, within=10)
        await eventually(lambda: settled(collector), within=10)
        assert fake.call_count(CREATE_METER_EVENT) == calls + 1  # that one row, nothing else
        [again] = fake.accepted_events(customer="cus_lost", event_name=INPUT)
        assert (again.identifier, again.timestamp) == (f"{event.identifier}-r1", event.timestamp)
        assert all(stripe_totals(fake, c) == expected[c] for c in consumers)
        code, out, _ = await admin(collector, "stripe", "reconcile", *SETTLED, "--json")
        assert code == 0 and json.loads(out)["agree"] is True
        # The outbox records the re-send: the row now carries the identifier Stripe took.
        row = await db.fetchrow(
            "SELECT state, identifier FROM stripe_outbox WHERE identifier LIKE $1",
            event.identifier + "%",
        )
        assert dict(row) == {"state": "sent", "identifier": f"{event.identifier}-r1"}
        # A second --resend finds nothing to send.
        code, out, _ = await admin(collector, "stripe", "reconcile", *SETTLED, "--resend")
        assert code == 0 and "handed back" not in out
        assert fake.call_count(CREATE_METER_EVENT) == calls + 1


async def test_resend_leaves_alone_what_it_cannot_prove(
    billing_collector: RunningCollector, stripe_fake: FakeStripe, db: asyncpg.Connection
) -> None:
    """Two equal deltas in one hour, one lost: which one cannot be known, so nothing is sent.
    Usage Stripe shows and the outbox never sent is reported, never 'repaired'."""
    fake, collector = stripe_fake, billing_collector
    for customer in ("cus_twin", "cus_more"):
        fake.add_customer(customer)
    await put_consumer(collector, "twin", {"stripe_customer_id": "cus_twin"})
    await put_consumer(collector, "more", {"stripe_customer_id": "cus_more"})
    earlier = (datetime.now(UTC) - timedelta(hours=2)).replace(minute=5, second=0, microsecond=0)
    when = earlier.isoformat().replace("+00:00", "Z")
    for batch in range(2):  # the same usage twice, each delta sent before the next is made
        await collector.post_events([usage_event(f"t{batch}", "twin", time=when)])
        await eventually(lambda b=batch: fake.total("cus_twin", INPUT) == 100 * (b + 1))
    await collector.post_events([usage_event("m1", "more")])
    await eventually(lambda: fake.total("cus_more", INPUT) == 100)
    await eventually(lambda: settled(collector))
    drop_at_stripe(fake, fake.accepted_events(customer="cus_twin", event_name=INPUT)[0])
    client = fake.sdk_client()
    client.v1.billing.meter_events.create(
        params={
            "event_name": OUTPUT,
            "payload": {"stripe_customer_id": "cus_more", "value": "5"},
            "identifier": "not-from-token-meter",
        }
    )
    start, end = days_around_now()
    calls = fake.call_count(CREATE_METER_EVENT)
    code, out, _ = await admin(
        collector, "stripe", "reconcile", "--from", start, "--to", end, *SETTLED, "--resend"
    )
    assert code == 1
    assert lines_with(out, "cus_twin", INPUT, "missing")
    assert lines_with(out, "cus_more", OUTPUT, "extra")
    hour = earlier.replace(minute=0).isoformat().replace("+00:00", "Z")
    [refused] = lines_with(out, "cus_twin", "ambiguous")
    assert hour in refused and "100" in refused
    assert "2 difference(s) left" in out
    assert fake.call_count(CREATE_METER_EVENT) == calls  # nothing was sent
    states = await db.fetch("SELECT DISTINCT state FROM stripe_outbox")
    assert [row["state"] for row in states] == ["sent"]


async def test_summaries_that_lag_are_settling_until_the_settle_time_passes(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    with FakeStripe(summary_delay=300) as fake:
        fake.create_meter(INPUT)
        fake.add_customer("cus_slow")
        env = stripe_env(fake, TOKEN_METER_STRIPE_METERS=f"{INPUT}=input_tokens")
        async with run_collector_app(make_settings(database_url, tmp_path, **env)) as collector:
            await put_consumer(collector, "slow", {"stripe_customer_id": "cus_slow"})
            await collector.post_events([usage_event("s1", "slow")])
            await eventually(lambda: fake.total("cus_slow", INPUT) == 100)
            await eventually(lambda: settled(collector))
            start, end = days_around_now()
            period = ("--from", start, "--to", end)
            # Taken, not aggregated yet: within the settle time that is no difference...
            code, out, _ = await admin(collector, "stripe", "reconcile", *period, "--resend")
            assert code == 0
            assert lines_with(out, "cus_slow", "settling")
            assert "handed back" not in out
            # ...and past it (here: a settle time of 0), it is.
            code, out, _ = await admin(collector, "stripe", "reconcile", *period, *SETTLED)
            assert code == 1 and lines_with(out, "cus_slow", "missing")
            # The default period ends an hour ago: this hour's usage is not compared yet.
            code, out, _ = await admin(collector, "stripe", "reconcile", "--json")
            assert code == 0
            assert not [d for d in json.loads(out)["days"] if d["customer"] == "cus_slow"]
            assert fake.call_count(CREATE_METER_EVENT) == 1


async def answers_as_documented(
    collector: RunningCollector, method: str, path: str, params: str, expected: int
) -> None:
    headers = collector.auth(collector.admin_token)
    async with collector.session.request(
        method, collector.base_url + path + params, headers=headers
    ) as r:
        body = await r.read()
        assert r.status == expected, body
        check_response(method, path, r.status, r.content_type, body)


async def test_usage_and_connection_errors_exit_2(collector: RunningCollector) -> None:
    for args, problem in (
        (("--from", "last tuesday"), "--from must be a date or an RFC 3339 time"),
        (("--from", "2026-12-01T10:00:00"), "time zone offset"),
        (("--from", "2026-12-02", "--to", "2026-12-01"), "--from must be earlier than --to"),
        (("--settle", "-5"), "settle must be 0"),
        (("--settle", "soon"), "invalid float value"),
    ):
        code, _, err = await admin(collector, "stripe", "reconcile", *args)
        assert code == 2 and problem in err, (args, err)
    code, _, err = await admin(collector, "stripe", "reconcile")
    assert code == 2 and "409" in err and "Stripe billing is off" in err
    for method, path in (("GET", "/v1/stripe/reconcile"), ("POST", "/v1/stripe/reconcile/resend")):
        await answers_as_documented(collector, method, path, "", 409)
    code, _, err = await admin(
        collector, "stripe", "reconcile", env={"TOKEN_METER_URL": "http://127.0.0.1:9"}
    )
    assert code == 2 and "cannot reach the collector" in err


async def test_reconcile_answers_match_the_spec(
    billing_collector: RunningCollector, stripe_fake: FakeStripe
) -> None:
    stripe_fake.add_customer("cus_spec")
    await put_consumer(billing_collector, "spec", {"stripe_customer_id": "cus_spec"})
    await billing_collector.post_events([usage_event("p1", "spec"), usage_event("p2", "held")])
    await eventually(lambda: stripe_fake.total("cus_spec", INPUT) == 100)
    start, end = days_around_now()
    query = f"?from={start}&to={end}&settle=0"
    calls = [
        (billing_collector, "GET", "/v1/stripe/reconcile", query, 200),
        (billing_collector, "GET", "/v1/stripe/reconcile", "?from=x", 400),
        (billing_collector, "GET", "/v1/stripe/reconcile", "?settle=nan", 400),
        (billing_collector, "POST", "/v1/stripe/reconcile/resend", query, 200),
    ]
    for running, method, path, params, expected in calls:
        await answers_as_documented(running, method, path, params, expected)
    for token, status in ((billing_collector.ingest_token, 403), ("not-a-token", 401)):
        _, body, _ = await billing_collector.get("/v1/stripe/reconcile", token=token)
        assert body["status"] == status
    _, body, _ = await billing_collector.get("/v1/stripe/reconcile" + query)
    held = [d for d in body["days"] if d["status"] == "held"]
    assert held and held[0]["customer"] is None and held[0]["pending"] > 0
    # Stripe refusing the key is a 502: nothing compared.
    stripe_fake.faults.fail_next(1, 401, route=LIST_METERS)
    async with billing_collector.session.get(
        billing_collector.base_url + "/v1/stripe/reconcile",
        headers=billing_collector.auth(billing_collector.admin_token),
    ) as r:
        assert r.status == 502
        check_response("GET", "/v1/stripe/reconcile", 502, r.content_type, await r.read())


async def test_event_summaries_follow_stripes_pages(stripe_fake: FakeStripe) -> None:
    """120 hourly summaries come in two pages of at most 100; ungrouped, one summary."""
    fake = stripe_fake
    fake.add_customer("cus_pages")
    meter = fake.state.active_meter(INPUT)
    assert meter is not None
    end = int(datetime.now(UTC).replace(minute=0, second=0, microsecond=0).timestamp())
    start = end - 120 * 3600
    for hour in range(120):
        fake.state.create_meter_event(
            event_name=INPUT,
            payload={"stripe_customer_id": "cus_pages", "value": str(hour + 1)},
            identifier=f"page-{hour}",
            timestamp=start + hour * 3600,
        )
    api = StripeApi(fake.api_key, api_base=fake.url)
    try:
        hourly = await api.event_summaries(meter.id, "cus_pages", start, end, "hour")
        assert fake.call_count(LIST_EVENT_SUMMARIES) == 2
        assert [int(s.start.timestamp()) for s in hourly] == list(range(start, end, 3600))
        assert [s.value for s in hourly] == [float(h + 1) for h in range(120)]
        [whole] = await api.event_summaries(meter.id, "cus_pages", start, end, None)
        assert Decimal(whole.value) == sum(range(1, 121))
    finally:
        await api.close()
