"""The segment file format, version 4: the one module that owns the log's byte layout.

docs/format.md tells the same in prose, with a worked example; this docstring and the
constants below are the source of truth.

A data directory holds segment files (``files.py`` names them). Each segment is::

    segment      := segment_header record*
    segment_header (32 bytes):
        magic:8 = b"MEILIESG"  version:u32  header_size:u32 = 32
        base_position:u64       checksum:u64 = xxh3_64(the 24 bytes before it)
        (every format version keeps this header as it is, so that a reader checks the
        checksum first and tells a file from a newer version from a damaged one)

    record       := record_header stream_name lengths extras frames
    record_header (56 bytes):
        offset  size  field
        0       4     magic = b"MREC"
        4       8     checksum = xxh3_64(record[12:frames_start]): the header fields
                      after it, the stream name, the lengths and the extras
        12      1     version = 4 (the version of the segment that holds it)
        13      1     flags: bit 0 = CONTINUED (the next record belongs to the same
                      transaction); the other bits are 0 (a reader refuses them)
        14      2     stream_name_length (1..255)
        16      4     body_length: bytes after the header (name + lengths + extras +
                      frames)
        20      4     count: events in the record (>= 1)
        24      8     base_position: global position of the first event
        32      8     first_number: the stream's number of the first event
        40      4     stream_id: the engine's dense id for the stream (0, 1, 2, ...)
        44      4     extras_length: bytes of ``extras`` (0: no event has an id or
                      metadata; versions 1-3: reserved = 0)
        48      8     timestamp_ms: milliseconds since the epoch when appended
    lengths      := (frame_length:u32 data_length:u32 frame_check:u32){count}
                    frame_check = xxh32(the frame), seed 0
    extras       := empty, or (extra_length:u32){count} extra{count}
    extra        := the last two elements of the event's full frame (PROTOCOL.md),
                    as they go on the wire: $<len>\\r\\n<id>\\r\\n or $-1\\r\\n, then
                    the same for the metadata
    frames       := frame{count}, back to back
    frame        := the RESP2 reply that a subscriber receives for the event:
        *5\\r\\n+event\\r\\n+<stream>\\r\\n:<number>\\r\\n+<event-name>\\r\\n$<len>\\r\\n<data>\\r\\n

All integers are little-endian. One record is one ``append`` batch: all its events
belong to one stream, with contiguous numbers and contiguous global positions. A record
never spans two segments. The record checksum starts right after itself, so that it
covers every header field (the length included, on purpose: a torn length is caught),
the name and the lengths in one contiguous xxhash call; each frame is covered by its
own ``frame_check``, which the record checksum covers in turn. So a flipped byte in a
frame is pinned to one event, and the events of the record before it are known whole
(``meilies-fsck`` names the event; ``--repair`` keeps those before it): a pipelined run
of publishes stored as one record no longer loses its acknowledged events to damage in
a later one. Storing each event as its wire frame, and a record's frames back to back,
lets a catch-up subscriber be served a whole batch of events as one slice of the mmap,
with no re-encoding and no Python work per event.

Ids and metadata (version 4) sit between the lengths and the frames, so that the
frames stay back to back (a catch-up batch is still one slice) and a record still ends
with its last frame (where the next record's header is: envelope.py relies on it). A
record whose events carry neither has no extras at all: a publish costs what it did in
version 3. With them, an event costs 4 bytes of length plus ``$<n>\\r\\n<id>\\r\\n``
and ``$<m>\\r\\n<metadata>\\r\\n`` (a UUID id and no metadata: 4 + 43 + 5 = 52 bytes),
stored ready to send, so that a full frame copies them as they are. They are covered by
the record checksum (they come before the frames).

Transactions (version 4). A transaction over several streams is written as one record
per stream batch, back to back in one segment (a transaction never spans segments: it
rolls first), every record but the last flagged CONTINUED. A log whose last record is
flagged CONTINUED ends in a transaction cut short by a crash: opening drops those
records (all or none), as it drops a torn record. A CONTINUED record anywhere else
than at the log's end is followed by the rest of its transaction.

Versions 1 and 2 have 8-byte lengths entries, ``(frame_length, data_length)``, and one
checksum over ``record[12:record_end]``, frames included. Version 1's body is
``record := record_header stream_name event{count}`` with ``event := frame_length:u32
data_length:u32 frame`` (each frame after its own lengths); version 2's is version 3's
without the frame checks. Every record carries the version of the segment that holds
it. The engine reads all three; it writes records of an older version only into an
older segment that was active when the directory was opened, until that segment rolls,
and every segment it creates is of the newest version. So a segment never mixes
versions, and an older MeiliES refuses a newer segment by its header instead of taking
its records for damage.

Version history (``FORMAT_VERSION``):
    1 -- first version (2026-11): batch records, frames stored as RESP replies.
    2 -- 2026-11: a record's frame lengths first, then its frames back to back, so that
         the frames of a batch are one contiguous span.
    3 -- 2026-12: a 32-bit xxhash per frame in the lengths, and the record checksum
         over the header, name and lengths only, so that damage is pinned to one event
         (issue 10).
    4 -- 2026-12: event ids and metadata (``extras``, the header's reserved field
         becomes ``extras_length``) and the CONTINUED flag of transactions (issue 12).
"""

from __future__ import annotations

import struct
import time
from array import array
from dataclasses import dataclass
from itertools import accumulate
from operator import itemgetter

import xxhash

#: The version of the segments this code creates. A file with a higher version is
#: refused on open.
FORMAT_VERSION = 4
#: Every version listed here can be read. Keep it in step with the history above.
FORMAT_HISTORY = {1: "batch records, frames stored as RESP replies",
                  2: "a record's frame lengths first, its frames back to back",
                  3: "a checksum per frame; the record checksum over header, name, lengths",
                  4: "event ids and metadata; transactions (the CONTINUED flag)"}
#: Record flags (version 4): the next record belongs to the same transaction.
FLAG_CONTINUED = 1
#: The flags a record of each version may carry.
KNOWN_FLAGS = {1: 0, 2: 0, 3: 0, 4: FLAG_CONTINUED}
#: The extras of an event with neither id nor metadata.
NO_EXTRAS = b"$-1\r\n$-1\r\n"

checksum = xxhash.xxh3_64_intdigest
Hasher = xxhash.xxh3_64
#: The check of one frame (version 3): 32 bits are plenty for one frame of at most a few
#: MiB, and the fastest per call for short frames, which are the common case.
frame_check = xxhash.xxh32_intdigest

# -- segment header -------------------------------------------------------------------

SEGMENT_MAGIC = b"MEILIESG"
SEGMENT_HEADER = struct.Struct("<8sIIQQ")
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size  # 32
SEGMENT_CHECKSUM_OFFSET = SEGMENT_HEADER_SIZE - 8


def encode_segment_header(base_position: int, version: int = FORMAT_VERSION) -> bytes:
    """The 32 bytes that open a segment whose first event has ``base_position``."""
    head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, version, SEGMENT_HEADER_SIZE, base_position, 0)
    return head[:SEGMENT_CHECKSUM_OFFSET] + struct.pack("<Q", checksum(head[:SEGMENT_CHECKSUM_OFFSET]))


@dataclass(frozen=True)
class SegmentHeader:
    magic: bytes
    version: int
    header_size: int
    base_position: int
    checksum_ok: bool


def decode_segment_header(buf: bytes | memoryview) -> SegmentHeader:
    """Parse the first 32 bytes of a segment (the caller checks the length)."""
    magic, version, header_size, base, stored = SEGMENT_HEADER.unpack_from(buf, 0)
    ok = checksum(bytes(buf[:SEGMENT_CHECKSUM_OFFSET])) == stored
    return SegmentHeader(magic, version, header_size, base, ok)


# -- record header --------------------------------------------------------------------

RECORD_MAGIC = b"MREC"
RECORD_HEADER = struct.Struct("<4sQBBHIIQQIIQ")
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 56
MAGIC_OFFSET = 0
CHECKSUM_OFFSET = MAGIC_OFFSET + 4
CHECKSUM_END = CHECKSUM_OFFSET + 8  # the checksum covers record[CHECKSUM_END:end]
LENGTH_OFFSET = CHECKSUM_END + 4  # body_length, after version, flags, name length
#: A body longer than this is framing damage, not a record (a batch is at most this).
MAX_BODY_LENGTH = 1 << 30

# The header fields after the checksum, which it covers (the same layout, split).
_COVERED_HEADER = struct.Struct("<BBHIIQQIIQ")
_CHECKSUM = struct.Struct("<Q")
assert 4 + _CHECKSUM.size + _COVERED_HEADER.size == RECORD_HEADER_SIZE

EVENT_HEADER = struct.Struct("<II")  # frame_length, data_length: versions 1 and 2
EVENT_HEADER_SIZE = EVENT_HEADER.size  # 8
EVENT_ENTRY = struct.Struct("<III")  # frame_length, data_length, frame_check: version 3
EVENT_ENTRY_SIZE = EVENT_ENTRY.size  # 12


def entry_size(version: int) -> int:
    """Bytes of one event's entry in the lengths of a record of ``version``."""
    return EVENT_ENTRY_SIZE if version >= 3 else EVENT_HEADER_SIZE

FRAME_PREFIX = b"*5\r\n+event\r\n+"


@dataclass(frozen=True)
class RecordHeader:
    """The decoded fixed header of one record (see the module docstring)."""

    magic: bytes
    checksum: int
    version: int
    flags: int
    stream_name_length: int
    body_length: int
    count: int
    base_position: int
    first_number: int
    stream_id: int
    timestamp_ms: int
    #: Bytes of the record's ids and metadata (version 4; 0 when it has none).
    extras_length: int = 0

    @property
    def size(self) -> int:
        """Bytes of the whole record, header included."""
        return RECORD_HEADER_SIZE + self.body_length


def decode_record_header(buf: bytes | memoryview, offset: int) -> RecordHeader:
    """Parse the header at ``offset`` (the caller checks that 56 bytes are there)."""
    (magic, digest, version, flags, name_len, body_len, count, base, first, sid, extras,
     ts) = RECORD_HEADER.unpack_from(buf, offset)
    return RecordHeader(magic, digest, version, flags, name_len, body_len, count, base, first,
                        sid, ts, extras)


def stream_frame_prefix(stream: bytes) -> bytes:
    """The bytes every frame of ``stream`` starts with, up to the event number."""
    return FRAME_PREFIX + stream + b"\r\n:"


@dataclass
class EncodedRecord:
    """A record ready to write, with where each event's frame sits inside it."""

    data: bytes
    #: Offset of each event's frame inside ``data``, in order.
    offsets: list[int]
    #: Length of each event's frame, in order.
    lengths: list[int]

    @property
    def frames(self) -> list[tuple[int, int]]:
        """(offset, length) of each event's frame inside ``data``."""
        return list(zip(self.offsets, self.lengths))


def encode_record(stream: bytes, stream_id: int, base_position: int, first_number: int,
                  events: list[tuple[bytes, bytes]], timestamp_ms: int | None = None,
                  version: int = FORMAT_VERSION, extras: list[bytes] | None = None,
                  flags: int = 0) -> EncodedRecord:
    """Encode one batch of ``(event_name, data)`` pairs of ``stream`` as a record of
    format ``version`` (the version of the segment it goes to), with each event's
    :func:`encode_extras` if given (version 4) and ``flags``."""
    if version not in FORMAT_HISTORY:
        raise ValueError(f"cannot write format version {version}")
    if (extras is not None or flags) and version < 4:
        raise ValueError(f"format version {version} has no ids, metadata or transactions")
    count = len(events)
    head = FRAME_PREFIX + stream + b"\r\n:"
    # One formatting per event; everything else is one C call per record.
    frames = [b"%s%d\r\n+%s\r\n$%d\r\n%s\r\n" % (head, number, name, len(data), data)
              for number, (name, data) in enumerate(events, first_number)]
    lengths = list(map(len, frames))
    at = RECORD_HEADER_SIZE + len(stream)
    if timestamp_ms is None:
        timestamp_ms = time.time_ns() // 1_000_000
    if version >= 3:  # the lengths with a check per frame, then the frames back to back
        table = array("I", bytes(EVENT_ENTRY_SIZE * count))
        table[0::3] = array("I", lengths)
        table[1::3] = array("I", map(len, map(itemgetter(1), events)))
        table[2::3] = array("I", map(frame_check, frames))
        table_bytes = table.tobytes()
        extras_bytes = b"" if extras is None else _extras_region(extras)
        covered = b"".join((
            _COVERED_HEADER.pack(version, flags, len(stream),
                                 len(stream) + len(table_bytes) + len(extras_bytes)
                                 + sum(lengths), count, base_position, first_number,
                                 stream_id, len(extras_bytes), timestamp_ms),
            stream, table_bytes, extras_bytes))
        offsets = list(accumulate(lengths[:-1], initial=at + EVENT_ENTRY_SIZE * count
                                  + len(extras_bytes)))
        return EncodedRecord(b"".join((RECORD_MAGIC, _CHECKSUM.pack(checksum(covered)), covered,
                                       *frames)), offsets, lengths)
    table = array("I", bytes(8 * count))
    table[0::2] = array("I", lengths)
    table[1::2] = array("I", map(len, map(itemgetter(1), events)))
    if version == 1:  # each frame right after its own two lengths
        body = b"".join([b"".join(pair) for pair in zip(_pairs(table), frames)])
        offsets = list(accumulate([n + EVENT_HEADER_SIZE for n in lengths[:-1]],
                                  initial=at + EVENT_HEADER_SIZE))
    elif version == 2:  # the lengths, then the frames back to back
        body = table.tobytes() + b"".join(frames)
        offsets = list(accumulate(lengths[:-1], initial=at + EVENT_HEADER_SIZE * count))
    else:
        raise ValueError(f"cannot write format version {version}")
    covered = b"".join((
        _COVERED_HEADER.pack(version, 0, len(stream), len(stream) + len(body), count,
                             base_position, first_number, stream_id, 0, timestamp_ms),
        stream, body))
    return EncodedRecord(RECORD_MAGIC + _CHECKSUM.pack(checksum(covered)) + covered, offsets,
                         lengths)


def _extras_region(extras: list[bytes]) -> bytes:
    """The ``extras`` of a record: each event's length, then the extras back to back."""
    return array("I", map(len, extras)).tobytes() + b"".join(extras)


def encode_extras(event_id: bytes | None, metadata: bytes | None) -> bytes:
    """An event's stored id and metadata: the last two elements of its full frame."""
    return b"".join((NIL_BULK if event_id is None else b"$%d\r\n%s\r\n" % (len(event_id), event_id),
                     NIL_BULK if metadata is None else b"$%d\r\n%s\r\n" % (len(metadata), metadata)))


NIL_BULK = b"$-1\r\n"
_EXTRA_LENGTH = struct.Struct("<I")


def decode_extras(raw: bytes) -> tuple[bytes | None, bytes | None]:
    """(id, metadata) of an event's stored extras; ValueError if they are malformed."""
    values: list[bytes | None] = []
    at = 0
    for _ in range(2):
        if raw[at:at + 1] != b"$":
            raise ValueError("an extra is not a bulk string")
        eol = raw.find(b"\r\n", at)
        if eol < 0:
            raise ValueError("an extra's length has no end")
        length_text = raw[at + 1:eol]
        if length_text == b"-1":
            values.append(None)
            at = eol + 2
            continue
        if not length_text.isdigit():
            raise ValueError("an extra's length is not a number")
        start = eol + 2
        end = start + int(length_text)
        if raw[end:end + 2] != b"\r\n":
            raise ValueError("an extra does not end where its length says")
        values.append(raw[start:end])
        at = end + 2
    if at != len(raw):
        raise ValueError("bytes after an event's id and metadata")
    return values[0], values[1]


def record_extras(buf, offset: int, header: RecordHeader) -> list[bytes]:
    """Each event's stored extras in the record at ``offset`` (version 4), or
    :data:`NO_EXTRAS` for each when it has none. Trusts the header (checked before)."""
    if not header.extras_length:
        return [NO_EXTRAS] * header.count
    at = offset + RECORD_HEADER_SIZE + header.stream_name_length + EVENT_ENTRY_SIZE * header.count
    lengths = array("I")
    lengths.frombytes(bytes(buf[at:at + 4 * header.count]))
    starts = list(accumulate(lengths, initial=at + 4 * header.count))
    return [bytes(buf[start:start + length]) for start, length in zip(starts, lengths)]


def event_extras(buf, offset: int, header: RecordHeader, i: int) -> bytes:
    """Event ``i``'s stored extras in the record at ``offset`` (:func:`record_extras`
    of one event, without copying the others')."""
    if not header.extras_length:
        return NO_EXTRAS
    at = offset + RECORD_HEADER_SIZE + header.stream_name_length + EVENT_ENTRY_SIZE * header.count
    lengths = array("I")
    lengths.frombytes(bytes(buf[at:at + 4 * header.count]))
    start = at + 4 * header.count + sum(lengths[:i])
    return bytes(buf[start:start + lengths[i]])


def _pairs(table: array) -> list[bytes]:
    """The 8-byte (frame_length, data_length) entries of a lengths table, one by one."""
    raw = table.tobytes()
    return [raw[i:i + EVENT_HEADER_SIZE] for i in range(0, len(raw), EVENT_HEADER_SIZE)]


def encode_single(stream: bytes, stream_id: int, position: int, number: int, name: bytes,
                  data: bytes, version: int = FORMAT_VERSION, flags: int = 0,
                  extra: bytes | None = None, timestamp_ms: int | None = None
                  ) -> tuple[bytes, int, int]:
    """:func:`encode_record` of one event, the publish path: (record, frame offset in
    the record, frame length). Same bytes, a fraction of the Python calls. (One event's
    record differs between versions 1 and 2 only in its version byte.) ``extra`` is
    the event's :func:`encode_extras` (version 4)."""
    head = b"*5\r\n+event\r\n+%s\r\n:%d\r\n+%s\r\n$%d\r\n" % (stream, number, name, len(data))
    frame_len = len(head) + len(data) + 2
    name_len = len(stream)
    if timestamp_ms is None:
        timestamp_ms = time.time_ns() // 1_000_000
    if version >= 3:
        frame = b"".join((head, data, b"\r\n"))
        if extra is not None:
            extras = _EXTRA_LENGTH.pack(len(extra)) + extra
            covered = b"".join((
                _COVERED_HEADER.pack(version, flags, name_len,
                                     name_len + EVENT_ENTRY_SIZE + len(extras) + frame_len,
                                     1, position, number, stream_id, len(extras),
                                     timestamp_ms),
                stream, EVENT_ENTRY.pack(frame_len, len(data), frame_check(frame)), extras))
            return (b"".join((RECORD_MAGIC, _CHECKSUM.pack(checksum(covered)), covered, frame)),
                    RECORD_HEADER_SIZE + name_len + EVENT_ENTRY_SIZE + len(extras), frame_len)
        covered = b"".join((
            _COVERED_HEADER.pack(version, flags, name_len, name_len + EVENT_ENTRY_SIZE + frame_len,
                                 1, position, number, stream_id, 0, timestamp_ms),
            stream, EVENT_ENTRY.pack(frame_len, len(data), frame_check(frame))))
        return (b"".join((RECORD_MAGIC, _CHECKSUM.pack(checksum(covered)), covered, frame)),
                RECORD_HEADER_SIZE + name_len + EVENT_ENTRY_SIZE, frame_len)
    covered = b"".join((
        _COVERED_HEADER.pack(version, 0, name_len, name_len + EVENT_HEADER_SIZE + frame_len,
                             1, position, number, stream_id, 0, timestamp_ms),
        stream, EVENT_HEADER.pack(frame_len, len(data)), head, data, b"\r\n"))
    return (RECORD_MAGIC + _CHECKSUM.pack(checksum(covered)) + covered,
            RECORD_HEADER_SIZE + name_len + EVENT_HEADER_SIZE, frame_len)


def checked_end(header: RecordHeader, offset: int) -> int:
    """Where the bytes that the record checksum covers end, for the record at
    ``offset``: the record's end up to version 2, the start of its frames from version
    3 on (its frames have checks of their own). May lie past the record if the header
    is damaged; the caller checks."""
    if header.version >= 3:
        return (offset + RECORD_HEADER_SIZE + header.stream_name_length
                + EVENT_ENTRY_SIZE * header.count + header.extras_length)
    return offset + header.size


def record_checksum(buf: bytes | memoryview, offset: int, end: int) -> int:
    """The checksum a record at ``offset`` should carry, whose covered bytes end at
    ``end`` (:func:`checked_end`)."""
    return checksum(memoryview(buf)[offset + CHECKSUM_END:end])


def shortened_record(buf: bytes | memoryview, offset: int, header: RecordHeader,
                     keep: int) -> bytes:
    """The record at ``offset`` (version 3) cut to its first ``keep`` events, with its
    checksum redone: what ``meilies-fsck --repair`` writes in place of a record whose
    event ``keep`` is damaged, so that the whole events before it stay."""
    assert header.version >= 3 and 0 < keep < header.count
    name_len = header.stream_name_length
    table_at = offset + RECORD_HEADER_SIZE + name_len
    table = array("I")
    table.frombytes(bytes(buf[table_at:table_at + EVENT_ENTRY_SIZE * keep]))
    frames_at = table_at + EVENT_ENTRY_SIZE * header.count + header.extras_length
    frames = bytes(buf[frames_at:frames_at + sum(table[0::3])])
    extras = (_extras_region(record_extras(buf, offset, header)[:keep])
              if header.extras_length else b"")
    # What is kept is no longer followed by the rest of a transaction.
    flags = header.flags & ~FLAG_CONTINUED
    covered = b"".join((
        _COVERED_HEADER.pack(header.version, flags, name_len,
                             name_len + EVENT_ENTRY_SIZE * keep + len(extras) + len(frames),
                             keep, header.base_position, header.first_number,
                             header.stream_id, len(extras), header.timestamp_ms),
        bytes(buf[offset + RECORD_HEADER_SIZE:table_at]), table.tobytes(), extras))
    return b"".join((RECORD_MAGIC, _CHECKSUM.pack(checksum(covered)), covered, frames))


def reseal_record(raw: bytearray, offset: int) -> None:
    """Recompute, in place, the checks of the record at ``offset`` whose bytes were
    changed on purpose (its frame checks in version 3, then its checksum), trusting its
    header and lengths: for tools and tests that build damage only a deeper check can
    see."""
    header = decode_record_header(raw, offset)
    if header.version >= 3:
        table_at = offset + RECORD_HEADER_SIZE + header.stream_name_length
        at = table_at + EVENT_ENTRY_SIZE * header.count + header.extras_length
        for i in range(header.count):
            entry = table_at + EVENT_ENTRY_SIZE * i
            frame_len, data_len, _check = EVENT_ENTRY.unpack_from(raw, entry)
            EVENT_ENTRY.pack_into(raw, entry, frame_len, data_len,
                                  frame_check(bytes(raw[at:at + frame_len])))
            at += frame_len
    digest = record_checksum(raw, offset, checked_end(header, offset))
    _CHECKSUM.pack_into(raw, offset + CHECKSUM_OFFSET, digest)
