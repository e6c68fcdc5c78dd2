"""The write-ahead journal: segment files of event records in one locked directory.

A segment ``<seq>.journal`` (``seq``: 12 digits, increasing) holds one record per event, a line::

    <crc32 of the event's JSON, 8 hex digits> <the event's JSON>\\n

(msgspec's JSON never holds a raw newline, so a newline ends a record). A record is appended by
one ``os.write`` on an ``O_APPEND`` descriptor: once it returns, the record is in the kernel's page
cache and survives the process being killed (the sender thread ``fdatasync``s about once a second,
which bounds what a host crash can take). A short write (a disk filling up) is continued, and
the next write fails with the real reason (ENOSPC); a failed append is cut off again, so a record
is whole or absent. Only the last segment is appended to; the others are sealed.

``<seq>.ack`` holds how far the segment is acknowledged by the collector: one fixed-size line
``<offset, 16 hex digits> <crc32 of those digits, 8 hex digits>``, overwritten in place by one
``pwrite`` per batch. A sealed segment acknowledged to its end is deleted, its ``.ack`` after it;
an ``.ack`` without its segment is stale and deleted before any new segment is created.

Recovery (opening a directory a previous process used): segments are replayed from their
acknowledged offset, oldest first. An ack that does not check out (or points inside a record) is
ignored: the segment is replayed from its start, and the collector dedupes. Records whose CRC does
not match, and a last line without its newline (a write torn by the crash), are skipped by
``read`` and reported as ``corrupt`` for the caller to count as lost.

One process per directory: ``flock`` on ``.lock``. A busy directory (another live process, e.g.
a plugin server overlapping its successor) sends the opener to the first free sibling
``<dir>.1`` .. ``<dir>.8``; the opener then adopts the segments of every sibling whose lock is
free (its owner is gone) by renaming them into its own directory, after its own.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .records import decode_ack, encode_ack, parse_records
from .report import log

MAX_SIBLINGS: Final = 8
MAX_SEGMENT_BYTES: Final = 64 * 1024 * 1024
_READ_CHUNK: Final = 1024 * 1024
_LOCK_NAME: Final = ".lock"
_FILE_NAME: Final = re.compile(r"^(\d{12})\.(journal|ack)$")


class JournalBusyError(OSError):
    """The directory and all its siblings are locked by other live processes."""


def collector_key(collector_url: str) -> str:
    """A directory name for a collector URL: readable, filesystem-safe, distinct per URL."""
    readable = re.sub(r"[^A-Za-z0-9.-]+", "_", collector_url.split("://", 1)[-1])
    digest = hashlib.blake2s(collector_url.encode(), digest_size=4).hexdigest()
    return f"{readable.strip('._')[:64] or 'collector'}-{digest}"


def segment_limit(max_bytes: int) -> int:
    """Size at which a segment is sealed: an eighth of the bound, so acknowledged bytes still on
    disk (in the segment being appended to) never hold more than that much of it."""
    return max(1, min(MAX_SEGMENT_BYTES, max_bytes // 8))


# -- the directory -------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Segment:
    seq: int
    size: int  # bytes of whole records (what this process wrote, or found on disk)
    acked: int  # records before this offset are acknowledged
    recovered: bool  # written by an earlier process
    ack_fd: int | None = None


@dataclass(frozen=True, slots=True)
class Extract:
    """Records read back from a segment."""

    events: list[bytes]
    corrupt: int  # torn or corrupt records skipped
    end: int  # offset after the last record read


def _try_lock(directory: Path) -> int | None:
    """Lock ``directory`` for this process: the open descriptor holds the lock; None if busy."""
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


def _files(directory: Path) -> tuple[dict[int, int], set[int]]:
    """Sizes of the segments, and the seqs of the ack files, found in ``directory``."""
    segments: dict[int, int] = {}
    acks: set[int] = set()
    for entry in os.scandir(directory):
        match = _FILE_NAME.match(entry.name)
        if match is None:
            continue
        if match[2] == "journal":
            segments[int(match[1])] = entry.stat().st_size
        else:
            acks.add(int(match[1]))
    return segments, acks


class Journal:
    """Segments in one locked directory. Not thread-safe: the outbox serializes every call but
    ``read`` and ``count_records``, which only touch bytes that no longer change."""

    def __init__(self, directory: Path, lock_fd: int) -> None:
        """Use ``Journal.open``: this takes over an already locked directory."""
        self.directory = directory
        self.segments: list[Segment] = []  # oldest first; the last one is appended to
        self.bytes = 0
        self._lock_fd: int | None = lock_fd
        self._fd: int | None = None  # the last segment, O_APPEND
        self._next_seq = 1
        self._seal_next = False  # a failed write could not be undone: start a new segment
        self._unsynced: list[int] = []  # descriptors written to since the last sync

    @classmethod
    def open(cls, base: Path) -> Journal:
        """Lock ``base`` (or the first free sibling), recover it, adopt orphaned siblings."""
        for directory in _candidates(base):
            fd = _try_lock(directory)
            if fd is None:
                continue
            if directory != base:
                log(logging.WARNING, "journal_dir_busy", wanted=base, using=directory)
            journal = cls(directory, fd)
            try:
                segments, acks = _files(directory)
                journal._next_seq = max(segments.keys() | acks, default=0) + 1
                for seq in acks - segments.keys():
                    journal._ack_path(seq).unlink(missing_ok=True)
                for seq in sorted(segments):
                    journal._recover(seq, segments[seq])
                journal._adopt_orphans(base)
                journal._start_segment()
            except BaseException:
                journal.close()
                raise
            return journal
        raise JournalBusyError(
            errno.EBUSY, f"journal directory {base} and its {MAX_SIBLINGS} siblings are locked"
        )

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:012d}.journal"

    def _ack_path(self, seq: int) -> Path:
        return self.directory / f"{seq:012d}.ack"

    def _recover(self, seq: int, size: int) -> None:
        segment = Segment(seq, size, self._read_ack(seq, size), recovered=True)
        self.segments.append(segment)
        self.bytes += size
        if segment.acked >= size:
            self._delete(segment)

    def _read_ack(self, seq: int, size: int) -> int:
        try:
            offset = decode_ack(self._ack_path(seq).read_bytes())
        except FileNotFoundError:
            return 0
        if offset is not None and 0 < offset <= size:
            with self._path(seq).open("rb") as file:
                file.seek(offset - 1)
                if file.read(1) == b"\n":
                    return offset
        if offset != 0:
            # Replaying the whole segment only costs duplicates, which the collector skips.
            log(logging.WARNING, "journal_ack_invalid", segment=self._path(seq), offset=offset)
        return 0

    def _adopt_orphans(self, base: Path) -> None:
        """Move the segments of sibling directories nobody holds into this one, after ours."""
        for directory in _candidates(base):
            if directory == self.directory or not directory.is_dir():
                continue
            fd = _try_lock(directory)
            if fd is None:
                continue  # a live process owns it and replays it itself
            try:
                segments, acks = _files(directory)
                for seq in sorted(segments):
                    new = self._next_seq
                    self._next_seq += 1
                    # The segment first: a crash in between leaves it without its ack here
                    # (replayed from its start: duplicates only) and a stale ack there.
                    (directory / f"{seq:012d}.journal").rename(self._path(new))
                    if seq in acks:
                        (directory / f"{seq:012d}.ack").rename(self._ack_path(new))
                    self._recover(new, segments[seq])
                for seq in acks - segments.keys():
                    (directory / f"{seq:012d}.ack").unlink(missing_ok=True)
                if segments:
                    log(
                        logging.INFO,
                        "journal_adopted",
                        directory=self.directory,
                        orphan=directory,
                        segments=len(segments),
                    )
            finally:
                os.close(fd)

    def _start_segment(self) -> None:
        """Seal the last segment, if any, and start a new one after it."""
        seq = self._next_seq
        self._ack_path(seq).unlink(missing_ok=True)  # an ack never outlives its segment
        fd = os.open(self._path(seq), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        self._next_seq += 1
        sealed, self._fd = self._fd, fd
        if sealed is not None and sealed not in self._unsynced:
            os.close(sealed)  # else the next sync closes it
        self.segments.append(Segment(seq, 0, 0, recovered=False))
        if len(self.segments) > 1:
            self._delete_if_done(self.segments[-2])

    # -- the outbox's interface -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._fd is None

    def segment(self, seq: int) -> Segment | None:
        for segment in self.segments:
            if segment.seq == seq:
                return segment
        return None

    def append(self, record: bytes, max_bytes: int) -> tuple[int, int, int] | None:
        """Append one record: (seq, start, end) where it landed, or None when the journal is
        full. Raises OSError when the disk fails; the journal stays whole."""
        if self._fd is None:
            raise OSError(errno.EBADF, "journal closed")
        size = len(record)
        last = self.segments[-1]
        if self._seal_next or (last.size and last.size + size > segment_limit(max_bytes)):
            self._start_segment()
            self._seal_next = False
            last = self.segments[-1]
        if self.bytes + size > max_bytes:
            return None
        start = last.size
        try:
            written = os.write(self._fd, record)
            while written < size:
                # A short write (a disk filling up takes what fits): the next write says why,
                # ENOSPC most often, which is the reason to count the loss under.
                more = os.write(self._fd, record[written:])
                if more <= 0:
                    raise OSError(errno.EIO, f"short write ({written} of {size} bytes)")
                written += more
        except OSError:
            try:
                os.ftruncate(self._fd, start)  # a torn record must not precede the next one
            except OSError:
                self._seal_next = True  # then it stays the tail of a sealed segment
            raise
        last.size += size
        self.bytes += size
        if self._fd not in self._unsynced:
            self._unsynced.append(self._fd)
        return last.seq, start, last.size

    def acknowledge(self, seq: int, end: int) -> None:
        """Record that segment ``seq`` is acknowledged up to ``end``; delete it when done."""
        segment = self.segment(seq)
        if segment is None or self._fd is None:
            return
        segment.acked = end
        if self._delete_if_done(segment):
            return
        try:
            if segment.ack_fd is None:
                segment.ack_fd = os.open(self._ack_path(seq), os.O_WRONLY | os.O_CREAT, 0o600)
            os.pwrite(segment.ack_fd, encode_ack(end), 0)
        except OSError as exc:  # a successor re-sends these events: duplicates only
            log(logging.WARNING, "journal_ack_failed", segment=self._path(seq), error=exc)

    def read(self, seq: int, start: int, limit: int, max_records: int) -> Extract:
        """Up to ``max_records`` records of segment ``seq`` from ``start``, not past ``limit``."""
        payloads: list[bytes] = []
        corrupt = 0
        offset = start
        chunk = _READ_CHUNK
        fd = os.open(self._path(seq), os.O_RDONLY)
        try:
            while offset < limit and len(payloads) + corrupt < max_records:
                data = os.pread(fd, min(chunk, limit - offset), offset)
                if not data:  # shorter than it was: cut by something else than this code
                    corrupt += 1
                    offset = limit
                    break
                final = offset + len(data) >= limit
                got, bad, used = parse_records(
                    data, final=final, max_records=max_records - len(payloads) - corrupt
                )
                if not used:
                    chunk *= 2  # one record longer than the chunk
                payloads += got
                corrupt += bad
                offset += used
        finally:
            os.close(fd)
        return Extract(payloads, corrupt, offset)

    def count_records(self, segment: Segment) -> int:
        """How many records (whole, corrupt or torn) follow the segment's acknowledged offset."""
        count = 0
        offset = segment.acked
        last = b"\n"
        fd = os.open(self._path(segment.seq), os.O_RDONLY)
        try:
            while offset < segment.size:
                data = os.pread(fd, min(_READ_CHUNK, segment.size - offset), offset)
                if not data:
                    break
                count += data.count(b"\n")
                offset += len(data)
                last = data[-1:]
        finally:
            os.close(fd)
        return count + (last != b"\n")

    def take_unsynced(self) -> list[int]:
        """Descriptors appended to since the last call (duplicates: the caller ``fdatasync``s
        and closes them without holding the outbox's lock)."""
        taken, self._unsynced = self._unsynced, []
        dups = []
        for fd in taken:
            if fd == self._fd:
                dups.append(os.dup(fd))
            else:
                dups.append(fd)  # a sealed segment's: handed over
        return dups

    def close(self) -> None:
        """Release the directory; the segments stay on disk for the next process."""
        fds = [self._fd, self._lock_fd, *(s.ack_fd for s in self.segments)]
        fds += [fd for fd in self._unsynced if fd != self._fd]
        self._fd = self._lock_fd = None
        self._unsynced = []
        for segment in self.segments:
            segment.ack_fd = None
        for fd in fds:
            if fd is not None:
                os.close(fd)

    def _delete_if_done(self, segment: Segment) -> bool:
        if segment is self.segments[-1] or segment.acked < segment.size:
            return False
        self._delete(segment)
        return True

    def _delete(self, segment: Segment) -> None:
        self.segments.remove(segment)
        self.bytes -= segment.size
        if segment.ack_fd is not None:
            os.close(segment.ack_fd)
            segment.ack_fd = None
        try:
            self._path(segment.seq).unlink(missing_ok=True)
            self._ack_path(segment.seq).unlink(missing_ok=True)
        except OSError as exc:
            log(logging.ERROR, "journal_delete_failed", segment=self._path(segment.seq), error=exc)
