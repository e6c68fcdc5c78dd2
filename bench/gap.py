"""Requests left unmetered when a plugin-server process dies, without and with the supervisor.

    .venv/bin/python -m bench.gap [--kills 5] [--threads 4] [--workers 2] [-g]

Each mode starts `token-meter-plugin` through the Kong-side harness (Kong 3.9's start command,
respawn timing and pooled connections; tests/harness/kong.py), sends requests continuously from
`--threads` threads over `--workers` Kong workers, and SIGKILLs a process `--kills` times, each
time once the process Kong started has lived over a second (so that Kong respawns it at once)
and the plugin has run again:

- `no supervisor` (`--no-supervisor`, the old behaviour): the server Kong started is killed; Kong
  respawns it and the socket is gone until the new server listens.
- `supervisor`, serving process killed: the supervisor keeps the socket and starts another.
- `supervisor`, supervisor killed (with its serving process, as a kill of the process group
  would): the socket is gone until Kong's respawn of the supervisor listens again.

Columns (tests/harness/gap.py defines them): requests sent across the gap (started once the
killed process was dead, until the plugin ran again) and how many of those Kong skipped the
plugin for; requests in flight at the kill (an event whose connection died with the process:
no supervisor can save it) and how many of those were skipped; the respawn time, from the
signal to the first request after it that ran the plugin (median and max). "Unmetered" counts
every request of the run with no usage event at the fake collector, once the successor
delivered what its journal held. Figures for the design notes, never for assertions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.harness.collector import FakeCollector
from tests.harness.gap import (
    Gap,
    GapTraffic,
    Kill,
    kill_both,
    kill_server,
    kill_serving,
    metered_requests,
    wait_until_respawned_at_once,
)
from tests.harness.kong import KongHarness
from tests.harness.paths import REPO_ROOT, VENV_BIN

SETTLE_S = 1.5  # traffic between two kills, after the plugin ran again


@dataclass(frozen=True)
class Mode:
    name: str
    killed: str
    args: tuple[str, ...]
    kill: Callable[[KongHarness], Kill]


MODES = (
    Mode("no supervisor", "server", ("--no-supervisor",), kill_server),
    Mode("supervisor", "serving process", (), kill_serving),
    Mode("supervisor", "supervisor + serving", (), kill_both),
)


@dataclass(frozen=True)
class Result:
    mode: Mode
    gaps: list[Gap]
    sent: int
    unmetered: int  # requests of the whole run without a usage event at the collector


def run_mode(mode: Mode, *, kills: int, threads: int, workers: int, gevent: bool) -> Result:
    with FakeCollector() as collector, tempfile.TemporaryDirectory() as tmp:
        config = {
            "collector_url": collector.url,
            "collector_token": collector.token,
            "spool_dir": f"{tmp}/spool",
        }
        harness = KongHarness(
            [str(VENV_BIN / "token-meter-plugin")],
            Path(tmp) / "kong",
            extra_args=[*mode.args, *(("-g",) if gevent else ())],
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
            workers=workers,
        )
        harness.start()
        try:
            gaps = []
            with GapTraffic(harness, config, threads=threads) as traffic:
                traffic.wait_for_requests(50)
                for _ in range(kills):
                    wait_until_respawned_at_once(harness)
                    gaps.append(traffic.gap(mode.kill(harness)))
                    traffic.wait_for_requests(1)
                    time.sleep(SETTLE_S)
            sent = traffic.sent
            ran = {s.n for s in sent if s.ran}
            collector.wait_stored(len(ran), timeout=60)
            metered = metered_requests(collector.stored.values())
            unmetered = sum(1 for s in sent if s.n not in metered)
        finally:
            harness.stop()
    return Result(mode, gaps, len(sent), unmetered)


def report(results: list[Result]) -> None:
    header = (
        f"{'mode':14} {'killed':21} {'kills':>5} {'across gap':>10} {'skipped':>8} "
        f"{'in flight':>9} {'skipped':>8} {'respawn ms':>14} {'unmetered/sent':>15}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        across = sum(len(g.across) for g in r.gaps)
        skipped = sum(len(g.skipped_across) for g in r.gaps)
        flight = sum(len(g.in_flight) for g in r.gaps)
        flight_skipped = sum(len(g.skipped_in_flight) for g in r.gaps)
        respawn = [g.respawn_s * 1000 for g in r.gaps]
        times = f"{statistics.median(respawn):.0f} (max {max(respawn):.0f})"
        print(
            f"{r.mode.name:14} {r.mode.killed:21} {len(r.gaps):5} {across:10} {skipped:8} "
            f"{flight:9} {flight_skipped:8} {times:>14} {f'{r.unmetered}/{r.sent}':>15}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5, help="kills per mode (default: 5)")
    parser.add_argument("--threads", type=int, default=4, help="request threads (default: 4)")
    parser.add_argument("--workers", type=int, default=2, help="Kong workers (default: 2)")
    parser.add_argument("-g", "--gevent", action="store_true", help="serve with -g")
    args = parser.parse_args()
    print(
        f"{args.kills} SIGKILLs per mode, {args.threads} threads over {args.workers} Kong "
        f"workers, {'gevent' if args.gevent else 'threading'} mode"
    )
    results = [
        run_mode(
            mode,
            kills=args.kills,
            threads=args.threads,
            workers=args.workers,
            gevent=args.gevent,
        )
        for mode in MODES
    ]
    report(results)


if __name__ == "__main__":
    main()
