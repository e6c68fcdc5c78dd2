"""What a shipper needs to know. The Kong schema (``plugin/config.py``) validates the values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

GIB: Final = 1024**3


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """How events reach one collector. Names follow Kong's ``queue_schema`` where they overlap."""

    collector_url: str
    collector_token: str
    # Events per POST (the collector takes at least 10,000).
    max_batch_size: int = 1000
    # Seconds the oldest unsent event waits for others before its batch goes.
    max_coalescing_delay: float = 0.2
    # Events cached in memory in front of the journal; older unsent ones are read from disk.
    max_entries: int = 100_000
    # Backoff between failed deliveries: capped exponential with full jitter; never gives up.
    initial_retry_delay: float = 0.1
    max_retry_delay: float = 30.0
    # Seconds to connect, and to wait for the collector's answer.
    timeout: float = 10.0
    # The plugin server's durable directory (required, by keyword); the journal is a
    # subdirectory of it per collector. Never a default here: the caller knows what is durable.
    spool_dir: str = field(kw_only=True)
    # Bound of the journal on disk; past it new events are lost (counted, logged).
    spool_max_bytes: int = 8 * GIB
    # The data plane's CloudEvents ``source``, stamped into events that have none.
    source: str = ""
    # Seconds ``close`` gives delivery by default; what is left stays in the journal.
    shutdown_timeout: float = 5.0
