"""What a billing engineer drives: `stripe setup` and `stripe status` on the command line, the
Stripe settings, Stripe's rate respected, and the status while Stripe fails."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest

from tests.billing.conftest import COST, INPUT, METERS, OUTPUT, eventually, stripe_env
from tests.collector.accounts_api import put_consumer
from tests.collector.test_admin_cli import admin
from tests.conftest import RunningCollector, make_settings, run_collector_app
from tests.factories import usage_event
from tests.harness.stripe import (
    CREATE_METER,
    CREATE_METER_EVENT,
    DEACTIVATE_METER,
    FakeStripe,
    RateLimits,
)
from token_meter_collector.settings import Settings, SettingsError


async def test_setup_creates_the_meters_once_and_reports_an_inactive_one(
    billing_collector: RunningCollector,
) -> None:
    with FakeStripe() as fake:
        env = {
            "STRIPE_API_KEY": fake.api_key,
            "STRIPE_API_BASE": fake.url,
            "TOKEN_METER_STRIPE_METERS": METERS,
        }
        code, out, err = await admin(billing_collector, "stripe", "setup", env=env)
        assert code == 0, err
        assert [line.split()[0] for line in out.splitlines()[2:5]] == [INPUT, OUTPUT, COST]
        assert out.count("created") == 3
        assert fake.call_count(CREATE_METER) == 3
        code, out, _ = await admin(billing_collector, "stripe", "setup", "--json", env=env)
        assert code == 0
        answer = json.loads(out)
        assert [(m["event_name"], m["action"]) for m in answer] == [
            (INPUT, "found"),
            (OUTPUT, "found"),
            (COST, "found"),
        ]
        assert fake.call_count(CREATE_METER) == 3  # nothing created the second time
        fake.state.deactivate_meter(answer[2]["meter_id"])
        code, out, _ = await admin(billing_collector, "stripe", "setup", env=env)
        assert code == 0 and "inactive" in out and "reactivate it at Stripe" in out
        assert fake.call_count(DEACTIVATE_METER) == 0  # setup never changes a meter


async def test_setup_refuses_a_bad_meter_list_or_no_key_with_exit_2(
    billing_collector: RunningCollector,
) -> None:
    code, _, err = await admin(
        billing_collector,
        "stripe",
        "setup",
        env={"STRIPE_API_KEY": "sk_test_x", "TOKEN_METER_STRIPE_METERS": "a=bogus"},
    )
    assert code == 2 and "unknown field 'bogus'" in err
    code, _, err = await admin(billing_collector, "stripe", "setup", env={"STRIPE_API_KEY": ""})
    assert code == 2 and "no Stripe key" in err
    code, _, err = await admin(
        billing_collector,
        "stripe",
        "setup",
        env={"STRIPE_API_KEY": "sk_test_x", "STRIPE_API_BASE": "http://127.0.0.1:9"},
    )
    assert code == 2 and "Stripe" in err


async def test_status_on_the_command_line(
    billing_collector: RunningCollector, stripe_fake: FakeStripe
) -> None:
    await billing_collector.post_events([usage_event("h1", "hank")])
    await eventually(lambda: _held(billing_collector))
    code, out, err = await admin(billing_collector, "stripe", "status")
    assert code == 0, err
    assert "held consumers   1" in out
    assert "hank" in out and "no_stripe_customer" in out
    assert INPUT in out and "yes" in out
    code, out, _ = await admin(billing_collector, "stripe", "status", "--json")
    assert json.loads(out)["held"] == [{"consumer": "hank", "reason": "no_stripe_customer"}]


async def _held(collector: RunningCollector) -> bool:
    _, body, _ = await collector.get("/v1/stripe/status")
    return bool(body["held"])


async def test_status_without_stripe_says_billing_is_off(collector: RunningCollector) -> None:
    code, out, _ = await admin(collector, "stripe", "status")
    assert code == 0 and "billing is off" in out
    _, body, _ = await collector.get("/v1/stripe/status")
    assert body["enabled"] is False and body["meters"] == []


async def test_while_stripe_fails_the_oldest_pending_delta_ages_and_errors_show(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    with FakeStripe() as fake:
        fake.create_meter(INPUT)
        fake.add_customer("cus_ivy")
        fake.faults.fail_next(1000, 500, route=CREATE_METER_EVENT)
        settings = make_settings(
            database_url,
            tmp_path,
            **stripe_env(fake, TOKEN_METER_STRIPE_METERS=f"{INPUT}=input_tokens"),
        )
        async with run_collector_app(settings) as collector:
            await put_consumer(collector, "ivy", {"stripe_customer_id": "cus_ivy"})
            await collector.post_events([usage_event("i1", "ivy")])
            await eventually(lambda: fake.call_count(CREATE_METER_EVENT) >= 2)
            _, body, _ = await collector.get("/v1/stripe/status")
            assert body["pending_rows"] == 1
            assert body["oldest_pending_seconds"] is not None
            assert body["oldest_pending_seconds"] >= 0
            assert body["last_sent_at"] is None
            fake.faults.clear()
            # The backoff is capped, so delivery resumes once Stripe answers again.
            await eventually(lambda: fake.total("cus_ivy", INPUT) == 100, within=60)


async def test_the_sync_keeps_to_test_modes_rate(
    database_url: str, tmp_path: Path, db: asyncpg.Connection
) -> None:
    """60 customers x 2 meters at once: Stripe's test-mode limit (25 writes/s) and its one call
    per customer and meter at a time are never exceeded, so Stripe refuses nothing."""
    with FakeStripe(limits=RateLimits.test_mode(), latency={CREATE_METER_EVENT: 0.02}) as fake:
        for name in (INPUT, OUTPUT):
            fake.create_meter(name)
        env = stripe_env(
            fake, TOKEN_METER_STRIPE_METERS=f"{INPUT}=input_tokens,{OUTPUT}=output_tokens"
        )
        async with run_collector_app(make_settings(database_url, tmp_path, **env)) as collector:
            for n in range(60):
                fake.add_customer(f"cus_r{n}")
                await put_consumer(collector, f"r{n}", {"stripe_customer_id": f"cus_r{n}"})
            await collector.post_events([usage_event(f"r{n}", f"r{n}") for n in range(60)])
            await eventually(
                lambda: all(
                    fake.total(f"cus_r{n}", OUTPUT) == 20 and fake.total(f"cus_r{n}", INPUT) == 100
                    for n in range(60)
                ),
                within=60,
            )
        refused = [r for r in fake.requests_to(CREATE_METER_EVENT) if r.status == 429]
        assert refused == []
        assert fake.call_count(CREATE_METER_EVENT) == 120


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"TOKEN_METER_STRIPE_METERS": "x=nope"}, "unknown field 'nope'"),
        ({"TOKEN_METER_STRIPE_TRANSPORT": "carrier_pigeon"}, "TOKEN_METER_STRIPE_TRANSPORT"),
        ({"TOKEN_METER_STRIPE_SYNC_INTERVAL": "0"}, "TOKEN_METER_STRIPE_SYNC_INTERVAL"),
        ({"TOKEN_METER_STRIPE_MAX_RATE": "fast"}, "TOKEN_METER_STRIPE_MAX_RATE"),
        ({"STRIPE_API_KEY": "pk_test_public"}, "secret or restricted key"),
    ],
)
def test_stripe_settings_refuse_what_cannot_work(
    env: dict[str, str], problem: str, tmp_path: Path
) -> None:
    full = {"TOKEN_METER_DATA_DIR": str(tmp_path), "STRIPE_API_KEY": "sk_test_abc", **env}
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(full)
    assert any(problem in p for p in caught.value.problems), caught.value.problems


def test_stripe_settings_defaults_and_key_from_a_file(tmp_path: Path) -> None:
    assert Settings.from_env({"TOKEN_METER_DATA_DIR": str(tmp_path)}).stripe is None
    key = tmp_path / "stripe-key"
    key.write_text("rk_live_secret\n")
    env = {"TOKEN_METER_DATA_DIR": str(tmp_path), "STRIPE_API_KEY_FILE": str(key)}
    stripe = Settings.from_env(env).stripe
    assert stripe is not None
    assert stripe.api_key.value == "rk_live_secret" and "rk_live" not in repr(stripe)
    assert [m.event_name for m in stripe.meters] == [INPUT, OUTPUT]
    assert stripe.sync_interval == 60 and stripe.max_rate(test_mode=False) == 1000
    assert stripe.max_rate(test_mode=True) == 25
