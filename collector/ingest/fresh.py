"""What an ingest transaction hands on once its events are stored: the new usage per consumer
and the price book that priced it. Whatever must commit with the usage (the credit burn and the
blocklist rules of collector/accounts) implements FreshUsageListener; it gets plain values, never
ingest's session tables."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import asyncpg

from .events import UsageData


class Pricing(Protocol):
    """Prices each event as it is stored (collector/pricing's PriceBook is one)."""

    @property
    def version(self) -> str: ...

    def cost_nanos(self, data: UsageData) -> int | None: ...


@dataclass(frozen=True, slots=True)
class FreshUsage:
    """What one transaction's new events (duplicates left out) add up to for one consumer."""

    consumer: str
    events: int
    total_tokens: int
    cost_nanos: int  # of the priced events; an unpriced one costs nothing
    unpriced_events: int
    hours: tuple[datetime, ...] = ()  # the UTC hours the events fall in (rollup windows)
    custom_id: str | None = None  # the Kong custom_id of the consumer's latest event


HOUR_SECONDS = 3600
ONE_HOUR = timedelta(hours=1)


@dataclass(slots=True)
class _ConsumerTally:
    events: int = 0
    total_tokens: int = 0
    cost_nanos: int = 0
    unpriced_events: int = 0
    hours: set[datetime] = field(default_factory=set)  # UTC hour starts
    # The last hour added, [start, end): most events of a consumer in a batch fall in it, and
    # two comparisons cost less than working out the hour.
    hour_start: datetime | None = None
    hour_end: datetime | None = None
    custom_id: str | None = None
    custom_id_time: datetime | None = None


class UsageTally:
    """New events counted per request and summed per consumer, one `add` per event (on the
    hot path: kept to plain attribute updates)."""

    __slots__ = ("_consumers", "accepted")

    def __init__(self, requests: int) -> None:
        self.accepted = [0] * requests
        self._consumers: dict[str, _ConsumerTally] = {}

    def add(  # noqa: PLR0917 - one call per event: positional is cheapest
        self,
        request: int,
        consumer: str,
        time: datetime,
        total_tokens: int,
        cost_nanos: int | None,
        custom_id: str | None,
    ) -> None:
        self.accepted[request] += 1
        t = self._consumers.get(consumer)
        if t is None:
            t = self._consumers[consumer] = _ConsumerTally()
        t.events += 1
        t.total_tokens += total_tokens
        if cost_nanos is None:
            t.unpriced_events += 1
        else:
            t.cost_nanos += cost_nanos
        if t.hour_start is None or not t.hour_start <= time < t.hour_end:  # type: ignore[operator]
            start = datetime.fromtimestamp(
                int(time.timestamp()) // HOUR_SECONDS * HOUR_SECONDS, UTC
            )
            t.hours.add(start)
            t.hour_start, t.hour_end = start, start + ONE_HOUR
        if custom_id is not None and (t.custom_id_time is None or time >= t.custom_id_time):
            t.custom_id, t.custom_id_time = custom_id, time

    @classmethod
    def combine(cls, tallies: Sequence[UsageTally]) -> UsageTally:
        """The tallies of requests, each of its own events, as one of all (the requests in
        order); the requests share no event."""
        combined = cls(0)
        for tally in tallies:
            combined.accepted.extend(tally.accepted)
            for consumer, t in tally._consumers.items():
                c = combined._consumers.get(consumer)
                if c is None:
                    combined._consumers[consumer] = c = _ConsumerTally()
                c.events += t.events
                c.total_tokens += t.total_tokens
                c.cost_nanos += t.cost_nanos
                c.unpriced_events += t.unpriced_events
                c.hours |= t.hours
                if t.custom_id_time is not None and (
                    c.custom_id_time is None or t.custom_id_time >= c.custom_id_time
                ):
                    c.custom_id, c.custom_id_time = t.custom_id, t.custom_id_time
        return combined

    def consumers(self) -> Iterable[str]:
        return self._consumers.keys()

    def fresh(self) -> list[FreshUsage]:
        """One FreshUsage per consumer, in consumer order."""
        return [
            FreshUsage(
                consumer,
                t.events,
                t.total_tokens,
                t.cost_nanos,
                t.unpriced_events,
                tuple(sorted(t.hours)),
                t.custom_id,
            )
            for consumer, t in sorted(self._consumers.items())
        ]


class FreshUsageListener(Protocol):
    async def on_fresh_usage(
        self, conn: asyncpg.Connection, fresh: Sequence[FreshUsage], book: Pricing | None
    ) -> None:
        """Runs inside the ingest transaction, after its events are stored and before the
        commit. `fresh` holds one entry per consumer with new events, in consumer order;
        `book` is the one object that priced them (None: stored without a cost). A reload may
        have swapped the book in use since, so never ask the source again."""
        ...
