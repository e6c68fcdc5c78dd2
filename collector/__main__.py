"""`token-meter-collector`: run the collector, on its embedded PostgreSQL unless DATABASE_URL
is set. Configuration comes from the environment (and `--env-file`), never from arguments that
would show secrets in the process list."""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import replace
from pathlib import Path

import structlog
from aiohttp import web

from .app import create_app
from .database import EmbeddedPostgres
from .ingest.service import tune_garbage_collection
from .observability import configure_logging
from .settings import Settings, SettingsError

log = structlog.get_logger("token_meter.collector")

EMBEDDED_DATABASE_NAME = "token_meter"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="token-meter-collector",
        description="Meter AI token usage sent by the token-meter Kong plugins.",
        epilog="Configuration is read from the environment; see the README.",
    )
    parser.add_argument("--env-file", type=Path, help="a .env-style file of settings")
    parser.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    try:
        settings = Settings.from_env(env_file=args.env_file)
    except SettingsError as exc:
        configure_logging()
        print(f"token-meter-collector: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    if args.check_config:
        print("configuration is valid", file=sys.stderr)
        return
    settings = settings.with_generated_tokens()
    embedded: EmbeddedPostgres | None = None
    if settings.database_url is None:
        embedded = EmbeddedPostgres.start(settings.data_dir / "postgres")
        url = asyncio.run(embedded.prepare(EMBEDDED_DATABASE_NAME))
        settings = replace(settings, database_url=url)
    if settings.stripe is None:
        log.info("stripe_disabled", reason="STRIPE_API_KEY is not set: no Stripe calls")
    else:
        log.info(
            "stripe_enabled",
            meters=[f"{m.event_name}={m.field}" for m in settings.stripe.meters],
            sync_interval=settings.stripe.sync_interval,
            api_base=settings.stripe.api_base or "https://api.stripe.com",
        )
    log.info(
        "collector_starting",
        host=settings.host,
        port=settings.port,
        data_dir=str(settings.data_dir),
        database="embedded" if embedded else "external",
        tls=settings.tls_cert_file is not None,
        ingest_token=str(settings.ingest_token),
        admin_token=str(settings.admin_token),
    )
    tune_garbage_collection()
    try:
        web.run_app(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            shutdown_timeout=settings.shutdown_timeout,
            ssl_context=settings.server_ssl_context(),
            access_log=None,
            print=lambda message: log.info("collector_listening", url=_url(settings)),
            handle_signals=True,
        )
    finally:
        if embedded is not None:
            embedded.stop()
            log.info("embedded_postgres_stopped")


def _url(settings: Settings) -> str:
    scheme = "https" if settings.tls_cert_file is not None else "http"
    return f"{scheme}://{settings.host}:{settings.port}"


if __name__ == "__main__":
    main()
