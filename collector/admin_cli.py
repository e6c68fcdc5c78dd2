"""`token-meter-admin`: the operator's command line over the collector's HTTP API.

    token-meter-admin grant CONSUMER AMOUNT --key KEY   grant prepaid credit (AMOUNT in currency
                                                        units, e.g. 25 or 12.50; once per key)
    token-meter-admin set-quota CONSUMER N|none         monthly total-token quota, or none
    token-meter-admin usage CONSUMER                    this month's usage, balance and quota
    token-meter-admin blocklist                         who is blocked, and why
    token-meter-admin stripe setup                      find or create the Stripe meters
    token-meter-admin stripe status                     what the Stripe sync sent and holds
    token-meter-admin stripe reconcile [--from T] [--to T] [--settle S] [--resend]
                                                        the outbox against Stripe, per day

The collector is TOKEN_METER_URL (default http://127.0.0.1:8787). The admin token comes from
TOKEN_METER_ADMIN_TOKEN or TOKEN_METER_ADMIN_TOKEN_FILE, else from the `admin-token` file the
collector generated in its data directory (TOKEN_METER_DATA_DIR). `blocklist` reads the
plugins' endpoint, so it takes the ingest token the same way (TOKEN_METER_INGEST_TOKEN...).
Tokens are never taken from the command line, where the process list would show them.
`stripe setup` talks to Stripe itself, with STRIPE_API_KEY (or STRIPE_API_KEY_FILE),
STRIPE_API_BASE and TOKEN_METER_STRIPE_METERS as the collector reads them.

Exit status: 0 done, 2 on a usage or connection error, or an answer refusing the request;
`stripe reconcile` exits 1 when it finds a difference (with `--resend`: one not repaired)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from .blocklist.reasons import BlockReason
from .cli_output import AdminError, fields, table
from .settings import default_data_dir

DEFAULT_URL = "http://127.0.0.1:8787"
TIMEOUT = 30.0
MICROS = Decimal(1_000_000)


def read_token(env: Mapping[str, str], kind: str) -> str:
    name = f"TOKEN_METER_{kind.upper()}_TOKEN"
    direct = env.get(name, "").strip()
    if direct:
        return direct
    file_name = env.get(f"{name}_FILE", "").strip()
    data_dir = Path(env.get("TOKEN_METER_DATA_DIR", "").strip() or default_data_dir())
    path = Path(file_name) if file_name else data_dir.expanduser() / f"{kind}-token"
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise AdminError(
            f"no {kind} token: set {name} or {name}_FILE, or run where {path} is readable"
            f" ({exc.strerror})"
        ) from None
    if not token:
        raise AdminError(f"the {kind} token file {path} is empty")
    return token


class Client:
    def __init__(self, base_url: str, env: Mapping[str, str]) -> None:
        self.base_url = base_url.rstrip("/")
        self.env = env

    def call(
        self,
        method: str,
        path: str,
        *,
        body: object = None,
        kind: str = "admin",
        timeout: float = TIMEOUT,
    ) -> tuple[Any, Mapping[str, str]]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - the operator's own collector URL
            self.base_url + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {read_token(self.env, kind)}",
                "Accept": "application/json",
                **({"Content-Type": "application/json"} if data is not None else {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                return json.loads(response.read() or b"null"), dict(response.headers)
        except urllib.error.HTTPError as exc:
            raise AdminError(_problem_line(exc)) from None
        except urllib.error.URLError as exc:
            raise AdminError(
                f"cannot reach the collector at {self.base_url}: {exc.reason}"
            ) from None


def _problem_line(exc: urllib.error.HTTPError) -> str:
    try:
        problem = json.loads(exc.read())
    except (ValueError, OSError):
        return f"HTTP {exc.code} {exc.reason}"
    title = problem.get("title", exc.reason)
    detail = problem.get("detail")
    return f"HTTP {exc.code} {title}" + (f": {detail}" if detail else "")


def money(micros: int | None) -> str:
    """Micro-units as currency units, without losing a digit: 12500000 -> 12.50."""
    if micros is None:
        return "-"
    value = Decimal(micros) / MICROS
    text = f"{value:.6f}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.ljust(2, '0')}"


def parse_amount(text: str) -> int:
    """Currency units (e.g. 25, 12.50) as micro-units; more than 6 decimals is refused."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise AdminError(f"amount must be a number of currency units, got {text!r}") from None
    micros = value * MICROS
    if not value.is_finite() or micros != micros.to_integral_value() or micros <= 0:
        raise AdminError("amount must be positive, with at most 6 decimals")
    return int(micros)


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def show_grant(grant: Mapping[str, Any], replayed: bool) -> str:
    return fields(
        [
            ("consumer", grant["consumer"]),
            ("granted", money(grant["amount_micros"])),
            ("balance", money(grant["balance_micros"])),
            ("idempotency key", grant["idempotency_key"]),
            ("grant id", grant["grant_id"]),
            ("granted at", grant["granted_at"]),
            *([("note", "this key was used before: nothing new was granted")] if replayed else []),
        ]
    )


def show_account(account: Mapping[str, Any]) -> str:
    return fields(
        [
            ("consumer", account["consumer"]),
            ("monthly quota", _n(account["monthly_token_quota"])),
            ("prepaid", "yes" if account["prepaid"] else "no"),
            ("balance", money(account["balance_micros"])),
            ("overdraft", money(account["overdraft_micros"])),
            ("low-balance warning at", money(account["low_balance_micros"])),
            ("plan", account["plan"]),
            ("stripe customer", account["stripe_customer_id"]),
        ]
    )


def show_usage(usage: Mapping[str, Any]) -> str:
    summary = fields(
        [
            ("consumer", usage["consumer"]),
            ("period", f"{usage['from']} .. {usage['to']}"),
            ("events", _n(usage["events"])),
            ("input tokens", _n(usage["input_tokens"])),
            ("output tokens", _n(usage["output_tokens"])),
            ("total tokens", _n(usage["total_tokens"])),
            ("monthly quota", _n(usage["monthly_token_quota"])),
            ("quota remaining", _n(usage["quota_remaining_tokens"])),
            ("balance", money(usage["balance_micros"])),
        ]
    )
    rows = [
        (
            m["model"] or "(unknown)",
            _n(m["events"]),
            _n(m["input_tokens"]),
            _n(m["cached_input_tokens"]),
            _n(m["output_tokens"]),
            _n(m["reasoning_tokens"]),
            _n(m["total_tokens"]),
        )
        for m in usage["by_model"]
    ]
    if not rows:
        return summary
    headers = ("MODEL", "EVENTS", "INPUT", "CACHED", "OUTPUT", "REASONING", "TOTAL")
    return summary + "\n\n" + table(headers, rows)


def show_blocklist(snapshot: Mapping[str, Any]) -> str:
    entries = snapshot["entries"]
    head = f"blocklist version {snapshot['version']}: {len(entries)} consumer(s) blocked"
    if not entries:
        return head
    rows = []
    for e in entries:
        detail = e.get("detail") or {}
        if e["reason"] == BlockReason.INSUFFICIENT_CREDITS:
            why = f"balance {money(detail.get('balance_micros'))}"
        elif e["reason"] == BlockReason.PAYMENT_OVERDUE:
            why = f"Stripe invoice {detail.get('invoice', '-')} unpaid"
        else:
            why = (
                f"{_n(detail.get('used_tokens'))} of {_n(detail.get('monthly_token_quota'))}"
                f" tokens until {detail.get('resets_at', '-')}"
            )
        rows.append((e["consumer"], ",".join(e.get("reasons", [e["reason"]])), e["since"], why))
    return head + "\n\n" + table(("CONSUMER", "REASONS", "SINCE", "DETAIL"), rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="token-meter-admin",
        description="Grant credit, set quotas and look at usage and the blocklist of a "
        "token-meter collector.",
        epilog="Tokens come from the environment or the collector's data directory, never from "
        "arguments. See docs/quotas-and-credits.md.",
    )
    parser.add_argument("--url", help=f"the collector (default: TOKEN_METER_URL or {DEFAULT_URL})")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")
    commands = parser.add_subparsers(dest="command", required=True)
    grant = commands.add_parser("grant", help="grant prepaid credit, once per idempotency key")
    grant.add_argument("consumer")
    grant.add_argument("amount", help="in currency units, e.g. 25 or 12.50")
    grant.add_argument(
        "--key", required=True, help="idempotency key: a retry with the same key grants once"
    )
    quota = commands.add_parser("set-quota", help="set or remove the monthly token quota")
    quota.add_argument("consumer")
    quota.add_argument("tokens", help="total tokens per UTC month, or 'none'")
    usage = commands.add_parser("usage", help="this month's usage, balance and quota")
    usage.add_argument("consumer")
    commands.add_parser("blocklist", help="the consumers the gateways stop")
    stripe_parser = commands.add_parser(
        "stripe", help="Stripe billing: setup, status and reconcile"
    )
    stripe_verbs = stripe_parser.add_subparsers(dest="stripe_command", required=True)
    for verb, text in (
        ("setup", "find or create the meters of TOKEN_METER_STRIPE_METERS at Stripe"),
        ("status", "what the collector's Stripe sync has sent, holds and last failed"),
    ):
        # --json after the subcommand too (`stripe status --json`).
        stripe_verbs.add_parser(verb, help=text).add_argument(
            "--json", action="store_true", dest="sub_json", help="print JSON"
        )
    reconcile = stripe_verbs.add_parser(
        "reconcile",
        help="the outbox's totals per customer, meter and UTC day against Stripe's summaries",
        epilog="Exit status 0 when they agree, 1 on a difference, 2 on a usage or connection "
        "error. See docs/billing.md, Reconcile.",
    )
    reconcile.add_argument(
        "--from",
        dest="start",
        metavar="T",
        help="a date or RFC 3339 time, inclusive (default: the start of the UTC month)",
    )
    reconcile.add_argument(
        "--to", dest="end", metavar="T", help="exclusive (default: now minus --settle)"
    )
    reconcile.add_argument(
        "--settle",
        type=float,
        metavar="SECONDS",
        help="how long Stripe's summaries may lag behind what it took (default 3600)",
    )
    reconcile.add_argument(
        "--resend", action="store_true", help="send again what Stripe provably lacks"
    )
    reconcile.add_argument("--json", action="store_true", dest="sub_json", help="print JSON")
    return parser


def run(argv: Sequence[str] | None, env: Mapping[str, str]) -> tuple[str, int]:
    """What to print, and the exit status."""
    args = _parser().parse_args(argv)
    status = 0
    client = Client(args.url or env.get("TOKEN_METER_URL") or DEFAULT_URL, env)
    consumer = urllib.parse.quote(getattr(args, "consumer", ""), safe="")
    answer: Any
    if args.command == "grant":
        amount = parse_amount(args.amount)
        answer, headers = client.call(
            "POST",
            f"/v1/consumers/{consumer}/credits",
            body={"amount_micros": amount, "idempotency_key": args.key},
        )
        text = show_grant(answer, replayed=headers.get("Idempotent-Replayed") == "true")
    elif args.command == "set-quota":
        if args.tokens.lower() == "none":
            tokens = None
        elif args.tokens.replace("_", "").replace(",", "").isdigit():
            tokens = int(args.tokens.replace("_", "").replace(",", ""))
        else:
            raise AdminError(
                f"quota must be a whole number of tokens or 'none', not {args.tokens!r}"
            )
        answer, _ = client.call(
            "PUT", f"/v1/consumers/{consumer}", body={"monthly_token_quota": tokens}
        )
        text = show_account(answer)
    elif args.command == "usage":
        answer, _ = client.call("GET", f"/v1/consumers/{consumer}/usage")
        text = show_usage(answer)
    elif args.command == "stripe":
        from .billing import cli as stripe_cli  # noqa: PLC0415 - the SDK loads for these only

        if args.stripe_command == "setup":
            answer = stripe_cli.stripe_setup(env)
            text = stripe_cli.show_setup(answer)
        elif args.stripe_command == "reconcile":
            answer, status = stripe_cli.stripe_reconcile(
                client, args.start, args.end, args.settle, resend=args.resend
            )
            text = stripe_cli.show_reconcile(answer)
        else:
            answer, _ = client.call("GET", "/v1/stripe/status")
            text = stripe_cli.show_stripe_status(answer)
    else:
        answer, _ = client.call("GET", "/v1/blocklist", kind="ingest")
        text = show_blocklist(answer)
    as_json = args.json or getattr(args, "sub_json", False)
    return (json.dumps(answer, indent=2) if as_json else text), status


def main(argv: Sequence[str] | None = None) -> None:
    try:
        text, status = run(argv, os.environ)
    except AdminError as exc:
        print(f"token-meter-admin: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(text)
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
