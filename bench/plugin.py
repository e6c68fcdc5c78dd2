"""Plugin-server cost of token-meter against a baseline that makes the same PDK calls.

    .venv/bin/python -m bench.plugin [--quick] [-g]

Both plugins run in their own plugin server, started and driven by the Kong-side harness
(tests/harness/kong.py) exactly as in the integration tests, in the same run and interleaved.
The baseline (served by this module with `--serve-baseline`) makes token-meter's PDK calls and
ignores their results, so the difference is what token-meter adds beyond the unavoidable round
trips: usage parsing, event building, enqueueing. The time is measured on Kong's side from
`HandleEvent` of the access phase to the `ret` of the response phase, so it includes the
harness's own MessagePack work, the same for both.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stats import percentile

BASELINE = "token-meter-baseline"


class Baseline:
    """token-meter's PDK calls with an empty blocklist (handler.py), results ignored: with
    `inject_stream_usage` the request headers and, for a JSON body, the body."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.inject = config.get("inject_stream_usage", True)

    def access(self, kong: Any) -> None:
        if not self.inject:
            return
        headers = kong.request.get_headers()
        if "json" in str((headers or {}).get("content-type")):
            body = kong.request.get_raw_body(0)
            if isinstance(body, bytes) and b'"stream": true' in body:
                # token-meter sets the body of a stream that did not ask for usage
                kong.service.request.set_raw_body(body)

    def response(self, kong: Any) -> None:
        kong.client.get_consumer()
        kong.router.get_route()
        kong.service.response.get_status()
        kong.service.response.get_raw_body()
        kong.nginx.req_start_time()


def serve_baseline() -> None:
    from token_meter_plugin.config import TOKEN_METER, plugin_info
    from token_meter_plugin.server import serve

    info = plugin_info(TOKEN_METER)
    info["Name"] = BASELINE
    info["Schema"]["name"] = BASELINE
    serve(BASELINE, Baseline, phases=["access", "response"], info=info)


def openai_body(size: int) -> bytes:
    """A chat completion of about `size` bytes, usage at the end as OpenAI sends it."""
    head = {"id": "chatcmpl-bench", "object": "chat.completion", "model": "gpt-4o-mini"}
    usage = {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200}
    content = "token " * max(0, (size - 300) // 6)
    message = {"index": 0, "message": {"role": "assistant", "content": content}}
    return json.dumps(head | {"choices": [message], "usage": usage}).encode()


def measure(harness: Any, config: dict[str, Any], request: Any, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        harness.request(request, config)
        times.append(time.perf_counter() - start)
    return times


def run_concurrent(  # noqa: PLR0917 (one cell of the table)
    harness: Any, config: dict[str, Any], body: bytes, workers: int, per_worker: int, n: int
) -> tuple[list[float], float, float]:
    """`workers` x `per_worker` client threads, each on its own worker's pooled connections:
    Kong-side times of each request, requests per second, PDK round trips per request."""
    import threading

    from tests.harness.kong import ScriptedRequest

    times: list[float] = []
    trips: list[int] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        for _ in range(n):
            request = ScriptedRequest(body=body, upstream_body=openai_body(1024))
            outcome = harness.request(request, config, worker=worker)
            with lock:
                times.append(outcome.elapsed)
                trips.append(outcome.round_trips)

    threads = [
        threading.Thread(target=client, args=(w,))
        for w in range(workers)
        for _ in range(per_worker)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return times, len(times) / wall, sum(trips) / len(trips)


def concurrent_main(quick: bool) -> None:
    """4 workers x 8 concurrent requests, threading and gevent, 2 KiB and 20 KiB chat bodies,
    token-meter (default config) beside the baseline, interleaved in the same run."""
    from tests.factories import chat_request_body
    from tests.harness.collector import FakeCollector
    from tests.harness.kong import KongHarness
    from tests.harness.paths import VENV_BIN

    collector = FakeCollector().start()
    work = Path(tempfile.mkdtemp(prefix="bench-plugin-"))
    config = {"collector_url": collector.url, "collector_token": collector.token}
    config["spool_dir"] = str(work / "spool")
    n = 10 if quick else 40
    header = (
        f"{'mode':>9} {'body':>6} | {'meter rt':>8} {'req/s':>7} {'p50':>8} {'p99':>8} | "
        f"{'base rt':>7} {'req/s':>7} {'p50':>8} {'p99':>8} | {'req/s ratio':>11}"
    )
    print("4 workers x 8 concurrent requests each; times on Kong's side per request")
    print(header)
    print("-" * len(header))
    try:
        for label, mode in (("threading", []), ("gevent", ["-g"])):
            meter = KongHarness(
                [str(VENV_BIN / "token-meter-plugin")],
                work / f"m-{label}",
                extra_args=mode,
                workers=4,
            )
            baseline = KongHarness(
                [sys.executable, "-m", "bench.plugin", "--serve-baseline"],
                work / f"b-{label}",
                extra_args=mode,
                workers=4,
            )
            meter.start()
            baseline.start()
            try:
                for size, name in ((2 * 1024, "2KiB"), (20 * 1024, "20KiB")):
                    body = chat_request_body(size)
                    run_concurrent(meter, config, body, 4, 2, 3)  # warm: instances, caches
                    run_concurrent(baseline, config, body, 4, 2, 3)
                    m_times: list[float] = []
                    b_times: list[float] = []
                    m_rates, b_rates = [], []
                    for _ in range(2):  # interleaved so drift hits both alike
                        t, rate, m_rt = run_concurrent(meter, config, body, 4, 8, n // 2)
                        m_times += t
                        m_rates.append(rate)
                        t, rate, b_rt = run_concurrent(baseline, config, body, 4, 8, n // 2)
                        b_times += t
                        b_rates.append(rate)
                    m_rate, b_rate = statistics.mean(m_rates), statistics.mean(b_rates)
                    print(
                        f"{label:>9} {name:>6} | {m_rt:>8.1f} {m_rate:>7.0f} "
                        f"{statistics.median(m_times) * 1e3:>6.2f}ms "
                        f"{percentile(m_times, 99) * 1e3:>6.2f}ms | {b_rt:>7.1f} {b_rate:>7.0f} "
                        f"{statistics.median(b_times) * 1e3:>6.2f}ms "
                        f"{percentile(b_times, 99) * 1e3:>6.2f}ms | {m_rate / b_rate:>11.2f}"
                    )
            finally:
                meter.stop()
                baseline.stop()
        print(f"events received by the fake collector: {len(collector.events())}")
    finally:
        collector.stop()


def main() -> None:
    if "--serve-baseline" in sys.argv:
        sys.argv.remove("--serve-baseline")
        serve_baseline()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per cell")
    parser.add_argument("-g", "--gevent", action="store_true", help="serve both with -g")
    parser.add_argument(
        "--concurrent",
        action="store_true",
        help="4 workers x 8 concurrent requests, both modes, 2 KiB and 20 KiB chat bodies",
    )
    args = parser.parse_args()
    if args.concurrent:
        concurrent_main(args.quick)
        return

    from tests.harness.collector import FakeCollector
    from tests.harness.kong import KongHarness, ScriptedRequest
    from tests.harness.paths import VENV_BIN

    mode = ["-g"] if args.gevent else []
    collector = FakeCollector().start()
    work = Path(tempfile.mkdtemp(prefix="bench-plugin-"))
    config = {
        "collector_url": collector.url,
        "collector_token": collector.token,
        "spool_dir": str(work / "spool"),
        "inject_stream_usage": False,
    }
    meter = KongHarness([str(VENV_BIN / "token-meter-plugin")], work / "meter", extra_args=mode)
    baseline = KongHarness(
        [sys.executable, "-m", "bench.plugin", "--serve-baseline"], work / "base", extra_args=mode
    )
    meter.start()
    baseline.start()
    try:
        probe = ScriptedRequest(headers={"content-type": "text/plain"}, upstream_body=b"{}")
        meter.request(probe, config)  # fills the service-name cache
        steady = meter.request(probe, config)
        calls = ", ".join(steady.methods())
        print(f"PDK round trips per metered request: {steady.round_trips} ({calls})")
        print(f"mode: {'gevent' if args.gevent else 'threading'}")
        print()
        header = (
            f"{'body':>7} {'enc':>5} {'n':>4} | {'meter p50':>10} {'p99':>9} {'ev/s':>7} | "
            f"{'base p50':>9} {'p99':>9} {'ev/s':>7} | {'p50 ratio':>9} {'added p50':>10}"
        )
        print(header)
        print("-" * len(header))
        scale = 0.25 if args.quick else 1.0
        for size, label, cell_n in (
            (1024, "1KiB", 400),
            (64 * 1024, "64KiB", 200),
            (1024 * 1024, "1MiB", 40),
            (8 * 1024 * 1024, "8MiB", 10),
        ):
            n = max(5, int(cell_n * scale))
            plain = openai_body(size)
            for encoding, body in (("plain", plain), ("gzip", gzip.compress(plain, 6))):
                request = ScriptedRequest(
                    headers={"content-type": "text/plain"}, upstream_body=body
                )
                measure(meter, config, request, 3)  # warm
                measure(baseline, config, request, 3)
                meter_times: list[float] = []
                base_times: list[float] = []
                for _ in range(5):  # interleave so drift hits both alike
                    meter_times += measure(meter, config, request, n // 5 or 1)
                    base_times += measure(baseline, config, request, n // 5 or 1)
                m50, b50 = statistics.median(meter_times), statistics.median(base_times)
                print(
                    f"{label:>7} {encoding:>5} {len(meter_times):>4} | "
                    f"{m50 * 1e3:>8.3f}ms {percentile(meter_times, 99) * 1e3:>7.3f}ms "
                    f"{len(meter_times) / sum(meter_times):>7.0f} | "
                    f"{b50 * 1e3:>7.3f}ms {percentile(base_times, 99) * 1e3:>7.3f}ms "
                    f"{len(base_times) / sum(base_times):>7.0f} | "
                    f"{m50 / b50:>9.2f} {(m50 - b50) * 1e3:>8.3f}ms"
                )
        time.sleep(1)
        print()
        print(f"events received by the fake collector: {len(collector.events())}")
    finally:
        meter.stop()
        baseline.stop()
        collector.stop()


if __name__ == "__main__":
    main()
