"""The answer Kong sends a blocked consumer instead of calling the upstream (contract 1).

The status, body and headers an OpenAI SDK understands, or, on an Anthropic route, the error
shape Anthropic's SDK does; `x-should-retry` tells both SDKs whether a retry can help.
"""

from __future__ import annotations

import re
from typing import Any, Final, NamedTuple

import msgspec

__all__ = [
    "BLOCKLIST_UNAVAILABLE",
    "INSUFFICIENT_CREDITS",
    "PAYMENT_OVERDUE",
    "QUOTA_EXCEEDED",
    "block_response",
    "is_anthropic_path",
]

# The collector's reason codes (contract 1), and the plugin's own for a stale fail-closed list.
INSUFFICIENT_CREDITS: Final = "insufficient_credits"
QUOTA_EXCEEDED: Final = "quota_exceeded"
PAYMENT_OVERDUE: Final = "payment_overdue"
BLOCKLIST_UNAVAILABLE: Final = "blocklist_unavailable"


class _Block(NamedTuple):
    status: int
    openai_type: str
    anthropic_type: str
    message: str
    retry: bool


_PREPAID_MESSAGE: Final = (
    "You have run out of prepaid credit for this API. Add credit to your account, then retry "
    "the request."
)
_BLOCKS: Final = {
    INSUFFICIENT_CREDITS: _Block(
        402, "insufficient_quota", "billing_error", _PREPAID_MESSAGE, retry=False
    ),
    PAYMENT_OVERDUE: _Block(
        402,
        "insufficient_quota",
        "billing_error",
        "An invoice of your account is unpaid or overdue. Pay it, then retry the request.",
        retry=False,
    ),
    QUOTA_EXCEEDED: _Block(
        429,
        "insufficient_quota",
        "rate_limit_error",
        "You have used all the tokens of your monthly quota for this API. Usage resets at the "
        "start of next month (UTC); ask for a higher quota to continue now.",
        retry=False,
    ),
    # Not the consumer's fault and not permanent: the gateway cannot tell whether the consumer
    # may pass (fail-closed, blocklist stale). A retry later can succeed, so the SDK may retry.
    BLOCKLIST_UNAVAILABLE: _Block(
        503,
        "service_unavailable",
        "api_error",
        "The gateway cannot verify your remaining credit and quota right now. Retry in a few "
        "seconds.",
        retry=True,
    ),
}
_SAFE_CODE = re.compile(r"^[a-z0-9_]{1,64}$")
_RETRY_AFTER_SECONDS: Final = "5"
# Anthropic's Messages API (and its token counting) as the client called it, behind any prefix
# the Kong route adds: `/anthropic/v1/messages`.
_ANTHROPIC_PATH = re.compile(r"/v1/messages(?:/count_tokens)?/?$")


def is_anthropic_path(path: object) -> bool:
    """Whether a request path is Anthropic's Messages API, which has its own error shape."""
    return isinstance(path, str) and _ANTHROPIC_PATH.search(path.split("?", 1)[0]) is not None


def block_response(reason: str, *, anthropic: bool = False) -> tuple[int, bytes, dict[str, str]]:
    """Status, JSON body and headers for a request blocked with ``reason`` (contract 1).

    OpenAI's error shape by default, Anthropic's (``{"type": "error", "error": {...}}``) for an
    Anthropic route. A reason this version does not know (a newer collector's) still blocks,
    with 402 and that code.
    """
    code = reason if _SAFE_CODE.match(reason) else "blocked"
    block = _BLOCKS.get(code) or _Block(
        402,
        "insufficient_quota",
        "billing_error",
        f"Requests from your account to this API are blocked (reason: {code}).",
        retry=False,
    )
    error: dict[str, Any]
    if anthropic:
        error = {"type": "error", "error": {"type": block.anthropic_type, "message": block.message}}
    else:
        error = {
            "error": {
                "message": block.message,
                "type": block.openai_type,
                "param": None,
                "code": code,
            }
        }
    headers = {
        "Content-Type": "application/json",
        "X-Token-Meter-Reason": code,
        # Both OpenAI's and Anthropic's SDKs obey it.
        "x-should-retry": "true" if block.retry else "false",
    }
    if block.retry:
        headers["Retry-After"] = _RETRY_AFTER_SECONDS
    return block.status, msgspec.json.encode(error), headers
