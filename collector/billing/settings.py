"""What the Stripe sync is told by the environment (read with the rest in `collector.settings`).

STRIPE_API_KEY / STRIPE_API_KEY_FILE  enables billing; sk_test_ keys are held to test mode's
                                      rate
STRIPE_API_BASE                       both SDK base addresses (`api`, `meter_events`)
TOKEN_METER_STRIPE_METERS             event_name=field pairs (see `meters.py`)
TOKEN_METER_STRIPE_SYNC_INTERVAL      seconds between sync cycles (default 60)
TOKEN_METER_STRIPE_TRANSPORT          meter_events (v1, one event a call, validated at once; the
                                      default) or meter_event_stream (v2, 100 events a call on
                                      session tokens, validated later: see `stream.py`)
TOKEN_METER_STRIPE_MAX_RATE           calls per second (default 25 in test mode, 1000 live)
TOKEN_METER_STRIPE_TIMEOUT            seconds per Stripe call (default 20)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .meters import Meter, parse_meters

if TYPE_CHECKING:
    from ..settings import Secret

TRANSPORTS: Final = ("meter_events", "meter_event_stream")
TEST_MODE_RATE: Final = 25.0  # Stripe's limit on meter events in test mode, per second
LIVE_RATE: Final = 1000.0  # and in live mode


@dataclass(frozen=True)
class StripeSettings:
    api_key: Secret
    api_base: str | None
    meters: tuple[Meter, ...]
    sync_interval: float = 60.0
    transport: str = "meter_events"
    max_rate_override: float | None = None
    timeout: float = 20.0

    def max_rate(self, test_mode: bool) -> float:
        if self.max_rate_override is not None:
            return self.max_rate_override
        return TEST_MODE_RATE if test_mode else LIVE_RATE


NumberReader = Callable[[str, float, float, float], float]


def read_stripe_settings(
    api_key: Secret | None,
    api_base: str | None,
    text: Callable[[str], str | None],
    number: NumberReader,
    problems: list[str],
) -> StripeSettings | None:
    """StripeSettings when a key is set (billing on), else None; problems appended."""
    meters, meter_problems = parse_meters(text("TOKEN_METER_STRIPE_METERS"))
    problems.extend(meter_problems)
    transport = (text("TOKEN_METER_STRIPE_TRANSPORT") or "meter_events").lower()
    if transport not in TRANSPORTS:
        problems.append(f"TOKEN_METER_STRIPE_TRANSPORT must be one of {', '.join(TRANSPORTS)}")
    interval = number("TOKEN_METER_STRIPE_SYNC_INTERVAL", 60.0, 0.05, 86400.0)
    rate = text("TOKEN_METER_STRIPE_MAX_RATE")
    max_rate = number("TOKEN_METER_STRIPE_MAX_RATE", 1.0, 0.1, 10000.0) if rate else None
    timeout = number("TOKEN_METER_STRIPE_TIMEOUT", 20.0, 0.1, 600.0)
    if api_key is None:
        return None
    if not api_key.value.startswith(("sk_", "rk_")):
        problems.append("STRIPE_API_KEY must be a secret or restricted key (sk_... or rk_...)")
    return StripeSettings(
        api_key=api_key,
        api_base=api_base,
        meters=meters,
        sync_interval=interval,
        transport=transport,
        max_rate_override=max_rate,
        timeout=timeout,
    )
