"""`token-meter-admin stripe setup`: find or create the configured meters, idempotently."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .meters import Meter
from .stripe_api import StripeApi, StripeMeter, meters_by_event_name


@dataclass(frozen=True, slots=True)
class SetupResult:
    meter: Meter
    stripe: StripeMeter
    action: str  # "found", "created", or "inactive" (found but deactivated: not used)


async def ensure_meters(api: StripeApi, meters: Sequence[Meter]) -> list[SetupResult]:
    """Each configured meter as found at Stripe, created (sum aggregation) when missing. A
    deactivated meter is reported, not reactivated: someone at Stripe chose to stop it."""
    existing = meters_by_event_name(await api.list_meters())
    results = []
    for meter in meters:
        found = existing.get(meter.event_name)
        if found is None:
            created = await api.create_meter(meter.event_name, f"token-meter {meter.field}")
            results.append(SetupResult(meter, created, "created"))
        else:
            results.append(SetupResult(meter, found, "found" if found.active else "inactive"))
    return results
