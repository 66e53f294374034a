"""coordinator_agent: a broker-based coordinator for fleets of worker agents.

The heavy parts (coordinator, worker, client: aio-pika, aiohttp, Consul) load on first use, so
the CLI's ``--help`` and probe commands start quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from coordinator_agent.exceptions import (  # after __version__: modules import it
    AuthorizationError,
    ConfigError,
    CoordinatorError,
    DiscoveryError,
    NotRegistered,
    ProtocolError,
    PublishTimeout,
    RejectedMessage,
    SecurityError,
    SubmissionRefused,
    SubmissionTooLarge,
    TransportError,
    Unroutable,
    WaitTimeout,
)

if TYPE_CHECKING:
    from coordinator_agent.agent.worker import TaskContext, WorkerAgent
    from coordinator_agent.client import CoordinatorClient
    from coordinator_agent.coordinator.service import CoordinatorAgent
    from coordinator_agent.settings import Settings, load_settings
    from coordinator_agent.wire.keyring import Keyring

_LAZY = {
    "CoordinatorAgent": "coordinator.service",
    "CoordinatorClient": "client",
    "Keyring": "wire.keyring",
    "Settings": "settings",
    "TaskContext": "agent.worker",
    "WorkerAgent": "agent.worker",
    "load_settings": "settings",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "AuthorizationError",
    "ConfigError",
    "CoordinatorAgent",
    "CoordinatorClient",
    "CoordinatorError",
    "DiscoveryError",
    "Keyring",
    "NotRegistered",
    "ProtocolError",
    "PublishTimeout",
    "RejectedMessage",
    "SecurityError",
    "Settings",
    "SubmissionRefused",
    "SubmissionTooLarge",
    "TaskContext",
    "TransportError",
    "Unroutable",
    "WaitTimeout",
    "WorkerAgent",
    "__version__",
    "load_settings",
]
