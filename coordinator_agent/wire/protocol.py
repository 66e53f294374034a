"""Wire protocol v1: the envelope, every payload, and the pure codec (bytes <-> models).

The envelope is a discriminated union on ``type``: one validation pass picks the payload model.
Everything is ``extra="forbid"``, bounded and strict, because agent output is untrusted input:
no coercion between JSON types (``true`` is not ``1``, ``"1.5"`` is not a number; an integer
field takes an integer, a number field any number), only finite numbers, and integers that fit
in a signed 64-bit word, also inside free-form JSON values. Encryption is not done here; see
``security.py``. ``docs/PROTOCOL.md`` is the specification; a test keeps the two in step.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeAlias, Union

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_serializer,
    model_validator,
)

from coordinator_agent.exceptions import ProtocolError
from coordinator_agent.wire.constants import PROTOCOL_VERSION

Identifier = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@-]+$")]
Label = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
ShortText = Annotated[str, Field(max_length=1024)]
MAX_DESCRIPTION_CHARS = 8192
Description = Annotated[str, Field(min_length=1, max_length=MAX_DESCRIPTION_CHARS)]
Labels = Annotated[list[Label], Field(max_length=64)]
#: Most labels one task may carry (``task.submit`` ``labels``): each is a context the router
#: reads on every decision and every outcome of the task.
MAX_TASK_LABELS = 8


def _distinct_labels(labels: list[str]) -> list[str]:
    """Each label once, whatever its case (the router reads them in lower case), the first
    spelling kept; then at most ``MAX_TASK_LABELS``."""
    seen: dict[str, str] = {}
    for label in labels:
        seen.setdefault(label.lower(), label)
    if len(seen) > MAX_TASK_LABELS:
        raise ValueError(f"at most {MAX_TASK_LABELS} labels, not {len(seen)}")
    return list(seen.values())


TaskLabels = Annotated[Labels, AfterValidator(_distinct_labels)]
_TASK_LABELS: TypeAdapter[list[str]] = TypeAdapter(TaskLabels)


def task_labels(values: Sequence[str]) -> list[str]:
    """``values`` as a task's labels, by the rule of ``task.submit``; a ``ValueError`` says
    what is wrong (for ``route`` and ``/api/route``)."""
    try:
        return _TASK_LABELS.validate_python(list(values))
    except ValidationError as exc:
        problem = exc.errors(include_url=False, include_input=False)[0]
        where = problem["loc"][0] if problem["loc"] else None
        label = f"label {values[where][:80]!r}: " if isinstance(where, int) else ""
        raise ValueError(label + problem["msg"].removeprefix("Value error, ")) from None

#: Every integer on the wire, named or inside a JSON value, fits in a signed 64-bit word:
#: what other languages hold natively, and what the coordinator's store can write.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: An attempt number, an in-flight count: a non-negative 64-bit integer.
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
Attempt = Annotated[int, Field(ge=1, le=INT64_MAX)]
#: A leadership term's fencing epoch (PROTOCOL.md §10.7): absent from a coordinator without HA.
Epoch = Annotated[int, Field(ge=0, le=INT64_MAX)]


#: Digits -> "9", e/E -> "e", +/- -> "+", anything else -> "x": the shape of numbers in a text.
_NUMBER_SHAPES = bytes(
    ord("9") if chr(b).isdigit() and b < 128 else ord("e") if b in b"eE"
    else ord("+") if b in b"+-" else ord("x") for b in range(256))


def _numbers_in_range(data: bytes) -> bool:
    """True if no number in this JSON text can break the rules; cheap (C-speed) and sound.

    A number breaks them only with NaN or Infinity, a three-digit exponent (1e999; an exponent
    always follows a digit), or 19 digits in a row (every integer beyond 64 bits has them, and
    so does any float too large to write without an exponent). False alarms (such a shape
    inside a string, say a hex id) only cost the value-by-value check.
    """
    if b"NaN" in data or b"Infinity" in data:
        return False
    shapes = data.translate(_NUMBER_SHAPES)
    return b"9" * 19 not in shapes and b"9e999" not in shapes and b"9e+999" not in shapes


#: Validation context from ``decode``: the raw text, and whether its numbers are in range
#: (scanned at most once per message, and only if it has a JSON value to check at all).
_RAW_TEXT, _TEXT_IN_RANGE = "raw_text", "text_in_range"


def _bounded_json(value: JsonValue, info: ValidationInfo) -> JsonValue:
    """Free-form JSON obeys the same number rules as named fields (JSON has no NaN either)."""
    context = info.context
    if context is not None and _RAW_TEXT in context:
        if _TEXT_IN_RANGE not in context:
            context[_TEXT_IN_RANGE] = _numbers_in_range(context[_RAW_TEXT])
        if context[_TEXT_IN_RANGE]:
            return value  # every number in the text is fine: no need to walk it in Python
    stack = [value]
    pop, extend = stack.pop, stack.extend
    while stack:
        item = pop()
        kind = type(item)  # exact types: bool is not int here, and JSON makes no subclasses
        if kind is dict:
            extend(item.values())  # type: ignore[union-attr]
        elif kind is list:
            extend(item)  # type: ignore[arg-type]
        elif kind is int:
            if not INT64_MIN <= item <= INT64_MAX:  # type: ignore[operator]
                raise ValueError("integers must fit in a signed 64-bit word")
        elif kind is float and not math.isfinite(item):  # type: ignore[arg-type]
            raise ValueError("numbers must be finite")
    return value


#: Any JSON value (task input and output), with finite numbers and 64-bit integers only.
JSON = Annotated[JsonValue, AfterValidator(_bounded_json)]


class Model(BaseModel):
    # strict: JSON types are never coerced (no bool -> int, no numeric string -> float);
    # allow_inf_nan=False: NaN, Infinity and overflowing literals such as 1e999 are refused.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# --- agent -> coordinator -------------------------------------------------------------------


class AgentHello(Model):
    kind: Label
    capabilities: Labels = []
    max_concurrency: int = Field(1, ge=1, le=10_000)
    version: Annotated[str, Field(max_length=64)] = ""


class AgentStatus(Model):
    """Heartbeat. Self-contained, so a restarted coordinator rebuilds its view from heartbeats."""

    kind: Label
    capabilities: Labels = []
    max_concurrency: int = Field(1, ge=1, le=10_000)
    state: Literal["ready", "busy", "draining"] = "ready"
    in_flight: Count = 0
    load: float = Field(0.0, ge=0.0, le=1.0)


class AgentMetrics(Model):
    values: Annotated[dict[Label, float], Field(max_length=64)]


class AgentGoodbye(Model):
    reason: ShortText = ""


class TaskProgress(Model):
    task_id: Identifier
    attempt: Attempt
    progress: float = Field(ge=0.0, le=1.0)
    message: ShortText = ""


class TaskResult(Model):
    task_id: Identifier
    attempt: Attempt
    success: bool
    output: JSON = None
    error: ShortText | None = None
    duration_s: float = Field(0.0, ge=0.0)


# --- coordinator -> agent -------------------------------------------------------------------


class Directive(Model):
    """Coordinator -> agent orders. ``epoch`` fences a deposed leader (PROTOCOL.md §10.7); it is
    left out of the JSON when None, so a coordinator without HA sends what it always sent."""

    epoch: Epoch | None = None

    @model_serializer(mode="wrap")
    def _without_absent_epoch(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("epoch", 0) is None:
            del data["epoch"]
        return data


class TaskAssign(Directive):
    task_id: Identifier
    attempt: Attempt
    description: Description
    input: JSON = None
    timeout_s: float = Field(gt=0)


class TaskCancel(Directive):
    task_id: Identifier
    attempt: Attempt | None = None
    reason: ShortText = ""


class AgentDrain(Directive):
    reason: ShortText = ""


# --- client <-> coordinator -----------------------------------------------------------------


#: Most sub-tasks or steps one composite task may have (also bounds a planner's answer).
MAX_CHILDREN = 64


class SubtaskSpec(Model):
    """One sub-task of a fan-out, or one step of a sequential hand-off (see ``workflows.py``)."""

    description: Description
    kind: Label | None = None
    required_capabilities: Labels = []
    #: Omitted (null): the sub-task, or the first step, gets the parent's input.
    input: JSON = None
    timeout_s: float | None = Field(None, gt=0, le=86_400)


Children = Annotated[list[SubtaskSpec], Field(min_length=1, max_length=MAX_CHILDREN)]


class Decomposition(Model):
    """What an agent of kind ``planner`` must answer when asked to decompose a task."""

    subtasks: Children


#: A priority given by name (``task.submit`` ``priority``; or a band 0-9).
PriorityName = Literal["high", "medium", "low"]


class TaskSubmit(Model):
    #: Idempotency key; a re-submitted id returns the existing task. Default: the envelope id.
    task_id: Identifier | None = None
    description: Description
    kind: Label | None = None
    required_capabilities: Labels = []
    input: JSON = None
    timeout_s: float | None = Field(None, gt=0, le=86_400)
    max_retries: int | None = Field(None, ge=0, le=20)
    #: ``high``, ``medium``, ``low`` or a band 0-9 (higher first); omitted: from the analysis'
    #: urgency when the coordinator is configured so, else ``medium``. See PROTOCOL.md §20.1.
    priority: PriorityName | Annotated[int, Field(ge=0, le=9)] | None = None
    #: What the submitter's ticket system already knows of the task (its type, component,
    #: team...): the router pools the evidence of every task with a label (ROUTING.md,
    #: "Labels"); sub-tasks and steps inherit them.
    labels: TaskLabels = []
    #: Queue for task.accepted / task.completed (default exchange); omitted = no replies.
    reply_to: Annotated[str, Field(max_length=255)] | None = None
    # --- composite tasks (workflows.py); a composite task is never assigned to an agent itself.
    #: Fan-out: run these concurrently and merge their outputs.
    subtasks: Children | None = None
    #: Fan-out planned by an agent of kind ``planner`` (its output: a ``Decomposition``).
    decompose: bool = False
    #: Sequential hand-off: each step gets ``{"input": ..., "previous": <step before's output>}``.
    steps: Children | None = None
    #: Fan-out only: sub-tasks running at once (default 8).
    max_concurrency: int | None = Field(None, ge=1, le=MAX_CHILDREN)
    #: Fan-out only: what a failed sub-task does to the rest (default ``fail``).
    on_subtask_error: Literal["skip", "fail", "retry"] | None = None
    #: Fan-out with ``on_subtask_error="retry"``: runs of a failed sub-task after its first
    #: (each run has its own ``max_retries`` attempts); default 1.
    subtask_retries: int | None = Field(None, ge=0, le=10)
    #: Fan-out only: ``combine`` (deterministic, the default) or an agent of kind ``synthesizer``.
    merge: Literal["combine", "synthesizer"] | None = None
    #: ``merge="synthesizer"`` only: the synthesizer's own input, next to the merged results.
    merge_input: JSON = None

    @model_validator(mode="after")
    def _one_composition(self) -> TaskSubmit:
        shapes = [name for name, given in (("subtasks", self.subtasks is not None),
                                           ("decompose", self.decompose),
                                           ("steps", self.steps is not None)) if given]
        if len(shapes) > 1:
            raise ValueError(f"{' and '.join(shapes)} are mutually exclusive: give one of them")
        if shapes and (self.kind is not None or self.required_capabilities):
            raise ValueError(f"a task with {shapes[0]} is never assigned itself: give kind and "
                             "required_capabilities per sub-task or step instead")
        fan_out_only = [name for name, given in (
            ("max_concurrency", self.max_concurrency is not None),
            ("on_subtask_error", self.on_subtask_error is not None),
            ("subtask_retries", self.subtask_retries is not None),
            ("merge", self.merge is not None),
            ("merge_input", self.merge_input is not None)) if given]
        if fan_out_only and shapes not in (["subtasks"], ["decompose"]):
            raise ValueError(f"{', '.join(fan_out_only)} only apply to a fan-out "
                             "(subtasks or decompose)")
        if self.merge_input is not None and self.merge != "synthesizer":
            raise ValueError('merge_input is for the synthesizer: it needs merge="synthesizer"')
        if self.subtask_retries is not None and self.on_subtask_error != "retry":
            raise ValueError('subtask_retries needs on_subtask_error="retry"')
        return self

    @model_serializer(mode="wrap")
    def _without_empty_labels(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Left out when empty, so that a coordinator of the version before labels takes the
        # submissions of a client that gives none.
        data: dict[str, Any] = handler(self)
        if data.get("labels") == []:
            del data["labels"]
        return data

    @property
    def composite(self) -> bool:
        return self.subtasks is not None or self.decompose or self.steps is not None


class TaskAccepted(Model):
    task_id: Identifier
    status: str
    duplicate: bool = False


class AttemptSummary(Model):
    attempt: Attempt
    agent_id: str
    outcome: str
    error: str | None = None
    duration_s: float | None = None


#: The statuses a ``task.completed`` may carry (``rejected``: no task was created;
#: ``escalated``: not final, the task waits for an operator).
COMPLETED_STATUSES = ("succeeded", "failed", "cancelled", "rejected", "escalated")


def _completed_status(status: str) -> str:
    # A check rather than a Literal, so the coordinator may pass its TaskStatus values as str.
    if status not in COMPLETED_STATUSES:
        raise ValueError(f"status must be one of {', '.join(COMPLETED_STATUSES)}")
    return status


class TaskCompleted(Model):
    task_id: Identifier
    #: ``escalated`` is not final: it says the task waits for an operator (PROTOCOL.md §20.3).
    status: Annotated[str, AfterValidator(_completed_status)]
    output: JSON = None
    error: str | None = None
    attempts: list[AttemptSummary] = []
    #: ``rejected`` only: when the submission may be tried again (PROTOCOL.md §20.2).
    retry_after_s: float | None = Field(None, ge=0)


# --- several messages in one (any direction; see ``batch.py``) --------------------------------

#: Most items one ``batch`` message may carry (PROTOCOL.md §9.13).
MAX_BATCH_ITEMS = 64


class OutOfRange:
    """Stands for a batch item with a number the rules refuse (NaN, beyond 64 bits): the item
    is refused on its own (``batch.py``), not the whole batch."""

    __slots__ = ("id", "why")

    def __init__(self, why: str, item_id: object) -> None:
        self.why = why
        self.id = item_id  # what the item said its id was (unchecked)


def _item_numbers(value: Any, info: ValidationInfo) -> Any:
    try:
        return _bounded_json(value, info)
    except ValueError as exc:
        return OutOfRange(str(exc), value.get("id") if isinstance(value, dict) else None)


class Batch(Model):
    """Several messages of one sender in one sealed message. The items are not validated
    here: each is on its own (``batch.py``), so one bad item costs only itself."""

    items: Annotated[list[Annotated[Any, AfterValidator(_item_numbers)]],
                     Field(min_length=1, max_length=MAX_BATCH_ITEMS)]


Payload: TypeAlias = (
    AgentHello | AgentStatus | AgentMetrics | AgentGoodbye | TaskProgress | TaskResult
    | TaskAssign | TaskCancel | AgentDrain | TaskSubmit | TaskAccepted | TaskCompleted | Batch
)

PAYLOAD_TYPES: dict[str, type[Model]] = {
    "agent.hello": AgentHello,
    "agent.status": AgentStatus,
    "agent.metrics": AgentMetrics,
    "agent.goodbye": AgentGoodbye,
    "task.progress": TaskProgress,
    "task.result": TaskResult,
    "task.assign": TaskAssign,
    "task.cancel": TaskCancel,
    "agent.drain": AgentDrain,
    "task.submit": TaskSubmit,
    "task.accepted": TaskAccepted,
    "task.completed": TaskCompleted,
    "batch": Batch,
}
MESSAGE_TYPES = frozenset(PAYLOAD_TYPES)
TYPE_OF_PAYLOAD = {model: name for name, model in PAYLOAD_TYPES.items()}


class Envelope(Model):
    """A decoded message: what every handler receives (an instance of a per-type subclass)."""

    v: int
    id: str
    type: str
    sender: str
    sent_at: float
    correlation_id: str | None = None
    payload: Any


def _envelope_class(type_name: str, payload_model: type[Model]) -> type[Envelope]:
    """The validating envelope of one message type: the wire constraints, its payload model."""
    class_name = "".join(part.title() for part in type_name.split(".")) + "Envelope"
    annotations = {
        # An int equal to 1: Literal[1] would also take true and 1.0 (they compare equal).
        "v": Annotated[int, Field(ge=PROTOCOL_VERSION, le=PROTOCOL_VERSION)],
        "id": Identifier,
        "type": Literal[type_name],
        "sender": Identifier,
        "correlation_id": Identifier | None,
        "payload": payload_model,
    }
    namespace = {"__annotations__": annotations, "__module__": __name__, "correlation_id": None}
    return type(class_name, (Envelope,), namespace)


_ENVELOPE_CLASSES = [_envelope_class(t, m) for t, m in PAYLOAD_TYPES.items()]


# One discriminated union over every envelope class: pydantic validates the JSON in one pass.
# Only keys are cached: pydantic's default also keeps up to 16,384 short string values (message
# and task ids, each unique), which outlive a flood and hold its heap pages (RELIABILITY.md).
_ENVELOPE_ADAPTER: TypeAdapter[Any] = TypeAdapter(
    Annotated[Union[tuple(_ENVELOPE_CLASSES)], Field(discriminator="type")],  # type: ignore[arg-type]  # noqa: UP007
    config=ConfigDict(cache_strings="keys"),
)


def new_message_id() -> str:
    """32 random hex digits, as ``uuid4().hex`` gave, for a third of its cost (a few per task)."""
    return os.urandom(16).hex()


def make_envelope(
    payload: Model, *, sender: str, correlation_id: str | None = None, message_id: str | None = None
) -> Envelope:
    # Our own values around an already validated payload: nothing left to check.
    return Envelope.model_construct(
        v=PROTOCOL_VERSION,
        id=message_id or new_message_id(),
        type=TYPE_OF_PAYLOAD[type(payload)],
        sender=sender,
        sent_at=time.time(),
        correlation_id=correlation_id,
        payload=payload,
    )


def encode(envelope: Envelope) -> bytes:
    """Envelope -> UTF-8 JSON bytes (before encryption)."""
    return orjson.dumps(
        {
            "v": envelope.v,
            "id": envelope.id,
            "type": envelope.type,
            "sender": envelope.sender,
            "sent_at": envelope.sent_at,
            "correlation_id": envelope.correlation_id,
            "payload": _payload_json(envelope.payload),
        }
    )


def _payload_json(payload: Model) -> Any:
    if type(payload) is Batch and all(type(item) is dict for item in payload.items):
        # Items are JSON already (``batch.item_of`` dumped each payload): pydantic would walk
        # every value of every item again to find its type, for the same output.
        return {"items": payload.items}
    return payload.model_dump(mode="json")


def decode(data: bytes) -> Envelope:
    """UTF-8 JSON bytes (after decryption) -> validated Envelope, or ProtocolError."""
    # Scanning the bytes is far cheaper than walking a large input or output in Python.
    try:
        parsed = _ENVELOPE_ADAPTER.validate_json(data, context={_RAW_TEXT: data})
    except ValidationError as exc:
        raise _protocol_error(exc, data) from None
    return parsed  # type: ignore[no-any-return]


def _protocol_error(exc: ValidationError, data: bytes) -> ProtocolError:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    kind, loc = first["type"], first["loc"]
    if kind == "json_invalid":
        return ProtocolError("malformed", "body is not valid JSON")
    if kind == "union_tag_not_found":
        return ProtocolError("malformed", "envelope has no 'type'")
    if kind == "union_tag_invalid":
        return ProtocolError("unknown_type", f"unknown message type {_peek(data, 'type')!r}")
    if not loc:
        return ProtocolError("malformed", "envelope must be a JSON object")
    if len(loc) >= 2 and loc[1] == "v" and kind != "missing":
        return ProtocolError("unsupported_version", f"protocol version {_peek(data, 'v')!r}")
    where = ", ".join(".".join(str(p) for p in e["loc"][1:]) for e in errors[:3])
    if kind == "value_error":  # our own validators' words, never a payload value
        message = str(first["msg"]).removeprefix("Value error, ")[:300]
        return ProtocolError("malformed", f"invalid {where or 'payload'}: {message}")
    return ProtocolError("malformed", f"invalid fields: {where}")


def _peek(data: bytes, key: str) -> object:
    try:
        value = orjson.loads(data).get(key)
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, (int, str)) and len(str(value)) <= 64 else "<invalid>"
