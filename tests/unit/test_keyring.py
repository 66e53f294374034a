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


@pytest.mark.parametrize("text", ["{not json", "", "\x00\x01"])
def test_load_unreadable_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "k.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="unreadable") as info:
        Keyring.load(path)
    assert str(path) in str(info.value)


def test_load_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unreadable"):
        Keyring.load(tmp_path)


GOOD_KEY = Fernet.generate_key().decode()


@pytest.mark.parametrize(
    "data",
    [
        [],
        "text",
        {},
        {"principals": []},
        {"principals": {"a": "agent"}},
        {"principals": {"a": {"keys": [GOOD_KEY]}}},
        {"principals": {"a": {"role": "agent"}}},
        {"principals": {"a": {"role": "coordinator", "keys": [GOOD_KEY]}}},
        {"principals": {"a": {"role": "agent", "keys": ["not-a-fernet-key"]}}},
        {"principals": {"a": {"role": "agent", "keys": [GOOD_KEY[:-4]]}}},
        {"principals": {"a": {"role": "agent", "keys": 42}}},
        {"principals": {"a": {"role": "agent", "keys": [42]}}},
    ],
)
def test_load_malformed_file(tmp_path: Path, data: object) -> None:
    path = tmp_path / "k.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="malformed") as info:
        Keyring.load(path)
    assert str(path) in str(info.value)
    assert GOOD_KEY not in str(info.value)


def test_load_rejects_principal_without_keys(tmp_path: Path) -> None:
    # An empty key list cannot encrypt or decrypt anything (MultiFernet needs one key);
    # it must be caught when the file is loaded, not later as a crash on the first message.
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"principals": {"a": {"role": "agent", "keys": []}}}))
    with pytest.raises(ConfigError, match="malformed"):
        Keyring.load(path)


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
