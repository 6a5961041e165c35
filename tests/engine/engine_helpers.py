"""Helpers for the engine tests: damage named after the damage, and the expected bytes.

Damage helpers act on real files the engine wrote (LevelDB ``log_test.cc`` style:
``IncrementByte``, ``ShrinkSize``, ``FixChecksum``). They never touch the engine's
objects: a test writes a log, closes (or crash-copies) it, damages the files, reopens.

(This module is named ``engine_helpers`` rather than ``helpers`` because test folders
have no ``__init__.py``: pytest puts each folder on ``sys.path`` and two modules of the
same name in different test folders would clash.)
"""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from meilies.engine import format as fmt
from meilies.engine.files import LOCK_NAME, SEGMENT_SUFFIX


# -- expected bytes -----------------------------------------------------------------------


def resp_frame(stream: bytes, number: int, name: bytes, data: bytes) -> bytes:
    """The RESP2 reply a subscriber receives for one event (PROTOCOL.md)."""
    return (b"*5\r\n+event\r\n+" + stream + b"\r\n:" + str(number).encode() + b"\r\n+"
            + name + b"\r\n$" + str(len(data)).encode() + b"\r\n" + data + b"\r\n")


def read_everything(engine) -> list[tuple[bytes, int, bytes, bytes, int]]:
    """Every visible event as (stream, number, name, data, position), in log order."""
    return [(e.stream, e.number, e.name, bytes(e.data), e.position) for e in engine.read_all()]


def read_stream_plain(engine, stream: bytes, start: int = 0, stop: int | None = None
                      ) -> list[tuple[int, bytes, bytes]]:
    return [(e.number, e.name, bytes(e.data)) for e in engine.read_stream(stream, start, stop)]


# -- the files of a data directory ----------------------------------------------------------


def segment_files(directory: Path) -> list[Path]:
    """The segment files of ``directory`` in log order."""
    return sorted(p for p in Path(directory).iterdir() if p.suffix == SEGMENT_SUFFIX)


def newest_segment(directory: Path) -> Path:
    return segment_files(directory)[-1]


@dataclass(frozen=True)
class RecordSpan:
    offset: int
    size: int
    stream: bytes
    count: int
    base_position: int

    @property
    def end(self) -> int:
        return self.offset + self.size


def record_spans(path: Path) -> list[RecordSpan]:
    """Where each record of an undamaged segment sits, read from the record headers."""
    raw = Path(path).read_bytes()
    spans = []
    at = fmt.SEGMENT_HEADER_SIZE
    while at + fmt.RECORD_HEADER_SIZE <= len(raw):
        header = fmt.decode_record_header(raw, at)
        assert header.magic == fmt.RECORD_MAGIC, f"{path} is damaged at {at}"
        name = raw[at + fmt.RECORD_HEADER_SIZE:at + fmt.RECORD_HEADER_SIZE
                   + header.stream_name_length]
        spans.append(RecordSpan(at, header.size, name, header.count, header.base_position))
        at += header.size
    assert at == len(raw), f"{path} has {len(raw) - at} bytes after its last record"
    return spans


def crash_copy(source: Path, destination: Path) -> Path:
    """Copy a data directory as a crash would leave it: taken while the engine is open.

    What the engine wrote is in the page cache, so a copy sees the same bytes a
    restart after ``kill -9`` sees. The lock file is left behind (the kernel drops a
    dead process's lock). ``close()`` would write a checkpoint; a crash does not.
    """
    destination.mkdir(parents=True)
    for entry in Path(source).iterdir():
        if entry.name != LOCK_NAME:
            shutil.copy2(entry, destination / entry.name)
    return destination


def copy_dir(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


# -- damage ---------------------------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    """Invert every bit of the byte at ``offset`` (bit rot)."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        old = handle.read(1)
        assert len(old) == 1, f"{path} has no byte at {offset}"
        handle.seek(offset)
        handle.write(bytes([old[0] ^ 0xFF]))


def shrink_tail(path: Path, nbytes: int) -> None:
    """Drop the last ``nbytes`` of the file (a write the crash cut short)."""
    size = Path(path).stat().st_size
    truncate_file(path, size - nbytes)


def truncate_file(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


def append_garbage(path: Path, garbage: bytes) -> None:
    """Add bytes after the last record (a preallocated or half-written tail)."""
    with open(path, "ab") as handle:
        handle.write(garbage)


def fix_checksum(path: Path, offset: int) -> None:
    """Recompute the checksum of the record at ``offset`` after its bytes were changed,
    so that only a whole-segment hash can tell the damage."""
    raw = bytearray(Path(path).read_bytes())
    fmt.reseal_record(raw, offset)
    Path(path).write_bytes(bytes(raw))


def rewrite_segment_header(path: Path, *, version: int) -> None:
    """Give a segment a header of another format version, with a correct checksum."""
    raw = bytearray(Path(path).read_bytes())
    magic, _version, header_size, base, _digest = fmt.SEGMENT_HEADER.unpack_from(raw, 0)
    head = fmt.SEGMENT_HEADER.pack(magic, version, header_size, base, 0)
    digest = fmt.checksum(head[:fmt.SEGMENT_CHECKSUM_OFFSET])
    raw[:fmt.SEGMENT_HEADER_SIZE] = head[:fmt.SEGMENT_CHECKSUM_OFFSET] + struct.pack("<Q", digest)
    Path(path).write_bytes(bytes(raw))
