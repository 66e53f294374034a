"""When snapshots are due, and the retention settings that keep one inside the log."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from coordinator_agent.ha.snapshot import SnapshotRetention, SnapshotSchedule, retentions, schedule
from coordinator_agent.settings import HASettings, max_age_seconds


def test_due_by_events_bytes_or_time_but_never_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    s = SnapshotSchedule(every_events=100, every_bytes=1000, interval_s=60)
    assert not s.due()
    s.record(99, 10)
    assert not s.due()
    s.record(1, 10)
    assert s.due()
    s.taken()
    s.record(1, 1000)
    assert s.due(), "a quarter of the log's byte retention is due whatever the event count"
    s.taken()
    s.record(1, 1)
    later = time.monotonic() + 61
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert s.due()
    s.taken()
    assert not s.due(), "nothing applied since: an idle log needs no snapshot"


def test_settings_map_to_both_streams() -> None:
    ha = HASettings(log_max_age="2D", log_max_bytes=8 * 1024**3, snapshots_max_bytes=1024**3)
    log_retention, snaps = retentions(ha)
    assert (log_retention.max_age, log_retention.max_bytes) == ("2D", 8 * 1024**3)
    assert snaps.max_bytes == 1024**3 and snaps.segment_bytes <= snaps.max_bytes // 8
    assert schedule(ha).every_bytes == 2 * 1024**3


@pytest.mark.parametrize("bad", [{"log_max_age": "30m"},  # under 4 snapshot intervals
                                 {"log_max_age": "7x"}, {"log_max_age": "0D"},
                                 {"log_max_bytes": 100 * 1024**2}])  # under 4 segments
def test_retention_that_could_outrun_snapshots_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        HASettings(**bad)


def test_max_age_units() -> None:
    assert max_age_seconds("7D") == 7 * 86_400
    assert max_age_seconds("12h") == 12 * 3600
    assert max_age_seconds("90s") == 90


def test_two_snapshots_must_fit_the_snapshots_stream() -> None:
    retention = SnapshotRetention(max_bytes=100, segment_bytes=10)
    assert retention.holds_two(45)
    assert not retention.holds_two(46)
