"""Stripe's asynchronous error reports, turned back into outbox rows to send again.

Stripe validates some of what it takes later: every event on the v2 stream, and the customer
of a v1 meter event. What it then drops is reported per meter in a
`v1.billing.meter.error_report_triggered` thin event (fields in stripe-python@v16.1.0:
stripe/events/_v1_billing_meter_error_report_triggered_event.py): per error code a count and
sample errors naming the events' identifiers. The webhook endpoint hands each such event to
`on_error_report`. A dropped event was never billed, so each row named is sent again:

- `timestamp_too_far_in_past`: unbillable, since sending it with another time would be false;
- `timestamp_in_future`: sent again in a minute (a clock was ahead);
- any other (`meter_event_customer_not_found`, `no_meter`, `archived_meter`, payload keys or
  values the meter does not take, and codes Stripe adds later): sent again after 15 minutes.
  These need an operator (the customer mapping, the customer, the meter); every send reads the
  mapping again and skips inactive meters, so the fix is what gets the row billed.

A re-sent row gets its next identifier (`outbox.next_identifier`), since Stripe may keep a
dropped event's identifier for its 24-hour dedupe; a report naming an identifier a second time
then matches nothing, so a redelivered event changes nothing. Each code also becomes a status
error. Stripe lists sample errors, not necessarily all: drops beyond the samples are only counted
(in the status error's message) and found by `token-meter-admin stripe reconcile`.

How a report arrives: Stripe sends a thin notification (id, type, related meter) to the webhook
endpoint, whose handler (`ErrorReportWebhook`) makes no Stripe call inside its transaction: it
queues the event id (`stripe_error_reports`, migration 0005), and the sync leader fetches the
event each cycle (`apply_queued`) and applies it in one transaction with marking it applied, so
a report is applied once even if Stripe delivers it again or a collector dies mid-way. An event
that already carries its `data` is applied at once.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, Final

import asyncpg
import stripe
import structlog
from aiolimiter import AsyncLimiter

from ..observability import Metrics
from . import store
from .outbox import next_identifier
from .stripe_api import Outcome, StripeApi, StripeFailure, classify
from .webhooks import NotApplicable, WebhookEvent, WebhookResult

log = structlog.get_logger("token_meter.billing")

ERROR_REPORT_EVENT: Final = "v1.billing.meter.error_report_triggered"
FetchEvent = Callable[[str], Awaitable[Mapping[str, Any]]]


class Remedy(enum.Enum):
    RESEND = "resend"
    UNBILLABLE = "unbillable"


@dataclass(frozen=True, slots=True)
class Policy:
    remedy: Remedy
    delay: timedelta = timedelta(0)


RESEND_LATER: Final = Policy(Remedy.RESEND, timedelta(minutes=15))
POLICIES: Final[Mapping[str, Policy]] = {
    "timestamp_too_far_in_past": Policy(Remedy.UNBILLABLE),
    "timestamp_in_future": Policy(Remedy.RESEND, timedelta(minutes=1)),
}


def policy(code: str) -> Policy:
    return POLICIES.get(code, RESEND_LATER)


class ErrorReportInvalid(ValueError):
    """The event is not an error report this module can read (answer it, log it, move on)."""


@dataclass(frozen=True, slots=True)
class DroppedEvents:
    """One error type of a report: how many events Stripe dropped, and those it names."""

    code: str
    count: int
    identifiers: tuple[str, ...]
    message: str


@dataclass(frozen=True, slots=True)
class ErrorReport:
    event_id: str
    meter_id: str
    errors: tuple[DroppedEvents, ...]


@dataclass(frozen=True, slots=True)
class Handled:
    """What one report did: rows re-sent, rows made unbillable, identifiers that matched no
    row (not ours, or handled already), drops the report did not name."""

    resent: int = 0
    unbillable: int = 0
    unmatched: int = 0
    unnamed: int = 0


def parse_error_report(event: Mapping[str, Any]) -> ErrorReport:
    """The report in a fetched `v1.billing.meter.error_report_triggered` event (pure)."""
    try:
        if event["type"] != ERROR_REPORT_EVENT:
            raise ErrorReportInvalid(f"not an error report: {event['type']!r}")
        meter_id = str(event["related_object"]["id"])
        errors = tuple(
            DroppedEvents(
                code=str(kind["code"]),
                count=int(kind.get("error_count") or 0),
                identifiers=tuple(
                    dict.fromkeys(
                        str(sample["request"]["identifier"])
                        for sample in kind.get("sample_errors") or ()
                        if (sample.get("request") or {}).get("identifier")
                    )
                ),
                message=next(
                    (
                        str(sample["error_message"])
                        for sample in kind.get("sample_errors") or ()
                        if sample.get("error_message")
                    ),
                    "",
                ),
            )
            for kind in event["data"]["reason"]["error_types"] or ()
        )
        return ErrorReport(str(event["id"]), meter_id, errors)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ErrorReportInvalid):
            raise
        raise ErrorReportInvalid(f"unreadable error report: {exc!r}") from exc


async def on_error_report(
    pool: asyncpg.Pool,
    event: Mapping[str, Any],
    *,
    fetch_event: FetchEvent | None = None,
    metrics: Metrics | None = None,
) -> Handled:
    """Apply one error report event in a transaction of its own: `event` is the fetched
    event, or a thin notification when `fetch_event` (e.g. `StripeApi.retrieve_event`) is
    given to fetch it. Raises `ErrorReportInvalid` for an event it cannot read, and what
    `fetch_event` raises (`stripe.StripeError`)."""
    if "data" not in event and fetch_event is not None:
        event = await fetch_event(str(event["id"]))
    async with pool.acquire() as conn, conn.transaction():
        return await apply_error_report(conn, event, metrics=metrics)


async def apply_error_report(
    conn: asyncpg.Connection, event: Mapping[str, Any], *, metrics: Metrics | None = None
) -> Handled:
    """Apply one fetched error report event, in the caller's transaction (nothing is written
    before it is read: an unreadable one raises `ErrorReportInvalid` first)."""
    report = parse_error_report(event)
    resent = unbillable = unmatched = unnamed = 0
    event_name = await store.meter_event_name(conn, report.meter_id)
    for dropped in report.errors:
        cure = policy(dropped.code)
        detail = f"{dropped.code}: {dropped.message}" if dropped.message else dropped.code
        if cure.remedy is Remedy.UNBILLABLE:
            done = await store.mark_dropped_unbillable(
                conn, dropped.identifiers, event_name, detail
            )
            unbillable += done
            action = f"{done} marked unbillable"
        else:
            renames = [(old, next_identifier(old)) for old in dropped.identifiers]
            done = await store.resend_dropped(conn, renames, event_name, detail, cure.delay)
            resent += done
            action = f"{done} to be sent again in {int(cure.delay.total_seconds())} s"
        unmatched += len(dropped.identifiers) - done
        if event_name is None and not done:
            # Not one of the configured meters, none of our rows: another integration's.
            log.info("stripe_error_report_other_meter", meter=report.meter_id, code=dropped.code)
            continue
        missing = max(dropped.count - len(dropped.identifiers), 0)
        unnamed += missing
        message = (
            f"Stripe dropped {dropped.count} meter event(s) (report {report.event_id}): "
            f"{dropped.message or dropped.code}; {action}"
        )
        if missing:
            message += (
                f"; {missing} not named in the report's samples: "
                "`token-meter-admin stripe reconcile` finds them"
            )
        await store.record_error(conn, event_name or report.meter_id, dropped.code, message)
        log.error(
            "stripe_meter_events_dropped",
            stripe_event=report.event_id,
            meter=event_name or report.meter_id,
            code=dropped.code,
            count=dropped.count,
            named=len(dropped.identifiers),
            matched=done,
            remedy=cure.remedy.value,
        )
    if metrics is not None and unbillable:
        metrics.stripe_unbillable.inc(unbillable)
    return Handled(resent, unbillable, unmatched, unnamed)


class ErrorReportWebhook:
    """The webhook endpoint's handler (`WebhookHandler`) of error report events, run in the
    webhook's transaction: a thin notification is queued for the sync leader to fetch; an
    event that carries its `data` is applied at once."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics

    async def __call__(self, conn: asyncpg.Connection, event: WebhookEvent, /) -> WebhookResult:
        related = event.payload.get("related_object")
        meter_id = related.get("id") if isinstance(related, Mapping) else None
        if not isinstance(event.payload.get("data"), Mapping):
            await store.queue_error_report(conn, event.id, meter_id)
            return WebhookResult("queued", {"meter": meter_id})
        try:
            handled = await apply_error_report(conn, event.payload, metrics=self.metrics)
        except ErrorReportInvalid as exc:
            raise NotApplicable("malformed", meter=meter_id, problem=str(exc)) from None
        return WebhookResult("applied", {"meter": meter_id, **asdict(handled)})


QUEUED_BATCH: Final = 20  # reports fetched per sync cycle
FETCH_RETRY_CAP: Final = timedelta(hours=1)


async def apply_queued(
    conn: asyncpg.Connection, api: StripeApi, limiter: AsyncLimiter, metrics: Metrics
) -> int:
    """The sync leader's part: fetch the queued reports from Stripe and apply each, in one
    transaction with marking it applied. A fetch that fails is retried with backoff; an event
    Stripe no longer has (404: it keeps v2 events 30 days) is given up and shown. Returns how
    many were applied."""
    applied = 0
    for queued in await store.due_error_reports(conn, QUEUED_BATCH):
        failure: StripeFailure | None = None
        event: Mapping[str, Any] = {}
        async with limiter:
            try:
                event = await api.retrieve_event(queued.event_id)
            except stripe.StripeError as exc:
                failure = classify(exc)
        metrics.stripe_calls.labels("events", failure.outcome.value if failure else "ok").inc()
        if failure is None:
            try:
                async with conn.transaction():
                    handled = await apply_error_report(conn, event, metrics=metrics)
                    await store.error_report_applied(conn, queued.event_id)
            except ErrorReportInvalid as exc:
                log.error("stripe_error_report_unreadable", stripe_event=queued.event_id)
                await store.error_report_applied(conn, queued.event_id, str(exc))
                continue
            applied += 1
            log.info("stripe_error_report_applied", stripe_event=queued.event_id, **asdict(handled))
        elif failure.status == 404:
            message = f"error report {queued.event_id} is no longer at Stripe: {failure.message}"
            log.error("stripe_error_report_gone", stripe_event=queued.event_id)
            await store.error_report_applied(conn, queued.event_id, message)
            await store.record_error(conn, None, "error_report_unavailable", message)
        else:
            delay = min(FETCH_RETRY_CAP, timedelta(seconds=30 * 2 ** min(queued.attempts, 10)))
            error = f"{failure.code}: {failure.message}"
            log.warning(
                "stripe_error_report_fetch_failed", stripe_event=queued.event_id, code=failure.code
            )
            await store.error_report_retry(conn, queued.event_id, error, delay)
            if failure.outcome is Outcome.UNAUTHORIZED:
                break
    return applied
