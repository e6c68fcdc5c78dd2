"""What an ingest transaction hands on once its events are stored: the new usage per consumer
and the price book that priced it. Whatever must commit with the usage (the credit burn and the
blocklist rules of collector/accounts) implements FreshUsageListener; it gets plain values, never
ingest's session tables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
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


class FreshUsageListener(Protocol):
    async def on_fresh_usage(
        self, conn: asyncpg.Connection, fresh: Sequence[FreshUsage], book: Pricing | None
    ) -> None:
        """Runs inside the ingest transaction, after its events are stored and before the
        commit. `fresh` holds one entry per consumer with new events, in consumer order;
        `book` is the one object that priced them (None: stored without a cost). A reload may
        have swapped the book in use since, so never ask the source again."""
        ...
