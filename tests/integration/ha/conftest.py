"""Fixtures shared by the HA tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from coordinator_agent.wire.messaging import close_connection


@pytest.fixture
async def channel(
    broker_url: str, request: pytest.FixtureRequest,
) -> AsyncIterator[AbstractChannel]:
    """A confirming channel on a connection named after the test."""
    connection = await aio_pika.connect(broker_url, client_properties={
        "connection_name": request.node.name})
    yield await connection.channel(publisher_confirms=True)
    await close_connection(connection)
