"""The account service: admin updates and credit grants, the burn that runs inside every ingest
transaction (it is ingest's FreshUsageListener), and the sweep that re-evaluates every governed
consumer (a new month lifts quota blocks; the sweep also heals whatever a missed evaluation
could leave behind).

Every change re-evaluates the consumers it touches in its own transaction, under their row
locks, and writes the blocklist only where the state changes: no version bump on a no-op."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog

from ..blocklist import store as blocklist
from ..blocklist.store import Block, Unblock
from ..ingest.fresh import FreshUsage, Pricing
from ..observability import Metrics
from ..usage.store import month_bounds
from . import store
from .model import Account, AccountUpdate, CreditGrant, GrantConflict
from .rules import ACCOUNT_REASONS, NANOS_PER_MICRO, is_low_balance, micros_down, wanted_blocks

log = structlog.get_logger("token_meter.accounts")

Clock = Callable[[], datetime]
SWEEP_INTERVAL = 30.0
SWEEP_BATCH = 1000
# Collectors sharing a database take turns sweeping; any fixed 64-bit number.
SWEEP_LOCK_ID = 0x746D2D7377656570  # "tm-sweep"


def utc_now() -> datetime:
    return datetime.now(UTC)


def log_grant(grant: CreditGrant, source: str) -> None:
    """The log line of a new grant, once its transaction has committed."""
    log.info(
        "credit_granted",
        consumer=grant.consumer,
        amount_micros=micros_down(grant.amount_nanos),
        balance_micros=micros_down(grant.balance_after_nanos),
        idempotency_key=grant.idempotency_key,
        source=source,
    )


class AccountService:
    def __init__(
        self,
        pool: asyncpg.Pool,
        metrics: Metrics,
        *,
        clock: Clock = utc_now,
        sweep_interval: float = SWEEP_INTERVAL,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.clock = clock  # injectable: tests move it to the next month
        self.sweep_interval = sweep_interval
        self._task: asyncio.Task[None] | None = None

    # -- admin ----------------------------------------------------------------------------

    async def update_account(self, consumer: str, update: AccountUpdate) -> tuple[Account, bool]:
        """Apply the given fields; (account, created)."""
        async with self.pool.acquire() as conn, conn.transaction():
            account, created = await self.apply_changes(conn, consumer, update.changes())
        log.info("account_updated", consumer=consumer, created=created, **update.changes())
        return account, created

    async def apply_changes(
        self, conn: asyncpg.Connection, consumer: str, changes: Mapping[str, Any]
    ) -> tuple[Account, bool]:
        """`update_account` inside the caller's transaction (Stripe webhooks apply a plan and
        quota with the record of their event): `changes` maps ACCOUNT_FIELDS names to values
        (None clears a field). (account, created); nothing is logged."""
        created = await store.lock_consumer(conn, consumer)
        await store.update_account(conn, consumer, dict(changes))
        await self.enforce(conn, [consumer])
        account = await store.read_account(conn, consumer)
        assert account is not None
        return account, created

    async def grant(
        self, consumer: str, amount_micros: int, key: str, *, source: str = "admin"
    ) -> CreditGrant:
        """Grant prepaid credit once per (consumer, key). The same key again returns the first
        grant; with another amount it raises GrantConflict and changes nothing."""
        async with self.pool.acquire() as conn, conn.transaction():
            grant = await self.apply_grant(conn, consumer, amount_micros, key, source=source)
        if not grant.replayed:
            log_grant(grant, source)
        return grant

    async def apply_grant(
        self,
        conn: asyncpg.Connection,
        consumer: str,
        amount_micros: int,
        key: str,
        *,
        source: str = "admin",
    ) -> CreditGrant:
        """`grant` inside the caller's transaction; nothing is logged (see `log_grant`).
        GrantConflict is raised before any grant is written, so the caller's transaction may go
        on (a consumer row this created stays unless it rolls back)."""
        amount_nanos = amount_micros * NANOS_PER_MICRO
        # The consumer's lock serializes grants with the same key, and with burns.
        await store.lock_consumer(conn, consumer)
        first = await store.find_grant(conn, consumer, key)
        if first is not None:
            if first.amount_nanos != amount_nanos:
                raise GrantConflict(first)
            return first
        grant = await store.record_grant(conn, consumer, amount_nanos, key, source)
        await self.enforce(conn, [consumer])
        return grant

    async def account(self, consumer: str) -> Account | None:
        async with self.pool.acquire() as conn:
            return await store.read_account(conn, consumer)

    # -- ingest ---------------------------------------------------------------------------

    async def on_fresh_usage(
        self, conn: asyncpg.Connection, fresh: Sequence[FreshUsage], book: Pricing | None
    ) -> None:
        """Inside the ingest transaction, after its events are stored: burn the new events'
        cost from prepaid balances and re-evaluate the consumers with a rule to apply. The
        ledger names `book`, the book that priced the events, whatever is loaded by now."""
        if not fresh:
            return
        prepaid = await store.lock_governed(conn, [f.consumer for f in fresh])
        if not prepaid:
            return  # post-paid consumers without a quota: no rule applies
        burns = [f for f in fresh if prepaid.get(f.consumer) and f.cost_nanos > 0]
        if burns:
            await store.burn(conn, burns, book.version if book is not None else None)
            self.metrics.credit_burned_nanos.inc(sum(b.cost_nanos for b in burns))
        await self.enforce(conn, list(prepaid))

    # -- the rules ------------------------------------------------------------------------

    async def enforce(self, conn: asyncpg.Connection, consumers: Sequence[str]) -> int:
        """Lock and re-evaluate `consumers`; write the blocklist where it must change.
        Returns the number of blocklist rows written."""
        now = self.clock()
        month, period_end = month_bounds(now)
        states = await store.read_states(conn, consumers, month)
        to_block: list[Block] = []
        to_unblock: list[Unblock] = []
        low_flags: list[tuple[str, bool]] = []
        for state in states:
            wanted = wanted_blocks(state, period_end)
            to_block.extend(
                (state.consumer, r, d) for r, d in wanted.items() if r not in state.blocked
            )
            # Only the rules' own reasons are lifted: payment_overdue belongs to billing.
            owned = state.blocked & ACCOUNT_REASONS
            to_unblock.extend((state.consumer, r) for r in sorted(owned - wanted.keys()))
            low = is_low_balance(state)
            if low != state.low_balance_flag and state.balance_nanos is not None:
                low_flags.append((state.consumer, low))
                if low:
                    self.metrics.low_balance_crossings.inc()
                    log.warning(
                        "low_balance",
                        consumer=state.consumer,
                        balance_micros=micros_down(state.balance_nanos),
                        low_balance_micros=state.low_balance_micros,
                    )
                else:
                    log.info("low_balance_cleared", consumer=state.consumer)
        await blocklist.unblock(conn, to_unblock)
        await blocklist.block(conn, to_block)
        await store.set_low_balance(conn, low_flags)
        for consumer, reason, detail in to_block:
            self.metrics.blocklist_transitions.labels(reason, "blocked").inc()
            log.info("consumer_blocked", consumer=consumer, reason=reason, **detail)
        for consumer, lifted in to_unblock:
            self.metrics.blocklist_transitions.labels(lifted, "unblocked").inc()
            log.info("consumer_unblocked", consumer=consumer, reason=lifted)
        return len(to_block) + len(to_unblock)

    async def sweep(self, *, wait_for_lock: bool = False) -> int:
        """Re-evaluate every governed consumer at the clock's time, in batches of their own
        transactions; one collector at a time (others skip, or wait with `wait_for_lock`).
        Returns the blocklist rows written."""
        changed = 0
        async with self.pool.acquire() as conn:
            if wait_for_lock:
                await conn.execute("SELECT pg_advisory_lock($1)", SWEEP_LOCK_ID)
            elif not await conn.fetchval("SELECT pg_try_advisory_lock($1)", SWEEP_LOCK_ID):
                return 0  # another collector is sweeping
            try:
                consumers = await store.governed_consumers(conn)
                for i in range(0, len(consumers), SWEEP_BATCH):
                    async with conn.transaction():
                        changed += await self.enforce(conn, consumers[i : i + SWEEP_BATCH])
                self.metrics.consumers_low_balance.set(await store.count_low_balance(conn))
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", SWEEP_LOCK_ID)
        if changed:
            log.info("sweep_changed_blocklist", rows=changed, consumers=len(consumers))
        return changed

    def seconds_to_next_sweep(self) -> float:
        """The sweep interval, or less so a sweep runs just after the month turns."""
        now = self.clock()
        _, month_end = month_bounds(now)
        until_rollover = (month_end - now + timedelta(milliseconds=50)).total_seconds()
        return max(0.0, min(self.sweep_interval, until_rollover))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._sweep_forever(), name="account-sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweep_failed")
            await asyncio.sleep(self.seconds_to_next_sweep())
