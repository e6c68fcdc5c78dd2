"""The pure parts of the Stripe webhook: the signature check, what each event says, and what a
customer's subscriptions give its consumers."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import stripe

from tests.harness.stripe.webhooks import (
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
from token_meter_collector.billing.webhooks.events import (
    MalformedEvent,
    NotApplicable,
    WebhookEvent,
    credit_from_checkout,
    credit_from_grant,
    invoice_change,
    parse_event,
    parse_quota,
    subscription_state,
)
from token_meter_collector.billing.webhooks.service import credit_consumer, entitlement
from token_meter_collector.billing.webhooks.signature import (
    SignatureRefused,
    split_secrets,
    verify,
)
from token_meter_collector.billing.webhooks.store import CustomerConsumer, SubscriptionRow

SECRET = "whsec_test_unit"


def parsed(payload: dict[str, Any]) -> WebhookEvent:
    return parse_event(encode(payload))


# -- signature --------------------------------------------------------------------------------


def test_a_header_made_by_the_sdk_and_one_made_by_the_harness_both_verify() -> None:
    body = encode(event("invoice.paid", invoice("cus_1")))
    now = int(time.time())
    sdk = stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET, now)
    assert sdk == signature(body, SECRET, now)
    verify(body, sdk, [SECRET])


def test_the_timestamp_must_be_within_300_seconds_either_way() -> None:
    body = b'{"object": "event"}'
    t = 1_800_000_000
    header = signature(body, SECRET, t)
    for offset in (-300, 0, 300):
        verify(body, header, [SECRET], clock=lambda o=offset: t + o)
    for offset, word in ((301, "old"), (-301, "ahead")):
        with pytest.raises(SignatureRefused, match=f"300 s {word}"):
            verify(body, header, [SECRET], clock=lambda o=offset: t + o)


def test_any_of_several_secrets_and_any_of_several_signatures() -> None:
    body = b"{}"
    t = int(time.time())
    rolled = signature(body, "whsec_old", t) + "," + signature(body, "whsec_new", t).split(",")[1]
    verify(body, rolled, ["whsec_new"])
    verify(body, signature(body, "whsec_b"), split_secrets("whsec_a, whsec_b,"))
    with pytest.raises(SignatureRefused, match="No signatures found matching"):
        verify(body, signature(body, "whsec_c"), ["whsec_a", "whsec_b"])


@pytest.mark.parametrize(
    ("body", "header", "secrets", "message"),
    [
        (b"{}", None, [SECRET], "no Stripe-Signature"),
        (b"{}", "", [SECRET], "no Stripe-Signature"),
        (b"\xff{}", "t=1,v1=00", [SECRET], "not UTF-8"),
        (b"{}", "v1=00", [SECRET], "Unable to extract timestamp"),
        (b"{}", "t=now,v1=00", [SECRET], "Unable to extract timestamp"),
        (b"{}", "t=1", [SECRET], "No signatures found with expected scheme"),
        (b"{}", signature(b"{}", SECRET), [], "no webhook secret"),
    ],
)
def test_what_is_refused(body: bytes, header: str | None, secrets: list[str], message: str) -> None:
    with pytest.raises(SignatureRefused, match=message):
        verify(body, header, secrets)


# -- the envelope ---------------------------------------------------------------------------


def test_snapshot_and_thin_events_are_read() -> None:
    snapshot = parsed(event("invoice.paid", invoice("cus_1", id="in_1"), created=1_700_000_000))
    assert (snapshot.type, snapshot.thin, snapshot.object["id"]) == ("invoice.paid", False, "in_1")
    assert snapshot.created == datetime.fromtimestamp(1_700_000_000, UTC)
    thin = parsed(meter_error_report("mtr_1"))
    assert thin.thin and thin.object == {}
    assert thin.type == "v1.billing.meter.error_report_triggered"
    assert thin.created.tzinfo is not None


@pytest.mark.parametrize(
    "body",
    [
        b"nope",
        b"[]",
        b'{"object": "invoice", "id": "in_1"}',
        b'{"object": "event", "type": "invoice.paid", "created": 1}',
        b'{"object": "event", "id": "evt_1", "created": 1}',
        b'{"object": "event", "id": "evt_1", "type": "x", "created": "yesterday"}',
    ],
)
def test_a_body_that_is_not_an_event_is_malformed(body: bytes) -> None:
    with pytest.raises(MalformedEvent):
        parse_event(body)


# -- subscriptions --------------------------------------------------------------------------


def state_of(kind: str, sub: dict[str, Any]) -> Any:
    return subscription_state(parsed(event(kind, sub)))


def test_a_subscription_quota_adds_up_its_prices_times_their_quantities() -> None:
    sub = subscription(
        "cus_1",
        [
            subscription_item(price(lookup_key="seats", quota=1000), quantity=4),
            subscription_item(price(quota=500, metered=True)),
            subscription_item(price(lookup_key="extra")),
        ],
    )
    state = state_of("customer.subscription.created", sub)
    assert (state.customer, state.live, state.plan) == ("cus_1", True, "seats")
    assert (state.quota_set, state.monthly_token_quota, state.problems) == (True, 4500, ())


def test_the_plan_is_the_lookup_key_else_the_nickname_else_the_price_id() -> None:
    def plan(**fields: Any) -> str | None:
        sub = subscription("cus_1", [subscription_item(price(**fields))])
        return state_of("customer.subscription.updated", sub).plan

    assert plan(id="price_1", lookup_key="pro", nickname="Pro") == "pro"
    assert plan(id="price_1", nickname="Pro") == "Pro"
    assert plan(id="price_1") == "price_1"
    assert state_of("customer.subscription.created", subscription("cus_1", [])).plan is None


def test_a_product_quota_counts_only_when_the_product_is_expanded() -> None:
    expanded = subscription("cus_1", [subscription_item(price(product=product(quota=70)))])
    assert state_of("customer.subscription.created", expanded).monthly_token_quota == 70
    by_id = subscription("cus_1", [subscription_item(price(product="prod_1"))])
    assert state_of("customer.subscription.created", by_id).quota_set is False


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("1000000", 1_000_000),
        (" 5_000_000 ", 5_000_000),
        ("0", 0),
        ("none", None),
        ("Unlimited", None),
        ("-5", False),
        ("1e6", False),
        ("", False),
        ("٣", False),  # a digit, but not one we read
        (str(2**62 + 1), False),
    ],
)
def test_quota_metadata_values(raw: str, value: int | bool | None) -> None:
    assert parse_quota(raw) == value


def test_an_unreadable_quota_is_reported_and_skipped() -> None:
    sub = subscription("cus_1", [subscription_item(price(id="price_x", quota="lots"))])
    state = state_of("customer.subscription.created", sub)
    assert state.quota_set is False
    assert state.problems == (
        "price price_x: token_meter_monthly_quota='lots' is not a token count",
    )


@pytest.mark.parametrize(
    ("kind", "status", "live"),
    [
        ("customer.subscription.created", "active", True),
        ("customer.subscription.created", "trialing", True),
        ("customer.subscription.updated", "past_due", True),  # invoices decide about blocking
        ("customer.subscription.updated", "canceled", False),
        ("customer.subscription.updated", "incomplete_expired", False),
        ("customer.subscription.updated", "paused", False),
        ("customer.subscription.resumed", "active", True),
        ("customer.subscription.paused", "paused", False),
        ("customer.subscription.deleted", "canceled", False),
    ],
)
def test_which_subscriptions_are_live(kind: str, status: str, live: bool) -> None:
    sub = subscription("cus_1", [subscription_item(price(quota=1))], status=status)
    assert state_of(kind, sub).live is live


def row(name: str, started: int, *, live: bool = True, quota: int | None = None) -> SubscriptionRow:
    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=started)
    return SubscriptionRow(name, live, at, name, quota is not None, quota)


def test_the_newest_live_subscription_gives_the_plan_and_quota() -> None:
    given = entitlement([row("old", 1, quota=10), row("new", 2, quota=20)])
    assert given.changes() == {"plan": "new", "monthly_token_quota": 20}
    given = entitlement([row("old", 1, quota=10), row("new", 2, quota=20, live=False)])
    assert given.changes() == {"plan": "old", "monthly_token_quota": 10}
    # a newer live subscription without a quota names the plan; the quota is the older one's
    given = entitlement([row("base", 1, quota=10), row("addon", 2)])
    assert given.changes() == {"plan": "addon", "monthly_token_quota": 10}


def test_quotas_once_given_by_stripe_are_removed_when_no_live_subscription_gives_one() -> None:
    assert entitlement([row("gone", 1, quota=10, live=False)]).changes() == {
        "plan": None,
        "monthly_token_quota": None,
    }
    # never any quota from Stripe: the admin API's stays (only the plan is set)
    assert entitlement([row("basic", 1)]).changes() == {"plan": "basic"}
    assert entitlement([]).changes() == {"plan": None}


# -- credit ---------------------------------------------------------------------------------


def test_credit_keys_come_from_the_grant_or_the_session_not_the_event() -> None:
    grant = credit_grant("cus_1", 2500, "usd", id="credgr_1")
    one = credit_from_grant(parsed(event("billing.credit_grant.created", grant)))
    two = credit_from_grant(parsed(event("billing.credit_grant.created", grant)))
    assert one == two
    assert (one.key, one.amount_minor, one.currency) == (
        "stripe:credit_grant:credgr_1",
        2500,
        "USD",
    )
    session = checkout_session("cus_1", 990, "jpy", id="cs_1", amount_total=1089)
    purchase = credit_from_checkout(parsed(event("checkout.session.completed", session)))
    assert (purchase.key, purchase.amount_minor, purchase.currency) == (
        "stripe:checkout:cs_1",
        990,
        "JPY",
    )


@pytest.mark.parametrize(
    ("session", "outcome"),
    [
        (checkout_session("cus_1", 100, credit=False), "not_a_credit_purchase"),
        (checkout_session("cus_1", 100, payment_status="unpaid"), "not_paid"),
        (checkout_session("cus_1", 100, payment_status="no_payment_required"), "not_paid"),
        (checkout_session(None, 100), "no_customer"),
        (checkout_session("cus_1", 0), "zero_amount"),
        ({**checkout_session("cus_1", 100), "currency": None}, "malformed"),
    ],
)
def test_checkouts_that_add_no_credit(session: dict[str, Any], outcome: str) -> None:
    with pytest.raises(NotApplicable) as skip:
        credit_from_checkout(parsed(event("checkout.session.completed", session)))
    assert skip.value.outcome == outcome


def test_an_expanded_customer_is_read_by_its_id() -> None:
    grant = credit_grant("cus_1", 100)
    grant["customer"] = {"id": "cus_9", "object": "customer"}
    assert credit_from_grant(parsed(event("billing.credit_grant.created", grant))).customer == (
        "cus_9"
    )


def test_credit_goes_to_the_one_mapped_consumer_else_the_one_mapped_explicitly() -> None:
    def consumer(name: str, explicit: bool, mapped: bool = True) -> CustomerConsumer:
        return CustomerConsumer(name, explicit, mapped)

    assert credit_consumer([consumer("a", False)]) == "a"
    assert credit_consumer([consumer("a", False), consumer("b", True)]) == "b"
    assert credit_consumer([consumer("a", False), consumer("b", False)]) is None
    assert credit_consumer([consumer("a", True), consumer("b", True)]) is None
    assert credit_consumer([consumer("a", True, mapped=False)]) is None
    assert credit_consumer([]) is None


def test_invoice_events_name_the_invoices_state() -> None:
    for kind, state in [
        ("invoice.payment_failed", "failed"),
        ("invoice.overdue", "overdue"),
        ("invoice.paid", "paid"),
        ("invoice.voided", "voided"),
    ]:
        change = invoice_change(parsed(event(kind, invoice("cus_1", id="in_1"))))
        assert (change.invoice_id, change.customer, change.state) == ("in_1", "cus_1", state)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 5000 + b"]" * 5000,  # past msgspec's nesting limit
        b'{"id": "evt_1", "object": "event", "type": "x", "note": "\xff"}',  # not UTF-8
        b'{"id": "evt_1", "object": "event", "type": "x", "note": "a\\u0000b"}',
    ],
)
def test_hostile_bodies_are_malformed_events_never_crashes(body: bytes) -> None:
    with pytest.raises(MalformedEvent):
        parse_event(body)
