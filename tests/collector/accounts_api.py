"""Calls of the account endpoints and blocklist waits shared by the credits and quota tests."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from tests.conftest import RunningCollector

# The factory's default event: gpt-4o, 100 input and 20 output tokens, priced by the built-in
# book at $2.50 and $10.00 per million: 100 * 2,500 + 20 * 10,000 nano-units.
DEFAULT_EVENT_NANOS = 450_000
DEFAULT_EVENT_TOKENS = 120


async def put_consumer(
    collector: RunningCollector, consumer: str, body: Any, *, token: str | None = None
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **collector.auth(token or collector.admin_token)}
    async with collector.session.put(
        f"{collector.base_url}/v1/consumers/{consumer}", data=data, headers=headers
    ) as r:
        return r.status, await r.json(content_type=None)


async def grant(
    collector: RunningCollector,
    consumer: str,
    amount_micros: Any,
    key: str,
    *,
    token: str | None = None,
) -> tuple[int, Any, dict[str, str]]:
    body = {"amount_micros": amount_micros, "idempotency_key": key}
    headers = {"Content-Type": "application/json", **collector.auth(token or collector.admin_token)}
    async with collector.session.post(
        f"{collector.base_url}/v1/consumers/{consumer}/credits",
        data=json.dumps(body),
        headers=headers,
    ) as r:
        return r.status, await r.json(content_type=None), dict(r.headers)


async def blocklist(collector: RunningCollector) -> dict[str, Any]:
    status, body, _ = await collector.get("/v1/blocklist", token=collector.ingest_token)
    assert status == 200
    assert isinstance(body, dict)
    return body


def reasons(snapshot: dict[str, Any]) -> dict[str, list[str]]:
    return {e["consumer"]: e["reasons"] for e in snapshot["entries"]}


async def wait_for_blocklist(
    collector: RunningCollector,
    predicate: Callable[[dict[str, Any]], bool],
    patience: float = 15.0,
) -> dict[str, Any]:
    """Long-poll the collector until its blocklist satisfies `predicate` (not a timing check:
    `patience` only bounds a failing test)."""
    deadline = time.monotonic() + patience
    snapshot = await blocklist(collector)
    while not predicate(snapshot):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"blocklist never matched: {snapshot}")
        status, body, _ = await collector.get(
            "/v1/blocklist",
            token=collector.ingest_token,
            headers={"If-None-Match": f'"{snapshot["version"]}"'},
            params={"wait": str(min(left, 5.0))},
        )
        if status == 200:
            snapshot = body
        await asyncio.sleep(0)
    return snapshot
