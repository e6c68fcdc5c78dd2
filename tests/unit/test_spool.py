"""Spool: durable batch files, oldest first, bounded, one process per directory."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from token_meter_plugin.spool import MAX_SIBLINGS, Spool, SpoolBusyError


def body(*ids: str) -> bytes:
    return gzip.compress(("[" + ",".join(f'{{"id": "{i}"}}' for i in ids) + "]").encode())


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def spool(base: Path) -> Iterator[Spool]:
    opened = Spool.open(base, 10_000)
    yield opened
    opened.close()


def test_batches_come_back_oldest_first_and_leave_only_when_removed(spool: Spool) -> None:
    first = spool.write(body("a"), 1)
    second = spool.write(body("b", "c"), 2)
    assert first is not None and second is not None
    assert (spool.batches, spool.events) == (2, 3)
    assert spool.oldest() == first
    assert spool.read(first) == body("a")
    spool.remove(first)
    assert spool.oldest() == second
    assert not first.path.exists()
    spool.remove(second)
    assert spool.oldest() is None
    assert (spool.batches, spool.events, spool.bytes_used) == (0, 0, 0)


def test_file_names_sort_in_write_order(spool: Spool) -> None:
    written = [spool.write(body(str(i)), 1) for i in range(50)]
    names = [batch.path.name for batch in written if batch is not None]
    assert names == sorted(names)
    assert len(set(names)) == 50


def test_a_reopened_spool_finds_its_batches_and_discards_unfinished_writes(base: Path) -> None:
    """What a crashed process left: complete batches are kept, a torn temporary file is not."""
    spool = Spool.open(base, 10_000)
    kept = [spool.write(body("x", "y"), 2), spool.write(body("z"), 1)]
    spool.close()
    (base / ".tmp-00000000000000000000001-0000001-000000001-n3.json.gz").write_bytes(b"torn")
    reopened = Spool.open(base, 10_000)
    try:
        assert (reopened.batches, reopened.events) == (2, 3)
        assert reopened.oldest() == kept[0]
        assert not list(base.glob(".tmp-*"))
    finally:
        reopened.close()


def test_past_its_bound_the_spool_refuses_batches(
    base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    size = len(body("a"))
    spool = Spool.open(base, 2 * size)
    try:
        assert spool.write(body("a"), 1) is not None
        assert spool.write(body("b"), 1) is not None
        assert spool.write(body("c"), 1) is None
        assert any("spool_full" in r.getMessage() for r in caplog.records)
        assert spool.events == 2
        oldest = spool.oldest()
        assert oldest is not None
        spool.remove(oldest)
        assert spool.write(body("c"), 1) is not None
    finally:
        spool.close()


def test_a_locked_directory_sends_the_second_process_to_a_sibling(base: Path) -> None:
    first = Spool.open(base, 10_000)
    second = Spool.open(base, 10_000)
    try:
        assert first.directory == base
        assert second.directory == base.with_name("spool.1")
    finally:
        first.close()
        second.close()


def test_when_every_candidate_is_locked_open_fails(base: Path) -> None:
    spools = [Spool.open(base, 10_000) for _ in range(MAX_SIBLINGS + 1)]
    try:
        with pytest.raises(SpoolBusyError):
            Spool.open(base, 10_000)
    finally:
        for spool in spools:
            spool.close()


def test_batches_of_a_sibling_nobody_holds_are_adopted(base: Path) -> None:
    main = Spool.open(base, 10_000)
    sibling = Spool.open(base, 10_000)  # e.g. a plugin server that overlapped and then died
    orphan = sibling.write(body("orphan"), 1)
    assert orphan is not None
    sibling.close()
    main.close()
    adopter = Spool.open(base, 10_000)
    try:
        assert adopter.directory == base
        oldest = adopter.oldest()
        assert oldest is not None
        assert oldest.path == base / orphan.path.name
        assert adopter.read(oldest) == body("orphan")
        assert not list(sibling.directory.glob("*.json.gz"))
    finally:
        adopter.close()


def test_a_live_siblings_batches_are_left_alone(base: Path) -> None:
    holder = Spool.open(base, 10_000)
    live = Spool.open(base, 10_000)
    assert live.write(body("mine"), 1) is not None
    holder.close()
    newcomer = Spool.open(base, 10_000)
    try:
        assert newcomer.oldest() is None
        assert live.events == 1
    finally:
        newcomer.close()
        live.close()


def test_a_quarantined_batch_is_kept_aside_and_forgotten(spool: Spool) -> None:
    batch = spool.write(b"not gzip", 4)
    assert batch is not None
    spool.quarantine(batch)
    assert spool.oldest() is None
    assert batch.path.with_name(batch.path.name + ".corrupt").exists()


def test_a_forked_child_does_not_release_the_parents_lock(base: Path) -> None:
    spool = Spool.open(base, 10_000)
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                spool.abandon_after_fork()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        other = Spool.open(base, 10_000)
        try:
            assert other.directory != base  # still locked by this process
        finally:
            other.close()
    finally:
        spool.close()
