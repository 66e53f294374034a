"""The fault suite runs on a RabbitMQ node of its own, started here and always stopped.

`make faults` runs it (and `.ci/run` runs `make faults`); a plain `pytest` leaves it out (see
tests/conftest.py), because it restarts and pauses a broker and takes a few minutes.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import FaultNode, Fleet


@pytest.fixture(scope="session")
def fault_node() -> Iterator[FaultNode]:
    node = FaultNode()
    node.start()
    try:
        yield node
    finally:
        node.stop()  # also after a failure: never leave a paused node behind


MakeFleet = Callable[..., Fleet]


@pytest.fixture
async def make_fleet(
    fault_node: FaultNode, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[MakeFleet]:
    fleets: list[Fleet] = []
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:30].strip("-")

    def make(agents: int = 3, **kwargs: Any) -> Fleet:
        fleet = Fleet(tmp_path / f"fleet{len(fleets)}", fault_node.url,
                      f"f-{slug}-{uuid.uuid4().hex[:6]}",
                      [f"agent-{i + 1}" for i in range(agents)], **kwargs)
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        await fleet.stop()
    # A paused node must not outlive its test.
    fault_node.resume()
