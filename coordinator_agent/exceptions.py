"""The exception tree. Everything this package raises on purpose derives from CoordinatorError::

    CoordinatorError
    ├── ConfigError                 bad settings or keyring file
    ├── RejectedMessage             an inbound message failed a check  (reason, sender, message_id)
    │   ├── ProtocolError           not a valid v1 message
    │   └── SecurityError           failed a security check
    │       └── AuthorizationError  authentic, but not allowed
    ├── TransportError              the broker failed us (connect, publish, confirm, timeout)
    │   ├── PublishTimeout          no confirm within the publish timeout
    │   └── Unroutable              returned by the broker: no queue for that routing key
    ├── DiscoveryError              the service registry failed us     (operation)
    │   └── NotRegistered           the registry does not know this service (service_id)
    ├── StateError
    │   ├── IllegalTransition       a task state change the table forbids   (task_id)
    │   ├── UnknownTask             (task_id)
    │   └── TaskConflict            an operator action the task's state does not allow (task_id)
    ├── PlanningError               no route for a task                     (task_id)
    └── SubmissionRefused           at an open-task or backlog limit  (retry_after_s)

Foreign exceptions (aio-pika, cryptography, pydantic, consul) are translated once, at the module
that talks to them; domain code never sees them. Messages never contain payloads or secrets.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(CoordinatorError):
    pass


class RejectedMessage(CoordinatorError):
    """A message that failed a check; ``reason`` is a short, bounded label used in metrics."""

    def __init__(
        self, reason: str, detail: str = "", *, sender: str | None = None,
        message_id: str | None = None,
    ) -> None:
        self.reason = reason
        self.detail = detail
        self.sender = sender
        self.message_id = message_id
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ProtocolError(RejectedMessage):
    pass


class SecurityError(RejectedMessage):
    pass


class AuthorizationError(SecurityError):
    pass


class TransportError(CoordinatorError):
    pass


class PublishTimeout(TransportError):
    pass


class Unroutable(TransportError):
    pass


class DiscoveryError(CoordinatorError):
    """A call to the service registry failed; ``operation`` is a bounded label for metrics."""

    def __init__(self, operation: str, detail: str) -> None:
        super().__init__(f"registry {operation} failed: {detail}")
        self.operation = operation


class NotRegistered(DiscoveryError):
    """The registry lost a registration (for example a dev Consul restarted): register again."""

    def __init__(self, operation: str, service_id: str) -> None:
        super().__init__(operation, f"{service_id} is not registered")
        self.service_id = service_id


class StateError(CoordinatorError):
    pass


class IllegalTransition(StateError):
    def __init__(self, task_id: str, current: str, target: str) -> None:
        self.task_id = task_id
        self.current = current
        self.target = target
        super().__init__(f"task {task_id}: illegal transition {current} -> {target}")


class UnknownTask(StateError):
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"unknown task {task_id}")


class PlanningError(CoordinatorError):
    def __init__(self, task_id: str, reason: str) -> None:
        self.task_id = task_id
        self.reason = reason
        super().__init__(f"task {task_id}: {reason}")


class SubmissionRefused(CoordinatorError):
    """The coordinator is at its open-task limit (limits.max_pending_tasks), or the submitter
    at its backlog limit (fleet.*.max_backlog); ``retry_after_s`` says when to try again."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TaskConflict(StateError):
    """An operator action (cancel, redirect, retry, resolve, fail) the task's state rules out."""

    def __init__(self, task_id: str, message: str) -> None:
        super().__init__(f"task {task_id}: {message}")
        self.task_id = task_id

