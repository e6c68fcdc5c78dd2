"""The `Stripe-Signature` check: the official SDK's signature check, and our own on time.

`Stripe-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>" with the endpoint's
secret>[,v1=...]` (several v1 signatures while Stripe rolls a secret). The SDK's
`WebhookSignature.verify_header` (stripe-python@v16.1.0:stripe/_webhook.py) parses the header
and compares the signatures in constant time; it is called without a tolerance, and the
timestamp (which the signature covers) is checked here against our clock, both ways: the SDK
would refuse only timestamps more than `tolerance` seconds old and let any future one pass,
while the contract is "within 300 s". Snapshot events and v2 thin event notifications are
signed the same way.

Several secrets may be configured (STRIPE_WEBHOOK_SECRET, comma-separated): each Stripe
destination posting to this endpoint has its own (a snapshot webhook endpoint and a thin-event
destination for the v2 meter event stream's error reports, say). A body passes when any of them
verifies it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Final

import stripe

TOLERANCE: Final = 300  # seconds, both ways


class SignatureRefused(Exception):
    """The body is not proven to come from Stripe, or not recently: 400, nothing recorded."""


def split_secrets(value: str) -> tuple[str, ...]:
    """The configured secrets: one, or several comma-separated."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def verify(
    body: bytes,
    header: str | None,
    secrets: Sequence[str],
    *,
    clock: Callable[[], float] = time.time,
) -> None:
    """Return when one of `secrets` signed `body` within TOLERANCE seconds of `clock`; raise
    SignatureRefused otherwise."""
    if not header:
        raise SignatureRefused("no Stripe-Signature header")
    try:
        text = body.decode("utf-8")  # what Stripe signs, and what the SDK would decode
    except UnicodeDecodeError:
        raise SignatureRefused("the body is not UTF-8") from None
    failures: list[str] = []
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(text, header, secret, None)
        except stripe.SignatureVerificationError as exc:
            failures.append(str(exc.user_message or exc))
            continue
        skew = _timestamp(header) - clock()
        if skew < -TOLERANCE:
            raise SignatureRefused(f"the signature's timestamp is more than {TOLERANCE} s old")
        if skew > TOLERANCE:
            raise SignatureRefused(f"the signature's timestamp is more than {TOLERANCE} s ahead")
        return
    raise SignatureRefused(failures[0] if failures else "no webhook secret is configured")


def _timestamp(header: str) -> int:
    # Read as the SDK reads it (the first `t`), so the time checked is the one it verified.
    for item in header.split(","):
        parts = item.split("=", 2)
        if parts[0] == "t" and len(parts) > 1:
            return int(parts[1])
    raise SignatureRefused("no timestamp in Stripe-Signature")
