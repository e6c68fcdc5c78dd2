"""The Lua schema files in schema/ agree with the `-dump` output and with plugin/config.py.

Each `schema/<plugin>.schema.lua` is loaded in LuaJIT (lupa), with a stub of the one Kong module
it requires, and its config fields are compared with what the plugin server tells Kong.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

lupa = pytest.importorskip("lupa.luajit21")

from token_meter_plugin import config  # noqa: E402

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schema"
VENV_BIN = Path(sys.executable).parent
SCRIPTS = {
    config.TOKEN_METER: "token-meter-plugin",
    config.TOKEN_METER_LOG: "token-meter-log-plugin",
}

# typedefs.protocols_http as Kong 3.x defines it (kong/db/schema/typedefs.lua), for a schema
# that requires it (ours write the table out: Konnect refuses require())
TYPEDEFS_STUB = """
local http_protocols = { "grpc", "grpcs", "http", "https" }
package.preload["kong.db.schema.typedefs"] = function()
  return {
    protocols_http = {
      type = "set", required = true, default = http_protocols,
      elements = { type = "string", one_of = http_protocols },
      description = "A set of strings representing HTTP protocols.",
    },
  }
end
"""


def to_python(value: Any) -> Any:
    """A Lua value as JSON-like Python: a table with keys 1..n is a list."""
    if lupa.lua_type(value) != "table":
        return value
    items = dict(value.items())
    if (
        items
        and all(isinstance(k, int) for k in items)
        and sorted(items) == list(range(1, len(items) + 1))
    ):
        return [to_python(items[i]) for i in range(1, len(items) + 1)]
    return {k: to_python(v) for k, v in items.items()}


def load_lua_schema(plugin: str) -> dict[str, Any]:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.execute(TYPEDEFS_STUB)
    source = (SCHEMA_DIR / f"{plugin}.schema.lua").read_text()
    chunk = lua.eval(f"function(src) return assert(loadstring(src, '={plugin}.schema.lua'))() end")
    schema: dict[str, Any] = to_python(chunk(source))
    return schema


def dump(plugin: str) -> dict[str, Any]:
    out = subprocess.run(
        [str(VENV_BIN / SCRIPTS[plugin]), "-dump"], capture_output=True, check=True, timeout=60
    )
    infos = json.loads(out.stdout)  # the whole of stdout is the JSON: nothing else printed
    assert len(infos) == 1
    info: dict[str, Any] = infos[0]
    return info


def config_fields(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (config_entry,) = [entry["config"] for entry in schema["fields"] if "config" in entry]
    assert config_entry["type"] == "record"
    return {name: attrs for entry in config_entry["fields"] for name, attrs in entry.items()}


def numbers_as_floats(value: Any) -> Any:
    """Lua has one number type: compare 30 and 30.0 as equal, but keep bools apart."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list):
        return [numbers_as_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: numbers_as_floats(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("plugin", config.PLUGIN_NAMES)
def test_lua_schema_file_is_up_to_date(plugin: str) -> None:
    """schema/<plugin>.schema.lua is what config.py renders (regenerate with
    `python -m token_meter_plugin.config`)."""
    assert (SCHEMA_DIR / f"{plugin}.schema.lua").read_text() == config.render_lua_schema(plugin)


@pytest.mark.parametrize("plugin", config.PLUGIN_NAMES)
def test_lua_schema_matches_dump(plugin: str) -> None:
    """Field names, order, types, defaults, required, referenceable and bounds agree."""
    lua_schema = load_lua_schema(plugin)
    info = dump(plugin)
    assert lua_schema["name"] == info["Name"] == info["Schema"]["name"] == plugin
    lua_fields = config_fields(lua_schema)
    dump_fields = config_fields(info["Schema"])
    assert list(lua_fields) == list(dump_fields)
    assert numbers_as_floats(lua_fields) == numbers_as_floats(dump_fields)
    # the protocols field Kong gets from -dump is typedefs.protocols_http
    lua_protocols = next(e["protocols"] for e in lua_schema["fields"] if "protocols" in e)
    dump_protocols = next(e["protocols"] for e in info["Schema"]["fields"] if "protocols" in e)
    assert lua_protocols == dump_protocols
    # and the whole table: every validator, and entity checks were there any
    assert numbers_as_floats(lua_schema) == numbers_as_floats(info["Schema"])


@pytest.mark.parametrize("plugin", config.PLUGIN_NAMES)
def test_lua_schema_matches_config_declaration(plugin: str) -> None:
    lua_fields = config_fields(load_lua_schema(plugin))
    declared = config.fields_for(plugin)
    assert list(lua_fields) == [f.name for f in declared]
    for field in declared:
        attrs = lua_fields[field.name]
        assert attrs["type"] == field.type
        assert attrs.get("required", False) == field.required
        assert attrs.get("referenceable", False) == field.referenceable
        assert attrs.get("encrypted", False) == field.encrypted
        if field.default is None:
            assert "default" not in attrs
        else:
            assert numbers_as_floats(attrs["default"]) == numbers_as_floats(field.default)


@pytest.mark.parametrize("plugin", config.PLUGIN_NAMES)
def test_every_field_is_described_within_kongs_bounds(plugin: str) -> None:
    """Kong's metaschema takes descriptions of 10 to 500 characters."""
    for name, attrs in config_fields(load_lua_schema(plugin)).items():
        assert 10 <= len(attrs["description"]) <= 500, name


@pytest.mark.parametrize("plugin", config.PLUGIN_NAMES)
def test_only_the_collector_fields_are_required(plugin: str) -> None:
    """A config of collector_url and collector_token is complete; the token is a secret."""
    fields = config_fields(load_lua_schema(plugin))
    assert {n for n, a in fields.items() if a.get("required")} == {
        "collector_url",
        "collector_token",
    }
    assert fields["collector_token"]["referenceable"] is True
    assert fields["collector_token"]["encrypted"] is True
    without_default = {n for n, a in fields.items() if "default" not in a}
    # the two unset-means-derived fields (a temp dir, the hostname) and the required ones
    assert without_default == {
        "collector_url",
        "collector_token",
        "collector_ca_bundle",
        "spool_dir",
        "source",
    }
    settings = config.PluginConfig.from_kong(
        plugin, {"collector_url": "http://collector:8787/", "collector_token": "t0ken"}
    )
    assert settings.collector_url == "http://collector:8787"
    assert settings.source.startswith("kong://")
    assert settings.spool_dir.endswith(plugin)


def test_stream_usage_injection_is_token_meter_only() -> None:
    assert "inject_stream_usage" in config_fields(load_lua_schema(config.TOKEN_METER))
    assert "inject_stream_usage" not in config_fields(load_lua_schema(config.TOKEN_METER_LOG))


def test_config_errors_are_reported_all_at_once() -> None:
    with pytest.raises(config.ConfigError) as info:
        config.PluginConfig.from_kong(
            config.TOKEN_METER, {"consumer_identifier": "email", "max_batch_size": 0}
        )
    problems = " ".join(info.value.problems)
    for name in ("collector_url", "collector_token", "consumer_identifier", "max_batch_size"):
        assert name in problems


@pytest.mark.parametrize("plugin", config.PLUGIN_NAMES)
def test_lua_schema_is_self_contained_for_konnect(plugin: str) -> None:
    """Konnect takes no custom schema.lua that calls require(), so the file loads with nothing
    preloaded (developer.konghq.com@main:app/custom-plugins/konnect-hybrid-mode.md)."""
    source = (SCHEMA_DIR / f"{plugin}.schema.lua").read_text()
    assert not re.search(r"\brequire\s*[(\"']", source)
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.execute("package.preload = {}; require = nil")
    chunk = lua.eval(f"function(src) return assert(loadstring(src, '={plugin}.schema.lua'))() end")
    assert to_python(chunk(source))["name"] == plugin
