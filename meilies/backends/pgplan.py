"""Checking a group of writes against the PostgreSQL log, inside its transaction.

The postgres backend stores the writes of many clients (each a list of writes stored
all or none: a publish, an append, an append-full, a transaction) in one PostgreSQL
transaction: group commit. Under the log's head-row lock it reads the state those
writes depend on (the streams' next numbers and any stored event carrying one of
their ids) and :class:`GroupPlan` then checks each request in turn, as if the ones
before it were stored, with the embedded engine's own ``check_writes``
(engine/writes.py): both backends check the same things in the same order and answer
alike. A request that fails gets its error and leaves no trace; the others are stored.
"""

from __future__ import annotations

from typing import NamedTuple

from ..engine.appends import ANY, AppendResult
from ..engine.errors import EngineError
from ..engine.reads import StoredEvent
from ..engine.writes import Write, check_writes


class Row(NamedTuple):
    """One event as ``meilies_events`` holds it (pgschema.py)."""

    position: int
    stream: bytes
    number: int
    name: bytes
    data: bytes
    event_id: bytes | None
    metadata: bytes | None
    timestamp_ms: int
    #: Position of the first event of the write it belongs to (one record).
    write_start: int
    #: Position just past the last event of its PostgreSQL transaction.
    group_end: int
    #: Written with ids or metadata (append-full, a transaction's writes).
    full_write: bool


class GroupPlan:
    """The requests of one PostgreSQL transaction, checked in order (module docstring).

    ``numbers`` maps each stream the group names to its next number (absent: the
    stream has no event); ``stored`` maps each id the group names to the stored event
    carrying it.
    """

    def __init__(self, next_position: int, numbers: dict[bytes, int],
                 stored: dict[bytes, StoredEvent], max_event_size: int,
                 timestamp_ms: int) -> None:
        self.first_position = next_position
        self.next_position = next_position
        self.numbers = numbers
        self.stored = stored
        self.max_event_size = max_event_size
        self.timestamp_ms = timestamp_ms
        #: (position, stream, number, name, data, id, metadata, write_start, full) of
        #: every event to insert, in position order.
        self.events: list[tuple] = []

    def add(self, writes: list[Write]) -> list[AppendResult] | EngineError:
        """Check one request; its results, or the error that refuses it whole."""
        try:
            return self._add(writes)
        except EngineError as exc:
            return exc

    def _add(self, writes: list[Write]) -> list[AppendResult]:
        checked = check_writes(writes, self.max_event_size, self.numbers.get,
                               self.stored.get)
        numbers: dict[bytes, int] = {}
        ids: dict[bytes, StoredEvent] = {}
        events: list[tuple] = []
        results: list[AppendResult] = []
        position = self.next_position
        for write, (replay, first) in zip(writes, checked):
            if replay is not None:
                results.append(replay)
                continue
            count = len(write.events)
            stream = write.stream
            write_ids = write.ids or [None] * count
            metadata = write.metadata or [None] * count
            full = write.ids is not None or write.metadata is not None
            for i, ((name, data), event_id, meta) in enumerate(zip(write.events, write_ids,
                                                                   metadata)):
                events.append((position + i, stream, first + i, name, data, event_id, meta,
                               position, full))
                if event_id is not None:
                    ids[event_id] = StoredEvent(stream, first + i, position + i, name, data,
                                                event_id, meta)
            numbers[stream] = first + count
            results.append(AppendResult(first, first + count - 1, position + count))
            position += count
        # Only now, the request being accepted whole: the next ones see its effects.
        self.numbers.update(numbers)
        self.stored.update(ids)
        self.events.extend(events)
        self.next_position = position
        return results


def writes_of(rows: list[Row]) -> list[tuple[list[Write], int]]:
    """The rows of whole PostgreSQL transactions, in position order, as the engine
    writes that store them again: (writes, timestamp) per transaction."""
    groups: list[tuple[list[Write], int]] = []
    i = 0
    while i < len(rows):
        group_end = rows[i].group_end
        writes: list[Write] = []
        timestamp = rows[i].timestamp_ms
        while i < len(rows) and rows[i].position < group_end:
            start = rows[i].write_start
            j = i
            while j < len(rows) and rows[j].write_start == start:
                j += 1
            part = rows[i:j]
            events = [(r.name, r.data) for r in part]
            if part[0].full_write:
                writes.append(Write(part[0].stream, events, ANY, [r.event_id for r in part],
                                    [r.metadata for r in part]))
            else:
                writes.append(Write(part[0].stream, events))
            i = j
        groups.append((writes, timestamp))
    return groups
