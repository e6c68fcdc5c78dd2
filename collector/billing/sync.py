"""The Stripe sync: one leader across collectors turns new usage into deltas and sends them.

Leadership is a PostgreSQL session advisory lock held on one pooled connection: when that
collector dies its session ends, the lock is released and the next collector trying takes over
within `LEADER_RETRY` seconds. Every cycle (each `sync_interval`, default 60 s):

1. on the first cycle of a database, mark every rollup window for a look (usage from before
   Stripe was enabled); the ingest transactions mark the windows they add to;
2. derive: the marked windows' new usage becomes immutable deltas (`store.derive`);
3. check the meters at Stripe every `METER_CHECK_INTERVAL`: a missing or inactive meter is
   logged, shown in the status and not sent to;
4. send what is due: per customer and meter one call at a time, in window order, all of them
   within Stripe's rate (25 calls/s in test mode, 1,000 live). A retryable failure backs the row
   off exponentially (and stops that customer and meter for the cycle, to keep the order); a
   duplicate answer counts as delivered; a rejection is logged with Stripe's code and retried
   slowly, since only the operator can fix it (a missing customer, an inactive meter).

A row is marked sent only after Stripe answered: a crash between the two sends the same
identifier again, which Stripe answers as a duplicate (it keeps identifiers at least 24 hours).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg
import stripe
import structlog
from aiolimiter import AsyncLimiter

from ..observability import Metrics
from . import store
from .meters import Meter
from .settings import StripeSettings
from .stripe_api import (
    Outcome,
    StripeApi,
    StripeFailure,
    StripeMeter,
    classify,
    meters_by_event_name,
)

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
        """Send rows, one call at a time per customer and meter; (rows delivered, stop)."""
        lanes: dict[tuple[str, str], list[store.PendingRow]] = defaultdict(list)
        for row in rows:
            lanes[(row.customer, row.event_name)].append(row)
        gate = asyncio.Semaphore(MAX_CONCURRENT)
        delivered = 0
        stop = False

        async def lane(items: list[store.PendingRow]) -> None:
            nonlocal delivered, stop
            async with gate:
                for row in items:
                    if stop:
                        return
                    outcome = await self._send_one(row)
                    if outcome is None or outcome is Outcome.DUPLICATE:
                        delivered += 1
                        continue
                    if outcome is Outcome.UNAUTHORIZED:
                        stop = True
                    return  # keep the lane's order: the rest waits for this row

        await asyncio.gather(*(lane(items) for items in lanes.values()))
        return delivered, stop

    async def _send_one(self, row: store.PendingRow) -> Outcome | None:
        """One meter event; None when Stripe took it, else the failure's outcome."""
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
        self.metrics.stripe_calls.labels(
            "meter_events", failure.outcome.value if failure else "ok"
        ).inc()
        if failure is None or failure.outcome is Outcome.DUPLICATE:
            await store.mark_sent(self.pool, row, "created" if failure is None else "duplicate")
            self.metrics.stripe_sent.labels(row.event_name).inc(row.value)
            return None if failure is None else Outcome.DUPLICATE
        delay = REJECTED_RETRY if failure.outcome is Outcome.REJECTED else backoff(row.attempts)
        await store.mark_retry(self.pool, row, f"{failure.code}: {failure.message}", delay)
        if failure.outcome is not Outcome.RETRY:
            log.error(
                "stripe_meter_event_refused",
                meter=row.event_name,
                customer=row.customer,
                code=failure.code,
                status=failure.status,
                message=failure.message,
            )
            await store.record_error(self.pool, row.event_name, failure.code, failure.message)
        else:
            log.warning(
                "stripe_meter_event_retry",
                meter=row.event_name,
                code=failure.code,
                status=failure.status,
                attempts=row.attempts + 1,
            )
        return failure.outcome
