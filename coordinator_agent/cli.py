"""The ``coordinator-agent`` command: parse, build settings, ``asyncio.run``.

Every option also reads an environment variable (shown in ``--help``): settings use
``COORDINATOR_<FIELD>``; options of the CLI alone use the names listed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .exceptions import ConfigError, CoordinatorError
from .keyring import ROLES, Keyring
from .settings import CONFIG_ENV, Settings, load_settings

log = logging.getLogger("coordinator_agent")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coordinator-agent",
        description="A broker-based coordinator for fleets of worker agents.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help=f"YAML config file [{CONFIG_ENV}]")
    common.add_argument("--name", help="coordinator name [COORDINATOR_NAME]")
    common.add_argument("--broker-url", help="AMQP URL [COORDINATOR_BROKER_URL]")
    common.add_argument("--keyring", dest="keyring_path", help="keyring file "
                        "[COORDINATOR_KEYRING_PATH]")
    common.add_argument("--log-level", help="DEBUG, INFO, WARNING... [COORDINATOR_LOG_LEVEL]")
    common.add_argument("--monitoring-port", type=int,
                        help="HTTP port for metrics and API [COORDINATOR_MONITORING_PORT]")
    common.add_argument("--json", action="store_true",
                        default=_env("COORDINATOR_JSON", "") not in ("", "0"),
                        help="machine-readable output [COORDINATOR_JSON=1]")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", parents=[common], help="run the coordinator until SIGTERM/Ctrl-C")

    worker = sub.add_parser("worker", parents=[common], help="run an example agent")
    agent_id = _env("COORDINATOR_AGENT_ID")
    worker.add_argument("--id", default=agent_id, required=agent_id is None,
                        help="agent id [COORDINATOR_AGENT_ID]")
    worker.add_argument("--kind", default=_env("COORDINATOR_AGENT_KIND", "general"),
                        help="agent kind [COORDINATOR_AGENT_KIND]")
    worker.add_argument("--capabilities", default=_env("COORDINATOR_AGENT_CAPABILITIES", ""),
                        help="comma-separated [COORDINATOR_AGENT_CAPABILITIES]")
    worker.add_argument("--concurrency", type=int,
                        default=int(_env("COORDINATOR_AGENT_CONCURRENCY", "4") or 4),
                        help="tasks at once [COORDINATOR_AGENT_CONCURRENCY]")

    submit = sub.add_parser("submit", parents=[common], help="submit a task over AMQP")
    submit.add_argument("description")
    submit.add_argument("--kind", help="only agents of this kind")
    submit.add_argument("--capability", action="append", default=[],
                        help="required capability (repeatable)")
    submit.add_argument("--input", help="task input as JSON, e.g. '{\"op\": \"hash\"}'")
    submit.add_argument("--task-id", help="idempotency key (default: generated)")
    submit.add_argument("--timeout", type=float, help="seconds per attempt")
    submit.add_argument("--wait", action="store_true", help="wait for the result")
    submit.add_argument("--wait-timeout", type=float, default=120.0)
    _principal_option(submit)

    for name, text in (("status", "coordinator totals"), ("agents", "known agents")):
        cmd = sub.add_parser(name, parents=[common], help=text)
        _url_option(cmd)

    check = sub.add_parser("check", parents=[common],
                           help="probe: exit 0 if the coordinator is ready (or config is valid)")
    _url_option(check)
    check.add_argument("--config-only", action="store_true",
                       help="only validate configuration and keyring")

    keys = sub.add_parser("keys", help="manage the keyring")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    gen = keys_sub.add_parser("generate", parents=[common], help="add a principal")
    gen.add_argument("--principal", required=True)
    gen.add_argument("--role", choices=ROLES, required=True)
    rot = keys_sub.add_parser("rotate", parents=[common], help="new key; old ones still decrypt")
    rot.add_argument("--principal", required=True)
    keys_sub.add_parser("list", parents=[common], help="principals and roles, no secrets")
    exp = keys_sub.add_parser("export", parents=[common],
                              help="write one principal's own keyring file (mode 0600)")
    exp.add_argument("--principal", required=True)
    exp.add_argument("--out", required=True)
    tok = keys_sub.add_parser("token", parents=[common], help="print an operator's API token")
    tok.add_argument("--principal", required=True)

    demo = sub.add_parser("demo", parents=[common],
                          help="coordinator + agent processes + tasks, then a summary")
    demo.add_argument("--agents", type=int, default=3)
    demo.add_argument("--tasks", type=int, default=30)
    demo.add_argument("--forever", action="store_true",
                      help="keep a steady trickle of tasks until Ctrl-C (make run)")
    demo.add_argument("--rate", type=float, default=2.0, help="tasks per second with --forever")
    return parser


def _principal_option(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--principal", default=_env("COORDINATOR_PRINCIPAL"),
                     help="operator id in the keyring [COORDINATOR_PRINCIPAL]; "
                     "default: the only operator")


def _url_option(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--url", default=_env("COORDINATOR_URL"),
                     help="monitoring URL [COORDINATOR_URL]; default from settings")


def settings_from(args: argparse.Namespace) -> Settings:
    if args.config:
        os.environ[CONFIG_ENV] = args.config
    return load_settings(
        name=args.name, broker_url=args.broker_url, keyring_path=args.keyring_path,
        log_level=args.log_level, monitoring_port=args.monitoring_port,
    )


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # aiormq/aio-pika log every failed connection attempt at ERROR; MessageHandler reports
    # outages itself, once each. Their own lines come back with --log-level DEBUG.
    quiet = logging.DEBUG if level == "DEBUG" else logging.CRITICAL
    logging.getLogger("aiormq").setLevel(quiet)
    logging.getLogger("aio_pika").setLevel(quiet)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
        setup_logging(settings.log_level)
        handler = COMMANDS[args.command]
        return handler(args, settings)
    except ConfigError as exc:
        print(f"coordinator-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    except CoordinatorError as exc:
        print(f"coordinator-agent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# --- long-running commands ---------------------------------------------------------------------


def run_until_signal(
    start: Callable[[], Coroutine[Any, Any, None]],
    stop: Callable[[], Coroutine[Any, Any, None]],
) -> int:
    """startup -> wait for SIGTERM/SIGINT -> graceful stop; a second signal forces exit."""

    async def body() -> int:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("second signal: exiting now")
                os._exit(130)
            log.info("stopping (send the signal again to force)")
            stopping.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await start()
        await stopping.wait()
        await stop()
        return 0

    return asyncio.run(body())


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from .coordinator import CoordinatorAgent

    coordinator = CoordinatorAgent(settings)
    return run_until_signal(coordinator.start, coordinator.stop)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from .examples import example_handler
    from .worker import WorkerAgent

    agent = WorkerAgent(
        args.id, args.kind, example_handler, settings=settings,
        keyring=Keyring.load(settings.keyring_path),
        capabilities=[c.strip() for c in args.capabilities.split(",") if c.strip()],
        max_concurrency=args.concurrency,
    )

    async def stop() -> None:
        await agent.stop()

    return run_until_signal(agent.start, stop)


def operator_id(keyring: Keyring, wanted: str | None) -> str:
    if wanted:
        return wanted
    operators = [p.id for p in keyring.principals.values() if p.role == "operator"]
    if len(operators) != 1:
        raise ConfigError(
            "say which operator to act as with --principal (keyring has "
            f"{len(operators)} operators)"
        )
    return operators[0]


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from .client import CoordinatorClient
    from .progress import Spinner

    task_input = None
    if args.input:
        try:
            task_input = json.loads(args.input)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--input is not valid JSON: {exc.msg}") from None
    keyring = Keyring.load(settings.keyring_path)

    async def body() -> int:
        async with CoordinatorClient(settings, keyring, operator_id(keyring, args.principal)) as c:
            task_id = await c.submit(
                args.description, kind=args.kind, required_capabilities=args.capability,
                input=task_input, timeout_s=args.timeout, task_id=args.task_id,
            )
            if not args.wait:
                _print(args, {"task_id": task_id, "status": "submitted"}, f"submitted {task_id}")
                return 0
            spinner = Spinner(f"task {task_id}", enabled=not args.json)
            with spinner:
                done = await c.wait(task_id, args.wait_timeout)
            result = done.model_dump(mode="json")
            _print(args, result, _describe_result(result))
            return 0 if done.status == "succeeded" else 1

    try:
        return asyncio.run(body())
    except TimeoutError:
        print(f"coordinator-agent: no result within {args.wait_timeout:g}s "
              "(the task goes on; look it up with GET /api/tasks/ID)", file=sys.stderr)
        return 3


def _describe_result(result: dict[str, Any]) -> str:
    lines = [f"{result['task_id']}: {result['status']}"]
    if result.get("error"):
        lines.append(f"  error: {result['error']}")
    if result.get("output") is not None:
        lines.append("  output: " + json.dumps(result["output"]))
    for attempt in result.get("attempts", []):
        lines.append(f"  attempt {attempt['attempt']} on {attempt['agent_id']}: "
                     f"{attempt['outcome']}")
    return "\n".join(lines)


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data) if args.json else text)


# --- HTTP-backed commands ----------------------------------------------------------------------


def monitoring_url(args: argparse.Namespace, settings: Settings) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    host = settings.monitoring_host
    if host in ("0.0.0.0", "::"):  # noqa: S104 - listening everywhere; talk to loopback
        host = "127.0.0.1"
    return f"http://{host}:{settings.monitoring_port}"


def http_get(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CoordinatorError(
            f"cannot reach the coordinator at {url} ({reason}) — is `coordinator-agent run` up?"
        ) from None


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    _, status = http_get(monitoring_url(args, settings) + "/api/status")
    if args.json:
        print(json.dumps(status))
        return 0
    print(f"coordinator {status['name']}: {'ready' if status['ready'] else 'NOT READY'}, "
          f"broker {'up' if status['broker_connected'] else 'DOWN'}, up {status['uptime_s']}s")
    print("agents: " + ", ".join(f"{k} {v}" for k, v in status["agents"].items()))
    open_tasks = ", ".join(f"{k} {v}" for k, v in status["tasks_open"].items() if v)
    print(f"open tasks: {open_tasks or 'none'}")
    print("totals: " + ", ".join(f"{k} {v}" for k, v in status["totals"].items()))
    return 0


def cmd_agents(args: argparse.Namespace, settings: Settings) -> int:
    _, body = http_get(monitoring_url(args, settings) + "/api/agents")
    agents = body["agents"]
    if args.json:
        print(json.dumps(agents))
        return 0
    columns = ["id", "kind", "liveness", "state", "in_flight", "max_concurrency", "load",
               "completed", "failed", "last_seen_s"]
    print(format_table(columns, [[a[col] for col in columns] for a in agents]))
    return 0


def format_table(columns: list[str], rows: list[list[Any]]) -> str:
    cells = [columns, *[[str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines) if rows else lines[0] + "\n(none)"


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    if args.config_only:
        keyring = Keyring.load(settings.keyring_path)
        _print(args, {"ok": True, "principals": len(keyring.principals)},
               f"configuration and keyring OK ({len(keyring.principals)} principals)")
        return 0
    try:
        code, body = http_get(monitoring_url(args, settings) + "/readyz", timeout=3)
    except CoordinatorError as exc:
        _print(args, {"ready": False, "error": str(exc)}, f"not ready: {exc}")
        return 1
    ready = code == 200
    _print(args, body, "ready" if ready else f"not ready: {body.get('checks')}")
    return 0 if ready else 1


# --- keys --------------------------------------------------------------------------------------


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    path: Path = settings.keyring_path
    action = args.keys_command
    if action == "list":
        keyring = Keyring.load(path)
        rows = [{"principal": p.id, "role": p.role, "keys": len(p.keys)}
                for p in sorted(keyring.principals.values(), key=lambda p: p.id)]
        if args.json:
            print(json.dumps(rows))
        else:
            print(format_table(["principal", "role", "keys"],
                               [[r["principal"], r["role"], r["keys"]] for r in rows]))
        return 0
    keyring = Keyring.load_or_create(path) if action == "generate" else Keyring.load(path)
    if action == "generate":
        principal = keyring.generate(args.principal, args.role)
        keyring.save(path)
        _print(args, {"principal": principal.id, "role": principal.role, "keyring": str(path)},
               f"added {principal.role} {principal.id} to {path}")
    elif action == "rotate":
        principal = keyring.rotate(args.principal)
        keyring.save(path)
        _print(args, {"principal": principal.id, "keys": len(principal.keys)},
               f"rotated {principal.id}: {len(principal.keys)} keys (newest encrypts)")
    elif action == "export":
        keyring.subset(args.principal).save(Path(args.out))
        _print(args, {"principal": args.principal, "file": args.out},
               f"wrote {args.principal}'s keys to {args.out} (mode 0600)")
    elif action == "token":
        operator = keyring.get(args.principal)
        if operator is None or operator.api_token is None:
            raise ConfigError(f"{args.principal!r} is not an operator in {path}")
        # Printed on request only, for `Authorization: Bearer ...`; never logged.
        print(operator.api_token.get_secret_value())
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from .demo import run_demo

    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run_demo(settings, agents=args.agents, tasks=args.tasks,
                                    as_json=args.json, forever=args.forever, rate=args.rate))
    return 130


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "run": cmd_run,
    "worker": cmd_worker,
    "submit": cmd_submit,
    "status": cmd_status,
    "agents": cmd_agents,
    "check": cmd_check,
    "keys": cmd_keys,
    "demo": cmd_demo,
}
