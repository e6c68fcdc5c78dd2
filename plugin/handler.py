"""The two plugins' phase handlers: PDK calls in, plain data to the pure functions, event out.

Every PDK call is a round trip to Kong over the plugin-server socket (about 90 µs, more than all
the rest of the work), so each one below is justified where it is made. A metered, non-streaming
request costs 6 (token-meter) or 2 (token-meter-log); blocking and stream-usage injection aside:

    token-meter      access   kong.client.get_consumer
                     response kong.client.get_consumer, kong.router.get_route,
                              kong.service.response.get_status, .get_raw_body,
                              kong.nginx.req_start_time
    token-meter-log  access   kong.client.get_consumer
                     log      kong.log.serialize

Left out on purpose, each a round trip per request:
- `kong.ctx.shared` to carry the consumer from access to response: a set plus a get cost two
  calls to save one (`kong.ctx.plugin` does not work over the plugin server at all).
- `kong.service.response.get_headers` for Content-Type/Content-Encoding: `extract_usage` tells
  JSON from SSE by the first bytes, and `sniff_content_encoding` recognises gzip and zlib by their
  magic bytes; anything else that is not plain text is tried as brotli.
- `kong.router.get_service`: the route carries the service id; its name comes from a small
  process-wide cache, filled by one call per service and SERVICE_NAME_TTL_S.
- Kong's request id (`kong.nginx.get_var("kong_request_id")`): the event id is a UUIDv7 made
  here, once per request, so it stays the same through every retry and the collector's dedupe on
  (source, id) holds.

A handler never calls the PDK after `kong.response.exit` and always returns right after it;
`guard_phase` turns any exception into a log line (KONG-PLUGIN-SERVER.md, defects 1 and 2).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any, Final

from .blocklist import BlocklistSettings, block_response, close_all, get_blocklist
from .config import TOKEN_METER, TOKEN_METER_LOG, PluginConfig
from .event import build_usage_event
from .guards import guard_phase
from .request_body import inject_stream_usage
from .shipping import ShippingSettings, get_shipper, shutdown_all
from .usage import Usage, extract_usage, usage_from_ai_proxy_log

log = logging.getLogger("token_meter_plugin")

ANONYMOUS: Final = "anonymous"
SERVICE_NAME_TTL_S: Final = 60.0
REASON_HEADER: Final = "x-token-meter-reason"
SHIPPER_SHUTDOWN_S: Final = 4.0  # within server.SHUTDOWN_GRACE_S

_GZIP_MAGIC: Final = b"\x1f\x8b"
_PLAIN_STARTS: Final = frozenset(b"{[ \t\r\n:" + b"deir")  # JSON, SSE field names, a BOM's tail
_UTF8_BOM: Final = b"\xef\xbb\xbf"


# --- pure helpers (no PDK) ---------------------------------------------------------------------


def clean_text(value: Any) -> str | None:
    """A string from Kong, fit for JSON: a byte that was not UTF-8 (kept by the RPC layer as a
    lone surrogate, defect 4) becomes U+FFFD. Anything that is not a non-empty string is None."""
    if not isinstance(value, str) or not value:
        return None
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def consumer_subject(consumer: Mapping[str, Any] | None, identifier: str) -> str:
    """The customer a request belongs to: the consumer's configured field, else its id."""
    if not consumer:
        return ANONYMOUS
    return clean_text(consumer.get(identifier)) or clean_text(consumer.get("id")) or ANONYMOUS


def sniff_content_encoding(body: bytes) -> str | None:
    """The Content-Encoding a response body was sent with, told from its first bytes."""
    if not body:
        return None
    if body.startswith(_GZIP_MAGIC):
        return "gzip"
    first = body[0]
    # zlib: CM=8 in the low nibble and the 16-bit header a multiple of 31 (RFC 1950)
    if first & 0x0F == 8 and len(body) > 1 and (first << 8 | body[1]) % 31 == 0:
        return "deflate"
    if first in _PLAIN_STARTS or body.startswith(_UTF8_BOM):
        return None
    # Brotli has no magic number. A wrong guess costs nothing: extract_usage falls back to the
    # raw bytes when they look like JSON or SSE, and records usage_missing otherwise.
    return "br"


def is_json_content_type(content_type: Any) -> bool:
    if not isinstance(content_type, str):
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def new_event_id(now_ns: int | None = None) -> str:
    """A UUIDv7 (RFC 9562): time-ordered, so the collector's indexes stay compact."""
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & (1 << 48) - 1) << 80 | 0x7 << 76 | (rand >> 62 & 0xFFF) << 64
    value |= 0b10 << 62 | rand & (1 << 62) - 1
    return str(uuid.UUID(int=value))


def as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return b""


def last_status(upstream_status: Any) -> int | None:
    """Kong's `upstream_status` ("502, 200" after a retry) as the final status code."""
    if isinstance(upstream_status, int):
        return upstream_status
    if isinstance(upstream_status, str) and upstream_status.strip():
        tail = upstream_status.replace(":", ",").split(",")[-1].strip()
        if tail.isdigit():
            return int(tail)
    return None


def _entity_ref(entity: Any, key: str) -> str | None:
    if isinstance(entity, Mapping):
        ref = entity.get(key)
        if isinstance(ref, Mapping):
            return clean_text(ref.get("id"))
    return None


class _ServiceNames:
    """Service id → name, process-wide, each entry trusted for SERVICE_NAME_TTL_S."""

    def __init__(self) -> None:
        self._names: dict[str, tuple[str | None, float]] = {}

    def get(self, service_id: str) -> tuple[bool, str | None]:
        entry = self._names.get(service_id)
        if entry is None or entry[1] < time.monotonic():
            return False, None
        return True, entry[0]

    def put(self, service_id: str, name: str | None) -> None:
        if len(self._names) > 10_000:  # bounded: a gateway has far fewer services
            self._names.clear()
        self._names[service_id] = (name, time.monotonic() + SERVICE_NAME_TTL_S)


_service_names = _ServiceNames()


# --- the plugins -------------------------------------------------------------------------------


def shipping_settings(config: PluginConfig) -> ShippingSettings:
    return ShippingSettings(
        collector_url=config.collector_url,
        collector_token=config.collector_token,
        max_batch_size=config.max_batch_size,
        max_coalescing_delay=config.max_coalescing_delay,
        max_entries=config.max_entries,
        initial_retry_delay=config.initial_retry_delay,
        max_retry_delay=config.max_retry_delay,
        timeout=config.timeout,
        spool_dir=config.spool_dir,
        spool_max_bytes=config.spool_max_bytes,
        source=config.source,
        plugin_name=config.plugin_name,
    )


def blocklist_settings(config: PluginConfig) -> BlocklistSettings:
    # A long poll shorter than the staleness bound, or every quiet poll would make the list stale.
    wait = max(0, min(30, int(config.blocklist_max_stale / 2)))
    return BlocklistSettings(
        collector_url=config.collector_url,
        collector_token=config.collector_token,
        blocklist_wait=wait,
        blocklist_max_stale=config.blocklist_max_stale,
        fail_open=config.fail_open,
        timeout=config.timeout,
    )


def shutdown() -> None:
    """Before the process exits: deliver what the shippers hold, or move it to the spool."""
    close_all()
    shutdown_all(timeout=SHIPPER_SHUTDOWN_S)


class _MeteringPlugin:
    """What both plugins share: config, the process-wide shipper and blocklist, access."""

    plugin_name: str = ""

    def __init__(self, config: dict[str, Any]) -> None:
        # Instances are recreated on every config push; shipper and blocklist are per process
        # (get_shipper/get_blocklist return the running one for equal settings).
        self.config = PluginConfig.from_kong(self.plugin_name, config)
        self.shipper = get_shipper(shipping_settings(self.config))
        self.blocklist = get_blocklist(blocklist_settings(self.config))

    def _block_if_listed(self, kong: Any, consumer: Mapping[str, Any] | None) -> bool:
        """Answer a blocked consumer without calling the upstream. True when it did."""
        reason = self.blocklist.check(consumer_subject(consumer, self.config.consumer_identifier))
        if reason is None:
            return False
        status, body, headers = block_response(reason)
        # Ends the exchange: Kong sends no further Step, so nothing may follow this call. It is
        # never the event's first PDK call (get_consumer is), which kong-pdk would leak on.
        kong.response.exit(status, body, headers)
        return True

    def _enqueue(
        self,
        usage: Usage,
        *,
        request_id: str,
        consumer: Mapping[str, Any] | None,
        route: Any,
        service_id: str | None,
        service_name: str | None,
        status: int | None,
        started_at: float | None,
        latency_ms: float | None,
    ) -> None:
        consumer = consumer or {}
        route = route if isinstance(route, Mapping) else {}
        event = build_usage_event(
            usage=usage,
            request_id=request_id,
            source=self.config.source,
            subject=consumer_subject(consumer, self.config.consumer_identifier),
            time=started_at if started_at is not None else time.time(),
            consumer_id=clean_text(consumer.get("id")),
            consumer_username=clean_text(consumer.get("username")),
            consumer_custom_id=clean_text(consumer.get("custom_id")),
            route_id=clean_text(route.get("id")),
            route_name=clean_text(route.get("name")),
            service_id=service_id,
            service_name=service_name,
            status=status,
            latency_ms=latency_ms,
        )
        self.shipper.enqueue(event)


class TokenMeter(_MeteringPlugin):
    """`token-meter`: blocks in access, meters the buffered upstream body in response."""

    plugin_name = TOKEN_METER

    @guard_phase
    def access(self, kong: Any) -> None:
        # 1: who is calling; Kong's auth plugins ran before us (priority 950 < key-auth's 1250).
        consumer = kong.client.get_consumer()
        if self._block_if_listed(kong, consumer):
            return
        if self.config.inject_stream_usage:
            self._inject_stream_usage(kong)

    def _inject_stream_usage(self, kong: Any) -> None:
        # The header first: only a JSON request can ask for a stream, and the body may be large.
        content_type = kong.request.get_header("content-type")
        if not is_json_content_type(content_type):
            return
        body = as_bytes(kong.request.get_raw_body())  # nil when Kong buffered it to a file
        if not body:
            return
        changed = inject_stream_usage(body, content_type)
        if changed is not None:
            kong.service.request.set_raw_body(changed)

    @guard_phase
    def response(self, kong: Any) -> None:
        # 1: the consumer again: carrying it over in kong.ctx.shared would cost a set and a get.
        consumer = kong.client.get_consumer()
        # 2: route id and name, and the id of its service (the service name is cached).
        route = kong.router.get_route()
        # 3: the status the upstream answered with.
        status = kong.service.response.get_status()
        # 4: the buffered upstream body; its encoding and format are told from its bytes.
        body = as_bytes(kong.service.response.get_raw_body())
        # 5: when Kong received the request: the event's time and its latency.
        started_at = kong.nginx.req_start_time()
        service_id = _entity_ref(route, "service")
        service_name = self._service_name(kong, service_id)

        now = time.time()
        usage = extract_usage(
            body,
            content_type=None,
            content_encoding=sniff_content_encoding(body),
            max_size=self.config.max_body_size,
        )
        started = float(started_at) if isinstance(started_at, int | float) else None
        self._enqueue(
            usage,
            request_id=new_event_id(),
            consumer=consumer,
            route=route,
            service_id=service_id,
            service_name=service_name,
            status=status if isinstance(status, int) else None,
            started_at=started,
            latency_ms=max(0.0, (now - started) * 1000.0) if started is not None else None,
        )

    @staticmethod
    def _service_name(kong: Any, service_id: str | None) -> str | None:
        if service_id is None:
            return None
        known, name = _service_names.get(service_id)
        if not known:
            # Only on a cache miss: once per service and SERVICE_NAME_TTL_S per process.
            service = kong.router.get_service()
            name = clean_text(service.get("name")) if isinstance(service, Mapping) else None
            _service_names.put(service_id, name)
        return name


class TokenMeterLog(_MeteringPlugin):
    """`token-meter-log`: blocks in access, meters what Kong's ai-proxy logged, in log."""

    plugin_name = TOKEN_METER_LOG

    @guard_phase
    def access(self, kong: Any) -> None:
        # 1: who is calling (see TokenMeter.access).
        consumer = kong.client.get_consumer()
        self._block_if_listed(kong, consumer)

    @guard_phase
    def log(self, kong: Any) -> None:
        # 1: everything at once: consumer, route, service, status, timings, ai-proxy's usage.
        # Kong sends it as a JSON string (cjson-encoded on its side).
        raw = kong.log.serialize()
        serialized = json.loads(raw) if isinstance(raw, str | bytes) else raw
        if not isinstance(serialized, Mapping):
            log.error("serialize_unusable type=%s", type(raw).__name__)
            return
        response = serialized.get("response") or {}
        headers = response.get("headers") or {}
        if REASON_HEADER in headers:
            return  # our own block answer: no upstream call, nothing to meter
        upstream_status = last_status(serialized.get("upstream_status"))
        if upstream_status is None:
            # Kong answered before any upstream did (an auth failure, another plugin's exit).
            log.debug("not_metered reason=no_upstream_response")
            return
        usage = usage_from_ai_proxy_log(serialized)
        if usage is None:
            usage = Usage(usage_missing=True)
        request = serialized.get("request") or {}
        latencies = serialized.get("latencies") or {}
        started_ms = serialized.get("started_at")
        latency = latencies.get("request")
        self._enqueue(
            usage,
            request_id=clean_text(request.get("id")) or new_event_id(),
            consumer=serialized.get("consumer"),
            route=serialized.get("route"),
            service_id=clean_text((serialized.get("service") or {}).get("id")),
            service_name=clean_text((serialized.get("service") or {}).get("name")),
            status=upstream_status,
            started_at=started_ms / 1000.0 if isinstance(started_ms, int | float) else None,
            latency_ms=float(latency) if isinstance(latency, int | float) else None,
        )
