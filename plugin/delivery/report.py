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
