"""Stripe amounts in minor units become ledger micro-units exactly: micros = minor * 10^(6-e)."""

from __future__ import annotations

import pytest

from token_meter_collector.billing.currency import (
    THREE_DECIMAL,
    ZERO_DECIMAL,
    minor_to_micros,
    minor_unit_decimals,
)


@pytest.mark.parametrize(
    ("amount", "currency", "micros"),
    [
        (1, "usd", 10_000),  # one cent
        (2500, "USD", 25_000_000),  # $25.00
        (1, "jpy", 1_000_000),  # zero-decimal: one yen
        (500, "JPY", 500_000_000),
        (1, "krw", 1_000_000),
        (1, "kwd", 1_000),  # three-decimal: one fils
        (1250, "KWD", 1_250_000),  # 1.250 KWD
        (10, "bhd", 10_000),
        (999, "eur", 9_990_000),
        (100, "isk", 1_000_000),  # special case, still two-decimal in the API
        (100, "huf", 1_000_000),
        (100, "twd", 1_000_000),
        (0, "usd", 0),
    ],
)
def test_minor_units_convert_to_micros(amount: int, currency: str, micros: int) -> None:
    assert minor_to_micros(amount, currency) == micros


def test_stripes_lists_of_zero_and_three_decimal_currencies() -> None:
    """As docs.stripe.com/currencies lists them; every other currency is two-decimal."""
    assert sorted(ZERO_DECIMAL) == [
        "BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA",
        "PYG", "RWF", "UGX", "VND", "VUV", "XAF", "XOF", "XPF",
    ]  # fmt: skip
    assert sorted(THREE_DECIMAL) == ["BHD", "JOD", "KWD", "OMR", "TND"]
    assert {minor_unit_decimals(c.lower()) for c in ZERO_DECIMAL} == {0}
    assert {minor_unit_decimals(c) for c in THREE_DECIMAL} == {3}
    assert minor_unit_decimals("gbp") == 2


def test_large_amounts_stay_exact() -> None:
    assert minor_to_micros(99_999_999_999, "usd") == 999_999_999_990_000
    assert minor_to_micros(10**12 + 1, "jpy") == (10**12 + 1) * 10**6
