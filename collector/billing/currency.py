"""Stripe amounts in a currency's minor unit, as the ledger's micro-units (10⁻⁶ of the unit).

Stripe gives every amount as an integer count of the currency's minor unit: cents for USD,
yen for JPY (a zero-decimal currency), fils for KWD (a three-decimal one). So
micros = minor * 10^(6 - e), e being the currency's decimals as Stripe's API counts them.

The lists are Stripe's, from docs.stripe.com/currencies ("Zero-decimal currencies" and
"Three-decimal currencies"), as read on 2026-12-02. Its "special cases" ISK, HUF and TWD stay
two-decimal in the API (amounts are still hundredths; Stripe only wants whole units of them),
so they need no entry here.
"""

from __future__ import annotations

from typing import Final

MICROS_PER_UNIT: Final = 10**6

ZERO_DECIMAL: Final = frozenset(
    {
        "BIF",
        "CLP",
        "DJF",
        "GNF",
        "JPY",
        "KMF",
        "KRW",
        "MGA",
        "PYG",
        "RWF",
        "UGX",
        "VND",
        "VUV",
        "XAF",
        "XOF",
        "XPF",
    }
)
THREE_DECIMAL: Final = frozenset({"BHD", "JOD", "KWD", "OMR", "TND"})


def minor_unit_decimals(currency: str) -> int:
    """How many decimals Stripe's minor unit of `currency` (any case) stands for."""
    code = currency.upper()
    if code in ZERO_DECIMAL:
        return 0
    if code in THREE_DECIMAL:
        return 3
    return 2


def minor_to_micros(amount: int, currency: str) -> int:
    """A Stripe amount (minor units of `currency`) in micro-units: exact, integers only."""
    scale: int = 10 ** (6 - minor_unit_decimals(currency))
    return amount * scale
