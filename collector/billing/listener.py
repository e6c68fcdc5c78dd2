"""What billing needs of every ingest transaction, taken inside it (a FreshUsageListener)."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from ..ingest.fresh import FreshUsage, Pricing
from . import store


class BillingListener:
    """Keeps each consumer's Kong custom_id (a `cus_` one maps it to a Stripe customer) and,
    with Stripe enabled, marks the rollup windows that grew for the outbox."""

    def __init__(self, *, stripe_enabled: bool) -> None:
        self.stripe_enabled = stripe_enabled

    async def on_fresh_usage(
        self, conn: asyncpg.Connection, fresh: Sequence[FreshUsage], book: Pricing | None
    ) -> None:
        named = [f for f in fresh if f.custom_id is not None]
        dirty = [(f.consumer, hour) for f in fresh for hour in sorted(f.hours)]
        if not self.stripe_enabled:
            dirty = []
        if not named and not dirty:
            return
        await store.note_fresh_usage(
            conn,
            [f.consumer for f in named],
            [f.custom_id for f in named if f.custom_id is not None],
            [consumer for consumer, _ in dirty],
            [hour for _, hour in dirty],
        )
