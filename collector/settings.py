"""Collector settings: read from the environment (and an optional .env-style file), validated
all at once before any socket opens, so an operator sees every mistake in one run."""

from __future__ import annotations

import os
import secrets
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog
from dotenv import dotenv_values

from .billing.settings import StripeSettings, read_stripe_settings

log = structlog.get_logger("token_meter.settings")

DEFAULT_PORT = 8787
MIN_BATCH_EVENTS = 10_000  # contract 3: a batch of at least 10,000 events must be taken
MIN_BATCH_BYTES = 16 * 1024 * 1024  # contract 3: and at least 16 MiB decompressed
MIN_TOKEN_LENGTH = 16
DEFAULT_BODY_TIMEOUT = 30.0
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")


class SettingsError(Exception):
    """Every configuration problem found, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Secret:
    """A secret value that never shows itself in logs or reprs."""

    value: str = field(repr=False)
    origin: str = "environment"

    def __repr__(self) -> str:
        return f"Secret(origin={self.origin!r})"

    __str__ = __repr__


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    data_dir: Path
    database_url: str | None
    ingest_token: Secret | None
    admin_token: Secret | None
    stripe: StripeSettings | None  # None: no STRIPE_API_KEY, billing off
    stripe_webhook_secret: Secret | None
    price_book: Path | None
    log_level: str
    log_format: str
    db_pool_min: int
    db_pool_max: int
    max_batch_events: int
    max_batch_bytes: int
    shutdown_timeout: float
    blocklist_max_wait: float
    ingest_writers: int
    dedupe_horizon_days: int
    # TOKEN_METER_BLOCK_ON_OVERDUE: a failed or overdue Stripe invoice blocks (payment_overdue).
    block_on_overdue: bool = True
    # TOKEN_METER_BODY_TIMEOUT: seconds a request's body may take to arrive after its headers.
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    # TOKEN_METER_TLS_CERT_FILE and _KEY_FILE: HTTPS with this certificate chain and key.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, env_file: Path | None = None
    ) -> Settings:
        """Build settings from `env` (default os.environ); values in `env` win over `env_file`."""
        merged: dict[str, str] = {}
        problems: list[str] = []
        if env_file is not None:
            if not env_file.is_file():
                problems.append(f"env file {env_file} does not exist")
            else:
                merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        merged.update(os.environ if env is None else env)
        reader = _Reader(merged, problems)

        port = reader.integer("TOKEN_METER_PORT", DEFAULT_PORT, 1, 65535)
        data_dir = Path(reader.text("TOKEN_METER_DATA_DIR") or default_data_dir()).expanduser()
        database_url = reader.text("DATABASE_URL")
        if database_url and not database_url.startswith(("postgres://", "postgresql://")):
            problems.append("DATABASE_URL must start with postgresql:// or postgres://")
        ingest_token = reader.secret("TOKEN_METER_INGEST_TOKEN")
        admin_token = reader.secret("TOKEN_METER_ADMIN_TOKEN")
        for name, token in (
            ("TOKEN_METER_INGEST_TOKEN", ingest_token),
            ("TOKEN_METER_ADMIN_TOKEN", admin_token),
        ):
            if token is not None and len(token.value) < MIN_TOKEN_LENGTH:
                problems.append(f"{name} must be at least {MIN_TOKEN_LENGTH} characters long")
        if ingest_token and admin_token and ingest_token.value == admin_token.value:
            problems.append("TOKEN_METER_INGEST_TOKEN and TOKEN_METER_ADMIN_TOKEN must differ")
        stripe_api_base = reader.text("STRIPE_API_BASE")
        if stripe_api_base and not stripe_api_base.startswith(("http://", "https://")):
            problems.append("STRIPE_API_BASE must be an http:// or https:// URL")
        stripe = read_stripe_settings(
            reader.secret("STRIPE_API_KEY"), stripe_api_base, reader.text, reader.number, problems
        )
        webhook_secret = reader.secret("STRIPE_WEBHOOK_SECRET")
        if webhook_secret is not None and not all(
            part.strip().startswith("whsec_") for part in webhook_secret.value.split(",")
        ):
            problems.append(
                "STRIPE_WEBHOOK_SECRET must be a webhook signing secret (whsec_...), or several"
                " separated by commas"
            )
        price_book_text = reader.text("TOKEN_METER_PRICE_BOOK")
        price_book = Path(price_book_text).expanduser() if price_book_text else None
        if price_book is not None and not price_book.is_file():
            problems.append(f"TOKEN_METER_PRICE_BOOK: {price_book} is not a readable file")
        tls_cert_file, tls_key_file = _tls_files(reader, problems)
        log_level = (reader.text("TOKEN_METER_LOG_LEVEL") or "info").lower()
        if log_level not in LOG_LEVELS:
            problems.append(f"TOKEN_METER_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
        log_format = (reader.text("TOKEN_METER_LOG_FORMAT") or "auto").lower()
        if log_format not in LOG_FORMATS:
            problems.append(f"TOKEN_METER_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}")
        pool_min = reader.integer("TOKEN_METER_DB_POOL_MIN", 2, 1, 1000)
        pool_max = reader.integer("TOKEN_METER_DB_POOL_MAX", 10, 1, 1000)
        if pool_min > pool_max:
            problems.append("TOKEN_METER_DB_POOL_MIN must not exceed TOKEN_METER_DB_POOL_MAX")
        max_events = reader.integer(
            "TOKEN_METER_MAX_BATCH_EVENTS", MIN_BATCH_EVENTS, MIN_BATCH_EVENTS, 1_000_000
        )
        max_bytes = reader.integer(
            "TOKEN_METER_MAX_BATCH_BYTES", MIN_BATCH_BYTES, MIN_BATCH_BYTES, 1024 * 1024 * 1024
        )
        settings = cls(
            host=reader.text("TOKEN_METER_HOST") or "127.0.0.1",
            port=port,
            data_dir=data_dir,
            database_url=database_url,
            ingest_token=ingest_token,
            admin_token=admin_token,
            stripe=stripe,
            stripe_webhook_secret=webhook_secret,
            price_book=price_book,
            log_level=log_level,
            log_format=log_format,
            db_pool_min=pool_min,
            db_pool_max=pool_max,
            max_batch_events=max_events,
            max_batch_bytes=max_bytes,
            shutdown_timeout=reader.number("TOKEN_METER_SHUTDOWN_TIMEOUT", 30.0, 0.0, 3600.0),
            blocklist_max_wait=reader.number("TOKEN_METER_BLOCKLIST_MAX_WAIT", 60.0, 0.0, 60.0),
            ingest_writers=reader.integer("TOKEN_METER_INGEST_WRITERS", 2, 1, 32),
            dedupe_horizon_days=reader.integer("TOKEN_METER_DEDUPE_HORIZON_DAYS", 90, 2, 3650),
            block_on_overdue=reader.boolean("TOKEN_METER_BLOCK_ON_OVERDUE", True),
            body_timeout=reader.number(
                "TOKEN_METER_BODY_TIMEOUT", DEFAULT_BODY_TIMEOUT, 0.01, 3600.0
            ),
            tls_cert_file=tls_cert_file,
            tls_key_file=tls_key_file,
        )
        if problems:
            raise SettingsError(problems)
        return settings

    def server_ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context the collector serves with, None for plain HTTP."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        return _server_ssl_context(self.tls_cert_file, self.tls_key_file)

    def with_generated_tokens(self) -> Settings:
        """Tokens not configured are generated once and kept in the data directory (mode 0600),
        so the one-command start is secure and a restart keeps the same tokens."""
        ingest = self.ingest_token or _stored_token(self.data_dir / "ingest-token")
        admin = self.admin_token or _stored_token(self.data_dir / "admin-token")
        return replace(self, ingest_token=ingest, admin_token=admin)


def _tls_files(reader: _Reader, problems: list[str]) -> tuple[Path | None, Path | None]:
    """Both TLS files or neither; set, they must load as a certificate chain and its key."""
    cert_text = reader.text("TOKEN_METER_TLS_CERT_FILE")
    key_text = reader.text("TOKEN_METER_TLS_KEY_FILE")
    if cert_text is None and key_text is None:
        return None, None
    if cert_text is None or key_text is None:
        problems.append(
            "set both TOKEN_METER_TLS_CERT_FILE and TOKEN_METER_TLS_KEY_FILE, or neither"
        )
        return None, None
    cert, key = Path(cert_text).expanduser(), Path(key_text).expanduser()
    try:
        _server_ssl_context(cert, key)
    except _EncryptedKey:
        reason = "the key is encrypted; give the collector an unencrypted key file"
    except ssl.SSLError as exc:  # not PEM, or a key that is not the certificate's
        reason = exc.reason or str(exc)
    except OSError as exc:
        reason = exc.strerror or str(exc)
    else:
        return cert, key
    problems.append(
        f"TOKEN_METER_TLS_CERT_FILE / _KEY_FILE: cannot load {cert} with {key}: {reason}"
    )
    return None, None


def _server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    # Python's defaults for a server: TLS 1.2 or later, no compression, secure ciphers.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # A passphrase is never asked for (OpenSSL would prompt on the terminal): the key file
    # must be unencrypted, readable by the collector only.
    context.load_cert_chain(cert, key, password=_no_passphrase)
    return context


class _EncryptedKey(Exception):
    """TOKEN_METER_TLS_KEY_FILE holds a key that needs a passphrase."""


def _no_passphrase() -> bytes:
    raise _EncryptedKey


def default_data_dir() -> Path:
    """root: /var/lib/token-meter (never under root's home: the embedded server would loosen the
    permissions of every directory above its data). Others: the XDG data home."""
    if os.geteuid() == 0:
        return Path("/var/lib/token-meter")
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "token-meter"


def _stored_token(path: Path) -> Secret:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = ""
    if len(value) < MIN_TOKEN_LENGTH:
        value = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")
        log.warning("token_generated", path=str(path))
    path.chmod(0o600)
    return Secret(value, origin=str(path))


class _Reader:
    def __init__(self, env: Mapping[str, str], problems: list[str]) -> None:
        self.env = env
        self.problems = problems

    def text(self, name: str) -> str | None:
        value = self.env.get(name, "").strip()
        return value or None

    def secret(self, name: str) -> Secret | None:
        """`NAME` or `NAME_FILE` (a file holding the secret); both set is ambiguous."""
        direct = self.env.get(name, "").strip()
        file_name = self.env.get(f"{name}_FILE", "").strip()
        if direct and file_name:
            self.problems.append(f"set only one of {name} and {name}_FILE")
            return None
        if file_name:
            try:
                value = Path(file_name).read_text().strip()
            except OSError as exc:
                self.problems.append(f"{name}_FILE: cannot read {file_name}: {exc.strerror}")
                return None
            if not value:
                self.problems.append(f"{name}_FILE: {file_name} is empty")
                return None
            return Secret(value, origin=file_name)
        return Secret(direct) if direct else None

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        value = raw.lower()
        if value in ("true", "1", "yes", "on"):
            return True
        if value in ("false", "0", "no", "off"):
            return False
        self.problems.append(f"{name} must be true or false, got {raw!r}")
        return default

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{name} must be an integer, got {raw!r}")
            return default
        if not low <= value <= high:
            self.problems.append(f"{name} must be between {low} and {high}, got {value}")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.problems.append(f"{name} must be a number, got {raw!r}")
            return default
        if not low <= value <= high:
            self.problems.append(f"{name} must be between {low} and {high}, got {value}")
        return value
