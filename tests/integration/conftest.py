"""Fixtures for the plugin-server tests: a fake collector and Kong-side harnesses."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.collector import FakeCollector
from tests.harness.kong import HarnessFactory, KongHarness
from tests.harness.paths import REPO_ROOT, VENV_BIN


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    with FakeCollector() as fake:
        yield fake


@pytest.fixture
def plugin_config(collector: FakeCollector, tmp_path: Path) -> dict[str, Any]:
    """A config of just the two required fields, plus a spool inside the test's directory."""
    return {
        "collector_url": collector.url,
        "collector_token": collector.token,
        "spool_dir": str(tmp_path / "spool"),
    }


@pytest.fixture
def make_harness(tmp_path: Path) -> Iterator[HarnessFactory]:
    """Start a plugin server as Kong does: `make_harness("token-meter-plugin", "-g", workers=2)`."""
    started: list[KongHarness] = []

    def make(command: str | list[str], *extra_args: str, **options: Any) -> KongHarness:
        """`options` go to KongHarness (workers=, pool_size=, respawn=, timeout=, ...)."""
        cmd = [str(VENV_BIN / command)] if isinstance(command, str) else command
        prefix = tmp_path / f"kong-{len(started)}"
        prefix.mkdir()
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        harness = KongHarness(cmd, prefix, extra_args=extra_args, env=env, **options)
        started.append(harness)
        harness.start()
        return harness

    yield make
    for harness in started:
        harness.kill()
