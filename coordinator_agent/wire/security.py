"""SecurityManager (seal/open every message) and AuthorizationManager (who may say what).

Each principal has its own Fernet key. Traffic between the coordinator and principal P is
encrypted under P's key in both directions, so a key lets its holder speak only as P, and only to
the coordinator. Inbound checks run cheapest first:

    size -> known sender -> decrypt with TTL -> schema -> sender binding -> replay -> authorization
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from coordinator_agent.exceptions import (
    AuthorizationError,
    ConfigError,
    RejectedMessage,
    SecurityError,
)
from coordinator_agent.settings import Settings
from coordinator_agent.wire import protocol
from coordinator_agent.wire.constants import HEADER_SENDER, TELEMETRY_TYPES
from coordinator_agent.wire.keyring import Keyring, Role
from coordinator_agent.wire.replay import ReplayGuard

#: What each role may send. The coordinator's own messages are checked by the receiving side.
#: A ``batch`` is authorized as a whole, then each of its items on its own (messaging.py).
POLICY: Mapping[str, frozenset[str]] = {
    "agent": frozenset(
        {"agent.hello", "agent.status", "agent.metrics", "agent.goodbye",
         "task.progress", "task.result", "batch"}
    ),
    "operator": frozenset({"task.submit", "batch"}),
    "coordinator": frozenset(
        {"task.assign", "task.cancel", "agent.drain", "task.accepted", "task.completed",
         "batch"}
    ),
}
#: How far in the future a stamp may be: Fernet's fixed allowance, applied to ``sent_at`` too.
MAX_CLOCK_SKEW_S = 60
#: Message types in which an agent reports on a task: it must have been assigned that task.
TASK_REPORTS = frozenset({"task.progress", "task.result"})


def fernet_token_bytes(plaintext_bytes: int) -> int:
    """The length of a Fernet token over that much plaintext (what the size limit counts).

    version (1) + timestamp (8) + IV (16) + AES-CBC with PKCS7 padding + HMAC (32), base64url.
    """
    ciphertext = 16 * (plaintext_bytes // 16 + 1)
    return 4 * math.ceil((1 + 8 + 16 + ciphertext + 32) / 3)


class PeerKeys:
    """One principal's keys, newest first. Rotation-friendly: the coordinator answers a peer
    with the key that peer last used, so a rotated key can be rolled out to the coordinator
    first and to the agent later without either side failing to read the other."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = secrets  # kept to recognise the key in use after a reload
        self.keys = [Fernet(s) for s in secrets]
        self.multi = MultiFernet(self.keys)
        self.current = 0

    def decrypt(self, token: bytes, ttl: int) -> bytes:
        order = [self.current, *(i for i in range(len(self.keys)) if i != self.current)]
        for index in order:
            try:
                plaintext = self.keys[index].decrypt(token, ttl=ttl)
            except InvalidToken:
                continue
            self.current = index
            return plaintext
        raise InvalidToken


class SecurityManager:
    """Seals outbound envelopes and opens inbound bodies, raising SecurityError/ProtocolError."""

    def __init__(
        self,
        keyring: Keyring,
        principal_id: str,
        *,
        coordinator_id: str,
        max_message_bytes: int,
        ttl_s: int,
        replay_window_s: int,
        durable_ttl_s: int | None = None,
    ) -> None:
        self.principal_id = principal_id
        self.coordinator_id = coordinator_id
        self.is_coordinator = principal_id == coordinator_id
        self.max_message_bytes = max_message_bytes
        self.ttl_s = ttl_s
        self.durable_ttl_s = max(ttl_s, durable_ttl_s or ttl_s)
        self.replay = ReplayGuard(replay_window_s)
        self._keyring = keyring
        self._peers: dict[str, PeerKeys] = {}
        if not self.is_coordinator and keyring.get(principal_id) is None:
            raise ConfigError(f"the keyring has no key for principal {principal_id!r}")
        if self.is_coordinator and keyring.get(coordinator_id) is not None:
            # It would be given the coordinator's role: refuse rather than guess.
            raise ConfigError(f"the keyring has a principal named like the coordinator "
                              f"({coordinator_id!r}); rename one of them")

    @classmethod
    def from_settings(
        cls, settings: Settings, keyring: Keyring, principal_id: str
    ) -> SecurityManager:
        return cls(
            keyring,
            principal_id,
            coordinator_id=settings.name,
            max_message_bytes=settings.limits.max_message_bytes,
            ttl_s=settings.security.message_ttl_s,
            durable_ttl_s=settings.security.durable_message_ttl_s,
            replay_window_s=settings.security.replay_window_s,
        )

    def __repr__(self) -> str:
        return f"SecurityManager(principal={self.principal_id!r})"

    def reload(self, keyring: Keyring) -> None:
        """Swap in a rotated keyring without restarting, remembering which key each peer uses."""
        if self.is_coordinator and keyring.get(self.coordinator_id) is not None:
            raise ConfigError(f"the keyring has a principal named like the coordinator "
                              f"({self.coordinator_id!r}); rename one of them")
        old_peers = self._peers
        self._keyring, self._peers = keyring, {}
        for owner, old in old_peers.items():
            principal = keyring.get(owner)
            if principal is None:
                continue
            secrets = [k.get_secret_value() for k in principal.keys]
            if secrets == old.secrets:
                self._peers[owner] = old  # unchanged: 10,000 agents cost no new Fernets
                continue
            peer = self._keys(owner)
            in_use = old.secrets[old.current]
            if peer is not None and in_use in peer.secrets:
                peer.current = peer.secrets.index(in_use)

    def role_of(self, principal_id: str) -> Role | str | None:
        if principal_id == self.coordinator_id:
            return "coordinator"
        principal = self._keyring.get(principal_id)
        return principal.role if principal else None

    def _keys(self, key_owner: str) -> PeerKeys | None:
        peer = self._peers.get(key_owner)
        if peer is None:
            principal = self._keyring.get(key_owner)
            if principal is None:
                return None
            peer = PeerKeys([k.get_secret_value() for k in principal.keys])
            self._peers[key_owner] = peer
        return peer

    def _key_owner(self, peer: str) -> str | None:
        """Whose key protects traffic between us and ``peer``."""
        if self.is_coordinator:
            return peer
        return self.principal_id if peer == self.coordinator_id else None

    # --- outbound -----------------------------------------------------------------------------

    def seal(self, envelope: protocol.Envelope, peer: str) -> tuple[bytes, dict[str, Any]]:
        """Encode and encrypt for ``peer``; returns (body, headers)."""
        owner = self._key_owner(peer)
        keys = self._keys(owner) if owner else None
        if keys is None:
            raise SecurityError("unknown_sender", f"no key for peer {peer!r}")
        # An agent always uses its newest key; the coordinator follows what the peer uses.
        key = keys.keys[keys.current if self.is_coordinator else 0]
        return key.encrypt(protocol.encode(envelope)), {HEADER_SENDER: envelope.sender}

    # --- inbound ------------------------------------------------------------------------------

    def open(
        self, body: bytes, headers: Mapping[str, object] | None, *, redelivered: bool = False
    ) -> protocol.Envelope:
        if len(body) > self.max_message_bytes:
            raise SecurityError("oversized", f"{len(body)} bytes > {self.max_message_bytes}")
        sender = (headers or {}).get(HEADER_SENDER)
        if isinstance(sender, bytes):
            sender = sender.decode("utf-8", "replace")
        if not isinstance(sender, str) or not sender:
            raise SecurityError("unknown_sender", f"missing {HEADER_SENDER} header")
        owner = self._key_owner(sender)
        keys = self._keys(owner) if owner else None
        if keys is None:
            raise SecurityError("unknown_sender", f"unknown sender {sender[:128]!r}", sender=None)
        try:
            plaintext = keys.decrypt(body, ttl=self.durable_ttl_s)
        except InvalidToken:
            raise self._why_invalid(keys.multi, body, sender) from None
        try:
            envelope = protocol.decode(plaintext)
        except RejectedMessage as exc:
            exc.sender = sender  # authentic: the key proves who sent this broken message
            raise
        if envelope.sender != sender:
            raise SecurityError(
                "sender_mismatch", "envelope sender differs from header", sender=sender,
                message_id=envelope.id,
            )
        now = time.time()
        if envelope.type in TELEMETRY_TYPES:
            age = now - envelope.sent_at  # finite: the schema refuses NaN and infinities
            if age > self.ttl_s:
                raise SecurityError("expired", f"{envelope.type} older than {self.ttl_s}s",
                                    sender=sender, message_id=envelope.id)
            # Bounded both ways, or a far-future stamp would outlive the replay window.
            if age < -MAX_CLOCK_SKEW_S:
                raise SecurityError("expired", f"{envelope.type} stamped {-age:.0f}s in the future",
                                    sender=sender, message_id=envelope.id)
        # A broker redelivery repeats an id legitimately; handlers are idempotent for it.
        seen_key = f"{sender}/{envelope.id}"
        if not self.replay.check_and_remember(seen_key, now) and not redelivered:
            raise SecurityError("replayed", "message id seen before", sender=sender,
                                message_id=envelope.id)
        return envelope

    def check_item(self, sender: str, item_id: str, *, redelivered: bool = False) -> None:
        """The replay rule for one item of a batch: its id is a message id of that sender."""
        if not self.replay.check_and_remember(f"{sender}/{item_id}", time.time()) \
                and not redelivered:
            raise SecurityError("replayed", "item id seen before", sender=sender,
                                message_id=item_id)

    def _why_invalid(self, fernet: MultiFernet, body: bytes, sender: str) -> SecurityError:
        try:
            stamped = fernet.extract_timestamp(body)  # verifies the signature, not the age
        except InvalidToken:
            return SecurityError("invalid_token", "not signed with the sender's key", sender=sender)
        age = int(time.time()) - stamped
        if age < 0:
            return SecurityError("expired", f"stamped {-age}s in the future", sender=sender)
        return SecurityError("expired", f"{age}s old > ttl {self.durable_ttl_s}s", sender=sender)


class AuthorizationManager:
    """Role x message-type policy; agents may report only on themselves and their own tasks."""

    def __init__(
        self,
        security: SecurityManager,
        is_assigned: Callable[[str, str], bool] | None = None,
        policy: Mapping[str, frozenset[str]] = POLICY,
    ) -> None:
        self.security = security
        self.is_assigned = is_assigned
        self.policy = policy

    def authorize(self, envelope: protocol.Envelope) -> None:
        role = self.security.role_of(envelope.sender)
        if role is None or envelope.type not in self.policy.get(role, frozenset()):
            raise AuthorizationError(
                "forbidden", f"role {role} may not send {envelope.type}",
                sender=envelope.sender, message_id=envelope.id,
            )
        if envelope.type in TASK_REPORTS and self.is_assigned is not None:
            task_id = envelope.payload.task_id
            if not self.is_assigned(envelope.sender, task_id):
                raise AuthorizationError(
                    "not_assigned", f"task {task_id} was never assigned to this agent",
                    sender=envelope.sender, message_id=envelope.id,
                )
