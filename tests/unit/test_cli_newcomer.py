"""The rough edges a newcomer found in the command line: each refused early, in one line."""

from __future__ import annotations

import argparse
import re
import stat
from pathlib import Path

import pytest

from coordinator_agent.cli import main as cli
from coordinator_agent.settings import OTHER_VARIABLES, Settings
from coordinator_agent.wire.keyring import Keyring


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse refuses a bad option value this way
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("option", "value"), [
    ("--timeout", "-1"), ("--timeout", "0"), ("--wait-timeout", "-5"), ("--wait-timeout", "0"),
    ("--timeout", "nan"), ("--wait-timeout", "inf"), ("--timeout", "soon"),
])
def test_submit_refuses_timeouts_that_cannot_work(
    option: str, value: str, clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "submit", "hello", "--wait", f"{option}={value}")
    assert code == 2 and out == ""
    assert f"argument {option}: " in err
    assert "Traceback" not in err and "pydantic" not in err


def test_submit_timeout_over_the_protocols_maximum_is_an_invalid_task_not_a_config_error(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "submit", "hello", "--timeout", "100000")
    assert code == 2 and out == ""
    assert err.startswith("coordinator-agent: invalid task: timeout_s: ")
    assert "configuration error" not in err and "Traceback" not in err


def test_invalid_task_specs_are_not_labelled_configuration_errors(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "submit", "x", "--spec", '{"on_subtask_error": "bogus"}')
    assert code == 2
    assert err.startswith("coordinator-agent: invalid task: on_subtask_error")
    assert "configuration error" not in err
    code, _, err = run(capsys, "submit", "x", "--input", "{oops")
    assert (code, err.startswith("coordinator-agent: --input is not valid JSON")) == (2, True)


def test_demo_needs_at_least_one_agent(clean_env: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    code, _, err = run(capsys, "demo", "--agents", "0")
    assert code == 2
    assert "argument --agents: must be at least 1, not 0" in err


def test_keys_generate_refuses_a_name_no_queue_can_carry(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = clean_env / "keyring.json"
    code, _, err = run(capsys, "keys", "generate", "--principal", "bad name!", "--role", "agent",
                       "--keyring", str(path))
    assert code == 2
    assert "principal id 'bad name!' is not allowed" in err
    assert not path.exists(), "nothing is written for a refused name"


def test_keys_generate_writes_a_private_file_that_loads(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = clean_env / "keyring.json"
    assert run(capsys, "keys", "generate", "--principal", "w-1", "--role", "agent",
               "--keyring", str(path))[0] == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert run(capsys, "check", "--config-only", "--keyring", str(path))[0] == 0


def test_a_keyring_open_to_others_stops_every_command_with_the_chmod(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = clean_env / "keyring.json"
    ring = Keyring()
    ring.generate("w-1", "agent")
    ring.save(path)
    path.chmod(0o644)
    code, _, err = run(capsys, "check", "--config-only", "--keyring", str(path))
    assert code == 2
    assert f"run `chmod 600 {path}`" in err and "Traceback" not in err


def test_an_operator_cannot_run_as_a_worker(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = clean_env / "keyring.json"
    ring = Keyring()
    ring.generate("alice", "operator")
    ring.save(path)
    # A broker URL nothing listens on: the refusal must come before any connection attempt.
    code, out, err = run(capsys, "worker", "--id", "alice", "--keyring", str(path),
                         "--broker-url", "amqp://guest:guest@127.0.0.1:1/")
    assert code == 2 and out == ""
    assert "'alice' is an operator" in err and "not an agent" in err
    assert "started" not in err
    code, _, err = run(capsys, "worker", "--id", "nobody", "--keyring", str(path))
    assert code == 2 and "'nobody' is not in the keyring" in err


def test_config_flag_naming_a_missing_file_says_so_without_blaming_the_variable(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "check", "--config-only", "--config", "missing.yaml")
    assert code == 2
    assert err.strip() == ("coordinator-agent: configuration error: config file missing.yaml "
                           "(named by --config) does not exist")


def test_a_misspelt_variable_stops_the_command(
    clean_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COORDINATOR_BROKER_ULR", "amqp://elsewhere/")
    code, _, err = run(capsys, "check", "--config-only")
    assert code == 2
    assert "unknown environment variable COORDINATOR_BROKER_ULR" in err
    assert "did you mean COORDINATOR_BROKER_URL?" in err


def test_check_config_only_says_which_file_it_read(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keyring = clean_env / "keyring.json"
    Keyring().save(keyring)
    code, out, _ = run(capsys, "check", "--config-only", "--keyring", str(keyring))
    assert code == 0
    assert out.startswith("no config file (config/coordinator.yaml not found in ")
    (clean_env / "mine.yaml").write_text("name: mine\n")
    code, out, _ = run(capsys, "check", "--config-only", "--keyring", str(keyring),
                       "--config", "mine.yaml")
    assert out.startswith(f"configuration from {clean_env / 'mine.yaml'}")


def test_every_cli_variable_is_known_to_the_settings_check() -> None:
    """OTHER_VARIABLES and the options' help texts name the same variables, settings aside."""
    parser = cli.build_parser()
    helps: list[str] = []

    def collect(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            helps.append(action.help or "")
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    collect(sub)

    collect(parser)
    named = set(re.findall(r"\[(COORDINATOR_[A-Z0-9_]+)", "\n".join(helps)))
    settings = {f"COORDINATOR_{name.upper()}" for name in Settings.model_fields}
    assert named - settings == OTHER_VARIABLES


def test_the_sdk_refuses_an_operator_key_for_an_agent_too(clean_env: Path) -> None:
    from coordinator_agent.agent.examples import example_handler
    from coordinator_agent.agent.worker import WorkerAgent
    from coordinator_agent.exceptions import ConfigError
    from coordinator_agent.settings import load_settings

    ring = Keyring()
    ring.generate("alice", "operator")
    with pytest.raises(ConfigError, match="'alice' is an operator in the keyring, not an agent"):
        WorkerAgent("alice", "general", example_handler, settings=load_settings(), keyring=ring)
