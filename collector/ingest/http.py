"""POST /v1/events: the plugin's batch endpoint."""

from __future__ import annotations

import msgspec
import structlog
from aiohttp import web

from ..auth import Role, requires
from ..keys import INGEST, LOG_FIELDS
from ..problems import Problem, bad_request
from .events import BatchError, BatchTooLarge

log = structlog.get_logger("token_meter.ingest")

ACCEPTED_TYPES = ("application/cloudevents-batch+json", "application/json")


@requires(Role.INGEST)
async def post_events(request: web.Request) -> web.Response:
    if request.content_type not in ACCEPTED_TYPES:
        raise Problem(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            f"send {' or '.join(ACCEPTED_TYPES)}, not {request.content_type or 'nothing'}",
        )
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip", ""):
        raise Problem(
            415,
            "unsupported-encoding",
            "Unsupported content encoding",
            "batches may be sent plain or gzip-compressed",
        )
    # aiohttp decompresses gzip as it reads and stops at client_max_size (decompressed bytes),
    # answering 413; a corrupt stream surfaces as a 400 from the parser.
    body = await request.read()
    service = request.app[INGEST]
    try:
        batch = service.parse(body)
    except BatchTooLarge as exc:
        raise Problem(413, "batch-too-large", "Batch too large", str(exc)) from exc
    except BatchError as exc:
        raise bad_request(str(exc), slug="malformed-batch") from exc
    outcome = await service.ingest(batch)
    request[LOG_FIELDS] = {
        "events": outcome.size,
        "accepted": outcome.accepted,
        "duplicates": outcome.duplicates,
        "rejected": len(outcome.rejected),
    }
    if outcome.rejected:
        log.warning(
            "events_rejected",
            count=len(outcome.rejected),
            first_reason=outcome.rejected[0].reason,
            first_index=outcome.rejected[0].index,
        )
    return web.Response(
        body=msgspec.json.encode(outcome.as_json()), content_type="application/json"
    )
