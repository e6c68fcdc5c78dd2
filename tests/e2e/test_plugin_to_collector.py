"""Plugin → collector → PostgreSQL: every payload kind lands with exact totals, a collector
that is down for a minute costs no event, and a blocklist change reaches the gateway."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Stack
from tests.harness.kong import HarnessFactory, ScriptedRequest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers"
KINDS = sorted(p.name.removesuffix(".expected.json") for p in FIXTURES.glob("*.expected.json"))
TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_input_tokens",
    "reasoning_tokens",
    "total_tokens",
)
REPEATS = 3


def fixture_request(kind: str, *, compress: bool = False) -> tuple[ScriptedRequest, dict[str, Any]]:
    expected = json.loads((FIXTURES / f"{kind}.expected.json").read_text())
    body = (FIXTURES / expected["body"]).read_bytes()
    headers = {"content-type": expected["content_type"]}
    if compress:
        body = gzip.compress(body)
        headers["content-encoding"] = "gzip"
    consumer = f"{kind}{'-gz' if compress else ''}"
    request = ScriptedRequest(
        headers={"content-type": "text/plain"},  # not a JSON request: no usage injection
        body=b"hello",
        consumer={"id": f"id-{consumer}", "username": consumer, "custom_id": None},
        upstream_status=529 if "error" in kind else 200,
        upstream_headers=headers,
        upstream_body=body,
    )
    return request, expected["usage"]


def test_every_payload_kind_lands_with_exact_totals(
    make_harness: HarnessFactory, stack: Stack
) -> None:
    """Each provider payload, plain and gzip, sent REPEATS times through token-meter: PostgreSQL
    holds exactly REPEATS times its normalized usage, per consumer and token kind."""
    harness = make_harness("token-meter-plugin")
    config = stack.plugin_config()
    expected: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        for compress in (False, True):
            request, usage = fixture_request(kind, compress=compress)
            consumer = request.consumer["username"]  # type: ignore[index]
            expected[consumer] = usage
            for _ in range(REPEATS):
                request.request_id = f"{consumer}-{_}"
                outcome = harness.request(request, config)
                assert outcome.exit_status is None
    total = len(expected) * REPEATS
    assert stack.wait_for_events(total) == total
    rows = {
        r["consumer"]: r
        for r in stack.query(
            "SELECT consumer, sum(events) AS events, sum(usage_missing_events) AS missing,"
            + ", ".join(f" sum({f}) AS {f}" for f in TOKEN_FIELDS)
            + " FROM usage_monthly GROUP BY consumer"
        )
    }
    assert set(rows) == set(expected)
    for consumer, usage in expected.items():
        row = rows[consumer]
        assert row["events"] == REPEATS, consumer
        assert row["missing"] == (REPEATS if usage["usage_missing"] else 0), consumer
        for field in TOKEN_FIELDS:
            assert row[field] == REPEATS * usage[field], (consumer, field)
    models = {
        r["consumer"]: r["model"]
        for r in stack.query("SELECT DISTINCT consumer, model FROM usage_events")
    }
    for consumer, usage in expected.items():
        assert models[consumer] == usage["model"], consumer


AI_PROXY_LAYOUTS = {
    "kong-3.9": {
        "proxy": {
            "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
            "meta": {"provider_name": "openai", "response_model": "gpt-4o-2024-08-06"},
        }
    },
    "kong-3.8": {
        "ai-proxy": {
            "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
            "meta": {"provider_name": "openai", "response_model": "gpt-4o-2024-08-06"},
        }
    },
    "kong-3.7": {
        "ai-proxy": {
            "usage": {"prompt_token": 11, "completion_token": 4, "total_tokens": 15},
            "meta": {"provider_name": "openai", "response_model": "gpt-4o-2024-08-06"},
        }
    },
    "kong-3.6": {
        "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
        "meta": {"provider_name": "openai", "response_model": "gpt-4o-2024-08-06"},
    },
}


def test_log_plugin_meters_every_ai_proxy_layout(
    make_harness: HarnessFactory, stack: Stack
) -> None:
    harness = make_harness("token-meter-log-plugin")
    config = stack.plugin_config()
    for version, ai in AI_PROXY_LAYOUTS.items():
        request = ScriptedRequest(
            consumer={"id": version, "username": version}, serialize_extra={"ai": ai}
        )
        assert harness.request(request, config).phases == {"access": "ret", "log": "ret"}
    assert stack.wait_for_events(len(AI_PROXY_LAYOUTS)) == len(AI_PROXY_LAYOUTS)
    rows = stack.query(
        "SELECT consumer, input_tokens, output_tokens, total_tokens, model FROM usage_events"
    )
    assert {r["consumer"]: tuple(r)[1:] for r in rows} == {
        v: (11, 4, 15, "gpt-4o-2024-08-06") for v in AI_PROXY_LAYOUTS
    }


@pytest.mark.slow
def test_collector_down_for_a_minute_costs_no_event(
    make_harness: HarnessFactory, stack: Stack, tmp_path: Path
) -> None:
    """Events sent while the collector is stopped for 60 s are spooled and replayed: afterwards
    PostgreSQL holds every event exactly once."""
    harness = make_harness("token-meter-plugin")
    # A short retry cap so the test does not wait out the default 30 s backoff after the outage.
    config = stack.plugin_config(max_retry_delay=2)
    request, usage = fixture_request("openai_chat")
    sent = 0

    def send() -> None:
        nonlocal sent
        request.request_id = f"outage-{sent}"
        assert harness.request(request, config).exit_status is None
        sent += 1

    for _ in range(20):
        send()
    assert stack.wait_for_events(20) == 20
    assert stack.collector.stop() == 0
    outage_ends = time.monotonic() + 60
    while time.monotonic() < outage_ends:
        send()
        time.sleep(0.2)
    assert sent > 200
    stack.collector.start()
    assert stack.wait_for_events(sent, timeout=90) == sent
    time.sleep(1)  # anything sent twice would show now
    (row,) = stack.query("SELECT count(*), sum(total_tokens) FROM usage_events")
    assert tuple(row) == (sent, sent * usage["total_tokens"])


def test_a_blocklist_change_reaches_the_gateway(make_harness: HarnessFactory, stack: Stack) -> None:
    """A consumer put on the blocklist in PostgreSQL is answered 402 by the plugin, through the
    collector's long poll; others pass; taking it off lets it through again."""
    harness = make_harness("token-meter-plugin")
    config = stack.plugin_config()
    alice, _ = fixture_request("openai_chat")
    bob, _ = fixture_request("openai_chat_cached")
    assert harness.request(alice, config).exit_status is None
    stack.query(
        "INSERT INTO blocklist (consumer, reason) VALUES ('openai_chat', 'insufficient_credits')"
    )
    deadline = time.monotonic() + 15
    outcome = harness.request(alice, config)
    while outcome.exit_status is None and time.monotonic() < deadline:
        time.sleep(0.02)
        outcome = harness.request(alice, config)
    assert outcome.exit_status == 402
    assert outcome.exit_json()["error"]["code"] == "insufficient_credits"
    assert outcome.exit_json()["error"]["type"] == "insufficient_quota"
    assert not outcome.upstream_called
    assert harness.request(bob, config).exit_status is None
    stack.query("DELETE FROM blocklist WHERE consumer = 'openai_chat'")
    deadline = time.monotonic() + 15
    while harness.request(alice, config).exit_status is not None:
        assert time.monotonic() < deadline, "the consumer was never let through again"
        time.sleep(0.02)
