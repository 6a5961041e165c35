"""Checking a data directory record by record, and repairing it: ``meilies-fsck``'s library.

``verify(path)`` returns an :class:`FsckReport`; it prints nothing and exits nothing
(the CLI in ``meilies/cli/fsck.py`` maps the report to exit codes). What it checks,
against the format that ``format.py``, ``index.py``, ``checkpoint.py`` and ``files.py``
define (``docs/format.md`` says the same in prose):

* **The log** (the only data that matters). Every segment header; every record with
  :func:`recovery.check_record` in its deep mode (framing, one checksum per record,
  each frame spelling its stream, number and lengths), the shared verifier behind the
  engine's open; global positions dense and contiguous across records and segments;
  each stream's numbers contiguous from 0; stream id <-> name one-to-one, ids dense in
  order of creation. The first record that fails is the *cut*: everything from it to
  the end of the log is what ``--repair`` removes. It is a *torn tail* when it sits in
  the newest segment with no valid record after it, past what the checkpoint says was
  complete (an interrupted write; the engine would drop it on open), *damage*
  otherwise. Both are reported.
* **Derived files**, checked only for the part of the log before the cut (after it they
  are rebuilt anyway): a sealed segment's ``.pidx`` must equal the entries regenerated
  from its records, byte for byte, and its ``.sidx`` the same entries sorted by
  (stream id, number); the newest segment's ``.pidx`` may be shorter (it is flushed at
  checkpoints) but what it holds must match; its ``.sidx`` is not read (the engine
  rewrites it when it seals the segment). The checkpoint, when present: its trailer
  checksum, the segments it lists, each one's size, event count and xxhashes, and its
  stream table against the log prefix it claims to cover. A checkpoint that covers only
  a prefix of the log (the server stopped without a clean close) is normal: a note.

Severity, decided here and documented in ``docs/format.md``: any problem makes the
report unclean (exit 1). Log damage loses events on repair (``severity == "log"``);
index and checkpoint problems are ``"derived"``: repairing them loses nothing, it
rebuilds them from the log. A file in the directory that the engine does not write is
``"foreign"`` and not repairable (fsck never deletes what it did not write).

``verify(path, repair=True)`` then: deletes the checkpoint, every index file, truncates
the cut segment at the cut and deletes every later segment, opens and closes
:class:`~meilies.engine.Engine` (which rebuilds the derived files from the log) and
verifies again; ``report.repair`` says exactly what was removed, ``report.after`` is
the fresh report.

Speed. The deep per-record check is Python (about 1.7 us per 100-byte event here), so
records are checked in record-aligned chunks by one worker process per core. A worker
regenerates its chunk's index entries with array slicing (no Python per entry) and
compares them as bytes with its slice of the ``.pidx`` and, record by record, with the
``.sidx`` runs whose places a header walk planned. The parent merges per-chunk
summaries: per record and per stream, never per event.

Not thread-safe; holds the directory's lock (``files.DirectoryLock``) while it reads.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import multiprocessing
import os
import re
import struct
import sys
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import ClassVar

from . import checkpoint as ckpt
from . import format as fmt
from .errors import (CorruptIndex, DirectoryLocked, EngineError, InvalidArgument,
                     UnreadableDirectory,
                     UnsupportedFormatVersion)
from .files import (CHECKPOINT_NAME, LOCK_NAME, POSITION_INDEX_SUFFIX, SEGMENT_SUFFIX,
                    STREAM_INDEX_SUFFIX, TEMP_SUFFIX, DirectoryLock, checkpoint_path,
                    fsync_directory, position_index_path, segment_path, stream_index_path)
from .index import ENTRY, ENTRY_SIZE, close_map
from .names import check_stream_name
from .recovery import BadRecord, check_record, valid_record_after

#: Records are verified in chunks of about this many bytes, cut at record boundaries:
#: small enough to spread a 64 MiB segment over the cores and move the progress bar,
#: large enough that a chunk's fixed cost (a map, a pickled summary) is noise.
CHUNK_BYTES = 4 * 1024 * 1024
#: Below this much log, forking workers costs more than it saves (~10 ms per fork).
PARALLEL_MIN_BYTES = 16 * 1024 * 1024

#: 0, 1, 2, ... as u64, so that a record's number and position columns are one slice
#: copy instead of one Python int per event (8 MiB; built once, before workers fork).
COUNTING_SIZE = 1 << 20
_counting = array("Q")

#: ``progress(done_bytes, total_bytes)``: called as segment bytes are verified.
Progress = Callable[[int, int], None]

_INDEX_FILE = re.compile(r"^(\d{20})(" + re.escape(SEGMENT_SUFFIX) + "|"
                         + re.escape(POSITION_INDEX_SUFFIX) + "|"
                         + re.escape(STREAM_INDEX_SUFFIX) + ")$")
#: The engine's own leftovers of an atomic write (files.py removes these on open; any
#: other name ending in .tmp is someone else's file).
_TEMP_FILE = re.compile(r"^(" + re.escape(CHECKPOINT_NAME) + r"|\d{20}("
                        + re.escape(POSITION_INDEX_SUFFIX) + "|"
                        + re.escape(STREAM_INDEX_SUFFIX) + "))" + re.escape(TEMP_SUFFIX) + "$")
#: What the header walk that plans the chunks reads of a record (format.py's layout):
#: magic, body_length, count, first_number, stream_id.
_WALK = struct.Struct("<4s12xII8xQI")
assert _WALK.size == 44 and fmt.RECORD_HEADER.size == 56
assert sys.byteorder == "little", "index entries are built with native-order arrays"


# -- errors ------------------------------------------------------------------------------


# -- problems ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong, with the file, the byte offset in it (None: the whole file) and why."""

    #: Short name of the problem class, as the JSON report spells it.
    kind: ClassVar[str] = "problem"
    #: "log": repair removes events; "derived": repair rebuilds a file from the log and
    #: loses nothing; "foreign": not ours, never touched.
    severity: ClassVar[str] = "derived"
    repairable: ClassVar[bool] = True
    #: What the text line calls the file.
    noun: ClassVar[str] = "file"

    path: Path
    offset: int | None
    reason: str

    def describe(self) -> str:
        """One line: what, which file, where, why (``redis-check-aof`` style)."""
        name = self.noun if self.path.name == self.noun else f"{self.noun} {self.path.name}"
        at = "" if self.offset is None else f" offset={self.offset}"
        return f'{name}:{at} reason="{self.reason}"'

    def to_dict(self) -> dict:
        return {"kind": self.kind, "severity": self.severity, "repairable": self.repairable,
                "path": str(self.path), "file": self.path.name, "offset": self.offset,
                "reason": self.reason}


@dataclass(frozen=True)
class LogDamage(Problem):
    """The log is good up to ``offset`` of this segment (``ok_up_to``), bad after it."""

    severity: ClassVar[str] = "log"
    noun: ClassVar[str] = "segment"
    #: The segment file's size in bytes.
    size: int = 0

    @property
    def ok_up_to(self) -> int:
        return self.offset or 0

    @property
    def bad_bytes(self) -> int:
        return self.size - self.ok_up_to

    def describe(self) -> str:
        return (f"segment {self.path.name}: ok_up_to={self.ok_up_to} size={self.size}"
                f' bad_bytes={self.bad_bytes} reason="{self.reason}" kind={self.kind}')

    def to_dict(self) -> dict:
        return {**super().to_dict(), "size": self.size, "ok_up_to": self.ok_up_to,
                "bad_bytes": self.bad_bytes}


@dataclass(frozen=True)
class DamagedRecord(LogDamage):
    """A record that fails its checks, or breaks numbering, with more log after it."""

    kind: ClassVar[str] = "damaged-record"


@dataclass(frozen=True)
class TornTail(LogDamage):
    """An incomplete record (or segment header) at the very end of the log: a write
    that a crash interrupted. The engine would drop it on open; fsck reports it."""

    kind: ClassVar[str] = "torn-tail"


@dataclass(frozen=True)
class BadSegment(LogDamage):
    """A segment whose header is wrong, or that does not start where the log is."""

    kind: ClassVar[str] = "bad-segment"


@dataclass(frozen=True)
class IndexProblem(Problem):
    """A missing, orphaned or wrong .pidx/.sidx file (derived data: rebuilt on repair)."""

    kind: ClassVar[str] = "index"
    noun: ClassVar[str] = "index"


@dataclass(frozen=True)
class CheckpointProblem(Problem):
    """A checkpoint that fails its checksum or says something false about the log."""

    kind: ClassVar[str] = "checkpoint"
    noun: ClassVar[str] = "checkpoint"


@dataclass(frozen=True)
class ForeignFileProblem(Problem):
    """A file the engine does not write. The engine refuses to open the directory."""

    kind: ClassVar[str] = "foreign-file"
    severity: ClassVar[str] = "foreign"
    repairable: ClassVar[bool] = False


# -- what a repair removes ---------------------------------------------------------------


@dataclass
class EventRange:
    """Events ``first`` .. ``last`` of a stream that a repair removes."""

    stream: bytes
    first: int
    last: int
    #: False when only the header of a record that fails its checks names them.
    verified: bool = True

    def describe(self) -> str:
        what = f"event {self.first}" if self.first == self.last else \
            f"events {self.first}..{self.last}"
        return f"{what} of stream '{self.stream.decode('utf-8', 'replace')}'"

    def to_dict(self) -> dict:
        return {"stream": self.stream.decode("utf-8", "replace"), "first": self.first,
                "last": self.last, "count": self.last - self.first + 1,
                "verified": self.verified}


@dataclass
class Removal:
    """The part of the log from the cut to its end: what ``--repair`` removes."""

    #: (segment, size it is cut to, bytes removed) for the segment holding the cut.
    truncate: list[tuple[Path, int, int]] = field(default_factory=list)
    #: (segment, size) for every segment removed whole.
    delete: list[tuple[Path, int]] = field(default_factory=list)
    #: Per stream, in order of first appearance after the cut.
    events: list[EventRange] = field(default_factory=list)
    #: Bytes after the cut that no record header could be decoded from (the bytes of a
    #: record whose checks fail but whose header still names its events are not counted).
    undecodable_bytes: int = 0

    @property
    def bytes(self) -> int:
        return sum(n for _p, _s, n in self.truncate) + sum(n for _p, n in self.delete)

    @property
    def event_count(self) -> int:
        return sum(r.last - r.first + 1 for r in self.events)

    def to_dict(self) -> dict:
        return {"bytes": self.bytes, "event_count": self.event_count,
                "truncate": [{"file": p.name, "path": str(p), "new_size": s, "bytes": n}
                             for p, s, n in self.truncate],
                "delete": [{"file": p.name, "path": str(p), "bytes": n} for p, n in self.delete],
                "events": [r.to_dict() for r in self.events],
                "undecodable_bytes": self.undecodable_bytes}


@dataclass
class RepairResult:
    """What ``verify(..., repair=True)`` did."""

    #: The log removed (None when the log had no damage and only derived files were bad).
    removed: Removal | None = None
    #: Index files and checkpoint deleted, then rebuilt by opening the engine.
    deleted_derived: list[str] = field(default_factory=list)
    #: Index files the engine reported rebuilding, and its recovery notes.
    rebuilt: list[str] = field(default_factory=list)
    #: Why the repair did not happen or did not finish; None when it did.
    error: str | None = None

    def to_dict(self) -> dict:
        return {"removed": self.removed.to_dict() if self.removed else None,
                "deleted_derived": self.deleted_derived, "rebuilt": self.rebuilt,
                "error": self.error}


@dataclass
class FsckReport:
    """Everything ``verify`` found. ``clean`` is the verdict."""

    path: Path
    segments: int = 0
    streams: int = 0
    #: Events verified good (the log up to the cut, when there is one).
    events: int = 0
    #: Bytes of segment files.
    bytes: int = 0
    #: Bytes of index files.
    index_bytes: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    #: Observations that are not problems (a stale checkpoint, a short newest index...).
    notes: list[str] = field(default_factory=list)
    #: What ``--repair`` removes from the log; None when the log is intact.
    removal: Removal | None = None
    repair: RepairResult | None = None
    #: The report of the verification that follows a repair.
    after: FsckReport | None = None

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def repaired(self) -> bool:
        """A repair ran to the end and left a clean directory."""
        return (self.repair is not None and self.repair.error is None
                and self.after is not None and self.after.clean)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"path": str(self.path), "clean": self.clean, "segments": self.segments,
                "streams": self.streams, "events": self.events, "bytes": self.bytes,
                "index_bytes": self.index_bytes, "seconds": round(self.seconds, 6),
                "problems": [p.to_dict() for p in self.problems], "notes": self.notes,
                "removal": self.removal.to_dict() if self.removal else None,
                "repair": self.repair.to_dict() if self.repair else None,
                "repaired": self.repaired,
                "after": self.after.to_dict() if self.after else None}


# -- the entry point ---------------------------------------------------------------------


def verify(path: str | os.PathLike, repair: bool = False,
           progress: Progress | None = None) -> FsckReport:
    """Verify the data directory at ``path``; with ``repair``, repair what is wrong.

    Raises :class:`UnreadableDirectory` (missing, unreadable, not a data directory) and
    :class:`~meilies.engine.errors.DirectoryLocked` (a server has it open). Changes
    nothing without ``repair`` (but for the pid written into ``LOCK``).
    """
    directory = Path(path)
    _list_directory(directory)  # before the lock: never create LOCK in a stranger's directory
    lock = _take_lock(directory, write=repair)
    try:
        try:
            report = _Verifier(directory, _list_directory(directory), progress).run()
        except OSError as exc:
            raise UnreadableDirectory(directory, _os_reason(exc)) from exc
        if not repair or report.clean:
            return report
        report.repair = RepairResult()
        blockers = [p for p in report.problems if not p.repairable]
        if blockers:
            report.repair.error = (f"{blockers[0].path.name} is not a file MeiliES writes:"
                                   " move it out of the data directory, then repair")
            return report
        try:
            _remove(directory, report)
        except OSError as exc:
            report.repair.error = f"repair stopped: {_os_reason(exc)}"
            return report
    finally:
        lock.release()
    _rebuild(directory, report.repair)
    if report.repair.error is None:
        report.after = verify(directory, repair=False, progress=progress)
    return report


# -- the directory and its lock ----------------------------------------------------------


@dataclass
class _Listing:
    bases: list[int]
    sizes: list[int]
    index_files: list[tuple[int, str]]  # (base, file name)
    foreign: list[str]
    temporary: list[str]
    has_checkpoint: bool


def _list_directory(directory: Path) -> _Listing:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        raise UnreadableDirectory(directory, "no such directory") from None
    except NotADirectoryError:
        raise UnreadableDirectory(directory, "not a directory") from None
    except OSError as exc:
        raise UnreadableDirectory(directory, _os_reason(exc)) from None
    listing = _Listing([], [], [], [], [], False)
    for entry in entries:
        name = entry.name
        match = _INDEX_FILE.match(name)
        if name == LOCK_NAME:
            continue
        if name == CHECKPOINT_NAME:
            listing.has_checkpoint = True
        elif _TEMP_FILE.match(name) and entry.is_file(follow_symlinks=False):
            listing.temporary.append(name)
        elif match is None or not entry.is_file(follow_symlinks=False):
            listing.foreign.append(name)
        elif match.group(2) == SEGMENT_SUFFIX:
            listing.bases.append(int(match.group(1)))
            listing.sizes.append(entry.stat(follow_symlinks=False).st_size)
        else:
            listing.index_files.append((int(match.group(1)), name))
    if listing.foreign and not listing.bases:
        shown = ", ".join(listing.foreign[:3]) + (", ..." if len(listing.foreign) > 3 else "")
        raise UnreadableDirectory(directory, f"not a MeiliES data directory: it holds {shown}"
                                  " and no segment files")
    return listing


def _os_reason(exc: OSError) -> str:
    name = f"{Path(exc.filename).name}: " if exc.filename else ""
    return f"{name}{exc.strerror or exc}"


class _ReadOnlyLock:
    """A shared flock on an existing LOCK, for a directory we may not write (a
    snapshot, read-only media): it still fails while a server holds the lock."""

    def __init__(self, directory: Path) -> None:
        self._fd: int | None = None
        try:
            self._fd = os.open(directory / LOCK_NAME, os.O_RDONLY)
        except FileNotFoundError:
            return  # no LOCK and no way to create one: no server ever ran here as is
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            self._fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DirectoryLocked(directory) from None
            raise

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _take_lock(directory: Path, write: bool) -> DirectoryLock | _ReadOnlyLock:
    lock = DirectoryLock(directory)
    try:
        lock.acquire()
        return lock
    except DirectoryLocked:
        raise
    except OSError as exc:
        if write or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UnreadableDirectory(directory, f"cannot take its lock: {_os_reason(exc)}"
                                      ) from None
    try:
        return _ReadOnlyLock(directory)
    except OSError as exc:
        raise UnreadableDirectory(directory, f"cannot take its lock: {_os_reason(exc)}"
                                  ) from None


# -- the chunk worker --------------------------------------------------------------------


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
        record = check_record(buf, offset, stop, deep=True)
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
                out.bad = (offset, f"stream {record.stream!r} has two ids, {ids[record.stream]}"
                           f" and {sid}")
                break
            ids[record.stream] = sid
            names[sid] = record.stream
            appear.append((offset, sid, record.stream, first, pos))
        elif names[sid] != record.stream:
            out.bad = (offset, f"stream id {sid} is named {names[sid]!r},"
                       f" the record says {record.stream!r}")
            break
        elif first != expected:
            out.bad = (offset, f"event number {first} of stream {record.stream!r},"
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


# -- the verifier ------------------------------------------------------------------------


@dataclass
class _Segment:
    """The parent's view of one segment, filled as its chunks are merged."""

    k: int
    base: int
    path: Path
    size: int
    end: int = fmt.SEGMENT_HEADER_SIZE  # after the last good record
    events: int = 0
    rec_offset: array = field(default_factory=lambda: array("Q"))
    rec_pos: array = field(default_factory=lambda: array("Q"))
    rec_sid: array = field(default_factory=lambda: array("Q"))
    rec_first: array = field(default_factory=lambda: array("Q"))
    pidx_bad: tuple[int, tuple, tuple] | None = None
    sidx_bad: tuple[int, tuple, tuple] | None = None
    #: Entries the .pidx holds once it has been found to match the log; else None.
    pidx_good: int | None = None
    sidx_good: bool = False

    def add(self, chunk: _Chunk) -> None:
        self.end = chunk.end
        self.events += chunk.events
        self.rec_offset += chunk.rec_offset
        self.rec_pos += chunk.rec_pos
        self.rec_sid += chunk.rec_sid
        self.rec_first += chunk.rec_first
        if chunk.pidx_bad and not self.pidx_bad:
            self.pidx_bad = chunk.pidx_bad
        if chunk.sidx_bad and (not self.sidx_bad or chunk.sidx_bad[0] < self.sidx_bad[0]):
            self.sidx_bad = chunk.sidx_bad

    def events_before(self, offset: int) -> int:
        """Events of this segment in records that start before ``offset``."""
        i = bisect_left(self.rec_offset, offset)
        return self.events if i == len(self.rec_offset) else self.rec_pos[i] - self.base


class _Verifier:
    def __init__(self, directory: Path, listing: _Listing, progress: Progress | None) -> None:
        self.directory = directory
        self.listing = listing
        self.progress = progress
        self.report = FsckReport(directory)
        self.names: list[bytes] = []
        self.ids: dict[bytes, int] = {}
        self.next_number = array("Q")
        self.first_position = array("Q")
        self.position = 0
        self.segments: list[_Segment] = []
        self.checkpoint: ckpt.Checkpoint | None = None
        #: (segment number, offset) of the first bad byte of the log, if any.
        self.cut: tuple[int, int] | None = None

    # -- driver -----------------------------------------------------------------------

    def run(self) -> FsckReport:
        started = time.monotonic()
        listing, report = self.listing, self.report
        report.segments = len(listing.bases)
        report.bytes = sum(listing.sizes)
        for name in listing.foreign:
            report.problems.append(ForeignFileProblem(
                self.directory / name, None, "not a file MeiliES writes; the engine refuses"
                " to open a directory holding it"))
        for name in listing.temporary:
            report.notes.append(f"{name}: leftover of an interrupted write, deleted on the"
                                " next open")
        self._read_checkpoint()
        self._check_log()
        self._check_orphan_indexes()
        if self.checkpoint is not None:
            self._check_checkpoint_streams()
        report.streams = len(self.names)
        report.events = self.position
        report.index_bytes = sum(_size(self.directory / name)
                                 for _b, name in listing.index_files)
        report.seconds = time.monotonic() - started
        return report

    def _check_log(self) -> None:
        total = sum(self.listing.sizes)
        if self.progress:
            self.progress(0, total)
        tasks = (task for k in range(len(self.listing.bases)) for task in self._plan(k))
        _build_counting()
        pool = _start_pool(_worker_count(total))
        if pool is None:
            self._merge_all(map(_verify_chunk, tasks), total)
        else:
            with pool:
                self._merge_all(pool.imap(_verify_chunk, tasks), total)
        if self.progress:
            self.progress(total, total)
        if self.cut is not None:
            self._describe_removal()

    def _plan(self, k: int) -> list[_Task]:
        """The chunks of segment ``k`` (a pool calls this from its task thread)."""
        base, size = self.listing.bases[k], self.listing.sizes[k]
        path = str(segment_path(self.directory, base))
        if size <= fmt.SEGMENT_HEADER_SIZE:  # no records: one empty chunk, still merged
            empty = min(size, fmt.SEGMENT_HEADER_SIZE)
            return [_Task(k, base, path, size, empty, empty, True)]
        newest = k == len(self.listing.bases) - 1
        pidx = position_index_path(self.directory, base)
        sidx = stream_index_path(self.directory, base)
        pidx_arg = str(pidx) if pidx.exists() else None
        sidx_arg = str(sidx) if not newest and sidx.exists() else None
        offsets, sids, firsts, counts = _walk_headers(path, size)
        locs = _sidx_locations(sids, firsts, counts) if sidx_arg else None
        tasks = []
        first = 0  # record index where the current chunk starts
        start = fmt.SEGMENT_HEADER_SIZE
        for i, offset in enumerate(offsets):
            if offset - start >= CHUNK_BYTES:
                tasks.append(_Task(k, base, path, size, start, offset, False, pidx_arg,
                                   sidx_arg, locs[first:i] if locs else None))
                start, first = offset, i
        tasks.append(_Task(k, base, path, size, start, size, True, pidx_arg, sidx_arg,
                           locs[first:] if locs else None))
        return tasks

    def _merge_all(self, chunks: Iterator[_Chunk], total: int) -> None:
        done = 0
        segment: _Segment | None = None
        for chunk in chunks:
            task = chunk.task
            if segment is None or segment.k != task.segment:
                segment = self._start_segment(task.segment)
                if self.cut is not None:
                    return
            self._merge_chunk(segment, chunk)
            if self.cut is not None:
                return
            done += task.stop - task.start
            if task.last:
                done += fmt.SEGMENT_HEADER_SIZE
                self._finish_segment(segment)
            if self.progress:
                self.progress(min(done, total), total)

    def _start_segment(self, k: int) -> _Segment:
        base, size = self.listing.bases[k], self.listing.sizes[k]
        segment = _Segment(k, base, segment_path(self.directory, base), size)
        self.segments.append(segment)
        newest = k == len(self.listing.bases) - 1
        reason = _segment_header_reason(segment.path, base, size)
        if reason is None and base != self.position:
            reason = f"segment starts at position {base}, but the log before it ends at" \
                     f" {self.position}"
        if reason is not None:
            self.cut = (k, 0)
            damage = TornTail if newest and size <= fmt.SEGMENT_HEADER_SIZE else BadSegment
            self.report.problems.append(damage(segment.path, 0, reason, size))
        return segment

    def _merge_chunk(self, segment: _Segment, chunk: _Chunk) -> None:
        bad = self._merge_streams(chunk)
        framing = False
        if bad is not None:
            # The chunk's records before ``bad`` are good: redo them inline so that the
            # stream table stops exactly there.
            redo = _verify_chunk(replace(chunk.task, stop=bad[0], last=False, pidx=None,
                                         sidx=None, sidx_locs=None))
            again = self._merge_streams(redo)  # creates nothing twice: it is idempotent
            assert redo.bad is None and again is None, (redo.bad, again)
            chunk = redo
        elif chunk.bad is not None:
            bad, framing = chunk.bad, chunk.bad_is_framing
        segment.add(chunk)
        self.position += chunk.events
        for sid, number in chunk.next_number.items():
            self.next_number[sid] = number
        if bad is not None:
            self._damage(segment, bad[0], bad[1], framing)

    def _merge_streams(self, chunk: _Chunk) -> tuple[int, str] | None:
        """Check a chunk's first record of each stream against the log before it, and
        create the streams it starts; return (offset, reason) of the first that fails."""
        if chunk.events and chunk.first_position != self.position:
            return (chunk.rec_offset[0], f"record has position {chunk.first_position},"
                    f" expected {self.position}")
        names, ids = self.names, self.ids
        for offset, sid, name, number, position in chunk.appear:
            if sid < len(names):
                if names[sid] != name:
                    return (offset, f"stream id {sid} is named {names[sid]!r},"
                            f" the record says {name!r}")
                if number != self.next_number[sid]:
                    return (offset, f"event number {number} of stream {name!r},"
                            f" expected {self.next_number[sid]}")
            elif sid > len(names):
                return (offset, f"stream id {sid} skips ids (the next new id is"
                        f" {len(names)})")
            elif name in ids:
                return (offset, f"stream {name!r} created twice, with ids {ids[name]}"
                        f" and {sid}")
            elif number != 0:
                return (offset, f"stream {name!r} starts at event number {number}, not 0")
            elif (reason := _stream_name_reason(name)) is not None:
                return (offset, reason)
            else:
                ids[name] = sid
                names.append(name)
                self.next_number.append(0)
                self.first_position.append(position)
        return None

    def _damage(self, segment: _Segment, offset: int, reason: str, framing: bool) -> None:
        """Record the cut at ``offset``: a torn tail or damage."""
        self.cut = (segment.k, offset)
        newest = segment.k == len(self.listing.bases) - 1
        torn = False
        if framing and newest:
            with open(segment.path, "rb") as handle:
                buf = mmap.mmap(handle.fileno(), segment.size, prot=mmap.PROT_READ)
            try:
                # As the engine's open does: only a record the log wrote after the bad
                # one (position past it) makes this damage rather than a torn tail.
                after = segment.base + segment.events_before(offset) + 1
                torn = valid_record_after(buf, offset, segment.size,
                                          min_position=after) is None
            finally:
                close_map(buf)
            covered = self._checkpoint_size(segment.k)
            if torn and covered is not None and covered > offset:
                torn = False
                reason += f" (the checkpoint says the first {covered} bytes were complete)"
        damage = TornTail if torn else DamagedRecord
        self.report.problems.append(damage(segment.path, offset, reason, segment.size))
        if self.checkpoint is not None and segment.k < len(self.checkpoint.segments):
            self._check_checkpoint_segment(segment)

    # -- derived files ----------------------------------------------------------------

    def _finish_segment(self, segment: _Segment) -> None:
        """All records of ``segment`` are good: judge its index files and checkpoint entry
        (the workers compared the entries; here are the sizes and the verdicts)."""
        newest = segment.k == len(self.listing.bases) - 1
        expected = segment.events * ENTRY_SIZE
        pidx = position_index_path(self.directory, segment.base)
        size = _size_or_none(pidx)
        problem = _index_size_problem(pidx, size, expected, may_be_short=newest)
        if problem is None and segment.pidx_bad is not None:
            problem = _entry_problem(pidx, segment.pidx_bad)
        if problem is not None:
            self.report.problems.append(problem)
        else:
            segment.pidx_good = size // ENTRY_SIZE
            if size < expected:
                self.report.notes.append(
                    f"{pidx.name}: holds {size // ENTRY_SIZE} of the newest segment's"
                    f" {segment.events} entries (it is flushed at checkpoints; the engine"
                    " adds the rest on open)")
        if not newest:
            sidx = stream_index_path(self.directory, segment.base)
            problem = _index_size_problem(sidx, _size_or_none(sidx), expected, False)
            if problem is None and segment.sidx_bad is not None:
                problem = _entry_problem(sidx, segment.sidx_bad)
            if problem is not None:
                self.report.problems.append(problem)
            else:
                segment.sidx_good = True
        if self.checkpoint is not None and segment.k < len(self.checkpoint.segments):
            self._check_checkpoint_segment(segment)

    def _check_orphan_indexes(self) -> None:
        bases = set(self.listing.bases)
        for base, name in self.listing.index_files:
            if base not in bases:
                self.report.problems.append(IndexProblem(
                    self.directory / name, None, "index file of a segment that does not"
                    " exist"))

    # -- the checkpoint ---------------------------------------------------------------

    def _read_checkpoint(self) -> None:
        path = checkpoint_path(self.directory)
        if not self.listing.has_checkpoint:
            if self.listing.bases:
                self.report.notes.append("no checkpoint: the engine rebuilds its state from"
                                         " the log on open")
            return
        try:
            checkpoint = ckpt.read(self.directory)
        except CorruptIndex as exc:
            self.report.problems.append(CheckpointProblem(path, None, exc.reason))
            return
        except (OSError, ValueError) as exc:
            self.report.problems.append(CheckpointProblem(path, None, f"unreadable: {exc}"))
            return
        if checkpoint is None:
            return
        listed = [s.base_position for s in checkpoint.segments]
        if not listed or listed != self.listing.bases[:len(listed)]:
            self.report.problems.append(CheckpointProblem(
                path, None, f"lists segments starting at {listed[:4]}, the directory has"
                f" {self.listing.bases[:4]}"))
            return
        self.checkpoint = checkpoint

    def _checkpoint_size(self, k: int) -> int | None:
        if self.checkpoint is None or k >= len(self.checkpoint.segments):
            return None
        return self.checkpoint.segments[k].size

    def _check_checkpoint_segment(self, segment: _Segment) -> None:
        """Check what the checkpoint says about one segment it lists."""
        assert self.checkpoint is not None
        state = self.checkpoint.segments[segment.k]
        path = checkpoint_path(self.directory)
        name = segment.path.name
        last_listed = segment.k == len(self.checkpoint.segments) - 1
        problems = self.report.problems

        def wrong(reason: str) -> None:
            problems.append(CheckpointProblem(path, None, f"{name}: {reason}"))

        if state.size > segment.end:
            if self.cut is None or self.cut[0] != segment.k:
                wrong(f"covers {state.size} bytes, the segment has {segment.end}: events"
                      " it counted are missing from the log")
            return  # it covers bytes the repair removes; it is deleted with them
        if not last_listed and state.size != segment.size:
            wrong(f"says the sealed segment is {state.size} bytes, it is {segment.size}")
            return
        if state.size != segment.end and not _is_boundary(segment.rec_offset, state.size):
            wrong(f"covers up to offset {state.size}, which is not a record boundary")
            return
        count = segment.events_before(state.size)
        if state.event_count != count:
            wrong(f"says {state.event_count} events up to offset {state.size}, the log has"
                  f" {count}")
        with open(segment.path, "rb") as handle:
            buf = mmap.mmap(handle.fileno(), segment.size, prot=mmap.PROT_READ)
        try:
            with memoryview(buf) as view, view[:state.size] as prefix:
                digest = fmt.checksum(prefix)
        finally:
            close_map(buf)
        if digest != state.segment_hash:
            wrong(f"segment_hash does not match the segment's first {state.size} bytes")
        if segment.pidx_good is not None:
            pidx = position_index_path(self.directory, segment.base)
            if segment.pidx_good < count:
                wrong(f"counts {count} entries in {pidx.name}, which holds"
                      f" {segment.pidx_good}")
            elif _file_hash(pidx, count * ENTRY_SIZE) != state.pidx_hash:
                wrong(f"pidx_hash does not match {pidx.name}")
        if segment.sidx_good and state.sidx_hash and state.size == segment.size:
            sidx = stream_index_path(self.directory, segment.base)
            if _file_hash(sidx, segment.events * ENTRY_SIZE) != state.sidx_hash:
                wrong(f"sidx_hash does not match {sidx.name}")

    def _check_checkpoint_streams(self) -> None:
        """Compare the checkpoint's stream table with the log at the point it covers."""
        checkpoint = self.checkpoint
        assert checkpoint is not None
        k = len(checkpoint.segments) - 1
        state = checkpoint.segments[k]
        if k >= len(self.segments) or (self.cut is not None and (self.cut[0] < k or (
                self.cut[0] == k and self.cut[1] < state.size))):
            return  # it claims log that the repair removes: it is deleted with it
        segment = self.segments[k]
        if state.size > segment.end:
            return  # reported by _check_checkpoint_segment
        point = segment.base + segment.events_before(state.size)
        streams = bisect_left(self.first_position, point)
        next_number = array("Q", self.next_number[:streams])
        for later in reversed(self.segments[k:]):
            for i in range(len(later.rec_pos) - 1, -1, -1):
                if later.rec_pos[i] < point:
                    break
                sid = later.rec_sid[i]
                if sid < streams:
                    next_number[sid] = later.rec_first[i]
        path = checkpoint_path(self.directory)
        if point < self.position:
            self.report.notes.append(
                f"checkpoint covers the log up to position {point} of {self.position}"
                " (the server stopped without a clean close); the engine rescans the rest"
                " on open")
        if len(checkpoint.names) != streams:
            self.report.problems.append(CheckpointProblem(
                path, None, f"lists {len(checkpoint.names)} streams, the log has {streams}"
                f" before position {point}"))
            return
        for column, ours, what in ((checkpoint.names, self.names[:streams], "name"),
                                   (checkpoint.next_number, next_number, "event count"),
                                   (checkpoint.first_position, self.first_position[:streams],
                                    "first position")):
            if list(column) != list(ours):
                sid = next(i for i, (a, b) in enumerate(zip(column, ours)) if a != b)
                self.report.problems.append(CheckpointProblem(
                    path, None, f"stream {sid} has {what} {column[sid]!r} in the checkpoint,"
                    f" {ours[sid]!r} in the log"))
                return

    # -- what a repair removes --------------------------------------------------------

    def _describe_removal(self) -> None:
        assert self.cut is not None
        k, offset = self.cut
        removal = Removal()
        ranges: dict[bytes, EventRange] = {}
        for j in range(k, len(self.listing.bases)):
            base, size = self.listing.bases[j], self.listing.sizes[j]
            path = segment_path(self.directory, base)
            start = offset if j == k else 0
            if start == 0:
                removal.delete.append((path, size))
            else:
                removal.truncate.append((path, start, size - start))
            at = max(start, fmt.SEGMENT_HEADER_SIZE)
            if size <= at:
                continue
            with open(path, "rb") as handle:
                buf = mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ)
            try:
                removal.undecodable_bytes += _decode_removed(buf, at, size, ranges)
            finally:
                close_map(buf)
        removal.events = list(ranges.values())
        self.report.removal = removal


def _decode_removed(buf, at: int, end: int, ranges: dict[bytes, EventRange]) -> int:
    """Add the events of records in ``buf[at:end]`` to ``ranges``; return the bytes
    that no record header accounts for (a damaged record's header still names its
    events, marked unverified)."""
    undecodable = 0
    while at < end:
        record = check_record(buf, at, end)
        if not isinstance(record, BadRecord):
            header = record.header
            _add_range(ranges, record.stream, header.first_number, header.count, True)
            at = record.end
            continue
        claimed = _claimed_events(buf, at, end)
        if claimed is not None:
            _add_range(ranges, *claimed, False)
        after = valid_record_after(buf, at, end)
        stop = end if after is None else after
        if claimed is None:
            undecodable += stop - at
        at = stop
    return undecodable


def _claimed_events(buf, at: int, end: int) -> tuple[bytes, int, int] | None:
    """(stream, first number, count) that the header at ``at`` claims, if it is plausible."""
    if end - at < fmt.RECORD_HEADER_SIZE:
        return None
    header = fmt.decode_record_header(buf, at)
    name_at = at + fmt.RECORD_HEADER_SIZE
    if header.magic != fmt.RECORD_MAGIC or not 1 <= header.stream_name_length <= 255 or \
            name_at + header.stream_name_length > end or not 1 <= header.count <= 1 << 24:
        return None
    name = bytes(buf[name_at:name_at + header.stream_name_length])
    try:
        check_stream_name(name)
    except InvalidArgument:
        return None
    return name, header.first_number, header.count


def _add_range(ranges: dict[bytes, EventRange], stream: bytes, first: int, count: int,
               verified: bool) -> None:
    last = first + count - 1
    known = ranges.get(stream)
    if known is None:
        ranges[stream] = EventRange(stream, first, last, verified)
    else:
        known.first = min(known.first, first)
        known.last = max(known.last, last)
        known.verified = known.verified and verified


# -- helpers ------------------------------------------------------------------------------


def _start_pool(workers: int):
    """A pool of forked workers, or None: one core, a small log, or no way to fork one
    (no /dev/shm for its semaphores, a platform without fork): then fsck runs inline."""
    if workers < 2:
        return None
    try:
        return multiprocessing.get_context("fork").Pool(workers)
    except (OSError, ImportError, ValueError):
        return None


def _worker_count(total_bytes: int) -> int:
    if total_bytes < PARALLEL_MIN_BYTES:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, total_bytes // CHUNK_BYTES + 1))


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
        return f"stream name {name!r} {exc.reason}"
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


# -- repair --------------------------------------------------------------------------------


def _remove(directory: Path, report: FsckReport) -> None:
    """Delete the derived files, then cut the log (the caller holds the lock).

    The checkpoint goes first, so that an interrupted repair never leaves one that
    claims log which is gone; the engine rebuilds whatever is missing.
    """
    repair = report.repair
    assert repair is not None
    for name in [CHECKPOINT_NAME] + sorted(
            name for name in os.listdir(directory)
            if name.endswith((POSITION_INDEX_SUFFIX, STREAM_INDEX_SUFFIX))
            and _INDEX_FILE.match(name)):
        try:
            os.unlink(directory / name)
        except FileNotFoundError:
            continue
        repair.deleted_derived.append(name)
    fsync_directory(directory)
    removal = report.removal
    if removal is None:
        return
    for path, _size_ in reversed(removal.delete):
        os.unlink(path)
    for path, new_size, _removed in removal.truncate:
        fd = os.open(path, os.O_RDWR)
        try:
            os.ftruncate(fd, new_size)
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_directory(directory)
    repair.removed = removal


def _rebuild(directory: Path, repair: RepairResult) -> None:
    """Open and close the engine: it rebuilds every index file and the checkpoint."""
    from .log import Engine  # the engine is only needed to repair

    try:
        engine = Engine.open(directory)
    except DirectoryLocked as exc:
        repair.error = f"log cut, but the rebuild could not start: {exc}"
        return
    except (EngineError, OSError) as exc:
        repair.error = f"log cut, but the engine still refuses to open it: {exc}"
        return
    try:
        report = engine.open_report
        repair.rebuilt = list(report.rebuilt_indexes or [])
        for recovered in report.recovered or []:
            repair.rebuilt.append(f"{recovered.path.name}: the engine truncated"
                                  f" {recovered.truncated_bytes} more bytes ({recovered.reason})")
    finally:
        engine.close()
