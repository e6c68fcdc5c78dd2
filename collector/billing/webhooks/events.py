"""What a Stripe event says, as plain data: pure functions of the signed payload, no I/O.

Payload shapes are those of stripe-python@v16.1.0: `stripe/_event.py` (a snapshot event:
`data.object` is the object as it was), `stripe/v2/core/_event.py` (a thin event notification,
`object` `v2.core.event`: no object, only `related_object`), `stripe/_subscription.py`,
`stripe/_subscription_item.py`, `stripe/_price.py`, `stripe/billing/_credit_grant.py`,
`stripe/checkout/_session.py` and `stripe/_invoice.py`. Stripe never expands an object inside
an event, so `price.product` is normally an id: the quota is read from the price's metadata,
and from the product's only when a payload carries the product expanded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import msgspec

from ...accounts.model import MAX_TOKENS_QUOTA

QUOTA_KEY: Final = "token_meter_monthly_quota"
CREDIT_KEY: Final = "token_meter_credit"
UNLIMITED: Final = frozenset({"none", "unlimited"})
# Subscription statuses in which it gives nothing (stripe/_subscription.py `status`).
ENDED_STATUSES: Final = frozenset({"canceled", "incomplete_expired", "paused"})
MAX_PLAN_LENGTH: Final = 255  # as PUT /v1/consumers takes

InvoiceState = Literal["failed", "overdue", "paid", "voided"]


class MalformedEvent(ValueError):
    """The body is not a Stripe event (even when signed: nothing is recorded, 400)."""


class NotApplicable(Exception):
    """A signed event that changes nothing here; `outcome` says why (logged, answered 200)."""

    def __init__(self, outcome: str, **fields: Any) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.fields = fields


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """A verified event. `payload` is the whole event as Stripe sent it."""

    id: str
    type: str
    created: datetime
    livemode: bool
    thin: bool  # a v2 thin event notification (`v2.core.event`): no snapshot object
    payload: Mapping[str, Any] = field(repr=False)

    @property
    def object(self) -> Mapping[str, Any]:
        """The snapshot's `data.object` ({} for a thin event)."""
        data = self.payload.get("data")
        found = data.get("object") if isinstance(data, Mapping) else None
        return found if isinstance(found, Mapping) and not self.thin else {}


def parse_event(body: bytes) -> WebhookEvent:
    """The event in a verified body, or MalformedEvent."""
    try:
        payload = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        # msgspec raises RecursionError past its nesting limit and UnicodeDecodeError for a
        # string that is not UTF-8: both are a sender's error, never a 500.
        raise MalformedEvent(f"the body is not JSON: {type(exc).__name__}") from None
    if b"\\u0000" in body:
        raise MalformedEvent("the event holds U+0000, which no text column can store")
    if not isinstance(payload, dict):
        raise MalformedEvent("the body is not a JSON object")
    kind = payload.get("object")
    if kind not in ("event", "v2.core.event"):
        raise MalformedEvent("the body is not a Stripe event (object 'event' or 'v2.core.event')")
    event_id, event_type = payload.get("id"), payload.get("type")
    if not isinstance(event_id, str) or not event_id or len(event_id) > 255:
        raise MalformedEvent("the event has no id")
    if not isinstance(event_type, str) or not event_type:
        raise MalformedEvent("the event has no type")
    return WebhookEvent(
        id=event_id,
        type=event_type,
        created=_created(payload.get("created")),
        livemode=payload.get("livemode") is True,
        thin=kind == "v2.core.event",
        payload=payload,
    )


def _created(value: object) -> datetime:
    # v1 events count seconds since the epoch; v2 notifications give RFC 3339.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    raise MalformedEvent("the event has no valid created time")


def customer_of(obj: Mapping[str, Any]) -> str | None:
    """The Stripe customer id an object names (an id, or the customer expanded)."""
    customer = obj.get("customer")
    if isinstance(customer, Mapping):
        customer = customer.get("id")
    return customer if isinstance(customer, str) and customer else None


def _id(obj: Mapping[str, Any], what: str) -> str:
    value = obj.get("id")
    if not isinstance(value, str) or not value:
        raise NotApplicable("malformed", problem=f"the {what} has no id")
    return value


# -- subscriptions ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubscriptionState:
    """What one subscription event says the consumer is entitled to."""

    subscription_id: str
    customer: str
    live: bool  # False once deleted, paused, canceled or expired: it gives nothing
    started: datetime
    plan: str | None
    quota_set: bool  # some price (or expanded product) carries token_meter_monthly_quota
    monthly_token_quota: int | None  # what they add up to; None: unlimited (or not set)
    problems: tuple[str, ...] = ()  # metadata values that are not quotas (ignored, logged)


def subscription_state(event: WebhookEvent) -> SubscriptionState:
    obj = event.object
    subscription_id = _id(obj, "subscription")
    customer = customer_of(obj)
    if customer is None:
        raise NotApplicable("no_customer", subscription=subscription_id)
    status = obj.get("status")
    live = event.type not in (
        "customer.subscription.deleted",
        "customer.subscription.paused",
    ) and (status not in ENDED_STATUSES)
    start = obj.get("start_date") or obj.get("created")
    started = (
        datetime.fromtimestamp(start, UTC)
        if isinstance(start, int) and not isinstance(start, bool)
        else event.created
    )
    items = _items(obj)
    quotas: list[tuple[Mapping[str, Any], int | None]] = []  # (price, tokens; None: unlimited)
    problems: list[str] = []
    for item in items:
        price = item.get("price")
        if not isinstance(price, Mapping):
            continue
        raw = _metadata(price).get(QUOTA_KEY)
        product = price.get("product")
        if raw is None and isinstance(product, Mapping):
            raw = _metadata(product).get(QUOTA_KEY)
        if raw is None:
            continue
        tokens = parse_quota(raw)
        if tokens is False:
            problems.append(f"price {price.get('id')}: {QUOTA_KEY}={raw!r} is not a token count")
            continue
        quantity = item.get("quantity")
        if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
            quantity = 1  # metered prices have no quantity
        quotas.append((price, None if tokens is None else tokens * quantity))
    total: int | None = None
    if quotas and all(tokens is not None for _, tokens in quotas):
        total = min(MAX_TOKENS_QUOTA, sum(tokens or 0 for _, tokens in quotas))
    plan_price = quotas[0][0] if quotas else _first_price(items)
    return SubscriptionState(
        subscription_id=subscription_id,
        customer=customer,
        live=live,
        started=started,
        plan=plan_name(plan_price) if plan_price is not None else None,
        quota_set=bool(quotas),
        monthly_token_quota=total,
        problems=tuple(problems),
    )


def parse_quota(raw: object) -> int | Literal[False] | None:
    """A metadata value as tokens per month: a whole number, or `none`/`unlimited` (None).
    False when it is neither (Stripe metadata values are strings)."""
    text = str(raw).strip().replace("_", "")
    if text.lower() in UNLIMITED:
        return None
    if not text.isdigit() or not text.isascii():
        return False
    value = int(text)
    return value if value <= MAX_TOKENS_QUOTA else False


def plan_name(price: Mapping[str, Any]) -> str | None:
    """The plan a price stands for: its lookup key, else its nickname, else its id."""
    for key in ("lookup_key", "nickname", "id"):
        value = price.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()[:MAX_PLAN_LENGTH]
    return None


def _items(obj: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    items = obj.get("items")
    data = items.get("data") if isinstance(items, Mapping) else None
    if not isinstance(data, list):
        return []
    return [item for item in data if isinstance(item, Mapping)]


def _first_price(items: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    for item in items:
        price = item.get("price")
        if isinstance(price, Mapping):
            return price
    return None


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    metadata = obj.get("metadata")
    return metadata if isinstance(metadata, Mapping) else {}


# -- prepaid credit ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreditPurchase:
    """Credit to add once: `key` is the ledger's idempotency key, derived from the Stripe object
    (not the event), so two events about one grant or one checkout add it once."""

    customer: str
    key: str
    amount_minor: int  # in the currency's minor unit, as Stripe counts it
    currency: str  # upper case


def credit_from_grant(event: WebhookEvent) -> CreditPurchase:
    """`billing.credit_grant.created`: its monetary amount."""
    obj = event.object
    grant_id = _id(obj, "credit grant")
    customer = customer_of(obj)
    if customer is None:
        raise NotApplicable("no_customer", credit_grant=grant_id)
    amount = obj.get("amount")
    monetary = amount.get("monetary") if isinstance(amount, Mapping) else None
    if not isinstance(monetary, Mapping):
        raise NotApplicable("not_monetary", credit_grant=grant_id)
    return _purchase(
        customer, f"stripe:credit_grant:{grant_id}", monetary.get("value"), monetary.get("currency")
    )


def credit_from_checkout(event: WebhookEvent) -> CreditPurchase:
    """A paid Checkout Session marked `token_meter_credit=true`: its `amount_subtotal` (before
    discounts and taxes). `checkout.session.completed` with `payment_status=unpaid` (a delayed
    payment method) adds nothing; `checkout.session.async_payment_succeeded` then does."""
    obj = event.object
    session_id = _id(obj, "checkout session")
    if str(_metadata(obj).get(CREDIT_KEY, "")).strip().lower() != "true":
        raise NotApplicable("not_a_credit_purchase", checkout_session=session_id)
    if obj.get("payment_status") != "paid":
        raise NotApplicable(
            "not_paid", checkout_session=session_id, payment_status=obj.get("payment_status")
        )
    customer = customer_of(obj)
    if customer is None:
        raise NotApplicable("no_customer", checkout_session=session_id)
    return _purchase(
        customer, f"stripe:checkout:{session_id}", obj.get("amount_subtotal"), obj.get("currency")
    )


def _purchase(customer: str, key: str, amount: object, currency: object) -> CreditPurchase:
    if not isinstance(currency, str) or not currency.strip():
        raise NotApplicable("malformed", problem="no currency", idempotency_key=key)
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise NotApplicable("malformed", problem="no amount", idempotency_key=key)
    if amount <= 0:
        raise NotApplicable("zero_amount", idempotency_key=key)
    return CreditPurchase(customer, key, amount, currency.strip().upper())


# -- invoices ---------------------------------------------------------------------------------

INVOICE_STATES: Final[Mapping[str, InvoiceState]] = {
    "invoice.payment_failed": "failed",
    "invoice.overdue": "overdue",
    "invoice.paid": "paid",
    "invoice.voided": "voided",
}


@dataclass(frozen=True, slots=True)
class InvoiceChange:
    invoice_id: str
    customer: str
    state: InvoiceState


def invoice_change(event: WebhookEvent) -> InvoiceChange:
    obj = event.object
    invoice_id = _id(obj, "invoice")
    customer = customer_of(obj)
    if customer is None:
        raise NotApplicable("no_customer", invoice=invoice_id)
    return InvoiceChange(invoice_id, customer, INVOICE_STATES[event.type])
