"""schemathesis against the collector's Stripe routes with billing on: the collector syncs to
the Stripe fake (tests/harness/stripe) while generated requests, valid and hostile, reach
`GET /v1/stripe/status`, `GET /v1/stripe/reconcile` and `POST /v1/stripe/reconcile/resend`,
which then read the outbox and ask the fake for meter event summaries. The checks are those of
test_collector_api.py: no server error, every status, body and header as documented.

The outbox has rows to compare (usage of a mapped consumer, two hours ago, posted before the
run), so a reconcile whose period takes them in makes Stripe calls, a fifth of which the fake
answers 429 or 500 (seeded). The webhook stays with
tests/billing/test_webhooks.py (nothing generated carries a valid signature). Examples are
fewer than there: each reconcile may call the fake, and the run stays well under a minute.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings

from tests.billing.conftest import INPUT, METERS
from tests.conftest import CollectorProcess
from tests.factories import usage_event
from tests.fuzz.test_collector_api import (
    CHECKS,
    SPEC,
    collector_in_a_process,
    token_for,
)
from tests.harness.stripe import LIST_EVENT_SUMMARIES, FakeStripe, RateLimits

schema = (
    schemathesis.openapi.from_path(SPEC)
    .include(path_regex=r"^/v1/stripe/")
    .exclude(path="/v1/stripe/webhook")
)
schema.config.generation.update(allow_extra_parameters=False, with_security_parameters=False)
CUSTOMER = "cus_fuzz"


def post_usage(api: dict[str, str]) -> None:
    """Usage of a consumer mapped to CUSTOMER by its Kong custom_id, two hours ago."""
    when = (datetime.now(UTC) - timedelta(hours=2)).isoformat().replace("+00:00", "Z")
    events = [
        usage_event(f"fuzz-{i}", "fuzz", time=when, consumer_custom_id=CUSTOMER) for i in range(5)
    ]
    response = requests.post(
        api["url"] + "/v1/events",
        data=json.dumps(events),
        headers={
            "Authorization": f"Bearer {api['ingest']}",
            "Content-Type": "application/cloudevents-batch+json",
        },
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == len(events)


@pytest.fixture
def api(
    database_url: str,
    collector_process_factory: Callable[..., CollectorProcess],
    request: pytest.FixtureRequest,
) -> Iterator[dict[str, str]]:
    with FakeStripe(limits=RateLimits.test_mode()) as fake:
        for name in (pair.split("=")[0] for pair in METERS.split(",")):
            fake.create_meter(name)
        fake.add_customer(CUSTOMER)
        with collector_in_a_process(
            collector_process_factory,
            database_url,
            STRIPE_API_KEY=fake.api_key,
            STRIPE_API_BASE=fake.url,
            TOKEN_METER_STRIPE_METERS=METERS,
            TOKEN_METER_STRIPE_SYNC_INTERVAL="0.2",
            TOKEN_METER_STRIPE_TIMEOUT="2",
        ) as running:
            post_usage(running)
            # Sent before the run, so every reconcile example has delivered rows to compare.
            deadline = time.monotonic() + 30
            while fake.total(CUSTOMER, INPUT) == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert fake.total(CUSTOMER, INPUT) > 0, "the sync sent nothing to the fake"
            summaries = fake.call_count(LIST_EVENT_SUMMARIES)
            # Stripe itself misbehaving too: 429s and 500s on a fifth of the calls from now on
            # (retried by the collector, else answered 502 as documented).
            fake.faults.random(rate=0.2, seed=11, kinds=("rate_limit", "error", "error_after_work"))
            yield running
        if "reconcile" in request.node.name:
            # Not only refusals of hostile parameters: some examples got as far as Stripe.
            assert fake.call_count(LIST_EVENT_SUMMARIES) > summaries


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    # One database, fake and app per operation, shared by its examples.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)
def test_the_stripe_routes_answer_as_the_openapi_document_says(
    case: Any, api: dict[str, str]
) -> None:
    response = case.call(base_url=api["url"], headers=token_for(case, api), timeout=30)
    case.validate_response(response, checks=CHECKS)
