"""ReplayGuard: which message ids were seen in the last ``window_s`` seconds.

A flood leaves about six ids per task behind for the whole window. Kept as Python objects (a
string and a float per id, ~190 bytes), they were also scattered over every page of the heap the
flood had used, and held all of those pages after the flood drained: the allocator can return a
page only when nothing on it lives. So no Python object per id is kept here: each id becomes a
64-bit hash (Python's per-process keyed SipHash) in a flat open-addressing table (``array``),
16-32 bytes per id, in generations of ``window_s / 3`` seconds; a generation is dropped whole once
its youngest id has outlived the window.

A hash collision would make a new message look like a replay: with 64-bit keyed hashes and
10^6 ids in the window, the chance is about 3 in 10^8 per window.
"""

from __future__ import annotations

from array import array

#: A generation spans window_s / SPLIT: ids are kept for window_s, and at most that much longer.
SPLIT = 3
_INITIAL_SLOTS = 1024  # a power of two
_MASK64 = (1 << 64) - 1


class _Table:
    """An open-addressing set of non-zero 64-bit integers, at most half full."""

    __slots__ = ("count", "slots", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.count = 0
        self.slots = array("Q", bytes(8 * _INITIAL_SLOTS))

    def __contains__(self, key: int) -> bool:
        slots = self.slots
        mask = len(slots) - 1
        i = key & mask
        while (found := slots[i]) != 0:
            if found == key:
                return True
            i = (i + 1) & mask
        return False

    def add(self, key: int) -> None:
        if 2 * (self.count + 1) > len(self.slots):
            self._grow()
        slots = self.slots
        mask = len(slots) - 1
        i = key & mask
        while (found := slots[i]) != 0:
            if found == key:
                return
            i = (i + 1) & mask
        slots[i] = key
        self.count += 1

    def _grow(self) -> None:
        old = self.slots
        self.slots = array("Q", bytes(16 * len(old)))
        self.count = 0
        for key in old:
            if key:
                self.add(key)


class ReplayGuard:
    """Remembers message ids for ``window_s``; a second sighting of an id is a replay."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.span = window_s / SPLIT
        self._generations: list[_Table] = []

    def check_and_remember(self, message_id: str, now: float) -> bool:
        """True if new. Ids arrive in time order, near enough: generations go oldest first."""
        generations = self._generations
        # An id added to a generation at most `span` after its start expires window_s later.
        while generations and generations[0].started + self.span + self.window_s <= now:
            del generations[0]
        key = (hash(message_id) & _MASK64) or 1
        for table in generations:
            if key in table:
                return False
        if not generations or now - generations[-1].started >= self.span:
            generations.append(_Table(now))
        generations[-1].add(key)
        return True

    def __len__(self) -> int:
        """Ids remembered (some up to ``window_s / 3`` past the window)."""
        return sum(table.count for table in self._generations)

    def memory_bytes(self) -> int:
        return sum(8 * len(table.slots) for table in self._generations)
