"""token-meter and token-meter-log as Kong runs them: started by the harness, spoken to over
their Unix socket in Kong's MessagePack RPC, with a fake collector receiving the events."""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness.collector import FakeCollector
from tests.harness.kong import HarnessFactory, KongHarness, Outcome, ScriptedRequest
from tests.harness.paths import VENV_BIN

OPENAI_JSON = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}],
        "usage": {
            "prompt_tokens": 120,
            "completion_tokens": 30,
            "total_tokens": 150,
            "prompt_tokens_details": {"cached_tokens": 100},
            "completion_tokens_details": {"reasoning_tokens": 10},
        },
    }
).encode()

OPENAI_SSE = (
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o","choices":'
    b'[{"index":0,"delta":{"content":"Hi"}}],"usage":null}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o","choices":[],'
    b'"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n'
    b"data: [DONE]\n\n"
)

# The PDK calls of a metered request once the service name is cached, the blocklist empty and
# stream-usage injection off (handler.py): the access phase makes none.
METERED_CALLS = [
    "kong.client.get_consumer",
    "kong.router.get_route",
    "kong.service.response.get_status",
    "kong.service.response.get_raw_body",
    "kong.nginx.req_start_time",
]


def plain_request(**kwargs: Any) -> ScriptedRequest:
    """A request whose body cannot be a stream (not JSON), so no usage-injection calls."""
    kwargs.setdefault("headers", {"content-type": "text/plain"})
    kwargs.setdefault("body", b"hello")
    kwargs.setdefault("upstream_body", OPENAI_JSON)
    return ScriptedRequest(**kwargs)


def wait_until_blocked(
    harness: KongHarness, config: dict[str, Any], request: ScriptedRequest
) -> Outcome:
    """The blocklist arrives by long poll in the background: wait for it (bounded)."""
    deadline = time.monotonic() + 15
    while True:
        outcome = harness.request(request, config)
        if outcome.exit_status is not None or time.monotonic() > deadline:
            return outcome
        time.sleep(0.05)


@pytest.mark.parametrize("script", ["token-meter-plugin", "token-meter-log-plugin"])
def test_dump_is_what_kong_3_9_accepts(script: str, tmp_path: Path) -> None:
    """`-dump` prints one plugin info, x.y.z Version, integer Priority below key-auth's."""
    harness = KongHarness([str(VENV_BIN / script)], tmp_path)
    info = harness.query()
    expected_name = script.removesuffix("-plugin")
    assert info["Name"] == expected_name
    assert info["Version"] == importlib.metadata.version("kong-token-meter")
    assert isinstance(info["Priority"], int)
    assert info["Priority"] < 1250  # key-auth
    assert info["Phases"] == (
        ["access", "response"] if expected_name == "token-meter" else ["access", "log"]
    )


def test_server_listens_on_kongs_default_socket_name(make_harness: HarnessFactory) -> None:
    harness = make_harness("token-meter-plugin")
    assert Path(harness.socket_path).name == "token-meter.socket"
    assert Path(harness.socket_path).is_socket()


@pytest.mark.parametrize("mode", [(), ("-g",)], ids=["threading", "gevent"])
def test_metered_request_ships_one_event_with_its_usage(
    make_harness: HarnessFactory,
    collector: FakeCollector,
    plugin_config: dict[str, Any],
    mode: tuple[str, ...],
) -> None:
    harness = make_harness("token-meter-plugin", *mode)
    request = plain_request()
    outcome = harness.request(request, plugin_config)
    assert outcome.phases == {"access": "ret", "response": "ret"}
    assert outcome.upstream_called and outcome.exit_status is None

    (event,) = collector.wait_for_events(1)
    assert collector.batches[0].headers["authorization"] == f"Bearer {collector.token}"
    assert event["type"] == "ai.usage"
    assert event["subject"] == "alice"
    assert event["source"].startswith("kong://")
    data = event["data"]
    assert data["consumer_username"] == "alice"
    assert data["consumer_custom_id"] == "cus_alice"
    assert data["route_name"] == "openai-chat"
    assert data["service_name"] == "openai"
    assert data["status"] == 200
    assert data["model"] == "gpt-4o-mini-2024-07-18"
    assert (data["input_tokens"], data["output_tokens"], data["total_tokens"]) == (120, 30, 150)
    assert data["cached_input_tokens"] == 100
    assert data["reasoning_tokens"] == 10
    assert data["streamed"] is False and data["usage_missing"] is False
    assert data["latency_ms"] is not None and data["latency_ms"] >= 0


def test_metered_request_costs_the_pdk_round_trips_handler_py_states(
    make_harness: HarnessFactory, collector: FakeCollector, plugin_config: dict[str, Any]
) -> None:
    """Steady state (service name cached): exactly the calls handler.py justifies. Stream-usage
    injection adds the request headers, and the body for a JSON request; a non-empty blocklist
    adds the consumer in access."""
    harness = make_harness("token-meter-plugin")
    no_injection = plugin_config | {"inject_stream_usage": False}
    first = harness.request(plain_request(), no_injection)
    assert "kong.router.get_service" in first.methods()  # the one cache fill
    for _ in range(3):
        outcome = harness.request(plain_request(), no_injection)
        assert outcome.methods() == METERED_CALLS
        assert outcome.round_trips == 5
        assert not outcome.unknown_methods
    injecting = harness.request(plain_request(), plugin_config)
    assert injecting.methods("access") == ["kong.request.get_headers"]
    assert injecting.round_trips == 6
    chat = harness.request(ScriptedRequest(upstream_body=OPENAI_JSON), plugin_config)
    assert chat.methods("access") == ["kong.request.get_headers", "kong.request.get_raw_body"]
    assert chat.pdk_calls[1].args == [0]  # a max Kong reads a temp-file body with
    assert chat.round_trips == 7
    collector.block("someone-else", "insufficient_credits")
    probe = plain_request(consumer={"id": "s0me", "username": "someone-else"})
    assert wait_until_blocked(harness, plugin_config, probe).exit_status == 402
    listed = harness.request(ScriptedRequest(upstream_body=OPENAI_JSON), plugin_config)
    assert listed.methods("access")[0] == "kong.client.get_consumer"
    assert listed.round_trips == 8


def test_event_ids_are_unique_per_request(
    make_harness: HarnessFactory, collector: FakeCollector, plugin_config: dict[str, Any]
) -> None:
    harness = make_harness("token-meter-plugin")
    for _ in range(20):
        harness.request(plain_request(), plugin_config)
    events = collector.wait_for_events(20)
    assert len({e["id"] for e in events}) == 20


def test_streamed_and_gzipped_bodies_are_metered(
    make_harness: HarnessFactory, collector: FakeCollector, plugin_config: dict[str, Any]
) -> None:
    """Content type and encoding are told from the body (no get_headers round trip)."""
    harness = make_harness("token-meter-plugin")
    harness.request(plain_request(upstream_body=OPENAI_SSE), plugin_config)
    harness.request(plain_request(upstream_body=gzip.compress(OPENAI_JSON)), plugin_config)
    sse_event, gzip_event = sorted(collector.wait_for_events(2), key=lambda e: e["data"]["model"])
    assert sse_event["data"]["streamed"] is True
    assert sse_event["data"]["total_tokens"] == 10
    assert gzip_event["data"]["total_tokens"] == 150


def test_response_without_usage_is_recorded_as_missing(
    make_harness: HarnessFactory, collector: FakeCollector, plugin_config: dict[str, Any]
) -> None:
    harness = make_harness("token-meter-plugin")
    body = b'{"error":{"message":"boom","type":"server_error"}}'
    harness.request(plain_request(upstream_status=500, upstream_body=body), plugin_config)
    (event,) = collector.wait_for_events(1)
    assert event["data"]["usage_missing"] is True
    assert event["data"]["status"] == 500
    assert event["data"]["total_tokens"] == 0


@pytest.mark.parametrize(
    ("reason", "status"),
    [("insufficient_credits", 402), ("payment_overdue", 402), ("quota_exceeded", 429)],
)
def test_blocked_consumer_is_answered_without_calling_the_upstream(
    make_harness: HarnessFactory,
    collector: FakeCollector,
    plugin_config: dict[str, Any],
    reason: str,
    status: int,
) -> None:
    harness = make_harness("token-meter-plugin")
    collector.block("alice", reason)
    outcome = wait_until_blocked(harness, plugin_config, plain_request())
    assert outcome.exit_status == status
    assert not outcome.upstream_called
    assert outcome.exit_json() == {
        "error": {
            "message": outcome.exit_json()["error"]["message"],
            "type": "insufficient_quota",
            "param": None,
            "code": reason,
        }
    }
    headers = {k.lower(): v for k, v in (outcome.exit_headers or {}).items()}
    assert headers["x-token-meter-reason"] == reason
    assert headers["x-should-retry"] == "false"
    # exit is the second call, after get_consumer, and nothing follows it
    # who, which API (OpenAI's or Anthropic's error shape), the answer
    assert outcome.methods() == [
        "kong.client.get_consumer",
        "kong.request.get_path",
        "kong.response.exit",
    ]

    other = harness.request(plain_request(consumer={"id": "b0b", "username": "bob"}), plugin_config)
    assert other.exit_status is None and other.upstream_called


def test_consumer_identifier_custom_id(
    make_harness: HarnessFactory, collector: FakeCollector, plugin_config: dict[str, Any]
) -> None:
    harness = make_harness("token-meter-plugin")
    config = plugin_config | {"consumer_identifier": "custom_id"}
    collector.block("cus_alice", "quota_exceeded")
    assert wait_until_blocked(harness, config, plain_request()).exit_status == 429
    # the username is not what identifies the customer under this config
    assert harness.request(plain_request(), plugin_config).exit_status is None


def test_stream_usage_is_injected_into_streaming_requests(
    make_harness: HarnessFactory, plugin_config: dict[str, Any]
) -> None:
    harness = make_harness("token-meter-plugin")
    body = b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    outcome = harness.request(ScriptedRequest(body=body, upstream_body=OPENAI_SSE), plugin_config)
    assert outcome.set_body is not None
    sent = json.loads(outcome.upstream_request_body or b"")
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == [{"role": "user", "content": "hi"}]

    disabled = harness.request(
        ScriptedRequest(body=body, upstream_body=OPENAI_SSE),
        plugin_config | {"inject_stream_usage": False},
    )
    assert disabled.set_body is None
    assert "kong.request.get_raw_body" not in disabled.methods()


def test_non_json_request_body_is_not_read(
    make_harness: HarnessFactory, plugin_config: dict[str, Any]
) -> None:
    harness = make_harness("token-meter-plugin")
    outcome = harness.request(plain_request(), plugin_config)
    assert "kong.request.get_headers" in outcome.methods("access")
    assert "kong.request.get_raw_body" not in outcome.methods()


def test_request_without_consumer_is_metered_as_anonymous(
    make_harness: HarnessFactory, collector: FakeCollector, plugin_config: dict[str, Any]
) -> None:
    harness = make_harness("token-meter-plugin")
    outcome = harness.request(plain_request(consumer=None, route=None), plugin_config)
    assert outcome.phases == {"access": "ret", "response": "ret"}
    (event,) = collector.wait_for_events(1)
    assert event["subject"] == "anonymous"
    assert event["data"]["consumer_id"] is None


AI_PROXY_39 = {
    "ai": {
        "proxy": {
            "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
            "meta": {
                "provider_name": "openai",
                "request_model": "gpt-4o",
                "response_model": "gpt-4o-2024-08-06",
            },
        }
    }
}


def test_log_plugin_meters_ai_proxy_usage_in_one_round_trip(
    make_harness: HarnessFactory, collector: FakeCollector, plugin_config: dict[str, Any]
) -> None:
    harness = make_harness("token-meter-log-plugin")
    request = plain_request(serialize_extra=AI_PROXY_39)
    outcome = harness.request(request, plugin_config)
    assert outcome.phases == {"access": "ret", "log": "ret"}
    # the consumer in access only while the blocklist could block someone
    assert outcome.methods() == ["kong.log.serialize"]
    (event,) = collector.wait_for_events(1)
    assert event["id"] == request.request_id  # Kong's request id, from the serializer
    assert event["subject"] == "alice"
    assert event["data"]["input_tokens"] == 11
    assert event["data"]["output_tokens"] == 4
    assert event["data"]["service_name"] == "openai"


def test_log_plugin_does_not_meter_its_own_block(
    make_harness: HarnessFactory, collector: FakeCollector, plugin_config: dict[str, Any]
) -> None:
    harness = make_harness("token-meter-log-plugin")
    collector.block("alice", "insufficient_credits")
    collector.block("probe", "insufficient_credits")
    # wait for the list with a probe consumer: its requests before then are metered, alice's not
    probe = plain_request(consumer={"id": "pr0be", "username": "probe"})
    assert wait_until_blocked(harness, plugin_config, probe).exit_status == 402
    outcome = harness.request(plain_request(serialize_extra=AI_PROXY_39), plugin_config)
    assert outcome.exit_status == 402
    assert outcome.phases["log"] == "ret"  # the log phase ran, and shipped nothing
    harness.request(plain_request(consumer={"id": "b0b", "username": "bob"}), plugin_config)
    deadline = time.monotonic() + 15
    while "bob" not in {e["subject"] for e in collector.events()}:
        assert time.monotonic() < deadline, "bob's event never arrived"
        time.sleep(0.05)
    time.sleep(0.5)  # a wrongly shipped event for alice would be in the same or next batch
    assert "alice" not in {e["subject"] for e in collector.events()}


def test_server_restarted_after_a_crash_serves_again(
    make_harness: HarnessFactory, collector: FakeCollector, plugin_config: dict[str, Any]
) -> None:
    """Kong respawns a dead server; instances are started again on "no plugin instance". An
    event whose acknowledgement the crash cut off may be sent again (the collector dedupes):
    every request is there once by id."""
    harness = make_harness("token-meter-plugin")
    harness.request(plain_request(), plugin_config)
    collector.wait_for_events(1)
    harness.restart()
    outcome = harness.request(plain_request(), plugin_config)
    assert outcome.phases == {"access": "ret", "response": "ret"}
    deadline = time.monotonic() + 15
    while len({e["id"] for e in collector.events()}) < 2:
        assert time.monotonic() < deadline, "an event never arrived"
        time.sleep(0.05)
    assert len({e["id"] for e in collector.events()}) == 2


@pytest.mark.parametrize("mode", [(), ("-g",)], ids=["threading", "gevent"])
def test_sigterm_delivers_queued_events_before_exit(
    make_harness: HarnessFactory,
    collector: FakeCollector,
    plugin_config: dict[str, Any],
    mode: tuple[str, ...],
) -> None:
    """Kong stops plugin servers with SIGTERM: what is queued is shipped (or spooled)."""
    harness = make_harness("token-meter-plugin", *mode)
    config = plugin_config | {"max_coalescing_delay": 30}  # nothing would leave on its own
    for _ in range(5):
        harness.request(plain_request(), config)
    assert harness.stop() == 0
    assert len(collector.events()) == 5
    assert not Path(harness.socket_path).exists()


def test_dump_prints_only_json_even_with_verbose(tmp_path: Path) -> None:
    harness = KongHarness([str(VENV_BIN / "token-meter-plugin"), "-v"], tmp_path)
    assert harness.query()["Name"] == "token-meter"
    assert sys.executable  # the query ran the console script, not this interpreter
