"""Token usage read from AI provider responses, normalized per docs/architecture.md, section 2.2.

Pure functions, run on Kong's request path inside the plugin server: no I/O, no PDK.

Normalization (the same for every provider):

- ``input_tokens`` counts every input token: OpenAI's ``prompt_tokens`` / ``input_tokens``
  already include cached ones; Anthropic reports ``input_tokens``, ``cache_read_input_tokens``
  and ``cache_creation_input_tokens`` separately, and they are added up.
- ``cached_input_tokens`` and ``cache_write_input_tokens`` are parts of ``input_tokens``;
  ``reasoning_tokens`` is part of ``output_tokens``.
- ``total_tokens`` is always ``input_tokens + output_tokens``; a provider's own total is ignored.
- Nothing is clamped: a count that is negative, not an integer, above `MAX_TOKENS`, or parts
  larger than their whole make the usage untrustworthy, and the result is ``usage_missing``
  with every count 0 (the event is still recorded, marked, never dropped).

Speed: a JSON body is decoded into a struct that skips everything but the few keys we read
(no Python objects are built for choices, content or output). An SSE body is not decoded
chunk by chunk: every provider puts its final usage in the last event that has a ``"usage"``
key (OpenAI's include_usage chunk, Responses' terminal ``response.*`` event, Anthropic's
cumulative ``message_delta``), and Anthropic's input counts in the first one
(``message_start``). So at most three lines are decoded: those two, found with
``bytes.find``/``rfind`` (inside a JSON string a quote is escaped, so ``"usage"`` only occurs
as a real key), and the first data line for the model. Usage events between the first and the
last are not read: no provider puts counts there that the last one does not repeat. When a
usage line does not decode (an event split over several ``data:`` lines, CR-only line ends),
the body is parsed event by event as the SSE specification says.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any, Final

import msgspec

from . import metrics
from .compression import BodyError, decode_body

logger = logging.getLogger("token_meter_plugin")

__all__ = [
    "DEFAULT_MAX_BODY_SIZE",
    "MAX_TOKENS",
    "Usage",
    "extract_usage",
    "usage_from_ai_proxy_log",
]

DEFAULT_MAX_BODY_SIZE: Final = 32 * 1024 * 1024
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


class _Doc(msgspec.Struct):
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


_DOC_DECODER: Final = msgspec.json.Decoder(_Doc)
_ANY_DECODER: Final = msgspec.json.Decoder()
_DECODE_ERRORS: Final = (msgspec.DecodeError, msgspec.ValidationError)

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


class _Reading:
    """What one body yields, accumulated over one JSON document or several SSE events."""

    __slots__ = ("anthropic", "counts", "model", "provider", "saw_usage")

    def __init__(self) -> None:
        self.counts: dict[str, object] = {}
        self.model: str | None = None
        self.provider: str | None = None
        self.anthropic = False
        self.saw_usage = False

    def add_doc(self, doc: _Doc) -> None:
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
        except msgspec.DecodeError:
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


def _decode_inner(raw: msgspec.Raw) -> _Doc | None:
    if not raw:
        return None
    try:
        return _DOC_DECODER.decode(raw)
    except _DECODE_ERRORS:
        return None


def _is_count(value: object) -> bool:
    # bool is an int subclass; JSON true is not a count.
    return type(value) is int and 0 <= value <= MAX_TOKENS


def _normalize(
    counts: Mapping[str, object], *, anthropic: bool
) -> tuple[int, int, int, int, int] | None:
    """(input, output, cached, cache_write, reasoning), or None when usage is absent or bad."""
    if not any(key in counts for key in _MAIN_KEYS):
        return None
    if not all(_is_count(value) for value in counts.values()):
        return None
    get = counts.get
    # Without an event type to go by, Anthropic's cache keys (and no OpenAI prompt_tokens) say
    # that input_tokens excludes the cached part.
    anthropic_shape = anthropic or (
        "prompt_tokens" not in counts
        and ("cache_read_input_tokens" in counts or "cache_creation_input_tokens" in counts)
    )
    if anthropic_shape:
        cached = _int(get("cache_read_input_tokens"))
        cache_write = _int(get("cache_creation_input_tokens"))
        inp = _int(get("input_tokens")) + cached + cache_write
        out = _int(get("output_tokens"))
        reasoning = 0
    else:
        inp = _int(_first(get("prompt_tokens"), get("input_tokens")))
        out = _int(_first(get("completion_tokens"), get("output_tokens")))
        cached = _int(_first(get("prompt_cached_tokens"), get("input_cached_tokens")))
        cache_write = 0
        reasoning = _int(_first(get("completion_reasoning_tokens"), get("output_reasoning_tokens")))
    if cached + cache_write > inp or reasoning > out or inp + out > MAX_TOKENS:
        return None
    return inp, out, cached, cache_write, reasoning


def _first(a: object, b: object) -> object:
    return a if a is not None else b


def _int(value: object) -> int:
    return value if type(value) is int else 0


# --- bodies ---------------------------------------------------------------------------------

_SSE_PREFIXES: Final = (b"data:", b"event:", b"id:", b"retry:", b":")
_BOM: Final = b"\xef\xbb\xbf"
_WHITESPACE: Final = b" \t\r\n"
_USAGE_KEY: Final = b'"usage"'


def extract_usage(
    body: bytes,
    *,
    content_type: str | None,
    content_encoding: str | None,
    max_size: int = DEFAULT_MAX_BODY_SIZE,
) -> Usage:
    """Read normalized usage from a provider's response body; never raises.

    Handles OpenAI Chat Completions, Completions, Embeddings and Responses, and Anthropic
    Messages, as JSON or as SSE (``text/event-stream``, or a body that starts like one), plain
    or compressed (`decode_body`). Bodies without usage (errors, streams without
    include_usage, anything undecodable or over ``max_size`` once decoded) give
    ``usage_missing=True`` with zero counts and the model when it is known.
    """
    try:
        return _extract(body, content_type, content_encoding, max_size)
    except Exception:
        # Boundary of the request path: whatever the body, the caller gets a result to record,
        # and a parser bug is seen (logged with its stack, counted), never passed off as a
        # response without usage.
        logger.exception("usage_parse_failed bytes=%s", len(body))
        metrics.count("usage_parse_errors")
        return Usage(usage_missing=True, streamed=_is_sse_type(content_type))


def _extract(
    body: bytes, content_type: str | None, content_encoding: str | None, max_size: int
) -> Usage:
    try:
        data = decode_body(body, content_encoding, max_size=max_size)
    except BodyError:
        # Some upstreams label plain bodies as compressed; a body that starts like JSON or SSE
        # is taken as it is (compressed data never starts with these bytes).
        if len(body) <= max_size and _sniff(body) is not None:
            data = body
        else:
            return Usage(usage_missing=True, streamed=_is_sse_type(content_type))
    sniffed = _sniff(data)
    is_sse = sniffed if sniffed is not None else _is_sse_type(content_type)
    if is_sse:
        return _extract_sse(data)
    return _extract_json(data)


def _sniff(data: bytes) -> bool | None:
    """True for an SSE body, False for JSON, None when the first bytes do not tell."""
    head = data[:64]
    if head.startswith(_BOM):
        head = head[3:]
    head = head.lstrip(_WHITESPACE)
    if head[:1] in (b"{", b"["):
        return False
    if head.startswith(_SSE_PREFIXES):
        return True
    return None


def _is_sse_type(content_type: str | None) -> bool:
    if not isinstance(content_type, str):
        return False
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


def _extract_json(data: bytes) -> Usage:
    reading = _Reading()
    try:
        doc = _DOC_DECODER.decode(data)
    except _DECODE_ERRORS:
        return reading.result(streamed=False)
    reading.add_doc(doc)
    return reading.result(streamed=False)


def _extract_sse(data: bytes) -> Usage:
    if data.startswith(_BOM):
        data = data[3:]
    # At most three lines are decoded, in body order: the first data line (the model, even in
    # a stream without usage), and the first and last lines with a "usage" key (Anthropic's
    # message_start and final message_delta; for the others the last one is all that counts).
    first_usage = data.find(_USAGE_KEY)
    spans = {
        span
        for span in (
            _first_data_line(data),
            _line_around(data, first_usage) if first_usage >= 0 else None,
            _line_around(data, data.rfind(_USAGE_KEY)) if first_usage >= 0 else None,
        )
        if span is not None
    }
    reading = _Reading()
    for start, end in sorted(spans):
        payload = _data_payload(data, start, end)
        doc = _decode_event(payload) if payload is not None else None
        if doc is not None:
            reading.add_doc(doc)
        elif data.find(_USAGE_KEY, start, end) >= 0 or data.find(b"\r", start, end - 1) >= 0:
            # Usage we cannot read line by line (an event over several data lines), or lines
            # that end in a lone CR: parse every event instead.
            return _extract_sse_events(data)
    return reading.result(streamed=True)


def _first_data_line(data: bytes) -> tuple[int, int] | None:
    if data.startswith(b"data:"):
        start = 0
    else:
        at = data.find(b"\ndata:")
        if at < 0:
            return None
        start = at + 1
    end = data.find(b"\n", start)
    return start, len(data) if end < 0 else end


def _line_around(data: bytes, at: int) -> tuple[int, int]:
    start = data.rfind(b"\n", 0, at) + 1
    end = data.find(b"\n", at)
    return start, len(data) if end < 0 else end


def _data_payload(data: bytes, start: int, end: int) -> memoryview | None:
    """The value of a ``data:`` line (one leading space dropped, CR stripped), else None."""
    if not data.startswith(b"data:", start, end):
        return None
    start += 5
    if start < end and data[start] == 0x20:
        start += 1
    if end > start and data[end - 1] == 0x0D:
        end -= 1
    return memoryview(data)[start:end]


def _decode_event(payload: memoryview | bytes) -> _Doc | None:
    try:
        return _DOC_DECODER.decode(payload)
    except _DECODE_ERRORS:
        return None


def _extract_sse_events(data: bytes) -> Usage:
    """Slow, exact path: every event assembled as the SSE specification says."""
    reading = _Reading()
    got_first = False
    for payload in _iter_sse_data(data):
        if not got_first or _USAGE_KEY in payload:
            doc = _decode_event(payload)
            if doc is not None:
                got_first = True
                reading.add_doc(doc)
    return reading.result(streamed=True)


def _iter_sse_data(data: bytes) -> Iterator[bytes]:
    """Yield each event's data (``data:`` lines joined by LF), per the HTML SSE parser."""
    lines: list[bytes] = []
    for line in data.splitlines():
        if not line:
            if lines:
                yield b"\n".join(lines)
                lines = []
            continue
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    if lines:
        yield b"\n".join(lines)


# --- Kong ai-proxy log ----------------------------------------------------------------------

# Where ai-proxy puts its analytics in kong.log.serialize(), read from Kong's source
# (kong/llm/drivers/shared.lua, kong/llm/plugin/shared-filters/serialize-analytics.lua):
#   3.9: ai.proxy.{usage,meta}                     usage.prompt_tokens / completion_tokens
#   3.8: ai["ai-proxy"].{usage,meta}               usage.prompt_tokens / completion_tokens
#   3.7: ai["ai-proxy"].{usage,meta}               usage.prompt_token / completion_token
#   3.6: ai.usage, ai.meta                         usage.prompt_tokens / completion_tokens
# 3.7 and 3.8 key the container by plugin name, so ai-proxy-advanced lands beside it. None of
# these versions records cached or reasoning tokens. Kong fills the counts with 0 when the
# upstream sent none (and 3.9 estimates streamed completions at 4 characters a token).
_AI_PROXY_CONTAINERS: Final = ("proxy", "ai-proxy", "ai-proxy-advanced")
_UNSPECIFIED_MODEL: Final = "UNSPECIFIED"


def usage_from_ai_proxy_log(serialized: Mapping[str, Any]) -> Usage | None:
    """Usage recorded by Kong's ai-proxy (3.6 to 3.9) in ``kong.log.serialize()`` output.

    None when the log has no ai-proxy data at all (ai-proxy absent, or its
    ``logging.log_statistics`` off). ``usage_missing`` when ai-proxy data is there without
    valid counts, or with zero input and output (Kong's placeholder for "no usage": a real
    request always has input tokens).
    """
    ai = serialized.get("ai")
    if not isinstance(ai, Mapping):
        return None
    container: Mapping[str, Any] | None = None
    for key in _AI_PROXY_CONTAINERS:
        candidate = ai.get(key)
        if isinstance(candidate, Mapping) and ("usage" in candidate or "meta" in candidate):
            container = candidate
            break
    if container is None:
        if "usage" not in ai and "meta" not in ai:
            return None
        container = ai  # Kong 3.6
    meta = container.get("meta")
    provider = model = None
    if isinstance(meta, Mapping):
        provider = _clean_str(meta.get("provider_name"))
        model = _clean_str(meta.get("response_model")) or _clean_str(meta.get("request_model"))
    streamed = _logged_response_is_sse(serialized)
    usage = container.get("usage")
    prompt = completion = None
    if isinstance(usage, Mapping):
        prompt = _first(usage.get("prompt_tokens"), usage.get("prompt_token"))
        completion = _first(usage.get("completion_tokens"), usage.get("completion_token"))
    if (
        not _is_count(prompt)
        or not _is_count(completion)
        or (prompt == 0 and completion == 0)
        or _int(prompt) + _int(completion) > MAX_TOKENS
    ):
        return Usage(provider=provider, model=model, streamed=streamed, usage_missing=True)
    inp, out = _int(prompt), _int(completion)
    return Usage(
        provider=provider,
        model=model,
        input_tokens=inp,
        output_tokens=out,
        total_tokens=inp + out,
        streamed=streamed,
    )


def _clean_str(value: object) -> str | None:
    if isinstance(value, str) and value and value != _UNSPECIFIED_MODEL:
        return value
    return None


def _logged_response_is_sse(serialized: Mapping[str, Any]) -> bool:
    response = serialized.get("response")
    if not isinstance(response, Mapping):
        return False
    headers = response.get("headers")
    if not isinstance(headers, Mapping):
        return False
    value = headers.get("content-type")
    if isinstance(value, list):
        value = value[0] if value else None
    return isinstance(value, str) and _is_sse_type(value)
