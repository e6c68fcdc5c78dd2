"""decode_body: every supported Content-Encoding, stacked codings, and its size bound."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import brotli
import pytest

from token_meter_plugin.compression import BodyDecodeError, BodyError, BodyTooLarge, decode_body

FIXTURES = Path(__file__).parents[1] / "fixtures" / "providers"
BODIES = sorted(p for p in FIXTURES.iterdir() if not p.name.endswith(".expected.json"))
MiB = 1024 * 1024


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


ENCODERS = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
}


@pytest.mark.parametrize("coding", [None, "", "identity", "Identity "])
def test_identity_returns_the_body_unchanged(coding: str | None) -> None:
    body = b'{"usage": {"prompt_tokens": 1}}'
    assert decode_body(body, coding, max_size=MiB) == body


@pytest.mark.parametrize("path", BODIES, ids=lambda p: p.name)
@pytest.mark.parametrize("coding", sorted(ENCODERS))
def test_each_coding_round_trips_every_provider_fixture(path: Path, coding: str) -> None:
    body = path.read_bytes()
    assert decode_body(ENCODERS[coding](body), coding, max_size=MiB) == body


def test_deflate_accepts_raw_deflate_as_well_as_zlib() -> None:
    """Some servers send raw deflate for "deflate"; both forms decode."""
    body = (FIXTURES / "openai_chat.json").read_bytes()
    assert decode_body(raw_deflate(body), "deflate", max_size=MiB) == body
    assert decode_body(zlib.compress(body), "deflate", max_size=MiB) == body


def test_coding_names_are_case_and_space_insensitive() -> None:
    body = b"data: {}\n\n"
    assert decode_body(gzip.compress(body), " GZIP ", max_size=MiB) == body


def test_stacked_codings_are_undone_last_applied_first() -> None:
    """ "gzip, br" means gzip was applied first, so br is undone first."""
    body = (FIXTURES / "anthropic_messages_stream.sse").read_bytes()
    stacked = brotli.compress(gzip.compress(body))
    assert decode_body(stacked, "gzip, br", max_size=MiB) == body
    with pytest.raises(BodyDecodeError):
        decode_body(stacked, "br, gzip", max_size=MiB)


def test_gzip_with_several_members_concatenates_them() -> None:
    assert decode_body(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip", max_size=4) == b"abcd"


def test_multi_member_gzip_is_bounded_in_total() -> None:
    with pytest.raises(BodyTooLarge):
        decode_body(gzip.compress(b"ab") + gzip.compress(b"cde"), "gzip", max_size=4)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "gzip, br"])
def test_a_zip_bomb_raises_body_too_large(coding: str) -> None:
    """64 MiB of zeros compress to a few KiB; decoding stops at the bound."""
    fast = {**ENCODERS, "br": lambda data: brotli.compress(data, quality=4)}
    bomb = bytes(64 * MiB)
    for name in (c.strip() for c in coding.split(",")):
        bomb = fast[name](bomb)
    assert len(bomb) < 256 * 1024
    with pytest.raises(BodyTooLarge):
        decode_body(bomb, coding, max_size=MiB)


@pytest.mark.parametrize("coding", [None, "gzip", "deflate", "br"])
def test_a_body_of_exactly_max_size_is_accepted_and_one_byte_more_is_not(
    coding: str | None,
) -> None:
    body = os.urandom(1000)
    encode = ENCODERS[coding] if coding else (lambda data: data)
    assert decode_body(encode(body), coding, max_size=1000) == body
    with pytest.raises(BodyTooLarge):
        decode_body(encode(body), coding, max_size=999)


@pytest.mark.parametrize(
    ("body", "coding"),
    [
        (b"not gzip at all", "gzip"),
        (b"\x1f\x8b\x08\x00garbage", "gzip"),
        (gzip.compress(b'{"a": 1}')[:-6], "gzip"),  # truncated
        (gzip.compress(b'{"a": 1}') + b"trailing", "gzip"),
        (zlib.compress(b'{"a": 1}')[:-3], "deflate"),
        (b"\xff\xfe\xfd", "deflate"),
        (b"\xff" * 32, "br"),
        (brotli.compress(b'{"a": 1}' * 100)[:-4], "br"),  # truncated
        (b"{}", "zstd"),
        (b"{}", "compress"),
    ],
    ids=[
        "gzip-garbage",
        "gzip-bad-header",
        "gzip-truncated",
        "gzip-trailing-garbage",
        "deflate-truncated",
        "deflate-garbage",
        "br-garbage",
        "br-truncated",
        "unsupported-zstd",
        "unsupported-compress",
    ],
)
def test_corrupt_truncated_or_unsupported_bodies_raise_body_decode_error(
    body: bytes, coding: str
) -> None:
    with pytest.raises(BodyDecodeError):
        decode_body(body, coding, max_size=MiB)


def test_both_errors_share_one_base_class() -> None:
    assert issubclass(BodyTooLarge, BodyError)
    assert issubclass(BodyDecodeError, BodyError)
    assert not issubclass(BodyTooLarge, BodyDecodeError)


def test_negative_max_size_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="max_size"):
        decode_body(b"", None, max_size=-1)
