"""The id index: event id -> global position, for idempotent appends, on disk.

Event ids are unique across the server forever (PROTOCOL.md, version 2), so every
append with ids asks, per id, "is it stored, and where?". The answer must survive
restarts and crashes, scale to 100,000,000 ids without holding them in memory, and
keep open fast. The index is a set of fixed-width, hash-addressed tables, mapped into
memory (in the spirit of Kafka's fixed-width offset indexes):

    ids-<level>.table := header slot{2**bits}
    header (64 bytes): magic:8 = b"MEILIIDX"  version:u32 = 1  bits:u32
                       checksum:u64 = xxh3_64(the 16 bytes before it)  zero:40
    slot (16 bytes):   tag:u64 = xxh3_64(id)   position_plus_one:u64 (0: empty)

Level 0 has 2**FIRST_BITS slots, each next level twice the slots of the one before; a
level takes ids until it is half full (linear probing from ``tag % slots``), then the
next level is created. Nothing is ever rehashed (no pause while a large table is
rewritten); a lookup probes every level: ~2.5 slots per level at half load, a handful
of levels for 100M ids (FIRST_BITS=20: level 7 holds 2**27 slots). A file is created
sparse: the disk holds only the pages ids were written to.

A slot is a *hint*, never trusted alone: the caller reads the event at the position
and compares its stored id (engine/writes.py). So a hash collision, or a slot left by
an append that a failed sync took back (its position later reused), costs a read and
is otherwise harmless; and the tables need no fsync per append.

``ids.state`` (written at each checkpoint, replaced atomically) says up to which
position the tables are known complete on disk and how full each level is::

    magic:8 = b"MEILIIDS"  version:u32 = 1  levels:u32  covered:u64  count:u64{levels}
    checksum:u64 = xxh3_64(everything before it)

At a checkpoint the tables are msynced first, then the state names the covered
position. Opening catches up from there by reading the ids of the records after it
(the active segment's tail, like the rest of open); without a good state it rebuilds
the tables from the whole log. The log is the source of truth: the tables are derived
data, as the other indexes are.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from pathlib import Path

import xxhash

from .errors import StorageError
from .files import ID_STATE_NAME as STATE_NAME
from .files import id_state_path
from .files import id_table_path as table_path

log = logging.getLogger("meilies.engine")

TABLE_MAGIC = b"MEILIIDX"
STATE_MAGIC = b"MEILIIDS"
VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sII")
_CHECKSUM = struct.Struct("<Q")
SLOT = struct.Struct("<QQ")
SLOT_SIZE = SLOT.size  # 16
#: Level 0's slots (2**20: 16 MiB, sparse on disk).
FIRST_BITS = 20
#: A level takes ids until this share of its slots is used.
MAX_LOAD = 0.5
_STATE_HEAD = struct.Struct("<8sIIQ")

tag_of = xxhash.xxh3_64_intdigest


class _Level:
    """One table: 2**bits slots in a mapped file."""

    def __init__(self, path: Path, bits: int, count: int, handle, mapping: mmap.mmap) -> None:
        self.path = path
        self.bits = bits
        self.slots = 1 << bits
        self.mask = self.slots - 1
        self.count = count
        self.capacity = int(self.slots * MAX_LOAD)
        self._handle = handle
        self.map = mapping

    @classmethod
    def create(cls, path: Path, bits: int) -> _Level:
        head = _HEADER.pack(TABLE_MAGIC, VERSION, bits)
        header = (head + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(head))).ljust(HEADER_SIZE,
                                                                                 b"\0")
        try:
            handle = open(path, "w+b")
            handle.write(header)
            handle.truncate(HEADER_SIZE + SLOT_SIZE * (1 << bits))  # sparse
            handle.flush()
            mapping = mmap.mmap(handle.fileno(), 0)
        except OSError as exc:
            raise StorageError(path, "create", exc) from exc
        return cls(path, bits, 0, handle, mapping)

    @classmethod
    def open(cls, path: Path, bits: int | None, count: int, readonly: bool = False
             ) -> _Level | None:
        """The table at ``path`` if it is whole (and has ``bits``, if given); None
        otherwise."""
        try:
            handle = open(path, "rb" if readonly else "r+b")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(path, "open", exc) from exc
        try:
            size = os.fstat(handle.fileno()).st_size
            header = handle.read(HEADER_SIZE)
            if len(header) < 24:
                handle.close()
                return None
            magic, version, found_bits = _HEADER.unpack_from(header)
            (digest,) = _CHECKSUM.unpack_from(header, _HEADER.size)
            if (magic, version) != (TABLE_MAGIC, VERSION) or found_bits > 40 or \
                    (bits is not None and found_bits != bits) or \
                    digest != xxhash.xxh3_64_intdigest(header[:_HEADER.size]) or \
                    size != HEADER_SIZE + SLOT_SIZE * (1 << found_bits):
                handle.close()
                return None
            bits = found_bits
            mapping = mmap.mmap(handle.fileno(), 0,
                                access=mmap.ACCESS_READ if readonly else mmap.ACCESS_WRITE)
        except OSError as exc:
            handle.close()
            raise StorageError(path, "open", exc) from exc
        return cls(path, bits, count, handle, mapping)

    def positions(self, tag: int) -> list[int]:
        """Positions of the slots carrying ``tag`` (candidates for the id)."""
        out = []
        mapping, mask, unpack = self.map, self.mask, SLOT.unpack_from
        i = tag & mask
        while True:
            found, plus_one = unpack(mapping, HEADER_SIZE + SLOT_SIZE * i)
            if not plus_one:
                return out
            if found == tag:
                out.append(plus_one - 1)
            i = (i + 1) & mask

    def insert(self, tag: int, position: int) -> None:
        mapping, mask = self.map, self.mask
        i = tag & mask
        while SLOT.unpack_from(mapping, HEADER_SIZE + SLOT_SIZE * i)[1]:
            i = (i + 1) & mask
        SLOT.pack_into(mapping, HEADER_SIZE + SLOT_SIZE * i, tag, position + 1)
        self.count += 1

    def sync(self) -> None:
        try:
            self.map.flush()
        except OSError as exc:
            raise StorageError(self.path, "msync", exc) from exc

    def close(self) -> None:
        self.map.close()
        self._handle.close()


class IdIndex:
    """The id tables of a data directory (see the module docstring)."""

    def __init__(self, directory: Path, first_bits: int = FIRST_BITS) -> None:
        self.directory = directory
        self.first_bits = first_bits
        self.levels: list[_Level] = []
        #: Position up to which every stored id is in the tables on disk.
        self.covered = 0

    @classmethod
    def open(cls, directory: Path, first_bits: int = FIRST_BITS,
             readonly: bool = False) -> IdIndex:
        """The tables as the last checkpoint left them (``covered`` says how far they
        go), or empty ones (``covered`` 0) if the state or a table is missing or
        damaged: the caller adds the ids after ``covered`` from the log. Tables that
        exist keep the first size they were made with. ``readonly`` (fsck) changes
        nothing on disk."""
        index = cls(directory, first_bits)
        state = index._read_state()
        if state is not None:
            covered, counts = state
            for level, count in enumerate(counts):
                bits = None if level == 0 else index.first_bits + level
                table = _Level.open(table_path(directory, level), bits, count, readonly)
                if table is not None and level == 0:
                    index.first_bits = table.bits
                if table is None:
                    log.warning("id table %s is missing or damaged; rebuilding the id index"
                                " from the log", table_path(directory, level).name)
                    break
                index.levels.append(table)
            else:
                index.covered = covered
                return index
            index.close()
            index.levels = []
        elif any(directory.glob("ids-*.table")):
            log.warning("%s is missing or damaged; rebuilding the id index from the log",
                        STATE_NAME)
        index.first_bits = first_bits
        if not readonly:
            index._remove_tables()
        return index

    def _read_state(self) -> tuple[int, list[int]] | None:
        path = id_state_path(self.directory)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(path, "read", exc) from exc
        if len(raw) < _STATE_HEAD.size + 8:
            return None
        magic, version, levels, covered = _STATE_HEAD.unpack_from(raw)
        end = _STATE_HEAD.size + 8 * levels
        if magic != STATE_MAGIC or version != VERSION or len(raw) != end + 8 or \
                _CHECKSUM.unpack_from(raw, end)[0] != xxhash.xxh3_64_intdigest(raw[:end]):
            return None
        counts = list(struct.unpack_from(f"<{levels}Q", raw, _STATE_HEAD.size))
        return covered, counts

    def reset(self) -> None:
        """Start empty: the tables are removed (the caller adds every id again)."""
        self.close()
        self.covered = 0
        self._remove_tables()

    def _remove_tables(self) -> None:
        for path in self.directory.glob("ids-*.table"):
            try:
                path.unlink()
            except OSError as exc:
                raise StorageError(path, "unlink", exc) from exc

    @property
    def count(self) -> int:
        """Slots used (ids added, including any a take-back left behind)."""
        return sum(level.count for level in self.levels)

    def candidates(self, event_id: bytes) -> list[int]:
        """Positions that may hold ``event_id``, newest level first: the caller checks
        each against the log."""
        tag = tag_of(event_id)
        out: list[int] = []
        for level in reversed(self.levels):
            out += level.positions(tag)
        return out

    def add(self, event_id: bytes, position: int) -> None:
        """Record that ``event_id`` is stored at ``position``."""
        if not self.levels or self.levels[-1].count >= self.levels[-1].capacity:
            level = len(self.levels)
            self.levels.append(_Level.create(table_path(self.directory, level),
                                             self.first_bits + level))
        self.levels[-1].insert(tag_of(event_id), position)

    def checkpoint(self, covered: int) -> None:
        """Make the tables durable, then record that they hold every id before
        ``covered``."""
        for level in self.levels:
            level.sync()
        head = _STATE_HEAD.pack(STATE_MAGIC, VERSION, len(self.levels), covered)
        body = head + struct.pack(f"<{len(self.levels)}Q", *(lv.count for lv in self.levels))
        raw = body + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))
        path = id_state_path(self.directory)
        tmp = path.with_name(STATE_NAME + ".tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(raw)
                handle.flush()
                os.fdatasync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise StorageError(path, "write", exc) from exc
        self.covered = covered

    def close(self) -> None:
        for level in self.levels:
            level.close()
        self.levels = []
