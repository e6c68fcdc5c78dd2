"""Stripe's webhooks as Stripe sends them: events in their real shapes, signed the way Stripe
signs them, posted to a collector.

    sender = WebhookSender(session, f"{collector.base_url}/v1/stripe/webhook", SECRET)
    status, body = await sender.send(event("invoice.paid", invoice("cus_1")))

Signing (`sign`): `Stripe-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>" keyed
with the endpoint secret>`, the scheme stripe-python@v16.1.0:stripe/_webhook.py verifies (and
`WebhookSignature.generate_signature_header` produces). It is written out here rather than
taken from the SDK, so the collector's check is held against a second implementation.

Shapes follow stripe-python@v16.1.0: `stripe/_event.py` (snapshot events: `data.object`),
`stripe/v2/core/_event.py` (thin notifications: `related_object`, no data),
`stripe/_subscription.py`, `stripe/_subscription_item.py`, `stripe/_price.py`,
`stripe/billing/_credit_grant.py`, `stripe/checkout/_session.py`, `stripe/_invoice.py`. As in
real deliveries nothing is expanded: `price.product` is an id unless a test passes a product.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from typing import Any

import aiohttp

DEFAULT_SECRET = "whsec_test_" + "5f1c0ffee0ddba11c0ffee0ddba11c0f"
API_VERSION = "2026-10-28.endive"  # stripe-python@v16.1.0:stripe/_api_version.py


def new_id(prefix: str) -> str:
    return f"{prefix}_test_{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


# -- envelopes --------------------------------------------------------------------------------


def event(
    event_type: str,
    obj: dict[str, Any],
    *,
    id: str | None = None,
    created: int | None = None,
    previous_attributes: dict[str, Any] | None = None,
    livemode: bool = False,
) -> dict[str, Any]:
    """A snapshot event (`object: event`), as delivered to a webhook endpoint."""
    data: dict[str, Any] = {"object": obj}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    return {
        "id": id or new_id("evt"),
        "object": "event",
        "api_version": API_VERSION,
        "created": now() if created is None else created,
        "data": data,
        "livemode": livemode,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }


def thin_event(
    event_type: str, related_object: dict[str, Any], *, id: str | None = None
) -> dict[str, Any]:
    """A v2 thin event notification (`object: v2.core.event`): no data, the object by id."""
    created = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    return {
        "id": id or new_id("evt"),
        "object": "v2.core.event",
        "type": event_type,
        "created": created,
        "livemode": False,
        "context": None,
        "reason": None,
        "related_object": related_object,
    }


def meter_error_report(meter_id: str) -> dict[str, Any]:
    """`v1.billing.meter.error_report_triggered`, as a thin notification about a meter."""
    return thin_event(
        "v1.billing.meter.error_report_triggered",
        {"id": meter_id, "type": "billing.meter", "url": f"/v1/billing/meters/{meter_id}"},
    )


# -- signing ----------------------------------------------------------------------------------


def signature(body: bytes, secret: str = DEFAULT_SECRET, timestamp: int | None = None) -> str:
    """The `Stripe-Signature` header Stripe sends with `body`."""
    t = now() if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def encode(payload: dict[str, Any]) -> bytes:
    """JSON as Stripe sends it (pretty-printed; the signature covers these exact bytes)."""
    return json.dumps(payload, indent=2).encode()


class WebhookSender:
    """Posts events to a collector's webhook endpoint, signed like Stripe's deliveries."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, secret: str = DEFAULT_SECRET
    ) -> None:
        self.session = session
        self.url = url
        self.secret = secret

    async def send(
        self,
        payload: dict[str, Any] | bytes,
        *,
        secret: str | None = None,
        timestamp: int | None = None,
        header: str | None = None,
        signed: bool = True,
    ) -> tuple[int, Any]:
        """Post one delivery: signed with `secret` (default: the sender's) at `timestamp`, or
        with `header` as given, or unsigned (`signed=False`). (status, decoded body)."""
        body = payload if isinstance(payload, bytes) else encode(payload)
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        }
        if header is not None:
            headers["Stripe-Signature"] = header
        elif signed:
            headers["Stripe-Signature"] = signature(body, secret or self.secret, timestamp)
        async with self.session.post(self.url, data=body, headers=headers) as response:
            raw = await response.read()
            decoded = json.loads(raw) if raw and response.content_type.endswith("json") else raw
            return response.status, decoded


# -- objects ----------------------------------------------------------------------------------


def price(
    *,
    id: str | None = None,
    quota: str | int | None = None,
    lookup_key: str | None = None,
    nickname: str | None = None,
    product: str | dict[str, Any] | None = None,
    currency: str = "usd",
    unit_amount: int | None = 2000,
    metered: bool = False,
) -> dict[str, Any]:
    """A recurring price; `quota` goes in its metadata as `token_meter_monthly_quota`."""
    metadata = {} if quota is None else {"token_meter_monthly_quota": str(quota)}
    return {
        "id": id or new_id("price"),
        "object": "price",
        "active": True,
        "billing_scheme": "per_unit",
        "created": now() - 86_400,
        "currency": currency,
        "custom_unit_amount": None,
        "livemode": False,
        "lookup_key": lookup_key,
        "metadata": metadata,
        "nickname": nickname,
        "product": product or new_id("prod"),
        "recurring": {
            "interval": "month",
            "interval_count": 1,
            "meter": new_id("mtr") if metered else None,
            "usage_type": "metered" if metered else "licensed",
        },
        "tax_behavior": "unspecified",
        "type": "recurring",
        "unit_amount": None if metered else unit_amount,
    }


def product(*, id: str | None = None, quota: str | int | None = None) -> dict[str, Any]:
    """A product, for a payload that carries it expanded inside a price."""
    metadata = {} if quota is None else {"token_meter_monthly_quota": str(quota)}
    return {
        "id": id or new_id("prod"),
        "object": "product",
        "active": True,
        "livemode": False,
        "metadata": metadata,
        "name": "AI API",
    }


def subscription_item(item_price: dict[str, Any], *, quantity: int | None = 1) -> dict[str, Any]:
    metered = item_price["recurring"]["usage_type"] == "metered"
    return {
        "id": new_id("si"),
        "object": "subscription_item",
        "created": now() - 3600,
        "current_period_start": now() - 3600,
        "current_period_end": now() + 30 * 86_400,
        "metadata": {},
        "price": item_price,
        "quantity": None if metered else quantity,
        "subscription": None,  # filled by `subscription`
    }


def subscription(
    customer: str,
    items: list[dict[str, Any]],
    *,
    id: str | None = None,
    status: str = "active",
    start_date: int | None = None,
) -> dict[str, Any]:
    sub_id = id or new_id("sub")
    started = now() - 3600 if start_date is None else start_date
    for item in items:
        item["subscription"] = sub_id
    return {
        "id": sub_id,
        "object": "subscription",
        "application": None,
        "billing_cycle_anchor": started,
        "cancel_at": None,
        "cancel_at_period_end": False,
        "canceled_at": now() if status == "canceled" else None,
        "collection_method": "charge_automatically",
        "created": started,
        "currency": items[0]["price"]["currency"] if items else "usd",
        "customer": customer,
        "ended_at": now() if status == "canceled" else None,
        "items": {
            "object": "list",
            "data": items,
            "has_more": False,
            "total_count": len(items),
            "url": f"/v1/subscription_items?subscription={sub_id}",
        },
        "latest_invoice": new_id("in"),
        "livemode": False,
        "metadata": {},
        "pause_collection": None,
        "start_date": started,
        "status": status,
        "trial_end": None,
        "trial_start": None,
    }


def credit_grant(
    customer: str,
    value: int,
    currency: str = "usd",
    *,
    id: str | None = None,
    category: str = "paid",
) -> dict[str, Any]:
    return {
        "id": id or new_id("credgr"),
        "object": "billing.credit_grant",
        "amount": {"monetary": {"currency": currency, "value": value}, "type": "monetary"},
        "applicability_config": {"scope": {"price_type": "metered"}},
        "category": category,
        "created": now(),
        "customer": customer,
        "customer_account": None,
        "effective_at": now(),
        "expires_at": None,
        "livemode": False,
        "metadata": {},
        "name": "Prepaid credit",
        "priority": 50,
        "test_clock": None,
        "updated": now(),
        "voided_at": None,
    }


def checkout_session(
    customer: str | None,
    amount_subtotal: int,
    currency: str = "usd",
    *,
    id: str | None = None,
    payment_status: str = "paid",
    credit: bool = True,
    amount_total: int | None = None,
) -> dict[str, Any]:
    """A payment-mode Checkout Session; `credit` marks it `token_meter_credit=true`."""
    return {
        "id": id or new_id("cs"),
        "object": "checkout.session",
        "amount_subtotal": amount_subtotal,
        "amount_total": amount_subtotal if amount_total is None else amount_total,
        "client_reference_id": None,
        "created": now() - 60,
        "currency": currency,
        "customer": customer,
        "customer_details": {"email": "billing@example.com", "name": None},
        "expires_at": now() + 86_400,
        "livemode": False,
        "metadata": {"token_meter_credit": "true"} if credit else {},
        "mode": "payment",
        "payment_intent": new_id("pi"),
        "payment_status": payment_status,
        "status": "complete",
        "url": None,
    }


def invoice(
    customer: str,
    *,
    id: str | None = None,
    status: str = "open",
    amount_due: int = 4900,
    currency: str = "usd",
) -> dict[str, Any]:
    paid = status == "paid"
    return {
        "id": id or new_id("in"),
        "object": "invoice",
        "amount_due": amount_due,
        "amount_paid": amount_due if paid else 0,
        "amount_remaining": 0 if paid else amount_due,
        "attempt_count": 1,
        "attempted": True,
        "auto_advance": not paid,
        "billing_reason": "subscription_cycle",
        "collection_method": "charge_automatically",
        "created": now() - 7200,
        "currency": currency,
        "customer": customer,
        "due_date": None,
        "livemode": False,
        "metadata": {},
        "next_payment_attempt": None if paid else now() + 3 * 86_400,
        "number": f"TM-{secrets.randbelow(10**6):06d}",
        "status": status,
        "total": amount_due,
    }
