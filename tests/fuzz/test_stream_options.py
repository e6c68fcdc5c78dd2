"""Property tests of `inject_stream_usage` (plugin/stream_options.py), which reads the client's
request body, the most hostile input the plugin sees: it never raises, and a body it changes
gains `stream_options.include_usage = true` and loses or alters nothing else."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.strategies import DEEP, deep_nesting, json_values, mangled, to_json
from token_meter_plugin.stream_options import inject_stream_usage

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
JSON_TYPES = (None, "application/json", "application/vnd.api+json; charset=utf-8", "text/plain")


@st.composite
def requests(draw: st.DrawFn) -> Any:
    """Chat Completions, Completions, Responses and Messages requests, and things like them."""
    body: dict[str, Any] = {}
    optional = {
        "stream": st.just(True) | st.just(True) | json_values,
        "model": st.sampled_from(("gpt-4o", "claude-3-5-sonnet", "o3")) | json_values,
        "messages": st.lists(json_values, max_size=3) | json_values,
        "prompt": st.text(max_size=10) | json_values,
        "input": st.text(max_size=10),
        "stream_options": st.dictionaries(
            st.sampled_from(("include_usage", "include_obfuscation", "x")), json_values
        )
        | json_values,
        "system": json_values,
        "thinking": json_values,
        "max_tokens": st.integers(),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            body[key] = draw(strategy)
    body.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)))
    return draw(st.one_of(st.just(body), st.just(body), st.just(body), json_values))


def decoded(body: bytes) -> Any:
    return msgspec.json.decode(body)


def decodes(body: bytes) -> bool:
    try:
        decoded(body)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return False
    return True


@FUZZ
@given(request=requests(), ascii_only=st.booleans(), content_type=st.sampled_from(JSON_TYPES))
def test_a_changed_body_only_gains_include_usage(
    request: Any, ascii_only: bool, content_type: str | None
) -> None:
    body = to_json(request, ascii_only)
    changed = inject_stream_usage(body, content_type)
    if changed is None:
        return
    before, after = decoded(body), decoded(changed)
    assert isinstance(after, dict)
    assert after["stream_options"]["include_usage"] is True
    assert {k: v for k, v in after.items() if k != "stream_options"} == {
        k: v for k, v in before.items() if k != "stream_options"
    }
    options = before.get("stream_options") or {}  # null include_usage: not asked, so set
    assert {k: v for k, v in after["stream_options"].items() if k != "include_usage"} == {
        k: v for k, v in options.items() if k != "include_usage"
    }
    assert inject_stream_usage(changed, content_type) is None  # asked once is enough


@FUZZ
@given(data=st.data(), request=requests(), content_type=st.sampled_from(JSON_TYPES))
def test_any_body_is_answered_without_raising(
    data: st.DataObject, request: Any, content_type: str | None
) -> None:
    for body in (
        data.draw(mangled(to_json(request, True))),
        data.draw(deep_nesting()),
        data.draw(st.binary(max_size=100)),
    ):
        changed = inject_stream_usage(body, content_type)
        if changed is not None and decodes(body):  # else forwarded as broken as it came
            assert isinstance(decoded(changed), dict)


def test_a_body_nested_past_the_decoders_bound_is_left_alone() -> None:
    for inner in (b"[" * DEEP + b"]" * DEEP, b"[" * DEEP):
        body = b'{"stream":true,"messages":[],"x":' + inner + b"}"
        assert inject_stream_usage(body, "application/json") is None
