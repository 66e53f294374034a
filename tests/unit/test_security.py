"""SecurityManager.seal/open and AuthorizationManager: every check, in order, with its reason."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from cryptography.fernet import Fernet

from coordinator_agent.coordinator.state import StateManager
from coordinator_agent.coordinator.store import TaskStore
from coordinator_agent.coordinator.tasks import Attempt, TaskRecord
from coordinator_agent.exceptions import (
    AuthorizationError,
    ConfigError,
    ProtocolError,
    SecurityError,
)
from coordinator_agent.settings import Liveness, load_settings
from coordinator_agent.wire import protocol
from coordinator_agent.wire.constants import HEADER_SENDER
from coordinator_agent.wire.keyring import Keyring
from coordinator_agent.wire.security import (
    POLICY,
    AuthorizationManager,
    SecurityManager,
)

COORDINATOR_ID = "coord"
AGENT_ID = "agent-1"
OTHER_AGENT_ID = "agent-2"
OPERATOR_ID = "op-1"
MAX_MESSAGE_BYTES = 64 * 1024
TTL_S = 120
REPLAY_WINDOW_S = 180

MakeSecurity = Callable[..., SecurityManager]


@pytest.fixture
def keyring() -> Keyring:
    ring = Keyring()
    ring.generate(AGENT_ID, "agent")
    ring.generate(OTHER_AGENT_ID, "agent")
    ring.generate(OPERATOR_ID, "operator")
    return ring


@pytest.fixture
def make_security(keyring: Keyring) -> MakeSecurity:
    """SecurityManager for a principal; agents and operators get only their own keyring entry."""

    def make(principal_id: str = COORDINATOR_ID, **overrides: int) -> SecurityManager:
        ring = keyring if principal_id == COORDINATOR_ID else keyring.subset(principal_id)
        options = {
            "max_message_bytes": MAX_MESSAGE_BYTES,
            "ttl_s": TTL_S,
            "replay_window_s": REPLAY_WINDOW_S,
            **overrides,
        }
        return SecurityManager(ring, principal_id, coordinator_id=COORDINATOR_ID, **options)

    return make


@pytest.fixture
def coordinator_security(make_security: MakeSecurity) -> SecurityManager:
    return make_security(COORDINATOR_ID)


@pytest.fixture
def agent_security(make_security: MakeSecurity) -> SecurityManager:
    return make_security(AGENT_ID)



def _status() -> protocol.AgentStatus:
    return protocol.AgentStatus(kind="development", capabilities=["python"], in_flight=1)


def _key(keyring: Keyring, principal_id: str) -> Fernet:
    principal = keyring.get(principal_id)
    assert principal is not None
    return Fernet(principal.keys[0].get_secret_value())


def _reject(
    security: SecurityManager, body: bytes, headers: dict[str, object] | None, **kw: bool
) -> SecurityError:
    with pytest.raises(SecurityError) as info:
        security.open(body, headers, **kw)
    return info.value


# --- round trips ----------------------------------------------------------------------------


def test_coordinator_opens_agent_message(
    agent_security: SecurityManager, coordinator_security: SecurityManager
) -> None:
    envelope = protocol.make_envelope(_status(), sender=AGENT_ID)
    body, headers = agent_security.seal(envelope, COORDINATOR_ID)

    assert headers == {HEADER_SENDER: AGENT_ID}
    assert b"development" not in body  # encrypted, not just encoded

    opened = coordinator_security.open(body, headers)
    assert opened.id == envelope.id
    assert opened.type == "agent.status"
    assert opened.sender == AGENT_ID
    assert opened.payload == envelope.payload


def test_agent_opens_coordinator_message(
    agent_security: SecurityManager, coordinator_security: SecurityManager
) -> None:
    assign = protocol.TaskAssign(task_id="t-1", attempt=1, description="d", timeout_s=5)
    envelope = protocol.make_envelope(assign, sender=COORDINATOR_ID)
    body, headers = coordinator_security.seal(envelope, AGENT_ID)

    assert headers == {HEADER_SENDER: COORDINATOR_ID}
    opened = agent_security.open(body, headers)
    assert opened.sender == COORDINATOR_ID
    assert opened.payload == assign


def test_operator_round_trip(
    make_security: MakeSecurity, coordinator_security: SecurityManager
) -> None:
    operator = make_security(OPERATOR_ID)
    envelope = protocol.make_envelope(protocol.TaskSubmit(description="d"), sender=OPERATOR_ID)
    body, headers = operator.seal(envelope, COORDINATOR_ID)
    assert coordinator_security.open(body, headers).payload.description == "d"


def test_sender_header_may_be_bytes(
    agent_security: SecurityManager, coordinator_security: SecurityManager
) -> None:
    body, _ = agent_security.seal(protocol.make_envelope(_status(), sender=AGENT_ID),
                                  COORDINATOR_ID)
    opened = coordinator_security.open(body, {HEADER_SENDER: AGENT_ID.encode()})
    assert opened.sender == AGENT_ID


def test_coordinator_message_to_one_agent_is_unreadable_by_another(
    make_security: MakeSecurity, coordinator_security: SecurityManager
) -> None:
    envelope = protocol.make_envelope(protocol.AgentDrain(), sender=COORDINATOR_ID)
    body, headers = coordinator_security.seal(envelope, AGENT_ID)
    other = make_security(OTHER_AGENT_ID)
    assert _reject(other, body, headers).reason == "invalid_token"


def test_agent_cannot_seal_for_another_agent(agent_security: SecurityManager) -> None:
    envelope = protocol.make_envelope(_status(), sender=AGENT_ID)
    with pytest.raises(SecurityError) as info:
        agent_security.seal(envelope, OTHER_AGENT_ID)
    assert info.value.reason == "unknown_sender"


def test_coordinator_cannot_seal_for_unknown_peer(coordinator_security: SecurityManager) -> None:
    envelope = protocol.make_envelope(protocol.AgentDrain(), sender=COORDINATOR_ID)
    with pytest.raises(SecurityError) as info:
        coordinator_security.seal(envelope, "stranger")
    assert info.value.reason == "unknown_sender"


def test_principal_without_key_cannot_build_security_manager(keyring: Keyring) -> None:
    with pytest.raises(ConfigError, match="no key for principal 'stranger'"):
        SecurityManager(keyring, "stranger", coordinator_id=COORDINATOR_ID,
                        max_message_bytes=MAX_MESSAGE_BYTES, ttl_s=TTL_S,
                        replay_window_s=REPLAY_WINDOW_S)


def test_keyring_principal_named_like_the_coordinator_is_refused(keyring: Keyring) -> None:
    keyring.generate(COORDINATOR_ID, "agent")
    with pytest.raises(ConfigError, match="named like the coordinator"):
        SecurityManager(keyring, COORDINATOR_ID, coordinator_id=COORDINATOR_ID,
                        max_message_bytes=MAX_MESSAGE_BYTES, ttl_s=TTL_S,
                        replay_window_s=REPLAY_WINDOW_S)


def test_old_key_still_opens_after_rotation_and_reload(
    keyring: Keyring, tmp_path: Path, coordinator_security: SecurityManager
) -> None:
    # The agent holds its own copy of the old key (as it would from its own keyring file).
    path = tmp_path / "agent.json"
    keyring.subset(AGENT_ID).save(path)
    old_agent = SecurityManager(Keyring.load(path), AGENT_ID, coordinator_id=COORDINATOR_ID,
                                max_message_bytes=MAX_MESSAGE_BYTES, ttl_s=TTL_S,
                                replay_window_s=REPLAY_WINDOW_S)

    def sealed() -> tuple[bytes, dict[str, str]]:
        return old_agent.seal(protocol.make_envelope(_status(), sender=AGENT_ID), COORDINATOR_ID)

    keyring.rotate(AGENT_ID)
    coordinator_security.reload(keyring)
    body, headers = sealed()
    assert coordinator_security.open(body, headers).sender == AGENT_ID

    # Only KEEP_OLD_KEYS retired keys are kept: after enough rotations the old key is gone.
    keyring.rotate(AGENT_ID)
    keyring.rotate(AGENT_ID)
    coordinator_security.reload(keyring)
    body, headers = sealed()
    assert _reject(coordinator_security, body, headers).reason == "invalid_token"



def _manager(keyring: Keyring, principal_id: str) -> SecurityManager:
    return SecurityManager(keyring, principal_id, coordinator_id=COORDINATOR_ID,
                           max_message_bytes=MAX_MESSAGE_BYTES, ttl_s=TTL_S,
                           replay_window_s=REPLAY_WINDOW_S)


def _drain() -> protocol.Envelope:
    return protocol.make_envelope(protocol.AgentDrain(reason="r"), sender=COORDINATOR_ID)


def _rotate_in_file(path: Path) -> None:
    """What `keys rotate` does: another process loads, rotates and rewrites the file."""
    ring = Keyring.load(path)
    ring.rotate(AGENT_ID)
    ring.save(path)


@pytest.mark.parametrize("talked_before_rotation", [True, False])
def test_coordinator_answers_with_the_key_the_agent_uses(
    keyring: Keyring, tmp_path: Path, talked_before_rotation: bool
) -> None:
    path = tmp_path / "keyring.json"
    keyring.save(path)
    agent = _manager(Keyring.load(path).subset(AGENT_ID), AGENT_ID)  # still has the old key
    coordinator = _manager(Keyring.load(path), COORDINATOR_ID)
    if talked_before_rotation:
        coordinator.open(*agent.seal(protocol.make_envelope(_status(), sender=AGENT_ID),
                                     COORDINATOR_ID))

    _rotate_in_file(path)
    coordinator.reload(Keyring.load(path))
    # The agent has not received its new key yet: it keeps writing with the old one...
    coordinator.open(*agent.seal(protocol.make_envelope(_status(), sender=AGENT_ID),
                                 COORDINATOR_ID))
    # ...and must still be able to read what the coordinator sends back.
    assert agent.open(*coordinator.seal(_drain(), AGENT_ID)).type == "agent.drain"

    # Once the agent has the new key it writes with it, and the coordinator follows.
    new_agent = _manager(Keyring.load(path).subset(AGENT_ID), AGENT_ID)
    coordinator.open(*new_agent.seal(protocol.make_envelope(_status(), sender=AGENT_ID),
                                     COORDINATOR_ID))
    body, headers = coordinator.seal(_drain(), AGENT_ID)
    assert new_agent.open(body, headers).type == "agent.drain"
    assert _reject(agent, body, headers).reason == "invalid_token"  # old key only: too old


def test_coordinator_follows_agent_key_when_keyring_rotated_in_place(
    keyring: Keyring, tmp_path: Path
) -> None:
    # Same as above, but the rotated keyring handed to reload() is the very object the
    # manager already holds (rotate() mutates principals in place), which is what an
    # in-process caller naturally does: keyring.rotate(...); security.reload(keyring).
    path = tmp_path / "agent.json"
    keyring.subset(AGENT_ID).save(path)
    agent = _manager(Keyring.load(path), AGENT_ID)  # its own copy of the old key
    coordinator = _manager(keyring, COORDINATOR_ID)
    coordinator.open(*agent.seal(protocol.make_envelope(_status(), sender=AGENT_ID),
                                 COORDINATOR_ID))

    keyring.rotate(AGENT_ID)
    coordinator.reload(keyring)
    assert agent.open(*coordinator.seal(_drain(), AGENT_ID)).type == "agent.drain"


# --- forgeries ------------------------------------------------------------------------------


def test_unknown_key_under_known_sender_is_invalid_token(
    coordinator_security: SecurityManager,
) -> None:
    envelope = protocol.make_envelope(_status(), sender=AGENT_ID)
    body = Fernet(Fernet.generate_key()).encrypt(protocol.encode(envelope))
    error = _reject(coordinator_security, body, {HEADER_SENDER: AGENT_ID})
    assert error.reason == "invalid_token"
    assert error.sender == AGENT_ID


def test_other_principals_key_with_claimed_sender_is_invalid_token(
    make_security: MakeSecurity, coordinator_security: SecurityManager
) -> None:
    # agent-2 encrypts with its own (valid) key but claims to be agent-1 everywhere.
    impostor = make_security(OTHER_AGENT_ID)
    envelope = protocol.make_envelope(_status(), sender=AGENT_ID)
    body, _ = impostor.seal(envelope, COORDINATOR_ID)
    error = _reject(coordinator_security, body, {HEADER_SENDER: AGENT_ID})
    assert error.reason == "invalid_token"


def test_agent_cannot_pose_as_coordinator_to_another_agent(
    keyring: Keyring, make_security: MakeSecurity
) -> None:
    envelope = protocol.make_envelope(
        protocol.TaskAssign(task_id="t", attempt=1, description="d", timeout_s=1),
        sender=COORDINATOR_ID,
    )
    body = _key(keyring, OTHER_AGENT_ID).encrypt(protocol.encode(envelope))
    victim = make_security(AGENT_ID)
    assert _reject(victim, body, {HEADER_SENDER: COORDINATOR_ID}).reason == "invalid_token"


def test_garbage_body_is_invalid_token(coordinator_security: SecurityManager) -> None:
    error = _reject(coordinator_security, b"definitely not a fernet token",
                    {HEADER_SENDER: AGENT_ID})
    assert error.reason == "invalid_token"


def test_sender_mismatch(keyring: Keyring, coordinator_security: SecurityManager) -> None:
    # Correctly encrypted by agent-1, but the envelope says agent-2.
    envelope = protocol.make_envelope(_status(), sender=OTHER_AGENT_ID)
    body = _key(keyring, AGENT_ID).encrypt(protocol.encode(envelope))
    error = _reject(coordinator_security, body, {HEADER_SENDER: AGENT_ID})
    assert error.reason == "sender_mismatch"
    assert error.sender == AGENT_ID
    assert error.message_id == envelope.id


def test_unknown_sender_header(coordinator_security: SecurityManager, keyring: Keyring) -> None:
    envelope = protocol.make_envelope(_status(), sender="stranger")
    body = _key(keyring, AGENT_ID).encrypt(protocol.encode(envelope))
    error = _reject(coordinator_security, body, {HEADER_SENDER: "stranger"})
    assert error.reason == "unknown_sender"
    assert error.sender is None


def test_agent_rejects_sender_other_than_coordinator(
    agent_security: SecurityManager, keyring: Keyring
) -> None:
    envelope = protocol.make_envelope(protocol.AgentDrain(), sender=OTHER_AGENT_ID)
    body = _key(keyring, AGENT_ID).encrypt(protocol.encode(envelope))
    assert _reject(agent_security, body, {HEADER_SENDER: OTHER_AGENT_ID}).reason == (
        "unknown_sender"
    )


@pytest.mark.parametrize("headers", [None, {}, {HEADER_SENDER: ""}, {HEADER_SENDER: 42},
                                     {"x-other": AGENT_ID}])
def test_missing_sender_header(
    headers: dict[str, object] | None,
    agent_security: SecurityManager,
    coordinator_security: SecurityManager,
) -> None:
    body, _ = agent_security.seal(protocol.make_envelope(_status(), sender=AGENT_ID),
                                  COORDINATOR_ID)
    assert _reject(coordinator_security, body, headers).reason == "unknown_sender"


def test_valid_token_with_invalid_envelope_is_protocol_error(
    keyring: Keyring, coordinator_security: SecurityManager
) -> None:
    body = _key(keyring, AGENT_ID).encrypt(b'{"v": 1, "type": "agent.status"}')
    with pytest.raises(ProtocolError) as info:
        coordinator_security.open(body, {HEADER_SENDER: AGENT_ID})
    assert info.value.reason == "malformed"
    # The key proves who sent the broken message, so the rejection is attributed to them.
    assert info.value.sender == AGENT_ID


# --- time -----------------------------------------------------------------------------------


def test_expired_token(keyring: Keyring, coordinator_security: SecurityManager) -> None:
    envelope = protocol.make_envelope(_status(), sender=AGENT_ID)
    stamped = int(time.time()) - TTL_S - 30
    body = _key(keyring, AGENT_ID).encrypt_at_time(protocol.encode(envelope), stamped)
    error = _reject(coordinator_security, body, {HEADER_SENDER: AGENT_ID})
    assert error.reason == "expired"
    assert "old" in error.detail


def test_token_within_ttl_is_accepted(
    keyring: Keyring, coordinator_security: SecurityManager
) -> None:
    envelope = protocol.make_envelope(_status(), sender=AGENT_ID)
    stamped = int(time.time()) - TTL_S + 30
    body = _key(keyring, AGENT_ID).encrypt_at_time(protocol.encode(envelope), stamped)
    assert coordinator_security.open(body, {HEADER_SENDER: AGENT_ID}).id == envelope.id


def test_token_from_the_far_future_is_expired(
    keyring: Keyring, coordinator_security: SecurityManager
) -> None:
    envelope = protocol.make_envelope(_status(), sender=AGENT_ID)
    stamped = int(time.time()) + 3600
    body = _key(keyring, AGENT_ID).encrypt_at_time(protocol.encode(envelope), stamped)
    error = _reject(coordinator_security, body, {HEADER_SENDER: AGENT_ID})
    assert error.reason == "expired"
    assert "future" in error.detail


def test_expired_token_under_wrong_key_is_invalid_not_expired(
    coordinator_security: SecurityManager,
) -> None:
    envelope = protocol.make_envelope(_status(), sender=AGENT_ID)
    body = Fernet(Fernet.generate_key()).encrypt_at_time(protocol.encode(envelope), 1_000_000)
    error = _reject(coordinator_security, body, {HEADER_SENDER: AGENT_ID})
    assert error.reason == "invalid_token"


# --- replay ---------------------------------------------------------------------------------


def test_replayed_body(
    agent_security: SecurityManager, coordinator_security: SecurityManager
) -> None:
    body, headers = agent_security.seal(protocol.make_envelope(_status(), sender=AGENT_ID),
                                        COORDINATOR_ID)
    first = coordinator_security.open(body, headers)
    error = _reject(coordinator_security, body, headers)
    assert error.reason == "replayed"
    assert error.message_id == first.id
    assert error.sender == AGENT_ID


def test_same_id_re_encrypted_is_replayed(
    agent_security: SecurityManager, coordinator_security: SecurityManager
) -> None:
    envelope = protocol.make_envelope(_status(), sender=AGENT_ID)
    coordinator_security.open(*agent_security.seal(envelope, COORDINATOR_ID))
    body, headers = agent_security.seal(envelope, COORDINATOR_ID)  # fresh token, same id
    assert _reject(coordinator_security, body, headers).reason == "replayed"


def test_redelivery_is_accepted(
    agent_security: SecurityManager, coordinator_security: SecurityManager
) -> None:
    body, headers = agent_security.seal(protocol.make_envelope(_status(), sender=AGENT_ID),
                                        COORDINATOR_ID)
    first = coordinator_security.open(body, headers)
    again = coordinator_security.open(body, headers, redelivered=True)
    assert again.id == first.id
    # ...and it does not reset anything: a non-redelivered copy is still a replay.
    assert _reject(coordinator_security, body, headers).reason == "replayed"


def test_distinct_messages_are_not_replays(
    agent_security: SecurityManager, coordinator_security: SecurityManager
) -> None:
    ids = set()
    for _ in range(5):
        body, headers = agent_security.seal(
            protocol.make_envelope(_status(), sender=AGENT_ID), COORDINATOR_ID
        )
        ids.add(coordinator_security.open(body, headers).id)
    assert len(ids) == 5
    assert len(coordinator_security.replay) == 5


# --- size -----------------------------------------------------------------------------------


def test_oversized_body_checked_before_anything_else(make_security: MakeSecurity) -> None:
    security = make_security(COORDINATOR_ID, max_message_bytes=2048)
    garbage = b"\x00" * 2049
    for headers in ({HEADER_SENDER: AGENT_ID}, {HEADER_SENDER: "stranger"}, None):
        error = _reject(security, garbage, headers)
        assert error.reason == "oversized"
        assert "2049" in error.detail


def test_oversized_valid_message_is_rejected(
    make_security: MakeSecurity, agent_security: SecurityManager
) -> None:
    security = make_security(COORDINATOR_ID, max_message_bytes=1024)
    envelope = protocol.make_envelope(protocol.AgentGoodbye(reason="x" * 1024), sender=AGENT_ID)
    body, headers = agent_security.seal(envelope, COORDINATOR_ID)
    assert len(body) > 1024
    assert _reject(security, body, headers).reason == "oversized"


def test_body_at_the_limit_is_not_oversized(make_security: MakeSecurity) -> None:
    security = make_security(COORDINATOR_ID, max_message_bytes=2048)
    error = _reject(security, b"\x00" * 2048, {HEADER_SENDER: AGENT_ID})
    assert error.reason == "invalid_token"


# --- authorization --------------------------------------------------------------------------


def _authorize(
    authorizer: AuthorizationManager, payload: protocol.Model, sender: str
) -> AuthorizationError:
    with pytest.raises(AuthorizationError) as info:
        authorizer.authorize(protocol.make_envelope(payload, sender=sender))
    assert isinstance(info.value, SecurityError)
    assert info.value.sender == sender
    return info.value


def _result(task_id: str = "t-1") -> protocol.TaskResult:
    return protocol.TaskResult(task_id=task_id, attempt=1, success=True)


def test_role_of(coordinator_security: SecurityManager) -> None:
    assert coordinator_security.role_of(COORDINATOR_ID) == "coordinator"
    assert coordinator_security.role_of(AGENT_ID) == "agent"
    assert coordinator_security.role_of(OPERATOR_ID) == "operator"
    assert coordinator_security.role_of("stranger") is None


def test_operator_may_not_send_results(coordinator_security: SecurityManager) -> None:
    authorizer = AuthorizationManager(coordinator_security, lambda agent, task: True)
    error = _authorize(authorizer, _result(), OPERATOR_ID)
    assert error.reason == "forbidden"
    assert "task.result" in error.detail


def test_agent_may_not_submit(coordinator_security: SecurityManager) -> None:
    authorizer = AuthorizationManager(coordinator_security)
    assert _authorize(authorizer, protocol.TaskSubmit(description="d"), AGENT_ID).reason == (
        "forbidden"
    )


def test_agent_may_not_send_coordinator_messages(coordinator_security: SecurityManager) -> None:
    authorizer = AuthorizationManager(coordinator_security)
    assign = protocol.TaskAssign(task_id="t", attempt=1, description="d", timeout_s=1)
    assert _authorize(authorizer, assign, AGENT_ID).reason == "forbidden"
    assert _authorize(authorizer, protocol.AgentDrain(), OPERATOR_ID).reason == "forbidden"


def test_unknown_principal_is_forbidden(coordinator_security: SecurityManager) -> None:
    authorizer = AuthorizationManager(coordinator_security)
    assert _authorize(authorizer, _status(), "stranger").reason == "forbidden"


def test_allowed_messages_pass(coordinator_security: SecurityManager) -> None:
    authorizer = AuthorizationManager(coordinator_security, lambda agent, task: True)
    authorizer.authorize(protocol.make_envelope(_status(), sender=AGENT_ID))
    authorizer.authorize(protocol.make_envelope(_result(), sender=AGENT_ID))
    authorizer.authorize(
        protocol.make_envelope(protocol.TaskSubmit(description="d"), sender=OPERATOR_ID)
    )
    # The agent side: the coordinator may assign.
    authorizer.authorize(protocol.make_envelope(
        protocol.TaskAssign(task_id="t", attempt=1, description="d", timeout_s=1),
        sender=COORDINATOR_ID,
    ))


def test_policy_partitions_message_types() -> None:
    # A batch is every role's envelope; its items are authorized one by one.
    roles = [types - {"batch"} for types in POLICY.values()]
    assert all("batch" in types for types in POLICY.values())
    assert set().union(*roles) == protocol.MESSAGE_TYPES - {"batch"}
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            assert not a & b


def test_agent_may_only_report_on_its_own_tasks(
    coordinator_security: SecurityManager, store: TaskStore
) -> None:
    state = StateManager(store, Liveness())
    task = TaskRecord(id="t-1", description="d")
    task.attempts.append(Attempt(1, AGENT_ID, started_at=0.0, deadline=60.0))
    state.add_task(task)
    authorizer = AuthorizationManager(coordinator_security, state.is_assigned)

    authorizer.authorize(protocol.make_envelope(_result("t-1"), sender=AGENT_ID))
    progress = protocol.TaskProgress(task_id="t-1", attempt=1, progress=0.5)
    authorizer.authorize(protocol.make_envelope(progress, sender=AGENT_ID))

    error = _authorize(authorizer, _result("t-1"), OTHER_AGENT_ID)
    assert error.reason == "not_assigned"
    assert "t-1" in error.detail
    assert _authorize(authorizer, _result("never-existed"), AGENT_ID).reason == "not_assigned"
    progress_other = protocol.TaskProgress(task_id="t-1", attempt=1, progress=0.5)
    assert _authorize(authorizer, progress_other, OTHER_AGENT_ID).reason == "not_assigned"


def test_assignment_check_only_applies_to_task_reports(
    coordinator_security: SecurityManager,
) -> None:
    calls: list[tuple[str, str]] = []

    def is_assigned(agent: str, task: str) -> bool:
        calls.append((agent, task))
        return False

    authorizer = AuthorizationManager(coordinator_security, is_assigned)
    authorizer.authorize(protocol.make_envelope(_status(), sender=AGENT_ID))
    assert calls == []
    _authorize(authorizer, _result("t-9"), AGENT_ID)
    assert calls == [(AGENT_ID, "t-9")]


# --- no secrets in reprs --------------------------------------------------------------------


def _secrets(keyring: Keyring) -> list[str]:
    values = []
    for principal in keyring.principals.values():
        values += [k.get_secret_value() for k in principal.keys]
        if principal.api_token is not None:
            values.append(principal.api_token.get_secret_value())
    assert values
    return values


def test_reprs_hold_no_key_material(
    keyring: Keyring, coordinator_security: SecurityManager, agent_security: SecurityManager
) -> None:
    # Warm the Fernet cache so that the managers hold live key objects.
    body, headers = agent_security.seal(protocol.make_envelope(_status(), sender=AGENT_ID),
                                        COORDINATOR_ID)
    coordinator_security.open(body, headers)
    texts = [repr(coordinator_security), str(coordinator_security), repr(agent_security),
             repr(keyring), str(keyring)]
    texts += [repr(p) for p in keyring.principals.values()]
    texts += [str(p) for p in keyring.principals.values()]
    for secret in _secrets(keyring):
        for text in texts:
            assert secret not in text
    assert AGENT_ID in repr(agent_security)


def test_errors_hold_no_key_material(
    keyring: Keyring, coordinator_security: SecurityManager
) -> None:
    envelope = protocol.make_envelope(_status(), sender=AGENT_ID)
    errors = [
        _reject(coordinator_security, b"junk", {HEADER_SENDER: AGENT_ID}),
        _reject(coordinator_security,
                _key(keyring, AGENT_ID).encrypt_at_time(protocol.encode(envelope), 1),
                {HEADER_SENDER: AGENT_ID}),
    ]
    for error in errors:
        for secret in _secrets(keyring):
            assert secret not in str(error)
            assert secret not in repr(error)


def test_settings_repr_hides_broker_password(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COORDINATOR_REGISTRY_TOKEN", "consul-t0ken-value")
    settings = load_settings(broker_url="amqp://user:hunter2-secret@broker.example:5672/vhost")
    assert settings.broker_url.get_secret_value().endswith("@broker.example:5672/vhost")
    for text in (repr(settings), str(settings), repr(settings.model_dump())):
        assert "hunter2-secret" not in text
        assert "consul-t0ken-value" not in text


def test_envelope_json_never_contains_key(
    keyring: Keyring, agent_security: SecurityManager
) -> None:
    body, headers = agent_security.seal(protocol.make_envelope(_status(), sender=AGENT_ID),
                                        COORDINATOR_ID)
    for secret in _secrets(keyring):
        assert secret.encode() not in body
        assert secret not in orjson.dumps(headers).decode()
