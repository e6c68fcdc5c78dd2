"""`token-meter-admin stripe setup|status`: the billing verbs of the operator's command line."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import stripe

from ..cli_output import AdminError, fields, table
from .meters import parse_meters
from .setup import ensure_meters
from .stripe_api import StripeApi


def stripe_setup(env: Mapping[str, str]) -> list[dict[str, Any]]:
    """Find or create the configured meters at Stripe; one dict per meter."""
    key = _stripe_key(env)
    meters, problems = parse_meters(env.get("TOKEN_METER_STRIPE_METERS"))
    if problems:
        raise AdminError("; ".join(problems))
    base = env.get("STRIPE_API_BASE", "").strip() or None

    async def run() -> list[dict[str, Any]]:
        api = StripeApi(key, api_base=base)
        try:
            results = await ensure_meters(api, meters)
        finally:
            await api.close()
        return [
            {
                "event_name": r.meter.event_name,
                "field": r.meter.field,
                "meter_id": r.stripe.id,
                "status": r.stripe.status,
                "action": r.action,
            }
            for r in results
        ]

    try:
        return asyncio.run(run())
    except stripe.StripeError as exc:
        raise AdminError(f"Stripe refused: {exc.user_message or exc}") from None


def _stripe_key(env: Mapping[str, str]) -> str:
    direct = env.get("STRIPE_API_KEY", "").strip()
    file_name = env.get("STRIPE_API_KEY_FILE", "").strip()
    if direct:
        return direct
    if file_name:
        try:
            key = Path(file_name).read_text().strip()
        except OSError as exc:
            raise AdminError(
                f"STRIPE_API_KEY_FILE: cannot read {file_name}: {exc.strerror}"
            ) from None
        if key:
            return key
    raise AdminError("no Stripe key: set STRIPE_API_KEY or STRIPE_API_KEY_FILE")


def show_setup(results: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        table(
            ["meter", "field", "meter id", "status", "action"],
            [
                [r["event_name"], r["field"], r["meter_id"], r["status"], r["action"]]
                for r in results
            ],
        )
    ]
    if any(r["action"] == "inactive" for r in results):
        lines.append(
            "an inactive meter is not used: reactivate it at Stripe, or name another meter"
        )
    return "\n".join(lines)


def show_stripe_status(status: Mapping[str, Any]) -> str:
    if not status["enabled"]:
        return "Stripe billing is off (the collector has no STRIPE_API_KEY)"
    oldest = status["oldest_pending_seconds"]
    lines = [
        fields(
            [
                ("transport", status["transport"]),
                ("pending rows", status["pending_rows"]),
                ("oldest pending", "-" if oldest is None else f"{oldest:.0f} s"),
                ("held consumers", status["held_consumers"]),
                ("unbillable rows", status.get("unbillable_rows", 0)),
                ("last sent", status["last_sent_at"] or "never"),
                ("leader", status.get("leader") or "none yet"),
            ]
        ),
        "",
        table(
            ["meter", "field", "meter id", "active"],
            [
                [m["event_name"], m["field"], m["meter_id"] or "-", "yes" if m["active"] else "no"]
                for m in status["meters"]
            ],
        ),
    ]
    if status["held"]:
        lines += [
            "",
            table(
                ["held consumer", "reason"], [[h["consumer"], h["reason"]] for h in status["held"]]
            ),
        ]
    if status["errors"]:
        lines += [
            "",
            table(
                ["at", "meter", "code", "message"],
                [[e["at"], e["meter"] or "-", e["code"], e["message"]] for e in status["errors"]],
            ),
        ]
    return "\n".join(lines)
