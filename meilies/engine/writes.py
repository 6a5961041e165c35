"""Writes with event ids and metadata, idempotent retries, and transactions.

One method, :meth:`WritePath.write`, stores a list of writes (each an ``append`` of
one stream, with optional ids and metadata) all or none: an ``append-full`` is a list
of one, a ``MULTI``/``EXEC`` transaction a list of its queued writes. It runs in two
phases, so that nothing is stored unless everything passes:

1. *Check*, in order, each write as if the ones before it were applied: names, sizes
   and ids; then idempotency (before the expected version, PROTOCOL.md): a write
   whose events are all stored already, consecutively in its stream with the same
   ids, names, metadata and data, is a retry and gets its first reply back, storing
   nothing; any other reuse of a stored id is :class:`DuplicateEventId`; then the
   expected version, against the stream's number after the writes before it.
2. *Store*: one record per write (format.py), positions contiguous in order, every
   record but the last flagged CONTINUED, all handed to the active segment together
   (rolling first if they would not fit: a transaction never spans segments), so that
   one write system call and one fdatasync cover them, readers see them at once
   (durability.py publishes whole syncs), and opening drops a transaction whose last
   record is missing (opening.py).

Ids are looked up in two places: ids appended but not yet visible (this module keeps
them in memory with their events, until durability.py publishes them), and the id
index on disk (ids.py) for the rest, whose every hit is checked against the event the
log holds at that position.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from . import format as fmt
from . import reads
from .appends import ANY, MAX_BATCH_BYTES, AppendResult, check_expected
from .errors import DuplicateEventId, DuplicateIdInRequest, InvalidArgument
from .names import check_event_id, check_event_name, check_new_stream_name
from .reads import StoredEvent

#: A transaction holds at most this many events, and this many bytes of data and
#: metadata in all (PROTOCOL.md).
MAX_TRANSACTION_EVENTS = 100_000
MAX_TRANSACTION_BYTES = 128 * 1024 * 1024


class Write(NamedTuple):
    """One write of a list given to :meth:`WritePath.write`: events of one stream."""

    stream: bytes
    events: list[tuple[bytes, bytes]]
    expected: str | int = ANY
    #: One id per event (None: no id), or None for none at all.
    ids: list[bytes | None] | None = None
    #: One metadata per event (None: none), or None for none at all.
    metadata: list[bytes | None] | None = None


class _Planned(NamedTuple):
    write: Write
    #: The first reply of a write that is a retry (nothing to store), else None.
    replay: AppendResult | None
    first_number: int
    extras: list[bytes] | None


def check_write(write: Write, max_event_size: int) -> None:
    """Raise :class:`InvalidArgument` for what is wrong with one write by itself
    (names, sizes, ids; not the stream's state): what a server checks when it queues a
    write in a transaction."""
    count = len(write.events)
    if not count:
        raise InvalidArgument("events", "an append needs at least one event")
    for given in (write.ids, write.metadata):
        if given is not None and len(given) != count:
            raise InvalidArgument("events", "one id and one metadata per event")
    metadata = write.metadata or [None] * count
    total = 0
    for (name, data), meta in zip(write.events, metadata):
        check_event_name(name)
        size = len(data) + (len(meta) if meta is not None else 0)
        if size > max_event_size:
            what = "data plus metadata" if meta else "data"
            raise InvalidArgument("data", f"{what} is {size} bytes, at most {max_event_size}"
                                  " allowed")
        total += size + len(name)
    if total > MAX_BATCH_BYTES:
        raise InvalidArgument("data", f"batch of {total} bytes is over {MAX_BATCH_BYTES}")
    seen: set[bytes] = set()
    for event_id in write.ids or ():
        if event_id is None:
            continue
        check_event_id(event_id)
        if event_id in seen:
            raise DuplicateIdInRequest(event_id)
        seen.add(event_id)


class WritePath:
    """Writes with ids, metadata and transactions (see the module docstring); a mixin of
    the engine, over its stream table, segments and id index."""

    def write(self, writes: list[Write], *, flush: bool = True,
              timestamp_ms: int | None = None) -> list[AppendResult]:
        """Store ``writes`` all or none; return each one's numbers and end position (a
        retry's are those it first had). Raises :class:`WrongExpectedVersion`,
        :class:`DuplicateEventId`, :class:`InvalidArgument` (nothing stored then) or
        :class:`StorageError` (a roll failed). Durable after the next sync, as
        :meth:`append`; ``flush=False`` as there. ``timestamp_ms`` stamps the events
        (default: now): a replica of another log of record keeps that log's stamps."""
        self._check_open()
        if not writes:
            return []
        plans = self._plan(writes)
        results = self._store(plans, timestamp_ms)
        if flush:
            self.flush()
        return results

    # -- checking -----------------------------------------------------------------------

    def _plan(self, writes: list[Write]) -> list[_Planned]:
        plans = []
        checked = check_writes(writes, self.max_event_size, self._next_number_or_none,
                               self.find_event_id)
        for write, (replay, first_number) in zip(writes, checked):
            if replay is not None:
                plans.append(_Planned(write, replay, -1, None))
                continue
            extras = None
            if write.ids is not None or write.metadata is not None:
                count = len(write.events)
                extras = list(map(fmt.encode_extras, write.ids or [None] * count,
                                  write.metadata or [None] * count))
                if count == 1 and extras[0] == fmt.NO_EXTRAS:
                    extras = None  # an append-full without id or metadata: a plain record
            plans.append(_Planned(write, None, first_number, extras))
        return plans

    def _next_number_or_none(self, stream: bytes) -> int | None:
        sid = self.streams.ids.get(stream)
        return None if sid is None else self.streams.next_number[sid]

    def find_event_id(self, event_id: bytes) -> StoredEvent | None:
        """The stored event carrying ``event_id`` (appended, visible or not), or None."""
        pending = self._unpublished_ids.get(event_id)
        if pending is not None:
            return pending
        visible = self._visible_position
        for position in self.ids.candidates(event_id):
            if position < visible:
                event = reads.stored_event(self, position)
                if event.id == event_id:
                    return event
        return None

    # -- storing ------------------------------------------------------------------------

    def _store(self, plans: list[_Planned], timestamp_ms: int | None = None
               ) -> list[AppendResult]:
        if len(plans) == 1:  # an append-full: no comprehension frames on the hot path
            stored = plans if plans[0].replay is None else []
        else:
            stored = [p for p in plans if p.replay is None]
        if not stored:
            return [p.replay for p in plans]
        segment = self.segments[-1]
        # Ids, metadata and the CONTINUED flag need format 4: an older segment that was
        # active when the directory was opened rolls first (it never mixes versions).
        needs_v4 = len(stored) > 1 or stored[0].extras is not None
        version = fmt.FORMAT_VERSION if needs_v4 else segment.version
        records = self._encode_plans(stored, version, timestamp_ms)
        size = 0
        for record in records:
            size += len(record[3])
        if (needs_v4 and segment.version < 4) or \
                (segment.size > fmt.SEGMENT_HEADER_SIZE
                 and segment.size + size > self.segment_size):
            self._roll()
            segment = self.segments[-1]
            if segment.version != version:
                records = self._encode_plans(stored, segment.version, timestamp_ms)
        streams = self.streams
        results: dict[int, AppendResult] = {}
        for k, (plan, sid, position, data, offsets, lengths) in enumerate(records):
            write = plan.write
            if sid == len(streams):
                streams.create(write.stream, position)
            offset = segment.append(data)
            if len(offsets) == 1:
                offsets = [offset + offsets[0]]
            else:
                offsets = [offset + at for at in offsets]
            self._pending.append((segment, offsets, lengths, sid, position, plan.first_number))
            count = len(lengths)
            streams.next_number[sid] = plan.first_number + count
            if write.ids:
                self._remember_ids(write, plan.first_number, position)
            results[id(plan)] = AppendResult(plan.first_number, plan.first_number + count - 1,
                                             position + count)
        self._next_position = position + count
        if len(plans) == 1:
            return [results[id(plans[0])]]
        return [p.replay if p.replay is not None else results[id(p)] for p in plans]

    def _encode_plans(self, stored: list[_Planned], version: int,
                      timestamp_ms: int | None = None
                      ) -> list[tuple[_Planned, int, int, bytes, list[int], list[int]]]:
        """(plan, stream id, first position, record, frame offsets in it, frame lengths)
        per write to store, in order."""
        new_ids: dict[bytes, int] = {}
        position = self._next_position
        if timestamp_ms is None:
            timestamp_ms = time.time_ns() // 1_000_000
        out = []
        last = len(stored) - 1
        for k, plan in enumerate(stored):
            write = plan.write
            stream = write.stream
            sid = self.streams.ids.get(stream)
            if sid is None:
                sid = new_ids.setdefault(stream, len(self.streams) + len(new_ids))
            flags = fmt.FLAG_CONTINUED if k < last else 0
            if len(write.events) == 1:
                (name, data), = write.events
                record, frame_at, frame_len = fmt.encode_single(
                    stream, sid, position, plan.first_number, name, data, version, flags,
                    plan.extras[0] if plan.extras is not None else None, timestamp_ms)
                out.append((plan, sid, position, record, [frame_at], [frame_len]))
            else:
                enc = fmt.encode_record(stream, sid, position, plan.first_number, write.events,
                                        timestamp_ms, version=version, extras=plan.extras,
                                        flags=flags)
                out.append((plan, sid, position, enc.data, enc.offsets, enc.lengths))
            position += len(write.events)
        return out

    def _remember_ids(self, write: Write, first_number: int, position: int) -> None:
        """Keep a write's ids with their events until they are visible (then the id
        index has them: :meth:`_index_visible_ids`)."""
        metadata = write.metadata or [None] * len(write.events)
        for i, (event_id, (name, data), meta) in enumerate(zip(write.ids, write.events,
                                                               metadata)):
            if event_id is not None:
                self._unpublished_ids[event_id] = StoredEvent(
                    write.stream, first_number + i, position + i, name, data, event_id, meta)
                self._unpublished_order.append((position + i, event_id))

    def _index_visible_ids(self) -> None:
        """Move the ids of events that became visible into the id index."""
        order = self._unpublished_order
        visible = self._visible_position
        k = 0
        while k < len(order) and order[k][0] < visible:
            k += 1
        add = self.ids.add
        pending = self._unpublished_ids
        for position, event_id in order[:k]:
            add(event_id, position)
            del pending[event_id]
        del order[:k]

    def _forget_ids_from(self, position: int) -> None:
        """Forget the remembered ids of events from ``position`` on (taken back)."""
        order = self._unpublished_order
        while order and order[-1][0] >= position:
            _position, event_id = order.pop()
            del self._unpublished_ids[event_id]


def check_writes(writes: list[Write], max_event_size: int,
                 next_number: Callable[[bytes], int | None],
                 find_event_id: Callable[[bytes], StoredEvent | None]
                 ) -> list[tuple[AppendResult | None, int]]:
    """Check ``writes`` (stored all or none) in order, each as if the ones before it
    were applied; per write, (the first reply of an exact retry, or None; its first
    number). Raises the error that refuses them all.

    ``next_number(stream)`` is the number a stream's next event gets (None: no event
    yet) and ``find_event_id(id)`` the stored event carrying an id: the embedded engine
    answers both from its tables, the postgres backend from the rows it read under its
    head lock (backends/pgplan.py), so that both check the same things in the same
    order (the module docstring).
    """
    if len(writes) > 1:
        check_transaction_size(writes)
    seen: set[bytes] = set()
    numbers: dict[bytes, int] = {}
    checked: list[tuple[AppendResult | None, int]] = []
    for write in writes:
        check_write(write, max_event_size)
        stream = write.stream
        stored_next = next_number(stream)
        if stored_next is None:
            check_new_stream_name(stream)
        count = len(write.events)
        ids = write.ids or [None] * count
        found: list[StoredEvent | None] = [None] * count
        hits = False
        for k, event_id in enumerate(ids):
            if event_id is not None:
                if event_id in seen:
                    raise DuplicateIdInRequest(event_id)
                seen.add(event_id)
                hit = found[k] = find_event_id(event_id)
                if hit is not None:
                    hits = True
        if hits:
            checked.append((replay_reply(write, found), -1))
            continue
        current = numbers.get(stream, stored_next or 0)
        if write.expected != ANY:
            check_expected(stream, current, write.expected)
        numbers[stream] = current + count
        checked.append((None, current))
    return checked


def check_transaction_size(writes: list[Write]) -> None:
    events = sum(len(w.events) for w in writes)
    if events > MAX_TRANSACTION_EVENTS:
        raise InvalidArgument("transaction", f"{events} events, at most"
                              f" {MAX_TRANSACTION_EVENTS} allowed")
    size = sum(len(d) + len(m or b"") for w in writes for (_n, d), m in
               zip(w.events, w.metadata or [None] * len(w.events)))
    if size > MAX_TRANSACTION_BYTES:
        raise InvalidArgument("transaction", f"{size} bytes of data and metadata, at most"
                              f" {MAX_TRANSACTION_BYTES} allowed")


def replay_reply(write: Write, found: list[StoredEvent | None]) -> AppendResult:
    """The first reply of a write whose ids are stored, if it is an exact retry of the
    write that stored them; else :class:`DuplicateEventId` for its first stored id."""
    count = len(write.events)
    metadata = write.metadata or [None] * count
    first = found[0]
    exact = first is not None and all(
        event is not None and event.stream == write.stream
        and event.number == first.number + i and event.name == name and event.data == data
        and event.metadata == meta
        for i, (event, (name, data), meta) in enumerate(zip(found, write.events, metadata)))
    if exact:
        last = found[-1]
        return AppendResult(first.number, last.number, last.position + 1)
    k = next(i for i, event in enumerate(found) if event is not None)
    stored = found[k]
    raise DuplicateEventId(write.ids[k], stored.stream, stored.number)
