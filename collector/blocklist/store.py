"""The blocklist table: every write to it (rows added and removed inside the caller's
transaction) and reading it back as one consistent, versioned snapshot.

A trigger bumps the single `blocklist_state` version row and notifies CHANNEL for every row
changed, so these writes come last in a transaction's lock order (that row is the one every
writer shares; see collector/accounts/store.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg
import msgspec

from .reasons import REASON_PRECEDENCE, BlockReason

CHANNEL = "token_meter_blocklist"

# (consumer, reason, detail shown to the plugins) and (consumer, reason).
Block = tuple[str, BlockReason, Mapping[str, object]]
Unblock = tuple[str, str]  # a reason read back from the table is a plain string

BLOCK = """
INSERT INTO blocklist (consumer, reason, detail)
SELECT consumer, reason, detail::jsonb
FROM unnest($1::text[], $2::text[], $3::text[]) AS t(consumer, reason, detail)
ORDER BY consumer, reason
ON CONFLICT DO NOTHING
"""

UNBLOCK = """
DELETE FROM blocklist b USING unnest($1::text[], $2::text[]) AS t(consumer, reason)
WHERE b.consumer = t.consumer AND b.reason = t.reason
"""


async def block(conn: asyncpg.Connection, entries: Sequence[Block]) -> None:
    """Put consumers on the blocklist for a reason; one already there for it stays as it is."""
    if entries:
        await conn.execute(
            BLOCK,
            [c for c, _, _ in entries],
            [r for _, r, _ in entries],
            [msgspec.json.encode(d).decode() for _, _, d in entries],
        )


async def unblock(conn: asyncpg.Connection, entries: Sequence[Unblock]) -> None:
    """Take consumers off the blocklist for a reason (their other reasons stay)."""
    if entries:
        await conn.execute(UNBLOCK, [c for c, _ in entries], [r for _, r in entries])


@dataclass(frozen=True)
class BlocklistSnapshot:
    version: int
    entries: list[dict[str, object]]
    body: bytes = field(repr=False)

    @property
    def etag(self) -> str:
        return f'"{self.version}"'


SNAPSHOT_QUERY = """
SELECT s.version,
       b.consumer, b.reason, b.detail::text AS detail, b.since
FROM blocklist_state s
LEFT JOIN blocklist b ON true
ORDER BY b.consumer, b.reason
"""


async def read_snapshot(conn: asyncpg.Connection) -> BlocklistSnapshot:
    """Version and rows come from one statement, hence one MVCC snapshot: they always agree."""
    rows = await conn.fetch(SNAPSHOT_QUERY)
    version = int(rows[0]["version"])
    by_consumer: dict[str, dict[str, object]] = {}
    for row in rows:
        if row["consumer"] is None:
            continue
        entry = by_consumer.get(row["consumer"])
        reason = row["reason"]
        if entry is None:
            by_consumer[row["consumer"]] = {
                "consumer": row["consumer"],
                "reason": reason,
                "reasons": [reason],
                "since": row["since"].isoformat(),
                "detail": msgspec.json.decode(row["detail"]),
            }
        else:
            reasons: list[str] = entry["reasons"]  # type: ignore[assignment]
            reasons.append(reason)
            reasons.sort(key=REASON_PRECEDENCE.index)
            if reasons[0] == reason:  # the entry shows its first reason, and that one's detail
                entry.update(
                    reason=reason,
                    since=row["since"].isoformat(),
                    detail=msgspec.json.decode(row["detail"]),
                )
    entries = list(by_consumer.values())
    body = msgspec.json.encode({"version": version, "entries": entries})
    return BlocklistSnapshot(version=version, entries=entries, body=body)
