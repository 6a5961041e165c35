"""Fixed-width index files: where each event's frame sits in its segment.

Both index kinds share one 24-byte entry::

    entry := frame_offset:u32 frame_length:u32 stream_id:u32 position_delta:u32 number:u64

``frame_offset`` is the frame's byte offset in the segment, ``position_delta`` the
event's global position minus the segment's base position, ``number`` its number in
its stream. Little-endian, no header, no padding: entry *n* is at byte ``24 * n``.

* ``.pidx`` (position index): one entry per event in global position order, so the
  event at position P of a segment with base B is entry ``P - B``: O(1).
* ``.sidx`` (stream index): the same entries sorted by (stream_id, number), written
  when a segment is sealed. A stream's events inside one segment have contiguous
  numbers, so they form one run: two binary searches find it, O(log n).

Indexes are not checksummed inline: they are derived data. The checkpoint records
their xxhash; on a mismatch the engine logs one warning and rebuilds them from the
segment. The active segment's position index lives in memory and reaches its file
at checkpoints and when the segment is sealed.

Not thread-safe: the engine serialises all access.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
import sys
from array import array
from itertools import accumulate, groupby
from operator import ne
from pathlib import Path

ENTRY = struct.Struct("<IIIIQ")
# Entries are built and read with native-order arrays and memoryview casts.
assert sys.byteorder == "little", "index entries are little-endian u32 words"
ENTRY_SIZE = ENTRY.size  # 24
WORDS_PER_ENTRY = ENTRY_SIZE // 4  # 6 u32 words: offset, length, stream id, delta, number lo/hi
FRAME_OFFSET_WORD = 0
FRAME_LENGTH_WORD = 1
STREAM_ID_WORD = 2
DELTA_WORD = 3
NUMBER_WORD = 4  # and 5: the u64 number as two u32 words, low first
#: u64 words per event in an active index's stream run: offset, length, position delta.
RUN_STRIDE = 3


def close_map(mapping: mmap.mmap) -> None:
    """Unmap now, or, while a reader still holds a view of it, when that view is dropped.

    ``mmap.close()`` with an exported buffer raises ``BufferError`` (CPython refuses to
    pull pages from under a live memoryview); the view keeps the map alive and CPython
    unmaps it when the last view goes, so nothing leaks and nothing dangles.
    """
    try:
        mapping.close()
    except BufferError:
        pass  # released by reference counting when the last view is dropped (see above)


def map_file(path: Path) -> mmap.mmap | None:
    """A read-only map of the whole file, or None when it is empty (mmap refuses 0)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return None
        return mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ)


def frame_lists(buf, first: int, stop: int) -> tuple[list[int], list[int]]:
    """Frame offsets and lengths of entries ``first``..``stop-1`` of an index buffer."""
    with memoryview(buf) as raw, raw.cast("I") as words:
        lo = first * WORDS_PER_ENTRY
        hi = stop * WORDS_PER_ENTRY
        return (words[lo + FRAME_OFFSET_WORD:hi:WORDS_PER_ENTRY].tolist(),
                words[lo + FRAME_LENGTH_WORD:hi:WORDS_PER_ENTRY].tolist())


def entry_columns(buf, first: int, stop: int) -> tuple[list[int], list[int], list[int]]:
    """Frame offsets, lengths and position deltas of entries ``first``..``stop-1``."""
    with memoryview(buf) as raw, raw.cast("I") as words:
        lo = first * WORDS_PER_ENTRY
        hi = stop * WORDS_PER_ENTRY
        return (words[lo + FRAME_OFFSET_WORD:hi:WORDS_PER_ENTRY].tolist(),
                words[lo + FRAME_LENGTH_WORD:hi:WORDS_PER_ENTRY].tolist(),
                words[lo + DELTA_WORD:hi:WORDS_PER_ENTRY].tolist())


class SealedIndex:
    """A read-only, memory-mapped index file of a sealed segment (.pidx or .sidx)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._map = map_file(path)
        size = len(self._map) if self._map is not None else 0
        self.count = size // ENTRY_SIZE

    @property
    def buffer(self):
        return self._map if self._map is not None else b""

    def entry(self, n: int) -> tuple[int, int, int, int, int]:
        """Entry ``n`` as (frame_offset, frame_length, stream_id, position_delta, number)."""
        return ENTRY.unpack_from(self._map, n * ENTRY_SIZE)

    def frames(self, first: int, stop: int) -> tuple[list[int], list[int]]:
        return frame_lists(self._map, first, stop)

    def stream_run(self, stream_id: int) -> tuple[int, int]:
        """In a stream index: entries [i, j) of ``stream_id`` (i == j when absent)."""
        if self._map is None:
            return 0, 0
        # Two C-level binary searches over the stream-id column (entries are sorted by
        # it): an aggregate read of a sealed segment costs ~1 us here, not ~12 us.
        with memoryview(self._map) as raw, raw.cast("I") as words:
            column = words[STREAM_ID_WORD::WORDS_PER_ENTRY]
            try:
                return (bisect.bisect_left(column, stream_id),
                        bisect.bisect_left(column, stream_id + 1))
            finally:
                column.release()

    def close(self) -> None:
        if self._map is not None:
            close_map(self._map)
            self._map = None


class ActiveIndex:
    """The in-memory position index of the active segment, plus a per-stream view.

    ``streams`` maps a stream id to ``array('Q', [first_number, off0, len0, delta0, off1,
    len1, delta1, ...])``: that stream's frames in this segment, whose numbers are
    contiguous, with each event's position delta (what a full frame's position needs).
    """

    def __init__(self) -> None:
        self.entries = bytearray()
        self.streams: dict[int, array] = {}
        #: How many entries the .pidx file already holds (flushed at checkpoints).
        self.flushed = 0

    @property
    def count(self) -> int:
        return len(self.entries) // ENTRY_SIZE

    def add(self, frame_offset: int, frame_length: int, stream_id: int, delta: int,
            number: int) -> None:
        self.entries += ENTRY.pack(frame_offset, frame_length, stream_id, delta, number)
        run = self.streams.get(stream_id)
        if run is None:
            self.streams[stream_id] = array("Q", (number, frame_offset, frame_length, delta))
        else:
            run.append(frame_offset)
            run.append(frame_length)
            run.append(delta)

    def add_run(self, offsets: list[int], lengths: list[int], stream_id: int, delta: int,
                number: int) -> None:
        """Add the events of one record: consecutive positions from ``delta`` and numbers
        from ``number``, with these frame offsets and lengths. One record's entries are
        built with strided array copies, not per event."""
        count = len(offsets)
        if count == 1:
            self.add(offsets[0], lengths[0], stream_id, delta, number)
            return
        self.entries += entries_of(offsets, lengths, stream_id, delta, number)
        triples = array("Q", bytes(8 * RUN_STRIDE * count))
        triples[0::RUN_STRIDE] = array("Q", offsets)
        triples[1::RUN_STRIDE] = array("Q", lengths)
        triples[2::RUN_STRIDE] = array("Q", range(delta, delta + count))
        run = self.streams.get(stream_id)
        if run is None:
            self.streams[stream_id] = array("Q", (number,)) + triples
        else:
            run += triples

    def load(self, raw: bytes) -> None:
        """Adopt entries read from a .pidx file (already checked by the caller)."""
        self.entries = bytearray()
        self.streams = {}
        for entry in ENTRY.iter_unpack(raw):
            self.add(entry[0], entry[1], entry[2], entry[3], entry[4])
        self.flushed = self.count

    def entry(self, n: int) -> tuple[int, int, int, int, int]:
        return ENTRY.unpack_from(self.entries, n * ENTRY_SIZE)

    def frames(self, first: int, stop: int) -> tuple[list[int], list[int]]:
        return frame_lists(self.entries, first, stop)

    def stream_columns(self, stream_id: int, start: int, stop: int
                       ) -> tuple[int, list[int], list[int], list[int]]:
        """Where events numbered [start, stop) of a stream are, clipped to this
        segment: (first number returned, frame offsets, frame lengths, position deltas)."""
        run = self.streams.get(stream_id)
        if run is None:
            return start, [], [], []
        first = run[0]
        have = (len(run) - 1) // RUN_STRIDE
        lo = max(start, first) - first
        hi = min(stop, first + have) - first
        if hi <= lo:
            return start, [], [], []
        at, to = 1 + RUN_STRIDE * lo, 1 + RUN_STRIDE * hi
        return (first + lo, run[at:to:RUN_STRIDE].tolist(),
                run[at + 1:to + 1:RUN_STRIDE].tolist(), run[at + 2:to + 2:RUN_STRIDE].tolist())

    def flush_to(self, path: Path) -> None:
        """Append the entries the file does not have yet (no fsync: derived data)."""
        flags = os.O_WRONLY | os.O_CREAT
        fd = os.open(path, flags, 0o644)
        try:
            os.ftruncate(fd, self.flushed * ENTRY_SIZE)
            os.lseek(fd, self.flushed * ENTRY_SIZE, os.SEEK_SET)
            pending = memoryview(self.entries)[self.flushed * ENTRY_SIZE:]
            try:
                while pending:
                    written = os.write(fd, pending)
                    pending = pending[written:]
            finally:
                pending.release()
        finally:
            os.close(fd)
        self.flushed = self.count


def entries_of(offsets: list[int], lengths: list[int], stream_id: int, first_delta: int,
               first_number: int) -> array:
    """Index entries (u32 words, ENTRY's layout) for one record: events of ``stream_id``
    with consecutive deltas from ``first_delta`` and numbers from ``first_number``, at
    these frame offsets and lengths. Each column is copied into the entries' words with
    one strided slice (no Python work per entry)."""
    count = len(offsets)
    words = array("I", bytes(ENTRY_SIZE * count))
    words[FRAME_OFFSET_WORD::WORDS_PER_ENTRY] = array("I", offsets)
    words[FRAME_LENGTH_WORD::WORDS_PER_ENTRY] = array("I", lengths)
    words[STREAM_ID_WORD::WORDS_PER_ENTRY] = array("I", (stream_id,)) * count
    words[DELTA_WORD::WORDS_PER_ENTRY] = array("I", range(first_delta, first_delta + count))
    last = first_number + count - 1
    if last <= 0xFFFF_FFFF:  # high words stay zero
        words[NUMBER_WORD::WORDS_PER_ENTRY] = array("I", range(first_number, last + 1))
    else:
        halves = array("I", array("Q", range(first_number, last + 1)).tobytes())
        words[NUMBER_WORD::WORDS_PER_ENTRY] = halves[0::2]  # low word (little-endian)
        words[NUMBER_WORD + 1::WORDS_PER_ENTRY] = halves[1::2]  # high word
    return words


def sorted_stream_index(position_entries: bytes | bytearray) -> bytes:
    """The .sidx content for a segment: its position entries sorted by (stream, number).

    Position entries are in log order, in which each stream's numbers increase, so a
    stable sort on the stream id alone is enough; and it need not move entries one by
    one: the runs of consecutive entries of one stream (a batch is one; a segment
    written by one producer is one) are sorted, then joined. (A sort of one tuple per
    entry stalled the server ~0.4 s at each 64 MiB roll; one slice per entry ~0.2 s.)
    """
    with memoryview(position_entries) as raw, raw.cast("I") as words:
        stream_ids = words[STREAM_ID_WORD::WORDS_PER_ENTRY].tolist()
    # Slices of bytes, not of a memoryview: a bytes slice costs a third of a view.
    entries = bytes(position_entries)
    changes = sum(map(ne, stream_ids[1:], stream_ids))
    if changes == 0:
        return entries
    if changes > len(stream_ids) // 4:  # mostly single events: sort the entries
        order = sorted(range(len(stream_ids)), key=stream_ids.__getitem__)
        return b"".join([entries[at:at + ENTRY_SIZE] for at in [i * ENTRY_SIZE for i in order]])
    runs = [(sid, len(list(group))) for sid, group in groupby(stream_ids)]
    starts = list(accumulate([count for _sid, count in runs], initial=0))
    order = sorted(range(len(runs)), key=[sid for sid, _count in runs].__getitem__)
    return b"".join([entries[starts[k] * ENTRY_SIZE:starts[k + 1] * ENTRY_SIZE] for k in order])


def write_file(path: Path, data: bytes | bytearray) -> None:
    """Write a whole derived file (index) in one go, replacing what was there."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)
