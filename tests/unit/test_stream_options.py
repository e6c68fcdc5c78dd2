"""inject_stream_usage: OpenAI streaming requests ask for usage; everything else is untouched."""

from __future__ import annotations

import json
from typing import Any

import pytest

from token_meter_plugin.stream_options import inject_stream_usage

JSON = "application/json"


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
COMPLETIONS = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test", "stream": True}


@pytest.mark.parametrize("request_fields", [CHAT, COMPLETIONS], ids=["chat", "completions"])
def test_streaming_request_without_stream_options_gets_include_usage(
    request_fields: dict[str, Any],
) -> None:
    original = body(**request_fields)
    changed = inject_stream_usage(original, JSON)
    assert changed is not None
    assert json.loads(changed) == {**request_fields, "stream_options": {"include_usage": True}}


def test_the_original_bytes_are_kept_as_sent() -> None:
    """No re-serialization: escapes, spacing and key order survive; only the field is added."""
    original = (
        b'{\n  "model": "gpt-4o",\n'
        b'  "messages": [{"role": "user", "content": "\\u00e9 1.50e+2"}],\n'
        b'  "stream": true\n}\n'
    )
    changed = inject_stream_usage(original, "application/json; charset=utf-8")
    assert changed == original[:-2] + b',"stream_options":{"include_usage":true}}\n'


def test_other_stream_options_are_kept() -> None:
    original = body(**CHAT, stream_options={"include_obfuscation": False})
    changed = inject_stream_usage(original, JSON)
    assert changed is not None
    assert json.loads(changed)["stream_options"] == {
        "include_obfuscation": False,
        "include_usage": True,
    }
    assert {k: v for k, v in json.loads(changed).items() if k != "stream_options"} == CHAT


def test_null_stream_options_are_replaced() -> None:
    changed = inject_stream_usage(body(**CHAT, stream_options=None), JSON)
    assert changed is not None
    assert json.loads(changed)["stream_options"] == {"include_usage": True}


def test_a_request_already_asking_for_usage_is_left_alone() -> None:
    assert inject_stream_usage(body(**CHAT, stream_options={"include_usage": True}), JSON) is None


def test_an_explicit_false_is_the_clients_choice() -> None:
    original = body(**CHAT, stream_options={"include_usage": False})
    assert inject_stream_usage(original, JSON) is None


@pytest.mark.parametrize("stream", [False, None, "true", 1], ids=["false", "null", "str", "int"])
def test_non_streaming_requests_are_left_alone(stream: Any) -> None:
    assert inject_stream_usage(body(**{**CHAT, "stream": stream}), JSON) is None


def test_request_without_stream_key_is_left_alone() -> None:
    fields = {k: v for k, v in CHAT.items() if k != "stream"}
    assert inject_stream_usage(body(**fields), JSON) is None


def test_responses_api_request_is_left_alone() -> None:
    """The Responses API always reports usage and has no stream_options.include_usage."""
    assert inject_stream_usage(body(model="gpt-4.1", input="Hi", stream=True), JSON) is None


@pytest.mark.parametrize(
    "anthropic",
    [
        {"model": "claude-sonnet-4-20250514", "max_tokens": 1024, "messages": [], "stream": True},
        {"model": "my-alias", "system": "Be brief", "messages": [], "stream": True},
        {"model": "my-alias", "messages": [], "stop_sequences": ["x"], "stream": True},
        {"model": "my-alias", "messages": [], "top_k": 5, "stream": True},
        {"model": "m", "messages": [], "thinking": {"type": "enabled"}, "stream": True},
        {"anthropic_version": "bedrock-2023-05-31", "messages": [], "stream": True},
    ],
    ids=["claude-model", "system", "stop_sequences", "top_k", "thinking", "bedrock"],
)
def test_anthropic_messages_requests_are_left_alone(anthropic: dict[str, Any]) -> None:
    """Anthropic always streams usage and rejects unknown fields."""
    assert inject_stream_usage(body(**anthropic), JSON) is None


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (body(**CHAT), "text/plain"),
        (body(**CHAT), "multipart/form-data; boundary=x"),
        (b'{"stream": true, "messages": [', JSON),
        (b"[1, 2]", JSON),
        (b"", JSON),
        (b"not json", None),
        (body(**CHAT, stream_options="yes"), JSON),
        (b"\xff\xfe{", JSON),
    ],
    ids=[
        "text-plain",
        "multipart",
        "truncated",
        "array",
        "empty",
        "not-json-no-type",
        "stream-options-not-object",
        "not-utf8",
    ],
)
def test_bodies_that_are_not_a_json_object_request_are_left_alone(
    raw: bytes, content_type: str | None
) -> None:
    assert inject_stream_usage(raw, content_type) is None


def test_json_is_recognised_without_content_type_and_with_a_json_suffix_type() -> None:
    assert inject_stream_usage(body(**CHAT), None) is not None
    assert inject_stream_usage(body(**CHAT), "application/vnd.api+json") is not None
