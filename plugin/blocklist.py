"""Which consumers to stop, kept fresh by a background long poll of the collector.

The request path calls ``Blocklist.check(consumer)``: one attribute read, one clock read and one
dict lookup, no lock and no I/O. A daemon thread (one per process and collector) long-polls
``GET <collector_url>/v1/blocklist?wait=<blocklist_wait>`` with ``If-None-Match: "<version>"``: the
collector answers as soon as the list changes (200, a new version) or 304 at the end of the wait.
Each answer replaces the whole state in one assignment, an immutable snapshot, so a check never
sees half an update.

Staleness: the list is stale once no poll has succeeded for ``blocklist_max_stale`` seconds (or
none ever did). Then

- fail-open (the default) keeps applying the last list received: consumers known to be out of
  credit or quota stay blocked, no one else is, and nobody is blocked before the first list;
- fail-closed blocks every consumer with ``blocklist_unavailable`` (503), since who may pass
  cannot be known.

``block_response`` builds the answer Kong sends instead of calling the upstream (contract 1): the
status, body and headers an OpenAI SDK understands.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, NamedTuple

import msgspec

from .delivery import Backoff, CollectorClient

__all__ = [
    "BLOCKLIST_UNAVAILABLE",
    "INSUFFICIENT_CREDITS",
    "PAYMENT_OVERDUE",
    "QUOTA_EXCEEDED",
    "Blocklist",
    "BlocklistSettings",
    "BlocklistSnapshot",
    "block_response",
    "get_blocklist",
    "is_anthropic_path",
]

logger = logging.getLogger("token_meter_plugin")

INSUFFICIENT_CREDITS: Final = "insufficient_credits"
QUOTA_EXCEEDED: Final = "quota_exceeded"
PAYMENT_OVERDUE: Final = "payment_overdue"
BLOCKLIST_UNAVAILABLE: Final = "blocklist_unavailable"

MAX_WAIT: Final = 60  # the collector holds a long poll at most this long (contract 3)
# A collector answering 304 long before the wait is over does not long-poll: do not hammer it.
_EARLY_304_PAUSE: Final = 1.0


def _log(level: int, event: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        detail = " ".join(f"{key}={value}" for key, value in fields.items())
        logger.log(level, "%s %s", event, detail, extra={"token_meter": {"event": event, **fields}})


class SettingsError(ValueError):
    """Invalid settings; ``errors`` lists every problem found, not just the first."""

    def __init__(self, what: str, errors: list[str]) -> None:
        super().__init__(f"invalid {what}: " + "; ".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class BlocklistSettings:
    """Where the blocklist comes from and what to do when it is stale."""

    collector_url: str
    collector_token: str
    # Seconds the collector may hold a poll open waiting for a change (at most 60).
    blocklist_wait: int = 30
    # Seconds without a successful poll after which the list is stale.
    blocklist_max_stale: float = 60.0
    # Stale list: true lets everyone not known to be blocked through; false blocks everyone.
    fail_open: bool = True
    # Seconds to connect, and to wait for an answer beyond blocklist_wait.
    timeout: float = 10.0
    # Backoff between failed polls (capped exponential, full jitter): short, since enforcement
    # resumes only with the next successful poll.
    initial_retry_delay: float = 0.1
    max_retry_delay: float = 5.0

    def __post_init__(self) -> None:
        # The Kong schema validates the URL and token; these rules are the blocklist's own.
        errors = []
        if not 0 <= self.blocklist_wait <= MAX_WAIT:
            errors.append(f"blocklist_wait must be between 0 and {MAX_WAIT} seconds")
        if self.blocklist_max_stale <= self.blocklist_wait:
            errors.append(
                "blocklist_max_stale must be longer than blocklist_wait, or every quiet long "
                "poll would make the list stale"
            )
        if self.timeout <= 0:
            errors.append("timeout must be positive")
        if self.initial_retry_delay <= 0:
            errors.append("initial_retry_delay must be positive")
        if self.max_retry_delay < self.initial_retry_delay:
            errors.append("max_retry_delay must be at least initial_retry_delay")
        if errors:
            raise SettingsError("blocklist settings", errors)


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

    def __init__(
        self, settings: BlocklistSettings, initial: BlocklistSnapshot | None = None
    ) -> None:
        self._settings = settings
        self.pid = os.getpid()
        self._snapshot = initial or _EMPTY
        self._stopping = threading.Event()
        self._client = CollectorClient(settings.collector_url, settings.collector_token)
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
        if self.pid != os.getpid():  # a stale reference in a forked child
            return get_blocklist(self._settings).check(consumer)
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

    def abandon_after_fork(self) -> None:
        """In a forked child: this object's thread is the parent's; stop using it."""
        self._stopping.set()

    # -- the poller ------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = Backoff(self._settings.initial_retry_delay, self._settings.max_retry_delay)
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
                backoff.maximum = self._settings.max_retry_delay
                pause = backoff.next_delay()
            else:
                backoff.reset()
            if pause and self._stopping.wait(pause):
                return

    def _poll_once(self) -> float:
        """One long poll; returns how long to pause before the next one."""
        settings = self._settings
        version = self._snapshot.version
        headers = {"Accept": "application/json"}
        if version is not None:
            headers["If-None-Match"] = f'"{version}"'
        started = time.monotonic()
        response = self._client.request(
            "GET",
            f"/v1/blocklist?wait={settings.blocklist_wait}",
            headers=headers,
            timeout=settings.blocklist_wait + settings.timeout,
        )
        self._counts["polls"] += 1
        now = time.monotonic()
        if response.status == 304:
            previous = self._snapshot
            self._snapshot = BlocklistSnapshot(previous.version, previous.entries, now)
            self._counts["unchanged"] += 1
            if now - started < settings.blocklist_wait / 2:
                return min(_EARLY_304_PAUSE, float(settings.blocklist_wait))
            return 0.0
        if response.status != 200:
            level = logging.ERROR if response.status in (401, 403) else logging.WARNING
            detail = response.body[:300].decode("utf-8", "replace")
            _log(level, "blocklist_refused", status=response.status, detail=detail)
            raise _PollError(f"HTTP {response.status}")
        try:
            body = _decode_body(response.body)
        except msgspec.DecodeError as exc:
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

_registry_lock = threading.Lock()
_blocklists: dict[tuple[str, str], Blocklist] = {}
_registry_pid = os.getpid()


def get_blocklist(settings: BlocklistSettings) -> Blocklist:
    """The process's blocklist for this collector and token, polling from first use."""
    if _registry_pid != os.getpid():
        _forget_after_fork()
    key = (settings.collector_url, settings.collector_token)
    blocklist = _blocklists.get(key)
    if blocklist is None:
        with _registry_lock:
            blocklist = _blocklists.get(key)
            if blocklist is None:
                blocklist = Blocklist(settings, _inherited.pop(key, None))
                _blocklists[key] = blocklist
    if blocklist.settings is not settings:
        blocklist.reconfigure(settings)
    return blocklist


# Lists a forked child inherited: still the best knowledge until its own first poll.
_inherited: dict[tuple[str, str], BlocklistSnapshot] = {}


def _forget_after_fork() -> None:
    global _registry_lock, _registry_pid
    _registry_lock = threading.Lock()
    for key, blocklist in list(_blocklists.items()):
        blocklist.abandon_after_fork()
        _inherited[key] = blocklist.snapshot()
    _blocklists.clear()
    _registry_pid = os.getpid()


os.register_at_fork(after_in_child=_forget_after_fork)


def close_all() -> None:
    """Stop every blocklist poller of this process."""
    with _registry_lock:
        blocklists = list(_blocklists.values())
        _blocklists.clear()
    for blocklist in blocklists:
        with contextlib.suppress(Exception):
            blocklist.close()


# -- the answer to a blocked consumer ------------------------------------------------------------


class _Block(NamedTuple):
    status: int
    openai_type: str
    anthropic_type: str
    message: str
    retry: bool


_PREPAID_MESSAGE: Final = (
    "You have run out of prepaid credit for this API. Add credit to your account, then retry "
    "the request."
)
_BLOCKS: Final = {
    INSUFFICIENT_CREDITS: _Block(
        402, "insufficient_quota", "billing_error", _PREPAID_MESSAGE, retry=False
    ),
    PAYMENT_OVERDUE: _Block(
        402,
        "insufficient_quota",
        "billing_error",
        "An invoice of your account is unpaid or overdue. Pay it, then retry the request.",
        retry=False,
    ),
    QUOTA_EXCEEDED: _Block(
        429,
        "insufficient_quota",
        "rate_limit_error",
        "You have used all the tokens of your monthly quota for this API. Usage resets at the "
        "start of next month (UTC); ask for a higher quota to continue now.",
        retry=False,
    ),
    # Not the consumer's fault and not permanent: the gateway cannot tell whether the consumer
    # may pass (fail-closed, blocklist stale). A retry later can succeed, so the SDK may retry.
    BLOCKLIST_UNAVAILABLE: _Block(
        503,
        "service_unavailable",
        "api_error",
        "The gateway cannot verify your remaining credit and quota right now. Retry in a few "
        "seconds.",
        retry=True,
    ),
}
_SAFE_CODE = re.compile(r"^[a-z0-9_]{1,64}$")
_RETRY_AFTER_SECONDS: Final = "5"
# Anthropic's Messages API (and its token counting) as the client called it, behind any prefix
# the Kong route adds: `/anthropic/v1/messages`.
_ANTHROPIC_PATH = re.compile(r"/v1/messages(?:/count_tokens)?/?$")


def is_anthropic_path(path: object) -> bool:
    """Whether a request path is Anthropic's Messages API, which has its own error shape."""
    return isinstance(path, str) and _ANTHROPIC_PATH.search(path.split("?", 1)[0]) is not None


def block_response(reason: str, *, anthropic: bool = False) -> tuple[int, bytes, dict[str, str]]:
    """Status, JSON body and headers for a request blocked with ``reason`` (contract 1).

    OpenAI's error shape by default, Anthropic's (``{"type": "error", "error": {...}}``) for an
    Anthropic route. A reason this version does not know (a newer collector's) still blocks,
    with 402 and that code.
    """
    code = reason if _SAFE_CODE.match(reason) else "blocked"
    block = _BLOCKS.get(code) or _Block(
        402,
        "insufficient_quota",
        "billing_error",
        f"Requests from your account to this API are blocked (reason: {code}).",
        retry=False,
    )
    error: dict[str, Any]
    if anthropic:
        error = {"type": "error", "error": {"type": block.anthropic_type, "message": block.message}}
    else:
        error = {
            "error": {
                "message": block.message,
                "type": block.openai_type,
                "param": None,
                "code": code,
            }
        }
    headers = {
        "Content-Type": "application/json",
        "X-Token-Meter-Reason": code,
        # Both OpenAI's and Anthropic's SDKs obey it.
        "x-should-retry": "true" if block.retry else "false",
    }
    if block.retry:
        headers["Retry-After"] = _RETRY_AFTER_SECONDS
    return block.status, msgspec.json.encode(error), headers
