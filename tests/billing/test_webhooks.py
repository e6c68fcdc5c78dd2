"""POST /v1/stripe/webhook against a real collector on real PostgreSQL: deliveries signed as
Stripe signs them (tests/harness/stripe/webhooks.py), refused when they are not, taken once,
and what each kind of event does to plans, quotas, prepaid credit and the blocklist."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from tests.collector.accounts_api import (
    DEFAULT_EVENT_TOKENS,
    blocklist,
    grant,
    put_consumer,
    reasons,
    wait_for_blocklist,
)
from tests.conftest import RunningCollector, make_settings, run_collector_app
from tests.factories import usage_event
from tests.harness.stripe.webhooks import (
    DEFAULT_SECRET,
    WebhookSender,
    checkout_session,
    credit_grant,
    encode,
    event,
    invoice,
    meter_error_report,
    price,
    product,
    signature,
    subscription,
    subscription_item,
)
from token_meter_collector.billing.webhooks import (
    ERROR_REPORT_TRIGGERED,
    WebhookEvent,
    WebhookResult,
)
from token_meter_collector.keys import ACCOUNTS, STRIPE_WEBHOOKS

SECRET = DEFAULT_SECRET
PATH = "/v1/stripe/webhook"


@pytest_asyncio.fixture(loop_scope="session")
async def collector(database_url: str, tmp_path: Path) -> AsyncIterator[RunningCollector]:
    """A collector with STRIPE_WEBHOOK_SECRET set (and no STRIPE_API_KEY: webhooks need none)."""
    settings = make_settings(database_url, tmp_path, STRIPE_WEBHOOK_SECRET=SECRET)
    async with run_collector_app(settings) as running:
        yield running


@pytest.fixture
def stripe(collector: RunningCollector) -> WebhookSender:
    return WebhookSender(collector.session, collector.base_url + PATH, SECRET)


async def state(db: asyncpg.Connection) -> dict[str, Any]:
    """Everything a webhook could change, to compare before and after."""
    tables = (
        "consumers",
        "balances",
        "credit_ledger",
        "blocklist",
        "blocklist_state",
        "stripe_webhook_events",
        "stripe_subscriptions",
        "stripe_invoices",
    )
    return {t: [dict(r) for r in await db.fetch(f"SELECT * FROM {t} ORDER BY 1")] for t in tables}


async def account(db: asyncpg.Connection, consumer: str) -> dict[str, Any]:
    row = await db.fetchrow(
        "SELECT plan, monthly_token_quota FROM consumers WHERE consumer = $1", consumer
    )
    assert row is not None, consumer
    return dict(row)


async def balance_micros(collector: RunningCollector, consumer: str) -> int | None:
    status, usage = await collector.usage(consumer)
    assert status == 200
    return usage["balance_micros"]


async def outcome(db: asyncpg.Connection, event_id: str) -> str | None:
    return await db.fetchval(
        "SELECT outcome FROM stripe_webhook_events WHERE event_id = $1", event_id
    )


async def mapped(collector: RunningCollector, consumer: str, customer: str) -> None:
    status, _ = await put_consumer(collector, consumer, {"stripe_customer_id": customer})
    assert status in (200, 201)


async def taken(stripe: WebhookSender, payload: dict[str, Any], want: str = "applied") -> None:
    status, body = await stripe.send(payload)
    assert status == 200, body
    assert body == {"received": True, "replayed": False, "outcome": want}


# -- who may call ----------------------------------------------------------------------------


async def test_without_a_secret_every_call_is_503_and_changes_nothing(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    async with run_collector_app(make_settings(database_url, tmp_path)) as plain:
        before = await state(db)
        sender = WebhookSender(plain.session, plain.base_url + PATH, SECRET)
        status, body = await sender.send(
            event("billing.credit_grant.created", credit_grant("cus_a", 500))
        )
        assert status == 503
        assert body["type"].endswith("/webhooks-not-configured")
        assert "STRIPE_WEBHOOK_SECRET" in body["detail"]
        assert await state(db) == before


@pytest.mark.parametrize(
    "delivery",
    [
        "forged",  # signed with another secret
        "tampered",  # signed, then the body changed
        "stale",  # signed 301 s ago
        "ahead",  # signed 301 s in the future
        "unsigned",
        "garbled",  # a header that is not Stripe's format
        "other_scheme",  # only a v0 (test-mode) signature, which Stripe says never to trust
    ],
)
async def test_a_delivery_not_proven_to_be_stripes_is_400_and_changes_nothing(
    collector: RunningCollector, stripe: WebhookSender, db: asyncpg.Connection, delivery: str
) -> None:
    await mapped(collector, "alice", "cus_alice")
    payload = event("billing.credit_grant.created", credit_grant("cus_alice", 2500))
    body = encode(payload)
    before = await state(db)
    now = int(time.time())
    header = {
        "forged": signature(body, "whsec_not_the_endpoints_secret"),
        "tampered": signature(body),
        "stale": signature(body, timestamp=now - 301),
        "ahead": signature(body, timestamp=now + 301),
        "unsigned": None,
        "garbled": "sha256=" + "0" * 64,
        "other_scheme": signature(body).replace("v1=", "v0="),
    }[delivery]
    if delivery == "tampered":
        body = body.replace(b"2500", b"9500")
    status, answer = await stripe.send(body, header=header, signed=header is not None)
    assert status == 400, answer
    assert answer["type"].endswith("/invalid-signature")
    if delivery in ("stale", "ahead"):
        assert "300 s" in answer["detail"]
    assert await state(db) == before


async def test_a_signature_just_inside_the_tolerance_is_taken(
    collector: RunningCollector, stripe: WebhookSender
) -> None:
    await mapped(collector, "alice", "cus_alice")
    payload = event("billing.credit_grant.created", credit_grant("cus_alice", 100))
    status, body = await stripe.send(payload, timestamp=int(time.time()) - 290)
    assert (status, body["outcome"]) == (200, "applied")


async def test_a_signature_from_any_configured_secret_is_taken(
    database_url: str, tmp_path: Path
) -> None:
    """Two destinations (say snapshot events and thin events) post with their own secrets."""
    other = "whsec_test_thin_destination_secret"
    settings = make_settings(database_url, tmp_path, STRIPE_WEBHOOK_SECRET=f"{SECRET}, {other}")
    async with run_collector_app(settings) as running:
        sender = WebhookSender(running.session, running.base_url + PATH, other)
        status, body = await sender.send(meter_error_report("mtr_test_1"))
        assert (status, body["outcome"]) == (200, "unhandled")
        status, _ = await sender.send(meter_error_report("mtr_test_1"), secret="whsec_test_x")
        assert status == 400


async def test_a_body_over_one_mib_is_413(stripe: WebhookSender) -> None:
    status, body = await stripe.send(b"{" + b" " * (1024 * 1024) + b"}")
    assert status == 413
    assert body["type"].endswith("/payload-too-large")


async def test_a_signed_body_that_is_not_an_event_is_400_and_not_recorded(
    stripe: WebhookSender, db: asyncpg.Connection
) -> None:
    for body in (b"[1, 2]", b'{"object": "customer", "id": "cus_1"}', b"not json"):
        status, answer = await stripe.send(body)
        assert status == 400, answer
        assert answer["type"].endswith("/not-a-stripe-event")
    assert await db.fetchval("SELECT count(*) FROM stripe_webhook_events") == 0


# -- each event once -------------------------------------------------------------------------


async def test_a_replayed_event_is_200_and_changes_nothing(
    collector: RunningCollector, stripe: WebhookSender, db: asyncpg.Connection
) -> None:
    await mapped(collector, "alice", "cus_alice")
    payload = event("billing.credit_grant.created", credit_grant("cus_alice", 2500))
    await taken(stripe, payload)
    assert await balance_micros(collector, "alice") == 25_000_000
    before = await state(db)
    for timestamp in (None, int(time.time()) - 100):  # Stripe re-signs each retry
        status, body = await stripe.send(payload, timestamp=timestamp)
        assert status == 200
        assert body == {"received": True, "replayed": True, "outcome": "replayed"}
    assert await state(db) == before


async def test_an_event_refused_once_is_taken_when_it_comes_validly_signed(
    collector: RunningCollector, stripe: WebhookSender, db: asyncpg.Connection
) -> None:
    await mapped(collector, "alice", "cus_alice")
    payload = event("billing.credit_grant.created", credit_grant("cus_alice", 700))
    status, _ = await stripe.send(payload, secret="whsec_test_wrong")
    assert status == 400
    status, _ = await stripe.send(payload, timestamp=int(time.time()) - 3600)
    assert status == 400
    await taken(stripe, payload)
    assert await balance_micros(collector, "alice") == 7_000_000
    assert await outcome(db, payload["id"]) == "applied"


async def test_the_same_event_delivered_twice_at_once_is_applied_once(
    collector: RunningCollector, stripe: WebhookSender
) -> None:
    await mapped(collector, "alice", "cus_alice")
    payload = event("billing.credit_grant.created", credit_grant("cus_alice", 1000))
    answers = await asyncio.gather(*(stripe.send(payload) for _ in range(5)))
    assert sorted(body["replayed"] for _, body in answers) == [False, True, True, True, True]
    assert await balance_micros(collector, "alice") == 10_000_000


async def test_an_unknown_type_is_200_recorded_and_logged(
    stripe: WebhookSender, db: asyncpg.Connection
) -> None:
    payload = event("customer.created", {"id": "cus_new", "object": "customer"})
    with capture_logs() as logs:
        await taken(stripe, payload, "ignored_type")
    assert await outcome(db, payload["id"]) == "ignored_type"
    line = next(e for e in logs if e["event"] == "stripe_webhook")
    assert (line["type"], line["outcome"]) == ("customer.created", "ignored_type")


async def test_an_unknown_customer_is_200_logged_and_changes_nothing(
    collector: RunningCollector, stripe: WebhookSender, db: asyncpg.Connection
) -> None:
    await mapped(collector, "alice", "cus_alice")
    before = await state(db)
    payloads = [
        event("billing.credit_grant.created", credit_grant("cus_nobody", 2500)),
        event("customer.subscription.created", subscription("cus_nobody", [])),
        event("invoice.payment_failed", invoice("cus_nobody")),
    ]
    with capture_logs() as logs:
        for payload in payloads:
            await taken(stripe, payload, "unknown_customer")
    warned = [e for e in logs if e["event"] == "stripe_webhook" and e["log_level"] == "warning"]
    assert [e["customer"] for e in warned] == ["cus_nobody"] * 3
    after = await state(db)
    for table in ("consumers", "balances", "credit_ledger", "blocklist"):
        assert after[table] == before[table]


async def test_a_consumer_found_by_its_cus_custom_id(
    collector: RunningCollector, stripe: WebhookSender
) -> None:
    """No stripe_customer_id set: the Kong custom_id its events carry maps it (contract 4)."""
    await collector.post_events([usage_event("e1", "bob", consumer_custom_id="cus_bob")])
    await taken(stripe, event("billing.credit_grant.created", credit_grant("cus_bob", 300)))
    assert await balance_micros(collector, "bob") == 3_000_000  # earlier usage was post-paid


# -- subscriptions ---------------------------------------------------------------------------


async def test_subscriptions_set_the_plan_and_quota_and_deleted_or_paused_clear_them(
    collector: RunningCollector, stripe: WebhookSender, db: asyncpg.Connection
) -> None:
    await mapped(collector, "carl", "cus_carl")
    sub_id = "sub_test_carl"
    pro = [subscription_item(price(lookup_key="pro", quota=1_000_000))]
    team = [subscription_item(price(lookup_key="team", quota=5_000_000))]
    steps = [
        ("customer.subscription.created", pro, "active", "pro", 1_000_000),
        ("customer.subscription.updated", team, "active", "team", 5_000_000),
        ("customer.subscription.paused", team, "paused", None, None),
        ("customer.subscription.resumed", team, "active", "team", 5_000_000),
        ("customer.subscription.deleted", team, "canceled", None, None),
    ]
    created = int(time.time()) - 100
    for i, (kind, items, status, plan, quota) in enumerate(steps):
        obj = subscription("cus_carl", items, id=sub_id, status=status)
        await taken(stripe, event(kind, obj, created=created + i))
        assert await account(db, "carl") == {"plan": plan, "monthly_token_quota": quota}, kind


async def test_a_quota_from_a_subscription_blocks_when_used_up(
    collector: RunningCollector, stripe: WebhookSender
) -> None:
    await mapped(collector, "dora", "cus_dora")
    items = [subscription_item(price(lookup_key="starter", quota=2 * DEFAULT_EVENT_TOKENS))]
    await taken(stripe, event("customer.subscription.created", subscription("cus_dora", items)))
    await collector.post_events([usage_event("d1", "dora"), usage_event("d2", "dora")])
    snapshot = await wait_for_blocklist(collector, lambda s: "dora" in reasons(s))
    assert reasons(snapshot)["dora"] == ["quota_exceeded"]


async def test_an_older_subscription_event_arriving_late_changes_nothing(
    collector: RunningCollector, stripe: WebhookSender, db: asyncpg.Connection
) -> None:
    """Stripe does not deliver events in order."""
    await mapped(collector, "erin", "cus_erin")
    now = int(time.time())
    newer = subscription("cus_erin", [subscription_item(price(lookup_key="team", quota=500))])
    older = subscription(
        "cus_erin", [subscription_item(price(lookup_key="pro", quota=100))], id=newer["id"]
    )
    await taken(stripe, event("customer.subscription.updated", newer, created=now))
    await taken(stripe, event("customer.subscription.created", older, created=now - 60), "stale")
    assert await account(db, "erin") == {"plan": "team", "monthly_token_quota": 500}


async def test_the_quota_is_each_price_times_its_quantity_or_unlimited(
    collector: RunningCollector, stripe: WebhookSender, db: asyncpg.Connection
) -> None:
    await mapped(collector, "finn", "cus_finn")
    items = [
        subscription_item(price(lookup_key="seats", quota=100_000), quantity=3),
        subscription_item(price(quota="50_000", metered=True)),  # no quantity: one
        subscription_item(price(lookup_key="support")),  # carries no quota
    ]
    sub = subscription("cus_finn", items)
    await taken(stripe, event("customer.subscription.created", sub))
    assert await account(db, "finn") == {"plan": "seats", "monthly_token_quota": 350_000}
    sub["items"]["data"].append(subscription_item(price(quota="unlimited")))
    await taken(stripe, event("customer.subscription.updated", sub))
    assert await account(db, "finn") == {"plan": "seats", "monthly_token_quota": None}


async def test_the_quota_is_read_from_an_expanded_product_and_a_bad_one_is_ignored(
    collector: RunningCollector, stripe: WebhookSender, db: asyncpg.Connection
) -> None:
    await mapped(collector, "gus", "cus_gus")
    items = [
        subscription_item(price(nickname="Growth", product=product(quota=42_000))),
        subscription_item(price(quota="lots")),  # not a number: logged, not used
    ]
    with capture_logs() as logs:
        await taken(stripe, event("customer.subscription.created", subscription("cus_gus", items)))
    assert await account(db, "gus") == {"plan": "Growth", "monthly_token_quota": 42_000}
    line = next(e for e in logs if e["event"] == "stripe_webhook")
    assert "'lots' is not a token count" in line["problems"][0]


async def test_a_subscription_without_a_quota_keeps_the_admins_quota(
    collector: RunningCollector, stripe: WebhookSender, db: asyncpg.Connection
) -> None:
    """Prices without token_meter_monthly_quota (and a product not expanded, as in every real
    delivery) set the plan only; deleting such a subscription leaves the quota too."""
    await put_consumer(
        collector, "hal", {"stripe_customer_id": "cus_hal", "monthly_token_quota": 777}
    )
    sub = subscription("cus_hal", [subscription_item(price(id="price_test_basic"))])
    await taken(stripe, event("customer.subscription.created", sub))
    assert await account(db, "hal") == {"plan": "price_test_basic", "monthly_token_quota": 777}
    sub["status"] = "canceled"
    await taken(stripe, event("customer.subscription.deleted", sub))
    assert await account(db, "hal") == {"plan": None, "monthly_token_quota": 777}


async def test_ending_an_old_subscription_keeps_the_live_ones_plan(
    collector: RunningCollector, stripe: WebhookSender, db: asyncpg.Connection
) -> None:
    """An upgrade that starts a new subscription, then cancels the old one."""
    await mapped(collector, "ida", "cus_ida")
    now = int(time.time())
    old = subscription(
        "cus_ida", [subscription_item(price(lookup_key="pro", quota=100))], start_date=now - 900
    )
    new = subscription(
        "cus_ida", [subscription_item(price(lookup_key="team", quota=900))], start_date=now - 10
    )
    await taken(stripe, event("customer.subscription.created", old, created=now - 900))
    await taken(stripe, event("customer.subscription.created", new, created=now - 10))
    assert await account(db, "ida") == {"plan": "team", "monthly_token_quota": 900}
    old["status"] = "canceled"
    await taken(stripe, event("customer.subscription.deleted", old, created=now - 5))
    assert await account(db, "ida") == {"plan": "team", "monthly_token_quota": 900}


# -- prepaid credit --------------------------------------------------------------------------


async def test_a_credit_grant_adds_credit_once_even_through_two_events(
    collector: RunningCollector, stripe: WebhookSender, db: asyncpg.Connection
) -> None:
    await mapped(collector, "jo", "cus_jo")
    grant_obj = credit_grant("cus_jo", 2500)  # $25.00
    await taken(stripe, event("billing.credit_grant.created", grant_obj))
    # The same grant in another event (a second destination, a resend from a tool): once.
    await taken(stripe, event("billing.credit_grant.created", grant_obj), "already_granted")
    assert await balance_micros(collector, "jo") == 25_000_000
    row = await db.fetchrow("SELECT * FROM credit_ledger WHERE consumer = 'jo'")
    assert (row["kind"], row["source"]) == ("grant", "stripe")
    assert row["idempotency_key"] == f"stripe:credit_grant:{grant_obj['id']}"
    assert row["amount_nanos"] == 25_000_000_000


async def test_a_paid_credit_checkout_adds_its_subtotal_once(
    collector: RunningCollector, stripe: WebhookSender
) -> None:
    await mapped(collector, "kim", "cus_kim")
    session = checkout_session("cus_kim", 1000, amount_total=1190)  # tax is not credit
    await taken(stripe, event("checkout.session.completed", session))
    await taken(
        stripe, event("checkout.session.async_payment_succeeded", session), "already_granted"
    )
    assert await balance_micros(collector, "kim") == 10_000_000


async def test_a_checkout_paid_later_adds_credit_when_the_payment_succeeds(
    collector: RunningCollector, stripe: WebhookSender
) -> None:
    await mapped(collector, "lee", "cus_lee")
    session = checkout_session("cus_lee", 4000, payment_status="unpaid")  # a bank debit
    await taken(stripe, event("checkout.session.completed", session), "not_paid")
    assert await balance_micros(collector, "lee") is None
    session["payment_status"] = "paid"
    await taken(stripe, event("checkout.session.async_payment_succeeded", session))
    assert await balance_micros(collector, "lee") == 40_000_000


async def test_a_checkout_not_marked_as_credit_adds_nothing(
    collector: RunningCollector, stripe: WebhookSender
) -> None:
    await mapped(collector, "max", "cus_max")
    session = checkout_session("cus_max", 4000, credit=False)
    await taken(stripe, event("checkout.session.completed", session), "not_a_credit_purchase")
    assert await balance_micros(collector, "max") is None


@pytest.mark.parametrize(("currency", "minor"), [("jpy", 500), ("kwd", 1250), ("eur", 999)])
async def test_credit_in_another_currency_than_the_price_books_is_refused_and_logged(
    collector: RunningCollector,
    stripe: WebhookSender,
    db: asyncpg.Connection,
    currency: str,
    minor: int,
) -> None:
    await mapped(collector, "ned", "cus_ned")
    before = await state(db)
    payloads = [
        event("billing.credit_grant.created", credit_grant("cus_ned", minor, currency)),
        event("checkout.session.completed", checkout_session("cus_ned", minor, currency)),
    ]
    with capture_logs() as logs:
        for payload in payloads:
            await taken(stripe, payload, "currency_refused")
    refused = [e for e in logs if e["event"] == "stripe_webhook"]
    assert [(e["log_level"], e["currency"], e["book_currency"]) for e in refused] == [
        ("error", currency.upper(), "USD")
    ] * 2
    after = await state(db)
    for table in ("balances", "credit_ledger", "blocklist"):
        assert after[table] == before[table]


@pytest.mark.parametrize(
    ("currency", "minor", "micros"),
    [
        ("JPY", 500, 500_000_000),  # zero-decimal: ¥500
        ("KWD", 1250, 1_250_000),  # three-decimal: 1.250 KWD
        ("BHD", 10, 10_000),  # 0.010 BHD
        ("EUR", 999, 9_990_000),  # two-decimal: €9.99
    ],
)
async def test_credit_in_the_price_books_currency_converts_from_its_minor_unit(
    database_url: str, tmp_path: Path, currency: str, minor: int, micros: int
) -> None:
    book = tmp_path / "prices.toml"
    book.write_text(
        f'version = "{currency.lower()}-1"\ncurrency = "{currency}"\n\n'
        '[models."gpt-4o"]\ninput = 2.50\noutput = 10.00\n'
    )
    settings = make_settings(
        database_url,
        tmp_path,
        STRIPE_WEBHOOK_SECRET=SECRET,
        TOKEN_METER_PRICE_BOOK=str(book),
    )
    async with run_collector_app(settings) as running:
        sender = WebhookSender(running.session, running.base_url + PATH, SECRET)
        await mapped(running, "oli", "cus_oli")
        payload = credit_grant("cus_oli", minor, currency.lower())
        await taken(sender, event("billing.credit_grant.created", payload))
        assert await balance_micros(running, "oli") == micros


async def test_credit_of_a_customer_mapped_to_several_consumers_goes_to_the_explicit_one(
    collector: RunningCollector, stripe: WebhookSender, db: asyncpg.Connection
) -> None:
    await collector.post_events([usage_event("p1", "pam-dev", consumer_custom_id="cus_pam")])
    await collector.post_events([usage_event("p2", "pam-ci", consumer_custom_id="cus_pam")])
    grant_event = event("billing.credit_grant.created", credit_grant("cus_pam", 100))
    await taken(stripe, grant_event, "ambiguous_customer")
    assert await db.fetchval("SELECT count(*) FROM credit_ledger WHERE kind = 'grant'") == 0
    await mapped(collector, "pam", "cus_pam")
    await taken(stripe, event("billing.credit_grant.created", credit_grant("cus_pam", 100)))
    assert await balance_micros(collector, "pam") == 1_000_000


# -- invoices: payment_overdue ---------------------------------------------------------------


async def test_failed_or_overdue_invoices_block_and_paying_the_last_one_unblocks(
    collector: RunningCollector, stripe: WebhookSender
) -> None:
    await mapped(collector, "quin", "cus_quin")
    first, second = invoice("cus_quin"), invoice("cus_quin")
    await taken(stripe, event("invoice.payment_failed", first))
    snapshot = await wait_for_blocklist(collector, lambda s: "quin" in reasons(s))
    entry = next(e for e in snapshot["entries"] if e["consumer"] == "quin")
    assert entry["reason"] == "payment_overdue"
    assert entry["detail"] == {"stripe_customer_id": "cus_quin", "invoice": first["id"]}
    await taken(stripe, event("invoice.overdue", second))
    first["status"] = "paid"
    await taken(stripe, event("invoice.paid", first))
    assert reasons(await blocklist(collector))["quin"] == ["payment_overdue"]  # second is due
    second["status"] = "paid"
    await taken(stripe, event("invoice.paid", second))
    await wait_for_blocklist(collector, lambda s: "quin" not in reasons(s))


async def test_a_late_failure_of_a_paid_invoice_changes_nothing(
    collector: RunningCollector, stripe: WebhookSender
) -> None:
    await mapped(collector, "rae", "cus_rae")
    bill = invoice("cus_rae")
    now = int(time.time())
    await taken(stripe, event("invoice.paid", {**bill, "status": "paid"}, created=now))
    late = event("invoice.payment_failed", bill, created=now - 30)
    await taken(stripe, late, "invoice_settled_before")
    assert "rae" not in reasons(await blocklist(collector))


async def test_a_voided_invoice_no_longer_blocks(
    collector: RunningCollector, stripe: WebhookSender
) -> None:
    await mapped(collector, "sid", "cus_sid")
    bill = invoice("cus_sid")
    await taken(stripe, event("invoice.payment_failed", bill))
    await wait_for_blocklist(collector, lambda s: "sid" in reasons(s))
    await taken(stripe, event("invoice.voided", {**bill, "status": "void"}))
    await wait_for_blocklist(collector, lambda s: "sid" not in reasons(s))


async def test_with_block_on_overdue_off_an_unpaid_invoice_does_not_block(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    settings = make_settings(
        database_url,
        tmp_path,
        STRIPE_WEBHOOK_SECRET=SECRET,
        TOKEN_METER_BLOCK_ON_OVERDUE="false",
    )
    async with run_collector_app(settings) as running:
        sender = WebhookSender(running.session, running.base_url + PATH, SECRET)
        await mapped(running, "tia", "cus_tia")
        await taken(sender, event("invoice.payment_failed", invoice("cus_tia")), "recorded")
        await taken(sender, event("invoice.overdue", invoice("cus_tia")), "recorded")
        assert reasons(await blocklist(running)) == {}
    assert await db.fetchval("SELECT count(*) FROM stripe_invoices WHERE customer = 'cus_tia'") == 2


async def test_an_overdue_block_ranks_under_credit_over_quota_and_the_rules_leave_it(
    collector: RunningCollector, stripe: WebhookSender
) -> None:
    """insufficient_credits > payment_overdue > quota_exceeded; the accounts' evaluations
    (a grant, a quota change, the sweep) never lift payment_overdue, which is not theirs."""
    await put_consumer(
        collector, "uma", {"stripe_customer_id": "cus_uma", "monthly_token_quota": 10}
    )
    await collector.post_events([usage_event("u1", "uma")])  # quota used up
    await wait_for_blocklist(collector, lambda s: reasons(s).get("uma") == ["quota_exceeded"])
    bill = invoice("cus_uma")
    await taken(stripe, event("invoice.payment_failed", bill))
    snapshot = await wait_for_blocklist(collector, lambda s: len(reasons(s).get("uma", [])) == 2)
    entry = next(e for e in snapshot["entries"] if e["consumer"] == "uma")
    assert (entry["reason"], entry["reasons"]) == (
        "payment_overdue",
        ["payment_overdue", "quota_exceeded"],
    )
    assert entry["detail"]["invoice"] == bill["id"]
    status, _, _ = await grant(collector, "uma", 400, "tiny")  # burns to 400 - 450 < 0 next
    assert status == 201
    await collector.post_events([usage_event("u2", "uma")])
    snapshot = await wait_for_blocklist(collector, lambda s: len(reasons(s).get("uma", [])) == 3)
    entry = next(e for e in snapshot["entries"] if e["consumer"] == "uma")
    assert entry["reason"] == "insufficient_credits"
    assert entry["reasons"] == ["insufficient_credits", "payment_overdue", "quota_exceeded"]
    await put_consumer(collector, "uma", {"monthly_token_quota": None})
    await grant(collector, "uma", 10_000_000, "top-up")
    assert collector.app is not None
    await collector.app[ACCOUNTS].sweep(wait_for_lock=True)
    snapshot = await wait_for_blocklist(
        collector, lambda s: reasons(s).get("uma") == ["payment_overdue"]
    )
    await taken(stripe, event("invoice.paid", {**bill, "status": "paid"}))
    await wait_for_blocklist(collector, lambda s: "uma" not in reasons(s))


async def test_the_plugin_answers_payment_overdue_with_402_through_the_blocklist(
    collector: RunningCollector, stripe: WebhookSender
) -> None:
    """What the collector publishes is what plugin/block_answer.py turns into 402 (the plugin
    server's own test drives it through Kong's protocol: tests/integration)."""
    from token_meter_plugin.block_answer import block_response

    await mapped(collector, "vic", "cus_vic")
    await taken(stripe, event("invoice.overdue", invoice("cus_vic")))
    snapshot = await wait_for_blocklist(collector, lambda s: "vic" in reasons(s))
    entry = next(e for e in snapshot["entries"] if e["consumer"] == "vic")
    status, body, headers = block_response(entry["reason"])
    assert status == 402
    assert json.loads(body)["error"]["code"] == headers["X-Token-Meter-Reason"] == "payment_overdue"


# -- the registration point ------------------------------------------------------------------


async def test_a_thin_error_report_without_a_handler_is_200_and_logged(
    stripe: WebhookSender, db: asyncpg.Connection
) -> None:
    payload = meter_error_report("mtr_test_42")
    with capture_logs() as logs:
        await taken(stripe, payload, "unhandled")
    line = next(e for e in logs if e["event"] == "stripe_webhook")
    assert (line["log_level"], line["related_object"]) == ("warning", "mtr_test_42")
    assert await outcome(db, payload["id"]) == "unhandled"


async def test_a_registered_handler_runs_once_inside_the_events_transaction(
    collector: RunningCollector, stripe: WebhookSender, db: asyncpg.Connection
) -> None:
    seen: list[str] = []

    async def on_error_report(conn: asyncpg.Connection, event: WebhookEvent) -> WebhookResult:
        assert conn.is_in_transaction()
        seen.append(event.payload["related_object"]["id"])
        if len(seen) == 1:
            raise RuntimeError("the transport's store is down")  # 500: Stripe retries
        return WebhookResult("recorded", {"meter": seen[-1]})

    assert collector.app is not None
    service = collector.app[STRIPE_WEBHOOKS]
    service.register(ERROR_REPORT_TRIGGERED, on_error_report)
    with pytest.raises(ValueError, match="already registered"):
        service.register(ERROR_REPORT_TRIGGERED, on_error_report)
    payload = meter_error_report("mtr_test_7")
    status, _ = await stripe.send(payload)
    assert status == 500
    assert await outcome(db, payload["id"]) is None  # rolled back with the handler's failure
    await taken(stripe, payload, "recorded")
    status, body = await stripe.send(payload)
    assert (status, body["replayed"]) == (200, True)
    assert seen == ["mtr_test_7", "mtr_test_7"]
