"""The Stripe fake (tests/harness/stripe/) behaves as Stripe does, shown through the real SDK.

Every test drives the fake with `stripe.StripeClient` (stripe-python 16), base addresses pointed
at the fake and `max_network_retries=0` as the product configures it, so what the SDK raises
here is what the product will see: one test per strictness rule, limit and fault. The sources
of each behaviour are cited in the fake's modules.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import stripe

from tests.harness.stripe import (
    CREATE_METER_EVENT,
    CREATE_METER_EVENT_STREAM,
    LIST_METERS,
    FakeStripe,
    RateLimits,
)
from tests.harness.stripe.params import ParamError, parse_pairs

CUSTOMER = "cus_fake_1"
OTHER = "cus_fake_2"
EVENT = "tokens_in"
FakeFactory = Callable[..., FakeStripe]


@pytest.fixture
def make_fake() -> Iterator[FakeFactory]:
    """`make_fake(**options)`: a started fake with CUSTOMER and OTHER; stopped at the end."""
    started: list[FakeStripe] = []

    def make(**options: Any) -> FakeStripe:
        fake = FakeStripe(**options).start()
        started.append(fake)
        fake.add_customer(CUSTOMER, email="one@example.com")
        fake.add_customer(OTHER)
        return fake

    yield make
    for fake in started:
        fake.stop()


@pytest.fixture
def fake(make_fake: FakeFactory) -> FakeStripe:
    return make_fake()


def client(fake: FakeStripe, *, timeout: float = 5.0, **options: Any) -> stripe.StripeClient:
    return fake.sdk_client(http_client=stripe.RequestsClient(timeout=timeout), **options)


def meter_params(event_name: str = EVENT, **extra: Any) -> Any:
    """Any: the SDK's TypedDicts would refuse the deliberately wrong ones."""
    return {
        "display_name": f"{event_name} meter",
        "event_name": event_name,
        "default_aggregation": {"formula": "sum"},
        "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
        "value_settings": {"event_payload_key": "value"},
        **extra,
    }


def event_params(
    value: str = "25",
    *,
    identifier: str = "evt-1",
    customer: str = CUSTOMER,
    timestamp: int | None = None,
    event_name: str = EVENT,
    **extra: Any,
) -> Any:
    return {
        "event_name": event_name,
        "payload": {"stripe_customer_id": customer, "value": value},
        "identifier": identifier,
        "timestamp": int(time.time()) if timestamp is None else timestamp,
        **extra,
    }


def send(sdk: stripe.StripeClient, params: Any, **options: Any) -> Any:
    request_options: Any = options
    return sdk.v1.billing.meter_events.create(params=params, options=request_options)


def invalid(call: Callable[[], Any]) -> stripe.InvalidRequestError:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        call()
    return caught.value


async def close(http: stripe.AIOHTTPClient) -> None:
    await http.close_async()  # type: ignore[no-untyped-call]


def hour_floor(timestamp: float) -> int:
    return int(timestamp) // 3600 * 3600


# --- the form encoding ----------------------------------------------------------------------


def test_bracket_pairs_become_nested_dicts_and_indexed_lists() -> None:
    """The SDK's `a[b]=x` and `a[0]=x` keys nest; a key that is both a value and a hash is
    refused with its bracketed name."""
    assert parse_pairs(
        [("payload[value]", "1"), ("payload[stripe_customer_id]", "c"), ("expand[0]", "x")]
    ) == {"payload": {"value": "1", "stripe_customer_id": "c"}, "expand": ["x"]}
    assert parse_pairs([("a[]", "x"), ("a[]", "y"), ("b", "")]) == {"a": ["x", "y"], "b": ""}
    with pytest.raises(ParamError) as caught:
        parse_pairs([("payload", "x"), ("payload[value]", "1")])
    assert caught.value.param == "payload"


# --- billing meters -------------------------------------------------------------------------


def test_meters_are_created_listed_paged_retrieved_deactivated_and_reactivated(
    fake: FakeStripe,
) -> None:
    sdk = client(fake)
    first = sdk.v1.billing.meters.create(params=meter_params("a"))
    second = sdk.v1.billing.meters.create(params=meter_params("b"))
    assert first.status == "active" and first.id.startswith("mtr_test_")
    assert first.customer_mapping.event_payload_key == "stripe_customer_id"

    page = sdk.v1.billing.meters.list(params={"limit": 1})
    assert [m.id for m in page.data] == [second.id] and page.has_more  # newest first
    rest = sdk.v1.billing.meters.list(params={"limit": 1, "starting_after": second.id})
    assert [m.id for m in rest.data] == [first.id] and not rest.has_more
    assert sdk.v1.billing.meters.retrieve(first.id).event_name == "a"

    inactive = sdk.v1.billing.meters.deactivate(first.id)
    assert inactive.status == "inactive" and inactive.status_transitions.deactivated_at
    listed = sdk.v1.billing.meters.list(params={"status": "inactive"})
    assert [m.id for m in listed.data] == [first.id]
    assert sdk.v1.billing.meters.reactivate(first.id).status == "active"
    assert fake.call_count(LIST_METERS) == 3


def test_an_event_name_belongs_to_one_active_meter(fake: FakeStripe) -> None:
    sdk = client(fake)
    meter = sdk.v1.billing.meters.create(params=meter_params())
    error = invalid(lambda: sdk.v1.billing.meters.create(params=meter_params()))
    assert error.http_status == 400 and error.param == "event_name"
    sdk.v1.billing.meters.deactivate(meter.id)
    replacement = sdk.v1.billing.meters.create(params=meter_params())
    assert replacement.id != meter.id
    assert invalid(lambda: sdk.v1.billing.meters.reactivate(meter.id)).param == "event_name"


def test_an_unknown_meter_is_a_404_resource_missing(fake: FakeStripe) -> None:
    error = invalid(lambda: client(fake).v1.billing.meters.retrieve("mtr_nope"))
    assert (error.http_status, error.code, error.param) == (404, "resource_missing", "id")


# --- meter events and summaries -------------------------------------------------------------


def test_an_accepted_event_is_counted_and_shown_in_summaries(fake: FakeStripe) -> None:
    sdk = client(fake)
    meter = fake.create_meter(EVENT)
    now = time.time()
    answer = send(sdk, event_params("25", identifier="a", timestamp=int(now)))
    assert answer.identifier == "a" and answer.payload["value"] == "25"
    send(sdk, event_params("5", identifier="b", timestamp=int(now) - 3600))
    send(sdk, event_params("7", identifier="c", customer=OTHER))
    assert fake.total(CUSTOMER, EVENT) == 30 and fake.total(OTHER, EVENT) == 7
    assert [e.identifier for e in fake.accepted_events(customer=CUSTOMER)] == ["a", "b"]

    start, end = hour_floor(now) - 3 * 3600, hour_floor(now) + 3600
    hourly = sdk.v1.billing.meters.event_summaries.list(
        meter.id,
        params={
            "customer": CUSTOMER,
            "start_time": start,
            "end_time": end,
            "value_grouping_window": "hour",
        },
    )
    assert [(s.start_time, s.aggregated_value) for s in hourly.data] == [
        (hour_floor(now) - 3600, 5.0),
        (hour_floor(now), 25.0),
    ]
    whole = sdk.v1.billing.meters.event_summaries.list(
        meter.id, params={"customer": CUSTOMER, "start_time": start, "end_time": end}
    )
    assert [(s.start_time, s.end_time, s.aggregated_value) for s in whole.data] == [
        (start, end, 30.0)
    ]
    assert fake.event_summaries(meter.id, CUSTOMER, start, end) == [whole.data[0].to_dict()]


def test_count_last_and_pre_aggregated_meters_summarise_as_stripe_does(fake: FakeStripe) -> None:
    """`count` counts events, `last` takes the latest timestamp's value, and a meter with an
    `event_time_window` keeps only the newest event sent for each window."""
    sdk = client(fake)
    counted = fake.create_meter("calls", formula="count")
    latest = fake.create_meter("seats", formula="last")
    hourly = fake.create_meter("gauge", event_time_window="hour")
    hour = hour_floor(time.time())
    for name in ("calls", "seats", "gauge"):
        send(sdk, event_params("3", identifier=f"{name}-1", event_name=name, timestamp=hour + 60))
        send(sdk, event_params("9", identifier=f"{name}-2", event_name=name, timestamp=hour + 1))
    window = (CUSTOMER, hour, hour + 3600)
    assert fake.event_summaries(counted.id, *window)[0]["aggregated_value"] == 2.0
    assert fake.event_summaries(latest.id, *window)[0]["aggregated_value"] == 3.0
    assert fake.event_summaries(hourly.id, *window)[0]["aggregated_value"] == 9.0


def test_summaries_need_aligned_ranges(fake: FakeStripe) -> None:
    """Minute boundaries always; hour or UTC-day boundaries with a grouping window."""
    sdk = client(fake)
    meter = fake.create_meter(EVENT)
    day = int(time.time()) // 86400 * 86400

    def summaries(start: int, end: int, window: str | None = None) -> Any:
        query: Any = {"customer": CUSTOMER, "start_time": start, "end_time": end}
        if window:
            query["value_grouping_window"] = window
        return lambda: sdk.v1.billing.meters.event_summaries.list(meter.id, params=query)

    assert invalid(summaries(day + 30, day + 3600)).param == "start_time"
    assert invalid(summaries(day + 60, day + 3600, "hour")).param == "start_time"
    assert invalid(summaries(day, day + 3600, "day")).param == "end_time"
    assert invalid(summaries(day + 3600, day)).param == "start_time"
    no_end: Any = {"customer": CUSTOMER, "start_time": day}
    missing = invalid(lambda: sdk.v1.billing.meters.event_summaries.list(meter.id, params=no_end))
    assert (missing.code, missing.param) == ("parameter_missing", "end_time")
    assert summaries(day, day + 86400, "day")().data == []


def test_a_reused_identifier_is_refused_for_24_hours(fake: FakeStripe) -> None:
    """Stripe answers 400 with the message and `Stripe-Should-Retry: false`, and no code;
    after the rolling 24 hours the identifier is new again."""
    sdk = client(fake)
    fake.create_meter(EVENT)
    send(sdk, event_params(identifier="same"))
    error = invalid(lambda: send(sdk, event_params(identifier="same")))
    assert error.http_status == 400 and error.code is None
    assert error.user_message == "An event already exists with identifier same."
    assert error.headers is not None and error.headers["Stripe-Should-Retry"] == "false"
    assert fake.total(CUSTOMER, EVENT) == 25

    fake.clock.advance(86400)
    send(sdk, event_params(identifier="same"))
    assert fake.total(CUSTOMER, EVENT) == 50


def test_the_duplicate_code_can_be_configured(make_fake: FakeFactory) -> None:
    fake = make_fake(duplicate_code="duplicate_meter_event")
    sdk = client(fake)
    fake.create_meter(EVENT)
    send(sdk, event_params())
    assert invalid(lambda: send(sdk, event_params())).code == "duplicate_meter_event"


def test_timestamps_are_within_35_days_past_and_5_minutes_ahead(fake: FakeStripe) -> None:
    sdk = client(fake)
    fake.create_meter(EVENT)
    fake.clock.freeze()
    now = int(fake.clock.now())
    old = invalid(lambda: send(sdk, event_params(timestamp=now - 35 * 86400 - 1)))
    assert (old.param, old.code) == ("timestamp", "timestamp_too_far_in_past")
    ahead = invalid(lambda: send(sdk, event_params(timestamp=now + 301)))
    assert (ahead.param, ahead.code) == ("timestamp", "timestamp_in_future")
    send(sdk, event_params(identifier="oldest", timestamp=now - 35 * 86400))
    send(sdk, event_params(identifier="latest", timestamp=now + 300))
    assert len(fake.accepted_events()) == 2


def test_an_inactive_or_unknown_meter_refuses_events(fake: FakeStripe) -> None:
    sdk = client(fake)
    meter = fake.create_meter(EVENT)
    sdk.v1.billing.meters.deactivate(meter.id)
    error = invalid(lambda: send(sdk, event_params()))
    assert (error.http_status, error.param) == (400, "event_name")
    assert "No active meter" in (error.user_message or "")
    assert invalid(lambda: send(sdk, event_params(event_name="nope"))).param == "event_name"
    assert fake.accepted_events() == []


def test_unknown_missing_empty_and_mistyped_parameters_are_refused(fake: FakeStripe) -> None:
    sdk = client(fake)
    fake.create_meter(EVENT)
    unknown = invalid(lambda: send(sdk, event_params(colour="red")))
    assert (unknown.code, unknown.param) == ("parameter_unknown", "colour")
    assert unknown.user_message == "Received unknown parameter: colour"
    nested = invalid(
        lambda: sdk.v1.billing.meters.create(
            params=meter_params("x", customer_mapping={"type": "by_id", "key": "k"})
        )
    )
    assert (nested.code, nested.param) == ("parameter_unknown", "customer_mapping[key]")
    params = event_params()
    del params["event_name"]
    missing = invalid(lambda: send(sdk, params))
    assert (missing.code, missing.param) == ("parameter_missing", "event_name")
    empty = invalid(lambda: send(sdk, event_params(event_name="")))
    assert (empty.code, empty.param) == ("parameter_invalid_empty", "event_name")
    mistyped = invalid(lambda: send(sdk, {**event_params(), "timestamp": "soon"}))
    assert (mistyped.code, mistyped.param) == ("parameter_invalid_integer", "timestamp")
    formula = invalid(
        lambda: sdk.v1.billing.meters.create(
            params=meter_params("y", default_aggregation={"formula": "max"})
        )
    )
    assert formula.param == "default_aggregation[formula]"
    assert fake.accepted_events() == [] and len(fake.state.meters) == 1


def test_values_must_be_whole_numbers_of_at_most_15_digits(make_fake: FakeFactory) -> None:
    fake = make_fake()
    sdk = client(fake)
    fake.create_meter(EVENT)
    for value in ("1.5", "abc", "", " 3", "1e3"):
        error = invalid(lambda v=value: send(sdk, event_params(v)))  # type: ignore[misc]
        assert error.param == "payload[value]", value
    digits = invalid(lambda: send(sdk, event_params("1234567890123456")))
    assert digits.code == "meter_event_value_too_many_digits"
    send(sdk, event_params("123456789012345"))

    decimals = make_fake(whole_values_only=False)
    decimals.create_meter(EVENT)
    send(client(decimals), event_params("1.5"))
    assert decimals.total(CUSTOMER, EVENT) == Decimal("1.5")


def test_an_unknown_customer_is_taken_then_dropped_with_an_error_report(fake: FakeStripe) -> None:
    """Stripe checks the customer asynchronously: 200 now, an error report later."""
    meter = fake.create_meter(EVENT)
    send(client(fake), event_params(customer="cus_missing"))
    assert fake.accepted_events() == []
    [report] = fake.error_reports
    assert (report.code, report.identifier) == ("meter_event_customer_not_found", "evt-1")
    event = fake.error_report_event(meter.id)
    assert event["type"] == "v1.billing.meter.error_report_triggered"
    assert event["related_object"]["id"] == meter.id
    [error_type] = event["data"]["reason"]["error_types"]
    assert error_type["code"] == "meter_event_customer_not_found"
    assert error_type["sample_errors"][0]["request"]["identifier"] == "evt-1"


def test_customers_are_retrieved_created_and_deleted(fake: FakeStripe) -> None:
    sdk = client(fake)
    assert sdk.v1.customers.retrieve(CUSTOMER).email == "one@example.com"
    missing = invalid(lambda: sdk.v1.customers.retrieve("cus_nope"))
    assert (missing.http_status, missing.code) == (404, "resource_missing")
    created = sdk.v1.customers.create(params={"name": "Ada", "metadata": {"team": "x"}})
    assert fake.state.customer(created.id)["metadata"] == {"team": "x"}
    sdk.v1.customers.delete(created.id)
    assert sdk.v1.customers.retrieve(created.id).to_dict().get("deleted") is True


def test_raw_http_gets_stripe_envelopes_and_headers(fake: FakeStripe) -> None:
    """Form bodies with brackets, Basic auth as curl sends it, `Request-Id` on every answer,
    and Stripe's 404 for a URL it does not have."""
    import requests

    fake.create_meter(EVENT)
    body = (
        f"event_name={EVENT}&payload[stripe_customer_id]={CUSTOMER}&payload[value]=4"
        f"&identifier=raw-1&timestamp={int(time.time())}"
    )
    answer = requests.post(
        f"{fake.url}/v1/billing/meter_events",
        data=body,
        auth=(fake.api_key, ""),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=5,
    )
    assert answer.status_code == 200 and answer.headers["Request-Id"].startswith("req_")
    assert fake.total(CUSTOMER, EVENT) == 4

    unknown = requests.get(f"{fake.url}/v1/nope", auth=(fake.api_key, ""), timeout=5)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "invalid_request_error"
    keyless = requests.get(f"{fake.url}/v1/billing/meters", timeout=5)
    assert keyless.status_code == 401 and "did not provide an API key" in keyless.text
    assert fake.call_counts()["GET /v1/nope"] == 1


def test_a_wrong_key_is_a_401(fake: FakeStripe) -> None:
    sdk = stripe.StripeClient(
        "sk_test_wrong",
        base_addresses={"api": fake.url, "meter_events": fake.url},
        max_network_retries=0,
    )
    with pytest.raises(stripe.AuthenticationError) as caught:
        sdk.v1.billing.meters.list()
    assert caught.value.http_status == 401


# --- limits ---------------------------------------------------------------------------------


def test_over_the_per_second_limit_is_a_429_the_sdk_does_not_retry(make_fake: FakeFactory) -> None:
    fake = make_fake(limits=RateLimits(write_per_second=2))
    sdk = client(fake, max_network_retries=3)
    fake.create_meter(EVENT)
    time.sleep(1 - time.monotonic() % 1 + 0.01)  # start at the beginning of a second
    outcomes = []
    for i in range(4):
        try:
            send(sdk, event_params(identifier=f"e{i}"))
            outcomes.append("ok")
        except stripe.RateLimitError as error:
            # the SDK leaves RateLimitError.code empty; the body has it
            assert error.http_status == 429 and error.error and error.error.code == "rate_limit"
            assert error.headers is not None
            assert error.headers["Stripe-Rate-Limited-Reason"] == "global-rate"
            assert error.headers["Stripe-Should-Retry"] == "false"
            outcomes.append("429")
    assert outcomes == ["ok", "ok", "429", "429"]
    assert fake.call_count(CREATE_METER_EVENT) == 4  # no SDK retry despite max_network_retries
    assert fake.call_count(CREATE_METER_EVENT, status=429) == 2


async def test_one_concurrent_call_per_customer_and_meter(make_fake: FakeFactory) -> None:
    """Through the async SDK on aiohttp, as the collector calls it: a second call for the same
    customer and meter while the first is running is a 429; another customer's is not."""
    fake = make_fake(latency={CREATE_METER_EVENT: 0.3})
    fake.create_meter(EVENT)
    http = stripe.AIOHTTPClient(timeout=5)
    sdk = fake.sdk_client(http_client=http)
    try:
        results = await asyncio.gather(
            sdk.v1.billing.meter_events.create_async(params=event_params(identifier="a")),
            sdk.v1.billing.meter_events.create_async(params=event_params(identifier="b")),
            sdk.v1.billing.meter_events.create_async(
                params=event_params(identifier="c", customer=OTHER)
            ),
            return_exceptions=True,
        )
    finally:
        await close(http)
    limited = [r for r in results if isinstance(r, stripe.RateLimitError)]
    assert len(limited) == 1
    assert limited[0].headers is not None
    assert limited[0].headers["Stripe-Rate-Limited-Reason"] == "endpoint-concurrency"
    assert sorted(e.identifier for e in fake.accepted_events()) in (["a", "c"], ["b", "c"])


# --- faults ---------------------------------------------------------------------------------


def test_an_injected_500_applies_nothing(fake: FakeStripe) -> None:
    sdk = client(fake)
    fake.create_meter(EVENT)
    fake.faults.fail_next(1, route=CREATE_METER_EVENT)
    with pytest.raises(stripe.APIError) as caught:
        send(sdk, event_params())
    assert caught.value.http_status == 500
    assert fake.accepted_events() == []
    send(sdk, event_params())
    assert fake.total(CUSTOMER, EVENT) == 25


def test_the_sdk_retries_a_500_under_the_same_idempotency_key(fake: FakeStripe) -> None:
    """With SDK retries on (not the product's setting), a 500 before the work is retried with
    the same key, and the event is applied once."""
    sdk = client(fake, max_network_retries=2)
    fake.create_meter(EVENT)
    fake.faults.fail_next(1, route=CREATE_METER_EVENT)
    send(sdk, event_params())
    keys = [r.idempotency_key for r in fake.requests_to(CREATE_METER_EVENT)]
    assert len(keys) == 2 and keys[0] == keys[1]
    assert fake.total(CUSTOMER, EVENT) == 25


def test_a_500_after_the_work_is_saved_and_replayed_for_its_key(fake: FakeStripe) -> None:
    """Stripe saves whatever the first request answered, 500s included: the event is there,
    and the same key answers the same 500."""
    sdk = client(fake)
    fake.create_meter(EVENT)
    fake.faults.fail_next(1, after_work=True, route=CREATE_METER_EVENT)
    for _ in range(2):
        with pytest.raises(stripe.APIError):
            send(sdk, event_params(), idempotency_key="k-500")
    assert fake.total(CUSTOMER, EVENT) == 25
    assert [r.replayed for r in fake.requests_to(CREATE_METER_EVENT)] == [False, True]


def test_a_lock_timeout_asks_the_sdk_to_retry(fake: FakeStripe) -> None:
    sdk = client(fake, max_network_retries=1)
    fake.create_meter(EVENT)
    fake.faults.fail_next(1, 429, code="lock_timeout", should_retry=True)
    send(sdk, event_params())
    assert [r.status for r in fake.requests_to(CREATE_METER_EVENT)] == [429, 200]


def test_a_timeout_after_the_work_applies_it_and_the_sdk_raises(fake: FakeStripe) -> None:
    sdk = client(fake, timeout=0.5)
    fake.create_meter(EVENT)
    fake.faults.timeout_next(1, seconds=5, route=CREATE_METER_EVENT)
    started = time.monotonic()
    with pytest.raises(stripe.APIConnectionError):
        send(sdk, event_params())
    assert time.monotonic() - started < 4
    assert fake.total(CUSTOMER, EVENT) == 25


def test_a_timeout_before_the_work_applies_nothing(fake: FakeStripe) -> None:
    sdk = client(fake, timeout=0.5)
    fake.create_meter(EVENT)
    fake.faults.timeout_next(1, seconds=5, after_work=False, route=CREATE_METER_EVENT)
    with pytest.raises(stripe.APIConnectionError):
        send(sdk, event_params())
    assert fake.accepted_events() == []


async def test_the_async_sdk_times_out_as_the_collector_would(make_fake: FakeFactory) -> None:
    fake = make_fake()
    fake.create_meter(EVENT)
    fake.faults.timeout_next(1, seconds=5, route=CREATE_METER_EVENT)
    http = stripe.AIOHTTPClient(timeout=0.5)
    sdk = fake.sdk_client(http_client=http)
    try:
        with pytest.raises(stripe.APIConnectionError):
            await sdk.v1.billing.meter_events.create_async(params=event_params())
    finally:
        await close(http)
    assert fake.total(CUSTOMER, EVENT) == 25


def test_a_connection_dropped_after_the_work_leaves_the_event_applied(fake: FakeStripe) -> None:
    """The client sees a connection error; resending the identifier under a new key is the
    duplicate refusal, under the same key the saved answer, replayed."""
    sdk = client(fake)
    fake.create_meter(EVENT)
    fake.faults.drop_after_work_next(1, route=CREATE_METER_EVENT)
    with pytest.raises(stripe.APIConnectionError):
        send(sdk, event_params(), idempotency_key="k-drop")
    assert fake.total(CUSTOMER, EVENT) == 25
    assert fake.requests_to(CREATE_METER_EVENT)[0].status is None  # no answer went out

    assert "already exists" in (invalid(lambda: send(sdk, event_params())).user_message or "")
    replay = send(sdk, event_params(), idempotency_key="k-drop")
    assert replay.identifier == "evt-1"
    assert replay.last_response.headers["Idempotent-Replayed"] == "true"
    assert fake.total(CUSTOMER, EVENT) == 25


def test_a_connection_dropped_before_the_work_applies_nothing(fake: FakeStripe) -> None:
    fake.create_meter(EVENT)
    fake.faults.drop_next(1, after_work=False, route=CREATE_METER_EVENT)
    with pytest.raises(stripe.APIConnectionError):
        send(client(fake), event_params())
    assert fake.accepted_events() == []


def test_random_faults_are_reproducible_and_totals_match_what_was_applied(
    make_fake: FakeFactory,
) -> None:
    def run(seed: int) -> tuple[list[str | None], Decimal]:
        fake = make_fake(limits=RateLimits.unlimited())
        fake.create_meter(EVENT)
        fake.faults.random(0.5, seed=seed, timeout_seconds=2, route=CREATE_METER_EVENT)
        sdk = client(fake, timeout=0.3)
        for i in range(16):
            try:
                send(sdk, event_params("1", identifier=f"r{i}"))
            except stripe.StripeError:
                pass
        records = fake.requests_to(CREATE_METER_EVENT)
        applied = {e.identifier for e in fake.accepted_events()}
        assert len(records) == 16  # one request per call: no SDK retries
        for i, record in enumerate(records):  # applied exactly when no fault came first
            struck_before = record.fault is not None and "before_work" in record.fault
            assert (f"r{i}" in applied) == (not struck_before), record
        return [r.fault for r in records], fake.total(CUSTOMER, EVENT)

    faults, total = run(7)
    assert run(7) == (faults, total)
    assert any(faults) and not all(faults)
    assert total == len(faults) - sum(1 for f in faults if f and "before_work" in f)


# --- idempotency ----------------------------------------------------------------------------


def test_an_idempotency_key_replays_refuses_other_params_and_skips_validation_errors(
    fake: FakeStripe,
) -> None:
    sdk = client(fake)
    fake.create_meter(EVENT)
    first = send(sdk, event_params(), idempotency_key="k1")
    again = send(sdk, event_params(), idempotency_key="k1")
    assert again.to_dict() == first.to_dict()
    assert again.last_response.headers["Idempotent-Replayed"] == "true"
    assert fake.total(CUSTOMER, EVENT) == 25

    with pytest.raises(stripe.IdempotencyError):
        send(sdk, event_params("26"), idempotency_key="k1")

    # A validation failure is not saved: the corrected request may use the key.
    invalid(lambda: send(sdk, event_params("x", identifier="v"), idempotency_key="k2"))
    send(sdk, event_params("2", identifier="v"), idempotency_key="k2")
    assert fake.total(CUSTOMER, EVENT) == 27


# --- v2: sessions and the meter event stream ------------------------------------------------


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def test_the_stream_takes_events_with_a_session_token_and_reports_errors_later(
    fake: FakeStripe,
) -> None:
    meter = fake.create_meter(EVENT)
    session = client(fake).v2.billing.meter_event_session.create()
    assert session.object == "v2.billing.meter_event_session"
    stream = stripe.StripeClient(
        session.authentication_token,
        base_addresses={"api": fake.url, "meter_events": fake.url},
        max_network_retries=0,
    )
    now = time.time()
    event: Any = {
        "event_name": EVENT,
        "identifier": "s1",
        "payload": {"stripe_customer_id": CUSTOMER, "value": "3"},
        "timestamp": rfc3339(now),
    }
    batch: Any = {
        "events": [
            event,
            event,  # a reused identifier: dropped without a report
            {**event, "identifier": "s2", "event_name": "nope"},
            {**event, "identifier": "s3", "timestamp": rfc3339(now - 40 * 86400)},
            {**event, "identifier": "s4", "payload": {"stripe_customer_id": CUSTOMER}},
        ]
    }
    stream.v2.billing.meter_event_stream.create(params=batch)
    assert fake.total(CUSTOMER, EVENT) == 3
    assert {(r.identifier, r.code) for r in fake.error_reports} == {
        ("s2", "no_meter"),
        ("s3", "timestamp_too_far_in_past"),
        ("s4", "meter_event_value_not_found"),
    }
    assert fake.error_report_event(meter.id)["data"]["reason"]["error_count"] == 2
    assert fake.call_count(CREATE_METER_EVENT_STREAM) == 1

    with pytest.raises(stripe.InvalidRequestError):
        stream.v2.billing.meter_event_stream.create(params={"events": [event] * 101})
    fake.clock.advance(15 * 60)
    with pytest.raises(stripe.TemporarySessionExpiredError) as caught:
        stream.v2.billing.meter_event_stream.create(params={"events": [event]})
    assert (caught.value.http_status, caught.value.code) == (
        401,
        "billing_meter_event_session_expired",
    )
