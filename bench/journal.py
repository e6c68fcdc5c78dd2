"""Cost of ``Shipper.enqueue`` (the journal append) against an in-memory append, in one run.

    .venv/bin/python -m bench.journal [--events 50000] [--rounds 5] [--dir DIR]

- ``journal``: ``Shipper.enqueue`` of a realistic usage event: JSON encoding, the CRC'd record
  appended by one write(2) under the outbox's lock, the memory cache. The collector is
  unreachable, so every event stays in the journal and the sender thread sleeps in its backoff.
- ``memory``: what an in-memory queue does on the same path: the same encoding, then a deque
  append under a lock.

Rounds alternate between the two; each journal round starts on an empty directory under
``--dir`` (default: the system temp dir; pass a directory on the disk the plugin server would
use, since tmpfs makes write(2) cheaper than a real filesystem). Numbers are for the design
notes, never for assertions.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from token_meter_plugin.delivery import DeliverySettings, Shipper
from token_meter_plugin.event import build_usage_event
from token_meter_plugin.usage import Usage

_encode = msgspec.json.Encoder().encode


def realistic_event(i: int) -> dict[str, Any]:
    usage = Usage(
        provider="openai",
        model="gpt-4o-2024-08-06",
        input_tokens=1200 + i % 50,
        output_tokens=300,
        cached_input_tokens=200,
        total_tokens=1500 + i % 50,
    )
    return build_usage_event(
        usage=usage,
        request_id=f"0193a1b2-c3d4-7e5f-8a9b-{i:012d}",
        source="kong://dp-1/token-meter",
        subject="alice",
        time=time.time(),
        consumer_id="6a5e1d2c-0b3f-4a7e-9c8d-1f2e3d4c5b6a",
        consumer_username="alice",
        route_id="2b7f4c1e-8d9a-4e3b-a6c5-0f1e2d3c4b5a",
        route_name="openai-chat",
        service_id="9c8b7a6f-5e4d-4c3b-a2a1-0f9e8d7c6b5a",
        service_name="openai",
        status=200,
        latency_ms=812.5,
    )


class MemoryQueue:
    """The baseline: encode, then append to a deque under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: collections.deque[bytes] = collections.deque()

    def enqueue(self, event: Mapping[str, Any]) -> bool:
        data = _encode(event)
        with self._lock:
            self._pending.append(data)
        return True


def unreachable_url() -> str:
    """A local port nobody listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def time_enqueues(enqueue: Callable[[Mapping[str, Any]], bool], events: list[Any]) -> float:
    """Microseconds per call."""
    started = time.perf_counter_ns()
    for event in events:
        enqueue(event)
    return (time.perf_counter_ns() - started) / len(events) / 1000


def journal_round(events: list[Any], root: Path, url: str) -> tuple[float, int]:
    """(µs per enqueue, journal bytes) of one round on a fresh directory."""
    directory = Path(tempfile.mkdtemp(prefix="bench-journal-", dir=root))
    settings = DeliverySettings(url, "bench-token", spool_dir=str(directory), max_retry_delay=60)
    shipper = Shipper(settings)
    try:
        per_event = time_enqueues(shipper.enqueue, events)
        stats = shipper.stats()
        assert stats["journal_events"] == len(events), stats
        return per_event, stats["journal_bytes"]
    finally:
        shipper.close(timeout=0)
        shutil.rmtree(directory, ignore_errors=True)


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts), or "?"."""
    best, kind = "", "?"
    try:
        with Path("/proc/mounts").open(encoding="utf-8") as mounts:
            for line in mounts:
                _, mount_point, fs_type, *_ = line.split()
                inside = str(path.resolve()).startswith(mount_point.rstrip("/") + "/")
                if (inside or str(path.resolve()) == mount_point) and len(mount_point) > len(best):
                    best, kind = mount_point, fs_type
    except OSError:
        pass
    return kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000, help="enqueues per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each kind")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    # The unreachable collector is on purpose: keep its warnings out, errors (losses) in.
    logging.getLogger("token_meter_plugin").setLevel(logging.ERROR)

    events = [realistic_event(i) for i in range(args.events)]
    url = unreachable_url()
    memory: list[float] = []
    journal: list[float] = []
    journal_bytes = 0
    for _ in range(args.rounds):
        memory.append(time_enqueues(MemoryQueue().enqueue, events))
        per_event, journal_bytes = journal_round(events, args.dir, url)
        journal.append(per_event)

    print(
        f"{args.events} enqueues per round, {args.rounds} rounds of each, "
        f"journal under {args.dir} ({filesystem_of(args.dir)}), "
        f"{journal_bytes / args.events:.0f} bytes per record, cpus={os.cpu_count()}"
    )
    print(f"{'':10} {'µs/enqueue (median)':>20} {'min':>7} {'max':>7}")
    for name, values in (("memory", memory), ("journal", journal)):
        print(f"{name:10} {statistics.median(values):20.2f} {min(values):7.2f} {max(values):7.2f}")
    ratio = statistics.median(journal) / statistics.median(memory)
    extra = statistics.median(journal) - statistics.median(memory)
    print(f"journal/memory: {ratio:.1f}x, +{extra:.2f} µs per event for the journal")


if __name__ == "__main__":
    main()
