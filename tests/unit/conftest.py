"""Fixtures the unit tests of the delivery package share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from token_meter_plugin.delivery.outbox import Outbox


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    """An open outbox on a journal of its own: a cache of 3 events, no size bound to speak of."""
    opened = Outbox(tmp_path / "journal", max_entries=3, max_bytes=10**9, batch_size=100)
    assert opened.open()
    yield opened
    opened.close()
