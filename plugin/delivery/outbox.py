"""The outbox: the journal, a memory cache in front of it, the hold for events the disk refused,
the delivery cursor and the counters.

No threads here; the shipper's request path calls ``append``, its sender thread the rest. One
lock covers the journal's state, the cache, the hold, the cursor and every counter, so that each
change of state and the counters that describe it happen in one critical section: ``stats``
never counts an event twice, or not at all.

Positions are ``(segment seq, byte offset)``. Three of them matter::

    acknowledged  <=  cursor  <=  journal end
    |-- in flight --|-- unsent --|

``next_batch`` takes records from the cursor on, from the cache when it starts at the cursor,
else from disk; ``acknowledge`` moves the acknowledged position past a batch (one batch is in
flight at a time, so acknowledgements come in journal order). The cache holds the newest
``max_entries`` unsent events: when it is full, the oldest one is evicted, and read back from
disk when its turn comes.

The hold: an event whose journal write fails (the disk full, ENOSPC most often, or failing) is
kept in memory, in arrival order, instead of being lost, and written to the journal as soon as
writes succeed again: first thing in every later ``append`` (so that it precedes the new event)
and in the sender's ``maintain`` (so that it does without new requests). Only when the hold is
full (``MAX_HELD_EVENTS`` or ``MAX_HELD_BYTES``) is an event lost. Held events are not durable:
a process killed while it holds some loses them, and ``close`` counts those still held as lost.
A journal full at its configured bound is no write failure: that event is lost at once, held
or not.
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
from .report import HoldLog, LossLog, log, log_losses

COUNTERS: Final = (
    "enqueued",  # events handed to append
    "sent",  # events in batches the collector answered 2xx
    "accepted",
    "duplicates",
    "rejected",  # rejected in 2xx answers, or refused on their own (413, other 4xx)
    "retries",  # failed delivery attempts
    "replayed",  # events of a previous process delivered by this one
    "lost",
    "held_total",  # events kept in memory because their journal write failed
)
SYNC_INTERVAL: Final = 1.0
# The hold's bound, whichever comes first. The hold rides out a transient full disk (another
# file growing, then removed; acknowledged segments deleted as the collector catches up). What
# it holds costs memory in every plugin server and is what a kill would take, so the bound is
# small: 10,000 events is tens of seconds of a busy server (hundreds of requests a second),
# 8 MiB the same at a usual event size (under 1 KiB) with room for larger ones. A disk full for
# longer needs room made on it, not a bigger hold; so no setting: a larger hold is only a larger
# buffer for a kill to lose.
MAX_HELD_EVENTS: Final = 10_000
MAX_HELD_BYTES: Final = 8 * 1024 * 1024

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


class _Held(NamedTuple):
    payload: bytes
    arrived: float  # monotonic: the coalescing delay counts from the request, not the drain


class _HoldLines(NamedTuple):
    warning: str | None  # the error of a hold to warn of
    drained: int | None  # events held until the journal took them again
    held: dict[str, int]  # the hold's figures


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
        self._held: collections.deque[_Held] = collections.deque()
        self._held_bytes = 0
        self._holds = HoldLog()
        self._open_error: OSError | None = None  # why the journal could not be opened, if so

    # -- opening ------------------------------------------------------------------------------

    def open(self) -> bool:
        """Open the journal (lock, recover, adopt); False, logged, when the disk refuses."""
        try:
            journal = Journal.open(self.directory)
        except OSError as exc:
            log(logging.ERROR, "journal_unavailable", directory=self.directory, error=exc)
            with self.lock:
                self._open_error = exc
            return False
        with self.lock:
            if self._closed:
                journal.close()
                return False
            self._journal = journal
            self._open_error = None
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
        """Journal one event (its JSON), or hold it in memory when the journal write fails;
        False when it is lost (counted and logged)."""
        now = time.monotonic()
        with self.lock:
            self._counts["enqueued"] += 1
            journal = self._journal
            holding = bool(self._held)
            reason: str | None
            if journal is None and not self._closed and self._open_error is not None:
                # The disk refused the journal at start (full, read-only): held as a write
                # failure is, and journaled by the first append or maintenance after the
                # sender's retry of `open` succeeds.
                reason = self._hold_locked(payload, now, self._open_error)
            elif journal is None or journal.closed:
                reason = "shipper closed" if self._closed else "journal unavailable"
            elif holding and (error := self._drain_locked(journal)) is not None:
                reason = self._hold_locked(payload, now, error)  # behind the held ones
            else:
                try:
                    where = journal.append(encode_record(payload), self.max_bytes)
                except OSError as exc:
                    reason = self._hold_locked(payload, now, exc)
                else:
                    if where is None:
                        reason = self._full_reason(journal)
                    else:
                        self._cache_locked(where, payload, now)
                        reason = None
            if reason is not None:
                self._lose_locked(1, reason)
            unlogged = self._losses.due()
            lost = self._counts["lost"]
            hold_lines = self._hold_lines_locked(holding)
        log_losses(unlogged, lost)
        self._log_hold(hold_lines)
        return reason is None

    def _full_reason(self, journal: Journal) -> str:
        return f"journal full ({self.max_bytes} bytes in {journal.directory})"

    def _hold_locked(self, payload: bytes, arrived: float, error: OSError) -> str | None:
        """Keep an event the journal refused (behind those already held); the reason it is
        lost when the hold is full, else None."""
        held = self._held
        if len(held) >= MAX_HELD_EVENTS or self._held_bytes + len(payload) > MAX_HELD_BYTES:
            return (
                f"spool unwritable ({error}) and the memory hold full"
                f" ({MAX_HELD_EVENTS} events or {MAX_HELD_BYTES} bytes)"
            )
        self._holds.held(str(error), first=not held)
        held.append(_Held(payload, arrived))
        self._held_bytes += len(payload)
        self._counts["held_total"] += 1
        return None

    def _drain_locked(self, journal: Journal) -> OSError | None:
        """Journal the held events, oldest first, until one fails: its error (it and the rest
        stay held), or None once the hold is empty. A held event the journal refuses as full
        is lost, as it would have been on its first try."""
        held = self._held
        error: OSError | None = None
        moved = 0
        while held:
            entry = held[0]
            try:
                where = journal.append(encode_record(entry.payload), self.max_bytes)
            except OSError as exc:
                error = exc
                break
            held.popleft()
            self._held_bytes -= len(entry.payload)
            moved += 1
            if where is not None:
                self._cache_locked(where, entry.payload, entry.arrived)
            else:
                self._lose_locked(1, self._full_reason(journal))
        if moved:
            self.cond.notify_all()  # a flush waits for the events held before it
        return error

    def _hold_lines_locked(self, holding: bool, *, force: bool = False) -> _HoldLines | None:
        """What ``_log_hold`` is to write once the lock is released (None, the common case:
        nothing); ``holding``: whether the hold held events when the critical section began."""
        drained = self._holds.drained() if holding and not self._held else None
        warning = self._holds.warning_due(force=force)  # none of a hold drained meanwhile
        if warning is None and drained is None:
            return None
        held = {
            "held_events": len(self._held),
            "held_bytes": self._held_bytes,
            "held_total": self._counts["held_total"],
        }
        return _HoldLines(warning, drained, held)

    @staticmethod
    def _log_hold(lines: _HoldLines | None) -> None:
        if lines is None:
            return
        warning, drained, held = lines
        if warning is not None:
            log(
                logging.WARNING,
                "spool_unwritable_holding_in_memory",
                error=repr(warning),
                hint="events are kept in memory until the journal takes writes again;"
                " a kill meanwhile loses them",
                max_events=MAX_HELD_EVENTS,
                max_bytes=MAX_HELD_BYTES,
                **held,
            )
        if drained is not None:
            log(logging.INFO, "spool_writable_again", held=drained, **held)

    def _cache_locked(self, where: tuple[int, int, int], payload: bytes, arrived: float) -> None:
        seq, start, end = where
        cache = self._cache
        cache.append(_Cached(seq, start, end, payload, arrived))
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

    def held_mark(self) -> int:
        """A mark for ``released_through``: the events held so far (call under the lock)."""
        return self._counts["held_total"]

    def released_through(self, mark: int) -> bool:
        """Whether every event held before ``held_mark`` returned ``mark`` has left the hold,
        journaled (or lost) (call under the lock)."""
        return self._counts["held_total"] - len(self._held) >= mark

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
        """Housekeeping the sender does between batches: journal the events held in memory if
        the disk takes them again (even when no request comes to do it), write the journal to
        disk about once a second, and log losses and holds still unlogged once the rate limit
        allows."""
        now = time.monotonic()
        with self.lock:
            journal = self._journal
            holding = bool(self._held)
            if holding and journal is not None and not journal.closed:
                self._drain_locked(journal)
            unlogged = self._losses.due(force=force)
            lost = self._counts["lost"]
            hold_lines = self._hold_lines_locked(holding, force=force)
            fds: list[int] = []
            if journal is not None and (force or now - self._synced_at >= SYNC_INTERVAL):
                self._synced_at = now
                fds = journal.take_unsynced()
        log_losses(unlogged, lost)
        self._log_hold(hold_lines)
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
            result["held_events"] = len(self._held)
            result["held_bytes"] = self._held_bytes
        return result

    def close(self) -> None:
        """Release the journal (its records stay for the next process) and the cache. Events
        still held in memory get one more try at the journal; those it refuses are lost."""
        self.maintain(force=True)
        with self.cond:
            self._closed = True
            if self._held:
                self._lose_locked(
                    len(self._held), "spool unwritable at shutdown: held in memory, never journaled"
                )
                self._held.clear()
                self._held_bytes = 0
            unlogged = self._losses.due(force=True)
            lost = self._counts["lost"]
            journal = self._journal
            self._cache.clear()
            if journal is not None:
                with contextlib.suppress(OSError):
                    journal.close()
            self.cond.notify_all()
        log_losses(unlogged, lost)
