"""The public API is what __all__ says: sorted, importable, and nothing private in it."""

from __future__ import annotations

import coordinator_agent


def test_all_is_sorted_and_importable() -> None:
    names = coordinator_agent.__all__
    assert names == sorted(names)
    for name in names:
        assert getattr(coordinator_agent, name) is not None, name


def test_every_exported_exception_derives_from_the_root() -> None:
    for name in coordinator_agent.__all__:
        member = getattr(coordinator_agent, name)
        if isinstance(member, type) and issubclass(member, Exception):
            assert issubclass(member, coordinator_agent.CoordinatorError), name


def test_public_classes_live_in_the_package() -> None:
    for name in coordinator_agent.__all__:
        member = getattr(coordinator_agent, name)
        if isinstance(member, type):
            assert member.__module__.startswith("coordinator_agent."), name
