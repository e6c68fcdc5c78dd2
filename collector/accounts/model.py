"""Account types: what the admin API takes and gives back."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from .rules import micros_down

MAX_MICROS = 10**15  # a billion currency units: far above any grant, far below bigint nanos
MAX_TOKENS_QUOTA = 2**62
MAX_CONSUMER_LENGTH = 256  # as the event's subject
# PostgreSQL text cannot hold U+0000: a string with one is refused here, not failed at the
# database as a 500.
STORABLE = "^[^\x00]*$"

# Columns an admin may set, in the order they are written.
ACCOUNT_FIELDS = (
    "monthly_token_quota",
    "stripe_customer_id",
    "plan",
    "overdraft_micros",
    "low_balance_micros",
)


class AccountUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """PUT /v1/consumers/{consumer}: fields not given stay as they are; a null quota removes it."""

    monthly_token_quota: Annotated[int, Meta(ge=0, le=MAX_TOKENS_QUOTA)] | UnsetType | None = UNSET
    stripe_customer_id: (
        Annotated[str, Meta(min_length=1, max_length=255, pattern=STORABLE)] | UnsetType
    ) = UNSET
    plan: Annotated[str, Meta(max_length=255, pattern=STORABLE)] | UnsetType = UNSET
    overdraft_micros: Annotated[int, Meta(ge=0, le=MAX_MICROS)] | UnsetType = UNSET
    low_balance_micros: Annotated[int, Meta(ge=-MAX_MICROS, le=MAX_MICROS)] | UnsetType = UNSET

    def changes(self) -> dict[str, Any]:
        return {
            name: getattr(self, name) for name in ACCOUNT_FIELDS if getattr(self, name) is not UNSET
        }


class CreditGrantRequest(msgspec.Struct, forbid_unknown_fields=True):
    amount_micros: Annotated[int, Meta(gt=0, le=MAX_MICROS)]
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=255, pattern=STORABLE)]


@dataclass(frozen=True, slots=True)
class Account:
    consumer: str
    prepaid: bool
    balance_nanos: int | None
    low_balance: bool
    monthly_token_quota: int | None
    stripe_customer_id: str | None
    plan: str | None
    overdraft_micros: int
    low_balance_micros: int | None
    created_at: datetime
    updated_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "consumer": self.consumer,
            "prepaid": self.prepaid,
            "balance_micros": (
                micros_down(self.balance_nanos)
                if self.prepaid and self.balance_nanos is not None
                else None
            ),
            "low_balance": self.low_balance,
            "monthly_token_quota": self.monthly_token_quota,
            "stripe_customer_id": self.stripe_customer_id,
            "plan": self.plan,
            "overdraft_micros": self.overdraft_micros,
            "low_balance_micros": self.low_balance_micros,
            "created_at": _rfc3339(self.created_at),
            "updated_at": _rfc3339(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class CreditGrant:
    """A recorded grant. A replay (same key, same amount) returns the first grant as it was."""

    consumer: str
    grant_id: int
    amount_nanos: int
    idempotency_key: str
    balance_after_nanos: int
    granted_at: datetime
    replayed: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "consumer": self.consumer,
            "grant_id": self.grant_id,
            "amount_micros": micros_down(self.amount_nanos),
            "idempotency_key": self.idempotency_key,
            "balance_micros": micros_down(self.balance_after_nanos),
            "granted_at": _rfc3339(self.granted_at),
        }


class GrantConflict(Exception):
    """The idempotency key was used before for another amount."""

    def __init__(self, first: CreditGrant) -> None:
        super().__init__(first.idempotency_key)
        self.first = first


def _rfc3339(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")
