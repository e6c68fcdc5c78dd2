"""Settings: every error at once, secrets from env or files, generated tokens."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from token_meter_collector.settings import Settings, SettingsError


def test_defaults(tmp_path: Path) -> None:
    s = Settings.from_env({"TOKEN_METER_DATA_DIR": str(tmp_path)})
    assert (s.host, s.port) == ("127.0.0.1", 8787)
    assert s.embedded_database
    assert s.max_batch_events == 10_000
    assert s.max_batch_bytes == 16 * 1024 * 1024
    assert s.ingest_token is None


def test_all_problems_reported_together() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {
                "TOKEN_METER_PORT": "eighty",
                "TOKEN_METER_ADMIN_TOKEN": "x" * 20,
                "TOKEN_METER_INGEST_TOKEN": "x" * 20,
                "TOKEN_METER_MAX_BATCH_EVENTS": "10",
                "STRIPE_API_BASE": "localhost:12111",
                "TOKEN_METER_PRICE_BOOK": "/nonexistent/prices.toml",
            }
        )
    text = "\n".join(info.value.problems)
    assert len(info.value.problems) == 5
    for name in (
        "TOKEN_METER_PORT",
        "must differ",
        "TOKEN_METER_MAX_BATCH_EVENTS",
        "STRIPE_API_BASE",
        "TOKEN_METER_PRICE_BOOK",
    ):
        assert name in text
    assert "x" * 20 not in str(info.value)


def test_secret_from_file_and_both_set_is_an_error(tmp_path: Path) -> None:
    secret_file = tmp_path / "ingest"
    secret_file.write_text("from-a-file-0123456789\n")
    s = Settings.from_env({"TOKEN_METER_INGEST_TOKEN_FILE": str(secret_file)})
    assert s.ingest_token is not None
    assert s.ingest_token.value == "from-a-file-0123456789"
    assert "from-a-file" not in repr(s)
    with pytest.raises(SettingsError, match="only one of"):
        Settings.from_env(
            {
                "TOKEN_METER_INGEST_TOKEN_FILE": str(secret_file),
                "TOKEN_METER_INGEST_TOKEN": "y" * 20,
            }
        )
    with pytest.raises(SettingsError, match="cannot read"):
        Settings.from_env({"TOKEN_METER_ADMIN_TOKEN_FILE": str(tmp_path / "missing")})


def test_env_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("TOKEN_METER_PORT=9000\nTOKEN_METER_HOST=0.0.0.0\n")
    s = Settings.from_env({"TOKEN_METER_PORT": "9100"}, env_file=env_file)
    assert (s.host, s.port) == ("0.0.0.0", 9100)


def test_generated_tokens_are_private_and_stable(tmp_path: Path) -> None:
    s = Settings.from_env({"TOKEN_METER_DATA_DIR": str(tmp_path)}).with_generated_tokens()
    assert s.ingest_token and s.admin_token
    assert s.ingest_token.value != s.admin_token.value
    for name in ("ingest-token", "admin-token"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    again = Settings.from_env({"TOKEN_METER_DATA_DIR": str(tmp_path)}).with_generated_tokens()
    assert again.ingest_token and again.ingest_token.value == s.ingest_token.value
