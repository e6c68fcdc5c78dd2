"""A real plugin-server-like process journals events and dies; the next shipper delivers them.

Each test runs a small script in a child Python process (``CHILD`` below), kills it, and then
checks what a new ``Shipper`` on the same directory delivers to the fake collector.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.collector import FakeCollector, wait_until
from token_meter_plugin.delivery import DeliverySettings, Shipper

# The child: a shipper with the test's settings, then commands on stdin, one JSON per line:
# {"enqueue": [ids]} answers the ids journaled; {"flush": seconds} answers flush's result.
CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys
    from token_meter_plugin.delivery import DeliverySettings, Shipper

    options = json.loads(sys.argv[1])
    if options.pop("file_size_limit", None) is not None:
        limit = json.loads(sys.argv[1])["file_size_limit"]
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then write(2) fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    shipper = Shipper(DeliverySettings(**options))
    for line in sys.stdin:
        command = json.loads(line)
        if "enqueue" in command:
            event = lambda i: {"id": i, "source": "kong://child", "subject": "alice", "data": {}}
            answer = [i for i in command["enqueue"] if shipper.enqueue(event(i))]
        else:
            answer = shipper.flush(command["flush"])
        print(json.dumps({"answer": answer, "stats": shipper.stats()}), flush=True)
    """
)


class Child:
    """The child process, driven line by line."""

    def __init__(self, **options: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stats: dict[str, int] = {}

    def send(self, **command: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, self.stderr()
        reply = json.loads(line)
        self.stats = reply["stats"]
        return reply["answer"]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(30) == -signal.SIGKILL

    def stderr(self) -> str:
        self.proc.kill()
        _, err = self.proc.communicate(timeout=30)
        return err


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    with FakeCollector() as fake:
        yield fake


def options(fake: FakeCollector, spool_dir: Path, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "collector_url": fake.url,
        "collector_token": fake.token,
        "spool_dir": str(spool_dir),
        "max_coalescing_delay": 0.01,
        "initial_retry_delay": 0.01,
        "max_retry_delay": 0.05,
        "timeout": 2.0,
    }
    values.update(overrides)
    return values


def successor(fake: FakeCollector, spool_dir: Path) -> Shipper:
    return Shipper(DeliverySettings(**options(fake, spool_dir)))


def delivered(fake: FakeCollector) -> collections.Counter[str]:
    return collections.Counter(i for batch in fake.accepted_batches() for i in batch.ids)


def test_a_sigkilled_process_loses_nothing_its_successor_delivers_every_event(
    collector: FakeCollector, tmp_path: Path
) -> None:
    """The collector unreachable, memory holding only the newest 100, several segments."""
    collector.stop()
    child = Child(**options(collector, tmp_path, max_entries=100, spool_max_bytes=400_000))
    ids = [f"k-{i}" for i in range(2000)]
    assert child.send(enqueue=ids) == ids
    assert child.stats["journal_events"] == 2000
    assert child.stats["journal_segments"] > 2
    child.kill()  # no close, no flush, no atexit
    collector.start()
    shipper = successor(collector, tmp_path)
    try:
        assert collector.wait_stored(2000)
        assert wait_until(lambda: shipper.stats()["journal_events"] == 0)
        assert delivered(collector) == dict.fromkeys(ids, 1)
        stats = shipper.stats()
        assert (stats["replayed"], stats["lost"], stats["duplicates"]) == (2000, 0, 0)
        assert stats["journal_segments"] == 1  # the replayed ones are deleted
    finally:
        shipper.close(timeout=0.5)


def test_events_acknowledged_before_the_kill_are_not_sent_again(
    collector: FakeCollector, tmp_path: Path
) -> None:
    child = Child(**options(collector, tmp_path, max_batch_size=50))
    first = [f"acked-{i}" for i in range(300)]
    assert child.send(enqueue=first) == first
    assert child.send(flush=10) is True
    collector.stop()
    rest = [f"pending-{i}" for i in range(120)]
    assert child.send(enqueue=rest) == rest
    child.kill()
    collector.start()
    shipper = successor(collector, tmp_path)
    try:
        assert collector.wait_stored(420)
        assert wait_until(lambda: shipper.stats()["journal_events"] == 0)
        assert delivered(collector) == dict.fromkeys(first + rest, 1)
        assert shipper.stats()["replayed"] == 120
    finally:
        shipper.close(timeout=0.5)


def test_a_failing_disk_holds_the_events_it_refused_and_keeps_the_journal_whole(
    collector: FakeCollector, tmp_path: Path
) -> None:
    """write(2) fails for real (file size limit): those events are held in memory, not lost,
    and logged; the ones journaled before are intact, the cut record in between is undone. The
    process killed while it holds them takes them with it: the hold's documented limit."""
    collector.stop()
    child = Child(**options(collector, tmp_path, file_size_limit=30_000))
    ids = [f"w-{i}" for i in range(400)]
    assert child.send(enqueue=ids) == ids  # journaled or held
    journaled = child.stats["journal_events"]
    assert 0 < journaled < len(ids)
    kept = ids[:journaled]
    assert child.stats["held_events"] == child.stats["held_total"] == len(ids) - journaled
    assert child.stats["lost"] == 0
    err = child.stderr()  # ends the child (SIGKILL): the held events go with it
    assert "spool_unwritable_holding_in_memory" in err and "File too large" in err
    collector.start()
    shipper = successor(collector, tmp_path)
    try:
        assert collector.wait_stored(len(kept))
        assert wait_until(lambda: shipper.stats()["journal_events"] == 0)
        assert delivered(collector) == dict.fromkeys(kept, 1)
        assert (shipper.stats()["replayed"], shipper.stats()["lost"]) == (len(kept), 0)
    finally:
        shipper.close(timeout=0.5)
