"""The queue discipline: fair share between principals, priority with bounded aging."""

from __future__ import annotations

import pytest

from coordinator_agent.coordinator.scheduling import (
    SchedulingQueue,
    priority_band,
    priority_name,
)


def drain(queue: SchedulingQueue, now: float, running: dict[str, int] | None = None,
          take: int | None = None) -> list[str]:
    """Serve as a dispatcher would, every task placeable: the order in which ids come out."""
    order: list[str] = []
    serving = queue.serving_order(now, running or {})
    try:
        while take is None or len(order) < take:
            picked = serving.next(scan_limit=1000)
            if picked is None:
                break
            task_id, principal = picked
            queue.discard(task_id)
            serving.took(principal)
            order.append(task_id)
    finally:
        serving.close()
    return order


def test_priority_names_and_bands() -> None:
    assert priority_band("high") == 8
    assert priority_band(None) == 5
    assert priority_band(0) == 0
    assert priority_name(2) == "low"
    assert priority_name(7) == "7"
    with pytest.raises(ValueError, match="band must be 0-9"):
        priority_band(10)
    with pytest.raises(ValueError, match="one of low, medium, high"):
        priority_band("urgent")


def test_higher_priority_first_then_older_first() -> None:
    queue = SchedulingQueue(aging_s=0)
    queue.add("low-1", "alice", 2, 100.0)
    queue.add("med-1", "alice", 5, 101.0)
    queue.add("high-1", "alice", 8, 102.0)
    queue.add("high-2", "alice", 8, 103.0)
    queue.add("med-2", "alice", 5, 104.0)
    assert drain(queue, 105.0) == ["high-1", "high-2", "med-1", "med-2", "low-1"]
    assert len(queue) == 0


def test_aging_lets_an_old_low_task_overtake_new_high_work_within_the_bound() -> None:
    queue = SchedulingQueue(aging_s=10, max_aging_bands=9)
    queue.add("old-low", "alice", 2, 0.0)
    queue.add("new-high", "alice", 8, 59.0)
    # At 59 s the old task has gained 5.9 bands: 7.9 < 8 (well, 8 + 0.0 aging for the new one).
    assert drain(queue, 59.0, take=1) == ["new-high"]
    queue.add("newer-high", "alice", 8, 61.0)
    # At 61 s: 2 + 6.1 = 8.1 > 8: the waiting task goes first.
    assert drain(queue, 61.0, take=1) == ["old-low"]


def test_aging_is_bounded() -> None:
    queue = SchedulingQueue(aging_s=1, max_aging_bands=2)
    queue.add("ancient-low", "alice", 2, 0.0)
    queue.add("fresh-medium", "alice", 5, 10_000.0)
    # However long it waited, a low task gains at most two bands: 4 < 5.
    assert drain(queue, 10_000.0) == ["fresh-medium", "ancient-low"]
    queue.add("t", "alice", 2, 0.0)
    assert queue.position("t", 10_000.0) == {"band": 2, "effective_priority": 4.0,
                                              "waited_s": 10_000.0}


def test_fair_share_interleaves_a_flood_with_a_trickle() -> None:
    queue = SchedulingQueue(aging_s=0)
    for i in range(100):
        queue.add(f"flood-{i}", "flooder", 5, float(i))
    queue.add("mine-1", "bob", 5, 200.0)
    queue.add("mine-2", "bob", 5, 201.0)
    # The flooder already holds ten slots: bob's tasks go to the next two free ones.
    assert drain(queue, 300.0, running={"flooder": 10}, take=2) == ["mine-1", "mine-2"]
    # Nobody else waits: the flood gets everything.
    assert drain(queue, 300.0, running={"flooder": 10}) == [f"flood-{i}" for i in range(100)]


def test_weights_split_the_slots_in_proportion() -> None:
    queue = SchedulingQueue(aging_s=0, weights={"big": 3})
    for i in range(40):
        queue.add(f"big-{i}", "big", 5, float(i))
        queue.add(f"small-{i}", "small", 5, float(i))
    first = drain(queue, 100.0, take=40)
    assert sum(t.startswith("big") for t in first) == 30
    assert sum(t.startswith("small") for t in first) == 10


def test_priority_does_not_buy_a_bigger_share() -> None:
    queue = SchedulingQueue(aging_s=0)
    for i in range(10):
        queue.add(f"a-high-{i}", "a", 8, float(i))
        queue.add(f"b-low-{i}", "b", 2, float(i))
    first = drain(queue, 100.0, take=10)
    assert sum(t.startswith("a") for t in first) == 5


def test_changes_during_a_pass_apply_when_it_closes() -> None:
    queue = SchedulingQueue(aging_s=0)
    for i in range(3):
        queue.add(f"t{i}", "alice", 5, float(i))
    serving = queue.serving_order(10.0, {})
    picked = serving.next(scan_limit=10)
    assert picked == ("t0", "alice")
    queue.add("late", "alice", 9, 10.0)  # e.g. a coalition's child created mid-pass
    queue.discard("t1")
    assert "late" in queue and "t1" not in queue
    assert serving.next(scan_limit=10) == ("t2", "alice")  # t1 is skipped, late not yet seen
    serving.close()
    assert drain(queue, 11.0) == ["late", "t0", "t2"]
    assert len(queue) == 0


def test_scan_limit_bounds_the_work_on_an_unplaceable_backlog() -> None:
    queue = SchedulingQueue(aging_s=0)
    for i in range(50):
        queue.add(f"stuck-{i}", "alice", 5, float(i))
    queue.add("bob-1", "bob", 5, 100.0)
    serving = queue.serving_order(200.0, {"bob": 5})
    seen = []
    while (picked := serving.next(scan_limit=3)) is not None:
        seen.append(picked[0])  # never taken: no agent for any of them
    serving.close()
    assert seen == ["stuck-0", "stuck-1", "stuck-2", "bob-1"]
    assert len(queue) == 51
    assert queue.backlog("alice") == 50


def test_tasks_naming_a_blocked_kind_are_skipped_as_a_lane() -> None:
    queue = SchedulingQueue(aging_s=0)
    for i in range(500):  # older, and all for a kind whose agents are busy
        queue.add(f"x-{i}", "alice", 5, float(i), kind="x")
    queue.add("y-1", "alice", 5, 1000.0, kind="y")
    queue.add("routed-1", "alice", 5, 1001.0)
    serving = queue.serving_order(2000.0, {}, blocked_kinds={"x"})
    seen = []
    while (picked := serving.next(scan_limit=3)) is not None:
        seen.append(picked[0])  # none of the 500 is looked at, so the scan limit is not hit
    serving.close()
    assert seen == ["y-1", "routed-1"]
    assert drain(queue, 2000.0, take=1) == ["x-0"]  # unblocked: oldest first again


def test_a_kind_blocked_during_the_pass_yields_no_more_of_its_tasks() -> None:
    queue = SchedulingQueue(aging_s=0)
    for i in range(100):
        queue.add(f"x-{i}", "alice", 5, float(i), kind="x")
        queue.add(f"r-{i}", "alice", 5, float(i) + 0.5)  # routed: no kind named
    queue.add("x-high", "alice", 8, 50.0, kind="x")
    serving = queue.serving_order(2000.0, {})
    first = serving.next(scan_limit=1000)
    assert first is not None and first[0] == "x-high"
    serving.block("x")  # its agents filled up: every other x task would find none
    seen = []
    while (picked := serving.next(scan_limit=1000)) is not None:
        seen.append(picked[0])
    serving.close()
    # At most the one task the merge already held per lane of the kind, then none of them.
    assert [t for t in seen if t.startswith("x-")] == ["x-0"]
    assert [t for t in seen if t.startswith("r-")] == [f"r-{i}" for i in range(100)]
    assert len(queue) == 201  # blocking takes nothing out of the queue
    assert drain(queue, 2000.0, take=2) == ["x-high", "x-0"]  # the next pass serves it again


def test_compaction_after_a_flood_keeps_every_task_its_place_and_its_age() -> None:
    def flooded() -> SchedulingQueue:
        queue = SchedulingQueue(aging_s=10)
        for i in range(2000):
            queue.add(f"f{i}", "flooder", 5, float(i), kind="general" if i % 2 else None)
        queue.add("light", "light", 8, 5.0)
        for i in range(1990):
            queue.discard(f"f{i}")
        return queue

    compacted, kept = flooded(), flooded()
    compacted.compact()  # what the flood watch does (memory.py)
    assert compacted.position("f1995", 2000.0) == kept.position("f1995", 2000.0)
    assert drain(compacted, 2000.0) == drain(kept, 2000.0)
    assert len(compacted) == 0
    # Never under a pass: its iterators would see a different dict.
    queue = flooded()
    serving = queue.serving_order(2000.0, {})
    where = queue._where
    queue.compact()
    assert queue._where is where
    serving.close()


def test_a_recent_submitter_with_nothing_pending_keeps_its_share_for_reserve_s() -> None:
    queue = SchedulingQueue(weights={"light": 1.0, "flood": 3.0}, reserve_s=0.5)
    for n in range(10):
        queue.add(f"f{n}", "flood", 5, now=0.0)
    assert queue.keeping_room(0.0) == {}  # the flood alone: the whole fleet is its
    queue.add("l1", "light", 5, now=1.0)
    assert queue.keeping_room(1.1) == {}  # both have tasks pending: fair share decides
    queue.discard("l1")  # assigned: nothing of the light operator's is pending
    assert queue.keeping_room(1.2) == {"light": 1.0, "flood": 3.0}
    assert queue.keeping_room(1.5) == {"light": 1.0, "flood": 3.0}
    assert queue.keeping_room(1.6) == {}  # quiet for longer than reserve_s


def test_no_room_is_kept_when_reserve_s_is_zero() -> None:
    queue = SchedulingQueue(reserve_s=0.0)
    queue.add("l1", "light", 5, now=0.0)
    queue.discard("l1")
    queue.add("f1", "flood", 5, now=0.0)
    assert queue.keeping_room(0.1) == {}
