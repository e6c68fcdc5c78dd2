"""A crash-safe on-disk spool of event batches, the plugin's second buffer after memory.

Each batch is one file holding the gzip'd JSON array exactly as it is POSTed to the collector's
``/v1/events``. A file is written to a temporary name, fsync'd, renamed into place and the
directory fsync'd, so a batch either exists whole or not at all, whatever the crash. A batch file
is deleted only after the collector acknowledged it (see ``shipping``), so usage survives a
collector outage, a plugin-server crash and a host reboot (when the directory is on a persistent
disk; the default under ``$TMPDIR`` may be a tmpfs).

File names order batches by time, then writer pid, then a sequence number, so replay is oldest
first; the event count is part of the name, so the spool's size in events is known without
reading any file::

    00001732725060123456789-0004242-000000017-n1000.json.gz

One process per directory. The directory is locked with ``flock`` on ``.lock``. A second process
(a restarted plugin server overlapping the old one while it drains, or a forked child) does not
wait for it: waiting would stall the plugin server's start, so it takes the first free sibling
directory ``<dir>.1`` ... ``<dir>.N`` instead. Whoever opens a spool also adopts the batches of
sibling directories whose owner is gone (their lock is free): a spool left by a crashed process,
in any sibling, is replayed by the next process that starts.

The spool is bounded by ``max_bytes``: past it, ``write`` refuses new batches and logs at error
level; the caller counts those events as lost.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Spool", "SpoolBusyError", "SpooledBatch"]

logger = logging.getLogger("token_meter_plugin")

_BATCH_NAME = re.compile(r"^(\d{23})-(\d{7})-(\d{9})-n(\d+)\.json\.gz$")
_TMP_PREFIX = ".tmp-"
_LOCK_NAME = ".lock"
_CORRUPT_SUFFIX = ".corrupt"
MAX_SIBLINGS = 8
_FULL_LOG_INTERVAL = 10.0


class SpoolBusyError(OSError):
    """Every candidate directory is locked by another live process."""


@dataclass(frozen=True, slots=True)
class SpooledBatch:
    """One batch file: its path, how many events it holds and its size on disk."""

    path: Path
    count: int
    size: int


def _log(level: int, event: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        detail = " ".join(f"{key}={value}" for key, value in fields.items())
        logger.log(level, "%s %s", event, detail, extra={"token_meter": {"event": event, **fields}})


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _try_lock(directory: Path) -> int | None:
    """Lock ``directory`` for this process; the open descriptor holds the lock, or None if busy."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _candidates(base: Path) -> list[Path]:
    return [base] + [base.with_name(f"{base.name}.{i}") for i in range(1, MAX_SIBLINGS + 1)]


class Spool:
    """Batch files in one locked directory, oldest first. Thread-safe."""

    def __init__(self, directory: Path, lock_fd: int, max_bytes: int) -> None:
        """Use ``Spool.open``; this takes over an already locked directory."""
        self.directory = directory
        self.max_bytes = max_bytes
        self._lock_fd: int | None = lock_fd
        self._mutex = threading.Lock()
        self._batches: collections.deque[SpooledBatch] = collections.deque()
        self._bytes = 0
        self._events = 0
        self._seq = 0
        self._last_ns = 0
        self._refusing = False
        self._refused_unlogged = 0
        self._refused_logged_at = -_FULL_LOG_INTERVAL
        self._scan()

    @classmethod
    def open(cls, base: Path, max_bytes: int) -> Spool:
        """Lock ``base`` (or the first free sibling), adopt orphaned siblings, index the batches."""
        for directory in _candidates(base):
            fd = _try_lock(directory)
            if fd is None:
                continue
            if directory != base:
                _log(logging.WARNING, "spool_dir_busy", wanted=base, using=directory)
            try:
                spool = cls(directory, fd, max_bytes)
                spool._adopt_orphans(base)
            except BaseException:
                os.close(fd)
                raise
            return spool
        raise SpoolBusyError(f"spool directory {base} and its {MAX_SIBLINGS} siblings are locked")

    # -- bookkeeping ------------------------------------------------------------------------

    def _scan(self) -> None:
        found: list[tuple[str, SpooledBatch]] = []
        for entry in self.directory.iterdir():
            name = entry.name
            if name.startswith(_TMP_PREFIX):
                # A write that never reached its rename: its events were still in the memory of
                # a process that is gone (we hold the lock), so the file is not a batch.
                entry.unlink(missing_ok=True)
                continue
            match = _BATCH_NAME.match(name)
            if match is None:
                continue
            found.append((name, SpooledBatch(entry, int(match.group(4)), entry.stat().st_size)))
        found.sort(key=lambda item: item[0])
        with self._mutex:
            for _, batch in found:
                self._batches.append(batch)
                self._bytes += batch.size
                self._events += batch.count
        if found:
            _log(
                logging.INFO,
                "spool_found",
                directory=self.directory,
                batches=len(found),
                events=self._events,
                bytes=self._bytes,
            )

    def _adopt_orphans(self, base: Path) -> None:
        """Move the batches of sibling directories nobody holds into this one."""
        adopted = 0
        for directory in _candidates(base):
            if directory == self.directory or not directory.is_dir():
                continue
            fd = _try_lock(directory)
            if fd is None:
                continue  # a live process owns it and replays it itself
            try:
                for entry in directory.iterdir():
                    if _BATCH_NAME.match(entry.name):
                        # Same parent directory, so the same filesystem: rename is atomic.
                        entry.rename(self.directory / entry.name)
                        adopted += 1
            finally:
                os.close(fd)
        if adopted:
            _fsync_dir(self.directory)
            with self._mutex:
                self._batches.clear()
                self._bytes = self._events = 0
            self._scan()
            _log(logging.INFO, "spool_adopted", directory=self.directory, batches=adopted)

    # -- the spool's interface --------------------------------------------------------------

    def write(self, body: bytes, count: int) -> SpooledBatch | None:
        """Store one batch durably; None when the bound refuses it or the disk fails."""
        with self._mutex:
            if self._lock_fd is None:
                _log(logging.ERROR, "spool_closed_write", events=count)
                return None
            if self._bytes + len(body) > self.max_bytes:
                self._refusing = True
                # One line per interval, not per batch: an overflow may refuse hundreds at once.
                self._refused_unlogged += count
                now = time.monotonic()
                if now - self._refused_logged_at >= _FULL_LOG_INTERVAL:
                    _log(
                        logging.ERROR,
                        "spool_full",
                        directory=self.directory,
                        max_bytes=self.max_bytes,
                        bytes=self._bytes,
                        refused_events=self._refused_unlogged,
                    )
                    self._refused_unlogged = 0
                    self._refused_logged_at = now
                return None
            # Names must sort in write order even if the clock steps back.
            now = max(time.time_ns(), self._last_ns + 1)
            self._last_ns = now
            self._seq += 1
            name = f"{now:023d}-{os.getpid():07d}-{self._seq % 10**9:09d}-n{count}.json.gz"
            # Reserve the space now so concurrent writers cannot overshoot the bound.
            self._bytes += len(body)
        final = self.directory / name
        tmp = self.directory / f"{_TMP_PREFIX}{name}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(body)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp.rename(final)
            _fsync_dir(self.directory)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            with self._mutex:
                self._bytes -= len(body)
            _log(logging.ERROR, "spool_write_failed", path=final, events=count, error=exc)
            return None
        batch = SpooledBatch(final, count, len(body))
        with self._mutex:
            # Appending keeps the index ordered: names increase under the mutex and a batch is
            # listed only once it is complete on disk.
            self._insert(batch)
            self._events += count
        return batch

    def _insert(self, batch: SpooledBatch) -> None:
        if not self._batches or self._batches[-1].path.name < batch.path.name:
            self._batches.append(batch)
            return
        items = sorted([*self._batches, batch], key=lambda b: b.path.name)
        self._batches = collections.deque(items)

    def oldest(self) -> SpooledBatch | None:
        """The batch to replay next, or None when the spool is empty."""
        with self._mutex:
            return self._batches[0] if self._batches else None

    def read(self, batch: SpooledBatch) -> bytes:
        """The batch's gzip'd JSON body, as written."""
        return batch.path.read_bytes()

    def remove(self, batch: SpooledBatch) -> None:
        """Forget a batch the collector acknowledged."""
        batch.path.unlink(missing_ok=True)
        self._forget(batch)

    def quarantine(self, batch: SpooledBatch) -> None:
        """Set aside a batch that cannot be read, keeping the file for a human to look at."""
        try:
            batch.path.rename(batch.path.with_name(batch.path.name + _CORRUPT_SUFFIX))
        except OSError:
            batch.path.unlink(missing_ok=True)
        self._forget(batch)

    def _forget(self, batch: SpooledBatch) -> None:
        with self._mutex:
            try:
                self._batches.remove(batch)
            except ValueError:
                return
            self._bytes -= batch.size
            self._events -= batch.count
            if self._refusing and self._bytes < self.max_bytes:
                self._refusing = False
                _log(logging.WARNING, "spool_accepting_again", directory=self.directory)

    def has_room(self) -> bool:
        """Whether a new batch is likely to be accepted (the bound is not reached)."""
        with self._mutex:
            return self._lock_fd is not None and self._bytes < self.max_bytes

    @property
    def batches(self) -> int:
        with self._mutex:
            return len(self._batches)

    @property
    def events(self) -> int:
        with self._mutex:
            return self._events

    @property
    def bytes_used(self) -> int:
        with self._mutex:
            return self._bytes

    def close(self) -> None:
        """Release the directory lock; the batches stay on disk for the next process."""
        with self._mutex:
            fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def abandon_after_fork(self) -> None:
        """In a forked child: drop the inherited descriptor without unlocking the parent's spool.

        ``flock`` locks belong to the open file description, which parent and child share;
        closing the child's copy leaves the parent's lock in place. No mutex: a parent thread
        may have held it at the fork, and it stays held forever in the child.
        """
        self._mutex = threading.Lock()
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)
