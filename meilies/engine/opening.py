"""Opening a data directory: adopting what the checkpoint vouches for, scanning the rest.

Sealed segments that the checkpoint describes are adopted after a hash check (their
index files rebuilt if missing or damaged); the rest of the log (the active segment's
tail after the checkpoint, or everything without one) is scanned record by record
(recovery.py tells a torn tail, which is truncated and reported, from damage, which
refuses the open naming file and offset), rebuilding the stream table and the indexes.

A mixin of :class:`~meilies.engine.log.Engine`, split out so that opening is one file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint as ckpt
from . import format as fmt
from .errors import CorruptIndex, CorruptRecord, CorruptSegment, StorageError
from .files import list_segments, position_index_path, segment_path, stream_index_path
from .ids import IdIndex
from .index import ENTRY_SIZE, ActiveIndex, sorted_stream_index, write_file
from .reads import stored_ids
from .names import quoted
from .recovery import BadRecord, RecoveryReport, ScannedRecord, iter_records, valid_record_after
from .segment import Segment
from .streams import StreamTable

log = logging.getLogger("meilies.engine")


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


class Opening:
    """Recovering the engine's state from the directory (see the module docstring)."""

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
        renewed = self._renew_empty_older_segment(active)
        active = self.segments[-1]
        self._next_position = self._visible_position = self._durable_position = position
        self._durable_size = active.size
        self.streams.all_visible()
        added_ids = self._open_ids(position)
        report.segments = len(self.segments)
        report.streams = len(self.streams)
        report.events = position
        if (report.scanned_bytes or report.rebuilt_indexes or report.recovered or sealed_here
                or not report.used_checkpoint or added_ids or renewed):
            try:
                self.checkpoint()
            except StorageError as exc:  # derived data: the next open scans again
                log.warning("could not write a checkpoint after opening: %s", exc)
        report.seconds = time.monotonic() - started

    def _renew_empty_older_segment(self, active: Segment) -> bool:
        """An active segment of an older format version that holds no record is made
        anew in the newest version: writes with ids or transactions need it, and a
        roll cannot replace an empty segment (the next one would have its base).
        Returns whether it was (the checkpoint must then describe the new one)."""
        if active.version == fmt.FORMAT_VERSION or active.size > fmt.SEGMENT_HEADER_SIZE:
            return False
        base = active.base_position
        active.close()
        active.path.unlink()
        position_index_path(self.directory, base).unlink(missing_ok=True)
        log.info("%s: the active segment is empty and of format version %d; made anew in"
                 " version %d", active.path.name, active.version, fmt.FORMAT_VERSION)
        self.segments[-1] = Segment.create(self.directory, base)
        return True

    def _open_ids(self, end: int) -> int:
        """Open the id index and add the ids of the log after what it covers (all of
        them if it had to be rebuilt); return how many were added."""
        started = time.monotonic()
        self.ids = IdIndex.open(self.directory, self.id_index_bits)
        if self.ids.covered > end:  # the log was cut back (fsck --repair): start over
            log.warning("the id index covers position %d, past the log's end %d; rebuilding"
                        " it from the log", self.ids.covered, end)
            self.ids.reset()
        start = self.ids.covered
        if start == 0 and end > 0:
            log.info("building the id index from the log (%d events)", end)
        added = 0
        ids = self.ids
        for event_id, position in stored_ids(self, start):
            # Built anew (start 0): nothing to find. Caught up: the tables may have
            # the ids after ``covered`` already (written before the crash).
            if start == 0 or position not in ids.candidates(event_id):
                ids.add(event_id, position)
                added += 1
        if start == 0 and end > 0:
            log.info("id index built: %d ids in %.1f s", added, time.monotonic() - started)
        return added

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
        # The records of a transaction whose last record is not read yet (format 4:
        # every one but the last is flagged CONTINUED): applied once it is.
        unfinished: list[ScannedRecord] = []
        for record in iter_records(buf, start, file_size, version=segment.version):
            if isinstance(record, BadRecord):
                offset = record.offset
                after = position + sum(r.header.count for r in unfinished) + 1
                if last and offset >= covered and \
                        valid_record_after(buf, offset, file_size, min_position=after,
                                           version=segment.version) is None:
                    break
                raise CorruptRecord(segment.path, offset, record.reason)
            offset = record.end
            if record.header.flags & fmt.FLAG_CONTINUED:
                unfinished.append(record)
                continue
            for done in unfinished + [record]:
                self._apply_record(segment, done, position, apply=done.offset >= covered)
                position += done.header.count
            unfinished = []
        torn_transaction = bool(unfinished)
        if unfinished:
            if not last:
                raise CorruptRecord(segment.path, unfinished[0].offset,
                                    "a transaction runs to the end of a sealed segment")
            # A crash cut the transaction short: none of it stays (all or none).
            offset = unfinished[0].offset
        del buf
        # Opened for writing: to truncate a torn tail, and to fdatasync what was scanned.
        # The bytes written since the last checkpoint may exist only in the page cache
        # (a process crash under fsync "no"); the checkpoint written after opening will
        # vouch for them, so they must be durable first, or a power loss later would
        # make that checkpoint disagree with the log.
        segment.activate()
        if offset < file_size:
            dropped = file_size - offset
            what = ("a transaction cut short at the tail" if torn_transaction
                    else "torn record at the tail")
            log.warning("%s: truncating %s: %d bytes at offset %d dropped",
                        segment.path.name, what, dropped, offset)
            segment.truncate_to(offset)
            self.open_report.recovered.append(RecoveryReport(segment.path, offset, dropped,
                                                             what))
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
