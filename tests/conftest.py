"""Shared fixtures: a real PostgreSQL server (embedded by default, TEST_DATABASE_URL to use
another), a fresh migrated database per test, and the collector, in-process or as the real
`token-meter-collector` process. Every token and key they make is registered with the
session's secret scan (tests/secret_scan.py), which fails the run if any log line holds one."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from aiohttp import web

from bench.stack import free_port, with_database
from tests.harness.collector import TOKEN as FAKE_COLLECTOR_TOKEN
from tests.secret_scan import SecretScan
from token_meter_collector.app import create_app
from token_meter_collector.database import EmbeddedPostgres, create_pool, migrate
from token_meter_collector.settings import Settings

TEMPLATE_DB = "token_meter_test_template"
VENV_BIN = Path(sys.executable).parent

SECRETS = SecretScan()
SECRETS.register(FAKE_COLLECTOR_TOKEN)
# Environment variables that hold a secret (their _FILE forms hold a path to one).
SECRET_VARIABLE = re.compile(r"(TOKEN|API_KEY|SECRET)$")


def register_secrets(settings: Settings) -> Settings:
    """Put every secret of `settings` on the session's scan; returns `settings`."""
    for secret in (settings.ingest_token, settings.admin_token, settings.stripe_webhook_secret):
        if secret is not None:
            SECRETS.register(secret.value, *secret.value.split(","))
    if settings.stripe is not None:
        SECRETS.register(settings.stripe.api_key.value)
    return settings


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Keep what each phase printed and logged (a phase's report repeats the earlier ones')."""
    for title, text in report.sections:
        if title.startswith("Captured ") and title.endswith(f" {report.when}"):
            SECRETS.keep(text, f"{report.nodeid}: {title}")


@pytest.fixture(scope="session", autouse=True)
def _log_files_kept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end, the log files of the session's processes, all under its temporary root."""
    yield
    SECRETS.keep_files(sorted(tmp_path_factory.getbasetemp().rglob("*.log")))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leaks = SECRETS.leaks()
    if not leaks:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = ["secrets found in the logs (tests/secret_scan.py):", *leaks]
    for line in lines:
        if reporter is not None:
            reporter.write_line(line, red=True)
        else:
            print(line, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield external
        return
    root = Path(tempfile.mkdtemp(prefix="token-meter-test-pg-"))
    server = EmbeddedPostgres.start(root / "pgdata")
    try:
        yield server.url("postgres")
    finally:
        server.stop()


async def recreate_database(admin_url: str, name: str) -> str:
    """An empty database `name` (dropped first if it exists); returns its URL."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(admin_url, name)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def template_database(pg_admin_url: str) -> str:
    await recreate_database(pg_admin_url, TEMPLATE_DB)
    pool = await create_pool(with_database(pg_admin_url, TEMPLATE_DB), min_size=1, max_size=1)
    try:
        await migrate(pool)
    finally:
        await pool.close()
    return TEMPLATE_DB


@pytest_asyncio.fixture(loop_scope="session")
async def database_url(pg_admin_url: str, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test, dropped afterwards."""
    name = f"tm_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    finally:
        await conn.close()
    yield with_database(pg_admin_url, name)
    conn = await asyncpg.connect(pg_admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest_asyncio.fixture(loop_scope="session")
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test database, for checking what was stored."""
    conn = await asyncpg.connect(database_url, server_settings={"timezone": "UTC"})
    yield conn
    await conn.close()


def make_settings(database_url: str | None, data_dir: Path, **overrides: str) -> Settings:
    env = {
        "TOKEN_METER_DATA_DIR": str(data_dir),
        "TOKEN_METER_INGEST_TOKEN": "ingest-" + secrets.token_hex(16),
        "TOKEN_METER_ADMIN_TOKEN": "admin-" + secrets.token_hex(16),
        "TOKEN_METER_LOG_LEVEL": "warning",
        **({"DATABASE_URL": database_url} if database_url else {}),
        **overrides,
    }
    return register_secrets(Settings.from_env(env))


@dataclass
class RunningCollector:
    """A collector the test can talk to over real HTTP."""

    base_url: str
    ingest_token: str
    admin_token: str
    session: aiohttp.ClientSession
    app: web.Application | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def auth(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def post_events(
        self, events: Any, *, token: str | None = None, **kwargs: Any
    ) -> tuple[int, Any]:
        headers = {"Content-Type": "application/cloudevents-batch+json"}
        headers.update(self.auth(token or self.ingest_token))
        headers.update(kwargs.pop("headers", {}))
        data = events if isinstance(events, bytes) else json.dumps(events)
        async with self.session.post(
            f"{self.base_url}/v1/events", data=data, headers=headers, **kwargs
        ) as response:
            return response.status, await _body(response)

    async def get(self, path: str, *, token: str | None = None, **kwargs: Any) -> Any:
        headers = self.auth(token or self.admin_token)
        headers.update(kwargs.pop("headers", {}))
        async with self.session.get(f"{self.base_url}{path}", headers=headers, **kwargs) as r:
            return r.status, await _body(r), r.headers

    async def usage(self, consumer: str, **params: str) -> tuple[int, Any]:
        status, body, _ = await self.get(f"/v1/consumers/{consumer}/usage", params=params)
        return status, body


async def _body(response: aiohttp.ClientResponse) -> Any:
    raw = await response.read()
    if response.content_type.endswith("json") and raw:
        return json.loads(raw)
    return raw


@contextlib.asynccontextmanager
async def run_collector_app(
    settings: Settings, client_ssl: ssl.SSLContext | None = None
) -> AsyncIterator[RunningCollector]:
    """The app on 127.0.0.1, over HTTPS when `settings` has TLS files (the session's client
    then trusts `client_ssl`)."""
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    server_ssl = settings.server_ssl_context()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    assert settings.ingest_token and settings.admin_token
    scheme = "https" if server_ssl is not None else "http"
    connector = aiohttp.TCPConnector(ssl=client_ssl) if client_ssl is not None else None
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            yield RunningCollector(
                base_url=f"{scheme}://127.0.0.1:{port}",
                ingest_token=settings.ingest_token.value,
                admin_token=settings.admin_token.value,
                session=session,
                app=app,
            )
        finally:
            await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="session")
async def collector(database_url: str, tmp_path: Path) -> AsyncIterator[RunningCollector]:
    """The collector app on a real socket, on a fresh database."""
    async with run_collector_app(make_settings(database_url, tmp_path)) as running:
        yield running


@dataclass
class CollectorProcess:
    """`token-meter-collector` run as an operator runs it."""

    env: dict[str, str]
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(VENV_BIN / "token-meter-collector")],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"collector exited: {self.log_path.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"collector did not start: {self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def collector_process_factory(tmp_path: Path) -> Iterator[Any]:
    """Build (not start) collector processes; all are stopped at the end of the test."""
    made: list[CollectorProcess] = []

    def build(database_url: str | None = None, **env: str) -> CollectorProcess:
        port = free_port()
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "TOKEN_METER_PORT": str(port),
            "TOKEN_METER_DATA_DIR": str(tmp_path / "collector-data"),
            "TOKEN_METER_LOG_FORMAT": "json",
            **({"DATABASE_URL": database_url} if database_url else {}),
            **env,
        }
        for name, value in full_env.items():
            if SECRET_VARIABLE.search(name):
                SECRETS.register(value, *value.split(","))
            elif SECRET_VARIABLE.search(name.removesuffix("_FILE")) and Path(value).is_file():
                SECRETS.register(Path(value).read_text())
        proc = CollectorProcess(full_env, port, tmp_path / f"collector-{len(made)}.log")
        made.append(proc)
        return proc

    yield build
    for proc in made:
        if proc.process is not None:
            proc.stop()
        data_dir = Path(proc.env["TOKEN_METER_DATA_DIR"])
        for generated in (data_dir / "ingest-token", data_dir / "admin-token"):
            if generated.is_file():
                SECRETS.register(generated.read_text())
