"""Typed keys of everything the app owns, in one place."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from aiohttp import web

from .accounts.service import AccountService
from .billing.sync import StripeSync
from .billing.webhooks.service import WebhookService
from .blocklist.feed import BlocklistFeed
from .ingest.service import IngestService
from .observability import Metrics
from .pricing.source import PriceBookSource
from .settings import Settings


@dataclass
class Lifecycle:
    """Mutable state of a running app (the app itself is frozen once started)."""

    shutting_down: bool = False


SETTINGS = web.AppKey("settings", Settings)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
METRICS = web.AppKey("metrics", Metrics)
POOL = web.AppKey("pool", asyncpg.Pool)
INGEST = web.AppKey("ingest", IngestService)
BLOCKLIST = web.AppKey("blocklist", BlocklistFeed)
ACCOUNTS = web.AppKey("accounts", AccountService)
PRICING = web.AppKey("pricing", PriceBookSource)
STRIPE_SYNC = web.AppKey("stripe_sync", StripeSync)  # only with Stripe enabled
STRIPE_WEBHOOKS = web.AppKey("stripe_webhooks", WebhookService)  # always (503 without a secret)
# Fields a handler adds to its request's canonical log line.
LOG_FIELDS = web.RequestKey("log_fields", dict)
