"""The outbox: the journal, a memory cache in front of it, the delivery cursor and the counters.

No threads here; the shipper's request path calls ``append``, its sender thread the rest. One
lock covers the journal's state, the cache, the cursor and every counter, so that each change of
state and the counters that describe it happen in one critical section: ``stats`` never counts
an event twice, or not at all.

Positions are ``(segment seq, byte offset)``. Three of them matter::

    acknowledged  <=  cursor  <=  journal end
    |-- in flight --|-- unsent --|

``next_batch`` takes records from the cursor on, from the cache when it starts at the cursor,
else from disk; ``acknowledge`` moves the acknowledged position past a batch (one batch is in
flight at a time, so acknowledgements come in journal order). The cache holds the newest
``max_entries`` unsent events: when it is full, the oldest one is evicted, and read back from
disk when its turn comes.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

from .answers import Tally
from .journal import Journal
from .records import encode_record
from .report import LossLog, log, log_losses

COUNTERS: Final = (
    "enqueued",  # events handed to append
    "sent",  # events in batches the collector answered 2xx
    "accepted",
    "duplicates",
    "rejected",  # rejected in 2xx answers, or refused on their own (413, other 4xx)
    "retries",  # failed delivery attempts
    "replayed",  # events of a previous process delivered by this one
    "lost",
)
SYNC_INTERVAL: Final = 1.0

Position = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Batch:
    """Consecutive records of one segment, on their way to the collector."""

    seq: int
    start: int
    end: int
    events: list[bytes]
    corrupt: int  # records skipped as torn or corrupt: lost once the batch is acknowledged
    recovered: bool  # from a previous process's journal

    @property
    def records(self) -> int:
        return len(self.events) + self.corrupt


class _Cached(NamedTuple):  # a tuple: built on the request path, so as cheap as can be
    seq: int
    start: int
    end: int
    payload: bytes
    arrived: float  # monotonic


class Outbox:
    def __init__(
        self, directory: Path, *, max_entries: int, max_bytes: int, batch_size: int
    ) -> None:
        self.directory = directory
        # Tunables a config push may change (plain attributes: read under the lock).
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.batch_size = batch_size  # unsent events that make a full batch: wake the sender
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)  # notified on new work and acknowledgements
        self._journal: Journal | None = None
        self._closed = False
        self._cache: collections.deque[_Cached] = collections.deque()
        self._cursor: Position = (0, 0)
        self._unsent = 0
        self._in_flight = 0
        self._recovering: list[int] = []  # seqs of recovered segments not counted yet
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._losses = LossLog()
        self._synced_at = 0.0

    # -- opening ------------------------------------------------------------------------------

    def open(self) -> bool:
        """Open the journal (lock, recover, adopt); False, logged, when the disk refuses."""
        try:
            journal = Journal.open(self.directory)
        except OSError as exc:
            log(logging.ERROR, "journal_unavailable", directory=self.directory, error=exc)
            return False
        with self.lock:
            if self._closed:
                journal.close()
                return False
            self._journal = journal
            first = journal.segments[0]
            self._cursor = (first.seq, first.acked)
            self._recovering = [s.seq for s in journal.segments if s.recovered]
        if self._recovering:
            log(logging.INFO, "journal_recovered", directory=journal.directory, **self.stats())
        return True

    @property
    def is_open(self) -> bool:
        return self._journal is not None

    @property
    def has_backlog(self) -> bool:
        """Whether the journal holds records of a previous process to replay."""
        return bool(self._recovering) or self._unsent > 0

    def recover(self) -> None:
        """Count the records of the previous process's segments (reads them: sender thread)."""
        journal = self._journal
        while journal is not None and self._recovering:
            segment = journal.segment(self._recovering[0])
            count = journal.count_records(segment) if segment is not None else 0
            with self.cond:
                self._recovering.pop(0)
                self._unsent += count
                self.cond.notify_all()

    # -- the request path ---------------------------------------------------------------------

    def append(self, payload: bytes) -> bool:
        """Journal one event (its JSON); False when it is lost (counted and logged)."""
        record = encode_record(payload)
        with self.lock:
            self._counts["enqueued"] += 1
            journal = self._journal
            if journal is None or journal.closed:
                reason = "shipper closed" if self._closed else "journal unavailable"
            else:
                try:
                    where = journal.append(record, self.max_bytes)
                except OSError as exc:
                    reason = f"journal write failed: {exc}"
                else:
                    if where is not None:
                        self._cache_locked(where, payload)
                        return True
                    reason = f"journal full ({self.max_bytes} bytes in {journal.directory})"
            self._lose_locked(1, reason)
            unlogged = self._losses.due()
            lost = self._counts["lost"]
        log_losses(unlogged, lost)
        return False

    def _cache_locked(self, where: tuple[int, int, int], payload: bytes) -> None:
        seq, start, end = where
        cache = self._cache
        cache.append(_Cached(seq, start, end, payload, time.monotonic()))
        while len(cache) > self.max_entries:
            cache.popleft()  # on disk only from now on
        self._unsent += 1
        if self._unsent in (1, self.batch_size):
            self.cond.notify_all()  # the coalescing delay starts, or a batch is full

    def lose(self, count: int, reason: str) -> None:
        """Count events lost before they reached the journal, and log them (rate-limited)."""
        with self.lock:
            self._lose_locked(count, reason)
            unlogged = self._losses.due()
            lost = self._counts["lost"]
        log_losses(unlogged, lost)

    def _lose_locked(self, count: int, reason: str) -> None:
        """The one way an event is lost: counted here, logged by whoever holds the result of
        ``self._losses.due()`` once the lock is released."""
        self._counts["lost"] += count
        self._losses.note(count, reason)

    # -- the sender's interface -----------------------------------------------------------------

    @property
    def unsent(self) -> int:
        return self._unsent

    def oldest_unsent_arrival(self) -> float:
        """When the next unsent event was appended (monotonic); -inf for one read from disk."""
        cache = self._cache
        if cache and (cache[0].seq, cache[0].start) == self._cursor:
            return cache[0].arrived
        return float("-inf")

    def next_batch(self, max_events: int) -> Batch | None:
        """Up to ``max_events`` records from the cursor on, within one segment; None when
        there is nothing unsent. Only the sender calls it, with no batch in flight."""
        with self.lock:
            journal = self._journal
            if journal is None or self._unsent == 0 or self._recovering:
                return None
            seq, offset = self._cursor = self._advance_locked(journal)
            cache = self._cache
            if cache and (cache[0].seq, cache[0].start) == (seq, offset):
                taken: list[bytes] = []
                end = offset
                while cache and cache[0].seq == seq and len(taken) < max_events:
                    entry = cache.popleft()
                    taken.append(entry.payload)
                    end = entry.end
                return self._take_locked(Batch(seq, offset, end, taken, 0, recovered=False))
            segment = journal.segment(seq)
            limit = segment.size if segment is not None else offset
            if cache and cache[0].seq == seq:
                limit = cache[0].start
            if limit <= offset or segment is None:  # never, unless the counts are wrong
                log(logging.ERROR, "outbox_out_of_step", cursor=self._cursor, unsent=self._unsent)
                return None
            recovered = segment.recovered
        # Outside the lock: the bytes before a recorded size never change.
        extract = journal.read(seq, offset, limit, max_events)
        batch = Batch(seq, offset, extract.end, extract.events, extract.corrupt, recovered)
        if batch.corrupt:
            log(
                logging.ERROR,
                "journal_records_skipped",
                segment=seq,
                offset=offset,
                end=extract.end,
                count=batch.corrupt,
                reason="torn or corrupt (CRC mismatch); counted as lost",
            )
        with self.lock:
            return self._take_locked(batch)

    def _advance_locked(self, journal: Journal) -> Position:
        """The cursor, moved past the end of sealed (or deleted) segments."""
        seq, offset = self._cursor
        last = journal.segments[-1]
        for segment in journal.segments:
            if segment.seq < seq:
                continue
            if segment.seq > seq:
                return segment.seq, segment.acked
            if offset < segment.size or segment is last:
                return seq, offset
        return last.seq, last.size

    def _take_locked(self, batch: Batch) -> Batch:
        self._cursor = (batch.seq, batch.end)
        self._unsent -= batch.records
        self._in_flight += batch.records
        return batch

    def acknowledge(self, batch: Batch, tally: Tally) -> None:
        """The collector settled every event of ``batch``: count them, forget them."""
        with self.cond:
            journal = self._journal
            if journal is not None:
                journal.acknowledge(batch.seq, batch.end)
            self._in_flight -= batch.records
            counts = self._counts
            counts["sent"] += tally.sent
            counts["accepted"] += tally.accepted
            counts["duplicates"] += tally.duplicates
            counts["rejected"] += tally.rejected
            if batch.recovered:
                counts["replayed"] += len(batch.events)
            if batch.corrupt:
                self._lose_locked(batch.corrupt, "torn or corrupt journal record")
            unlogged = self._losses.due()
            lost = counts["lost"]
            self.cond.notify_all()
        log_losses(unlogged, lost)

    def rewind(self) -> None:
        """Forget the batch in flight (the sender crashed): it is read again from the journal."""
        with self.cond:
            journal = self._journal
            if journal is not None and journal.segments:
                first = journal.segments[0]
                self._cursor = (first.seq, first.acked)
            self._unsent += self._in_flight
            self._in_flight = 0
            self.cond.notify_all()

    def count(self, name: str, increment: int = 1) -> None:
        with self.lock:
            self._counts[name] += increment

    def end(self) -> Position | None:
        """Where the next event will be appended (None: no journal)."""
        journal = self._journal
        if journal is None or not journal.segments:
            return None
        last = journal.segments[-1]
        return last.seq, last.size

    def acknowledged_through(self, position: Position) -> bool:
        """Whether every record before ``position`` is acknowledged (call under the lock)."""
        journal = self._journal
        if journal is None or journal.closed or not journal.segments:
            return True
        first = journal.segments[0]
        return not self._recovering and (first.seq, first.acked) >= position

    def maintain(self, *, force: bool = False) -> None:
        """Housekeeping the sender does between batches: write the journal to disk about once a
        second, and log losses still unlogged once the rate limit allows."""
        now = time.monotonic()
        with self.lock:
            unlogged = self._losses.due(force=force)
            lost = self._counts["lost"]
            fds: list[int] = []
            journal = self._journal
            if journal is not None and (force or now - self._synced_at >= SYNC_INTERVAL):
                self._synced_at = now
                fds = journal.take_unsynced()
        log_losses(unlogged, lost)
        for fd in fds:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                log(logging.WARNING, "journal_sync_failed", error=exc)
            finally:
                os.close(fd)

    # -- the rest -------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self.lock:
            result = dict(self._counts)
            result["in_memory"] = len(self._cache)
            result["in_flight"] = self._in_flight
            result["journal_events"] = self._unsent + self._in_flight
            journal = self._journal
            result["journal_bytes"] = journal.bytes if journal is not None else 0
            result["journal_segments"] = len(journal.segments) if journal is not None else 0
        return result

    def close(self) -> None:
        """Release the journal (its records stay for the next process) and the cache."""
        self.maintain(force=True)
        with self.cond:
            self._closed = True
            journal = self._journal
            self._cache.clear()
            if journal is not None:
                with contextlib.suppress(OSError):
                    journal.close()
            self.cond.notify_all()
