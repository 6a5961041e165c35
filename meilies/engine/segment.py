"""One segment file: appended to while active, read-only and fully indexed once sealed.

Writes go through ``os.pwritev`` (the records queued since the last write, as they
are) at the segment's known end, so a failed or partial write is cut off again with
``ftruncate`` and never becomes part of the log. Reads go
through ``mmap``: a sealed segment is mapped once; the active one is remapped at its
new size when a reader needs bytes past the current map (never ``mmap.resize``, which
fails while readers hold views). Old maps stay alive for as long as views of them do.

Not thread-safe: the engine serialises all access.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

from . import format as fmt
from .checkpoint import SegmentState
from .errors import CorruptSegment, StorageError, UnsupportedFormatVersion
from .files import fsync_directory, position_index_path, segment_path, stream_index_path
from .framecopy import SegmentCopy
from .index import ActiveIndex, SealedIndex, close_map, sorted_stream_index, write_file

#: Most buffers one pwritev takes (the kernel refuses more).
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


class Segment:
    def __init__(self, directory: Path, base_position: int, size: int) -> None:
        self.directory = directory
        self.base_position = base_position
        self.path = segment_path(directory, base_position)
        #: Bytes of log (header included): written, plus appended but not yet flushed.
        self.size = size
        #: The format version of the segment's header, and so of every record in it.
        self.version = fmt.FORMAT_VERSION
        #: Bytes of log in the file; records past it wait in ``_unwritten``.
        self.written = size
        self._unwritten: list[bytes] = []
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self.hasher = fmt.Hasher()
        self.index: ActiveIndex | SealedIndex = ActiveIndex()
        self.stream_index: SealedIndex | None = None
        self.state: SegmentState | None = None  # set once sealed
        #: Its frame copy through its life (framecopy.py).
        self.copies = SegmentCopy(self)

    # -- life cycle ----------------------------------------------------------------------

    @classmethod
    def create(cls, directory: Path, base_position: int) -> Segment:
        """Create an empty active segment (header only), durable with its name."""
        segment = cls(directory, base_position, fmt.SEGMENT_HEADER_SIZE)
        header = fmt.encode_segment_header(base_position)
        try:
            fd = os.open(segment.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise StorageError(segment.path, "create", exc) from exc
        try:
            os.pwrite(fd, header, 0)
            os.fdatasync(fd)
            fsync_directory(directory)
        except OSError as exc:
            os.close(fd)
            os.unlink(segment.path)
            raise StorageError(segment.path, "create", exc) from exc
        segment._fd = fd
        segment.hasher.update(header)
        return segment

    @classmethod
    def open_existing(cls, directory: Path, base_position: int) -> Segment:
        """Open a segment file and check its header; its records are checked by the caller."""
        segment = cls(directory, base_position, 0)
        size = segment.path.stat().st_size
        with open(segment.path, "rb") as handle:
            raw = handle.read(fmt.SEGMENT_HEADER_SIZE)
        if len(raw) < fmt.SEGMENT_HEADER_SIZE:
            raise CorruptSegment(segment.path, 0, f"file of {size} bytes is shorter than"
                                 " a segment header")
        header = fmt.decode_segment_header(raw)
        if header.magic != fmt.SEGMENT_MAGIC:
            raise CorruptSegment(segment.path, 0, "not a MeiliES segment (bad magic)")
        # The checksum before the version: a flipped bit in the version field is damage,
        # not a file from the future (every version keeps this 32-byte header; format.py).
        if not header.checksum_ok:
            raise CorruptSegment(segment.path, 0, "segment header checksum mismatch")
        if header.version > fmt.FORMAT_VERSION or header.version not in fmt.FORMAT_HISTORY:
            raise UnsupportedFormatVersion(segment.path, header.version, fmt.FORMAT_VERSION)
        if header.header_size != fmt.SEGMENT_HEADER_SIZE:
            raise CorruptSegment(segment.path, 0, f"segment header size {header.header_size},"
                                 f" expected {fmt.SEGMENT_HEADER_SIZE}")
        if header.base_position != base_position:
            raise CorruptSegment(segment.path, 0, f"header says base position"
                                 f" {header.base_position}, the file name {base_position}")
        segment.size = segment.written = size
        segment.version = header.version
        return segment

    @staticmethod
    def torn_at_creation(directory: Path, base_position: int) -> int | None:
        """The size of a segment file that is shorter than its header and holds only a
        prefix of the header :meth:`create` writes (or zeros); None for any other file."""
        path = segment_path(directory, base_position)
        with open(path, "rb") as handle:
            raw = handle.read(fmt.SEGMENT_HEADER_SIZE)
        if len(raw) >= fmt.SEGMENT_HEADER_SIZE:
            return None
        headers = [fmt.encode_segment_header(base_position, version)[:len(raw)]
                   for version in fmt.FORMAT_HISTORY]
        if raw not in headers and any(raw):
            return None
        return len(raw)

    def file_size(self) -> int:
        return os.stat(self.path).st_size

    def activate(self) -> None:
        """Open for appending at ``size`` (after recovery has set it)."""
        self._fd = os.open(self.path, os.O_RDWR)

    def seal(self) -> SegmentState:
        """Write the indexes of a full segment and make it read-only. The log is synced.

        The segment must be open for writing (:meth:`create` or :meth:`activate`): a
        segment is sealed once, by the roll that fills it or by the recovery that finds
        it full but not yet sealed, and both have just written or scanned it.
        """
        assert isinstance(self.index, ActiveIndex) and self._fd is not None
        self.sync()
        entries = bytes(self.index.entries)
        sidx = sorted_stream_index(entries)
        for path, data in ((position_index_path(self.directory, self.base_position), entries),
                           (stream_index_path(self.directory, self.base_position), sidx)):
            try:
                write_file(path, data)
            except OSError as exc:  # still active: a later roll tries again
                raise StorageError(path, "write", exc) from exc
        self.copies.seal()  # after the indexes: a failed seal leaves the segment active
        os.close(self._fd)
        self._fd = None
        self.state = SegmentState(self.base_position, self.size, len(entries) // 24,
                                  self.hasher.intdigest(), fmt.checksum(entries),
                                  fmt.checksum(sidx))
        self.load_sealed_indexes()
        return self.state

    def load_sealed_indexes(self) -> None:
        self.index = SealedIndex(position_index_path(self.directory, self.base_position))
        self.stream_index = SealedIndex(stream_index_path(self.directory, self.base_position))

    def close(self) -> None:
        self.copies.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._map is not None:
            close_map(self._map)
            self._map = None
        if isinstance(self.index, SealedIndex):
            self.index.close()
        if self.stream_index is not None:
            self.stream_index.close()

    # -- writing --------------------------------------------------------------------------

    @property
    def is_active(self) -> bool:
        return self._fd is not None

    def append(self, data: bytes) -> int:
        """Queue ``data`` at the end; return its offset. :meth:`flush` writes it."""
        offset = self.size
        self._unwritten.append(data)
        self.size = offset + len(data)
        return offset

    @property
    def has_unwritten(self) -> bool:
        return bool(self._unwritten)

    def flush(self) -> None:
        """Write what :meth:`append` queued, in one ``pwritev`` (no joined copy). All or
        nothing: on failure the file is cut back to where it was, the queue is dropped
        and :class:`StorageError` is raised."""
        records = self._unwritten
        if not records:
            return
        offset = self.written
        total = self.size - offset
        try:
            at = offset
            for first in range(0, len(records), IOV_MAX):
                chunk = records[first:first + IOV_MAX]
                size = sum(map(len, chunk))
                written = os.pwritev(self._fd, chunk, at)
                if written < size:  # rare: a short write; the rest as one buffer
                    with memoryview(b"".join(chunk)) as view:
                        while written < size:
                            more = os.pwrite(self._fd, view[written:], at + written)
                            if more == 0:
                                raise OSError(errno.EIO, "a write stored nothing")
                            written += more
                at += size
        except OSError as exc:
            self._unwritten = []
            self.size = offset
            self._cut_back(offset)
            raise StorageError(self.path, "write", exc) from exc
        self._unwritten = []
        self.written = offset + total
        update = self.hasher.update
        for record in records:
            update(record)

    def _cut_back(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
        except OSError as exc:
            raise StorageError(self.path, "truncate after a failed write", exc) from exc

    def truncate_to(self, size: int) -> None:
        """Drop bytes at or past ``size`` that were written but not kept (recovery,
        a failed sync). Rehashes the kept prefix."""
        self._cut_back(size)
        self._unwritten.clear()
        self.size = self.written = size
        self.hasher = fmt.Hasher()
        self.hasher.update(self.buffer(size)[:size] if size else b"")

    def fileno(self) -> int:
        """The descriptor of the open (active) segment file."""
        assert self._fd is not None, "only the active segment is open for writing"
        return self._fd

    def sync(self) -> None:
        """fdatasync the segment: everything appended so far is on stable storage."""
        if self._fd is None:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise StorageError(self.path, "fdatasync", exc) from exc

    # -- reading --------------------------------------------------------------------------

    def buffer(self, end: int) -> mmap.mmap:
        """A read-only map that covers at least the first ``end`` bytes."""
        if self._map is None or len(self._map) < end:
            size = self.file_size()
            if size < end:
                raise ValueError(f"{self.path}: {end} bytes wanted, the file has {size}")
            with open(self.path, "rb") as handle:
                new_map = mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ)
            old, self._map = self._map, new_map
            if old is not None:
                close_map(old)
        return self._map
