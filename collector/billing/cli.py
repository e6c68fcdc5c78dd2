"""`token-meter-admin stripe setup|status|reconcile`: the billing verbs of the operator's command
line."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import stripe

from ..cli_output import AdminError, fields, table
from .meters import parse_meters
from .reconcile import DEFAULT_SETTLE, parse_instant, period
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


# Comparing a month of many customers takes one Stripe read per customer, meter and part of the
# period, within Stripe's read rate: give the collector minutes, not the usual 30 seconds.
RECONCILE_TIMEOUT = 900.0


class Caller(Protocol):
    """The collector client of `admin_cli` (not imported: it may be running as __main__)."""

    def call(
        self,
        method: str,
        path: str,
        *,
        body: object = None,
        kind: str = "admin",
        timeout: float = ...,
    ) -> tuple[Any, Mapping[str, str]]: ...


def stripe_reconcile(
    client: Caller,
    start: str | None,
    end: str | None,
    settle: float | None,
    *,
    resend: bool = False,
) -> tuple[dict[str, Any], int]:
    """The collector's reconcile answer and the exit status: 1 when it found a difference (with
    `resend`: when one is left that the resent rows do not make up), else 0."""
    try:
        given_start = parse_instant("--from", start) if start is not None else None
        given_end = parse_instant("--to", end) if end is not None else None
        period(
            datetime.now(UTC), given_start, given_end, DEFAULT_SETTLE if settle is None else settle
        )
    except ValueError as exc:
        message = str(exc)
        if message.startswith("from must be earlier"):
            message = "--from must be earlier than --to (by at least a minute)"
        raise AdminError(message) from None
    query = {
        name: value
        for name, value in (("from", start), ("to", end), ("settle", settle))
        if value is not None
    }
    path = "/v1/stripe/reconcile" + ("/resend" if resend else "")
    if query:
        path += "?" + urllib.parse.urlencode(query)
    answer, _ = client.call("POST" if resend else "GET", path, timeout=RECONCILE_TIMEOUT)
    left = answer["unrepaired"] if resend else answer["differences"]
    return answer, 1 if left else 0


def _value(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.6f}".rstrip("0")


def show_reconcile(answer: Mapping[str, Any]) -> str:
    days = answer["days"]
    head = f"from {answer['from']} to {answer['to']} (settle {answer['settle_seconds']:g} s)"
    if not days:
        return head + "\nno usage in the outbox for this period: nothing to compare"
    noted = any(d["note"] for d in days)
    headers = ["customer", "meter", "day", "sent", "stripe", "diff", "pending", "unbillable"]
    headers += ["status", *(["note"] if noted else [])]
    rows = [
        [
            d["customer"] or "(held)",
            d["meter"],
            d["day"],
            _value(d["sent"]),
            _value(d["stripe"]),
            _value(d["difference"]),
            _value(d["pending"]),
            _value(d["unbillable"]),
            d["status"],
            *([d["note"] or ""] if noted else []),
        ]
        for d in days
    ]
    lines = [head, "", table(headers, rows), ""]
    if answer["differences"]:
        lines.append(
            f"{answer['differences']} difference(s): missing = Stripe shows less than was "
            "delivered, extra = more. `--resend` sends again what Stripe provably lacks."
        )
    else:
        waiting = sum(d["status"] in ("settling", "in_flight") for d in days)
        lines.append(
            "Stripe agrees with the outbox"
            + (f" ({waiting} day(s) settling or in flight)." if waiting else ".")
        )
    if "resent" not in answer:
        return "\n".join(lines)
    if answer["resent"]:
        lines += [
            "",
            "handed back to the sync, to be sent under a new identifier:",
            table(
                ["customer", "meter", "window", "value", "identifier", "resent as"],
                [
                    [
                        r["customer"],
                        r["meter"],
                        r["window_start"],
                        _value(r["value"]),
                        r["identifier"],
                        r["resent_as"],
                    ]
                    for r in answer["resent"]
                ],
            ),
        ]
    if answer["not_resent"]:
        lines += [
            "",
            "not resent:",
            table(
                ["customer", "meter", "day", "hour", "shortfall", "reason"],
                [
                    [
                        n["customer"],
                        n["meter"],
                        n["day"],
                        n["hour"] or "(the day)",
                        _value(n["shortfall"]),
                        n["reason"],
                    ]
                    for n in answer["not_resent"]
                ],
            ),
        ]
    left = answer["unrepaired"]
    lines += [
        "",
        f"{left} difference(s) left that the resent rows do not make up"
        if left
        else "The resent rows make up every difference: reconcile again after the settle time.",
    ]
    return "\n".join(lines)
