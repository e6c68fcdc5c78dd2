"""`token-meter-admin` run as an operator runs it, against a live collector."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import RunningCollector
from tests.factories import usage_event
from token_meter_collector.admin_cli import AdminError, money, parse_amount, table


async def admin(
    collector: RunningCollector, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """The CLI in its own process (the collector answers from this test's event loop)."""
    full_env = {
        "PATH": os.environ.get("PATH", ""),
        "TOKEN_METER_URL": collector.base_url,
        "TOKEN_METER_ADMIN_TOKEN": collector.admin_token,
        "TOKEN_METER_INGEST_TOKEN": collector.ingest_token,
        **(env or {}),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "token_meter_collector.admin_cli",
        *args,
        env=full_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_grant_usage_quota_and_blocklist(collector: RunningCollector) -> None:
    code, out, err = await admin(collector, "grant", "acme", "0.0009", "--key", "inv-1")
    assert code == 0, err
    assert "balance" in out and "0.0009" in out
    code, out, _ = await admin(collector, "grant", "acme", "0.0009", "--key", "inv-1")
    assert code == 0
    assert "nothing new was granted" in out
    await collector.post_events([usage_event(f"e{i}", "acme") for i in range(3)])
    code, out, _ = await admin(collector, "usage", "acme")
    assert code == 0
    assert "360" in out  # total tokens
    assert "-0.00045" in out  # 900 micros granted, 1350 burned
    assert "gpt-4o" in out and "MODEL" in out
    code, out, _ = await admin(collector, "set-quota", "acme", "100")
    assert code == 0
    assert "100" in out
    code, out, _ = await admin(collector, "blocklist")
    assert code == 0
    lines = out.splitlines()
    assert "1 consumer(s) blocked" in lines[0]
    row = next(line for line in lines if line.startswith("acme"))
    assert "insufficient_credits,quota_exceeded" in row
    code, out, _ = await admin(collector, "set-quota", "acme", "none")
    assert code == 0
    code, out, _ = await admin(collector, "--json", "usage", "acme")
    assert json.loads(out)["monthly_token_quota"] is None


async def test_errors_are_one_line_and_exit_2(collector: RunningCollector, tmp_path: Path) -> None:
    code, _, err = await admin(collector, "grant", "acme", "5", "--key", "k")
    assert code == 0
    code, _, err = await admin(collector, "grant", "acme", "6", "--key", "k")
    assert code == 2
    assert "409" in err and "k" in err
    code, _, err = await admin(collector, "usage", "nobody")
    assert (code, "404" in err) == (2, True)
    code, _, err = await admin(collector, "set-quota", "acme", "lots")
    assert code == 2 and "quota must be" in err
    code, _, err = await admin(
        collector, "usage", "acme", env={"TOKEN_METER_ADMIN_TOKEN": collector.ingest_token}
    )
    assert code == 2 and "403" in err
    code, _, err = await admin(
        collector, "usage", "acme", env={"TOKEN_METER_URL": "http://127.0.0.1:9"}
    )
    assert code == 2 and "cannot reach" in err


async def test_the_token_comes_from_the_collectors_data_directory(
    collector: RunningCollector, tmp_path: Path
) -> None:
    (tmp_path / "admin-token").write_text(collector.admin_token + "\n")
    code, _, err = await admin(
        collector,
        "set-quota",
        "acme",
        "1000",
        env={"TOKEN_METER_ADMIN_TOKEN": "", "TOKEN_METER_DATA_DIR": str(tmp_path)},
    )
    assert code == 0, err
    code, _, err = await admin(
        collector,
        "usage",
        "acme",
        env={"TOKEN_METER_ADMIN_TOKEN": "", "TOKEN_METER_DATA_DIR": str(tmp_path / "none")},
    )
    assert code == 2 and "no admin token" in err


def test_amounts_and_money_keep_every_digit() -> None:
    assert parse_amount("12.50") == 12_500_000
    assert parse_amount("0.000001") == 1
    for bad in ("0", "-1", "1.0000001", "ten", "NaN"):
        with pytest.raises(AdminError):
            parse_amount(bad)
    assert money(12_500_000) == "12.50"
    assert money(-450) == "-0.00045"
    assert money(None) == "-"


def test_tables_align_numbers_right() -> None:
    text = table(("NAME", "TOKENS"), [("a", "1,000"), ("long-name", "7")])
    assert text.splitlines() == [
        "NAME       TOKENS",
        "---------  ------",
        "a           1,000",
        "long-name       7",
    ]
