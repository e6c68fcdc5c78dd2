"""Property tests of the usage parsers (plugin/usage): whatever the body, `extract_usage` and
`usage_from_ai_proxy_log` answer with well-formed usage, never raise, and never take the
"parser bug" path (logged and counted as `usage_parse_errors`), in bounded time and memory."""

from __future__ import annotations

import gzip
import time
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.fuzz.strategies import (
    CONTENT_ENCODINGS,
    CONTENT_TYPES,
    DEEP,
    GOLDEN_BODIES,
    compress,
    counts,
    deep_nesting,
    json_values,
    response_bodies,
    usage_objects,
)
from token_meter_plugin import metrics
from token_meter_plugin.usage import MAX_TOKENS, Usage, extract_usage, usage_from_ai_proxy_log

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROVIDERS = (None, "openai", "anthropic")
AI_PROXY_KEYS = ("proxy", "ai-proxy", "ai-proxy-advanced", "usage", "meta")


def assert_well_formed(usage: Usage) -> None:
    """Contract 2's rules, which the collector would otherwise refuse the event for."""
    parts = (
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_input_tokens,
        usage.cache_write_input_tokens,
        usage.reasoning_tokens,
        usage.total_tokens,
    )
    assert all(type(n) is int and 0 <= n <= MAX_TOKENS for n in parts), usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.cached_input_tokens + usage.cache_write_input_tokens <= usage.input_tokens
    assert usage.reasoning_tokens <= usage.output_tokens
    if usage.usage_missing:
        assert not any(parts), usage
    assert isinstance(usage.streamed, bool) and isinstance(usage.usage_missing, bool)
    assert usage.model is None or (isinstance(usage.model, str) and usage.model)
    assert usage.provider is None or isinstance(usage.provider, str)


def parse_errors() -> int:
    return metrics.snapshot().get("usage_parse_errors", 0)


@FUZZ
@given(
    body=response_bodies(),
    content_type=st.sampled_from(CONTENT_TYPES),
    content_encoding=st.sampled_from(CONTENT_ENCODINGS),
    max_size=st.one_of(st.just(32 * 1024 * 1024), st.integers(0, 4096)),
)
def test_any_body_gives_well_formed_usage(
    body: bytes, content_type: str | None, content_encoding: str | None, max_size: int
) -> None:
    before = parse_errors()
    usage = extract_usage(
        body, content_type=content_type, content_encoding=content_encoding, max_size=max_size
    )
    assert_well_formed(usage)
    assert usage.provider in PROVIDERS
    assert parse_errors() == before, "the parser raised (see the log)"


@FUZZ
@given(
    body=response_bodies(),
    coding=st.sampled_from(("gzip", "x-gzip", "deflate", "br", "gzip, br", "br, gzip")),
)
def test_compression_changes_nothing(body: bytes, coding: str) -> None:
    """A body compressed and labelled as such reads exactly as the plain body does."""
    content_type = "text/event-stream" if b"data:" in body[:64] else "application/json"
    plain = extract_usage(body, content_type=content_type, content_encoding=None)
    packed = extract_usage(
        compress(body, coding), content_type=content_type, content_encoding=coding
    )
    assert packed == plain


@FUZZ
@given(body=st.sampled_from(GOLDEN_BODIES), data=st.data())
def test_a_truncated_stream_or_body_never_counts_more_than_the_whole(
    body: bytes, data: st.DataObject
) -> None:
    """A body cut short (a client that hung up, a proxy that gave up) may lose its usage, but
    never reports more tokens than the whole body does: nothing is counted twice or invented."""
    whole = extract_usage(body, content_type=None, content_encoding=None)
    cut = data.draw(st.integers(0, len(body)))
    part = extract_usage(body[:cut], content_type=None, content_encoding=None)
    assert_well_formed(part)
    if not part.usage_missing and not whole.usage_missing:
        assert part.total_tokens <= whole.total_tokens


@FUZZ
@given(body=deep_nesting())
@example(body=b"[" * DEEP + b"]" * DEEP)
@example(body=b'data: {"usage":' + b"[" * DEEP + b"\n\n")
def test_deep_nesting_is_usage_missing_not_a_parser_failure(body: bytes) -> None:
    before = parse_errors()
    for content_type in ("application/json", "text/event-stream"):
        usage = extract_usage(body, content_type=content_type, content_encoding=None)
        assert_well_formed(usage)
    assert parse_errors() == before


@pytest.mark.parametrize("coding", ["gzip", "br", "deflate"])
def test_a_compression_bomb_costs_at_most_the_size_bound(coding: str) -> None:
    """64 MiB of zeros in a few kB: refused at the bound (1 MiB here), memory bounded by it."""
    bound = 1024 * 1024
    bomb = compress(b"{" + b" " * (64 * 1024 * 1024) + b"}", coding)
    assert len(bomb) < 1024 * 1024
    tracemalloc.start()
    try:
        usage = extract_usage(
            bomb, content_type="application/json", content_encoding=coding, max_size=bound
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert usage.usage_missing
    assert peak < 4 * bound + len(bomb)


def test_huge_bodies_take_linear_time() -> None:
    """16 MiB of JSON and of SSE, each read in well under a few seconds (no quadratic scan)."""
    big_json = b'{"model":"m","choices":["' + b"x" * (16 * 1024 * 1024) + b'"],"usage":{}}'
    event = b'data: {"choices":[{"delta":{"content":"' + b"y" * 200 + b'"}}]}\n\n'
    big_sse = event * (16 * 1024 * 1024 // len(event))
    stream_end = b'data: {"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
    for body, content_type in ((big_json, "application/json"), (big_sse + stream_end, None)):
        started = time.perf_counter()
        usage = extract_usage(body, content_type=content_type, content_encoding=None)
        assert time.perf_counter() - started < 5.0
        assert_well_formed(usage)
    assert usage.total_tokens == 7


def test_a_gzip_stream_of_many_members_is_bounded_too() -> None:
    member = gzip.compress(b" " * 65536, mtime=0)
    body = gzip.compress(b"{", mtime=0) + member * 64 + gzip.compress(b"}", mtime=0)
    usage = extract_usage(body, content_type=None, content_encoding="gzip", max_size=1_000_000)
    assert usage.usage_missing


# -- usage_from_ai_proxy_log: what kong.log.serialize() gave, any shape --------------------------


@st.composite
def serialized_logs(draw: st.DrawFn) -> Any:
    """A `kong.log.serialize()` table with an `ai` part in any of Kong's shapes, or another."""
    usage = draw(
        st.dictionaries(
            st.sampled_from(
                ("prompt_tokens", "completion_tokens", "prompt_token", "completion_token")
            ),
            counts,
        )
        | usage_objects()
    )
    meta = draw(
        st.dictionaries(
            st.sampled_from(("provider_name", "response_model", "request_model")),
            st.text(max_size=10) | st.just("UNSPECIFIED") | json_values,
        )
        | json_values
    )
    container = draw(
        st.fixed_dictionaries({}, optional={"usage": st.just(usage), "meta": st.just(meta)})
    )
    key = draw(st.sampled_from(AI_PROXY_KEYS))
    ai = container if key in ("usage", "meta") else {key: container}
    content_type = draw(
        st.sampled_from(CONTENT_TYPES) | st.lists(st.text(max_size=20)) | json_values
    )
    log: dict[str, Any] = {
        "ai": draw(st.one_of(st.just(ai), st.just(ai), json_values)),
        "response": draw(st.just({"headers": {"content-type": content_type}}) | json_values),
    }
    log.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)))
    return draw(
        st.one_of(st.just(log), st.just(log), st.just(log), st.dictionaries(st.text(), json_values))
    )


@FUZZ
@given(serialized=serialized_logs())
def test_any_ai_proxy_log_gives_none_or_well_formed_usage(serialized: Any) -> None:
    usage = usage_from_ai_proxy_log(serialized)
    if usage is not None:
        assert_well_formed(usage)
        if not usage.usage_missing:
            assert usage.input_tokens + usage.output_tokens > 0
