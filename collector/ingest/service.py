"""The ingest service: validate a batch, store the valid events in one transaction, retry the
transaction on a deadlock (concurrent batches touching the same rollup rows), count it all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import structlog

from ..observability import Metrics
from .events import ParsedBatch, Rejection, UsageEvent, parse_batch
from .store import StoreResult, store_events

log = structlog.get_logger("token_meter.ingest")

MAX_ATTEMPTS = 5

# Runs inside the ingest transaction after the events are stored: the seam where credits and
# quotas (burn, blocklist) join the same commit, so usage and balances never disagree.
AfterStore = Callable[[asyncpg.Connection, list[UsageEvent], StoreResult], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    accepted: int
    duplicates: int
    rejected: list[Rejection]
    size: int

    def as_json(self) -> dict[str, object]:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": [{"index": r.index, "id": r.id, "reason": r.reason} for r in self.rejected],
        }


class IngestService:
    def __init__(self, pool: asyncpg.Pool, metrics: Metrics, *, max_events: int) -> None:
        self.pool = pool
        self.metrics = metrics
        self.max_events = max_events
        self.after_store: list[AfterStore] = []

    def parse(self, body: bytes) -> ParsedBatch:
        return parse_batch(body, max_events=self.max_events, now=datetime.now(UTC))

    async def ingest(self, batch: ParsedBatch) -> IngestOutcome:
        started = time.perf_counter()
        result = await self._store(batch.events)
        outcome = IngestOutcome(
            accepted=result.accepted,
            duplicates=result.duplicates,
            rejected=batch.rejected,
            size=batch.size,
        )
        m = self.metrics
        m.events.labels("accepted").inc(outcome.accepted)
        m.events.labels("duplicate").inc(outcome.duplicates)
        m.events.labels("rejected").inc(len(outcome.rejected))
        m.batch_events.observe(outcome.size)
        m.batch_seconds.observe(time.perf_counter() - started)
        return outcome

    async def _store(self, events: list[UsageEvent]) -> StoreResult:
        if not events:
            return StoreResult(0, 0, frozenset())
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    result = await store_events(conn, events)
                    for hook in self.after_store:
                        await hook(conn, events, result)
                    return result
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                if attempt == MAX_ATTEMPTS:
                    raise
                self.metrics.db_retries.inc()
                log.warning("ingest_transaction_retry", attempt=attempt)
                await asyncio.sleep(0.01 * attempt)
        raise AssertionError("unreachable")
