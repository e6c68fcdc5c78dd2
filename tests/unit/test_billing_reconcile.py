"""Reconcile's arithmetic: periods and Stripe's alignment rules, statuses, and which rows of an
hour Stripe provably lacks."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.billing.reconcile import (
    LocalDay,
    Query,
    SentRow,
    Status,
    Unresolved,
    ceil_to,
    compare,
    lacking,
    parse_instant,
    period,
    queries,
    status,
)

DEC_2 = datetime(2026, 12, 2, tzinfo=UTC)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_instants_are_dates_or_rfc3339_times_with_an_offset() -> None:
    assert parse_instant("from", "2026-12-01") == at("2026-12-01T00:00:00")
    assert parse_instant("from", "2026-12-01T10:15:00Z") == at("2026-12-01T10:15:00")
    assert parse_instant("to", "2026-12-01T10:15:00+02:00") == at("2026-12-01T08:15:00")
    for bad, problem in (("2026-12-01T10:15:00", "time zone"), ("yesterday", "RFC 3339")):
        with pytest.raises(ValueError, match=problem):
            parse_instant("from", bad)


def test_the_default_period_is_the_month_up_to_now_minus_settle() -> None:
    now = at("2026-12-02T14:30:00")
    assert period(now) == period(now, at("2026-12-01T00:00:00"), at("2026-12-02T13:30:00"))
    # In the month's first hour the settled part lies in the month before.
    early = period(at("2026-12-01T00:30:00"))
    assert (early.start, early.end) == (at("2026-11-01T00:00:00"), at("2026-11-30T23:30:00"))
    explicit = period(now, at("2026-11-03T00:00:00"), at("2026-12-05T00:00:00"), settle=0)
    assert (explicit.start, explicit.end) == (at("2026-11-03T00:00:00"), at("2026-12-05T00:00:00"))
    with pytest.raises(ValueError, match="earlier"):
        period(now, at("2026-12-02T00:00:00"), at("2026-12-01T00:00:00"))
    with pytest.raises(ValueError, match="settle"):
        period(now, settle=-1)


def test_queries_keep_to_stripes_alignment_rules() -> None:
    """Whole UTC days in one day-grouped call; a partial first or last day on its own, on
    minute boundaries (a period is rounded up to whole minutes)."""
    month = period(at("2026-12-02T14:30:20"), settle=0)
    assert (month.lo, month.hi) == (at("2026-12-01T00:00:00"), at("2026-12-02T14:31:00"))
    assert queries(month.lo, month.hi) == [
        Query(at("2026-12-01T00:00:00"), DEC_2, "day"),
        Query(DEC_2, at("2026-12-02T14:31:00"), None),
    ]
    assert queries(at("2026-11-30T20:00:00"), at("2026-12-03T00:00:00")) == [
        Query(at("2026-11-30T20:00:00"), at("2026-12-01T00:00:00"), None),
        Query(at("2026-12-01T00:00:00"), at("2026-12-03T00:00:00"), "day"),
    ]
    assert queries(at("2026-12-01T20:00:00"), at("2026-12-02T03:00:00")) == [
        Query(at("2026-12-01T20:00:00"), DEC_2, None),
        Query(DEC_2, at("2026-12-02T03:00:00"), None),
    ]
    assert queries(DEC_2, at("2026-12-02T05:00:00")) == [
        Query(DEC_2, at("2026-12-02T05:00:00"), None)
    ]
    for query in queries(at("2026-11-03T07:13:00"), at("2026-12-02T09:00:00")):
        step = timedelta(days=1) if query.window == "day" else timedelta(minutes=1)
        assert ceil_to(query.start, step) == query.start and ceil_to(query.end, step) == query.end


@pytest.mark.parametrize(
    ("sent", "stripe", "pending", "settling", "expected"),
    [
        (100, 100, 0, 0, Status.OK),
        (100, 100, 50, 0, Status.OK),  # the sync has more to send: not a difference
        (100, 130, 50, 0, Status.IN_FLIGHT),  # Stripe took some whose answer was lost
        (100, 151, 50, 0, Status.EXTRA),
        (100, 70, 0, 30, Status.SETTLING),  # sent in the last `settle` seconds
        (100, 69, 0, 30, Status.MISSING),
    ],
)
def test_status(sent: int, stripe: int, pending: int, settling: int, expected: Status) -> None:
    assert status(sent, Decimal(stripe), pending, settling) is expected


def test_compare_lists_both_sides_and_held_usage_last() -> None:
    day = date(2026, 12, 2)
    local = [
        LocalDay("cus_a", "in", day, sent=10),
        LocalDay(None, "in", day, pending=7),
    ]
    shown = {("cus_a", "in"): {day: Decimal(10), date(2026, 12, 1): Decimal(3)}}
    lines = compare(local, shown)
    assert [(line.customer, line.day, line.status) for line in lines] == [
        ("cus_a", date(2026, 12, 1), Status.EXTRA),  # Stripe has usage the outbox never sent
        ("cus_a", day, Status.OK),
        (None, day, Status.HELD),
    ]
    assert lines[0].as_json()["difference"] == 3 and lines[2].as_json()["stripe"] is None


def rows(*values: int) -> list[SentRow]:
    hour = at("2026-12-02T10:00:00")
    return [
        SentRow(f"tm1-{n}", "cus_a", "in", hour, value, hour, "cus_a")
        for n, value in enumerate(values)
    ]


def test_lacking_names_the_rows_only_one_subset_leaves_out() -> None:
    hour = rows(5, 7, 11)
    assert lacking(hour, Decimal(0)) == hour  # Stripe lost the whole hour
    assert [r.value for r in lacking(hour, Decimal(16))] == [7]  # type: ignore[union-attr]
    assert [r.value for r in lacking(hour, Decimal(5))] == [7, 11]  # type: ignore[union-attr]


def test_lacking_refuses_to_guess() -> None:
    assert lacking(rows(5, 5), Decimal(5)) is Unresolved.AMBIGUOUS  # which five?
    assert lacking(rows(2, 3, 5), Decimal(5)) is Unresolved.AMBIGUOUS  # {2, 3} or {5}
    assert lacking(rows(5, 7), Decimal(6)) is Unresolved.UNEXPLAINED  # not a sum of our rows
    assert lacking(rows(5, 7), Decimal("5.5")) is Unresolved.UNEXPLAINED
    many = rows(*(2**n for n in range(40)))  # distinct sums, more than are worth keeping
    assert lacking(many, Decimal(2**40 - 2)) is Unresolved.AMBIGUOUS


@given(
    st.integers(0, 60 * 24 * 90),
    st.integers(1, 60 * 24 * 90),
)
def test_queries_cover_the_period_exactly(start_minute: int, length: int) -> None:
    lo = at("2026-09-01T00:00:00") + timedelta(minutes=start_minute)
    hi = lo + timedelta(minutes=length)
    found = queries(lo, hi)
    assert found[0].start == lo and found[-1].end == hi and len(found) <= 3
    assert all(a.end == b.start for a, b in itertools.pairwise(found))
    for query in found:
        assert query.start < query.end
        if query.window == "day":
            assert ceil_to(query.start, timedelta(days=1)) == query.start
            assert ceil_to(query.end, timedelta(days=1)) == query.end
        else:  # one summary: within one UTC day, so it adds to that day
            assert query.start.date() == (query.end - timedelta(microseconds=1)).date()


@given(st.lists(st.integers(1, 50), min_size=1, max_size=12), st.data())
def test_what_lacking_names_is_exactly_what_stripe_lost(values: list[int], data: Any) -> None:
    """Whatever Stripe lost, `lacking` names exactly those rows or refuses: it never names a
    row Stripe has, so a resend never counts one twice."""
    hour = rows(*values)
    lost = data.draw(st.sets(st.sampled_from(range(len(hour)))))
    kept = sum(row.value for n, row in enumerate(hour) if n not in lost)
    found = lacking(hour, Decimal(kept))
    if isinstance(found, list):
        assert {row.identifier for row in found} == {hour[n].identifier for n in lost}
    else:
        assert found is Unresolved.AMBIGUOUS
