"""Reading records back from a segment, and telling a torn tail from damage.

The one verifier behind both the engine's open and ``meilies-fsck`` (in a shallow and
a deep mode, as Redis' ``lpValidateIntegrity``). The policy, after LevelDB's log
reader and Redis' ``uxeof:``/``fmterr:`` split:

* A record that is short, or fails its checks, with no valid record anywhere after it
  is a *torn tail*: the write that a crash interrupted. It is the end of the log; on
  the newest segment the engine truncates it and reports the bytes dropped.
* A bad record followed by any valid record is *damage*: it raises
  :class:`CorruptRecord` naming the file and offset, and nothing is dropped.
  (Kafka and NATS truncate at the first bad record anywhere; our contract forbids it.)
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from itertools import accumulate
from dataclasses import dataclass, field
from pathlib import Path

from . import format as fmt
from .errors import InvalidArgument
from .names import check_stream_name, quoted
from .format import (EVENT_ENTRY_SIZE, EVENT_HEADER, EVENT_HEADER_SIZE, FORMAT_HISTORY,
                     RECORD_HEADER_SIZE, RECORD_MAGIC, RecordHeader)


@dataclass(frozen=True)
class BadRecord:
    """Why the bytes at ``offset`` are not a valid record.

    ``event`` is set when the record's header, name and lengths are sound and its
    event ``event`` is the first whose frame fails its check (format 3): the events
    before it are whole, and ``header`` tells their stream, numbers and positions."""

    offset: int
    reason: str
    event: int | None = None
    header: RecordHeader | None = None
    stream: bytes = b""


@dataclass
class ScannedRecord:
    offset: int
    header: RecordHeader
    stream: bytes
    #: (frame offset in the segment, frame length) per event.
    frames: list[tuple[int, int]] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.offset + self.header.size


@dataclass
class RecoveryReport:
    """What opening a segment found at its tail (Kafka's ``LogSegment.recover()``)."""

    path: Path
    valid_bytes: int
    truncated_bytes: int = 0
    reason: str = ""


def check_record(buf, offset: int, end: int, *, deep: bool = False,
                 version: int | None = None) -> ScannedRecord | BadRecord:
    """Validate the record at ``offset`` of ``buf[:end]``.

    Shallow: magic, version, flags, length within bounds, checksum, event framing;
    with ``version`` (the segment header's), that the record has that version: a
    segment never mixes versions. Deep (fsck): also that each frame's bytes spell its
    stream, number and lengths.
    """
    if end - offset < RECORD_HEADER_SIZE:
        return BadRecord(offset, "short record header")
    header = fmt.decode_record_header(buf, offset)
    if header.magic != RECORD_MAGIC:
        return BadRecord(offset, "bad record magic")
    if header.body_length > fmt.MAX_BODY_LENGTH or offset + header.size > end:
        return BadRecord(offset, "record length runs past the end of the segment")
    checked_end = fmt.checked_end(header, offset)
    if checked_end > offset + header.size:
        return BadRecord(offset, "the frame lengths run past the record")
    if fmt.record_checksum(buf, offset, checked_end) != header.checksum:
        return BadRecord(offset, "checksum mismatch")
    if header.version not in FORMAT_HISTORY or header.flags & ~fmt.KNOWN_FLAGS[header.version] \
            or (header.extras_length and header.version < 4):
        return BadRecord(offset, f"unknown record version {header.version} / flags {header.flags}")
    if version is not None and header.version != version:
        return BadRecord(offset, f"a version {header.version} record in a version {version}"
                         " segment")
    count = header.count
    if count == 0 or not 1 <= header.stream_name_length <= 255:
        return BadRecord(offset, "record with no events or a bad stream name length")
    name_at = offset + RECORD_HEADER_SIZE
    stream = bytes(buf[name_at:name_at + header.stream_name_length])
    record = ScannedRecord(offset, header, stream)
    framing = record_framing(buf, offset, header)
    if isinstance(framing, str):
        return BadRecord(offset, framing)
    record.frames, data_lengths, checks = framing
    if header.extras_length:
        problem = _extras_problem(buf, offset, header)
        if problem is not None:
            return BadRecord(offset, problem)
    if checks is not None:
        # One C-level sweep: slices of the segment through the per-frame hash.
        found = list(map(fmt.frame_check, map(buf.__getitem__, _slices(record.frames))))
        if found != checks:
            i = next(i for i, (a, b) in enumerate(zip(found, checks)) if a != b)
            return _bad_event(record, i, "its frame fails its checksum")
    if deep:
        prefix = fmt.stream_frame_prefix(stream)
        for i, ((frame_at, frame_len), data_len) in enumerate(zip(record.frames, data_lengths)):
            if not _frame_matches(buf, frame_at, frame_len, data_len, prefix,
                                  header.first_number + i):
                return _bad_event(record, i, "its frame does not match its header")
    return record


def _extras_problem(buf, offset: int, header: RecordHeader) -> str | None:
    """Why the extras of a record (version 4) that passed its checksum are malformed,
    or None: their lengths must add up to the region, and each must spell an id and a
    metadata. (A writer's bug, not bit rot: the checksum covers them.)"""
    at = offset + RECORD_HEADER_SIZE + header.stream_name_length + EVENT_ENTRY_SIZE * header.count
    if header.extras_length < 4 * header.count:
        return "the extras are shorter than their lengths"
    lengths = array("I")
    lengths.frombytes(bytes(buf[at:at + 4 * header.count]))
    if sum(lengths) + 4 * header.count != header.extras_length:
        return "the extras' lengths do not add up to the extras"
    for i, raw in enumerate(fmt.record_extras(buf, offset, header)):
        try:
            fmt.decode_extras(raw)
        except ValueError as exc:
            return f"event {i} of the record: malformed id and metadata ({exc})"
    return None


def _bad_event(record: ScannedRecord, i: int, what: str) -> BadRecord:
    """A record whose event ``i`` is the first that fails: named as ``stream:number``
    with its global position, so that an operator knows exactly which event it is.
    Only format 3 pins damage to an event (its frames have checks of their own); in
    older records the events before ``i`` are not known whole."""
    header = record.header
    reason = (f"event {quoted(record.stream)}:{header.first_number + i} (position"
              f" {header.base_position + i}, event {i} of the record's {header.count}):"
              f" {what}")
    if header.version < 3:
        return BadRecord(record.offset, reason)
    return BadRecord(record.offset, reason, i, header, record.stream)


def _slices(frames: list[tuple[int, int]]) -> list[slice]:
    return [slice(at, at + length) for at, length in frames]


#: ((frame offset, frame length) per event, data length per event, frame check per event
#: or None before format 3).
Framing = tuple[list[tuple[int, int]], list[int], list[int] | None]


def _frames_v1(buf, at: int, record_end: int, count: int) -> Framing | str:
    """A version 1 body (each frame after its own lengths): ((frame offset, frame
    length) per event, data length per event), or why its framing is bad."""
    frames, data_lengths = [], []
    for i in range(count):
        if at + EVENT_HEADER_SIZE > record_end:
            return f"event {i} header runs past the record"
        frame_len, data_len = EVENT_HEADER.unpack_from(buf, at)
        frame_at = at + EVENT_HEADER_SIZE
        if frame_at + frame_len > record_end or data_len + 2 > frame_len:
            return f"event {i} frame runs past the record"
        frames.append((frame_at, frame_len))
        data_lengths.append(data_len)
        at = frame_at + frame_len
    if at != record_end:
        return "record length does not match its events"
    return frames, data_lengths, None


def _frames_table(buf, at: int, record_end: int, count: int, words: int,
                  extras_length: int = 0) -> Framing | str:
    """A version 2, 3 or 4 body (every event's lengths entry of ``words`` u32, the
    extras in version 4, then the frames back to back); as :func:`_frames_v1`, and from
    version 3 on (3 words: its frame's check too) the checks as the third item."""
    table_end = at + 4 * words * count
    if table_end + extras_length > record_end:
        return "the frame lengths run past the record"
    table = array("I")
    table.frombytes(buf[at:table_end])
    frame_lengths, data_lengths = table[0::words].tolist(), table[1::words].tolist()
    offsets = list(accumulate(frame_lengths, initial=table_end + extras_length))
    if offsets[-1] != record_end:
        return "record length does not match its events"
    for i, (frame_len, data_len) in enumerate(zip(frame_lengths, data_lengths)):
        if data_len + 2 > frame_len:
            return f"event {i} data runs past its frame"
    checks = table[2::words].tolist() if words == 3 else None
    return list(zip(offsets, frame_lengths)), data_lengths, checks


def record_framing(buf, offset: int, header: RecordHeader) -> Framing | str:
    """Where each event's frame of the record at ``offset`` lies, with its data length
    and (format 3) its frame check, as the lengths say; or why they cannot be right.
    Trusts the header it is given: :func:`check_record` checks it first."""
    at = offset + RECORD_HEADER_SIZE + header.stream_name_length
    record_end = offset + header.size
    if header.version == 1:
        return _frames_v1(buf, at, record_end, header.count)
    words = EVENT_ENTRY_SIZE // 4 if header.version >= 3 else EVENT_HEADER_SIZE // 4
    return _frames_table(buf, at, record_end, header.count, words, header.extras_length)


def _frame_matches(buf, at: int, length: int, data_len: int, prefix: bytes, number: int) -> bool:
    # Slices are compared as they are (mmap and bytes slices are bytes, memoryview
    # slices compare by content): no copies, fsck's hot path.
    head = b"%s%d\r\n+" % (prefix, number)
    if buf[at:at + len(head)] != head:
        return False
    tail = b"\r\n$%d\r\n" % data_len
    data_start = at + length - 2 - data_len
    if buf[data_start - len(tail):data_start] != tail:
        return False
    return buf[at + length - 2:at + length] == b"\r\n"


def iter_records(buf, start: int, end: int, *, deep: bool = False,
                 version: int | None = None) -> Iterator[ScannedRecord | BadRecord]:
    """Yield each record from ``start``; stop after the first :class:`BadRecord`."""
    offset = start
    while offset < end:
        result = check_record(buf, offset, end, deep=deep, version=version)
        yield result
        if isinstance(result, BadRecord):
            return
        offset = result.end


def valid_record_after(buf, offset: int, end: int, *, min_position: int = 0,
                       version: int | None = None) -> int | None:
    """Offset of the first valid record that starts after ``offset``, or None.

    Searches for the record magic byte by byte, as the only way to tell damage in the
    middle of a log from a torn write at its end. Pass ``min_position``, the global
    position just past the first event of the bad record at ``offset``: a record the
    log wrote after it starts there or later, whereas a record held inside an event's
    data (a backup of a segment, say) and laid bare by a torn write was written
    earlier, so it starts before, and must not turn a torn tail into damage.
    """
    at = offset + 1
    while True:
        at = buf.find(RECORD_MAGIC, at, end)
        if at < 0:
            return None
        found = check_record(buf, at, end, version=version)
        if isinstance(found, ScannedRecord) and found.header.base_position >= min_position:
            return at
        at += 1


def claimed_header(buf, at: int, end: int) -> tuple[RecordHeader, bytes] | None:
    """The header at ``at`` and the stream name it gives, if they are plausible: what a
    record that fails its checks may still say of its events (magic, a name the rules
    allow, lying within ``end``, a count in reason). Not to be trusted further than
    the caller's own checks against the log take it."""
    if end - at < RECORD_HEADER_SIZE:
        return None
    header = fmt.decode_record_header(buf, at)
    name_at = at + RECORD_HEADER_SIZE
    if header.magic != RECORD_MAGIC or not 1 <= header.stream_name_length <= 255 or \
            name_at + header.stream_name_length > end or not 1 <= header.count <= 1 << 24:
        return None
    name = bytes(buf[name_at:name_at + header.stream_name_length])
    try:
        check_stream_name(name)
    except InvalidArgument:
        return None
    return header, name
