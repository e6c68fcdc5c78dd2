"""Ship usage events to the collector from a background thread, losing none.

The request path only calls ``Shipper.enqueue``: it encodes the event and appends it to a bounded
in-memory queue under a lock held for a few microseconds. Everything that can block (HTTP, disk)
happens in two daemon threads per process:

- the *sender* coalesces events into batches (``max_batch_size`` events, or ``max_coalescing_delay``
  after the first one) and POSTs them, gzip'd, to ``<collector_url>/v1/events``; it also replays
  the spool, oldest batch first;
- the *spooler* writes events to the on-disk spool (``spool.Spool``) when memory must be given up:
  when the queue overflows (``max_entries``), and while the collector is failing, so that a long
  outage costs disk, not memory, and survives a crash.

Delivery is at least once: a batch leaves memory or the spool only after the collector answered
200 (the collector dedupes by (source, id), so a re-sent batch is harmless). Nothing is dropped
for age. Events are lost only when memory and the spool are both full (or the spool is
unavailable), and each one is counted in ``stats()["lost"]`` and logged at error level.

Failure policy per answer: 200 counts accepted, duplicate and rejected events (rejected ones are
invalid: logged with their reasons and never retried); 413 splits the batch in halves; 401/403
are configuration errors, logged at error level, and the events are kept and retried like any
other failure (5xx, 429, timeouts, refused connections): capped exponential backoff with full
jitter, the failed batch going to the spool.

One ``Shipper`` per (collector_url, collector_token) per process, from ``get_shipper``: plugin
instances are recreated on every config push, so they must not own threads. A forked child gets
its own shipper (the parent's threads do not exist there) on its first ``get_shipper``.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import gzip
import http.client
import importlib.metadata
import logging
import os
import random
import signal
import socket
import ssl
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec

from .spool import Spool, SpooledBatch

__all__ = [
    "Backoff",
    "CollectorClient",
    "CollectorResponse",
    "SettingsError",
    "Shipper",
    "ShippingSettings",
    "get_shipper",
    "install_sigterm_handler",
    "shutdown_all",
]

logger = logging.getLogger("token_meter_plugin")

GIB: Final = 1024**3

# The spool's default bound, sized in days of a busy gateway. A usage event is about 600-700
# bytes of JSON; gzip'd in batches it takes about 120-140 bytes (its random UUIDs do not
# compress). 2 GiB therefore hold about 15 million events: 1.8 days of a plugin server metering
# 100 AI requests per second without a pause (8.6 million a day), a week at 25 per second.
DEFAULT_SPOOL_MAX_BYTES: Final = 2 * GIB

# The collector takes at least 10,000 events per batch (contract 3).
MAX_BATCH_SIZE_LIMIT: Final = 10_000

# The sender compresses every batch on the plugin server's only busy core: level 1 costs about
# 6 ms per 1000 events against 14 ms for level 6, for 15% more bytes. Batches the spooler writes
# while the collector is down are compressed harder, as they may sit on disk for days.
_WIRE_GZIP_LEVEL: Final = 1
_SPOOL_GZIP_LEVEL: Final = 6
_IDLE_WAIT: Final = 1.0
_REJECTIONS_LOGGED_PER_BATCH: Final = 20

try:
    _VERSION = importlib.metadata.version("kong-token-meter")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    _VERSION = "0"
USER_AGENT: Final = f"token-meter-plugin/{_VERSION}"

COUNTERS: Final = (
    "enqueued",
    "sent",
    "accepted",
    "duplicates",
    "rejected",
    "retries",
    "spooled",
    "replayed",
    "lost",
)


def _log(level: int, event: str, **fields: Any) -> None:
    """One structured line: a snake_case event name and key=value fields (also in ``extra``)."""
    if logger.isEnabledFor(level):
        detail = " ".join(f"{key}={value}" for key, value in fields.items())
        logger.log(level, "%s %s", event, detail, extra={"token_meter": {"event": event, **fields}})


# -- settings ------------------------------------------------------------------------------------


class SettingsError(ValueError):
    """Invalid settings; ``errors`` lists every problem found, not just the first."""

    def __init__(self, what: str, errors: list[str]) -> None:
        super().__init__(f"invalid {what}: " + "; ".join(errors))
        self.errors = errors


def collector_url_errors(url: str) -> list[str]:
    """What is wrong with a collector base URL (empty when it is usable)."""
    parts = urlsplit(url)
    errors = []
    if parts.scheme not in ("http", "https") or not parts.hostname:
        errors.append(f"collector_url must be an http(s) URL with a host, got {url!r}")
    if parts.query or parts.fragment:
        errors.append("collector_url must not have a query or fragment")
    return errors


def collector_token_errors(token: str) -> list[str]:
    """What is wrong with an ingest token (empty when it is usable)."""
    if not token:
        return ["collector_token must not be empty"]
    if any(ch in token for ch in "\r\n\0"):
        return ["collector_token must not contain line breaks"]
    return []


@dataclass(frozen=True, slots=True)
class ShippingSettings:
    """How events reach the collector. Names follow Kong's ``queue_schema`` where they overlap."""

    collector_url: str
    collector_token: str
    # Events per POST; the collector takes at least 10,000.
    max_batch_size: int = 1000
    # Seconds a batch waits for more events after its first one: well under a second, so usage
    # reaches the collector (and the blocklist reacts) fast.
    max_coalescing_delay: float = 0.2
    # Events held in memory; past it they overflow to the spool.
    max_entries: int = 100_000
    # Backoff between failed deliveries: capped exponential with full jitter.
    initial_retry_delay: float = 0.1
    max_retry_delay: float = 30.0
    # Seconds to connect, and to wait for the collector's answer.
    timeout: float = 10.0
    # Where batches wait on disk; default: $TMPDIR/token-meter-spool/<plugin_name>.
    spool_dir: str | None = None
    # Bound of the spool (0 disables it: memory only).
    spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES
    # gzip the POST bodies.
    gzip: bool = True
    # The data plane's CloudEvents ``source``, stamped into events that have none.
    source: str = ""
    # Names the default spool directory.
    plugin_name: str = "token-meter"
    # Seconds given to delivery at shutdown before memory is written to the spool.
    shutdown_timeout: float = 5.0

    def __post_init__(self) -> None:
        errors = collector_url_errors(self.collector_url)
        errors += collector_token_errors(self.collector_token)
        if not 1 <= self.max_batch_size <= MAX_BATCH_SIZE_LIMIT:
            errors.append(f"max_batch_size must be between 1 and {MAX_BATCH_SIZE_LIMIT}")
        if not 0 <= self.max_coalescing_delay <= 3600:
            errors.append("max_coalescing_delay must be between 0 and 3600 seconds")
        if self.max_entries < self.max_batch_size:
            errors.append("max_entries must be at least max_batch_size")
        if self.initial_retry_delay <= 0:
            errors.append("initial_retry_delay must be positive")
        if self.max_retry_delay < self.initial_retry_delay:
            errors.append("max_retry_delay must be at least initial_retry_delay")
        if self.timeout <= 0:
            errors.append("timeout must be positive")
        if self.spool_max_bytes < 0:
            errors.append("spool_max_bytes must be 0 (no spool) or positive")
        if self.shutdown_timeout < 0:
            errors.append("shutdown_timeout must not be negative")
        if not self.plugin_name or "/" in self.plugin_name or self.plugin_name.startswith("."):
            errors.append("plugin_name must be a plain file name")
        if errors:
            raise SettingsError("shipping settings", errors)

    def spool_path(self) -> Path:
        """The spool directory these settings name."""
        if self.spool_dir:
            return Path(self.spool_dir)
        return Path(tempfile.gettempdir()) / "token-meter-spool" / self.plugin_name


# -- HTTP ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CollectorResponse:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes


class CollectorClient:
    """One keep-alive connection to the collector, used by one thread at a time.

    ``abort`` may be called from another thread to unblock a request in progress.
    """

    def __init__(self, collector_url: str, collector_token: str) -> None:
        parts = urlsplit(collector_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._base_path = parts.path.rstrip("/")
        self._auth = f"Bearer {collector_token}"
        self._conn: http.client.HTTPConnection | None = None
        self._aborted = False
        self._ssl_context: ssl.SSLContext | None = (
            ssl.create_default_context() if self._https else None
        )

    def _connection(self, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        conn = self._conn
        if conn is not None:
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            conn.timeout = timeout
            return conn, True
        if self._https:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._ssl_context
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        self._conn = conn
        return conn, False

    def request(
        self,
        method: str,
        path: str,
        *,
        timeout: float,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> CollectorResponse:
        """Send one request; raises OSError or http.client.HTTPException when it fails."""
        all_headers = {"Authorization": self._auth, "User-Agent": USER_AGENT, **(headers or {})}
        for attempt in (1, 2):
            if self._aborted:
                raise ConnectionAbortedError("collector client closed")
            conn, reused = self._connection(timeout)
            try:
                conn.request(method, self._base_path + path, body=body, headers=all_headers)
                response = conn.getresponse()
                data = response.read()
            except ConnectionError:  # http.client.RemoteDisconnected is one
                self.close()
                # A kept-alive connection the server closed while idle fails on first use; one
                # retry on a fresh one is safe (the collector dedupes, GET is idempotent).
                if reused and attempt == 1:
                    continue
                raise
            except (OSError, http.client.HTTPException):
                self.close()
                raise
            if response.will_close:
                self.close()
            return CollectorResponse(
                response.status, {k.lower(): v for k, v in response.getheaders()}, data
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def abort(self) -> None:
        """Break a request in progress in another thread (it fails with OSError), for good."""
        self._aborted = True
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class Backoff:
    """Capped exponential backoff with full jitter (AWS architecture blog's 'Full Jitter')."""

    def __init__(
        self, initial: float, maximum: float, rng: Callable[[float, float], float] = random.uniform
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempts = 0
        self._rng = rng

    def next_delay(self) -> float:
        cap = min(self.maximum, self.initial * 2 ** min(self.attempts, 62))
        self.attempts += 1
        return self._rng(0.0, cap)

    def reset(self) -> None:
        self.attempts = 0


# -- batches -------------------------------------------------------------------------------------


class _IngestRejection(msgspec.Struct):
    index: int = -1
    id: str | None = None
    reason: str = ""


class _IngestResult(msgspec.Struct):
    accepted: int = 0
    duplicates: int = 0
    rejected: list[_IngestRejection] = msgspec.field(default_factory=list)


_decode_ingest = msgspec.json.Decoder(_IngestResult).decode
_decode_raw_array = msgspec.json.Decoder(list[msgspec.Raw]).decode
_encode = msgspec.json.Encoder().encode


class _CorruptBatchError(Exception):
    """A spooled batch that cannot be decompressed or parsed."""


class _Batch:
    """Events on their way: encoded events from memory, or a gzip'd body from the spool."""

    __slots__ = ("_events", "_gz", "count", "spooled")

    def __init__(
        self,
        events: list[bytes] | None,
        gz: bytes | None = None,
        spooled: SpooledBatch | None = None,
    ) -> None:
        self._events = events
        self._gz = gz
        self.spooled = spooled
        if events is not None:
            self.count = len(events)
        elif spooled is not None:
            self.count = spooled.count
        else:
            self.count = len(self.events())

    def raw(self) -> bytes:
        if self._events is not None:
            return b"[" + b",".join(self._events) + b"]"
        try:
            return gzip.decompress(self._gz or b"")
        except (OSError, EOFError, zlib.error) as exc:
            raise _CorruptBatchError(str(exc)) from exc

    def gz(self, level: int = _WIRE_GZIP_LEVEL) -> bytes:
        if self._gz is None:
            self._gz = gzip.compress(self.raw(), compresslevel=level)
        return self._gz

    def events(self) -> list[bytes]:
        if self._events is None:
            try:
                self._events = [bytes(item) for item in _decode_raw_array(self.raw())]
            except msgspec.DecodeError as exc:
                raise _CorruptBatchError(str(exc)) from exc
        return self._events


class _LossLog:
    """Error logs for lost events: the first at once, then one summary per interval."""

    def __init__(self, interval: float = 10.0) -> None:
        self._lock = threading.Lock()
        self._interval = interval
        self._unlogged = 0
        self._last = -interval

    def record(self, count: int, reason: str, total: int) -> None:
        with self._lock:
            self._unlogged += count
            now = time.monotonic()
            if now - self._last < self._interval:
                return
            lost, self._unlogged, self._last = self._unlogged, 0, now
        _log(logging.ERROR, "events_lost", count=lost, reason=reason, lost_total=total)


# -- the shipper ---------------------------------------------------------------------------------


class Shipper:
    """The process's pipe to the collector: a bounded queue, a sender and a spooler thread."""

    def __init__(self, settings: ShippingSettings) -> None:
        self._settings = settings
        self.pid = os.getpid()
        self._lock = threading.Lock()
        # One condition for every state change: new events, overflow, failing, flush, stop.
        self._cond = threading.Condition(self._lock)
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_since = 0.0  # monotonic arrival of the oldest pending event
        self._overflow: collections.deque[collections.deque[bytes]] = collections.deque()
        self._overflow_events = 0
        self._in_flight: list[_Batch] = []  # taken from memory, fate not yet settled
        self._spilling = 0  # events the spooler is writing
        self._failing = False
        self._spill_blocked_at: int | None = None  # spool bytes when it last refused a spill
        self._flushers = 0
        self._stopping = False
        self._closed = False
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._loss_log = _LossLog()
        self._spool: Spool | None = None
        self._spool_ready = threading.Event()
        self._client = CollectorClient(settings.collector_url, settings.collector_token)
        self._sender = threading.Thread(
            target=self._guarded,
            args=(self._run_sender, True),
            name="token-meter-sender",
            daemon=True,
        )
        self._spooler = threading.Thread(
            target=self._guarded,
            args=(self._run_spooler, False),
            name="token-meter-spooler",
            daemon=True,
        )
        self._sender.start()
        self._spooler.start()

    @property
    def settings(self) -> ShippingSettings:
        return self._settings

    def reconfigure(self, settings: ShippingSettings) -> None:
        """Take new tunables (batching, retry, timeout) from a config push.

        The collector URL and token name the shipper and cannot change; the spool directory is
        kept until the process restarts.
        """
        if settings != self._settings:
            _log(logging.DEBUG, "shipper_reconfigured", collector_url=settings.collector_url)
            if self._spool is not None:
                self._spool.max_bytes = settings.spool_max_bytes
        self._settings = settings

    # -- the request path ------------------------------------------------------------------

    def enqueue(self, event: Mapping[str, Any]) -> None:
        """Queue one usage event for delivery. Never blocks on I/O and never raises."""
        if self.pid != os.getpid():  # a stale reference in a forked child
            get_shipper(self._settings).enqueue(event)
            return
        try:
            if not isinstance(event, dict):
                event = dict(event)
            source = self._settings.source
            if source and "source" not in event:
                event = {**event, "source": source}
            data = _encode(event)
        except Exception as exc:  # a bug upstream; an exception here could hang the server
            self._lose(1, f"unencodable event: {exc!r}")
            return
        lost = False
        with self._lock:
            self._counts["enqueued"] += 1
            pending = self._pending
            if self._closed:
                lost = True
            elif len(pending) >= self._settings.max_entries:
                if self._overflow_events:
                    # The spooler has not finished the last overflow yet: disk or spool full.
                    lost = True
                else:
                    # Hand the whole queue to the spooler: O(1) here, the disk work is there.
                    self._overflow.append(pending)
                    self._overflow_events = len(pending)
                    self._pending = pending = collections.deque()
                    self._cond.notify_all()
            if lost:
                self._counts["lost"] += 1
            else:
                pending.append(data)
                size = len(pending)
                if size == 1:
                    self._pending_since = time.monotonic()
                    self._cond.notify_all()
                elif size == self._settings.max_batch_size:
                    self._cond.notify_all()
        if lost:
            self._loss_log.record(
                1, "shipper closed" if self._closed else "memory and spool full", self.lost
            )

    # -- control -----------------------------------------------------------------------------

    def flush(self, timeout: float) -> bool:
        """Send what is in memory now, without waiting for coalescing.

        True once memory is empty: every event enqueued before the call was delivered, or
        written to the spool because the collector is failing. False at the timeout.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flushers += 1
            self._cond.notify_all()
            try:
                while self._pending or self._overflow or self._in_flight or self._spilling:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                return True
            finally:
                self._flushers -= 1

    def close(self, timeout: float | None = None) -> None:
        """Deliver what memory holds within ``timeout``, spool the rest, stop the threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        budget = self._settings.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        delivered = self.flush(budget)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if not delivered:
            self._client.abort()  # a hung POST: the sender then spools its batch itself
        for thread in (self._sender, self._spooler):
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(max(0.5, deadline - time.monotonic()))
        with self._lock:
            leftovers = list(self._pending)
            for chunk in self._overflow:
                leftovers.extend(chunk)
            sender_alive = self._sender.is_alive()
            if sender_alive:  # still stuck: spool a copy of its batch (a re-send is harmless)
                for batch in self._in_flight:
                    leftovers.extend(batch.events())
            self._pending = collections.deque()
            self._overflow.clear()
            self._overflow_events = 0
        if leftovers:
            self._spool_events(leftovers, "shutdown")
        if not sender_alive and not self._spooler.is_alive() and self._spool is not None:
            self._spool.close()
        self._client.close()
        _log(logging.INFO, "shipper_closed", **self.stats())

    def abandon_after_fork(self) -> None:
        """In a forked child: forget this shipper (its threads and queue are the parent's)."""
        with contextlib.suppress(Exception):
            self._closed = True
            self._stopping = True
            if self._spool is not None:
                self._spool.abandon_after_fork()

    def stats(self) -> dict[str, int]:
        """Counters since start, and gauges: events queued, being sent or spooled (in_flight),
        in memory (both), in the spool, and whether the collector is failing.

        Moves between memory, the spool and the loss counter happen in one critical section,
        so an event is never counted in two places, or in none, by one call.
        """
        with self._lock:
            result = dict(self._counts)
            result["queued"] = len(self._pending) + self._overflow_events
            result["in_flight"] = self._spilling + sum(b.count for b in self._in_flight)
            result["in_memory"] = result["queued"] + result["in_flight"]
            result["collector_failing"] = int(self._failing)
        spool = self._spool
        result["spool_batches"] = spool.batches if spool else 0
        result["spool_events"] = spool.events if spool else 0
        result["spool_bytes"] = spool.bytes_used if spool else 0
        return result

    @property
    def lost(self) -> int:
        return self._counts["lost"]

    # -- counting ----------------------------------------------------------------------------

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                self._counts[name] += value

    def _lose(self, count: int, reason: str) -> None:
        self._count(lost=count)
        self._loss_log.record(count, reason, self.lost)

    # -- the threads -------------------------------------------------------------------------

    def _guarded(self, run: Callable[[], None], owns_in_flight: bool) -> None:
        """Run a thread's loop; a bug there is logged and the loop restarted, never silent."""
        while True:
            try:
                run()
                return
            except Exception:
                logger.exception(
                    "shipper_thread_crashed thread=%s", threading.current_thread().name
                )
                with self._cond:
                    if owns_in_flight:
                        # Give back what the crashed sender held, so nothing is lost with it.
                        for batch in self._in_flight:
                            self._pending.extendleft(reversed(batch.events()))
                        self._in_flight.clear()
                        self._pending_since = 0.0
                    if self._stopping:
                        return
                    self._cond.wait(1.0)

    def _open_spool(self) -> None:
        settings = self._settings
        try:
            if settings.spool_max_bytes == 0:
                _log(logging.WARNING, "spool_disabled", reason="spool_max_bytes is 0")
                return
            try:
                self._spool = Spool.open(settings.spool_path(), settings.spool_max_bytes)
            except OSError as exc:
                _log(
                    logging.ERROR,
                    "spool_unavailable",
                    directory=settings.spool_path(),
                    error=exc,
                    consequence="events beyond max_entries are lost while the collector is down",
                )
        finally:
            self._spool_ready.set()

    def _has_spooled(self) -> bool:
        return self._spool is not None and self._spool.oldest() is not None

    def _set_failing(self, failing: bool) -> None:
        with self._cond:
            if failing != self._failing:
                self._failing = failing
                self._cond.notify_all()

    def _run_sender(self) -> None:
        if not self._spool_ready.is_set():
            self._open_spool()
        backoff = Backoff(self._settings.initial_retry_delay, self._settings.max_retry_delay)
        while True:
            with self._lock:
                if self._stopping:
                    return
                failing = self._failing
            if failing:
                backoff.initial = self._settings.initial_retry_delay
                backoff.maximum = self._settings.max_retry_delay
                with self._cond:
                    if self._cond.wait_for(lambda: self._stopping, backoff.next_delay()):
                        return
                ok = self._probe()
            else:
                # While the spool has work, send fresh batches only when they are ready.
                batch = self._take_fresh(block=not self._has_spooled())
                ok = True
                if batch is not None:
                    ok = self._ship_fresh(batch)
                if ok and self._has_spooled():
                    ok = self._replay_oldest()
            if ok:
                if failing:
                    _log(logging.INFO, "collector_recovered", attempts=backoff.attempts)
                backoff.reset()
            self._set_failing(not ok)

    def _take_fresh(self, *, block: bool, force: bool = False) -> _Batch | None:
        """A batch from memory once it is full, old enough or flushed (``force``: any)."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                settings = self._settings
                size = len(self._pending)
                if size:
                    if force or self._flushers or size >= settings.max_batch_size:
                        break
                    remaining = self._pending_since + settings.max_coalescing_delay
                    remaining -= time.monotonic()
                    if remaining <= 0:
                        break
                else:
                    remaining = _IDLE_WAIT
                if not block:
                    return None
                if not self._cond.wait(remaining) and not size:
                    return None  # idle: let the caller look at the spool
            batch = _Batch(self._take_locked(settings.max_batch_size))
            self._in_flight.append(batch)
            return batch

    def _take_locked(self, limit: int) -> list[bytes]:
        pending = self._pending
        if len(pending) <= limit:
            self._pending = collections.deque()
            return list(pending)
        return [pending.popleft() for _ in range(limit)]

    def _probe(self) -> bool:
        """After a failure: try the oldest batch there is."""
        if self._has_spooled():
            return self._replay_oldest()
        batch = self._take_fresh(block=False, force=True)
        if batch is None:
            return True  # nothing to try with; the next batch will tell
        return self._ship_fresh(batch)

    def _ship_fresh(self, batch: _Batch) -> bool:
        """Deliver a batch from memory; one the collector did not take goes to the spool, or
        back to the front of memory when the spool cannot take it."""
        ok = self._deliver(batch)
        spool = self._spool
        spooled = not ok and spool is not None and spool.write(batch.gz(), batch.count) is not None
        # One critical section, so that stats() never counts the batch twice or not at all.
        with self._cond:
            if spooled:
                self._counts["spooled"] += batch.count
            elif not ok:
                # Memory may exceed max_entries by this one batch, until it overflows.
                self._pending.extendleft(reversed(batch.events()))
                self._pending_since = 0.0
            self._in_flight.remove(batch)
            self._cond.notify_all()
        return ok

    def _replay_oldest(self) -> bool:
        spool = self._spool
        spooled = spool.oldest() if spool is not None else None
        if spool is None or spooled is None:
            return True
        try:
            batch = _Batch(None, spool.read(spooled), spooled)
            ok = self._deliver(batch)
        except (OSError, _CorruptBatchError) as exc:
            spool.quarantine(spooled)
            _log(logging.ERROR, "spool_batch_corrupt", path=spooled.path, error=exc)
            self._lose(spooled.count, "corrupt spool batch")
            return True
        if ok:
            spool.remove(spooled)
            self._count(replayed=spooled.count)
        return ok

    def _deliver(self, batch: _Batch) -> bool:
        """POST one batch. True when the collector took it (or it can never be taken)."""
        settings = self._settings
        headers = {"Content-Type": "application/cloudevents-batch+json"}
        if settings.gzip:
            body = batch.gz()
            headers["Content-Encoding"] = "gzip"
        else:
            body = batch.raw()
        try:
            response = self._client.request(
                "POST", "/v1/events", body=body, headers=headers, timeout=settings.timeout
            )
        except (OSError, http.client.HTTPException) as exc:
            self._count(retries=1)
            _log(
                logging.WARNING,
                "collector_unreachable",
                url=settings.collector_url,
                error=repr(exc),
                events=batch.count,
            )
            return False
        status = response.status
        if 200 <= status < 300:
            self._record_ingest(batch, response)
            return True
        if status == 413:
            return self._deliver_split(batch)
        self._count(retries=1)
        detail = response.body[:300].decode("utf-8", "replace")
        if status in (401, 403):
            _log(
                logging.ERROR,
                "collector_refused_token",
                status=status,
                hint="check collector_token; events are kept and retried",
                events=batch.count,
                detail=detail,
            )
        elif status == 429 or status >= 500:
            _log(logging.WARNING, "collector_failed", status=status, events=batch.count)
        else:
            if batch.spooled is not None:
                batch.events()  # raises _CorruptBatchError if the file is what is wrong
            _log(
                logging.ERROR,
                "collector_unexpected_status",
                status=status,
                events=batch.count,
                detail=detail,
            )
        return False

    def _deliver_split(self, batch: _Batch) -> bool:
        events = batch.events()
        if len(events) == 1:
            # A single event larger than the collector takes can never be delivered.
            self._count(rejected=1)
            event_id = _event_id(events[0])
            _log(logging.ERROR, "event_rejected", id=event_id, reason="payload_too_large")
            return True
        _log(logging.INFO, "batch_split", events=len(events), reason="413 payload too large")
        middle = len(events) // 2
        # A half that fails fails the whole: it is kept and retried, and the half already
        # delivered comes back as duplicates, which the collector counts and skips.
        return self._deliver(_Batch(events[:middle])) and self._deliver(_Batch(events[middle:]))

    def _record_ingest(self, batch: _Batch, response: CollectorResponse) -> None:
        try:
            result = _decode_ingest(response.body)
        except msgspec.DecodeError as exc:
            self._count(sent=batch.count)
            _log(logging.ERROR, "collector_answer_unreadable", error=exc, events=batch.count)
            return
        self._count(
            sent=batch.count,
            accepted=result.accepted,
            duplicates=result.duplicates,
            rejected=len(result.rejected),
        )
        for rejection in result.rejected[:_REJECTIONS_LOGGED_PER_BATCH]:
            _log(
                logging.ERROR,
                "event_rejected",
                index=rejection.index,
                id=rejection.id,
                reason=rejection.reason,
            )
        if len(result.rejected) > _REJECTIONS_LOGGED_PER_BATCH:
            _log(logging.ERROR, "events_rejected", count=len(result.rejected))
        answered = result.accepted + result.duplicates + len(result.rejected)
        if answered != batch.count:
            _log(logging.WARNING, "collector_count_mismatch", sent=batch.count, answered=answered)

    def _run_spooler(self) -> None:
        self._spool_ready.wait()
        while True:
            with self._cond:
                while True:
                    if self._overflow:
                        chunk: list[bytes] | collections.deque[bytes] = self._overflow.popleft()
                        reason = "overflow"
                        break
                    if self._stopping:
                        return
                    if self._spill_ready():
                        chunk = self._take_locked(self._settings.max_batch_size)
                        reason = "collector failing"
                        break
                    self._cond.wait(self._spill_wait())
                self._spilling = len(chunk)
                if reason == "overflow":
                    self._overflow_events -= len(chunk)
            try:
                if reason == "overflow":
                    self._spool_events(list(chunk), reason, tracked=True)
                else:
                    self._spill(list(chunk))
            finally:
                with self._cond:
                    self._spilling = 0  # already 0 unless an unexpected error struck
                    self._cond.notify_all()

    def _spill_ready(self) -> bool:
        """Whether memory should go to disk now: collector failing, a batch ready, room."""
        spool = self._spool
        if not self._failing or not self._pending or spool is None:
            return False
        if self._spill_blocked_at is not None:
            if spool.bytes_used >= self._spill_blocked_at:
                return False
            self._spill_blocked_at = None
        if self._flushers or len(self._pending) >= self._settings.max_batch_size:
            return True
        return time.monotonic() >= self._pending_since + self._settings.max_coalescing_delay

    def _spill_wait(self) -> float:
        if self._failing and self._pending:
            due = self._pending_since + self._settings.max_coalescing_delay - time.monotonic()
            return min(_IDLE_WAIT, max(due, 0.01))
        return _IDLE_WAIT

    def _spill(self, events: list[bytes]) -> None:
        spool = self._spool
        batch = _Batch(events)
        written = spool is not None and spool.write(batch.gz(_SPOOL_GZIP_LEVEL), batch.count)
        with self._cond:
            self._spilling -= batch.count
            if written:
                self._counts["spooled"] += batch.count
            else:
                # The spool refused: keep the events in memory until it has room again.
                self._pending.extendleft(reversed(events))
                self._pending_since = 0.0
                self._spill_blocked_at = spool.bytes_used if spool is not None else 0

    def _spool_events(self, events: list[bytes], reason: str, *, tracked: bool = False) -> None:
        """Write events to the spool in batches; what the spool refuses is lost, and counted.

        ``tracked``: the events are counted in ``_spilling`` until written or lost.
        """
        spool = self._spool
        size = self._settings.max_batch_size
        for start in range(0, len(events), size):
            piece = _Batch(events[start : start + size])
            written = spool is not None and spool.write(piece.gz(_SPOOL_GZIP_LEVEL), piece.count)
            with self._cond:
                if tracked:
                    self._spilling -= piece.count
                self._counts["spooled" if written else "lost"] += piece.count
            if not written:
                self._loss_log.record(piece.count, f"{reason}: spool refused the batch", self.lost)


def _event_id(event: bytes) -> str | None:
    try:
        value = msgspec.json.decode(event)
    except msgspec.DecodeError:
        return None
    return str(value.get("id")) if isinstance(value, dict) else None


# -- one shipper per process ---------------------------------------------------------------------

_registry_lock = threading.Lock()
_shippers: dict[tuple[str, str], Shipper] = {}
_registry_pid = os.getpid()
_exit_hook_installed = False


def get_shipper(settings: ShippingSettings) -> Shipper:
    """The process's shipper for this collector and token, created on first use."""
    if _registry_pid != os.getpid():
        _forget_after_fork()
    key = (settings.collector_url, settings.collector_token)
    shipper = _shippers.get(key)  # the common case takes no lock
    if shipper is None:
        with _registry_lock:
            shipper = _shippers.get(key)
            if shipper is None:
                shipper = Shipper(settings)
                _shippers[key] = shipper
                _install_exit_hook()
    if shipper.settings is not settings:
        shipper.reconfigure(settings)
    return shipper


def _install_exit_hook() -> None:
    global _exit_hook_installed
    if not _exit_hook_installed:
        atexit.register(shutdown_all)
        _exit_hook_installed = True


def shutdown_all(timeout: float | None = None) -> None:
    """Close every shipper of this process (atexit, SIGTERM): deliver, or spool what is left."""
    with _registry_lock:
        shippers = [s for s in _shippers.values() if s.pid == os.getpid()]
        _shippers.clear()
    for shipper in shippers:
        try:
            shipper.close(timeout)
        except Exception:
            logger.exception("shipper_close_failed")


def _forget_after_fork() -> None:
    """In a forked child: the parent's shippers have no threads here; start afresh."""
    global _registry_lock, _registry_pid
    _registry_lock = threading.Lock()  # may have been held by a parent thread at fork time
    for shipper in list(_shippers.values()):
        shipper.abandon_after_fork()
    _shippers.clear()
    _registry_pid = os.getpid()


os.register_at_fork(after_in_child=_forget_after_fork)


def install_sigterm_handler() -> bool:
    """Make SIGTERM (Kong stopping the plugin server) flush the shippers before the process ends.

    Call it from the main thread at server start; returns False elsewhere (signal handlers can
    only be set there). The previous handler runs afterwards; the default one ends the process.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        # The handler runs in the main thread between two bytecodes, possibly while that thread
        # holds a shipper's lock (gevent mode): do the work in another thread and bound the wait.
        budget = max((s.settings.shutdown_timeout for s in _shippers.values()), default=0.0)
        worker = threading.Thread(target=shutdown_all, name="token-meter-shutdown", daemon=True)
        worker.start()
        worker.join(budget + 1.0)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    return True
