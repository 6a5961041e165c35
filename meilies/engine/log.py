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

Where each part lives: this module is the facade (opening, closing, checkpoints, what
readers ask); the append path is appends.py, syncs and visibility durability.py,
opening and recovery opening.py, read planning reads.py. ``Engine`` combines the first
three as mixins over the state that ``__init__`` sets up.

Not thread-safe: one thread (the server's event loop) makes every call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from . import checkpoint as ckpt
from . import format as fmt
from . import reads
from .appends import ANY, MAX_BATCH_BYTES, NO_STREAM, AppendPath, AppendResult
from .durability import LOSSES_KEPT, Durability, Listener, SyncTicket
from .errors import EngineClosed, StorageError
from .files import DirectoryLock, checkpoint_path, position_index_path
from .framecache import DEFAULT_MAX_BYTES as DEFAULT_FRAME_CACHE_BYTES, FrameCache
from .index import ENTRY_SIZE, ActiveIndex
from .names import DEFAULT_MAX_EVENT_SIZE
from .ids import FIRST_BITS, IdIndex
from .opening import OpenReport, Opening
from .reads import DEFAULT_MAX_BYTES, DEFAULT_MAX_EVENTS, Event
from .segment import Segment
from .streams import StreamTable
from .writes import StoredEvent, Write, WritePath

log = logging.getLogger("meilies.engine")

__all__ = ["ANY", "NO_STREAM", "FSYNC_POLICIES", "DEFAULT_SEGMENT_SIZE", "MAX_BATCH_BYTES",
           "LOSSES_KEPT", "AppendResult", "Engine", "Event", "Listener", "OpenReport",
           "StoredEvent", "SyncTicket", "Write"]

FSYNC_POLICIES = ("always", "everysec", "no")
#: Segments roll at this size (64 MiB): large enough that a stream read crosses few
#: files, small enough that the tail re-scanned after a crash stays well under a second.
DEFAULT_SEGMENT_SIZE = 64 * 1024 * 1024


class Engine(AppendPath, WritePath, Durability, Opening):
    """An open data directory. Use :meth:`open`; call :meth:`close` when done."""

    def __init__(self, directory: Path, fsync: str, segment_size: int, max_event_size: int,
                 verify_on_open: bool, id_index_bits: int = FIRST_BITS,
                 frame_cache_bytes: int = DEFAULT_FRAME_CACHE_BYTES) -> None:
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
        #: The id index (ids.py), opened with the log; and the ids of events appended
        #: but not yet visible, with their events (writes.py), in position order too.
        self.id_index_bits = id_index_bits
        self.ids = IdIndex(directory, id_index_bits)
        self._unpublished_ids: dict[bytes, StoredEvent] = {}
        self._unpublished_order: list[tuple[int, bytes]] = []
        #: Full frames of recently read streams (framecache.py); None when turned off.
        self.frame_cache = FrameCache(frame_cache_bytes) if frame_cache_bytes else None
        self._lock = DirectoryLock(directory)
        self._closed = False
        self.open_report = OpenReport()

    # -- opening and closing --------------------------------------------------------------

    @classmethod
    def open(cls, directory: str | os.PathLike, *, fsync: str = "always",
             segment_size: int = DEFAULT_SEGMENT_SIZE,
             max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
             verify_on_open: bool = True, id_index_bits: int = FIRST_BITS,
             frame_cache_bytes: int = DEFAULT_FRAME_CACHE_BYTES) -> Engine:
        """Open (creating if missing) a data directory and recover its state.

        Takes the directory's exclusive lock (:class:`DirectoryLocked` if held).
        Truncates a torn record at the tail of the newest segment (reported in
        ``open_report.recovered``); raises :class:`CorruptRecord` or
        :class:`CorruptSegment` for damage anywhere else. ``id_index_bits`` sizes the
        id index's first table (ids.py; tests make it small). With ``verify_on_open``,
        every byte the checkpoint covers is checked against its xxhash.
        ``frame_cache_bytes`` bounds the full frames kept for reads (framecache.py; 0:
        none).
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        engine = cls(path, fsync, segment_size, max_event_size, verify_on_open, id_index_bits,
                     frame_cache_bytes)
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
        self.ids.close()
        if self.frame_cache is not None:
            self.frame_cache.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed("engine is closed")

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
        # Everything is visible after the sync: the id index holds every id before it.
        self.ids.checkpoint(self._visible_position)
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

    def stream_size(self, stream_id: int) -> int:
        """How many visible events stream ``stream_id`` has (:meth:`next_number`)."""
        return self.streams.visible_next[stream_id]

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
            disk += segment.copies.disk_bytes()
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

    def kept_full_frames(self, stream_id: int, start: int, stop: int, max_bytes: int
                         ) -> bytearray | None:
        """The full frames of events ``start`` .. ``stop - 1`` of stream ``stream_id``
        if the frame cache holds them all within ``max_bytes`` (framecache.py), else
        None: the quick path of an aggregate read again, with nothing to assemble."""
        self._check_open()
        cache = self.frame_cache
        if cache is None:
            return None
        return cache.frames(stream_id, start, stop, max_bytes)

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
