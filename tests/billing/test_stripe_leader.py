"""One sync leader across collectors, and another takes over when it goes."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from tests.billing.conftest import INPUT, eventually, stripe_env
from tests.collector.accounts_api import put_consumer
from tests.conftest import make_settings, run_collector_app
from tests.factories import usage_event
from tests.harness.stripe import FakeStripe
from token_meter_collector.keys import STRIPE_SYNC


async def test_a_second_collector_takes_over_when_the_leader_stops(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    with FakeStripe() as fake:
        fake.create_meter(INPUT)
        fake.add_customer("cus_lee")
        env = stripe_env(fake, TOKEN_METER_STRIPE_METERS=f"{INPUT}=input_tokens")
        async with run_collector_app(make_settings(database_url, tmp_path / "a", **env)) as first:
            assert first.app is not None
            await eventually(lambda: first.app is not None and first.app[STRIPE_SYNC].is_leader)
            async with run_collector_app(
                make_settings(database_url, tmp_path / "b", **env)
            ) as second:
                assert second.app is not None
                await put_consumer(first, "lee", {"stripe_customer_id": "cus_lee"})
                await second.post_events([usage_event("l1", "lee")])
                await eventually(lambda: fake.total("cus_lee", INPUT) == 100)
                assert not second.app[STRIPE_SYNC].is_leader
                await first.app[STRIPE_SYNC].stop()  # its session and lock go with it
                sync = second.app[STRIPE_SYNC]
                await eventually(lambda: sync.is_leader, within=15)
                await second.post_events([usage_event("l2", "lee")])
                await eventually(lambda: fake.total("cus_lee", INPUT) == 200)
                leader = await db.fetchval("SELECT leader FROM stripe_sync_state")
                assert leader == sync.name
