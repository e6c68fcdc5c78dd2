"""The plugins' configuration, declared once and rendered for Kong twice.

`FIELDS` is the single declaration. From it come the schema that the plugin server prints for
Kong's query command (`-dump`, kong-pdk's `Schema` list), the Lua schema files that Konnect takes
(`schema/<plugin>.schema.lua`, regenerated with `python -m token_meter_plugin.config`), and
`PluginConfig`, the typed settings the handlers use. Kong validates a plugin's config against the
dumped schema before a handler sees it, so the handlers trust it; `PluginConfig.from_kong` still
applies the defaults, because a plugin server can be started by something other than Kong.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

TOKEN_METER: Final = "token-meter"  # noqa: S105 (a plugin name, not a secret)
TOKEN_METER_LOG: Final = "token-meter-log"  # noqa: S105
PLUGIN_NAMES: Final = (TOKEN_METER, TOKEN_METER_LOG)

# Below key-auth (1250) and every other bundled authentication plugin (basic-auth 1100 is the
# lowest), so the consumer is known when our access handler runs; above rate-limiting (910), so a
# blocked consumer is answered before it spends rate-limit budget.
PRIORITY: Final = 950

PHASES: Final[Mapping[str, tuple[str, ...]]] = {
    TOKEN_METER: ("access", "response"),
    TOKEN_METER_LOG: ("access", "log"),
}

FieldType = Literal["string", "integer", "number", "boolean"]
Scalar = str | int | float | bool

MIB: Final = 1024 * 1024
GIB: Final = 1024 * MIB

# Kong's prefix where Kong 3.0-3.8 keep sockets; 3.9 uses its own prefix, passed with `-p`.
DEFAULT_KONG_PREFIX: Final = "/usr/local/kong"
SPOOL_DIR_NAME: Final = "token-meter-spool"
_kong_prefix = DEFAULT_KONG_PREFIX


def set_kong_prefix(prefix: str) -> None:
    """The prefix the plugin server was started with (`-p`): the default journal's root."""
    global _kong_prefix
    _kong_prefix = prefix


def default_spool_root() -> Path:
    """`<Kong prefix>/token-meter-spool`: durable like Kong's own state, never a temp dir that
    containers and reboots wipe."""
    return Path(_kong_prefix) / SPOOL_DIR_NAME


@dataclass(frozen=True, slots=True)
class ConfigField:
    """One field of the plugin's `config` record, in Kong's schema vocabulary."""

    name: str
    type: FieldType
    description: str
    default: Scalar | None = None
    required: bool = False
    referenceable: bool = False
    encrypted: bool = False
    one_of: tuple[str, ...] | None = None
    between: tuple[float, float] | None = None
    gt: float | None = None
    plugins: tuple[str, ...] = PLUGIN_NAMES

    def kong_attributes(self) -> dict[str, Any]:
        """The field's attributes as Kong's schema DSL spells them, in a stable order."""
        attrs: dict[str, Any] = {"type": self.type, "description": self.description}
        if self.required:
            attrs["required"] = True
        if self.default is not None:
            attrs["default"] = self.default
        if self.one_of is not None:
            attrs["one_of"] = list(self.one_of)
        if self.between is not None:
            attrs["between"] = list(self.between)
        if self.gt is not None:
            attrs["gt"] = self.gt
        if self.referenceable:
            attrs["referenceable"] = True
        if self.encrypted:
            attrs["encrypted"] = True
        return attrs


FIELDS: Final[tuple[ConfigField, ...]] = (
    ConfigField(
        "collector_url",
        "string",
        "Base URL of the token-meter collector, e.g. `http://collector:8787`. Usage events are "
        "posted to `<collector_url>/v1/events` and the blocklist is read from "
        "`<collector_url>/v1/blocklist`.",
        required=True,
    ),
    ConfigField(
        "collector_token",
        "string",
        "The collector's ingest token, sent as `Authorization: Bearer <token>`. Referenceable: "
        "use a Kong vault reference such as `{vault://env/token-meter-ingest-token}`.",
        required=True,
        referenceable=True,
        encrypted=True,
    ),
    ConfigField(
        "consumer_identifier",
        "string",
        "Which field of the authenticated Kong consumer identifies the customer in usage events "
        "and on the blocklist. A consumer without that field is identified by its `id`.",
        default="username",
        one_of=("username", "id", "custom_id"),
    ),
    ConfigField(
        "max_batch_size",
        "integer",
        "Maximum number of usage events sent to the collector in one request.",
        default=1000,
        between=(1, 10000),
    ),
    ConfigField(
        "max_coalescing_delay",
        "number",
        "Maximum time in seconds an event waits for others to fill a batch before the batch is "
        "sent. Kept well under a second so the collector can block a consumer promptly.",
        default=0.2,
        between=(0, 3600),
    ),
    ConfigField(
        "max_entries",
        "integer",
        "Maximum number of usage events held in memory per plugin-server process; past it, "
        "events spill to the spool directory on disk. No event is dropped for age.",
        default=100000,
        gt=0,
    ),
    ConfigField(
        "initial_retry_delay",
        "number",
        "Time in seconds before the first retry of a batch the collector did not accept; the "
        "delay doubles on each further retry up to `max_retry_delay`.",
        default=0.1,
        gt=0,
    ),
    ConfigField(
        "max_retry_delay",
        "number",
        "Maximum time in seconds between two retries of a batch. Retries never stop: events "
        "wait in memory and then in the spool until the collector accepts them.",
        default=30,
        gt=0,
    ),
    ConfigField(
        "timeout",
        "number",
        "Timeout in seconds of each request to the collector (connect, send and read).",
        default=10,
        gt=0,
    ),
    ConfigField(
        "spool_dir",
        "string",
        "Directory of the journal: every usage event is written there before the request goes "
        "on, and stays until the collector accepted it, so a crash, restart or collector outage "
        "loses nothing. Each plugin server uses its own subdirectory. Unset: "
        "`<Kong prefix>/token-meter-spool`. Put it on a persistent volume.",
    ),
    ConfigField(
        "spool_max_bytes",
        "integer",
        "Maximum size of the journal in bytes (default 8 GiB: days of a busy gateway's events "
        "while the collector is unreachable). Past it, each event that cannot be stored is "
        "counted and logged as an error.",
        default=8 * GIB,
        gt=0,
    ),
    ConfigField(
        "blocklist_max_stale",
        "number",
        "Age in seconds past which the local copy of the collector's blocklist is considered "
        "stale; what happens then is decided by `fail_open`.",
        default=60,
        gt=0,
    ),
    ConfigField(
        "fail_open",
        "boolean",
        "When the blocklist is stale (the collector unreachable), let every consumer through "
        "(true) or answer every request as blocked (false).",
        default=True,
    ),
    ConfigField(
        "inject_stream_usage",
        "boolean",
        "Add `stream_options.include_usage = true` to a streaming JSON request whose client did "
        "not ask for usage, so the upstream reports the tokens of the stream.",
        default=True,
        plugins=(TOKEN_METER,),
    ),
    ConfigField(
        "max_body_size",
        "integer",
        "Maximum size in bytes of a body the plugin reads: an upstream response body (after "
        "decompression) larger than this is recorded with `usage_missing`, and a request body "
        "declared larger is not read for stream-usage injection.",
        default=32 * MIB,
        gt=0,
    ),
    ConfigField(
        "source",
        "string",
        "CloudEvents `source` of the usage events: identifies this data plane, and with the "
        "request id makes the collector's dedupe key. Unset: `kong://<hostname>`.",
    ),
)

_HTTP_PROTOCOLS: Final = ("grpc", "grpcs", "http", "https")


def fields_for(plugin_name: str) -> tuple[ConfigField, ...]:
    """The config fields of one plugin, in declaration order."""
    if plugin_name not in PLUGIN_NAMES:
        raise ValueError(f"unknown plugin {plugin_name!r}")
    return tuple(field for field in FIELDS if plugin_name in field.plugins)


def plugin_version() -> str:
    """The distribution's version as the `x.y.z` string Kong insists on."""
    try:
        raw = importlib.metadata.version("kong-token-meter")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", raw)
    if match is None:
        return "0.0.0"
    return ".".join(part or "0" for part in match.groups())


def pdk_schema(plugin_name: str) -> list[dict[str, dict[str, Any]]]:
    """kong-pdk's `Schema` list: the fields of the `config` record, each `{name: attributes}`."""
    return [{field.name: field.kong_attributes()} for field in fields_for(plugin_name)]


def protocols_field() -> dict[str, Any]:
    """The `protocols` field, as `typedefs.protocols_http` defines it in Kong 3.x."""
    return {
        "type": "set",
        "required": True,
        "default": list(_HTTP_PROTOCOLS),
        "elements": {"type": "string", "one_of": list(_HTTP_PROTOCOLS)},
        "description": "A set of strings representing HTTP protocols.",
    }


def plugin_info(plugin_name: str) -> dict[str, Any]:
    """What Kong's query command expects for one plugin (one entry of the `-dump` list)."""
    return {
        "Name": plugin_name,
        "Phases": list(PHASES[plugin_name]),
        "Priority": PRIORITY,
        "Version": plugin_version(),
        "Schema": {
            "name": plugin_name,
            "fields": [
                {"protocols": protocols_field()},
                {"config": {"type": "record", "fields": pdk_schema(plugin_name)}},
            ],
        },
    }


# --- Lua rendering ------------------------------------------------------------------------------

_LUA_KEY_ORDER: Final = (
    "type",
    "required",
    "default",
    "one_of",
    "between",
    "gt",
    "referenceable",
    "encrypted",
    "description",
)


def _lua_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes (\" \\ \n \uXXXX) are valid Lua 5.1 escapes, except \u, which
        # ensure_ascii=False never produces for printable text; descriptions are ASCII anyway.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "{ " + ", ".join(_lua_value(item) for item in value) + " }"
    raise TypeError(f"cannot render {value!r} as Lua")


def render_lua_schema(plugin_name: str) -> str:
    """The Kong 3.x Lua schema module of one plugin (what Konnect takes as `schema.lua`)."""
    lines = [
        "-- Generated from plugin/config.py by `python -m token_meter_plugin.config`: do not edit.",
        "-- The same declaration is what the plugin server prints for Kong's query (-dump).",
        'local typedefs = require "kong.db.schema.typedefs"',
        "",
        "return {",
        f"  name = {_lua_value(plugin_name)},",
        "  fields = {",
        "    { protocols = typedefs.protocols_http },",
        "    { config = {",
        '        type = "record",',
        "        fields = {",
    ]
    for field in fields_for(plugin_name):
        attrs = field.kong_attributes()
        rendered = ", ".join(
            f"{key} = {_lua_value(attrs[key])}" for key in _LUA_KEY_ORDER if key in attrs
        )
        lines.append(f"          {{ {field.name} = {{ {rendered} }} }},")
    lines += [
        "        },",
        "      },",
        "    },",
        "  },",
        "}",
        "",
    ]
    return "\n".join(lines)


def lua_schema_path(directory: Path, plugin_name: str) -> Path:
    return directory / f"{plugin_name}.schema.lua"


def default_schema_dir() -> Path:
    """`schema/` of the source tree this module lives in (plugin/ and schema/ are siblings)."""
    return Path(__file__).resolve().parent.parent / "schema"


def write_lua_schemas(directory: Path) -> list[Path]:
    """(Re)generate `<plugin>.schema.lua` for both plugins in `directory`."""
    written = []
    for name in PLUGIN_NAMES:
        path = lua_schema_path(directory, name)
        path.write_text(render_lua_schema(name), encoding="utf-8")
        written.append(path)
    return written


# --- Typed settings -----------------------------------------------------------------------------


class ConfigError(ValueError):
    """A plugin config that does not satisfy the schema; lists every problem at once."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class PluginConfig:
    """One plugin instance's config, defaults applied, as the handlers use it."""

    plugin_name: str
    collector_url: str
    collector_token: str
    consumer_identifier: str
    max_batch_size: int
    max_coalescing_delay: float
    max_entries: int
    initial_retry_delay: float
    max_retry_delay: float
    timeout: float
    spool_dir: str  # resolved: never empty
    spool_max_bytes: int
    blocklist_max_stale: float
    fail_open: bool
    inject_stream_usage: bool
    max_body_size: int
    source: str  # resolved: never empty

    @classmethod
    def from_kong(cls, plugin_name: str, conf: Mapping[str, Any]) -> PluginConfig:
        """Build from the config Kong sends in `plugin.StartInstance` (Kong's own keys such as
        `__plugin_id` or `route` are ignored). Raises ConfigError listing every problem."""
        problems: list[str] = []
        values: dict[str, Any] = {}
        for field in fields_for(plugin_name):
            value = conf.get(field.name)
            if value is None:
                if field.required:
                    problems.append(f"{field.name}: required field missing")
                    continue
                value = field.default
                if value is None:  # optional, no default: the code below decides
                    values[field.name] = None
                    continue
            problem = _check(field, value)
            if problem:
                problems.append(f"{field.name}: {problem}")
                continue
            values[field.name] = value
        if problems:
            raise ConfigError(problems)
        values.setdefault("inject_stream_usage", False)
        # One journal directory per plugin server, under the configured or the default root.
        spool_root = Path(values["spool_dir"]) if values["spool_dir"] else default_spool_root()
        values["spool_dir"] = str(spool_root / plugin_name)
        if not values["source"]:
            values["source"] = f"kong://{socket.gethostname()}"
        values["collector_url"] = values["collector_url"].rstrip("/")
        for name in ("max_coalescing_delay", "initial_retry_delay", "max_retry_delay", "timeout"):
            values[name] = float(values[name])
        values["blocklist_max_stale"] = float(values["blocklist_max_stale"])
        return cls(plugin_name=plugin_name, **values)


def _check(field: ConfigField, value: Any) -> str | None:
    if field.type == "boolean":
        ok = isinstance(value, bool)
    elif field.type == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif field.type == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        return f"expected a {field.type}"
    if field.one_of is not None and value not in field.one_of:
        return f"expected one of: {', '.join(field.one_of)}"
    if field.between is not None and not field.between[0] <= value <= field.between[1]:
        return f"value should be between {field.between[0]} and {field.between[1]}"
    if field.gt is not None and not value > field.gt:
        return f"value must be greater than {field.gt}"
    if field.required and field.type == "string" and not value:
        return "must not be empty"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the Lua schema files: `python -m token_meter_plugin.config [DIR]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    directory = Path(args[0]) if args else default_schema_dir()
    for path in write_lua_schemas(directory):
        sys.stderr.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
