"""Reconcile, pure: what the outbox delivered against what Stripe's meter event summaries show.

Every delta the outbox sends carries its rollup window's start, a whole UTC hour, as its
timestamp. So a period's local side is the outbox rows whose window starts in it, and Stripe's
side is the summaries of the same period. Two rules of Stripe shape the queries
(stripe-python@v16.1.0:stripe/params/billing/_meter_event_summary_list_params.py): start and end
are minute boundaries, and with `value_grouping_window=day` they are UTC day boundaries. A period
is therefore rounded up to whole minutes (which selects the same whole-hour windows), its whole
days are asked for in one `day`-grouped query, and a partial first or last day in an ungrouped
query of its own.

Each customer, meter and UTC day gets a status (`Status`); only `missing` and `extra` are
differences. Summaries are eventually consistent, so usage sent within the last `settle` seconds
may not show yet (`settling`), and Stripe may already show rows whose answer the sync has not
had yet (`in_flight`).

Resending: Stripe's v1 API cannot say which identifiers it holds, only how much a customer's meter
holds per hour. Within one hour, the rows Stripe has must be a subset of the hour's delivered rows
whose values add up to what Stripe shows. When exactly one subset does, the rest is what Stripe
lacks (`lacking`); when none or several do, nothing is resent. See docs/billing.md, "Reconcile".
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Final

MINUTE: Final = timedelta(minutes=1)
HOUR: Final = timedelta(hours=1)
DAY: Final = timedelta(days=1)
DEFAULT_SETTLE: Final = 3600.0
MAX_SETTLE: Final = 35 * 86400.0
# The subset search keeps at most this many distinct partial sums; past it, an hour is
# called ambiguous rather than guessed at.
MAX_PARTIAL_SUMS: Final = 100_000


class Status(enum.StrEnum):
    OK = "ok"  # Stripe shows what the outbox delivered
    IN_FLIGHT = "in_flight"  # Stripe shows more, but no more than the sync is still sending
    SETTLING = "settling"  # Stripe shows less, but no less than what was sent within `settle`
    MISSING = "missing"  # Stripe shows less than was delivered: a difference
    EXTRA = "extra"  # Stripe shows more than was delivered or is being sent: a difference
    HELD = "held"  # usage of consumers without a Stripe customer: nothing to compare


DIFFERENCES: Final = frozenset({Status.MISSING, Status.EXTRA})


def parse_instant(name: str, text: str) -> datetime:
    """`YYYY-MM-DD` (that UTC midnight) or an RFC 3339 time with its offset; ValueError says
    what is wrong."""
    value = text.strip()
    if len(value) == 10:
        try:
            return datetime.combine(date.fromisoformat(value), datetime.min.time(), UTC)
        except ValueError:
            pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name} must be a date or an RFC 3339 time, not {text!r}") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{name} must carry a time zone offset (e.g. Z), not {text!r}")
    return parsed.astimezone(UTC)


def month_start(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


@dataclass(frozen=True, slots=True)
class Period:
    """`start` inclusive, `end` exclusive, as given or defaulted; `settle` in seconds."""

    start: datetime
    end: datetime
    settle: float = DEFAULT_SETTLE

    @property
    def lo(self) -> datetime:
        return ceil_to(self.start, MINUTE)

    @property
    def hi(self) -> datetime:
        return ceil_to(self.end, MINUTE)


def period(
    now: datetime,
    start: datetime | None = None,
    end: datetime | None = None,
    settle: float = DEFAULT_SETTLE,
) -> Period:
    """By default the UTC month up to `now - settle` (the month of that moment); a bound given
    is taken as it is. ValueError for an empty period or a bad settle."""
    if not 0 <= settle <= MAX_SETTLE:
        raise ValueError(f"settle must be 0 to {MAX_SETTLE:.0f} seconds")
    if end is None:
        end = (now - timedelta(seconds=settle)).replace(microsecond=0)
    start = start if start is not None else month_start(end - timedelta(microseconds=1))
    if ceil_to(start, MINUTE) >= ceil_to(end, MINUTE):
        raise ValueError("from must be earlier than to (by at least a minute)")
    return Period(start, end, settle)


def ceil_to(at: datetime, step: timedelta) -> datetime:
    """`at` rounded up to a multiple of `step` since the Unix epoch (UTC)."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    steps = -((epoch - at) // step)  # ceiling division of timedeltas
    return epoch + steps * step


def floor_to(at: datetime, step: timedelta) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + ((at - epoch) // step) * step


@dataclass(frozen=True, slots=True)
class Query:
    """One event-summaries call: `window` "day" for whole UTC days, None for one summary."""

    start: datetime
    end: datetime
    window: str | None


def queries(lo: datetime, hi: datetime) -> list[Query]:
    """The fewest calls that cover [lo, hi) within Stripe's alignment rules: the whole days in
    one day-grouped call, a partial first and last day in one call each."""
    first_midnight, last_midnight = ceil_to(lo, DAY), floor_to(hi, DAY)
    if first_midnight >= last_midnight:  # no whole day inside: at most one midnight
        if lo < first_midnight < hi:
            return [Query(lo, first_midnight, None), Query(first_midnight, hi, None)]
        return [Query(lo, hi, None)]
    found = []
    if lo < first_midnight:
        found.append(Query(lo, first_midnight, None))
    found.append(Query(first_midnight, last_midnight, "day"))
    if last_midnight < hi:
        found.append(Query(last_midnight, hi, None))
    return found


def utc_day(at: datetime) -> date:
    return at.astimezone(UTC).date()


def day_bounds(day: date, lo: datetime, hi: datetime) -> tuple[datetime, datetime]:
    """The part of [lo, hi) on this UTC day."""
    midnight = datetime.combine(day, datetime.min.time(), UTC)
    return max(lo, midnight), min(hi, midnight + DAY)


@dataclass(frozen=True, slots=True)
class LocalDay:
    """The outbox's rows of one customer, meter and UTC day, summed by state."""

    customer: str | None  # None: consumers without a Stripe customer (held)
    meter: str
    day: date
    sent: int = 0
    pending: int = 0
    unbillable: int = 0
    settling: int = 0  # of `sent`, what was sent within the settle time


@dataclass(frozen=True, slots=True)
class DayLine:
    customer: str | None
    meter: str
    day: date
    sent: int
    stripe: Decimal | None
    pending: int
    unbillable: int
    settling: int
    status: Status
    note: str | None = None

    @property
    def difference(self) -> Decimal | None:
        return None if self.stripe is None else self.stripe - self.sent

    def as_json(self) -> dict[str, object]:
        return {
            "customer": self.customer,
            "meter": self.meter,
            "day": self.day.isoformat(),
            "sent": self.sent,
            "stripe": number(self.stripe),
            "difference": number(self.difference),
            "pending": self.pending,
            "unbillable": self.unbillable,
            "settling": self.settling,
            "status": self.status.value,
            "note": self.note,
        }


def number(value: Decimal | None) -> int | float | None:
    if value is None:
        return None
    return int(value) if value == value.to_integral_value() else float(value)


def status(sent: int, stripe: Decimal, pending: int, settling: int) -> Status:
    if stripe == sent:
        return Status.OK
    if stripe > sent:
        return Status.IN_FLIGHT if stripe <= sent + pending else Status.EXTRA
    return Status.SETTLING if stripe >= sent - settling else Status.MISSING


def compare(
    local: Sequence[LocalDay],
    at_stripe: Mapping[tuple[str, str], Mapping[date, Decimal]],
    notes: Mapping[tuple[str, str], str] | None = None,
) -> list[DayLine]:
    """One line per customer, meter and day that either side has. `at_stripe` holds the pairs
    asked about, with what Stripe showed per day (a day it left out is zero)."""
    notes = notes or {}
    lines: dict[tuple[str, str, date], DayLine] = {}
    held: list[DayLine] = []
    for row in local:
        if row.customer is None:
            held.append(_line(row, None, Status.HELD))
            continue
        shown = at_stripe.get((row.customer, row.meter), {}).get(row.day, Decimal(0))
        verdict = status(row.sent, shown, row.pending, row.settling)
        lines[(row.customer, row.meter, row.day)] = _line(
            row, shown, verdict, notes.get((row.customer, row.meter))
        )
    for (customer, meter), days in at_stripe.items():
        for day, shown in days.items():
            if (customer, meter, day) not in lines and shown:
                nothing = LocalDay(customer, meter, day)
                lines[(customer, meter, day)] = _line(
                    nothing, shown, Status.EXTRA, notes.get((customer, meter))
                )
    return sorted(lines.values(), key=_order) + sorted(held, key=_order)


def _line(
    row: LocalDay, shown: Decimal | None, verdict: Status, note: str | None = None
) -> DayLine:
    return DayLine(
        customer=row.customer,
        meter=row.meter,
        day=row.day,
        sent=row.sent,
        stripe=shown,
        pending=row.pending,
        unbillable=row.unbillable,
        settling=row.settling,
        status=verdict,
        note=note,
    )


def _order(line: DayLine) -> tuple[str, str, date]:
    return (line.customer or "", line.meter, line.day)


@dataclass(frozen=True, slots=True)
class SentRow:
    """A delivered outbox row, as a resend needs it."""

    identifier: str
    customer: str
    meter: str
    window_start: datetime
    value: int
    sent_at: datetime
    current_customer: str | None  # where its consumer's usage goes now


class Unresolved(enum.StrEnum):
    """Why an hour Stripe shows too little of is not resent."""

    UNEXPLAINED = "unexplained"  # no set of the hour's rows adds up to what Stripe shows
    AMBIGUOUS = "ambiguous"  # several sets do: which rows Stripe lacks cannot be known
    PENDING = "pending"  # the sync is still sending rows of this hour
    SETTLING = "settling"  # a row of this hour was sent within the settle time
    TOO_OLD = "too_old"  # Stripe no longer takes this hour's timestamp
    REMAPPED = "remapped"  # the consumer now maps to another customer: it would bill that one
    CUSTOMER_UNKNOWN = "customer_unknown"  # Stripe has no such customer
    METER_MISSING = "meter_missing"  # Stripe has no meter for this event name


def lacking(rows: Sequence[SentRow], at_stripe: Decimal) -> list[SentRow] | Unresolved:
    """The rows of one hour Stripe does not have, when exactly one subset of `rows` adds up to
    `at_stripe` (what Stripe shows for the hour, assuming it counts each of our rows at most
    once and nothing else): its complement. Otherwise why not."""
    if at_stripe != at_stripe.to_integral_value() or at_stripe < 0:
        return Unresolved.UNEXPLAINED
    target = int(at_stripe)
    # Partial sums up to the target: how many subsets reach each (capped at 2), and one of them.
    reach: dict[int, tuple[int, int]] = {0: (1, 0)}
    for index, row in enumerate(rows):
        for total, (count, mask) in list(reach.items()):
            grown = total + row.value
            if grown > target:
                continue
            before, witness = reach.get(grown, (0, 0))
            reach[grown] = (min(2, before + count), witness if before else mask | 1 << index)
        if len(reach) > MAX_PARTIAL_SUMS:
            return Unresolved.AMBIGUOUS
    count, mask = reach.get(target, (0, 0))
    if count == 0:
        return Unresolved.UNEXPLAINED
    if count > 1:
        return Unresolved.AMBIGUOUS
    return [row for index, row in enumerate(rows) if not mask >> index & 1]
