"""The price book in use: loaded at start (a bad file stops the start), reloaded without a
restart on SIGHUP or when the file changes (checked every few seconds); a bad new file is
logged and counted, and the book in use stays."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import structlog

from ..observability import Metrics
from .book import PriceBook, PriceBookError, default_price_book, load_price_book

log = structlog.get_logger("token_meter.pricing")

CHECK_INTERVAL = 2.0


class PriceBookSource:
    def __init__(
        self, path: Path | None, metrics: Metrics, *, check_interval: float = CHECK_INTERVAL
    ) -> None:
        self.path = path
        self.metrics = metrics
        self.check_interval = check_interval
        self._stamp = self._file_stamp()
        self._book = load_price_book(path) if path is not None else default_price_book()
        self._publish(self._book)
        self._task: asyncio.Task[None] | None = None
        self._sighup = False

    @property
    def book(self) -> PriceBook:
        return self._book

    def current(self) -> PriceBook:
        """The book to price the next transaction with (a reload swaps it whole)."""
        return self._book

    def reload(self) -> bool:
        """Read the file again; True when a new book is in use."""
        if self.path is None:
            return False
        self._stamp = self._file_stamp()
        try:
            book = load_price_book(self.path)
        except PriceBookError as exc:
            self.metrics.price_book_reloads.labels("failed").inc()
            log.error(
                "price_book_reload_failed",
                path=str(self.path),
                problems=exc.problems,
                kept_version=self._book.version,
            )
            return False
        previous = self._book.version
        self._book = book
        self._publish(book)
        self.metrics.price_book_reloads.labels("loaded").inc()
        log.info(
            "price_book_reloaded", path=str(self.path), version=book.version, previous=previous
        )
        return True

    def _publish(self, book: PriceBook) -> None:
        self.metrics.price_book_info.clear()
        self.metrics.price_book_info.labels(book.version, book.currency).set(1)
        log.info(
            "price_book_loaded",
            origin=book.origin,
            version=book.version,
            models=len(book.models),
            unknown_model=book.unknown_model,
        )

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def start(self) -> None:
        if self.path is None:
            return
        self._task = asyncio.create_task(self._watch_forever(), name="price-book-watch")
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            # Only the main thread of a process may own signals; embedded apps do without.
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._sighup = True

    async def stop(self) -> None:
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _on_sighup(self) -> None:
        log.info("price_book_sighup", path=str(self.path))
        self.reload()

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                stamp = await asyncio.to_thread(self._file_stamp)
                if stamp is not None and stamp != self._stamp:
                    self.reload()
            except Exception:
                log.exception("price_book_watch_failed")
