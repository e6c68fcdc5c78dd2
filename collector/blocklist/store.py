"""Reading the blocklist table as one consistent, versioned snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
import msgspec

CHANNEL = "token_meter_blocklist"
# When both apply, the plugin answers with the reason a customer can act on first: pay.
REASON_PRECEDENCE = ("insufficient_credits", "quota_exceeded")


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
            entry["reason"] = reasons[0]
    entries = list(by_consumer.values())
    body = msgspec.json.encode({"version": version, "entries": entries})
    return BlocklistSnapshot(version=version, entries=entries, body=body)
