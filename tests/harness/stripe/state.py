"""The fake account: customers, billing meters, meter events, and what Stripe derives from them.

Pure data and rules, no HTTP: the server calls these methods on its own thread, tests call them
from theirs to seed and to inspect, and one re-entrant lock serialises both.

The meter-event rules follow Stripe's documentation (docs.stripe.com/api/billing/meter-event/
create and .../usage-based/recording-usage-api): the event name must belong to an active meter;
the payload must carry the meter's customer and value keys; the timestamp must be within the
past 35 days and at most 5 minutes ahead; an identifier is unique over a rolling 24 hours (an
"at least 24 hours" window in the docs); a value has at most 15 significant digits (changelog
2026-04-22.dahlia). Events with an unknown customer are taken (200) and dropped later with a
`meter_event_customer_not_found` error report, as Stripe validates the customer
asynchronously. The codes of the asynchronous error reports are those of the
`v1.billing.meter.error_report_triggered` event
(stripe-python@v16.1.0:stripe/events/_v1_billing_meter_error_report_triggered_event.py); the
synchronous v1 refusals reuse them as their `code`, which Stripe's reference does not list.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from .errors import ApiError, invalid, no_such

DAY = 86_400
WINDOWS = {"hour": 3_600, "day": DAY}
MAX_PAST = 35 * DAY
MAX_FUTURE = 5 * 60
MAX_VALUE_DIGITS = 15
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")  # plain decimals: no exponent, sign only leading
UnknownCustomer = Literal["drop", "reject", "accept"]


def rfc3339(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_rfc3339(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class Clock:
    """Unix time for timestamps, expiries and windows: the real clock, shifted or frozen.
    (Rate limits count real seconds, whatever this says.)"""

    def __init__(self) -> None:
        self._offset = 0.0
        self._frozen: float | None = None

    def now(self) -> float:
        return self._frozen if self._frozen is not None else time.time() + self._offset

    def advance(self, seconds: float) -> None:
        if self._frozen is not None:
            self._frozen += seconds
        else:
            self._offset += seconds

    def freeze(self, at: float | None = None) -> None:
        self._frozen = self.now() if at is None else at

    def unfreeze(self) -> None:
        if self._frozen is not None:
            self._offset = self._frozen - time.time()
            self._frozen = None


@dataclass
class Meter:
    id: str
    event_name: str
    display_name: str
    formula: str
    customer_key: str
    value_key: str
    event_time_window: str | None
    created: int
    updated: int
    status: str = "active"
    deactivated_at: int | None = None

    def to_api(self, livemode: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "billing.meter",
            "created": self.created,
            "customer_mapping": {"event_payload_key": self.customer_key, "type": "by_id"},
            "default_aggregation": {"formula": self.formula},
            "display_name": self.display_name,
            "event_name": self.event_name,
            "event_time_window": self.event_time_window,
            "livemode": livemode,
            "status": self.status,
            "status_transitions": {"deactivated_at": self.deactivated_at},
            "updated": self.updated,
            "value_settings": {"event_payload_key": self.value_key},
        }


@dataclass(frozen=True, slots=True)
class MeterEvent:
    """An event Stripe took and will bill: it counts in totals and summaries."""

    identifier: str
    event_name: str
    meter_id: str
    customer: str
    value: Decimal
    timestamp: int
    created: float
    payload: dict[str, str]
    api: str  # "v1", "v2" (synchronous v2 endpoint) or "v2_stream"
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class ErrorReport:
    """An event Stripe took but dropped while processing it, as its error report lists it."""

    code: str
    message: str
    identifier: str
    event_name: str
    meter_id: str | None
    created: float
    api: str


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    token: str
    created: float
    expires_at: float

    def to_api(self, livemode: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "v2.billing.meter_event_session",
            "authentication_token": self.token,
            "created": rfc3339(self.created),
            "expires_at": rfc3339(self.expires_at),
            "livemode": livemode,
        }


@dataclass(frozen=True, slots=True)
class _Refusal:
    code: str
    message: str
    param: str | None
    meter_id: str | None = None
    # A refusal of the parameters themselves (format, range) is a validation failure, never
    # saved for an idempotency key; one that depends on the account's state is saved.
    saved: bool = False


@dataclass
class StripeState:
    livemode: bool = False
    whole_values_only: bool = True
    unknown_customer: UnknownCustomer = "drop"
    duplicate_code: str | None = None
    identifier_window: float = DAY
    session_ttl: float = 15 * 60
    summary_delay: float = 0.0
    clock: Clock = field(default_factory=Clock)

    def __post_init__(self) -> None:
        self.lock = threading.RLock()
        self.customers: dict[str, dict[str, Any]] = {}
        self.meters: dict[str, Meter] = {}
        self.events: list[MeterEvent] = []
        self.error_reports: list[ErrorReport] = []
        self.duplicates: list[dict[str, Any]] = []  # stream events dropped for their identifier
        self.sessions: dict[str, Session] = {}
        self.v2_events: dict[str, dict[str, Any]] = {}  # by id, for GET /v2/core/events/{id}
        self._identifiers: dict[str, float] = {}

    # -- customers -------------------------------------------------------------------------

    def add_customer(self, id: str | None = None, **fields: Any) -> dict[str, Any]:
        """Seed (or create through the API) a customer; `fields` are Customer attributes."""
        with self.lock:
            customer_id = id or new_id("cus")
            customer = {
                "id": customer_id,
                "object": "customer",
                "created": int(self.clock.now()),
                "description": None,
                "email": None,
                "livemode": self.livemode,
                "metadata": {},
                "name": None,
                "phone": None,
                **fields,
            }
            self.customers[customer_id] = customer
            return customer

    def customer(self, customer_id: str) -> dict[str, Any]:
        with self.lock:
            found = self.customers.get(customer_id)
            if found is None:
                raise no_such("customer", customer_id)
            return found

    def delete_customer(self, customer_id: str) -> dict[str, Any]:
        with self.lock:
            self.customer(customer_id)
            self.customers[customer_id] = {"id": customer_id, "object": "customer", "deleted": True}
            return self.customers[customer_id]

    def _customer_exists(self, customer_id: str) -> bool:
        found = self.customers.get(customer_id)
        return found is not None and not found.get("deleted")

    # -- meters ----------------------------------------------------------------------------

    def create_meter(
        self,
        event_name: str,
        display_name: str | None = None,
        *,
        formula: str = "sum",
        customer_key: str = "stripe_customer_id",
        value_key: str = "value",
        event_time_window: str | None = None,
    ) -> Meter:
        """A new active meter. Stripe maps an event name to one meter: refused while an active
        meter already has it (an inactive one may share it)."""
        with self.lock:
            if self.active_meter(event_name) is not None:
                raise invalid(
                    f"An active meter with event_name '{event_name}' already exists.",
                    param="event_name",
                )
            now = int(self.clock.now())
            meter = Meter(
                id=new_id("mtr_test" if not self.livemode else "mtr"),
                event_name=event_name,
                display_name=display_name or event_name,
                formula=formula,
                customer_key=customer_key,
                value_key=value_key,
                event_time_window=event_time_window,
                created=now,
                updated=now,
            )
            self.meters[meter.id] = meter
            return meter

    def meter(self, meter_id: str) -> Meter:
        with self.lock:
            found = self.meters.get(meter_id)
            if found is None:
                raise no_such("billing meter", meter_id)
            return found

    def active_meter(self, event_name: str) -> Meter | None:
        with self.lock:
            for meter in self.meters.values():
                if meter.event_name == event_name and meter.status == "active":
                    return meter
            return None

    def rename_meter(self, meter_id: str, display_name: str) -> Meter:
        with self.lock:
            meter = self.meter(meter_id)
            meter.display_name = display_name
            meter.updated = int(self.clock.now())
            return meter

    def deactivate_meter(self, meter_id: str) -> Meter:
        with self.lock:
            meter = self.meter(meter_id)
            if meter.status != "active":
                raise invalid(f"The meter '{meter_id}' is already inactive.")
            now = int(self.clock.now())
            meter.status, meter.deactivated_at, meter.updated = "inactive", now, now
            return meter

    def reactivate_meter(self, meter_id: str) -> Meter:
        with self.lock:
            meter = self.meter(meter_id)
            if meter.status == "active":
                raise invalid(f"The meter '{meter_id}' is already active.")
            if self.active_meter(meter.event_name) is not None:
                raise invalid(
                    f"An active meter with event_name '{meter.event_name}' already exists.",
                    param="event_name",
                )
            meter.status, meter.deactivated_at = "active", None
            meter.updated = int(self.clock.now())
            return meter

    # -- meter events ----------------------------------------------------------------------

    def _judge(
        self, event_name: str, payload: dict[str, str], timestamp: int
    ) -> tuple[Meter, str, Decimal] | _Refusal:
        """The meter, customer and value of an event, or why Stripe refuses it."""
        meter = self.active_meter(event_name)
        if meter is None:
            known = any(m.event_name == event_name for m in self.meters.values())
            return _Refusal(
                "archived_meter" if known else "no_meter",
                f"No active meter found for event_name '{event_name}'.",
                "event_name",
                saved=True,
            )
        customer = payload.get(meter.customer_key)
        if not customer:
            return _Refusal(
                "meter_event_no_customer_defined",
                f"The payload has no '{meter.customer_key}', the meter's customer key.",
                f"payload[{meter.customer_key}]",
                meter.id,
            )
        raw = payload.get(meter.value_key)
        value = self._value(raw) if meter.formula != "count" or raw is not None else Decimal(1)
        if isinstance(value, _Refusal):
            return _Refusal(value.code, value.message, f"payload[{meter.value_key}]", meter.id)
        now = int(self.clock.now())  # whole seconds, as the timestamps are
        if timestamp < now - MAX_PAST:
            return _Refusal(
                "timestamp_too_far_in_past",
                "The timestamp must be within the past 35 calendar days.",
                "timestamp",
                meter.id,
            )
        if timestamp > now + MAX_FUTURE:
            return _Refusal(
                "timestamp_in_future",
                "The timestamp cannot be more than 5 minutes in the future.",
                "timestamp",
                meter.id,
            )
        return meter, customer, value

    def _value(self, raw: str | None) -> Decimal | _Refusal:
        if raw is None:
            return _Refusal(
                "meter_event_value_not_found", "The payload has no value for the meter.", None
            )
        if _NUMBER.match(raw) is None:
            return _Refusal(
                "meter_event_invalid_value", f"The value '{raw}' is not a number.", None
            )
        value = Decimal(raw)
        digits = len(value.as_tuple().digits)
        if digits > MAX_VALUE_DIGITS:
            return _Refusal(
                "meter_event_value_too_many_digits",
                f"The value in the event payload can have at most {MAX_VALUE_DIGITS} digits. "
                f"Received {raw}.",
                None,
            )
        if self.whole_values_only and value != value.to_integral_value():
            return _Refusal(
                "meter_event_invalid_value", f"The value '{raw}' must be a whole number.", None
            )
        return value

    def _duplicate(self, identifier: str) -> bool:
        seen = self._identifiers.get(identifier)
        return seen is not None and self.clock.now() - seen < self.identifier_window

    def _take(
        self,
        meter: Meter,
        customer: str,
        value: Decimal,
        *,
        event_name: str,
        identifier: str,
        payload: dict[str, str],
        timestamp: int,
        api: str,
        idempotency_key: str | None,
    ) -> None:
        now = self.clock.now()
        self._identifiers[identifier] = now
        if self._customer_exists(customer) or self.unknown_customer == "accept":
            self.events.append(
                MeterEvent(
                    identifier=identifier,
                    event_name=event_name,
                    meter_id=meter.id,
                    customer=customer,
                    value=value,
                    timestamp=timestamp,
                    created=now,
                    payload=dict(payload),
                    api=api,
                    idempotency_key=idempotency_key,
                )
            )
        else:
            self._report(
                "meter_event_customer_not_found",
                f"No customer found with ID '{customer}'.",
                identifier,
                event_name,
                meter.id,
                api,
            )

    def _report(
        self,
        code: str,
        message: str,
        identifier: str,
        event_name: str,
        meter_id: str | None,
        api: str,
    ) -> None:
        self.error_reports.append(
            ErrorReport(code, message, identifier, event_name, meter_id, self.clock.now(), api)
        )

    def create_meter_event(
        self,
        *,
        event_name: str,
        payload: dict[str, str],
        identifier: str | None = None,
        timestamp: int | None = None,
        idempotency_key: str | None = None,
        api: str = "v1",
    ) -> dict[str, Any]:
        """POST /v1/billing/meter_events (and the synchronous v2 endpoint): validated now,
        refused with an ApiError, or taken and answered with the event."""
        with self.lock:
            now = self.clock.now()
            ts = int(now) if timestamp is None else timestamp
            identifier = identifier or str(uuid.uuid4())
            judged = self._judge(event_name, payload, ts)
            if isinstance(judged, _Refusal):
                raise invalid(
                    judged.message, param=judged.param, code=judged.code, saved=judged.saved
                )
            meter, customer, value = judged
            if self._duplicate(identifier):
                raise ApiError(
                    400,
                    f"An event already exists with identifier {identifier}.",
                    # v1: no code (see FakeStripe); v2: its documented duplicate_meter_event.
                    code=self.duplicate_code if api == "v1" else "duplicate_meter_event",
                    headers={"Stripe-Should-Retry": "false"},
                )
            if not self._customer_exists(customer) and self.unknown_customer == "reject":
                raise invalid(
                    f"No customer found with ID '{customer}'.",
                    param=f"payload[{meter.customer_key}]",
                    code="meter_event_customer_not_found",
                )
            self._take(
                meter,
                customer,
                value,
                event_name=event_name,
                identifier=identifier,
                payload=payload,
                timestamp=ts,
                api=api,
                idempotency_key=idempotency_key,
            )
            return {
                "object": "billing.meter_event",
                "created": int(now),
                "event_name": event_name,
                "identifier": identifier,
                "livemode": self.livemode,
                "payload": dict(payload),
                "timestamp": ts,
            }

    def stream_meter_events(self, events: list[dict[str, Any]]) -> None:
        """POST /v2/billing/meter_event_stream: every event is validated later, so a bad one
        becomes an error report and a reused identifier is dropped without one."""
        with self.lock:
            for event in events:
                identifier = event.get("identifier") or str(uuid.uuid4())
                name = event["event_name"]
                raw_ts = event.get("timestamp")
                ts = int(self.clock.now()) if raw_ts is None else int(parse_rfc3339(raw_ts))
                judged = self._judge(name, event["payload"], ts)
                if isinstance(judged, _Refusal):
                    self._report(
                        judged.code, judged.message, identifier, name, judged.meter_id, "v2_stream"
                    )
                    continue
                if self._duplicate(identifier):
                    self.duplicates.append({**event, "identifier": identifier})
                    continue
                meter, customer, value = judged
                self._take(
                    meter,
                    customer,
                    value,
                    event_name=name,
                    identifier=identifier,
                    payload=event["payload"],
                    timestamp=ts,
                    api="v2_stream",
                    idempotency_key=None,
                )

    # -- v2 sessions -----------------------------------------------------------------------

    def create_session(self) -> Session:
        with self.lock:
            now = self.clock.now()
            session = Session(
                id=new_id("mes"),
                token=new_id("token"),
                created=now,
                expires_at=now + self.session_ttl,
            )
            self.sessions[session.token] = session
            return session

    # -- what Stripe derives ---------------------------------------------------------------

    def totals(self) -> dict[tuple[str, str], Decimal]:
        """Sum of accepted values per (customer, event_name)."""
        with self.lock:
            sums: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
            for event in self.events:
                sums[(event.customer, event.event_name)] += event.value
            return dict(sums)

    def summaries(
        self, meter_id: str, customer: str, start: int, end: int, window: str | None = None
    ) -> list[dict[str, Any]]:
        """Meter event summaries as Stripe computes them: events with start <= timestamp < end,
        aggregated by the meter's formula, one summary for the range or one per hour/day window
        (windows without events are left out), oldest first. A pre-aggregated meter
        (`event_time_window`) keeps only the newest event per customer and window. Events
        newer than `summary_delay` seconds are not aggregated yet."""
        with self.lock:
            meter = self.meter(meter_id)
            cutoff = self.clock.now() - self.summary_delay
            events = [
                e
                for e in self.events
                if e.meter_id == meter_id
                and e.customer == customer
                and start <= e.timestamp < end
                and e.created <= cutoff
            ]
            if meter.event_time_window:
                size = WINDOWS[meter.event_time_window]
                newest: dict[int, MeterEvent] = {}
                for event in events:  # in arrival order: a later one replaces an earlier one
                    newest[event.timestamp // size] = event
                events = list(newest.values())
            step = WINDOWS[window] if window else end - start
            result = []
            for window_start in range(start, end, step):
                window_end = min(window_start + step, end)
                inside = [e for e in events if window_start <= e.timestamp < window_end]
                if window and not inside:
                    continue
                result.append(
                    {
                        "id": _summary_id(meter_id, customer, window_start, window_end),
                        "object": "billing.meter_event_summary",
                        "aggregated_value": _aggregate(meter.formula, inside),
                        "end_time": window_end,
                        "livemode": self.livemode,
                        "meter": meter_id,
                        "start_time": window_start,
                    }
                )
            return result

    def error_report_event(self, meter_id: str) -> dict[str, Any]:
        """The `v1.billing.meter.error_report_triggered` event Stripe would send for this
        meter's error reports so far (fields as in stripe-python@v16.1.0:
        stripe/events/_v1_billing_meter_error_report_triggered_event.py), kept for
        `GET /v2/core/events/{id}`: a webhook carries only the thin notification (id, type,
        related_object), and the receiver fetches the event to read its `data`."""
        with self.lock:
            reports = [r for r in self.error_reports if r.meter_id == meter_id]
            by_code: dict[str, list[ErrorReport]] = defaultdict(list)
            for report in reports:
                by_code[report.code].append(report)
            now = self.clock.now()
            start = min((r.created for r in reports), default=now)
            event = {
                "id": new_id("evt_test"),
                "object": "v2.core.event",
                "type": "v1.billing.meter.error_report_triggered",
                "created": rfc3339(now),
                "livemode": self.livemode,
                "context": None,
                "reason": None,
                "related_object": {
                    "id": meter_id,
                    "type": "billing.meter",
                    "url": f"/v1/billing/meters/{meter_id}",
                },
                "data": {
                    "developer_message_summary": f"There are {len(reports)} invalid meter events.",
                    "reason": {
                        "error_count": len(reports),
                        "error_types": [
                            {
                                "code": code,
                                "error_count": len(items),
                                "sample_errors": [
                                    {
                                        "error_message": r.message,
                                        "request": {"identifier": r.identifier},
                                    }
                                    for r in items[:5]
                                ],
                            }
                            for code, items in by_code.items()
                        ],
                    },
                    "validation_start": rfc3339(start),
                    "validation_end": rfc3339(now),
                },
            }
            self.v2_events[event["id"]] = event
            return event

    def v2_event(self, event_id: str) -> dict[str, Any]:
        with self.lock:
            found = self.v2_events.get(event_id)
            if found is None:
                raise no_such("event", event_id)
            return found

    def snapshot(self) -> dict[str, Any]:
        """Everything, as plain data (for a failing test's message)."""
        with self.lock:
            return {
                "customers": list(self.customers),
                "meters": [asdict(m) for m in self.meters.values()],
                "events": [asdict(e) for e in self.events],
                "error_reports": [asdict(r) for r in self.error_reports],
            }


def _summary_id(meter_id: str, customer: str, start: int, end: int) -> str:
    digest = hashlib.sha256(f"{meter_id}:{customer}:{start}:{end}".encode()).hexdigest()
    return f"mtrusg_{digest[:24]}"


def _aggregate(formula: str, events: list[MeterEvent]) -> float:
    if formula == "count":
        return float(len(events))
    if formula == "last":
        if not events:
            return 0.0
        return float(max(events, key=lambda e: (e.timestamp, e.created)).value)
    return float(sum((e.value for e in events), Decimal(0)))


def check_summary_range(start: int, end: int, window: str | None) -> None:
    """Stripe's alignment rules for event summaries: minute boundaries always, hour or UTC day
    boundaries with a grouping window (docs of `value_grouping_window`)."""
    if start >= end:
        raise invalid("The start_time must be before the end_time.", param="start_time")
    size = WINDOWS[window] if window else 60
    unit = {3_600: "hour", DAY: "day", 60: "minute"}[size]
    for name, value in (("start_time", start), ("end_time", end)):
        if value % size:
            raise invalid(f"The {name} must be aligned with {unit} boundaries.", param=name)
