"""The chunk worker: deep checks of a record-aligned slice of a segment, in a worker process,
and the file helpers it shares with the verifier.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from array import array
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from .. import format as fmt
from ..errors import InvalidArgument, UnsupportedFormatVersion
from ..index import ENTRY, ENTRY_SIZE, close_map
from ..names import check_stream_name, quoted
from ..recovery import BadRecord, check_record
from .report import IndexProblem

#: 0, 1, 2, ... as u64, so that a record's number and position columns are one slice
#: copy instead of one Python int per event (8 MiB; built once, before workers fork).
COUNTING_SIZE = 1 << 20


_counting = array("Q")


#: What the header walk that plans the chunks reads of a record (format.py's layout):
#: magic, body_length, count, first_number, stream_id.
_WALK = struct.Struct("<4s12xII8xQI")


assert _WALK.size == 44 and fmt.RECORD_HEADER.size == 56


assert sys.byteorder == "little", "index entries are built with native-order arrays"


@dataclass
class _Task:
    """One chunk to verify: records ``[start, stop)`` of a segment, record-aligned."""

    segment: int
    base: int
    path: str
    size: int
    start: int
    stop: int
    last: bool  # the segment's last chunk
    #: The index files to compare the chunk's regenerated entries with (None: do not).
    pidx: str | None = None
    sidx: str | None = None
    #: Per record of the chunk, as the planner's header walk saw them: the index of its
    #: first entry in the .sidx (where its run lands once sorted by stream, number).
    sidx_locs: array | None = None
    #: The format version in the segment's header, which every record must have
    #: (None: the header is unreadable; the parent reports that).
    version: int | None = None


@dataclass
class _Chunk:
    """What one worker found in a chunk, per record, not per event."""

    task: _Task
    #: Offset after the last good record.
    end: int = 0
    #: (offset, reason) of the first record that fails, or None.
    bad: tuple[int, str] | None = None
    #: Whether ``bad`` came from ``check_record`` (could be a torn tail) rather than from
    #: numbering (a checksummed record that contradicts the log: always damage).
    bad_is_framing: bool = False
    first_position: int = 0
    events: int = 0
    #: Per good record, in log order.
    rec_offset: array = field(default_factory=lambda: array("Q"))
    rec_pos: array = field(default_factory=lambda: array("Q"))
    rec_sid: array = field(default_factory=lambda: array("Q"))
    rec_first: array = field(default_factory=lambda: array("Q"))
    #: First record of each stream in this chunk: (offset, sid, name, number, position).
    appear: list[tuple[int, int, bytes, int, int]] = field(default_factory=list)
    #: Each stream's next number after this chunk.
    next_number: dict[int, int] = field(default_factory=dict)
    #: Entries of this chunk's range that the .pidx holds (it may be short or missing).
    pidx_have: int = 0
    #: First entry that differs from the log, as (entry index, found, expected).
    pidx_bad: tuple[int, tuple, tuple] | None = None
    sidx_bad: tuple[int, tuple, tuple] | None = None


def _verify_chunk(task: _Task) -> _Chunk:
    """Check the records of one chunk and its index entries (in a worker, or inline)."""
    out = _Chunk(task, end=task.start)
    if task.start >= task.stop:
        return out
    with open(task.path, "rb") as handle:
        buf = mmap.mmap(handle.fileno(), task.size, prot=mmap.PROT_READ)
    try:
        frames, sids, numbers = _scan_chunk(buf, out)
    finally:
        close_map(buf)
    if out.bad is None and (task.pidx or task.sidx):
        entries = _position_entries(frames, sids, numbers, out.first_position - task.base)
        if task.pidx:
            _compare_pidx(task.pidx, out, entries)
        if task.sidx and task.sidx_locs is not None and \
                len(task.sidx_locs) == len(out.rec_offset):
            _compare_sidx(task.sidx, out, entries)
    return out


def _scan_chunk(buf: mmap.mmap, out: _Chunk) -> tuple[array, array, array]:
    """The hot loop: one ``check_record(deep=True)`` per record, array appends per record.

    Numbering is checked against what this chunk saw; the parent checks each stream's
    first record here against the whole log before it (``appear``). Returns the
    columns of the good records' index entries: (offset, length) pairs, ids, numbers.
    """
    offset, stop = out.task.start, out.task.stop
    position = -1
    names: dict[int, bytes] = {}
    ids: dict[bytes, int] = {}
    next_number = out.next_number
    appear = out.appear
    frames = array("I")
    sids = array("I")
    numbers = array("Q")
    add_frames, add_numbers = frames.extend, numbers.extend
    counting = _build_counting()
    counted = len(counting)
    flatten = chain.from_iterable
    add_offset, add_pos = out.rec_offset.append, out.rec_pos.append
    add_sid, add_first = out.rec_sid.append, out.rec_first.append
    while offset < stop:
        record = check_record(buf, offset, stop, deep=True, version=out.task.version)
        if record.__class__ is BadRecord:
            out.bad = (offset, record.reason)
            out.bad_is_framing = True
            break
        header = record.header
        pos = header.base_position
        if position < 0:
            out.first_position = position = pos
        elif pos != position:
            out.bad = (offset, f"record has position {pos}, expected {position}")
            break
        sid = header.stream_id
        first = header.first_number
        count = header.count
        expected = next_number.get(sid)
        if expected is None:
            if record.stream in ids:
                out.bad = (offset, f"stream {quoted(record.stream)} has two ids, {ids[record.stream]}"
                           f" and {sid}")
                break
            ids[record.stream] = sid
            names[sid] = record.stream
            appear.append((offset, sid, record.stream, first, pos))
        elif names[sid] != record.stream:
            out.bad = (offset, f"stream id {sid} is named {quoted(names[sid])},"
                       f" the record says {quoted(record.stream)}")
            break
        elif first != expected:
            out.bad = (offset, f"event number {first} of stream {quoted(record.stream)},"
                       f" expected {expected}")
            break
        next_number[sid] = first + count
        add_frames(flatten(record.frames))
        sids += array("I", (sid,)) * count
        if first + count <= counted:
            numbers += counting[first:first + count]
        else:
            add_numbers(range(first, first + count))
        add_offset(offset)
        add_pos(pos)
        add_sid(sid)
        add_first(first)
        position = pos + count
        offset = record.end
    out.end = offset
    out.events = len(numbers)
    return frames, sids, numbers


def _position_entries(frames: array, sids: array, numbers: array, first_delta: int
                      ) -> bytearray:
    """.pidx entries (index.py's layout) from columns, interleaved by strided copies."""
    n = len(numbers)
    out = bytearray(ENTRY_SIZE * n)
    with memoryview(out) as raw, raw.cast("I") as words, memoryview(frames) as pairs, \
            memoryview(numbers) as wide, wide.cast("B") as wide_bytes, \
            wide_bytes.cast("I") as halves:
        words[0::6] = pairs[0::2]  # frame_offset
        words[1::6] = pairs[1::2]  # frame_length
        words[2::6] = memoryview(sids)  # stream_id
        words[3::6] = _counting_words(first_delta, n)  # position_delta
        words[4::6] = halves[0::2]  # number, low word
        words[5::6] = halves[1::2]  # number, high word
    return out


def _build_counting() -> array:
    global _counting
    if len(_counting) < COUNTING_SIZE:
        _counting = array("Q", range(COUNTING_SIZE))
    return _counting


def _counting_words(first: int, n: int) -> memoryview | array:
    """u32 values first .. first+n-1, as a (strided) view of ``_counting`` if it can."""
    if first + n > len(_counting):
        return array("I", range(first, first + n))
    with memoryview(_counting) as wide, wide.cast("B") as raw:
        return raw.cast("I")[2 * first:2 * (first + n):2]


def _compare_pidx(path: str, out: _Chunk, entries: bytearray) -> None:
    """Compare this chunk's slice of the .pidx (as much of it as the file holds)."""
    first = out.first_position - out.task.base
    try:
        with open(path, "rb") as handle:
            handle.seek(first * ENTRY_SIZE)
            data = handle.read(len(entries))
    except FileNotFoundError:
        return
    have = len(data) // ENTRY_SIZE
    out.pidx_have = have
    if len(data) == len(entries):
        same = data == entries
    else:  # a short file (the newest segment's index is flushed at checkpoints)
        data = data[:have * ENTRY_SIZE]
        same = data == entries[:len(data)]
    if not same:
        out.pidx_bad = _first_bad_entry(data, entries, first)


def _compare_sidx(path: str, out: _Chunk, entries: bytearray) -> None:
    """Compare each record's run of entries with where it belongs in the .sidx."""
    try:
        with open(path, "rb") as handle:
            data = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
    except (FileNotFoundError, ValueError):  # missing or empty: the parent reports it
        return
    try:
        at = 0
        rec_pos, locs = out.rec_pos, out.task.sidx_locs
        ends = list(rec_pos[1:]) + [out.first_position + out.events]
        for pos, end, loc in zip(rec_pos, ends, locs):
            size = (end - pos) * ENTRY_SIZE
            found = data[loc * ENTRY_SIZE:loc * ENTRY_SIZE + size]
            if found != entries[at:at + size]:
                bad = _first_bad_entry(found, entries[at:at + size], loc)
                if out.sidx_bad is None or bad[0] < out.sidx_bad[0]:
                    out.sidx_bad = bad
            at += size
    finally:
        close_map(data)


def _first_bad_entry(found: bytes, expected: bytes, first: int) -> tuple[int, tuple, tuple]:
    """(index, found, expected) of the first entry that differs; ``first``: index of
    the first entry of the slices. A short ``found`` shows the missing entry as ()."""
    n = _first_difference(found, expected) // ENTRY_SIZE
    at = n * ENTRY_SIZE
    have = ENTRY.unpack_from(found, at) if len(found) >= at + ENTRY_SIZE else ()
    return first + n, have, ENTRY.unpack_from(expected, at)


def segment_version(path: str | Path) -> int | None:
    """The format version a segment's header names, or None if it has no header with
    a good checksum (what is wrong with it is for ``_segment_header_reason``)."""
    with open(path, "rb") as handle:
        raw = handle.read(fmt.SEGMENT_HEADER_SIZE)
    if len(raw) < fmt.SEGMENT_HEADER_SIZE:
        return None
    header = fmt.decode_segment_header(raw)
    if header.magic != fmt.SEGMENT_MAGIC or not header.checksum_ok:
        return None
    return header.version


def _segment_header_reason(path: Path, base: int, size: int) -> str | None:
    """Why the segment header is bad, or None. Raises :class:`UnsupportedFormatVersion`
    for an intact header of a version this code cannot read (never "repaired")."""
    with open(path, "rb") as handle:
        raw = handle.read(fmt.SEGMENT_HEADER_SIZE)
    if len(raw) < fmt.SEGMENT_HEADER_SIZE:
        return f"file of {size} bytes is shorter than a segment header"
    header = fmt.decode_segment_header(raw)
    if header.magic != fmt.SEGMENT_MAGIC:
        return "not a MeiliES segment (bad magic)"
    if not header.checksum_ok or header.header_size != fmt.SEGMENT_HEADER_SIZE:
        return "segment header checksum mismatch"
    if header.version not in fmt.FORMAT_HISTORY:  # intact, and newer: not ours to cut
        raise UnsupportedFormatVersion(path, header.version, fmt.FORMAT_VERSION)
    if header.base_position != base:
        return f"header says base position {header.base_position}, the file name {base}"
    return None


def _stream_name_reason(name: bytes) -> str | None:
    """Why a new stream's name is one the engine would never have accepted, or None."""
    try:
        check_stream_name(name)
    except InvalidArgument as exc:
        return f"stream name {quoted(name)} {exc.reason}"
    return None


def _walk_headers(path: str, size: int) -> tuple[array, array, array, array]:
    """Offset, stream id, first number and count of each record, by header walk.

    Reads headers only (no checksum); stops where a header is implausible. What it
    finds is trusted only for segments whose every record the workers then verify.
    """
    offsets, sids, firsts, counts = array("Q"), array("Q"), array("Q"), array("Q")
    with open(path, "rb") as handle:
        buf = mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ)
    try:
        at = fmt.SEGMENT_HEADER_SIZE
        unpack = _WALK.unpack_from
        magic_ok, limit, head = fmt.RECORD_MAGIC, fmt.MAX_BODY_LENGTH, fmt.RECORD_HEADER_SIZE
        while size - at >= head:
            magic, body, count, first, sid = unpack(buf, at)
            if magic != magic_ok or body > limit or at + head + body > size:
                break
            offsets.append(at)
            sids.append(sid)
            firsts.append(first)
            counts.append(count)
            at += head + body
    finally:
        close_map(buf)
    return offsets, sids, firsts, counts


def _sidx_locations(sids: array, firsts: array, counts: array) -> array:
    """Where each record's run of entries starts in the .sidx (sorted by stream, number).

    A record's events are one run in both orders, so this sorts records, not events.
    """
    keys = [(sid << 64) | first for sid, first in zip(sids, firsts)]
    locs = array("Q", bytes(8 * len(keys)))
    at = 0
    for i in sorted(range(len(keys)), key=keys.__getitem__):
        locs[i] = at
        at += counts[i]
    return locs


def _index_size_problem(path: Path, size: int | None, expected: int,
                        may_be_short: bool) -> IndexProblem | None:
    if size is None:
        return IndexProblem(path, None, "missing")
    if size % ENTRY_SIZE:
        return IndexProblem(path, size - size % ENTRY_SIZE, f"size {size} is not a multiple"
                            f" of the {ENTRY_SIZE}-byte entry")
    if size > expected or (size < expected and not may_be_short):
        return IndexProblem(path, min(size, expected), f"holds {size // ENTRY_SIZE} entries,"
                            f" the segment has {expected // ENTRY_SIZE} events")
    return None


def _entry_problem(path: Path, bad: tuple[int, tuple, tuple]) -> IndexProblem:
    n, found, expected = bad
    return IndexProblem(path, n * ENTRY_SIZE, f"entry {n} is {found or 'missing'}, the log"
                        f" says {expected} (frame_offset, frame_length, stream_id,"
                        " position_delta, number)")


def _first_difference(a: bytes, b: bytes) -> int:
    """Offset of the first byte where ``a`` and ``b`` differ (or the shorter's length)."""
    end = min(len(a), len(b))
    step = 1 << 16
    at = 0
    while at < end and a[at:at + step] == b[at:at + step]:
        at += step
    while at < end and a[at] == b[at]:
        at += 1
    return at


def _is_boundary(offsets: array, offset: int) -> bool:
    """Whether a record starts at ``offset`` (``offsets``: record starts, sorted)."""
    i = bisect_left(offsets, offset)
    return i < len(offsets) and offsets[i] == offset


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _size(path: Path) -> int:
    return _size_or_none(path) or 0


def _file_hash(path: Path, length: int) -> int | None:
    """xxh3 of the first ``length`` bytes of a file (None: missing or shorter)."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return None
    with handle:
        if os.fstat(handle.fileno()).st_size < length:
            return None
        if length == 0:
            return fmt.checksum(b"")
        data = mmap.mmap(handle.fileno(), length, prot=mmap.PROT_READ)
    try:
        with memoryview(data) as view:
            return fmt.checksum(view)
    finally:
        close_map(data)
