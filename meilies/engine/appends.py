"""The append path: checking a batch, encoding its record, writing it, rolling segments.

An append checks the batch (names, sizes, the expected version), encodes one record
(format.py) for the segment it goes to, hands it to the active segment (which keeps it
in memory until :meth:`AppendPath.flush` writes every waiting record with one system
call) and advances the stream table and the log's end at once, so that the next append
(in the same loop turn) chains on it. Readers do not see it yet: durability.py makes
appended events durable and visible. A record never spans two segments: an append that
would overflow the active segment rolls first (seal, create the next, checkpoint).

A mixin of :class:`~meilies.engine.log.Engine`, split out so that the append path is
one file; the state it uses (``streams``, ``segments``, ``_pending``,
``_next_position``) is the engine's, set up in ``Engine.__init__``.
"""

from __future__ import annotations

import logging
from operator import itemgetter
from typing import NamedTuple

from . import format as fmt
from .errors import EngineClosed, InvalidArgument, StorageError, WrongExpectedVersion
from .names import check_data, check_event_name, check_new_stream_name, plain_event_name
from .segment import Segment

log = logging.getLogger("meilies.engine")

#: ``expected`` values of :meth:`AppendPath.append` besides a number.
ANY = "any"
NO_STREAM = "none"
#: A batch's body may not exceed this (frame offsets are u32 within a segment).
MAX_BATCH_BYTES = fmt.MAX_BODY_LENGTH

#: An event's name and data, in ``(name, data)`` pairs.
_NAME = itemgetter(0)
_DATA = itemgetter(1)


class AppendResult(NamedTuple):
    """The numbers an append got. (A named tuple: one per publish, on the hot path.)"""

    first_number: int
    last_number: int
    #: Global position just past the batch: durable once ``sync()`` returns >= it.
    end_position: int



class AppendPath:
    """Appending batches (the engine's writing half; see the module docstring)."""

    def append(self, stream: bytes, events: list[tuple[bytes, bytes]],
               expected: str | int = ANY, *, flush: bool = True,
               ids: list[bytes | None] | None = None,
               metadata: list[bytes | None] | None = None) -> AppendResult:
        """Append a batch of ``(event_name, data)`` to ``stream``, atomically.

        ``expected`` is :data:`ANY`, :data:`NO_STREAM` or the stream's current last
        event number; on mismatch :class:`WrongExpectedVersion` (carrying the actual
        last number) is raised and nothing is written. Returns the batch's numbers.
        The batch is durable after the next :meth:`sync`.

        With ``flush=False`` the record waits in memory for the next :meth:`flush` (or
        ``sync``), so that a caller appending many batches in a row writes them with one
        system call. Until then it is neither visible nor safe from a process crash:
        such a caller must flush before it acknowledges anything.

        With ``ids`` or ``metadata`` (one per event, None for none) it is a write of
        writes.py: ids are checked for reuse first, and an exact retry of a stored
        append returns its first numbers and stores nothing.
        """
        if self._closed:
            raise EngineClosed("engine is closed")
        if ids is not None or metadata is not None:
            from .writes import Write
            return self.write([Write(stream, events, expected, ids, metadata)], flush=flush)[0]
        if len(events) == 1:
            return self._append_one(stream, events[0], expected, flush)
        if not events:
            raise InvalidArgument("events", "an append needs at least one event")
        max_size = self.max_event_size
        names = list(map(_NAME, events))
        sizes = list(map(len, map(_DATA, events)))
        # The usual batch passes in C-level sweeps, each distinct name checked once;
        # otherwise the first bad event, in order, is named.
        if not all(map(plain_event_name, set(names))) or max(sizes) > max_size:
            for name, data in events:
                check_event_name(name)
                check_data(data, max_size)
        total = sum(sizes) + sum(map(len, names))
        if total > MAX_BATCH_BYTES:
            raise InvalidArgument("data", f"batch of {total} bytes is over {MAX_BATCH_BYTES}")
        sid, current, record_sid = self._stream_for_append(stream, expected)
        position = self._next_position
        segment = self.segments[-1]
        data, offsets, lengths = self._encode(stream, record_sid, position, current, events,
                                              segment.version)
        # Roll first, then create the stream: a roll writes a checkpoint, which must not
        # name a stream whose first record is not written yet (if that write then failed
        # or the process died, the checkpoint would hold a stream id the log never uses,
        # and the next new stream's records would contradict it).
        if segment.size + len(data) > self.segment_size:
            old_version = segment.version
            segment = self._segment_for(len(data))
            assert position == self._next_position, "a roll must not move the log's end"
            if segment.version != old_version:  # a newer version, another size
                data, offsets, lengths = self._encode(stream, record_sid, position, current,
                                                      events, segment.version)
        if sid is None:
            sid = self.streams.create(stream, position)
        offset = segment.append(data)
        offsets = [offset + at for at in offsets]
        self._pending.append((segment, offsets, lengths, sid, position, current))
        count = len(offsets)
        self.streams.next_number[sid] = current + count
        self._next_position = position + count
        if flush:
            self.flush()
        return AppendResult(current, current + count - 1, position + count)

    def _append_one(self, stream: bytes, event: tuple[bytes, bytes], expected: str | int,
                     flush: bool) -> AppendResult:
        """:meth:`append` of one event (a publish): the same steps, fewest calls."""
        name, data = event
        if plain_event_name(name) is None:
            check_event_name(name)
        if len(data) > self.max_event_size:
            check_data(data, self.max_event_size)
        sid, current, record_sid = self._stream_for_append(stream, expected)
        position = self._next_position
        segment = self.segments[-1]
        record, frame_at, frame_len = fmt.encode_single(stream, record_sid, position, current,
                                                        name, data, segment.version)
        if segment.size + len(record) > self.segment_size:  # as in append
            old_version = segment.version
            segment = self._segment_for(len(record))
            if segment.version != old_version:
                record, frame_at, frame_len = fmt.encode_single(
                    stream, record_sid, position, current, name, data, segment.version)
        if sid is None:
            sid = self.streams.create(stream, position)
        offset = segment.append(record)
        self._pending.append((segment, [offset + frame_at], [frame_len], sid, position,
                              current))
        self.streams.next_number[sid] = current + 1
        self._next_position = position + 1
        if flush:
            self.flush()
        return AppendResult(current, current, position + 1)

    def _stream_for_append(self, stream: bytes, expected: str | int
                           ) -> tuple[int | None, int, int]:
        """(stream id or None if new, its next number, the id its record carries), after
        checking a new stream's name and ``expected``."""
        streams = self.streams
        sid = streams.ids.get(stream)
        if sid is None:
            # Before the expected-version check: a bad name must be refused as such,
            # and never be echoed back inside a WrongExpectedVersion message.
            check_new_stream_name(stream)
            current = 0
            record_sid = len(streams)
        else:
            current = streams.next_number[sid]
            record_sid = sid
        if expected != ANY:
            check_expected(stream, current, expected)
        return sid, current, record_sid

    @staticmethod
    def _encode(stream: bytes, stream_id: int, position: int, number: int,
                events: list[tuple[bytes, bytes]], version: int
                ) -> tuple[bytes, list[int], list[int]]:
        """The record for a batch, and its frames' offsets (in the record) and lengths."""
        if len(events) == 1:
            name, data = events[0]
            record, frame_at, frame_len = fmt.encode_single(stream, stream_id, position, number,
                                                            name, data, version)
            return record, [frame_at], [frame_len]
        encoded = fmt.encode_record(stream, stream_id, position, number, events,
                                    version=version)
        return encoded.data, encoded.offsets, encoded.lengths

    def flush(self) -> None:
        """Write appended records to the kernel (safe from a process crash from then on).

        Under ``everysec`` and ``no`` they become visible now; under ``always`` at the
        next :meth:`sync`. On failure every record not yet written is taken back and
        :class:`StorageError` is raised.
        """
        segment = self.segments[-1]
        if not segment.has_unwritten:
            return
        try:
            segment.flush()
        except StorageError as exc:
            self._take_back(self._written_pending, exc)
            raise
        self._written_pending = len(self._pending)
        if self.fsync != "always":
            self._publish()

    def _segment_for(self, record_size: int) -> Segment:
        active = self.segments[-1]
        if active.size > fmt.SEGMENT_HEADER_SIZE and active.size + record_size > self.segment_size:
            self._roll()
            active = self.segments[-1]
        return active

    def _roll(self) -> None:
        """Seal the active segment and start the next one; write a checkpoint.

        All or nothing up to the checkpoint: the next segment is created before the
        active one is sealed, so that a failure of either (:class:`StorageError`)
        leaves the active segment as it was and the append that rolled can fail cleanly.
        The checkpoint is derived data: if it cannot be written the roll stands, with a
        warning (opening scans from the last checkpoint that was written).
        """
        self.sync()
        old = self.segments[-1]
        new = Segment.create(self.directory, self._next_position)
        try:
            old.seal()
        except StorageError:
            new.close()
            new.path.unlink()
            raise
        self.segments.append(new)
        self._bases.append(new.base_position)
        # What a failed sync cuts the active segment back to: now the new segment's
        # header (create made it durable), not the old segment's size.
        self._durable_size = new.size
        try:
            self.checkpoint()
        except StorageError as exc:
            log.warning("could not write a checkpoint after sealing %s; going on without"
                        " it: %s", old.path.name, exc)


def check_expected(stream: bytes, current: int, expected: str | int) -> None:
    """Raise :class:`WrongExpectedVersion` unless ``expected`` holds for a stream whose
    next number is ``current`` (:class:`InvalidArgument` for a malformed one)."""
    if expected == ANY:
        return
    if expected == NO_STREAM:
        if current != 0:
            raise WrongExpectedVersion(stream.decode("utf-8", "replace"), current - 1, "none")
        return
    if not isinstance(expected, int) or isinstance(expected, bool) or expected < 0:
        raise InvalidArgument("expected", "must be 'any', 'none' or an event number")
    if current == 0 or current - 1 != expected:
        raise WrongExpectedVersion(stream.decode("utf-8", "replace"),
                                   current - 1 if current else None, str(expected))
