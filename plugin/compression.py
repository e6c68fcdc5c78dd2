"""Decode an HTTP body by its ``Content-Encoding``, never past a size bound.

Pure functions: no I/O, no PDK. Supported codings: identity, gzip (and its alias x-gzip,
multi-member streams included), deflate (zlib-wrapped as RFC 9110 says, and the raw deflate
that some servers send instead) and br, stacked in any order ("gzip, br" means gzip was applied
first, so br is undone first).

Every stage is bounded by ``max_size``: no stage ever holds more than ``max_size + 1`` decoded
bytes, so a zip bomb costs at most that much memory before `BodyTooLarge` is raised.
"""

from __future__ import annotations

import zlib

import brotli

__all__ = ["BodyDecodeError", "BodyError", "BodyTooLarge", "decode_body"]


class BodyError(Exception):
    """The body could not be turned into its decoded bytes."""


class BodyTooLarge(BodyError):
    """The decoded body would exceed ``max_size`` (a zip bomb, or just a huge body)."""


class BodyDecodeError(BodyError):
    """The body is corrupt, truncated, or uses a coding we do not support."""


_GZIP_WBITS = 16 + zlib.MAX_WBITS
_ZLIB_WBITS = zlib.MAX_WBITS
_RAW_DEFLATE_WBITS = -zlib.MAX_WBITS
_GZIP_MAGIC = b"\x1f\x8b"

# brotli 1.2 bounds each process() call's output; older wheels do not, so there the input is
# fed in small slices and the output checked after each (a slice's expansion is still bounded,
# brotli's worst case being a few MiB per KiB of input).
_BROTLI_HAS_LIMIT = hasattr(brotli.Decompressor, "can_accept_more_data")
_BROTLI_SLICE = 1024


def decode_body(body: bytes, content_encoding: str | None, *, max_size: int) -> bytes:
    """Return ``body`` with every coding of ``content_encoding`` undone.

    The result (and every intermediate stage) is at most ``max_size`` bytes, else
    `BodyTooLarge`; corrupt or truncated data and unknown codings raise `BodyDecodeError`.
    """
    if max_size < 0:
        raise ValueError("max_size must be >= 0")
    codings = _parse_codings(content_encoding)
    data = body
    # The header lists codings in the order they were applied: undo them last to first.
    for coding in reversed(codings):
        if coding in ("gzip", "x-gzip"):
            data = _gunzip(data, max_size)
        elif coding == "deflate":
            data = _inflate(data, max_size)
        elif coding == "br":
            data = _unbrotli(data, max_size)
        else:
            raise BodyDecodeError(f"unsupported content-encoding {coding!r}")
    if len(data) > max_size:
        raise BodyTooLarge(f"body of {len(data)} bytes exceeds {max_size}")
    return data


def _parse_codings(content_encoding: str | None) -> list[str]:
    if not content_encoding:
        return []
    codings = []
    for part in content_encoding.split(","):
        coding = part.strip().lower()
        if coding and coding != "identity":
            codings.append(coding)
    return codings


def _zlib_stream(data: bytes, wbits: int, max_size: int) -> tuple[bytes, bytes]:
    """Decode one zlib/gzip/raw stream; return (output, bytes after the stream's end)."""
    decompressor = zlib.decompressobj(wbits)
    try:
        out = decompressor.decompress(data, max_size + 1)
    except zlib.error as exc:
        raise BodyDecodeError(f"corrupt compressed body: {exc}") from None
    if len(out) > max_size:
        raise BodyTooLarge(f"decoded body exceeds {max_size} bytes")
    if not decompressor.eof:
        raise BodyDecodeError("truncated compressed body")
    return out, decompressor.unused_data


def _gunzip(data: bytes, max_size: int) -> bytes:
    out, rest = _zlib_stream(data, _GZIP_WBITS, max_size)
    if not rest:
        return out
    # A gzip file may hold several members back to back (RFC 1952 2.2); their outputs concatenate.
    parts = [out]
    total = len(out)
    while rest:
        if not rest.startswith(_GZIP_MAGIC):
            raise BodyDecodeError("garbage after gzip stream")
        member, rest = _zlib_stream(rest, _GZIP_WBITS, max_size - total)
        total += len(member)
        parts.append(member)
    return b"".join(parts)


def _inflate(data: bytes, max_size: int) -> bytes:
    # RFC 9110 says "deflate" is the zlib format; some servers send raw deflate. The zlib
    # header is self-checking (CMF/FLG multiple of 31, method 8), so try the likely one first.
    looks_zlib = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
    order = (_ZLIB_WBITS, _RAW_DEFLATE_WBITS) if looks_zlib else (_RAW_DEFLATE_WBITS, _ZLIB_WBITS)
    try:
        out, rest = _zlib_stream(data, order[0], max_size)
    except BodyTooLarge:
        raise
    except BodyDecodeError:
        out, rest = _zlib_stream(data, order[1], max_size)
    if rest:
        raise BodyDecodeError("garbage after deflate stream")
    return out


def _unbrotli(data: bytes, max_size: int) -> bytes:
    decompressor = brotli.Decompressor()
    parts: list[bytes] = []
    total = 0
    try:
        if _BROTLI_HAS_LIMIT:
            chunk = decompressor.process(data, output_buffer_limit=max_size + 1)
            while True:
                total += len(chunk)
                if total > max_size:
                    raise BodyTooLarge(f"decoded body exceeds {max_size} bytes")
                parts.append(chunk)
                if decompressor.can_accept_more_data():
                    break
                chunk = decompressor.process(b"", output_buffer_limit=max_size + 1 - total)
        else:  # pragma: no cover - only with brotli < 1.2
            view = memoryview(data)
            for start in range(0, len(view), _BROTLI_SLICE):
                chunk = decompressor.process(bytes(view[start : start + _BROTLI_SLICE]))
                total += len(chunk)
                if total > max_size:
                    raise BodyTooLarge(f"decoded body exceeds {max_size} bytes")
                parts.append(chunk)
    except brotli.error as exc:
        raise BodyDecodeError(f"corrupt brotli body: {exc}") from None
    if not decompressor.is_finished():
        raise BodyDecodeError("truncated brotli body")
    return b"".join(parts)
