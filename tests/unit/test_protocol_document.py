"""docs/PROTOCOL.md is the reference: everything the code puts on the wire is written down there.

Parses the code (message types, payload models, rejection reasons raised anywhere in the package)
and the document (its sections and tables), and checks them against each other both ways where
that makes sense.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from coordinator_agent import exceptions
from coordinator_agent.wire import constants, protocol

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
PACKAGE = ROOT / "coordinator_agent"

REJECTION_CLASSES = {
    cls.__name__ for cls in vars(exceptions).values()
    if isinstance(cls, type) and issubclass(cls, exceptions.RejectedMessage)
}


def _section(heading: str) -> str:
    """The text of the section whose heading starts with ``heading``, up to the next one."""
    match = re.search(rf"^(#+) {re.escape(heading)}.*$", DOC, re.MULTILINE)
    assert match, f"PROTOCOL.md has no section {heading!r}"
    level = len(match.group(1))
    rest = DOC[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def _table_names(text: str) -> set[str]:
    """The names in the first column of every table in ``text``: ``| `name` | ...``."""
    return set(re.findall(r"^\| `([a-z_]+)` \|", text, re.MULTILINE))


def _reasons_in_code() -> set[str]:
    """Every reason string the package rejects a message with, read from its source."""
    reasons: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            args = node.args
            keyword = next((k.value for k in node.keywords if k.arg == "reason"), None)
            if name in REJECTION_CLASSES and args:
                index = 0
            elif name == "dead_letter" and len(args) >= 2:
                index = 1  # dead_letter(message, reason, detail)
            elif name == "labels" and "rejected" in ast.unparse(func) and args:
                index = 0  # metrics.messages_rejected.labels(reason)
            elif name == "park" and keyword is not None:
                index = -1  # park(payload, peer=..., reason="...")
            else:
                continue
            reasons |= _strings(keyword if index == -1 else args[index], path)
    return reasons


def _strings(node: ast.expr, path: Path) -> set[str]:
    """The reason strings an argument can be: a constant, a conditional of constants, or a
    local variable assigned from those in the same module."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _strings(node.body, path) | _strings(node.orelse, path)
    if isinstance(node, ast.Name):
        found: set[str] = set()
        for other in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(other, ast.Assign)
                    and isinstance(other.value, ast.Constant | ast.IfExp)
                    and any(isinstance(t, ast.Name) and t.id == node.id for t in other.targets)):
                found |= _strings(other.value, path)
        return found
    return set()


def test_the_preamble_says_the_document_is_the_reference() -> None:
    preamble = DOC.split("Contents", 1)[0]
    assert "it is the reference" in preamble
    assert "the code is the reference" not in DOC.lower()


def test_every_message_type_has_its_section_and_summary_row() -> None:
    summary = _section("9. Message types")
    for type_name in protocol.MESSAGE_TYPES:
        assert f"| `{type_name}` |" in summary, type_name
        _section(f"9.{_number_of(type_name)} `{type_name}`")
    assert f"one of the {len(protocol.MESSAGE_TYPES)} message types" in DOC


def _number_of(type_name: str) -> int:
    match = re.search(rf"^### 9\.(\d+) `{re.escape(type_name)}`", DOC, re.MULTILINE)
    assert match, f"no section 9.x for {type_name}"
    return int(match.group(1))


@pytest.mark.parametrize("type_name", sorted(protocol.PAYLOAD_TYPES))
def test_every_payload_field_is_in_the_table_of_its_message(type_name: str) -> None:
    model = protocol.PAYLOAD_TYPES[type_name]
    documented = _table_names(_section(f"9.{_number_of(type_name)} `{type_name}`"))
    assert set(model.model_fields) <= documented, set(model.model_fields) - documented


@pytest.mark.parametrize("model", [protocol.SubtaskSpec, protocol.AttemptSummary])
def test_nested_objects_are_documented_field_by_field(model: type[protocol.Model]) -> None:
    section = "9.10 `task.submit`" if model is protocol.SubtaskSpec else "9.12 `task.completed`"
    table = _section(section).split(f"{model.__name__} (no other keys allowed", 1)[1]
    assert set(model.model_fields) <= _table_names(table)


def test_a_planners_answer_is_documented() -> None:
    assert set(protocol.Decomposition.model_fields) == {"subtasks"}
    assert '{"subtasks": [' in _section("9.10 `task.submit`")


def test_every_envelope_field_is_in_the_envelope_table() -> None:
    table = _table_names(_section("7. The envelope"))
    assert set(protocol.Envelope.model_fields) <= table
    # ... and the table lists nothing the envelope does not have, besides the value types.
    assert {name for name in table if name not in protocol.Envelope.model_fields} == set()


def test_every_rejection_reason_in_the_code_is_documented_and_vice_versa() -> None:
    in_code = _reasons_in_code()
    # A guard against a parser that finds nothing: these are raised in wire/ and coordinator/.
    assert {"malformed", "expired", "forbidden", "not_assigned", "handler_error"} <= in_code
    table = _section("13. Validation order and rejection reasons")
    documented = set(re.findall(r"^\| [0-9\u2013-]+ \|[^|]*\| `([a-z_]+)` \|", table, re.MULTILINE))
    assert in_code == documented, (in_code - documented, documented - in_code)


def test_roles_and_telemetry_types_match_the_document() -> None:
    from coordinator_agent.wire.security import POLICY

    roles = _section("2. Principals, roles and names")
    for role, types in POLICY.items():
        row = re.search(rf"^\| `{role}` \| (.*) \|$", roles, re.MULTILINE)
        assert row, role
        assert set(re.findall(r"`([a-z.]+)`", row.group(1))) == set(types), role
    telemetry = ", ".join(f"`{t}`" for t in sorted(constants.TELEMETRY_TYPES, key=[
        "agent.status", "agent.metrics", "task.progress"].index))
    assert telemetry in DOC


def test_queue_arguments_are_those_the_code_declares() -> None:
    declarations = _section("4.2 Declarations")
    assert f"`x-delivery-limit = {constants.TASKS_DELIVERY_LIMIT}`" in declarations
    assert f"`x-message-ttl = {constants.STATUS_MESSAGE_TTL_MS}`" in declarations
    assert f"`x-max-length = {constants.STATUS_QUEUE_MAX_LENGTH}`" in declarations
    assert f"`x-expires = {constants.AGENT_QUEUE_EXPIRES_MS}`" in declarations
    assert "| `x-delivery-limit` | 5 | `b` signed 8-bit integer |" in declarations


def test_the_wire_constants_are_documented() -> None:
    for value in (constants.CONTENT_TYPE, constants.COORDINATOR_EXCHANGE,
                  constants.AGENTS_EXCHANGE, constants.HEADER_SENDER,
                  constants.HEADER_REJECT_REASON, constants.HEADER_REJECT_DETAIL,
                  constants.HEADER_ORIGINAL_EXCHANGE, constants.HEADER_ORIGINAL_ROUTING_KEY,
                  constants.CLIENT_QUEUE_PREFIX):
        assert f"`{value}" in DOC, value


def test_the_example_agents_operations_are_documented() -> None:
    from coordinator_agent.agent import examples

    ops = set(re.findall(r"`(\w+)`", examples.__doc__ or "")) & set(
        re.findall(r"^\| `(\w+)` \|", _section("18. The example agent"), re.MULTILINE))
    assert ops >= {"noop", "echo", "sleep", "fail", "stats", "hash", "decompose", "synthesize"}


def test_the_documented_stats_example_is_what_the_example_agent_computes() -> None:
    from coordinator_agent.agent.examples import text_stats

    stats = text_stats("The cat. The hat!")
    assert {k: v for k, v in stats.items() if k != "sha256"} == {
        "characters": 17, "words": 4, "unique_words": 3, "sentences": 2,
        "top_words": [{"word": "the", "count": 2}, {"word": "cat", "count": 1},
                      {"word": "hat", "count": 1}]}
    assert '"The cat. The hat!"' in _section("18. The example agent")
