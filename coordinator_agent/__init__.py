"""coordinator_agent: a broker-based coordinator for fleets of worker agents."""

from __future__ import annotations

__version__ = "0.1.0"

from .client import CoordinatorClient  # after __version__: modules import it
from .coordinator import CoordinatorAgent
from .exceptions import (
    AuthorizationError,
    ConfigError,
    CoordinatorError,
    ProtocolError,
    PublishTimeout,
    RejectedMessage,
    SecurityError,
    SubmissionRefused,
    TransportError,
    Unroutable,
)
from .keyring import Keyring
from .settings import Settings, load_settings
from .worker import TaskContext, WorkerAgent

__all__ = [
    "AuthorizationError",
    "ConfigError",
    "CoordinatorAgent",
    "CoordinatorClient",
    "CoordinatorError",
    "Keyring",
    "ProtocolError",
    "PublishTimeout",
    "RejectedMessage",
    "SecurityError",
    "Settings",
    "SubmissionRefused",
    "TaskContext",
    "TransportError",
    "Unroutable",
    "WorkerAgent",
    "__version__",
    "load_settings",
]
