"""GET /v1/blocklist: versions, ETags, long polls, and changes seen by every collector."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import asyncpg

from tests.conftest import RunningCollector, make_settings, run_collector_app
from token_meter_collector.blocklist.reasons import BlockReason


async def get_blocklist(
    collector: RunningCollector, etag: str | None = None, wait: float | None = None
) -> tuple[int, object, str]:
    headers = {"If-None-Match": etag} if etag else {}
    params = {"wait": str(wait)} if wait is not None else {}
    status, body, response_headers = await collector.get(
        "/v1/blocklist", token=collector.ingest_token, headers=headers, params=params
    )
    return status, body, response_headers.get("ETag", "")


async def test_empty_blocklist_has_a_version_and_etag(collector: RunningCollector) -> None:
    status, body, etag = await get_blocklist(collector)
    assert status == 200
    assert body == {"version": 1, "entries": []}
    assert etag == '"1"'
    status, _, _ = await get_blocklist(collector, etag='"1"')
    assert status == 304


async def test_the_table_allows_exactly_the_collectors_reasons(db: asyncpg.Connection) -> None:
    """The migration's CHECK constraint names the codes of BlockReason, no more, no fewer."""
    check = await db.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'blocklist'::regclass AND contype = 'c'"
    )
    assert set(re.findall(r"'([a-z_]+)'::text", check)) == set(BlockReason)


async def test_admin_token_is_403_and_no_token_401(collector: RunningCollector) -> None:
    status, _, _ = await collector.get("/v1/blocklist", token=collector.admin_token)
    assert status == 403
    async with collector.session.get(f"{collector.base_url}/v1/blocklist") as r:
        assert r.status == 401


async def test_change_bumps_version_and_insufficient_credits_wins(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    await db.execute(
        "INSERT INTO blocklist (consumer, reason) VALUES"
        " ('alice', 'quota_exceeded'), ('alice', 'insufficient_credits'), ('bob', 'quota_exceeded')"
    )
    deadline = time.monotonic() + 5
    while True:
        _, body, etag = await get_blocklist(collector)
        assert isinstance(body, dict)
        if body["version"] > 1 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    entries = {e["consumer"]: e for e in body["entries"]}
    assert entries["alice"]["reason"] == "insufficient_credits"
    assert entries["alice"]["reasons"] == ["insufficient_credits", "quota_exceeded"]
    assert entries["bob"]["reason"] == "quota_exceeded"
    assert etag == f'"{body["version"]}"'


async def test_long_poll_returns_as_soon_as_the_version_changes(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    poll = asyncio.create_task(get_blocklist(collector, etag='"1"', wait=30))
    await asyncio.sleep(0.3)
    assert not poll.done()
    started = time.monotonic()
    await db.execute("INSERT INTO blocklist (consumer, reason) VALUES ('carol', 'quota_exceeded')")
    status, body, _ = await asyncio.wait_for(poll, 10)
    assert time.monotonic() - started < 10
    assert status == 200
    assert isinstance(body, dict)
    assert [e["consumer"] for e in body["entries"]] == ["carol"]


async def test_long_poll_times_out_with_304(collector: RunningCollector) -> None:
    status, _, etag = await get_blocklist(collector, etag='"1"', wait=0.3)
    assert status == 304
    assert etag == '"1"'


async def test_bad_wait_is_400(collector: RunningCollector) -> None:
    for wait in ("soon", "61", "-1"):
        status, body, _ = await collector.get(
            "/v1/blocklist", token=collector.ingest_token, params={"wait": wait}
        )
        assert status == 400
        assert "wait" in body["detail"]


async def test_two_collectors_on_one_database_both_see_a_change(
    collector: RunningCollector, database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A change committed anywhere wakes the long polls of every collector (LISTEN/NOTIFY)."""
    other_settings = make_settings(database_url, tmp_path / "other")
    async with run_collector_app(other_settings) as other:
        polls = [
            asyncio.create_task(get_blocklist(c, etag='"1"', wait=30)) for c in (collector, other)
        ]
        await asyncio.sleep(0.3)
        await db.execute(
            "INSERT INTO blocklist (consumer, reason) VALUES ('dave', 'insufficient_credits')"
        )
        results = await asyncio.wait_for(asyncio.gather(*polls), 10)
    for status, body, _ in results:
        assert status == 200
        assert isinstance(body, dict)
        assert body["entries"][0]["consumer"] == "dave"


async def test_shutdown_answers_waiting_long_polls_at_once(
    database_url: str, tmp_path: Path
) -> None:
    """A collector shutting down answers its long polls (304) instead of holding them for the
    whole wait, so a graceful shutdown is quick."""
    async with run_collector_app(make_settings(database_url, tmp_path)) as running:
        poll = asyncio.create_task(get_blocklist(running, etag='"1"', wait=60))
        await asyncio.sleep(0.3)
        assert running.app is not None
        started = time.monotonic()
        await running.app.shutdown()
        status, _, _ = await asyncio.wait_for(poll, 10)
        assert status == 304
        assert time.monotonic() - started < 10
