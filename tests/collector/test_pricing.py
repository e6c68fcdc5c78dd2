"""The price book: parsing and validation, model lookup by alias and prefix, integer costs,
the unknown-model rule, the cost stored with each event, and reloading without a restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.collector.accounts_api import grant
from tests.conftest import make_settings, run_collector_app
from tests.factories import usage_event
from token_meter_collector.ingest.events import UsageData
from token_meter_collector.ingest.fresh import FreshUsage, Pricing
from token_meter_collector.keys import INGEST, PRICING
from token_meter_collector.observability import Metrics
from token_meter_collector.pricing.book import (
    PriceBookError,
    default_price_book,
    load_price_book,
    loads_price_book,
)
from token_meter_collector.pricing.source import PriceBookSource

BOOK = """
version = "test-1"
currency = "usd"
unknown_model = "flag"

[default]
input = 1
output = 2

[models."gpt-4o"]
input = 2.50
cached_input = 1.25
output = 10.00

[models."gpt-4o-mini"]
input = 0.15
cached_input = 0.075
output = 0.60

[models."claude-sonnet-4"]
input = 3
cached_input = 0.30
cache_write = 3.75
output = 15
reasoning = 20
aliases = ["sonnet"]
"""


def usage(**fields: Any) -> UsageData:
    data: dict[str, Any] = {"model": "gpt-4o", "input_tokens": 0, "output_tokens": 0}
    data.update(fields)
    data["total_tokens"] = data["input_tokens"] + data["output_tokens"]
    return UsageData(**data)


def test_prices_become_integer_nano_units_per_token() -> None:
    book = loads_price_book(BOOK, "test", "toml")
    price = book.resolve("gpt-4o-mini")
    assert price is not None
    assert (price.input, price.cached_input, price.cache_write, price.output, price.reasoning) == (
        150,
        75,
        150,  # cache writes default to the input price
        600,
        600,  # reasoning defaults to the output price
    )
    assert book.currency == "USD"


def test_each_kind_of_token_is_priced_once_at_its_own_price() -> None:
    book = loads_price_book(BOOK, "test", "toml")
    data = usage(
        model="claude-sonnet-4-20250514",
        input_tokens=1000,
        cached_input_tokens=600,
        cache_write_input_tokens=100,
        output_tokens=500,
        reasoning_tokens=200,
    )
    assert book.cost_nanos(data) == (
        300 * 3000 + 600 * 300 + 100 * 3750 + 300 * 15000 + 200 * 20000
    )


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("gpt-4o", "gpt-4o"),
        ("GPT-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openai/gpt-4o-mini", "gpt-4o-mini"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("sonnet", "claude-sonnet-4"),
        ("sonnet-latest", "claude-sonnet-4"),
        ("gpt-4oo", None),
        ("gpt-4", None),
        ("", None),
        (None, None),
    ],
)
def test_models_are_found_by_name_alias_and_prefix(name: str | None, model: str | None) -> None:
    book = loads_price_book(BOOK, "test", "toml")
    found = book.resolve(name)
    assert (found.model if found else None) == model


def test_unknown_models_are_flagged_or_charged_the_default() -> None:
    flagged = loads_price_book(BOOK, "test", "toml")
    assert flagged.cost_nanos(usage(model="llama-3", input_tokens=10, output_tokens=1)) is None
    assert flagged.cost_nanos(usage(model=None, input_tokens=10, output_tokens=1)) is None
    assert flagged.cost_nanos(usage(model="llama-3")) == 0  # nothing used, nothing to price
    charged = loads_price_book(
        BOOK.replace('unknown_model = "flag"', 'unknown_model = "default"'), "t", "toml"
    )
    assert charged.cost_nanos(usage(model="llama-3", input_tokens=10, output_tokens=1)) == (
        10 * 1000 + 1 * 2000
    )


def test_json_books_are_read_too(tmp_path: Path) -> None:
    path = tmp_path / "book.json"
    path.write_text(
        json.dumps(
            {
                "version": "j1",
                "models": {"m": {"input": "0.001", "output": 0.5, "aliases": ["mm"]}},
            }
        )
    )
    book = load_price_book(path)
    price = book.resolve("mm")
    assert price is not None
    assert (price.input, price.output) == (1, 500)  # $0.001 per million: 1 nano-unit a token
    path.write_text(json.dumps({"version": "j1", "models": {"m": {"input": 1e-4, "output": 1}}}))
    with pytest.raises(PriceBookError, match="whole number of nano-units"):
        load_price_book(path)  # finer than a nano-unit per token is refused


def test_every_problem_of_a_bad_book_is_reported_at_once() -> None:
    bad = """
    currency = ""
    unknown_model = "guess"
    colour = "blue"
    [models.a]
    input = -1
    [models.b]
    input = 1
    output = "cheap"
    extra = 1
    [models.c]
    input = 1
    output = 1
    aliases = ["a"]
    """
    with pytest.raises(PriceBookError) as caught:
        loads_price_book(bad, "bad", "toml")
    text = "\n".join(caught.value.problems)
    for expected in (
        "unknown key 'colour'",
        "version must be",
        "currency must be",
        "unknown_model must be",
        "models.a.input must be between",
        "models.a.output is required",
        "models.b: unknown key 'extra'",
        "models.b.output: 'cheap' is not a number",
        "'a' names both",
    ):
        assert expected in text, expected
    with pytest.raises(PriceBookError, match="not valid TOML"):
        loads_price_book("version = ", "bad", "toml")
    with pytest.raises(PriceBookError, match="needs a \\[default\\]"):
        loads_price_book(
            'version = "x"\nunknown_model = "default"\n[models.m]\ninput = 1\noutput = 1',
            "bad",
            "toml",
        )


def test_the_built_in_book_has_the_published_prices_and_a_date() -> None:
    book = default_price_book()
    assert book.checked and book.version.endswith(book.checked)
    expected = {
        # model: (input, cached input, output) in US dollars per million tokens
        "gpt-4o-2024-08-06": ("2.50", "1.25", "10"),
        "gpt-4o-mini": ("0.15", "0.075", "0.60"),
        "gpt-4.1": ("2", "0.50", "8"),
        "gpt-4.1-mini-2025-04-14": ("0.40", "0.10", "1.60"),
        "gpt-4.1-nano": ("0.10", "0.025", "0.40"),
        "o1": ("15", "7.50", "60"),
        "o3": ("2", "0.50", "8"),
        "o3-mini": ("1.10", "0.55", "4.40"),
        "o4-mini-2025-04-16": ("1.10", "0.275", "4.40"),
        "claude-opus-4-1-20250805": ("15", "1.50", "75"),
        "claude-opus-4-5-20251101": ("5", "0.50", "25"),
        "claude-sonnet-4-20250514": ("3", "0.30", "15"),
        "claude-3-7-sonnet-20250219": ("3", "0.30", "15"),
        "claude-3-5-haiku-20241022": ("0.80", "0.08", "4"),
        "claude-haiku-4-5": ("1", "0.10", "5"),
    }
    for model, prices in expected.items():
        price = book.resolve(model)
        assert price is not None, model
        nanos = tuple(int(Decimal(p) * 1000) for p in prices)
        assert (price.input, price.cached_input, price.output) == nanos, model
        assert price.reasoning == price.output
    sonnet = book.resolve("claude-sonnet-4")
    assert sonnet is not None and sonnet.cache_write == 3750


async def test_each_event_is_stored_with_its_cost_and_the_book_version(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(BOOK)
    settings = make_settings(database_url, tmp_path, TOKEN_METER_PRICE_BOOK=str(path))
    async with run_collector_app(settings) as collector:
        await collector.post_events(
            [
                usage_event("a", model="gpt-4o-2024-08-06", input_tokens=1000, output_tokens=10),
                usage_event("b", model="mystery-1", input_tokens=5, output_tokens=5),
                usage_event("c", model="mystery-1", input_tokens=5, output_tokens=5),
            ]
        )
        rows = await db.fetch(
            "SELECT id, cost_nanos, price_book_version FROM usage_events ORDER BY id"
        )
        assert [tuple(r) for r in rows] == [
            ("a", 1000 * 2500 + 10 * 10000, "test-1"),
            ("b", None, "test-1"),
            ("c", None, "test-1"),
        ]
        _, body, _ = await collector.get("/metrics")
        text = body.decode()
        assert "token_meter_unpriced_events_total 2.0" in text
        assert 'token_meter_price_book_info{currency="USD",version="test-1"} 1.0' in text


async def test_a_changed_book_is_used_without_a_restart_and_a_bad_one_is_refused(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(BOOK)
    settings = make_settings(database_url, tmp_path, TOKEN_METER_PRICE_BOOK=str(path))
    async with run_collector_app(settings) as collector:
        assert collector.app is not None
        source = collector.app[PRICING]
        path.write_text(BOOK.replace("test-1", "test-2").replace("input = 2.50", "input = 5"))
        assert source.reload() is True
        await collector.post_events([usage_event("a", input_tokens=10, output_tokens=0)])
        path.write_text(BOOK.replace("test-1", "test-3").replace("output = 10.00", "output = x"))
        assert source.reload() is False  # logged and counted; the book in use stays
        await collector.post_events([usage_event("b", input_tokens=10, output_tokens=0)])
        rows = await db.fetch(
            "SELECT id, cost_nanos, price_book_version FROM usage_events ORDER BY id"
        )
        assert [tuple(r) for r in rows] == [("a", 50_000, "test-2"), ("b", 50_000, "test-2")]
        _, body, _ = await collector.get("/metrics")
        assert 'token_meter_price_book_reloads_total{outcome="failed"} 1.0' in body.decode()


class ReloadBeforeTheBurn:
    """A listener that runs between pricing and burning (it is told of the fresh usage before
    accounts is) and reloads a changed price book there, as SIGHUP or the file watcher can
    while the transaction waits on the database."""

    def __init__(self, source: PriceBookSource, path: Path) -> None:
        self.source = source
        self.path = path

    async def on_fresh_usage(
        self, conn: asyncpg.Connection, fresh: Sequence[FreshUsage], book: Pricing | None
    ) -> None:
        self.path.write_text(BOOK.replace("test-1", "test-2").replace("input = 2.50", "input = 5"))
        assert self.source.reload() is True


async def test_a_reload_mid_transaction_never_labels_a_burn_with_a_book_that_did_not_price_it(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(BOOK)
    settings = make_settings(database_url, tmp_path, TOKEN_METER_PRICE_BOOK=str(path))
    async with run_collector_app(settings) as collector:
        assert collector.app is not None
        await grant(collector, "pat", 1_000_000, "k")
        ingest = collector.app[INGEST]
        ingest.listeners.insert(0, ReloadBeforeTheBurn(collector.app[PRICING], path))
        await collector.post_events([usage_event("a", "pat", input_tokens=10, output_tokens=0)])
        event = await db.fetchrow("SELECT cost_nanos, price_book_version FROM usage_events")
        burn = await db.fetchrow(
            "SELECT amount_nanos, price_book_version FROM credit_ledger WHERE kind = 'burn'"
        )
        assert tuple(event) == (25_000, "test-1")
        assert tuple(burn) == (-25_000, "test-1")  # the book that priced it, not the one loaded
        assert collector.app[PRICING].current().version == "test-2"


async def test_the_watcher_notices_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(BOOK)
    source = PriceBookSource(path, Metrics(), check_interval=0.01)
    await source.start()
    try:
        path.write_text(BOOK.replace("test-1", "test-watched"))
        for _ in range(1000):
            if source.current().version == "test-watched":
                break
            await asyncio.sleep(0.01)
        assert source.current().version == "test-watched"
    finally:
        await source.stop()


def test_a_bad_book_at_start_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text("version = 1")
    with pytest.raises(PriceBookError):
        PriceBookSource(path, Metrics())


@pytest.mark.slow
async def test_sighup_reloads_the_book_of_a_running_collector(
    collector_process_factory: Any, database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(BOOK)
    ingest, admin = "i" * 32, "a" * 32
    proc = collector_process_factory(
        database_url,
        TOKEN_METER_INGEST_TOKEN=ingest,
        TOKEN_METER_ADMIN_TOKEN=admin,
        TOKEN_METER_PRICE_BOOK=str(path),
    )
    proc.start()
    # Same size and a restored mtime: only the signal can tell the collector to look again.
    stat = path.stat()
    path.write_text(BOOK.replace("test-1", "test-9"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert proc.process is not None
    proc.process.send_signal(signal.SIGHUP)
    async with aiohttp.ClientSession() as session:
        for attempt in range(200):
            async with session.post(
                f"{proc.base_url}/v1/events",
                data=json.dumps([usage_event(f"h{attempt}")]),
                headers={"Authorization": f"Bearer {ingest}", "Content-Type": "application/json"},
            ) as r:
                assert r.status == 200
            version = await db.fetchval(
                "SELECT price_book_version FROM usage_events WHERE id = $1", f"h{attempt}"
            )
            if version == "test-9":
                break
            await asyncio.sleep(0.05)
    assert version == "test-9"
    assert proc.process.poll() is None  # SIGHUP reloads; it does not stop the collector
    assert proc.stop() == 0  # before the test's database is dropped
