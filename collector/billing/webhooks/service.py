"""Verify a Stripe webhook, take each event once, and apply it in the transaction that records
it (contract 4, "Webhooks"; docs/billing.md).

1. The signature and its timestamp (`signature.verify`): a refusal changes nothing and is not
   remembered, so the same event sent again with a valid signature is taken.
2. The event id goes into `stripe_webhook_events` first; an id already there is a replay and
   changes nothing.
3. The handler for the event's type applies it in the same transaction, under the locks of
   the consumers its Stripe customer maps to. Either the effects and the id commit together or
   neither does (an error answers 500 and Stripe retries).

No Stripe call is made here: the payload carries what the handlers need (a thin event's
handler may record it for a later fetch, outside this transaction).

Other event types are answered 200 and logged. `handlers` is the registration point: a
`WebhookHandler` for a type, e.g. the v2 meter event stream's handler of
`v1.billing.meter.error_report_triggered` thin events (ERROR_REPORT_TRIGGERED), which without
one is answered 200 and logged as unhandled.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import asyncpg
import structlog

from ...accounts.model import MAX_MICROS, GrantConflict
from ...accounts.rules import micros_down
from ...accounts.service import AccountService, log_grant
from ...blocklist import store as blocklist
from ...blocklist.reasons import BlockReason
from ...observability import Metrics
from ..currency import minor_to_micros
from . import store
from .events import (
    CreditPurchase,
    NotApplicable,
    WebhookEvent,
    credit_from_checkout,
    credit_from_grant,
    invoice_change,
    parse_event,
    subscription_state,
)
from .signature import verify
from .store import CustomerConsumer, SubscriptionRow

log = structlog.get_logger("token_meter.billing.webhooks")

ERROR_REPORT_TRIGGERED: Final = "v1.billing.meter.error_report_triggered"
SUBSCRIPTION_EVENTS: Final = tuple(
    f"customer.subscription.{verb}"
    for verb in ("created", "updated", "resumed", "deleted", "paused")
)
CREDIT_GRANT_CREATED: Final = "billing.credit_grant.created"
CHECKOUT_EVENTS: Final = (
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
)
INVOICE_EVENTS: Final = (
    "invoice.payment_failed",
    "invoice.overdue",
    "invoice.paid",
    "invoice.voided",
)
# Log levels of outcomes that need an operator (the rest are info).
ERROR_OUTCOMES: Final = frozenset(
    {
        "currency_refused",
        "ambiguous_customer",
        "grant_conflict",
        "amount_too_large",
        "malformed",
        "no_customer",
    }
)
WARNING_OUTCOMES: Final = frozenset({"unknown_customer", "unhandled"})


@dataclass(frozen=True, slots=True)
class WebhookResult:
    """What a handler did: `outcome` is stored with the event id, counted and logged with
    `fields`; `after_commit` runs once the transaction committed (log lines that must not
    claim what a rollback undid)."""

    outcome: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    after_commit: tuple[Callable[[], None], ...] = ()


class WebhookHandler(Protocol):
    """Applies one event inside the webhook's transaction, after its id was recorded. Raise
    NotApplicable (before writing anything) for an event that changes nothing; any other
    exception rolls the event back (answered 500: Stripe sends it again)."""

    def __call__(
        self, conn: asyncpg.Connection, event: WebhookEvent, /
    ) -> Awaitable[WebhookResult]: ...


@dataclass(frozen=True, slots=True)
class Receipt:
    event: WebhookEvent
    replayed: bool
    outcome: str


@dataclass(frozen=True, slots=True)
class Entitlement:
    """What a customer's subscriptions give its consumers."""

    plan: str | None
    quota_managed: bool  # some subscription of the customer carries (or carried) a quota
    monthly_token_quota: int | None

    def changes(self) -> dict[str, Any]:
        changes: dict[str, Any] = {"plan": self.plan}
        if self.quota_managed:
            changes["monthly_token_quota"] = self.monthly_token_quota
        return changes


def entitlement(subscriptions: Sequence[SubscriptionRow]) -> Entitlement:
    """The plan of the newest live subscription (None when none is live); the quota of the
    newest live one whose prices carry a quota. Once any subscription of the customer carried
    one, the quota follows them (removed when none that is live carries one); until then a
    quota set through the admin API stays."""
    live = sorted(
        (s for s in subscriptions if s.live),
        key=lambda s: (s.started, s.subscription_id),
        reverse=True,
    )
    with_quota = [s for s in live if s.quota_set]
    return Entitlement(
        plan=live[0].plan if live else None,
        quota_managed=any(s.quota_set for s in subscriptions),
        monthly_token_quota=with_quota[0].monthly_token_quota if with_quota else None,
    )


def credit_consumer(consumers: Sequence[CustomerConsumer]) -> str | None:
    """The one consumer credit of a customer goes to: the only one mapped, else the only one
    mapped explicitly (by stripe_customer_id). None when there is no such one."""
    mapped = [c for c in consumers if c.mapped]
    if len(mapped) == 1:
        return mapped[0].consumer
    explicit = [c for c in mapped if c.explicit]
    return explicit[0].consumer if len(explicit) == 1 else None


class WebhookService:
    def __init__(
        self,
        pool: asyncpg.Pool,
        accounts: AccountService,
        metrics: Metrics,
        *,
        secrets: Sequence[str],
        currency: Callable[[], str],
        block_on_overdue: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool
        self.accounts = accounts
        self.metrics = metrics
        self.secrets = tuple(secrets)
        self.currency = currency  # the price book's, as the ledger counts it
        self.block_on_overdue = block_on_overdue
        self.clock = clock
        self.handlers: dict[str, WebhookHandler] = {
            CREDIT_GRANT_CREATED: self._credit_grant,
            **{name: self._subscription for name in SUBSCRIPTION_EVENTS},
            **{name: self._checkout for name in CHECKOUT_EVENTS},
            **{name: self._invoice for name in INVOICE_EVENTS},
        }

    @property
    def configured(self) -> bool:
        """A secret is set: without one every webhook is answered 503 (Stripe retries)."""
        return bool(self.secrets)

    def register(self, event_type: str, handler: WebhookHandler) -> None:
        """Handle `event_type` with `handler` (one handler per type)."""
        if event_type in self.handlers:
            raise ValueError(f"a handler for {event_type} is already registered")
        self.handlers[event_type] = handler

    async def receive(self, body: bytes, signature: str | None) -> Receipt:
        """Verify and apply one webhook. Raises SignatureRefused or MalformedEvent (400,
        nothing recorded)."""
        verify(body, signature, self.secrets, clock=self.clock)
        event = parse_event(body)
        async with self.pool.acquire() as conn, conn.transaction():
            if not await store.remember_event(conn, event):
                result = WebhookResult("replayed")
                replayed = True
            else:
                replayed = False
                result = await self._apply(conn, event)
                await store.set_outcome(conn, event.id, result.outcome)
        for action in result.after_commit:
            action()
        self._report(event, result)
        return Receipt(event, replayed, result.outcome)

    async def _apply(self, conn: asyncpg.Connection, event: WebhookEvent) -> WebhookResult:
        handler = self.handlers.get(event.type)
        if handler is None:
            if event.type == ERROR_REPORT_TRIGGERED:
                # The v2 meter event stream reports rejected events this way; its transport
                # registers the handler.
                return WebhookResult("unhandled", {"related_object": _related(event)})
            return WebhookResult("ignored_type")
        try:
            return await handler(conn, event)
        except NotApplicable as skip:
            return WebhookResult(skip.outcome, skip.fields)

    def _report(self, event: WebhookEvent, result: WebhookResult) -> None:
        known = event.type in self.handlers or event.type == ERROR_REPORT_TRIGGERED
        self.metrics.stripe_webhooks.labels(event.type if known else "other", result.outcome).inc()
        if result.outcome in ERROR_OUTCOMES:
            level = "error"
        elif result.outcome in WARNING_OUTCOMES or "problems" in result.fields:
            level = "warning"
        else:
            level = "info"
        line = {
            **result.fields,
            "event_id": event.id,
            "type": event.type,
            "outcome": result.outcome,
            "livemode": event.livemode,
        }
        getattr(log, level)("stripe_webhook", **line)

    def refused(self, reason: str) -> None:
        """Count and log a webhook refused before it was read (bad or stale signature)."""
        self.metrics.stripe_webhooks.labels("unverified", "refused").inc()
        log.warning("stripe_webhook_refused", reason=reason)

    # -- subscriptions: plan and monthly quota ------------------------------------------------

    async def _subscription(self, conn: asyncpg.Connection, event: WebhookEvent) -> WebhookResult:
        state = subscription_state(event)
        fields: dict[str, Any] = {
            "customer": state.customer,
            "subscription": state.subscription_id,
            "live": state.live,
        }
        if state.problems:
            fields["problems"] = list(state.problems)
        consumers = await store.lock_customer_consumers(conn, state.customer)
        if not await store.record_subscription(conn, state, event):
            return WebhookResult("stale", fields)  # a newer event of it was applied already
        if not consumers:
            return WebhookResult("unknown_customer", fields)
        given = entitlement(await store.customer_subscriptions(conn, state.customer))
        changes = given.changes()
        for consumer in consumers:
            await self.accounts.apply_changes(conn, consumer.consumer, changes)
        return WebhookResult(
            "applied", {**fields, "consumers": [c.consumer for c in consumers], **changes}
        )

    # -- prepaid credit -----------------------------------------------------------------------

    async def _credit_grant(self, conn: asyncpg.Connection, event: WebhookEvent) -> WebhookResult:
        return await self._credit(conn, credit_from_grant(event))

    async def _checkout(self, conn: asyncpg.Connection, event: WebhookEvent) -> WebhookResult:
        return await self._credit(conn, credit_from_checkout(event))

    async def _credit(self, conn: asyncpg.Connection, purchase: CreditPurchase) -> WebhookResult:
        fields: dict[str, Any] = {
            "customer": purchase.customer,
            "idempotency_key": purchase.key,
            "amount_minor": purchase.amount_minor,
            "currency": purchase.currency,
        }
        book_currency = self.currency().upper()
        if purchase.currency != book_currency:
            return WebhookResult("currency_refused", {**fields, "book_currency": book_currency})
        micros = minor_to_micros(purchase.amount_minor, purchase.currency)
        if micros > MAX_MICROS:
            return WebhookResult("amount_too_large", fields)
        consumers = await store.lock_customer_consumers(conn, purchase.customer)
        consumer = credit_consumer(consumers)
        if consumer is None:
            outcome = "ambiguous_customer" if consumers else "unknown_customer"
            return WebhookResult(outcome, {**fields, "consumers": [c.consumer for c in consumers]})
        try:
            grant = await self.accounts.apply_grant(
                conn, consumer, micros, purchase.key, source="stripe"
            )
        except GrantConflict as conflict:
            first = micros_down(conflict.first.amount_nanos)
            return WebhookResult(
                "grant_conflict", {**fields, "consumer": consumer, "granted_micros": first}
            )
        fields.update(
            consumer=consumer,
            amount_micros=micros,
            balance_micros=micros_down(grant.balance_after_nanos),
        )
        if grant.replayed:  # the same grant or checkout through another event
            return WebhookResult("already_granted", fields)
        return WebhookResult("applied", fields, after_commit=(lambda: log_grant(grant, "stripe"),))

    # -- invoices: payment_overdue ------------------------------------------------------------

    async def _invoice(self, conn: asyncpg.Connection, event: WebhookEvent) -> WebhookResult:
        change = invoice_change(event)
        fields: dict[str, Any] = {
            "customer": change.customer,
            "invoice": change.invoice_id,
            "state": change.state,
        }
        consumers = await store.lock_customer_consumers(
            conn, change.customer, with_overdue_blocks=True
        )
        if not await store.record_invoice(conn, change, event.created):
            return WebhookResult("invoice_settled_before", fields)  # paid or voided: final
        unpaid = await store.unpaid_invoices(conn, change.customer)
        fields["unpaid_invoices"] = len(unpaid)
        if not consumers:
            return WebhookResult("unknown_customer", fields)
        mapped = [c.consumer for c in consumers if c.mapped]
        blocked = await store.overdue_blocked(conn, [c.consumer for c in consumers])
        reason = BlockReason.PAYMENT_OVERDUE
        if unpaid and change.state in ("failed", "overdue"):
            if not self.block_on_overdue:
                return WebhookResult("recorded", {**fields, "blocking": "off"})
            detail = {"stripe_customer_id": change.customer, "invoice": unpaid[0]}
            new = [c for c in mapped if c not in blocked]
            await blocklist.block(conn, [(c, reason, detail) for c in new])
            for _ in new:
                self.metrics.blocklist_transitions.labels(reason, "blocked").inc()
            return WebhookResult("applied", {**fields, "blocked": new})
        if unpaid:
            return WebhookResult("applied", {**fields, "still_blocked": sorted(blocked)})
        lifted = sorted(blocked)
        await blocklist.unblock(conn, [(c, reason) for c in lifted])
        for _ in lifted:
            self.metrics.blocklist_transitions.labels(reason, "unblocked").inc()
        return WebhookResult("applied", {**fields, "unblocked": lifted})


def _related(event: WebhookEvent) -> Any:
    related = event.payload.get("related_object")
    return related.get("id") if isinstance(related, Mapping) else None
