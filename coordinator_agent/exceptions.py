"""The exception tree. Everything this package raises on purpose derives from CoordinatorError::

    CoordinatorError
    ├── ConfigError                 bad settings or keyring file
    ├── UsageError                  a command line that cannot work (a bad option value)
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
    ├── StoreError                  the task store could not keep a change  (task_id)
    │   ├── StoreUnavailable        the write failed (disk full, I/O error): try again later
    │   └── UnstorableTask          the task itself cannot be stored (e.g. a huge integer)
    ├── SubmissionRefused           at an open-task or backlog limit  (retry_after_s)
    ├── NotLeading                  this coordinator is a standby: the message goes back
    ├── SubmissionTooLarge          the client refused to send it: over the size limit
    └── WaitTimeout                 no result in time; also a TimeoutError   (task_id)

Foreign exceptions (aio-pika, cryptography, pydantic, consul) are translated once, at the module
that talks to them; domain code never sees them. Messages never contain payloads or secrets.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(CoordinatorError):
    pass


class NotLeading(CoordinatorError):
    """A standby (or a deposed leader) declines a message: it goes back to its queue unacked,
    for the leader to take."""


class UsageError(CoordinatorError):
    """An option value that cannot work, said before anything is sent (exit status 2)."""


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


class StoreError(CoordinatorError):
    """A change could not be made durable; memory was rolled back to what the store holds."""

    def __init__(self, task_id: str, detail: str) -> None:
        self.task_id = task_id
        self.detail = detail
        super().__init__(f"task {task_id}: {detail}")


class StoreUnavailable(StoreError):
    """The store refused a write (disk full, read-only, I/O error). Retrying later may work."""


class UnstorableTask(StoreError):
    """The task cannot be serialised for the store: retrying will never work."""


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


class SubmissionTooLarge(CoordinatorError):
    """A task.submit that would exceed limits.max_message_bytes; the coordinator would drop it."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"task is {size} bytes sealed, over the limit of {limit} bytes "
            "(limits.max_message_bytes): make its input smaller, or raise the limit on the "
            "coordinator and its clients alike"
        )


class WaitTimeout(CoordinatorError, TimeoutError):
    """No result within the wait; the task itself goes on (look it up by ``task_id``)."""

    def __init__(self, task_id: str, timeout: float | None) -> None:
        self.task_id = task_id
        self.timeout = timeout
        super().__init__(f"no result for task {task_id} within {timeout:g}s (the task goes on)"
                         if timeout is not None else f"no result for task {task_id}")
