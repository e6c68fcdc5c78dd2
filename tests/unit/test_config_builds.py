"""Every config the schema accepts builds a working plugin.

Configs are generated from the `FIELDS` declaration: each value of the right type, inside or at
its bounds, any subset of the optional fields left out (or null, as Kong sends a field it has no
value for). Each must pass Kong's rules as `kong_schema.check` applies them, build a
`PluginConfig` and both runtime settings, construct the plugin's handler (which starts the
process's shipper and blocklist poller), journal an event and answer a blocklist check.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from token_meter_plugin import config
from token_meter_plugin.block_answer import BLOCKLIST_UNAVAILABLE
from token_meter_plugin.blocklist import BlocklistSettings, close_all
from token_meter_plugin.config import FIELDS, TOKEN_METER, ConfigField, PluginConfig
from token_meter_plugin.delivery import CollectorClient, DeliverySettings, shutdown_all
from token_meter_plugin.delivery.journal import collector_key
from token_meter_plugin.event import build_usage_event
from token_meter_plugin.handler import TokenMeter, TokenMeterLog
from token_meter_plugin.kong_data import new_event_id
from token_meter_plugin.kong_schema import check, lua_pattern_regex
from token_meter_plugin.usage import Usage

# Nothing listens on port 9 (discard) here: the poller and the sender fail fast and back off.
UNREACHABLE = ("http://127.0.0.1:9", "http://127.0.0.1:9/", "http://localhost:9/base/")
PRINTABLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
# A directory name: anything a path component can hold but '/', NUL and the other controls.
DIR_NAME = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/"),
    min_size=1,
    max_size=40,
).filter(lambda name: name not in {".", ".."})


def values_of(field: ConfigField) -> st.SearchStrategy[Any]:
    """Values Kong takes for ``field``, read from its declaration; the bounds themselves often."""
    if field.name == "collector_url":
        return st.sampled_from(UNREACHABLE)  # the URL's own rules: test_accepted_urls_are_usable
    if field.name == "collector_token":
        return st.text(PRINTABLE, min_size=1, max_size=64)
    if field.name == "spool_dir":
        return DIR_NAME  # a directory under the test's own root, joined in the test
    if field.name == "collector_ca_bundle":
        return DIR_NAME.map(lambda name: f"/nonexistent/{name}")  # read for https:// only
    if field.type == "boolean":
        return st.booleans()
    if field.one_of is not None:
        return st.sampled_from(field.one_of)
    if field.type == "string" and field.len_max is not None:
        limit = field.len_max
        return st.text(min_size=1, max_size=limit).filter(lambda s: len(s.encode()) <= limit)
    assert field.between is not None, f"no strategy for {field.name}"
    low, high = field.between
    above = field.gt if field.gt is not None else -math.inf
    if field.type == "integer":
        ints = st.integers(int(low), int(high))
        # Lua has one number type: an integral float is an integer to Kong.
        return st.one_of(st.sampled_from((int(low), int(high))), ints, ints.map(float))
    floats = st.floats(low, high, exclude_min=above >= low)
    ints = st.integers(math.ceil(low), math.floor(high)).filter(lambda v: v > above)
    return st.one_of(st.just(high), floats, ints)


def configs(plugin: str) -> st.SearchStrategy[dict[str, Any]]:
    fields = config.fields_for(plugin)
    optional = {
        f.name: st.none() | values_of(f) if f.default is None else values_of(f)
        for f in fields
        if not f.required
    }
    return st.fixed_dictionaries(
        {f.name: values_of(f) for f in fields if f.required}, optional=optional
    )


@pytest.fixture(scope="module")
def spool_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The journals' root, the default one included (the Kong prefix is the test's)."""
    root = tmp_path_factory.mktemp("kong-prefix")
    config.set_kong_prefix(str(root))
    yield root
    config.set_kong_prefix(config.DEFAULT_KONG_PREFIX)


@settings(max_examples=50, deadline=None)
@given(data=st.data(), plugin=st.sampled_from(config.PLUGIN_NAMES))
def test_every_config_the_schema_accepts_builds_a_working_plugin(
    spool_root: Path, data: st.DataObject, plugin: str
) -> None:
    conf = data.draw(configs(plugin))
    if conf.get("spool_dir") is not None:
        conf["spool_dir"] = str(spool_root / conf["spool_dir"])
    attrs = {f.name: f.kong_attributes() for f in config.fields_for(plugin)}
    for name, value in conf.items():  # the strategies make only what Kong takes
        assert value is None or check(attrs[name], value) is None, name
    plugin_config = PluginConfig.from_kong(plugin, conf)
    DeliverySettings.of(plugin_config)
    BlocklistSettings.of(plugin_config)
    try:
        handler = (TokenMeter if plugin == TOKEN_METER else TokenMeterLog)(conf)
        event = build_usage_event(
            usage=Usage(usage_missing=True),
            request_id=new_event_id(),
            source=handler.config.source,
            subject="alice",
            time=time.time(),
        )
        assert handler.shipper.enqueue(event)  # journaled, whatever the collector does
        verdict = handler.blocklist.check("alice")  # no list yet: stale since start
        assert verdict is None if plugin_config.fail_open else verdict == BLOCKLIST_UNAVAILABLE
    finally:
        close_all()
        shutdown_all(timeout=0.05)


URL_FIELD = next(f for f in FIELDS if f.name == "collector_url")
assert URL_FIELD.match_any is not None
URL_SHAPES = st.one_of(
    *(st.from_regex(lua_pattern_regex(p), fullmatch=True) for p in URL_FIELD.match_any[0])
).map(bytes.decode)


@settings(max_examples=100, deadline=None)
@given(url=URL_SHAPES)
def test_accepted_urls_are_usable(url: str) -> None:
    """A URL the schema takes is one the plugin can split, resolve and connect to (no socket
    is opened here): what passes Kong never makes the plugin raise."""
    if check(URL_FIELD.kong_attributes(), url) is not None:
        return  # refused: a port over 65535 or a bad label
    parts = urlsplit(url)
    assert parts.scheme in ("http", "https") and parts.hostname
    assert parts.port is None or 0 <= parts.port <= 65535
    parts.hostname.encode("idna")  # what the socket layer does with it
    (parts.path or "/").encode("ascii")  # what http.client does with the request line
    CollectorClient(url, "t").close()
    assert collector_key(url)
