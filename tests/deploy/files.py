"""The deployment files as the tests read them: kong.yml and its Docker demo variant, the compose
file, its env files and the Dockerfiles' ENV instructions."""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from dotenv import dotenv_values

from tests.harness.paths import REPO_ROOT

KONG_YML = REPO_ROOT / "kong.yml"
DEMO_KONG_YML = REPO_ROOT / "docker" / "kong" / "demo.kong.yml"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
KONG_DOCKERFILE = REPO_ROOT / "docker" / "kong" / "Dockerfile"
COLLECTOR_DOCKERFILE = REPO_ROOT / "docker" / "collector" / "Dockerfile"
METERING_PLUGINS = ("token-meter", "token-meter-log")

_VAULT_ENV = re.compile(r"^\{vault://env/([a-z0-9-]+)\}$")
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@cache
def kong_yml() -> dict[str, Any]:
    config: dict[str, Any] = load_yaml(KONG_YML)
    return config


@cache
def demo_kong_yml() -> dict[str, Any]:
    config: dict[str, Any] = load_yaml(DEMO_KONG_YML)
    return config


@cache
def compose() -> dict[str, Any]:
    config: dict[str, Any] = load_yaml(COMPOSE_FILE)
    return config


def env_file(relative: str) -> dict[str, str]:
    """An env file of the compose file, as Compose reads one (`VAR=VAL` lines, # comments)."""
    return {k: v or "" for k, v in dotenv_values(REPO_ROOT / relative).items()}


def service_env_files(service: str) -> dict[str, str]:
    """The variables a service's env_file entries give it, later files winning."""
    entries = compose()["services"][service].get("env_file", [])
    values: dict[str, str] = {}
    for entry in [entries] if isinstance(entries, str | dict) else entries:
        values.update(env_file(entry if isinstance(entry, str) else entry["path"]))
    return values


def interpolate(value: str, variables: dict[str, str] | None = None) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR-default}`, from ``variables`` (an
    unset variable giving its default, else the empty string); `$$` is a literal `$`."""
    known = variables or {}
    replaced = _INTERPOLATION.sub(lambda m: known.get(m[1], m[2] or ""), value)
    return replaced.replace("$$", "$")


def service_environment(service: str, variables: dict[str, str] | None = None) -> dict[str, str]:
    """A service's container environment: env files, then `environment` (interpolated)."""
    values = service_env_files(service)
    for name, value in compose()["services"][service].get("environment", {}).items():
        values[name] = interpolate("" if value is None else str(value), variables)
    return values


def dockerfile_env(path: Path) -> dict[str, str]:
    """The `ENV key=value ...` instructions of a Dockerfile (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    values: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                name, _, value = pair.partition("=")
                values[name] = value
    return values


def dockerfile_stages(path: Path) -> list[str]:
    return re.findall(r"^FROM \S+ AS (\S+)$", path.read_text(), flags=re.MULTILINE)


def vault_env_variable(reference: str) -> str | None:
    """The environment variable `{vault://env/name}` resolves to (Kong@3.9.x:kong/vaults/env/
    init.lua: upper case, `-` as `_`), or None for a string that is no env vault reference."""
    match = _VAULT_ENV.match(reference)
    return match[1].upper().replace("-", "_") if match else None


def routes(config: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every (service, route) of a declarative config, routes nested in their service."""
    return [(service, route) for service in config["services"] for route in service["routes"]]


def plugins_on(
    config: dict[str, Any], service: dict[str, Any], route: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The plugins that run on a route, by name: global ones, the service's, the route's (the
    most specific wins, as in Kong)."""
    applying: dict[str, dict[str, Any]] = {}
    for scope in (config.get("plugins", []), service.get("plugins", []), route.get("plugins", [])):
        for plugin in scope:
            applying[plugin["name"]] = plugin
    return applying


def all_plugins(config: dict[str, Any]) -> list[dict[str, Any]]:
    found = list(config.get("plugins", []))
    for service in config["services"]:
        found += service.get("plugins", [])
        for route in service["routes"]:
            found += route.get("plugins", [])
    for consumer in config.get("consumers", []):
        found += consumer.get("plugins", [])
    return found
