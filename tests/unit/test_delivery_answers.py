"""What the collector's answers mean, the backoff between retries, and when a batch is due."""

from __future__ import annotations

import json

import pytest

from token_meter_plugin.delivery import Backoff
from token_meter_plugin.delivery.answers import (
    Delivered,
    Refused,
    Retry,
    Split,
    Tally,
    classify,
    unreachable,
)
from token_meter_plugin.delivery.sender import due_in


def ingest_answer(accepted: int, duplicates: int = 0, rejected: int = 0) -> bytes:
    rejections = [{"index": i, "id": f"r-{i}", "reason": "bad"} for i in range(rejected)]
    return json.dumps(
        {"accepted": accepted, "duplicates": duplicates, "rejected": rejections}
    ).encode()


def test_a_2xx_counts_accepted_duplicates_and_rejections() -> None:
    verdict = classify(200, ingest_answer(3, 1, 2), 6)
    assert isinstance(verdict, Delivered)
    assert (verdict.accepted, verdict.duplicates, verdict.readable) == (3, 1, True)
    assert [(r.index, r.id, r.reason) for r in verdict.rejections] == [
        (0, "r-0", "bad"),
        (1, "r-1", "bad"),
    ]
    tally = Tally()
    tally.add(verdict, 6)
    tally.add(Refused(413, ""), 1)
    assert (tally.sent, tally.accepted, tally.duplicates, tally.rejected) == (6, 3, 1, 3)


def test_an_unreadable_2xx_is_still_delivered() -> None:
    assert classify(200, b"<html>", 5) == Delivered(0, 0, [], readable=False)


@pytest.mark.parametrize("status", [413, 400, 409, 422])
def test_a_batch_the_collector_will_not_take_is_split_down_to_one_refused_event(
    status: int,
) -> None:
    assert classify(status, b"{}", 2) == Split(status)
    assert classify(status, b'{"title": "no"}', 1) == Refused(status, '{"title": "no"}')


@pytest.mark.parametrize("status", [401, 403, 404, 405, 407, 415, 301, 302, 101])
def test_configuration_errors_keep_the_events_for_a_retry(status: int) -> None:
    for events in (1, 100):
        verdict = classify(status, b"", events)
        assert isinstance(verdict, Retry)
        assert verdict.config_error


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504, 599])
def test_transient_failures_are_retried(status: int) -> None:
    verdict = classify(status, b"busy", 1)
    assert verdict == Retry(status, "busy", config_error=False)


def test_no_answer_is_retried() -> None:
    verdict = unreachable(ConnectionRefusedError(111, "refused"))
    assert verdict.status is None and not verdict.config_error
    assert "refused" in verdict.detail


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    caps: list[float] = []

    def highest(low: float, high: float) -> float:
        caps.append(high)
        return high

    backoff = Backoff(0.1, 1.0, rng=highest)
    for _ in range(6):
        backoff.next_delay()
    assert caps == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    assert backoff.next_delay() == 0.1
    assert 0 <= Backoff(0.1, 1.0).next_delay() <= 0.1


def test_a_batch_is_due_when_full_when_its_oldest_event_waited_enough_or_on_flush() -> None:
    def due(unsent: int, oldest: float, *, urgent: bool = False) -> float:
        return due_in(unsent, oldest, 10.0, max_batch_size=100, delay=0.2, urgent=urgent)

    assert due(0, 10.0) == float("inf")
    assert due(5, 9.9) == pytest.approx(0.1)
    assert due(5, 9.0) == 0.0
    assert due(5, float("-inf")) == 0.0  # read back from disk: it waited long enough
    assert due(100, 10.0) == 0.0
    assert due(5, 10.0, urgent=True) == 0.0
