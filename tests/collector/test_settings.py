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


def test_webhook_secret_and_blocking_on_overdue_invoices(tmp_path: Path) -> None:
    base = {"TOKEN_METER_DATA_DIR": str(tmp_path)}
    s = Settings.from_env(base)
    assert (s.stripe_webhook_secret, s.block_on_overdue) == (None, True)
    s = Settings.from_env(
        {**base, "STRIPE_WEBHOOK_SECRET": "whsec_a,whsec_b", "TOKEN_METER_BLOCK_ON_OVERDUE": "no"}
    )
    assert s.stripe_webhook_secret is not None and "whsec" not in repr(s)
    assert s.block_on_overdue is False
    (tmp_path / "webhook-secret").write_text("whsec_from_a_file\n")
    s = Settings.from_env({**base, "STRIPE_WEBHOOK_SECRET_FILE": str(tmp_path / "webhook-secret")})
    assert s.stripe_webhook_secret is not None
    assert s.stripe_webhook_secret.value == "whsec_from_a_file"
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {**base, "STRIPE_WEBHOOK_SECRET": "sk_test_x", "TOKEN_METER_BLOCK_ON_OVERDUE": "maybe"}
        )
    assert len(info.value.problems) == 2
    assert "whsec_" in info.value.problems[0] and "sk_test_x" not in str(info.value)
    assert "TOKEN_METER_BLOCK_ON_OVERDUE must be true or false" in info.value.problems[1]


def test_every_secret_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    """The two tokens and both Stripe secrets: `NAME` or `NAME_FILE`, never shown by repr."""
    secrets = {
        "TOKEN_METER_INGEST_TOKEN": "ingest-from-a-file-0123456789",
        "TOKEN_METER_ADMIN_TOKEN": "admin-from-a-file-0123456789",
        "STRIPE_API_KEY": "sk_test_from_a_file_0123456789",
        "STRIPE_WEBHOOK_SECRET": "whsec_from_a_file_0123456789",
    }
    env = {"TOKEN_METER_DATA_DIR": str(tmp_path)}
    for name, value in secrets.items():
        (tmp_path / name).write_text(f"{value}\n")
        env[f"{name}_FILE"] = str(tmp_path / name)
    s = Settings.from_env(env)
    assert s.ingest_token is not None and s.admin_token is not None and s.stripe is not None
    assert s.stripe_webhook_secret is not None
    read = [s.ingest_token, s.admin_token, s.stripe.api_key, s.stripe_webhook_secret]
    assert [secret.value for secret in read] == list(secrets.values())
    assert [secret.origin for secret in read] == [env[f"{name}_FILE"] for name in secrets]
    for value in secrets.values():
        assert value not in repr(s) and value not in str(s)


def test_the_body_timeout_defaults_to_30_seconds_and_must_be_positive(tmp_path: Path) -> None:
    base = {"TOKEN_METER_DATA_DIR": str(tmp_path)}
    assert Settings.from_env(base).body_timeout == 30.0
    assert Settings.from_env({**base, "TOKEN_METER_BODY_TIMEOUT": "2.5"}).body_timeout == 2.5
    for wrong in ("0", "-1", "soon", "7200"):
        with pytest.raises(SettingsError, match="TOKEN_METER_BODY_TIMEOUT"):
            Settings.from_env({**base, "TOKEN_METER_BODY_TIMEOUT": wrong})
