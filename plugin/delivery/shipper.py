"""The shipper: one per collector URL and process, the request path's only door to delivery."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from .journal import collector_key
from .outbox import Outbox
from .report import log, logger
from .sender import Sender
from .settings import DeliverySettings

_encode = msgspec.json.Encoder().encode


class Shipper:
    """Journals events on the request path; its sender thread delivers them.

    The journal is ``<spool_dir>/<collector key>``: two collectors' events never share one.
    """

    def __init__(self, settings: DeliverySettings) -> None:
        self._settings = settings
        self.directory = Path(settings.spool_dir) / collector_key(settings.collector_url)
        self._outbox = Outbox(
            self.directory,
            max_entries=settings.max_entries,
            max_bytes=settings.spool_max_bytes,
            batch_size=settings.max_batch_size,
        )
        self._sender = Sender(self._outbox, lambda: self._settings)
        self._closed = False
        # The sender starts with the first event, or now when there is a backlog to replay (or
        # the journal could not be opened, which it retries).
        if not self._outbox.open() or self._outbox.has_backlog:
            self._sender.start()

    @property
    def settings(self) -> DeliverySettings:
        return self._settings

    def reconfigure(self, settings: DeliverySettings) -> None:
        """Take a config push: token, batching, retries, timeouts and bounds apply at once; the
        journal directory stays where it is until the process restarts."""
        if settings == self._settings:
            return
        if settings.spool_dir != self._settings.spool_dir:
            log(
                logging.WARNING,
                "spool_dir_change_deferred",
                using=self.directory,
                hint="a new spool_dir takes effect when the plugin server restarts",
            )
        with self._outbox.lock:
            self._outbox.max_entries = settings.max_entries
            self._outbox.max_bytes = settings.spool_max_bytes
            self._outbox.batch_size = settings.max_batch_size
            self._settings = settings

    def enqueue(self, event: Mapping[str, Any]) -> bool:
        """Journal one usage event for delivery: True once it is in the journal, or held in
        memory because the journal's disk refused it (journaled as soon as it takes writes
        again; see ``outbox``); False when it is lost (already counted and logged). Never
        raises; never waits on the network."""
        try:
            source = self._settings.source
            if source and "source" not in event:
                event = {**event, "source": source}
            payload = _encode(event)
        except Exception as exc:  # a bug upstream; an exception here could hang the server
            self._outbox.lose(1, f"unencodable event: {exc!r}")
            return False
        if not self._sender.started:
            self._sender.start()
        return self._outbox.append(payload)

    def lose(self, count: int, reason: str) -> None:
        """Count events the caller could not build, and log them at error level (rate-limited)."""
        self._outbox.lose(count, reason)

    def stats(self) -> dict[str, int]:
        """Counters since start (``held_total``: events ever held in memory), and gauges:
        events cached in memory, in flight, unacknowledged in the journal (``journal_events``,
        with its bytes and segments), held in memory because the disk refused them
        (``held_events``, ``held_bytes``: not in the journal yet), collector failing."""
        result = self._outbox.stats()
        result["collector_failing"] = int(self._sender.failing)
        return result

    def flush(self, timeout: float) -> bool:
        """Deliver what is pending now, without waiting for coalescing. True once everything
        enqueued before the call is acknowledged by the collector; False at the timeout."""
        self._sender.start()
        return self._sender.flush(timeout)

    def close(self, timeout: float) -> None:
        """Try to deliver within ``timeout`` seconds, then stop. What is not delivered stays in
        the journal, for the next process on this directory; events still held in memory (the
        disk refusing them to the end) get one last try at the journal, and are counted lost
        if it fails (the ``lost`` of the ``shipper_closed`` line)."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        if self._sender.started:
            self._sender.flush(timeout)
        self._sender.stop(max(0.1, deadline - time.monotonic()))
        self._outbox.close()
        log(logging.INFO, "shipper_closed", directory=self.directory, **self.stats())


# -- one shipper per collector and process ---------------------------------------------------------

_registry_lock = threading.Lock()
_shippers: dict[str, Shipper] = {}


def get_shipper(settings: DeliverySettings) -> Shipper:
    """The process's shipper for ``settings.collector_url``, created on first use; other
    settings (token, tunables) reconfigure it."""
    shipper = _shippers.get(settings.collector_url)  # the common case takes no lock
    if shipper is None:
        with _registry_lock:
            shipper = _shippers.get(settings.collector_url)
            if shipper is None:
                shipper = Shipper(settings)
                _shippers[settings.collector_url] = shipper
    if shipper.settings is not settings:
        shipper.reconfigure(settings)
    return shipper


def all_stats() -> dict[str, dict[str, int]]:
    """Every shipper's stats, by collector URL (the server's periodic `plugin_stats` line)."""
    with _registry_lock:
        shippers = dict(_shippers)
    return {url: shipper.stats() for url, shipper in shippers.items()}


def shutdown_all(timeout: float) -> None:
    """Close every shipper of the process within ``timeout`` in all (the server's SIGTERM)."""
    deadline = time.monotonic() + timeout
    with _registry_lock:
        shippers = list(_shippers.values())
        _shippers.clear()
    for shipper in shippers:
        try:
            shipper.close(max(0.0, deadline - time.monotonic()))
        except Exception:
            logger.exception("shipper_close_failed")
