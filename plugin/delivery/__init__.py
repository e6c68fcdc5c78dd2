"""Delivery of usage events to the collector, losing none: a write-ahead journal on disk, a
memory cache in front of it, and one sender thread per collector.

``Shipper.enqueue`` appends the event to the journal (one ``write(2)``, no fsync) before it
returns, so a plugin server killed at any moment loses nothing: its successor replays, oldest
first, every event the collector never acknowledged. Delivery is at least once; the collector
dedupes by (source, id). An event the disk will not take (full, failing) is held in memory,
within a bound, and journaled once writes succeed again. An event is lost only when the journal
is full at ``spool_max_bytes``, when the disk fails past the memory hold's bound or while the
process dies holding it, or when its record turns out corrupt on recovery: each loss is counted
in ``stats()["lost"]`` and logged at error level.

Modules: ``settings`` (what a shipper needs), ``journal`` (the files), ``outbox`` (journal, cache,
cursor and counters, no threads), ``answers`` (what the collector's answers mean, pure),
``client`` (HTTP and backoff), ``sender`` (the thread), ``shipper`` (the facade and the registry).
"""

from __future__ import annotations

from .client import Backoff, CollectorClient, CollectorResponse
from .settings import DeliverySettings
from .shipper import Shipper, all_stats, get_shipper, shutdown_all

__all__ = [
    "Backoff",
    "CollectorClient",
    "CollectorResponse",
    "DeliverySettings",
    "Shipper",
    "all_stats",
    "get_shipper",
    "shutdown_all",
]
