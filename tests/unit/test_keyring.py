"""Keyring: generation, rotation, subsets, the 0600 file, loading errors, API tokens."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, MultiFernet

from coordinator_agent.exceptions import ConfigError
from coordinator_agent.wire.keyring import KEEP_OLD_KEYS, Keyring, Principal


def _secrets(principal: Principal) -> list[str]:
    return [k.get_secret_value() for k in principal.keys]


def test_generate_agent_and_operator() -> None:
    ring = Keyring()
    agent = ring.generate("agent-1", "agent")
    operator = ring.generate("op-1", "operator")
    assert ring.get("agent-1") is agent
    assert agent.role == "agent"
    assert len(agent.keys) == 1
    Fernet(agent.keys[0].get_secret_value())  # a usable Fernet key
    assert agent.api_token is None
    assert operator.api_token is not None
    assert len(operator.api_token.get_secret_value()) >= 32
    assert _secrets(agent) != _secrets(operator)
    assert ring.get("nobody") is None


def test_generate_twice_is_refused() -> None:
    ring = Keyring()
    ring.generate("a", "agent")
    with pytest.raises(ConfigError, match="already exists"):
        ring.generate("a", "operator")


def test_ensure_is_idempotent() -> None:
    ring = Keyring()
    first = ring.ensure("a", "agent")
    assert ring.ensure("a", "agent") is first
    assert _secrets(ring.ensure("a", "agent")) == _secrets(first)


def test_rotate_keeps_old_keys_newest_first() -> None:
    ring = Keyring()
    original = _secrets(ring.generate("a", "agent"))
    rotated = ring.rotate("a")
    assert len(rotated.keys) == 2
    assert _secrets(rotated)[1:] == original
    history = _secrets(rotated)
    for _ in range(5):
        ring.rotate("a")
    keys = _secrets(ring.get("a"))  # type: ignore[union-attr]
    assert len(keys) == KEEP_OLD_KEYS + 1
    assert len(set(keys)) == len(keys)
    assert not set(keys) & set(history)
    for key in keys:
        Fernet(key)


def test_rotated_keyring_decrypts_old_messages() -> None:
    ring = Keyring()
    principal = ring.generate("a", "agent")
    token = Fernet(principal.keys[0].get_secret_value()).encrypt(b"hello")
    ring.rotate("a")
    multi = MultiFernet([Fernet(k.get_secret_value()) for k in principal.keys])
    assert multi.decrypt(token) == b"hello"


def test_rotate_unknown_principal() -> None:
    with pytest.raises(ConfigError, match="unknown principal"):
        Keyring().rotate("ghost")


def test_subset() -> None:
    ring = Keyring()
    ring.generate("a", "agent")
    ring.generate("b", "agent")
    ring.generate("op", "operator")
    sub = ring.subset("a")
    assert set(sub.principals) == {"a"}
    assert _secrets(sub.get("a")) == _secrets(ring.get("a"))  # type: ignore[arg-type]
    assert sub.get("b") is None
    with pytest.raises(ConfigError, match="unknown principal"):
        ring.subset("ghost")


def test_save_load_round_trip(tmp_path: Path) -> None:
    ring = Keyring()
    ring.generate("agent-1", "agent")
    ring.generate("op-1", "operator")
    ring.rotate("agent-1")
    path = tmp_path / "nested" / "keyring.json"
    ring.save(path)

    loaded = Keyring.load(path)
    assert set(loaded.principals) == {"agent-1", "op-1"}
    for pid, original in ring.principals.items():
        copy = loaded.get(pid)
        assert copy is not None
        assert copy.role == original.role
        assert _secrets(copy) == _secrets(original)
        if original.api_token is None:
            assert copy.api_token is None
        else:
            assert copy.api_token is not None
            assert copy.api_token.get_secret_value() == original.api_token.get_secret_value()


def test_saved_file_is_private_and_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    ring = Keyring()
    ring.generate("a", "agent")
    ring.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Overwriting a looser file yields a 0600 file again, and no temp files are left behind.
    path.chmod(0o644)
    ring.generate("b", "agent")
    ring.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keyring.json"]
    assert set(Keyring.load(path).principals) == {"a", "b"}


def test_subset_export_holds_only_that_principal(tmp_path: Path) -> None:
    ring = Keyring()
    ring.generate("a", "agent")
    other = ring.generate("b", "agent")
    path = tmp_path / "a.json"
    ring.subset("a").save(path)
    text = path.read_text()
    for secret in _secrets(other):
        assert secret not in text
    assert set(json.loads(text)["principals"]) == {"a"}


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.json"
    with pytest.raises(ConfigError) as info:
        Keyring.load(path)
    message = str(info.value)
    assert str(path) in message
    assert "does not exist" in message
    assert "keys generate" in message  # tells the user how to create one


def test_load_or_create(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    assert Keyring.load_or_create(path).principals == {}
    ring = Keyring()
    ring.generate("a", "agent")
    ring.save(path)
    assert set(Keyring.load_or_create(path).principals) == {"a"}


def _private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(("text", "line", "column"),
                         [("{not json", 1, 2), ("", 1, 1), ('{\n  "principals": {,\n}', 2, 18)])
def test_corrupt_json_names_the_file_the_line_and_what_to_do(
    tmp_path: Path, text: str, line: int, column: int
) -> None:
    path = _private(tmp_path / "k.json", text)
    with pytest.raises(ConfigError) as info:
        Keyring.load(path)
    message = str(info.value)
    assert f"keyring {path} is not valid JSON (line {line}, column {column}:" in message
    assert "keys generate" in message and "backup" in message
    assert "JSONDecodeError" not in message


def test_binary_keyring_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.write_bytes(b"\xff\xfe\x00")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="is not UTF-8 text") as info:
        Keyring.load(path)
    assert str(path) in str(info.value)


def test_load_directory_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot be read \(Is a directory\)"):
        Keyring.load(tmp_path)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o666, 0o601])
def test_keyring_open_to_others_is_refused_with_the_chmod_to_run(
    tmp_path: Path, mode: int
) -> None:
    path = tmp_path / "keyring.json"
    ring = Keyring()
    ring.generate("a", "agent")
    ring.save(path)
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        Keyring.load(path)
    assert f"(mode {mode:04o})" in str(info.value)
    assert f"run `chmod 600 {path}`" in str(info.value)
    path.chmod(0o600)
    assert set(Keyring.load(path).principals) == {"a"}


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440])
def test_private_and_group_readable_keyrings_load(tmp_path: Path, mode: int) -> None:
    # 0440 is how the Kubernetes manifests mount an agent's key (group: the pod's fsGroup).
    path = tmp_path / "keyring.json"
    ring = Keyring()
    ring.generate("a", "agent")
    ring.save(path)
    path.chmod(mode)
    assert set(Keyring.load(path).principals) == {"a"}


GOOD_KEY = Fernet.generate_key().decode()


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ([], "expected {"),
        ("text", "expected {"),
        ({}, "expected {"),
        ({"principals": []}, "expected {"),
        ({"principals": {"a": "agent"}}, "principal 'a' is not an object"),
        ({"principals": {"a": {"keys": [GOOD_KEY]}}}, "principal 'a' has role None"),
        ({"principals": {"a": {"role": "agent"}}}, "principal 'a' has no list of keys"),
        ({"principals": {"a": {"role": "admin", "keys": [GOOD_KEY]}}},
         "principal 'a' has role 'admin', not one of agent, operator, coordinator"),
        ({"principals": {"a": {"role": "agent", "keys": ["not-a-fernet-key"]}}},
         "principal 'a': key 1 is not a Fernet key"),
        ({"principals": {"a": {"role": "agent", "keys": [GOOD_KEY, GOOD_KEY[:-4]]}}},
         "principal 'a': key 2 is not a Fernet key"),
        ({"principals": {"a": {"role": "agent", "keys": 42}}}, "has no list of keys"),
        ({"principals": {"a": {"role": "agent", "keys": [42]}}}, "key 1 is not a Fernet key"),
        ({"principals": {"a": {"role": "operator", "keys": [GOOD_KEY], "api_token": 7}}},
         "api_token is not a string"),
    ],
)
def test_load_malformed_file(tmp_path: Path, data: object, says: str) -> None:
    path = _private(tmp_path / "k.json", json.dumps(data))
    with pytest.raises(ConfigError, match="malformed") as info:
        Keyring.load(path)
    assert str(path) in str(info.value)
    assert says in str(info.value)
    assert "keys generate" in str(info.value)
    assert GOOD_KEY not in str(info.value) and GOOD_KEY[:-4] not in str(info.value)


def test_load_rejects_principal_without_keys(tmp_path: Path) -> None:
    # An empty key list cannot encrypt or decrypt anything (MultiFernet needs one key);
    # it must be caught when the file is loaded, not later as a crash on the first message.
    path = _private(tmp_path / "k.json",
                    json.dumps({"principals": {"a": {"role": "agent", "keys": []}}}))
    with pytest.raises(ConfigError, match="malformed"):
        Keyring.load(path)


@pytest.mark.parametrize("bad", ["bad name!", "", "a/b", "é", "x" * 129, "a b", "tab\t"])
def test_generate_refuses_a_principal_id_that_cannot_name_a_queue(bad: str) -> None:
    ring = Keyring()
    with pytest.raises(ConfigError, match="is not allowed") as info:
        ring.generate(bad, "agent")
    assert "letters, digits" in str(info.value)
    assert bad not in ring.principals


@pytest.mark.parametrize("good", ["worker-1", "a", "team.sec:7@host_x", "x" * 128])
def test_principal_ids_follow_the_wire_identifier_rule(good: str) -> None:
    from pydantic import TypeAdapter

    from coordinator_agent.wire import protocol

    Keyring().generate(good, "agent")
    TypeAdapter(protocol.Identifier).validate_python(good)  # the envelope's sender accepts it
    for bad in ("bad name!", "a/b", "x" * 129):
        with pytest.raises(ValueError, match="validation error"):
            TypeAdapter(protocol.Identifier).validate_python(bad)


def test_operator_for_token() -> None:
    ring = Keyring()
    ring.generate("agent-1", "agent")
    op1 = ring.generate("op-1", "operator")
    op2 = ring.generate("op-2", "operator")
    assert op1.api_token is not None
    assert op2.api_token is not None
    assert ring.operator_for_token(op1.api_token.get_secret_value()) is op1
    assert ring.operator_for_token(op2.api_token.get_secret_value()) is op2
    assert ring.operator_for_token("wrong") is None
    assert ring.operator_for_token("") is None
    assert ring.operator_for_token(op1.api_token.get_secret_value() + "x") is None
    assert ring.operator_for_token("ünïcode") is None


def test_operator_token_survives_save_and_load(tmp_path: Path) -> None:
    ring = Keyring()
    op = ring.generate("op-1", "operator")
    assert op.api_token is not None
    path = tmp_path / "k.json"
    ring.save(path)
    loaded = Keyring.load(path)
    found = loaded.operator_for_token(op.api_token.get_secret_value())
    assert found is not None
    assert found.id == "op-1"


def test_principal_repr_hides_secrets() -> None:
    ring = Keyring()
    op = ring.generate("op-1", "operator")
    ring.rotate("op-1")
    assert op.api_token is not None
    secrets = [*_secrets(op), op.api_token.get_secret_value()]
    for text in (repr(op), str(op), repr(ring), str(ring.principals)):
        for secret in secrets:
            assert secret not in text
    assert repr(op) == "Principal(id='op-1', role='operator', keys=2)"


def test_a_coordinator_principal_is_a_role_of_its_own(tmp_path: Path) -> None:
    """Its keys seal what only coordinators read (the HA log): no API token, no wire policy."""
    path = tmp_path / "keyring.json"
    keyring = Keyring()
    principal = keyring.generate("coordinator", "coordinator")
    keyring.save(path)
    loaded = Keyring.load(path).get("coordinator")
    assert loaded is not None and loaded.role == "coordinator"
    assert principal.api_token is None and len(loaded.keys) == 1
