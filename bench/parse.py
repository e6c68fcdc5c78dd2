"""Time usage parsing on bodies of 1 KiB to 8 MiB, against baselines measured in the same run.

    .venv/bin/python -m bench.parse [--sizes 1K,64K,1M,8M] [--min-time 0.2]

For each body (JSON or SSE, plain or gzip) it reports the median time of one `extract_usage`
call and that time per MiB of the decoded body, next to:

- ``noop``: ``len(body)`` through the same timing loop (the loop's own cost);
- ``decode``: what a straightforward parser does: ``msgspec.json.decode`` of the whole JSON
  body, or of every ``data:`` line of an SSE body (after gunzip for gzip bodies);
- ``gunzip``: decompression alone, for gzip bodies.

Numbers are for the design notes, never for assertions.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import string
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import msgspec

from token_meter_plugin.compression import decode_body
from token_meter_plugin.usage import extract_usage

KiB = 1024
MiB = 1024 * KiB
SIZES = {"1K": KiB, "64K": 64 * KiB, "1M": MiB, "8M": 8 * MiB}
# Seeded pseudo-words, so gzip compresses the bodies about as much as real text (3-4x), not
# the hundreds of times a repeated phrase would.
_RNG = random.Random(1)
_WORDS = [
    "".join(_RNG.choice(string.ascii_lowercase) for _ in range(_RNG.randint(1, 9)))
    for _ in range(5000)
]


def _word(i: int) -> str:
    return _WORDS[(i * 7919) % len(_WORDS)]


def _text(n: int) -> str:
    words: list[str] = []
    length = 0
    i = 0
    while length < n:
        word = _word(i)
        words.append(word)
        length += len(word) + 1
        i += 1
    return " ".join(words)[:n]


def json_chat(size: int) -> bytes:
    """A non-streaming Chat Completion whose message content pads it to ``size`` bytes."""
    doc: dict[str, Any] = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": ""},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 1117,
            "completion_tokens": 46,
            "total_tokens": 1163,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }
    overhead = len(json.dumps(doc).encode())
    doc["choices"][0]["message"]["content"] = _text(max(0, size - overhead))
    return json.dumps(doc).encode()


def sse_chat(size: int) -> bytes:
    """A Chat Completions stream with include_usage: ``"usage":null`` on every chunk."""
    chunk = (
        'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1743431022,'
        '"model":"gpt-4o-mini","system_fingerprint":"fp_b376dfbbd5","choices":[{"index":0,'
        '"delta":{"content":"%s"},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    )
    final = (
        'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1743431022,'
        '"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":24,'
        '"completion_tokens":11,"total_tokens":35}}\n\ndata: [DONE]\n\n'
    )
    parts: list[str] = []
    length = len(final)
    i = 0
    while length < size:
        part = chunk % (" " + _word(i))
        parts.append(part)
        length += len(part)
        i += 1
    return ("".join(parts) + final).encode()


def sse_chat_no_usage(size: int) -> bytes:
    """A Chat Completions stream without include_usage and no usage key: the worst case of
    the scan, which reads the whole body and finds nothing to decode."""
    body = sse_chat(size)
    body = body[: body.rindex(b"data: {")] + b"data: [DONE]\n\n"
    return body.replace(b',"usage":null', b"")


def sse_anthropic(size: int) -> bytes:
    """An Anthropic Messages stream: usage in message_start and the closing message_delta."""
    start = (
        "event: message_start\n"
        'data: {"type":"message_start","message":{"id":"msg_bench","type":"message",'
        '"role":"assistant","model":"claude-sonnet-4-20250514","content":[],'
        '"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,'
        '"cache_creation_input_tokens":0,"cache_read_input_tokens":2048,"output_tokens":2}}}\n\n'
    )
    delta = (
        "event: content_block_delta\n"
        'data: {"type":"content_block_delta","index":0,'
        '"delta":{"type":"text_delta","text":"%s"}}\n\n'
    )
    end = (
        'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
        '"stop_sequence":null},"usage":{"output_tokens":89}}\n\n'
        'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    parts = [start]
    length = len(start) + len(end)
    i = 0
    while length < size:
        part = delta % (" " + _word(i))
        parts.append(part)
        length += len(part)
        i += 1
    parts.append(end)
    return "".join(parts).encode()


KINDS: dict[str, tuple[Callable[[int], bytes], str]] = {
    "json-chat": (json_chat, "application/json"),
    "sse-chat": (sse_chat, "text/event-stream"),
    "sse-anthropic": (sse_anthropic, "text/event-stream"),
    "sse-no-usage": (sse_chat_no_usage, "text/event-stream"),
}


def time_call(func: Callable[[], object], min_time: float) -> float:
    """Median seconds per call over several batches, each lasting about ``min_time / 5``."""
    func()
    start = time.perf_counter()
    func()
    once = max(time.perf_counter() - start, 1e-7)
    per_batch = max(1, int(min_time / 5 / once))
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(per_batch):
            func()
        samples.append((time.perf_counter() - start) / per_batch)
    return statistics.median(samples)


def naive_decode(body: bytes, encoding: str | None, is_sse: bool) -> object:
    plain = decode_body(body, encoding, max_size=64 * MiB)
    if not is_sse:
        return msgspec.json.decode(plain)
    decoded = []
    for line in plain.splitlines():
        if line.startswith(b"data: {"):
            decoded.append(msgspec.json.decode(line[6:]))
    return decoded


def run(sizes: list[str], min_time: float) -> list[dict[str, Any]]:
    rows = []
    for kind, (make, content_type) in KINDS.items():
        is_sse = content_type == "text/event-stream"
        for size_name in sizes:
            plain = make(SIZES[size_name])
            for encoding in (None, "gzip"):
                body = gzip.compress(plain, 6) if encoding else plain
                usage = extract_usage(body, content_type=content_type, content_encoding=encoding)
                if usage.usage_missing != (kind == "sse-no-usage"):
                    raise SystemExit(f"bench body {kind}/{size_name} lost its usage: {usage}")

                extract = partial(
                    extract_usage, body, content_type=content_type, content_encoding=encoding
                )
                decode = partial(naive_decode, body, encoding, is_sse)
                gunzip = partial(decode_body, body, "gzip", max_size=64 * MiB)
                noop = partial(len, body)
                mib = len(plain) / MiB
                extract_ms = time_call(extract, min_time) * 1e3
                decode_ms = time_call(decode, min_time) * 1e3
                rows.append(
                    {
                        "kind": kind,
                        "size": size_name,
                        "encoding": encoding or "identity",
                        "bytes": len(body),
                        "decoded_bytes": len(plain),
                        "extract_ms": extract_ms,
                        "extract_ms_per_mib": extract_ms / mib,
                        "decode_ms": decode_ms,
                        "decode_ms_per_mib": decode_ms / mib,
                        "gunzip_ms": time_call(gunzip, min_time) * 1e3 if encoding else None,
                        "noop_ms": time_call(noop, min_time) * 1e3,
                    }
                )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'body':<14} {'size':>4} {'coding':<8} {'received':>9} │ {'extract ms':>10} "
        f"{'ms/MiB':>8} │ {'decode ms':>9} {'ms/MiB':>8} │ {'gunzip ms':>9} │ {'noop ms':>8}"
    )
    print(header)
    print("─" * len(header))
    for r in rows:
        gunzip = f"{r['gunzip_ms']:9.3f}" if r["gunzip_ms"] is not None else f"{'-':>9}"
        print(
            f"{r['kind']:<14} {r['size']:>4} {r['encoding']:<8} {r['bytes']:>9} │ "
            f"{r['extract_ms']:10.4f} {r['extract_ms_per_mib']:8.3f} │ "
            f"{r['decode_ms']:9.4f} {r['decode_ms_per_mib']:8.3f} │ {gunzip} │ "
            f"{r['noop_ms']:8.5f}"
        )
    print(
        "\nextract: extract_usage (decompression included); decode: msgspec.json.decode of the "
        "whole body, or of every SSE data line; noop: len(body) in the same loop. "
        "ms/MiB is per MiB of the decoded body (size)."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated of 1K,64K,1M,8M")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement")
    parser.add_argument("--json", action="store_true", help="print rows as JSON instead")
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    rows = run(sizes, args.min_time)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
