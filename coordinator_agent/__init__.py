"""coordinator_agent: a broker-based coordinator for fleets of worker agents."""

from __future__ import annotations

__version__ = "0.1.0"
