"""The reconcile service behind `GET /v1/stripe/reconcile` and `POST .../reconcile/resend`.

It reads the outbox first and Stripe second: a row the sync marks sent in between is one Stripe
already had, so the only race left is Stripe's own lag, which `settle` covers. Reads keep to a
rate of their own under Stripe's read limit (25 a second in test mode, 100 live), retrying 429s,
5xx and dropped connections a few times before giving up (`ReconcileFailed`).

Resending never calls Stripe from here: the rows Stripe provably lacks (`reconcile.lacking`)
go back to pending under their next identifier (`outbox.next_identifier`, as for the rows an
error report names), and the sync leader sends them like any other row. So there is still one
sender, each re-send is recorded in the outbox, and a late error report naming the old
identifier matches nothing.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Final, TypeVar

import aiohttp
import asyncpg
import stripe
import structlog
from aiolimiter import AsyncLimiter

from . import store
from .outbox import next_identifier
from .reconcile import (
    DIFFERENCES,
    HOUR,
    DayLine,
    Period,
    Query,
    SentRow,
    Status,
    Unresolved,
    ceil_to,
    compare,
    day_bounds,
    lacking,
    number,
    queries,
    utc_day,
)
from .stripe_api import Outcome, StripeApi, StripeFailure, classify, meters_by_event_name
from .sync import STRIPE_MAX_AGE

log = structlog.get_logger("token_meter.billing")

# Below Stripe's read limits, leaving room for the sync's own reads (its meter checks).
TEST_MODE_READ_RATE: Final = 20.0
LIVE_READ_RATE: Final = 80.0
READ_CONCURRENCY: Final = 8
READ_ATTEMPTS: Final = 5
READ_RETRY_BASE: Final = 0.5
RESEND_NOTE: Final = "reconcile: Stripe's meter event summaries lack this delivered row"

T = TypeVar("T")
Clock = Callable[[], datetime]
StripeDays = dict[date, Decimal]


def utc_now() -> datetime:
    return datetime.now(UTC)


class ReconcileFailed(Exception):
    """Stripe did not answer a read (after retries), or refused the key: nothing compared."""


class _NotFound(Exception):
    """Stripe answered 404 (a customer it does not have, for the summaries)."""


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Report:
    period: Period
    lines: list[DayLine]

    @property
    def differences(self) -> list[DayLine]:
        return [line for line in self.lines if line.status in DIFFERENCES]

    def as_json(self) -> dict[str, object]:
        return {
            "from": _iso(self.period.start),
            "to": _iso(self.period.end),
            "settle_seconds": self.period.settle,
            "agree": not self.differences,
            "differences": len(self.differences),
            "days": [line.as_json() for line in self.lines],
        }


@dataclass(frozen=True, slots=True)
class NotResent:
    customer: str
    meter: str
    day: date
    hour: datetime | None  # None: the whole day
    shortfall: Decimal
    reason: Unresolved

    def as_json(self) -> dict[str, object]:
        return {
            "customer": self.customer,
            "meter": self.meter,
            "day": self.day.isoformat(),
            "hour": None if self.hour is None else _iso(self.hour),
            "shortfall": number(self.shortfall),
            "reason": self.reason.value,
        }


@dataclass
class Resend:
    report: Report
    resent: list[tuple[SentRow, str]] = field(default_factory=list)  # (row, its new identifier)
    not_resent: list[NotResent] = field(default_factory=list)

    @property
    def unrepaired(self) -> int:
        """Differences the resent rows do not make up (what Stripe still lacks beyond the rows
        sent within the settle time, or shows too much of)."""
        resent: dict[tuple[str, str, date], int] = defaultdict(int)
        for row, _ in self.resent:
            resent[(row.customer, row.meter, utc_day(row.window_start))] += row.value
        left = 0
        for line in self.report.differences:
            assert line.customer is not None and line.stripe is not None
            made_up = line.stripe + resent[(line.customer, line.meter, line.day)] + line.settling
            left += line.status is Status.EXTRA or made_up < line.sent
        return left

    def as_json(self) -> dict[str, object]:
        return {
            **self.report.as_json(),
            "resent": [
                {
                    "customer": row.customer,
                    "meter": row.meter,
                    "window_start": _iso(row.window_start),
                    "identifier": row.identifier,
                    "resent_as": new,
                    "value": row.value,
                }
                for row, new in self.resent
            ],
            "not_resent": [item.as_json() for item in self.not_resent],
            "unrepaired": self.unrepaired,
        }


class Reconciler:
    def __init__(
        self,
        pool: asyncpg.Pool,
        api: StripeApi,
        *,
        wake_sync: Callable[[], None] | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.pool = pool
        self.api = api
        self.wake_sync = wake_sync
        self.clock = clock
        rate = TEST_MODE_READ_RATE if api.test_mode else LIVE_READ_RATE
        self._reads = AsyncLimiter(1, 1 / rate)  # evenly spaced, as the sync's writes are
        self._gate = asyncio.Semaphore(READ_CONCURRENCY)

    async def report(self, period: Period) -> Report:
        report, _, _ = await self._compare(period)
        return report

    async def resend(self, period: Period) -> Resend:
        """Compare, then hand back to the sync every delivered row Stripe provably lacks."""
        report, meter_ids, unknown = await self._compare(period)
        result = Resend(report)
        now = self.clock()
        for line in report.lines:
            if line.status is not Status.MISSING:
                continue
            assert line.customer is not None and line.stripe is not None
            meter_id = meter_ids.get(line.meter)
            if meter_id is not None and line.customer not in unknown:
                await self._resend_day(result, period, line, meter_id, now)
                continue
            reason = Unresolved.METER_MISSING if meter_id is None else Unresolved.CUSTOMER_UNKNOWN
            shortfall = line.sent - line.stripe
            result.not_resent.append(
                NotResent(line.customer, line.meter, line.day, None, shortfall, reason)
            )
        await self._reopen(result.resent)
        return result

    async def _resend_day(
        self, result: Resend, period: Period, line: DayLine, meter_id: str, now: datetime
    ) -> None:
        assert line.customer is not None
        start, end = day_bounds(line.day, period.lo, period.hi)
        start, end = ceil_to(start, HOUR), ceil_to(end, HOUR)  # our windows are whole hours
        if start >= end:
            return
        rows, pending = await store.reconcile_rows(self.pool, line.customer, line.meter, start, end)
        shown = await self._stripe_values(meter_id, line.customer, Query(start, end, "hour"))
        by_hour: dict[datetime, list[SentRow]] = defaultdict(list)
        for row in rows:
            by_hour[row.window_start].append(row)
        settled_before = now - timedelta(seconds=period.settle)
        for hour, hour_rows in sorted(by_hour.items()):
            at_stripe = shown.get(hour, Decimal(0))
            shortfall = sum(row.value for row in hour_rows) - at_stripe
            if shortfall <= 0:
                continue
            found: list[SentRow] | Unresolved
            if hour in pending:
                found = Unresolved.PENDING
            elif any(row.sent_at > settled_before for row in hour_rows):
                found = Unresolved.SETTLING
            elif hour < now - STRIPE_MAX_AGE:
                found = Unresolved.TOO_OLD
            else:
                found = lacking(hour_rows, at_stripe)
                if not isinstance(found, Unresolved) and any(
                    row.current_customer != row.customer for row in found
                ):
                    found = Unresolved.REMAPPED
            if isinstance(found, Unresolved):
                result.not_resent.append(
                    NotResent(line.customer, line.meter, line.day, hour, shortfall, found)
                )
            else:
                result.resent.extend((row, next_identifier(row.identifier)) for row in found)

    async def _reopen(self, resent: Sequence[tuple[SentRow, str]]) -> None:
        by_meter: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for row, new in resent:
            by_meter[row.meter].append((row.identifier, new))
            log.warning(
                "stripe_reconcile_resend",
                customer=row.customer,
                meter=row.meter,
                window=_iso(row.window_start),
                value=row.value,
                identifier=row.identifier,
                resent_as=new,
            )
        for meter, renames in by_meter.items():
            done = await store.resend_dropped(self.pool, renames, meter, RESEND_NOTE, timedelta(0))
            if done != len(renames):  # an error report renamed some meanwhile: it resends them
                log.warning("stripe_reconcile_resend_raced", meter=meter, rows=len(renames) - done)
        if resent and self.wake_sync is not None:
            self.wake_sync()

    async def _compare(self, period: Period) -> tuple[Report, dict[str, str], set[str]]:
        """The report, the Stripe meter id of each event name, and the customers Stripe lacks."""
        local = await store.reconcile_days(
            self.pool, period.lo, period.hi, timedelta(seconds=period.settle)
        )
        try:
            found = meters_by_event_name(await self._read(self.api.list_meters))
        except _NotFound as exc:
            raise ReconcileFailed(f"Stripe answered 404 to listing the meters: {exc}") from None
        meter_ids = {name: meter.id for name, meter in found.items()}
        pairs = sorted({(d.customer, d.meter) for d in local if d.customer is not None})
        notes: dict[tuple[str, str], str] = {}
        unknown: set[str] = set()
        at_stripe: dict[tuple[str, str], Mapping[date, Decimal]] = {}

        async def one(customer: str, meter: str) -> None:
            meter_id = meter_ids.get(meter)
            if meter_id is None:
                notes[(customer, meter)] = "no meter with this event name at Stripe"
                at_stripe[(customer, meter)] = {}
                return
            days: StripeDays = defaultdict(Decimal)
            try:
                for query in queries(period.lo, period.hi):
                    shown = await self._stripe_values(meter_id, customer, query)
                    for start, value in shown.items():
                        days[utc_day(start)] += value
            except _NotFound:
                unknown.add(customer)
                notes[(customer, meter)] = "no such customer at Stripe"
            at_stripe[(customer, meter)] = days

        await asyncio.gather(*(one(customer, meter) for customer, meter in pairs))
        report = Report(period, compare(local, at_stripe, notes))
        log.info(
            "stripe_reconciled",
            start=_iso(period.start),
            end=_iso(period.end),
            days=len(report.lines),
            differences=len(report.differences),
        )
        return report, meter_ids, unknown

    async def _stripe_values(
        self, meter_id: str, customer: str, query: Query
    ) -> dict[datetime, Decimal]:
        """Stripe's value per summary start for one call of `queries` (or an hourly one)."""
        start, end = int(query.start.timestamp()), int(query.end.timestamp())

        async def call() -> Sequence[tuple[datetime, float]]:
            found = await self.api.event_summaries(meter_id, customer, start, end, query.window)
            return [(summary.start, summary.value) for summary in found]

        try:
            summaries = await self._read(call)
        except _NotFound as exc:
            if await self._read(lambda: self.api.customer_exists(customer)):
                raise ReconcileFailed(f"meter {meter_id}'s summaries: {exc}") from None
            raise
        values: dict[datetime, Decimal] = defaultdict(Decimal)
        for at, value in summaries:
            values[at] += Decimal(repr(value))
        return values

    async def _read(self, call: Callable[[], Awaitable[T]]) -> T:
        """One Stripe read within the read rate; 429s, 5xx and connection failures retried.
        A 404 raises `_NotFound`; anything else that fails raises `ReconcileFailed`."""
        for attempt in range(READ_ATTEMPTS):
            async with self._gate, self._reads:
                try:
                    return await call()
                except stripe.StripeError as exc:
                    failure = classify(exc)
                except (TimeoutError, aiohttp.ClientError) as exc:  # escaped the SDK
                    failure = StripeFailure(Outcome.RETRY, type(exc).__name__, repr(exc))
            if failure.status == 404:
                raise _NotFound(failure.message)
            if failure.outcome is not Outcome.RETRY or attempt == READ_ATTEMPTS - 1:
                raise ReconcileFailed(
                    f"Stripe did not answer: {failure.code}: {failure.message}"
                    + (f" (after {attempt + 1} attempts)" if attempt else "")
                )
            await asyncio.sleep(random.uniform(0, READ_RETRY_BASE * 2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover
