"""A run whose services are down stops at the first check, with the message (README promise)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_broker_stops_the_run_before_any_test(tmp_path: Path) -> None:
    env = {**os.environ,
           "COORDINATOR_TEST_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/integration/test_cli_live.py", "tests/unit/test_waiting.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 4, output
    assert "RabbitMQ is not reachable at 127.0.0.1:" in output
    assert "make services" in output and "COORDINATOR_TEST_BROKER_URL" in output
    assert " passed" not in output and " error" not in output, output
