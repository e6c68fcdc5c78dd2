"""Faults while traffic flows: each test runs the real plugin server through the Kong harness,
with a few threads sending requests the whole time (tests/harness/traffic.py), the real
collector process on real PostgreSQL, and, where billing is on, the Stripe fake. Something
breaks in the middle, is repaired, and then every request the plugin saw must be counted
exactly once:

- in PostgreSQL: one row per request, found by its unique input_tokens value, and per-consumer
  token sums equal to what the harness sent;
- by the plugin's own counters (its `shipper_closed` line when the server stops: the counters of
  its `plugin_stats` line): enqueued == sent == requests, lost == 0, nothing left in the journal;
- in the Stripe fake, when billing is on: each customer's meter totals equal PostgreSQL's.

Each test prints one `fault_figures {...}` line (shown with -s) and appends it to
`fault-figures.jsonl` in pytest's temporary root: faults injected, requests sent, events
counted. Select them with `pytest -m faults`. The plugin server killed and respawned is tested
elsewhere (its supervisor has its own tests)."""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from bench.stack import with_database
from tests.conftest import CollectorProcess, recreate_database
from tests.e2e.conftest import ADMIN_TOKEN, INGEST_TOKEN, Stack
from tests.harness.fault_proxy import FaultProxy, Mode
from tests.harness.kong import HarnessFactory, KongHarness
from tests.harness.postgres import RestartablePostgres
from tests.harness.stripe import FakeStripe, RateLimits
from tests.harness.traffic import Traffic, plugin_counters
from token_meter_plugin.delivery.outbox import MAX_HELD_EVENTS

pytestmark = pytest.mark.faults

# ann is mapped to a Stripe customer by her Kong custom_id, ben through the admin API (in the
# billing test), cy never.
CONSUMERS = {"ann": "cus_ann", "ben": None, "cy": None}
# Retries within half a second once a fault is over; a request to the collector given up after
# 2 s (the blackhole's timeout path) instead of the default 10.
TUNING = {"max_retry_delay": 0.5, "timeout": 2}
SETTLE_TIMEOUT = 60.0

Record = Callable[..., None]


def wait(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if result := check():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


@pytest.fixture
def figures(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Record:
    """`figures(**fields)`: one line for the reliability document, printed and kept."""
    path = tmp_path_factory.getbasetemp() / "fault-figures.jsonl"

    def record(**fields: Any) -> None:
        line = json.dumps({"test": request.node.name, **fields}, sort_keys=True)
        print(f"fault_figures {line}")
        with path.open("a") as out:
            out.write(line + "\n")

    return record


def stored_by_consumer(stack: Stack) -> dict[str, collections.Counter[int]]:
    rows = stack.query(
        "SELECT consumer, input_tokens, count(*) AS n FROM usage_events"
        " GROUP BY consumer, input_tokens"
    )
    stored: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for row in rows:
        stored[row["consumer"]][row["input_tokens"]] = row["n"]
    return dict(stored)


def settle(
    stack: Stack, harness: KongHarness, traffic: Traffic, *, lost: int = 0
) -> dict[str, int]:
    """After the fault, with the traffic stopped: PostgreSQL holds the `sent - lost` requests
    once each; the plugin server is stopped (SIGTERM, as Kong does) and its counters returned."""
    assert not traffic.failures, traffic.failures[:5]
    sent = traffic.sent
    assert stack.wait_for_events(sent - lost, timeout=SETTLE_TIMEOUT) == sent - lost
    assert harness.stop() == 0, harness.log_text()[-3000:]
    counters = plugin_counters(harness.log_text())
    # After the plugin stopped: nothing in flight could still add a row.
    (row,) = stack.query(
        "SELECT count(*) AS n, count(DISTINCT (source, id)) AS ids FROM usage_events"
    )
    assert (row["n"], row["ids"]) == (sent - lost, sent - lost)
    assert counters["enqueued"] == sent  # one event per request the plugin saw
    assert counters["lost"] == lost
    assert counters["sent"] == sent - lost  # each settled by the collector once
    assert counters["accepted"] + counters["duplicates"] == sent - lost
    assert counters["rejected"] == 0
    assert counters["journal_events"] == counters["in_flight"] == 0
    return counters


def check_exactly_once(stack: Stack, traffic: Traffic) -> dict[str, tuple[int, int, int]]:
    """Every request sent is in PostgreSQL once, by its own input_tokens value; the per-consumer
    sums follow. Returns the sums: consumer -> (events, input tokens, output tokens)."""
    assert stored_by_consumer(stack) == {c: v for c, v in traffic.expected().items() if v}
    rows = stack.query(
        "SELECT consumer, count(*) AS n, sum(input_tokens) AS i, sum(output_tokens) AS o"
        " FROM usage_events GROUP BY consumer"
    )
    sums = {r["consumer"]: (r["n"], r["i"], r["o"]) for r in rows}
    assert sums == {c: t for c, t in traffic.totals().items() if t[0]}
    return sums


def http_statuses(collector: CollectorProcess, path: str) -> collections.Counter[int]:
    """How the collector answered `path`, from its JSON log (every start of the process)."""
    statuses: collections.Counter[int] = collections.Counter()
    for line in collector.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "http_request" and entry.get("path") == path:
            statuses[int(entry["status"])] += 1
    return statuses


# -- 1. the collector SIGKILLed during ingest ---------------------------------------------------

KILLS = 3


def test_collector_sigkilled_during_ingest_then_restarted(
    make_harness: HarnessFactory, stack: Stack, figures: Record
) -> None:
    """The collector is SIGKILLed KILLS times while batches arrive (rows still being added), left
    dead while requests go on, and started again. Batches it was ingesting when it died are
    re-sent by the plugin: committed ones come back as duplicates, the others as new."""
    harness = make_harness("token-meter-plugin")
    config = stack.plugin_config(**TUNING)
    during: list[int] = []
    with Traffic(harness, config, CONSUMERS) as traffic:
        for _ in range(KILLS):
            traffic.wait_for_more(60)
            before = stack.stored_events()
            wait(lambda before=before: stack.stored_events() > before, 30, "ingest going on")
            assert stack.collector.stop(signal.SIGKILL) == -signal.SIGKILL
            during.append(traffic.wait_for_more(60))
            stack.collector.start()
        traffic.wait_for_more(60)
    counters = settle(stack, harness, traffic)
    sums = check_exactly_once(stack, traffic)
    assert counters["retries"] > 0  # the plugin did meet the dead collector
    figures(
        fault="collector SIGKILL",
        faults_injected=KILLS,
        requests_sent=traffic.sent,
        requests_while_down=during,
        events_in_postgres=sum(n for n, _, _ in sums.values()),
        plugin=counters,
    )


# -- 2. PostgreSQL stopped and started again ----------------------------------------------------


@pytest.fixture
def own_postgres() -> Iterator[RestartablePostgres]:
    """A PostgreSQL server of this test's own, which it may stop (the session's is shared)."""
    if os.environ.get("TEST_DATABASE_URL"):
        pytest.skip(
            "TEST_DATABASE_URL names an external server: this test stops and starts its own"
            " embedded one, which it cannot do with the server the run is configured for"
        )
    root = Path(tempfile.mkdtemp(prefix="tm-faults-pg-"))  # short: the socket lives in pgdata
    server = RestartablePostgres.start(root / "pgdata")
    try:
        yield server
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)


def test_postgres_stopped_and_restarted_during_ingest(
    make_harness: HarnessFactory,
    collector_process_factory: Callable[..., CollectorProcess],
    own_postgres: RestartablePostgres,
    tmp_path: Path,
    figures: Record,
) -> None:
    """PostgreSQL goes away twice while batches arrive: a fast shutdown (sessions cut,
    transactions rolled back), then an immediate one (a crash: recovery from the WAL at start).
    The collector process stays up and refuses what it cannot store (its /readyz says 503, and so
    do its answers to the plugin), the plugin keeps the events and retries, and once PostgreSQL
    is back every event is stored once."""
    database_url = asyncio.run(recreate_database(own_postgres.url(), "token_meter_faults"))
    assert database_url == with_database(own_postgres.url(), "token_meter_faults")
    collector = collector_process_factory(
        database_url,
        TOKEN_METER_INGEST_TOKEN=INGEST_TOKEN,
        TOKEN_METER_ADMIN_TOKEN=ADMIN_TOKEN,
        TOKEN_METER_LOG_LEVEL="info",
    )
    collector.start()
    stack = Stack(collector, database_url, tmp_path / "spool")
    harness = make_harness("token-meter-plugin")
    config = stack.plugin_config(**TUNING)
    during: list[int] = []
    outages = ("fast", "immediate")
    with Traffic(harness, config, CONSUMERS) as traffic:
        for mode in outages:
            traffic.wait_for_more(60)
            before = stack.stored_events()
            wait(lambda before=before: stack.stored_events() > before, 30, "ingest going on")
            own_postgres.stop_server(mode)
            wait(lambda: stack.api("GET", "/readyz")[0] == 503, 30, "the collector not ready")
            during.append(traffic.wait_for_more(80))
            assert collector.process is not None and collector.process.poll() is None
            own_postgres.start_server()
            wait(lambda: stack.api("GET", "/readyz")[0] == 200, 30, "the collector ready again")
        traffic.wait_for_more(60)
    counters = settle(stack, harness, traffic)
    sums = check_exactly_once(stack, traffic)
    statuses = http_statuses(collector, "/v1/events")
    refused = {status: n for status, n in statuses.items() if status >= 400}
    assert refused, f"the collector never refused a batch: {statuses}"
    assert set(refused) == {503}, statuses  # unavailable, not an internal error
    assert counters["retries"] >= sum(refused.values())
    figures(
        fault="PostgreSQL stopped",
        faults_injected=len(outages),
        stop_modes=list(outages),
        requests_sent=traffic.sent,
        requests_while_down=during,
        collector_answers=dict(statuses),
        events_in_postgres=sum(n for n, _, _ in sums.values()),
        plugin=counters,
    )
    assert collector.stop() == 0, collector.log()[-3000:]


# -- 3. the collector unreachable -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["refuse", "blackhole", "lose_answers"])
def test_collector_unreachable_for_a_while(
    make_harness: HarnessFactory, stack: Stack, figures: Record, mode: Mode
) -> None:
    """The plugin reaches the collector through a proxy that, for a while, `refuse`s (its port
    closed: connection refused), is a `blackhole` (accepts, never answers: the plugin's timeout
    path) or `lose_answers` (the collector stores each batch, the plugin never hears: its
    timeout path, then duplicates on the retry). Blocklist polls go the same way."""
    with FaultProxy(stack.collector.port) as proxy:
        harness = make_harness("token-meter-plugin")
        config = stack.plugin_config(collector_url=proxy.url, **TUNING)
        with Traffic(harness, config, CONSUMERS) as traffic:
            traffic.wait_for_more(60)
            wait(stack.stored_events, 30, "first events stored")
            proxy.set_mode(mode)
            during = traffic.wait_for_more(120)
            stored_during = stack.stored_events()
            proxy.set_mode("forward")
            traffic.wait_for_more(60)
        counters = settle(stack, harness, traffic)
    sums = check_exactly_once(stack, traffic)
    assert counters["retries"] > 0
    if mode == "lose_answers":
        assert counters["duplicates"] > 0  # stored while unanswered, then re-sent
    figures(
        fault=f"collector unreachable ({mode})",
        faults_injected=1,
        requests_sent=traffic.sent,
        requests_while_unreachable=during,
        events_in_postgres_at_recovery=stored_during,
        proxy_connections=proxy.accepted,
        proxy_bytes_discarded=proxy.discarded,
        events_in_postgres=sum(n for n, _, _ in sums.values()),
        plugin=counters,
    )


# -- 4. the spool's disk full ---------------------------------------------------------------------


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    """The plugin's spool directory on a tmpfs of its own (4 MiB), which the test can fill."""
    spool = tmp_path / "spool"
    spool.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the spool takes root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(spool)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem of `directory` until it refuses a byte; the filler file."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def test_spool_disk_full(
    make_harness: HarnessFactory, stack: Stack, small_spool: Path, figures: Record
) -> None:
    """The spool's filesystem is filled (ENOSPC) while requests flow, then freed.

    What happens: the request path goes on (every request answered, both phases returning);
    each event whose journal write fails with ENOSPC is held in the plugin server's memory
    (`spool_unwritable_holding_in_memory` logged at warning level with the error) and journaled,
    in order, once the disk takes writes again (`spool_writable_again`), then delivered as any
    other. Nothing is lost: every request sent is in PostgreSQL once, and the plugin's counters
    agree (`lost` 0, `held_total` the events that met the full disk). The window stays far
    within the hold's bound (MAX_HELD_EVENTS), past which events would be lost: that bound is
    counted exactly by the unit tests (tests/unit/test_delivery_hold.py)."""
    harness = make_harness("token-meter-plugin")
    # Segments sealed at 128 KiB (an eighth of spool_max_bytes), so acknowledged ones are deleted
    # and the journal itself stays far from the tmpfs's size.
    config = stack.plugin_config(spool_max_bytes=1024 * 1024, **TUNING)
    assert Path(config["spool_dir"]) == small_spool
    with Traffic(harness, config, CONSUMERS) as traffic:
        traffic.wait_for_more(60)
        wait(stack.stored_events, 30, "first events stored")
        sent_before = traffic.sent
        filler = fill(small_spool)
        traffic.wait_for_more(120)
        filler.unlink()
        window = traffic.issued - sent_before  # requests that may have met the full disk
        assert window < MAX_HELD_EVENTS  # counted in requests, not time: within the bound
        traffic.wait_for_more(60)
    counters = settle(stack, harness, traffic)
    sums = check_exactly_once(stack, traffic)
    held = counters["held_total"]
    assert 0 < held <= window  # the full disk did refuse events, only of its window
    assert counters["held_events"] == counters["held_bytes"] == 0
    log_text = harness.log_text()
    assert "spool_unwritable_holding_in_memory" in log_text
    assert "No space left on device" in log_text  # the error logged is ENOSPC
    assert "spool_writable_again" in log_text
    assert "events_lost" not in log_text
    figures(
        fault="spool disk full (ENOSPC)",
        faults_injected=1,
        requests_sent=traffic.sent,
        requests_in_full_window=window,
        events_lost=counters["lost"],
        events_held=held,
        events_in_postgres=sum(n for n, _, _ in sums.values()),
        plugin=counters,
    )


# -- 5. Stripe failing while usage flows ----------------------------------------------------------

INPUT = "token_meter_input_tokens"
OUTPUT = "token_meter_output_tokens"
# Each phase: a sustained Stripe fault (every call meets it) until the collector has retried
# meter events under it a few times. Single faults, a random mix and a collector SIGKILLed in a
# sync are test_billing_end_to_end.py's; these are outages, with traffic flowing meanwhile.
STRIPE_PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("500s", ("error", "error_after_work")),
    ("429s", ("rate_limit",)),
    ("connection drops", ("drop", "drop_before_work")),
    ("timeouts", ("timeout", "timeout_before_work")),
    ("connection refused", ()),  # the proxy's port closed
    ("blackhole", ()),  # the proxy accepts and never answers
)
RETRIES_PER_PHASE = 3


def stripe_retries(collector: CollectorProcess) -> list[str]:
    """The code of each meter-event call the collector will retry, from its JSON log."""
    codes = []
    for line in collector.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "stripe_meter_event_retry":
            codes.append(str(entry.get("code")))
    return codes


@pytest.mark.parametrize("transport", ["meter_events", "meter_event_stream"])
def test_stripe_outages_while_usage_flows(
    make_harness: HarnessFactory,
    collector_process_factory: Callable[..., CollectorProcess],
    database_url: str,
    tmp_path: Path,
    figures: Record,
    transport: str,
) -> None:
    """Stripe, behind a proxy, fails every call for a while, one way after another: 500s
    (before and after doing the work), 429s, connections dropped (before and after the work),
    answers later than the collector's 1 s timeout, connection refused, and a blackhole. Usage
    keeps flowing through the plugin into PostgreSQL the whole time. Afterwards each customer's
    Stripe meter totals equal PostgreSQL's, each meter event identifier was taken once, and a
    consumer without a Stripe customer is held, not sent."""
    with FakeStripe(limits=RateLimits.test_mode()) as fake:
        for name in (INPUT, OUTPUT):
            fake.create_meter(name)
        fake.add_customer("cus_ann")  # her Kong custom_id
        fake.add_customer("cus_ben")  # mapped through the admin API
        with FaultProxy(int(fake.url.rsplit(":", 1)[1])) as proxy:
            collector = collector_process_factory(
                database_url,
                TOKEN_METER_INGEST_TOKEN=INGEST_TOKEN,
                TOKEN_METER_ADMIN_TOKEN=ADMIN_TOKEN,
                TOKEN_METER_LOG_LEVEL="info",
                STRIPE_API_KEY=fake.api_key,
                STRIPE_API_BASE=proxy.url,
                TOKEN_METER_STRIPE_SYNC_INTERVAL="0.3",
                TOKEN_METER_STRIPE_TIMEOUT="1",
                TOKEN_METER_STRIPE_TRANSPORT=transport,
            )
            collector.start()
            stack = Stack(collector, database_url, tmp_path / "spool")
            status, _ = stack.api("PUT", "/v1/consumers/ben", {"stripe_customer_id": "cus_ben"})
            assert status == 201
            harness = make_harness("token-meter-plugin")
            config = stack.plugin_config(**TUNING)
            phases: dict[str, dict[str, Any]] = {}
            with Traffic(harness, config, CONSUMERS) as traffic:
                traffic.wait_for_more(60)
                wait(lambda: fake.total("cus_ann", INPUT) > 0, 30, "usage reaching Stripe")
                for name, kinds in STRIPE_PHASES:
                    retried, sent = len(stripe_retries(collector)), traffic.sent
                    if kinds:
                        fake.faults.random(rate=1.0, kinds=kinds, timeout_seconds=2)
                    else:
                        proxy.set_mode("refuse" if name == "connection refused" else "blackhole")
                    wait(
                        lambda r=retried: len(stripe_retries(collector)) >= r + RETRIES_PER_PHASE,
                        60,
                        f"meter events retried under {name}",
                    )
                    fake.faults.clear()
                    proxy.set_mode("forward")
                    codes = collections.Counter(stripe_retries(collector)[retried:])
                    phases[name] = {"requests": traffic.sent - sent, "retry_codes": dict(codes)}
                    traffic.wait_for_more(30)  # and Stripe answering again, for a moment
                traffic.wait_for_more(60)
            counters = settle(stack, harness, traffic)
            sums = check_exactly_once(stack, traffic)

            expected = {
                "cus_ann": {INPUT: Decimal(sums["ann"][1]), OUTPUT: Decimal(sums["ann"][2])},
                "cus_ben": {INPUT: Decimal(sums["ben"][1]), OUTPUT: Decimal(sums["ben"][2])},
            }

            def agree() -> bool:
                return all(
                    {name: fake.total(customer, name) for name in (INPUT, OUTPUT)} == totals
                    for customer, totals in expected.items()
                )

            wait(agree, 90, "Stripe totals equal to PostgreSQL's")

            still_pending: list[str] = []

            def pending_rows_all_at_stripe() -> bool:
                """Whether Stripe took every sendable row still pending (kept: their ids)."""
                rows = stack.query(
                    "SELECT identifier FROM stripe_outbox"
                    " WHERE state = 'pending' AND sendable_at IS NOT NULL"
                )
                taken = {e.identifier for e in fake.accepted_events()}
                still_pending[:] = [r["identifier"] for r in rows]
                return all(identifier in taken for identifier in still_pending)

            # Rows still pending once the totals agree are rows Stripe took while the collector
            # heard an error (a 500, a dropped connection or a timeout after the work), waiting
            # out their backoff (up to minutes after a phase's repeated failures). Their
            # identifier is already taken at Stripe: the retry, under a new idempotency key,
            # is refused as a duplicate and delivers them; it cannot count them twice.
            wait(pending_rows_all_at_stripe, 60, "every row still pending already at Stripe")
            cycle = stack.api("GET", "/v1/stripe/status")[1]["last_cycle_at"]
            wait(
                lambda: stack.api("GET", "/v1/stripe/status")[1]["last_cycle_at"] != cycle,
                30,
                "one more sync cycle",
            )
            assert agree()
            status, body = stack.api("GET", "/v1/stripe/status")
            assert {"consumer": "cy", "reason": "no_stripe_customer"} in body["held"]
            identifiers = [e.identifier for e in fake.accepted_events()]
            assert len(identifiers) == len(set(identifiers))
            injected = collections.Counter(fault.label for _, fault in fake.faults.injected)
            figures(
                fault=f"Stripe outages ({transport})",
                faults_injected=len(fake.faults.injected) + 2,
                injected_by_kind=dict(injected),
                phases=phases,
                requests_sent=traffic.sent,
                events_in_postgres=sum(n for n, _, _ in sums.values()),
                stripe_meter_events_accepted=len(identifiers),
                stripe_calls=fake.call_count(),
                rows_pending_but_at_stripe=len(still_pending),
                replayed_500s=sum(
                    1 for r in fake.requests if r.replayed and (r.status or 0) >= 500
                ),
                stripe_totals={c: {m: str(v) for m, v in t.items()} for c, t in expected.items()},
                plugin=counters,
            )
            assert collector.stop() == 0, collector.log()[-3000:]
