"""The wire is strict: no coercion between JSON types, finite numbers, 64-bit integers.

Each case is one change to a valid message, decoded as bytes exactly as they would arrive, so
that the JSON parser's own leniency (NaN, Infinity, 1e999, huge integers) is covered too.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from cryptography.fernet import Fernet

from coordinator_agent.exceptions import ProtocolError, SecurityError
from coordinator_agent.wire import protocol
from coordinator_agent.wire.constants import HEADER_SENDER
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.security import SecurityManager

HUGE = "123456789012345678901234567890"  # > 2**63: JSON allows it, the wire does not


def _json(envelope_type: str, payload: str, **envelope: str) -> bytes:
    """An envelope written by hand, so that fields can hold what orjson refuses to write."""
    fields = {"v": "1", "id": '"m-1"', "type": f'"{envelope_type}"', "sender": '"agent-1"',
              "sent_at": "1700000000.5", "correlation_id": "null", "payload": payload,
              **envelope}
    return ("{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}").encode()


def _reason(data: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        protocol.decode(data)
    return info.value.reason


STATUS = '{"kind":"k","state":"ready","in_flight":%s,"load":%s}'
RESULT = '{"task_id":"t","attempt":%s,"success":%s,"output":%s,"duration_s":%s}'
SUBMIT = '{"description":"d","input":%s,"timeout_s":%s,"decompose":%s}'


@pytest.mark.parametrize("version", ["true", "false", '"1"', "1.0", "1e0", "2", "null"])
def test_version_must_be_the_integer_one(version: str) -> None:
    assert _reason(_json("agent.goodbye", "{}", v=version)) == "unsupported_version"


@pytest.mark.parametrize("sent_at", ['"123"', "true", "NaN", "Infinity", "-Infinity", "1e999",
                                     "null", "[1]"])
def test_sent_at_must_be_a_finite_number(sent_at: str) -> None:
    assert _reason(_json("agent.goodbye", "{}", sent_at=sent_at)) == "malformed"


@pytest.mark.parametrize(
    ("type_name", "payload"),
    [
        # bool, string, float where an integer belongs
        ("agent.status", STATUS % ("true", "0.5")),
        ("agent.status", STATUS % ('"1"', "0.5")),
        ("agent.status", STATUS % ("1.0", "0.5")),
        ("task.result", RESULT % ("true", "true", "null", "0.1")),
        ("task.result", RESULT % ('"1"', "true", "null", "0.1")),
        # int or string where a boolean belongs
        ("task.result", RESULT % ("1", "1", "null", "0.1")),
        ("task.result", RESULT % ("1", '"true"', "null", "0.1")),
        ("task.submit", SUBMIT % ("null", "5", "1")),
        # bool or string where a number belongs
        ("agent.status", STATUS % ("0", "true")),
        ("agent.status", STATUS % ("0", '"0.5"')),
        ("task.submit", SUBMIT % ("null", '"5"', "false")),
        # numbers where strings belong
        ("agent.hello", '{"kind":7}'),
        ("task.progress", '{"task_id":5,"attempt":1,"progress":0.5}'),
        # non-finite numbers in named fields, in metrics, and inside free-form JSON
        ("agent.status", STATUS % ("0", "NaN")),
        ("task.progress", '{"task_id":"t","attempt":1,"progress":NaN}'),
        ("task.result", RESULT % ("1", "true", "null", "Infinity")),
        ("task.result", RESULT % ("1", "true", "null", "1e999")),
        ("agent.metrics", '{"values":{"cpu":Infinity}}'),
        ("agent.metrics", '{"values":{"cpu":NaN}}'),
        ("agent.metrics", '{"values":{"cpu":-1e999}}'),
        ("agent.metrics", '{"values":{"cpu":"0.5"}}'),
        ("agent.metrics", '{"values":{"cpu":true}}'),
        ("task.result", RESULT % ("1", "true", '{"x":[1,NaN]}', "0.1")),
        ("task.result", RESULT % ("1", "true", "Infinity", "0.1")),
        ("task.submit", SUBMIT % ('{"a":{"b":1e999}}', "5", "false")),
        # integers beyond a signed 64-bit word, named or inside JSON
        ("task.progress", f'{{"task_id":"t","attempt":{HUGE},"progress":0.5}}'),
        ("agent.status", STATUS % (HUGE, "0.5")),
        ("task.submit", SUBMIT % (HUGE, "5", "false")),
        ("task.submit", SUBMIT % (f'{{"n":[{HUGE}]}}', "5", "false")),
        ("task.submit", SUBMIT % ("-" + HUGE, "5", "false")),
        ("task.submit", SUBMIT % ("9223372036854775808", "5", "false")),
        ("task.result", RESULT % ("1", "true", f'{{"n":{HUGE}}}', "0.1")),
    ],
)
def test_no_coercion_and_no_non_finite_numbers(type_name: str, payload: str) -> None:
    assert _reason(_json(type_name, payload)) == "malformed"


@pytest.mark.parametrize(
    ("type_name", "payload"),
    [
        # JSON has one number type: an integer is a fine value for a number field.
        ("agent.status", STATUS % ("0", "1")),
        ("task.submit", SUBMIT % ("null", "5", "false")),
        ("task.result", RESULT % ("1", "false", "null", "0")),
        ("agent.metrics", '{"values":{"cpu":1,"rss":-2.5e3}}'),
        # The 64-bit bounds themselves, and floats of any finite size inside JSON.
        ("task.submit", SUBMIT % ('{"max":9223372036854775807,"min":-9223372036854775808,'
                                  '"f":1e300,"b":true,"s":"1"}', "5", "false")),
    ],
)
def test_natural_json_types_are_accepted(type_name: str, payload: str) -> None:
    decoded = protocol.decode(_json(type_name, payload))
    assert decoded.type == type_name


def test_the_64_bit_bounds_are_kept_exactly() -> None:
    payload = SUBMIT % ('[9223372036854775807,-9223372036854775808]', "5", "false")
    decoded = protocol.decode(_json("task.submit", payload))
    assert decoded.payload.input == [2**63 - 1, -(2**63)]
    assert decoded.payload.timeout_s == 5.0
    assert isinstance(decoded.payload.timeout_s, float)


def test_a_rejection_names_the_field_but_never_echoes_the_value() -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode(_json("task.submit", SUBMIT % (f'{{"secret":{HUGE}}}', "5", "false")))
    assert "payload.input" in info.value.detail
    assert "64-bit" in info.value.detail
    assert HUGE not in info.value.detail


def test_python_side_models_are_strict_too() -> None:
    # The SDK builds the same models: it cannot send what the coordinator would refuse.
    with pytest.raises(ValueError):
        protocol.TaskProgress(task_id="t", attempt=True, progress=0.5)
    with pytest.raises(ValueError):
        protocol.AgentMetrics(values={"cpu": float("nan")})
    with pytest.raises(ValueError):
        protocol.TaskResult(task_id="t", attempt=1, success=True, output={"n": 2**64})
    with pytest.raises(ValueError):
        protocol.TaskSubmit(description="d", timeout_s="5")  # type: ignore[arg-type]
    assert protocol.AgentStatus(kind="k", load=1).load == 1.0


# --- the telemetry age check sees only finite stamps, bounded both ways ----------------------


def _security() -> tuple[SecurityManager, Fernet]:
    ring = Keyring()
    ring.generate("agent-1", "agent")
    principal = ring.get("agent-1")
    assert principal is not None
    security = SecurityManager(ring, "coordinator", coordinator_id="coordinator",
                               max_message_bytes=262_144, ttl_s=120, replay_window_s=180)
    return security, Fernet(principal.keys[0].get_secret_value())


@pytest.mark.parametrize("sent_at", ["NaN", "Infinity", "1e999"])
def test_non_finite_sent_at_never_reaches_the_age_check(sent_at: str) -> None:
    security, key = _security()
    body = key.encrypt(_json("agent.status", STATUS % ("0", "0"), sent_at=sent_at))
    with pytest.raises(ProtocolError) as info:
        security.open(body, {HEADER_SENDER: "agent-1"})
    assert info.value.reason == "malformed"


@pytest.mark.parametrize(("offset", "accepted"), [(-300, False), (-60, True), (30, True),
                                                  (300, False), (1e12, False)])
def test_telemetry_stamp_is_bounded_in_both_directions(offset: float, accepted: bool) -> None:
    security, key = _security()
    sent_at: Any = repr(time.time() + offset)
    body = key.encrypt(_json("agent.status", STATUS % ("0", "0"), sent_at=sent_at,
                             id=f'"m-{offset}"'))
    if accepted:
        assert security.open(body, {HEADER_SENDER: "agent-1"}).type == "agent.status"
    else:
        with pytest.raises(SecurityError) as info:
            security.open(body, {HEADER_SENDER: "agent-1"})
        assert info.value.reason == "expired"


def test_hand_written_json_helper_builds_valid_messages() -> None:
    # Guard for the cases above: the unchanged message decodes.
    decoded = protocol.decode(_json("agent.status", STATUS % ("2", "0.5")))
    assert orjson.loads(protocol.encode(decoded))["payload"]["in_flight"] == 2


# --- the byte scan that spares decode() the walk is sound --------------------------------------


@pytest.mark.parametrize("text", [
    b'{"a":1e999}', b'{"a":-1.5E+308}', b'{"a":2e-400}', b"[NaN]", b"[-Infinity]",
    b"[12345678901234567890]", b"[-9223372036854775809]", b"[9223372036854775808]",
    b'{"a": 1.0e308}', b"[" + b"9" * 400 + b".0]",
])
def test_the_scan_never_misses_a_number_that_could_break_the_rules(text: bytes) -> None:
    assert not protocol._numbers_in_range(text)


@pytest.mark.parametrize("text", [
    b'{"a":1e99,"b":-922337203685477580,"c":0.5,"d":-1E-99}', b'{"id":"abcdef","n":[1,2,3]}',
])
def test_the_scan_passes_ordinary_numbers(text: bytes) -> None:
    assert protocol._numbers_in_range(text)


@pytest.mark.parametrize("value", [
    '"id-1e286f"', '"1234567890123456789012"', '"NaN is a string here"',
])
def test_a_false_alarm_only_costs_the_walk(value: str) -> None:
    # Shapes inside strings make decode() check value by value, and the message still passes.
    data = _json("task.submit", SUBMIT % (f'{{"s":{value},"n":9223372036854775807}}', "5",
                                          "false"))
    assert not protocol._numbers_in_range(data)
    assert protocol.decode(data).payload.input["n"] == 2**63 - 1


@pytest.mark.parametrize(("text", "value"), [
    ('{"n":[1,NaN]}', {"n": [1, float("nan")]}),
    ('{"n":123456789012345678901234567890}', {"n": 123456789012345678901234567890}),
    ('{"n":[1.5,-2,1e300]}', {"n": [1.5, -2, 1e300]}),
])
def test_with_and_without_the_scan_the_verdict_is_the_same(text: str, value: Any) -> None:
    """decode() (bytes, scanned) and a model built in Python (always walked) agree."""
    data = _json("task.submit", SUBMIT % (text, "5", "false"))
    assert _verdict(lambda: protocol.decode(data)) == _verdict(
        lambda: protocol.TaskSubmit(description="d", input=value))


def _verdict(call: Any) -> bool:
    try:
        call()
    except (ProtocolError, ValueError):
        return False
    return True
