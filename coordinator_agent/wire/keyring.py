"""Keyring file: one Fernet key list per principal (newest first), stored with mode 0600.

The coordinator holds the whole keyring. An agent or operator needs only its own entry, which
``keys export`` writes to a file of its own: a key lets its holder speak as that principal only.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.fernet import Fernet
from pydantic import SecretStr

from coordinator_agent.exceptions import ConfigError

#: The coordinator needs no entry: it talks to each principal under that principal's key.
Role = Literal["agent", "operator"]
ROLES: tuple[Role, ...] = ("agent", "operator")
#: How many retired keys a rotation keeps so that in-flight messages still decrypt.
KEEP_OLD_KEYS = 2


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
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"keyring {path} does not exist: create it with "
                "`coordinator-agent keys generate --principal ID --role agent|operator`"
            ) from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"keyring {path} is unreadable: {type(exc).__name__}") from None
        try:
            principals = {
                pid: Principal(
                    pid,
                    _role(entry["role"]),
                    [SecretStr(k) for k in entry["keys"]],
                    SecretStr(entry["api_token"]) if entry.get("api_token") else None,
                )
                for pid, entry in raw["principals"].items()
            }
            for principal in principals.values():
                if not principal.keys:
                    raise ValueError("principal without keys")
                for key in principal.keys:
                    Fernet(key.get_secret_value())
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"keyring {path} is malformed ({type(exc).__name__})") from None
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


def _role(value: object) -> Role:
    if value not in ROLES:
        raise ValueError("unknown role")
    return value
