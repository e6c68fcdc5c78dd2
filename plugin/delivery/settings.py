"""What a shipper needs to know: a view of the plugin config, which holds every rule.

The plugin builds it with ``DeliverySettings.of(config)``. Its defaults are the config's own
(``plugin/config.py``), for what builds one by hand: tests and benchmarks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config import PluginConfig, default_of


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """How events reach one collector. Names follow Kong's ``queue_schema`` where they overlap."""

    collector_url: str
    collector_token: str
    # PEM file of the CAs an https:// collector is verified against (None: the system's).
    collector_ca_bundle: str | None = None
    # Events per POST (the collector takes at most 10,000).
    max_batch_size: int = default_of("max_batch_size", int)
    # Seconds the oldest unsent event waits for others before its batch goes.
    max_coalescing_delay: float = default_of("max_coalescing_delay", float)
    # Events cached in memory in front of the journal; older unsent ones are read from disk.
    max_entries: int = default_of("max_entries", int)
    # Backoff between failed deliveries: capped exponential with full jitter; never gives up.
    initial_retry_delay: float = default_of("initial_retry_delay", float)
    max_retry_delay: float = default_of("max_retry_delay", float)
    # Seconds to connect, and to wait for the collector's answer.
    timeout: float = default_of("timeout", float)
    # The plugin server's durable directory (required, by keyword); the journal is a
    # subdirectory of it per collector. Never a default here: the caller knows what is durable.
    spool_dir: str = field(kw_only=True)
    # Bound of the journal on disk; past it new events are lost (counted, logged).
    spool_max_bytes: int = default_of("spool_max_bytes", int)
    # The data plane's CloudEvents ``source``, stamped into events that have none ("": none).
    source: str = ""

    @classmethod
    def of(cls, config: PluginConfig) -> DeliverySettings:
        """The delivery part of a plugin config: each field is the config's field of that name."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})
