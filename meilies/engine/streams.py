"""The stream table: every stream's id, name and counters, in flat arrays.

Event sourcing uses one stream per aggregate, so a store holds millions of streams.
They cost no file each, only a name in a list and a few u64 in ``array('Q')``
columns indexed by the stream id (dense: 0, 1, 2, ... in order of creation), which
the checkpoint writes and reads back with one ``tobytes``/``frombytes`` per column.

Two counts per stream, because a write is not a read: ``next_number`` counts events
written (what ``append``'s expected-version check must see), ``visible_next`` counts
events readers may see (durable under the fsync policy in force).

Not thread-safe: the engine serialises all access.
"""

from __future__ import annotations

from array import array


class StreamTable:
    def __init__(self, names: list[bytes] | None = None, next_number: array | None = None,
                 first_position: array | None = None) -> None:
        self.names: list[bytes] = names if names is not None else []
        self.ids: dict[bytes, int] = {name: sid for sid, name in enumerate(self.names)}
        self.next_number = next_number if next_number is not None else array("Q")
        self.first_position = first_position if first_position is not None else array("Q")
        self.visible_next = array("Q", self.next_number)
        self._sorted_visible: list[bytes] | None = None
        #: Names that became visible since ``_sorted_visible`` was built: merged into
        #: it when next asked for (a sort of the whole list per new stream would make
        #: paging through a million streams that keep growing quadratic).
        self._newly_visible: list[bytes] = []

    def __len__(self) -> int:
        return len(self.names)

    def create(self, name: bytes, first_position: int) -> int:
        """Add a stream (no events yet) and return its id."""
        sid = len(self.names)
        self.names.append(name)
        self.ids[name] = sid
        self.next_number.append(0)
        self.visible_next.append(0)
        self.first_position.append(first_position)
        return sid

    def drop_newest(self, sid: int) -> None:
        """Undo :meth:`create` of the newest stream, whose write failed."""
        assert sid == len(self.names) - 1 and self.next_number[sid] == 0
        del self.ids[self.names.pop()]
        self.next_number.pop()
        self.visible_next.pop()
        self.first_position.pop()

    def make_visible(self, sid: int, next_number: int) -> None:
        if self.visible_next[sid] == 0 and self._sorted_visible is not None:
            self._newly_visible.append(self.names[sid])
        self.visible_next[sid] = next_number

    def all_visible(self) -> None:
        """Make every event written visible (opening: what recovery kept is durable)."""
        self.visible_next = array("Q", self.next_number)
        self._sorted_visible = None

    def sorted_visible_names(self) -> list[bytes]:
        """Names of the streams that have a visible event, in byte order (cached; the
        list returned is never changed afterwards). Visible events are never taken
        back, so the list only grows."""
        if self._sorted_visible is None:
            self._sorted_visible = sorted(
                name for name, n in zip(self.names, self.visible_next) if n)
            self._newly_visible = []
        elif self._newly_visible:
            self._newly_visible.sort()
            # Two sorted runs: the sort merges them in one linear pass.
            merged = self._sorted_visible + self._newly_visible
            merged.sort()
            self._sorted_visible = merged
            self._newly_visible = []
        return self._sorted_visible

    def visible_count(self) -> int:
        return len(self.sorted_visible_names())
