"""The operator's controls from the command line: priority of a submission, and the commands that
act on tasks already submitted (``cancel``, ``redirect``, and the escalation desk ``escalated``,
``retry``, ``resolve``, ``fail``), which call the coordinator's HTTP API with an operator token.
"""

from __future__ import annotations

from coordinator_agent.coordinator.scheduling import priority_band
from coordinator_agent.exceptions import ConfigError


def priority_option(value: str) -> str | int:
    """``--priority``: a name or a band, checked here so a typo never reaches the broker."""
    given: str | int = int(value) if value.strip().isdigit() else value.strip().lower()
    try:
        priority_band(given)
    except ValueError as exc:
        raise ConfigError(f"--priority: {exc}") from None
    return given
