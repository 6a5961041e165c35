"""The engine: an append-only log of events in segments, numbered per stream.

Public API (what the server uses)::

    engine = Engine.open(directory, fsync="always")
    result = engine.append(b"orders-17", [(b"created", b"{...}")], expected=ANY)
    engine.sync()                          # fdatasync: appended events become durable
    frames, next_number = engine.stream_frames(b"orders-17", start=0)
    for event in engine.read_stream(b"orders-17", 0): ...
    for event in engine.read_all(position=0): ...
    engine.add_listener(callback)          # called with stream ids that got new events
    engine.close()

Durability and visibility. ``append`` writes the record to the operating system at
once and returns; ``sync`` makes everything appended so far durable with one
fdatasync, so many appends can share one (group commit): the caller appends for
every waiting client, syncs once, then answers them all. Readers see an event only
once it is durable under the policy in force: with ``fsync="always"`` after the
``sync`` that covers it, with ``everysec`` or ``no`` at once (a process crash loses
nothing the kernel has). Listeners are called when events become visible.

Not thread-safe: one thread (the server's event loop) makes every call.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import NamedTuple

from . import checkpoint as ckpt
from . import format as fmt
from .errors import (CorruptIndex, CorruptRecord, CorruptSegment, EngineClosed,
                     InvalidArgument, StorageError, WrongExpectedVersion)
from .files import (DirectoryLock, checkpoint_path, list_segments,
                    position_index_path, segment_path, stream_index_path)
from .index import ENTRY_SIZE, ActiveIndex, sorted_stream_index, write_file
from .names import (DEFAULT_MAX_EVENT_SIZE, check_data, check_event_name, check_new_stream_name,
                    plain_event_name, quoted)
from . import reads
from .reads import DEFAULT_MAX_BYTES, DEFAULT_MAX_EVENTS, Event
from .recovery import BadRecord, RecoveryReport, ScannedRecord, iter_records, valid_record_after
from .segment import Segment
from .streams import StreamTable

log = logging.getLogger("meilies.engine")

#: ``expected`` values of :meth:`Engine.append` besides a number.
ANY = "any"
NO_STREAM = "none"
FSYNC_POLICIES = ("always", "everysec", "no")
#: Segments roll at this size (64 MiB): large enough that a stream read crosses few
#: files, small enough that the tail re-scanned after a crash stays well under a second.
DEFAULT_SEGMENT_SIZE = 64 * 1024 * 1024
#: A batch's body may not exceed this (frame offsets are u32 within a segment).
MAX_BATCH_BYTES = fmt.MAX_BODY_LENGTH
#: Take-backs remembered for writers waiting to hear whether their appends stayed.
LOSSES_KEPT = 4096

Listener = Callable[[set[int]], None]


#: An event's name and data, in ``(name, data)`` pairs.
_NAME = itemgetter(0)
_DATA = itemgetter(1)


class AppendResult(NamedTuple):
    """The numbers an append got. (A named tuple: one per publish, on the hot path.)"""

    first_number: int
    last_number: int
    #: Global position just past the batch: durable once ``sync()`` returns >= it.
    end_position: int


class SyncTicket(NamedTuple):
    """A sync begun by :meth:`Engine.begin_sync`: the log is durable up to ``position``
    once an fdatasync of the file behind ``fd`` (the active segment's) returns. (A
    named tuple: one per sync, on the hot path.)"""

    fd: int
    position: int
    #: Size of ``segment`` (the active one) at ``position``.
    size: int
    segment: Segment
    #: ``Engine.loss_mark`` when the sync began.
    mark: int


@dataclass
class OpenReport:
    """What :meth:`Engine.open` found and did."""

    seconds: float = 0.0
    segments: int = 0
    streams: int = 0
    events: int = 0
    used_checkpoint: bool = False
    scanned_bytes: int = 0
    recovered: list[RecoveryReport] | None = None
    rebuilt_indexes: list[str] | None = None


class Engine:
    """An open data directory. Use :meth:`open`; call :meth:`close` when done."""

    def __init__(self, directory: Path, fsync: str, segment_size: int, max_event_size: int,
                 verify_on_open: bool) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, not {fsync!r}")
        self.directory = directory
        self.fsync = fsync
        self.segment_size = segment_size
        self.max_event_size = max_event_size
        self.verify_on_open = verify_on_open
        self.streams = StreamTable()
        self.segments: list[Segment] = []
        self._bases: list[int] = []
        self._next_position = 0  # written
        self._visible_position = 0
        self._durable_position = 0
        self._durable_size = 0  # bytes of the active segment known durable
        #: Appended records not yet visible: (segment, frame offsets, frame lengths,
        #: stream id, position and number of the first event).
        self._pending: list[tuple[Segment, list[int], list[int], int, int, int]] = []
        #: Appends taken back (first position lost, the error), newest last; see
        #: :meth:`lost_since`. Older ones are forgotten, counted in _losses_forgotten.
        self._losses: list[tuple[int, StorageError]] = []
        self._losses_forgotten = 0
        self._forgotten_loss: StorageError | None = None
        #: How many of ``_pending`` are written to the kernel (the rest wait in memory).
        self._written_pending = 0
        self._listeners: list[Listener] = []
        self._lock = DirectoryLock(directory)
        self._closed = False
        self.open_report = OpenReport()

    # -- opening and closing --------------------------------------------------------------

    @classmethod
    def open(cls, directory: str | os.PathLike, *, fsync: str = "always",
             segment_size: int = DEFAULT_SEGMENT_SIZE,
             max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
             verify_on_open: bool = True) -> Engine:
        """Open (creating if missing) a data directory and recover its state.

        Takes the directory's exclusive lock (:class:`DirectoryLocked` if held).
        Truncates a torn record at the tail of the newest segment (reported in
        ``open_report.recovered``); raises :class:`CorruptRecord` or
        :class:`CorruptSegment` for damage anywhere else. With ``verify_on_open``,
        every byte the checkpoint covers is checked against its xxhash.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        engine = cls(path, fsync, segment_size, max_event_size, verify_on_open)
        engine._lock.acquire()
        try:
            engine._recover()
        except BaseException:
            engine._close_files()
            engine._lock.release()
            raise
        return engine

    def close(self) -> None:
        """Sync, write a checkpoint, release files and the lock. Idempotent."""
        if self._closed:
            return
        try:
            self.checkpoint()
        finally:
            self._closed = True
            self._close_files()
            self._lock.release()

    def _close_files(self) -> None:
        for segment in self.segments:
            segment.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed("engine is closed")

    # -- writing ----------------------------------------------------------------------------

    def append(self, stream: bytes, events: list[tuple[bytes, bytes]],
               expected: str | int = ANY, *, flush: bool = True) -> AppendResult:
        """Append a batch of ``(event_name, data)`` to ``stream``, atomically.

        ``expected`` is :data:`ANY`, :data:`NO_STREAM` or the stream's current last
        event number; on mismatch :class:`WrongExpectedVersion` (carrying the actual
        last number) is raised and nothing is written. Returns the batch's numbers.
        The batch is durable after the next :meth:`sync`.

        With ``flush=False`` the record waits in memory for the next :meth:`flush` (or
        ``sync``), so that a caller appending many batches in a row writes them with one
        system call. Until then it is neither visible nor safe from a process crash:
        such a caller must flush before it acknowledges anything.
        """
        if self._closed:
            raise EngineClosed("engine is closed")
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
            self._check_expected(stream, current, expected)
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

    def _check_expected(self, stream: bytes, current: int, expected: str | int) -> None:
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

    def sync(self) -> int:
        """Make every appended event durable (one fdatasync); return the durable position.

        On failure the events appended since the last sync are taken back (never
        visible, cut from the file) and :class:`StorageError` is raised.
        """
        self._check_open()
        self.flush()
        if self._durable_position < self._next_position:
            try:
                self.segments[-1].sync()
            except StorageError as exc:
                if self.fsync == "always":
                    self._take_back(0, exc)
                    self.segments[-1].truncate_to(self._durable_size)
                raise
            self._durable_position = self._next_position
            self._durable_size = self.segments[-1].size
        if self._pending:
            self._publish()
        return self._durable_position

    def begin_sync(self) -> SyncTicket | None:
        """Write everything appended and return what makes it durable, or None if it is.

        :meth:`sync` in two halves, for a caller that runs the fdatasync elsewhere (in
        another process, on a descriptor of the same file) while appends go on: then it
        calls :meth:`end_sync` with the outcome. Meanwhile anything may happen here,
        including :meth:`sync` itself (a roll's) and its failure, and further
        tickets; :meth:`end_sync` accounts for it. The caller ends tickets in the order
        it began them (each fdatasync covers the writes before it: a later ticket's
        sync covers an earlier one's too). Raises :class:`StorageError` if the write
        fails (the unwritten appends are then taken back).
        """
        self._check_open()
        self.flush()
        if self._durable_position >= self._next_position:
            return None
        segment = self.segments[-1]
        return SyncTicket(segment.fileno(), self._next_position, segment.size, segment,
                          self.loss_mark)

    def end_sync(self, ticket: SyncTicket, error: OSError | None) -> int:
        """Finish a :meth:`begin_sync` whose fdatasync gave ``error`` (None: it worked).

        On success everything up to ``ticket.position`` is durable and visible. On
        failure it is :meth:`sync`'s failure: under ``always`` every append not durable
        is taken back and cut from the file, and :class:`StorageError` is raised.
        Either way nothing happens if a failed sync since :meth:`begin_sync` already
        took back what the ticket was for, or another sync covered it. Returns the
        durable position.
        """
        if self.lost_since(ticket.mark, ticket.position) is not None:
            # The ticket's appends were all written at begin_sync, and only a failed
            # sync takes written appends back: every one of them not yet durable is
            # gone (positions are handed out again since), so its outcome concerns
            # nothing that remains; its writers learn it from lost_since.
            return self._durable_position
        if ticket.position <= self._durable_position:
            if error is not None:  # another sync (a roll's) said these were durable
                log.error("an fdatasync of %s failed (%s) after another sync of the file"
                          " had succeeded; the events it covered stay acknowledged",
                          ticket.segment.path.name, error)
            return self._durable_position
        # Not covered and nothing taken back, so no roll since begin_sync (a roll syncs
        # everything first): the ticket's segment is still the active one.
        if error is None:
            self._durable_position = ticket.position
            self._durable_size = ticket.size
            self._publish(ticket.position)
            return self._durable_position
        exc = StorageError(ticket.segment.path, "fdatasync", error)
        if self.fsync == "always":
            self._take_back(0, exc)
            self.segments[-1].truncate_to(self._durable_size)
        raise exc

    def _take_back(self, first: int, error: StorageError) -> None:
        """Forget pending appends ``first`` and after: their write or sync failed.

        Rewinds the stream table and the log's end, so that no part of them is ever
        read; the caller cuts the file back (a failed write already has). Remembered
        for :meth:`lost_since`.
        """
        taken = self._pending[first:]
        if not taken:
            return
        self._losses.append((taken[0][4], error))
        if len(self._losses) > LOSSES_KEPT:
            self._forgotten_loss = self._losses.pop(0)[1]
            self._losses_forgotten += 1
        del self._pending[first:]
        self._written_pending = min(self._written_pending, first)
        streams = self.streams
        for _segment, _offsets, _lengths, sid, _position, number in reversed(taken):
            streams.next_number[sid] = number
        newest = len(streams) - 1
        while newest >= 0 and streams.next_number[newest] == 0:
            streams.drop_newest(newest)
            newest -= 1
        self._next_position = taken[0][4]

    @property
    def loss_mark(self) -> int:
        """How many times appends were taken back so far: what a writer notes when it
        appends, to ask :meth:`lost_since` once it is told its sync is done."""
        return self._losses_forgotten + len(self._losses)

    def lost_since(self, mark: int, end_position: int) -> StorageError | None:
        """The error that took back appends ending at or before ``end_position`` made
        after ``loss_mark`` was ``mark``, or None if none of them was taken back.

        Positions are handed out again after a take-back, so ``durable_position``
        alone cannot tell a writer that its events went: any sync may fail (a roll's,
        a checkpoint's, another writer's flush), not only the one it waits for. A
        take-back of the appends from position P on took this writer's when P is
        below its ``end_position``. Beyond the LOSSES_KEPT newest take-backs the
        answer is the conservative one: an error.
        """
        start = mark - self._losses_forgotten
        if start < 0:
            return self._forgotten_loss
        for position, error in self._losses[start:]:
            if position < end_position:
                return error
        return None

    def _publish(self, upto: int | None = None) -> None:
        """Make pending events visible (those before position ``upto``, if given) and
        tell the listeners which streams changed."""
        pending = self._pending
        count = len(pending)
        if upto is not None:
            while count and pending[count - 1][4] >= upto:
                count -= 1
            if not count:
                return
        changed: set[int] = set()
        streams = self.streams
        for segment, offsets, lengths, sid, position, number in pending[:count]:
            segment.index.add_run(offsets, lengths, sid, position - segment.base_position,
                                  number)
            streams.make_visible(sid, number + len(offsets))
            changed.add(sid)
        _segment, offsets, _lengths, _sid, position, _number = pending[count - 1]
        self._visible_position = position + len(offsets)
        del pending[:count]
        self._written_pending = max(0, self._written_pending - count)
        for listener in self._listeners:
            listener(changed)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(stream_ids)`` whenever events of those streams become visible.

        It runs inside ``append``/``sync``: it must not block or call back in.
        """
        self._listeners.append(listener)

    def checkpoint(self) -> None:
        """Sync, flush the active index and write the checkpoint (see checkpoint.py)."""
        self._check_open()
        self.sync()
        active = self.segments[-1]
        assert isinstance(active.index, ActiveIndex)
        pidx = position_index_path(self.directory, active.base_position)
        try:
            active.index.flush_to(pidx)
        except OSError as exc:
            raise StorageError(pidx, "write", exc) from exc
        states = [s.state for s in self.segments[:-1]]
        states.append(ckpt.SegmentState(active.base_position, active.size, active.index.count,
                                        active.hasher.intdigest(),
                                        fmt.checksum(active.index.entries), 0))
        try:
            ckpt.write(self.directory, ckpt.Checkpoint(
                self.streams.names, self.streams.next_number, self.streams.first_position,
                states))
        except OSError as exc:
            raise StorageError(checkpoint_path(self.directory), "write", exc) from exc

    # -- reading ----------------------------------------------------------------------------

    @property
    def visible_position(self) -> int:
        """Global position just past the last event readers may see."""
        return self._visible_position

    @property
    def durable_position(self) -> int:
        return self._durable_position

    @property
    def written_position(self) -> int:
        return self._next_position

    def stream_id(self, stream: bytes) -> int | None:
        return self.streams.ids.get(stream)

    def stream_name(self, stream_id: int) -> bytes:
        return self.streams.names[stream_id]

    def last_event_number(self, stream: bytes) -> int | None:
        """Number of the stream's last visible event; None when it has none."""
        sid = self.streams.ids.get(stream)
        if sid is None:
            return None
        count = self.streams.visible_next[sid]
        return count - 1 if count else None

    def next_number(self, stream: bytes) -> int:
        """How many visible events the stream has (the number its next event gets)."""
        sid = self.streams.ids.get(stream)
        return 0 if sid is None else self.streams.visible_next[sid]

    def stream_names(self) -> list[bytes]:
        """Names of the streams that have visible events, in byte order."""
        return self.streams.sorted_visible_names()

    def stats(self) -> dict[str, int]:
        disk = 0
        for segment in self.segments:
            disk += segment.size
            disk += segment.index.count * ENTRY_SIZE * (1 if segment.is_active else 2)
        return {"streams": self.streams.visible_count(), "events": self._visible_position,
                "segments": len(self.segments), "disk_bytes": disk}

    # The reads themselves: reads.py (read planning over the indexes).

    def stream_frames(self, stream: bytes | int, start: int, stop: int | None = None, *,
                      max_events: int = DEFAULT_MAX_EVENTS, max_bytes: int = DEFAULT_MAX_BYTES
                      ) -> tuple[list[memoryview], int]:
        """Stored RESP frames of events ``start`` .. ``stop-1`` of a stream, as views of
        the log, and the number to go on from (:func:`reads.stream_frames`)."""
        return reads.stream_frames(self, stream, start, stop, max_events=max_events,
                                   max_bytes=max_bytes)

    def stream_spans(self, stream: bytes | int, start: int, stop: int | None = None, *,
                     max_events: int = DEFAULT_MAX_EVENTS, max_bytes: int = DEFAULT_MAX_BYTES
                     ) -> tuple[list[bytes | memoryview], int]:
        """The frames of :meth:`stream_frames` in as few views as the log allows
        (:func:`reads.stream_spans`)."""
        return reads.stream_spans(self, stream, start, stop, max_events=max_events,
                                  max_bytes=max_bytes)

    def all_frames(self, position: int, *, max_events: int = DEFAULT_MAX_EVENTS,
                   min_number: int = 0, max_number: int | None = None,
                   max_bytes: int | None = None) -> tuple[list[memoryview], int]:
        """Frames from global ``position`` on, one segment at most per call
        (:func:`reads.all_frames`)."""
        return reads.all_frames(self, position, max_events=max_events, min_number=min_number,
                                max_number=max_number, max_bytes=max_bytes)

    def all_spans(self, position: int, *, max_events: int = DEFAULT_MAX_EVENTS,
                  min_number: int = 0, max_number: int | None = None,
                  max_bytes: int | None = None) -> tuple[list[bytes | memoryview], int]:
        """The frames of :meth:`all_frames` in as few views as the log allows
        (:func:`reads.all_spans`)."""
        return reads.all_spans(self, position, max_events=max_events, min_number=min_number,
                               max_number=max_number, max_bytes=max_bytes)

    def stream_full_frames(self, stream: bytes | int, start: int, stop: int | None = None, *,
                           max_events: int = DEFAULT_MAX_EVENTS,
                           max_bytes: int = DEFAULT_MAX_BYTES, descending: bool = False
                           ) -> tuple[list[bytes | memoryview], int, int]:
        """Full frames (with position and timestamp) of a stream's events, ascending or
        descending: (pieces to join, events, where to go on)
        (:func:`reads.stream_full_frames`)."""
        return reads.stream_full_frames(self, stream, start, stop, max_events=max_events,
                                        max_bytes=max_bytes, descending=descending)

    def all_full_frames(self, start: int, stop: int | None = None, *,
                        max_events: int = DEFAULT_MAX_EVENTS, max_bytes: int = DEFAULT_MAX_BYTES,
                        descending: bool = False, min_number: int = 0,
                        max_number: int | None = None
                        ) -> tuple[list[bytes | memoryview], int, int]:
        """Full frames of the events at global positions ``start`` .. ``stop-1``, only
        those numbered in [min_number, max_number) if asked (:func:`reads.all_full_frames`)."""
        return reads.all_full_frames(self, start, stop, max_events=max_events,
                                     max_bytes=max_bytes, descending=descending,
                                     min_number=min_number, max_number=max_number)

    def read_stream(self, stream: bytes, start: int = 0, stop: int | None = None
                    ) -> Iterator[Event]:
        """Events ``start`` .. ``stop-1`` of ``stream`` visible now, as :class:`Event`."""
        return reads.read_stream(self, stream, start, stop)

    def read_all(self, position: int = 0) -> Iterator[Event]:
        """Every event visible now from global ``position`` on, in position order."""
        return reads.read_all(self, position)

    # -- recovery ---------------------------------------------------------------------------

    def _recover(self) -> None:
        started = time.monotonic()
        report = self.open_report
        report.recovered, report.rebuilt_indexes = [], []
        bases = list_segments(self.directory, remove_temp=True)
        checkpoint = self._read_checkpoint(bases)
        report.used_checkpoint = checkpoint is not None
        if checkpoint is not None:
            self.streams = StreamTable(checkpoint.names, checkpoint.next_number,
                                       checkpoint.first_position)
        if not bases:
            self.segments.append(Segment.create(self.directory, 0))
            self._bases.append(0)
        position = 0
        sealed_here = False  # a segment full but unsealed at the crash was sealed now
        for k, base in enumerate(bases):
            last = k == len(bases) - 1
            state = checkpoint.segments[k] if checkpoint and k < len(checkpoint.segments) \
                else None
            if last and state is None and self._recreate_torn_segment(base, position):
                continue
            segment = Segment.open_existing(self.directory, base)
            self.segments.append(segment)
            self._bases.append(base)
            if base != position:
                raise CorruptSegment(segment.path, 0, f"segment starts at position {base},"
                                     f" but the previous one ends at {position}")
            if state is not None and state.sidx_hash and not last:
                self._open_sealed(segment, state)
                position += state.event_count
                continue
            position = self._open_by_scan(segment, state, position, last)
            if not last:
                segment.seal()
                sealed_here = True
        active = self.segments[-1]
        if not active.is_active:
            active.activate()
        self._next_position = self._visible_position = self._durable_position = position
        self._durable_size = active.size
        self.streams.all_visible()
        report.segments = len(self.segments)
        report.streams = len(self.streams)
        report.events = position
        if (report.scanned_bytes or report.rebuilt_indexes or report.recovered or sealed_here
                or not report.used_checkpoint):
            try:
                self.checkpoint()
            except StorageError as exc:  # derived data: the next open scans again
                log.warning("could not write a checkpoint after opening: %s", exc)
        report.seconds = time.monotonic() - started

    def _recreate_torn_segment(self, base: int, position: int) -> bool:
        """Recreate the newest segment if a crash cut it short while it was being created.

        ``Segment.create`` makes the file, then writes and fdatasyncs its header, and only
        then does a checkpoint name it; so a newest segment that no checkpoint names and
        that holds less than a header (or only part of the one it would get) is a torn
        tail with no record in it, not damage. Returns False for anything else.
        """
        torn = Segment.torn_at_creation(self.directory, base)
        if torn is None or base != position:
            return False
        path = segment_path(self.directory, base)
        log.warning("%s: the segment was cut short while being created (%d bytes);"
                    " recreating it", path.name, torn)
        path.unlink()
        segment = Segment.create(self.directory, base)
        self.segments.append(segment)
        self._bases.append(base)
        self.open_report.recovered.append(RecoveryReport(
            path, 0, torn, "segment header cut short while the segment was being created"))
        return True

    def _read_checkpoint(self, bases: list[int]) -> ckpt.Checkpoint | None:
        try:
            checkpoint = ckpt.read(self.directory)
        except CorruptIndex as exc:
            log.warning("ignoring the checkpoint, rebuilding state from the log: %s", exc)
            return None
        if checkpoint is None:
            return None
        listed = [s.base_position for s in checkpoint.segments]
        present = set(bases)
        for base in listed:
            # Segments are only ever added, and a checkpoint names one only after its
            # file is durable: a listed segment that is gone was deleted, and ignoring
            # the checkpoint would serve a shorter log without a word.
            if base not in present:
                raise CorruptSegment(segment_path(self.directory, base), 0,
                                     "segment file is missing; the checkpoint lists it")
        if listed != bases[:len(listed)] or not listed:
            log.warning("ignoring the checkpoint: it lists segments %s, the directory has %s;"
                        " rebuilding state from the log", listed[:3], bases[:3])
            return None
        return checkpoint

    def _open_sealed(self, segment: Segment, state: ckpt.SegmentState) -> None:
        """Adopt a sealed segment the checkpoint describes, checking it against it."""
        size = segment.size
        if size != state.size:
            raise CorruptSegment(segment.path, min(size, state.size),
                                 f"sealed segment is {size} bytes, the checkpoint says"
                                 f" {state.size}")
        if self.verify_on_open:
            with memoryview(segment.buffer(size)) as view:
                digest = fmt.checksum(view)
            if digest != state.segment_hash:
                self._locate_damage(segment, size)
        segment.state = state
        pidx = position_index_path(self.directory, segment.base_position)
        sidx = stream_index_path(self.directory, segment.base_position)
        if not (_file_hash(pidx, state.event_count) == state.pidx_hash
                and _file_hash(sidx, state.event_count) == state.sidx_hash):
            self._rebuild_sealed_indexes(segment, state)
        segment.load_sealed_indexes()

    def _locate_damage(self, segment: Segment, end: int) -> None:
        """A checked region's hash is wrong: find and raise the first bad record."""
        buf = segment.buffer(end)
        for record in iter_records(buf, fmt.SEGMENT_HEADER_SIZE, end, version=segment.version):
            if isinstance(record, BadRecord):
                raise CorruptRecord(segment.path, record.offset, record.reason)
        raise CorruptSegment(segment.path, 0, "segment content does not match the"
                             " checksum in the checkpoint")

    def _rebuild_sealed_indexes(self, segment: Segment, state: ckpt.SegmentState) -> None:
        log.warning("index files of %s are missing or damaged; rebuilding them from the log",
                    segment.path.name)
        self.open_report.rebuilt_indexes.append(segment.path.name)
        index = ActiveIndex()
        position = segment.base_position
        buf = segment.buffer(state.size)
        for record in iter_records(buf, fmt.SEGMENT_HEADER_SIZE, state.size,
                                   version=segment.version):
            if isinstance(record, BadRecord):
                raise CorruptRecord(segment.path, record.offset, record.reason)
            for frame_at, frame_len in record.frames:
                index.add(frame_at, frame_len, record.header.stream_id,
                          position - segment.base_position,
                          record.header.first_number + position - record.header.base_position)
                position += 1
        entries = bytes(index.entries)
        sidx = sorted_stream_index(entries)
        write_file(position_index_path(self.directory, segment.base_position), entries)
        write_file(stream_index_path(self.directory, segment.base_position), sidx)
        state.pidx_hash = fmt.checksum(entries)
        state.sidx_hash = fmt.checksum(sidx)

    def _open_by_scan(self, segment: Segment, state: ckpt.SegmentState | None,
                      position: int, last: bool) -> int:
        """Open a segment by reading its records after what the checkpoint covers.

        Records the checkpoint covers only rebuild the index (the stream table already
        has them); the rest are applied to the stream table too.
        """
        file_size = segment.size
        buf = segment.buffer(file_size)
        covered = fmt.SEGMENT_HEADER_SIZE
        index = segment.index
        if state is not None:
            if file_size < state.size:
                raise CorruptSegment(segment.path, file_size, f"segment is {file_size} bytes,"
                                     f" shorter than the {state.size} the checkpoint covers")
            if self.verify_on_open:
                with memoryview(buf) as view, view[:state.size] as prefix:
                    digest = fmt.checksum(prefix)
                if digest != state.segment_hash:
                    self._locate_damage(segment, state.size)
            covered = state.size
            raw = _read_prefix(position_index_path(self.directory, segment.base_position),
                               state.event_count)
            if raw is not None and fmt.checksum(raw) == state.pidx_hash:
                index.load(raw)
                start = covered
                position += state.event_count
            else:
                log.warning("position index of %s is missing or damaged; rebuilding it",
                            segment.path.name)
                self.open_report.rebuilt_indexes.append(segment.path.name)
                start = fmt.SEGMENT_HEADER_SIZE
        else:
            start = fmt.SEGMENT_HEADER_SIZE
        self.open_report.scanned_bytes += file_size - start
        offset = start
        for record in iter_records(buf, start, file_size, version=segment.version):
            if isinstance(record, BadRecord):
                offset = record.offset
                if last and offset >= covered and \
                        valid_record_after(buf, offset, file_size, min_position=position + 1,
                                           version=segment.version) is None:
                    break
                raise CorruptRecord(segment.path, offset, record.reason)
            self._apply_record(segment, record, position, apply=record.offset >= covered)
            position += record.header.count
            offset = record.end
        del buf
        # Opened for writing: to truncate a torn tail, and to fdatasync what was scanned.
        # The bytes written since the last checkpoint may exist only in the page cache
        # (a process crash under fsync "no"); the checkpoint written after opening will
        # vouch for them, so they must be durable first, or a power loss later would
        # make that checkpoint disagree with the log.
        segment.activate()
        if offset < file_size:
            dropped = file_size - offset
            log.warning("%s: truncating a torn record at the tail: %d bytes at offset %d"
                        " dropped", segment.path.name, dropped, offset)
            segment.truncate_to(offset)
            self.open_report.recovered.append(RecoveryReport(segment.path, offset, dropped,
                                                             "torn record at the tail"))
        else:
            segment.size = segment.written = file_size
            with memoryview(segment.buffer(file_size)) as view:
                segment.hasher = fmt.Hasher()
                segment.hasher.update(view[:file_size])
        if start < file_size:
            segment.sync()
        return position

    def _apply_record(self, segment: Segment, record: ScannedRecord, position: int,
                      apply: bool) -> None:
        header = record.header
        where = (segment.path, record.offset)
        if header.base_position != position:
            raise CorruptRecord(*where, f"record has position {header.base_position},"
                                f" expected {position}")
        streams = self.streams
        sid = header.stream_id
        if apply:
            if sid == len(streams):
                if record.stream in streams.ids:
                    raise CorruptRecord(*where, "stream created twice")
                streams.create(record.stream, position)
            elif sid > len(streams):
                raise CorruptRecord(*where, f"stream id {sid} skips ids")
            if streams.names[sid] != record.stream:
                raise CorruptRecord(*where, f"stream id {sid} is named"
                                    f" {quoted(streams.names[sid])}, the record says"
                                    f" {quoted(record.stream)}")
            if header.first_number != streams.next_number[sid]:
                raise CorruptRecord(*where, f"event number {header.first_number} of stream"
                                    f" {quoted(record.stream)}, expected"
                                    f" {streams.next_number[sid]}")
            streams.next_number[sid] = header.first_number + header.count
        elif sid >= len(streams) or streams.names[sid] != record.stream:
            raise CorruptRecord(*where, "stream id does not match the checkpoint")
        number = header.first_number
        for frame_at, frame_len in record.frames:
            segment.index.add(frame_at, frame_len, sid, position - segment.base_position, number)
            position += 1
            number += 1


def _file_hash(path: Path, count: int) -> int | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(raw) != count * ENTRY_SIZE:
        return None
    return fmt.checksum(raw)


def _read_prefix(path: Path, count: int) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(count * ENTRY_SIZE)
    except FileNotFoundError:
        return None
    return raw if len(raw) == count * ENTRY_SIZE else None
