"""extract_usage and usage_from_ai_proxy_log: normalized usage from provider bodies and Kong."""

from __future__ import annotations

import gzip
import json
import random
import zlib
from pathlib import Path
from typing import Any

import brotli
import msgspec
import pytest

from token_meter_plugin.usage import MAX_TOKENS, Usage, extract_usage, usage_from_ai_proxy_log

FIXTURES = Path(__file__).parents[1] / "fixtures" / "providers"
EXPECTED = sorted(FIXTURES.glob("*.expected.json"))
SSE_EXPECTED = [p for p in EXPECTED if json.loads(p.read_text())["body"].endswith(".sse")]
MiB = 1024 * 1024


def load(expected_path: Path) -> tuple[bytes, str, dict[str, Any]]:
    spec = json.loads(expected_path.read_text())
    return (FIXTURES / spec["body"]).read_bytes(), spec["content_type"], spec["usage"]


def as_dict(usage: Usage) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.structs.asdict(usage)
    return result


def assert_consistent(usage: Usage) -> None:
    """The event contract's rules, which every result must satisfy."""
    counts = (
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_input_tokens,
        usage.cache_write_input_tokens,
        usage.reasoning_tokens,
        usage.total_tokens,
    )
    assert all(type(n) is int and 0 <= n <= MAX_TOKENS for n in counts)
    assert usage.cached_input_tokens + usage.cache_write_input_tokens <= usage.input_tokens
    assert usage.reasoning_tokens <= usage.output_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    if usage.usage_missing:
        assert not any(counts)


def extract(body: bytes, content_type: str | None = "application/json", **kw: Any) -> Usage:
    return extract_usage(body, content_type=content_type, content_encoding=None, **kw)


# --- golden payloads ------------------------------------------------------------------------


def test_there_is_a_golden_payload_for_every_required_kind() -> None:
    names = {p.name.removesuffix(".expected.json") for p in EXPECTED}
    assert {
        "openai_chat",
        "openai_chat_stream_usage",
        "openai_chat_stream_no_usage",
        "openai_completions",
        "openai_embeddings",
        "openai_responses",
        "openai_responses_stream",
        "anthropic_messages",
        "anthropic_messages_stream",
        "openai_error",
        "openai_chat_o_series",
        "openai_chat_cached",
    } <= names


@pytest.mark.parametrize("expected_path", EXPECTED, ids=lambda p: p.name.split(".")[0])
def test_golden_payload_gives_its_expected_usage(expected_path: Path) -> None:
    body, content_type, expected = load(expected_path)
    usage = extract_usage(body, content_type=content_type, content_encoding=None)
    assert as_dict(usage) == expected
    assert_consistent(usage)


COMPRESSORS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "gzip, br": lambda data: brotli.compress(gzip.compress(data)),
}


@pytest.mark.parametrize("coding", sorted(COMPRESSORS))
@pytest.mark.parametrize("expected_path", EXPECTED, ids=lambda p: p.name.split(".")[0])
def test_compressed_golden_payload_gives_the_same_usage(expected_path: Path, coding: str) -> None:
    body, content_type, expected = load(expected_path)
    usage = extract_usage(
        COMPRESSORS[coding](body), content_type=content_type, content_encoding=coding
    )
    assert as_dict(usage) == expected


@pytest.mark.parametrize("expected_path", EXPECTED, ids=lambda p: p.name.split(".")[0])
def test_format_is_told_from_the_body_when_content_type_is_missing(expected_path: Path) -> None:
    body, _, expected = load(expected_path)
    assert as_dict(extract(body, content_type=None)) == expected


@pytest.mark.parametrize("expected_path", SSE_EXPECTED, ids=lambda p: p.name.split(".")[0])
def test_sse_with_crlf_line_endings_gives_the_same_usage(expected_path: Path) -> None:
    body, content_type, expected = load(expected_path)
    assert as_dict(extract(body.replace(b"\n", b"\r\n"), content_type)) == expected


# --- SSE details ----------------------------------------------------------------------------

SSE = "text/event-stream"


def sse(*events: dict[str, Any] | str, named: bool = False) -> bytes:
    out = []
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        if named and not isinstance(event, str):
            out.append(f"event: {event['type']}\n")
        out.append(f"data: {data}\n\n")
    return "".join(out).encode()


def chat_chunk(usage: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini",
        "choices": [] if usage else [{"index": 0, "delta": {"content": "x"}}],
        "usage": usage,
        **extra,
    }


def test_sse_event_split_over_several_data_lines_is_read() -> None:
    """The SSE spec joins consecutive data lines of one event with LF; JSON allows that."""
    final = json.dumps(chat_chunk({"prompt_tokens": 7, "completion_tokens": 3}), indent=1)
    body = sse(chat_chunk()) + "".join(f"data: {line}\n" for line in final.splitlines()).encode()
    body += b"\ndata: [DONE]\n\n"
    usage = extract(body, SSE)
    assert (usage.input_tokens, usage.output_tokens, usage.usage_missing) == (7, 3, False)
    assert usage.model == "gpt-4o-mini"


def test_sse_usage_with_spaces_after_colons_is_read() -> None:
    body = (
        b'data: {"object": "chat.completion.chunk", "model": "m", "usage": null}\n\n'
        b'data: {"object": "chat.completion.chunk", "model": "m", "usage": '
        b'{"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}\n\n'
        b"data: [DONE]\n\n"
    )
    usage = extract(body, SSE)
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (4, 2, 6)


def test_sse_text_that_quotes_usage_is_not_taken_for_usage() -> None:
    """Inside JSON strings quotes are escaped, so content mentioning "usage" is ignored."""
    body = sse(
        chat_chunk(),
        {
            "object": "chat.completion.chunk",
            "model": "m",
            "choices": [
                {"index": 0, "delta": {"content": 'the "usage":{"prompt_tokens":99} field'}}
            ],
        },
        "[DONE]",
    )
    usage = extract(body, SSE)
    assert usage.usage_missing
    assert usage.input_tokens == 0


def test_anthropic_stream_cut_after_message_start_keeps_the_input_counts() -> None:
    start = {
        "type": "message_start",
        "message": {
            "type": "message",
            "model": "claude-3-5-haiku-20241022",
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 1},
        },
    }
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    usage = extract(sse(start, error, named=True), SSE)
    assert as_dict(usage) == {
        "provider": "anthropic",
        "model": "claude-3-5-haiku-20241022",
        "input_tokens": 15,
        "output_tokens": 1,
        "cached_input_tokens": 5,
        "cache_write_input_tokens": 0,
        "reasoning_tokens": 0,
        "total_tokens": 16,
        "streamed": True,
        "usage_missing": False,
    }


def test_anthropic_input_counts_are_found_when_other_events_come_first() -> None:
    """A proxy's ping or comment ahead of message_start does not lose the input tokens."""
    start = {
        "type": "message_start",
        "message": {
            "model": "claude",
            "usage": {"input_tokens": 100, "cache_creation_input_tokens": 50, "output_tokens": 1},
        },
    }
    body = b": proxied\n\n" + sse(
        {"type": "ping"},
        start,
        {"type": "message_delta", "usage": {"output_tokens": 9}},
        named=True,
    )
    usage = extract(body, SSE)
    assert (usage.input_tokens, usage.cache_write_input_tokens, usage.output_tokens) == (150, 50, 9)
    assert usage.model == "claude"


@pytest.mark.parametrize("expected_path", SSE_EXPECTED, ids=lambda p: p.name.split(".")[0])
def test_sse_with_cr_only_line_endings_gives_the_same_usage(expected_path: Path) -> None:
    """CR alone ends a line in SSE too; such bodies take the event-by-event path."""
    body, content_type, expected = load(expected_path)
    assert as_dict(extract(body.replace(b"\n", b"\r"), content_type)) == expected


def test_anthropic_message_delta_usage_replaces_rather_than_adds() -> None:
    start = {
        "type": "message_start",
        "message": {"model": "claude", "usage": {"input_tokens": 100, "output_tokens": 1}},
    }
    deltas = [{"type": "message_delta", "usage": {"output_tokens": n}} for n in (5, 20, 42)]
    usage = extract(sse(start, *deltas, {"type": "message_stop"}, named=True), SSE)
    assert (usage.input_tokens, usage.output_tokens) == (100, 42)


@pytest.mark.parametrize(
    "terminal", ["response.completed", "response.incomplete", "response.failed"]
)
def test_responses_stream_reads_usage_from_its_terminal_event(terminal: str) -> None:
    created = {"type": "response.created", "response": {"model": "gpt-4.1", "usage": None}}
    final = {
        "type": terminal,
        "response": {
            "object": "response",
            "model": "gpt-4.1",
            "usage": {
                "input_tokens": 30,
                "input_tokens_details": {"cached_tokens": 10},
                "output_tokens": 9,
                "output_tokens_details": {"reasoning_tokens": 4},
            },
        },
    }
    usage = extract(sse(created, final, named=True), SSE)
    assert (usage.input_tokens, usage.cached_input_tokens) == (30, 10)
    assert (usage.output_tokens, usage.reasoning_tokens) == (9, 4)
    assert usage.provider == "openai" and usage.streamed


def test_sse_is_recognised_from_an_event_line_or_a_comment_without_content_type() -> None:
    body = b": keep-alive\n\n" + sse(chat_chunk({"prompt_tokens": 1, "completion_tokens": 1}))
    assert extract(body, None).streamed
    assert extract(body, None).total_tokens == 2


def test_a_json_body_under_an_sse_content_type_is_read_as_json() -> None:
    body = json.dumps({"error": {"message": "bad", "type": "invalid_request_error"}}).encode()
    usage = extract(body, SSE)
    assert usage.usage_missing and not usage.streamed


def test_completions_stream_with_include_usage_is_read() -> None:
    chunk = {
        "object": "text_completion",
        "model": "gpt-3.5-turbo-instruct",
        "choices": [{"text": "hi", "index": 0}],
        "usage": None,
    }
    last = dict(
        chunk, choices=[], usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    )
    usage = extract(sse(chunk, last, "[DONE]"), SSE)
    assert (usage.input_tokens, usage.output_tokens, usage.model) == (
        3,
        1,
        "gpt-3.5-turbo-instruct",
    )


# --- normalization rules --------------------------------------------------------------------


def chat(usage: Any, model: str = "gpt-4o") -> bytes:
    return json.dumps({"object": "chat.completion", "model": model, "usage": usage}).encode()


def test_a_provider_total_that_disagrees_is_ignored() -> None:
    usage = extract(chat({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 999}))
    assert usage.total_tokens == 15 and not usage.usage_missing


def test_responses_cached_and_reasoning_details_are_read() -> None:
    body = json.dumps(
        {
            "object": "response",
            "model": "o3",
            "usage": {
                "input_tokens": 50,
                "input_tokens_details": {"cached_tokens": 20},
                "output_tokens": 40,
                "output_tokens_details": {"reasoning_tokens": 30},
            },
        }
    ).encode()
    usage = extract(body)
    assert (usage.input_tokens, usage.cached_input_tokens) == (50, 20)
    assert (usage.output_tokens, usage.reasoning_tokens) == (40, 30)


def test_anthropic_input_adds_cache_reads_and_writes() -> None:
    body = json.dumps(
        {
            "type": "message",
            "model": "claude",
            "usage": {
                "input_tokens": 3,
                "cache_read_input_tokens": 100,
                "cache_creation_input_tokens": 20,
                "output_tokens": 7,
            },
        }
    ).encode()
    usage = extract(body)
    assert usage.input_tokens == 123
    assert (usage.cached_input_tokens, usage.cache_write_input_tokens) == (100, 20)
    assert usage.total_tokens == 130


@pytest.mark.parametrize(
    "bad_usage",
    [
        {"prompt_tokens": -1, "completion_tokens": 5},
        {"prompt_tokens": 10.0, "completion_tokens": 5},
        {"prompt_tokens": 10.5, "completion_tokens": 5},
        {"prompt_tokens": "10", "completion_tokens": 5},
        {"prompt_tokens": True, "completion_tokens": 5},
        {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": -15},
        {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 11},
        },
        {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "completion_tokens_details": {"reasoning_tokens": 6},
        },
        {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "completion_tokens_details": {"reasoning_tokens": -1},
        },
        {"prompt_tokens": MAX_TOKENS + 1, "completion_tokens": 0},
        {"prompt_tokens": MAX_TOKENS, "completion_tokens": 1},
        {},
        {"total_tokens": 15},
        [10, 5],
        "10 tokens",
    ],
    ids=[
        "negative",
        "float-integral",
        "float",
        "string",
        "bool",
        "negative-total",
        "cached-over-input",
        "reasoning-over-output",
        "negative-detail",
        "over-schema-max",
        "sum-over-schema-max",
        "empty",
        "total-only",
        "array",
        "string-usage",
    ],
)
def test_untrustworthy_usage_is_reported_missing_with_the_model_kept(bad_usage: Any) -> None:
    usage = extract(chat(bad_usage))
    assert usage.usage_missing
    assert usage.model == "gpt-4o"
    assert_consistent(usage)


def test_anthropic_negative_cache_count_makes_usage_missing() -> None:
    body = json.dumps(
        {
            "type": "message",
            "model": "claude",
            "usage": {"input_tokens": 3, "cache_read_input_tokens": -100, "output_tokens": 7},
        }
    ).encode()
    assert extract(body).usage_missing


def test_null_details_are_treated_as_absent() -> None:
    usage = extract(
        chat(
            {
                "prompt_tokens": 9,
                "completion_tokens": 1,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            }
        )
    )
    assert (usage.input_tokens, usage.cached_input_tokens, usage.usage_missing) == (9, 0, False)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"<html><body>502 Bad Gateway</body></html>",
        b"[1, 2, 3]",
        b'"just a string"',
        b"null",
        b'{"message": "Internal server error"}',
        b'{"usage": null}',
        b'{"detail": "Not Found"}',
    ],
)
def test_bodies_without_usable_usage_are_reported_missing(body: bytes) -> None:
    usage = extract(body)
    assert usage.usage_missing
    assert_consistent(usage)


def test_a_model_that_is_not_a_string_is_dropped_but_usage_is_kept() -> None:
    usage = extract(b'{"model": 7, "usage": {"prompt_tokens": 1, "completion_tokens": 2}}')
    assert usage.model is None and usage.total_tokens == 3


def test_body_over_the_size_bound_is_reported_missing() -> None:
    body = chat({"prompt_tokens": 1, "completion_tokens": 1})
    assert extract(body, max_size=len(body) - 1).usage_missing
    assert not extract(body, max_size=len(body)).usage_missing


def test_gzip_bomb_is_reported_missing_without_raising() -> None:
    bomb = gzip.compress(bytes(64 * MiB))
    usage = extract_usage(bomb, content_type=None, content_encoding="gzip", max_size=MiB)
    assert usage.usage_missing


def test_plain_body_labelled_as_compressed_is_still_read() -> None:
    """Upstreams that mislabel a plain body should not cost the usage."""
    body = chat({"prompt_tokens": 2, "completion_tokens": 3})
    assert extract_usage(body, content_type=None, content_encoding="br").total_tokens == 5


def test_usage_is_frozen() -> None:
    usage = Usage(input_tokens=1, total_tokens=1)
    with pytest.raises(AttributeError):
        usage.input_tokens = 2  # type: ignore[misc]


# --- never raises ---------------------------------------------------------------------------


def test_extract_usage_never_raises_on_random_truncated_or_corrupted_input() -> None:
    """Fuzz without hypothesis: random bytes, every fixture cut short, flipped bytes, codings."""
    rng = random.Random(20240601)
    bodies: list[bytes] = [rng.randbytes(rng.randrange(0, 300)) for _ in range(300)]
    for path in EXPECTED:
        body, _, _ = load(path)
        bodies += [body[: rng.randrange(0, len(body))] for _ in range(15)]
        for _ in range(15):
            mutated = bytearray(body)
            for _ in range(rng.randrange(1, 6)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            bodies.append(bytes(mutated))
        compressed = gzip.compress(body)
        bodies += [compressed[: rng.randrange(0, len(compressed))] for _ in range(5)]
    prefixes = [b"data: ", b"event: x\ndata: ", b"{", b'{"usage":', b'data: {"usage":{']
    bodies += [p + rng.randbytes(50) for p in prefixes for _ in range(20)]
    content_types = [None, "application/json", "text/event-stream", "text/html", ";;", ""]
    encodings = [None, "gzip", "deflate", "br", "gzip, br", "zstd", ",", "identity"]
    for body in bodies:
        usage = extract_usage(
            body,
            content_type=rng.choice(content_types),
            content_encoding=rng.choice(encodings),
            max_size=rng.choice([0, 10, MiB]),
        )
        assert isinstance(usage, Usage)
        assert_consistent(usage)


# --- Kong ai-proxy log (layouts read from Kong's source, 3.6 to 3.9) ------------------------


def kong_39(usage: dict[str, Any] | None = None) -> dict[str, Any]:
    proxy: dict[str, Any] = {
        "meta": {
            "plugin_id": "6e7c40f6-ce96-48e4-a366-d109c169e444",
            "provider_name": "openai",
            "request_model": "gpt-4o",
            "response_model": "gpt-4o-2024-08-06",
            "llm_latency": 1734,
        }
    }
    if usage is not None:
        proxy["usage"] = usage
    return {"ai": {"proxy": proxy}, "response": {"status": 200, "headers": {}}}


def test_kong_39_layout_is_read() -> None:
    serialized = kong_39(
        {
            "prompt_tokens": 28,
            "completion_tokens": 20,
            "total_tokens": 48,
            "cost": 0.0038,
            "time_per_token": 86.7,
        }
    )
    assert usage_from_ai_proxy_log(serialized) == Usage(
        provider="openai",
        model="gpt-4o-2024-08-06",
        input_tokens=28,
        output_tokens=20,
        total_tokens=48,
    )


def test_kong_38_layout_is_read() -> None:
    serialized = {
        "ai": {
            "ai-proxy": {
                "usage": {
                    "prompt_tokens": 11,
                    "completion_tokens": 4,
                    "total_tokens": 15,
                    "cost": 0,
                },
                "meta": {
                    "provider_name": "anthropic",
                    "request_model": "claude-3-5-sonnet-20240620",
                    "response_model": "claude-3-5-sonnet-20240620",
                    "plugin_id": "x",
                    "llm_latency": 900,
                },
                "cache": {},
            }
        }
    }
    usage = usage_from_ai_proxy_log(serialized)
    assert usage is not None
    assert (usage.provider, usage.model) == ("anthropic", "claude-3-5-sonnet-20240620")
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (11, 4, 15)


def test_kong_37_layout_with_singular_keys_is_read() -> None:
    serialized = {
        "ai": {
            "payload": {"request": "{}"},
            "ai-proxy": {
                "usage": {"prompt_token": 28, "completion_token": 20, "total_tokens": 48},
                "meta": {
                    "provider_name": "azure",
                    "request_model": "gpt-35-turbo",
                    "response_model": "gpt-35-turbo",
                    "plugin_id": "y",
                },
            },
        }
    }
    usage = usage_from_ai_proxy_log(serialized)
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.model) == (28, 20, "gpt-35-turbo")


def test_kong_36_layout_is_read() -> None:
    serialized = {
        "ai": {
            "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
            "meta": {
                "request_model": "gpt-3.5-turbo",
                "response_model": "gpt-3.5-turbo-0125",
                "provider_name": "openai",
            },
        }
    }
    usage = usage_from_ai_proxy_log(serialized)
    assert usage is not None
    assert (usage.total_tokens, usage.model, usage.provider) == (11, "gpt-3.5-turbo-0125", "openai")


def test_ai_proxy_advanced_container_is_read() -> None:
    serialized = {
        "ai": {
            "ai-proxy-advanced": {"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "meta": {}}
        }
    }
    usage = usage_from_ai_proxy_log(serialized)
    assert usage is not None and usage.total_tokens == 3


@pytest.mark.parametrize(
    "serialized",
    [{}, {"ai": None}, {"ai": {}}, {"ai": {"payload": {"request": "{}"}}}, {"request": {}}],
)
def test_no_ai_proxy_data_gives_none(serialized: dict[str, Any]) -> None:
    assert usage_from_ai_proxy_log(serialized) is None


@pytest.mark.parametrize(
    "usage",
    [
        None,
        {},
        {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cost": 0},
        {"prompt_tokens": -1, "completion_tokens": 3},
        {"prompt_tokens": 1.5, "completion_tokens": 3},
        {"prompt_tokens": 3},
        {"prompt_tokens": MAX_TOKENS, "completion_tokens": 1},
    ],
    ids=[
        "no-usage",
        "empty",
        "kong-zero-placeholder",
        "negative",
        "float",
        "no-completion",
        "over-max",
    ],
)
def test_ai_proxy_data_without_valid_usage_is_usage_missing(usage: dict[str, Any] | None) -> None:
    result = usage_from_ai_proxy_log(kong_39(usage))
    assert result is not None and result.usage_missing
    assert result.model == "gpt-4o-2024-08-06" and result.provider == "openai"
    assert_consistent(result)


def test_unspecified_models_fall_back_or_become_none() -> None:
    serialized = kong_39({"prompt_tokens": 1, "completion_tokens": 1})
    serialized["ai"]["proxy"]["meta"]["response_model"] = "UNSPECIFIED"
    assert usage_from_ai_proxy_log(serialized).model == "gpt-4o"  # type: ignore[union-attr]
    serialized["ai"]["proxy"]["meta"]["request_model"] = "UNSPECIFIED"
    assert usage_from_ai_proxy_log(serialized).model is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("content_type", "streamed"),
    [
        ("text/event-stream; charset=utf-8", True),
        (["text/event-stream"], True),
        ("application/json", False),
        (None, False),
    ],
)
def test_ai_proxy_streamed_flag_comes_from_the_response_content_type(
    content_type: Any, streamed: bool
) -> None:
    serialized = kong_39({"prompt_tokens": 1, "completion_tokens": 1})
    if content_type is not None:
        serialized["response"]["headers"]["content-type"] = content_type
    assert usage_from_ai_proxy_log(serialized).streamed is streamed  # type: ignore[union-attr]


class _ExplodingBody(bytes):
    """A body whose inspection fails: stands for a bug in the parser."""

    def __getitem__(self, key: object) -> Any:
        raise RuntimeError("parser bug")


def test_a_parser_exception_is_logged_and_counted_not_passed_off_as_missing_usage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from token_meter_plugin import metrics

    before = metrics.snapshot().get("usage_parse_errors", 0)
    with caplog.at_level("ERROR", logger="token_meter_plugin"):
        usage = extract_usage(
            _ExplodingBody(b'{"usage":{}}'), content_type=None, content_encoding=None
        )
    assert usage.usage_missing  # the request still gets its event
    assert metrics.snapshot()["usage_parse_errors"] == before + 1
    assert any("usage_parse_failed" in r.getMessage() and r.exc_info for r in caplog.records)
