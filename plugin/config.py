"""The plugins' configuration: every rule and default, declared once in `FIELDS`.

From `FIELDS` come the schema table the plugin server prints for Kong's query (`plugin_info`,
`-dump`), the Lua schema files Konnect takes (rendered from that same table by `python -m
token_meter_plugin.config [DIR]`), and `PluginConfig`, which `from_kong` checks with Kong's own
semantics (`kong_schema.check`) against the same attributes. `DeliverySettings` and
`BlocklistSettings` are views of `PluginConfig`, with no rules of their own.

No rule relates two fields: Kong's declarative entity checks compare a field with constants only,
so the two cross-field rules there were became behaviour (the long poll is derived from
`blocklist_max_stale`; `max_retry_delay` caps every delay). Kong 3.9 validates the dumped table
whole (Kong@3.9.x:kong/db/schema/plugin_loader.lua), so an entity check would go at its top, reach
the Lua file with it, and need `from_kong` to apply it: a test fails until it does.
"""

from __future__ import annotations

import importlib.metadata
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from . import kong_schema, schema_lua
from .kong_schema import ConfigField, Match

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


# collector_url, in Lua patterns: no alternation and no optional groups, so the four shapes of
# `http[s]://host[:port][/path]` are listed, and what a pattern cannot bound (empty or long DNS
# labels, ports over 65535) is refused by patterns of its own. What passes is a URL that Python's
# `urlsplit` and the socket layer take without raising (an IPv6 literal would not always be).
_HOST: Final = "[%w%-%._]+"
_PORT: Final = ":%d%d?%d?%d?%d?"
_PATH: Final = "/[%w%-%._~!$&'()*+,;=:@/%%]*"  # RFC 3986 path characters
_URL_SHAPES: Final = tuple(
    f"^https?://{_HOST}{port}{path}$" for port in ("", _PORT) for path in ("", _PATH)
)
_AUTHORITY: Final = "^https?://[^/]*"
_LABEL_ERROR: Final = "a host name label must have 1 to 63 characters"
_URL_BOUNDS: Final = (
    Match("^https?://%.", _LABEL_ERROR),
    Match(f"{_AUTHORITY}%.%.", _LABEL_ERROR),
    Match(_AUTHORITY + "[^%./:]" * 64, _LABEL_ERROR),
    *(
        Match(f"{_AUTHORITY}:{digits}", "the port must be at most 65535")
        for digits in ("6553[6-9]", "655[4-9]%d", "65[6-9]%d%d", "6[6-9]%d%d%d", "[7-9]%d%d%d%d")
    ),
)

FIELDS: Final[tuple[ConfigField, ...]] = (
    ConfigField(
        "collector_url",
        "string",
        "Base URL of the token-meter collector: `http://` or `https://`, a host name or IPv4 "
        "address (not an IPv6 literal), an optional port and path, e.g. `http://collector:8787`. "
        "Usage events are posted to `<collector_url>/v1/events` and the blocklist is read from "
        "`<collector_url>/v1/blocklist`.",
        required=True,
        match_none=_URL_BOUNDS,
        match_any=(
            _URL_SHAPES,
            "expected http:// or https://, a host name or IPv4 address, an optional port and an "
            "optional path, e.g. http://collector:8787",
        ),
    ),
    ConfigField(
        "collector_token",
        "string",
        "The collector's ingest token, sent as `Authorization: Bearer <token>`: printable ASCII "
        "without spaces. Referenceable: use a Kong vault reference such as "
        "`{vault://env/token-meter-ingest-token}`.",
        required=True,
        match_all=(Match("^[!-~]+$", "expected printable ASCII characters without spaces"),),
        referenceable=True,
        encrypted=True,
    ),
    ConfigField(
        "collector_ca_bundle",
        "string",
        "Absolute path of a PEM file of the certificate authorities that an `https://` "
        "`collector_url` is verified against, on the plugin server's host. Unset: the system's "
        "certificate authorities. The collector's certificate must name the URL's host.",
        match_all=(Match("^/[^%c]*$", "expected an absolute path without control characters"),),
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
        "Maximum number of usage events sent to the collector in one request (the collector "
        "takes at most 10000).",
        default=1000,
        between=(1, 10000),
    ),
    ConfigField(
        "max_coalescing_delay",
        "number",
        "Maximum time in seconds an event waits for others to fill a batch before the batch is "
        "sent; 0 sends whatever is waiting at once. Kept well under a second so the collector "
        "can block a consumer promptly.",
        default=0.2,
        between=(0, 3600),
    ),
    ConfigField(
        "max_entries",
        "integer",
        "Maximum number of usage events cached in memory per collector and plugin-server "
        "process, in front of the journal; older unsent events are read back from disk. No event "
        "is dropped for age.",
        default=100000,
        between=(1, 1000000),
    ),
    ConfigField(
        "initial_retry_delay",
        "number",
        "Time in seconds before the first retry of a batch the collector did not accept, or of a "
        "failed blocklist poll; the delay doubles on each further retry up to `max_retry_delay`.",
        default=0.1,
        gt=0,
        between=(0, 3600),
    ),
    ConfigField(
        "max_retry_delay",
        "number",
        "Maximum time in seconds between two retries of a batch; it caps every delay, "
        "`initial_retry_delay` included. Retries never stop: events wait in memory and then in "
        "the journal until the collector accepts them. A failed blocklist poll is retried within "
        "5 seconds whatever this is.",
        default=30,
        gt=0,
        between=(0, 3600),
    ),
    ConfigField(
        "timeout",
        "number",
        "Timeout in seconds of each request to the collector (connect, send and read). A "
        "blocklist long poll is given this long beyond the time the collector may hold it.",
        default=10,
        gt=0,
        between=(0, 3600),
    ),
    ConfigField(
        "spool_dir",
        "string",
        "Absolute path of the journal's directory: every usage event is written there before the "
        "request goes on, and stays until the collector accepted it, so a crash, restart or "
        "collector outage loses nothing. Each plugin server uses its own subdirectory. Unset: "
        "`<Kong prefix>/token-meter-spool`. Put it on a persistent volume.",
        match_all=(Match("^/[^%c]*$", "expected an absolute path without control characters"),),
    ),
    ConfigField(
        "spool_max_bytes",
        "integer",
        "Maximum size of the journal in bytes, from 1 MiB to 64 TiB (default 8 GiB: days of a "
        "busy gateway's events while the collector is unreachable). Past it, each event that "
        "cannot be stored is counted and logged as an error.",
        default=8 * GIB,
        between=(MIB, 64 * 1024 * GIB),
    ),
    ConfigField(
        "blocklist_max_stale",
        "number",
        "Age in seconds past which the local copy of the collector's blocklist is stale; what "
        "happens then is decided by `fail_open`. The plugin long-polls the collector for changes, "
        "each poll held at most half this long and at most 30 seconds, so a quiet poll never "
        "makes the list stale.",
        default=60,
        between=(1, 86400),
    ),
    ConfigField(
        "fail_open",
        "boolean",
        "When the blocklist is stale (the collector unreachable), let every consumer not known "
        "to be blocked through (true) or answer every request as blocked (false).",
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
        "Maximum size in bytes of a body the plugin reads, at most 1 GiB: an upstream response "
        "body (after decompression) larger than this is recorded with `usage_missing`, and a "
        "request body declared larger is not read for stream-usage injection.",
        default=32 * MIB,
        between=(1, GIB),
    ),
    ConfigField(
        "source",
        "string",
        "CloudEvents `source` of the usage events, at most 512 bytes: identifies this data "
        "plane, and with the request id makes the collector's dedupe key. Unset: "
        "`kong://<hostname>`, the plugin server's host name.",
        len_max=512,
    ),
)

_BY_NAME: Final = {field.name: field for field in FIELDS}
_HTTP_PROTOCOLS: Final = ("grpc", "grpcs", "http", "https")
# Konnect takes no custom schema.lua that calls require()
# (developer.konghq.com@main:app/custom-plugins/konnect-hybrid-mode.md), so `protocols` is written
# out in full, as Kong@3.9.x:kong/db/schema/typedefs.lua defines `typedefs.protocols_http`.
_LUA_REFERENCES: Final[Mapping[str, str]] = {}

T = TypeVar("T", int, float, bool, str)


def fields_for(plugin_name: str) -> tuple[ConfigField, ...]:
    """The config fields of one plugin, in declaration order."""
    if plugin_name not in PLUGIN_NAMES:
        raise ValueError(f"unknown plugin {plugin_name!r}")
    return tuple(f for f in FIELDS if f.plugins is None or plugin_name in f.plugins)


def default_of(name: str, kind: type[T]) -> T:
    """A field's declared default, for the runtime settings' own defaults (views of it)."""
    value = _BY_NAME[name].default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind):
        raise TypeError(f"{name} has no {kind.__name__} default")
    return value


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


def plugin_schema(plugin_name: str) -> dict[str, Any]:
    """The whole schema table of one plugin, as Kong loads it (MetaSubSchema)."""
    return {
        "name": plugin_name,
        "fields": [
            {"protocols": protocols_field()},
            {"config": {"type": "record", "fields": pdk_schema(plugin_name)}},
        ],
    }


def plugin_info(plugin_name: str) -> dict[str, Any]:
    """What Kong's query command expects for one plugin (one entry of the `-dump` list)."""
    return {
        "Name": plugin_name,
        "Phases": list(PHASES[plugin_name]),
        "Priority": PRIORITY,
        "Version": plugin_version(),
        "Schema": plugin_schema(plugin_name),
    }


def render_lua_schema(plugin_name: str) -> str:
    """The Kong 3.x Lua schema module of one plugin (what Konnect takes as `schema.lua`)."""
    return schema_lua.render(plugin_schema(plugin_name), _LUA_REFERENCES)


# --- Typed config -------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A plugin config that does not satisfy the schema; lists every problem at once."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class PluginConfig:
    """One plugin instance's config, defaults applied, as the handlers use it."""

    plugin_name: str
    collector_url: str  # without a trailing slash
    collector_token: str
    collector_ca_bundle: str | None  # None: the system's certificate authorities
    consumer_identifier: str
    max_batch_size: int
    max_coalescing_delay: float
    max_entries: int
    initial_retry_delay: float
    max_retry_delay: float
    timeout: float
    spool_dir: str  # resolved, one per plugin: `<spool_dir or default root>/<plugin name>`
    spool_max_bytes: int
    blocklist_max_stale: float
    fail_open: bool
    inject_stream_usage: bool  # always false for token-meter-log, which has no such field
    max_body_size: int
    source: str  # resolved: never empty

    @classmethod
    def from_kong(cls, plugin_name: str, conf: Mapping[str, Any]) -> PluginConfig:
        """Build from the config Kong sends in `plugin.StartInstance` (Kong's own keys such as
        `__plugin_id` or `route` are ignored). Raises ConfigError listing every problem: only
        for a config Kong would have refused, since the checks are Kong's."""
        problems: list[str] = []
        values: dict[str, Any] = {"inject_stream_usage": False}
        for field in fields_for(plugin_name):
            value = conf.get(field.name)
            if value is None:
                if field.required:
                    problems.append(f"{field.name}: required field missing")
                value = field.default
            else:
                problem = kong_schema.check(field.kong_attributes(), value)
                if problem is not None:
                    problems.append(f"{field.name}: {problem}")
            values[field.name] = kong_schema.as_declared(field.type, value)
        if problems:
            raise ConfigError(problems)
        # One journal directory per plugin server, under the configured or the default root.
        spool_root = Path(values["spool_dir"]) if values["spool_dir"] else default_spool_root()
        values["spool_dir"] = str(spool_root / plugin_name)
        values["source"] = values["source"] or f"kong://{socket.gethostname()}"
        values["collector_url"] = values["collector_url"].rstrip("/")
        return cls(plugin_name=plugin_name, **values)


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the Lua schema files: `python -m token_meter_plugin.config [DIR]`, by default
    in `schema/` of the source tree this module lives in (plugin/ and schema/ are siblings)."""
    args = list(sys.argv[1:] if argv is None else argv)
    directory = Path(args[0]) if args else Path(__file__).resolve().parent.parent / "schema"
    schemas = {name: plugin_schema(name) for name in PLUGIN_NAMES}
    for path in schema_lua.write(directory, schemas, _LUA_REFERENCES):
        sys.stderr.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
