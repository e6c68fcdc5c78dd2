"""Journal: records appended, read back in order, acknowledged, recovered, adopted; one process
per directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from token_meter_plugin.delivery.journal import (
    MAX_SIBLINGS,
    Journal,
    JournalBusyError,
    collector_key,
    segment_limit,
)
from token_meter_plugin.delivery.records import (
    decode_ack,
    decode_record,
    encode_ack,
    encode_record,
    parse_records,
)


def event(i: int | str) -> bytes:
    return b'{"id":"e-%s","subject":"alice"}' % str(i).encode()


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return tmp_path / "journal"


@pytest.fixture
def journal(base: Path) -> Iterator[Journal]:
    opened = Journal.open(base)
    yield opened
    opened.close()


def append(journal: Journal, *ids: int | str, max_bytes: int = 10**9) -> list[tuple[int, int, int]]:
    placed = []
    for i in ids:
        where = journal.append(encode_record(event(i)), max_bytes)
        assert where is not None
        placed.append(where)
    return placed


def segment_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.journal"))


# -- formats -------------------------------------------------------------------------------------


def test_a_record_is_one_checksummed_line() -> None:
    record = encode_record(event(1))
    assert record.endswith(b"\n") and record.count(b"\n") == 1
    assert record[9:-1] == event(1)
    assert decode_record(record[:-1]) == event(1)


@pytest.mark.parametrize(
    "line",
    [
        b"",  # empty
        b"00000000",  # no payload
        b"zzzzzzzz {}",  # no checksum
        encode_record(event(1))[:-1].replace(b"e-1", b"e-2"),  # payload changed
        encode_record(event(1))[:-5],  # cut short
    ],
)
def test_a_corrupt_record_is_recognised(line: bytes) -> None:
    assert decode_record(line) is None


def test_parsing_skips_corrupt_lines_and_tells_a_torn_tail_only_at_the_end() -> None:
    good = encode_record(event(1)) + b"garbage\n" + encode_record(event(2))
    torn = encode_record(event(3))[:-7]
    assert parse_records(good + torn, final=False, max_records=10) == (
        [event(1), event(2)],
        1,
        len(good),
    )
    assert parse_records(good + torn, final=True, max_records=10) == (
        [event(1), event(2)],
        2,
        len(good + torn),
    )
    assert parse_records(good, final=True, max_records=2) == (
        [event(1)],
        1,
        len(good) - len(encode_record(event(2))),
    )


def test_an_ack_is_fixed_size_and_checksummed() -> None:
    assert len(encode_ack(0)) == len(encode_ack(2**40)) == 26
    assert decode_ack(encode_ack(12345)) == 12345
    damaged = bytearray(encode_ack(12345))
    damaged[3] ^= 1
    assert decode_ack(bytes(damaged)) is None
    assert decode_ack(b"") is None


def test_collector_keys_are_safe_names_and_distinct_per_url() -> None:
    urls = ["http://collector:8787", "https://collector:8787", "http://a/b", "http://a_b"]
    keys = [collector_key(url) for url in urls]
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert "/" not in key and not key.startswith(".")
    assert collector_key("http://collector:8787").startswith("collector_8787-")


# -- append, read, acknowledge -------------------------------------------------------------------


def test_records_come_back_in_order_and_leave_only_when_acknowledged(journal: Journal) -> None:
    placed = append(journal, 0, 1, 2)
    seq = placed[0][0]
    assert [start for _, start, _ in placed] == [0, placed[0][2], placed[1][2]]
    first = journal.read(seq, 0, placed[2][2], max_records=2)
    assert (first.events, first.corrupt, first.end) == ([event(0), event(1)], 0, placed[1][2])
    rest = journal.read(seq, first.end, placed[2][2], max_records=10)
    assert rest.events == [event(2)]
    journal.acknowledge(seq, first.end)
    assert decode_ack((journal.directory / f"{seq:012d}.ack").read_bytes()) == first.end


def test_segments_are_sealed_at_an_eighth_of_the_bound_and_sort_in_write_order(
    journal: Journal,
) -> None:
    record = len(encode_record(event(0)))
    bound = 8 * 3 * record  # three records per segment
    assert segment_limit(bound) == 3 * record
    placed = append(journal, *range(10), max_bytes=bound)
    assert [seq for seq, _, _ in placed] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    assert segment_files(journal.directory) == [f"{i:012d}.journal" for i in (1, 2, 3, 4)]


def test_a_fully_acknowledged_sealed_segment_is_deleted(journal: Journal) -> None:
    record = len(encode_record(event(0)))
    placed = append(journal, 0, 1, 2, 3, max_bytes=8 * 2 * record)
    assert [seq for seq, _, _ in placed] == [1, 1, 2, 2]
    journal.acknowledge(1, placed[1][2])
    assert segment_files(journal.directory) == ["000000000002.journal"]
    assert not (journal.directory / "000000000001.ack").exists()
    assert journal.bytes == 2 * record
    journal.acknowledge(2, placed[3][2])  # the segment appended to stays
    assert segment_files(journal.directory) == ["000000000002.journal"]


def test_past_its_bound_the_journal_refuses_records_until_some_are_acknowledged(
    journal: Journal,
) -> None:
    record = encode_record(event(0))
    bound = 8 * len(record)
    placed = append(journal, *range(8), max_bytes=bound)
    assert journal.bytes == bound
    assert journal.append(record, bound) is None
    journal.acknowledge(placed[0][0], placed[0][2])  # the first segment: one record
    assert journal.append(record, bound) is not None


# -- recovery ------------------------------------------------------------------------------------


def test_a_reopened_journal_resumes_after_the_acknowledged_records(base: Path) -> None:
    journal = Journal.open(base)
    placed = append(journal, 0, 1, 2)
    journal.acknowledge(1, placed[0][2])
    journal.close()
    reopened = Journal.open(base)
    try:
        [old, new] = reopened.segments
        assert (old.seq, old.acked, old.recovered) == (1, placed[0][2], True)
        assert (new.seq, new.size, new.recovered) == (2, 0, False)
        assert reopened.count_records(old) == 2
        assert reopened.read(1, old.acked, old.size, 10).events == [event(1), event(2)]
    finally:
        reopened.close()


def test_a_torn_tail_and_a_corrupt_record_are_skipped_and_counted(base: Path) -> None:
    journal = Journal.open(base)
    append(journal, 0, 1, 2)
    journal.close()
    path = base / "000000000001.journal"
    data = bytearray(path.read_bytes())
    data[data.index(b"e-1") + 2] ^= 0x01  # flip a bit inside the second record
    path.write_bytes(bytes(data) + encode_record(event(3))[:-10])  # a write cut by a crash
    reopened = Journal.open(base)
    try:
        segment = reopened.segments[0]
        assert reopened.count_records(segment) == 4
        extract = reopened.read(1, 0, segment.size, 10)
        assert (extract.events, extract.corrupt, extract.end) == (
            [event(0), event(2)],
            2,
            segment.size,
        )
    finally:
        reopened.close()


def test_an_ack_that_does_not_check_out_replays_the_whole_segment(base: Path) -> None:
    journal = Journal.open(base)
    placed = append(journal, 0, 1)
    journal.acknowledge(1, placed[0][2])
    journal.close()
    (base / "000000000001.ack").write_bytes(encode_ack(placed[0][2] - 3))  # inside a record
    reopened = Journal.open(base)
    try:
        assert reopened.segments[0].acked == 0
    finally:
        reopened.close()


def test_a_fully_acknowledged_segment_is_deleted_on_recovery_and_stale_acks_too(
    base: Path,
) -> None:
    journal = Journal.open(base)
    placed = append(journal, 0, 1)
    journal.acknowledge(1, placed[1][2])  # the segment appended to: kept, ack written
    journal.close()
    (base / "000000000007.ack").write_bytes(encode_ack(0))  # its segment is gone
    reopened = Journal.open(base)
    try:
        assert [s.seq for s in reopened.segments] == [8]  # after every name seen
        assert sorted(p.name for p in base.iterdir() if p.name != ".lock") == [
            "000000000008.journal"
        ]
    finally:
        reopened.close()


# -- one process per directory -------------------------------------------------------------------


def test_a_locked_directory_sends_the_second_opener_to_a_sibling(base: Path) -> None:
    first = Journal.open(base)
    second = Journal.open(base)
    try:
        assert first.directory == base
        assert second.directory == base.with_name("journal.1")
    finally:
        first.close()
        second.close()


def test_when_every_candidate_is_locked_open_fails(base: Path) -> None:
    journals = [Journal.open(base) for _ in range(MAX_SIBLINGS + 1)]
    try:
        with pytest.raises(JournalBusyError):
            Journal.open(base)
    finally:
        for journal in journals:
            journal.close()


def test_the_segments_of_a_sibling_nobody_holds_are_adopted_after_ours(base: Path) -> None:
    main = Journal.open(base)
    sibling = Journal.open(base)  # a plugin server that overlapped its successor, then died
    append(main, "mine")
    placed = append(sibling, "orphan-0", "orphan-1")
    sibling.acknowledge(1, placed[0][2])
    sibling.close()
    main.close()
    adopter = Journal.open(base)
    try:
        assert adopter.directory == base
        # ours first, then the orphan's (renamed after ours), then the one appended to now
        recovered = [s for s in adopter.segments if s.recovered]
        assert [adopter.read(s.seq, s.acked, s.size, 10).events for s in recovered] == [
            [event("mine")],
            [event("orphan-1")],
        ]
        assert not list(sibling.directory.glob("*.journal"))
        assert not list(sibling.directory.glob("*.ack"))
    finally:
        adopter.close()


def test_a_live_siblings_segments_are_left_alone(base: Path) -> None:
    holder = Journal.open(base)
    live = Journal.open(base)
    append(live, "live")
    holder.close()
    newcomer = Journal.open(base)
    try:
        assert [s.recovered for s in newcomer.segments] == [False]
        assert segment_files(live.directory) == ["000000000001.journal"]
    finally:
        newcomer.close()
        live.close()
