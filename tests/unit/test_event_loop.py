"""The long-running commands' event loop: uvloop where installed, asyncio on request."""

from __future__ import annotations

import asyncio
import importlib.util
import sys

import pytest

from coordinator_agent.cli.loop import choose_event_loop, new_event_loop
from coordinator_agent.exceptions import ConfigError
from coordinator_agent.settings import Settings

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None


@pytest.fixture(autouse=True)
def default_policy_after():
    yield
    asyncio.set_event_loop_policy(None)


def test_asyncio_on_request_even_where_uvloop_is_installed() -> None:
    assert choose_event_loop("asyncio") == "asyncio"
    assert type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy


def test_auto_takes_uvloop_where_installed() -> None:
    assert Settings().event_loop == "auto"
    assert choose_event_loop("auto") == ("uvloop" if HAS_UVLOOP else "asyncio")
    loop = asyncio.new_event_loop()
    try:
        assert ("uvloop" in type(loop).__module__) == HAS_UVLOOP
    finally:
        loop.close()


def test_the_setting_takes_only_the_three_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORDINATOR_EVENT_LOOP", "asyncio")
    assert Settings().event_loop == "asyncio"
    monkeypatch.setenv("COORDINATOR_EVENT_LOOP", "trio")
    with pytest.raises(ValueError, match="event_loop"):
        Settings()


def test_uvloop_required_but_missing_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what an install without it looks like
    with pytest.raises(ConfigError, match="not installed"):
        choose_event_loop("uvloop")
    assert choose_event_loop("auto") == "asyncio"  # auto falls back instead


def test_a_loop_for_a_thread_leaves_the_policy_alone() -> None:
    policy = asyncio.get_event_loop_policy()
    loop = new_event_loop("auto")
    try:
        assert ("uvloop" in type(loop).__module__) == HAS_UVLOOP
        assert loop.run_until_complete(asyncio.sleep(0, result=7)) == 7
    finally:
        loop.close()
    assert asyncio.get_event_loop_policy() is policy
