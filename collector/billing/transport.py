"""How the sync's meter events reach Stripe (`TOKEN_METER_STRIPE_TRANSPORT`).

A transport sends one batch of outbox rows, at most `batch_size` of them, as one Stripe call
and says what became of the whole batch: the answer to store with the rows (`created`,
`duplicate`) or the call's failure, classified once by `stripe_api.classify`. It only talks to
Stripe (through `StripeApi`, within the sync's rate limiter) and counts its calls; what a failure
means for the rows, and the order per customer and meter, are the sync's (`sync.py`).

- `meter_events` (`V1Transport`, here): one event a call to `POST /v1/billing/meter_events`,
  validated synchronously, under an idempotency key per attempt (`idempotency_key`).
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


def idempotency_key(row: PendingRow) -> str:
    """The v1 call's Idempotency-Key: the row's identifier on its first attempt, then
    `<identifier>-a<attempts>` (attempts as the outbox counts them, each finished call one).

    A new key for each attempt because Stripe saves the first answer to a key, 500s included,
    and replays it to every request with that key for 24 hours: under one key for all
    attempts, a 500 Stripe gave after taking the event would be all the row ever got back for
    a day. Exactly once rests on the identifier instead, which every attempt keeps: Stripe
    refuses one it took within 24 hours, and that refusal counts as delivered. Derived from the
    count, not drawn at random, so a call whose answer the outbox never recorded (the collector
    died, the database did not answer) is sent again under the same key and gets Stripe's saved
    answer: one key per recorded attempt, however often the sender restarts."""
    if row.attempts == 0:
        return row.identifier  # as before per-attempt keys: rows in flight across an upgrade
    return f"{row.identifier}-a{row.attempts}"  # at most ~120 characters; Stripe takes 255


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
                    idempotency_key=idempotency_key(row),
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
