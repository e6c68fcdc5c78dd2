"""Prepaid credit: idempotent grants, exact balances from the ledger, and the blocklist entry
that follows the balance both ways."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from tests.collector.accounts_api import (
    DEFAULT_EVENT_NANOS,
    blocklist,
    grant,
    put_consumer,
    reasons,
    wait_for_blocklist,
)
from tests.conftest import RunningCollector, make_settings, run_collector_app
from tests.factories import usage_event


async def ledger_total(db: asyncpg.Connection, consumer: str) -> int:
    return int(
        await db.fetchval(
            "SELECT coalesce(sum(amount_nanos), 0) FROM credit_ledger WHERE consumer = $1",
            consumer,
        )
    )


async def test_a_grant_makes_a_new_consumer_prepaid(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    status, body, headers = await grant(collector, "pat", 5_000_000, "order-1")
    assert status == 201
    assert "Idempotent-Replayed" not in headers
    assert body["consumer"] == "pat"
    assert body["amount_micros"] == 5_000_000
    assert body["balance_micros"] == 5_000_000
    assert body["idempotency_key"] == "order-1"
    status, usage = await collector.usage("pat")
    assert status == 200
    assert usage["balance_micros"] == 5_000_000
    assert await db.fetchval("SELECT prepaid FROM consumers WHERE consumer = 'pat'") is True


async def test_the_same_key_again_answers_as_the_first_time_and_grants_nothing(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    first = await grant(collector, "pat", 1_000_000, "k")
    await grant(collector, "pat", 2_000_000, "k2")
    again = await grant(collector, "pat", 1_000_000, "k")
    assert again[0] == first[0] == 201
    assert again[1] == first[1]
    assert again[2]["Idempotent-Replayed"] == "true"
    assert await ledger_total(db, "pat") == 3_000_000_000
    _, usage = await collector.usage("pat")
    assert usage["balance_micros"] == 3_000_000


async def test_the_same_key_with_another_amount_is_409_and_changes_nothing(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    await grant(collector, "pat", 1_000_000, "k")
    status, body, headers = await grant(collector, "pat", 9_000_000, "k")
    assert status == 409
    assert headers["Content-Type"].startswith("application/problem+json")
    assert "k" in body["detail"]
    assert await ledger_total(db, "pat") == 1_000_000_000
    # A key is per consumer: another consumer may use it, and a refused grant creates no one.
    assert (await grant(collector, "quinn", 9_000_000, "k"))[0] == 201


async def test_bad_grants_are_400_and_change_nothing(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    for amount, key in ((0, "a"), (-5, "b"), (1.5, "c"), ("10", "d"), (True, "e"), (10, "")):
        status, body, _ = await grant(collector, "ghost", amount, key)
        assert status == 400, (amount, key)
        assert body["detail"]
    async with collector.session.post(
        f"{collector.base_url}/v1/consumers/ghost/credits",
        data=b'{"amount_micros": 5, "idempotency_key": "x", "extra": 1}',
        headers={"Content-Type": "application/json", **collector.auth(collector.admin_token)},
    ) as r:
        assert r.status == 400
    async with collector.session.post(
        f"{collector.base_url}/v1/consumers/ghost/credits",
        data=b"amount=5",
        headers={"Content-Type": "text/plain", **collector.auth(collector.admin_token)},
    ) as r:
        assert r.status == 415
    assert await db.fetchval("SELECT count(*) FROM consumers WHERE consumer = 'ghost'") == 0
    assert await db.fetchval("SELECT count(*) FROM credit_ledger") == 0


async def test_grants_need_the_admin_token(collector: RunningCollector) -> None:
    assert (await grant(collector, "pat", 5, "k", token=collector.ingest_token))[0] == 403
    status, _, headers = await grant(collector, "pat", 5, "k", token="not-a-valid-token-at-all")
    assert status == 401
    assert "Bearer" in headers["WWW-Authenticate"]


async def test_usage_burns_the_exact_cost_and_the_ledger_agrees(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    await grant(collector, "pat", 10_000_000, "k")
    await collector.post_events([usage_event(f"e{i}", "pat") for i in range(7)])
    # A duplicate burns nothing.
    await collector.post_events([usage_event("e0", "pat"), usage_event("e7", "pat")])
    balance = await db.fetchval("SELECT balance_nanos FROM balances WHERE consumer = 'pat'")
    assert balance == 10_000_000_000 - 8 * DEFAULT_EVENT_NANOS
    assert await ledger_total(db, "pat") == balance
    burns = await db.fetch(
        "SELECT amount_nanos, events, price_book_version FROM credit_ledger"
        " WHERE consumer = 'pat' AND kind = 'burn' ORDER BY entry_id"
    )
    # One entry per ingest transaction, not per event.
    assert [(b["amount_nanos"], b["events"]) for b in burns] == [
        (-7 * DEFAULT_EVENT_NANOS, 7),
        (-DEFAULT_EVENT_NANOS, 1),
    ]
    assert burns[0]["price_book_version"].startswith("builtin-")
    _, usage = await collector.usage("pat")
    assert usage["balance_micros"] == balance // 1000


async def test_post_paid_usage_burns_nothing(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    await collector.post_events([usage_event("p1", "postpaid")])
    _, usage = await collector.usage("postpaid")
    assert usage["balance_micros"] is None
    assert await db.fetchval("SELECT count(*) FROM credit_ledger") == 0
    assert await db.fetchval("SELECT count(*) FROM balances") == 0


async def test_exhausting_credit_blocks_and_a_top_up_unblocks(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    # 1 event costs 450 micros: 1000 micros last two events.
    await grant(collector, "pat", 1_000, "k1")
    await collector.post_events([usage_event("e1", "pat")])
    assert "pat" not in reasons(await blocklist(collector))
    await collector.post_events([usage_event("e2", "pat")])
    assert "pat" not in reasons(await blocklist(collector))
    await collector.post_events([usage_event("e3", "pat")])  # balance -350 micros
    snapshot = await wait_for_blocklist(collector, lambda s: "pat" in reasons(s))
    entry = next(e for e in snapshot["entries"] if e["consumer"] == "pat")
    assert entry["reason"] == "insufficient_credits"
    assert entry["detail"]["balance_micros"] == -350
    _, usage = await collector.usage("pat")
    assert usage["balance_micros"] == -350  # the overshoot shows
    await grant(collector, "pat", 300, "k2")  # still -50: stays blocked
    assert await db.fetchval("SELECT count(*) FROM blocklist WHERE consumer = 'pat'") == 1
    await grant(collector, "pat", 100, "k3")  # +50
    await wait_for_blocklist(collector, lambda s: "pat" not in reasons(s))


async def test_a_balance_of_exactly_zero_blocks(collector: RunningCollector) -> None:
    await grant(collector, "pat", 450, "k1")
    await collector.post_events([usage_event("e1", "pat")])
    await wait_for_blocklist(collector, lambda s: "pat" in reasons(s))


async def test_overdraft_delays_the_block_and_changing_it_re_evaluates(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    await grant(collector, "pat", 100, "k1")
    await put_consumer(collector, "pat", {"overdraft_micros": 1_000})
    await collector.post_events([usage_event("e1", "pat"), usage_event("e2", "pat")])  # -800
    assert await db.fetchval("SELECT count(*) FROM blocklist") == 0
    status, account = await put_consumer(collector, "pat", {"overdraft_micros": 500})
    assert status == 200
    assert account["balance_micros"] == -800
    await wait_for_blocklist(collector, lambda s: "pat" in reasons(s))
    await put_consumer(collector, "pat", {"overdraft_micros": 10_000})
    await wait_for_blocklist(collector, lambda s: "pat" not in reasons(s))


async def test_no_blocklist_version_bump_without_a_change(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    await grant(collector, "pat", 100, "k1")
    await collector.post_events([usage_event("e1", "pat")])
    version = await db.fetchval("SELECT version FROM blocklist_state")
    await collector.post_events([usage_event("e2", "pat"), usage_event("e3", "pat")])
    await grant(collector, "pat", 10, "k2")
    await put_consumer(collector, "pat", {"plan": "starter"})
    await grant(collector, "other", 10_000_000, "k")
    assert await db.fetchval("SELECT version FROM blocklist_state") == version


async def test_low_balance_is_logged_once_per_crossing_and_counted(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    await grant(collector, "pat", 2_000, "k1")
    await put_consumer(collector, "pat", {"low_balance_micros": 1_000})
    for i in range(3):  # 2000 -> 1550 -> 1100 -> 650: crosses once
        await collector.post_events([usage_event(f"e{i}", "pat")])
    _, account = await put_consumer(collector, "pat", {})
    assert account["low_balance"] is True
    assert await metric(collector, "token_meter_low_balance_crossings_total") == 1
    await grant(collector, "pat", 5_000, "k2")  # lifted above: the next crossing counts again
    _, account = await put_consumer(collector, "pat", {})
    assert account["low_balance"] is False
    for i in range(3, 16):
        await collector.post_events([usage_event(f"e{i}", "pat")])
    assert await metric(collector, "token_meter_low_balance_crossings_total") == 2
    assert await db.fetchval("SELECT low_balance FROM balances WHERE consumer = 'pat'") is True


async def metric(collector: RunningCollector, name: str) -> float:
    status, body, _ = await collector.get("/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exposed")


async def test_balances_stay_exact_under_concurrent_ingest_and_grants(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    """Many requests and grants at once, some events sent twice: the balance is exactly the
    grants minus the cost of each distinct event, and equals the ledger's sum."""
    consumers = [f"c{n}" for n in range(5)]
    for c in consumers:
        await grant(collector, c, 1_000, "seed")

    async def send(batch: int) -> None:
        events = [
            usage_event(f"b{batch}-{i}", consumers[(batch + i) % 5], input_tokens=10 + i)
            for i in range(40)
        ]
        events += [usage_event(f"b{max(batch - 1, 0)}-{i}", consumers[0]) for i in range(3)]
        status, _ = await collector.post_events(events)
        assert status == 200

    async def top_up(n: int) -> None:
        status, _, _ = await grant(collector, consumers[n % 5], 777, f"top-{n}")
        assert status == 201

    await asyncio.gather(*(send(b) for b in range(30)), *(top_up(n) for n in range(20)))
    costs = await db.fetch(
        "SELECT consumer, sum(cost_nanos) AS cost FROM usage_events GROUP BY consumer"
    )
    for row in costs:
        expected = 1_000_000 + 4 * 777_000 - int(row["cost"])
        balance = await db.fetchval(
            "SELECT balance_nanos FROM balances WHERE consumer = $1", row["consumer"]
        )
        assert balance == expected, row["consumer"]
        assert await ledger_total(db, row["consumer"]) == balance
    blocked = set(await db.fetchval("SELECT coalesce(array_agg(consumer), '{}') FROM blocklist"))
    negative = {
        r["consumer"]
        for r in await db.fetch("SELECT consumer FROM balances WHERE balance_nanos <= 0")
    }
    assert blocked == negative


async def test_two_collectors_on_one_database_both_see_the_block(
    collector: RunningCollector, database_url: str, tmp_path: Path
) -> None:
    other_settings = make_settings(database_url, tmp_path / "other")
    async with run_collector_app(other_settings) as other:
        await grant(other, "pat", 100, "k1")
        await collector.post_events([usage_event("e1", "pat")])  # crosses through the first
        for c in (collector, other):
            await wait_for_blocklist(c, lambda s: reasons(s).get("pat") == ["insufficient_credits"])
        await grant(other, "pat", 1_000, "k2")  # lifted through the second
        for c in (collector, other):
            await wait_for_blocklist(c, lambda s: "pat" not in reasons(s))
