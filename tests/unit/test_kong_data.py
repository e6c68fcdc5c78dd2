"""The PDK-free helpers that turn Kong's answers into a usage event's fields."""

from __future__ import annotations

import gzip
import time
import uuid
import zlib

import pytest

from token_meter_plugin.kong_data import (
    ANONYMOUS,
    ServiceNames,
    as_bytes,
    clean_text,
    consumer_subject,
    content_length,
    entity_ref,
    header_value,
    is_json_content_type,
    last_status,
    new_event_id,
    sniff_content_encoding,
)


def test_clean_text_replaces_bytes_that_were_not_utf8() -> None:
    lone = b"caf\xe9".decode("utf-8", "surrogateescape")  # what the RPC layer hands over
    assert clean_text(lone) == "caf\ufffd"
    assert clean_text("plain") == "plain"
    assert clean_text("") is None
    assert clean_text(42) is None


def test_consumer_subject_falls_back_to_the_id_then_anonymous() -> None:
    consumer = {"id": "c-1", "username": "alice", "custom_id": "cus_1"}
    assert consumer_subject(consumer, "username") == "alice"
    assert consumer_subject(consumer, "custom_id") == "cus_1"
    assert consumer_subject({"id": "c-1"}, "username") == "c-1"
    assert consumer_subject(None, "username") == ANONYMOUS
    assert consumer_subject({}, "id") == ANONYMOUS


def test_headers_from_the_multimap_kong_sends() -> None:
    headers = {"content-type": ["application/json"], "content-length": ["20480"]}
    assert header_value(headers, "content-type") == "application/json"
    assert header_value({"x": "single"}, "x") == "single"
    assert header_value({"x": []}, "x") is None
    assert header_value(None, "x") is None
    assert content_length(headers) == 20480


@pytest.mark.parametrize("value", [None, [], ["abc"], ["-1"], ["1e3"], ["9" * 25]])
def test_a_missing_or_bad_content_length_is_unknown(value: object) -> None:
    headers = {} if value is None else {"content-length": value}
    assert content_length(headers) is None


@pytest.mark.parametrize(
    ("content_type", "json"),
    [
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("application/vnd.api+json", True),
        ("text/plain", False),
        ("multipart/form-data; boundary=x", False),
        (None, False),
    ],
)
def test_json_content_types(content_type: object, json: bool) -> None:
    assert is_json_content_type(content_type) is json


def test_content_encoding_is_told_by_the_first_bytes() -> None:
    assert sniff_content_encoding(gzip.compress(b"{}")) == "gzip"
    assert sniff_content_encoding(zlib.compress(b"{}")) == "deflate"
    assert sniff_content_encoding(b'{"usage":{}}') is None
    assert sniff_content_encoding(b"data: {}\n\n") is None
    assert sniff_content_encoding(b"\x8b\x02\x80") == "br"
    assert sniff_content_encoding(b"") is None


def test_event_ids_are_uuid7_ordered_by_time() -> None:
    first = new_event_id(now_ns=1_700_000_000_000_000_000)
    later = new_event_id(now_ns=1_700_000_000_001_000_000)
    assert uuid.UUID(first).version == 7
    assert first < later
    assert new_event_id() != new_event_id()


def test_last_status_of_a_retried_upstream() -> None:
    assert last_status("502, 200") == 200
    assert last_status("502 : 504") == 504
    assert last_status(201) == 201
    assert last_status("") is None
    assert last_status(None) is None


def test_as_bytes_and_entity_refs() -> None:
    assert as_bytes(b"x") == b"x"
    assert as_bytes("é") == "é".encode()
    assert as_bytes(None) == b""
    assert entity_ref({"service": {"id": "s-1"}}, "service") == "s-1"
    assert entity_ref({"service": None}, "service") is None
    assert entity_ref("not a route", "service") is None


def test_service_names_expire() -> None:
    names = ServiceNames(ttl=0.05)
    assert names.get("s-1") == (False, None)
    names.put("s-1", "openai")
    assert names.get("s-1") == (True, "openai")
    time.sleep(0.06)
    assert names.get("s-1") == (False, None)
