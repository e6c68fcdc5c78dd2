"""POST /v1/events against real PostgreSQL: exact totals, dedupe, and every bad input."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import asyncpg

from tests.conftest import RunningCollector
from tests.factories import this_hour, usage_event
from token_meter_collector.ingest.dedupe import Pruned, prune_dedupe_keys
from token_meter_collector.ingest.events import UsageData
from token_meter_collector.ingest.fresh import FreshUsage, Pricing
from token_meter_collector.keys import INGEST, POOL, PRICING


async def stored_count(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM usage_events"))


async def test_valid_batch_is_stored_with_exact_rollups(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    """Every event is stored once and the rollups hold the exact sums per model and kind."""
    events = [
        usage_event(f"r{i}", input_tokens=100 + i, output_tokens=10 + i, cached_input_tokens=i)
        for i in range(50)
    ] + [usage_event("claude-1", model="claude-sonnet-4", input_tokens=7, output_tokens=3)]
    status, body = await collector.post_events(events)
    assert status == 200
    assert body == {"accepted": 51, "duplicates": 0, "rejected": []}
    assert await stored_count(db) == 51
    status, usage = await collector.usage("alice")
    assert status == 200
    assert usage["input_tokens"] == sum(100 + i for i in range(50)) + 7
    assert usage["output_tokens"] == sum(10 + i for i in range(50)) + 3
    assert usage["cached_input_tokens"] == sum(range(50))
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["events"] == 51
    models = {m["model"]: m for m in usage["by_model"]}
    assert models["claude-sonnet-4"]["input_tokens"] == 7
    assert models["gpt-4o"]["events"] == 50
    monthly = await db.fetchval("SELECT sum(total_tokens) FROM usage_monthly")
    hourly = await db.fetchval("SELECT sum(total_tokens) FROM usage_hourly")
    assert monthly == hourly == usage["total_tokens"]


async def test_duplicates_across_batches_are_acknowledged_not_counted(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    first = [usage_event(f"d{i}") for i in range(10)]
    assert (await collector.post_events(first))[1]["accepted"] == 10
    second = [usage_event(f"d{i}") for i in range(5, 15)]
    status, body = await collector.post_events(second)
    assert status == 200
    assert body == {"accepted": 5, "duplicates": 5, "rejected": []}
    assert await stored_count(db) == 15
    _, usage = await collector.usage("alice")
    assert usage["events"] == 15
    assert usage["total_tokens"] == 15 * 120


class RecordingListener:
    def __init__(self) -> None:
        self.calls: list[tuple[list[FreshUsage], Pricing | None, bool]] = []

    async def on_fresh_usage(
        self, conn: asyncpg.Connection, fresh: Sequence[FreshUsage], book: Pricing | None
    ) -> None:
        self.calls.append((list(fresh), book, conn.is_in_transaction()))


async def test_listeners_get_the_new_usage_per_consumer_and_the_book_that_priced_it(
    collector: RunningCollector,
) -> None:
    """Duplicates left out, one entry per consumer in consumer order, inside the transaction."""
    assert collector.app is not None
    listener = RecordingListener()
    collector.app[INGEST].listeners.append(listener)
    at = this_hour()
    await collector.post_events(
        [
            usage_event("b1", "bob", time=at),
            usage_event("a1", "alice", time=at),
            usage_event("a2", "alice", time=at),
        ]
    )
    await collector.post_events(
        [
            usage_event("a1", "alice", time=at),
            usage_event("b2", "bob", time=at, model="no-such-model-anywhere"),
        ]
    )
    book = collector.app[PRICING].current()
    cost = book.cost_nanos(
        UsageData(input_tokens=100, output_tokens=20, total_tokens=120, model="gpt-4o")
    )
    assert cost is not None and cost > 0
    hours = (datetime.fromisoformat(at).replace(second=0),)
    assert listener.calls == [
        (
            [
                FreshUsage("alice", 2, 240, 2 * cost, 0, hours),
                FreshUsage("bob", 1, 120, cost, 0, hours),
            ],
            book,
            True,
        ),
        ([FreshUsage("bob", 1, 120, 0, 1, hours)], book, True),
    ]


async def test_same_id_from_another_source_is_a_different_event(
    collector: RunningCollector,
) -> None:
    events = [usage_event("same", source="kong://a"), usage_event("same", source="kong://b")]
    _, body = await collector.post_events(events)
    assert body["accepted"] == 2


async def test_duplicate_inside_one_batch_counts_once(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    events = [usage_event("x", input_tokens=1), usage_event("x", input_tokens=999)]
    _, body = await collector.post_events(events)
    assert body == {"accepted": 1, "duplicates": 1, "rejected": []}
    assert await db.fetchval("SELECT input_tokens FROM usage_events") == 1


async def test_racing_requests_with_overlapping_events_count_each_once(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    """Eight concurrent batches over the same consumers and overlapping ids: totals are exact."""
    batches = [
        [usage_event(f"race{(b * 37 + i) % 300}", f"c{i % 7}") for i in range(200)]
        for b in range(8)
    ]
    results = await asyncio.gather(*(collector.post_events(batch) for batch in batches))
    assert all(status == 200 for status, _ in results)
    distinct = {(e["source"], e["id"]) for batch in batches for e in batch}
    assert sum(body["accepted"] for _, body in results) == len(distinct)
    assert sum(body["accepted"] + body["duplicates"] for _, body in results) == 1600
    assert await stored_count(db) == len(distinct)
    rollup_events = await db.fetchval("SELECT sum(events) FROM usage_monthly")
    assert rollup_events == len(distinct)


async def test_invalid_events_are_rejected_one_by_one_and_valid_ones_stored(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    good = usage_event("good")
    bad = {
        "negative": usage_event("negative", input_tokens=-1, total_tokens=19),
        "absurd": usage_event("absurd", input_tokens=10**12, total_tokens=10**12 + 20),
        "string tokens": usage_event("str", input_tokens="100", total_tokens=120),
        "unknown data field": usage_event("unknown", prompt="hello"),
        "wrong total": usage_event("total", total_tokens=5),
        "cached over input": usage_event("cached", cached_input_tokens=101),
        "reasoning over output": usage_event("reasoning", reasoning_tokens=21),
        "no subject": {k: v for k, v in usage_event("nosub").items() if k != "subject"},
        "empty subject": {**usage_event("empty"), "subject": ""},
        "wrong type": {**usage_event("type"), "type": "com.example.other"},
        "naive time": {**usage_event("naive"), "time": "2026-11-27T10:00:00"},
        "future time": {**usage_event("future"), "time": "2099-01-01T00:00:00Z"},
        "not an object": 42,
    }
    status, body = await collector.post_events([good, *bad.values()])
    assert status == 200
    assert body["accepted"] == 1
    rejected = body["rejected"]
    assert [r["index"] for r in rejected] == list(range(1, len(bad) + 1))
    assert all(r["reason"] for r in rejected)
    assert rejected[0]["id"] == "negative"
    assert "input_tokens" in rejected[0]["reason"]
    assert "prompt" in rejected[3]["reason"]
    assert rejected[-1]["id"] is None
    assert await stored_count(db) == 1


async def test_cloudevents_extensions_are_accepted(collector: RunningCollector) -> None:
    event = {
        **usage_event("ext"),
        "traceparent": "00-abc-def-01",
        "datacontenttype": "application/json",
    }
    _, body = await collector.post_events([event])
    assert body["accepted"] == 1


async def test_malformed_bodies_store_nothing(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    for payload, expected in (
        (b"[{not json", 400),
        (b'{"specversion": "1.0"}', 400),
        (b"", 400),
        (b"null", 400),
    ):
        status, body = await collector.post_events(payload)
        assert status == expected, payload
        assert body["status"] == expected
        assert body["type"].startswith("https://token-meter.dev/problems/")
    assert await stored_count(db) == 0


async def test_wrong_content_type_is_415(collector: RunningCollector) -> None:
    status, body = await collector.post_events(
        [usage_event("ct")], headers={"Content-Type": "text/plain"}
    )
    assert status == 415
    assert "application/cloudevents-batch+json" in body["detail"]


async def test_application_json_is_accepted(collector: RunningCollector) -> None:
    status, body = await collector.post_events(
        [usage_event("json")], headers={"Content-Type": "application/json"}
    )
    assert (status, body["accepted"]) == (200, 1)


async def test_gzip_batches_are_accepted(collector: RunningCollector) -> None:
    data = gzip.compress(json.dumps([usage_event(f"gz{i}") for i in range(100)]).encode())
    status, body = await collector.post_events(data, headers={"Content-Encoding": "gzip"})
    assert (status, body["accepted"]) == (200, 100)


async def test_corrupt_gzip_is_rejected(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    data = gzip.compress(json.dumps([usage_event("c")]).encode())[:-12] + b"garbage!"
    status, _ = await collector.post_events(data, headers={"Content-Encoding": "gzip"})
    assert status in (400, 413)
    assert await stored_count(db) == 0


async def test_gzip_bomb_is_413(collector: RunningCollector, db: asyncpg.Connection) -> None:
    """17 MiB of zeros compress to a few KiB; decompressed they are over the 16 MiB limit."""
    bomb = gzip.compress(b"[" + b" " * (17 * 1024 * 1024) + b"]")
    assert len(bomb) < 100_000
    status, _ = await collector.post_events(bomb, headers={"Content-Encoding": "gzip"})
    assert status == 413
    assert await stored_count(db) == 0


async def test_batch_of_10000_is_taken_and_10001_is_413(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    events = [usage_event(f"big{i}", f"c{i % 50}") for i in range(10_001)]
    status, body = await collector.post_events(events)
    assert status == 413
    assert "10000" in body["detail"]
    assert await stored_count(db) == 0
    status, body = await collector.post_events(events[:10_000])
    assert (status, body["accepted"]) == (200, 10_000)


async def test_body_over_16_mib_is_413(collector: RunningCollector) -> None:
    padding = "x" * 200
    events = [usage_event(f"p{i}", padding[:200]) for i in range(1)]
    data = json.dumps(events).encode()
    data = data[:-1] + b"," + b" " * (16 * 1024 * 1024) + b"]"
    status, _ = await collector.post_events(data)
    assert status == 413


async def test_authentication(collector: RunningCollector, db: asyncpg.Connection) -> None:
    """No token or a wrong one: 401 with a challenge; the admin token: 403; nothing stored."""
    url = f"{collector.base_url}/v1/events"
    data = json.dumps([usage_event("auth")])
    headers = {"Content-Type": "application/json"}
    async with collector.session.post(url, data=data, headers=headers) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.content_type == "application/problem+json"
    for token, expected in (("wrong-token-value-123", 401), (collector.admin_token, 403)):
        status, _ = await collector.post_events([usage_event("auth")], token=token)
        assert status == expected
    async with collector.session.post(
        url, data=data, headers={**headers, "Authorization": f"Basic {collector.ingest_token}"}
    ) as r:
        assert r.status == 401
    assert await stored_count(db) == 0


async def test_metrics_count_outcomes(collector: RunningCollector) -> None:
    await collector.post_events([usage_event("m1"), usage_event("m1"), {"bad": True}])
    status, body, _ = await collector.get("/metrics")
    assert status == 200
    text = body.decode()
    assert 'token_meter_events_total{outcome="accepted"} 1.0' in text
    assert 'token_meter_events_total{outcome="duplicate"} 1.0' in text
    assert 'token_meter_events_total{outcome="rejected"} 1.0' in text
    assert "token_meter_ingest_batch_seconds_count 1.0" in text
    assert 'token_meter_db_pool_connections{state="max"}' in text
    status, _, _ = await collector.get("/metrics", token=collector.ingest_token)
    assert status == 403


async def test_events_older_than_the_dedupe_horizon_are_rejected(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    """An event older than the horizon could be a replay whose dedupe key is already pruned:
    refused with a reason rather than risk counting it twice."""
    old = usage_event("ancient", time="2020-01-01T00:00:00Z")
    _, body = await collector.post_events([old, usage_event("fresh")])
    assert body["accepted"] == 1
    assert body["rejected"][0]["id"] == "ancient"
    assert "90-day dedupe horizon" in body["rejected"][0]["reason"]
    assert await stored_count(db) == 1


async def test_pruning_forgets_only_keys_past_the_horizon(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    """Keys of events older than the horizon and a day go (a whole day by dropping its
    partition, the default partition's one by one); younger keys stay, and so do the events."""
    now = datetime.now(UTC)
    five_days_ago = (now - timedelta(days=5)).date()
    await db.execute("SELECT token_meter_ensure_key_partitions($1, $1)", five_days_ago)
    at = {
        "partition": now - timedelta(days=5),  # its own day's partition
        "default": now - timedelta(days=4),  # no partition made for that day
        "kept": now - timedelta(days=2, hours=12),  # inside horizon + margin
        "today": now,
    }
    events = [
        usage_event(f"{name}-{i}", time=moment.isoformat().replace("+00:00", "Z"))
        for name, moment in at.items()
        for i in range(5)
    ]
    assert (await collector.post_events(events))[1]["accepted"] == 20
    assert await db.fetchval("SELECT count(*) FROM dedupe_keys_default") == 10
    assert collector.app is not None
    pruned = await prune_dedupe_keys(collector.app[POOL], timedelta(days=2), now=now)
    assert (pruned.partitions, pruned.keys) == (1, 5)
    assert (
        await db.fetchval("SELECT to_regclass($1)", f"dedupe_keys_{five_days_ago:%Y%m%d}") is None
    )
    assert await db.fetchval("SELECT count(*) FROM dedupe_keys") == 10
    assert await db.fetchval("SELECT min(time) FROM dedupe_keys") == at["kept"]
    # the events themselves stay, and the kept keys still dedupe
    assert await stored_count(db) == 20
    _, body = await collector.post_events(events[10:])
    assert body == {"accepted": 0, "duplicates": 10, "rejected": []}
    assert (await prune_dedupe_keys(collector.app[POOL], timedelta(days=2), now=now)) == Pruned(
        0, 0
    )
