"""Snapshots of a replica's store on a second stream, so a fresh standby need not replay the log.

A snapshot is a consistent copy of the SQLite store (``VACUUM INTO`` on its own read connection,
so the applier keeps writing meanwhile) with the log offset it reflects inside it (the ``meta``
table, written in the same transaction as the state). It goes to the stream
``ca.<name>.snapshots`` as numbered chunks, each compressed and sealed with the coordinator
principal's keys like the log, followed by a manifest (offset, size, SHA-256). A snapshot whose
manifest is missing (its writer died midway) is ignored.

A standby restores the newest complete snapshot into its store file *before* it opens the store,
then reads the log from the store's offset + 1. To find the stream's end without waiting on a
timer, the reader first appends a marker of its own and reads until it meets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel

from coordinator_agent.ha.log import LogCodec, Retention
from coordinator_agent.wire.constants import snapshot_queue

if TYPE_CHECKING:
    from coordinator_agent.settings import HASettings

log = logging.getLogger(__name__)

#: Uncompressed store bytes per chunk: big enough to amortise a publish, small next to a frame.
CHUNK_BYTES = 4 * 1024 * 1024
_LEN = struct.Struct(">I")


@dataclass(frozen=True)
class SnapshotRetention:
    """The snapshots stream keeps at most ``max_bytes`` (no age limit: see ``check_size``)."""

    max_bytes: int = 2 * 1024**3
    segment_bytes: int = 64 * 1024**2

    def holds_two(self, size: int) -> bool:
        # Retention drops whole segments, oldest first, never the one being written. The newest
        # complete snapshot survives the next one being written while two fit besides a segment.
        return 2 * size + self.segment_bytes <= self.max_bytes


@dataclass(frozen=True)
class SnapshotInfo:
    id: str
    log_offset: int
    store_bytes: int  # the uncompressed store file
    sealed_bytes: int  # what the stream holds
    chunks: int
    sha256: str
    taken_at: float


async def declare_snapshots(channel: AbstractChannel, name: str,
                            retention: SnapshotRetention) -> None:
    await channel.declare_queue(snapshot_queue(name), durable=True, arguments={
        "x-queue-type": "stream",
        "x-max-length-bytes": retention.max_bytes,
        "x-stream-max-segment-size-bytes": retention.segment_bytes,
    })


def copy_store(store_path: Path | str, dest: Path) -> int | None:
    """A consistent, compact copy of the store at ``dest``; the log offset it reflects."""
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    source = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    try:
        source.execute("VACUUM INTO ?", (str(dest),))  # one read transaction: consistent
    finally:
        source.close()
    return stored_offset(dest)


def stored_offset(path: Path | str) -> int | None:
    """The ``log_offset`` a store file holds (None without a file, a meta table or the key)."""
    if not Path(path).exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'log_offset'").fetchone()
    except sqlite3.OperationalError:  # no meta table: a store never fed by the log
        row = None
    finally:
        db.close()
    return int(row[0]) if row else None


def seal_entry(codec: LogCodec, header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = orjson.dumps(header)
    return codec.seal_bytes(_LEN.pack(len(head)) + head + payload)


def open_entry(codec: LogCodec, body: bytes) -> tuple[dict[str, Any], bytes]:
    plain = codec.open_bytes(body)
    (size,) = _LEN.unpack_from(plain)
    return orjson.loads(plain[4:4 + size]), plain[4 + size:]


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while piece := f.read(CHUNK_BYTES):
            yield piece


async def publish_snapshot(channel: AbstractChannel, name: str, codec: LogCodec,
                           store_path: Path | str, retention: SnapshotRetention,
                           *, work_dir: Path | None = None) -> SnapshotInfo:
    """Copy the store and append it to the snapshots stream; the channel must confirm."""
    snap_id = uuid.uuid4().hex
    work = work_dir or Path(store_path).parent
    copy = work / f".snapshot-{snap_id}.db"
    try:
        offset = await asyncio.to_thread(copy_store, store_path, copy)
        if offset is None:
            raise ValueError("the store holds no log offset: nothing to snapshot yet")
        digest = hashlib.sha256()
        sealed = chunks = 0
        pieces = _chunks(copy)
        while True:
            body = await asyncio.to_thread(_next_chunk, codec, pieces, snap_id, chunks, digest)
            if body is None:
                break
            await publish_entry(channel, name, body, snap_id, "chunk")
            sealed += len(body)
            chunks += 1
        info = SnapshotInfo(snap_id, offset, copy.stat().st_size, sealed, chunks,
                            digest.hexdigest(), time.time())
        manifest = seal_entry(codec, {"kind": "manifest", **asdict(info)})
        await publish_entry(channel, name, manifest, snap_id, "manifest")
    finally:
        with contextlib.suppress(FileNotFoundError):
            copy.unlink()
    if not retention.holds_two(sealed):
        log.error("snapshot %s is %d bytes: the snapshots stream (max %d bytes) cannot hold two, "
                  "so retention may drop it while the next is written; raise "
                  "ha.snapshots_max_bytes", snap_id, sealed, retention.max_bytes)
    log.info("snapshot %s at log offset %d: %d chunks, %d bytes", snap_id, offset, chunks, sealed)
    return info


def _next_chunk(codec: LogCodec, pieces: Iterator[bytes], snap_id: str, seq: int,
                digest: Any) -> bytes | None:
    piece = next(pieces, None)
    if piece is None:
        return None
    digest.update(piece)
    header = {"kind": "chunk", "id": snap_id, "seq": seq}
    return seal_entry(codec, header, zlib.compress(piece, 1))


async def publish_entry(channel: AbstractChannel, name: str, body: bytes, snap_id: str,
                   kind: str) -> None:
    # The plain headers let a reader skip what it does not need without opening it; the sealed
    # body repeats them and is what a reader trusts.
    message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                               headers={"ca-snapshot": snap_id, "ca-kind": kind})
    await channel.default_exchange.publish(message, routing_key=snapshot_queue(name))


class SnapshotSchedule:
    """When the replica that applies the log should write the next snapshot.

    Every ``every_events`` events or ``every_bytes`` of log applied (the bytes bound keeps a
    snapshot inside the log's byte retention however large events are), and every ``interval_s``
    while anything was applied (the time bound keeps one inside its age retention).
    """

    def __init__(self, every_events: int, every_bytes: int, interval_s: float) -> None:
        self.every_events = every_events
        self.every_bytes = every_bytes
        self.interval_s = interval_s
        self.events = 0
        self.bytes = 0
        self._since = time.monotonic()

    def record(self, events: int, nbytes: int) -> None:
        self.events += events
        self.bytes += nbytes

    def due(self) -> bool:
        if not self.events:
            return False
        return (self.events >= self.every_events or self.bytes >= self.every_bytes
                or time.monotonic() - self._since >= self.interval_s)

    def taken(self) -> None:
        self.events = self.bytes = 0
        self._since = time.monotonic()


def retentions(ha: HASettings) -> tuple[Retention, SnapshotRetention]:
    """The log's and the snapshots stream's retention, from the ``ha`` settings."""
    segment = min(64 * 1024**2, ha.snapshots_max_bytes // 8)
    return (Retention(ha.log_max_age, ha.log_max_bytes, ha.log_segment_bytes),
            SnapshotRetention(ha.snapshots_max_bytes, segment))


def schedule(ha: HASettings) -> SnapshotSchedule:
    return SnapshotSchedule(ha.snapshot_every_events, ha.log_max_bytes // 4, ha.snapshot_interval_s)
