"""Which event loop the long-running commands use: uvloop where installed, else asyncio's own.

uvloop is an optional extra (``pip install 'coordinator-agent[fast]'``): its socket and callback
machinery is written in C, and a consumer that acks costs about a third less CPU per message
with it (docs/PERFORMANCE.md). The setting ``event_loop`` (``COORDINATOR_EVENT_LOOP``):
``auto`` (default), ``asyncio`` keeps asyncio's loop even where uvloop is installed, ``uvloop``
requires it. The choice is logged at start.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from types import ModuleType

from coordinator_agent.exceptions import ConfigError

log = logging.getLogger(__name__)


def _uvloop(wanted: str) -> ModuleType | None:
    """The uvloop module if ``wanted`` and installed; ConfigError if required and missing."""
    if wanted == "asyncio":
        return None
    try:
        return importlib.import_module("uvloop")
    except ImportError:
        if wanted == "uvloop":
            raise ConfigError("event_loop is uvloop but uvloop is not installed "
                              "(pip install 'coordinator-agent[fast]')") from None
        return None


def choose_event_loop(wanted: str = "auto") -> str:
    """Install the chosen loop's policy for the next ``asyncio.run``; returns its name."""
    uvloop = _uvloop(wanted)
    if uvloop is None:
        asyncio.set_event_loop_policy(None)
        why = "event_loop: asyncio" if wanted == "asyncio" else "uvloop is not installed"
        log.info("event loop: asyncio (%s)", why)
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    log.info("event loop: uvloop %s", getattr(uvloop, "__version__", "?"))
    return "uvloop"


def new_event_loop(wanted: str = "auto") -> asyncio.AbstractEventLoop:
    """A new loop of the chosen kind, without touching the process-wide policy (a thread)."""
    uvloop = _uvloop(wanted)
    if uvloop is None:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
