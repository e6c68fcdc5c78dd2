"""The outbox's arithmetic: deltas from growing windows, the cost remainder carried."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from collector.billing.meters import DEFAULT_METERS, Meter, parse_meters
from collector.billing.outbox import Coverage, Totals, WindowUsage, identifier, plan

H0 = datetime(2026, 11, 1, tzinfo=UTC)
TOKENS = Meter("in", "input_tokens")
COST = Meter("cost", "cost_micros")


def window(hour: int, **totals: int) -> WindowUsage:
    return WindowUsage("alice", H0 + timedelta(hours=hour), totals)


def test_new_usage_in_a_window_becomes_one_delta_per_meter() -> None:
    result = plan([window(0, input_tokens=120, cost_micros=5_000)], [TOKENS, COST], {}, {})
    assert [(d.event_name, d.seq, d.value) for d in result.deltas] == [
        ("in", 1, 120),
        ("cost", 1, 5),
    ]
    assert result.coverage[("alice", "in", H0)] == Coverage(120, 1)
    assert result.totals[("alice", "cost")] == Totals(5_000, 5)


def test_a_window_that_grew_sends_only_the_growth_under_the_next_seq() -> None:
    coverage = {("alice", "in", H0): Coverage(120, 1)}
    totals = {("alice", "in"): Totals(120, 120)}
    result = plan([window(0, input_tokens=200)], [TOKENS], coverage, totals)
    assert [(d.seq, d.value) for d in result.deltas] == [(2, 80)]
    assert result.deltas[0].identifier != identifier("alice", "in", H0, 1)


def test_a_window_that_did_not_grow_makes_nothing() -> None:
    coverage = {("alice", "in", H0): Coverage(120, 1)}
    result = plan([window(0, input_tokens=120)], [TOKENS], coverage, {})
    assert result.deltas == [] and result.coverage == {} and result.shrunk == []


def test_a_shrunk_window_is_reported_and_sends_nothing() -> None:
    coverage = {("alice", "in", H0): Coverage(120, 1)}
    result = plan([window(0, input_tokens=100)], [TOKENS], coverage, {})
    assert result.deltas == [] and result.shrunk == [("alice", "in", H0)]


def test_the_cost_remainder_under_a_micro_waits_for_a_later_window() -> None:
    result = plan(
        [window(0, cost_micros=1_400), window(1, cost_micros=700), window(2, cost_micros=900)],
        [COST],
        {},
        {},
    )
    # 1.4 micros -> 1 sent, 0.4 carried; +0.7 = 1.1 -> 1 sent, 0.1 carried; +0.9 = 1.0 -> 1.
    assert [d.value for d in result.deltas] == [1, 1, 1]
    assert result.totals[("alice", "cost")] == Totals(3_000, 3)


def test_a_window_under_one_unit_covers_usage_without_a_delta() -> None:
    result = plan([window(0, cost_micros=999)], [COST], {}, {})
    assert result.deltas == []
    assert result.coverage[("alice", "cost", H0)] == Coverage(999, 0)
    assert result.totals[("alice", "cost")] == Totals(999, 0)


@given(st.lists(st.lists(st.integers(0, 10**7), min_size=1, max_size=4), min_size=1, max_size=6))
def test_sent_is_always_what_was_covered_floored_whatever_the_order_of_growth(
    growth: list[list[int]],
) -> None:
    coverage: dict = {}
    totals: dict = {}
    running = [0] * 4
    sent = 0
    for step in growth:
        windows = []
        for hour, amount in enumerate(step):
            running[hour] += amount
            windows.append(window(hour, cost_micros=running[hour]))
        result = plan(windows, [COST], coverage, totals)
        coverage.update(result.coverage)
        totals.update(result.totals)
        sent += sum(d.value for d in result.deltas)
    assert sent == sum(running) // 1000
    assert all(d > 0 for d in [sent]) or sum(running) < 1000


def test_identifiers_are_stable_short_and_distinct() -> None:
    first = identifier("a" * 1000, "token_meter_input_tokens", H0, 1)
    assert first == identifier("a" * 1000, "token_meter_input_tokens", H0, 1)
    assert len(first) <= 100
    assert first != identifier("a" * 1000, "token_meter_input_tokens", H0, 2)
    assert first != identifier("b", "token_meter_input_tokens", H0, 1)


def test_meters_default_and_every_problem_reported() -> None:
    meters, problems = parse_meters(None)
    assert problems == [] and [m.event_name for m in meters] == [
        pair.split("=")[0] for pair in DEFAULT_METERS.split(",")
    ]
    _, problems = parse_meters("a=input_tokens,a=output_tokens,b=bogus,c,bad name=total_tokens")
    assert len(problems) == 4
    assert any("listed twice" in p for p in problems)
    assert any("unknown field 'bogus'" in p for p in problems)
    assert any("'c' is not event_name=field" in p for p in problems)
    assert any("event name 'bad name'" in p for p in problems)
