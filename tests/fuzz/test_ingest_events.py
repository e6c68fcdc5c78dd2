"""Property tests of the collector's batch parser (collector/ingest/events.py): any body is a
`ParsedBatch` or a `BatchError` (400 or 413 over HTTP), never another exception, and every
event it accepts keeps contract 2's rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import usage_event
from tests.fuzz.strategies import DEEP, counts, deep_nesting, json_values, mangled, to_json
from token_meter_collector.ingest.events import (
    MAX_TOKENS,
    BatchError,
    ParsedBatch,
    parse_batch,
)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cached_input_tokens",
    "cache_write_input_tokens",
    "reasoning_tokens",
)
TIMES = st.one_of(
    st.datetimes(timezones=st.just(UTC)).map(lambda t: t.isoformat()),
    st.sampled_from(
        (
            NOW.isoformat(),
            (NOW + timedelta(days=2)).isoformat(),
            (NOW - timedelta(days=400)).isoformat(),
            "2026-06-01T12:00:00",  # no offset
            "not a time",
        )
    ),
    json_values,
)


@st.composite
def events(draw: st.DrawFn) -> Any:
    """A valid event with some of its attributes replaced by anything."""
    event = usage_event(draw(st.text(min_size=1, max_size=8)), time=NOW.isoformat())
    event["data"] = dict(event["data"])
    for key in draw(st.lists(st.sampled_from(TOKEN_FIELDS), max_size=3)):
        event["data"][key] = draw(counts)
    if draw(st.booleans()):
        event["data"][draw(st.text(max_size=8))] = draw(json_values)
    for key in draw(st.lists(st.sampled_from(tuple(event)), max_size=2)):
        event[key] = draw(TIMES if key == "time" else json_values)
    if draw(st.booleans()):
        event[draw(st.text(max_size=8))] = draw(json_values)  # a CloudEvents extension
    return draw(st.one_of(st.just(event), st.just(event), json_values))


def assert_parsed_well(parsed: ParsedBatch, max_events: int) -> None:
    assert parsed.size == len(parsed.events) + len(parsed.rejected) <= max_events
    indices = [r.index for r in parsed.rejected]
    assert len(set(indices)) == len(indices) and all(0 <= i < parsed.size for i in indices)
    for rejection in parsed.rejected:
        assert isinstance(rejection.reason, str) and rejection.reason
        assert rejection.id is None or isinstance(rejection.id, str)
    for event in parsed.events:
        data = event.data
        assert all(0 <= getattr(data, f) <= MAX_TOKENS for f in TOKEN_FIELDS)
        assert data.total_tokens == data.input_tokens + data.output_tokens
        assert data.cached_input_tokens + data.cache_write_input_tokens <= data.input_tokens
        assert data.reasoning_tokens <= data.output_tokens
        assert event.time.tzinfo is not None
        assert NOW - timedelta(days=90) <= event.time <= NOW + timedelta(hours=24)


@FUZZ
@given(batch=st.lists(events(), max_size=8), max_events=st.integers(1, 10))
def test_every_accepted_event_keeps_the_contract(batch: list[Any], max_events: int) -> None:
    try:
        parsed = parse_batch(to_json(batch, True), max_events=max_events, now=NOW)
    except BatchError:
        assert len(batch) > max_events  # a JSON array is refused whole only when too long
        return
    assert_parsed_well(parsed, max_events)


@FUZZ
@given(data=st.data(), batch=st.lists(events(), max_size=5))
def test_any_body_is_a_batch_or_a_batch_error(data: st.DataObject, batch: list[Any]) -> None:
    for body in (
        data.draw(mangled(to_json(batch, data.draw(st.booleans())))),
        data.draw(deep_nesting()),
        data.draw(st.binary(max_size=64)),
    ):
        try:
            parsed = parse_batch(body, max_events=10_000, now=NOW)
        except BatchError:
            continue
        assert_parsed_well(parsed, 10_000)


def test_a_body_nested_past_the_decoders_bound_is_a_batch_error() -> None:
    """msgspec stops at Python's recursion limit with RecursionError: a 400, not a 500."""
    for body in (
        b"[" * DEEP + b"]" * DEEP,
        b'[{"specversion":"1.0","x":' + b"[" * DEEP + b"]" * DEEP + b"}]",
    ):
        try:
            parse_batch(body, max_events=10_000, now=NOW)
        except BatchError as exc:
            assert "nested too deeply" in str(exc)
        else:
            raise AssertionError("a body nested past the bound was parsed")
