"""Ask OpenAI-style streaming requests for usage: ``stream_options.include_usage = true``.

Without it, OpenAI's Chat Completions and Completions streams carry no token counts at all.
The Responses API and Anthropic's Messages API always report usage in their streams, and
Anthropic rejects unknown fields, so requests to them are left exactly as they are.

Pure function, run in the access phase: no I/O, no PDK. The common case (no ``stream_options``
yet) is a splice of the original bytes, so the body is never re-serialized and keeps its exact
formatting; only a body that already has ``stream_options`` is decoded and re-encoded.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

__all__ = ["inject_stream_usage"]

_INCLUDE_USAGE: Final = b',"stream_options":{"include_usage":true}'
_WHITESPACE: Final = b" \t\r\n"


class _Request(msgspec.Struct):
    """The keys that tell what kind of request this is; everything else is skipped."""

    stream: Any = None
    model: Any = None
    stream_options: msgspec.Raw = msgspec.Raw()
    messages: msgspec.Raw = msgspec.Raw()
    prompt: msgspec.Raw = msgspec.Raw()
    # Anthropic Messages keys that OpenAI's APIs do not have.
    system: msgspec.Raw = msgspec.Raw()
    stop_sequences: msgspec.Raw = msgspec.Raw()
    top_k: msgspec.Raw = msgspec.Raw()
    thinking: msgspec.Raw = msgspec.Raw()
    anthropic_version: msgspec.Raw = msgspec.Raw()


_REQUEST_DECODER: Final = msgspec.json.Decoder(_Request)
_ANY_DECODER: Final = msgspec.json.Decoder()
_ENCODER: Final = msgspec.json.Encoder()


def inject_stream_usage(body: bytes, content_type: str | None) -> bytes | None:
    """Return ``body`` with ``stream_options.include_usage = true`` added, or None to keep it.

    Changes only a JSON request with ``"stream": true`` for Chat Completions or Completions
    that does not already ask for usage; other ``stream_options`` are kept. An explicit
    ``include_usage: false`` is the client's choice and is kept. The body's keys tell which API
    it is for (the access phase does not fetch the path: a round trip per request), and
    anything that looks like Anthropic's Messages API (its own keys, or a ``claude`` model) is
    left alone, since Anthropic rejects the field. Never raises on malformed input: it returns
    None.
    """
    if not _is_json_type(content_type, body):
        return None
    try:
        request = _REQUEST_DECODER.decode(body)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        # Beyond msgspec's own errors (ValidationError is one): its bound on nesting, about
        # 1,000 levels (skipped ones too), and a string that is not UTF-8.
        return None
    if request.stream is not True or not _is_openai_streaming(request):
        return None
    if not request.stream_options:
        return _splice(body)
    try:
        options = _ANY_DECODER.decode(request.stream_options)
    except msgspec.DecodeError:  # pragma: no cover - the whole body decoded already
        return None
    if options is None:
        options = {}
    elif not isinstance(options, dict):
        return None
    if options.get("include_usage") is not None:
        return None
    return _rewrite(body, options)


def _is_json_type(content_type: str | None, body: bytes) -> bool:
    if content_type is None:
        return body.lstrip(_WHITESPACE)[:1] == b"{"
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def _is_openai_streaming(request: _Request) -> bool:
    if not (request.messages or request.prompt):
        return False  # Responses API (input), or not a generation request at all
    if (
        request.system
        or request.stop_sequences
        or request.top_k
        or request.thinking
        or request.anthropic_version
    ):
        return False
    return not (isinstance(request.model, str) and request.model.startswith("claude"))


def _splice(body: bytes) -> bytes | None:
    """Insert the option before the object's closing brace: the original bytes stay as sent."""
    end = len(body.rstrip(_WHITESPACE))
    if end == 0 or body[end - 1] != 0x7D:  # "}"
        return None
    return body[: end - 1] + _INCLUDE_USAGE + body[end - 1 :]


def _rewrite(body: bytes, options: dict[str, Any]) -> bytes | None:
    try:
        document = _ANY_DECODER.decode(body)
        if not isinstance(document, dict):  # pragma: no cover - decoded as an object above
            return None
        options["include_usage"] = True
        document["stream_options"] = options
        return _ENCODER.encode(document)
    except RecursionError:  # pragma: no cover - nested just to the bound, a call deeper here
        return None
