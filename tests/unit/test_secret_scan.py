"""The session's secret scan (tests/secret_scan.py) finds a registered secret wherever it was
kept, says where, and never repeats the secret whole."""

from __future__ import annotations

from pathlib import Path

from tests.secret_scan import SecretScan


def test_a_registered_secret_is_found_in_any_kept_text_or_file(tmp_path: Path) -> None:
    scan = SecretScan()
    scan.register("ingest-0123456789abcdef", "short", None, "  admin-0123456789abcdef\n", "a" * 32)
    assert scan.secrets == {"ingest-0123456789abcdef", "admin-0123456789abcdef"}
    scan.keep("nothing to see", "test_a: Captured stdout call")
    scan.keep("auth=Bearer ingest-0123456789abcdef", "test_b: Captured log call")
    (tmp_path / "collector.log").write_text('{"admin_token": "admin-0123456789abcdef"}\n')
    scan.keep_files([tmp_path / "collector.log", tmp_path / "gone.log"])
    leaks = scan.leaks()
    assert leaks == [
        f"admi...(22 characters) in {tmp_path / 'collector.log'}",
        "inge...(23 characters) in test_b: Captured log call",
    ]
    assert not any("0123456789abcdef" in leak for leak in leaks)


def test_a_secret_never_spans_two_kept_texts() -> None:
    scan = SecretScan()
    scan.register("abcdefgh-ijkl")
    scan.keep("...abcdefgh", "one")
    scan.keep("-ijkl...", "two")
    assert scan.leaks() == []
