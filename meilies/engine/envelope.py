"""The full event frame (PROTOCOL.md, version 2), built from a stored original frame.

A full frame is the original one with four more elements::

    *9 +event +<stream> :<number> +<event-name> $<data> :<position> :<timestamp-ms> $<id> $<metadata>

so it is ``*9\\r\\n``, the stored frame after its ``*5\\r\\n``, and a suffix. The
log keeps only the original frames (format.py): what the original protocol's
subscribers are sent, as slices of the log, a stored batch in one. The suffix's
parts are known without storing them per event: the position from the index entry
(segment base + position delta), the timestamp from the header of the event's record,
``id`` and ``metadata`` from the record once the write side stores them (until then
nil: :func:`suffix` takes them already, so they slot in). Why not store full frames:
they would cost every stored event ~40 more bytes on disk, an original subscriber
(the default, and every client of the original MeiliES) could no longer be sent a
batch as one slice, and a position written into a frame could not be rewound by a
take-back without rewriting it; assembling costs ~1 us per event (tools/bench_frames.py).

Where a record's header is: records are back to back in a segment and each ends with
its last frame (every format version), so the record whose first event has index
entry ``d`` starts where entry ``d - 1``'s frame ends (at the end of the segment
header for ``d == 0``). Two consecutive entries belong to one record exactly when
less than a record header lies between their frames (nothing in versions 2 and 3,
an 8-byte event header in version 1).
"""

from __future__ import annotations

import struct

from . import format as fmt
from .errors import CorruptRecord
from .segment import Segment

#: What a full frame starts with, in place of the stored frame's ``*5\r\n``.
FULL_HEAD = b"*9\r\n"
#: The bytes of the stored frame's own array header, which a full frame replaces.
ORIGINAL_HEAD_LENGTH = len(b"*5\r\n")
NIL = b"$-1\r\n"
_NO_ID_NOR_METADATA = NIL + NIL
#: Where the timestamp sits in a record header (its last field, u64).
TIMESTAMP_OFFSET = fmt.RECORD_HEADER_SIZE - 8
_TIMESTAMP = struct.Struct("<Q")


def suffix(position: int, timestamp_ms: int, event_id: bytes | None = None,
           metadata: bytes | None = None) -> bytes:
    """The four elements a full frame adds to the original ones."""
    if event_id is None and metadata is None:
        return b":%d\r\n:%d\r\n$-1\r\n$-1\r\n" % (position, timestamp_ms)
    return b":%d\r\n:%d\r\n%s%s" % (position, timestamp_ms, _bulk(event_id), _bulk(metadata))


def _bulk(value: bytes | None) -> bytes:
    return NIL if value is None else b"$%d\r\n%s\r\n" % (len(value), value)


def record_timestamps(segment: Segment, buf, offsets: list[int], lengths: list[int],
                      deltas: list[int]) -> list[int]:
    """The timestamp of each event of a read from ``segment``: frame offsets, lengths
    and position deltas in ascending position order (not necessarily consecutive: a
    stream's events). One header lookup per record the read touches."""
    out: list[int] = []
    ts = 0
    prev_end = prev_delta = -fmt.RECORD_HEADER_SIZE
    for offset, length, delta in zip(offsets, lengths, deltas):
        if delta != prev_delta + 1 or offset - prev_end >= fmt.RECORD_HEADER_SIZE:
            ts = _timestamp_at(segment, buf, _record_start(segment, delta, offset))
        out.append(ts)
        prev_end = offset + length
        prev_delta = delta
    return out


def _record_start(segment: Segment, delta: int, offset: int) -> int:
    """The offset of the header of the record that holds index entry ``delta``, whose
    frame is at ``offset`` (see the module docstring)."""
    index = segment.index
    while delta > 0:
        before_offset, before_length = index.entry(delta - 1)[:2]
        end = before_offset + before_length
        if offset - end >= fmt.RECORD_HEADER_SIZE:
            return end
        delta -= 1
        offset = before_offset
    return fmt.SEGMENT_HEADER_SIZE


def _timestamp_at(segment: Segment, buf, at: int) -> int:
    if buf[at:at + 4] != fmt.RECORD_MAGIC:
        raise CorruptRecord(segment.path, at, "the index points at a frame whose record"
                            " header is not where the records before it end")
    return _TIMESTAMP.unpack_from(buf, at + TIMESTAMP_OFFSET)[0]


def full_frames(segment: Segment, offsets: list[int], lengths: list[int],
                deltas: list[int], *, descending: bool = False) -> list[bytes | memoryview]:
    """The full frames of events of ``segment`` (ascending position order given; sent
    ascending or descending), as pieces to join: three per event, the middle one a view
    of the log."""
    if not offsets:
        return []
    buf = segment.buffer(offsets[-1] + lengths[-1])
    view = memoryview(buf)
    stamps = record_timestamps(segment, buf, offsets, lengths, deltas)
    base = segment.base_position
    cut = ORIGINAL_HEAD_LENGTH
    pieces: list[bytes | memoryview] = []
    events = zip(offsets, lengths, deltas, stamps)
    if descending:
        events = reversed(list(events))
    for offset, length, delta, ts in events:
        pieces += (FULL_HEAD, view[offset + cut:offset + length],
                   b":%d\r\n:%d\r\n$-1\r\n$-1\r\n" % (base + delta, ts))
    return pieces
