"""Process-wide counters of the plugin server, beside the shippers' and blocklists' own.

Counted here: what the request path notices and cannot fix, such as a response body the usage
parser failed on (`usage_parse_errors`) or a request body too large to read
(`request_bodies_not_read`). `snapshot()` is what the server's periodic `plugin_stats` log line
reports.
"""

from __future__ import annotations

import threading
from collections import Counter

_lock = threading.Lock()
_counts: Counter[str] = Counter()


def count(name: str, increment: int = 1) -> None:
    with _lock:
        _counts[name] += increment


def snapshot() -> dict[str, int]:
    with _lock:
        return dict(_counts)
