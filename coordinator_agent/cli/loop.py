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

from coordinator_agent.exceptions import ConfigError

log = logging.getLogger(__name__)


def choose_event_loop(wanted: str = "auto") -> str:
    """Install the chosen loop's policy for the next ``asyncio.run``; returns its name."""
    if wanted == "asyncio":
        asyncio.set_event_loop_policy(None)
        log.info("event loop: asyncio (event_loop: asyncio)")
        return "asyncio"
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if wanted == "uvloop":
            raise ConfigError("event_loop is uvloop but uvloop is not installed "
                              "(pip install 'coordinator-agent[fast]')") from None
        asyncio.set_event_loop_policy(None)
        log.info("event loop: asyncio (uvloop is not installed: the 'fast' extra)")
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    log.info("event loop: uvloop %s", getattr(uvloop, "__version__", "?"))
    return "uvloop"
