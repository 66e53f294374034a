"""The agent the fault suite runs as a child process: the SDK with a journal.

Every execution appends ``task_id attempt agent_id pid`` to the journal before the handler does
anything, so the suite counts executions from outside the process (a crash cannot hide one).
``{"op": "crash"}`` kills the process with SIGKILL, as a segfault or the OOM killer would.

    python tests/faults/fault_agent.py --id agent-1 --concurrency 4 --journal DIR/journal.log
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import Any

from coordinator_agent.agent.worker import TaskContext, WorkerAgent
from coordinator_agent.settings import load_settings
from coordinator_agent.wire.keyring import Keyring


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--id", required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--journal", required=True)
    args = parser.parse_args()
    settings = load_settings()
    journal = os.open(args.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    async def handle(task: TaskContext) -> Any:
        # One write(2) per line on an O_APPEND file: lines from several processes never mix.
        os.write(journal, f"{task.task_id} {task.attempt} {args.id} {os.getpid()}\n".encode())
        spec = task.input if isinstance(task.input, dict) else {}
        if spec.get("op") == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if spec.get("op") == "sleep":
            await asyncio.sleep(float(spec.get("seconds", 0.1)))
        return {"task": task.task_id, "by": args.id}

    agent = WorkerAgent(args.id, "general", handle, settings=settings,
                        keyring=Keyring.load(settings.keyring_path),
                        max_concurrency=args.concurrency)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, agent.request_stop)
        await agent.run()

    asyncio.run(run())


if __name__ == "__main__":
    main()
