"""Stripe's asynchronous error reports (`v1.billing.meter.error_report_triggered`) become status
errors, and the rows Stripe dropped are sent again under a new identifier, or held as
unbillable when their time is too old. The handler is called as the webhook endpoint calls
it, with events the Stripe fake builds from what it dropped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.billing.conftest import (
    COST,
    INPUT,
    OUTPUT,
    TRANSPORTS,
    direct_sync,
    eventually,
    run_cycle,
    stripe_env,
)
from tests.billing.workload import METERS, fake_with_meters, hour_ago, local_totals, post_usage
from tests.conftest import RunningCollector, make_settings, run_collector_app
from tests.harness.stripe import CREATE_METER_EVENT_STREAM, RETRIEVE_V2_EVENT, FakeStripe
from tests.harness.stripe.webhooks import DEFAULT_SECRET, WebhookSender
from token_meter_collector.billing import store
from token_meter_collector.billing.error_reports import (
    ErrorReportWebhook,
    Handled,
    on_error_report,
)
from token_meter_collector.billing.webhooks import ERROR_REPORT_TRIGGERED, WebhookEvent
from token_meter_collector.keys import STRIPE_WEBHOOKS
from token_meter_collector.observability import Metrics

CUSTOMER_NOT_FOUND = "meter_event_customer_not_found"


def meter_id(fake: FakeStripe, event_name: str) -> str:
    meter = fake.state.active_meter(event_name)
    assert meter is not None
    return meter.id


def thin(event: dict[str, Any]) -> dict[str, Any]:
    """What the webhook receives: the notification without `data` (fetched on demand)."""
    return {key: value for key, value in event.items() if key != "data"}


async def outbox(db: asyncpg.Connection, consumer: str) -> list[asyncpg.Record]:
    return await db.fetch(
        """SELECT event_name, state, identifier, answer, last_error,
                  CASE WHEN next_attempt_at > now() THEN next_attempt_at - now() END AS due_in
        FROM stripe_outbox WHERE consumer = $1 ORDER BY event_name""",
        consumer,
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_dropped_events_of_an_unknown_customer_are_shown_and_sent_again_once_fixed(
    collector: RunningCollector, db: asyncpg.Connection, tmp_path: Path, transport: str
) -> None:
    """Both transports: Stripe takes events of a customer it does not have and drops them
    later. Each report names the rows: they wait 15 minutes under a new identifier, the status
    shows why, and once the customer exists the re-send is billed; a report delivered twice
    changes nothing the second time."""
    fake = fake_with_meters()
    try:
        fake.add_customer("cus_good")
        await post_usage(collector, ["good", "gone"], "u", hour_ago(1))
        async with direct_sync(
            collector, fake, tmp_path, TOKEN_METER_STRIPE_TRANSPORT=transport
        ) as sync:
            await run_cycle(sync)
            assert {r["state"] for r in await outbox(db, "gone")} == {"sent"}
            assert {r.api for r in fake.error_reports} == {
                "v1" if transport == "meter_events" else "v2_stream"
            }
            assert {r.code for r in fake.error_reports} == {CUSTOMER_NOT_FOUND}
            events = {name: fake.error_report_event(meter_id(fake, name)) for name in METERS}
            handled = [
                await on_error_report(sync.pool, events[INPUT]),
                # As the webhook gets it: the thin notification, the event fetched from Stripe.
                await on_error_report(
                    sync.pool, thin(events[OUTPUT]), fetch_event=sync.api.retrieve_event
                ),
                await on_error_report(sync.pool, events[COST], metrics=sync.metrics),
            ]
            assert handled == [Handled(resent=1)] * 3
            assert fake.call_count(RETRIEVE_V2_EVENT) == 1
            rows = await outbox(db, "gone")
            assert {r["state"] for r in rows} == {"pending"}
            assert all(r["identifier"].endswith("-r1") and r["answer"] is None for r in rows)
            assert all(timedelta(minutes=14) < r["due_in"] <= timedelta(minutes=15) for r in rows)
            assert all(r["last_error"].startswith(CUSTOMER_NOT_FOUND) for r in rows)
            status = await store.status(sync.pool, sync.settings.meters)
            errors = {(e["meter"], e["code"]) for e in status["errors"]}
            assert errors == {(name, CUSTOMER_NOT_FOUND) for name in METERS}
            assert all("1 to be sent again" in e["message"] for e in status["errors"])
            assert status["pending_rows"] == 3

            # Delivered again (Stripe retries webhooks): the identifiers are gone, nothing moves.
            assert await on_error_report(sync.pool, events[INPUT]) == Handled(unmatched=1)

            # The operator creates the customer; 15 minutes pass; the rows go again.
            fake.add_customer("cus_gone")
            await db.execute("UPDATE stripe_outbox SET next_attempt_at = now()")
            await run_cycle(sync)
        assert fake.totals() == await local_totals(db)
        again = [e.identifier for e in fake.accepted_events(customer="cus_gone")]
        assert len(again) == 3 and all(i.endswith("-r1") for i in again)
        assert {r["state"] for r in await outbox(db, "gone")} == {"sent"}
    finally:
        fake.stop()


async def test_events_too_old_for_stripe_become_unbillable(
    collector: RunningCollector, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Stripe's clock says the window is over 35 days old: the stream takes the events and
    reports `timestamp_too_far_in_past`; the rows are held as unbillable, never sent with
    another time."""
    fake = fake_with_meters()
    try:
        fake.add_customer("cus_olaf")
        await post_usage(collector, ["olaf"], "o", hour_ago(1))
        fake.clock.advance(36 * 86400)
        async with direct_sync(collector, fake, tmp_path) as sync:
            await run_cycle(sync)
            for name in METERS:
                handled = await on_error_report(
                    sync.pool, fake.error_report_event(meter_id(fake, name)), metrics=sync.metrics
                )
                assert handled == Handled(unbillable=1)
            status = await store.status(sync.pool, sync.settings.meters)
            await run_cycle(sync)
        assert {r["state"] for r in await outbox(db, "olaf")} == {"unbillable"}
        assert {"consumer": "olaf", "reason": "unbillable_too_old"} in status["held"]
        assert status["unbillable_rows"] == 3
        assert {e["code"] for e in status["errors"]} == {"timestamp_too_far_in_past"}
        assert fake.call_count(CREATE_METER_EVENT_STREAM) == 1  # never again
        assert fake.accepted_events() == []
    finally:
        fake.stop()


async def test_events_stripe_saw_in_its_future_are_sent_again_a_minute_later(
    collector: RunningCollector, db: asyncpg.Connection, tmp_path: Path
) -> None:
    fake = fake_with_meters()
    try:
        fake.add_customer("cus_fay")
        await post_usage(collector, ["fay"], "f", hour_ago(1))
        fake.clock.advance(-3 * 3600)  # Stripe's clock behind ours
        async with direct_sync(collector, fake, tmp_path) as sync:
            await run_cycle(sync)
            assert {r.code for r in fake.error_reports} == {"timestamp_in_future"}
            for name in METERS:
                event = fake.error_report_event(meter_id(fake, name))
                assert await on_error_report(sync.pool, event) == Handled(resent=1)
            rows = await outbox(db, "fay")
            assert all(timedelta(0) < r["due_in"] <= timedelta(minutes=1) for r in rows)
            fake.clock.advance(3 * 3600)
            await db.execute("UPDATE stripe_outbox SET next_attempt_at = now()")
            await run_cycle(sync)
        assert fake.totals() == await local_totals(db)
    finally:
        fake.stop()


async def test_drops_the_report_does_not_name_are_counted_in_the_status(
    collector: RunningCollector, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Stripe's report lists sample errors: when it counts more drops than it names, the
    status error says how many and where to find them."""
    fake = fake_with_meters()
    try:
        await post_usage(collector, ["nina"], "n", hour_ago(1))
        async with direct_sync(collector, fake, tmp_path) as sync:
            await run_cycle(sync)
            event = fake.error_report_event(meter_id(fake, INPUT))
            event["data"]["reason"]["error_count"] = 5
            event["data"]["reason"]["error_types"][0]["error_count"] = 5
            assert await on_error_report(sync.pool, event) == Handled(resent=1, unnamed=4)
            status = await store.status(sync.pool, sync.settings.meters)
        [error] = status["errors"]
        assert "Stripe dropped 5 meter event(s)" in error["message"]
        assert "4 not named" in error["message"] and "reconcile" in error["message"]
    finally:
        fake.stop()


async def test_an_answer_to_the_old_identifier_does_not_deliver_a_renamed_row(
    collector: RunningCollector, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A report renames a row while a retry of its old identifier is in flight: that call's
    answer must not mark the row sent, or the re-send under the new identifier never goes."""
    fake = fake_with_meters()
    try:
        fake.add_customer("cus_rita")
        fake.faults.fail_next(1, 500, route=CREATE_METER_EVENT_STREAM)
        await post_usage(collector, ["rita"], "r", hour_ago(1))
        async with direct_sync(collector, fake, tmp_path) as sync:
            await run_cycle(sync)  # the call fails: the rows wait
            await db.execute("UPDATE stripe_outbox SET next_attempt_at = now()")
            in_flight = await store.pending(db, list(METERS), hour_ago(0), 10)
            assert len(in_flight) == 3
            row = in_flight[0]
            renamed = await store.resend_dropped(
                db, [(row.identifier, row.identifier + "-r1")], row.event_name, "x", timedelta()
            )
            assert renamed == 1
            await store.mark_rows_sent(db, in_flight, "created")
        states = {(r["identifier"].endswith("-r1"), r["state"]) for r in await outbox(db, "rita")}
        assert states == {(True, "pending"), (False, "sent")}
    finally:
        fake.stop()


def webhook_event(payload: dict[str, Any]) -> WebhookEvent:
    return WebhookEvent(
        id=payload["id"],
        type=payload["type"],
        created=datetime.now(UTC),
        livemode=False,
        thin="data" not in payload,
        payload=payload,
    )


async def queued(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT event_id, attempts, last_error, applied_at IS NOT NULL AS applied"
        " FROM stripe_error_reports ORDER BY received_at"
    )


async def test_a_thin_report_is_queued_by_the_webhook_and_applied_by_the_leader(
    collector: RunningCollector, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """The webhook's handler makes no Stripe call: it queues the notification's id; the next
    cycle fetches the event (`GET /v2/core/events/{id}`) and applies it once. An event that
    carries its data is applied by the handler at once."""
    fake = fake_with_meters()
    try:
        await post_usage(collector, ["quinn"], "q", hour_ago(1))
        handler = ErrorReportWebhook(Metrics())
        async with direct_sync(collector, fake, tmp_path) as sync:
            await run_cycle(sync)
            events = {name: fake.error_report_event(meter_id(fake, name)) for name in METERS}
            async with sync.pool.acquire() as conn:
                first = await handler(conn, webhook_event(thin(events[INPUT])))
                again = await handler(conn, webhook_event(thin(events[INPUT])))
                whole = await handler(conn, webhook_event(events[OUTPUT]))
            assert (first.outcome, again.outcome) == ("queued", "queued")
            assert first.fields == {"meter": meter_id(fake, INPUT)}
            assert whole.outcome == "applied" and whole.fields["resent"] == 1
            assert fake.call_count(RETRIEVE_V2_EVENT) == 0
            assert [(r["event_id"], r["applied"]) for r in await queued(db)] == [
                (events[INPUT]["id"], False)
            ]
            await run_cycle(sync)
            assert fake.call_count(RETRIEVE_V2_EVENT) == 1
            assert [r["applied"] for r in await queued(db)] == [True]
            rows = {r["event_name"]: r for r in await outbox(db, "quinn")}
            assert {n for n, r in rows.items() if r["state"] == "pending"} == {INPUT, OUTPUT}
            assert rows[COST]["state"] == "sent"  # its report was never delivered
            await run_cycle(sync)
            assert fake.call_count(RETRIEVE_V2_EVENT) == 1  # applied once
    finally:
        fake.stop()


async def test_a_report_that_cannot_be_fetched_is_retried_and_one_stripe_lacks_is_shown(
    collector: RunningCollector, db: asyncpg.Connection, tmp_path: Path
) -> None:
    fake = fake_with_meters()
    try:
        await post_usage(collector, ["uma"], "u", hour_ago(1))
        handler = ErrorReportWebhook()
        async with direct_sync(collector, fake, tmp_path) as sync:
            await run_cycle(sync)
            event = fake.error_report_event(meter_id(fake, INPUT))
            async with sync.pool.acquire() as conn:
                await handler(conn, webhook_event(thin(event)))
                await handler(conn, webhook_event(thin({**event, "id": "evt_test_unknown"})))
            fake.faults.fail_next(1, 500, route=RETRIEVE_V2_EVENT)
            await run_cycle(sync)
            first, gone = await queued(db)
            assert (first["attempts"], first["applied"]) == (1, False)
            assert first["last_error"].startswith("APIError")
            assert (gone["attempts"], gone["applied"]) == (1, True)
            assert "no longer at Stripe" in gone["last_error"]
            status = await store.status(sync.pool, sync.settings.meters)
            assert "error_report_unavailable" in {e["code"] for e in status["errors"]}
            await db.execute("UPDATE stripe_error_reports SET next_attempt_at = now()")
            await run_cycle(sync)
        assert [r["applied"] for r in await queued(db)] == [True, True]
        assert {r["state"] for r in await outbox(db, "uma") if r["event_name"] == INPUT} == {
            "pending"
        }
    finally:
        fake.stop()


async def test_an_error_report_through_the_webhook_endpoint_gets_the_usage_billed(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    """The whole way, as in production: the collector on the stream sends usage of a customer
    Stripe lacks; Stripe's thin notification comes signed to `POST /v1/stripe/webhook`; the
    leader fetches and applies it; once the customer exists the usage is billed, once."""
    fake = fake_with_meters()
    try:
        env = stripe_env(
            fake,
            TOKEN_METER_STRIPE_TRANSPORT="meter_event_stream",
            STRIPE_WEBHOOK_SECRET=DEFAULT_SECRET,
        )
        async with run_collector_app(make_settings(database_url, tmp_path, **env)) as collector:
            assert collector.app is not None
            # The app registers the handler wherever Stripe billing is on.
            assert ERROR_REPORT_TRIGGERED in collector.app[STRIPE_WEBHOOKS].handlers
            await post_usage(collector, ["vic"], "v", hour_ago(1))
            await eventually(lambda: len(fake.error_reports) == 3)
            sender = WebhookSender(
                collector.session, collector.base_url + "/v1/stripe/webhook", DEFAULT_SECRET
            )
            for name in METERS:
                notification = thin(fake.error_report_event(meter_id(fake, name)))
                code, body = await sender.send(notification)
                assert code == 200, body
            await eventually(lambda: _all_pending(db, "vic"), within=10)
            fake.add_customer("cus_vic")
            await db.execute("UPDATE stripe_outbox SET next_attempt_at = now()")
            expected = await local_totals(db)
            await eventually(lambda: fake.totals() == expected, within=10)
            outcomes = await db.fetch("SELECT outcome FROM stripe_webhook_events")
            assert [r["outcome"] for r in outcomes] == ["queued"] * 3
        assert all(e.identifier.endswith("-r1") for e in fake.accepted_events())
    finally:
        fake.stop()


async def _all_pending(db: asyncpg.Connection, consumer: str) -> bool:
    rows = await outbox(db, consumer)
    return bool(rows) and all(r["state"] == "pending" for r in rows)


async def test_a_report_about_another_integrations_meter_changes_and_shows_nothing(
    collector: RunningCollector, db: asyncpg.Connection, tmp_path: Path
) -> None:
    fake = fake_with_meters()
    try:
        other = fake.create_meter("someone_elses_meter")
        await post_usage(collector, ["otto"], "o", hour_ago(1))
        async with direct_sync(collector, fake, tmp_path) as sync:
            await run_cycle(sync)  # otto's customer is unknown: our meters get reports too
            event = fake.error_report_event(meter_id(fake, INPUT))
            event["related_object"]["id"] = other.id
            event["data"]["reason"]["error_types"][0]["sample_errors"][0]["request"] = {
                "identifier": "their-own-id"
            }
            assert await on_error_report(sync.pool, event) == Handled(unmatched=1)
            status = await store.status(sync.pool, sync.settings.meters)
        assert status["errors"] == []
        assert {r["state"] for r in await outbox(db, "otto")} == {"sent"}
    finally:
        fake.stop()
