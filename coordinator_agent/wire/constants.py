"""Names on the wire: exchanges, queues, routing keys, headers. One place, so docs and code
agree."""

from __future__ import annotations

from typing import Final

PROTOCOL_VERSION: Final = 1
CONTENT_TYPE: Final = "application/vnd.coordinator-agent.v1+fernet"

# Everything below is namespaced by the coordinator's name (settings.name), so several
# deployments, test runs or demos can share one broker. Standby coordinators share a name.

#: Agents and clients publish everything for the coordinator here (direct exchange).
COORDINATOR_EXCHANGE: Final = "ca.coordinator"
#: The coordinator publishes to agents here (direct exchange); routing key: agent_key().
AGENTS_EXCHANGE: Final = "ca.agents"


def tasks_queue(coordinator: str) -> str:
    """Work that must not be lost: submissions, results, hello/goodbye (quorum queue)."""
    return f"ca.{coordinator}.tasks"


def tasks_key(coordinator: str) -> str:
    return f"{coordinator}.tasks"


def submit_queue(coordinator: str, principal: str) -> str:
    """One operator's submission lane (quorum queue, like the tasks queue): a flood from one
    principal queues in its own lane, not ahead of everyone else's work (PROTOCOL.md §4)."""
    return f"ca.{coordinator}.submit.{principal}"


def submit_key(coordinator: str, principal: str) -> str:
    return f"{coordinator}.submit.{principal}"


def status_queue(coordinator: str) -> str:
    """Frequent, replaceable telemetry: heartbeats, metrics, progress (bounded classic queue)."""
    return f"ca.{coordinator}.status"


def status_key(coordinator: str) -> str:
    return f"{coordinator}.status"


def agent_queue(coordinator: str, agent_id: str) -> str:
    return f"ca.{coordinator}.agent.{agent_id}"


def agent_key(coordinator: str, agent_id: str) -> str:
    return f"{coordinator}.agent.{agent_id}"


#: Clients reply queues are named CLIENT_QUEUE_PREFIX + principal + "." + anything; the
#: coordinator refuses to reply anywhere else.
CLIENT_QUEUE_PREFIX: Final = "ca.client."


def dead_letter_exchange(coordinator: str) -> str:
    """Rejected, expired and poison messages (fanout exchange)."""
    return f"ca.{coordinator}.dlx"


def dead_letter_queue(coordinator: str) -> str:
    return f"ca.{coordinator}.dead-letter"


def log_queue(coordinator: str) -> str:
    """The replicated log of the coordinators sharing the name (stream; docs/HA.md)."""
    return f"ca.{coordinator}.log"


def snapshot_queue(coordinator: str) -> str:
    """Snapshots of the replicated state, for a fresh replica to start from (stream)."""
    return f"ca.{coordinator}.snapshots"


def leader_queue(coordinator: str) -> str:
    """The broker lease: candidates consume it with single-active-consumer (quorum queue)."""
    return f"ca.{coordinator}.leader"


def epochs_queue(coordinator: str) -> str:
    """The broker lease's epochs: a stream whose offsets only grow."""
    return f"ca.{coordinator}.epochs"


def namespace_queues(coordinator: str) -> tuple[str, ...]:
    """Every queue named after the coordinator alone (not per agent or principal)."""
    return (tasks_queue(coordinator), status_queue(coordinator), dead_letter_queue(coordinator),
            log_queue(coordinator), snapshot_queue(coordinator), leader_queue(coordinator),
            epochs_queue(coordinator))


#: Which key encrypted the body: the principal id of the sender.
HEADER_SENDER: Final = "x-ca-sender"
#: Set on messages the coordinator dead-letters itself.
#: The coordinator's broker probe: a queue name nobody declares, on the default exchange.
PROBE_ROUTING_KEY: Final = "ca.probe.unrouted"
HEADER_REJECT_REASON: Final = "x-ca-reject-reason"
HEADER_REJECT_DETAIL: Final = "x-ca-reject-detail"
HEADER_ORIGINAL_ROUTING_KEY: Final = "x-ca-original-routing-key"
HEADER_ORIGINAL_EXCHANGE: Final = "x-ca-original-exchange"
#: On the dead-letter copy of a batch one of whose items was refused: which item (its index
#: from 0, and its id when it has a usable one). The other items were handled.
HEADER_REJECT_ITEM: Final = "x-ca-reject-item"
HEADER_REJECT_ITEM_ID: Final = "x-ca-reject-item-id"

#: Redeliveries after which the broker dead-letters a poison message on the tasks queue.
TASKS_DELIVERY_LIMIT: Final = 5
#: Heartbeats older than this are worthless: the broker drops them (not dead-lettered).
STATUS_MESSAGE_TTL_MS: Final = 60_000
STATUS_QUEUE_MAX_LENGTH: Final = 100_000
#: An agent's queue disappears after it has had no consumer for this long.
AGENT_QUEUE_EXPIRES_MS: Final = 10 * 60 * 1000

#: Frequent, replaceable messages: the status lane, a short token lifetime, not persisted.
#: Everything else carries work: the durable tasks lane and a long token lifetime, because it
#: may wait in a queue while its receiver restarts (handlers are idempotent for it).
TELEMETRY_TYPES: Final = frozenset({"agent.status", "agent.metrics", "task.progress"})
