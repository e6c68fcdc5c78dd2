"""Hostile input for the parsers: JSON and SSE that is random, truncated, deeply nested, huge or
wrongly encoded, built around the shapes the parsers look for so the interesting paths run."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

import brotli
from hypothesis import strategies as st

PROVIDER_FIXTURES = Path(__file__).parents[1] / "fixtures" / "providers"
# The golden provider bodies: real shapes to mutate.
GOLDEN_BODIES = sorted(
    path.read_bytes() for path in PROVIDER_FIXTURES.iterdir() if path.suffix in (".json", ".sse")
)
# Nesting far past msgspec's bound (Python's recursion limit): a few hundred kB of brackets.
DEEP = 100_000

USAGE_KEYS = (
    "prompt_tokens",
    "completion_tokens",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "prompt_tokens_details",
    "input_tokens_details",
    "completion_tokens_details",
    "output_tokens_details",
    "cached_tokens",
    "reasoning_tokens",
)
DOC_TYPES = (
    "message",
    "message_start",
    "message_delta",
    "message_stop",
    "content_block_delta",
    "response.completed",
    "response.created",
    "response.output_text.delta",
    "error",
    "ping",
)
CONTENT_TYPES = (
    None,
    "",
    "application/json",
    "application/json; charset=utf-8",
    "text/event-stream",
    "TEXT/EVENT-STREAM; charset=UTF-8",
    "text/plain",
    "application/problem+json",
    "multipart/form-data; boundary=x",
    ";;;",
    "\x00",
)
CONTENT_ENCODINGS = (
    None,
    "",
    "identity",
    "gzip",
    "x-gzip",
    "deflate",
    "br",
    "gzip, br",
    "br, gzip",
    "GZIP",
    "compress",
    "zstd",
    "gzip,,identity",
    ",",
    "\u00e9",
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # beyond 64 bits too
    st.integers(-5, 200_000_000),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=10), children, max_size=5),
    ),
    max_leaves=30,
)
counts = st.one_of(
    st.integers(0, 1000),
    st.integers(0, 200_000_000),
    st.integers(-(2**70), 2**70),
    st.just(True),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.none(),
    json_values,
)


@st.composite
def usage_objects(draw: st.DrawFn) -> Any:
    """What a provider puts under "usage": mostly the right keys, with any values."""
    usage: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(USAGE_KEYS), max_size=8, unique=True)):
        if key.endswith("_details"):
            usage[key] = draw(
                st.dictionaries(st.sampled_from(("cached_tokens", "reasoning_tokens")), counts)
                | json_values
            )
        else:
            usage[key] = draw(counts)
    return draw(st.one_of(st.just(usage), st.just(usage), json_values))


@st.composite
def documents(draw: st.DrawFn) -> Any:
    """A response body or SSE event as a provider might send it, or something like one."""
    doc: dict[str, Any] = {}
    if draw(st.booleans()):
        doc["type"] = draw(st.sampled_from(DOC_TYPES) | json_values)
    if draw(st.booleans()):
        doc["object"] = draw(st.sampled_from(("chat.completion", "list", "response")) | scalars)
    if draw(st.booleans()):
        doc["model"] = draw(st.text(max_size=30) | json_values)
    if draw(st.booleans()):
        doc["usage"] = draw(usage_objects())
    for nested in ("message", "response"):
        if draw(st.integers(0, 3)) == 0:
            doc[nested] = draw(documents())
    if draw(st.integers(0, 5)) == 0:
        doc["error"] = draw(json_values)
    doc.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)))
    return draw(st.one_of(st.just(doc), st.just(doc), st.just(doc), json_values))


def to_json(value: Any, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def sse_bodies(draw: st.DrawFn) -> bytes:
    """Event streams: data lines of documents, other fields, comments, any line ends."""
    newline = draw(st.sampled_from((b"\n", b"\r\n", b"\r")))
    lines: list[bytes] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 9))
        if kind < 6:
            payload = to_json(draw(documents()), draw(st.booleans()))
            if kind == 5 and len(payload) > 2:  # one event over two data lines
                cut = draw(st.integers(1, len(payload) - 1))
                lines += [b"data: " + payload[:cut], b"data:" + payload[cut:]]
            else:
                lines.append(b"data: " + payload)
        elif kind == 6:
            lines.append(b"event: " + draw(st.sampled_from(DOC_TYPES)).encode())
        elif kind == 7:
            lines.append(b": keep-alive")
        elif kind == 8:
            lines.append(b"data: [DONE]")
        else:
            lines.append(draw(st.binary(max_size=20)))
        if draw(st.booleans()):
            lines.append(b"")  # end of event
    return newline.join(lines)


@st.composite
def mangled(draw: st.DrawFn, body: bytes) -> bytes:
    """`body` as it may arrive broken: truncated, bytes flipped or inserted, re-encoded."""
    how = draw(st.integers(0, 8))
    if how == 0 or not body:
        return body
    if how == 1:
        return body[: draw(st.integers(0, len(body) - 1))]
    if how == 2:
        at = draw(st.integers(0, len(body) - 1))
        return body[:at] + bytes([draw(st.integers(0, 255))]) + body[at + 1 :]
    if how == 3:
        at = draw(st.integers(0, len(body)))
        return body[:at] + draw(st.binary(min_size=1, max_size=8)) + body[at:]
    if how == 4:  # UTF-16 or Latin-1 where UTF-8 was meant
        text = body.decode("utf-8", "replace")
        return text.encode(draw(st.sampled_from(("utf-16", "utf-16-le", "latin-1"))), "replace")
    if how == 5:
        return b"\xef\xbb\xbf" + body  # a byte order mark
    if how == 6:
        return b"\xff\xfe" + body[1:]  # not UTF-8 at all
    if how == 7 and b'"' in body:  # a string that is not UTF-8, where a decoder reads it
        quotes = [at for at, byte in enumerate(body) if byte == 0x22]
        at = draw(st.sampled_from(quotes)) + 1
        return body[:at] + draw(st.sampled_from((b"\x80", b"\xc3(", b"\xed\xa0\x80"))) + body[at:]
    return body * draw(st.integers(2, 50))  # repeated: large and wrong


@st.composite
def deep_nesting(draw: st.DrawFn) -> bytes:
    """A value nested far past any decoder's bound, where the parsers look or elsewhere."""
    depth = draw(st.sampled_from((500, 990, 1_000, 5_000, DEEP)))
    opener, closer = draw(st.sampled_from(((b"[", b"]"), (b'{"a":', b"}"), (b'{"usage":', b"}"))))
    nested = opener * depth + b"1" + closer * depth
    if draw(st.booleans()):
        nested = nested[: draw(st.integers(0, len(nested)))]  # and never closed
    template = draw(
        st.sampled_from(
            (
                b"%s",
                b'{"model":"m","usage":%s}',
                b'{"type":"message_start","message":{"usage":%s}}',
                b'{"usage":{"prompt_tokens":%s,"completion_tokens":1}}',
                b'data: {"usage":%s}\n\n',
                b'data: {"model":"m"}\n\ndata: {"usage":%s}\n\n',
                b'{"stream":true,"messages":%s}',
                b'{"stream":true,"messages":[],"stream_options":%s}',
                b'[{"specversion":"1.0","data":%s}]',
            )
        )
    )
    return template.replace(b"%s", nested)


def compress(body: bytes, coding: str | None) -> bytes:
    """`body` with `coding` applied as a server would (each coding in the header's order)."""
    for part in (coding or "").split(","):
        name = part.strip().lower()
        if name in ("gzip", "x-gzip"):
            body = gzip.compress(body, mtime=0)
        elif name == "deflate":
            body = zlib.compress(body)
        elif name == "br":
            body = brotli.compress(body)
    return body


@st.composite
def response_bodies(draw: st.DrawFn) -> bytes:
    """Any of the above, or plain random bytes."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        body = to_json(draw(documents()), draw(st.booleans()))
    elif kind == 1:
        body = draw(sse_bodies())
    elif kind == 2:
        body = draw(st.sampled_from(GOLDEN_BODIES))
    elif kind == 3:
        body = draw(deep_nesting())
    elif kind == 4:
        body = draw(st.binary(max_size=200))
    else:
        body = to_json(draw(json_values), True)
    return draw(mangled(body))
