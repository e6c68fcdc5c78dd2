"""build_usage_event: events that satisfy schema/usage-event.schema.json."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from token_meter_plugin.event import build_usage_event
from token_meter_plugin.usage import Usage, extract_usage

ROOT = Path(__file__).parents[2]
SCHEMA = json.loads((ROOT / "schema" / "usage-event.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(
    SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)
FIXTURES = ROOT / "tests" / "fixtures" / "providers"
EXPECTED = sorted(FIXTURES.glob("*.expected.json"))

USAGE = Usage(
    provider="anthropic",
    model="claude-sonnet-4-20250514",
    input_tokens=2520,
    output_tokens=89,
    cached_input_tokens=2048,
    cache_write_input_tokens=400,
    reasoning_tokens=0,
    total_tokens=2609,
    streamed=True,
)
T0 = datetime(2025, 5, 1, 12, 30, 15, 250000, tzinfo=UTC)


def event(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "usage": USAGE,
        "request_id": "8f1c4c4b-6a4e-4f0e-9d1c-3b8a2f7d1e01",
        "source": "kong://dp-1/token-meter",
        "subject": "acme",
        "time": T0,
        "consumer_id": "0c2b1f9e-3c7a-4f07-9e45-b07d45d8a5a1",
        "consumer_username": "acme",
        "consumer_custom_id": "cus_Q1w2e3r4",
        "route_id": "b5c4d9a2-9f3e-4a41-8c55-1c2d3e4f5a6b",
        "route_name": "anthropic-messages",
        "service_id": "e7a3f1d2-0b9c-4d8e-a7f6-5e4d3c2b1a09",
        "service_name": "anthropic",
        "status": 200,
        "latency_ms": 1834.5,
    }
    args.update(overrides)
    return build_usage_event(**args)


def assert_valid(built: dict[str, Any]) -> None:
    """Schema validity plus the consistency rules the schema states but cannot express."""
    VALIDATOR.validate(built)
    data = built["data"]
    assert data["cached_input_tokens"] + data["cache_write_input_tokens"] <= data["input_tokens"]
    assert data["reasoning_tokens"] <= data["output_tokens"]
    assert data["total_tokens"] == data["input_tokens"] + data["output_tokens"]


def test_built_event_is_a_valid_cloudevent_with_every_data_field() -> None:
    built = event()
    assert_valid(built)
    assert built == {
        "specversion": "1.0",
        "id": "8f1c4c4b-6a4e-4f0e-9d1c-3b8a2f7d1e01",
        "source": "kong://dp-1/token-meter",
        "type": "ai.usage",
        "subject": "acme",
        "time": "2025-05-01T12:30:15.250000Z",
        "datacontenttype": "application/json",
        "data": {
            "consumer_id": "0c2b1f9e-3c7a-4f07-9e45-b07d45d8a5a1",
            "consumer_username": "acme",
            "consumer_custom_id": "cus_Q1w2e3r4",
            "route_id": "b5c4d9a2-9f3e-4a41-8c55-1c2d3e4f5a6b",
            "route_name": "anthropic-messages",
            "service_id": "e7a3f1d2-0b9c-4d8e-a7f6-5e4d3c2b1a09",
            "service_name": "anthropic",
            "provider": "anthropic",
            "model": "claude-sonnet-4-20250514",
            "status": 200,
            "streamed": True,
            "input_tokens": 2520,
            "output_tokens": 89,
            "cached_input_tokens": 2048,
            "cache_write_input_tokens": 400,
            "reasoning_tokens": 0,
            "total_tokens": 2609,
            "latency_ms": 1834.5,
            "usage_missing": False,
        },
    }
    assert set(built["data"]) == set(SCHEMA["$defs"]["data"]["properties"])


@pytest.mark.parametrize("expected_path", EXPECTED, ids=lambda p: p.name.split(".")[0])
def test_events_from_every_golden_payload_are_valid(expected_path: Path) -> None:
    spec = json.loads(expected_path.read_text())
    body = (FIXTURES / spec["body"]).read_bytes()
    usage = extract_usage(body, content_type=spec["content_type"], content_encoding=None)
    assert_valid(event(usage=usage))


def test_event_with_only_the_required_arguments_is_valid() -> None:
    built = build_usage_event(
        usage=Usage(usage_missing=True),
        request_id="r1",
        source="kong://dp",
        subject="anonymous",
        time="2025-01-01T00:00:00Z",
    )
    assert_valid(built)
    assert built["data"]["usage_missing"] is True
    assert built["data"]["status"] is None and built["data"]["latency_ms"] is None


def test_the_schema_check_catches_an_event_without_subject() -> None:
    """The validator used above is not vacuous."""
    built = event()
    del built["subject"]
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(built)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (T0, "2025-05-01T12:30:15.250000Z"),
        (T0.astimezone(timezone(timedelta(hours=2))), "2025-05-01T12:30:15.250000Z"),
        (1746102615.25, "2025-05-01T12:30:15.250000Z"),
        (1746102615, "2025-05-01T12:30:15.000000Z"),
        ("2025-05-01T14:30:15+02:00", "2025-05-01T14:30:15+02:00"),
        ("2025-05-01t12:30:15.1z", "2025-05-01t12:30:15.1z"),
    ],
    ids=["utc", "other-offset", "posix-float", "posix-int", "rfc3339-offset", "rfc3339-lower"],
)
def test_time_is_rfc3339(value: Any, text: str) -> None:
    built = event(time=value)
    assert built["time"] == text
    assert_valid(built)


@pytest.mark.parametrize(
    "value",
    [
        datetime(2025, 5, 1, 12, 30),  # naive on purpose
        "2025-05-01T12:30:15",
        "2025-05-01 12:30:15Z",
        "2025-13-01T12:30:15Z",
        "yesterday",
        float("nan"),
        True,
    ],
    ids=["naive", "no-offset", "space", "month-13", "words", "nan", "bool"],
)
def test_time_that_is_not_rfc3339_with_offset_is_rejected(value: Any) -> None:
    with pytest.raises(ValueError, match="time"):
        event(time=value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subject", ""),
        ("subject", "x" * 257),
        ("request_id", ""),
        ("request_id", "x" * 257),
        ("source", ""),
        ("source", "x" * 513),
        ("subject", None),
    ],
)
def test_missing_or_oversized_identity_fields_are_rejected(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        event(**{field: value})


def test_descriptive_strings_are_cut_to_the_schema_limit() -> None:
    built = event(route_name="r" * 300, service_name="s" * 257, consumer_username="u" * 256)
    assert built["data"]["route_name"] == "r" * 256
    assert built["data"]["service_name"] == "s" * 256
    assert built["data"]["consumer_username"] == "u" * 256
    assert_valid(built)


@pytest.mark.parametrize("status", [99, 600, -1, True, None])
def test_status_outside_http_range_becomes_null(status: Any) -> None:
    built = event(status=status)
    assert built["data"]["status"] is None
    assert_valid(built)


@pytest.mark.parametrize("latency", [-0.5, float("inf"), float("nan"), 86_400_001, True])
def test_impossible_latency_becomes_null(latency: Any) -> None:
    built = event(latency_ms=latency)
    assert built["data"]["latency_ms"] is None
    assert_valid(built)


def test_integer_latency_is_kept_as_a_number() -> None:
    assert event(latency_ms=12)["data"]["latency_ms"] == 12.0


@pytest.mark.parametrize(
    "usage",
    [
        Usage(input_tokens=1, output_tokens=1, total_tokens=3),
        Usage(input_tokens=5, cached_input_tokens=4, cache_write_input_tokens=2, total_tokens=5),
        Usage(output_tokens=2, reasoning_tokens=3, total_tokens=2),
        Usage(input_tokens=-1, output_tokens=1, total_tokens=0),
        Usage(input_tokens=100_000_001, total_tokens=100_000_001),
        Usage(input_tokens=1, total_tokens=1, usage_missing=True),
    ],
    ids=[
        "bad-total",
        "cache-over-input",
        "reasoning-over-output",
        "negative",
        "over-max",
        "missing-with-counts",
    ],
)
def test_inconsistent_usage_is_rejected(usage: Usage) -> None:
    with pytest.raises(ValueError, match=r"token counts|usage_missing"):
        event(usage=usage)


def test_encoded_events_round_trip_exactly_through_msgspec() -> None:
    """The shipper journals each event as msgspec encodes it."""
    built = event()
    assert msgspec.json.decode(msgspec.json.encode(built)) == built
