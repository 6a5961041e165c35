"""Read planning: which stored frames a read returns, and where they lie in the log.

Three kinds of read, all over the segments' indexes and never over the records
themselves: a stream's events by number (``stream_frames``, ``stream_spans``,
``read_stream``), and the whole log by global position (``all_frames``, ``all_spans``,
``read_all``). The ``*_frames`` readers return a view per frame, the ``*_spans``
readers as few views as the log allows (a batch's frames lie back to back: spans.py),
which is what a subscriber is sent; both are bounded per call by a count and a byte
budget, so that what one reader holds stays small, and say where to go on from. The
``read_*`` iterators decode :class:`Event` objects for in-process users and tools.

``Engine`` (log.py) exposes these as its methods; this module reads its segments,
stream table, segment bases and visible position, and changes nothing.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterator
from itertools import accumulate
from typing import TYPE_CHECKING, NamedTuple

from . import format as fmt
from .errors import BadFrameCopy, CorruptRecord
from .index import (ENTRY, ENTRY_SIZE, FRAME_LENGTH_WORD, FRAME_OFFSET_WORD, RUN_STRIDE,
                    WORDS_PER_ENTRY, ActiveIndex, SealedIndex, entry_columns)
from .envelope import MISPLACED_HEADER, _record_starts, full_frames, full_frames_and_lengths
from .segment import Segment
from .spans import plan_spans, runs

if TYPE_CHECKING:
    from .framecache import FrameCache
    from .log import Engine

#: Per-call caps of the frame readers: bound what one reader holds in memory.
DEFAULT_MAX_EVENTS = 4096
DEFAULT_MAX_BYTES = 1024 * 1024
#: The byte budget of an ``all_spans`` read without one: the largest record body.
_NO_BUDGET = fmt.MAX_BODY_LENGTH


class Event(NamedTuple):
    """One stored event. ``data`` is a zero-copy view of the log where possible.

    A named tuple, not a dataclass: readers build one per event, and a frozen
    dataclass costs several times as much to construct.
    """

    stream: bytes
    number: int
    name: bytes
    data: memoryview | bytes
    #: Global position; known when read through :meth:`Engine.read_all`, else None.
    position: int | None = None


def stream_frames(engine: Engine, stream: bytes | int, start: int, stop: int | None = None, *,
                  max_events: int = DEFAULT_MAX_EVENTS, max_bytes: int = DEFAULT_MAX_BYTES
                  ) -> tuple[list[memoryview], int]:
    """Stored RESP frames of events ``start`` .. ``stop-1`` of a stream, in order.

    Returns at most ``max_events`` frames and about ``max_bytes`` (always at least
    one frame when any is due), and the number after the last returned: call again
    from there. The frames are zero-copy views of the log.
    """
    spans, number = _stream_locations(engine, stream, start, stop, max_events, max_bytes)
    frames: list[memoryview] = []
    for segment, offsets, lengths in spans:
        view = memoryview(segment.buffer(offsets[-1] + lengths[-1]))
        frames += [view[o:o + n] for o, n in zip(offsets, lengths)]
    return frames, number

def stream_spans(engine: Engine, stream: bytes | int, start: int, stop: int | None = None, *,
                 max_events: int = DEFAULT_MAX_EVENTS, max_bytes: int = DEFAULT_MAX_BYTES
                 ) -> tuple[list[bytes | memoryview], int]:
    """The frames of :func:`stream_frames`, in as few views of the log as it allows.

    Each view holds one or more whole frames that lie back to back in the log (a
    record's frames do, from format version 2 on), so the views joined are the
    frames joined; what a subscriber is sent. A batch costs one view, and no
    Python work per event (spans.py). Many small spans (single-event records) come
    as bytes copied out of the log instead (``_span_pieces``).
    """
    found = _stream_range(engine, stream, start, stop, max_events)
    if found is None:
        return [], start
    sid, end, k = found
    segments = engine.segments
    views: list[bytes | memoryview] = []
    size = 0
    number = start
    while k < len(segments) and number < end:
        segment = segments[k]
        k += 1
        first, available, taken, pieces, sizes = _segment_stream_plan(
            segment, sid, number, end, max_bytes - size, not views)
        if taken:
            views += pieces
            number = first + taken
        if taken < available:  # the budget ran out inside this segment
            break
        size += sum(sizes)  # spent: the next segment gets what is left of the budget
    return views, number

def _stream_range(engine: Engine, stream: bytes | int, start: int, stop: int | None,
                  max_events: int) -> tuple[int, int, int] | None:
    """(stream id, number to stop before, first segment to look in) of a read, or
    None when it has nothing to return."""
    engine._check_open()
    sid = stream if isinstance(stream, int) else engine.streams.ids.get(stream)
    if sid is None:
        return None
    end = engine.streams.visible_next[sid]
    if stop is not None and stop < end:
        end = stop
    if start >= end:
        return None
    if end - start > max_events:
        end = start + max_events
    k = bisect.bisect_right(engine._bases, engine.streams.first_position[sid]) - 1
    return sid, end, k

def _stream_locations(engine: Engine, stream: bytes | int, start: int, stop: int | None,
                      max_events: int, max_bytes: int
                      ) -> tuple[list[tuple[Segment, list[int], list[int]]], int]:
    """Where the frames of :func:`stream_frames` are: (segment, offsets, lengths)."""
    found = _stream_range(engine, stream, start, stop, max_events)
    if found is None:
        return [], start
    sid, end, k = found
    segments = engine.segments
    spans = []
    size = 0
    number = start
    while k < len(segments) and number < end:
        segment = segments[k]
        k += 1
        first, offsets, lengths, _deltas = _segment_stream_columns(segment, sid, number, end)
        if not offsets:
            continue
        total = sum(lengths)
        if size + total > max_bytes:
            allowed = bisect.bisect_right(list(accumulate(lengths)), max_bytes - size)
            allowed = max(allowed, 0 if spans else 1)
            if allowed:
                spans.append((segment, offsets[:allowed], lengths[:allowed]))
            number = first + allowed
            break
        spans.append((segment, offsets, lengths))
        size += total
        number = first + len(offsets)
    return spans, number

def _segment_stream_plan(segment: Segment, sid: int, start: int, end: int,
                         budget: int, at_least_one: bool
                         ) -> tuple[int, int, int, list[bytes | memoryview], list[int]]:
    """Plan reading numbers [start, end) of a stream from one segment within
    ``budget`` bytes: (first number there, frames available, frames taken, the views
    that hold them, and their sizes; see spans.plan_spans). Events at consecutive
    positions come from the segment's frame copy, in one view, when it has them."""
    index = segment.index
    if isinstance(index, ActiveIndex):
        run = index.streams.get(sid)
        if run is None:
            return start, 0, 0, [], []
        first_number = run[0]
        lo = max(start, first_number)
        hi = min(end, first_number + (len(run) - 1) // RUN_STRIDE)
        if hi <= lo:
            return start, 0, 0, [], []
        at = 1 + RUN_STRIDE * (lo - first_number)
        first_delta = run[at + 2]
        last_delta = run[at + 2 + RUN_STRIDE * (hi - lo - 1)]
        copied = _from_copy(segment, first_delta, last_delta, hi - lo, budget, at_least_one)
        if copied is not None:
            return (lo, hi - lo, *copied)
        # Released before returning: appends grow the run, which a live view forbids.
        with memoryview(run) as view:
            taken, starts, sizes = plan_spans(view, at, at + 1, RUN_STRIDE, hi - lo,
                                              budget, at_least_one)
    else:
        stream_index = segment.stream_index
        i, j = stream_index.stream_run(sid)
        if i == j:
            return start, 0, 0, [], []
        first_number = stream_index.entry(i)[4]
        lo = max(start, first_number)
        hi = min(end, first_number + (j - i))
        if hi <= lo:
            return start, 0, 0, [], []
        at = i + lo - first_number
        copied = _from_copy(segment, stream_index.entry(at)[3],
                            stream_index.entry(at + hi - lo - 1)[3], hi - lo, budget,
                            at_least_one)
        if copied is not None:
            return (lo, hi - lo, *copied)
        taken, starts, sizes = _plan_entries(stream_index.buffer, at, hi - lo, budget,
                                             at_least_one)
    if not taken:
        return lo, hi - lo, 0, [], []
    return (lo, hi - lo, taken, _span_pieces(segment.buffer(starts[-1] + sizes[-1]), starts,
                                             sizes), sizes)


def _from_copy(segment: Segment, first_delta: int, last_delta: int, count: int, budget: int,
               at_least_one: bool) -> tuple[int, list[memoryview], list[int]] | None:
    """Events at position deltas ``first_delta`` .. ``last_delta`` of a segment, when
    they are ``count`` consecutive positions that its frame copy holds: (events taken,
    [one view] or [], [its size] or []); None when they must be read from the
    segment."""
    if last_delta - first_delta != count - 1:
        return None
    copy = segment.copies.current()
    if copy is None or first_delta < copy.first or last_delta >= copy.copied:
        return None
    try:
        taken, view = copy.span(first_delta, last_delta + 1, budget, at_least_one)
    except BadFrameCopy as exc:
        segment.copies.drop(exc)
        return None
    if not taken:
        return 0, [], []
    return taken, [view], [len(view)]


def _segment_stream_columns(segment: Segment, sid: int, start: int, end: int
                            ) -> tuple[int, list[int], list[int], list[int]]:
    """Where events [start, end) of stream ``sid`` are in one segment: (first number
    there, frame offsets, frame lengths, position deltas)."""
    index = segment.index
    if isinstance(index, ActiveIndex):
        return index.stream_columns(sid, start, end)
    stream_index = segment.stream_index
    i, j = stream_index.stream_run(sid)
    if i == j:
        return start, [], [], []
    first_number = stream_index.entry(i)[4]
    lo = max(start, first_number)
    hi = min(end, first_number + (j - i))
    if hi <= lo:
        return start, [], [], []
    return (lo, *entry_columns(stream_index.buffer, i + lo - first_number,
                               i + hi - first_number))

def all_frames(engine: Engine, position: int, *, max_events: int = DEFAULT_MAX_EVENTS,
               min_number: int = 0, max_number: int | None = None,
               max_bytes: int | None = None) -> tuple[list[memoryview], int]:
    """Frames from global ``position`` on (one segment at most per call).

    Only events whose per-stream number is in [min_number, max_number) are
    returned; the position after the last event examined comes back with them.
    With ``max_bytes``, reading stops after about that many bytes of frames.
    """
    segment, offsets, lengths, after = _all_locations(engine, position, max_events, min_number,
                                                           max_number, max_bytes)
    if not offsets:
        return [], after
    view = memoryview(segment.buffer(offsets[-1] + lengths[-1]))
    return [view[o:o + n] for o, n in zip(offsets, lengths)], after

def all_spans(engine: Engine, position: int, *, max_events: int = DEFAULT_MAX_EVENTS,
              min_number: int = 0, max_number: int | None = None,
              max_bytes: int | None = None) -> tuple[list[bytes | memoryview], int]:
    """The frames of :func:`all_frames`, in as few views as the log allows (see
    :func:`stream_spans`)."""
    if min_number != 0 or max_number is not None:  # numbers to filter: entry by entry
        segment, offsets, lengths, after = _all_locations(engine, 
            position, max_events, min_number, max_number, max_bytes)
        if not offsets:
            return [], after
        starts, sizes = runs(array("Q", offsets), 0, 1, lengths)
        return _span_pieces(segment.buffer(offsets[-1] + lengths[-1]), starts, sizes), after
    found = _all_range(engine, position, max_events)
    if found is None:
        return [], position
    segment, first, stop = found
    budget = _NO_BUDGET if max_bytes is None else max_bytes
    copy = segment.copies.current()
    if copy is not None and copy.first <= first < copy.copied:
        try:  # as far as the copy goes; the events after it come with the next call
            taken, view = copy.span(first, min(stop, copy.copied), budget, True)
            return [view], segment.base_position + first + taken
        except BadFrameCopy as exc:
            segment.copies.drop(exc)
    index = segment.index
    buf = index.buffer if isinstance(index, SealedIndex) else index.entries
    taken, starts, sizes = _plan_entries(buf, first, stop - first, budget, True)
    return (_span_pieces(segment.buffer(starts[-1] + sizes[-1]), starts, sizes),
            segment.base_position + first + taken)

def _all_range(engine: Engine, position: int, max_events: int) -> tuple[Segment, int, int] | None:
    """(segment, first entry, entry to stop before) of a read of the log from global
    ``position``, within one segment; None when there is nothing to read."""
    engine._check_open()
    end = engine._visible_position
    if position >= end:
        return None
    k = bisect.bisect_right(engine._bases, position) - 1
    segment = engine.segments[k]
    first = position - segment.base_position
    stop = min(segment.index.count, first + max_events,
               end - segment.base_position)
    if stop <= first:
        return None
    return segment, first, stop

def _all_locations(engine: Engine, position: int, max_events: int, min_number: int,
                   max_number: int | None, max_bytes: int | None
                   ) -> tuple[Segment | None, list[int], list[int], int]:
    found = _all_range(engine, position, max_events)
    if found is None:
        return None, [], [], position
    segment, first, stop = found
    if min_number == 0 and max_number is None:
        offsets, lengths = segment.index.frames(first, stop)
        kept = None
    else:
        buf = segment.index.buffer if isinstance(segment.index, SealedIndex) \
            else segment.index.entries
        offsets, lengths, kept = [], [], []
        with memoryview(buf) as raw:
            for i, (off, length, _sid, _delta, number) in enumerate(ENTRY.iter_unpack(
                    raw[first * ENTRY_SIZE:stop * ENTRY_SIZE]), first):
                if number >= min_number and (max_number is None or number < max_number):
                    offsets.append(off)
                    lengths.append(length)
                    kept.append(i)
    if max_bytes is not None and offsets and sum(lengths) > max_bytes:
        allowed = max(1, bisect.bisect_right(list(accumulate(lengths)), max_bytes))
        offsets, lengths = offsets[:allowed], lengths[:allowed]
        stop = (kept[allowed - 1] if kept is not None else first + allowed - 1) + 1
    return segment, offsets, lengths, segment.base_position + stop

#: One located read: (segment, frame offsets, frame lengths, position deltas), the
#: events of one segment in ascending position order.
Columns = tuple[Segment, list[int], list[int], list[int]]


def stream_full_frames(engine: Engine, stream: bytes | int, start: int, stop: int | None = None,
                       *, max_events: int = DEFAULT_MAX_EVENTS,
                       max_bytes: int = DEFAULT_MAX_BYTES, descending: bool = False
                       ) -> tuple[list[bytes | memoryview], int, int]:
    """Full frames (envelope.py) of a stream's visible events numbered ``start`` ..
    ``stop-1``: ascending from ``start``, or descending from ``stop-1``.

    Returns the frames as pieces to join, how many events they
    hold, and where to go on: the number after the last one returned (ascending) or
    the last one returned (descending: the next call's ``stop``). At most
    ``max_events`` events and about ``max_bytes`` of stored frames per call (always
    at least one event when any is due).
    """
    engine._check_open()
    sid = stream if isinstance(stream, int) else engine.streams.ids.get(stream)
    if sid is None:
        return [], 0, start
    window = _window(start, stop, engine.streams.visible_next[sid], max_events, descending)
    if window is None:
        return [], 0, start
    lo, hi = window
    cache = engine.frame_cache
    fill = False
    if cache is not None:
        found, fill = _cached_full_frames(engine, cache, sid, lo, hi, max_bytes, descending)
        if found is not None:
            return found
    columns = _stream_columns(engine, sid, lo, hi)
    if fill and _stored_bytes(columns) <= max_bytes:
        # Whole in one read: assembled with each frame's length, and kept.
        frames, lengths = _full_frames_and_lengths(columns)
        cache.misses += 1
        if cache.fits(len(frames)):
            cache.put(sid, lo, frames, lengths)
        return [frames], hi - lo, hi
    groups = _cut(columns, max_bytes, descending)
    count = sum(len(offsets) for _segment, offsets, _lengths, _deltas in groups)
    return _pieces(groups, descending), count, hi - count if descending else lo + count


def _cached_full_frames(engine: Engine, cache: FrameCache, sid: int, lo: int, hi: int,
                        max_bytes: int, descending: bool
                        ) -> tuple[tuple[list[bytearray], int, int] | None, bool]:
    """:func:`stream_full_frames` of the window ``lo`` .. ``hi - 1`` from the frame
    cache (framecache.py): stream ``sid``'s entry, extended first if the window goes
    past it. Else None, and whether the window, read whole, should become the stream's
    entry (an ascending read that starts before any entry it has)."""
    run = cache.get(sid)
    if run is None:
        return None, not descending
    kept = run.stop
    if not run.first <= lo <= kept:
        return None, not descending and lo < run.first
    if hi > kept:
        if descending:
            return None, False
        columns = _stream_columns(engine, sid, kept, hi)
        if _stored_bytes(columns) > max_bytes:
            cache.drop(sid)  # far behind: a later read may fill it anew
            return None, False
        frames, lengths = _full_frames_and_lengths(columns)
        if not cache.fits(run.size + len(frames)):
            cache.drop(sid)  # outgrown: read as before from now on
            return None, False
        cache.extend(sid, run, frames, lengths)
    if not descending:
        frames = cache.frames(sid, lo, hi, max_bytes)  # None: more than one part
        return (None if frames is None else ([frames], hi - lo, hi)), False
    start, end = run.span(lo, hi)
    if end - start > max_bytes:
        return None, False  # a part at a time, as a catch-up is served
    cache.hits += 1
    return (run.reversed_pieces(lo, hi), hi - lo, lo), False


def _stored_bytes(columns: list[Columns]) -> int:
    return sum(sum(lengths) for _segment, _offsets, lengths, _deltas in columns)


def _full_frames_and_lengths(columns: list[Columns]) -> tuple[bytes, list[int]]:
    """The full frames of ``columns``' events, ascending, and each one's length."""
    if len(columns) == 1:
        return full_frames_and_lengths(*columns[0])
    pieces: list[bytes] = []
    sizes: list[int] = []
    for group in columns:
        frames, lengths = full_frames_and_lengths(*group)
        pieces.append(frames)
        sizes += lengths
    return b"".join(pieces), sizes


def all_full_frames(engine: Engine, start: int, stop: int | None = None, *,
                    max_events: int = DEFAULT_MAX_EVENTS, max_bytes: int = DEFAULT_MAX_BYTES,
                    descending: bool = False, min_number: int = 0,
                    max_number: int | None = None) -> tuple[list[bytes | memoryview], int, int]:
    """:func:`stream_full_frames` over the whole log: events at global positions
    ``start`` .. ``stop-1`` that are visible, ascending or descending.

    Ascending, only events numbered in [min_number, max_number) in their stream may be
    asked for (``$all:from:to``); then a call may return no event and still go on:
    the position returned is the one after the last event examined.
    """
    engine._check_open()
    filtered = min_number != 0 or max_number is not None
    assert not (filtered and descending), "number filters read ascending"
    window = _window(start, stop, engine._visible_position, max_events, descending)
    if window is None:
        return [], 0, start
    lo, hi = window
    groups: list[Columns] = []
    position = lo
    k = bisect.bisect_right(engine._bases, position) - 1
    segments = engine.segments
    while position < hi:
        segment = segments[k]
        k += 1
        first = position - segment.base_position
        upto = min(segment.index.count, hi - segment.base_position)
        if upto <= first:
            continue
        if filtered:
            group = _numbered(segment, first, upto, min_number, max_number)
            if group[1]:
                groups.append(group)
        else:
            offsets, lengths = segment.index.frames(first, upto)
            groups.append((segment, offsets, lengths, list(range(first, upto))))
        position = segment.base_position + upto
    examined = sum(len(offsets) for _segment, offsets, _lengths, _deltas in groups)
    groups = _cut(groups, max_bytes, descending)
    count = sum(len(offsets) for _segment, offsets, _lengths, _deltas in groups)
    if descending:
        return _pieces(groups, True), count, hi - count
    if count < examined:  # the budget cut the read: go on after the last event kept
        segment, _offsets, _lengths, deltas = groups[-1]
        hi = segment.base_position + deltas[-1] + 1
    return _pieces(groups, False), count, hi


def _window(start: int, stop: int | None, visible: int, max_events: int,
            descending: bool) -> tuple[int, int] | None:
    """The [lo, hi) a full-frame read covers: what is visible of [start, stop), at most
    ``max_events`` from its start (ascending) or its end (descending); None if empty."""
    end = visible if stop is None or stop > visible else stop
    if start >= end:
        return None
    if descending:
        return max(start, end - max_events), end
    return start, min(end, start + max_events)


def _numbered(segment: Segment, first: int, upto: int, min_number: int,
              max_number: int | None) -> Columns:
    """The columns of position-index entries ``first`` .. ``upto-1`` of ``segment``
    whose events are numbered in [min_number, max_number)."""
    index = segment.index
    buf = index.buffer if isinstance(index, SealedIndex) else index.entries
    offsets: list[int] = []
    lengths: list[int] = []
    deltas: list[int] = []
    with memoryview(buf) as raw:
        for delta, (offset, length, _sid, _delta, number) in enumerate(
                ENTRY.iter_unpack(raw[first * ENTRY_SIZE:upto * ENTRY_SIZE]), first):
            if number >= min_number and (max_number is None or number < max_number):
                offsets.append(offset)
                lengths.append(length)
                deltas.append(delta)
    return segment, offsets, lengths, deltas


def _stream_columns(engine: Engine, sid: int, lo: int, hi: int) -> list[Columns]:
    """Where events ``lo`` .. ``hi-1`` of stream ``sid`` are, segment by segment."""
    k = bisect.bisect_right(engine._bases, engine.streams.first_position[sid]) - 1
    segments = engine.segments
    groups: list[Columns] = []
    number = lo
    while k < len(segments) and number < hi:
        segment = segments[k]
        k += 1
        first, offsets, lengths, deltas = _segment_stream_columns(segment, sid, number, hi)
        if offsets:
            groups.append((segment, offsets, lengths, deltas))
            number = first + len(offsets)
    return groups


def _cut(groups: list[Columns], max_bytes: int, descending: bool) -> list[Columns]:
    """The longest prefix (ascending) or suffix (descending) of the events of ``groups``
    whose frames total at most ``max_bytes``; at least one event."""
    size = 0
    kept: list[Columns] = []
    for group in (reversed(groups) if descending else groups):
        segment, offsets, lengths, deltas = group
        total = sum(lengths)
        if size + total <= max_bytes:
            kept.append(group)
            size += total
            continue
        sizes = list(accumulate(reversed(lengths) if descending else lengths))
        fit = bisect.bisect_right(sizes, max_bytes - size)
        if fit == 0 and not kept:
            fit = 1
        if fit:
            if descending:
                kept.append((segment, offsets[-fit:], lengths[-fit:], deltas[-fit:]))
            else:
                kept.append((segment, offsets[:fit], lengths[:fit], deltas[:fit]))
        break
    if descending:
        kept.reverse()
    return kept


def _pieces(groups: list[Columns], descending: bool) -> list[bytes | memoryview]:
    pieces: list[bytes | memoryview] = []
    for segment, offsets, lengths, deltas in (reversed(groups) if descending else groups):
        pieces += full_frames(segment, offsets, lengths, deltas, descending=descending)
    return pieces


def read_stream(engine: Engine, stream: bytes, start: int = 0, stop: int | None = None
                ) -> Iterator[Event]:
    """Events ``start`` .. ``stop-1`` of ``stream`` visible now, as :class:`Event`."""
    sid = engine.streams.ids.get(stream)
    if sid is None:
        return
    number = start
    while True:
        spans, after = _stream_locations(engine, sid, number, stop, DEFAULT_MAX_EVENTS,
                                              DEFAULT_MAX_BYTES)
        if not spans:
            return
        for segment, offsets, lengths in spans:
            buf = segment.buffer(offsets[-1] + lengths[-1])
            view = memoryview(buf)
            for offset, length in zip(offsets, lengths):
                yield event_at(buf, view, stream, number, offset, length, None)
                number += 1

def read_all(engine: Engine, position: int = 0) -> Iterator[Event]:
    """Every event visible now from global ``position`` on, in position order."""
    names = engine.streams.names
    while True:
        k = bisect.bisect_right(engine._bases, position) - 1
        segment = engine.segments[k]
        index = segment.index
        _, _, _, after = _all_locations(engine, position, DEFAULT_MAX_EVENTS, 0, None, None)
        if after == position:
            return
        buf = segment.buffer(segment.written)
        view = memoryview(buf)
        first = position - segment.base_position
        for i in range(first, after - segment.base_position):
            offset, length, sid, _delta, number = index.entry(i)
            yield event_at(buf, view, names[sid], number, offset, length,
                            segment.base_position + i)
        position = after


#: Spans this short on average, when there are more than SMALL_SPANS_FROM of them, are
#: copied out of the log (bytes) rather than viewed: a memoryview is an object the
#: garbage collector tracks, and a catch-up of single-event records made one per
#: event, ~1,800 per read: in-process, 4.1M events/s with views against 6.2M with
#: copies (the server joins that many pieces into one send anyway).
SMALL_SPAN = 4096
SMALL_SPANS_FROM = 16


def _span_pieces(buf, starts: list[int], sizes: list[int]) -> list[bytes | memoryview]:
    """``buf[a:a + n]`` for each span: views of the log (zero-copy: a batch, a large
    frame), or copies when the spans are many and small."""
    if len(starts) > SMALL_SPANS_FROM and \
            starts[-1] + sizes[-1] - starts[0] < SMALL_SPAN * len(starts):
        return [buf[a:a + n] for a, n in zip(starts, sizes)]
    view = memoryview(buf)
    return [view[a:a + n] for a, n in zip(starts, sizes)]


def _plan_entries(buf, first: int, count: int, budget: int, at_least_one: bool
                  ) -> tuple[int, list[int], list[int]]:
    """:func:`spans.plan_spans` over ``count`` index entries (ENTRY's layout) of
    ``buf`` from entry ``first``: a position index's (the active one's entries too)
    or a stream index's."""
    at = first * WORDS_PER_ENTRY
    # Released before returning: the active index grows, which a live view forbids.
    with memoryview(buf) as raw, raw.cast("I") as words:
        return plan_spans(words, at + FRAME_OFFSET_WORD, at + FRAME_LENGTH_WORD,
                          WORDS_PER_ENTRY, count, budget, at_least_one)


_PREFIX_LENGTH = len(fmt.FRAME_PREFIX) + 3  # plus the stream name: "*5 +event +<s>\r\n:"


def event_at(buf, view: memoryview, stream: bytes, number: int, offset: int, length: int,
             position: int | None) -> Event:
    """The event whose frame is ``buf[offset:offset + length]``, found in the frame
    itself: the stream and number fix where the name starts; the name (which holds no
    CR or LF) ends at the first CRLF; what follows it is ``\\r\\n$<n>\\r\\n``, the
    data (n bytes) and ``\\r\\n``, so the n digits plus n itself fill the rest."""
    name_start = offset + _PREFIX_LENGTH + len(stream) + len(str(number)) + 3
    name_end = buf.find(b"\r\n", name_start, offset + length)
    data_end = offset + length - 2
    rest = data_end - name_end - 5  # digits + data length
    digits = len(str(rest))
    if len(str(rest - digits)) != digits:  # a carry: the length has one digit fewer
        digits -= 1
    return Event(stream, number, bytes(view[name_start:name_end]),
                 view[name_end + 5 + digits:data_end], position)


class StoredEvent(NamedTuple):
    """An event as the log holds it, with its id and metadata: what an idempotent
    retry is compared with (writes.py)."""

    stream: bytes
    number: int
    position: int
    name: bytes
    data: bytes
    id: bytes | None
    metadata: bytes | None


def stored_event(engine: Engine, position: int) -> StoredEvent:
    """The visible event at global ``position`` (the caller checks it is visible)."""
    k = bisect.bisect_right(engine._bases, position) - 1
    segment = engine.segments[k]
    delta = position - segment.base_position
    offset, length, sid, _delta, number = segment.index.entry(delta)
    buf = segment.buffer(offset + length)
    at = _record_starts(segment, [delta], [offset])[0]
    header = fmt.decode_record_header(buf, at)
    if header.magic != fmt.RECORD_MAGIC:
        raise CorruptRecord(segment.path, at, MISPLACED_HEADER)
    event_id = metadata = None
    if header.extras_length:
        raw = fmt.event_extras(buf, at, header, position - header.base_position)
        event_id, metadata = fmt.decode_extras(raw)
    view = memoryview(buf)
    event = event_at(buf, view, engine.streams.names[sid], number, offset, length, position)
    data = bytes(event.data)
    view.release()
    return StoredEvent(event.stream, number, position, event.name, data, event_id, metadata)


def stored_ids(engine: Engine, start: int) -> Iterator[tuple[bytes, int]]:
    """(id, position) of every event with an id from global position ``start`` to the
    end of the log, read from the records' extras: how the id index catches up on
    open (ids.py)."""
    end = engine.written_position
    if start >= end:
        return
    k = bisect.bisect_right(engine._bases, start) - 1
    for segment in engine.segments[k:]:
        size = segment.size
        if segment.index.count == 0:
            continue
        buf = segment.buffer(size)
        if start > segment.base_position:
            delta = start - segment.base_position
            offset = segment.index.entry(delta)[0]
            at = _record_starts(segment, [delta], [offset])[0]
        else:
            at = fmt.SEGMENT_HEADER_SIZE
        while at < size:
            header = fmt.decode_record_header(buf, at)
            if header.extras_length:
                for i, raw in enumerate(fmt.record_extras(buf, at, header)):
                    position = header.base_position + i
                    if position >= start:
                        event_id = fmt.decode_extras(raw)[0]
                        if event_id is not None:
                            yield event_id, position
            at += header.size
