"""Token counts: the `Usage` of one response and how a provider's usage object becomes one.

Normalization (the same for every provider, docs/architecture.md, section 2.2):

- ``input_tokens`` counts every input token: OpenAI's ``prompt_tokens`` / ``input_tokens``
  already include cached ones; Anthropic reports ``input_tokens``, ``cache_read_input_tokens``
  and ``cache_creation_input_tokens`` separately, and they are added up.
- ``cached_input_tokens`` and ``cache_write_input_tokens`` are parts of ``input_tokens``;
  ``reasoning_tokens`` is part of ``output_tokens``.
- ``total_tokens`` is always ``input_tokens + output_tokens``; a provider's own total is ignored.
- Nothing is clamped: a count that is negative, not an integer, above `MAX_TOKENS`, or parts
  larger than their whole make the usage untrustworthy, and the result is ``usage_missing``
  with every count 0 (the event is still recorded, marked, never dropped).

Speed: a JSON document (a whole body or one SSE event) is decoded into `Doc`, a struct that
skips everything but the few keys we read: no Python objects are built for choices, content or
output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec

# The event schema's bound for any token field (schema/usage-event.schema.json, $defs.tokens).
MAX_TOKENS: Final = 100_000_000

PROVIDER_OPENAI: Final = "openai"
PROVIDER_ANTHROPIC: Final = "anthropic"


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Normalized token usage of one response (see the module docstring for the rules).

    ``provider`` is the API shape the body was recognised as: ``"anthropic"`` for Anthropic
    Messages, ``"openai"`` for OpenAI's APIs and the many OpenAI-compatible ones (Azure,
    Mistral, vLLM, ...), None when the body does not say. From Kong's ai-proxy log it is the
    provider ai-proxy was configured with.
    """

    provider: str | None = None
    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    streamed: bool = False
    usage_missing: bool = False


# --- decoding -------------------------------------------------------------------------------


class Doc(msgspec.Struct):
    """The keys we read from a response body, an SSE event, or a nested message/response.

    Scalars are ``Any`` so an odd type never fails the whole decode (they are checked where
    used); objects are kept ``Raw`` (bytes, not decoded) until we know we need them.
    """

    type: Any = None
    object: Any = None
    model: Any = None
    usage: msgspec.Raw = msgspec.Raw()
    message: msgspec.Raw = msgspec.Raw()
    response: msgspec.Raw = msgspec.Raw()
    error: msgspec.Raw = msgspec.Raw()


DOC_DECODER: Final = msgspec.json.Decoder(Doc)
# Beyond msgspec's own: RecursionError, its bound on nesting (Python's recursion limit, about
# 1,000 levels, skipped values included), which a few kB of brackets reach; UnicodeDecodeError,
# a string that is not UTF-8.
DECODE_ERRORS: Final = (
    msgspec.DecodeError,
    msgspec.ValidationError,
    RecursionError,
    UnicodeDecodeError,
)
_ANY_DECODER: Final = msgspec.json.Decoder()

_ANTHROPIC_TYPES: Final = frozenset({"message", "message_start", "message_delta"})
_RESPONSES_EVENT_PREFIX: Final = "response."

# Raw usage keys we read, flattened: (container key or None, key, flat name).
_USAGE_KEYS: Final = (
    (None, "prompt_tokens", "prompt_tokens"),
    (None, "completion_tokens", "completion_tokens"),
    (None, "input_tokens", "input_tokens"),
    (None, "output_tokens", "output_tokens"),
    (None, "total_tokens", "total_tokens"),
    (None, "cache_read_input_tokens", "cache_read_input_tokens"),
    (None, "cache_creation_input_tokens", "cache_creation_input_tokens"),
    ("prompt_tokens_details", "cached_tokens", "prompt_cached_tokens"),
    ("input_tokens_details", "cached_tokens", "input_cached_tokens"),
    ("completion_tokens_details", "reasoning_tokens", "completion_reasoning_tokens"),
    ("output_tokens_details", "reasoning_tokens", "output_reasoning_tokens"),
)
_MAIN_KEYS: Final = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")


class Reading:
    """What one body yields, accumulated over one JSON document or several SSE events."""

    __slots__ = ("anthropic", "counts", "model", "provider", "saw_usage")

    def __init__(self) -> None:
        self.counts: dict[str, object] = {}
        self.model: str | None = None
        self.provider: str | None = None
        self.anthropic = False
        self.saw_usage = False

    def add_doc(self, doc: Doc) -> None:
        """Merge one decoded document; later values of a count replace earlier ones.

        Replacing (not adding) is right for every provider: OpenAI and Responses send usage
        once, Anthropic's ``message_delta`` counts are cumulative (its documentation says so),
        and servers that repeat usage on every chunk repeat running totals.
        """
        kind = doc.type if isinstance(doc.type, str) else None
        usage_raw = doc.usage
        model = doc.model
        if kind in _ANTHROPIC_TYPES:
            self.anthropic = True
            self.provider = PROVIDER_ANTHROPIC
            if kind == "message_start":
                inner = _decode_inner(doc.message)
                if inner is not None:
                    usage_raw, model = inner.usage, inner.model
        elif kind is not None and kind.startswith(_RESPONSES_EVENT_PREFIX):
            self.provider = self.provider or PROVIDER_OPENAI
            inner = _decode_inner(doc.response)
            if inner is not None:
                usage_raw, model = inner.usage, inner.model
        elif kind == "error" and doc.error:
            # Anthropic's error shape: {"type": "error", "error": {...}}
            self.provider = self.provider or PROVIDER_ANTHROPIC
        elif isinstance(doc.object, str) or usage_raw or doc.error:
            self.provider = self.provider or PROVIDER_OPENAI
        if isinstance(model, str) and model:
            self.model = model
        if usage_raw:
            self._add_usage(usage_raw)

    def _add_usage(self, raw: msgspec.Raw) -> None:
        try:
            usage = _ANY_DECODER.decode(raw)
        except DECODE_ERRORS:
            return
        if not isinstance(usage, dict):
            return
        self.saw_usage = True
        for container, key, flat in _USAGE_KEYS:
            source = usage if container is None else usage.get(container)
            if isinstance(source, dict):
                value = source.get(key)
                if value is not None:
                    self.counts[flat] = value

    def result(self, *, streamed: bool) -> Usage:
        counts = _normalize(self.counts, anthropic=self.anthropic) if self.saw_usage else None
        if counts is None:
            return Usage(
                provider=self.provider, model=self.model, streamed=streamed, usage_missing=True
            )
        inp, out, cached, cache_write, reasoning = counts
        return Usage(
            provider=self.provider,
            model=self.model,
            input_tokens=inp,
            output_tokens=out,
            cached_input_tokens=cached,
            cache_write_input_tokens=cache_write,
            reasoning_tokens=reasoning,
            total_tokens=inp + out,
            streamed=streamed,
            usage_missing=False,
        )


def _decode_inner(raw: msgspec.Raw) -> Doc | None:
    if not raw:
        return None
    try:
        return DOC_DECODER.decode(raw)
    except DECODE_ERRORS:
        return None


def is_count(value: object) -> bool:
    # bool is an int subclass; JSON true is not a count.
    return type(value) is int and 0 <= value <= MAX_TOKENS


def _normalize(
    counts: Mapping[str, object], *, anthropic: bool
) -> tuple[int, int, int, int, int] | None:
    """(input, output, cached, cache_write, reasoning), or None when usage is absent or bad."""
    if not any(key in counts for key in _MAIN_KEYS):
        return None
    if not all(is_count(value) for value in counts.values()):
        return None
    get = counts.get
    # Without an event type to go by, Anthropic's cache keys (and no OpenAI prompt_tokens) say
    # that input_tokens excludes the cached part.
    anthropic_shape = anthropic or (
        "prompt_tokens" not in counts
        and ("cache_read_input_tokens" in counts or "cache_creation_input_tokens" in counts)
    )
    if anthropic_shape:
        cached = as_int(get("cache_read_input_tokens"))
        cache_write = as_int(get("cache_creation_input_tokens"))
        inp = as_int(get("input_tokens")) + cached + cache_write
        out = as_int(get("output_tokens"))
        reasoning = 0
    else:
        inp = as_int(first(get("prompt_tokens"), get("input_tokens")))
        out = as_int(first(get("completion_tokens"), get("output_tokens")))
        cached = as_int(first(get("prompt_cached_tokens"), get("input_cached_tokens")))
        cache_write = 0
        reasoning = as_int(
            first(get("completion_reasoning_tokens"), get("output_reasoning_tokens"))
        )
    if cached + cache_write > inp or reasoning > out or inp + out > MAX_TOKENS:
        return None
    return inp, out, cached, cache_write, reasoning


def first(a: object, b: object) -> object:
    return a if a is not None else b


def as_int(value: object) -> int:
    return value if type(value) is int else 0
