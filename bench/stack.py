"""The stack the benchmarks run against: a fresh database (the embedded PostgreSQL, tuned as
the collector tunes it, unless --database-url or TEST_DATABASE_URL) and real collector
processes on it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from token_meter_collector.database import EmbeddedPostgres, ensure_database


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def start_collector(url: str, tmp: Path, name: str, tokens: dict[str, str]) -> tuple[Any, str]:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "TOKEN_METER_PORT": str(port),
        "TOKEN_METER_DATA_DIR": str(tmp / name),
        "TOKEN_METER_LOG_LEVEL": "warning",
        "TOKEN_METER_LOG_FORMAT": "json",
        **tokens,
    }
    env.pop("TOKEN_METER_PRICE_BOOK", None)  # the built-in book prices the events
    proc = subprocess.Popen(
        [sys.executable, "-m", "token_meter_collector"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp / f"{name}.log").open("wb"),
    )
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((tmp / f"{name}.log").read_text()[-2000:]) from None
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


@dataclass
class Stack:
    """PostgreSQL, collectors on it, and the tokens to talk to them."""

    tmp: Path
    database_url: str
    urls: list[str]
    ingest_token: str
    admin_token: str
    collector_pids: list[int] = field(default_factory=list)
    postmaster_pid: int | None = None  # the embedded server's, for CPU accounting

    @property
    def ingest(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.ingest_token}", "Content-Type": "application/json"}

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}", "Content-Type": "application/json"}


@contextlib.asynccontextmanager
async def collector_stack(args: argparse.Namespace, names: tuple[str, ...]) -> AsyncIterator[Stack]:
    """A fresh database (embedded PostgreSQL unless --database-url or TEST_DATABASE_URL) and one
    real collector process per name on it, stopped afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="token-meter-bench-enforcement-"))
    embedded = None
    admin_url = args.database_url or os.environ.get("TEST_DATABASE_URL")
    if not admin_url:
        embedded = EmbeddedPostgres.start(tmp / "pgdata")
        admin_url = embedded.url("postgres")
    collectors: list[tuple[Any, str]] = []
    try:
        db_name = f"bench_{secrets.token_hex(4)}"
        if embedded is not None:
            url = await embedded.prepare(db_name)
        else:
            await ensure_database(admin_url, db_name)
            url = with_database(admin_url, db_name)
        ingest_token, admin_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        tokens = {"TOKEN_METER_INGEST_TOKEN": ingest_token, "TOKEN_METER_ADMIN_TOKEN": admin_token}
        tokens.update(getattr(args, "extra_env", {}))  # more environment for the collectors
        for name in names:
            collectors.append(await asyncio.to_thread(start_collector, url, tmp, name, tokens))
        conn = await asyncpg.connect(url)
        durability = {k: await conn.fetchval(f"SHOW {k}") for k in ("fsync", "synchronous_commit")}
        await conn.close()
        print(f"PostgreSQL durability: {durability}; CPUs: {os.cpu_count()}")
        yield Stack(
            tmp,
            url,
            [u for _, u in collectors],
            ingest_token,
            admin_token,
            collector_pids=[p.pid for p, _ in collectors],
            postmaster_pid=embedded.server.get_pid() if embedded is not None else None,
        )
    finally:
        for proc, _ in collectors:
            proc.terminate()
            proc.wait(30)
        if embedded is not None:
            embedded.stop()
            # The server's files (gigabytes after bench.ingest --preload); the logs stay.
            shutil.rmtree(tmp / "pgdata", ignore_errors=True)
