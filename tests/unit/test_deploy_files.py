"""No Docker engine or cluster runs in CI, so check everything short of running the containers:
the deployment files parse, and everything they name exists and agrees with the code —
settings (environment variables), CLI commands, files in the repository, ports and probes.
What can run without Docker does: the image's entry command, its health check, the `keys`
service's script, and the build of the wheel the image installs."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from pydantic import BaseModel

from coordinator_agent.cli.main import COMMANDS, build_parser
from coordinator_agent.settings import CONFIG_ENV, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"
K8S = ROOT / "deploy" / "k8s"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "coordinator.json"
CHECK_WHEEL = ROOT / "deploy" / "check_wheel.py"

MONITORING_PORT = 9464
PROMETHEUS_PORT = 9090
AGENT_KINDS = {"development", "security", "cicd", "general"}
#: docker-compose.yml runs two coordinators of one name (HA): one leads, one stands by.
COORDINATORS = ("coordinator", "coordinator-2")
ENTRYPOINT = ["coordinator-agent"]
#: Matches a Fernet key (32 bytes, url-safe base64): none may be committed.
FERNET_KEY = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}=")


# --- reading the files ---------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]  # type: ignore[no-any-return]


def is_our_image(service: dict[str, Any]) -> bool:
    build = service.get("build")
    return isinstance(build, dict) and build.get("dockerfile") == "deploy/Dockerfile"


def our_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services().items() if is_our_image(svc)}


def agent_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in our_services().items()
            if svc.get("command", [None])[0] == "worker"}


INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: str) -> str:
    """What Compose makes of ``value`` with an empty environment. Every variable must have a
    default: `docker compose up` has to work without an .env file."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op = match.group("op")
        if op in (":-", "-"):
            return match.group("arg")
        raise AssertionError(f"${{{name}}} in docker-compose.yml has no default ({value!r})")

    return INTERPOLATION.sub(replace, value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolate(str(value)) for key, value in env.items()}


def mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, is_bind) of a service's volumes, short or long syntax."""
    result = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            result.append((source, target, source.startswith((".", "/"))))
        else:
            result.append((volume["source"], volume["target"], volume.get("type") == "bind"))
    return result


def host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The repository file a bind mount shows at ``container_path``, if any."""
    path = PurePosixPath(container_path)
    for source, target, is_bind in mounts(service):
        if is_bind and (path == PurePosixPath(target) or PurePosixPath(target) in path.parents):
            return (ROOT / source / path.relative_to(target)).resolve()
    return None


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def image_env() -> dict[str, str]:
    env = {}
    for word, rest in final_stage():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def image_file(container_path: str) -> Path | None:
    """The repository file the final stage COPYs to ``container_path``, if any."""
    path = PurePosixPath(container_path)
    for word, rest in final_stage():
        if word == "COPY" and not rest.startswith("--"):
            source, target = rest.split()
            if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
                return ROOT / source / path.relative_to(target)
    return None


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list), rest
    return value


def k8s_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def k8s_objects(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for path, doc in k8s_documents()
            if doc.get("kind") == kind and path.name != "kustomization.yaml"}


def k8s_workloads() -> dict[str, dict[str, Any]]:
    """Every Deployment (the agents) and StatefulSet (the coordinator), by name."""
    return {**k8s_objects("Deployment"), **k8s_objects("StatefulSet")}


def k8s_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload name, pod spec, container) of every Deployment and StatefulSet."""
    for name, deployment in k8s_workloads().items():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            yield name, pod, container


def configmap_text(name: str, key: str) -> str:
    return str(k8s_objects("ConfigMap")[name]["data"][key])


# --- settings and commands ------------------------------------------------------------------------


def cli_env_names() -> set[str]:
    """Environment variables the CLI reads for its own options (listed in --help)."""
    names = {CONFIG_ENV}

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            names.update(re.findall(r"\b(COORDINATOR_[A-Z0-9_]+)\b", action.help or ""))
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    return names


def is_setting(env_name: str) -> bool:
    """COORDINATOR_LIMITS__MAX_RETRIES -> Settings.limits.max_retries exists."""
    parts = env_name.removeprefix("COORDINATOR_").lower().split("__")
    model: type[BaseModel] | None = Settings
    for part in parts:
        if model is None or part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        model = annotation if is_model else None  # type: ignore[assignment]
    return model is None  # a leaf: a whole section cannot be set from one variable


def assert_real_env_name(where: str, name: str) -> None:
    if name.startswith("COORDINATOR_"):
        assert is_setting(name) or name in cli_env_names(), (
            f"{where}: {name} is neither a settings field nor an option of the CLI"
        )


def parse_cli(where: str, argv: list[str]) -> argparse.Namespace:
    assert argv and argv[0] in COMMANDS, f"{where}: {argv} is not a coordinator-agent command"
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `coordinator-agent {shlex.join(argv)}` does not parse",
                    pytrace=False)


SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")
REDIRECTION = re.compile(r"(?<!\S)\d*[<>]{1,2}(?:&\d+|\s*[^\s;&|()]+)")


def shell_invocations(script: str) -> Iterator[list[str]]:
    """Arguments of each `coordinator-agent ...` in a shell script (command substitutions
    included), variables filled with a placeholder."""
    script = script.replace("\\\n", " ")
    lines = script.splitlines() + SUBSTITUTION.findall(script)
    for raw in lines:
        line = REDIRECTION.sub(" ", SUBSTITUTION.sub("x", raw))
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
        lexer.whitespace_split = True
        tokens = list(lexer)
        for i, token in enumerate(tokens):
            if token == "coordinator-agent":
                argv = []
                for arg in tokens[i + 1:]:
                    if set(arg) <= set(";&|()<>"):
                        break
                    argv.append(re.sub(r"\$\{?\w+\}?", "x", arg))
                yield argv


def service_invocations(name: str, service: dict[str, Any]) -> Iterator[list[str]]:
    entrypoint = service.get("entrypoint", ENTRYPOINT)
    command = service.get("command")
    if entrypoint == ENTRYPOINT:
        assert isinstance(command, list), f"{name}: use the exec form for the command"
        yield command
    else:
        assert entrypoint[0] == "sh" and entrypoint[-1] in ("-c", "-ec"), (name, entrypoint)
        found = list(shell_invocations(interpolate(command[0])))
        assert found, f"{name}: its script runs no coordinator-agent command"
        yield from found


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
    return {**env, **extra}


@pytest.fixture
def no_coordinator_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("COORDINATOR_"):
            monkeypatch.delenv(key)


def settings_with(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        return load_settings()
    finally:
        for key in env:
            monkeypatch.delenv(key)


# --- compose -------------------------------------------------------------------------------------


def test_compose_brings_up_the_whole_stack() -> None:
    svcs = services()
    assert {"rabbitmq", "consul", "keys", "coordinator", "prometheus", "grafana"} <= set(svcs)
    assert "management" in svcs["rabbitmq"]["image"], "RabbitMQ's management UI should be on"
    assert any(p.endswith(":15672") for p in svcs["rabbitmq"]["ports"])
    assert "-dev" in svcs["consul"]["command"]

    kinds = {}
    for name, service in agent_services().items():
        args = parse_cli(name, service["command"])
        assert args.id not in kinds, f"two agents with id {args.id}"
        kinds[args.id] = args.kind
        assert args.capabilities, f"{name}: an agent without capabilities gets no demo task"
    assert set(kinds.values()) == AGENT_KINDS, kinds

    coordinator = svcs["coordinator"]
    assert coordinator["command"] == ["run"]
    for dependency in ("rabbitmq", "consul", "keys"):
        assert dependency in coordinator["depends_on"]
    assert svcs["keys"]["restart"] == "no"


def test_compose_and_image_env_vars_are_real_settings() -> None:
    checked = 0
    for name, service in services().items():
        for key in environment(service):
            assert_real_env_name(f"docker-compose.yml {name}", key)
            checked += key.startswith("COORDINATOR_")
    for key in image_env():
        assert_real_env_name("deploy/Dockerfile ENV", key)
    assert checked >= 10
    # The checker itself: nested names and whole sections.
    assert is_setting("COORDINATOR_LIMITS__MAX_RETRIES")
    assert is_setting("COORDINATOR_REGISTRY_URL")
    assert not is_setting("COORDINATOR_LIMITS")
    assert not is_setting("COORDINATOR_LIMITS__NO_SUCH_LIMIT")
    assert not is_setting("COORDINATOR_MONITORING_HOST__X")


def test_every_container_gets_valid_settings_with_consul_and_0000(
    monkeypatch: pytest.MonkeyPatch, no_coordinator_env: None
) -> None:
    """Image ENV + compose environment + the image's config file, as the containers see them."""
    for name, service in our_services().items():
        env = {**image_env(), **environment(service)}
        env = {k: v for k, v in env.items() if k.startswith("COORDINATOR_")}
        config = image_file(env[CONFIG_ENV])
        assert config is not None and config.is_file(), (name, env[CONFIG_ENV])
        env[CONFIG_ENV] = str(config)
        settings = settings_with(monkeypatch, env)

        targets = [PurePosixPath(target) for _, target, _ in mounts(service)]
        keyring = PurePosixPath(str(settings.keyring_path))
        assert keyring.parent in targets, f"{name}: keyring {keyring} is on no volume"
        if name == "keys":
            continue
        assert urlparse(settings.broker_url.get_secret_value()).hostname == "rabbitmq", name
        assert settings.registry_url == "http://consul:8500", name
        if name in COORDINATORS:
            assert settings.monitoring_host == "0.0.0.0"
            assert settings.monitoring_port == MONITORING_PORT
            assert PurePosixPath(str(settings.data_dir)) in targets
            assert settings.ha.enabled, f"{name}: two coordinators of one name need HA"
            # Consul's HTTP check of this coordinator, from the Consul container.
            advertised = urlparse(settings.registry.advertise_url or "")
            assert (advertised.hostname, advertised.port, advertised.path) == (
                name, MONITORING_PORT, "/healthz")


def test_compose_commands_are_real_cli_commands() -> None:
    count = 0
    for name, service in our_services().items():
        for argv in service_invocations(name, service):
            parse_cli(f"docker-compose.yml {name}", argv)
            count += 1
        test = service.get("healthcheck", {}).get("test")
        if test is not None:
            assert test[:2] == ["CMD", "coordinator-agent"], (name, test)
            parse_cli(f"docker-compose.yml {name} healthcheck", test[2:])
        elif not service.get("healthcheck", {}).get("disable"):
            # The image's HEALTHCHECK probes the coordinator's /readyz on loopback.
            assert name in COORDINATORS, f"{name}: would inherit the coordinator's health check"
    assert count >= 10
    # The script parser itself.
    assert list(shell_invocations(
        'x="$(coordinator-agent keys list --json 2>/dev/null || true)"\n'
        'coordinator-agent run --name "$x" >>log 2>&1 && echo \\\n  coordinator-agent'
    )) == [["run", "--name", "x"], [], ["keys", "list", "--json"]]


def in_volumes(service: dict[str, Any], container_path: str, volumes: Path) -> Path:
    """Where ``container_path`` of ``service`` lands when each named volume is a directory."""
    path = PurePosixPath(container_path)
    for source, target, is_bind in sorted(mounts(service), key=lambda m: -len(m[1])):
        if not is_bind and path.is_relative_to(target):
            return volumes / source / path.relative_to(target)
    raise AssertionError(f"{container_path} is on no volume of the service")


@pytest.mark.timeout(400)  # some 17 CLI runs of about a second each; more on a busy machine
def test_keys_service_gives_each_principal_its_own_file(tmp_path: Path) -> None:
    """Run the `keys` service's script (each named volume a directory under tmp_path), twice."""
    keys = services()["keys"]
    volumes, root = tmp_path / "volumes", tmp_path / "root"
    # The keys container's file system: each mount point a link to its volume's directory.
    for source, target, _ in mounts(keys):
        (volumes / source).mkdir(parents=True)
        (root / target.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / target.lstrip("/")).symlink_to(volumes / source, target_is_directory=True)
    script = interpolate(keys["command"][0]).replace("/secrets/", f"{root}/secrets/")
    assert "/secrets/" not in script.replace(f"{root}/secrets/", ""), "a path outside /secrets"
    env = clean_env(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        COORDINATOR_CONFIG=str(ROOT / "config" / "coordinator.yaml"),
        COORDINATOR_KEYRING_PATH=str(in_volumes(
            keys, environment(keys)["COORDINATOR_KEYRING_PATH"], volumes)),
    )

    def run() -> dict[Path, str]:
        result = subprocess.run([*keys["entrypoint"], script], env=env, capture_output=True,
                                text=True, timeout=180, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        return {p: p.read_text() for p in volumes.rglob("*.json")}

    first = run()
    full = json.loads(first[Path(env["COORDINATOR_KEYRING_PATH"])])["principals"]
    users = {**agent_services(), "load": services()["load"]}
    holders: dict[str, str] = {}
    for name, service in users.items():
        path = in_volumes(service, environment(service)["COORDINATOR_KEYRING_PATH"], volumes)
        assert path in first, f"{name}: the keys service writes no {path}"
        own = json.loads(first[path])["principals"]
        if name == "load":
            assert [p["role"] for p in own.values()] == ["operator"], own.keys()
        else:
            assert list(own) == [parse_cli(name, service["command"]).id], (name, own.keys())
        for principal, entry in own.items():
            assert entry == full[principal], f"{name}: its key differs from the coordinator's"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert all(str(v).endswith(":ro") for v in service["volumes"]), (
            f"{name}: mount its key read-only")
        # Only its own key is there to read: each volume it mounts holds its file alone, and
        # no other service but the keys service mounts that volume.
        for source, _, _ in mounts(service):
            assert [p for p in first if p.is_relative_to(volumes / source)] == [path], (
                f"{name}: volume {source} holds other keys too")
            assert holders.setdefault(source, name) == name, (
                f"{name} and {holders[source]} share the volume {source}")
    assert run() == first, "a second start must keep the keys (and the files) as they are"


def test_compose_references_existing_files() -> None:
    data = compose()
    declared_volumes = set(data.get("volumes") or {})
    for name, service in services().items():
        build = service.get("build")
        if isinstance(build, dict):
            context = ROOT / build["context"]
            assert (context / build["dockerfile"]).is_file(), name
        for source, _, is_bind in mounts(service):
            if is_bind:
                assert (ROOT / source).exists(), f"{name}: mounts missing {source}"
                assert not source.startswith("/"), f"{name}: use paths inside the repository"
            else:
                assert source in declared_volumes, f"{name}: volume {source} not declared"
    assert DOCKERIGNORE.is_file()


def test_prometheus_scrapes_the_coordinator_and_loads_the_rules() -> None:
    prometheus = services()["prometheus"]
    flags = dict(arg.split("=", 1) for arg in prometheus["command"] if "=" in arg)
    config_path = host_path(prometheus, flags["--config.file"])
    assert config_path == PROMETHEUS_CONFIG.resolve()
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    container_dir = PurePosixPath(flags["--config.file"]).parent
    for rule_file in config["rule_files"]:
        in_container = container_dir / rule_file
        on_host = host_path(prometheus, str(in_container))
        assert on_host is not None and on_host.is_file(), f"{in_container} is not mounted"
        assert on_host == (PROMETHEUS_CONFIG.parent / rule_file).resolve(), (
            "promtool check config (on the host) must read the same file as Prometheus")
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "coordinator"  # the rules select up{job="coordinator"}
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"{name}:{MONITORING_PORT}" for name in COORDINATORS]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    grafana = services()["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning is not None and provisioning.is_dir()
    datasources = [ds for f in sorted((provisioning / "datasources").glob("*.y*ml"))
                   for ds in yaml.safe_load(f.read_text())["datasources"]]
    assert len(datasources) == 1
    (prometheus,) = datasources
    url = urlparse(prometheus["url"])
    assert url.hostname in services() and url.hostname == "prometheus"
    assert url.port == PROMETHEUS_PORT
    assert any(p.endswith(f":{PROMETHEUS_PORT}") for p in services()["prometheus"]["ports"])

    providers = [p for f in sorted((provisioning / "dashboards").glob("*.y*ml"))
                 for p in yaml.safe_load(f.read_text())["providers"]]
    assert providers
    for provider in providers:
        folder = host_path(grafana, provider["options"]["path"])
        assert folder is not None and folder.is_dir(), provider["options"]["path"]
        assert (folder / DASHBOARD.name).resolve() == DASHBOARD.resolve()
    home = host_path(grafana, environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home == DASHBOARD.resolve()

    dashboard = json.loads(DASHBOARD.read_text())
    uids = {json.dumps(ds) for ds in _datasources(dashboard)}
    assert uids == {json.dumps({"type": "prometheus", "uid": prometheus["uid"]})}, uids


def _datasources(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            else:
                yield from _datasources(value)
    elif isinstance(node, list):
        for item in node:
            yield from _datasources(item)


# --- Dockerfile -----------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_small_non_root_with_healthcheck() -> None:
    instructions = dockerfile_instructions()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) >= 2 and all("slim" in f for f in froms), froms
    stage = dict(final_stage())  # last instruction of each kind
    user = stage["USER"]
    assert user not in ("root", "0") and not user.startswith("0:"), user
    assert exec_form(stage["ENTRYPOINT"]) == ENTRYPOINT
    assert exec_form(stage["CMD"]) == ["run"]
    parse_cli("Dockerfile CMD", exec_form(stage["CMD"]))
    health = stage["HEALTHCHECK"]
    argv = exec_form(health[health.index("CMD") + 3:].strip())
    assert argv[:1] == ENTRYPOINT
    parse_cli("Dockerfile HEALTHCHECK", argv[1:])
    assert stage["EXPOSE"] == str(MONITORING_PORT)
    env = image_env()
    assert env["COORDINATOR_MONITORING_HOST"] == "0.0.0.0"
    assert image_file(env[CONFIG_ENV]) == ROOT / "config" / "coordinator.yaml"
    # The runtime stage gets the built virtualenv, never the build's sources or wheels.
    copies = [rest for word, rest in final_stage() if word == "COPY"]
    assert any(c.startswith("--from=build ") for c in copies)
    assert [c for c in copies if not c.startswith("--from")] == ["config /app/config"]


def test_dockerfile_copies_only_what_the_dockerignore_lets_through() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "start from nothing, then let through what the image needs"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = [source for word, rest in dockerfile_instructions() if word == "COPY"
               and not rest.startswith("--") for source in rest.split()[:-1]]
    assert "config" in sources and "coordinator_agent" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") in allowed, f"COPY {source} is kept out by {DOCKERIGNORE.name}"
    assert not {"var", ".venv", "tests"} & allowed


def test_check_wheel_reports_package_files_missing_from_a_wheel(tmp_path: Path) -> None:
    package = tmp_path / "src" / "pkg"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "routing.yaml").write_text("a: 1\n")
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"")
    wheel = tmp_path / "pkg-1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/__init__.py", "")
    result = subprocess.run([sys.executable, str(CHECK_WHEEL), str(wheel), str(package)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "pkg/data/routing.yaml" in result.stderr and "package-data" in result.stderr
    assert "__pycache__" not in result.stderr
    with zipfile.ZipFile(wheel, "a") as archive:
        archive.writestr("pkg/data/routing.yaml", "a: 1\n")
    result = subprocess.run([sys.executable, str(CHECK_WHEEL), str(wheel), str(package)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_the_image_wheel_holds_all_package_files(tmp_path: Path) -> None:
    """The Dockerfile's build stage, without Docker: the same files, `pip wheel`, the check."""
    src = tmp_path / "src"
    src.mkdir()
    instructions = dockerfile_instructions()
    second_from = [i for i, (word, _) in enumerate(instructions) if word == "FROM"][1]
    for word, rest in instructions[:second_from]:
        if word != "COPY":
            continue
        *sources, _ = rest.split()
        for source in sources:
            if source.startswith("deploy/"):
                continue  # the checker, run below from the repository
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, src / source,
                                ignore=shutil.ignore_patterns("__pycache__", "*.py[co]"))
            else:
                shutil.copy(ROOT / source, src / source)
    assert (src / "pyproject.toml").is_file() and (src / "coordinator_agent").is_dir()
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
         str(src)], capture_output=True, text=True, timeout=110, check=False)
    assert build.returncode == 0, "pip wheel failed (it needs PyPI for setuptools):\n" + (
        build.stdout + build.stderr)[-3000:]
    (wheel,) = (tmp_path / "dist").glob("coordinator_agent-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = set(archive.namelist())
    package = src / "coordinator_agent"
    data = [p.relative_to(src).as_posix() for p in package.glob("routing/data/*")]
    assert set(data) <= packaged, f"package data missing from the wheel: {set(data) - packaged}"
    check = subprocess.run(
        [sys.executable, str(CHECK_WHEEL), str(wheel), str(src / "coordinator_agent")],
        capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


# --- the image's commands, run directly -----------------------------------------------------------


def coordinator_agent_bin() -> Path:
    path = Path(sys.executable).parent / "coordinator-agent"
    if not path.is_file():
        pytest.fail(f"{path} not found: install the package into this virtualenv "
                    "(`make install`)", pytrace=False)
    return path


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(coordinator_agent_bin()), *args], capture_output=True, text=True, timeout=60,
        check=False, env=clean_env(COORDINATOR_CONFIG=str(ROOT / "config" / "coordinator.yaml"),
                                   **env))


def test_entry_command_and_its_help_run() -> None:
    for args in ([], ["check"], ["run"], ["worker"]):
        result = run_cli(*args, "--help")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: coordinator-agent {' '.join(args)}".rstrip())
    assert "--config-only" in run_cli("check", "--help").stdout


def test_healthcheck_fails_cleanly_when_nothing_listens(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the check runs
    result = run_cli("check", "--url", f"http://127.0.0.1:{port}")
    assert result.returncode == 1, result.stdout + result.stderr  # Docker: 1 = unhealthy
    assert "not ready" in result.stdout and "Traceback" not in result.stderr

    keyring = tmp_path / "agent.json"
    made = run_cli("keys", "generate", "--principal", "agent-1", "--role", "agent",
                   COORDINATOR_KEYRING_PATH=str(keyring))
    assert made.returncode == 0, made.stderr
    ok = run_cli("check", "--config-only", COORDINATOR_KEYRING_PATH=str(keyring))
    assert ok.returncode == 0, ok.stderr  # configuration and keyring valid
    missing = run_cli("check", "--config-only",
                      COORDINATOR_KEYRING_PATH=str(tmp_path / "absent.json"))
    assert missing.returncode != 0 and "absent.json" in missing.stderr


# --- Kubernetes -----------------------------------------------------------------------------------


def test_k8s_manifests_parse_and_reference_existing_objects() -> None:
    docs = list(k8s_documents())
    assert {doc["kind"] for _, doc in docs} >= {
        "Deployment", "StatefulSet", "PodDisruptionBudget", "Service", "ConfigMap", "Secret",
        "Kustomization"}
    kustomization = next(doc for path, doc in docs if doc["kind"] == "Kustomization")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert "secret-template.yaml" not in kustomization["resources"], "placeholders, not Secrets"
    assert {path.name for path, _ in docs} - {"secret-template.yaml", "kustomization.yaml"} \
        == set(kustomization["resources"])

    configmaps, secrets = k8s_objects("ConfigMap"), k8s_objects("Secret")
    claims = k8s_objects("PersistentVolumeClaim")
    for name, deployment in k8s_workloads().items():
        spec = deployment["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), name
        if deployment["kind"] == "Deployment":
            assert spec["replicas"] == 1, f"{name}: one pod per principal"
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        volumes = {v["name"]: v for v in pod["volumes"]}
        for template in spec.get("volumeClaimTemplates", []):  # a volume per pod
            volumes[template["metadata"]["name"]] = {"claimTemplate": template}
        for container in pod["containers"]:
            for mount in container["volumeMounts"]:
                assert mount["name"] in volumes, (name, mount)
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], (name, ref)
        for volume in volumes.values():
            if "configMap" in volume:
                data = configmaps[volume["configMap"]["name"]]["data"]
                assert all(i["key"] in data for i in volume["configMap"].get("items", []))
            if "secret" in volume:
                data = secrets[volume["secret"]["secretName"]]["stringData"]
                assert all(i["key"] in data for i in volume["secret"].get("items", [])), name
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims

    services = k8s_objects("Service")
    coordinator = k8s_objects("StatefulSet")["coordinator"]
    coordinator_labels = coordinator["spec"]["template"]["metadata"]["labels"]
    assert services["coordinator"]["spec"]["selector"].items() <= coordinator_labels.items()
    governing = services[coordinator["spec"]["serviceName"]]
    assert governing["spec"]["clusterIP"] == "None", "a StatefulSet's Service is headless"
    assert governing["spec"]["selector"].items() <= coordinator_labels.items()


def test_k8s_commands_and_env_are_real(
    monkeypatch: pytest.MonkeyPatch, no_coordinator_env: None, tmp_path: Path
) -> None:
    config = tmp_path / "coordinator.yaml"
    config.write_text(configmap_text("coordinator-config", "coordinator.yaml"))
    kinds = set()
    for name, pod, container in k8s_containers():
        assert "command" not in container, f"{name}: keep the image's ENTRYPOINT"
        args = parse_cli(f"deploy/k8s {name}", container["args"])
        env = {**image_env(), **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
        for key in [e["name"] for e in container["env"]]:
            assert_real_env_name(f"deploy/k8s {name}", key)
        env = {k: v for k, v in env.items() if k.startswith("COORDINATOR_")}
        mounted = {PurePosixPath(m["mountPath"]): m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        config_in_pod = PurePosixPath(env[CONFIG_ENV])
        config_volume = volumes[mounted[config_in_pod.parent]["name"]]["configMap"]
        assert config_in_pod.name in [i["path"] for i in config_volume["items"]]
        env[CONFIG_ENV] = str(config)
        settings = settings_with(monkeypatch, env)
        assert settings.registry_url == "http://consul:8500", name
        keyring = PurePosixPath(str(settings.keyring_path))
        key_volume = volumes[mounted[keyring.parent]["name"]]["secret"]
        items = {i["path"]: i["key"] for i in key_volume["items"]}
        if args.command == "worker":
            kinds.add(args.kind)
            assert items == {keyring.name: f"{args.id}.json"}, f"{name}: only its own key"
        else:
            assert args.command == "run"
            assert items == {keyring.name: "keyring.json"}
            assert settings.monitoring_host == "0.0.0.0"
            assert PurePosixPath(str(settings.data_dir)) in mounted
    assert kinds == AGENT_KINDS


def _flat_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _flat_keys(value, f"{prefix}{key}.")
    return keys


def test_k8s_configmap_keeps_up_with_config_file() -> None:
    repo = _flat_keys(yaml.safe_load((ROOT / "config" / "coordinator.yaml").read_text()))
    cluster = _flat_keys(yaml.safe_load(configmap_text("coordinator-config", "coordinator.yaml")))
    from_env = {"broker_url", "registry_url"}  # a Secret and the Deployments' env
    missing = repo - from_env - cluster
    assert not missing, (f"config/coordinator.yaml has {sorted(missing)}: mirror them in "
                         "deploy/k8s/configmap.yaml")


def _port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(found)


def test_ports_and_probes_agree() -> None:
    assert Settings.model_fields["monitoring_port"].default == MONITORING_PORT
    config = yaml.safe_load((ROOT / "config" / "coordinator.yaml").read_text())
    assert config["monitoring_port"] == MONITORING_PORT
    assert yaml.safe_load(configmap_text("coordinator-config", "coordinator.yaml"))[
        "monitoring_port"] == MONITORING_PORT
    coordinator = services()["coordinator"]
    assert [p.rsplit(":", 1)[1] for p in coordinator["ports"]] == [str(MONITORING_PORT)]
    assert environment(coordinator)["COORDINATOR_MONITORING_PORT"] == str(MONITORING_PORT)

    (deployment,) = [d for d in k8s_workloads().values()
                     if d["spec"]["template"]["spec"]["containers"][0]["args"] == ["run"]]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert [p["containerPort"] for p in container["ports"]] == [MONITORING_PORT]
    probes = {kind: container[kind]["httpGet"] for kind in
              ("livenessProbe", "readinessProbe", "startupProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["startupProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert _port(container, probe["port"]) == MONITORING_PORT
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(MONITORING_PORT)

    for service in k8s_objects("Service").values():
        for port in service["spec"]["ports"]:
            assert port["port"] == MONITORING_PORT
            assert _port(container, port["targetPort"]) == MONITORING_PORT
    service = k8s_objects("Service")["coordinator"]
    advertise = next(e["value"] for e in container["env"]
                     if e["name"] == "COORDINATOR_REGISTRY__ADVERTISE_URL")
    assert urlparse(advertise).hostname == service["metadata"]["name"]
    assert urlparse(advertise).port == MONITORING_PORT
    assert urlparse(advertise).path == probes["livenessProbe"]["path"]


def test_k8s_secret_template_holds_no_key_and_the_readme_says_how() -> None:
    template = (K8S / "secret-template.yaml").read_text()
    assert not FERNET_KEY.search(template), "a real key in the template"
    for secret in k8s_objects("Secret").values():
        for key, value in secret["stringData"].items():
            assert value.startswith("<") and value.endswith(">"), (key, value)
    for path in [COMPOSE, *ROOT.joinpath("deploy").rglob("*")]:
        if path.is_file():
            assert not FERNET_KEY.search(path.read_text(errors="replace")), path

    readme = (K8S / "README.md").read_text()
    commands = [argv for block in re.findall(r"```sh\n(.*?)```", readme, re.S)
                for argv in shell_invocations(block)]
    used = {tuple(argv[:2]) for argv in commands}
    assert {("keys", "generate"), ("keys", "export")} <= used, used
    for argv in commands:
        parse_cli("deploy/k8s/README.md", argv)
    for secret in k8s_objects("Secret"):
        assert f"kubectl create secret generic {secret}" in readme, secret


def test_k8s_keyring_secrets_are_mounted_with_a_mode_the_keyring_accepts() -> None:
    """Keyrings others can read are refused (keyring.TOO_OPEN); the Secrets must not be."""
    from coordinator_agent.wire.keyring import TOO_OPEN

    checked = 0
    for path, doc in k8s_documents():
        if doc.get("kind") not in ("Deployment", "StatefulSet"):
            continue
        for volume in doc["spec"]["template"]["spec"].get("volumes", []):
            secret = volume.get("secret")
            if secret is None:
                continue
            mode = secret.get("defaultMode", 0o644)  # Kubernetes' default
            assert not mode & TOO_OPEN, (
                f"{path.name}: Secret {secret['secretName']} mounted {mode:04o}; "
                "the keyring refuses it")
            checked += 1
    assert checked >= 5  # the coordinator and four agents


# --- high availability (docs/HA.md) --------------------------------------------------------------


def test_k8s_runs_two_coordinator_replicas_with_ha_and_a_disruption_budget(
    monkeypatch: pytest.MonkeyPatch, no_coordinator_env: None, tmp_path: Path
) -> None:
    coordinator = k8s_objects("StatefulSet")["coordinator"]
    spec = coordinator["spec"]
    assert spec["replicas"] == 2
    assert spec["updateStrategy"]["type"] == "RollingUpdate", "one pod at a time, never both"
    # Each replica its own store: a claim template, never one ReadWriteOnce claim for both.
    (claim,) = spec["volumeClaimTemplates"]
    (container,) = spec["template"]["spec"]["containers"]
    assert claim["metadata"]["name"] in {m["name"] for m in container["volumeMounts"]}
    assert not any("persistentVolumeClaim" in v for v in spec["template"]["spec"]["volumes"])
    labels = spec["template"]["metadata"]["labels"]
    terms = spec["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
               for t in terms), "replicas should land on different nodes"

    (budget,) = k8s_objects("PodDisruptionBudget").values()
    assert budget["apiVersion"] == "policy/v1"
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    agent_labels = [d["spec"]["template"]["metadata"]["labels"]
                    for d in k8s_objects("Deployment").values()]
    assert not any(budget["spec"]["selector"]["matchLabels"].items() <= al.items()
                   for al in agent_labels), "the budget is the coordinator's alone"

    config = tmp_path / "coordinator.yaml"
    config.write_text(configmap_text("coordinator-config", "coordinator.yaml"))
    env = {**image_env(), **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
    env = {k: v for k, v in env.items() if k.startswith("COORDINATOR_")}
    env[CONFIG_ENV] = str(config)
    settings = settings_with(monkeypatch, env)
    assert settings.ha.enabled and settings.registry_url
    # The readiness probe must let a standby be Ready (it serves reads, forwards submissions);
    # /readyz answers 200 for a healthy standby (docs/HA.md, "Kubernetes").
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_compose_runs_two_coordinators_with_ha_on_a_short_lease_consul(
    monkeypatch: pytest.MonkeyPatch, no_coordinator_env: None
) -> None:
    svcs = services()
    ports, volumes = set(), set()
    for name in COORDINATORS:
        service = svcs[name]
        assert service["command"] == ["run"]
        assert environment(service)["COORDINATOR_HA__ENABLED"] == "true"
        ports |= {p.rsplit(":", 2)[1] for p in service["ports"]}
        data = [source for source, target, _ in mounts(service) if target == "/data"]
        volumes |= set(data)
        for dependency in ("rabbitmq", "consul", "keys"):
            assert dependency in service["depends_on"], (name, dependency)
    assert len(ports) == len(COORDINATORS), "each coordinator on its own host port"
    assert len(volumes) == len(COORDINATORS), "each coordinator with its own store"

    # Consul must accept the lease's short session TTL (half of lease_ttl_s).
    command = svcs["consul"]["command"]
    hcl = command[command.index("-hcl") + 1]
    match = re.fullmatch(r'session_ttl_min = "(\d+)s"', hcl)
    assert match, hcl
    ha = Settings.model_fields["ha"].default
    assert int(match.group(1)) <= ha.lease_ttl_s / 2
