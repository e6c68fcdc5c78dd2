"""Property tests of `decode_body` (plugin/compression.py): every coding round-trips under the
bound, anything else raises only `BodyError`, and no result is ever over the bound."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.strategies import CONTENT_ENCODINGS, compress, mangled
from token_meter_plugin.compression import BodyError, BodyTooLarge, decode_body

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CODINGS = ("identity", "gzip", "x-gzip", "deflate", "br", "gzip, br", "br, deflate, gzip")


@FUZZ
@given(body=st.binary(max_size=4096), coding=st.sampled_from(CODINGS), slack=st.integers(0, 64))
def test_every_coding_round_trips_within_the_bound(body: bytes, coding: str, slack: int) -> None:
    """The bound holds for every stage: stacked codings need room for the inner coded body."""
    room = len(body) + (256 if "," in coding else 0)
    assert decode_body(compress(body, coding), coding, max_size=room + slack) == body


@FUZZ
@given(
    body=st.binary(min_size=1, max_size=4096),
    coding=st.sampled_from(CODINGS),
    short=st.integers(1, 64),
)
def test_a_body_over_the_bound_is_too_large(body: bytes, coding: str, short: int) -> None:
    try:
        decode_body(compress(body, coding), coding, max_size=max(0, len(body) - short))
    except BodyTooLarge:
        return
    raise AssertionError("a body over the bound was decoded")


@FUZZ
@given(
    data=st.data(),
    body=st.binary(max_size=2048),
    coding=st.sampled_from(CODINGS),
    label=st.sampled_from(CONTENT_ENCODINGS),
    max_size=st.integers(0, 8192),
)
def test_corrupt_or_mislabelled_bodies_raise_only_body_errors(
    data: st.DataObject, body: bytes, coding: str, label: str | None, max_size: int
) -> None:
    hostile = data.draw(mangled(compress(body, coding)))
    try:
        decoded = decode_body(hostile, label, max_size=max_size)
    except BodyError:
        return
    assert len(decoded) <= max_size
