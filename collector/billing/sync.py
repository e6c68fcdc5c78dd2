"""The Stripe sync: one leader across collectors turns new usage into deltas and sends them.

Leadership is a PostgreSQL session advisory lock held on one pooled connection: when that
collector dies its session ends, the lock is released and the next collector trying takes over
within `LEADER_RETRY` seconds. Every cycle (each `sync_interval`, default 60 s):

1. on the first cycle of a database, mark every rollup window for a look (usage from before
   Stripe was enabled); the ingest transactions mark the windows they add to;
2. derive: the marked windows' new usage becomes immutable deltas (`store.derive`);
3. check the meters at Stripe every `METER_CHECK_INTERVAL`: a missing or inactive meter is
   logged, shown in the status and not sent to; then fetch and apply the error reports the
   webhook endpoint queued (`error_reports.py`);
4. send what is due through the transport (`transport.py`: one event a call to v1, or up to
   100 a call on the v2 stream, `stream.py`): per customer and meter one call at a time, in
   window order, all of them within Stripe's rate (25 calls/s in test mode, 1,000 live). A
   retryable failure backs the call's rows off exponentially (and stops their customers and
   meters for the cycle, to keep the order); a duplicate answer counts as delivered; a
   rejection is logged with Stripe's code and retried slowly, since only the operator can fix
   it (a missing customer, an inactive meter).

A row is marked sent only after Stripe answered: a crash between the two sends the same
identifier again, which Stripe answers as a duplicate (it keeps identifiers at least 24 hours;
the stream drops a known one silently). What Stripe drops later, after validating it
asynchronously, comes back through its error reports (`error_reports.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg
import stripe
import structlog
from aiolimiter import AsyncLimiter

from ..observability import Metrics
from . import error_reports, store
from .meters import Meter
from .settings import StripeSettings
from .stream import StreamTransport
from .stripe_api import (
    Outcome,
    StripeApi,
    StripeFailure,
    StripeMeter,
    classify,
    meters_by_event_name,
)
from .transport import Transport, V1Transport

log = structlog.get_logger("token_meter.billing")

# Collectors sharing a database take turns leading the sync; any fixed 64-bit number.
LEADER_LOCK_ID: Final = 0x746D2D7374726970  # "tm-strip"
LEADER_RETRY: Final = 5.0
METER_CHECK_INTERVAL: Final = 600.0
DERIVE_BATCH: Final = 5000
SEND_BATCH: Final = 2000
# Stripe takes timestamps within the past 35 days; an hour less, so a row is never sent just
# as it expires, and none from the future (a gateway clock ahead of ours).
STRIPE_MAX_AGE: Final = timedelta(days=35) - timedelta(hours=1)
MAX_CONCURRENT: Final = 32
RETRY_BASE: Final = 1.0
RETRY_CAP: Final = 300.0
REJECTED_RETRY: Final = timedelta(minutes=15)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def backoff(attempts: int) -> timedelta:
    """Capped exponential backoff with full jitter."""
    ceiling = min(RETRY_CAP, RETRY_BASE * 2 ** min(attempts, 20))
    return timedelta(seconds=random.uniform(0, ceiling))


class StripeSync:
    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: StripeSettings,
        metrics: Metrics,
        *,
        api: StripeApi | None = None,
        clock: Clock = utc_now,
        name: str | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.api = api or StripeApi(
            settings.api_key.value, api_base=settings.api_base, timeout=settings.timeout
        )
        self.clock = clock
        self.name = name or f"{socket.gethostname()}:{id(self):x}"
        # One call per 1/rate seconds, never a burst: Stripe counts calls in fixed one-second
        # windows, and a bucket that lets `rate` calls burst would put up to twice the rate into
        # one window.
        self.limiter = AsyncLimiter(1, 1 / settings.max_rate(self.api.test_mode))
        transport = StreamTransport if settings.transport == "meter_event_stream" else V1Transport
        self.transport: Transport = transport(self.api, self.limiter, metrics)
        self.meters: dict[str, StripeMeter] = {}
        self._meters_checked = -float("inf")
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.is_leader = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stripe-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.api.close()

    def wake(self) -> None:
        """Run the next cycle now (tests, and an admin asking for a sync)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                async with self.pool.acquire() as conn:
                    if await conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK_ID):
                        try:
                            await self._lead(conn)
                        finally:
                            self.is_leader = False
                            with contextlib.suppress(Exception):
                                await conn.execute("SELECT pg_advisory_unlock($1)", LEADER_LOCK_ID)
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("stripe_sync_database_error", error=str(exc))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("stripe_sync_failed")
            await asyncio.sleep(LEADER_RETRY)

    async def _lead(self, conn: asyncpg.Connection) -> None:
        self.is_leader = True
        log.info("stripe_sync_leader", collector=self.name)
        marked = await store.initialize(conn)
        if marked:
            log.info("stripe_sync_initialized", windows=marked)
        while True:
            await self.cycle(conn)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.sync_interval)
            self._wake.clear()

    async def cycle(self, conn: asyncpg.Connection) -> None:
        """One round: derive, check meters when due, send what is due."""
        started = time.perf_counter()
        deltas = 0
        while (result := await store.derive(conn, self.settings.meters, DERIVE_BATCH)) is not None:
            deltas += len(result.deltas)
            for key in result.shrunk:
                log.error("stripe_window_shrunk", consumer=key[0], meter=key[1], window=key[2])
        if deltas:
            self.metrics.stripe_deltas.inc(deltas)
        await self._check_meters(conn)
        # Stripe's error reports the webhook queued: rows it dropped go back to pending.
        await error_reports.apply_queued(conn, self.api, self.limiter, self.metrics)
        now = self.clock()
        unbillable = await store.prepare_sending(conn, now - STRIPE_MAX_AGE)
        if unbillable:
            self.metrics.stripe_unbillable.inc(unbillable)
            log.warning("stripe_usage_unbillable", rows=unbillable, max_age_days=35)
        sendable = [name for name, meter in self.meters.items() if meter.active]
        sent = 0
        if sendable:
            while rows := await store.pending(conn, sendable, now, SEND_BATCH):
                done, stop = await self._send(rows)
                sent += done
                if stop or len(rows) < SEND_BATCH:
                    break
        await store.record_cycle(conn, self.name)
        (log.info if deltas or sent else log.debug)(
            "stripe_sync_cycle",
            deltas=deltas,
            sent=sent,
            seconds=round(time.perf_counter() - started, 3),
        )

    async def _check_meters(self, conn: asyncpg.Connection) -> None:
        if time.monotonic() - self._meters_checked < METER_CHECK_INTERVAL and self.meters:
            return
        try:
            at_stripe = meters_by_event_name(await self.api.list_meters())
        except stripe.StripeError as exc:
            code = classify(exc).code
            log.warning("stripe_meters_unavailable", code=code, error=str(exc))
            await store.record_error(conn, None, code, f"listing meters: {exc}")
            return
        self._meters_checked = time.monotonic()
        found: list[tuple[Meter, StripeMeter | None]] = []
        self.meters = {}
        for meter in self.settings.meters:
            stripe_meter = at_stripe.get(meter.event_name)
            found.append((meter, stripe_meter))
            if stripe_meter is None or not stripe_meter.active:
                state = "missing" if stripe_meter is None else "inactive"
                problem = f"meter_{state}"
                log.error("stripe_meter_unusable", meter=meter.event_name, problem=problem)
                await store.record_error(
                    conn,
                    meter.event_name,
                    problem,
                    f"meter {meter.event_name!r} is {state} at Stripe: run "
                    "`token-meter-admin stripe setup`; its usage waits",
                )
            if stripe_meter is not None:
                self.meters[meter.event_name] = stripe_meter
        await store.record_meters(conn, found)

    async def _send(self, rows: Sequence[store.PendingRow]) -> tuple[int, bool]:
        """Send rows in calls of up to the transport's batch size; (rows delivered, stop).

        Rows form lanes, one per customer and meter, in window order. Each worker holds the
        lanes it started until their rows are all sent, so no two calls in flight carry rows of
        one customer and meter (Stripe allows one concurrent call per customer and meter, and
        a batch of the stream mixes lanes); a failed call ends its lanes for this cycle, their
        later rows waiting behind the failed ones."""
        waiting: deque[Lane] = deque(lanes(rows))
        delivered = 0
        stop = False

        async def worker() -> None:
            nonlocal delivered, stop
            held: dict[LaneKey, deque[store.PendingRow]] = {}
            while not stop and (batch := fill_batch(held, waiting, self.transport.batch_size)):
                outcome = await self._deliver(batch)
                if outcome is None:
                    delivered += len(batch)
                    continue
                if outcome is Outcome.UNAUTHORIZED:
                    stop = True
                for row in batch:
                    held.pop((row.customer, row.event_name), None)

        await asyncio.gather(*(worker() for _ in range(MAX_CONCURRENT)))
        return delivered, stop

    async def _deliver(self, batch: Sequence[store.PendingRow]) -> Outcome | None:
        """One call; None when Stripe took the rows (or had them), else the failure's outcome."""
        result = await self.transport.send(batch)
        if not isinstance(result, StripeFailure):
            await store.mark_rows_sent(self.pool, batch, result)
            for row in batch:
                self.metrics.stripe_sent.labels(row.event_name).inc(row.value)
            return None
        failure = result
        if failure.outcome is Outcome.REJECTED:
            delay = REJECTED_RETRY
        else:
            delay = backoff(max(row.attempts for row in batch))
        await store.mark_rows_retry(self.pool, batch, f"{failure.code}: {failure.message}", delay)
        meters = sorted({row.event_name for row in batch})
        where = {
            "meter": ",".join(meters),
            "customer": batch[0].customer if len(batch) == 1 else None,
            "rows": len(batch),
        }
        if failure.outcome is not Outcome.RETRY:
            log.error(
                "stripe_meter_event_refused",
                **where,
                code=failure.code,
                status=failure.status,
                message=failure.message,
            )
            for meter in meters:
                await store.record_error(self.pool, meter, failure.code, failure.message)
        else:
            log.warning(
                "stripe_meter_event_retry",
                **where,
                code=failure.code,
                status=failure.status,
                attempts=max(row.attempts for row in batch) + 1,
            )
        return failure.outcome


LaneKey = tuple[str, str]  # Stripe customer, meter event name
Lane = tuple[LaneKey, deque[store.PendingRow]]


def lanes(rows: Sequence[store.PendingRow]) -> list[Lane]:
    """Rows per customer and meter, each lane in the rows' order, lanes by their first row."""
    grouped: dict[LaneKey, deque[store.PendingRow]] = {}
    for row in rows:
        grouped.setdefault((row.customer, row.event_name), deque()).append(row)
    return list(grouped.items())


def fill_batch(
    held: dict[LaneKey, deque[store.PendingRow]], waiting: deque[Lane], size: int
) -> list[store.PendingRow]:
    """The next call's rows: from the lanes this worker holds first, then lanes it takes from
    `waiting` (held until done); a lane whose rows are all taken is let go."""
    batch: list[store.PendingRow] = []
    keys = iter(list(held))
    while len(batch) < size:
        key = next(keys, None)
        if key is None:
            if not waiting:
                break
            key, rows = waiting.popleft()
            held[key] = rows
        rows = held[key]
        while rows and len(batch) < size:
            batch.append(rows.popleft())
        if not rows:
            del held[key]
    return batch
