"""What the README and docs/ name exists: commands, console scripts and their options, make
targets, environment variables, plugin fields, endpoints, paths, and every other name in
backticks that looks like one of ours. The plugin config table is the one the code renders.

Names that belong to others (Kong's settings and sources, Konnect, Stripe, the PDK) are in the
allowlists below, each with its reason; a name outside them that the code does not have fails.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.deploy import files
from tests.harness.paths import REPO_ROOT, VENV_BIN
from token_meter_plugin import config as plugin_config
from token_meter_plugin import config_doc

README = REPO_ROOT / "README.md"
DOCUMENTS = [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
FIELDS = {field.name for field in plugin_config.FIELDS}
# Where a name must appear to exist: the code, the contracts, the deployment files.
CODE_ROOTS = ("plugin", "collector", "schema", "tests", "bench", "docker", ".ci")
CODE_FILES = ("kong.yml", "docker-compose.yml", "Makefile", "pyproject.toml", ".dockerignore")
CODE_SUFFIXES = {".py", ".sql", ".lua", ".json", ".yaml", ".yml", ".toml", ".sh", ".env", ".sse"}
THIS_FILE = Path(__file__).resolve()

# Upstream names the documents mention, with why each is not ours to have.
UPSTREAM_NAMES = {
    # Konnect's data plane settings: Konnect hands them out for a new node (README, Konnect)
    **dict.fromkeys(
        (
            "KONG_ROLE",
            "KONG_KONNECT_MODE",
            "KONG_CLUSTER_MTLS",
            "KONG_CLUSTER_CONTROL_PLANE",
            "KONG_CLUSTER_SERVER_NAME",
            "KONG_CLUSTER_TELEMETRY_ENDPOINT",
            "KONG_CLUSTER_TELEMETRY_SERVER_NAME",
            "KONG_CLUSTER_CERT",
            "KONG_CLUSTER_CERT_KEY",
            "KONG_LUA_SSL_TRUSTED_CERTIFICATE",
        ),
        "a Konnect data plane setting",
    ),
    "kong.conf": "Kong's configuration file",
    "pluginserver_token_meter_start_cmd": "the kong.conf spelling of a setting the README gives",
    "client_max_body_size": "an nginx setting (Kong@3.9.x:kong/templates/kong_defaults.lua)",
    "build_phases": "a function of Kong@3.9.x:kong/runloop/plugin_servers/plugin.lua",
    "mp_rpc.lua": "Kong@3.9.x:kong/runloop/plugin_servers/rpc/mp_rpc.lua, cited in full nearby",
    "plugin.lua": "Kong@3.9.x:kong/runloop/plugin_servers/plugin.lua, cited in full nearby",
    "kong_defaults.lua": "Kong@3.9.x:kong/templates/kong_defaults.lua, cited in full nearby",
    "openai/": "a provider prefix of model names (docs/quotas-and-credits.md), not a path",
    "error.type": "the error field of OpenAI's and Anthropic's answers",
    "kong.vault.warmup": "a function of Kong@3.9.x:kong/pdk/vault.lua",
    "nginx_main_env": "the kong.conf spelling of KONG_NGINX_MAIN_ENV, which the code sets",
}
# Names the documents give as not built yet (docs/architecture.md section 6, docs/billing.md).
NOT_BUILT: dict[str, str] = {}


@dataclass(frozen=True)
class Mention:
    document: str
    text: str
    in_code_block: bool

    def __str__(self) -> str:
        return f"{self.document}: {self.text!r}"


def mentions() -> Iterator[Mention]:
    """Every backticked span of prose, and every line of a shell code block."""
    for path in DOCUMENTS:
        name = str(path.relative_to(REPO_ROOT))
        text = path.read_text()
        blocks = re.split(r"^```", text, flags=re.MULTILINE)
        for index, block in enumerate(blocks):
            if index % 2:  # inside a fence: "sh\n..." or "yaml\n..."
                language, _, body = block.partition("\n")
                if language.strip() in ("sh", "bash", "console"):
                    for raw in body.splitlines():
                        line = raw.split("  #")[0].strip()
                        if line and not line.startswith("#"):
                            yield Mention(name, line, True)
                continue
            for span in re.findall(r"`([^`]+)`", block):
                yield Mention(name, " ".join(span.split()), False)


@functools.cache
def code_text() -> str:
    """All code and deployment files, as one text to search names in."""
    parts = []
    for root in CODE_ROOTS:
        for path in (REPO_ROOT / root).rglob("*"):
            if (
                path.is_file()
                and (path.suffix in CODE_SUFFIXES or path.name in ("Dockerfile", "run"))
                and "__pycache__" not in path.parts
                and path.resolve() != THIS_FILE
            ):
                parts.append(path.read_text(errors="replace"))
    parts += [(REPO_ROOT / name).read_text() for name in CODE_FILES]
    return "\n".join(parts)


def in_code(name: str) -> bool:
    return name in code_text()


@functools.cache
def help_text(*command: str) -> str:
    result = subprocess.run(
        [*command, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    return result.stdout + result.stderr


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):", (REPO_ROOT / "Makefile").read_text(), re.M))


def collector_routes() -> set[tuple[str, str]]:
    source = (REPO_ROOT / "collector" / "app.py").read_text()
    return {
        (m.upper(), p) for m, p in re.findall(r"add_(get|post|put|delete)\(\"([^\"]+)\"", source)
    }


def openapi_routes() -> set[tuple[str, str]]:
    spec = yaml.safe_load((REPO_ROOT / "schema" / "openapi.yaml").read_text())
    return {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}


# --- the checks, one kind of name each ------------------------------------------------------

ENDPOINT = re.compile(r"^(GET|POST|PUT|DELETE|PATCH) (/[^\s?`]*)")
ENV_VAR = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\*?$")
PATH = re.compile(
    r"^(\.?[\w.<>*-]+/)+[\w.<>*-]*$|^[\w-]+\.(py|md|yml|yaml|json|lua|sql|toml|txt|env)$"
)
CITATION = re.compile(r"^[\w.-]+@[\w.-]+:")
IDENTIFIER = re.compile(r"^[a-z][a-z0-9]*(?:[_.][a-z0-9]+)+(?:\(\))?$")


def check_endpoint(method: str, path: str) -> str | None:
    if path.startswith("/ai/"):  # a route of kong.yml
        for _, route in files.routes(files.kong_yml()):
            if path in route["paths"] and method in route["methods"]:
                return None
        return "no such route in kong.yml"
    if path.startswith("/status/"):  # Kong's status API, which the Kong image's check calls
        return None if in_code(path) else "called by no deployment file"
    if (method, path) not in collector_routes():
        # Stripe's API, which collector/billing calls: the fake implements each endpoint
        stripe_routes = (REPO_ROOT / "tests" / "harness" / "stripe" / "endpoints.py").read_text()
        if f'"{method} {path}"' in stripe_routes:
            return None
        return "no such route in collector/app.py (nor a Stripe endpoint of the fake)"
    if (method, path) not in openapi_routes():
        return "not in schema/openapi.yaml"
    return None


def check_env_var(name: str) -> str | None:
    if name in UPSTREAM_NAMES:
        return None
    if name.endswith("*"):
        prefix = name[:-1]
        return None if re.search(re.escape(prefix) + r"[A-Z]", code_text()) else "no such prefix"
    return None if in_code(name) else "named by no code or deployment file"


def check_path(text: str) -> str | None:
    if text in UPSTREAM_NAMES:
        return None
    if text.startswith("/"):  # an absolute path inside a container or on a host
        return None if in_code(text.rstrip("/")) else "named by no code or deployment file"
    pattern = re.sub(r"<[^>]+>", "*", text.rstrip("/"))
    if "/" not in pattern:
        found = [p for p in REPO_ROOT.rglob(pattern) if ".venv" not in p.parts]
        return None if found else "no such module"
    candidates = [REPO_ROOT, REPO_ROOT / "collector", REPO_ROOT / "plugin", REPO_ROOT / "tests"]
    if any(list(base.glob(pattern)) for base in candidates):
        return None
    return "no such file or directory"


def check_command(line: str) -> str | None:
    """A shell line: make targets, our console scripts and their subcommands and options,
    `python -m` modules, docker compose services and files."""
    words = line.split()
    if words[:1] == ["export"]:
        words.pop(0)
    while words and (assignment := re.match(r"^([A-Z][A-Z0-9_]*)=", words[0])):
        problem = check_env_var(assignment[1])  # VAR=value, alone or before a command
        if problem:
            return f"{assignment[1]}: {problem}"
        words.pop(0)
    if not words:
        return None
    program = words[0].removeprefix(".venv/bin/")
    if program == "make":
        missing = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        return None if set(missing) <= make_targets() else f"no make target {missing}"
    if program in SCRIPTS:
        return check_script_words(program, words[1:])
    if program in ("python", "python3") and words[1:2] == ["-m"]:
        module = words[2]
        if importlib.util.find_spec(module) is None:
            return f"no module {module}"
        return check_options(help_text(sys.executable, "-m", module), words[3:])
    if program == "docker" and words[1:2] == ["compose"]:
        return check_compose_words(words[2:])
    if program == "docker" and words[1:2] == ["build"]:
        dockerfile = words[words.index("-f") + 1]
        return None if (REPO_ROOT / dockerfile).is_file() else f"no {dockerfile}"
    if program == "curl":
        return check_curl(line)
    return None


def check_options(help_output: str, words: list[str]) -> str | None:
    for word in words:
        if word.startswith("-") and len(word) > 1:
            option = word.split("=")[0]
            if not re.search(rf"(^|[\s,\[]){re.escape(option)}\b", help_output):
                return f"no option {option}"
    return None


def check_script_words(program: str, words: list[str]) -> str | None:
    command = [str(VENV_BIN / program)]
    for word in words:
        if word.startswith("-"):
            problem = check_options(help_text(*command), [word])
            if problem:
                return problem
            continue
        subcommands = re.search(r"\{([\w,-]+)\}", help_text(*command))
        if subcommands is None:
            break  # positional arguments from here on
        if word not in subcommands[1].split(","):
            return f"{program}: no subcommand {word}"
        command.append(word)
    return None


def check_compose_words(words: list[str]) -> str | None:
    services = set(files.compose()["services"])
    profiles = {p for s in files.compose()["services"].values() for p in s.get("profiles", [])}
    iterator = iter(words)
    for word in iterator:
        if word == "--env-file":
            path = next(iterator)
            if not (REPO_ROOT / path).is_file():
                return f"no env file {path}"
        elif word == "--profile":
            profile = next(iterator)
            if profile not in profiles:
                return f"no profile {profile}"
        elif word in ("exec", "logs") or (word == "-d" and words[:1] == ["up"]):
            rest = [w for w in iterator if not w.startswith("-")]
            if rest and rest[0] not in services:
                return f"no service {rest[0]}"
            if word == "exec" and len(rest) > 1:
                return check_command(" ".join(rest[1:]))
            return None
    return None


def check_curl(line: str) -> str | None:
    match = re.search(r"localhost:(\d+)(/[^\s'\"]*)", line)
    if match is None:
        return None
    port, path = match.groups()
    path = path.split("?")[0]
    if port == "8787":
        routes = [re.sub(r"\{[^}]+\}", "[^/]+", p) for _, p in collector_routes()]
        return None if any(re.fullmatch(r, path) for r in routes) else f"no collector route {path}"
    if port == "8000":
        paths = [p for _, r in files.routes(files.demo_kong_yml()) for p in r["paths"]]
        return None if any(path.startswith(p) for p in paths) else f"no Kong route {path}"
    return None


def check_identifier(name: str) -> str | None:
    name = name.removesuffix("()")
    if name in UPSTREAM_NAMES or name in FIELDS or in_code(name):
        return None
    # a Prometheus counter: prometheus_client adds `_total` to the name the code gives it
    if name.endswith("_total") and in_code(name.removesuffix("_total")):
        return None
    # `table.column`, `module.function`: each part exists
    if "." in name and all(in_code(part) for part in name.split(".")):
        return None
    return "named by no code or deployment file"


def problem_of(mention: Mention) -> str | None:
    text = mention.text
    if text in NOT_BUILT or text in UPSTREAM_NAMES or CITATION.match(text):
        return None
    if text.startswith("<") or re.match(r"^(application|text)/", text):
        return None  # a placeholder (`<prefix>/<name>.socket`) or a media type
    if mention.in_code_block:
        return check_command(text)
    if endpoint := ENDPOINT.match(text):
        return check_endpoint(endpoint[1], endpoint[2])
    first = text.split()[0]
    if (
        first in SCRIPTS
        or first in ("make", "docker", "python", "curl")
        or text.startswith(".venv/bin/")
    ):
        return check_command(text)
    if ENV_VAR.match(text):
        return check_env_var(text)
    if " " not in text and PATH.match(text) and not text.startswith(("http", "kong://")):
        return check_path(text)
    if (assignment := re.match(r"^([a-z_][a-z0-9_.]*)\s*[:=]\s*\S", text)) and "/" not in text:
        name = assignment[1]
        if name in FIELDS or name in UPSTREAM_NAMES or in_code(name):
            return None
        return f"{name}: no such plugin field or setting"
    if IDENTIFIER.match(text):
        return check_identifier(text)
    return None


def test_every_name_in_the_documents_exists() -> None:
    problems = [f"{m}: {p}" for m in mentions() if (p := problem_of(m))]
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_does_not_exist() -> None:
    """Each kind of check refuses a name that is not there."""
    bad = [
        Mention("x", "GET /v1/nothing", False),
        Mention("x", "POST /v2/core/nothing", False),
        Mention("x", "TOKEN_METER_NO_SUCH_SETTING", False),
        Mention("x", "plugin/no_such_module.py", False),
        Mention("x", "token-meter-admin no-such-command", False),
        Mention("x", "token-meter-collector --no-such-option", False),
        Mention("x", "make no-such-target", True),
        Mention("x", "docker compose exec no-such-service true", True),
        Mention("x", "no_such_field: 3", False),
        Mention("x", "token_meter_no_such_metric", False),
        Mention("x", "curl -s localhost:8787/v1/nothing", True),
        Mention("x", "TOKEN_METER_NO_SUCH=1 make test", True),
    ]
    assert [m.text for m in bad if problem_of(m) is None] == []


def test_plugin_configs_in_the_documents_pass_the_plugins_validator() -> None:
    """Every YAML example configuring token-meter or token-meter-log is a config Kong takes."""
    checked = 0
    for path in DOCUMENTS:
        for block in re.findall(r"^```yaml\n(.*?)^```", path.read_text(), re.M | re.S):
            for entry in (yaml.safe_load(block) or {}).get("plugins", []):
                if entry.get("name") in plugin_config.PLUGIN_NAMES:
                    plugin_config.PluginConfig.from_kong(entry["name"], entry["config"])
                    checked += 1
    assert checked >= 1


def test_the_readme_plugin_server_settings_are_the_images() -> None:
    """The README's Kong settings are exactly what docker/kong/Dockerfile sets."""
    block = re.search(
        r"```sh\n# kong.conf keys as environment variables.*?\n(.*?)```", README.read_text(), re.S
    )
    assert block is not None
    documented = {}
    for line in block[1].splitlines():
        name, _, value = line.partition("=")
        documented[name] = value.strip('"')
    assert documented == files.dockerfile_env(files.KONG_DOCKERFILE)


def test_the_readme_kong_settings_for_the_template_are_the_compose_ones() -> None:
    kong_env = files.service_environment("kong")
    text = README.read_text()
    for name in ("KONG_UNTRUSTED_LUA_SANDBOX_ENVIRONMENT", "KONG_NGINX_MAIN_ENV"):
        assert f"{name}={kong_env[name]}" in text, name


def test_readme_plugin_config_table_is_generated_from_the_fields() -> None:
    """Regenerate with `python -m token_meter_plugin.config_doc`."""
    text = README.read_text()
    assert config_doc.render_block() in text
    assert config_doc.replace_block(text) == text


@pytest.mark.parametrize("name", sorted(UPSTREAM_NAMES))
def test_upstream_names_are_not_ours(name: str) -> None:
    """An allowlisted name that turned out to be ours belongs in no allowlist: no file of the
    repository has its name, and a setting or function name is in no code."""
    if "." in name or "/" in name:
        found = [p for p in REPO_ROOT.rglob(name.rstrip("/")) if ".venv" not in p.parts]
        assert not found, name
    else:
        assert not in_code(name), name
