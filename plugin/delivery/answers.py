"""What the collector's answer to one POST means for the events in it: pure functions.

- 2xx: delivered. The body counts accepted events, duplicates (already stored, by source and id)
  and rejected ones (invalid: never stored, never worth retrying), each with its reason.
- 413: the batch is too large; split it in halves. A single event too large is refused.
- 401, 403: the token is wrong. A configuration error: logged at error level and retried with
  backoff, the events kept, so fixing the token costs no usage. 404, 405, 407 and 415 are
  configuration errors too (the URL or a proxy in between is not the collector's ingest
  endpoint): splitting would turn every event into a "poison" one and drop them all.
- 408, 425, 429, 5xx, and no answer at all (timeout, refused connection): transient, retried
  with backoff.
- Any other 4xx: the batch holds an event the collector will not take. Split to isolate it; a
  single event refused is rejected (counted, logged), so one bad event cannot stall the journal.
- Anything else (1xx, 3xx): a configuration error, like 404.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Final

import msgspec

TOKEN_REFUSED: Final = frozenset({401, 403})
NOT_THE_COLLECTOR: Final = frozenset({404, 405, 407, 415})
TRANSIENT: Final = frozenset({408, 425, 429})
_DETAIL_BYTES: Final = 300


class Rejection(msgspec.Struct):
    index: int = -1
    id: str | None = None
    reason: str = ""


class _IngestResult(msgspec.Struct):
    accepted: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = msgspec.field(default_factory=list)


_decode_result = msgspec.json.Decoder(_IngestResult).decode


@dataclass(frozen=True, slots=True)
class Delivered:
    """The collector took the batch. ``readable``: its answer could be parsed."""

    accepted: int
    duplicates: int
    rejections: list[Rejection]
    readable: bool = True


@dataclass(frozen=True, slots=True)
class Split:
    """Send the batch again as two halves."""

    status: int


@dataclass(frozen=True, slots=True)
class Refused:
    """A single event the collector will never take: rejected."""

    status: int
    detail: str


@dataclass(frozen=True, slots=True)
class Retry:
    """Keep the events and try again after a backoff. ``config_error``: logged at error level."""

    status: int | None
    detail: str
    config_error: bool


Verdict = Delivered | Split | Refused | Retry


def classify(status: int, body: bytes, events: int) -> Verdict:
    """The verdict on a batch of ``events`` events the collector answered with ``status``."""
    if 200 <= status < 300:
        try:
            result = _decode_result(body)
        except (msgspec.DecodeError, UnicodeDecodeError):  # a string that is not UTF-8
            return Delivered(0, 0, [], readable=False)
        return Delivered(result.accepted, result.duplicates, result.rejected)
    detail = body[:_DETAIL_BYTES].decode("utf-8", "replace")
    if status in TRANSIENT or 500 <= status < 600:
        return Retry(status, detail, config_error=False)
    if status in TOKEN_REFUSED or status in NOT_THE_COLLECTOR or not 400 <= status < 500:
        return Retry(status, detail, config_error=True)
    # 413, or an event the collector will not take: find it.
    return Split(status) if events > 1 else Refused(status, detail)


def unreachable(error: BaseException) -> Retry:
    """The verdict when no answer came (refused connection, timeout, reset). A collector whose
    certificate is not trusted (collector_ca_bundle) is a configuration error."""
    return Retry(None, repr(error), config_error=isinstance(error, ssl.SSLCertVerificationError))


@dataclass(slots=True)
class Tally:
    """What the collector said about one batch, summed over its pieces."""

    sent: int = 0  # events in pieces answered 2xx
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0  # rejected in 2xx answers, and single events refused

    def add(self, verdict: Delivered | Refused, events: int) -> None:
        if isinstance(verdict, Refused):
            self.rejected += 1
            return
        self.sent += events
        self.accepted += verdict.accepted
        self.duplicates += verdict.duplicates
        self.rejected += len(verdict.rejections)
