"""The verifier: plans chunks, merges their summaries per segment and per stream, and
checks the derived files and the checkpoint against the log.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import time
from array import array
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import checkpoint as ckpt
from .. import format as fmt
from ..errors import BadFrameCopy, CorruptIndex
from ..files import (FRAME_COPY_SUFFIX, checkpoint_path, frame_copy_path, id_state_path, position_index_path,
                     segment_path, stream_index_path)
from ..framecopy import SealedCopy
from ..ids import IdIndex, tag_of
from ..index import ENTRY_SIZE, close_map
from ..names import quoted
from ..recovery import BadRecord, check_record, claimed_header, valid_record_after
from .chunks import (
    _build_counting,
    _Chunk,
    _entry_problem,
    _file_hash,
    _index_size_problem,
    _is_boundary,
    _segment_header_reason,
    segment_version,
    _sidx_locations,
    _size,
    _size_or_none,
    _stream_name_reason,
    _Task,
    _verify_chunk,
    _walk_headers,
)
from .directory import _Listing
from .report import (
    BadSegment,
    CheckpointProblem,
    DamagedRecord,
    EventRange,
    ForeignFileProblem,
    FsckReport,
    DuplicateId,
    IdIndexProblem,
    IndexProblem,
    Progress,
    Removal,
    TornTail,
)

#: Records are verified in chunks of about this many bytes, cut at record boundaries:
#: small enough to spread a 64 MiB segment over the cores and move the progress bar,
#: large enough that a chunk's fixed cost (a map, a pickled summary) is noise.
CHUNK_BYTES = 4 * 1024 * 1024


#: Below this much log, forking workers costs more than it saves (~10 ms per fork).
PARALLEL_MIN_BYTES = 16 * 1024 * 1024


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
        self._check_ids_and_transactions()
        self._check_orphan_indexes()
        if self.checkpoint is not None:
            self._check_checkpoint_streams()
        report.streams = len(self.names)
        report.events = self.position
        report.index_bytes = sum(_size(self.directory / name)
                                 for _b, name in listing.index_files
                                 if not name.endswith(FRAME_COPY_SUFFIX))
        report.frame_copy_bytes = sum(_size(self.directory / name)
                                      for _b, name in listing.index_files
                                      if name.endswith(FRAME_COPY_SUFFIX))
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
        version = segment_version(path)
        tasks = []
        first = 0  # record index where the current chunk starts
        start = fmt.SEGMENT_HEADER_SIZE
        for i, offset in enumerate(offsets):
            if offset - start >= CHUNK_BYTES:
                tasks.append(_Task(k, base, path, size, start, offset, False, pidx_arg,
                                   sidx_arg, locs[first:i] if locs else None, version))
                start, first = offset, i
        tasks.append(_Task(k, base, path, size, start, size, True, pidx_arg, sidx_arg,
                           locs[first:] if locs else None, version))
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
                    return (offset, f"stream id {sid} is named {quoted(names[sid])},"
                            f" the record says {quoted(name)}")
                if number != self.next_number[sid]:
                    return (offset, f"event number {number} of stream {quoted(name)},"
                            f" expected {self.next_number[sid]}")
            elif sid > len(names):
                return (offset, f"stream id {sid} skips ids (the next new id is"
                        f" {len(names)})")
            elif name in ids:
                return (offset, f"stream {quoted(name)} created twice, with ids {ids[name]}"
                        f" and {sid}")
            elif number != 0:
                return (offset, f"stream {quoted(name)} starts at event number {number}, not 0")
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
                torn = valid_record_after(buf, offset, segment.size, min_position=after,
                                          version=segment_version(segment.path)) is None
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

    # -- ids and transactions (format 4) -----------------------------------------------

    def _check_ids_and_transactions(self) -> None:
        """Every event id once in the log, and in the id index below the position it
        covers; no transaction cut short (its records flagged CONTINUED to the end of
        the log: the engine drops them on open, so fsck calls them a torn tail).

        Reads the good part of the log's record headers and extras only. Ids are held
        as 64-bit hashes (about 100 bytes each in memory: fine to tens of millions);
        two equal hashes are told apart by a second pass that reads those ids only."""
        index = IdIndex.open(self.directory, readonly=True)
        try:
            hashes: dict[int, int] = {}
            suspects: list[int] = []
            missing: list[tuple[bytes, int]] = []
            unfinished: tuple[_Segment, int] | None = None
            for segment, at, header, raw in self._walk_records():
                if header.flags & fmt.FLAG_CONTINUED:
                    if unfinished is None or unfinished[0] is not segment:
                        unfinished = (segment, at)
                else:
                    unfinished = None
                for i, extras in enumerate(raw):
                    event_id = fmt.decode_extras(extras)[0]
                    if event_id is None:
                        continue
                    position = header.base_position + i
                    tag = tag_of(event_id)
                    if hashes.setdefault(tag, position) != position:
                        suspects.append(tag)
                    if position < index.covered and position not in index.candidates(event_id):
                        missing.append((event_id, position))
            if suspects:
                self._report_duplicates(set(suspects))
            if missing:
                event_id, position = missing[0]
                self.report.problems.append(IdIndexProblem(
                    id_state_path(self.directory), None,
                    f"{len(missing)} ids stored below position {index.covered} (which the"
                    f" index says it covers) are not in it, the first"
                    f" {quoted(event_id)} at position {position}"))
            if unfinished is not None:
                segment, at = unfinished
                newest = segment.k == len(self.listing.bases) - 1
                torn = [p for p in self.report.problems if isinstance(p, TornTail)
                        and p.path == segment.path and p.offset == segment.end]
                if newest and (self.cut is None or torn):
                    # Its last record missing or torn: the whole transaction goes.
                    for problem in torn:
                        self.report.problems.remove(problem)
                    self.cut = (segment.k, at)
                    self.report.problems.append(TornTail(
                        segment.path, at, "a transaction cut short: its last record is"
                        " missing or torn (the engine drops all of it on open)",
                        segment.size))
                    self._describe_removal()
                elif self.cut is None:
                    self.report.problems.append(DamagedRecord(
                        segment.path, at, "a transaction runs to the end of a sealed"
                        " segment", segment.size))
        finally:
            index.close()

    def _walk_records(self) -> Iterator[tuple[_Segment, int, fmt.RecordHeader, list[bytes]]]:
        """(segment, offset, header, each event's extras) of every good record in log
        order (up to the cut, if any)."""
        for segment in self.segments:
            if segment.end <= fmt.SEGMENT_HEADER_SIZE:
                continue
            with open(segment.path, "rb") as handle:
                buf = mmap.mmap(handle.fileno(), segment.end, prot=mmap.PROT_READ)
            try:
                at = fmt.SEGMENT_HEADER_SIZE
                while at < segment.end:
                    header = fmt.decode_record_header(buf, at)
                    raw = fmt.record_extras(buf, at, header) if header.extras_length else ()
                    yield segment, at, header, raw
                    at += header.size
            finally:
                close_map(buf)

    def _report_duplicates(self, suspects: set[int]) -> None:
        """The second pass: ids whose hashes met twice, read for real."""
        seen: dict[bytes, tuple[_Segment, int]] = {}
        for segment, _at, header, raw in self._walk_records():
            for i, extras in enumerate(raw):
                event_id = fmt.decode_extras(extras)[0]
                if event_id is None or tag_of(event_id) not in suspects:
                    continue
                position = header.base_position + i
                first = seen.setdefault(event_id, (segment, position))
                if first[1] != position:
                    self.report.problems.append(DuplicateId(
                        segment.path, None, f"event id {quoted(event_id)} is stored at"
                        f" positions {first[1]} and {position}"))

    # -- derived files ----------------------------------------------------------------

    def _finish_segment(self, segment: _Segment) -> None:
        """All records of ``segment`` are good: judge its index files and checkpoint entry
        (the workers compared the entries; here are the sizes and the verdicts)."""
        count = len(self.listing.bases)
        newest = segment.k == count - 1
        # A crash in the middle of a roll (the next segment created, holding only its
        # header; this one not yet sealed, or the next one's .pidx not yet written by
        # the checkpoint that follows) leaves derived files behind the log, which the
        # engine completes on open: a note, not a problem.
        mid_roll = count >= 2 and self.listing.sizes[-1] <= fmt.SEGMENT_HEADER_SIZE and \
            segment.k >= count - 2
        expected = segment.events * ENTRY_SIZE
        pidx = position_index_path(self.directory, segment.base)
        size = _size_or_none(pidx)
        sidx = stream_index_path(self.directory, segment.base)
        if mid_roll and (size is None or size < expected) and \
                (newest or _size_or_none(sidx) is None):
            what = "missing" if size is None else \
                f"holds {size // ENTRY_SIZE} of the segment's {segment.events} entries"
            self.report.notes.append(
                f"{pidx.name}: {what}{'' if newest else f', and {sidx.name} is missing'}:"
                " the server stopped in the middle of a segment roll; the engine writes"
                " them on open")
            if self.checkpoint is not None and segment.k < len(self.checkpoint.segments):
                self._check_checkpoint_segment(segment)
            return
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
            if segment.pidx_good is not None:
                self._check_frame_copy(segment)
        if self.checkpoint is not None and segment.k < len(self.checkpoint.segments):
            self._check_checkpoint_segment(segment)

    def _check_frame_copy(self, segment: _Segment) -> None:
        """A sealed segment's frame copy (framecopy.py), if it has one: this segment's,
        whole, and frame for frame the log's (its .pidx was found to match the log)."""
        path = frame_copy_path(self.directory, segment.base)
        if not path.exists():
            return
        with open(segment.path, "rb") as handle:
            buf = mmap.mmap(handle.fileno(), segment.size, prot=mmap.PROT_READ)
        try:
            with memoryview(buf) as view:
                digest = fmt.checksum(view)
            copy = SealedCopy.open(path, segment.base, segment.events, segment.size, digest)
            try:
                with open(position_index_path(self.directory, segment.base), "rb") as pidx:
                    copy.verify(buf, pidx.read(segment.events * ENTRY_SIZE))
            finally:
                copy.close()
        except BadFrameCopy as exc:
            self.report.problems.append(IndexProblem(path, None, f"frame copy: {exc.reason}"))
        finally:
            close_map(buf)

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
        torn = any(isinstance(p, TornTail) for p in self.report.problems)
        for j in range(k, len(self.listing.bases)):
            base, size = self.listing.bases[j], self.listing.sizes[j]
            path = segment_path(self.directory, base)
            start = offset if j == k else 0
            at = max(start, fmt.SEGMENT_HEADER_SIZE)
            with open(path, "rb") as handle:
                buf = mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ) if size else b""
            try:
                if j == k and start and not torn and size > at:
                    start, at = self._keep_whole_events(removal, ranges, path, buf, at, size)
                if start == 0:
                    removal.delete.append((path, size))
                else:
                    removal.truncate.append((path, start, size - start))
                if size > at:
                    removal.undecodable_bytes += _decode_removed(buf, at, size, ranges)
            finally:
                if size:
                    close_map(buf)
        removal.events = list(ranges.values())
        removal.cut, removal.torn = self.cut, torn
        self.report.removal = removal

    @staticmethod
    def _keep_whole_events(removal: Removal, ranges: dict[bytes, EventRange], path: Path,
                           buf, at: int, size: int) -> tuple[int, int]:
        """If the record at the cut is one whose first events are whole (format 3: its
        header and lengths check, a later frame does not), plan to write it back with
        only those; return (the size the segment is cut to, where the removed records
        start). Damage costs the damaged event and what follows it, not the acknowledged
        events stored before it in the same record (a pipelined run of publishes).
        A torn tail is never shortened: the write it belonged to was never
        acknowledged, and an ``append`` is stored whole or not at all."""
        bad = check_record(buf, at, size, deep=True, version=segment_version(path))
        if not isinstance(bad, BadRecord) or not bad.event:
            return at, at
        header = bad.header
        shortened = fmt.shortened_record(buf, at, header, bad.event)
        kept = EventRange(bad.stream, header.first_number,
                          header.first_number + bad.event - 1)
        removal.rewrite = (path, at, shortened, kept)
        _add_range(ranges, bad.stream, header.first_number + bad.event,
                   header.count - bad.event, False)
        return at + len(shortened), at + header.size


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
    claimed = claimed_header(buf, at, end)
    if claimed is None:
        return None
    header, name = claimed
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
