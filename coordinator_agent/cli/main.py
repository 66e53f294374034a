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
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from coordinator_agent import __version__
from coordinator_agent.cli.conformance import add_conformance_command, cmd_conformance
from coordinator_agent.cli.controls import CONTROL_COMMANDS, add_control_commands, priority_option
from coordinator_agent.cli.loop import choose_event_loop
from coordinator_agent.cli.progress import (
    Rates,
    agents_table,
    clean,
    format_table,
    status_summary,
    use_colour,
    watch_frame,
)
from coordinator_agent.cli.reach import (
    api_get,
    api_post,
    http_get,
    monitoring_url,
    origin,
    require_broker,
)
from coordinator_agent.cli.routing import add_routing_commands, cmd_route, cmd_routing
from coordinator_agent.exceptions import (
    ConfigError,
    CoordinatorError,
    SubmissionTooLarge,
    UsageError,
    WaitTimeout,
)
from coordinator_agent.settings import CONFIG_ENV, Settings, describe_config_source, load_settings
from coordinator_agent.wire.keyring import ROLES, Keyring, check_principal_id, require_role

log = logging.getLogger("coordinator_agent")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _flag(name: str) -> bool:
    """A boolean option's environment variable: set and not 0/false/no/off means on."""
    return (os.environ.get(name) or "").strip().lower() not in ("", "0", "false", "no", "off")


def _csv(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _more_than(kind: Callable[[str], float], minimum: float, *, inclusive: bool = False
               ) -> Callable[[str], float]:
    """An argparse type: a number above ``minimum`` (or at least it), refused cleanly else."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(
                f"must be {'at least' if inclusive else 'more than'} {minimum:g}, not {text}")
        return value
    return parse


POSITIVE = _more_than(float, 0)
AT_LEAST_ONE = _more_than(int, 1, inclusive=True)


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
    common.add_argument("--json", action="store_true", default=_flag("COORDINATOR_JSON"),
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
    worker.add_argument("--concurrency", type=AT_LEAST_ONE,
                        default=_env("COORDINATOR_AGENT_CONCURRENCY", "4"),
                        help="tasks at once [COORDINATOR_AGENT_CONCURRENCY]")
    worker.add_argument("--batch-limit", type=AT_LEAST_ONE,
                        default=_env("COORDINATOR_AGENT_BATCH_LIMIT", "16"),
                        help="most messages per batch it announces it takes and sends "
                        "(docs/PROTOCOL.md §9.13); 1: none [COORDINATOR_AGENT_BATCH_LIMIT]")

    submit = sub.add_parser("submit", parents=[common], help="submit a task over AMQP")
    submit.add_argument("description", nargs="?",
                        help="what to do (not with --from-file)")
    submit.add_argument("--from-file", metavar="PATH", default=_env("COORDINATOR_TASK_FILE"),
                        help="submit many tasks in batch messages: one JSON object of "
                        "task.submit fields per line ('-': standard input); the other task "
                        "options do not apply [COORDINATOR_TASK_FILE]")
    submit.add_argument("--kind", default=_env("COORDINATOR_TASK_KIND"),
                        help="only agents of this kind [COORDINATOR_TASK_KIND]")
    submit.add_argument("--capability", action="append", default=None,
                        help="required capability, repeatable "
                        "[COORDINATOR_TASK_CAPABILITIES, comma-separated]")
    submit.add_argument("--label", action="append", default=None,
                        help="what your ticket system knows of the task (a type, a "
                        "component); the router learns per label (docs/ROUTING.md), "
                        "repeatable, at most 8 [COORDINATOR_TASK_LABELS, comma-separated]")
    submit.add_argument("--subtask", action="append", default=[], metavar="DESCRIPTION",
                        help="fan out: one sub-task per use, run in parallel and merged "
                        "[COORDINATOR_TASK_SUBTASKS, one per line]")
    submit.add_argument("--step", action="append", default=[], metavar="DESCRIPTION",
                        help="a sequential step; each step's output feeds the next "
                        "[COORDINATOR_TASK_STEPS, one per line]")
    submit.add_argument("--spec", default=_env("COORDINATOR_TASK_SPEC"), metavar="JSON",
                        help="more task.submit fields as a JSON object, e.g. '{\"subtasks\": "
                        "[...], \"on_subtask_error\": \"skip\"}' (see docs/PROTOCOL.md) "
                        "[COORDINATOR_TASK_SPEC]")
    submit.add_argument("--input", default=_env("COORDINATOR_TASK_INPUT"),
                        help="task input as JSON, e.g. '{\"op\": \"hash\"}' "
                        "[COORDINATOR_TASK_INPUT]")
    submit.add_argument("--task-id", default=_env("COORDINATOR_TASK_ID"),
                        help="idempotency key (default: generated) [COORDINATOR_TASK_ID]")
    submit.add_argument("--priority", default=_env("COORDINATOR_TASK_PRIORITY"),
                        help="high, medium, low or a band 0-9 (default: from the text's "
                        "urgency, else medium) [COORDINATOR_TASK_PRIORITY]")
    submit.add_argument("--timeout", type=POSITIVE,
                        default=_env("COORDINATOR_TASK_TIMEOUT_S"),
                        help="seconds per attempt, more than 0 [COORDINATOR_TASK_TIMEOUT_S]")
    submit.add_argument("--wait", action="store_true", default=_flag("COORDINATOR_WAIT"),
                        help="wait for the result; a spinner on stderr shows the wait "
                        "[COORDINATOR_WAIT=1]")
    submit.add_argument("--wait-timeout", type=POSITIVE,
                        default=_env("COORDINATOR_WAIT_TIMEOUT_S", "120"),
                        help="give up waiting after this many seconds (the task goes on) "
                        "[COORDINATOR_WAIT_TIMEOUT_S]")
    _principal_option(submit)

    for name, text in (("status", "coordinator totals"), ("agents", "known agents")):
        cmd = sub.add_parser(name, parents=[common], help=text)
        _url_option(cmd)

    add_routing_commands(sub, common, _url_option)
    add_control_commands(sub, common, _url_option)  # cancel, redirect, the escalation desk
    add_conformance_command(sub, common)

    drain = sub.add_parser("drain", parents=[common],
                           help="ask an agent to drain: no new work, running tasks finish, "
                           "then it leaves")
    drain.add_argument("agent", metavar="AGENT", help="the agent's id")
    drain.add_argument("--reason", default=_env("COORDINATOR_DRAIN_REASON", ""),
                       help="said to the agent and logged [COORDINATOR_DRAIN_REASON]")
    _url_option(drain)
    _principal_option(drain)

    watch = sub.add_parser("watch", parents=[common],
                           help="live view: status, agents and latest tasks, until Ctrl-C")
    _url_option(watch)
    watch.add_argument("--interval", type=float, default=_env("COORDINATOR_WATCH_INTERVAL", "2"),
                       help="seconds between frames [COORDINATOR_WATCH_INTERVAL]")
    watch.add_argument("--tasks", type=int, default=_env("COORDINATOR_WATCH_TASKS", "10"),
                       help="how many of the latest tasks to show [COORDINATOR_WATCH_TASKS]")
    watch.add_argument("--once", action="store_true", default=_flag("COORDINATOR_WATCH_ONCE"),
                       help="print one frame and exit [COORDINATOR_WATCH_ONCE=1]")

    check = sub.add_parser("check", parents=[common],
                           help="probe: exit 0 if the coordinator is ready (or config is valid)")
    _url_option(check)
    check.add_argument("--config-only", action="store_true",
                       default=_flag("COORDINATOR_CHECK_CONFIG_ONLY"),
                       help="only validate configuration and keyring "
                       "[COORDINATOR_CHECK_CONFIG_ONLY=1]")

    keys = sub.add_parser("keys", help="manage the keyring")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    gen = keys_sub.add_parser("generate", parents=[common], help="add a principal")
    _keys_principal(gen)
    role = _env("COORDINATOR_KEYS_ROLE")
    gen.add_argument("--role", choices=ROLES, default=role, required=role is None,
                     help="[COORDINATOR_KEYS_ROLE]")
    rot = keys_sub.add_parser("rotate", parents=[common], help="new key; old ones still decrypt")
    _keys_principal(rot)
    keys_sub.add_parser("list", parents=[common], help="principals and roles, no secrets")
    exp = keys_sub.add_parser("export", parents=[common],
                              help="write one principal's own keyring file (mode 0600)")
    _keys_principal(exp)
    out = _env("COORDINATOR_KEYS_OUT")
    exp.add_argument("--out", default=out, required=out is None, help="[COORDINATOR_KEYS_OUT]")
    tok = keys_sub.add_parser("token", parents=[common], help="print an operator's API token")
    _keys_principal(tok)

    demo = sub.add_parser("demo", parents=[common],
                          help="coordinator + agent processes + tasks, then a summary")
    demo.add_argument("--agents", type=AT_LEAST_ONE,
                      default=_env("COORDINATOR_DEMO_AGENTS", "3"),
                      help="agent processes, at least 1 [COORDINATOR_DEMO_AGENTS]")
    demo.add_argument("--tasks", type=AT_LEAST_ONE, default=_env("COORDINATOR_DEMO_TASKS", "30"),
                      help="tasks to run, at least 1 [COORDINATOR_DEMO_TASKS]")
    demo.add_argument("--forever", action="store_true", default=_flag("COORDINATOR_DEMO_FOREVER"),
                      help="keep a steady trickle of tasks until Ctrl-C (make run) "
                      "[COORDINATOR_DEMO_FOREVER=1]")
    demo.add_argument("--rate", type=POSITIVE, default=_env("COORDINATOR_DEMO_RATE", "2"),
                      help="tasks per second with --forever [COORDINATOR_DEMO_RATE]")
    return parser


def _keys_principal(cmd: argparse.ArgumentParser) -> None:
    principal = _env("COORDINATOR_KEYS_PRINCIPAL")
    cmd.add_argument("--principal", default=principal, required=principal is None,
                     help="principal id [COORDINATOR_KEYS_PRINCIPAL]")


def _principal_option(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--principal", default=_env("COORDINATOR_PRINCIPAL"),
                     help="operator id in the keyring [COORDINATOR_PRINCIPAL]; "
                     "default: the only operator")


def _url_option(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--url", default=_env("COORDINATOR_URL"),
                     help="monitoring URL [COORDINATOR_URL]; default from settings")


def settings_from(args: argparse.Namespace) -> Settings:
    settings = load_settings(
        config_file=args.config, name=args.name, broker_url=args.broker_url,
        keyring_path=args.keyring_path, log_level=args.log_level,
        monitoring_port=args.monitoring_port,
    )
    if args.config:
        os.environ[CONFIG_ENV] = args.config  # processes we start (demo agents) read it too
    return settings


#: Commands that run for long: they say at INFO which config file they read (others at DEBUG).
LONG_RUNNING = frozenset({"run", "worker", "demo"})


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
        log.log(logging.INFO if args.command in LONG_RUNNING else logging.DEBUG, "%s",
                describe_config_source(settings))
        handler = COMMANDS[args.command]
        return handler(args, settings)
    except ConfigError as exc:
        print(f"coordinator-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"coordinator-agent: {exc}", file=sys.stderr)
        return 2
    except CoordinatorError as exc:
        print(f"coordinator-agent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `coordinator-agent watch | head`: the reader left; say nothing more, and stop Python
        # from complaining when it flushes stdout on the way out.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


# --- long-running commands ---------------------------------------------------------------------


def run_until_signal(
    start: Callable[[], Coroutine[Any, Any, None]],
    stop: Callable[[], Coroutine[Any, Any, None]],
    *, event_loop: str = "auto",
) -> int:
    """startup -> wait for SIGTERM/SIGINT -> graceful stop; a second signal forces exit. A failed
    start closes what it had opened, so the error is all that is printed."""
    stopping = asyncio.Event()

    async def serve() -> None:
        await start()
        await stopping.wait()
        await stop()

    return serve_until_signal(serve, stopping.set, close=stop, event_loop=event_loop)


def serve_until_signal(
    serve: Callable[[], Coroutine[Any, Any, None]], request_stop: Callable[[], None],
    *, close: Callable[[], Coroutine[Any, Any, None]] | None = None, event_loop: str = "auto",
) -> int:
    """Run ``serve()`` to its end, which may come on its own (an agent told to drain); the first
    SIGTERM/SIGINT asks it to stop gracefully, a second forces exit. If ``serve()`` fails,
    ``close()`` closes what it had opened."""

    async def body() -> int:
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("second signal: exiting now; still running: %s", _where_tasks_wait())
                os._exit(130)
            log.info("stopping (send the signal again to force)")
            request_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            await serve()
        except BaseException:
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
            raise
        return 0

    choose_event_loop(event_loop)  # uvloop where installed (the 'fast' extra); logged
    try:
        return asyncio.run(body())
    finally:
        asyncio.set_event_loop_policy(None)  # a caller in the same process gets asyncio back


def _where_tasks_wait() -> str:
    """Each task's name and the line it waits at: what a stop that hung was waiting for."""
    places = []
    for task in asyncio.all_tasks():
        frames = task.get_stack(limit=None)
        where = (f"{frames[-1].f_code.co_filename}:{frames[-1].f_lineno}" if frames else "?")
        places.append(f"{task.get_name()} at {where}")
    return "; ".join(sorted(places)) or "nothing"


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from coordinator_agent.coordinator.memory import settle_heap
    from coordinator_agent.coordinator.service import CoordinatorAgent

    coordinator = CoordinatorAgent(settings)

    async def start() -> None:
        await coordinator.start()
        settle_heap()  # what start-up built stays: out of the collector's way (memory.py)

    return run_until_signal(start, coordinator.stop, event_loop=settings.event_loop)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from coordinator_agent.agent.examples import example_handler
    from coordinator_agent.agent.worker import WorkerAgent
    from coordinator_agent.coordinator.memory import settle_heap

    keyring = Keyring.load(settings.keyring_path)
    require_role(keyring, check_principal_id(args.id), "agent", settings.keyring_path)
    agent = WorkerAgent(
        args.id, args.kind, example_handler, settings=settings, keyring=keyring,
        capabilities=[c.strip() for c in args.capabilities.split(",") if c.strip()],
        max_concurrency=args.concurrency, batch_limit=args.batch_limit,
    )

    settle_heap()  # memory.py
    # Not run_until_signal: an agent.drain from the coordinator ends the agent as well.
    return serve_until_signal(agent.run, agent.request_stop, close=agent.stop,
                              event_loop=settings.event_loop)


def operator_id(keyring: Keyring, wanted: str | None) -> str:
    if wanted:
        return wanted
    operators = [p.id for p in keyring.principals.values() if p.role == "operator"]
    if len(operators) != 1:
        raise UsageError(
            "say which operator to act as with --principal (keyring has "
            f"{len(operators)} operators)"
        )
    return operators[0]


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from coordinator_agent.cli.progress import Spinner
    from coordinator_agent.client import CoordinatorClient

    if args.from_file is not None:
        return submit_from_file(args, settings)
    if args.description is None:
        raise UsageError("submit needs a DESCRIPTION, or --from-file")
    task_input = None
    if args.input:
        try:
            task_input = json.loads(args.input)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--input is not valid JSON: {exc.msg}") from None
    capabilities = args.capability or _csv(_env("COORDINATOR_TASK_CAPABILITIES"))
    priority = priority_option(args.priority) if args.priority else None
    labels = args.label or _csv(_env("COORDINATOR_TASK_LABELS"))
    fields = composite_fields(args, kind=args.kind, required_capabilities=capabilities,
                              timeout_s=args.timeout, task_id=args.task_id, priority=priority,
                              labels=labels)
    if priority is not None:
        fields["priority"] = priority
    if labels:
        fields["labels"] = labels
    keyring = Keyring.load(settings.keyring_path)
    principal = operator_id(keyring, args.principal)
    require_broker(settings.broker_url.get_secret_value())

    phase = "submitted"

    async def body() -> int:
        nonlocal phase
        async with CoordinatorClient(settings, keyring, principal) as c:
            task_id = await c.submit(
                args.description, kind=args.kind, required_capabilities=capabilities,
                input=task_input, timeout_s=args.timeout, task_id=args.task_id, **fields,
            )
            if not args.wait:
                _print(args, {"task_id": task_id, "status": "submitted"}, f"submitted {task_id}")
                return 0

            def current() -> str:
                nonlocal phase
                phase = "accepted" if task_id in c.accepted else "submitted"
                return phase

            with Spinner(f"task {task_id}", detail=current):
                try:
                    done = await c.wait(task_id, args.wait_timeout)
                finally:
                    current()
            result = done.model_dump(mode="json")
            _print(args, result, _describe_result(result))
            return 0 if done.status == "succeeded" else 1

    try:
        return asyncio.run(body())
    except SubmissionTooLarge as exc:
        raise UsageError(str(exc)) from None  # nothing was sent: the input is what to change
    except WaitTimeout as exc:
        # The task goes on: say which one, and how to find it later.
        if args.json:
            print(json.dumps({"task_id": exc.task_id, "status": phase, "timed_out": True,
                              "wait_timeout_s": args.wait_timeout}))
        print(f"coordinator-agent: no result for task {exc.task_id} within "
              f"{args.wait_timeout:g}s; it is {phase} and goes on (look it up with "
              f"GET /api/tasks/{exc.task_id} or `coordinator-agent watch`)", file=sys.stderr)
        return 3


def submit_from_file(args: argparse.Namespace, settings: Settings) -> int:
    """``submit --from-file``: every line a task, sent in batch messages (PROTOCOL.md §9.13)."""
    from pydantic import ValidationError

    from coordinator_agent.client import CoordinatorClient

    if args.description is not None:
        raise UsageError("give a DESCRIPTION or --from-file, not both")
    try:
        text = (sys.stdin.read() if args.from_file == "-"
                else Path(args.from_file).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read {args.from_file}: {exc.strerror}") from None
    tasks: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"line {number} is not valid JSON: {exc.msg}") from None
        if not isinstance(fields, dict):
            raise UsageError(f"line {number} must be a JSON object of task.submit fields")
        tasks.append(fields)
    if not tasks:
        raise UsageError(f"{args.from_file} holds no task")
    keyring = Keyring.load(settings.keyring_path)
    principal = operator_id(keyring, args.principal)
    require_broker(settings.broker_url.get_secret_value())

    async def body() -> int:
        async with CoordinatorClient(settings, keyring, principal) as c:
            ids = await c.submit_many(tasks)
            if not args.wait:
                _print(args, {"task_ids": ids, "status": "submitted"},
                       "\n".join(f"submitted {task_id}" for task_id in ids))
                return 0
            outcomes = await asyncio.gather(*(c.wait(t, args.wait_timeout) for t in ids))
            results = [o.model_dump(mode="json") for o in outcomes]
            _print(args, {"results": results},
                   "\n".join(_describe_result(r) for r in results))
            return 0 if all(o.status == "succeeded" for o in outcomes) else 1

    try:
        return asyncio.run(body())
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'task'}: {e['msg']}"
                             for e in exc.errors(include_url=False, include_input=False))
        raise UsageError(f"invalid task: {problems}") from None
    except SubmissionTooLarge as exc:
        raise UsageError(str(exc)) from None
    except WaitTimeout as exc:
        print(f"coordinator-agent: no result for task {exc.task_id} within "
              f"{args.wait_timeout:g}s; the tasks go on", file=sys.stderr)
        return 3


def composite_fields(args: argparse.Namespace, **checked: Any) -> dict[str, Any]:
    """--spec, --subtask and --step as task.submit fields, checked (with ``checked``, the other
    options' fields) before anything is sent."""
    from pydantic import ValidationError

    from coordinator_agent.wire import protocol

    fields: dict[str, Any] = {}
    if args.spec:
        try:
            fields = json.loads(args.spec)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--spec is not valid JSON: {exc.msg}") from None
        if not isinstance(fields, dict):
            raise UsageError("--spec must be a JSON object of task.submit fields")
    subtasks = args.subtask or _lines(_env("COORDINATOR_TASK_SUBTASKS"))
    steps = args.step or _lines(_env("COORDINATOR_TASK_STEPS"))
    if subtasks:
        fields["subtasks"] = [{"description": d} for d in subtasks]
    if steps:
        fields["steps"] = [{"description": d} for d in steps]
    given = {k: v for k, v in checked.items() if v not in (None, [])}
    try:
        protocol.TaskSubmit(description=args.description, **{**fields, **given})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'task'}: {e['msg']}"
                             for e in exc.errors(include_url=False, include_input=False))
        raise UsageError(f"invalid task: {problems}") from None
    return fields


def _lines(value: str | None) -> list[str]:
    return [line.strip() for line in (value or "").splitlines() if line.strip()]


def _describe_result(result: dict[str, Any]) -> str:
    lines = [f"{result['task_id']}: {result['status']}"]
    if result.get("error"):
        lines.append(f"  error: {clean(result['error'])}")  # the agent's words: untrusted
    if result.get("output") is not None:
        lines.append("  output: " + json.dumps(result["output"]))
    for attempt in result.get("attempts", []):
        lines.append(f"  attempt {attempt['attempt']} on {attempt['agent_id']}: "
                     f"{attempt['outcome']}")
    return "\n".join(lines)


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data) if args.json else text)


# --- read-only commands ------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    status = api_get(monitoring_url(args, settings), "/api/status")
    if args.json:
        print(json.dumps(status))
        return 0
    print(status_summary(status, colour=use_colour(sys.stdout)))
    return 0


def cmd_agents(args: argparse.Namespace, settings: Settings) -> int:
    agents = api_get(monitoring_url(args, settings), "/api/agents")["agents"]
    if args.json:
        print(json.dumps(agents))
        return 0
    print(agents_table(agents, colour=use_colour(sys.stdout)))
    return 0


# Cursor home, hide/show the cursor, line wrapping off/on, clear to the end of line/screen.
HOME, CLEAR = "\x1b[H", "\x1b[2J"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
NO_WRAP, WRAP = "\x1b[?7l", "\x1b[?7h"
CLEAR_LINE, CLEAR_BELOW = "\x1b[K", "\x1b[J"


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    """Redraw status, agents and the latest tasks every --interval seconds until Ctrl-C.

    On a terminal each frame replaces the last one; otherwise (a pipe, a log) frames follow one
    another as plain blocks, and with --json each frame is one JSON object on one line.
    """
    if args.interval <= 0:
        raise UsageError("--interval must be more than 0 seconds")
    base = monitoring_url(args, settings)
    out = sys.stdout
    live = out.isatty() and not args.json
    colour = use_colour(out)
    rates = Rates()
    limit = max(1, min(args.tasks, 500))
    frames = 0
    if live:
        # A plain `kill` must also give the terminal its cursor and line wrapping back.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        out.write(HIDE_CURSOR + NO_WRAP + CLEAR)
    try:
        while True:
            now, error = time.time(), None
            status: dict[str, Any] | None = None
            agents: list[dict[str, Any]] = []
            tasks: list[dict[str, Any]] = []
            try:
                status = api_get(base, "/api/status")
                agents = api_get(base, "/api/agents")["agents"]
                tasks = api_get(base, f"/api/tasks?limit={limit}")["tasks"]
            except CoordinatorError as exc:
                if args.once:
                    raise
                error = str(exc)
            rate = rates.update(status.get("totals"), time.monotonic()) if status else None
            if args.json:
                frame: dict[str, Any] = {"at": round(now, 3), "status": status, "agents": agents,
                                         "tasks": tasks, "rates": rate}
                if error is not None:
                    frame["error"] = error
                out.write(json.dumps(frame) + "\n")
            else:
                text = watch_frame(
                    url=origin(base), interval=args.interval, now=now, status=status,
                    agents=agents, tasks=tasks[:limit], rates=rate, error=error, colour=colour,
                    columns=shutil.get_terminal_size().columns if live else None,
                )
                if live:
                    out.write(HOME + text.replace("\n", CLEAR_LINE + "\n") + CLEAR_LINE
                              + CLEAR_BELOW)
                else:
                    out.write(("\n" if frames else "") + text + "\n")
            out.flush()
            frames += 1
            if args.once:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0  # the way to stop watching, not an error
    finally:
        if live:
            out.write(WRAP + SHOW_CURSOR + "\n")
            out.flush()


def cmd_drain(args: argparse.Namespace, settings: Settings) -> int:
    """POST /api/agents/{id}/drain as an operator: the coordinator sends the agent agent.drain."""
    from urllib.parse import quote

    keyring = Keyring.load(settings.keyring_path)
    operator = keyring.get(operator_id(keyring, args.principal))
    if operator is None or operator.api_token is None:
        raise ConfigError(f"{args.principal!r} is not an operator in {settings.keyring_path}")
    body = api_post(monitoring_url(args, settings),
                    f"/api/agents/{quote(args.agent, safe='')}/drain",
                    {"reason": args.reason}, token=operator.api_token.get_secret_value())
    _print(args, body, f"asked agent {args.agent} to drain: it takes no new work, finishes "
           "its tasks and leaves")
    return 0


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    if args.config_only:
        keyring = Keyring.load(settings.keyring_path)
        source = describe_config_source(settings)
        _print(args, {"ok": True, "principals": len(keyring.principals),
                      "config_file": str(settings.config_file) if settings.config_file else None},
               f"{source}\nconfiguration and keyring OK ({len(keyring.principals)} principals)")
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
        token = operator.api_token.get_secret_value()
        _print(args, {"principal": operator.id, "token": token}, token)
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from coordinator_agent.cli.demo import run_demo

    require_broker(settings.broker_url.get_secret_value())
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
    "watch": cmd_watch,
    "drain": cmd_drain,
    "routing": cmd_routing,
    "route": cmd_route,
    **CONTROL_COMMANDS,
    "check": cmd_check,
    "keys": cmd_keys,
    "demo": cmd_demo,
    "conformance": cmd_conformance,
}
