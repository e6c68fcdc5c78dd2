"""A collector with Stripe billing on, against the Stripe fake, on a fresh database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.conftest import RunningCollector, make_settings, run_collector_app
from tests.harness.stripe import FakeStripe, RateLimits

INPUT = "token_meter_input_tokens"
OUTPUT = "token_meter_output_tokens"
COST = "token_meter_cost"
METERS = f"{INPUT}=input_tokens,{OUTPUT}=output_tokens,{COST}=cost_micros"


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
    database_url: str, tmp_path: Path, stripe_fake: FakeStripe
) -> AsyncIterator[RunningCollector]:
    settings = make_settings(database_url, tmp_path, **stripe_env(stripe_fake))
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
