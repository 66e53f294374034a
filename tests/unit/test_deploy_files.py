"""No Docker engine runs in CI, so check what can be checked: the deployment files parse and
everything they name (commands, settings, files) exists in the code."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from coordinator_agent.cli import COMMANDS, build_parser
from coordinator_agent.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_compose_parses_and_uses_real_commands_and_settings() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"rabbitmq", "consul", "keys", "coordinator", "agent-1", "agent-2"} <= set(services)
    fields = set(Settings.model_fields)
    for name, service in services.items():
        for key in (service.get("environment") or {}):
            if key.startswith("COORDINATOR_"):
                assert key.removeprefix("COORDINATOR_").lower() in fields, (name, key)
        command = service.get("command")
        if isinstance(command, list) and name not in ("keys",):
            assert command[0] in COMMANDS, (name, command)
            build_parser().parse_args(command)


def test_dockerfile_references_existing_paths_and_commands() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    assert 'CMD ["run"]' in dockerfile and "check" in COMMANDS
    assert "USER coordinator" in dockerfile
