"""FakeStripe: the fake account behind a real HTTP server, on its own thread and event loop.

Every request goes through one pipeline, in the order Stripe's own layers would meet it:

1. route (404 for a URL Stripe does not have), then a planned or random fault that strikes
   before the work;
2. authentication (the secret key, or a meter event session token for the stream);
3. the per-second rate limit (429, not counted);
4. parameters parsed (form with brackets for v1, JSON for v2);
5. the idempotency key: replay the saved answer, refuse other parameters or a key in use;
6. the per-customer-and-meter concurrency limit (429), the configured latency, the endpoint;
7. the answer saved for the key (unless it is a validation error), then a fault that strikes
   after the work: a 500 instead of the answer, a late answer, or no answer at all.

The thread owns the loop, so a test's synchronous SDK calls and an async collector running in
pytest's loop can both talk to the same fake.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, Self

from aiohttp import web

from . import params as p
from .endpoints import CREATE_METER_EVENT, CREATE_V2_METER_EVENT, ROUTES, Call, Endpoints, Route
from .errors import ApiError, api_error, rate_limited, unrecognized_url
from .faults import Fault, Faults
from .idempotency import IdempotencyStore, SavedAnswer, fingerprint
from .limits import RateLimiter, RateLimits
from .state import DAY, Clock, ErrorReport, Meter, MeterEvent, StripeState, UnknownCustomer

if TYPE_CHECKING:
    import stripe

LOCK_TIMEOUT_MESSAGE = (
    "This object cannot be accessed right now because another API request or Stripe process "
    "is currently accessing it. If you see this error intermittently, retry the request."
)
NO_KEY_MESSAGE = (
    "You did not provide an API key. You need to provide your API key in the Authorization "
    "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY')."
)


@dataclass
class RequestRecord:
    """One request as the fake saw it: `params` as parsed (empty if a fault or a refusal came
    before they were read), `status` None when no answer was sent (a drop, or a client that
    gave up during a held answer), `fault` the label of the fault it met."""

    method: str
    path: str
    route: str | None
    request_id: str
    idempotency_key: str | None
    params: dict[str, Any] = field(default_factory=dict)
    status: int | None = None
    error_code: str | None = None
    replayed: bool = False
    fault: str | None = None


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    headers: dict[str, str]
    code: str | None = None

    @classmethod
    def of(cls, error: ApiError) -> _Answer:
        return cls(error.status, _json(error.body()), error.headers, error.code)


def _json(body: Any) -> bytes:
    return json.dumps(body, default=_plain).encode()


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"not JSON: {value!r}")


def _drop(request: web.Request) -> NoReturn:
    """Close the connection without an answer (the client sees a disconnect)."""
    if request.transport is not None:
        request.transport.abort()
    raise asyncio.CancelledError


def fault_error(fault: Fault) -> ApiError:
    if fault.status == 429 and fault.code in (None, "rate_limit"):
        error = rate_limited("global-rate")
    elif fault.status >= 500:
        error = api_error(fault.status)
    else:
        message = LOCK_TIMEOUT_MESSAGE if fault.code == "lock_timeout" else "Injected failure."
        error = ApiError(fault.status, message, code=fault.code)
    if fault.message:
        error.message = fault.message
    if fault.should_retry is not None:
        error.headers["Stripe-Should-Retry"] = "true" if fault.should_retry else "false"
    error.saved = fault.after_work
    return error


class FakeStripe:
    """A stateful Stripe for tests. See the package docstring for the API in one place."""

    def __init__(
        self,
        api_key: str = "sk_test_fake",
        *,
        limits: RateLimits | None = None,
        latency: float | dict[str, float] = 0.0,
        whole_values_only: bool = True,
        unknown_customer: UnknownCustomer = "drop",
        duplicate_code: str | None = None,
        identifier_window: float = DAY,
        session_ttl: float = 15 * 60,
        summary_delay: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        livemode = api_key.startswith(("sk_live_", "rk_live_"))
        self.limits = limits or (RateLimits.live_mode() if livemode else RateLimits.test_mode())
        self.latency = latency
        self.clock = Clock()
        self.state = StripeState(
            livemode=livemode,
            whole_values_only=whole_values_only,
            unknown_customer=unknown_customer,
            duplicate_code=duplicate_code,
            identifier_window=identifier_window,
            session_ttl=session_ttl,
            summary_delay=summary_delay,
            clock=self.clock,
        )
        self.faults = Faults()
        self.requests: list[RequestRecord] = []
        self.url = ""
        self._host, self._port = host, port
        self._endpoints = Endpoints(self.state)
        self._limiter = RateLimiter(lambda: self.limits)
        self._idempotency = IdempotencyStore(self.clock)
        self._records_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(ready, failure), name="fake-stripe", daemon=True
        )
        self._thread.start()
        ready.wait(10)
        if failure:
            raise RuntimeError("the fake Stripe did not start") from failure[0]
        if not self.url:
            raise RuntimeError("the fake Stripe did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(10)
        self._thread = self._loop = self._stopped = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        asyncio.run(self._serve_until_stopped(ready, failure))

    async def _serve_until_stopped(
        self, ready: threading.Event, failure: list[BaseException]
    ) -> None:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that gives up cancels a held (timeout) answer.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        try:
            await runner.setup()
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
            port = runner.addresses[0][1]
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            await runner.cleanup()
            return
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self.url = f"http://{self._host}:{port}"
        ready.set()
        try:
            await self._stopped.wait()
        finally:
            await runner.cleanup()

    # -- the pipeline ----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        request_id = "req_" + secrets.token_hex(7)
        route, args = self._route(request.method, request.path)
        key = request.headers.get("Idempotency-Key") if request.method == "POST" else None
        record = RequestRecord(
            request.method, request.path, route.name if route else None, request_id, key
        )
        with self._records_lock:
            self.requests.append(record)
        try:
            answer = await self._serve(request, route, args or {}, record)
        except ApiError as error:
            answer = _Answer.of(error)
        record.status, record.error_code = answer.status, answer.code
        headers = {
            "Request-Id": request_id,
            "Stripe-Version": request.headers.get("Stripe-Version", "fake"),
            **({"Idempotency-Key": key} if key else {}),
            **answer.headers,
        }
        return web.Response(
            status=answer.status,
            body=answer.body,
            content_type="application/json",
            headers=headers,
        )

    def _route(self, method: str, path: str) -> tuple[Route | None, dict[str, str] | None]:
        for route in ROUTES:
            args = route.match(method, path)
            if args is not None:
                return route, args
        return None, None

    async def _serve(
        self, request: web.Request, route: Route | None, args: dict[str, str], record: RequestRecord
    ) -> _Answer:
        if route is None:
            raise unrecognized_url(request.method, request.path)
        fault = self.faults.take(route.name)
        if fault is not None:
            record.fault = fault.label
            if not fault.after_work:
                if fault.kind == "error":
                    raise fault_error(fault)
                if fault.kind == "timeout":
                    await asyncio.sleep(fault.seconds)
                _drop(request)
        credential = self._authenticate(request, route)
        reason = self._limiter.admit(route.kind)
        if reason is not None:
            raise rate_limited(reason)
        raw = await self._params(request, route)
        record.params = raw
        key = record.idempotency_key
        if key:
            print_ = fingerprint(request.method, request.path, raw)
            saved = self._idempotency.begin(credential, key, print_)
            if saved is not None:
                record.replayed = True
                replay = {"Idempotent-Replayed": "true", "Original-Request": saved.request_id}
                return _Answer(saved.status, saved.body, {**saved.headers, **replay})
        try:
            answer = await self._execute(route, args, raw, key)
            if fault is not None and fault.after_work and fault.kind == "error":
                answer = _Answer.of(fault_error(fault))
            if key:
                self._idempotency.save(
                    credential,
                    key,
                    SavedAnswer(
                        print_,
                        answer.status,
                        answer.body,
                        answer.headers,
                        record.request_id,
                        self.clock.now(),
                    ),
                )
        finally:
            if key:
                self._idempotency.end(credential, key)
        if fault is not None and fault.after_work:
            if fault.kind == "timeout":
                await asyncio.sleep(fault.seconds)
            elif fault.kind == "drop":
                _drop(request)
        return answer

    def _authenticate(self, request: web.Request, route: Route) -> str:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        token = value.strip() if scheme == "Bearer" else ""
        if scheme == "Basic":
            token = base64.b64decode(value).decode(errors="replace").split(":", 1)[0]
        if route.session_auth:
            session = self.state.sessions.get(token)
            if session is None:
                raise ApiError(401, "The meter event session token is invalid.", saved=False)
            if self.clock.now() >= session.expires_at:
                raise ApiError(
                    401,
                    "The temporary session token has expired.",
                    type="temporary_session_expired",
                    code="billing_meter_event_session_expired",
                    saved=False,
                )
            return token
        if not token:
            raise ApiError(401, NO_KEY_MESSAGE, saved=False)
        if token != self.api_key:
            masked = token[:8] + "*" * max(len(token) - 12, 0) + token[-4:]
            raise ApiError(401, f"Invalid API Key provided: {masked}", saved=False)
        return token

    async def _params(self, request: web.Request, route: Route) -> dict[str, Any]:
        if route.v2:
            text = await request.text() if request.method == "POST" else ""
            try:
                body = json.loads(text) if text.strip() else {}
            except ValueError:
                raise ApiError(400, "The request body is not valid JSON.", saved=False) from None
            if not isinstance(body, dict):
                raise ApiError(400, "The request body must be a JSON object.", saved=False)
            return body
        if request.method == "POST":
            pairs = urllib.parse.parse_qsl(await request.text(), keep_blank_values=True)
        else:
            pairs = list(request.query.items())
        try:
            return p.parse_pairs(pairs)
        except p.ParamError as error:
            raise ApiError(
                400, error.message, code=error.code, param=error.param, saved=False
            ) from None

    async def _execute(
        self, route: Route, args: dict[str, str], raw: dict[str, Any], key: str | None
    ) -> _Answer:
        slot = self._concurrency_slot(route, raw)
        if slot is not None and not self._limiter.acquire(slot):
            raise ApiError(
                self.limits.concurrency_status,
                "Too many concurrent requests for this customer and meter. Send one meter "
                "event at a time for each customer and meter.",
                code="rate_limit",
                headers={
                    "Stripe-Rate-Limited-Reason": "endpoint-concurrency",
                    "Stripe-Should-Retry": "false",
                },
                saved=False,
            )
        try:
            delay = (
                self.latency.get(route.name, 0.0)
                if isinstance(self.latency, dict)
                else self.latency
            )
            if delay:
                await asyncio.sleep(delay)
            try:
                body = route.handler(self._endpoints, Call(raw, args, key))
            except p.ParamError as error:
                raise ApiError(
                    400, error.message, code=error.code, param=error.param, saved=False
                ) from None
            except ApiError as error:
                if not error.saved:
                    raise
                return _Answer.of(error)
            return _Answer(200, _json(body), {})
        finally:
            if slot is not None:
                self._limiter.release(slot)

    def _concurrency_slot(self, route: Route, raw: dict[str, Any]) -> tuple[str, str] | None:
        if route.name not in (CREATE_METER_EVENT, CREATE_V2_METER_EVENT):
            return None
        event_name, payload = raw.get("event_name"), raw.get("payload")
        if not isinstance(event_name, str) or not isinstance(payload, dict):
            return None
        meter = self.state.active_meter(event_name)
        customer = payload.get(meter.customer_key if meter else "stripe_customer_id")
        return (customer, event_name) if isinstance(customer, str) else None

    # -- for tests: seeding ----------------------------------------------------------------

    def add_customer(self, id: str | None = None, **fields: Any) -> dict[str, Any]:
        return self.state.add_customer(id, **fields)

    def create_meter(self, event_name: str, display_name: str | None = None, **kw: Any) -> Meter:
        return self.state.create_meter(event_name, display_name, **kw)

    # -- for tests: what happened ----------------------------------------------------------

    def accepted_events(
        self, *, customer: str | None = None, event_name: str | None = None
    ) -> list[MeterEvent]:
        with self.state.lock:
            return [
                e
                for e in self.state.events
                if customer in (None, e.customer) and event_name in (None, e.event_name)
            ]

    def totals(self) -> dict[tuple[str, str], Decimal]:
        return self.state.totals()

    def total(self, customer: str, event_name: str) -> Decimal:
        return self.state.totals().get((customer, event_name), Decimal(0))

    def event_summaries(
        self, meter_id: str, customer: str, start: int, end: int, window: str | None = None
    ) -> list[dict[str, Any]]:
        return self.state.summaries(meter_id, customer, start, end, window)

    @property
    def error_reports(self) -> list[ErrorReport]:
        with self.state.lock:
            return list(self.state.error_reports)

    def error_report_event(self, meter_id: str) -> dict[str, Any]:
        return self.state.error_report_event(meter_id)

    def requests_to(self, route: str | None = None) -> list[RequestRecord]:
        with self._records_lock:
            return [r for r in self.requests if route in (None, r.route)]

    def call_count(self, route: str | None = None, *, status: int | None = None) -> int:
        """How many requests reached the fake (for `route`, with `status` if given)."""
        return sum(1 for r in self.requests_to(route) if status in (None, r.status))

    def call_counts(self) -> Counter[str]:
        return Counter(r.route or f"{r.method} {r.path}" for r in self.requests_to())

    # -- for tests: an SDK client ----------------------------------------------------------

    def sdk_client(self, **options: Any) -> stripe.StripeClient:
        """`stripe.StripeClient` pointed at this fake, without SDK retries (options override,
        e.g. `http_client=stripe.AIOHTTPClient(timeout=1)`)."""
        import stripe  # only here: the fake itself does not need the SDK

        settings: dict[str, Any] = {
            "base_addresses": {"api": self.url, "meter_events": self.url},
            "max_network_retries": 0,
            **options,
        }
        return stripe.StripeClient(self.api_key, **settings)
