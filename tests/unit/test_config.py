"""The config declaration: each rule refuses what it should, in Kong's words and naming the field,
and the Lua patterns mean in Python what they mean in Lua."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from token_meter_plugin import config, kong_schema
from token_meter_plugin.config import (
    FIELDS,
    GIB,
    MIB,
    TOKEN_METER,
    TOKEN_METER_LOG,
    ConfigError,
    PluginConfig,
)
from token_meter_plugin.kong_schema import check, lua_pattern_regex, lua_search

REQUIRED = {"collector_url": "http://collector:8787", "collector_token": "t0ken"}


def problems_of(**overrides: Any) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as raised:
        PluginConfig.from_kong(TOKEN_METER, REQUIRED | overrides)
    return raised.value.problems


def attrs_of(name: str) -> dict[str, Any]:
    return next(f for f in FIELDS if f.name == name).kong_attributes()


# -- defaults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_every_default_passes_its_own_rules(field: config.ConfigField) -> None:
    if field.default is not None:
        assert check(field.kong_attributes(), field.default) is None


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_an_optional_field_has_a_default_or_says_what_is_used_when_unset(
    field: config.ConfigField,
) -> None:
    """Only the values the data plane alone knows have no default Kong can show."""
    if field.required or field.default is not None:
        return
    assert field.name in {"spool_dir", "source", "collector_ca_bundle"}
    assert "Unset: " in field.description


def test_unset_fields_take_the_defaults_and_the_data_planes_values() -> None:
    conf = PluginConfig.from_kong(TOKEN_METER_LOG, REQUIRED | {"source": None})
    assert (conf.max_retry_delay, conf.spool_max_bytes, conf.blocklist_max_stale) == (
        30.0,
        8 * GIB,
        60.0,
    )
    assert isinstance(conf.max_retry_delay, float)
    assert conf.source.startswith("kong://") and conf.spool_dir.endswith("/token-meter-log")
    assert conf.inject_stream_usage is False  # token-meter-log has no such field


def test_numbers_arrive_as_lua_numbers() -> None:
    """Kong has one number type: 30 for a number field, 4096.0 for an integer one."""
    conf = PluginConfig.from_kong(TOKEN_METER, REQUIRED | {"timeout": 3, "max_body_size": 4096.0})
    assert conf.timeout == 3.0 and isinstance(conf.timeout, float)
    assert conf.max_body_size == 4096 and isinstance(conf.max_body_size, int)


def test_default_of_gives_the_declared_default_as_the_settings_type() -> None:
    assert config.default_of("max_retry_delay", float) == 30.0
    assert isinstance(config.default_of("max_retry_delay", float), float)
    with pytest.raises(TypeError):
        config.default_of("source", str)  # none declared: the data plane's


# -- each rule -----------------------------------------------------------------------------------

REFUSED = [
    ("collector_url", "", "length must be at least 1"),
    ("collector_url", "collector:8787", "expected http:// or https://"),
    ("collector_url", "ftp://collector", "expected http:// or https://"),
    ("collector_url", "http://collector:8787?x=1", "expected http:// or https://"),
    ("collector_url", "http://user@collector", "expected http:// or https://"),
    ("collector_url", "http://[::1]:8787", "expected http:// or https://"),
    ("collector_url", "http://collector:123456", "expected http:// or https://"),
    ("collector_url", "http:// collector", "expected http:// or https://"),
    ("collector_url", "http://collector:65536", "port must be at most 65535"),
    ("collector_url", "http://collector:99999/v1", "port must be at most 65535"),
    ("collector_url", "http://.collector", "label must have 1 to 63"),
    ("collector_url", "http://a..b:8787", "label must have 1 to 63"),
    ("collector_url", f"http://{'a' * 64}.example", "label must have 1 to 63"),
    ("collector_ca_bundle", "", "length must be at least 1"),
    ("collector_ca_bundle", "ca.pem", "expected an absolute path without control characters"),
    ("collector_ca_bundle", "/etc/ca\x7f.pem", "expected an absolute path without control"),
    ("consumer_identifier", "email", "expected one of: username, id, custom_id"),
    ("max_batch_size", 0, "value should be between 1 and 10000"),
    ("max_batch_size", 10001, "value should be between 1 and 10000"),
    ("max_batch_size", 1.5, "expected an integer"),
    ("max_batch_size", True, "expected an integer"),
    ("max_coalescing_delay", -0.1, "value should be between 0 and 3600"),
    ("max_coalescing_delay", "0.2", "expected a number"),
    ("max_entries", 1000001, "value should be between 1 and 1000000"),
    ("initial_retry_delay", 0, "value must be greater than 0"),
    ("initial_retry_delay", 3600.5, "value should be between 0 and 3600"),
    ("max_retry_delay", 0, "value must be greater than 0"),
    ("max_retry_delay", 3601, "value should be between 0 and 3600"),
    ("timeout", -1, "value must be greater than 0"),
    ("timeout", math.inf, "value should be between 0 and 3600"),
    ("spool_dir", "", "length must be at least 1"),
    ("spool_dir", "spool", "expected an absolute path without control characters"),
    ("spool_dir", "/var/spool\n", "expected an absolute path without control characters"),
    ("spool_max_bytes", MIB - 1, "value should be between 1048576 and 70368744177664"),
    ("blocklist_max_stale", 0.5, "value should be between 1 and 86400"),
    ("fail_open", "false", "expected a boolean"),
    ("inject_stream_usage", 1, "expected a boolean"),
    ("max_body_size", GIB + 1, "value should be between 1 and 1073741824"),
    ("source", "", "length must be at least 1"),
    ("source", "s" * 513, "length must be at most 512"),
    ("source", "é" * 257, "length must be at most 512"),  # 514 bytes: Lua counts bytes
]


@pytest.mark.parametrize(("name", "value", "message"), REFUSED)
def test_a_value_breaking_a_rule_is_refused_naming_the_field(
    name: str, value: Any, message: str
) -> None:
    (problem,) = problems_of(**{name: value})
    assert problem.startswith(f"{name}: ")
    assert message in problem


def rule_messages(attrs: dict[str, Any]) -> set[str]:
    """A fragment of the message of each validator of a field (the type check is common code)."""
    fragments = {"one_of": "expected one of", "gt": "greater than", "between": "between"}
    messages = {fragment for name, fragment in fragments.items() if name in attrs}
    if "len_max" in attrs:
        messages.add("at most")
    if attrs["type"] == "string" and "one_of" not in attrs:
        messages.add("at least 1")  # Kong's default len_min
    messages |= {
        rule["err"] for rule in [*attrs.get("match_none", ()), *attrs.get("match_all", ())]
    }
    if "match_any" in attrs:
        messages.add(attrs["match_any"]["err"])
    return messages


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_every_rule_of_every_field_is_exercised_above(field: config.ConfigField) -> None:
    if field.referenceable:
        return  # see the next test
    cases = [message for name, _, message in REFUSED if name == field.name]
    for message in rule_messages(field.kong_attributes()):
        assert any(case in message or message in case for case in cases), message


def test_a_resolved_token_is_not_checked_as_kong_does_not() -> None:
    """Kong checks the vault reference it stores, not the secret the plugin receives."""
    assert "match_all" in attrs_of("collector_token")
    conf = PluginConfig.from_kong(TOKEN_METER, REQUIRED | {"collector_token": "line\n"})
    assert conf.collector_token == "line\n"
    (problem,) = problems_of(collector_token=7)
    assert problem == "collector_token: expected a string"


ACCEPTED = [
    ("collector_url", "https://collector.token-meter.svc.cluster.local"),
    ("collector_url", "http://10.0.0.7:65535/"),
    ("collector_url", "http://collector_1:8787/base/path"),
    ("collector_url", f"http://{'a' * 63}.example."),
    ("collector_url", "http://c:8/p/a~t:h@x/%20;v=1,(x)*+&$!'"),
    ("max_coalescing_delay", 0),
    ("spool_max_bytes", MIB),
    ("spool_dir", "/var/lib/kong spool/é"),
    ("source", "é" * 256),
    ("blocklist_max_stale", 1),
]


@pytest.mark.parametrize(("name", "value"), ACCEPTED)
def test_values_at_the_bounds_are_taken(name: str, value: Any) -> None:
    PluginConfig.from_kong(TOKEN_METER, REQUIRED | {name: value})


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as raised:
        PluginConfig.from_kong(TOKEN_METER, {"max_batch_size": 0, "source": ""})
    assert [p.split(":")[0] for p in raised.value.problems] == [
        "collector_url",
        "collector_token",
        "max_batch_size",
        "source",
    ]


def test_an_attribute_python_cannot_check_is_an_error_not_ignored() -> None:
    with pytest.raises(ValueError, match="uuid"):
        check({"type": "string", "uuid": True, "description": "an id"}, "x")


def test_the_schema_has_no_entity_checks_python_would_not_apply() -> None:
    """An entity check added to the table reaches Kong and the Lua file, so `from_kong` must
    learn to apply it first: this fails until then."""
    for plugin in config.PLUGIN_NAMES:
        schema = config.plugin_schema(plugin)
        assert set(schema) == {"name", "fields"}
        (record,) = [entry["config"] for entry in schema["fields"] if "config" in entry]
        assert set(record) == {"type", "fields"}


def test_the_module_command_writes_the_lua_schemas(tmp_path: Path) -> None:
    assert config.main([str(tmp_path)]) == 0
    for plugin in config.PLUGIN_NAMES:
        written = (tmp_path / f"{plugin}.schema.lua").read_text()
        assert written == config.render_lua_schema(plugin)


# -- Lua patterns --------------------------------------------------------------------------------

lupa = pytest.importorskip("lupa.luajit21")

PATTERNS = sorted(
    {
        pattern
        for field in FIELDS
        for pattern in (
            *(rule.pattern for rule in (*field.match_none, *field.match_all)),
            *(field.match_any[0] if field.match_any else ()),
        )
    }
)
_lua = lupa.LuaRuntime(unpack_returned_tuples=True, encoding=None)
_lua_finds = _lua.eval("function(s, p) return string.match(s, p) ~= nil end")


def lua_finds(pattern: str, value: str) -> bool:
    return bool(_lua_finds(value.encode("utf-8"), pattern.encode("utf-8")))


# Strings near the patterns' alphabet: URL pieces, dots, digits, controls, non-ASCII.
near_urls = st.lists(
    st.sampled_from(
        [
            "http://",
            "https://",
            "ftp://",
            "a",
            "Z",
            "9",
            "65536",
            "6553",
            ":",
            ".",
            "..",
            "/",
            "-",
            "_",
            "~",
            "%",
            "?",
            "#",
            "@",
            "[",
            "]",
            " ",
            "\n",
            "\x00",
            "\x7f",
            "é",
            "a" * 64,
        ]
    ),
    max_size=12,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(near_urls, st.text(max_size=40)), pattern=st.sampled_from(PATTERNS))
def test_each_pattern_matches_in_python_where_it_matches_in_lua(value: str, pattern: str) -> None:
    assert lua_search(pattern, value) is lua_finds(pattern, value)


@pytest.mark.parametrize(
    ("pattern", "value"),
    [
        ("^a-b$", "aaab"),
        ("[%a_]+%d?$", "x_y7"),
        ("^[^%s]*$", "tab\there"),
        ("[]]", "]"),
        ("%.%%", "a.%"),
        ("^[%l%u%x%p]*$", "aZ!~"),
        ("[a-c-]", "-"),
        ("^.?$", "\n"),
    ],
)
def test_the_translation_follows_luas_rules(pattern: str, value: str) -> None:
    assert lua_search(pattern, value) is lua_finds(pattern, value)


@pytest.mark.parametrize("pattern", ["(a)", "%bxy", "%f[%w]", "%1", "[%W]", "[a"])
def test_lua_pattern_features_without_a_translation_raise(pattern: str) -> None:
    with pytest.raises(ValueError):
        lua_pattern_regex(pattern)


def test_lua_classes_are_the_c_locales() -> None:
    assert lua_search("^%w+$", "abc09") and not lua_search("%w", "é_")
    assert re.fullmatch(lua_pattern_regex("%s+"), b" \t\n\v\f\r")
    assert kong_schema.lua_search("%c", "\x00") and not kong_schema.lua_search("%c", " ")
