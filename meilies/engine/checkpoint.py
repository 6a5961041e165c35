"""The checkpoint: what opening a data directory would otherwise re-derive from every record.

Layout, version 1, little-endian::

    checkpoint := header names numbers firsts segments trailer
    header     := magic:8 = b"MEILIESC" version:u32 reserved:u32
                  stream_count:u64 segment_count:u64 names_length:u64
    names      := the stream names joined by b"\\n" (names never hold whitespace),
                  in stream-id order
    numbers    := next_number:u64 per stream (its event count)
    firsts     := first_position:u64 per stream (global position of its event 0)
    segments   := per segment, in log order:
                  base_position:u64 size:u64 event_count:u64
                  segment_hash:u64 pidx_hash:u64 sidx_hash:u64 (0 for the active segment)
    trailer    := xxh3_64 of every byte before it

The checkpoint covers the log up to the last segment's recorded ``size``; opening
re-scans only what was written after it. ``segment_hash`` is the xxhash of the
segment's first ``size`` bytes, so opening can verify old records with one C call per
segment instead of one Python call per record. A checkpoint that fails any check is
ignored with one warning and the state is rebuilt from the log: it is derived data.
It is written to ``checkpoint.tmp``, fsynced, and renamed over ``checkpoint``.
"""

from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path

from .errors import CorruptIndex
from .files import checkpoint_path, fsync_directory
from .format import checksum

MAGIC = b"MEILIESC"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQ")
SEGMENT = struct.Struct("<QQQQQQ")
TRAILER = struct.Struct("<Q")


@dataclass
class SegmentState:
    base_position: int
    size: int
    event_count: int
    segment_hash: int
    pidx_hash: int
    sidx_hash: int


@dataclass
class Checkpoint:
    names: list[bytes]
    next_number: array  # 'Q', per stream id
    first_position: array  # 'Q', per stream id
    segments: list[SegmentState]


def write(directory: Path, state: Checkpoint) -> None:
    """Atomically replace the checkpoint of ``directory`` with ``state``."""
    names = b"\n".join(state.names)
    parts = [
        HEADER.pack(MAGIC, VERSION, 0, len(state.names), len(state.segments), len(names)),
        names,
        state.next_number.tobytes(),
        state.first_position.tobytes(),
        b"".join(SEGMENT.pack(s.base_position, s.size, s.event_count, s.segment_hash,
                              s.pidx_hash, s.sidx_hash) for s in state.segments),
    ]
    body = b"".join(parts)
    path = checkpoint_path(directory)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(body + TRAILER.pack(checksum(body)))
        while view:
            view = view[os.write(fd, view):]
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_directory(directory)


def read(directory: Path) -> Checkpoint | None:
    """The checkpoint of ``directory``; None if there is none.

    Raises :class:`CorruptIndex` if it exists but fails a check.
    """
    path = checkpoint_path(directory)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(raw) < HEADER.size + TRAILER.size:
        raise CorruptIndex(path, "too short")
    body, (stored,) = raw[:-TRAILER.size], TRAILER.unpack_from(raw, len(raw) - TRAILER.size)
    if checksum(body) != stored:
        raise CorruptIndex(path, "checksum mismatch")
    magic, version, _reserved, n_streams, n_segments, names_len = HEADER.unpack_from(body, 0)
    if magic != MAGIC or version != VERSION:
        raise CorruptIndex(path, f"unknown magic or version {version}")
    expected = HEADER.size + names_len + 16 * n_streams + SEGMENT.size * n_segments
    if len(body) != expected:
        raise CorruptIndex(path, f"size {len(body)} does not match its header ({expected})")
    at = HEADER.size
    names = body[at:at + names_len].split(b"\n") if n_streams else []
    if len(names) != n_streams:
        raise CorruptIndex(path, "stream name count does not match its header")
    at += names_len
    next_number = array("Q")
    next_number.frombytes(body[at:at + 8 * n_streams])
    at += 8 * n_streams
    first_position = array("Q")
    first_position.frombytes(body[at:at + 8 * n_streams])
    at += 8 * n_streams
    segments = [SegmentState(*SEGMENT.unpack_from(body, at + i * SEGMENT.size))
                for i in range(n_segments)]
    return Checkpoint(names, next_number, first_position, segments)
