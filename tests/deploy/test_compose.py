"""docker-compose.yml and the Dockerfiles: valid for the Compose specification's JSON schema,
and consistent with each other, with kong.yml and with the code, since no Docker engine runs
here to find out.

What Kong needs is checked against its source: one plugin server per plugin, each started with
an absolute command and `-p <prefix>` and found on `<prefix>/<name>.socket`
(Kong@3.9.x:kong/conf_loader/init.lua, kong/runloop/plugin_servers/process.lua); the journal on
a named volume at the plugins' default spool root under that prefix.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest

from tests.deploy import files
from tests.deploy.files import COLLECTOR_DOCKERFILE, KONG_DOCKERFILE, compose
from tests.harness.paths import REPO_ROOT
from token_meter_plugin import config as plugin_config

SERVICES = ("postgres", "collector", "demo-upstream", "kong", "stripe")
SECRET_NAME = re.compile(r"(_TOKEN|PASSWORD|SECRET|API_KEY|AUTHORIZATION)$|^DATABASE_URL$")
PROJECT_SCRIPTS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def compose_spec_schema() -> dict[str, Any]:
    """The Compose specification's schema, as check-jsonschema vendors it."""
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema: dict[str, Any] = json.loads(vendored.read_text())
    return schema


def service(name: str) -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"][name]
    return found


def test_compose_file_is_valid_for_the_compose_specification() -> None:
    schema = compose_spec_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors
    assert sorted(compose()["services"]) == sorted(SERVICES)


def test_every_service_has_a_health_check_and_starts_in_order() -> None:
    """Kong after a healthy collector and demo upstream, the collector after PostgreSQL."""
    for name, definition in compose()["services"].items():
        assert definition.get("healthcheck", {}).get("test"), name
        for dependency, condition in definition.get("depends_on", {}).items():
            assert dependency in compose()["services"], (name, dependency)
            assert condition["condition"] == "service_healthy", (name, dependency)
    assert set(service("kong")["depends_on"]) == {"collector", "demo-upstream"}
    assert set(service("collector")["depends_on"]) == {"postgres"}


def test_profiled_services_are_optional() -> None:
    """The Stripe fake is the `stripe` profile; nothing always on depends on it (Compose
    refuses such a model while the profile is off: compose-spec@main:15-profiles.md)."""
    profiled = {n for n, d in compose()["services"].items() if d.get("profiles")}
    assert profiled == {"stripe"}
    for name, definition in compose()["services"].items():
        if not definition.get("profiles"):
            assert not set(definition.get("depends_on", {})) & profiled, name


def test_referenced_files_exist() -> None:
    """env files, build contexts, Dockerfiles and their targets, bind-mounted files, and what
    the Dockerfiles COPY."""
    for name, definition in compose()["services"].items():
        entries = definition.get("env_file", [])
        for entry in [entries] if isinstance(entries, str) else entries:
            path = entry if isinstance(entry, str) else entry["path"]
            assert (REPO_ROOT / path).is_file(), (name, path)
        build = definition.get("build")
        if build:
            dockerfile = REPO_ROOT / build["context"] / build["dockerfile"]
            assert dockerfile.is_file(), name
            if "target" in build:
                assert build["target"] in files.dockerfile_stages(dockerfile), name
        for volume in definition.get("volumes", []):
            source = files.interpolate(volume).split(":")[0]
            if source.startswith("."):
                assert (REPO_ROOT / source).exists(), (name, source)
            else:
                assert source in compose()["volumes"], (name, source)
    for dockerfile in (KONG_DOCKERFILE, COLLECTOR_DOCKERFILE):
        text = re.sub(r"\\\n", " ", dockerfile.read_text())
        for line in text.splitlines():
            if line.startswith("COPY "):
                sources = [w for w in shlex.split(line)[1:-1] if not w.startswith("--")]
                for source in sources:
                    assert (REPO_ROOT / source).exists(), (dockerfile, source)


def test_published_ports_stay_on_the_loopback_interface() -> None:
    for name, definition in compose()["services"].items():
        for port in definition.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_no_literal_secrets_beyond_demo_placeholders() -> None:
    """Secrets come from env files whose values are marked `demo`, or from interpolation; the
    compose file and the Dockerfiles hold none."""
    for name, definition in compose()["services"].items():
        for variable, value in (definition.get("environment") or {}).items():
            if SECRET_NAME.search(variable):
                assert str(value).startswith("${"), (name, variable)
    for env_path in sorted((REPO_ROOT / "docker").glob("*.env")):
        text = env_path.read_text()
        assert "DEMO PLACEHOLDERS" in text.splitlines()[0], env_path
        for variable, value in files.env_file(str(env_path.relative_to(REPO_ROOT))).items():
            if SECRET_NAME.search(variable):
                assert "demo" in value, (env_path, variable)
    for dockerfile in (KONG_DOCKERFILE, COLLECTOR_DOCKERFILE):
        assert not any(SECRET_NAME.search(k) for k in files.dockerfile_env(dockerfile))


# --- Kong -----------------------------------------------------------------------------------


def kong_image_env() -> dict[str, str]:
    return files.dockerfile_env(KONG_DOCKERFILE)


def test_kong_image_serves_each_plugin_from_its_own_plugin_server() -> None:
    env = kong_image_env()
    assert env["KONG_PLUGINS"].split(",") == ["bundled", *plugin_config.PLUGIN_NAMES]
    assert env["KONG_PLUGINSERVER_NAMES"].split(",") == list(plugin_config.PLUGIN_NAMES)
    scripts = {"token-meter": "token-meter-plugin", "token-meter-log": "token-meter-log-plugin"}
    text = KONG_DOCKERFILE.read_text()
    for name, script in scripts.items():
        assert script in PROJECT_SCRIPTS
        key = "KONG_PLUGINSERVER_" + name.upper().replace("-", "_")
        socket = Path(env[f"{key}_SOCKET"])
        start = shlex.split(env[f"{key}_START_CMD"])
        query = shlex.split(env[f"{key}_QUERY_CMD"])
        # Kong looks for <prefix>/<name>.socket; the server makes its socket in `-p <prefix>`
        # under its own name with `.socket`
        assert socket == Path(plugin_config.DEFAULT_KONG_PREFIX) / f"{name}.socket"
        binary = f"/usr/local/bin/{script}"
        assert start == [binary, "-p", str(socket.parent)]
        assert query == [binary, "-dump"]
        # the absolute path is the virtualenv's console script, linked in the image
        assert f"ln -s /opt/token-meter/bin/{script} {binary}" in text
        assert f"{binary} -dump > /dev/null" in text  # the build fails if the query would
    ready = (REPO_ROOT / "docker" / "kong" / "ready.sh").read_text()
    for name in scripts:
        assert f"test -S {plugin_config.DEFAULT_KONG_PREFIX}/{name}.socket" in ready


def test_kong_journal_is_on_a_named_volume_at_the_default_spool_root() -> None:
    spool_root = f"{plugin_config.DEFAULT_KONG_PREFIX}/{plugin_config.SPOOL_DIR_NAME}"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service("kong")["volumes"]}
    assert mounts[spool_root] in compose()["volumes"]
    assert f"install -d -o kong -g 0 -m 0750 {spool_root}" in KONG_DOCKERFILE.read_text()
    # no plugin config moves the journal elsewhere
    for found in files.all_plugins(files.demo_kong_yml()):
        assert "spool_dir" not in found.get("config", {})


def test_kong_loads_the_demo_config_db_less() -> None:
    env = files.service_environment("kong")
    assert env["KONG_DATABASE"] == "off"
    mounts = {}
    for volume in service("kong")["volumes"]:
        source, target = files.interpolate(volume).split(":")[:2]
        mounts[target] = source
    assert mounts[env["KONG_DECLARATIVE_CONFIG"]] == "./docker/kong/demo.kong.yml"
    assert (REPO_ROOT / "kong.yml").is_file()  # what TOKEN_METER_KONG_YML=./kong.yml mounts
    assert "TOKEN_METER_KONG_YML" in str(service("kong")["volumes"])


def test_kong_upstreams_and_collector_are_the_compose_services() -> None:
    """The demo config reaches the collector and the demo upstream where compose runs them."""
    collector_port = files.dockerfile_env(COLLECTOR_DOCKERFILE)["TOKEN_METER_PORT"]
    command = service("demo-upstream")["command"]
    upstream_port = command[command.index("--port") + 1]
    config = files.demo_kong_yml()
    for found in files.all_plugins(config):
        if found["name"] in files.METERING_PLUGINS:
            url = urlsplit(found["config"]["collector_url"])
            assert (url.hostname, str(url.port)) == ("collector", collector_port)
    upstreams = [s["url"] for s in config["services"] if s["name"] == "AIService"]
    ai_proxy = next(p for p in files.all_plugins(config) if p["name"] == "ai-proxy")
    upstreams.append(ai_proxy["config"]["model"]["options"]["upstream_url"])
    for upstream in upstreams:
        url = urlsplit(upstream)
        assert (url.hostname, str(url.port), url.path) == (
            "demo-upstream",
            upstream_port,
            "/v1/chat/completions",
        )


# --- secrets shared between services --------------------------------------------------------


def test_kong_and_the_collector_share_the_ingest_token() -> None:
    kong_env = files.service_environment("kong")
    collector_env = files.service_environment("collector")
    token = collector_env["TOKEN_METER_INGEST_TOKEN"]
    assert kong_env["TOKEN_METER_INGEST_TOKEN"] == token
    assert len(token) >= 16 and len(collector_env["TOKEN_METER_ADMIN_TOKEN"]) >= 16
    assert token != collector_env["TOKEN_METER_ADMIN_TOKEN"]
    # the collector validates these settings as it would at start
    from token_meter_collector.settings import Settings

    Settings.from_env({k: v for k, v in collector_env.items() if v})


def test_the_collector_reaches_postgres_with_its_credentials() -> None:
    postgres = files.service_environment("postgres")
    url = urlsplit(files.service_environment("collector")["DATABASE_URL"])
    assert (url.hostname, url.port) == ("postgres", 5432)
    assert url.username == postgres["POSTGRES_USER"]
    assert url.password == postgres["POSTGRES_PASSWORD"]
    assert url.path == "/" + postgres["POSTGRES_DB"]


def test_the_stripe_profile_points_the_collector_at_the_fake() -> None:
    """With docker/stripe-fake.env the collector has a key the fake accepts, the fake's
    address, and the fake knows the Stripe customers of kong.yml's consumers."""
    variables = files.env_file("docker/stripe-fake.env")
    collector_env = files.service_environment("collector", variables)
    stripe_env = files.service_environment("stripe", variables)
    assert collector_env["STRIPE_API_KEY"] == stripe_env["STRIPE_API_KEY"]
    command = service("stripe")["command"]
    base = urlsplit(collector_env["STRIPE_API_BASE"])
    assert (base.hostname, str(base.port)) == ("stripe", command[command.index("--port") + 1])
    seeded = {command[i + 1] for i, word in enumerate(command) if word == "--customer"}
    assert seeded == {c["custom_id"] for c in files.kong_yml()["consumers"]}
    from token_meter_collector.settings import Settings

    settings = Settings.from_env({k: v for k, v in collector_env.items() if v})
    assert settings.stripe is not None  # billing on, with settings the collector takes
    # without the env file billing stays off: the variables are empty
    plain = files.service_environment("collector")
    assert plain["STRIPE_API_KEY"] == "" and plain["STRIPE_API_BASE"] == ""


@pytest.mark.parametrize("name", ["collector", "demo-upstream", "stripe"])
def test_python_health_checks_and_commands_name_real_modules(name: str) -> None:
    """`python -m tests.harness.<fake>` runs from the image's /opt/token-meter, where the
    `fakes` target copies tests/harness."""
    command = service(name).get("command") or []
    if "-m" in command:
        module = command[command.index("-m") + 1]
        path = REPO_ROOT / Path(*module.split("."))
        assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()
        copied = COLLECTOR_DOCKERFILE.read_text()
        assert "COPY tests/harness/__init__.py tests/harness/openai_upstream.py" in copied
        assert "COPY tests/harness/stripe tests/harness/stripe" in copied
