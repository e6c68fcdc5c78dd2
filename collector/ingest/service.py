"""The ingest service: validate a batch and make its rows (stage_events) as it arrives, then hand
them to the writer, which stores the events of every request waiting at that moment in one
transaction (group commit). Rows made while a request waits for a writer keep that work out of
the transaction's time.

Why so few writers: the rollup rows of busy consumers are touched by nearly every batch. Many
concurrent transactions would queue on those row locks and each pay for its own commit; a writer
taking everything that is waiting pays the rollup upserts and the commit once for all of them.
Two writers (the default) overlap: one copies and dedupes its events while the other updates
rollups and commits; both take rollup rows in key order, so they wait for, never deadlock with,
each other. A transaction also takes the requests that arrive while its rows are being copied:
the higher the load, the fewer and larger the transactions, and the fewer rollup rows updated
per event. Each request is answered only after the commit that holds its events, so an
acknowledged event is durable."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import structlog

from ..observability import Metrics
from .events import DEFAULT_DEDUPE_HORIZON, ParsedBatch, Rejection, UsageEvent, parse_batch
from .fresh import FreshUsageListener, Pricing
from .store import (
    StagedEvents,
    StoredEvents,
    StoreResult,
    begin_store,
    copy_staged,
    finish_store,
    join_staged,
    joins,
    stage_events,
)

log = structlog.get_logger("token_meter.ingest")

MAX_ATTEMPTS = 5
DEFAULT_MAX_EVENTS_PER_TRANSACTION = 50_000
UNPRICED_MODELS_REMEMBERED = 1000
# After a transaction met duplicates, this many more go straight to the statement that skips
# known keys: replays come in runs (a plugin re-sending its backlog), and each would otherwise
# pay for a failed attempt first.
SKIP_KNOWN_AFTER_DUPLICATES = 16
# Consumers whose row is known to exist (consumers are never deleted), so ingest need not insert
# one for each of their batches; forgotten all at once past this many.
CONSUMERS_REMEMBERED = 100_000


# Collections of the youngest generation every 50,000 allocations instead of 700 (see
# tune_garbage_collection); the older generations as often as Python's defaults, relatively.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_garbage_collection() -> None:
    """For the collector process, once started: ingest allocates some thirty objects per event
    (a parsed event, its row, its tally) and frees every one by reference counting, since none
    is part of a cycle. Python's default collects the youngest generation every 700 allocations,
    which at 40,000 events/s is over a thousand useless collections a second, about a sixth of
    the collector's CPU (bench.ingest). Objects made at start (modules, settings) are frozen out
    of full collections."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


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


@dataclass(slots=True)
class _Group:
    """The requests of a writer's next transaction."""

    carried: list[_Pending] = field(default_factory=list)  # could not join the last one
    stopping: bool = False  # the writer's stop signal was taken
    requests: list[_Pending] = field(init=False)

    def __post_init__(self) -> None:
        self.requests, self.carried = self.carried, []


@dataclass(slots=True)
class _Pending:
    events: list[UsageEvent]
    staged: StagedEvents
    done: asyncio.Future[StoreResult] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class IngestService:
    def __init__(
        self,
        pool: asyncpg.Pool,
        metrics: Metrics,
        *,
        max_events: int,
        max_events_per_transaction: int = DEFAULT_MAX_EVENTS_PER_TRANSACTION,
        dedupe_horizon: timedelta = DEFAULT_DEDUPE_HORIZON,
        writers: int = 2,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.max_events = max_events
        self.max_events_per_transaction = max(max_events_per_transaction, max_events)
        # Told of each transaction's new usage before its commit: the seam where credits and
        # quotas (burn, blocklist) join the same commit, so usage and balances never disagree.
        self.listeners: list[FreshUsageListener] = []
        # The price book to cost each transaction's events with (reloadable, so asked once per
        # transaction; the listeners get that same book).
        self.pricing: Callable[[], Pricing] | None = None
        self._logged_unpriced: set[str] = set()
        self.writer_count = writers
        self.dedupe_horizon = dedupe_horizon
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()  # None: stop one writer
        self._writers: list[asyncio.Task[None]] = []
        self._skip_known_left = 0
        self._known_consumers: set[str] = set()

    def parse(self, body: bytes) -> ParsedBatch:
        return parse_batch(
            body, max_events=self.max_events, now=datetime.now(UTC), horizon=self.dedupe_horizon
        )

    async def start(self) -> None:
        self._writers = [
            asyncio.create_task(self._write_forever(), name=f"ingest-writer-{n}")
            for n in range(self.writer_count)
        ]

    async def stop(self) -> None:
        """Stores what is queued, then stops. aiohttp has finished its handlers by now."""
        for _ in self._writers:
            self._queue.put_nowait(None)
        for writer in self._writers:
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        self._writers = []

    async def ingest(self, batch: ParsedBatch) -> IngestOutcome:
        started = time.perf_counter()
        if batch.events:
            if not any(not w.done() for w in self._writers):
                raise RuntimeError("the ingest writers are not running")
            book = self.pricing() if self.pricing is not None else None
            pending = _Pending(batch.events, stage_events([batch.events], book))
            self._queue.put_nowait(pending)
            result = await pending.done
        else:
            result = StoreResult(0, 0)
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

    async def _write_forever(self) -> None:
        group = _Group()
        while True:
            if not group.requests:
                if group.stopping:
                    return
                first = await self._queue.get()
                if first is None:
                    return
                group.requests.append(first)
            self._take_waiting(group, joining=None)
            requests = group.requests
            try:
                results = await self._store(group)
            except asyncio.CancelledError:
                for p in requests:
                    p.done.cancel()
                raise
            except Exception as exc:  # the writer must outlive any failure
                log.exception(
                    "ingest_transaction_failed",
                    requests=len(requests),
                    events=sum(len(p.events) for p in requests),
                )
                for p in requests:
                    if not p.done.done():
                        p.done.set_exception(exc)
            else:
                self.metrics.transaction_requests.observe(len(requests))
                for p, result in zip(requests, results, strict=True):
                    if not p.done.done():  # the request may have been cancelled by its client
                        p.done.set_result(result)
            group = _Group(group.carried, group.stopping)

    def _take_waiting(self, group: _Group, joining: StagedEvents | None) -> list[_Pending]:
        """Move requests waiting now into `group`, up to the events a transaction holds; with
        `joining` (rows already copied), only while each can join them (else it is carried to the
        group's next transaction). Returns those taken."""
        taken: list[_Pending] = []
        count = sum(len(p.events) for p in group.requests)
        keys = set(joining.keys) if joining is not None else set()
        while not group.carried and not group.stopping and count < self.max_events_per_transaction:
            try:
                pending = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if pending is None:  # this writer stops after storing what it took
                group.stopping = True
                break
            if joining is not None:
                if not joins(keys, pending.staged, joining.book):
                    group.carried.append(pending)
                    break
                keys |= pending.staged.keys
            group.requests.append(pending)
            taken.append(pending)
            count += len(pending.events)
        return taken

    async def _store(self, group: _Group) -> list[StoreResult]:
        """Store the group's requests in one transaction, with those that arrive while its rows
        are copied (more, larger transactions when load is high, and none waiting for a later
        one that could have joined this)."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    book = self.pricing() if self.pricing is not None else None
                    requests = group.requests
                    staged = join_staged(
                        [p.staged for p in requests], [p.events for p in requests], book
                    )
                    await begin_store(conn)
                    await copy_staged(conn, staged)
                    while more := self._take_waiting(group, joining=staged):
                        part = join_staged([p.staged for p in more], [p.events for p in more], book)
                        await copy_staged(conn, part)
                        requests = group.requests
                        staged = join_staged([staged, part], [p.events for p in requests], book)
                    stored = await finish_store(
                        conn,
                        staged,
                        skip_known=self._skip_known_left > 0,
                        known_consumers=self._known_consumers,
                    )
                    for listener in self.listeners:
                        await listener.on_fresh_usage(conn, stored.fresh, book)
                self._note_duplicates(stored)
                self._note_consumers(stored.new_consumers)  # committed: their rows exist
                self._report_unpriced(stored)  # once committed, so a retry counts them once
                return stored.results
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                # Other collectors on the same database may touch the same rollup rows.
                if attempt == MAX_ATTEMPTS:
                    raise
                self.metrics.db_retries.inc()
                log.warning("ingest_transaction_retry", attempt=attempt)
                await asyncio.sleep(0.01 * attempt)
        raise AssertionError("unreachable")

    def _note_consumers(self, consumers: list[str]) -> None:
        if len(self._known_consumers) + len(consumers) > CONSUMERS_REMEMBERED:
            self._known_consumers.clear()
        self._known_consumers.update(consumers)

    def _note_duplicates(self, stored: StoredEvents) -> None:
        if stored.known:
            self._skip_known_left = SKIP_KNOWN_AFTER_DUPLICATES
        elif stored.skipped_known:
            self._skip_known_left = max(0, self._skip_known_left - 1)

    def _report_unpriced(self, stored: StoredEvents) -> None:
        count = stored.unpriced_events
        if not count:
            return
        self.metrics.unpriced_events.inc(count)
        new = [m for m in stored.unpriced_models if m not in self._logged_unpriced]
        if new and len(self._logged_unpriced) < UNPRICED_MODELS_REMEMBERED:  # names from outside
            self._logged_unpriced.update(new)
            log.warning(
                "unpriced_model",
                models=new,
                events=count,
                hint="add the model (or an alias) to the price book; these events cost 0",
            )
