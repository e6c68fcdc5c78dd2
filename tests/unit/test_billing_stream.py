"""The stream transport's pure parts: how rows become calls without two in flight for one
customer and meter, when a session is renewed, the identifiers of re-sends, and how an error
report is read and what each code makes of the rows it names."""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.billing.error_reports import (
    ERROR_REPORT_EVENT,
    ErrorReportInvalid,
    Remedy,
    parse_error_report,
    policy,
)
from collector.billing.outbox import identifier, next_identifier
from collector.billing.store import PendingRow
from collector.billing.stream import RENEW_AHEAD, renew_at
from collector.billing.stripe_api import MeterEventSession
from collector.billing.sync import Lane, LaneKey, fill_batch, lanes

H0 = datetime(2026, 11, 1, tzinfo=UTC)


def row(customer: str, meter: str, hour: int, seq: int = 1) -> PendingRow:
    start = H0 + timedelta(hours=hour)
    return PendingRow(
        consumer=customer,
        event_name=meter,
        window_start=start,
        seq=seq,
        identifier=identifier(customer, meter, start, seq),
        value=1,
        attempts=0,
        customer=f"cus_{customer}",
    )


ROWS = st.lists(
    st.tuples(st.sampled_from("abcdefgh"), st.sampled_from(["in", "out"]), st.integers(0, 5)),
    unique=True,
    max_size=120,
).map(lambda keys: [row(c, m, h) for c, m, h in sorted(keys, key=lambda k: (k[2], k[0], k[1]))])


@given(ROWS, st.integers(1, 7), st.integers(1, 4), st.lists(st.integers(0, 3), max_size=400))
def test_no_lane_is_in_two_workers_and_each_goes_in_order(
    rows: list[PendingRow], size: int, workers: int, turns: list[int]
) -> None:
    """Workers taking turns in any order: every row goes in exactly one batch of at most
    `size`, all rows of a customer and meter go with one worker, in window order."""
    waiting: deque[Lane] = deque(lanes(rows))
    held: list[dict[LaneKey, deque[PendingRow]]] = [{} for _ in range(workers)]
    sent: list[tuple[int, list[PendingRow]]] = []
    for worker in [t % workers for t in turns] + list(range(workers)) * len(rows):
        batch = fill_batch(held[worker], waiting, size)
        assert len(batch) <= size
        if batch:
            sent.append((worker, batch))
    assert sorted(r.key for _, b in sent for r in b) == sorted(r.key for r in rows)
    owner: dict[LaneKey, int] = {}
    order: dict[LaneKey, list[PendingRow]] = {}
    for worker, batch in sent:
        for r in batch:
            lane = (r.customer, r.event_name)
            assert owner.setdefault(lane, worker) == worker
            order.setdefault(lane, []).append(r)
    for lane_rows in order.values():
        assert lane_rows == sorted(lane_rows, key=lambda r: (r.window_start, r.seq))


def test_batches_fill_up_across_lanes_and_a_lane_spans_batches_of_one_worker() -> None:
    rows = [row("a", "in", h) for h in range(3)] + [row("b", "in", 0), row("c", "in", 0)]
    waiting: deque[Lane] = deque(lanes(rows))
    mine: dict[LaneKey, deque[PendingRow]] = {}
    theirs: dict[LaneKey, deque[PendingRow]] = {}
    first = fill_batch(mine, waiting, 2)
    assert [(r.consumer, r.window_start.hour) for r in first] == [("a", 0), ("a", 1)]
    # Another worker cannot take lane a: it is held with a row to go.
    assert [r.consumer for r in fill_batch(theirs, waiting, 2)] == ["b", "c"]
    assert [(r.consumer, r.window_start.hour) for r in fill_batch(mine, waiting, 2)] == [("a", 2)]
    assert fill_batch(mine, waiting, 2) == [] and not mine


def test_v1_sends_a_lane_one_row_at_a_time() -> None:
    rows = [row("a", "in", 0), row("a", "in", 1), row("b", "in", 0)]
    waiting: deque[Lane] = deque(lanes(rows))
    held: dict[LaneKey, deque[PendingRow]] = {}
    taken = [fill_batch(held, waiting, 1) for _ in range(4)]
    assert [[(r.consumer, r.window_start.hour) for r in b] for b in taken] == [
        [("a", 0)],
        [("a", 1)],
        [("b", 0)],
        [],
    ]


def session(lifetime: float) -> MeterEventSession:
    return MeterEventSession("mes_1", "token", H0, lifetime)


def test_a_session_is_renewed_a_minute_early_or_at_three_quarters_of_a_short_life() -> None:
    assert renew_at(100.0, session(900.0)) == 100.0 + 900.0 - RENEW_AHEAD
    assert renew_at(100.0, session(2.0)) == 101.5
    assert renew_at(100.0, session(-5.0)) == 100.0  # nonsense from Stripe: renew every call


def test_a_resend_identifier_counts_up_and_stays_within_stripes_100_characters() -> None:
    first = identifier("x" * 500, "token_meter_input_tokens", H0, 7)
    assert next_identifier(first) == f"{first}-r1"
    assert next_identifier(f"{first}-r1") == f"{first}-r2"
    assert next_identifier(f"{first}-r99") == f"{first}-r100"
    assert len(next_identifier(f"{first}-r9999")) <= 100


def report(**changes: Any) -> dict[str, Any]:
    """An event shaped as Stripe documents it (docs.stripe.com/api/v2/core/events/object)."""
    event: dict[str, Any] = {
        "id": "evt_test_1",
        "object": "v2.core.event",
        "type": ERROR_REPORT_EVENT,
        "related_object": {"id": "mtr_1", "type": "billing.meter", "url": "/v1/billing/meters/x"},
        "data": {
            "developer_message_summary": "There are 3 invalid events",
            "reason": {
                "error_count": 3,
                "error_types": [
                    {
                        "code": "meter_event_customer_not_found",
                        "error_count": 3,
                        "sample_errors": [
                            {"error_message": "No customer", "request": {"identifier": "a"}},
                            {"error_message": "No customer", "request": {"identifier": "a"}},
                            {"error_message": "No customer", "request": {"identifier": "b"}},
                        ],
                    }
                ],
            },
            "validation_start": "2024-09-26T17:46:10.000Z",
            "validation_end": "2024-09-26T17:46:20.000Z",
        },
    }
    event.update(changes)
    return event


def test_an_error_report_is_read_per_code_with_the_identifiers_it_names() -> None:
    parsed = parse_error_report(report())
    assert parsed.meter_id == "mtr_1" and parsed.event_id == "evt_test_1"
    [dropped] = parsed.errors
    assert dropped.code == "meter_event_customer_not_found" and dropped.count == 3
    assert dropped.identifiers == ("a", "b") and dropped.message == "No customer"


@pytest.mark.parametrize(
    "event",
    [
        report(type="v1.billing.meter.no_meter_found"),
        report(data=None),
        report(related_object=None),
        {"id": "evt_1"},
    ],
)
def test_what_is_not_a_readable_error_report_is_refused(event: dict[str, Any]) -> None:
    with pytest.raises(ErrorReportInvalid):
        parse_error_report(event)


@pytest.mark.parametrize(
    ("code", "remedy", "minutes"),
    [
        ("timestamp_too_far_in_past", Remedy.UNBILLABLE, 0),
        ("timestamp_in_future", Remedy.RESEND, 1),
        ("meter_event_customer_not_found", Remedy.RESEND, 15),
        ("archived_meter", Remedy.RESEND, 15),
        ("meter_event_no_customer_defined", Remedy.RESEND, 15),
        ("a_code_stripe_adds_later", Remedy.RESEND, 15),
    ],
)
def test_only_a_time_too_old_is_never_sent_again(code: str, remedy: Remedy, minutes: int) -> None:
    cure = policy(code)
    assert (cure.remedy, cure.delay) == (remedy, timedelta(minutes=minutes))
