"""The sender thread: batches from the outbox to the collector, retried until settled.

One thread per shipper. It waits until a batch is due (``max_batch_size`` unsent events, or
``max_coalescing_delay`` after the oldest unsent one arrived, or a flush), takes it from the
outbox, POSTs it gzip'd to ``<collector_url>/v1/events`` and acts on the verdict of
``answers.classify``: a batch split by a 413 or to isolate a poison event is delivered piece by
piece, in order; a piece that fails is retried, after a capped exponential backoff with full
jitter, until the collector takes it. The outbox forgets the batch only once every piece is
settled. Retries never stop, and nothing is dropped for age.
"""

from __future__ import annotations

import collections
import gzip
import http.client
import logging
import threading
import time
from collections.abc import Callable
from typing import Final

import msgspec

from .answers import TOKEN_REFUSED, Delivered, Refused, Retry, Split, Tally, Verdict, classify
from .answers import unreachable as unreachable_verdict
from .client import Backoff, CollectorClient
from .outbox import Batch, Outbox
from .report import log, logger
from .settings import DeliverySettings

IDLE_WAIT: Final = 1.0
GZIP_LEVEL: Final = 1  # about 6 ms per 1000 events on a busy core, against 14 ms at level 6
_REJECTIONS_LOGGED_PER_BATCH: Final = 20
_HEADERS: Final = {
    "Content-Type": "application/cloudevents-batch+json",
    "Content-Encoding": "gzip",
}


def due_in(
    unsent: int, oldest: float, now: float, *, max_batch_size: int, delay: float, urgent: bool
) -> float:
    """Seconds until the next batch should go (0: now; inf: nothing to send)."""
    if unsent == 0:
        return float("inf")
    if urgent or unsent >= max_batch_size:
        return 0.0
    return max(0.0, oldest + delay - now)


class _EventId(msgspec.Struct):
    id: str | None = None


def _event_id(event: bytes) -> str | None:
    try:
        return msgspec.json.decode(event, type=_EventId).id
    except msgspec.DecodeError:
        return None


class _Delivery:
    """A batch on its way: the pieces not settled yet, and what the collector said of the rest."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.pieces = collections.deque([batch.events] if batch.events else [])
        self.tally = Tally()


class Sender:
    def __init__(self, outbox: Outbox, settings: Callable[[], DeliverySettings]) -> None:
        first = settings()
        self._outbox = outbox
        self._settings = settings
        self._cond = outbox.cond
        self._client = CollectorClient(
            first.collector_url, first.collector_token, first.collector_ca_bundle
        )
        self._thread = threading.Thread(target=self._run, name="token-meter-sender", daemon=True)
        self._start_lock = threading.Lock()
        self.started = False
        self.failing = False
        self._stopping = False
        self._flushers = 0

    def start(self) -> None:
        with self._start_lock:
            if not self.started and not self._stopping:
                self._thread.start()
                self.started = True

    def flush(self, timeout: float) -> bool:
        """Send without waiting for coalescing; True once everything journaled or held in
        memory before the call is acknowledged, False at the timeout.

        Events held (the spool refused them) have no journal position yet: the target is taken
        once they have left the hold, which they do in order and before anything appended
        later, so the journal's end then covers them."""
        deadline = time.monotonic() + timeout
        outbox = self._outbox
        with self._cond:
            mark = outbox.held_mark()
            self._flushers += 1
            self._cond.notify_all()
            try:
                target = None
                while True:
                    if target is None and outbox.released_through(mark):
                        target = outbox.end()
                        if target is None:
                            return True
                    if target is not None and outbox.acknowledged_through(target):
                        return True
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._stopping:
                        return False
                    self._cond.wait(remaining)
            finally:
                self._flushers -= 1

    def stop(self, timeout: float) -> None:
        """Stop the thread, breaking a POST in progress; what it held stays in the journal."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._client.abort()
        if self.started and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._client.close()

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                self._loop()
                return
            except Exception:  # a bug: logged, and the loop restarted, never silent
                logger.exception("sender_crashed")
                self._outbox.rewind()
                if self._pause(IDLE_WAIT):
                    return

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``, keeping up the outbox's housekeeping (an outage is when the journal
        grows and events may be lost); True when the sender is stopping."""
        deadline = time.monotonic() + seconds
        while True:
            self._outbox.maintain()
            remaining = deadline - time.monotonic()
            with self._cond:
                if self._cond.wait_for(lambda: self._stopping, min(max(remaining, 0.0), IDLE_WAIT)):
                    return True
            if remaining <= IDLE_WAIT:
                return False

    def _loop(self) -> None:
        settings = self._settings()
        backoff = Backoff(settings.initial_retry_delay, settings.max_retry_delay)
        while not self._outbox.is_open:  # the disk refused at start: try again, with backoff
            if self._pause(backoff.next_delay()):
                return
            self._outbox.open()
        self._outbox.recover()
        backoff.reset()
        delivery: _Delivery | None = None
        while True:
            if delivery is None:
                batch = self._wait_for_batch()
                if batch is None:
                    return
                delivery = _Delivery(batch)
            if self._deliver(delivery):
                self._outbox.acknowledge(delivery.batch, delivery.tally)
                delivery = None
                if self.failing:
                    log(logging.INFO, "collector_recovered", attempts=backoff.attempts)
                    self.failing = False
                backoff.reset()
                continue
            self._outbox.count("retries")
            self.failing = True
            settings = self._settings()
            backoff.initial = settings.initial_retry_delay
            backoff.maximum = settings.max_retry_delay
            if self._pause(backoff.next_delay()):
                return

    def _wait_for_batch(self) -> Batch | None:
        outbox = self._outbox
        while True:
            outbox.maintain()
            with self._cond:
                if self._stopping:
                    return None
                settings = self._settings()
                wait = due_in(
                    outbox.unsent,
                    outbox.oldest_unsent_arrival(),
                    time.monotonic(),
                    max_batch_size=settings.max_batch_size,
                    delay=settings.max_coalescing_delay,
                    urgent=self._flushers > 0,
                )
                if wait > 0:
                    self._cond.wait(min(wait, IDLE_WAIT))
                    continue
            batch = outbox.next_batch(settings.max_batch_size)
            if batch is not None:
                return batch
            if self._pause(IDLE_WAIT):
                return None

    def _deliver(self, delivery: _Delivery) -> bool:
        """POST the pieces not settled yet, in order: True once all are, False at the first
        failure (that piece and the rest are kept for the retry)."""
        pieces = delivery.pieces
        while pieces:
            events = pieces[0]
            verdict = self._post(events)
            if isinstance(verdict, Retry):
                self._log_retry(verdict, len(events))
                return False
            pieces.popleft()
            if isinstance(verdict, Split):
                log(logging.INFO, "batch_split", events=len(events), status=verdict.status)
                middle = len(events) // 2
                pieces.extendleft((events[middle:], events[:middle]))
                continue
            delivery.tally.add(verdict, len(events))
            self._log_settled(verdict, events)
        return True

    def _post(self, events: list[bytes]) -> Verdict:
        settings = self._settings()
        self._client.token = settings.collector_token  # a config push takes effect here
        self._client.trust(settings.collector_ca_bundle)
        body = gzip.compress(b"[" + b",".join(events) + b"]", compresslevel=GZIP_LEVEL)
        try:
            response = self._client.request(
                "POST", "/v1/events", body=body, headers=_HEADERS, timeout=settings.timeout
            )
        except (OSError, http.client.HTTPException) as exc:
            return unreachable_verdict(exc)
        return classify(response.status, response.body, len(events))

    def _log_retry(self, verdict: Retry, events: int) -> None:
        url = self._settings().collector_url
        if verdict.status is None:
            log(
                logging.ERROR if verdict.config_error else logging.WARNING,
                "collector_unreachable",
                url=url,
                error=verdict.detail,
                events=events,
            )
        elif verdict.status in TOKEN_REFUSED:
            log(
                logging.ERROR,
                "collector_refused_token",
                status=verdict.status,
                hint="check collector_token; events are kept and retried",
                events=events,
                detail=repr(verdict.detail),
            )
        elif verdict.config_error:
            log(
                logging.ERROR,
                "collector_misconfigured",
                url=url,
                status=verdict.status,
                hint="collector_url does not reach the collector's /v1/events; events are kept",
                events=events,
                detail=repr(verdict.detail),
            )
        else:
            log(logging.WARNING, "collector_failed", status=verdict.status, events=events)

    def _log_settled(self, verdict: Delivered | Refused, events: list[bytes]) -> None:
        if isinstance(verdict, Refused):
            reason = "payload_too_large" if verdict.status == 413 else repr(verdict.detail)
            log(
                logging.ERROR,
                "event_rejected",
                id=_event_id(events[0]),
                status=verdict.status,
                reason=reason,
            )
            return
        if not verdict.readable:
            log(logging.ERROR, "collector_answer_unreadable", events=len(events))
            return
        for rejection in verdict.rejections[:_REJECTIONS_LOGGED_PER_BATCH]:
            log(
                logging.ERROR,
                "event_rejected",
                index=rejection.index,
                id=rejection.id,
                reason=repr(rejection.reason),
            )
        if len(verdict.rejections) > _REJECTIONS_LOGGED_PER_BATCH:
            log(logging.ERROR, "events_rejected", count=len(verdict.rejections))
        answered = verdict.accepted + verdict.duplicates + len(verdict.rejections)
        if answered != len(events):
            log(logging.WARNING, "collector_count_mismatch", sent=len(events), answered=answered)
