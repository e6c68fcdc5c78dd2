"""kong.yml: the seed setup with token-meter on it, entities Kong 3.9 takes, plugin configs their
schemas take, references Kong resolves, and no literal secret.

decK (Debian's 1.4, when installed) validates the entities offline against an old schema and
never looks at plugin configs, so the configs are checked here: ours with the plugins' own
validator and through the Lua schema files, the bundled ones against the fields and types of
their Kong 3.9 schemas.
"""

from __future__ import annotations

import copy
import itertools
import re
import shutil
import subprocess
from typing import Any

import jsonschema
import pytest

from tests.contract.test_plugin_schema import config_fields, load_lua_schema
from tests.deploy import files
from tests.deploy.files import METERING_PLUGINS, all_plugins, plugins_on, routes
from token_meter_plugin import config as plugin_config
from token_meter_plugin import kong_schema

lupa = pytest.importorskip("lupa.luajit21")

CONFIGS = {"kong.yml": files.KONG_YML, "demo.kong.yml": files.DEMO_KONG_YML}
OPENAI_CHAT = "https://api.openai.com/v1/chat/completions"
DEMO_CHAT = "http://demo-upstream:8080/v1/chat/completions"


def config_of(name: str) -> dict[str, Any]:
    return files.kong_yml() if name == "kong.yml" else files.demo_kong_yml()


def plugin(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [p for p in all_plugins(config) if p["name"] == name]
    return found


def route_named(config: dict[str, Any], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    (found,) = [(s, r) for s, r in routes(config) if r["name"] == name]
    return found


# --- the seed setup -------------------------------------------------------------------------


def test_seed_service_and_route() -> None:
    """AIService points at OpenAI's chat completions; AIRoute is POST /ai/chat, http and https."""
    config = files.kong_yml()
    assert config["_format_version"] == "3.0"
    service, route = route_named(config, "AIRoute")
    assert service["name"] == "AIService"
    assert service["url"] == OPENAI_CHAT
    assert route["paths"] == ["/ai/chat"]
    assert route["methods"] == ["POST"]
    assert sorted(route["protocols"]) == ["http", "https"]


def test_key_auth_and_rate_limiting_are_global() -> None:
    """key-auth on every route with the key in the `apikey` header; 10 requests a second per
    consumer."""
    config = files.kong_yml()
    global_plugins = {p["name"]: p["config"] for p in config["plugins"]}
    assert global_plugins["key-auth"]["key_names"] == ["apikey"]
    assert global_plugins["key-auth"]["hide_credentials"] is True  # the key never goes upstream
    assert global_plugins["rate-limiting"]["second"] == 10
    assert global_plugins["rate-limiting"]["limit_by"] == "consumer"
    assert global_plugins["rate-limiting"]["policy"] == "local"  # DB-less: local or redis only


@pytest.mark.parametrize("name", CONFIGS)
def test_each_route_is_metered_by_exactly_one_plugin(name: str) -> None:
    """token-meter on AIRoute; token-meter-log behind ai-proxy, which logs statistics; never
    both on one route."""
    config = config_of(name)
    metered = {}
    for service, route in routes(config):
        applying = plugins_on(config, service, route)
        meters = [p for p in METERING_PLUGINS if p in applying]
        assert len(meters) == 1, (route["name"], meters)
        metered[route["name"]] = meters[0]
        if "ai-proxy" in applying:
            assert meters == ["token-meter-log"], route["name"]
            assert applying["ai-proxy"]["config"]["logging"]["log_statistics"] is True
        else:
            assert meters == ["token-meter"], route["name"]
    assert metered == {"AIRoute": "token-meter", "AIProxyRoute": "token-meter-log"}


def test_consumers_have_demo_keys_and_stripe_customer_ids() -> None:
    consumers = files.kong_yml()["consumers"]
    assert len({c["username"] for c in consumers}) == len(consumers) >= 2
    keys = [cred["key"] for c in consumers for cred in c["keyauth_credentials"]]
    assert len(set(keys)) == len(keys)
    assert all(key.startswith("demo-") for key in keys)
    # what collector/billing maps to a Stripe customer: a custom_id starting with cus_
    assert all(re.fullmatch(r"cus_[A-Za-z0-9_]+", c["custom_id"]) for c in consumers)


# --- entities -------------------------------------------------------------------------------


def _entity(fields: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": fields,
        "required": list(required),
        "additionalProperties": False,
    }


_STRINGS = {"type": "array", "items": {"type": "string", "minLength": 1}}
_PLUGIN = _entity(
    # Kong@3.9.x:kong/db/schema/entities/plugins.lua
    {
        "name": {"type": "string"},
        "instance_name": {"type": "string"},
        "config": {"type": "object"},
        "protocols": _STRINGS,
        "enabled": {"type": "boolean"},
        "tags": _STRINGS,
    },
    ("name",),
)
_ROUTE = _entity(
    # Kong@3.9.x:kong/db/schema/entities/routes.lua
    {
        "name": {"type": "string"},
        "protocols": {"type": "array", "items": {"enum": ["http", "https", "grpc", "grpcs"]}},
        "methods": {"type": "array", "items": {"pattern": "^[A-Z]+$"}},
        "hosts": _STRINGS,
        "paths": {"type": "array", "items": {"type": "string", "pattern": "^/"}},
        "headers": {"type": "object"},
        "https_redirect_status_code": {"enum": [426, 301, 302, 307, 308]},
        "regex_priority": {"type": "integer"},
        "strip_path": {"type": "boolean"},
        "path_handling": {"enum": ["v0", "v1"]},
        "preserve_host": {"type": "boolean"},
        "request_buffering": {"type": "boolean"},
        "response_buffering": {"type": "boolean"},
        "tags": _STRINGS,
        "plugins": {"type": "array", "items": _PLUGIN},
    },
    ("name",),
)
DECLARATIVE_SCHEMA = _entity(
    {
        "_format_version": {"const": "3.0"},
        "_transform": {"type": "boolean"},
        "services": {
            "type": "array",
            "items": _entity(
                # Kong@3.9.x:kong/db/schema/entities/services.lua (`url` is its shorthand)
                {
                    "name": {"type": "string"},
                    "url": {"type": "string", "pattern": "^https?://[^/]+(/.*)?$"},
                    "retries": {"type": "integer", "minimum": 0},
                    "connect_timeout": {"type": "integer", "minimum": 1},
                    "write_timeout": {"type": "integer", "minimum": 1},
                    "read_timeout": {"type": "integer", "minimum": 1},
                    "tls_verify": {"type": "boolean"},
                    "enabled": {"type": "boolean"},
                    "tags": _STRINGS,
                    "routes": {"type": "array", "items": _ROUTE, "minItems": 1},
                    "plugins": {"type": "array", "items": _PLUGIN},
                },
                ("name", "url", "routes"),
            ),
        },
        "plugins": {"type": "array", "items": _PLUGIN},
        "consumers": {
            "type": "array",
            "items": _entity(
                # Kong@3.9.x:kong/db/schema/entities/consumers.lua, kong/plugins/key-auth/daos.lua
                {
                    "username": {"type": "string"},
                    "custom_id": {"type": "string"},
                    "tags": _STRINGS,
                    "keyauth_credentials": {
                        "type": "array",
                        "items": _entity(
                            {"key": {"type": "string", "minLength": 1}, "tags": _STRINGS},
                            ("key",),
                        ),
                    },
                    "plugins": {"type": "array", "items": _PLUGIN},
                },
                ("username",),
            ),
        },
    },
    ("_format_version", "services"),
)


@pytest.mark.parametrize("name", CONFIGS)
def test_entities_have_kongs_structure(name: str) -> None:
    """Only fields Kong 3.9's entities have, of their types; names unique, every route in a
    service, routes with paths and methods."""
    config = config_of(name)
    jsonschema.validate(config, DECLARATIVE_SCHEMA)
    service_names = [s["name"] for s in config["services"]]
    route_names = [r["name"] for _, r in routes(config)]
    assert len(set(service_names)) == len(service_names)
    assert len(set(route_names)) == len(route_names)
    for _, route in routes(config):
        assert route["paths"] and route["methods"], route["name"]
    # no two routes share a path prefix: Kong matches the longest, and a request for the
    # shorter one's path could never be metered by the wrong plugin
    paths = sorted(p for _, r in routes(config) for p in r["paths"])
    for shorter, longer in itertools.pairwise(paths):
        assert not longer.startswith(shorter), (shorter, longer)
    # plugins are known: bundled ones this file uses, and ours
    assert {p["name"] for p in all_plugins(config)} <= set(BUNDLED) | set(METERING_PLUGINS)


@pytest.mark.skipif(shutil.which("deck") is None, reason="decK is not installed")
@pytest.mark.parametrize("name", CONFIGS)
def test_deck_validates_the_entities(name: str) -> None:
    """decK's offline check of entity structure and relationships (not of plugin configs)."""
    result = subprocess.run(
        ["deck", "validate", "--state", str(CONFIGS[name])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- our plugins' configs -------------------------------------------------------------------


def metering_configs() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (name, p["name"], p["config"])
        for name in CONFIGS
        for p in all_plugins(config_of(name))
        if p["name"] in METERING_PLUGINS
    ]


@pytest.mark.parametrize(("name", "plugin_name", "conf"), metering_configs())
def test_metering_config_passes_the_plugins_validator(
    name: str, plugin_name: str, conf: dict[str, Any]
) -> None:
    """`PluginConfig.from_kong` checks exactly as Kong does (plugin/config.py)."""
    settings = plugin_config.PluginConfig.from_kong(plugin_name, conf)
    assert settings.collector_url == "http://collector:8787"
    assert files.vault_env_variable(conf["collector_token"]) == "TOKEN_METER_INGEST_TOKEN"


@pytest.mark.parametrize(("name", "plugin_name", "conf"), metering_configs())
def test_metering_config_passes_the_lua_schema(
    name: str, plugin_name: str, conf: dict[str, Any]
) -> None:
    """Each key is a field of schema/<plugin>.schema.lua as LuaJIT loads it, each value passes
    that field's attributes, and every required field is there."""
    fields = config_fields(load_lua_schema(plugin_name))
    assert set(conf) <= set(fields), set(conf) - set(fields)
    for key, value in conf.items():
        assert kong_schema.check(fields[key], value) is None, key
    assert {k for k, attrs in fields.items() if attrs.get("required")} <= set(conf)


# --- the bundled plugins' configs -----------------------------------------------------------


def _record(fields: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return _entity(fields, required)


_STR = {"type": "string", "minLength": 1}
_BOOL = {"type": "boolean"}
_POSITIVE = {"type": "number", "exclusiveMinimum": 0}
_HEADER_NAME = {"type": "string", "pattern": "^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"}
_COLON_PAIRS = {"type": "array", "items": {"type": "string", "pattern": "^[^:]+:.+$"}}
_NAMES = {"type": "array", "items": _STR}
_TRANSFORM = {"body": _COLON_PAIRS, "headers": _COLON_PAIRS, "querystring": _COLON_PAIRS}

# The config fields of the bundled plugins kong.yml uses, with their types and allowed values,
# from Kong 3.9's schemas (Kong@3.9.x:kong/plugins/<name>/schema.lua; ai-proxy's config is
# Kong@3.9.x:kong/llm/schemas/init.lua plus the fields of kong/plugins/ai-proxy/schema.lua).
BUNDLED: dict[str, dict[str, Any]] = {
    "key-auth": _record(
        {
            "key_names": {"type": "array", "items": _HEADER_NAME, "minItems": 1},
            "hide_credentials": _BOOL,
            "anonymous": _STR,
            "key_in_header": _BOOL,
            "key_in_query": _BOOL,
            "key_in_body": _BOOL,
            "run_on_preflight": _BOOL,
            "realm": _STR,
        }
    ),
    "rate-limiting": _record(
        {
            **{p: _POSITIVE for p in ("second", "minute", "hour", "day", "month", "year")},
            "limit_by": {"enum": ["consumer", "credential", "ip", "service", "header", "path"]},
            "header_name": _HEADER_NAME,
            "path": {"type": "string", "pattern": "^/"},
            # DB-less: the `cluster` policy is not offered
            "policy": {"enum": ["local", "redis"]},
            "fault_tolerant": _BOOL,
            "hide_client_headers": _BOOL,
            "error_code": _POSITIVE,
            "error_message": {"type": "string"},
            "sync_rate": {"type": "number"},
            "redis": {"type": "object"},
        }
    ),
    "request-transformer": _record(
        {
            "http_method": {"type": "string", "pattern": "^[A-Z]+$"},
            "remove": _record({"body": _NAMES, "headers": _NAMES, "querystring": _NAMES}),
            "rename": _record(_TRANSFORM),
            "replace": _record({**_TRANSFORM, "uri": {"type": "string"}}),
            "add": _record(_TRANSFORM),
            "append": _record(_TRANSFORM),
        }
    ),
    "ai-proxy": _record(
        {
            "route_type": {"enum": ["llm/v1/chat", "llm/v1/completions", "preserve"]},
            "auth": _record(
                {
                    "header_name": _STR,
                    "header_value": _STR,
                    "param_name": _STR,
                    "param_value": _STR,
                    "param_location": {"enum": ["query", "body"]},
                    "gcp_use_service_account": _BOOL,
                    "gcp_service_account_json": _STR,
                    "aws_access_key_id": _STR,
                    "aws_secret_access_key": _STR,
                    "allow_override": _BOOL,
                }
            ),
            "model": _record(
                {
                    "provider": {
                        "enum": [
                            "openai",
                            "azure",
                            "anthropic",
                            "cohere",
                            "mistral",
                            "llama2",
                            "gemini",
                            "bedrock",
                            "huggingface",
                        ]
                    },
                    "name": _STR,
                    "options": _record(
                        {
                            "max_tokens": {"type": "integer"},
                            "input_cost": _POSITIVE,
                            "output_cost": _POSITIVE,
                            "temperature": {"type": "number", "minimum": 0, "maximum": 5},
                            "top_p": {"type": "number", "minimum": 0, "maximum": 1},
                            "top_k": {"type": "integer", "minimum": 0, "maximum": 500},
                            "anthropic_version": _STR,
                            "azure_instance": _STR,
                            "azure_api_version": _STR,
                            "azure_deployment_id": _STR,
                            "llama2_format": {"enum": ["raw", "openai", "ollama"]},
                            "mistral_format": {"enum": ["openai", "ollama"]},
                            "upstream_url": {"type": "string", "pattern": "^https?://"},
                            "upstream_path": _STR,
                        }
                    ),
                },
                ("provider",),
            ),
            "logging": _record({"log_statistics": _BOOL, "log_payloads": _BOOL}),
            "response_streaming": {"enum": ["allow", "deny", "always"]},
            "max_request_body_size": {"type": "integer", "exclusiveMinimum": 0},
            "model_name_header": _BOOL,
            "llm_format": {"enum": ["openai", "bedrock", "gemini"]},
        },
        ("route_type", "model"),
    ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_bundled_plugin_configs_have_their_documented_fields_and_types(name: str) -> None:
    for found in all_plugins(config_of(name)):
        if found["name"] in BUNDLED:
            jsonschema.validate(found.get("config", {}), BUNDLED[found["name"]])


def test_ai_proxy_entity_checks() -> None:
    """The checks Kong 3.9 adds on top of the fields (kong/llm/schemas/init.lua): header name
    and value together; statistics supported for this provider and route type."""
    conf = plugin(files.kong_yml(), "ai-proxy")["config"]
    assert ("header_name" in conf["auth"]) == ("header_value" in conf["auth"])
    assert (conf["route_type"], conf["model"]["provider"]) != ("llm/v1/completions", "anthropic")


# --- the upstream key: a mechanism Kong resolves --------------------------------------------

# request-transformer renders each `$(expr)` of a value with penlight's template, in a sandbox
# whose environment is Kong's `untrusted_lua_sandbox_environment` linked from _G, plus `type` and
# lazily loaded headers, query_params, uri_captures and shared
# (Kong@3.9.x:kong/plugins/request-transformer/access.lua, kong/tools/sandbox.lua); an
# expression's value is written as `tostring(value or '')` (Penlight@1.14:lua/pl/template.lua).
_RENDER_LUA = """
local function link(q, o, target)
  if not q then return end
  local h, r = q:match("([^%.]+)%.?(.*)")
  local mod = o[h]
  if not mod then return end
  if r == "" then
    if type(mod) == "table" then target[h] = setmetatable({}, { __index = mod })
    else target[h] = mod end
    return
  end
  if not target[h] then target[h] = {} end
  link(r, o[h], target[h])
end

return function(template, sandbox_environment, environ)
  os.getenv = function(name) return environ[name] end
  local env = { type = type }
  for _, name in ipairs(sandbox_environment) do link(name, _G, env) end
  local lazy = { headers = {}, query_params = {}, uri_captures = {}, shared = {} }
  setmetatable(env, { __index = function(_, key) return lazy[key] end })
  local out, s = {}, 1
  for term, expr, e in template:gmatch("()%$(%b())()") do
    out[#out + 1] = template:sub(s, term - 1)
    local fn = assert(loadstring("return (" .. expr:sub(2, -2) .. ")", "=template"))
    setfenv(fn, env)
    out[#out + 1] = tostring(fn() or "")
    s = e
  end
  out[#out + 1] = template:sub(s)
  return table.concat(out)
end
"""


def render_template(template: str, sandbox_environment: list[str], environ: dict[str, str]) -> str:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    render = lua.execute(_RENDER_LUA)
    rendered: str = render(template, lua.table(*sandbox_environment), lua.table_from(environ))
    return rendered


def kong_service_env() -> dict[str, str]:
    return files.service_environment("kong")


def sandbox_environment(env: dict[str, str]) -> list[str]:
    """`untrusted_lua_sandbox_environment` as Kong parses it: a comma-separated list."""
    raw = env.get("KONG_UNTRUSTED_LUA_SANDBOX_ENVIRONMENT", "")
    return [item.strip() for item in raw.split(",") if item.strip()]


def nginx_env_directives(env: dict[str, str]) -> set[str]:
    """The variables `KONG_NGINX_MAIN_ENV` declares (`A` or `A; env B`): nginx workers see only
    those (Kong@3.9.x:kong/templates/nginx.lua injects nginx_main_* directives)."""
    raw = env.get("KONG_NGINX_MAIN_ENV", "")
    return {part.strip().removeprefix("env ").strip() for part in raw.split(";") if part.strip()}


def authorization_templates(config: dict[str, Any]) -> list[str]:
    conf = plugin(config, "request-transformer")["config"]
    values = conf["replace"]["headers"] + conf["add"]["headers"]
    return [value.partition(":")[2] for value in values if value.startswith("Authorization:")]


@pytest.mark.parametrize("name", CONFIGS)
def test_request_transformer_always_sets_the_upstream_authorization(name: str) -> None:
    """replace (the client's own header) and add (none sent): the same template in both."""
    conf = plugin(config_of(name), "request-transformer")["config"]
    replaced = [h for h in conf["replace"]["headers"] if h.startswith("Authorization:")]
    added = [h for h in conf["add"]["headers"] if h.startswith("Authorization:")]
    assert replaced == added and len(added) == 1


def test_the_template_renders_the_bearer_header_with_the_compose_settings() -> None:
    """With the Kong service's sandbox setting and variables, the header is `Bearer <key>`; the
    variable it reads reaches nginx workers through an `env` directive."""
    env = kong_service_env()
    (template,) = set(authorization_templates(files.kong_yml()))
    rendered = render_template(template, sandbox_environment(env), env)
    assert rendered == env["OPENAI_AUTHORIZATION"]
    assert rendered.startswith("Bearer ") and len(rendered) > len("Bearer ")
    read = set(re.findall(r"os\.getenv\(\s*['\"]([A-Za-z0-9_]+)['\"]\s*\)", template))
    assert read == {"OPENAI_AUTHORIZATION"}
    assert read <= nginx_env_directives(env)


def test_the_template_fails_without_the_sandbox_setting() -> None:
    """Kong's default sandbox has no `os`: the setting is what makes the template work."""
    (template,) = set(authorization_templates(files.kong_yml()))
    with pytest.raises(lupa.LuaError, match="os"):
        render_template(template, [], {"OPENAI_AUTHORIZATION": "Bearer x"})


def test_an_unset_variable_renders_an_empty_key() -> None:
    """Penlight writes nil as '': OpenAI (and the demo upstream) answer 401, nothing leaks."""
    (template,) = set(authorization_templates(files.kong_yml()))
    assert render_template(template, ["os.getenv"], {}) == ""


def test_ai_proxy_takes_the_same_variable_through_the_env_vault() -> None:
    """auth.header_value is referenceable (Kong@3.9.x:kong/llm/schemas/init.lua)."""
    auth = plugin(files.kong_yml(), "ai-proxy")["config"]["auth"]
    assert auth["header_name"] == "Authorization"
    assert files.vault_env_variable(auth["header_value"]) == "OPENAI_AUTHORIZATION"


def test_every_vault_reference_names_a_variable_the_kong_service_has() -> None:
    env = kong_service_env()
    references = [v for _, v in _strings(files.kong_yml()) if v.startswith("{vault://")]
    assert references
    for reference in references:
        variable = files.vault_env_variable(reference)
        assert variable is not None, f"{reference}: only the env vault is set up"
        assert env.get(variable), variable


# --- no literal secret ----------------------------------------------------------------------

_SECRET_KEYS = re.compile(r"token|secret|password|passwd|api_?key|header_value|param_value")
_SECRET_SHAPES = re.compile(
    r"\bsk-[A-Za-z0-9_-]{8,}|\b[sr]k_(live|test)_[A-Za-z0-9]{8,}|Bearer [^$\s']"
)


def _strings(value: Any, path: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _strings(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [item for i, v in enumerate(value) for item in _strings(v, f"{path}[{i}]")]
    return [(path, value)] if isinstance(value, str) else []


@pytest.mark.parametrize("name", CONFIGS)
def test_no_literal_secret(name: str) -> None:
    """Secret fields hold vault references, headers are rendered from the environment, and the
    only literal credentials are the demo consumers' `demo-` keys."""
    for path, value in _strings(config_of(name)):
        assert not _SECRET_SHAPES.search(value), path
        if path.endswith(".key") and ".keyauth_credentials[" in path:
            assert value.startswith("demo-"), path
        elif _SECRET_KEYS.search(path.rsplit(".", 1)[-1]):
            assert files.vault_env_variable(value), path
        if value.lower().startswith("authorization:"):
            assert "$(" in value, path


# --- the demo variant -----------------------------------------------------------------------


def demo_variant(config: dict[str, Any]) -> dict[str, Any]:
    """What docker/kong/demo.kong.yml must be: kong.yml with both upstreams the demo one."""
    demo = copy.deepcopy(config)
    for service in demo["services"]:
        if service["url"] == OPENAI_CHAT and service["name"] == "AIService":
            service["url"] = DEMO_CHAT
    ai_proxy = plugin(demo, "ai-proxy")["config"]["model"]
    ai_proxy.setdefault("options", {})["upstream_url"] = DEMO_CHAT
    return demo


def test_demo_config_is_kong_yml_with_the_demo_upstream() -> None:
    assert files.demo_kong_yml() == demo_variant(files.kong_yml())
    assert DEMO_CHAT not in files.KONG_YML.read_text()
    assert OPENAI_CHAT in files.KONG_YML.read_text()
