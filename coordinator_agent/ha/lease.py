"""A leadership lease on Consul: a session lock with a short TTL and a fencing epoch.

One key per coordinator name (``coordinator-agent/<name>/leader``). A candidate creates a session
with ``TTL`` (Consul enforces up to twice that), ``LockDelay`` 0 and no checks, so only the TTL
decides, and acquires the key with it. The **epoch** is the key's ``ModifyIndex`` read right after
the acquire: a Raft index, so it only grows across the whole cluster, even when the key is deleted
(``LockIndex`` restarts then). Directives carry it; agents refuse lower ones (fencing).

The holder renews every ``ttl / 3`` and considers itself the leader only while its last good
renewal is younger than ``ttl - margin``: past that it must stop acting, whatever Consul says
later. A graceful stop releases the key, which Consul hands over with no lock-delay.

Raw HTTP rather than py-consul: its session API refuses a TTL under 10 s on the client side.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from coordinator_agent.exceptions import DiscoveryError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Term:
    """A leadership term: who holds it and its fencing epoch."""

    holder: str
    epoch: int


class HolderClock:
    """How long a holder may still act as leader: both leases keep it the same way.

    The holder believes it leads only while its last good renewal (or acquire), timed from when
    the request was sent, is younger than ``ttl_s - margin_s``: nobody else can be handed the
    lock before ``ttl_s`` has passed since then.
    """

    ttl_s: float
    margin_s: float
    term: Term | None
    _renewed_at: float  # monotonic time of the last good acquire or renewal

    @property
    def held(self) -> bool:
        """True while we may act as leader: a term, renewed recently enough."""
        return self.time_left() > 0

    def time_left(self) -> float:
        """Seconds we may still act as leader without another good renewal (0 without a term)."""
        if self.term is None:
            return 0.0
        return max(0.0, self.ttl_s - self.margin_s - (time.monotonic() - self._renewed_at))


class ConsulLease(HolderClock):
    def __init__(
        self,
        url: str,
        name: str,
        holder: str,
        *,
        ttl_s: float = 2.0,
        margin_s: float = 0.3,
        token: str | None = None,
        timeout_s: float = 2.0,
    ) -> None:
        if ttl_s <= 2 * margin_s:
            raise ValueError(f"ttl_s ({ttl_s}) must exceed twice margin_s ({margin_s})")
        self.url = url.rstrip("/")
        self.key = f"coordinator-agent/{name}/leader"
        self.holder = holder
        self.ttl_s = ttl_s
        self.margin_s = margin_s
        self._headers = {"X-Consul-Token": token} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._http: aiohttp.ClientSession | None = None
        self.session_id: str | None = None
        self.term: Term | None = None  # ours, while we hold the lock
        self._renewed_at = 0.0  # monotonic time of the last good acquire or renewal

    def __repr__(self) -> str:
        return f"ConsulLease(key={self.key!r}, holder={self.holder!r}, term={self.term!r})"

    # --- the holder's view ----------------------------------------------------------------------

    async def acquire(self) -> Term | None:
        """Try once to take the lock; our term on success, None while another holds it."""
        started = time.monotonic()
        try:
            taken = await self._try_acquire()
        except _NotFound:  # a candidate's session expires while it waits: take a new one
            self.session_id = None
            taken = await self._try_acquire()
        if taken is not True:
            return None
        entry = await self.current()
        if entry is None or entry.get("Session") != self.session_id:
            return None  # lost between the acquire and the read (our session expired)
        self.term = Term(self.holder, int(entry["ModifyIndex"]))
        self._renewed_at = started
        log.info("leadership acquired: %s, epoch %d", self.key, self.term.epoch)
        return self.term

    async def _try_acquire(self) -> Any:
        if self.session_id is None:
            self.session_id = await self._create_session()
        else:
            # A waiting candidate's session ages unrenewed: renew it first, or the lock could
            # go with it moments after we took it (its TTL timer started long ago).
            await self._call("PUT", f"/v1/session/renew/{self.session_id}")
        return await self._call("PUT", f"/v1/kv/{self.key}",
                                params={"acquire": self.session_id}, data=self.holder.encode())

    async def renew(self) -> bool:
        """Renew the session; False (and the term dropped) when Consul no longer knows it."""
        if self.session_id is None:
            return False
        started = time.monotonic()
        try:
            await self._call("PUT", f"/v1/session/renew/{self.session_id}")
        except _NotFound:
            log.warning("leadership lost: session %s expired", self.session_id)
            self.session_id = None
            self.term = None
            return False
        self._renewed_at = started
        return True

    async def release(self) -> None:
        """Hand the lock over at once (no lock-delay on a release) and end the session."""
        session, self.session_id, self.term = self.session_id, None, None
        if session is None:
            return
        with contextlib.suppress(DiscoveryError, _NotFound):
            await self._call("PUT", f"/v1/kv/{self.key}", params={"release": session})
        with contextlib.suppress(DiscoveryError, _NotFound):
            await self._call("PUT", f"/v1/session/destroy/{session}")

    # --- everyone's view --------------------------------------------------------------------

    async def current(self, *, index: int | None = None, wait_s: float | None = None
                      ) -> dict[str, Any] | None:
        """The key's entry (``Session``, ``ModifyIndex``...), or None when it does not exist.

        With ``index``, a blocking query: it answers when the key changes or ``wait_s`` ends.
        """
        params: dict[str, str] = {"consistent": ""}
        timeout = self._timeout
        if index is not None:
            params = {"index": str(index), "wait": f"{wait_s or 10:g}s"}
            timeout = aiohttp.ClientTimeout(total=(wait_s or 10) * 1.1 + 2)
        try:
            entries = await self._call("GET", f"/v1/kv/{self.key}", params=params,
                                       timeout=timeout)
        except _NotFound:
            return None
        return entries[0] if entries else None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # --- HTTP -------------------------------------------------------------------------------

    async def _create_session(self) -> str:
        body = {
            "Name": f"{self.key} {self.holder}",
            "TTL": f"{self.ttl_s / 2:g}s",  # Consul enforces up to twice the TTL it is given
            "LockDelay": "0s",
            "Behavior": "release",  # never "delete": the epoch must never go backwards
            "Checks": [],  # no serfHealth: only the TTL decides
        }
        answer = await self._call("PUT", "/v1/session/create", json=body)
        return str(answer["ID"])

    async def _call(self, method: str, path: str, *, timeout: aiohttp.ClientTimeout | None = None,
                    **kwargs: Any) -> Any:
        if self._http is None:
            self._http = aiohttp.ClientSession(headers=self._headers)
        try:
            async with self._http.request(method, self.url + path, timeout=timeout or self._timeout,
                                          **kwargs) as response:
                if response.status == 404:
                    raise _NotFound(path)
                if response.status >= 400:
                    text = (await response.text())[:200]
                    if "invalid session" in text:  # Consul's answer for an expired session
                        raise _NotFound(path)
                    raise DiscoveryError(_operation(path), f"HTTP {response.status} {text}")
                return await response.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise DiscoveryError(_operation(path), repr(exc)) from exc


def _operation(path: str) -> str:
    """A bounded label (``session/renew``, ``kv``) for an error and its metric."""
    parts = path.strip("/").split("/")
    return "/".join(parts[1:3]) if parts[1] == "session" else parts[1]


class _NotFound(Exception):
    """No such key, or no such session (expired or destroyed)."""
