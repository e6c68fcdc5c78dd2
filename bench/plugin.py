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
    """token-meter's PDK calls (handler.py, inject_stream_usage off), results ignored."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def access(self, kong: Any) -> None:
        kong.client.get_consumer()

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


def main() -> None:
    if "--serve-baseline" in sys.argv:
        sys.argv.remove("--serve-baseline")
        serve_baseline()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per cell")
    parser.add_argument("-g", "--gevent", action="store_true", help="serve both with -g")
    args = parser.parse_args()

    from tests.harness.collector import TOKEN, VENV_BIN, FakeCollector
    from tests.harness.kong import KongHarness, ScriptedRequest

    mode = ["-g"] if args.gevent else []
    collector = FakeCollector()
    work = Path(tempfile.mkdtemp(prefix="bench-plugin-"))
    config = {
        "collector_url": collector.url,
        "collector_token": TOKEN,
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
        collector.close()


if __name__ == "__main__":
    main()
