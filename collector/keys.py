"""Typed keys of everything the app owns, in one place."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from .blocklist.feed import BlocklistFeed
from .ingest.service import IngestService
from .observability import Metrics
from .settings import Settings

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
POOL = web.AppKey("pool", asyncpg.Pool)
INGEST = web.AppKey("ingest", IngestService)
BLOCKLIST = web.AppKey("blocklist", BlocklistFeed)
# Fields a handler adds to its request's canonical log line.
LOG_FIELDS = web.RequestKey("log_fields", dict)
