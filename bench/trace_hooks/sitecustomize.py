"""Timestamps for bench/stage_trace.py: imported at start-up by every Python process whose
``PYTHONPATH`` holds this directory, and active only with ``STAGE_TRACE_DIR`` set.

Each process appends ``time kind a b c`` lines to ``$STAGE_TRACE_DIR/<name>-<pid>.trace``:
every AMQP publish (``pub``) and its return (``conf``: the confirm, or the write for an
unconfirmed one), every delivery as its frames are read (``recv``), and, in a coordinator
with HA, the log writer's flushes, the reader's applies and the barriers' waits.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

_DIR = os.environ.get("STAGE_TRACE_DIR")


def _install(directory: str) -> None:
    import aiormq.channel
    from pamqp import commands as spec

    name = os.environ.get("STAGE_TRACE_NAME") or os.path.basename(sys.argv[0] or "python")
    out = open(os.path.join(directory, f"{name}-{os.getpid()}.trace"), "a",  # noqa: SIM115
               buffering=1)
    clock = time.time

    def rec(*fields: Any) -> None:
        out.write(f"{clock():.6f} " + " ".join(str(f) for f in fields) + "\n")

    channel_cls: Any = aiormq.channel.Channel
    publish = channel_cls.basic_publish
    read_content = channel_cls._read_content

    async def basic_publish(self: Any, body: bytes, *, exchange: str = "",
                            routing_key: str = "", properties: Any = None,
                            **kwargs: Any) -> Any:
        kind = getattr(properties, "message_type", None) or "-"
        rec("pub", exchange or "-", routing_key or "-", kind, len(body))
        result = await publish(self, body, exchange=exchange, routing_key=routing_key,
                               properties=properties, **kwargs)
        rec("conf", exchange or "-", routing_key or "-", kind)
        return result

    async def _read_content(self: Any, frame: Any, header: Any) -> Any:
        message = await read_content(self, frame, header)
        if isinstance(frame, spec.Basic.Deliver):
            kind = getattr(header.properties, "message_type", None) or "-"
            rec("recv", frame.exchange or "-", frame.routing_key or "-", kind)
        return message

    channel_cls.basic_publish = basic_publish
    channel_cls._read_content = _read_content

    try:
        from coordinator_agent.ha import log as ha_log
        from coordinator_agent.ha import replication
    except ImportError:
        return
    flush = ha_log.LogWriter._flush

    def _flush(self: Any) -> None:
        if self._batch:
            rec("logflush", len(self._batch), "-", "-")
        flush(self)

    ha_log.LogWriter._flush = _flush  # type: ignore[method-assign]
    apply = replication.Replication._apply

    async def _apply(self: Any, events: Any, offset: int) -> None:
        rec("apply0", offset, len(events), "-")
        await apply(self, events, offset)
        rec("apply1", offset, len(events), "-")

    replication.Replication._apply = _apply  # type: ignore[method-assign]
    barrier = replication.Replication.barrier

    async def _barrier(self: Any) -> None:
        last = self._last
        waits = last is not None and not last.done()
        rec("bar0", int(waits), "-", "-")
        await barrier(self)
        rec("bar1", int(waits), "-", "-")

    replication.Replication.barrier = _barrier  # type: ignore[method-assign]


if _DIR:
    _install(_DIR)
