"""Checking a group of writes against the PostgreSQL log, inside its transaction.

The postgres backend stores the writes of many clients (each a list of writes stored
all or none: a publish, an append, an append-full, a transaction) in one PostgreSQL
transaction: group commit. Under the log's head-row lock it reads the state those
writes depend on (the streams' next numbers and any stored event carrying one of
their ids) and :class:`GroupPlan` then checks each request in turn, as if the ones
before it were stored: exactly the checks and order of the embedded engine
(engine/writes.py, which this module reuses), so both backends answer alike. A request
that fails gets its error and leaves no trace; the others are stored.
"""

from __future__ import annotations

from typing import NamedTuple

from ..engine.appends import ANY, AppendResult, check_expected
from ..engine.errors import DuplicateIdInRequest, EngineError
from ..engine.names import check_new_stream_name
from ..engine.reads import StoredEvent
from ..engine.writes import Write, check_transaction_size, check_write, replay_reply


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
        if len(writes) > 1:
            check_transaction_size(writes)
        seen: set[bytes] = set()
        numbers: dict[bytes, int] = {}
        ids: dict[bytes, StoredEvent] = {}
        events: list[tuple] = []
        results: list[AppendResult] = []
        position = self.next_position
        for write in writes:
            check_write(write, self.max_event_size)
            stream = write.stream
            if stream in numbers:
                current = numbers[stream]
            else:
                current = self.numbers.get(stream, 0)
                if current == 0:
                    check_new_stream_name(stream)
            count = len(write.events)
            write_ids = write.ids or [None] * count
            found: list[StoredEvent | None] = [None] * count
            hits = False
            for k, event_id in enumerate(write_ids):
                if event_id is not None:
                    if event_id in seen:
                        raise DuplicateIdInRequest(event_id)
                    seen.add(event_id)
                    hit = found[k] = self.stored.get(event_id)
                    if hit is not None:
                        hits = True
            if hits:
                results.append(replay_reply(write, found))
                continue
            if write.expected != ANY:
                check_expected(stream, current, write.expected)
            numbers[stream] = current + count
            metadata = write.metadata or [None] * count
            full = write.ids is not None or write.metadata is not None
            for i, ((name, data), event_id, meta) in enumerate(zip(write.events, write_ids,
                                                                   metadata)):
                events.append((position + i, stream, current + i, name, data, event_id, meta,
                               position, full))
                if event_id is not None:
                    ids[event_id] = StoredEvent(stream, current + i, position + i, name, data,
                                                event_id, meta)
            results.append(AppendResult(current, current + count - 1, position + count))
            position += count
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
