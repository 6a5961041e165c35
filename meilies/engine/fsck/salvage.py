"""Salvage (``meilies-fsck --repair --salvage``): keep every record after the damage, and
put a placeholder where an event cannot be trusted, so that numbering stays contiguous.

``--repair`` alone cuts the log at the first damage, which in an old segment can be
gigabytes of good events. Salvage instead rewrites the log from the cut on:

* a record whose header and lengths check (format 3) keeps every frame that passes its
  check; each frame that fails becomes a placeholder: the same stream, number and
  position, event name ``$damaged``, empty data;
* where a record's header cannot be trusted, the walk resynchronises on the next record
  whose header and checksum are valid and that the log wrote later (its position past
  the lost one), as LevelDB's log reader does, and the byte span in between is reported
  lost. The positions that span held get placeholders: first the events its header
  still names, where that header is consistent with the log (stream, next number, its
  position); the rest go to the streams whose next records show numbers missing, one
  stream after the other in stream-id order (the true interleaving is lost with the
  span: said so in the report). If the log after the span does not account for every
  lost position, salvage stops without changing anything and says so: a plain
  ``--repair`` cuts there instead;
* a torn tail at the end of the newest segment (a write never acknowledged) is dropped,
  as the engine drops it.

A reader of a salvaged directory sees the placeholder instead of a gap. Segments are
rewritten through ``<segment>.tmp`` and an atomic rename, after the derived files are
deleted, so that an interrupted salvage leaves either the old segment or the new one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import takewhile
from pathlib import Path

from .. import format as fmt
from ..files import TEMP_SUFFIX, fsync_directory, segment_path
from ..names import quoted
from ..reads import event_at
from ..recovery import (BadRecord, ScannedRecord, _frame_matches, check_record,
                        claimed_header, iter_records, record_framing, valid_record_after)
from .chunks import segment_version

#: The event name of a placeholder.
PLACEHOLDER_NAME = b"$damaged"


@dataclass
class Replaced:
    """Events ``first`` .. ``last`` of a stream replaced by placeholders, at global
    positions ``position`` .. ``position + last - first``."""

    stream: bytes
    first: int
    last: int
    position: int
    why: str

    def describe(self) -> str:
        what = f"event {self.first}" if self.first == self.last else \
            f"events {self.first}..{self.last}"
        where = f"position {self.position}" if self.first == self.last else \
            f"positions {self.position}..{self.position + self.last - self.first}"
        return f"{what} of stream {quoted(self.stream)} ({where}): {self.why}"

    def to_dict(self) -> dict:
        return {"stream": self.stream.decode("utf-8", "replace"), "first": self.first,
                "last": self.last, "count": self.last - self.first + 1,
                "position": self.position, "why": self.why}


@dataclass
class SalvageResult:
    """What a salvage replaced, lost and rewrote; ``error`` if it could not be done."""

    replaced: list[Replaced] = field(default_factory=list)
    #: (segment, start, end): bytes no record could be read from.
    lost: list[tuple[Path, int, int]] = field(default_factory=list)
    #: A torn tail dropped at the end of the log: (segment, offset, bytes).
    torn: tuple[Path, int, int] | None = None
    rewritten: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def replaced_count(self) -> int:
        return sum(r.last - r.first + 1 for r in self.replaced)

    def to_dict(self) -> dict:
        return {"replaced": [r.to_dict() for r in self.replaced],
                "replaced_count": self.replaced_count,
                "lost": [{"file": p.name, "start": a, "end": b, "bytes": b - a}
                         for p, a, b in self.lost],
                "torn": None if self.torn is None else {
                    "file": self.torn[0].name, "offset": self.torn[1], "bytes": self.torn[2]},
                "rewritten": self.rewritten, "notes": self.notes, "error": self.error}


class SalvageRefused(Exception):
    """The log after the damage does not say what was lost: nothing is changed."""


@dataclass
class _Claim:
    """What an untrusted record header says of its events, when it agrees with the log."""

    stream: bytes
    sid: int
    first: int
    count: int
    timestamp_ms: int


class _Salvager:
    def __init__(self, directory: Path, bases: list[int], cut: tuple[int, int],
                 cut_is_torn: bool) -> None:
        self.directory = directory
        self.bases = bases
        self.cut = cut
        self.cut_is_torn = cut_is_torn
        #: What the header at the start of the current lost span names, if trusted.
        self.claim: _Claim | None = None
        self.result = SalvageResult()
        self.names: list[bytes] = []
        self.ids: dict[bytes, int] = {}
        self.next_number: list[int] = []
        self.position = 0
        self.timestamp_ms = 0

    # -- the log before the cut: the state the rest must agree with -------------------------

    def _learn(self, record: ScannedRecord) -> None:
        header = record.header
        sid = header.stream_id
        if sid == len(self.names):
            self.names.append(record.stream)
            self.ids[record.stream] = sid
            self.next_number.append(0)
        self.next_number[sid] = header.first_number + header.count
        self.position = header.base_position + header.count
        self.timestamp_ms = header.timestamp_ms

    def _consistent(self, header: fmt.RecordHeader, stream: bytes) -> bool:
        """Whether a record (trusted or claimed) continues the log as it stands."""
        sid = header.stream_id
        if header.base_position != self.position:
            return False
        if sid < len(self.names):
            return self.names[sid] == stream and header.first_number == self.next_number[sid]
        return sid == len(self.names) and stream not in self.ids and header.first_number == 0

    def run(self) -> tuple[SalvageResult, list[tuple[Path, bytes]]]:
        k, cut = self.cut
        if cut < fmt.SEGMENT_HEADER_SIZE:
            raise SalvageRefused(
                f"{segment_path(self.directory, self.bases[k]).name}: the damage is its"
                " segment header (or a segment before it is missing); salvage keeps"
                " segments whose header is whole")
        outputs: list[tuple[Path, bytes]] = []
        for j, base in enumerate(self.bases):
            path = segment_path(self.directory, base)
            with open(path, "rb") as handle:
                raw = handle.read()
            version = segment_version(path)
            if j < k:
                for record in _records(raw, fmt.SEGMENT_HEADER_SIZE, len(raw), version):
                    self._learn(record)
                continue
            if version is None or fmt.decode_segment_header(raw).base_position != base:
                raise SalvageRefused(f"{path.name}: its segment header is damaged; salvage"
                                     " keeps segments whose header is whole")
            start = fmt.SEGMENT_HEADER_SIZE
            if j == k:
                for record in _records(raw, start, cut, version):
                    self._learn(record)
                start = cut
            out = bytearray(raw[:start])
            newest = j == len(self.bases) - 1
            self._salvage_segment(path, raw, start, version, out, newest, j)
            if not newest and self.position < self.bases[j + 1]:
                # Lost bytes ran to the end of this segment: the positions before the
                # next segment's base get their placeholders here, in this segment.
                self._fill_gap(out, self.bases[j + 1], (j + 1, fmt.SEGMENT_HEADER_SIZE),
                               version)
            if bytes(out) != raw:
                outputs.append((path, bytes(out)))
        self._check_plan(outputs)
        return self.result, outputs

    def _check_plan(self, outputs: list[tuple[Path, bytes]]) -> None:
        """Walk the log as it would be after the salvage, from the cut segment on: every
        record valid, positions dense across segments, each segment at its base. A plan
        that fails is a bug here, and refused rather than written."""
        k = self.cut[0]
        planned = dict(outputs)
        position = None
        for j in range(k, len(self.bases)):
            path = segment_path(self.directory, self.bases[j])
            raw = planned.get(path)
            if raw is None:
                raw = path.read_bytes()
            if position is not None and position != self.bases[j]:
                raise SalvageRefused(f"the salvaged log would not be dense at {path.name}"
                                     f" (position {position}): nothing was changed")
            position = self.bases[j] if position is None else position
            at, version = fmt.SEGMENT_HEADER_SIZE, segment_version(path)
            while at < len(raw):
                found = check_record(raw, at, len(raw), version=version)
                if not isinstance(found, ScannedRecord):
                    if j == len(self.bases) - 1 and self.result.torn is not None:
                        break
                    raise SalvageRefused(f"the salvaged {path.name} would not verify at"
                                         f" offset {at} ({found.reason}): nothing was changed")
                if found.header.base_position != position:
                    raise SalvageRefused(f"the salvaged {path.name} would not be dense"
                                         f" at offset {at}: nothing was changed")
                position = found.header.base_position + found.header.count
                at = found.end

    # -- from the cut on ---------------------------------------------------------------------

    def _salvage_segment(self, path: Path, raw: bytes, at: int, version: int, out: bytearray,
                         newest: bool, j: int) -> None:
        end = len(raw)
        while at < end:
            found = check_record(raw, at, end, deep=True, version=version)
            if isinstance(found, ScannedRecord):
                header = found.header
                if header.base_position > self.position:
                    self._fill_gap(out, header.base_position, (j, at), version)
                if not self._consistent(header, found.stream):
                    raise SalvageRefused(
                        f"{path.name} offset {at}: a record of stream {quoted(found.stream)}"
                        f" (number {header.first_number}, position {header.base_position})"
                        " contradicts the log before it")
                out += raw[at:found.end]
                self._learn(found)
                at = found.end
                continue
            after = valid_record_after(raw, at, end, min_position=self.position + 1,
                                       version=version)
            if newest and after is None and self.claim is None and (
                    (j, at) != self.cut or self.cut_is_torn):
                # Nothing after it: the write a crash cut, never acknowledged.
                self.result.torn = (path, at, end - at)
                return
            if found.event is not None and self._consistent(found.header, found.stream):
                out += self._mend(raw, at, found)
                at += found.header.size
                continue
            # The header is not to be trusted: resynchronise on the next record the log
            # wrote after this one.
            if self.claim is None:
                self.claim = self._claim(raw, at, end)
            stop = end if after is None else after
            self.result.lost.append((path, at, stop))
            at = stop
        if newest and self.claim is not None:
            # Lost bytes at the very end of the log: only what their header names.
            self._fill_gap(out, self.position + self.claim.count, None, version)

    def _claim(self, raw: bytes, at: int, end: int) -> _Claim | None:
        """The events a damaged header names, if the header agrees with the log."""
        claimed = claimed_header(raw, at, end)
        if claimed is None:
            return None
        header, stream = claimed
        if header.stream_id >= len(self.names) or not self._consistent(header, stream):
            # A new stream's name in a damaged header could be the damage itself: a
            # stream that never existed. Only the name the log already knows is trusted.
            return None
        return _Claim(stream, header.stream_id, header.first_number, header.count,
                      header.timestamp_ms)

    def _mend(self, raw: bytes, at: int, bad: BadRecord) -> bytes:
        """A record whose header and lengths check, its bad frames replaced."""
        header = bad.header
        events = []
        prefix = fmt.stream_frame_prefix(bad.stream)
        framing = record_framing(raw, at, header)
        assert not isinstance(framing, str), framing  # the lengths checked: bad.event is set
        view = memoryview(raw)
        for i, ((frame_at, frame_len), data_len, check) in enumerate(zip(*framing)):
            number = header.first_number + i
            if fmt.frame_check(raw[frame_at:frame_at + frame_len]) == check and _frame_matches(
                    raw, frame_at, frame_len, data_len, prefix, number):
                event = event_at(raw, view, bad.stream, number, frame_at, frame_len, None)
                events.append((event.name, bytes(event.data)))
            else:
                events.append((PLACEHOLDER_NAME, b""))
                self._replaced(bad.stream, number, header.base_position + i,
                               "its frame failed its check")
        self._learn(ScannedRecord(at, header, bad.stream))
        return fmt.encode_record(bad.stream, header.stream_id, header.base_position,
                                 header.first_number, events, timestamp_ms=header.timestamp_ms,
                                 version=header.version).data

    def _replaced(self, stream: bytes, number: int, position: int, why: str,
                  count: int = 1) -> None:
        last = self.result.replaced[-1] if self.result.replaced else None
        if last is not None and last.stream == stream and last.why == why and \
                last.last + 1 == number and last.position + last.last - last.first + 1 == position:
            last.last += count
        else:
            self.result.replaced.append(Replaced(stream, number, number + count - 1, position,
                                                 why))

    def _fill_gap(self, out: bytearray, until: int, ahead: tuple[int, int] | None,
                  version: int) -> None:
        """Placeholders for positions ``self.position`` .. ``until - 1``: first what the
        damaged header names, then what the records after the gap show missing."""
        claim, self.claim = self.claim, None
        if claim is not None and claim.count <= until - self.position:
            self._placeholders(out, claim.sid, claim.stream, claim.count, version,
                               "named by its damaged record header")
        lost = until - self.position
        if not lost:
            return
        plan = self._attribute(lost, ahead)
        self.result.notes.append(
            f"positions {self.position}..{until - 1} were lost with their record headers;"
            " the records after them say whose they were, not in which order: the"
            " placeholders are laid out stream by stream, in stream-id order")
        for sid, stream, count in plan:
            self._placeholders(out, sid, stream, count, version,
                               "missing from the stream's numbering after lost bytes")

    def _placeholders(self, out: bytearray, sid: int, stream: bytes, count: int,
                      version: int, why: str) -> None:
        number = 0 if sid == len(self.names) else self.next_number[sid]
        record = fmt.encode_record(stream, sid, self.position, number,
                                   [(PLACEHOLDER_NAME, b"")] * count,
                                   timestamp_ms=self.timestamp_ms, version=version)
        self._replaced(stream, number, self.position, why, count)
        out += record.data
        scanned = check_record(record.data, 0, len(record.data))
        assert isinstance(scanned, ScannedRecord), scanned
        self._learn(scanned)

    def _attribute(self, lost: int, ahead: tuple[int, int] | None
                   ) -> list[tuple[int, bytes, int]]:
        """Which streams the ``lost`` positions belonged to, from the records after them."""
        expected = self.next_number
        names = self.names
        missing: dict[int, int] = {}
        new: dict[int, bytes] = {}
        if ahead is not None:
            j, at = ahead
            for k in range(j, len(self.bases)):
                path = segment_path(self.directory, self.bases[k])
                with open(path, "rb") as handle:
                    raw = handle.read()
                start = at if k == j else fmt.SEGMENT_HEADER_SIZE
                for record in _records(raw, start, len(raw), segment_version(path)):
                    header = record.header
                    sid = header.stream_id
                    if sid in missing or sid in new:
                        continue
                    if sid < len(names):
                        if names[sid] != record.stream:
                            break
                        missing[sid] = header.first_number - expected[sid]
                    else:
                        new[sid] = record.stream
                        missing[sid] = header.first_number
                    if sum(missing.values()) >= lost:
                        break
                if sum(missing.values()) >= lost:
                    break
        accounted = sum(n for n in missing.values() if n > 0)
        if accounted != lost or any(n < 0 for n in missing.values()) or \
                sorted(new) != list(range(len(names), len(names) + len(new))):
            raise SalvageRefused(
                f"{lost} events were lost with their record headers at position"
                f" {self.position}, and the records after"
                f" them account for {accounted}: salvage cannot say whose they were"
                " (--repair without --salvage cuts the log there)")
        return [(sid, new.get(sid) or names[sid], n)
                for sid, n in sorted(missing.items()) if n > 0]


def _records(raw: bytes, start: int, end: int, version: int | None):
    """The valid records of ``raw[start:end]`` up to the first that is not."""
    return takewhile(lambda found: isinstance(found, ScannedRecord),
                     iter_records(raw, start, end, version=version))


def plan(directory: Path, bases: list[int], cut: tuple[int, int], cut_is_torn: bool
         ) -> tuple[SalvageResult, list[tuple[Path, bytes]]]:
    """What salvaging the log from ``cut`` (segment index, offset) would write, as
    (what it replaces and loses, [(segment, its new bytes)]); changes nothing.

    Raises :class:`SalvageRefused` when the log after the damage does not say what
    was lost."""
    return _Salvager(directory, bases, cut, cut_is_torn).run()


def write(outputs: list[tuple[Path, bytes]], result: SalvageResult) -> None:
    """Replace each segment by its salvaged bytes: ``<segment>.tmp``, fsync, rename."""
    for path, data in outputs:
        temp = path.with_name(path.name + TEMP_SUFFIX)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        result.rewritten.append(path.name)
    if outputs:
        fsync_directory(outputs[0][0].parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
