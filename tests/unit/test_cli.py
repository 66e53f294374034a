"""The command line people read: tables, the watch frame, progress, and errors that help."""

from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator_agent.cli import main as cli
from coordinator_agent.cli.progress import (
    Rates,
    Spinner,
    agents_table,
    clean,
    format_table,
    route_label,
    signals_label,
    status_summary,
    tasks_table,
    watch_frame,
    width,
)
from coordinator_agent.wire.keyring import Keyring

ANSI = re.compile(r"\x1b\[")
HOSTILE = "\x1b[2J\x1b[31mred\nsecond line\r\u202eevil <img src=x onerror=alert(1)>"


def agent(agent_id: str, **extra: Any) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": agent_id, "kind": "general", "capabilities": ["text"], "liveness": "healthy",
        "liveness_reason": "ok", "state": "ready", "max_concurrency": 4, "in_flight": 1,
        "load": 0.372, "last_seen_s": 0.42, "completed": 12, "failed": 1, "version": "0.1.0",
    }
    view.update(extra)
    return view


def task(task_id: str, **extra: Any) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": task_id, "description": "Count the words", "status": "succeeded",
        "attempts": [{"number": 1, "agent_id": "agent-1", "outcome": "succeeded"}],
        "routing": {"agent_id": "agent-1", "reason": "least_loaded", "candidates": 2},
        "updated_at": 1000.0, "progress": 1.0,
    }
    view.update(extra)
    return view


def column_starts(header: str) -> list[int]:
    return [m.start() for m in re.finditer(r"\S+", header)]


# --- tables ------------------------------------------------------------------------------------


def test_agents_table_is_aligned_and_says_what_each_agent_is_doing() -> None:
    agents = [
        agent("agent-1", signals={"amqp": {"heard": True, "last_seen_s": 0.4},
                                  "consul": "passing"}),
        agent("a-much-longer-agent-id", kind="planner", liveness="suspect",
              liveness_reason="missed_beats", load=1.0, in_flight=4, last_seen_s=7.5,
              signals={"amqp": {"heard": True, "last_seen_s": 7.5}, "consul": None}),
        agent("registered-only", liveness="registered", liveness_reason="not_heard",
              last_seen_s=None, load=0.0, in_flight=0,
              signals={"amqp": {"heard": False, "last_seen_s": None}, "consul": "critical"}),
        agent("old-coordinator"),  # no "signals" at all: an older coordinator
    ]
    lines = agents_table(agents).splitlines()
    assert lines[0].split() == ["ID", "KIND", "LIVENESS", "SIGNALS", "LOAD", "IN-FLIGHT",
                                "LAST", "SEEN", "DONE/FAILED"]
    assert len(lines) == 1 + len(agents)
    # Every row puts its kind where the KIND heading is: the columns line up.
    kind_at = lines[0].index("KIND")
    for line, a in zip(lines[1:], agents, strict=True):
        assert line[kind_at:].startswith(a["kind"]), line
    row = dict(zip([a["id"] for a in agents], lines[1:], strict=True))
    assert "amqp+consul" in row["agent-1"] and "37%" in row["agent-1"]
    assert "1/4" in row["agent-1"] and "12/1" in row["agent-1"] and "0.4s ago" in row["agent-1"]
    assert "suspect (missed_beats)" in row["a-much-longer-agent-id"]
    assert " amqp " in row["a-much-longer-agent-id"] and "100%" in row["a-much-longer-agent-id"]
    assert "consul:critical" in row["registered-only"] and "never" in row["registered-only"]
    assert "amqp" not in row["registered-only"]
    assert re.search(r"healthy\s+-\s", row["old-coordinator"])
    # Right-aligned numbers end in the same column.
    ends = {line.rstrip().__len__() for line in lines}
    assert len(ends) == 1


@pytest.mark.parametrize(("signals", "label"), [
    ({"amqp": {"heard": True}, "consul": "passing"}, "amqp+consul"),
    ({"amqp": {"heard": True}, "consul": None}, "amqp"),
    ({"amqp": {"heard": False}, "consul": "passing"}, "consul"),
    ({"amqp": {"heard": True}, "consul": "warning"}, "amqp+consul:warning"),
    ({"amqp": {"heard": False}, "consul": "absent"}, "consul:absent"),
    ({"amqp": None, "consul": None}, "-"),
    ("not a mapping", "-"),
])
def test_signals_label(signals: Any, label: str) -> None:
    assert signals_label({"signals": signals}) == label


def test_empty_tables_say_what_to_do() -> None:
    assert "coordinator-agent worker" in agents_table([])
    assert "coordinator-agent submit" in tasks_table([], now=0)
    assert format_table(["a", "b"], []) == "A  B\n(none)"


def test_hostile_strings_cannot_move_the_cursor_or_break_rows() -> None:
    table = agents_table([agent(HOSTILE, kind=HOSTILE), agent("agent-2")])
    tasks = tasks_table([task("t-1", description=HOSTILE, error=HOSTILE,
                              routing={"agent_id": HOSTILE, "reason": HOSTILE})], now=1001)
    for text in (table, tasks):
        assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
        assert "\\x1b[2J" in text  # shown, visibly, for what it is
    assert len(table.splitlines()) == 3 and len(tasks.splitlines()) == 2
    assert clean(HOSTILE).count("\\n") == 1 and "\\u202e" in clean(HOSTILE)
    assert clean(None) == "-" and clean("plain text") == "plain text"


def test_wide_characters_keep_columns_aligned() -> None:
    assert width("日本語") == 6 and width("e\u0301") == 1
    lines = format_table(["name", "n"], [["日本語", 1], ["abc", 22]], right=["n"]).splitlines()
    assert [width(line) for line in lines] == [width(lines[0])] * 3


def test_tasks_table_shows_status_route_and_a_cut_description() -> None:
    rows = [
        task("0123456789abcdef0123456789abcdef", description="x" * 300, updated_at=990.0),
        task("t-2", status="running", progress=0.5, attempts=[], routing={}),
        task("t-3", status="failed", routing={"kind": "general", "agent": "agent-2",
                                             "confidence": 0.8234, "fallback": True,
                                             "reason": "best_kind"}),
    ]
    lines = tasks_table(rows, now=1000.0, max_line=120).splitlines()
    assert all(width(line) <= 120 for line in lines)
    assert lines[1].startswith("0123456789abcdef0123456789abcdef  succeeded")
    assert "agent-1 (least_loaded)" in lines[1] and "10s ago" in lines[1]
    assert lines[1].endswith("…")
    assert "running 50%" in lines[2] and re.search(r"running 50%\s+-\s+0\s", lines[2])
    assert "agent-2 (general, conf 0.82, fallback)" in lines[3]


def test_route_label_variants() -> None:
    assert route_label(None) == "-" and route_label({}) == "-"
    assert route_label({"agent_id": None, "reason": "no_free_agent"}) == (
        "no agent (no_free_agent)")
    assert route_label({"agent_id": "a", "fallback": "general"}) == "a (fallback general)"
    planner_view = {"agent_id": "agent-1", "kind": "general", "confidence": 0.5712,
                    "fallback_used": True, "reason": "below the threshold", "threshold": 0.6}
    assert route_label(planner_view) == "agent-1 (general, conf 0.57, fallback)"
    assert route_label({**planner_view, "fallback_used": False}) == "agent-1 (general, conf 0.57)"


def test_status_summary_reads_like_a_report() -> None:
    status = {
        "name": "coord", "ready": False, "broker_connected": True, "uptime_s": 3725.2,
        "agents": {"healthy": 2, "suspect": 1, "dead": 0},
        "tasks_open": {"pending": 0, "assigned": 1, "running": 2},
        "totals": {"submitted": 10, "succeeded": 6, "failed": 2, "cancelled": 0},
        "registry": "disabled",
    }
    text = status_summary(status)
    lines = text.splitlines()
    assert lines[0] == "coordinator  coord · NOT READY · broker up · up 1h 02m"
    assert lines[1] == "agents       2 healthy · 1 suspect · 0 dead"
    assert lines[2] == "open tasks   1 assigned · 2 running"
    assert lines[3].endswith("0 cancelled (75.0% ok)")
    assert lines[4] == "registry     disabled"  # fields this version does not know yet
    assert not ANSI.search(text)
    coloured = status_summary(status, colour=True)
    assert "\x1b[31mNOT READY\x1b[0m" in coloured
    idle = status_summary({**status, "tasks_open": {"pending": 0}, "totals": {}})
    assert "open tasks   none" in idle and "% ok" not in idle


def test_status_summary_names_the_role_and_epoch() -> None:
    status = {"name": "coord", "ready": True, "broker_connected": True, "uptime_s": 5,
              "role": "standby", "epoch": 0}
    assert status_summary(status).splitlines()[0] == (
        "coordinator  coord · standby · ready · broker up · up 5s")
    leader = status_summary({**status, "role": "leader", "epoch": 41}).splitlines()[0]
    assert leader == "coordinator  coord · leader (epoch 41) · ready · broker up · up 5s"
    alone = status_summary({**status, "role": "leader", "epoch": 0}).splitlines()[0]
    assert alone == "coordinator  coord · ready · broker up · up 5s"  # HA off: as before


def test_rates_from_successive_totals() -> None:
    rates = Rates()
    assert rates.update({"submitted": 10, "succeeded": 5, "failed": 1}, at=100.0) is None
    second = rates.update({"submitted": 30, "succeeded": 20, "failed": 2, "cancelled": 2},
                          at=102.0)
    assert second == {"finished_per_s": 9.0, "submitted_per_s": 10.0}
    assert rates.update({"submitted": 0}, at=102.0) is None  # no time passed: no rate


def test_watch_frame_has_summary_agents_and_tasks() -> None:
    status = {"name": "coord", "ready": True, "broker_connected": True, "uptime_s": 5,
              "agents": {"healthy": 1}, "tasks_open": {}, "totals": {"submitted": 1}}
    frame = watch_frame(url="http://127.0.0.1:9464", interval=2, now=1000.0, status=status,
                        agents=[agent("agent-1")], tasks=[task("t-1")],
                        rates={"finished_per_s": 1.5, "submitted_per_s": 2.0})
    assert "every 2s" in frame and "1.5 tasks/s finished" in frame
    assert "AGENTS (1)" in frame and "agent-1" in frame
    assert "LATEST TASKS (1)" in frame and "t-1" in frame
    broken = watch_frame(url="http://127.0.0.1:9464", interval=2, now=1000.0, status=None,
                         agents=[], tasks=[], rates=None, error="cannot reach it")
    assert "! cannot reach it (retrying)" in broken and "AGENTS" not in broken


# --- progress ----------------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


def test_spinner_turns_on_a_terminal_and_leaves_one_line() -> None:
    stream = FakeTerminal()
    state = {"phase": "submitted"}
    with Spinner("task t-1", stream=stream, detail=lambda: state["phase"], interval=0.01) as s:
        time.sleep(0.08)
        state["phase"] = "accepted"
        time.sleep(0.08)
    output = stream.getvalue()
    assert s.drawn >= 3
    assert "⠋ waiting for task t-1 · submitted" in output and "· accepted" in output
    assert output.endswith("\r\x1b[Ktask t-1: done in " + output.rsplit("done in ", 1)[1])
    assert output.endswith("s\n")


def test_spinner_is_silent_off_a_terminal_and_on_errors() -> None:
    pipe = io.StringIO()
    with Spinner("task t-1", stream=pipe, interval=0.01):
        time.sleep(0.03)
    assert pipe.getvalue() == ""
    terminal = FakeTerminal()
    with pytest.raises(TimeoutError), Spinner("task t-1", stream=terminal, interval=0.01):
        raise TimeoutError
    assert terminal.getvalue().endswith("\r\x1b[K")  # the line is wiped; the error speaks


# --- the parser: every option from the environment ---------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for inner, subsub in _subparsers(sub):
                    yield f"{name} {inner}", subsub


def test_every_command_is_registered_and_every_option_names_its_variable() -> None:
    parser = cli.build_parser()
    commands = dict(_subparsers(parser))
    assert {"run", "worker", "submit", "status", "agents", "watch", "check", "keys", "demo",
            "keys token"} <= set(commands)
    assert set(cli.COMMANDS) == {name for name in commands if " " not in name}
    for name, sub in commands.items():
        for action in sub._actions:
            if not action.option_strings or action.dest in ("help",) or isinstance(
                    action, argparse._SubParsersAction):
                continue
            assert re.search(r"\[COORDINATOR_[A-Z_]+", action.help or ""), (
                f"`{name} {action.option_strings[0]}` names no environment variable")


def test_options_read_their_environment_variables(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COORDINATOR_WATCH_INTERVAL", "0.5")
    monkeypatch.setenv("COORDINATOR_WATCH_ONCE", "1")
    monkeypatch.setenv("COORDINATOR_WATCH_TASKS", "7")
    monkeypatch.setenv("COORDINATOR_JSON", "true")
    monkeypatch.setenv("COORDINATOR_URL", "http://127.0.0.1:1234")
    args = cli.build_parser().parse_args(["watch"])
    assert (args.interval, args.once, args.tasks, args.json, args.url) == (
        0.5, True, 7, True, "http://127.0.0.1:1234")
    monkeypatch.setenv("COORDINATOR_WATCH_ONCE", "0")
    monkeypatch.setenv("COORDINATOR_WAIT", "yes")
    monkeypatch.setenv("COORDINATOR_WAIT_TIMEOUT_S", "9")
    monkeypatch.setenv("COORDINATOR_KEYS_PRINCIPAL", "alice")
    assert cli.build_parser().parse_args(["watch"]).once is False
    submit = cli.build_parser().parse_args(["submit", "hello"])
    assert (submit.wait, submit.wait_timeout) == (True, 9.0)
    assert cli.build_parser().parse_args(["keys", "token"]).principal == "alice"


# --- errors that say what to do, without secrets -----------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_submit_without_a_broker_says_how_to_start_one_and_hides_the_password(
    tmp_path: Path,
) -> None:
    ring = Keyring()
    ring.generate("alice", "operator")
    ring.save(tmp_path / "keyring.json")
    (tmp_path / "config.yaml").write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
    env["COORDINATOR_CONFIG"] = str(tmp_path / "config.yaml")
    url = f"amqp://user:secret@127.0.0.1:{free_port()}/"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "coordinator_agent", "submit", "hello", "--broker-url", url,
         "--keyring", str(tmp_path / "keyring.json")],
        check=False, capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 1, result
    assert time.monotonic() - started < 30  # fails fast; no 15 s of retries
    assert "cannot reach RabbitMQ at amqp://user:******@127.0.0.1:" in result.stderr
    assert "(connection refused)" in result.stderr and "make services" in result.stderr
    assert "secret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["status"], ["agents"], ["watch", "--once"],
                                     ["agents", "--json"]])
def test_http_commands_without_a_coordinator_say_what_to_do(
    command: list[str], clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert cli.main([*command, "--url", url]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == (
        f"coordinator-agent: cannot reach the coordinator's monitoring API at {url} "
        "(connection refused) — is `coordinator-agent run` running? "
        "(--url or COORDINATOR_URL say where it listens)"
    )


def test_http_errors_mask_credentials_in_the_url(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status", "--url", f"http://ops:secret@127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err
    assert "ops:******@127.0.0.1" in err and "secret" not in err


class _HtmlHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html>not the API</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def html_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HtmlHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_a_url_that_is_not_the_api_is_named_as_such(
    html_server: str, clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["agents", "--url", html_server]) == 1
    err = capsys.readouterr().err
    assert f"{html_server} answered /api/agents with HTTP 200 but no JSON" in err
    assert "monitoring port" in err


def test_keys_token_has_json(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = clean_env / "keyring.json"
    assert cli.main(["keys", "generate", "--principal", "alice", "--role", "operator",
                     "--keyring", str(path), "--json"]) == 0
    capsys.readouterr()
    assert cli.main(["keys", "token", "--principal", "alice", "--keyring", str(path),
                     "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["principal"] == "alice" and len(data["token"]) > 20
