"""`token-meter-collector` as an operator runs it: embedded PostgreSQL, generated tokens,
restarts that keep every acknowledged event, graceful shutdown, configuration errors."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import VENV_BIN, CollectorProcess, recreate_database
from tests.factories import usage_event


async def post(proc: CollectorProcess, token: str, events: list[Any]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proc.base_url}/v1/events",
            data=json.dumps(events),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        ) as r,
    ):
        return r.status, await r.json(content_type=None)


async def usage(proc: CollectorProcess, token: str, consumer: str) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{proc.base_url}/v1/consumers/{consumer}/usage",
            headers={"Authorization": f"Bearer {token}"},
        ) as r,
    ):
        assert r.status == 200, await r.text()
        return await r.json()


@pytest.mark.slow
async def test_embedded_database_generated_tokens_and_restart(
    collector_process_factory: Any, tmp_path: Path
) -> None:
    """With nothing configured the collector starts its own PostgreSQL, writes tokens (0600),
    and after a restart still has every acknowledged event and the same tokens."""
    proc = collector_process_factory()
    proc.start()
    data_dir = tmp_path / "collector-data"
    ingest_file, admin_file = data_dir / "ingest-token", data_dir / "admin-token"
    assert stat.S_IMODE(ingest_file.stat().st_mode) == 0o600
    ingest, admin = ingest_file.read_text().strip(), admin_file.read_text().strip()
    assert ingest != admin
    status, body = await post(proc, ingest, [usage_event(f"e{i}") for i in range(25)])
    assert (status, body["accepted"]) == (200, 25)
    assert proc.stop() == 0
    assert ingest not in proc.log() and admin not in proc.log()

    proc.start()
    assert (data_dir / "ingest-token").read_text().strip() == ingest
    result = await usage(proc, admin, "alice")
    assert result["events"] == 25
    status, body = await post(proc, ingest, [usage_event(f"e{i}") for i in range(30)])
    assert body == {"accepted": 5, "duplicates": 25, "rejected": []}
    assert proc.stop() == 0


@pytest.mark.slow
async def test_sigterm_finishes_in_flight_batches(
    collector_process_factory: Any, database_url: str
) -> None:
    """Batches already received when SIGTERM arrives are stored and acknowledged."""
    ingest, admin = "i" * 32, "a" * 32
    proc = collector_process_factory(
        database_url, TOKEN_METER_INGEST_TOKEN=ingest, TOKEN_METER_ADMIN_TOKEN=admin
    )
    proc.start()
    bodies = [
        json.dumps([usage_event(f"s{b}-{i}", f"c{b}") for i in range(5000)]) for b in range(4)
    ]
    async with aiohttp.ClientSession() as session:

        async def send(body: str) -> tuple[int, Any]:
            async with session.post(
                f"{proc.base_url}/v1/events",
                data=body,
                headers={"Authorization": f"Bearer {ingest}", "Content-Type": "application/json"},
            ) as r:
                return r.status, await r.json(content_type=None)

        sends = [asyncio.create_task(send(body)) for body in bodies]
        await asyncio.sleep(0.15)  # every request is on the wire, most still being processed
        assert proc.process is not None
        in_flight = sum(not task.done() for task in sends)
        proc.process.terminate()
        results = await asyncio.gather(*sends)
    assert in_flight > 0, "the test must stop the collector while batches are in flight"
    assert [status for status, _ in results] == [200] * 4, results
    assert sum(body["accepted"] for _, body in results) == 20_000
    assert await asyncio.to_thread(proc.process.wait, 30) == 0
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM usage_events") == 20_000
    finally:
        await conn.close()


def test_configuration_errors_are_reported_all_at_once(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "TOKEN_METER_PORT": "99999",
        "TOKEN_METER_INGEST_TOKEN": "short",
        "TOKEN_METER_LOG_LEVEL": "chatty",
        "DATABASE_URL": "mysql://nope",
        "TOKEN_METER_DATA_DIR": str(tmp_path),
    }
    result = subprocess.run(
        [str(VENV_BIN / "token-meter-collector")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    for fragment in (
        "TOKEN_METER_PORT",
        "TOKEN_METER_INGEST_TOKEN",
        "TOKEN_METER_LOG_LEVEL",
        "DATABASE_URL",
    ):
        assert fragment in result.stderr
    assert "short" not in result.stderr


async def test_two_collectors_migrating_one_database_at_once(
    pg_admin_url: str, collector_process_factory: Any
) -> None:
    """Collectors started together on an empty database take turns migrating."""
    url = await recreate_database(pg_admin_url, "tm_concurrent_migrations")
    tokens = {"TOKEN_METER_INGEST_TOKEN": "i" * 32, "TOKEN_METER_ADMIN_TOKEN": "a" * 32}
    procs = [collector_process_factory(url, **tokens) for _ in range(2)]
    for p in procs:
        assert p.process is None
    await asyncio.gather(*(asyncio.to_thread(p.start) for p in procs))
    for p in procs:
        status, body = await post(p, "i" * 32, [usage_event(f"m{p.port}")])
        assert (status, body["accepted"]) == (200, 1)
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") >= 1
    finally:
        await conn.close()
