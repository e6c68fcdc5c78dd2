"""Which consumers to stop, kept fresh by a background long poll of the collector.

The request path calls ``Blocklist.check(consumer)``: one attribute read, one clock read and one
dict lookup, no lock and no I/O. A daemon thread (one per process and collector) long-polls
``GET <collector_url>/v1/blocklist?wait=<seconds>`` with ``If-None-Match: "<version>"``: the
collector answers as soon as the list changes (200, a new version) or 304 at the end of the wait,
which is half of ``blocklist_max_stale`` (at most 30 s), so a quiet poll never makes it stale.
Each answer replaces the whole state in one assignment, an immutable snapshot, so a check never
sees half an update.

Staleness: the list is stale once no poll has succeeded for ``blocklist_max_stale`` seconds (or
none ever did). Then

- fail-open (the default) keeps applying the last list received: consumers known to be out of
  credit or quota stay blocked, no one else is, and nobody is blocked before the first list;
- fail-closed blocks every consumer with ``blocklist_unavailable`` (503), since who may pass
  cannot be known.

The settings are a view of the plugin config (``plugin/config.py``, which holds every rule); the
answer a blocked consumer gets is built in ``block_answer``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import logging
import threading
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, NamedTuple

import msgspec

from .block_answer import BLOCKLIST_UNAVAILABLE
from .config import PluginConfig, default_of
from .delivery import Backoff, CollectorClient

__all__ = ["Blocklist", "BlocklistSettings", "BlocklistSnapshot", "close_all", "get_blocklist"]

logger = logging.getLogger("token_meter_plugin")

# The longest long poll asked for; the collector holds one at most 60 s (contract 3).
MAX_WAIT: Final = 30.0
# A failed poll is retried within this, whatever max_retry_delay is: enforcement resumes only
# with the next successful poll.
MAX_POLL_RETRY_DELAY: Final = 5.0
# A collector answering 304 long before the wait is over does not long-poll: do not hammer it.
_EARLY_304_PAUSE: Final = 1.0


def _log(level: int, event: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        detail = " ".join(f"{key}={value}" for key, value in fields.items())
        logger.log(level, "%s %s", event, detail, extra={"token_meter": {"event": event, **fields}})


@dataclass(frozen=True, slots=True)
class BlocklistSettings:
    """Where the blocklist comes from and what to do when it is stale: a view of the plugin
    config. Its defaults are the config's, for what builds one by hand (tests)."""

    collector_url: str
    collector_token: str
    # PEM file of the CAs an https:// collector is verified against (None: the system's).
    collector_ca_bundle: str | None = None
    # Seconds without a successful poll after which the list is stale.
    blocklist_max_stale: float = default_of("blocklist_max_stale", float)
    # Stale list: true lets everyone not known to be blocked through; false blocks everyone.
    fail_open: bool = default_of("fail_open", bool)
    # Seconds to connect, and to wait for an answer beyond the long poll's wait.
    timeout: float = default_of("timeout", float)
    # Backoff between failed polls (capped exponential, full jitter), capped by the shorter of
    # max_retry_delay and MAX_POLL_RETRY_DELAY.
    initial_retry_delay: float = default_of("initial_retry_delay", float)
    max_retry_delay: float = default_of("max_retry_delay", float)

    @classmethod
    def of(cls, config: PluginConfig) -> BlocklistSettings:
        """The blocklist part of a plugin config: each field is the config's field of that name."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    @property
    def wait(self) -> float:
        """Seconds the collector may hold a poll open: half the staleness bound, so that a poll
        that ends with no change (304) always renews the list before it is stale."""
        return min(MAX_WAIT, self.blocklist_max_stale / 2)

    @property
    def poll_retry_cap(self) -> float:
        return min(self.max_retry_delay, MAX_POLL_RETRY_DELAY)


class BlocklistSnapshot(NamedTuple):
    """One version of the list, and when a poll last confirmed it (monotonic seconds)."""

    version: int | None
    entries: MappingProxyType[str, str]  # consumer -> reason code
    refreshed_at: float | None


_EMPTY: Final = BlocklistSnapshot(None, MappingProxyType({}), None)


class _Entry(msgspec.Struct):
    consumer: str
    reason: str


class _Body(msgspec.Struct):
    version: int
    entries: list[_Entry]


_decode_body = msgspec.json.Decoder(_Body).decode


class Blocklist:
    """The process's view of the collector's blocklist, refreshed by one daemon thread."""

    def __init__(self, settings: BlocklistSettings) -> None:
        self._settings = settings
        self._snapshot = _EMPTY
        self._stopping = threading.Event()
        self._client = CollectorClient(
            settings.collector_url, settings.collector_token, settings.collector_ca_bundle
        )
        self._counts = {"polls": 0, "updates": 0, "unchanged": 0, "errors": 0}
        self._thread = threading.Thread(target=self._run, name="token-meter-blocklist", daemon=True)
        self._thread.start()

    @property
    def settings(self) -> BlocklistSettings:
        return self._settings

    def reconfigure(self, settings: BlocklistSettings) -> None:
        """Take new staleness, fail-open and timing settings from a config push."""
        self._settings = settings

    def check(self, consumer: str) -> str | None:
        """The reason code to block ``consumer`` with, or None to let the request through."""
        snapshot = self._snapshot  # one read: the state cannot change under us
        settings = self._settings
        refreshed_at = snapshot.refreshed_at
        if (
            refreshed_at is None or time.monotonic() - refreshed_at > settings.blocklist_max_stale
        ) and not settings.fail_open:
            return BLOCKLIST_UNAVAILABLE
        return snapshot.entries.get(consumer)

    def may_block(self) -> bool:
        """Whether `check` could block anyone now: a non-empty list, or a stale one with
        fail-closed. When not, the access phase need not ask Kong who the consumer is."""
        if self._snapshot.entries:
            return True
        return not self._settings.fail_open and self.is_stale()

    def snapshot(self) -> BlocklistSnapshot:
        """The current list, as one consistent version."""
        return self._snapshot

    def is_stale(self) -> bool:
        refreshed_at = self._snapshot.refreshed_at
        return (
            refreshed_at is None
            or time.monotonic() - refreshed_at > self._settings.blocklist_max_stale
        )

    def stats(self) -> dict[str, int | float | None]:
        snapshot = self._snapshot
        refreshed_at = snapshot.refreshed_at
        return {
            **self._counts,
            "version": snapshot.version,
            "entries": len(snapshot.entries),
            "age_seconds": None if refreshed_at is None else time.monotonic() - refreshed_at,
        }

    def close(self) -> None:
        """Stop polling (the thread ends after breaking its long poll)."""
        self._stopping.set()
        self._client.abort()
        self._thread.join(2.0)
        self._client.close()

    # -- the poller ------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = Backoff(self._settings.initial_retry_delay, self._settings.poll_retry_cap)
        while not self._stopping.is_set():
            try:
                pause = self._poll_once()
            except Exception as exc:  # network, protocol or a bug: keep polling regardless
                if self._stopping.is_set():
                    return
                self._counts["errors"] += 1
                if isinstance(exc, (OSError, http.client.HTTPException, _PollError)):
                    _log(logging.WARNING, "blocklist_poll_failed", error=exc, stale=self.is_stale())
                else:
                    logger.exception("blocklist_poll_crashed")
                backoff.initial = self._settings.initial_retry_delay
                backoff.maximum = self._settings.poll_retry_cap
                pause = backoff.next_delay()
            else:
                backoff.reset()
            if pause and self._stopping.wait(pause):
                return

    def _poll_once(self) -> float:
        """One long poll; returns how long to pause before the next one."""
        wait = self._settings.wait
        timeout = self._settings.timeout
        version = self._snapshot.version
        headers = {"Accept": "application/json"}
        if version is not None:
            headers["If-None-Match"] = f'"{version}"'
        started = time.monotonic()
        response = self._client.request(
            "GET",
            f"/v1/blocklist?wait={wait:g}",
            headers=headers,
            timeout=wait + timeout,
        )
        self._counts["polls"] += 1
        now = time.monotonic()
        if response.status == 304:
            previous = self._snapshot
            self._snapshot = BlocklistSnapshot(previous.version, previous.entries, now)
            self._counts["unchanged"] += 1
            if now - started < wait / 2:
                return min(_EARLY_304_PAUSE, wait)
            return 0.0
        if response.status != 200:
            level = logging.ERROR if response.status in (401, 403) else logging.WARNING
            detail = response.body[:300].decode("utf-8", "replace")
            _log(level, "blocklist_refused", status=response.status, detail=detail)
            raise _PollError(f"HTTP {response.status}")
        try:
            body = _decode_body(response.body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # not UTF-8: the latter
            raise _PollError(f"unreadable blocklist: {exc}") from exc
        entries = {entry.consumer: entry.reason for entry in body.entries}
        # The whole state in one assignment: readers see the old snapshot or the new one.
        previous = self._snapshot
        self._snapshot = BlocklistSnapshot(body.version, MappingProxyType(entries), now)
        self._counts["updates"] += 1
        if previous.version != body.version:
            _log(logging.INFO, "blocklist_updated", version=body.version, entries=len(entries))
        return 0.0


class _PollError(Exception):
    """The collector answered, but not with a blocklist."""


# -- one blocklist per process -------------------------------------------------------------------

# The plugin server is one process that never forks (a supervisor would exec its workers), so
# one registry per process is one per server.
_registry_lock = threading.Lock()
_blocklists: dict[tuple[str, str, str | None], Blocklist] = {}


def get_blocklist(settings: BlocklistSettings) -> Blocklist:
    """The process's blocklist for this collector, token and CA bundle, polling from first
    use."""
    key = (settings.collector_url, settings.collector_token, settings.collector_ca_bundle)
    blocklist = _blocklists.get(key)
    if blocklist is None:
        with _registry_lock:
            blocklist = _blocklists.get(key)
            if blocklist is None:
                blocklist = Blocklist(settings)
                _blocklists[key] = blocklist
    if blocklist.settings is not settings:
        blocklist.reconfigure(settings)
    return blocklist


def close_all() -> None:
    """Stop every blocklist poller of this process."""
    with _registry_lock:
        blocklists = list(_blocklists.values())
        _blocklists.clear()
    for blocklist in blocklists:
        with contextlib.suppress(Exception):
            blocklist.close()
