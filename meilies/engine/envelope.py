"""The full event frame (PROTOCOL.md, version 2), built from a stored original frame.

A full frame is the original one with four more elements::

    *9 +event +<stream> :<number> +<event-name> $<data> :<position> :<timestamp-ms> $<id> $<metadata>

so it is ``*9\\r\\n``, the stored frame after its ``*5\\r\\n``, and a suffix. The
log keeps only the original frames (format.py): what the original protocol's
subscribers are sent, as slices of the log, a stored batch in one. The suffix's
parts are known without storing them per event: the position from the index entry
(segment base + position delta), the timestamp from the header of the event's record,
``id`` and ``metadata`` from the record's extras (format 4: stored as the wire's two
bulk strings, copied as they are; nil for a record without extras). Why not store full
frames:
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
from itertools import chain, repeat
from operator import add, itemgetter, sub

from . import format as fmt
from .errors import CorruptRecord
from .index import ENTRY_SIZE, SealedIndex, entry_columns
from .segment import Segment

#: What a full frame starts with, in place of the stored frame's ``*5\r\n``.
FULL_HEAD = b"*9\r\n"
#: The bytes of the stored frame's own array header, which a full frame replaces.
ORIGINAL_HEAD_LENGTH = len(b"*5\r\n")
NIL = b"$-1\r\n"
_NO_ID_NOR_METADATA = NIL + NIL
#: Where the timestamp sits in a record header (its last field, u64).
TIMESTAMP_OFFSET = fmt.RECORD_HEADER_SIZE - 8
#: Where a record header's extras_length is (u32, format 4).
EXTRAS_LENGTH_OFFSET = TIMESTAMP_OFFSET - 4
#: A record header's magic, extras length and timestamp, read in one call.
_MAGIC_AND_TIMESTAMP = struct.Struct("<4s%dxIQ" % (EXTRAS_LENGTH_OFFSET - 4))
#: An index entry's frame offset and length.
_OFFSET_LENGTH = struct.Struct("<II")
_ONLY_MAGIC = {fmt.RECORD_MAGIC}
MISPLACED_HEADER = ("the index points at a frame whose record header is not where the"
                     " records before it end")
#: A full frame of an event without id and metadata: the stored frame after its
#: ``*5\r\n``, then position and timestamp.
_FULL_FRAME = FULL_HEAD + b"%b:%d\r\n:%d\r\n$-1\r\n$-1\r\n"
#: The same with the event's stored extras (its id and metadata) last.
_FULL_FRAME_WITH_EXTRAS = FULL_HEAD + b"%b:%d\r\n:%d\r\n%b"


def suffix(position: int, timestamp_ms: int, event_id: bytes | None = None,
           metadata: bytes | None = None) -> bytes:
    """The four elements a full frame adds to the original ones."""
    if event_id is None and metadata is None:
        return b":%d\r\n:%d\r\n$-1\r\n$-1\r\n" % (position, timestamp_ms)
    return b":%d\r\n:%d\r\n%s%s" % (position, timestamp_ms, _bulk(event_id), _bulk(metadata))


def _bulk(value: bytes | None) -> bytes:
    return NIL if value is None else b"$%d\r\n%s\r\n" % (len(value), value)


def record_details(segment: Segment, buf, offsets: list[int], lengths: list[int],
                   deltas: list[int]) -> tuple[list[int], list[bytes] | None]:
    """The timestamp of each event of a read from ``segment`` (frame offsets, lengths
    and position deltas in ascending position order, not necessarily consecutive: a
    stream's events), and each event's stored extras (its id and metadata as the wire
    has them), or None when no record of the read has any (the usual case, with
    nothing more to read). One header read per record the read touches, in C-level
    passes (single publishes make a record per event)."""
    count = len(offsets)
    ends = list(map(add, offsets, lengths))
    if deltas[-1] - deltas[0] == count - 1 and offsets[1:] == ends[:-1]:
        # Consecutive positions, frames back to back: one record (formats 2 to 4),
        # one header to read (a batch: an aggregate appended at once).
        at = _record_starts(segment, deltas[:1], offsets[:1])[0]
        magic, extras_length, stamp = _MAGIC_AND_TIMESTAMP.unpack_from(buf, at)
        if magic != fmt.RECORD_MAGIC:
            raise CorruptRecord(segment.path, at, MISPLACED_HEADER)
        extras = None
        if extras_length:
            extras = _extras_of(segment, buf, [at], [0], deltas, count)
        return [stamp] * count, extras
    steps = list(map(sub, deltas[1:], deltas[:-1]))
    gaps = list(map(sub, offsets[1:], ends[:-1]))
    # Events that start a record, after the first: a record header lies between them
    # and the event before, or the event before is not the one at the position before.
    firsts = [i for i, step, gap in zip(range(1, count), steps, gaps)
              if step != 1 or gap >= fmt.RECORD_HEADER_SIZE]
    # Where their headers are: right after the frame before, when that frame is the
    # event at the position before; else found in the position index.
    headers = [ends[i - 1] if steps[i - 1] == 1 else -1 for i in firsts]
    unknown = [k for k, at in enumerate(headers) if at < 0]
    if unknown:
        found = _record_starts(segment, [deltas[firsts[k]] for k in unknown],
                               [offsets[firsts[k]] for k in unknown])
        for k, at in zip(unknown, found):
            headers[k] = at
    headers.insert(0, _record_starts(segment, deltas[:1], offsets[:1])[0])
    magics_and_stamps = list(map(_MAGIC_AND_TIMESTAMP.unpack_from, repeat(buf), headers))
    if set(map(itemgetter(0), magics_and_stamps)) != _ONLY_MAGIC:
        at = next(h for h, (magic, _x, _ts) in zip(headers, magics_and_stamps)
                  if magic != fmt.RECORD_MAGIC)
        raise CorruptRecord(segment.path, at, MISPLACED_HEADER)
    stamps = list(map(itemgetter(2), magics_and_stamps))
    extras = None
    if any(map(itemgetter(1), magics_and_stamps)):
        extras = _extras_of(segment, buf, headers, [0] + firsts, deltas, count)
    if len(stamps) == count:  # a record per event
        return stamps, extras
    sizes = list(map(sub, firsts + [count], [0] + firsts))
    return list(chain.from_iterable(map(repeat, stamps, sizes))), extras


def _extras_of(segment: Segment, buf, headers: list[int], firsts: list[int],
               deltas: list[int], count: int) -> list[bytes]:
    """Each event's stored extras, for a read whose events ``firsts[k]`` on (up to the
    next first) belong to the record at ``headers[k]``."""
    out: list[bytes] = []
    base = segment.base_position
    for k, at in enumerate(headers):
        stop = firsts[k + 1] if k + 1 < len(firsts) else count
        header = fmt.decode_record_header(buf, at)
        if not header.extras_length:
            out += [fmt.NO_EXTRAS] * (stop - firsts[k])
            continue
        stored = fmt.record_extras(buf, at, header)
        first = header.base_position - base
        out += [stored[deltas[i] - first] for i in range(firsts[k], stop)]
    return out


def _record_starts(segment: Segment, deltas: list[int], offsets: list[int]) -> list[int]:
    """The offset of the header of the record that holds each index entry ``deltas[k]``
    (whose frame is at ``offsets[k]``): where the frame of the entry before ends, when a
    record header fits between them; else the record started earlier (a read that
    begins inside a record), walked back entry by entry."""
    index = segment.index
    buf = index.buffer if isinstance(index, SealedIndex) else index.entries
    befores = list(map(_OFFSET_LENGTH.unpack_from, repeat(buf),
                       [(d - 1) * ENTRY_SIZE if d > 0 else 0 for d in deltas]))
    ends = list(map(sum, befores))
    if 0 not in deltas and min(map(sub, offsets, ends)) >= fmt.RECORD_HEADER_SIZE:
        return ends  # each one starts its record (the common case): C-level passes only
    out = []
    for delta, offset, end in zip(deltas, offsets, ends):
        if delta == 0:
            out.append(fmt.SEGMENT_HEADER_SIZE)
        elif offset - end >= fmt.RECORD_HEADER_SIZE:
            out.append(end)
        else:
            out.append(_walk_back(index, delta - 1, end - befores[len(out)][1]))
    return out


#: Index entries read at once while walking back to a record's start.
WALK_CHUNK = 256


def _walk_back(index, delta: int, offset: int) -> int:
    """:func:`_record_starts` for entry ``delta`` (frame at ``offset``), which shares its
    record with the entry after it: the end of the latest entry before it with a
    record header's room between it and the next, read a chunk of entries at a time
    (a large batch's last event is hundreds of entries from its header)."""
    buf = index.buffer if isinstance(index, SealedIndex) else index.entries
    stop = delta + 1
    while stop > 1:
        first = max(0, stop - WALK_CHUNK)
        offsets, lengths, _deltas = entry_columns(buf, first, stop)
        ends = list(map(add, offsets, lengths))
        gaps = list(map(sub, offsets[1:], ends[:-1]))  # gaps[k]: before entry first+k+1
        for k in range(len(gaps) - 1, -1, -1):
            if gaps[k] >= fmt.RECORD_HEADER_SIZE:
                return ends[k]
        if first == 0:
            break
        stop = first + 1  # the next chunk ends with this one's first entry
    return fmt.SEGMENT_HEADER_SIZE


def full_frames(segment: Segment, offsets: list[int], lengths: list[int],
                deltas: list[int], *, descending: bool = False) -> list[bytes | memoryview]:
    """The full frames of events of ``segment`` (ascending position order given; sent
    ascending or descending), as pieces to join (one: every frame formatted in one call)."""
    if not offsets:
        return []
    return [_assemble(segment, offsets, lengths, deltas, descending)[0]]


def full_frames_and_lengths(segment: Segment, offsets: list[int], lengths: list[int],
                            deltas: list[int]) -> tuple[bytes, list[int]]:
    """The full frames of events of ``segment`` (ascending), and each one's length:
    what the frame cache (framecache.py) keeps."""
    if not offsets:
        return b"", []
    frames, positions, stamps, extras = _assemble(segment, offsets, lengths, deltas, False)
    # A full frame is its stored frame (whose ``*5`` becomes ``*9``), ``:<position>\r\n``,
    # ``:<timestamp>\r\n`` and the extras: the digits are all that varies.
    sizes = list(map(add, map(add, lengths, map(len, map(str, positions))),
                     map(len, map(str, stamps))))
    tails = repeat(_SUFFIX_FIXED + len(_NO_ID_NOR_METADATA)) if extras is None else \
        map(_SUFFIX_FIXED.__add__, map(len, extras))
    return frames, list(map(add, sizes, tails))


#: The bytes of a full frame's suffix besides the digits and extras: ``:`` and ``\r\n``
#: twice.
_SUFFIX_FIXED = 6


def _assemble(segment: Segment, offsets: list[int], lengths: list[int], deltas: list[int],
              descending: bool) -> tuple[bytes, list[int], list[int], list[bytes] | None]:
    """The full frames, formatted in one call, with the positions, timestamps and
    extras that went into them (in the order sent)."""
    buf = segment.buffer(offsets[-1] + lengths[-1])
    stamps, extras = record_details(segment, buf, offsets, lengths, deltas)
    base = segment.base_position
    cut = ORIGINAL_HEAD_LENGTH
    # Copies, not views: a memoryview per event is an object the collector tracks.
    bodies = [buf[offset + cut:offset + length] for offset, length in zip(offsets, lengths)]
    positions = list(map(add, repeat(base), deltas))
    if descending:
        bodies.reverse()
        positions.reverse()
        stamps.reverse()
        if extras is not None:
            extras.reverse()
    # One formatting call for every frame of the read (no object per suffix).
    if extras is None:
        frames = _FULL_FRAME * len(bodies) % tuple(chain.from_iterable(
            zip(bodies, positions, stamps)))
    else:
        frames = _FULL_FRAME_WITH_EXTRAS * len(bodies) % tuple(chain.from_iterable(
            zip(bodies, positions, stamps, extras)))
    return frames, positions, stamps, extras
