"""A private Consul dev agent on its own ports, for tests that stop and restart Consul.

The shared agent that `make services` starts stays untouched, so other tests never notice.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ...conftest import consul_leader


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def consul_binary() -> str:
    found = os.environ.get("CONSUL_BIN") or shutil.which("consul")
    if not found:
        pytest.fail("no consul binary on PATH (nor CONSUL_BIN): run `make services`, which "
                    "installs it", pytrace=False)
    return found


class PrivateConsul:
    def __init__(self, log_path: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.http_port, *self._other_ports = _free_ports(4)
        self.extra_args = extra_args
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = log_path
        self.process: subprocess.Popen[Any] | None = None

    def start(self, timeout: float = 30.0) -> None:
        serf_lan, serf_wan, server = self._other_ports
        args = [consul_binary(), "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
                "-http-port", str(self.http_port), "-dns-port", "-1", "-grpc-port", "-1",
                "-serf-lan-port", str(serf_lan), "-serf-wan-port", str(serf_wan),
                "-server-port", str(server), "-node", f"test-{self.http_port}",
                *self.extra_args]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while consul_leader(self.url) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"private Consul did not start; see {self.log_path}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
