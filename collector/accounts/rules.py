"""The blocking rules, as pure functions of a consumer's state (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..blocklist.reasons import BlockReason

NANOS_PER_MICRO = 1000

# The reasons these rules decide. Others on the blocklist (payment_overdue, put there and taken
# off by Stripe's invoice webhooks) are not theirs: an evaluation never lifts them.
ACCOUNT_REASONS: frozenset[BlockReason] = frozenset(
    {BlockReason.INSUFFICIENT_CREDITS, BlockReason.QUOTA_EXCEEDED}
)


def micros_down(nanos: int) -> int:
    """Nano-units shown as micro-units, rounded down (floor, also below zero)."""
    return nanos // NANOS_PER_MICRO


@dataclass(frozen=True, slots=True)
class ConsumerState:
    """What the rules look at, read under the consumer's row lock."""

    consumer: str
    prepaid: bool
    balance_nanos: int | None
    overdraft_micros: int
    low_balance_micros: int | None
    low_balance_flag: bool
    monthly_token_quota: int | None
    month_tokens: int
    blocked: frozenset[str]


def wanted_blocks(state: ConsumerState, period_end: datetime) -> dict[BlockReason, dict[str, Any]]:
    """The reasons (of ACCOUNT_REASONS) the consumer must be blocked for, each with the detail
    shown to plugins. A prepaid consumer is blocked once its balance plus overdraft is at or
    under zero; a quota is used up once the month's total tokens reach it."""
    reasons: dict[BlockReason, dict[str, Any]] = {}
    if state.prepaid:
        balance = state.balance_nanos or 0
        if balance + state.overdraft_micros * NANOS_PER_MICRO <= 0:
            reasons[BlockReason.INSUFFICIENT_CREDITS] = {
                "balance_micros": micros_down(balance),
                "overdraft_micros": state.overdraft_micros,
            }
    quota = state.monthly_token_quota
    if quota is not None and state.month_tokens >= quota:
        reasons[BlockReason.QUOTA_EXCEEDED] = {
            "monthly_token_quota": quota,
            "used_tokens": state.month_tokens,
            "resets_at": period_end.isoformat().replace("+00:00", "Z"),
        }
    return reasons


def is_low_balance(state: ConsumerState) -> bool:
    """At or under the consumer's low-balance threshold (prepaid consumers with one only)."""
    if not state.prepaid or state.low_balance_micros is None or state.balance_nanos is None:
        return False
    return state.balance_nanos <= state.low_balance_micros * NANOS_PER_MICRO
