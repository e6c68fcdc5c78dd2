"""End-to-end: the plugin servers started as Kong starts them, the real collector process, and
real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import CollectorProcess
from tests.integration.conftest import make_harness  # noqa: F401 - the harness factory fixture

INGEST_TOKEN = "e2e-ingest-token-0123456789"
ADMIN_TOKEN = "e2e-admin-token-0123456789"


@dataclass
class Stack:
    """The collector process on its own database, and how to look into that database."""

    collector: CollectorProcess
    database_url: str
    spool_dir: Path

    def plugin_config(self, **extra: Any) -> dict[str, Any]:
        """The two required fields, and a spool of this test's own: the default spool directory
        is shared by every plugin server of the machine, which replays what it finds there."""
        return {
            "collector_url": self.collector.base_url,
            "collector_token": INGEST_TOKEN,
            "spool_dir": str(self.spool_dir),
            **extra,
        }

    def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async def run() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self.database_url)
            try:
                return list(await conn.fetch(sql, *args))
            finally:
                await conn.close()

        return asyncio.run(run())

    def api(
        self, method: str, path: str, body: Any = None, *, token: str = ADMIN_TOKEN
    ) -> tuple[int, Any]:
        """One call of the collector's HTTP API (the admin token by default): status and
        decoded JSON body (None when empty)."""
        request = urllib.request.Request(  # noqa: S310 (the test's own http:// collector)
            self.collector.base_url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        return status, json.loads(raw) if raw else None

    def stored_events(self) -> int:
        return int(self.query("SELECT count(*) FROM usage_events")[0][0])

    def wait_for_events(self, count: int, timeout: float = 60.0) -> int:
        """Waits until the database holds `count` events (bounded); returns what it holds."""
        deadline = time.monotonic() + timeout
        stored = self.stored_events()
        while stored < count and time.monotonic() < deadline:
            time.sleep(0.1)
            stored = self.stored_events()
        return stored


@pytest.fixture
def stack(collector_process_factory: Any, database_url: str, tmp_path: Path) -> Iterator[Stack]:
    proc = collector_process_factory(
        database_url,
        TOKEN_METER_INGEST_TOKEN=INGEST_TOKEN,
        TOKEN_METER_ADMIN_TOKEN=ADMIN_TOKEN,
        TOKEN_METER_LOG_LEVEL="info",
    )
    proc.start()
    yield Stack(proc, database_url, tmp_path / "spool")
    # Before the database is dropped (fixtures are torn down in reverse order of setup).
    assert proc.stop() == 0, proc.log()[-3000:]
