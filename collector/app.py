"""The aiohttp application: built by `create_app(settings)`; the pool, the services and every
background task are owned by cleanup contexts, so they start and stop with the app."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import structlog
from aiohttp import web, web_response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .accounts.http import post_credits, put_consumer
from .accounts.service import AccountService
from .auth import Handler, Role, requires
from .billing import store as billing_store
from .billing.error_reports import ErrorReportWebhook
from .billing.http import (
    get_stripe_reconcile,
    get_stripe_status,
    post_stripe_reconcile_resend,
)
from .billing.listener import BillingListener
from .billing.sync import StripeSync
from .billing.webhooks import ERROR_REPORT_TRIGGERED
from .billing.webhooks.http import post_stripe_webhook
from .billing.webhooks.service import WebhookService
from .billing.webhooks.signature import split_secrets
from .blocklist.feed import BlocklistFeed
from .blocklist.http import get_blocklist
from .database import create_pool, ensure_event_partitions, maintain, migrate
from .ingest.http import post_events
from .ingest.service import IngestService
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
    STRIPE_WEBHOOKS,
    Lifecycle,
)
from .observability import Metrics
from .pricing.source import PriceBookSource
from .problems import Problem
from .settings import Settings
from .usage.http import get_usage

log = structlog.get_logger("token_meter.http")

MAINTENANCE_INTERVAL = 300.0
READINESS_TIMEOUT = 2.0
POOL_CLOSE_TIMEOUT = 10.0
# What every answer's `Server` header says: no software name or version to look up flaws by.
SERVER_NAME = "token-meter"


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
    except web.RequestPayloadError as exc:
        # aiohttp could not read the body: it does not decode as its Content-Encoding says, or
        # its chunked framing is broken. The sender's fault; the connection is not reusable.
        cause = getattr(exc.args[0], "message", None) if exc.args else None
        detail = f"the body could not be read: {cause or 'broken framing or encoding'}"
        response = Problem(400, "unreadable-body", "Bad request", detail).response()
        response.force_close()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if isinstance(exc, ConnectionResetError) and request.transport is None:
            # The sender hung up before its body was in (aiohttp's "Connection lost"): no one
            # to answer and nothing stored; counted as 499, nginx's "client closed request".
            response = Problem(499, "client-closed-request", "Client closed request").response()
        elif POOL in request.app and (
            (down := _unavailability(exc)) is not None
            or (down := await _database_failure(request.app)) is not None
        ):
            # Not a bug of ours: PostgreSQL is stopped, restarting or unreachable. A 503 says
            # "retry later" (the plugin keeps the batch and retries it either way).
            log.warning(
                "database_unavailable",
                method=request.method,
                path=request.path,
                error=type(exc).__name__,
                database=type(down).__name__,
            )
            response = Problem(
                503,
                "database-unavailable",
                "Database unavailable",
                "the database does not answer; send the request again later",
                headers={"Retry-After": "1"},
            ).response()
        else:
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


@web.middleware
async def body_deadline_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A body must arrive within TOKEN_METER_BODY_TIMEOUT seconds of its headers (aiohttp
    bounds its size, never its pace): a slower sender is answered 408 and its connection
    closed, so a trickle holds no handler, and nothing it sent is stored.

    The timer watches the bytes received, not the handler reading them: a body that has all
    arrived is never cut off, however long the handler then takes."""
    body = request.content
    if body.is_eof():  # no body, or all of it already here
        return await handler(request)
    seconds = request.app[SETTINGS].body_timeout
    timed_out = Problem(
        408, "body-timeout", "Request timeout", f"the body did not arrive within {seconds:g} s"
    )

    def cut_off() -> None:
        if not body.is_eof():
            body.set_exception(timed_out)  # the handler's next (or current) read raises it

    timer = asyncio.get_running_loop().call_later(seconds, cut_off)
    try:
        return await handler(request)
    except Problem as problem:
        if problem is not timed_out:
            raise
        response = problem.response()
        response.force_close()  # the rest of the body is still on its way: no keep-alive
        return response
    finally:
        timer.cancel()


def connection_deadlines(settings: Settings) -> dict[str, float]:
    """The connection handler's options that bound what a client makes us wait for before
    any middleware runs: its request headers, and an idle keep-alive connection.

    aiohttp has no deadline for the headers as such, but its keep-alive timer is one: it is
    armed when a connection opens and again after each answer, and it closes the connection
    when it fires while no complete request head has arrived, however many bytes of one did
    (aiohttp@3.14.5:aiohttp/web_protocol.py, `connection_made`, `_process_keepalive`; bytes
    received do not re-arm it). So TOKEN_METER_BODY_TIMEOUT bounds the headers too: they must
    be in within that many seconds of the connection opening or of the previous answer, and a
    connection idle that long is closed (no answer: there is no request to answer). Given as
    the app's `handler_args`, which override the runner's, so `web.run_app` (75 s by default)
    and a test's `AppRunner` (3630 s) get the same. The bytes a head may have stay aiohttp's:
    8190 per line, 128 header fields (400 or 431 from its parser, text/plain)."""
    return {"keepalive_timeout": settings.body_timeout}


def _hide_server_software() -> None:
    """aiohttp names itself and Python, versions included, in the `Server` header of every
    answer (aiohttp@3.14.5:aiohttp/web_response.py, `headers.setdefault(hdrs.SERVER,
    SERVER_SOFTWARE)`), the 400s of its HTTP parser too, which no app hook sees; so the default
    it falls back on is replaced, for the whole process."""
    web_response.SERVER_SOFTWARE = SERVER_NAME  # type: ignore[attr-defined]


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


# What the database says when it cannot serve now, whatever it says a moment later: SQLSTATE
# classes 08 (the connection failed or was lost), 53 (out of connections, memory or disk) and 57
# (shutting down, starting up: "not yet accepting connections", a statement cancelled), and a
# connection refused at its address. Known from the failure itself because PostgreSQL that is
# starting up refuses a connection and accepts the next one a few ms later: asking it again
# would find it well and turn its own "retry later" into a 500.
DATABASE_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.OperatorInterventionError,
    ConnectionRefusedError,
)


def _unavailability(exc: BaseException) -> BaseException | None:
    """The exception in `exc`'s chain (itself, its causes and contexts) that says the database
    cannot serve now, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, DATABASE_UNAVAILABLE):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


async def _database_failure(app: web.Application) -> Exception | None:
    """Why the database does not answer a trivial query now (None: it answers)."""
    try:
        async with asyncio.timeout(READINESS_TIMEOUT):
            async with app[POOL].acquire() as conn:
                await conn.fetchval("SELECT 1")
    except Exception as exc:
        return exc
    return None


async def readyz(request: web.Request) -> web.Response:
    failure = await _database_failure(request.app)
    if failure is not None:
        return web.json_response(
            {"status": "unavailable", "database": type(failure).__name__}, status=503
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
    # Before anything that registers a handler with it (WebhookService.register).
    secret = settings.stripe_webhook_secret
    app[STRIPE_WEBHOOKS] = WebhookService(
        app[POOL],
        accounts,
        app[METRICS],
        secrets=split_secrets(secret.value) if secret is not None else (),
        currency=lambda: pricing.current().currency,
        block_on_overdue=settings.block_on_overdue,
    )
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
        # Stripe reports what it dropped of the events it took (the v2 stream always, v1 for
        # customers it checks later) at the webhook endpoint; the sync applies the reports.
        app[STRIPE_WEBHOOKS].register(ERROR_REPORT_TRIGGERED, ErrorReportWebhook(app[METRICS]))
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
    """Every few minutes: partitions ahead, dedupe keys past the horizon forgotten, closed hours
    folded into the month totals (database.maintain)."""
    horizon = timedelta(days=app[SETTINGS].dedupe_horizon_days)
    while True:
        await asyncio.sleep(MAINTENANCE_INTERVAL)
        try:
            await maintain(app[POOL], horizon)
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
    _hide_server_software()
    # client_max_size bounds the body after aiohttp's gzip decoding; 413 past it.
    app = web.Application(
        middlewares=[problem_middleware, body_deadline_middleware],
        client_max_size=settings.max_batch_bytes,
        handler_args=connection_deadlines(settings),
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
    app.router.add_get("/v1/stripe/reconcile", get_stripe_reconcile)
    app.router.add_post("/v1/stripe/reconcile/resend", post_stripe_reconcile_resend)
    app.router.add_post("/v1/stripe/webhook", post_stripe_webhook)  # signed, no bearer token
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app
