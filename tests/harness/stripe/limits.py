"""Stripe's limiters as the fake enforces them: requests per second and concurrent meter events.

Numbers from docs.stripe.com/rate-limits: test mode allows 25 reads and 25 writes a second,
live mode 100 of each; live meter events have their own limit of 1,000 calls a second while in
test mode they count toward the basic write limit; meter events are also limited to one
concurrent call per customer per meter. A refused request is answered 429 `rate_limit` with a
`Stripe-Rate-Limited-Reason` header and is not counted. Seconds here are real seconds, fixed
windows of `time.monotonic()`, whatever the fake's clock says.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass

READ, WRITE, METER_EVENTS, STREAM = "read", "write", "meter_events", "stream"


@dataclass(frozen=True, slots=True)
class RateLimits:
    read_per_second: int | None = 25
    write_per_second: int | None = 25
    # None: meter events count toward write_per_second, as in test mode.
    meter_events_per_second: int | None = None
    # The v2 meter event stream (its own limit, live mode only at Stripe).
    stream_per_second: int | None = None
    # Concurrent meter-event calls per (customer, event name); None for no limit.
    per_customer_meter_concurrency: int | None = 1
    # Stripe documents a 429; one integrator reports 409s for this case. Tests may choose.
    concurrency_status: int = 429

    @classmethod
    def test_mode(cls) -> RateLimits:
        return cls()

    @classmethod
    def live_mode(cls) -> RateLimits:
        return cls(100, 100, 1_000, 10_000)

    @classmethod
    def unlimited(cls) -> RateLimits:
        return cls(None, None, None, None, None)


class RateLimiter:
    """Counts requests per one-second window and calls in flight per key (server thread only)."""

    def __init__(self, limits: Callable[[], RateLimits]) -> None:
        self._limits = limits
        self._second = -1
        self._counts: Counter[str] = Counter()
        self._in_flight: Counter[Hashable] = Counter()

    def admit(self, kind: str) -> str | None:
        """None when the request may go on (and is counted), else the rate-limited reason."""
        limits = self._limits()
        second = int(time.monotonic())
        if second != self._second:
            self._second, self._counts = second, Counter()
        bucket, limit, reason = {
            READ: (READ, limits.read_per_second, "global-rate"),
            WRITE: (WRITE, limits.write_per_second, "global-rate"),
            STREAM: (STREAM, limits.stream_per_second, "endpoint-rate"),
        }.get(kind, (WRITE, limits.write_per_second, "global-rate"))
        if kind == METER_EVENTS and limits.meter_events_per_second is not None:
            bucket, limit, reason = METER_EVENTS, limits.meter_events_per_second, "endpoint-rate"
        if limit is not None and self._counts[bucket] >= limit:
            return reason
        self._counts[bucket] += 1
        return None

    def acquire(self, key: Hashable) -> bool:
        limit = self._limits().per_customer_meter_concurrency
        if limit is not None and self._in_flight[key] >= limit:
            return False
        self._in_flight[key] += 1
        return True

    def release(self, key: Hashable) -> None:
        self._in_flight[key] -= 1
        if self._in_flight[key] <= 0:
            del self._in_flight[key]
