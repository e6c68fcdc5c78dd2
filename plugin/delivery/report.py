"""How delivery reports: structured log lines, and losses rate-limited but never silent."""

from __future__ import annotations

import logging
import time
from typing import Any, Final

logger = logging.getLogger("token_meter_plugin")

LOSS_LOG_INTERVAL: Final = 10.0
_MAX_REASONS: Final = 8  # distinct reasons kept per interval; further ones are summed as "other"


def log(level: int, event: str, **fields: Any) -> None:
    """One structured line: a snake_case event name and key=value fields (also in ``extra``)."""
    if logger.isEnabledFor(level):
        detail = " ".join(f"{key}={value}" for key, value in fields.items())
        logger.log(level, "%s %s", event, detail, extra={"token_meter": {"event": event, **fields}})


class LossLog:
    """Error lines for lost events: the first loss at once, then at most one line per interval
    summing what was lost since, by reason.

    Not thread-safe: the outbox calls it under its lock, in the critical section that counts the
    loss, and writes the line returned by ``due`` after releasing the lock.
    """

    def __init__(self, interval: float = LOSS_LOG_INTERVAL) -> None:
        self._interval = interval
        self._unlogged: dict[str, int] = {}
        self._last = -interval

    def note(self, count: int, reason: str) -> None:
        if reason not in self._unlogged and len(self._unlogged) >= _MAX_REASONS:
            reason = "other"
        self._unlogged[reason] = self._unlogged.get(reason, 0) + count

    def due(self, *, force: bool = False) -> dict[str, int] | None:
        """The losses to log now (by reason), or None: nothing unlogged, or logged too recently."""
        now = time.monotonic()
        if not self._unlogged or (not force and now - self._last < self._interval):
            return None
        unlogged, self._unlogged, self._last = self._unlogged, {}, now
        return unlogged


def log_losses(unlogged: dict[str, int] | None, lost_total: int) -> None:
    if unlogged:
        reasons = "; ".join(f"{reason}: {count}" for reason, count in unlogged.items())
        log(
            logging.ERROR,
            "events_lost",
            count=sum(unlogged.values()),
            reasons=repr(reasons),
            lost_total=lost_total,
        )


class HoldLog:
    """The lines about events held in memory because the spool refused them: a warning when the
    hold takes an event while it was empty, and an info line once it has drained into the
    journal, with how many were held.

    Rate-limited like the loss lines: at most one warning per interval, a warning kept back
    is written once the interval allows (the sender's ``maintain`` asks) if the hold is still
    not empty, and a drain is logged only after a warning, so a spool that fails and recovers
    at request rate writes one pair of lines per interval, not one per request. Not
    thread-safe: the outbox calls it under its lock and logs after releasing it.
    """

    def __init__(self, interval: float = LOSS_LOG_INTERVAL) -> None:
        self._interval = interval
        self._last = -interval
        self._pending: str | None = None  # the error of a hold not warned of yet
        self._warned = False  # a warning written, its drain not yet
        self._held = 0  # events held since the last drain line

    def held(self, error: str, *, first: bool) -> None:
        """One event went to the hold; ``first``: the hold was empty."""
        self._held += 1
        if first and not self._warned:
            self._pending = error

    def warning_due(self, *, force: bool = False) -> str | None:
        """The error to warn of now, or None: nothing to warn of, or warned too recently."""
        if self._pending is None:  # the common case, on every append: no clock read
            return None
        now = time.monotonic()
        if not force and now - self._last < self._interval:
            return None
        error, self._pending, self._last, self._warned = self._pending, None, now, True
        return error

    def drained(self) -> int | None:
        """The hold is empty again: how many events it took since the last drain line, when
        that is to be logged (a warning preceded), else None."""
        self._pending = None
        if not self._warned:
            return None
        held, self._held, self._warned = self._held, 0, False
        return held
