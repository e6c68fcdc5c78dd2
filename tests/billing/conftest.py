"""A collector with Stripe billing on, against the Stripe fake, on a fresh database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.conftest import RunningCollector, make_settings, run_collector_app
from tests.harness.stripe import (
    CREATE_METER_EVENT,
    CREATE_METER_EVENT_STREAM,
    FakeStripe,
    RateLimits,
)
from token_meter_collector.billing import store
from token_meter_collector.billing.stripe_api import StripeApi
from token_meter_collector.billing.sync import StripeSync
from token_meter_collector.keys import POOL
from token_meter_collector.observability import Metrics

INPUT = "token_meter_input_tokens"
OUTPUT = "token_meter_output_tokens"
COST = "token_meter_cost"
METERS = f"{INPUT}=input_tokens,{OUTPUT}=output_tokens,{COST}=cost_micros"
# TOKEN_METER_STRIPE_TRANSPORT values, and the fake's route each sends its meter events to.
TRANSPORTS = ("meter_events", "meter_event_stream")
EVENT_ROUTE = {"meter_events": CREATE_METER_EVENT, "meter_event_stream": CREATE_METER_EVENT_STREAM}


@pytest.fixture
def transport() -> str:
    """The transport `billing_collector` uses: v1 here; a module parametrizes it over both by
    defining its own `transport` fixture with `params=TRANSPORTS`."""
    return "meter_events"


def events_sent(fake: FakeStripe, transport: str) -> int:
    """Meter events the collector sent, counting each event of a stream call."""
    if transport == "meter_events":
        return fake.call_count(CREATE_METER_EVENT)
    return sum(len(r.params.get("events", [])) for r in fake.requests_to(CREATE_METER_EVENT_STREAM))


@pytest.fixture
def stripe_fake() -> Iterator[FakeStripe]:
    """The fake, with the three meters created; limits as in test mode."""
    with FakeStripe(limits=RateLimits.test_mode()) as fake:
        for name in (INPUT, OUTPUT, COST):
            fake.create_meter(name)
        yield fake


def stripe_env(fake: FakeStripe, **overrides: str) -> dict[str, str]:
    return {
        "STRIPE_API_KEY": fake.api_key,
        "STRIPE_API_BASE": fake.url,
        "TOKEN_METER_STRIPE_METERS": METERS,
        "TOKEN_METER_STRIPE_SYNC_INTERVAL": "0.2",
        "TOKEN_METER_STRIPE_TIMEOUT": "2",
        **overrides,
    }


@pytest_asyncio.fixture(loop_scope="session")
async def billing_collector(
    database_url: str, tmp_path: Path, stripe_fake: FakeStripe, transport: str
) -> AsyncIterator[RunningCollector]:
    env = stripe_env(stripe_fake, TOKEN_METER_STRIPE_TRANSPORT=transport)
    settings = make_settings(database_url, tmp_path, **env)
    async with run_collector_app(settings) as running:
        yield running


async def eventually(check: Callable[[], Any], within: float = 20.0, every: float = 0.1) -> Any:
    """Wait until `check()` (sync or async) returns something truthy; return it."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"not true within {within} s (last: {last!r})")


@asynccontextmanager
async def direct_sync(
    collector: RunningCollector,
    fake: FakeStripe,
    data_dir: Path,
    *,
    api: StripeApi | None = None,
    **env: str,
) -> AsyncIterator[StripeSync]:
    """A sync of the test's own on `collector`'s database (a collector without Stripe, so it
    leads nothing), never started: the test runs each cycle (`run_cycle`). The stream transport
    unless `env` says otherwise; `api` may be a subclass that watches the calls."""
    env = {"TOKEN_METER_STRIPE_TRANSPORT": "meter_event_stream", **env}
    settings = make_settings(None, data_dir, **stripe_env(fake, **env)).stripe
    assert settings is not None and collector.app is not None
    api = api or StripeApi(fake.api_key, api_base=fake.url, timeout=settings.timeout)
    sync = StripeSync(collector.app[POOL], settings, Metrics(), api=api)
    try:
        yield sync
    finally:
        await sync.stop()


async def run_cycle(sync: StripeSync) -> None:
    """One sync cycle over every rollup window: the collector without Stripe marks none, so
    each cycle looks at all of them again (as a collector given a key for the first time)."""
    async with sync.pool.acquire() as conn:
        await store.forget_initialization(conn)
        await store.initialize(conn)
        await sync.cycle(conn)
