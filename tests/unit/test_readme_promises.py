"""What the README promises a newcomer, checked against the Makefile, the scripts and the CLI."""

from __future__ import annotations

import re
from pathlib import Path

from coordinator_agent.cli import main as cli
from coordinator_agent.ops.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def session() -> str:
    block = README.split("## A ten-line session", 1)[1].split("```sh\n", 1)[1]
    return block.split("```", 1)[0]


def test_make_test_installs_promtool_and_chromium_and_the_readme_says_so() -> None:
    makefile = (ROOT / "Makefile").read_text()
    target = re.search(r"^test:(.*)$", makefile, re.MULTILINE)
    assert target is not None and "tools" in target.group(1).split()
    assert "scripts/tools.sh all" in makefile
    tools = (ROOT / "scripts" / "tools.sh").read_text()
    assert "apt_install promtool prometheus" in tools and "apt_install chromium chromium" in tools
    first_screen = README.split("## A ten-line session", 1)[0]
    assert "`promtool` and `chromium`" in first_screen and "apt-get" in first_screen


def test_the_session_uses_ids_of_its_own_and_says_why() -> None:
    lines = [line for line in session().splitlines() if line.strip()]
    assert len(lines) <= 10
    assert lines[0].startswith('me="$(id -un)-$RANDOM"')
    for line in lines:
        for option in ("--principal", "--id"):
            if option in line:
                assert f'{option} "$me-' in line, line
    assert "ids are global in Consul" in lines[0]
    assert "replace each other's registration" in README


def test_every_command_of_the_cli_is_in_the_readme_table() -> None:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert commands is not None
    for name in commands:
        assert re.search(rf"^\| `{name}[ `]", README, re.MULTILINE), f"{name} is not in README"


def test_every_metric_is_documented_in_operations() -> None:
    operations = (ROOT / "docs" / "OPERATIONS.md").read_text()
    for metric in Metrics().registry.collect():
        assert f"`{metric.name}" in operations, metric.name
