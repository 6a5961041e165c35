"""Read plans: which bytes of a segment hold a range of frames, in few contiguous spans.

A catch-up reader is sent frames as views of the log. From format version 2 on, the
frames of one record lie back to back, so a range of a stream's frames is a handful
of contiguous spans (one per record it touches), not one slice per event. Finding the
spans and the cut at a byte budget from an index must not cost Python work per
event either, or a replay is bound by it: here the per-event work is C-level (one
``tolist`` and a few ``sum`` passes over frame lengths), and Python steps are taken
per span (galloping, then bisection, over the index).

Frame k lies back to back with frames i..k-1 exactly when
``offset(k) == offset(i) + sum(lengths[i:k])``; frames are in increasing offset order
and do not overlap, so that holds for a prefix of the k after i, which is what makes
galloping valid.
"""

from __future__ import annotations

import bisect
from itertools import accumulate

#: Frame lengths are fetched this many at a time while the budget lasts, so that a
#: read over-fetches at most this many past its cut.
LENGTH_CHUNK = 512
#: The chunk in which the budget runs out is searched in pieces of this many lengths.
CUT_PIECE = 32
#: After this many runs averaging under SHORT_RUN_LENGTH frames, the rest of a read
#: is taken a frame at a time instead of run by run.
SHORT_RUNS = 8
SHORT_RUN_LENGTH = 8


def plan_spans(view, offset_at: int, length_at: int, stride: int, count: int, budget: int,
               at_least_one: bool) -> tuple[int, list[int], list[int]]:
    """Plan a read of the first frames of ``count`` described by an index ``view``.

    Frame k's offset is ``view[offset_at + k * stride]`` and its length
    ``view[length_at + k * stride]`` (``view``: a memoryview of unsigned ints). Takes
    the longest prefix of frames whose lengths sum to at most ``budget`` (at least one
    frame if ``at_least_one``), and returns how many frames that is and the byte
    ranges that hold them (their starts, and their sizes): one per run of back-to-back
    frames, or, once runs prove short (single publishes), one per frame for the rest.
    """
    lengths: list[int] = []
    taken = 0
    total = 0
    while taken < count:
        upto = min(count, taken + LENGTH_CHUNK)
        chunk = view[length_at + taken * stride:length_at + upto * stride:stride].tolist()
        size = sum(chunk)
        if total + size <= budget:
            lengths += chunk
            total += size
            taken = upto
            continue
        # The cut is in this chunk: find its piece by sums (no int made per length),
        # then the frame inside the piece by its running sums.
        at, left = 0, budget - total
        while at + CUT_PIECE < len(chunk):
            piece = sum(chunk[at:at + CUT_PIECE])
            if piece > left:
                break
            at += CUT_PIECE
            left -= piece
        sums = list(accumulate(chunk[at:at + CUT_PIECE]))
        inside = bisect.bisect_right(sums, left)
        fit = at + inside
        fitted = budget - total - left + (sums[inside - 1] if inside else 0)
        if fit == 0 and taken == 0 and at_least_one:
            fit, fitted = 1, chunk[0]
        lengths += chunk[:fit]
        total += fitted
        taken += fit
        break
    return (taken, *runs(view, offset_at, stride, lengths, total))


def runs(view, offset_at: int, stride: int, lengths: list[int], total: int | None = None
         ) -> tuple[list[int], list[int]]:
    """The byte ranges (starts, sizes) of the frames whose lengths are ``lengths`` and
    whose offsets are ``view[offset_at + k * stride]`` (a memoryview of an index, or an
    ``array`` of offsets with ``offset_at=0, stride=1``): see :func:`plan_spans`.
    ``total``, when the caller has it, is ``sum(lengths)``.

    A run ends where the next frame does not start at the end of its last one. Runs
    tend to repeat their length (a producer's batches), so each run first tries where
    the previous run's length says it ends, checked with one ``sum`` over it; failing
    that it gallops and bisects (each step one ``sum`` over the frames it passes).
    """
    count = len(lengths)
    last = count - 1
    if total is None:
        total = sum(lengths)
    starts: list[int] = []
    sizes: list[int] = []  # sizes, not ends: a frame's is its length, with no addition
    i = 0
    done = 0  # sum(lengths[:i])
    guess = 0
    while i < count:
        if len(starts) >= SHORT_RUNS and i < SHORT_RUN_LENGTH * len(starts):
            # Runs this short (single publishes): a range per frame costs less than
            # looking for the few that join.
            offsets = view[offset_at + i * stride:offset_at + count * stride:stride].tolist()
            starts += offsets
            sizes += lengths[i:]
            break
        start = view[offset_at + i * stride]
        rest = total - done
        if view[offset_at + last * stride] + lengths[last] == start + rest:
            starts.append(start)  # the rest is one run
            sizes.append(rest)
            break
        if view[offset_at + (i + 1) * stride] != start + lengths[i]:
            inside, inside_sum = i, 0  # a run of one frame (no sum needed)
        else:
            guessed = i + guess - 1
            if i < guessed < last and \
                    view[offset_at + (guessed + 1) * stride] != \
                    view[offset_at + guessed * stride] + lengths[guessed] and \
                    view[offset_at + guessed * stride] == start + sum(lengths[i:guessed]):
                inside, inside_sum = guessed, view[offset_at + guessed * stride] - start
            else:
                inside, inside_sum = _run_end(view, offset_at, stride, lengths, i, start, last)
        size = inside_sum + lengths[inside]
        starts.append(start)
        sizes.append(size)
        guess = inside - i + 1
        done += size
        i = inside + 1
    return starts, sizes


def _run_end(view, offset_at: int, stride: int, lengths: list[int], i: int, start: int,
             outside: int) -> tuple[int, int]:
    """The last frame of the run that starts at frame ``i`` (offset ``start``), and the
    bytes before it in the run; frame ``outside`` is known not to be in the run. Frame
    k is in it when ``offset(k) == start + sum(lengths[i:k])``, true for a prefix of
    the k: gallop to bracket the end, then bisect."""
    inside, inside_sum = i, 0
    step = 1
    bisecting = False
    while outside - inside > 1:
        probe = (inside + outside) // 2 if bisecting else min(inside + step, outside - 1)
        probe_sum = inside_sum + sum(lengths[inside:probe])
        if view[offset_at + probe * stride] == start + probe_sum:
            inside, inside_sum = probe, probe_sum
            step *= 2
        else:
            outside = probe
            bisecting = True
    return inside, inside_sum
