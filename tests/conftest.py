"""Shared fixtures. Integration tests run against a real RabbitMQ (and Consul where needed).

Service addresses come from the environment first (COORDINATOR_TEST_BROKER_URL), then the
loopback default. A missing service stops the run with a message saying how to start it: a
test suite that silently skips its integration tests proves nothing. The check runs once, after
collection and before the first test, for the services the selected tests need; the run then
ends there (exit status 4) instead of reporting every such test as an error.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from urllib.parse import urlparse

import pytest

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"

# The fault suite (tests/faults) starts a broker node of its own and pauses, restarts and cuts
# it; it runs when asked for, with `make faults` (COORDINATOR_TEST_FAULTS=1), which CI runs as well.
collect_ignore = [] if os.environ.get("COORDINATOR_TEST_FAULTS") else ["faults"]


def broker_url_from_env() -> str:
    return os.environ.get("COORDINATOR_TEST_BROKER_URL", DEFAULT_BROKER_URL)


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5672), 3):
            return True
    except OSError:
        return False


def broker_problem(url: str) -> str | None:
    if _reachable(url):
        return None
    return (f"RabbitMQ is not reachable at {urlparse(url).hostname}:{urlparse(url).port or 5672}. "
            "Start it with `make services` (or `rabbitmq-server -detached`), or point "
            "COORDINATOR_TEST_BROKER_URL at one.")


@pytest.fixture(scope="session")
def broker_url() -> str:
    url = broker_url_from_env()
    problem = broker_problem(url)
    if problem is not None:
        raise pytest.UsageError(problem)
    return url


DEFAULT_CONSUL_URL = "http://127.0.0.1:8500"


def consul_url_from_env() -> str:
    """CONSUL_HTTP_ADDR (``host:port`` or a URL), as Consul's own tools read it."""
    addr = os.environ.get("CONSUL_HTTP_ADDR", "").strip()
    if not addr:
        return DEFAULT_CONSUL_URL
    return addr if "://" in addr else f"http://{addr}"


def consul_leader(url: str) -> str | None:
    """The address of the cluster's leader, or None when no Consul answers at ``url``."""
    try:
        with urllib.request.urlopen(f"{url}/v1/status/leader", timeout=3) as response:
            leader = response.read().decode().strip().strip('"')
    except OSError:
        return None
    return leader or None


def consul_problem(url: str) -> str | None:
    if consul_leader(url) is not None:
        return None
    return (f"Consul is not reachable (or has no leader) at {url}. Start a dev agent with "
            "`make services` (it installs Consul when absent), or point CONSUL_HTTP_ADDR at one.")


@pytest.fixture(scope="session")
def consul_url() -> str:
    url = consul_url_from_env()
    problem = consul_problem(url)
    if problem is not None:
        raise pytest.UsageError(problem)
    return url


#: pytest's own status for "the run could not start as asked" (a usage error).
SERVICES_MISSING_EXIT = pytest.ExitCode.USAGE_ERROR


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check the services the selected tests need once, and stop the whole run if one is down."""
    needs = set()
    for item in items:
        needs.update({"broker_url", "consul_url"} & set(getattr(item, "fixturenames", ())))
    problems = []
    if "broker_url" in needs:
        problems.append(broker_problem(broker_url_from_env()))
    if "consul_url" in needs:
        problems.append(consul_problem(consul_url_from_env()))
    found = [p for p in problems if p is not None]
    if found:
        pytest.exit("\n".join(found), returncode=SERVICES_MISSING_EXIT)
