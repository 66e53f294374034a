"""Keyring file: one Fernet key list per principal (newest first), stored with mode 0600.

The coordinator holds the whole keyring. An agent or operator needs only its own entry, which
``keys export`` writes to a file of its own: a key lets its holder speak as that principal only.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

from cryptography.fernet import Fernet
from pydantic import SecretStr

from coordinator_agent.exceptions import ConfigError

#: The coordinator talks to each principal under that principal's key. An entry of role
#: ``coordinator`` is optional: its keys seal what only coordinators read (the HA log).
Role = Literal["agent", "operator", "coordinator"]
ROLES: tuple[Role, ...] = ("agent", "operator", "coordinator")
#: How many retired keys a rotation keeps so that in-flight messages still decrypt.
KEEP_OLD_KEYS = 2
#: A principal id travels as the envelope's sender (protocol.Identifier) and names queues and
#: Consul services, so it is checked when it is created, not when the first message fails.
PRINCIPAL_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
#: Permission bits a keyring must not have: anything for others, or write for the group. Group
#: read stays allowed: Kubernetes mounts Secrets 0440 for the pod's fsGroup.
TOO_OPEN = stat.S_IRWXO | stat.S_IWGRP
FRESH_START = ("move it aside and create keys again with "
               "`coordinator-agent keys generate --principal ID --role agent|operator`, "
               "or restore it from a backup")


def check_principal_id(principal_id: str) -> str:
    if not PRINCIPAL_ID.fullmatch(principal_id):
        raise ConfigError(
            f"principal id {principal_id!r} is not allowed: use 1 to 128 letters, digits and "
            "'_' '.' ':' '@' '-' (it names queues and is checked on every message)"
        )
    return principal_id


def require_role(keyring: Keyring, principal_id: str, role: Role, path: Path | str) -> None:
    """Refuse to act as ``principal_id`` unless the keyring gives it ``role``."""
    principal = keyring.get(principal_id)
    if principal is None:
        raise ConfigError(f"{principal_id!r} is not in the keyring {path}: create it with "
                          f"`coordinator-agent keys generate --principal {principal_id} "
                          f"--role {role}`")
    if principal.role != role:
        raise ConfigError(
            f"{principal_id!r} is an {principal.role} in {path}, not an {role}: the coordinator "
            f"would refuse every message it sent as one. Give the {role} its own id "
            f"(`coordinator-agent keys generate --principal ID --role {role}`)"
        )


@dataclass
class Principal:
    id: str
    role: Role
    #: Newest first: the first key encrypts, all of them decrypt (MultiFernet).
    keys: list[SecretStr]
    #: Operators only: bearer token for the HTTP API's write endpoints.
    api_token: SecretStr | None = None

    def __repr__(self) -> str:
        return f"Principal(id={self.id!r}, role={self.role!r}, keys={len(self.keys)})"


@dataclass
class Keyring:
    principals: dict[str, Principal] = field(default_factory=dict)

    def get(self, principal_id: str) -> Principal | None:
        return self.principals.get(principal_id)

    def generate(self, principal_id: str, role: Role) -> Principal:
        check_principal_id(principal_id)
        if principal_id in self.principals:
            raise ConfigError(f"principal {principal_id!r} already exists (use keys rotate)")
        token = SecretStr(secrets.token_urlsafe(32)) if role == "operator" else None
        principal = Principal(principal_id, role, [_new_key()], token)
        self.principals[principal_id] = principal
        return principal

    def ensure(self, principal_id: str, role: Role) -> Principal:
        existing = self.principals.get(principal_id)
        return existing if existing is not None else self.generate(principal_id, role)

    def rotate(self, principal_id: str) -> Principal:
        principal = self.principals.get(principal_id)
        if principal is None:
            raise ConfigError(f"unknown principal {principal_id!r}")
        principal.keys = [_new_key(), *principal.keys[:KEEP_OLD_KEYS]]
        return principal

    def subset(self, principal_id: str) -> Keyring:
        principal = self.principals.get(principal_id)
        if principal is None:
            raise ConfigError(f"unknown principal {principal_id!r}")
        return Keyring({principal_id: principal})

    def operator_for_token(self, token: str) -> Principal | None:
        for principal in self.principals.values():
            if principal.api_token is not None and secrets.compare_digest(
                principal.api_token.get_secret_value().encode(), token.encode()
            ):
                return principal
        return None

    # --- file ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path) -> Keyring:
        """Read a keyring file; every problem is a ConfigError naming the file and what to do."""
        try:
            mode = path.stat().st_mode
            if os.name == "posix" and stat.S_ISREG(mode) and mode & TOO_OPEN:
                # As ssh does with a private key: a secret others can read is refused.
                raise ConfigError(
                    f"keyring {path} is open to others (mode {stat.S_IMODE(mode):04o}) and holds "
                    f"secret keys: run `chmod 600 {path}`"
                )
            text = path.read_text(encoding="utf-8")
            raw = json.loads(text)
        except FileNotFoundError:
            raise ConfigError(
                f"keyring {path} does not exist: create it with "
                "`coordinator-agent keys generate --principal ID --role agent|operator`"
            ) from None
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"keyring {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                f"{exc.msg}): {FRESH_START}"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(f"keyring {path} is not UTF-8 text: {FRESH_START}") from None
        except OSError as exc:
            raise ConfigError(f"keyring {path} cannot be read ({exc.strerror})") from None
        try:
            principals = _parse(raw)
        except _Malformed as exc:
            raise ConfigError(f"keyring {path} is malformed: {exc}; {FRESH_START}") from None
        return cls(principals)

    @classmethod
    def load_or_create(cls, path: Path) -> Keyring:
        return cls.load(path) if path.exists() else cls()

    def save(self, path: Path) -> None:
        """Write atomically with mode 0600: the file never exists with looser permissions."""
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "principals": {
                p.id: {
                    "role": p.role,
                    "keys": [k.get_secret_value() for k in p.keys],
                    **({"api_token": p.api_token.get_secret_value()} if p.api_token else {}),
                }
                for p in self.principals.values()
            }
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".keyring-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _new_key() -> SecretStr:
    return SecretStr(Fernet.generate_key().decode())


class _Malformed(ValueError):
    """What is wrong in a keyring's JSON, in words that never quote a key."""


def _parse(raw: object) -> dict[str, Principal]:
    if not isinstance(raw, dict) or not isinstance(raw.get("principals"), dict):
        raise _Malformed('expected {"principals": {ID: {"role": ..., "keys": [...]}}}')
    principals: dict[str, Principal] = {}
    for pid, entry in raw["principals"].items():
        where = f"principal {pid!r}"
        if not isinstance(entry, dict):
            raise _Malformed(f"{where} is not an object")
        role = entry.get("role")
        if role not in ROLES:
            raise _Malformed(f"{where} has role {role!r}, not one of {', '.join(ROLES)}")
        keys = entry.get("keys")
        if not isinstance(keys, list) or not keys:
            raise _Malformed(f"{where} has no list of keys")
        for number, key in enumerate(keys, 1):
            try:
                Fernet(key)
            except (TypeError, ValueError):
                raise _Malformed(f"{where}: key {number} is not a Fernet key") from None
        token = entry.get("api_token")
        if token is not None and not isinstance(token, str):
            raise _Malformed(f"{where}: api_token is not a string")
        principals[pid] = Principal(pid, cast(Role, role), [SecretStr(k) for k in keys],
                                    SecretStr(token) if token else None)
    return principals
