"""The Lua schema module of a plugin, written from the very table the plugin server dumps.

Kong 3.x takes a plugin server's schema from the query command's JSON (`-dump`,
Kong@3.9.x:kong/runloop/plugin_servers/process.lua) and a Lua plugin's from `schema.lua`;
Konnect takes only the latter. Rendering the Lua file from the dumped table, key for key, is what
keeps the two the same: whatever the dump carries (validators, `entity_checks`), the file does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

HEADER: Final = (
    "-- Generated from plugin/config.py by `python -m token_meter_plugin.config`: do not edit.\n"
    "-- The same table is what the plugin server prints for Kong's query (-dump).\n"
)
WIDTH: Final = 100  # a table longer than this on one line is written one item a line
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class LuaExpression:
    """Lua source written as it is, such as `typedefs.protocols_http`."""

    source: str


def lua_value(value: Any) -> str:
    """One value as a Lua expression, on one line."""
    if isinstance(value, LuaExpression):
        return value.source
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes (\" \\ \n \uXXXX) are valid LuaJIT escapes, except \u, which
        # ensure_ascii=False never produces for printable text.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {lua_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "{ " + ", ".join(lua_value(item) for item in value) + " }"
    raise TypeError(f"cannot render {value!r} as Lua")


def _key(key: str) -> str:
    return key if _IDENTIFIER.match(key) else f"[{lua_value(key)}]"


def _items(value: Mapping[str, Any] | Sequence[Any]) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return [(f"{_key(k)} = ", v) for k, v in value.items()]
    return [("", item) for item in value]


def _pretty(value: Any, indent: int, prefix: str = "") -> str:
    """``prefix`` + value, then one item a line (recursively) where one line would be too long."""
    pad = " " * indent
    inline = pad + prefix + lua_value(value)
    if len(inline) <= WIDTH or not isinstance(value, Mapping | list | tuple):
        return inline
    if isinstance(value, Mapping) and len(value) == 1:  # `{ name = {` on one line, as Kong's
        ((key, item),) = _items(value)
        return pad + prefix + "{ " + _pretty(item, indent + 2, key).lstrip() + " }"
    lines = [pad + prefix + "{"]
    lines += [_pretty(item, indent + 2, key) + "," for key, item in _items(value)]
    lines.append(pad + "}")
    return "\n".join(lines)


def render(schema: Mapping[str, Any], references: Mapping[str, str]) -> str:
    """The `schema.lua` module returning ``schema``.

    ``references`` maps a field name to the Lua expression written instead of its table (Kong's
    typedefs, which the dump spells out): `{"protocols": "typedefs.protocols_http"}`.
    """
    fields = [
        {name: LuaExpression(references[name]) if name in references else attrs}
        for entry in schema["fields"]
        for name, attrs in entry.items()
    ]
    body = _pretty({**schema, "fields": fields}, 0, "return ")
    requires = ""
    if any(expression.startswith("typedefs.") for expression in references.values()):
        requires = 'local typedefs = require "kong.db.schema.typedefs"\n\n'
    return HEADER + requires + body + "\n"


def schema_path(directory: Path, plugin_name: str) -> Path:
    return directory / f"{plugin_name}.schema.lua"


def write(
    directory: Path, schemas: Mapping[str, Mapping[str, Any]], references: Mapping[str, str]
) -> list[Path]:
    """(Re)generate `<plugin>.schema.lua` in ``directory`` for each plugin of ``schemas``."""
    written = []
    for name, schema in schemas.items():
        path = schema_path(directory, name)
        path.write_text(render(schema, references), encoding="utf-8")
        written.append(path)
    return written
