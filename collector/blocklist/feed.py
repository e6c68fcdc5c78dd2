"""Every collector keeps the current blocklist snapshot in memory and LISTENs for changes, so a
change committed through any collector reaches the long polls of all of them at once."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import structlog

from ..observability import Metrics
from .store import CHANNEL, BlocklistSnapshot, read_snapshot

log = structlog.get_logger("token_meter.blocklist")

# A notification can be missed while the listening connection is being re-established; a slow
# periodic re-read bounds how long such a miss can last.
RESYNC_INTERVAL = 30.0
RECONNECT_DELAY = 1.0


class BlocklistFeed:
    def __init__(self, pool: asyncpg.Pool, metrics: Metrics) -> None:
        self.pool = pool
        self.metrics = metrics
        self._snapshot: BlocklistSnapshot | None = None
        self._changed = asyncio.Condition()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def snapshot(self) -> BlocklistSnapshot:
        assert self._snapshot is not None, "start() the feed first"
        return self._snapshot

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._listen_forever(), name="blocklist-listener")

    async def release_waiters(self) -> None:
        """Answer every waiting long poll now (with the current version): a shutting-down
        collector must not hold its graceful-shutdown time on requests that only wait."""
        self._closing = True
        async with self._changed:
            self._changed.notify_all()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        async with self._changed:
            self._changed.notify_all()

    async def refresh(self) -> None:
        async with self.pool.acquire() as conn:
            snapshot = await read_snapshot(conn)
        await self._publish(snapshot)

    async def _publish(self, snapshot: BlocklistSnapshot) -> None:
        current = self._snapshot
        # Refreshes can finish out of order; never go back to an older version.
        if current is not None and snapshot.version <= current.version:
            return
        self._snapshot = snapshot
        self.metrics.blocklist_version.set(snapshot.version)
        self.metrics.blocklist_entries.set(len(snapshot.entries))
        async with self._changed:
            self._changed.notify_all()
        if current is not None:
            log.info("blocklist_changed", version=snapshot.version, entries=len(snapshot.entries))

    async def wait_for_change(self, known_version: int, wait: float) -> BlocklistSnapshot:
        """The snapshot as soon as its version is newer than `known_version`, or the current one
        when `wait` seconds pass."""
        if self.snapshot.version > known_version or self._closing:
            return self.snapshot
        if known_version > self.snapshot.version:
            # The client saw a newer version through another collector: our notification may be
            # on its way; read now rather than answer with an older list.
            await self.refresh()
        self.metrics.blocklist_waiters.inc()
        try:
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._changed.wait_for(
                            lambda: self.snapshot.version > known_version or self._closing
                        ),
                        wait,
                    )
        finally:
            self.metrics.blocklist_waiters.dec()
        return self.snapshot

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def _listen_forever(self) -> None:
        while True:
            try:
                await self._listen_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("blocklist_listener_failed")
                await asyncio.sleep(RECONNECT_DELAY)

    async def _listen_once(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.add_listener(CHANNEL, self._on_notify)
            try:
                await self.refresh()  # catch up on whatever changed before we listened
                while True:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), RESYNC_INTERVAL)
                    self._wake.clear()
                    await self.refresh()
            finally:
                # A connection the server closed is already detached: nothing to remove then.
                with contextlib.suppress(asyncpg.InterfaceError, OSError):
                    await conn.remove_listener(CHANNEL, self._on_notify)
