"""Stripe's error answers: one exception carrying the status, envelope fields and headers.

The envelope is `{"error": {"type", "code", "message", "param", "doc_url"}}` (absent fields
left out), the shape stripe-python@v16.1.0:stripe/_api_requestor.py `specific_v1_api_error`
and `specific_v2_api_error` read: the SDK picks its exception class from the HTTP status
(v1) or from `type` first (v2), so the status is what matters most here.
"""

from __future__ import annotations

from typing import Any

DOCS = "https://stripe.com/docs/error-codes/"
RATE_LIMIT_MESSAGE = (
    "Request rate limit exceeded. Learn more about rate limits here "
    "https://stripe.com/docs/rate-limits."
)


class ApiError(Exception):
    """An error answer. `saved` says whether the idempotency layer keeps it for replays: Stripe
    saves a result only once an endpoint started executing, so validation failures, auth
    failures, rate limits and conflicts are never saved."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        saved: bool = True,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.saved = saved

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code:
            error["code"] = self.code
            error["doc_url"] = DOCS + self.code.replace("_", "-")
        if self.param:
            error["param"] = self.param
        return {"error": error}


def invalid(
    message: str, *, param: str | None = None, code: str | None = None, saved: bool = True
) -> ApiError:
    return ApiError(400, message, code=code, param=param, saved=saved)


def no_such(kind: str, ident: str, *, param: str = "id") -> ApiError:
    return ApiError(404, f"No such {kind}: '{ident}'", code="resource_missing", param=param)


def unrecognized_url(method: str, path: str) -> ApiError:
    return ApiError(
        404,
        f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs "
        "or we can help at https://support.stripe.com/.",
        saved=False,
    )


def rate_limited(reason: str, message: str = RATE_LIMIT_MESSAGE) -> ApiError:
    # Stripe does not ask SDKs to retry a real rate limit (only lock timeouts, see
    # Faults.fail_next(code="lock_timeout")); stripe-python@v16.1.0:stripe/_http_client.py
    # `_should_retry` never retries a 429 without `Stripe-Should-Retry: true` anyway.
    return ApiError(
        429,
        message,
        code="rate_limit",
        headers={"Stripe-Rate-Limited-Reason": reason, "Stripe-Should-Retry": "false"},
        saved=False,
    )


def api_error(status: int = 500) -> ApiError:
    return ApiError(
        status,
        "An unknown error occurred while processing your request.",
        type="api_error",
        saved=True,
    )
