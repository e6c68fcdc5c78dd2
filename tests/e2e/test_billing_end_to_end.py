"""Gateway to invoice: requests through the plugin server as Kong runs it, the real collector
process, and the Stripe fake injecting faults; the collector is SIGKILLed in the middle of a
sync and started again. Stripe ends up with exactly the usage PostgreSQL holds, per customer
and meter, each delta sent once."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CollectorProcess
from tests.e2e.conftest import ADMIN_TOKEN, INGEST_TOKEN, Stack
from tests.harness.kong import HarnessFactory, ScriptedRequest
from tests.harness.stripe import (
    CREATE_METER_EVENT,
    CREATE_METER_EVENT_STREAM,
    FakeStripe,
    RateLimits,
)

INPUT = "token_meter_input_tokens"
OUTPUT = "token_meter_output_tokens"
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "providers"


def wait(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def chat_request(consumer: str, custom_id: str | None, n: int) -> ScriptedRequest:
    expected = json.loads((FIXTURE / "openai_chat.expected.json").read_text())
    return ScriptedRequest(
        headers={"content-type": "text/plain"},
        body=b"hello",
        consumer={"id": f"id-{consumer}", "username": consumer, "custom_id": custom_id},
        upstream_headers={"content-type": expected["content_type"]},
        upstream_body=(FIXTURE / expected["body"]).read_bytes(),
        request_id=f"{consumer}-{n}",
    )


@pytest.mark.parametrize(
    ("transport", "route"),
    [("meter_events", CREATE_METER_EVENT), ("meter_event_stream", CREATE_METER_EVENT_STREAM)],
)
def test_usage_reaches_stripe_exactly_once_through_faults_and_a_killed_collector(
    make_harness: HarnessFactory,
    collector_process_factory: Callable[..., CollectorProcess],
    database_url: str,
    tmp_path: Path,
    transport: str,
    route: str,
) -> None:
    """`route`: where the transport sends meter events, and so where the faults strike."""
    with FakeStripe(limits=RateLimits.test_mode(), latency={route: 0.05}) as fake:
        for name in (INPUT, OUTPUT):
            fake.create_meter(name)
        fake.add_customer("cus_ann")  # mapped by her Kong custom_id
        fake.add_customer("cus_ben")  # mapped through the admin API
        env = {
            "TOKEN_METER_INGEST_TOKEN": INGEST_TOKEN,
            "TOKEN_METER_ADMIN_TOKEN": ADMIN_TOKEN,
            "STRIPE_API_KEY": fake.api_key,
            "STRIPE_API_BASE": fake.url,
            "TOKEN_METER_STRIPE_SYNC_INTERVAL": "0.3",
            "TOKEN_METER_STRIPE_TIMEOUT": "1",
            "TOKEN_METER_STRIPE_TRANSPORT": transport,
        }
        collector = collector_process_factory(database_url, **env)
        collector.start()
        stack = Stack(collector, database_url, tmp_path / "spool")
        assert stack.api("PUT", "/v1/consumers/ben", {"stripe_customer_id": "cus_ben"})[0] == 201
        harness = make_harness("token-meter-plugin")
        config = stack.plugin_config(max_retry_delay=1)
        # Each kind of fault at least once on meter events, then random ones on every call.
        fake.faults.drop_after_work_next(1, route=route)
        fake.faults.fail_next(1, 500, route=route)
        fake.faults.rate_limit_next(1, route=route)
        fake.faults.timeout_next(1, seconds=2, after_work=True, route=route)
        fake.faults.drop_next(1, after_work=False, route=route)
        fake.faults.random(rate=0.25, seed=11, timeout_seconds=2)
        sent = 0
        for round_ in range(6):
            for consumer, custom_id in (("ann", "cus_ann"), ("ben", None), ("cy", None)):
                for _ in range(5):
                    request = chat_request(consumer, custom_id, sent)
                    assert harness.request(request, config).exit_status is None
                    sent += 1
            time.sleep(0.7)  # each round's usage in a sync cycle of its own
            if round_ == 2:
                # In the middle of a sync: meter events are going out, not all answered.
                before = fake.call_count(route)
                wait(
                    lambda before=before: fake.call_count(route) > before,
                    30,
                    "a sync",
                )
                collector.stop(signal.SIGKILL)
                collector.start()
        assert stack.wait_for_events(sent, timeout=90) == sent
        fake.faults.stop_random()

        def local(consumer: str) -> dict[str, Decimal]:
            (row,) = stack.query(
                "SELECT sum(input_tokens), sum(output_tokens) FROM usage_hourly "
                "WHERE consumer = $1",
                consumer,
            )
            return {INPUT: Decimal(row[0]), OUTPUT: Decimal(row[1])}

        expected = {"cus_ann": local("ann"), "cus_ben": local("ben")}
        assert expected["cus_ann"][INPUT] > 0

        def agree() -> bool:
            return all(
                {name: fake.total(customer, name) for name in (INPUT, OUTPUT)} == totals
                for customer, totals in expected.items()
            )

        wait(agree, 90, "Stripe totals equal to PostgreSQL's")
        time.sleep(1.5)  # a delta sent twice would show now
        assert agree()
        identifiers = [e.identifier for e in fake.accepted_events()]
        assert len(identifiers) == len(set(identifiers))
        kinds = {fault.kind for route_, fault in fake.faults.injected if route_ == route}
        assert {"drop", "error", "timeout"} <= kinds
        status, body = stack.api("GET", "/v1/stripe/status")
        assert status == 200
        assert {"consumer": "cy", "reason": "no_stripe_customer"} in body["held"]
        assert body["held_consumers"] == 1
        # What the workload cost in Stripe calls, for the closing note.
        print(
            f"stripe_calls transport={transport} events={sent}"
            f" meter_events={fake.call_count(route)}"
            f" accepted={len(identifiers)} faults={len(fake.faults.injected)}"
            f" by_route={dict(fake.call_counts())}"
        )
        assert collector.stop() == 0, collector.log()[-3000:]
