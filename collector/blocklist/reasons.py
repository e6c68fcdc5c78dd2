"""Why a consumer is on the blocklist: the reason codes, defined here once.

They are the error codes the plugins answer with (docs/architecture.md), the `reason` metric
label and the values the `blocklist.reason` CHECK constraint allows (migration 0004; a test
holds that constraint, the OpenAPI enums and this list together). Nothing else of the
collector is imported here, so the admin CLI uses them without loading the server."""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class BlockReason(StrEnum):
    """Listed in precedence order: when several apply, the plugin answers with the first, the
    one a customer can act on first (pay)."""

    INSUFFICIENT_CREDITS = "insufficient_credits"  # accounts: balance + overdraft <= 0
    PAYMENT_OVERDUE = "payment_overdue"  # billing: a Stripe invoice failed or is overdue
    QUOTA_EXCEEDED = "quota_exceeded"  # accounts: the monthly token quota is used up


REASON_PRECEDENCE: Final[tuple[BlockReason, ...]] = tuple(BlockReason)
