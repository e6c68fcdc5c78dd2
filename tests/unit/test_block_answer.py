"""The answer a blocked consumer gets: OpenAI's or Anthropic's error shape, and whether to retry."""

from __future__ import annotations

import json

import pytest

from token_meter_plugin.block_answer import (
    BLOCKLIST_UNAVAILABLE,
    INSUFFICIENT_CREDITS,
    PAYMENT_OVERDUE,
    QUOTA_EXCEEDED,
    block_response,
    is_anthropic_path,
)


@pytest.mark.parametrize(
    ("reason", "status", "error_type"),
    [
        (INSUFFICIENT_CREDITS, 402, "insufficient_quota"),
        (QUOTA_EXCEEDED, 429, "insufficient_quota"),
    ],
)
def test_block_response_is_an_openai_error_the_sdk_does_not_retry(
    reason: str, status: int, error_type: str
) -> None:
    code, body, headers = block_response(reason)
    assert code == status
    error = json.loads(body)["error"]
    assert error["type"] == error_type
    assert error["code"] == reason
    assert error["param"] is None
    assert len(error["message"]) > 20
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Token-Meter-Reason"] == reason
    assert headers["x-should-retry"] == "false"


def test_an_unavailable_blocklist_answers_503_that_may_be_retried() -> None:
    code, body, headers = block_response(BLOCKLIST_UNAVAILABLE)
    assert code == 503
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", BLOCKLIST_UNAVAILABLE)
    assert headers["X-Token-Meter-Reason"] == BLOCKLIST_UNAVAILABLE
    assert headers["x-should-retry"] == "true"
    assert headers["Retry-After"] == "5"


def test_an_unknown_reason_still_blocks_with_402_and_cannot_inject_headers() -> None:
    """Contract 1: a reason the plugin does not know yet gets 402 with that code."""
    code, body, headers = block_response("account_suspended")
    assert code == 402
    assert json.loads(body)["error"]["code"] == "account_suspended"
    code, body, headers = block_response("evil\r\nSet-Cookie: x=1")
    assert code == 402
    assert headers["X-Token-Meter-Reason"] == "blocked"
    assert "\n" not in json.loads(body)["error"]["message"]


@pytest.mark.parametrize(
    ("reason", "status", "error_type"),
    [
        (INSUFFICIENT_CREDITS, 402, "billing_error"),
        (PAYMENT_OVERDUE, 402, "billing_error"),
        (QUOTA_EXCEEDED, 429, "rate_limit_error"),
        (BLOCKLIST_UNAVAILABLE, 503, "api_error"),
        ("account_suspended", 402, "billing_error"),
    ],
)
def test_block_response_on_an_anthropic_route_has_anthropics_error_shape(
    reason: str, status: int, error_type: str
) -> None:
    code, body, headers = block_response(reason, anthropic=True)
    assert code == status
    document = json.loads(body)
    assert set(document) == {"type", "error"}
    assert document["type"] == "error"
    assert document["error"]["type"] == error_type
    assert len(document["error"]["message"]) > 20
    assert headers["X-Token-Meter-Reason"] == reason


@pytest.mark.parametrize(
    ("path", "anthropic"),
    [
        ("/v1/messages", True),
        ("/anthropic/v1/messages", True),
        ("/v1/messages?beta=true", True),
        ("/v1/messages/count_tokens", True),
        ("/v1/chat/completions", False),
        ("/v1/threads/thread_1/messages", False),
        ("/v1/messages/batches", False),
        (None, False),
    ],
)
def test_anthropic_routes_are_told_by_their_path(path: object, anthropic: bool) -> None:
    assert is_anthropic_path(path) is anthropic
