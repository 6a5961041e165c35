"""Read plans (spans.py) against a model: the frames a budget admits, in whole-frame ranges.

The index layouts are the engine's own: a sealed index's 24-byte entries (six u32
words, offset then length) and an active stream run (``array('Q')``: first number,
then offset and length per frame).
"""

from __future__ import annotations

from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meilies.engine import spans
from meilies.engine.index import (FRAME_LENGTH_WORD, FRAME_OFFSET_WORD, WORDS_PER_ENTRY,
                                  entries_of)
from meilies.engine.spans import SHORT_RUN_LENGTH, plan_spans


def layout(records: list[list[int]], gaps: list[int]) -> tuple[list[int], list[int]]:
    """Frame offsets and lengths of records laid out one after the other: each record's
    frames back to back, ``gaps[k]`` bytes (a header, other streams) before record k."""
    offsets, lengths = [], []
    at = 0
    for frames, gap in zip(records, gaps):
        at += gap
        for length in frames:
            offsets.append(at)
            lengths.append(length)
            at += length
    return offsets, lengths


def sealed_view(offsets: list[int], lengths: list[int]) -> memoryview:
    return memoryview(entries_of(offsets, lengths, 0, 0, 0))


def model(offsets, lengths, budget, at_least_one):
    """(frames taken, their runs as (start, end)) by the definition, frame by frame."""
    taken, total = 0, 0
    while taken < len(lengths) and total + lengths[taken] <= budget:
        total += lengths[taken]
        taken += 1
    if taken == 0 and at_least_one and lengths:
        taken = 1
    runs = []
    for offset, length in zip(offsets[:taken], lengths[:taken]):
        if runs and runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], offset + length)
        else:
            runs.append((offset, offset + length))
    return taken, runs


def ranges_of(starts: list[int], sizes: list[int]) -> list[tuple[int, int]]:
    """A plan's spans as (start, end)."""
    assert len(starts) == len(sizes)
    return [(start, start + size) for start, size in zip(starts, sizes)]


records_st = st.lists(st.lists(st.integers(1, 300), min_size=1, max_size=40), min_size=1,
                      max_size=40)


@pytest.fixture
def checked_totals(monkeypatch):
    """``runs`` trusts the total its caller passes (it skips a sum per read): every
    call made during the test has it checked."""
    real = spans.runs

    def checked(view, offset_at, stride, lengths, total=None):
        assert total is None or total == sum(lengths), (total, sum(lengths))
        return real(view, offset_at, stride, lengths, total)

    monkeypatch.setattr(spans, "runs", checked)


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=records_st, data=st.data())
def test_the_plan_takes_what_the_budget_admits_in_whole_frame_ranges(checked_totals, records,
                                                                      data):
    gaps = data.draw(st.lists(st.integers(1, 80), min_size=len(records),
                              max_size=len(records)))
    offsets, lengths = layout(records, gaps)
    budget = data.draw(st.integers(0, sum(lengths) + 10))
    at_least_one = data.draw(st.booleans())
    words = sealed_view(offsets, lengths)
    taken, starts, sizes = plan_spans(words, FRAME_OFFSET_WORD, FRAME_LENGTH_WORD,
                                      WORDS_PER_ENTRY, len(offsets), budget, at_least_one)
    want_taken, want_runs = model(offsets, lengths, budget, at_least_one)
    assert taken == want_taken
    # The ranges hold exactly the frames taken, in order, each a whole number of them.
    ranges = ranges_of(starts, sizes)
    covered = []
    for start, end in ranges:
        k = offsets.index(start)
        while k < taken and offsets[k] + lengths[k] <= end:
            covered.append(k)
            k += 1
        assert offsets[covered[-1]] + lengths[covered[-1]] == end
    assert covered == list(range(taken))
    # Runs of a record or more are found whole; only short ones may come frame by frame.
    if all(len(frames) >= SHORT_RUN_LENGTH for frames in records):
        assert ranges == want_runs


def test_a_batch_is_one_range_and_single_frames_are_one_each():
    offsets, lengths = layout([[100] * 256, [100] * 256, [90] * 3], [60, 60, 60])
    words = sealed_view(offsets, lengths)
    taken, starts, sizes = plan_spans(words, FRAME_OFFSET_WORD, FRAME_LENGTH_WORD,
                                      WORDS_PER_ENTRY, len(offsets), 10**9, True)
    assert taken == 515 and ranges_of(starts, sizes) == [
        (60, 25660), (25720, 51320), (51380, 51650)]
    offsets, lengths = layout([[50]] * 100, [70] * 100)
    words = sealed_view(offsets, lengths)
    taken, starts, sizes = plan_spans(words, FRAME_OFFSET_WORD, FRAME_LENGTH_WORD,
                                      WORDS_PER_ENTRY, 100, 10**9, True)
    assert taken == 100 and starts == offsets and sizes == [50] * 100


def test_the_budget_cuts_between_frames_and_one_frame_always_fits_if_asked():
    offsets, lengths = layout([[100] * 10], [10])
    words = sealed_view(offsets, lengths)
    args = (words, FRAME_OFFSET_WORD, FRAME_LENGTH_WORD, WORDS_PER_ENTRY, 10)
    assert plan_spans(*args, 350, False) == (3, [10], [300])
    assert plan_spans(*args, 99, False) == (0, [], [])
    assert plan_spans(*args, 99, True) == (1, [10], [100])


def test_an_active_stream_run_is_read_the_same_way():
    offsets, lengths = layout([[7] * 20, [9] * 5], [3, 40])
    run = array("Q", [41])  # first number, then (offset, length) per frame
    for offset, length in zip(offsets, lengths):
        run += array("Q", [offset, length])
    with memoryview(run) as view:
        taken, starts, sizes = plan_spans(view, 1 + 2 * 4, 2 + 2 * 4, 2, 21, 10**9, True)
    assert taken == 21 and ranges_of(starts, sizes) == [(3 + 4 * 7, 143), (183, 228)]


def test_runs_of_offsets_given_as_an_array_match_the_model():
    """The filtered $all read hands its offsets as an array: the same answer."""
    from meilies.engine.spans import runs

    offsets, lengths = layout([[30] * 40, [5], [7] * 3, [1]] + [[9]] * 30, [2] * 34)
    starts, sizes = runs(array("Q", offsets), 0, 1, lengths)
    _taken, want = model(offsets, lengths, 10**9, True)
    covered = sorted(ranges_of(starts, sizes))
    # Short runs may come a frame at a time; merged, they are the model's runs.
    merged = []
    for start, end in covered:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    assert merged == want
