"""Requests flowing through the Kong harness while a test breaks something, and what they
should add up to.

    with Traffic(harness, config, {"ann": "cus_ann", "ben": None}) as traffic:
        traffic.wait_for_more(100)                  # at least 100 more requests went through
        ...                                         # the fault
    traffic.sent                                    # requests the plugin metered
    traffic.expected()                              # consumer -> Counter of input_tokens values

A few threads each send one `token-meter` request after another (a short pause between two),
the consumers taken in turn. Request `n` has an upstream answer (OpenAI chat completions JSON)
with `input_tokens = INPUT_BASE + n`, unique to it, and `output_tokens` derived from `n`: what
PostgreSQL holds can be compared with what was sent request by request (a lost event is a
missing value, a doubled one a value counted twice), not only as sums.

A request counts as sent once the harness returns with both phases run to their end (`ret`)
and the upstream's 200 passed on; any other outcome (an exception, a 500, a skipped phase) is
kept in `failures`: the request path broke.

`plugin_counters` reads the plugin server's delivery counters from its log: the `shipper_closed`
line each shipper writes when the server stops (the same counters as its periodic
`plugin_stats` line: enqueued, sent, accepted, duplicates, rejected, retries, lost, ...).
"""

from __future__ import annotations

import collections
import itertools
import json
import re
import threading
import time
from collections.abc import Mapping
from typing import Any, Self

from tests.harness.kong import HarnessError, KongHarness, ScriptedRequest

INPUT_BASE = 1000
MODEL = "gpt-4o-2024-08-06"
_FIELD = re.compile(r"(\w+)=(\S+)")


def output_tokens(n: int) -> int:
    return 1 + (n * 37) % 200


def chat_answer(n: int) -> bytes:
    """OpenAI's non-streaming chat completion for request `n`, with its usage."""
    prompt, completion = INPUT_BASE + n, output_tokens(n)
    return json.dumps(
        {
            "id": f"chatcmpl-fault-{n}",
            "object": "chat.completion",
            "created": 1741570283,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
    ).encode()


class SenderThreads:
    """`threads` threads, each running `_run` until `stop`: the shape both traffic generators
    (`Traffic` here, `tests.harness.gap.GapTraffic`) share. A thread still running 60 s after
    `stop` goes to `_stuck`."""

    threads: int
    _stopping: threading.Event
    _workers: list[threading.Thread]
    thread_name = "traffic"

    def start(self) -> Self:
        for i in range(self.threads):
            worker = threading.Thread(target=self._run, name=f"{self.thread_name}-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def stop(self) -> None:
        self._stopping.set()
        for worker in self._workers:
            worker.join(60)
            if worker.is_alive():
                self._stuck(f"{worker.name} still running 60 s after stop")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _run(self) -> None:
        raise NotImplementedError

    def _stuck(self, message: str) -> None:
        raise HarnessError(message)


class Traffic(SenderThreads):
    """`threads` senders of scripted requests for `consumers` (username -> custom_id)."""

    def __init__(
        self,
        harness: KongHarness,
        config: Mapping[str, Any],
        consumers: Mapping[str, str | None],
        *,
        threads: int = 3,
        pause: float = 0.02,
    ) -> None:
        self.harness = harness
        self.config = dict(config)
        self.consumers = list(consumers.items())
        self.threads = threads
        self.pause = pause
        self.failures: list[str] = []
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._sent: dict[str, collections.Counter[int]] = {
            c: collections.Counter() for c in consumers
        }
        self._output: dict[str, int] = dict.fromkeys(consumers, 0)
        self._count = 0
        self._issued = 0
        self._stopping = threading.Event()
        self._workers: list[threading.Thread] = []

    # -- running -----------------------------------------------------------------------------

    def _stuck(self, message: str) -> None:
        self.failures.append(message)

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                n = next(self._numbers)
                self._issued = n + 1
            username, custom_id = self.consumers[n % len(self.consumers)]
            request = ScriptedRequest(
                headers={"content-type": "text/plain"},  # no stream-usage injection
                body=b"hello",
                consumer={"id": f"id-{username}", "username": username, "custom_id": custom_id},
                upstream_headers={"content-type": "application/json"},
                upstream_body=chat_answer(n),
                request_id=f"fault-{n}",
            )
            try:
                outcome = self.harness.request(request, self.config)
            except Exception as exc:  # the harness's own errors, a timeout: a broken request
                with self._lock:
                    self.failures.append(f"request {n}: {exc!r}")
            else:
                ok = outcome.phases == {"access": "ret", "response": "ret"}
                with self._lock:
                    if ok and outcome.status == 200 and outcome.exit_status is None:
                        self._sent[username][INPUT_BASE + n] += 1
                        self._output[username] += output_tokens(n)
                        self._count += 1
                    else:
                        self.failures.append(
                            f"request {n}: phases {outcome.phases}, status {outcome.status}"
                        )
            self._stopping.wait(self.pause)

    # -- what was sent -----------------------------------------------------------------------

    @property
    def sent(self) -> int:
        with self._lock:
            return self._count

    @property
    def issued(self) -> int:
        """Requests started so far: those started later are numbered from this on."""
        with self._lock:
            return self._issued

    def wait_for_more(self, count: int, timeout: float = 60.0) -> int:
        """Until at least `count` more requests went through (bounded); how many did."""
        start = self.sent
        deadline = time.monotonic() + timeout
        while self.sent - start < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {self.sent - start} of {count} requests within {timeout} s;"
                    f" failures: {self.failures[:5]}"
                )
            if not any(w.is_alive() for w in self._workers):
                raise AssertionError("the traffic threads are gone")
            time.sleep(0.02)
        return self.sent - start

    def expected(self, since: int = 0) -> dict[str, collections.Counter[int]]:
        """For each consumer, the input_tokens value of each request sent (each once); with
        `since`, of those numbered from `since` on (started after `issued` was `since`)."""
        with self._lock:
            return {
                c: collections.Counter({v: m for v, m in values.items() if v >= INPUT_BASE + since})
                for c, values in self._sent.items()
            }

    def totals(self) -> dict[str, tuple[int, int, int]]:
        """For each consumer: requests, input tokens, output tokens."""
        with self._lock:
            return {
                c: (sum(v.values()), sum(k * m for k, m in v.items()), self._output[c])
                for c, v in self._sent.items()
            }


def plugin_counters(log_text: str) -> dict[str, int]:
    """The delivery counters of the plugin server's last `shipper_closed` log line."""
    lines = [line for line in log_text.splitlines() if " shipper_closed " in line]
    if not lines:
        raise AssertionError(f"no shipper_closed line in the plugin's log: {log_text[-2000:]}")
    fields = _FIELD.findall(lines[-1].split(" shipper_closed ", 1)[1])
    return {key: int(value) for key, value in fields if value.lstrip("-").isdigit()}
