"""Faults a test plans for the fake's next requests, or draws at random.

Each fault says whether it strikes before the endpoint does its work (nothing is applied,
nothing is saved for the idempotency key) or after (the effect is applied and the real answer
is saved for the key; the client just never sees it, or sees a 500 that was saved too, as
Stripe saves whatever the first request answered, 500s included). Kinds:

- `error`: answer `status` (500 `api_error` by default; 429 `rate_limit`; or any status with
  a `code`, e.g. 429 `lock_timeout` with `should_retry=True`, which the SDK would retry);
- `timeout`: hold the answer `seconds` (longer than the client's timeout), then answer if
  after the work or drop the connection if before it;
- `drop`: close the connection without an answer.

Planned faults are used first, in order, by the first request whose route they match
(`route=None` matches any request); the random mode then draws for the rest.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Kind = Literal["error", "timeout", "drop"]
RANDOM_KINDS = (
    "rate_limit",
    "error",
    "error_after_work",
    "timeout",
    "timeout_before_work",
    "drop",
    "drop_before_work",
)


@dataclass(frozen=True, slots=True)
class Fault:
    kind: Kind
    after_work: bool
    status: int = 500
    code: str | None = None
    message: str | None = None
    should_retry: bool | None = None
    seconds: float = 0.0
    route: str | None = None

    @property
    def label(self) -> str:
        """e.g. `error:500:before_work`, `timeout:30s:after_work`, `drop:after_work`."""
        what = {"error": str(self.status), "timeout": f"{self.seconds:g}s", "drop": ""}[self.kind]
        when = "after_work" if self.after_work else "before_work"
        return ":".join(part for part in (self.kind, what, when) if part)


@dataclass(frozen=True, slots=True)
class _RandomMode:
    rate: float
    kinds: tuple[str, ...]
    seconds: float
    route: str | None
    rng: random.Random


class Faults:
    """Thread-safe: tests plan from their thread, the server takes on its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._planned: list[Fault] = []
        self._random: _RandomMode | None = None
        self.injected: list[tuple[str, Fault]] = []  # (route, fault) for every fault used

    def _plan(self, n: int, fault: Fault) -> None:
        with self._lock:
            self._planned.extend([fault] * n)

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        *,
        code: str | None = None,
        message: str | None = None,
        should_retry: bool | None = None,
        after_work: bool = False,
        route: str | None = None,
    ) -> None:
        """Answer the next `n` requests with `status` (by default before doing the work)."""
        self._plan(n, Fault("error", after_work, status, code, message, should_retry, route=route))

    def rate_limit_next(self, n: int = 1, *, route: str | None = None) -> None:
        """429 `rate_limit` for the next `n`, as if over the per-second limit."""
        self.fail_next(n, 429, code="rate_limit", route=route)

    def timeout_next(
        self,
        n: int = 1,
        seconds: float = 30.0,
        *,
        after_work: bool = True,
        route: str | None = None,
    ) -> None:
        """Hold the next `n` answers `seconds`. `after_work=True`: the effect is applied and
        saved first, then the answer is late; `after_work=False`: nothing is applied and the
        connection is dropped after the hold. A client that gives up first cancels the hold."""
        self._plan(n, Fault("timeout", after_work, seconds=seconds, route=route))

    def drop_next(self, n: int = 1, *, after_work: bool = True, route: str | None = None) -> None:
        """Close the next `n` connections without an answer, after applying the effect or not."""
        self._plan(n, Fault("drop", after_work, route=route))

    def drop_after_work_next(self, n: int = 1, *, route: str | None = None) -> None:
        self.drop_next(n, after_work=True, route=route)

    def random(
        self,
        rate: float = 0.2,
        *,
        seed: int | None = None,
        kinds: Sequence[str] = ("rate_limit", "error", "timeout", "drop"),
        timeout_seconds: float = 30.0,
        route: str | None = None,
    ) -> None:
        """From now on, each matching request meets a fault with probability `rate`, its kind
        drawn evenly from `kinds` (see RANDOM_KINDS; `timeout` and `drop` strike after the work,
        their `_before_work` variants before it). Same seed, same draws for the same requests."""
        unknown = set(kinds) - set(RANDOM_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; use {RANDOM_KINDS}")
        with self._lock:
            self._random = _RandomMode(
                rate, tuple(kinds), timeout_seconds, route, random.Random(seed)
            )

    def stop_random(self) -> None:
        with self._lock:
            self._random = None

    def clear(self) -> None:
        with self._lock:
            self._planned.clear()
            self._random = None

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._planned)

    def take(self, route: str) -> Fault | None:
        """The fault for this request, if any (called once per request, by the server)."""
        with self._lock:
            fault = next((f for f in self._planned if f.route in (None, route)), None)
            if fault is not None:
                self._planned.remove(fault)
            elif self._random is not None and self._random.route in (None, route):
                fault = self._draw(self._random)
            if fault is not None:
                self.injected.append((route, fault))
            return fault

    @staticmethod
    def _draw(mode: _RandomMode) -> Fault | None:
        if mode.rng.random() >= mode.rate:
            return None
        kind = mode.rng.choice(mode.kinds)
        return {
            "rate_limit": Fault("error", False, 429, "rate_limit"),
            "error": Fault("error", False, 500),
            "error_after_work": Fault("error", True, 500),
            "timeout": Fault("timeout", True, seconds=mode.seconds),
            "timeout_before_work": Fault("timeout", False, seconds=mode.seconds),
            "drop": Fault("drop", True),
            "drop_before_work": Fault("drop", False),
        }[kind]
