"""The two plugins' phase handlers: PDK calls in, plain data to the pure functions, event out.

Every PDK call is a round trip to Kong over the plugin-server socket (about 90 µs, more than all
the rest of the work), so each one below is justified where it is made. A metered chat request
with a JSON body costs, in the default config:

    token-meter      access   kong.client.get_consumer       only while the blocklist is not
                                                             empty (or stale and fail-closed)
                              kong.request.get_headers       content type and length
                              kong.request.get_raw_body(0)   JSON bodies only
                              (kong.service.request.set_raw_body: streams that need usage)
                     response kong.client.get_consumer, kong.router.get_route,
                              kong.service.response.get_status, .get_raw_body,
                              kong.nginx.req_start_time
    token-meter-log  access   kong.client.get_consumer       as above: only when it can block
                     log      kong.log.serialize

that is 8 (7 with an empty blocklist) and 2 (1). A blocked request costs get_consumer,
kong.request.get_path (OpenAI's or Anthropic's error shape) and the exit.

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

The request body is read only in a way that cannot make Kong fail the request: Kong answers nil
to `get_raw_body()` for a body nginx buffered to a temp file (over `client_body_buffer_size`,
8 KiB by default), cannot pack that nil, and answers the client 500
(Kong@3.9.x:kong/pdk/request.lua, Kong@3.9.x:kong/runloop/plugin_servers/rpc/mp_rpc.lua). With
a max of 0 Kong reads the temp file whatever its size; the declared Content-Length, from the
headers fetched anyway, keeps bodies over `max_body_size` from being read at all.

A handler never calls the PDK after `kong.response.exit` and always returns right after it;
`guard_phase` turns any exception into a log line (kong-pdk defects 1 and 2, see `guards.py`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Final

from . import metrics
from .block_answer import block_response, is_anthropic_path
from .blocklist import BlocklistSettings, close_all, get_blocklist
from .config import TOKEN_METER, TOKEN_METER_LOG, PluginConfig
from .delivery import DeliverySettings, all_stats, get_shipper, shutdown_all
from .event import build_usage_event
from .guards import guard_phase
from .kong_data import (
    ServiceNames,
    as_bytes,
    clean_text,
    consumer_subject,
    content_length,
    entity_ref,
    header_value,
    is_json_content_type,
    last_status,
    new_event_id,
    sniff_content_encoding,
)
from .stream_options import inject_stream_usage
from .usage import Usage, extract_usage, usage_from_ai_proxy_log

log = logging.getLogger("token_meter_plugin")

REASON_HEADER: Final = "x-token-meter-reason"
SHIPPER_SHUTDOWN_S: Final = 4.0  # within server.SHUTDOWN_GRACE_S

_service_names = ServiceNames()


# --- the plugins -------------------------------------------------------------------------------


def stats() -> dict[str, Any]:
    """What the server's periodic `plugin_stats` log line reports."""
    return {"shippers": all_stats(), "counters": metrics.snapshot()}


def shutdown() -> None:
    """Before the process exits: deliver what the shippers hold; the rest stays journaled."""
    close_all()
    shutdown_all(timeout=SHIPPER_SHUTDOWN_S)


class _MeteringPlugin:
    """What both plugins share: config, the process-wide shipper and blocklist, access."""

    plugin_name: str = ""

    def __init__(self, config: dict[str, Any]) -> None:
        # Instances are recreated on every config push; shipper and blocklist are per process
        # (get_shipper/get_blocklist return the running one for the same collector).
        self.config = PluginConfig.from_kong(self.plugin_name, config)
        self.shipper = get_shipper(DeliverySettings.of(self.config))
        self.blocklist = get_blocklist(BlocklistSettings.of(self.config))

    def _block_if_listed(self, kong: Any) -> bool:
        """Answer a blocked consumer without calling the upstream. True when it did."""
        if not self.blocklist.may_block():
            return False  # nobody to block: no need to ask Kong who is calling
        # 1: who is calling; Kong's auth plugins ran before us (priority 950 < key-auth's 1250).
        consumer = kong.client.get_consumer()
        reason = self.blocklist.check(consumer_subject(consumer, self.config.consumer_identifier))
        if reason is None:
            return False
        # 2: which API the client called, for the error shape its SDK understands.
        anthropic = is_anthropic_path(kong.request.get_path())
        status, body, headers = block_response(reason, anthropic=anthropic)
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
        consumer = consumer if isinstance(consumer, Mapping) else {}
        route = route if isinstance(route, Mapping) else {}
        try:
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
        except ValueError as exc:
            # What the collector would reject and no retry can fix (a consumer name over its
            # limit, say): a loss, counted and logged as one, never cut to fit.
            self.shipper.lose(1, f"unbuildable event {request_id}: {exc}")
            return
        self.shipper.enqueue(event)


class TokenMeter(_MeteringPlugin):
    """`token-meter`: blocks in access, meters the buffered upstream body in response."""

    plugin_name = TOKEN_METER

    @guard_phase
    def access(self, kong: Any) -> None:
        if self._block_if_listed(kong):
            return
        if self.config.inject_stream_usage:
            self._inject_stream_usage(kong)

    def _inject_stream_usage(self, kong: Any) -> None:
        # The headers first: only a JSON request can ask for a stream, and its size tells
        # whether to read it at all. One call for type and length (get_header twice is two).
        headers = kong.request.get_headers()
        content_type = header_value(headers, "content-type")
        if not is_json_content_type(content_type):
            return
        size = content_length(headers)
        if size == 0:
            return
        if size is not None and size > self.config.max_body_size:
            metrics.count("request_bodies_not_read")
            log.debug("request_body_not_read reason=larger_than_max_body_size size=%s", size)
            return
        # A max of 0: Kong reads a temp-file body whatever its size, so the answer is never the
        # nil it cannot pack. A chunked body (no Content-Length) is read whole: nginx has it.
        body = as_bytes(kong.request.get_raw_body(0))
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
        service_id = entity_ref(route, "service")
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
        self._block_if_listed(kong)

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
