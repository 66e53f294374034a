"""A fresh standby's first step: the newest complete snapshot, restored as its store file.

``restore_latest`` runs before the standby opens its store. It appends a marker of its own to the
snapshots stream and reads from the first retained entry up to that marker, so it knows it has
seen the stream's end without waiting on a timer. Chunks are spooled, still sealed, to a file per
snapshot next to the store (a stream may hold a few snapshots; memory holds none of them); only
the newest snapshot with a manifest and all its chunks is opened, checked against its SHA-256,
and moved into place, unless the local store is already as new.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import uuid
import zlib
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from coordinator_agent.ha.log import LogCodec
from coordinator_agent.ha.snapshot import (
    SnapshotInfo,
    open_entry,
    publish_entry,
    seal_entry,
    stored_offset,
)
from coordinator_agent.wire.constants import snapshot_queue

log = logging.getLogger(__name__)


class _Spool:
    """Sealed chunks of one snapshot, in order, in a file; the manifest once it arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("wb")
        self.chunks = 0
        self.manifest: dict[str, Any] | None = None

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class _Scan:
    """Reads the snapshots stream up to our marker, keeping the newest complete snapshot."""

    def __init__(self, codec: LogCodec, marker: str, work: Path) -> None:
        self.codec = codec
        self.marker = marker
        self.work = work
        self.spools: dict[str, _Spool] = {}
        self.best: _Spool | None = None
        self.rejected = 0
        self.done = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            if not self.done.is_set():
                self._take(message)
        finally:
            await message.ack()  # credit: a stream stops delivering without it

    def _take(self, message: AbstractIncomingMessage) -> None:
        headers = message.headers or {}
        kind, snap_id = headers.get("ca-kind"), headers.get("ca-snapshot")
        if not isinstance(snap_id, str) or kind not in ("chunk", "manifest", "marker"):
            self.rejected += 1
            return
        if kind == "marker":
            if snap_id == self.marker:
                self.done.set()
            return
        spool = self.spools.get(snap_id)
        if kind == "chunk":
            if spool is None:
                spool = self.spools[snap_id] = _Spool(self.work / f".restore-{snap_id}.part")
            spool.file.write(len(message.body).to_bytes(4, "big") + message.body)
            spool.chunks += 1
            return
        try:
            manifest, _ = open_entry(self.codec, message.body)
        except ValueError:
            self.rejected += 1
            log.error("a snapshot manifest not sealed with the coordinator's key; ignored")
            return
        if spool is None or manifest.get("id") != snap_id or manifest.get("chunks") != spool.chunks:
            return  # its first chunks fell to retention, or a forged header: not complete
        spool.close()
        spool.manifest = manifest
        del self.spools[snap_id]
        if self.best is None or _newer(manifest, self.best.manifest):
            if self.best is not None:
                self.best.discard()
            self.best = spool
        else:
            spool.discard()

    def cleanup(self) -> None:
        for spool in self.spools.values():
            spool.discard()
        self.spools.clear()


def _newer(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    return b is None or (a["log_offset"], a["taken_at"]) > (b["log_offset"], b["taken_at"])


async def fetch_latest(channel: AbstractChannel, name: str, codec: LogCodec, work: Path,
                       *, timeout_s: float = 300.0) -> tuple[SnapshotInfo, Path] | None:
    """The newest complete snapshot, spooled (still sealed) under ``work``; None if there is none.

    The channel must confirm publishes (the marker is appended with a confirm).
    """
    marker = uuid.uuid4().hex
    scan = _Scan(codec, marker, work)
    body = seal_entry(codec, {"kind": "marker", "id": marker})
    await publish_entry(channel, name, body, marker, "marker")
    await channel.set_qos(prefetch_count=8)  # chunks are megabytes each
    queue = await channel.get_queue(snapshot_queue(name), ensure=False)
    tag = await queue.consume(scan.on_message, no_ack=False,
                              arguments={"x-stream-offset": "first"})
    try:
        await asyncio.wait_for(scan.done.wait(), timeout_s)
    except BaseException:
        if scan.best is not None:
            scan.best.discard()
        raise
    finally:
        with contextlib.suppress(Exception):
            await queue.cancel(tag)
        scan.cleanup()
    if scan.best is None or scan.best.manifest is None:
        return None
    fields = {k: scan.best.manifest[k] for k in SnapshotInfo.__dataclass_fields__}
    return SnapshotInfo(**fields), scan.best.path


def unpack(codec: LogCodec, info: SnapshotInfo, spool: Path, dest: Path) -> None:
    """Open, check and write a spooled snapshot to ``dest`` (atomically: a rename)."""
    partial = dest.with_name(dest.name + ".restoring")
    digest = hashlib.sha256()
    with spool.open("rb") as src, partial.open("wb") as out:
        for seq in range(info.chunks):
            body = src.read(int.from_bytes(src.read(4), "big"))
            header, payload = open_entry(codec, body)
            if header.get("id") != info.id or header.get("seq") != seq:
                raise ValueError(f"snapshot {info.id}: chunk {seq} is out of place")
            piece = zlib.decompress(payload)
            digest.update(piece)
            out.write(piece)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != info.sha256:
        partial.unlink()
        raise ValueError(f"snapshot {info.id}: checksum mismatch")
    for stale in (dest.with_name(dest.name + "-wal"), dest.with_name(dest.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()  # the old store's WAL must not be replayed into the restored file
    partial.replace(dest)


async def restore_latest(channel: AbstractChannel, name: str, codec: LogCodec,
                         store_path: Path, *, timeout_s: float = 300.0) -> SnapshotInfo | None:
    """Before the store is opened: replace it by the newest snapshot if that is newer.

    Returns the snapshot restored, or None (no snapshot, or the local store is as new). Either
    way the standby then reads the log from the store's ``log_offset() + 1`` (or 0).
    """
    store_path = Path(store_path)
    store_path.parent.mkdir(parents=True, exist_ok=True)
    found = await fetch_latest(channel, name, codec, store_path.parent, timeout_s=timeout_s)
    if found is None:
        return None
    info, spool = found
    try:
        local = await asyncio.to_thread(stored_offset, store_path)
        if local is not None and local >= info.log_offset:
            log.info("store at log offset %d is as new as snapshot %s (%d); kept", local,
                     info.id, info.log_offset)
            return None
        await asyncio.to_thread(unpack, codec, info, spool, store_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            spool.unlink()
    log.info("restored snapshot %s at log offset %d (%d bytes)", info.id, info.log_offset,
             info.store_bytes)
    return info
