"""With its database gone, every route that needs it answers 503 `database-unavailable` with
`Retry-After`, as schema/openapi.yaml documents, never a 500. The database goes away by having
the collector's pool terminated under it: each acquire then fails, as with PostgreSQL stopped
(tests/e2e stops a real server)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from tests.conftest import RunningCollector, make_settings, run_collector_app
from tests.contract.test_openapi import SPEC, check_response
from tests.factories import usage_event
from tests.harness.stripe import FakeStripe
from token_meter_collector.keys import INGEST, POOL

# Every route that answers from the database, with a request it would otherwise take.
CALLS: list[tuple[str, str, str, str, bytes | None]] = [
    (
        "POST",
        "/v1/events",
        "/v1/events",
        "ingest",
        json.dumps([usage_event("down-1")]).encode(),
    ),
    ("GET", "/v1/consumers/alice/usage", "/v1/consumers/{consumer}/usage", "admin", None),
    ("PUT", "/v1/consumers/alice", "/v1/consumers/{consumer}", "admin", b'{"plan": "pro"}'),
    (
        "POST",
        "/v1/consumers/alice/credits",
        "/v1/consumers/{consumer}/credits",
        "admin",
        b'{"amount_micros": 5, "idempotency_key": "down"}',
    ),
    ("GET", "/v1/stripe/status", "/v1/stripe/status", "admin", None),
    ("GET", "/v1/stripe/reconcile", "/v1/stripe/reconcile", "admin", None),
    ("POST", "/v1/stripe/reconcile/resend", "/v1/stripe/reconcile/resend", "admin", None),
]


@pytest_asyncio.fixture(loop_scope="session")
async def stranded(database_url: str, tmp_path: Path) -> AsyncIterator[RunningCollector]:
    """A collector with Stripe on (against the fake, so the Stripe routes get to the
    database), whose database then stops answering."""
    with FakeStripe() as fake:
        settings = make_settings(
            database_url,
            tmp_path,
            STRIPE_API_KEY=fake.api_key,
            STRIPE_API_BASE=fake.url,
            TOKEN_METER_STRIPE_SYNC_INTERVAL="3600",
        )
        async with run_collector_app(settings) as running:
            assert running.app is not None
            running.app[POOL].terminate()
            yield running


async def test_every_route_that_needs_the_database_answers_503_with_retry_after(
    stranded: RunningCollector,
) -> None:
    documented = {
        (method.upper(), path)
        for path, item in SPEC["paths"].items()
        for method, operation in item.items()
        if "503" in operation.get("responses", {}) and path not in ("/readyz", "/v1/stripe/webhook")
    }
    assert documented == {(method, path) for method, _, path, _, _ in CALLS}
    tokens = {"ingest": stranded.ingest_token, "admin": stranded.admin_token}
    for method, url, path, token, body in CALLS:
        headers = {"Authorization": f"Bearer {tokens[token]}", "Content-Type": "application/json"}
        async with stranded.session.request(
            method, stranded.base_url + url, headers=headers, data=body
        ) as response:
            answer = await response.read()
            assert response.status == 503, (url, response.status, answer)
            check_response(method, path, 503, response.content_type, answer)
            assert json.loads(answer)["type"].endswith("/database-unavailable"), url
            assert response.headers["Retry-After"] == "1", url
    async with stranded.session.get(stranded.base_url + "/readyz") as response:
        assert response.status == 503
    async with stranded.session.get(stranded.base_url + "/healthz") as response:
        assert response.status == 200  # alive: the process is fine, its database is not


@pytest_asyncio.fixture(loop_scope="session")
async def healthy(database_url: str, tmp_path: Path) -> AsyncIterator[RunningCollector]:
    async with run_collector_app(make_settings(database_url, tmp_path)) as running:
        yield running


async def test_a_database_starting_up_is_503_even_once_it_answers_again(
    healthy: RunningCollector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL starting up refuses a connection ("not yet accepting connections") and takes
    the next one a few ms later: the batch that met the refusal is 503, not a 500, although the
    database answers by the time the answer is made; and nothing of it is stored."""
    assert healthy.app is not None
    service = healthy.app[INGEST]

    async def starting_up(*_: Any, **__: Any) -> Any:
        raise asyncpg.CannotConnectNowError("the database system is not yet accepting connections")

    monkeypatch.setattr(service, "_store", starting_up)
    status, body = await healthy.post_events([usage_event("starting-1")])
    assert status == 503, body
    assert body["type"].endswith("/database-unavailable")
    async with healthy.session.get(healthy.base_url + "/readyz") as response:
        assert response.status == 200  # it answers again: the 503 came from the refusal itself
    monkeypatch.undo()
    status, body = await healthy.post_events([usage_event("starting-1")])
    assert (status, body["accepted"], body["duplicates"]) == (200, 1, 0)  # the retry is new
