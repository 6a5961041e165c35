"""Frame copies: a segment's frames once more, back to back in position order.

Why. A record ends with its last frame and the next record's header follows it, so
events published one at a time (one record each) lie in the log with a header between
every two frames, and a catch-up must cut each frame out with its own copy: ~1,100 of
the ~1,650 instructions a catch-up spends per such event (README, "Reads"). A batch's
frames are one slice. A frame copy makes every run of positions one slice, whatever
its records: a ``$all@p`` catch-up, and the catch-up of a stream whose events are
consecutive positions, read single events the way they read batches.

What it costs. The frames again on disk (a 100-byte event published alone: 211 bytes in
its segment, 142 in the copy), 4 bytes per event, and on the append path one gather per
COPY_BATCH visible events plus one ``write`` (no fsync). Segments of batches gain
nothing from a copy: a segment's copy starts at the first window of COPY_BATCH events
whose records average fewer than BATCH_RUN events, so a segment of batches has none,
and one that turns to single events has one from there on.

Derived data, never needed for correctness. Nothing is fsynced: a copy is checked
before it is trusted, and any copy that fails a check is dropped (with a warning) and
its segment read from the log as before. Nothing that writes the log waits on a copy:
a copy that cannot be written is given up, and the append goes on.

File layout (``<base>.frm``, written whole when the segment is sealed; little-endian)::

    frames      the frames of entries ``first`` .. the segment's last, in position
                order, back to back
    ends        count x u32: ends[k] = where the frame of entry ``first + k`` ends in
                ``frames``
    block_sums  ceil(frames_length / block_size) x u64: xxh3_64 of each block_size
                bytes of ``frames`` (the last block may be shorter)
    footer (72 bytes):
        offset size field
        0      8    magic = "MEILIEFC"
        8      4    version = 1
        12     4    block_size (bytes)
        16     8    base_position: the segment's
        24     8    first: the first entry (position delta) copied
        32     8    count: entries copied (first + count = the segment's events)
        40     8    frames_length: bytes of ``frames``
        48     8    segment_size: the segment's size in bytes
        56     8    segment_hash: xxh3_64 of the whole segment file (the checkpoint's)
        64     8    checksum = xxh3_64(ends, block_sums, footer[0:64])

A copy belongs to exactly the segment whose size and hash its footer names (a segment
``meilies-fsck --repair`` cut or rewrote has another). The footer and the tables are
checked when a reader first needs the copy; each block of frames when a reader first
touches it. So opening a data directory reads no copy.

The active segment's copy grows in ``<base>.frm.tmp`` (frames only; its ends and block
sums are kept in memory) and becomes ``<base>.frm`` when the segment is sealed. After a
crash (or any close) the ``.tmp`` file is deleted on open and the active segment's copy
is made again from the log, COPY_STEP events per append, so that opening does not wait
for it.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
import struct
from array import array
from collections.abc import Iterator
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING

from . import format as fmt
from .errors import BadFrameCopy
from .files import frame_copy_path
from .index import WORDS_PER_ENTRY, FRAME_LENGTH_WORD, FRAME_OFFSET_WORD, close_map
from .spans import runs

if TYPE_CHECKING:
    from .segment import Segment

log = logging.getLogger("meilies.engine")

FOOTER = struct.Struct("<8sIIQQQQQQQ")
FOOTER_SIZE = FOOTER.size  # 72
MAGIC = b"MEILIEFC"
VERSION = 1
#: Bytes of frames per checked block: what a reader hashes the first time it touches one.
BLOCK_SIZE = 1024 * 1024
#: The active segment's visible events are copied this many at a time (and at sealing).
COPY_BATCH = 2048
#: At most this many events are copied by one step (a copy catching up after an open).
COPY_STEP = 4 * COPY_BATCH
#: A copy starts at the first window of events whose records average fewer than this
#: many events (a record's frames are one run in the log already).
BATCH_RUN = 8
#: Events compared at a time by :meth:`SealedCopy.verify`.
VERIFY_BATCH = 65536


class ActiveCopy:
    """The copy of the active segment, growing in ``<base>.frm.tmp``."""

    def __init__(self, path: Path, base_position: int, first: int) -> None:
        self.path = path
        self.tmp_path = path.with_name(path.name + ".tmp")
        self.base_position = base_position
        #: The first entry (position delta) of the segment the copy holds.
        self.first = first
        #: ends[k]: where the frame of entry ``first + k`` ends in the copy.
        self.ends = array("I")
        self.block_sums = array("Q")
        self._block = fmt.Hasher()
        self._block_fill = 0
        self._map: mmap.mmap | None = None
        self._fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    @property
    def copied(self) -> int:
        """Entries ``first`` .. ``copied - 1`` of the segment are readable here."""
        return self.first + len(self.ends)

    @property
    def frames_length(self) -> int:
        return self.ends[-1] if self.ends else 0

    @property
    def size(self) -> int:
        """Bytes on disk (the ends and sums are still in memory)."""
        return self.frames_length

    def extend(self, log_buf, index_buf, stop: int) -> None:
        """Copy the frames of index entries ``copied`` .. ``stop-1`` (``index_buf``: the
        segment's position index, ``log_buf``: a map of the segment)."""
        first = self.copied
        if stop <= first:
            return
        with memoryview(index_buf) as raw, raw.cast("I") as words:
            lengths, starts, sizes = _entry_runs(words, first, stop)
        data = _gather(log_buf, starts, sizes)
        at = self.frames_length
        _write_all(self._fd, data)
        self.ends.extend(_ends(at, lengths))
        self._hash(data)

    def _hash(self, data: bytes) -> None:
        """Feed ``data`` (the copy's next bytes) to the block sums."""
        with memoryview(data) as view:
            taken = 0
            while taken < len(view):
                room = BLOCK_SIZE - self._block_fill
                piece = view[taken:taken + room]
                self._block.update(piece)
                self._block_fill += len(piece)
                taken += len(piece)
                if self._block_fill == BLOCK_SIZE:
                    self.block_sums.append(self._block.intdigest())
                    self._block = fmt.Hasher()
                    self._block_fill = 0

    def buffer(self, end: int):
        """A read-only map of the copy that covers at least its first ``end`` bytes."""
        if self._map is None or len(self._map) < end:
            with open(self.tmp_path, "rb") as handle:
                new_map = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
            old, self._map = self._map, new_map
            if old is not None:
                close_map(old)
        return self._map

    def seal(self, segment_size: int, segment_hash: int) -> SealedCopy:
        """Write the tables and the footer, and rename the file to ``<base>.frm``."""
        sums = array("Q", self.block_sums)
        if self._block_fill:
            sums.append(self._block.intdigest())
        tables = self.ends.tobytes() + sums.tobytes()
        fields = FOOTER.pack(MAGIC, VERSION, BLOCK_SIZE, self.base_position, self.first,
                             len(self.ends), self.frames_length, segment_size, segment_hash,
                             0)[:FOOTER_SIZE - 8]
        checksum = fmt.checksum(tables + fields)
        _write_all(self._fd, tables + fields + checksum.to_bytes(8, "little"))
        os.close(self._fd)
        self._fd = None
        os.replace(self.tmp_path, self.path)
        if self._map is not None:
            close_map(self._map)
            self._map = None
        copy = SealedCopy.open(self.path, self.base_position, self.copied, segment_size,
                               segment_hash)
        copy.verified[:] = b"\x01" * len(copy.verified)  # written by us just now
        return copy

    def span(self, first: int, stop: int, budget: int, at_least_one: bool
             ) -> tuple[int, memoryview | None]:
        """See :meth:`SealedCopy.span`: the same over the copied part."""
        taken, start, end = _cut(self.ends, first - self.first, stop - self.first, budget,
                                 at_least_one)
        if not taken:
            return 0, None
        return taken, memoryview(self.buffer(end))[start:end]

    def discard(self) -> None:
        """Give the copy up: close and delete its file."""
        self.close()
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._map is not None:
            close_map(self._map)
            self._map = None


class SealedCopy:
    """The checked copy of a sealed segment, mapped read-only."""

    def __init__(self, path: Path, buf: mmap.mmap, first: int, count: int,
                 frames_length: int, sums_at: int) -> None:
        self.path = path
        self._map = buf
        #: Entries ``first`` .. ``first + count - 1`` (the segment's last) are here.
        self.first = first
        self.count = count
        self.frames_length = frames_length
        view = memoryview(buf)
        self.ends = view[frames_length:frames_length + 4 * count].cast("I")
        blocks = -(-frames_length // BLOCK_SIZE)
        self.block_sums = view[sums_at:sums_at + 8 * blocks].cast("Q")
        self.frames = view[:frames_length]
        #: verified[b]: block b's sum was checked.
        self.verified = bytearray(blocks)

    @property
    def copied(self) -> int:
        return self.first + self.count

    @property
    def size(self) -> int:
        """Bytes on disk."""
        return len(self._map)

    @classmethod
    def open(cls, path: Path, base_position: int, count: int, segment_size: int,
             segment_hash: int) -> SealedCopy:
        """Map and check the copy at ``path`` for the segment described (``count``: its
        events); raise :class:`BadFrameCopy` when it is not that segment's undamaged
        copy, up to its last event."""
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size < FOOTER_SIZE:
                    raise BadFrameCopy(path, f"{size} bytes, shorter than a footer")
                buf = mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ)
        except OSError as exc:
            raise BadFrameCopy(path, f"cannot be read: {exc.strerror or exc}") from exc
        try:
            (magic, version, block_size, base, first, events, frames_length, seg_size,
             seg_hash, checksum) = FOOTER.unpack_from(buf, size - FOOTER_SIZE)
            if magic != MAGIC or version != VERSION or block_size != BLOCK_SIZE:
                raise BadFrameCopy(path, "not a frame copy of this version")
            blocks = -(-frames_length // BLOCK_SIZE)
            sums_at = frames_length + 4 * events
            if sums_at + 8 * blocks + FOOTER_SIZE != size:
                raise BadFrameCopy(path, "its size does not match its footer")
            if fmt.checksum(memoryview(buf)[frames_length:size - 8]) != checksum:
                raise BadFrameCopy(path, "its footer or tables fail their checksum")
            if (base, first + events, seg_size, seg_hash) != (base_position, count,
                                                               segment_size, segment_hash):
                raise BadFrameCopy(path, "it is the copy of another segment (or of this one"
                              " before it was changed)")
            copy = cls(path, buf, first, events, frames_length, sums_at)
            if events and copy.ends[events - 1] != frames_length:
                copy.close()
                raise BadFrameCopy(path, "its ends do not match its frames")
            return copy
        except BaseException:
            close_map(buf)
            raise

    def span(self, first: int, stop: int, budget: int, at_least_one: bool
             ) -> tuple[int, memoryview | None]:
        """The frames of events (segment entries) ``first`` .. as far before ``stop``
        as ``budget`` bytes allow (at least one if ``at_least_one``), as one view:
        (events taken, view or None). Raises :class:`BadFrameCopy` for a damaged block."""
        taken, start, end = _cut(self.ends, first - self.first, stop - self.first, budget,
                                 at_least_one)
        if not taken:
            return 0, None
        self._check(start, end)
        return taken, self.frames[start:end]

    def _check(self, start: int, end: int) -> None:
        verified = self.verified
        for block in range(start // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1):
            if not verified[block]:
                at = block * BLOCK_SIZE
                data = self.frames[at:min(at + BLOCK_SIZE, self.frames_length)]
                if fmt.checksum(data) != self.block_sums[block]:
                    raise BadFrameCopy(self.path, f"block {block} (bytes {at} on) fails its"
                                  " checksum")
                verified[block] = 1

    def verify(self, log_buf, index_buf) -> None:
        """Check the whole copy against its segment (``log_buf``, a map of it) and the
        segment's position index (``index_buf``, checked against the log by the
        caller): every block sum, every end, every frame. Raises
        :class:`BadFrameCopy` naming the first event that differs. ``meilies-fsck``."""
        if self.frames_length:
            self._check(0, self.frames_length)
        with memoryview(index_buf) as raw, raw.cast("I") as words:
            for first in range(0, self.count, VERIFY_BATCH):
                stop = min(self.count, first + VERIFY_BATCH)
                lengths, starts, sizes = _entry_runs(words, self.first + first,
                                                     self.first + stop)
                at = self.ends[first - 1] if first else 0
                ends = array("I", _ends(at, lengths))
                if self.ends[first:stop] != ends:
                    k = self.first + first + next(i for i, (a, b) in enumerate(
                        zip(self.ends[first:stop], ends)) if a != b)
                    raise BadFrameCopy(self.path, f"the end of event {k}'s frame is wrong")
                if self.frames[at:ends[-1]] != _gather(log_buf, starts, sizes):
                    lo = (self.first + first) * WORDS_PER_ENTRY
                    hi = (self.first + stop) * WORDS_PER_ENTRY
                    offsets = words[lo + FRAME_OFFSET_WORD:hi:WORDS_PER_ENTRY].tolist()
                    for k, (offset, length) in enumerate(zip(offsets, lengths), first):
                        end = self.ends[k]
                        if self.frames[end - length:end] != log_buf[offset:offset + length]:
                            raise BadFrameCopy(self.path, f"the frame of event"
                                               f" {self.first + k} (position delta"
                                               f" {self.first + k}) differs from the log")

    def close(self) -> None:
        for view in (self.ends, self.block_sums, self.frames):
            view.release()
        close_map(self._map)


class SegmentCopy:
    """One segment's frame copy through its life: started at the first window of single
    events, followed as events become visible, sealed with the segment, checked when a
    reader first needs it, dropped on any mismatch. Best effort throughout: a copy that
    cannot be written is given up with a warning, and nothing that writes the log fails
    or waits because of it. A :class:`~meilies.engine.segment.Segment` owns one
    (``Segment.copies``); this reads the segment's index, map, size, hash and state.
    """

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.path = frame_copy_path(segment.directory, segment.base_position)
        #: The copy once made or checked; None without one.
        self.copy: ActiveCopy | SealedCopy | None = None
        #: False until a sealed segment's copy file was looked at (it is, at first use).
        self._looked = False
        #: The segment's index count at which the next part of the copy is made (or the
        #: next window looked at, before it starts); None once the copy is given up.
        self._next: int | None = COPY_BATCH
        #: Before a copy starts: the entries before this were of batches (no copy).
        self._checked = 0
        #: The size of a sealed segment's copy file while it is not looked at yet.
        self._file_bytes: int | None = None

    def seal(self) -> None:
        """Finish the frame copy (or make it, or adopt a file that is already this
        segment's copy) and rename it into place. Best effort: it is derived data."""
        segment = self.segment
        self._looked = True
        count, digest = segment.index.count, segment.hasher.intdigest()
        path = self.path
        if self._next is not None and self.copy is None:
            try:  # sealed once already (a crash before the checkpoint said so)
                self.copy = SealedCopy.open(path, segment.base_position, count, segment.size,
                                            digest)
                return
            except BadFrameCopy:
                pass  # none, or not this segment's
            start = self._checked
            if mostly_single_events(segment.index.entries, start, count):
                self._start(start)
        if self.copy is None:  # none, nor one left by an earlier seal of this segment
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # checked, and dropped, when a reader first needs it
                log.warning("could not delete the old frame copy of %s: %s",
                            segment.path.name, exc)
            return
        try:
            self.copy.extend(segment.buffer(segment.written), segment.index.entries, count)
            self.copy = self.copy.seal(segment.size, digest)
        except (OSError, BadFrameCopy) as exc:
            self._give_up(exc)

    def follow(self) -> None:
        """Extend the active segment's frame copy towards its visible events (called as
        they become visible: cheap unless COPY_BATCH of them wait). One call copies at
        most COPY_STEP events, so that a copy that is far behind (the active segment
        of a directory just opened) catches up over several appends, not in one."""
        segment = self.segment
        next_at = self._next
        count = segment.index.count
        if next_at is None or count < next_at:
            return
        if self.copy is None:  # not started: is the next window worth it?
            start = self._checked
            stop = min(count, start + COPY_STEP)
            if not mostly_single_events(segment.index.entries, start, stop):
                self._checked = stop
                self._next = stop + COPY_BATCH if stop == count else stop
                return
            if not self._start(start):
                return
        stop = min(count, self.copy.copied + COPY_STEP)
        try:
            self.copy.extend(segment.buffer(segment.written), segment.index.entries, stop)
        except OSError as exc:
            self._give_up(exc)
            return
        self._next = stop + COPY_BATCH if stop == count else stop

    def _start(self, first: int) -> bool:
        try:
            self.copy = ActiveCopy(self.path, self.segment.base_position, first)
        except OSError as exc:
            self._give_up(exc)
            return False
        return True

    def current(self) -> ActiveCopy | SealedCopy | None:
        """The segment's usable frame copy, or None. A sealed segment's copy file is
        opened and checked the first time it is asked for."""
        segment = self.segment
        if not self._looked and segment.state is not None:
            self._looked = True
            path = self.path
            state = segment.state
            try:
                self.copy = SealedCopy.open(path, segment.base_position, state.event_count,
                                            state.size, state.segment_hash)
            except BadFrameCopy as exc:
                if path.exists():
                    self.drop(exc)
        return self.copy

    def disk_bytes(self) -> int:
        """Bytes of the frame copy on disk (a sealed segment's copy file not looked at
        yet: its size, found once)."""
        segment = self.segment
        if self.copy is not None:
            return self.copy.size
        if self._looked or segment.state is None:
            return 0
        if self._file_bytes is None:
            try:
                self._file_bytes = os.stat(self.path).st_size
            except FileNotFoundError:
                self._file_bytes = 0
        return self._file_bytes

    def drop(self, error: BadFrameCopy) -> None:
        """A frame copy failed a check: warn, delete it and read the segment from now on."""
        segment = self.segment
        log.warning("dropping the frame copy of %s (reads use the segment): %s",
                    segment.path.name, error.reason)
        copy, self.copy = self.copy, None
        self._next = None
        if copy is not None:
            copy.close()
        try:
            os.unlink(error.path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # it is checked again, and dropped, at the next open
            log.warning("could not delete %s: %s", error.path, exc)

    def _give_up(self, error: OSError | BadFrameCopy) -> None:
        """Stop copying: the copy cannot be written."""
        segment = self.segment
        log.warning("giving up the frame copy of %s (reads use the segment): %s",
                    segment.path.name, error)
        copy, self.copy = self.copy, None
        self._next = None
        if isinstance(copy, ActiveCopy):
            copy.discard()
        elif copy is not None:
            copy.close()


    def close(self) -> None:
        if self.copy is not None:
            self.copy.close()
            self.copy = None


def mostly_single_events(index_buf, first: int, stop: int) -> bool:
    """Whether the records holding entries ``first`` .. ``stop - 1`` of a position index
    average fewer than BATCH_RUN events: the window a copy is worth starting at."""
    if stop <= first:
        return False
    with memoryview(index_buf) as raw, raw.cast("I") as words:
        _lengths, starts, _sizes = _entry_runs(words, first, stop)
    return len(starts) * BATCH_RUN > stop - first


def _entry_runs(words, first: int, stop: int) -> tuple[list[int], list[int], list[int]]:
    """Frame lengths of position-index entries ``first`` .. ``stop - 1`` (``words``: the
    index as u32s), and the byte ranges (starts, sizes) of the log that hold them, one
    per run of back-to-back frames (spans.runs)."""
    lo, hi = first * WORDS_PER_ENTRY, stop * WORDS_PER_ENTRY
    lengths = words[lo + FRAME_LENGTH_WORD:hi:WORDS_PER_ENTRY].tolist()
    return (lengths, *runs(words, lo + FRAME_OFFSET_WORD, WORDS_PER_ENTRY, lengths,
                           sum(lengths)))


def _gather(log_buf, starts: list[int], sizes: list[int]) -> bytes:
    """The byte ranges of the log joined: the frames they hold, back to back."""
    return b"".join([log_buf[a:a + n] for a, n in zip(starts, sizes)])


def _cut(ends, first: int, stop: int, budget: int, at_least_one: bool
         ) -> tuple[int, int, int]:
    """How many of events ``first`` .. ``stop - 1`` fit in ``budget`` bytes (at least
    one if ``at_least_one``), and where their frames start and end in the copy."""
    start = ends[first - 1] if first else 0
    k = bisect.bisect_right(ends, start + budget, first, stop)
    if k == first and at_least_one:
        k = first + 1
    return k - first, start, ends[k - 1] if k > first else start


def _ends(at: int, lengths: list[int]) -> Iterator[int]:
    """Where frames of ``lengths`` end when the first starts at ``at``."""
    sums = accumulate(lengths, initial=at)
    next(sums)
    return sums


def _write_all(fd: int, data: bytes) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
