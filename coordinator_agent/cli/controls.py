"""The operator's controls from the command line: priority of a submission, and the commands that
act on tasks already submitted (``cancel``, ``redirect``, and the escalation desk ``escalated``,
``retry``, ``resolve``, ``fail``), which call the coordinator's HTTP API with an operator token.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from coordinator_agent.cli.progress import format_table
from coordinator_agent.cli.reach import api_get, describe_error, monitoring_url, origin
from coordinator_agent.coordinator.scheduling import priority_band
from coordinator_agent.exceptions import ConfigError, CoordinatorError, UsageError
from coordinator_agent.settings import Settings
from coordinator_agent.wire.keyring import Keyring


def priority_option(value: str) -> str | int:
    """``--priority``: a name or a band, checked here so a typo never reaches the broker."""
    given: str | int = int(value) if value.strip().isdigit() else value.strip().lower()
    try:
        priority_band(given)
    except ValueError as exc:
        raise UsageError(f"--priority: {exc}") from None
    return given


def add_control_commands(sub: Any, common: argparse.ArgumentParser,
                         url_option: Callable[[Any], None]) -> None:
    """``cancel``, ``redirect``, ``escalated``, ``retry``, ``resolve`` and ``fail``."""

    def command(name: str, text: str, *, task: bool = True) -> argparse.ArgumentParser:
        cmd: argparse.ArgumentParser = sub.add_parser(name, parents=[common], help=text)
        url_option(cmd)
        cmd.add_argument("--principal", default=os.environ.get("COORDINATOR_PRINCIPAL"),
                         help="operator id in the keyring [COORDINATOR_PRINCIPAL]; default: "
                         "the only operator")
        if task:
            cmd.add_argument("task_id", metavar="ID", help="the task")
        return cmd

    cancel = command("cancel", "cancel a task (a workflow with all its children)")
    cancel.add_argument("--reason", default=os.environ.get("COORDINATOR_CANCEL_REASON", ""),
                        help="recorded with the task [COORDINATOR_CANCEL_REASON]")
    redirect = command("redirect", "send a pending or running task to another kind of agent")
    _option(redirect, "--kind", "COORDINATOR_REDIRECT_KIND", "the agent kind to send it to",
            required=True)
    command("escalated", "tasks waiting at the escalation desk", task=False)
    retry = command("retry", "retry an escalated task, on a chosen kind or agent")
    _option(retry, "--kind", "COORDINATOR_RETRY_KIND", "run it on this kind")
    _option(retry, "--agent", "COORDINATOR_RETRY_AGENT", "run it on this agent")
    resolve = command("resolve", "resolve an escalated task by hand with an output")
    _option(resolve, "--output", "COORDINATOR_RESOLVE_OUTPUT", "the task's output as JSON (a "
            "bare word is taken as a string)", required=True)
    fail = command("fail", "fail an escalated task with a reason")
    _option(fail, "--reason", "COORDINATOR_FAIL_REASON", "why (kept with the task)",
            required=True)


def _option(cmd: argparse.ArgumentParser, flag: str, variable: str, text: str, *,
            required: bool = False) -> None:
    default = os.environ.get(variable)
    cmd.add_argument(flag, default=default, required=required and default is None,
                     help=f"{text} [{variable}]")


def _operator_token(args: argparse.Namespace, settings: Settings) -> str:
    keyring = Keyring.load(settings.keyring_path)
    wanted = args.principal
    operators = [p for p in keyring.principals.values() if p.role == "operator"]
    chosen = [p for p in operators if p.id == wanted] if wanted else operators
    if len(chosen) != 1:
        raise ConfigError(f"no operator {wanted!r} in the keyring" if wanted else
                          "say which operator to act as with --principal (keyring has "
                          f"{len(operators)} operators)")
    if chosen[0].api_token is None:
        raise ConfigError(f"operator {chosen[0].id} has no API token in the keyring")
    return chosen[0].api_token.get_secret_value()


def api_post(base: str, path: str, token: str, body: Mapping[str, Any]) -> Any:
    """A POST to the operator API; a refusal becomes a CoordinatorError with its reason."""
    request = urllib.request.Request(  # noqa: S310 - http(s) only, checked by http_get's rules
        base + path, data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        raise ConfigError(f"{origin(base)} is not an http(s) URL — check --url / COORDINATOR_URL")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read() or b"{}").get("error")
        except ValueError:
            detail = None
        raise CoordinatorError(f"{path}: HTTP {exc.code}" + (f": {detail}" if detail else "")
                               ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise CoordinatorError(
            f"cannot reach the coordinator's monitoring API at {origin(base)} "
            f"({describe_error(exc)}) — is `coordinator-agent run` running?") from None


def _act(args: argparse.Namespace, settings: Settings, action: str,
         body: Mapping[str, Any]) -> int:
    token = _operator_token(args, settings)
    task_id = urllib.parse.quote(args.task_id, safe="")
    view = api_post(monitoring_url(args, settings), f"/api/tasks/{task_id}/{action}", token, body)
    if args.json:
        print(json.dumps(view))
    else:
        print(f"{view.get('id')}: {view.get('status')}"
              + (f" (kind {view['kind']})" if view.get("kind") else ""))
    return 0


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    return _act(args, settings, "cancel", {"reason": args.reason or ""})


def cmd_redirect(args: argparse.Namespace, settings: Settings) -> int:
    return _act(args, settings, "redirect", {"kind": args.kind})


def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    body = {k: v for k, v in (("kind", args.kind), ("agent_id", args.agent)) if v}
    return _act(args, settings, "retry", body)


def cmd_resolve(args: argparse.Namespace, settings: Settings) -> int:
    try:
        output = json.loads(args.output)
    except json.JSONDecodeError:
        output = args.output  # `--output done` reads as the string "done"
    return _act(args, settings, "resolve", {"output": output})


def cmd_fail(args: argparse.Namespace, settings: Settings) -> int:
    return _act(args, settings, "fail", {"reason": args.reason})


def cmd_escalated(args: argparse.Namespace, settings: Settings) -> int:
    tasks = api_get(monitoring_url(args, settings), "/api/escalations")["tasks"]
    if args.json:
        print(json.dumps(tasks))
        return 0
    now = time.time()
    rows = [(t["id"], t.get("kind") or (t.get("routing") or {}).get("kind") or "-",
             len(t.get("attempts") or []), f"{now - float(t['updated_at']):.0f}s",
             str(t.get("error") or "")[:60]) for t in tasks]
    print(format_table(("TASK", "KIND", "ATTEMPTS", "WAITING", "WHY"), rows,
                       right=("ATTEMPTS", "WAITING"), empty="(no task is waiting at the desk)"))
    return 0


CONTROL_COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "cancel": cmd_cancel,
    "redirect": cmd_redirect,
    "escalated": cmd_escalated,
    "retry": cmd_retry,
    "resolve": cmd_resolve,
    "fail": cmd_fail,
}
