"""The only code that talks to Stripe: the official SDK, async, with no retries of its own.

`StripeApi` wraps `stripe.StripeClient` with both base addresses (`api` and `meter_events`) taken
from `STRIPE_API_BASE` when it is set, an aiohttp transport, and `max_network_retries=0`: the SDK
then sends each call once (it would otherwise retry 409s, 5xx, connection errors and 429s that
carry `Stripe-Should-Retry: true`, stripe-python@v16.1.0:stripe/_http_client.py `_should_retry`),
so every retry is the outbox's, counted and logged. `classify` maps Stripe's errors to ours, once
for every caller; an aiohttp failure that escapes the SDK (it reads the body outside its own
error handling) is wrapped as a connection error first.

The v2 meter event stream authenticates with a meter event session's token, not the key: the
SDK sends the stream call to the `meter_events` base address and takes the token as that one
call's `api_key` option (stripe-python@v16.1.0:stripe/v2/billing/_meter_event_stream_service.py,
stripe/_request_options.py `merge_options`); the session itself is created with the key at the
`api` base address (stripe/v2/billing/_meter_event_session_service.py).
"""

from __future__ import annotations

import contextlib
import enum
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp
import stripe

# Stripe's answer to a meter event whose identifier it already took (the usage is there): a 400
# invalid_request_error without a code on v1, known by its message; the v2 endpoints' documented
# code for it is `duplicate_meter_event`, taken too should v1 start sending one.
DUPLICATE_MESSAGE: Final = re.compile(r"already exists with identifier", re.IGNORECASE)
DUPLICATE_CODE: Final = "duplicate_meter_event"
DEFAULT_TIMEOUT: Final = 20.0


class Outcome(enum.Enum):
    RETRY = "retry"  # 429, 5xx, timeouts, dropped connections: send the same identifier later
    DUPLICATE = "duplicate"  # Stripe already has this identifier: delivered
    REJECTED = "rejected"  # Stripe refuses this call as it is (bad customer, inactive meter...)
    UNAUTHORIZED = "unauthorized"  # the key is wrong or lacks permission: nothing will work
    # The stream's session token expired (401 billing_meter_event_session_expired): renew it.
    SESSION_EXPIRED = "session_expired"


@dataclass(frozen=True, slots=True)
class StripeFailure:
    """A failed Stripe call, as the outbox acts on it."""

    outcome: Outcome
    code: str
    message: str
    status: int | None = None


def classify(exc: stripe.StripeError) -> StripeFailure:
    """What to do about a Stripe error (the one place Stripe's error classes are read)."""
    status = exc.http_status
    detail = exc.error
    code = exc.code or (detail.code if detail is not None else None) or type(exc).__name__
    message = (detail.message if detail is not None else None) or exc.user_message or str(exc)
    if isinstance(exc, stripe.TemporarySessionExpiredError):
        return StripeFailure(Outcome.SESSION_EXPIRED, code, message, status)
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        return StripeFailure(Outcome.UNAUTHORIZED, code, message, status)
    if isinstance(exc, stripe.RateLimitError | stripe.APIConnectionError):
        return StripeFailure(Outcome.RETRY, code, message, status)
    if status == 400 and (code == DUPLICATE_CODE or DUPLICATE_MESSAGE.search(message or "")):
        return StripeFailure(Outcome.DUPLICATE, code, message, status)
    if status is None or status >= 500 or status in (409, 429):
        return StripeFailure(Outcome.RETRY, code, message, status)
    return StripeFailure(Outcome.REJECTED, code, message, status)


@dataclass(frozen=True, slots=True)
class StripeMeter:
    id: str
    event_name: str
    display_name: str
    status: str
    aggregation: str

    @property
    def active(self) -> bool:
        return self.status == "active"


def _meter(resource: Any) -> StripeMeter:
    obj = resource.to_dict() if hasattr(resource, "to_dict") else dict(resource)
    return StripeMeter(
        id=obj["id"],
        event_name=obj["event_name"],
        display_name=obj.get("display_name") or obj["event_name"],
        status=obj.get("status") or "active",
        aggregation=(obj.get("default_aggregation") or {}).get("formula") or "sum",
    )


@dataclass(frozen=True, slots=True)
class Summary:
    """One meter event summary: a meter's aggregated value for a customer over a window."""

    start: datetime
    end: datetime
    value: float


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One meter event for the v2 stream (sent with Stripe's default payload keys)."""

    event_name: str
    customer: str
    value: int
    identifier: str
    timestamp: datetime


@dataclass(frozen=True, slots=True)
class MeterEventSession:
    """A v2 meter event session: its token authenticates stream calls until it expires.
    `lifetime` is Stripe's own `expires_at - created`, so no clock skew enters it."""

    id: str
    token: str
    expires_at: datetime
    lifetime: float


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@contextlib.contextmanager
def _connection_errors() -> Iterator[None]:
    try:
        yield
    except (TimeoutError, aiohttp.ClientError) as exc:
        message = f"connection to Stripe failed: {exc!r}"
        raise stripe.APIConnectionError(message) from exc  # type: ignore[no-untyped-call]


class StripeApi:
    """The Stripe calls the collector makes. Raises `stripe.StripeError`; see `classify`."""

    def __init__(
        self, api_key: str, *, api_base: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        base = {"api": api_base, "meter_events": api_base} if api_base else None
        self._client = stripe.StripeClient(
            api_key,
            base_addresses=base,  # type: ignore[arg-type]
            max_network_retries=0,
            http_client=stripe.AIOHTTPClient(timeout=timeout),
        )
        self.test_mode = api_key.startswith(("sk_test_", "rk_test_"))

    async def close(self) -> None:
        await self._client._requestor._get_http_client().close_async()  # type: ignore[no-untyped-call]

    async def list_meters(self) -> list[StripeMeter]:
        """Every meter of the account, active or not, following Stripe's pagination."""
        meters: list[StripeMeter] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = await self._client.v1.billing.meters.list_async(params=params)  # type: ignore[arg-type]
            meters.extend(_meter(item) for item in page.data)
            if not page.has_more or not page.data:
                return meters
            params["starting_after"] = page.data[-1].id

    async def create_meter(self, event_name: str, display_name: str) -> StripeMeter:
        meter = await self._client.v1.billing.meters.create_async(
            params={
                "display_name": display_name,
                "event_name": event_name,
                "default_aggregation": {"formula": "sum"},
                "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
                "value_settings": {"event_payload_key": "value"},
            },
            options={"idempotency_key": f"token-meter-meter-{event_name}"},
        )
        return _meter(meter)

    async def send_meter_event(
        self,
        *,
        event_name: str,
        customer: str,
        value: int,
        identifier: str,
        timestamp: int,
        idempotency_key: str,
    ) -> None:
        """One meter event. Stripe replays the first answer to an idempotency key for 24 hours,
        whatever it was (a 500 included), and refuses an identifier it already took within 24
        hours: the caller chooses the key (`transport.idempotency_key`)."""
        with _connection_errors():
            await self._client.v1.billing.meter_events.create_async(
                params={
                    "event_name": event_name,
                    "payload": {"stripe_customer_id": customer, "value": str(value)},
                    "identifier": identifier,
                    "timestamp": timestamp,
                },
                options={"idempotency_key": idempotency_key},
            )

    async def create_meter_event_session(self) -> MeterEventSession:
        """A new session for the v2 stream (Stripe's tokens last 15 minutes)."""
        with _connection_errors():
            session = await self._client.v2.billing.meter_event_session.create_async()
        created = datetime.fromisoformat(session.created)
        expires_at = datetime.fromisoformat(session.expires_at)
        return MeterEventSession(
            id=session.id,
            token=session.authentication_token,
            expires_at=expires_at,
            lifetime=(expires_at - created).total_seconds(),
        )

    async def stream_meter_events(self, token: str, events: Sequence[StreamEvent]) -> None:
        """Up to 100 meter events in one v2 stream call, authenticated by a session token. A
        200 only means Stripe took them for processing: it validates them later and reports
        what it dropped in `v1.billing.meter.error_report_triggered` events. A reused identifier
        is dropped silently (no error), which is what makes re-sending a batch safe. The SDK
        sends a fresh random idempotency key: a batch sent again is new to that layer."""
        params: Any = {
            "events": [
                {
                    "event_name": event.event_name,
                    "identifier": event.identifier,
                    "payload": {"stripe_customer_id": event.customer, "value": str(event.value)},
                    "timestamp": _rfc3339(event.timestamp),
                }
                for event in events
            ]
        }
        with _connection_errors():
            await self._client.v2.billing.meter_event_stream.create_async(
                params=params, options={"api_key": token}
            )

    async def retrieve_event(self, event_id: str) -> dict[str, Any]:
        """A v2 event with its `data` (a thin webhook notification carries only its id, type
        and related object)."""
        with _connection_errors():
            event = await self._client.v2.core.events.retrieve_async(event_id)
        return event.to_dict()

    async def customer_exists(self, customer: str) -> bool:
        try:
            found = await self._client.v1.customers.retrieve_async(customer)
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                return False
            raise
        return not getattr(found, "deleted", False)

    async def event_summaries(
        self, meter_id: str, customer: str, start: int, end: int, window: str | None = "day"
    ) -> Sequence[Summary]:
        """A customer's summaries of one meter over [start, end), following the pages: one per
        `window` ("hour" or "day", with start and end on hour or UTC day boundaries), or with
        `window=None` one for the whole range (on minute boundaries), as
        stripe-python@v16.1.0:stripe/params/billing/_meter_event_summary_list_params.py has it."""
        summaries: list[Summary] = []
        params: dict[str, Any] = {
            "customer": customer,
            "start_time": start,
            "end_time": end,
            "limit": 100,
        }
        if window is not None:
            params["value_grouping_window"] = window
        while True:
            page = await self._client.v1.billing.meters.event_summaries.list_async(
                meter_id,
                params=params,  # type: ignore[arg-type]
            )
            summaries.extend(
                Summary(
                    datetime.fromtimestamp(item.start_time, UTC),
                    datetime.fromtimestamp(item.end_time, UTC),
                    float(item.aggregated_value),
                )
                for item in page.data
            )
            if not page.has_more or not page.data:
                return summaries
            params["starting_after"] = page.data[-1].id


def meters_by_event_name(meters: Sequence[StripeMeter]) -> Mapping[str, StripeMeter]:
    """The meter Stripe uses for each event name: the active one when several share it."""
    chosen: dict[str, StripeMeter] = {}
    for meter in meters:
        current = chosen.get(meter.event_name)
        if current is None or (meter.active and not current.active):
            chosen[meter.event_name] = meter
    return chosen
