"""`TOKEN_METER_STRIPE_TRANSPORT=meter_event_stream`: the outbox over the v2 meter event stream.

Each call carries up to 100 events and is authenticated by a meter event session's token, not
the API key. Sessions last 15 minutes at Stripe; one is shared by every call of this collector,
created on first use and renewed `RENEW_AHEAD` seconds before it expires (a quarter of its
lifetime when that is shorter), timed on our monotonic clock from the lifetime Stripe states, so
no clock skew shortens it. A call that meets `billing_meter_event_session_expired` anyway (or
a token Stripe no longer knows) renews the session and is sent once more at once.

A 200 only means Stripe took the events for processing: rows are marked sent (`created`), and
what Stripe's validation later drops comes back as `v1.billing.meter.error_report_triggered`
events (`error_reports.py`). A failed call (429, 5xx, timeout, dropped connection) is sent again
later under the same identifiers: the stream drops an identifier it already took without an
error, so events applied before an answer was lost are not counted twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Final

import stripe
import structlog
from aiolimiter import AsyncLimiter

from ..observability import Metrics
from .store import PendingRow
from .stripe_api import MeterEventSession, Outcome, StreamEvent, StripeApi, StripeFailure, classify
from .transport import Result

log = structlog.get_logger("token_meter.billing")

BATCH_SIZE: Final = 100  # Stripe's maximum events per stream call
RENEW_AHEAD: Final = 60.0  # seconds before a session expires
# A stream call refused for its token: expired (401 billing_meter_event_session_expired), or a
# session Stripe no longer knows (a plain 401).
REFUSED_TOKEN: Final = (Outcome.SESSION_EXPIRED, Outcome.UNAUTHORIZED)


@dataclass(frozen=True, slots=True)
class _Session:
    token: str
    renew_at: float  # on the monotonic clock


def stream_event(row: PendingRow) -> StreamEvent:
    return StreamEvent(
        event_name=row.event_name,
        customer=row.customer,
        value=row.value,
        identifier=row.identifier,
        timestamp=row.window_start,
    )


def renew_at(opened: float, session: MeterEventSession) -> float:
    """When to stop using a session opened at `opened` (monotonic seconds)."""
    lifetime = max(session.lifetime, 0.0)
    return opened + lifetime - min(RENEW_AHEAD, lifetime / 4)


class StreamTransport:
    name = "meter_event_stream"
    batch_size = BATCH_SIZE

    def __init__(
        self,
        api: StripeApi,
        limiter: AsyncLimiter,
        metrics: Metrics,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.limiter = limiter
        self.metrics = metrics
        self.monotonic = monotonic
        self._session: _Session | None = None
        self._opening = asyncio.Lock()  # one session creation at a time, shared by all calls
        self._opened = 0  # session creations finished, well or not
        self._open_failure: StripeFailure | None = None  # how the last one failed, if it did

    async def send(self, rows: Sequence[PendingRow]) -> Result:
        events = [stream_event(row) for row in rows]
        failure, refused = await self._call(events)
        if refused:
            # The session's token was refused: the same events once more, on a new session.
            failure, refused = await self._call(events)
            if failure is not None and failure.outcome is Outcome.SESSION_EXPIRED:
                # Expired again, brand new: a clock or Stripe is off; later, with backoff.
                failure = replace(failure, outcome=Outcome.RETRY)
        return "created" if failure is None else failure

    async def _call(self, events: Sequence[StreamEvent]) -> tuple[StripeFailure | None, bool]:
        """One stream call (a session first, when due): its failure, and whether Stripe refused
        the session's token (expired, or unknown to it)."""
        token = await self._token()
        if isinstance(token, StripeFailure):
            return token, False
        failure: StripeFailure | None = None
        async with self.limiter:
            try:
                await self.api.stream_meter_events(token, events)
            except stripe.StripeError as exc:
                failure = classify(exc)
        self.metrics.stripe_calls.labels(
            self.name, failure.outcome.value if failure else "ok"
        ).inc()
        if failure is not None and failure.outcome in REFUSED_TOKEN:
            log.info("stripe_meter_event_session_refused", code=failure.code)
            self._forget(token)
            return failure, True
        return failure, False

    async def _token(self) -> str | StripeFailure:
        """The current session's token, a new session's when due, or why none could be had.
        Calls that waited while a creation failed share its failure rather than each trying
        (and, in an outage, each waiting out the timeout) in turn."""
        seen = self._opened
        async with self._opening:
            if self._open_failure is not None and self._opened != seen:
                return self._open_failure
            session = self._session
            if session is None or self.monotonic() >= session.renew_at:
                opened = await self._open()
                self._opened += 1
                if isinstance(opened, StripeFailure):
                    self._open_failure = opened
                    return opened
                self._open_failure, session = None, opened
            return session.token

    async def _open(self) -> _Session | StripeFailure:
        opened = self.monotonic()
        async with self.limiter:
            try:
                created = await self.api.create_meter_event_session()
            except stripe.StripeError as exc:
                failure = classify(exc)
                self.metrics.stripe_calls.labels("meter_event_session", failure.outcome.value).inc()
                log.warning(
                    "stripe_meter_event_session_failed", code=failure.code, status=failure.status
                )
                return failure
        self.metrics.stripe_calls.labels("meter_event_session", "ok").inc()
        self._session = _Session(created.token, renew_at(opened, created))
        log.info(
            "stripe_meter_event_session",
            session=created.id,
            expires_at=created.expires_at.isoformat(),
            renew_in=round(self._session.renew_at - opened, 3),
        )
        return self._session

    def _forget(self, token: str) -> None:
        """Drop the session whose token was refused (unless another call renewed it already)."""
        if self._session is not None and self._session.token == token:
            self._session = None
