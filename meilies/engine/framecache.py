"""Full frames of recently read streams, kept ready to send.

A full frame (envelope.py) is assembled from the stored original frame, the event's
position, its record's timestamp and its extras: ~0.4 µs per event, plus a header read
per record. An event-sourced application reads an aggregate's stream whole before every
command on it (read, decide, append), so the same frames are assembled again and again:
for a 50-event aggregate that was most of a ``range`` request's cost (README, "Reads of
PROTOCOL.md v2").

Visible events never change: positions are never reused, and a take-back only ever
touches appends that were not yet visible (durability.py). So the full frames of a
stream's visible events can be kept as they were sent. An entry per stream holds those
of a run of its events, ``first .. stop-1``, back to back in one buffer, with where each
ends. A later read inside the run is one slice. A read that starts inside the run and
goes past it (events appended since) assembles only the new events and extends the
entry. Only ascending reads that came back whole fill an entry, so a catch-up that is
sent a part at a time (a big stream) does not.

Bounded: ``max_bytes`` in all, least recently read streams dropped first; an entry
holds at most ``max_bytes // ENTRY_SHARE`` (a stream larger than that is read as
before). ``max_bytes == 0`` turns the cache off. The engine owns one
(``Engine.frame_cache``); reads.py consults it.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from itertools import accumulate

#: An entry may take at most this share of the cache (1/16), so that one big stream
#: cannot push out the many aggregates.
ENTRY_SHARE = 16
#: Bytes an entry costs beyond its frames: its object and dictionary slot (measured
#: with sys.getsizeof, rounded up), plus 8 per frame for its end.
ENTRY_OVERHEAD = 200
END_SIZE = 8
#: The default size (``meilies-server --range-cache-size``).
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class CachedRun:
    """The full frames of events ``first`` .. ``stop - 1`` of one stream."""

    __slots__ = ("first", "frames", "ends")

    def __init__(self, first: int, frames: bytes, lengths: list[int]) -> None:
        self.first = first
        self.frames = bytearray(frames)
        #: ends[i]: where the frame of event ``first + i`` ends in ``frames``.
        self.ends = array("Q", accumulate(lengths))

    @property
    def stop(self) -> int:
        return self.first + len(self.ends)

    @property
    def size(self) -> int:
        return len(self.frames) + END_SIZE * len(self.ends) + ENTRY_OVERHEAD

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """Where the frames of events ``lo`` .. ``hi - 1`` lie in ``frames``."""
        ends = self.ends
        first = self.first
        return (ends[lo - first - 1] if lo > first else 0), ends[hi - first - 1]

    def reversed_pieces(self, lo: int, hi: int) -> list[bytearray]:
        """The frames of events ``hi - 1`` down to ``lo``, a piece each (revrange)."""
        frames = self.frames
        first = self.first
        bounds = self.ends[max(lo - first - 1, 0):hi - first].tolist()
        if lo == first:
            bounds.insert(0, 0)
        return [frames[a:b] for a, b in zip(bounds[-2::-1], bounds[:0:-1])]


class FrameCache:
    """Full frames of recently read streams (see the module's docstring).

    ``hits`` and ``misses`` count reads served from an entry (extended or not) and
    reads that were assembled whole; INFO shows them.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self.max_bytes = max_bytes
        self.entry_limit = max_bytes // ENTRY_SHARE
        self.size = 0
        self.hits = 0
        self.misses = 0
        self._runs: OrderedDict[int, CachedRun] = OrderedDict()

    def __len__(self) -> int:
        return len(self._runs)

    def get(self, sid: int) -> CachedRun | None:
        """Stream ``sid``'s entry, now the most recently read; None if it has none."""
        run = self._runs.get(sid)
        if run is not None:
            self._runs.move_to_end(sid)
        return run

    def frames(self, sid: int, lo: int, hi: int, max_bytes: int) -> bytearray | None:
        """The frames of stream ``sid``'s events ``lo`` .. ``hi - 1`` if its entry holds
        them all within ``max_bytes`` (a hit), else None (nothing counted)."""
        run = self._runs.get(sid)
        if run is None:
            return None
        # CachedRun.span's work, inline: this is every cached read's path.
        first = run.first
        ends = run.ends
        if lo < first or hi > first + len(ends):
            return None
        start = ends[lo - first - 1] if lo > first else 0
        end = ends[hi - first - 1]
        if end - start > max_bytes:
            return None
        self._runs.move_to_end(sid)
        self.hits += 1
        return run.frames[start:end]

    def fits(self, size: int) -> bool:
        """Whether an entry of ``size`` bytes of frames may be kept."""
        return size + ENTRY_OVERHEAD <= self.entry_limit

    def put(self, sid: int, first: int, frames: bytes, lengths: list[int]) -> None:
        """Keep ``frames`` (events ``first`` on, of ``lengths`` bytes each) as stream
        ``sid``'s entry, in place of any it had."""
        old = self._runs.pop(sid, None)
        if old is not None:
            self.size -= old.size
        run = CachedRun(first, frames, lengths)
        self._runs[sid] = run
        self.size += run.size
        self._trim()

    def extend(self, sid: int, run: CachedRun, frames: bytes, lengths: list[int]) -> None:
        """Add the frames of the events after ``run`` (stream ``sid``'s entry)."""
        before = run.size
        run.ends.extend(map(run.ends[-1].__add__, accumulate(lengths)))
        run.frames += frames
        self.size += run.size - before
        self._trim()

    def drop(self, sid: int) -> None:
        """Forget stream ``sid``'s entry."""
        run = self._runs.pop(sid, None)
        if run is not None:
            self.size -= run.size

    def clear(self) -> None:
        self._runs.clear()
        self.size = 0

    def _trim(self) -> None:
        runs = self._runs
        while self.size > self.max_bytes and runs:
            _sid, run = runs.popitem(last=False)
            self.size -= run.size
