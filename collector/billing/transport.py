"""How the sync's meter events reach Stripe (`TOKEN_METER_STRIPE_TRANSPORT`).

A transport sends one batch of outbox rows, at most `batch_size` of them, as one Stripe call
and says what became of the whole batch: the answer to store with the rows (`created`,
`duplicate`) or the call's failure, classified once by `stripe_api.classify`. It only talks to
Stripe (through `StripeApi`, within the sync's rate limiter) and counts its calls; what a failure
means for the rows, and the order per customer and meter, are the sync's (`sync.py`).

- `meter_events` (`V1Transport`, here): one event a call to `POST /v1/billing/meter_events`,
  validated synchronously, the identifier doubling as the idempotency key.
- `meter_event_stream` (`stream.StreamTransport`): up to 100 events a call to the v2 stream,
  validated asynchronously.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, TypeAlias

import stripe
from aiolimiter import AsyncLimiter

from ..observability import Metrics
from .store import PendingRow
from .stripe_api import Outcome, StripeApi, StripeFailure, classify

# What the outbox records in `answer` for delivered rows (migration 0003's CHECK): `created`
# for events Stripe took (on the stream: took for processing; an error report undoes it),
# `duplicate` when Stripe already had the identifier.
Answer: TypeAlias = Literal["created", "duplicate"]
Result: TypeAlias = Answer | StripeFailure


class Transport(Protocol):
    name: str  # the TOKEN_METER_STRIPE_TRANSPORT value
    batch_size: int  # rows per call at most

    async def send(self, rows: Sequence[PendingRow]) -> Result:
        """Send `rows` (1 to `batch_size`, no two of one customer and meter in flight elsewhere)
        as one call; never raises a Stripe error."""
        ...


class V1Transport:
    """One meter event per call to the v1 endpoint."""

    name = "meter_events"
    batch_size = 1

    def __init__(self, api: StripeApi, limiter: AsyncLimiter, metrics: Metrics) -> None:
        self.api = api
        self.limiter = limiter
        self.metrics = metrics

    async def send(self, rows: Sequence[PendingRow]) -> Result:
        (row,) = rows
        failure: StripeFailure | None = None
        async with self.limiter:
            try:
                await self.api.send_meter_event(
                    event_name=row.event_name,
                    customer=row.customer,
                    value=row.value,
                    identifier=row.identifier,
                    timestamp=int(row.window_start.timestamp()),
                )
            except stripe.StripeError as exc:
                failure = classify(exc)
        outcome = failure.outcome.value if failure else "ok"
        self.metrics.stripe_calls.labels("meter_events", outcome).inc()
        if failure is None:
            return "created"
        if failure.outcome is Outcome.DUPLICATE:
            return "duplicate"
        return failure
