"""The journal's two line formats, as pure functions (see ``journal`` for where they live).

A record, one per event::

    <crc32 of the event's JSON, 8 hex digits> <the event's JSON>\n

An acknowledgement, 26 bytes overwritten in place::

    <acknowledged offset, 16 hex digits> <crc32 of those 16 digits, 8 hex digits>\n
"""

from __future__ import annotations

import zlib


def encode_record(payload: bytes) -> bytes:
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode_record(line: bytes) -> bytes | None:
    """The payload of a record (a line without its newline), or None when it is corrupt."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    try:
        crc = int(line[:8], 16)
    except ValueError:
        return None
    payload = line[9:]
    return payload if zlib.crc32(payload) == crc else None


def parse_records(data: bytes, *, final: bool, max_records: int) -> tuple[list[bytes], int, int]:
    """(payloads, corrupt records, bytes used) of up to ``max_records`` whole lines of ``data``.

    ``final``: ``data`` ends where the segment ends, so a last line without newline is a torn
    record (counted corrupt); otherwise it is left for the next read.
    """
    payloads: list[bytes] = []
    corrupt = used = 0
    while used < len(data) and len(payloads) + corrupt < max_records:
        newline = data.find(b"\n", used)
        if newline < 0:
            if final:
                corrupt += 1
                used = len(data)
            break
        payload = decode_record(data[used:newline])
        if payload is None:
            corrupt += 1
        else:
            payloads.append(payload)
        used = newline + 1
    return payloads, corrupt, used


def encode_ack(offset: int) -> bytes:
    digits = b"%016x" % offset
    return b"%s %08x\n" % (digits, zlib.crc32(digits))


def decode_ack(raw: bytes) -> int | None:
    if len(raw) != 26 or raw[16:17] != b" " or raw[25:] != b"\n":
        return None
    digits = raw[:16]
    try:
        ok = int(raw[17:25], 16) == zlib.crc32(digits)
        return int(digits, 16) if ok else None
    except ValueError:
        return None
