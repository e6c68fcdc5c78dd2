"""The aiohttp application: built by `create_app(settings)`; the pool, the services and every
background task are owned by cleanup contexts, so they start and stop with the app."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .accounts.http import post_credits, put_consumer
from .accounts.service import AccountService
from .auth import Handler, Role, requires
from .billing import store as billing_store
from .billing.http import get_stripe_status
from .billing.listener import BillingListener
from .billing.sync import StripeSync
from .blocklist.feed import BlocklistFeed
from .blocklist.http import get_blocklist
from .database import create_pool, ensure_event_partitions, migrate
from .ingest.http import post_events
from .ingest.service import IngestService
from .ingest.store import prune_event_keys
from .keys import (
    ACCOUNTS,
    BLOCKLIST,
    INGEST,
    LIFECYCLE,
    LOG_FIELDS,
    METRICS,
    POOL,
    PRICING,
    SETTINGS,
    STRIPE_SYNC,
    Lifecycle,
)
from .observability import Metrics
from .pricing.source import PriceBookSource
from .problems import Problem
from .settings import Settings
from .usage.http import get_usage

log = structlog.get_logger("token_meter.http")

MAINTENANCE_INTERVAL = 3600.0
READINESS_TIMEOUT = 2.0
POOL_CLOSE_TIMEOUT = 10.0


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One canonical log line and metrics per request; every error as problem+json."""
    started = time.perf_counter()
    try:
        response = await handler(request)
    except Problem as problem:
        response = problem.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _http_problem(exc)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("request_failed", method=request.method, path=request.path)
        response = Problem(500, "internal-error", "Internal server error").response()
    if request.app[LIFECYCLE].shutting_down:
        response.force_close()
    elapsed = time.perf_counter() - started
    route = request.match_info.route.resource
    route_name = route.canonical if route is not None else "unmatched"
    metrics = request.app[METRICS]
    metrics.requests.labels(request.method, route_name, str(response.status)).inc()
    metrics.request_seconds.labels(request.method, route_name).observe(elapsed)
    if route_name not in ("/healthz", "/readyz", "/metrics"):
        log.info(
            "http_request",
            method=request.method,
            path=request.path,
            status=response.status,
            duration_ms=round(elapsed * 1000, 2),
            **request.get(LOG_FIELDS, {}),
        )
    return response


def _http_problem(exc: web.HTTPException) -> web.Response:
    slugs = {
        404: "not-found",
        405: "method-not-allowed",
        413: "payload-too-large",
    }
    detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else None
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    return Problem(
        exc.status, slugs.get(exc.status, "http-error"), exc.reason, detail, headers=headers
    ).response()


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        async with asyncio.timeout(READINESS_TIMEOUT):
            async with request.app[POOL].acquire() as conn:
                await conn.fetchval("SELECT 1")
    except Exception as exc:
        return web.json_response(
            {"status": "unavailable", "database": type(exc).__name__}, status=503
        )
    return web.json_response({"status": "ready", "database": "ok"})


@requires(Role.ADMIN)
async def metrics_endpoint(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    pool = request.app[POOL]
    size, idle = pool.get_size(), pool.get_idle_size()
    metrics.pool_connections.labels("in_use").set(size - idle)
    metrics.pool_connections.labels("idle").set(idle)
    metrics.pool_connections.labels("max").set(pool.get_max_size())
    return web.Response(
        body=generate_latest(metrics.registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    assert settings.database_url is not None, "start the embedded database before the app"
    pool = await create_pool(
        settings.database_url, min_size=settings.db_pool_min, max_size=settings.db_pool_max
    )
    try:
        await migrate(pool)
        await ensure_event_partitions(pool)
        app[POOL] = pool
        yield
    finally:
        # Graceful close waits for connections to come back; a database that went away must
        # not hold the shutdown, so it is bounded.
        try:
            await asyncio.wait_for(pool.close(), POOL_CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("database_pool_close_timeout", seconds=POOL_CLOSE_TIMEOUT)
            pool.terminate()


async def _services(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # Loaded before anything listens: a bad price book stops the start.
    pricing = PriceBookSource(settings.price_book, app[METRICS])
    app[PRICING] = pricing
    accounts = AccountService(app[POOL], app[METRICS])
    app[ACCOUNTS] = accounts
    ingest = IngestService(
        app[POOL],
        app[METRICS],
        max_events=settings.max_batch_events,
        writers=settings.ingest_writers,
        dedupe_horizon=timedelta(days=settings.dedupe_horizon_days),
    )
    ingest.pricing = pricing.current
    ingest.listeners.append(accounts)  # burn and rules in the ingest commit
    ingest.listeners.append(BillingListener(stripe_enabled=settings.stripe is not None))
    await ingest.start()
    app[INGEST] = ingest
    feed = BlocklistFeed(app[POOL], app[METRICS])
    await feed.start()
    app[BLOCKLIST] = feed
    await pricing.start()
    await accounts.start()
    sync: StripeSync | None = None
    if settings.stripe is None:
        await billing_store.forget_initialization(app[POOL])
    else:
        sync = StripeSync(app[POOL], settings.stripe, app[METRICS])
        await sync.start()
        app[STRIPE_SYNC] = sync
    maintenance = asyncio.create_task(_maintenance(app), name="maintenance")
    try:
        yield
    finally:
        maintenance.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await maintenance
        if sync is not None:
            await sync.stop()
        await accounts.stop()
        await pricing.stop()
        await feed.stop()
        await ingest.stop()


async def _maintenance(app: web.Application) -> None:
    """Hourly: partitions for the coming month, and dedupe keys past the horizon forgotten."""
    horizon = timedelta(days=app[SETTINGS].dedupe_horizon_days)
    while True:
        await asyncio.sleep(MAINTENANCE_INTERVAL)
        try:
            await ensure_event_partitions(app[POOL])
            removed = await prune_event_keys(app[POOL], horizon)
            if removed:
                log.info("event_keys_pruned", removed=removed, horizon_days=horizon.days)
        except Exception:
            log.exception("maintenance_failed")


async def _begin_shutdown(app: web.Application) -> None:
    """From now on every answer closes its connection, so keep-alive clients (plugins polling
    or shipping) move on and the graceful shutdown only waits for requests in flight."""
    app[LIFECYCLE].shutting_down = True
    if BLOCKLIST in app:
        await app[BLOCKLIST].release_waiters()


def create_app(settings: Settings) -> web.Application:
    """The collector app. `settings` must carry a database URL and both tokens."""
    if settings.ingest_token is None or settings.admin_token is None:
        raise ValueError("both tokens must be configured (see Settings.with_generated_tokens)")
    # client_max_size bounds the body after aiohttp's gzip decoding; 413 past it.
    app = web.Application(
        middlewares=[problem_middleware], client_max_size=settings.max_batch_bytes
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[LIFECYCLE] = Lifecycle()
    app.on_shutdown.append(_begin_shutdown)
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_services)
    app.router.add_post("/v1/events", post_events)
    app.router.add_get("/v1/blocklist", get_blocklist)
    app.router.add_get("/v1/consumers/{consumer}/usage", get_usage)
    app.router.add_put("/v1/consumers/{consumer}", put_consumer)
    app.router.add_post("/v1/consumers/{consumer}/credits", post_credits)
    app.router.add_get("/v1/stripe/status", get_stripe_status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app
