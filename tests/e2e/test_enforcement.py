"""Enforcement end to end: the plugin servers started as Kong starts them, the real collector
process on a fresh PostgreSQL database, and the accounts API over HTTP.

A prepaid consumer that spends its credit through the gateway is answered 402 by the plugin,
without an upstream call, until a top-up lets it through again; a consumer past its monthly
quota is answered 429 until the quota is raised; an overdraft moves the point of the block.
Balances are checked to the nano-unit against the built-in price book's own numbers.

The times from the crossing request to the first blocked one (and from a top-up to the first
request let through) are printed, never asserted: `bench.enforcement --through-plugin` measures
them. The waits below are bounded by PATIENCE only so that a broken build fails instead of
hanging.
"""

from __future__ import annotations

import json
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from tests.e2e.conftest import INGEST_TOKEN, Stack
from tests.harness.kong import HarnessFactory, KongHarness, Outcome, ScriptedRequest

PRICE_BOOK = Path(__file__).resolve().parents[2] / "collector/pricing/default-price-book.toml"
PATIENCE = 10.0  # seconds; bounds a failing test, not a speed requirement
PROBE_INTERVAL = 0.01

# The upstream's answer: a gpt-4o snapshot (priced through the book's prefix lookup), part of
# the prompt served from OpenAI's cache.
MODEL = "gpt-4o-2024-08-06"
BOOK_MODEL = "gpt-4o"
PROMPT_TOKENS = 1200
CACHED_TOKENS = 400
COMPLETION_TOKENS = 150
TOTAL_TOKENS = PROMPT_TOKENS + COMPLETION_TOKENS


# --- prices, from the book file itself ------------------------------------------------------


def nanos_per_token(model: str) -> dict[str, int]:
    """The book's prices of `model` in nano-units per token. A price is in currency units per
    million tokens: 1 unit per million = 10^9 nano-units / 10^6 tokens = 1,000 per token."""
    book = tomllib.loads(PRICE_BOOK.read_text(), parse_float=Decimal)
    prices = book["models"][model]

    def per_token(kind: str, default: str) -> int:
        value = Decimal(prices.get(kind, prices[default])) * 1000
        assert value == value.to_integral_value(), (model, kind, value)
        return int(value)

    return {
        "input": per_token("input", "input"),
        "cached_input": per_token("cached_input", "input"),
        "output": per_token("output", "output"),
        "reasoning": per_token("reasoning", "output"),
    }


def cost_nanos(prompt: int, cached: int, completion: int, model: str = BOOK_MODEL) -> int:
    price = nanos_per_token(model)
    return (
        (prompt - cached) * price["input"]
        + cached * price["cached_input"]
        + completion * price["output"]
    )


BOOK_VERSION = tomllib.loads(PRICE_BOOK.read_text())["version"]
CHAT_COST = cost_nanos(PROMPT_TOKENS, CACHED_TOKENS, COMPLETION_TOKENS)
AI_PROXY_COST = cost_nanos(PROMPT_TOKENS, 0, COMPLETION_TOKENS)  # ai-proxy logs no cache detail


def micros(nanos: int) -> int:
    """What the API shows of a nano-unit amount: micro-units rounded down."""
    return nanos // 1000


# --- what the gateway sends -----------------------------------------------------------------


def chat_request(consumer: str) -> ScriptedRequest:
    """A Chat Completions request through token-meter; the upstream answers with usage."""
    body = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Paris."},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": TOTAL_TOKENS,
            "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }
    return ScriptedRequest(
        body=json.dumps({"model": MODEL, "messages": []}).encode(),
        consumer={"id": f"id-{consumer}", "username": consumer, "custom_id": None},
        upstream_body=json.dumps(body).encode(),
    )


def ai_proxy_request(consumer: str) -> ScriptedRequest:
    """A request behind Kong's ai-proxy (3.9 layout), metered by token-meter-log in the log
    phase. Its request id is the event id, so each request gets a new one."""
    ai = {
        "proxy": {
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": COMPLETION_TOKENS,
                "total_tokens": TOTAL_TOKENS,
            },
            "meta": {"provider_name": "openai", "response_model": MODEL},
        }
    }
    return ScriptedRequest(
        consumer={"id": f"id-{consumer}", "username": consumer, "custom_id": None},
        serialize_extra={"ai": ai},
        request_id=str(uuid.uuid4()),
    )


@dataclass
class Gateway:
    """One plugin server behind the Kong-side harness, counting the requests it let through
    (each one metered: its usage reaches the collector)."""

    harness: KongHarness
    config: dict[str, Any]
    request_for: Callable[[str], ScriptedRequest]
    passed: Counter[str] = field(default_factory=Counter)

    def send(self, consumer: str) -> Outcome:
        outcome = self.harness.request(self.request_for(consumer), self.config)
        if outcome.upstream_called:
            assert outcome.exit_status is None
            self.passed[consumer] += 1
        return outcome

    def send_until(self, consumer: str, *, blocked: bool, since: float) -> tuple[Outcome, float]:
        """Requests one after another until one is blocked (or let through); that outcome and
        the seconds from `since` to its answer."""
        while True:
            outcome = self.send(consumer)
            elapsed = time.monotonic() - since
            if (outcome.exit_status is not None) == blocked:
                return outcome, elapsed
            assert elapsed < PATIENCE, (
                f"{consumer} still {'passing' if blocked else 'blocked'} after {elapsed:.1f} s"
            )
            time.sleep(PROBE_INTERVAL)


def assert_blocked(outcome: Outcome, status: int, code: str) -> None:
    """Contract 1's answer to a blocked consumer, given in access, with no upstream call."""
    assert outcome.exit_status == status
    assert not outcome.upstream_called
    assert outcome.phases["access"] == "exit"
    assert "response" not in outcome.phases
    error = outcome.exit_json()["error"]
    assert error["type"] == "insufficient_quota"
    assert error["code"] == code
    assert "param" in error
    assert error["param"] is None
    assert isinstance(error["message"], str)
    assert error["message"]
    headers = {k.lower(): v for k, v in (outcome.exit_headers or {}).items()}
    assert headers["x-token-meter-reason"] == code
    assert headers["x-should-retry"] == "false"
    assert headers["content-type"].startswith("application/json")


# --- the collector's side ---------------------------------------------------------------------


def usage_of(stack: Stack, consumer: str, events: int) -> dict[str, Any]:
    """The consumer's usage once the collector has stored exactly `events` of its events."""
    deadline = time.monotonic() + PATIENCE
    while True:
        status, body = stack.api("GET", f"/v1/consumers/{consumer}/usage")
        stored = body["events"] if status == 200 else 0
        if stored == events:
            return dict(body)
        assert stored < events, f"{consumer}: {stored} events stored, {events} sent"
        assert time.monotonic() < deadline, f"{consumer}: {stored} of {events} events stored"
        time.sleep(0.05)


def blocklist(stack: Stack) -> dict[str, str]:
    """The collector's blocklist now: consumer -> reason."""
    status, body = stack.api("GET", "/v1/blocklist", token=INGEST_TOKEN)
    assert status == 200
    return {entry["consumer"]: entry["reason"] for entry in body["entries"]}


def grant(stack: Stack, consumer: str, amount_micros: int, key: str) -> dict[str, Any]:
    status, body = stack.api(
        "POST",
        f"/v1/consumers/{consumer}/credits",
        {"amount_micros": amount_micros, "idempotency_key": key},
    )
    assert status == 201, body
    return dict(body)


def put_consumer(stack: Stack, consumer: str, account: dict[str, Any]) -> dict[str, Any]:
    status, body = stack.api("PUT", f"/v1/consumers/{consumer}", account)
    assert status in (200, 201), body
    return dict(body)


def settle(stack: Stack, gateway: Gateway, consumer: str) -> dict[str, Any]:
    """A barrier: one more request of another, post-paid consumer, then its event stored. The
    plugin ships events in order, so anything `consumer` caused before it has arrived too;
    returns `consumer`'s usage, which must hold exactly the requests let through."""
    barrier = f"barrier-{uuid.uuid4().hex[:8]}"
    assert gateway.send(barrier).upstream_called
    usage_of(stack, barrier, 1)
    return usage_of(stack, consumer, gateway.passed[consumer])


def report(what: str, seconds: float) -> None:
    print(f"\n[enforcement] {what}: {seconds * 1000:.0f} ms")


def spend_until_blocked(
    stack: Stack, gateway: Gateway, consumer: str, *, before_crossing: int
) -> tuple[Outcome, float]:
    """`before_crossing` requests, each stored without the consumer being listed, then the
    request that crosses the limit and more requests until the plugin blocks one; returns the
    blocked outcome and the seconds from the crossing request's answer to it."""
    for n in range(1, before_crossing + 1):
        assert gateway.send(consumer).upstream_called
        usage_of(stack, consumer, n)
        assert consumer not in blocklist(stack)
    assert gateway.send(consumer).upstream_called  # its usage crosses the limit
    crossed = time.monotonic()
    return gateway.send_until(consumer, blocked=True, since=crossed)


# --- the tests --------------------------------------------------------------------------------


def test_prepaid_consumer_is_blocked_with_402_and_a_top_up_lets_it_through(
    make_harness: HarnessFactory, stack: Stack
) -> None:
    gateway = Gateway(make_harness("token-meter-plugin"), stack.plugin_config(), chat_request)
    granted = micros(5 * CHAT_COST // 2) * 1000  # two and a half requests' worth, in micros
    assert 2 * CHAT_COST < granted < 3 * CHAT_COST
    assert grant(stack, "pat", micros(granted), "initial")["balance_micros"] == micros(granted)
    rich = 100 * CHAT_COST
    grant(stack, "carol", micros(rich), "initial")

    blocked, to_block = spend_until_blocked(stack, gateway, "pat", before_crossing=2)
    report("crossing request -> first 402 (token-meter)", to_block)
    assert_blocked(blocked, 402, "insufficient_credits")
    assert blocklist(stack)["pat"] == "insufficient_credits"

    # Everyone else passes: a post-paid consumer and a prepaid one with credit left.
    assert gateway.send("bob").upstream_called
    assert gateway.send("carol").upstream_called
    assert_blocked(gateway.send("pat"), 402, "insufficient_credits")

    # Every request let through burned its cost, the blocked ones nothing: the balance is
    # below zero by exactly the overshoot.
    passed = gateway.passed["pat"]
    assert passed >= 3
    usage = settle(stack, gateway, "pat")
    spent = passed * CHAT_COST
    assert usage["balance_micros"] == micros(granted - spent) < 0
    assert usage["input_tokens"] == passed * PROMPT_TOKENS
    assert usage["cached_input_tokens"] == passed * CACHED_TOKENS
    assert usage["output_tokens"] == passed * COMPLETION_TOKENS
    priced = stack.query(
        "SELECT DISTINCT cost_nanos, price_book_version FROM usage_events WHERE consumer = 'pat'"
    )
    assert [tuple(row) for row in priced] == [(CHAT_COST, BOOK_VERSION)]

    # A top-up that lifts the balance above zero lets the consumer through again.
    top_up = micros(spent - granted) + micros(CHAT_COST) + 1
    started = time.monotonic()
    assert grant(stack, "pat", top_up, "top-up")["balance_micros"] > 0
    let_through, to_pass = gateway.send_until("pat", blocked=False, since=started)
    report("top-up grant -> first request let through", to_pass)
    assert let_through.upstream_called
    assert "pat" not in blocklist(stack)

    usage = settle(stack, gateway, "pat")
    assert usage["balance_micros"] == micros(
        granted + top_up * 1000 - gateway.passed["pat"] * CHAT_COST
    )
    carol = usage_of(stack, "carol", 1)
    assert carol["balance_micros"] == micros(rich - CHAT_COST)
    bob = usage_of(stack, "bob", 1)
    assert bob["balance_micros"] is None  # post-paid: no balance, never blocked


def test_log_plugin_blocks_a_prepaid_consumer_with_402_behind_ai_proxy(
    make_harness: HarnessFactory, stack: Stack
) -> None:
    """The same through token-meter-log, which meters ai-proxy's usage in the log phase; the
    log phase of a blocked request (our own 402) meters nothing."""
    gateway = Gateway(
        make_harness("token-meter-log-plugin"), stack.plugin_config(), ai_proxy_request
    )
    granted = micros(3 * AI_PROXY_COST // 2) * 1000  # one and a half requests' worth
    assert AI_PROXY_COST < granted < 2 * AI_PROXY_COST
    grant(stack, "lou", micros(granted), "initial")

    blocked, to_block = spend_until_blocked(stack, gateway, "lou", before_crossing=1)
    report("crossing request -> first 402 (token-meter-log)", to_block)
    assert_blocked(blocked, 402, "insufficient_credits")
    assert blocked.phases["log"] == "ret"
    for _ in range(3):
        assert_blocked(gateway.send("lou"), 402, "insufficient_credits")
    assert gateway.send("bob").upstream_called

    passed = gateway.passed["lou"]
    usage = settle(stack, gateway, "lou")  # the blocked requests' log phases stored nothing
    assert usage["balance_micros"] == micros(granted - passed * AI_PROXY_COST) < 0
    assert usage["input_tokens"] == passed * PROMPT_TOKENS
    assert usage["output_tokens"] == passed * COMPLETION_TOKENS

    top_up = micros(passed * AI_PROXY_COST - granted) + micros(AI_PROXY_COST) + 1
    started = time.monotonic()
    grant(stack, "lou", top_up, "top-up")
    _, to_pass = gateway.send_until("lou", blocked=False, since=started)
    report("top-up grant -> first request let through (token-meter-log)", to_pass)
    usage = settle(stack, gateway, "lou")
    assert usage["balance_micros"] == micros(
        granted + top_up * 1000 - gateway.passed["lou"] * AI_PROXY_COST
    )


def test_quota_used_up_is_429_and_a_raised_quota_lets_the_consumer_through(
    make_harness: HarnessFactory, stack: Stack
) -> None:
    gateway = Gateway(make_harness("token-meter-plugin"), stack.plugin_config(), chat_request)
    quota = 5 * TOTAL_TOKENS // 2  # two and a half requests' worth of tokens
    account = put_consumer(stack, "quin", {"monthly_token_quota": quota})
    assert account["prepaid"] is False

    blocked, to_block = spend_until_blocked(stack, gateway, "quin", before_crossing=2)
    report("crossing request -> first 429 (quota)", to_block)
    assert_blocked(blocked, 429, "quota_exceeded")
    assert blocklist(stack)["quin"] == "quota_exceeded"
    assert gateway.send("bob").upstream_called

    passed = gateway.passed["quin"]
    usage = settle(stack, gateway, "quin")
    assert usage["monthly_token_quota"] == quota
    assert usage["quota_remaining_tokens"] == quota - passed * TOTAL_TOKENS < 0
    assert usage["total_tokens"] == passed * TOTAL_TOKENS
    assert usage["balance_micros"] is None  # a quota alone does not make a consumer prepaid

    # Raised above what was used: through again, still counted against the new quota.
    raised = passed * TOTAL_TOKENS + 10 * TOTAL_TOKENS
    started = time.monotonic()
    assert put_consumer(stack, "quin", {"monthly_token_quota": raised})["monthly_token_quota"] == (
        raised
    )
    _, to_pass = gateway.send_until("quin", blocked=False, since=started)
    report("raised quota -> first request let through", to_pass)
    usage = settle(stack, gateway, "quin")
    assert usage["quota_remaining_tokens"] == raised - gateway.passed["quin"] * TOTAL_TOKENS > 0
    assert "quin" not in blocklist(stack)


def test_overdraft_blocks_only_once_balance_plus_overdraft_is_spent(
    make_harness: HarnessFactory, stack: Stack
) -> None:
    """Credit for one and a half requests and an overdraft of two: the consumer goes below
    zero and stays allowed until balance + overdraft <= 0, i.e. through the fourth request."""
    gateway = Gateway(make_harness("token-meter-plugin"), stack.plugin_config(), chat_request)
    granted = micros(3 * CHAT_COST // 2) * 1000
    overdraft = micros(2 * CHAT_COST) * 1000
    grant(stack, "ody", micros(granted), "initial")
    account = put_consumer(stack, "ody", {"overdraft_micros": micros(overdraft)})
    assert account["overdraft_micros"] == micros(overdraft)
    allowed = -(-(granted + overdraft) // CHAT_COST) - 1  # requests leaving balance + od > 0
    assert allowed == 3

    blocked, to_block = spend_until_blocked(stack, gateway, "ody", before_crossing=allowed)
    report("crossing request -> first 402 (overdraft spent)", to_block)
    assert_blocked(blocked, 402, "insufficient_credits")

    # Before the block the balance was already negative, and the consumer still passed.
    assert granted - 2 * CHAT_COST < 0
    passed = gateway.passed["ody"]
    assert passed > allowed
    usage = settle(stack, gateway, "ody")
    balance = granted - passed * CHAT_COST
    assert usage["balance_micros"] == micros(balance)
    assert balance + overdraft <= 0

    # A top-up that leaves the balance negative but balance + overdraft positive unblocks.
    top_up = micros(-(balance + overdraft)) + micros(CHAT_COST // 2)
    assert balance + top_up * 1000 < 0 < balance + top_up * 1000 + overdraft
    started = time.monotonic()
    assert grant(stack, "ody", top_up, "top-up")["balance_micros"] < 0
    _, to_pass = gateway.send_until("ody", blocked=False, since=started)
    report("top-up within the overdraft -> first request let through", to_pass)
    usage = settle(stack, gateway, "ody")
    assert usage["balance_micros"] == micros(
        granted + top_up * 1000 - gateway.passed["ody"] * CHAT_COST
    )
