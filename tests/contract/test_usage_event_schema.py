"""schema/usage-event.schema.json and the collector's parser agree on what a valid event is."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import jsonschema
import pytest

from tests.factories import usage_event
from token_meter_collector.ingest.events import parse_batch

SCHEMA = json.loads((resources.files("token_meter_schema") / "usage-event.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(
    SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)

VALID: dict[str, dict[str, Any]] = {
    "minimal": {
        **usage_event("v1"),
        "data": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3},
    },
    "full": usage_event(
        "v2",
        consumer_id="7f8e",
        consumer_username="alice",
        consumer_custom_id="cus_123",
        route_id="r",
        route_name="chat",
        service_id="s",
        service_name="openai",
        cached_input_tokens=50,
        cache_write_input_tokens=10,
        reasoning_tokens=5,
        usage_missing=False,
        streamed=True,
    ),
    "usage missing": usage_event(
        "v3", input_tokens=0, output_tokens=0, usage_missing=True, status=502, model=None
    ),
    "extension": {**usage_event("v4"), "traceparent": "00-1-2-01"},
}
INVALID: dict[str, Any] = {
    "negative": usage_event("i1", output_tokens=-5, total_tokens=95),
    "too many tokens": usage_event("i2", input_tokens=100_000_001, total_tokens=100_000_021),
    "float tokens": usage_event("i3", input_tokens=1.5, total_tokens=21.5),
    "unknown data field": usage_event("i4", completion="secret text"),
    "missing subject": {k: v for k, v in usage_event("i5").items() if k != "subject"},
    "missing time": {k: v for k, v in usage_event("i6").items() if k != "time"},
    "bad specversion": {**usage_event("i7"), "specversion": "0.3"},
    "bad type": {**usage_event("i8"), "type": "ai.other"},
    "status out of range": usage_event("i9", status=99),
    "empty id": {**usage_event(""), "id": ""},
    "missing total": {
        **usage_event("i10"),
        "data": {"input_tokens": 1, "output_tokens": 2},
    },
}


def collector_accepts(event: Any) -> bool:
    parsed = parse_batch(json.dumps([event]).encode(), max_events=10, now=datetime.now(UTC))
    return len(parsed.events) == 1


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_events_pass_both(name: str) -> None:
    VALIDATOR.validate(VALID[name])
    assert collector_accepts(VALID[name])


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_events_fail_both(name: str) -> None:
    assert not VALIDATOR.is_valid(INVALID[name])
    assert not collector_accepts(INVALID[name])


@pytest.mark.parametrize(
    "data",
    [
        {"input_tokens": 10, "output_tokens": 2, "total_tokens": 13},
        {"input_tokens": 10, "output_tokens": 2, "total_tokens": 12, "cached_input_tokens": 11},
        {"input_tokens": 10, "output_tokens": 2, "total_tokens": 12, "reasoning_tokens": 3},
    ],
)
def test_consistency_rules_the_schema_cannot_express(data: dict[str, int]) -> None:
    """The schema states these rules in x-consistency; the collector enforces them."""
    event = {**usage_event("c"), "data": data}
    assert VALIDATOR.is_valid(event)
    assert not collector_accepts(event)
