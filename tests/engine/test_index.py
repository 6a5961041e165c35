"""The fixed-width indexes against a bisect-on-a-sorted-list model (Kafka
``OffsetIndexTest.randomLookupTest``), with random streams, numbers and offsets."""

from __future__ import annotations

import bisect
import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meilies.engine.index import (ENTRY, ENTRY_SIZE, ActiveIndex, SealedIndex,
                                  sorted_stream_index, write_file)

INDEX_SETTINGS = settings(max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])

#: For each stream of a segment: (stream_id, first number, event count).
segment_streams = st.lists(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**40), st.integers(1, 30)),
    max_size=25, unique_by=lambda s: s[0])


def interleave(streams, seed: int) -> list[tuple[int, int, int, int, int]]:
    """Position-ordered entries of a segment: each stream's numbers contiguous and
    ascending, streams interleaved at random, frames laid out one after another."""
    rng = random.Random(seed)
    queues = {sid: list(range(first, first + count)) for sid, first, count in streams}
    entries = []
    offset = 32
    while queues:
        sid = rng.choice(sorted(queues))
        number = queues[sid].pop(0)
        if not queues[sid]:
            del queues[sid]
        length = rng.randint(20, 400)
        entries.append((offset, length, sid, len(entries), number))
        offset += length + rng.randint(8, 100)
    return entries


@INDEX_SETTINGS
@given(streams=segment_streams, seed=st.integers(0, 2**32),
       queries=st.lists(st.integers(0, 2**32 - 1), max_size=20))
def test_sealed_stream_run_matches_bisect_model(tmp_path, streams, seed, queries):
    entries = interleave(streams, seed)
    model = sorted(entries, key=lambda e: (e[2], e[4]))
    raw = sorted_stream_index(b"".join(ENTRY.pack(*e) for e in entries))
    assert [ENTRY.unpack_from(raw, i * ENTRY_SIZE) for i in range(len(model))] == model
    keys = [e[2] for e in model]
    with tempfile.TemporaryDirectory(dir=tmp_path) as directory:
        path = Path(directory) / "00000000000000000000.sidx"
        write_file(path, raw)
        index = SealedIndex(path)
        try:
            assert index.count == len(model)
            present = [sid for sid, _first, _count in streams]
            for sid in queries + present + [q + 1 for q in present if q < 2**32 - 1]:
                i, j = index.stream_run(sid)
                assert (i, j) == (bisect.bisect_left(keys, sid), bisect.bisect_right(keys, sid))
                if i < j:
                    assert index.entry(i) == model[i]
                    offsets, lengths = index.frames(i, j)
                    assert offsets == [e[0] for e in model[i:j]]
                    assert lengths == [e[1] for e in model[i:j]]
        finally:
            index.close()


@INDEX_SETTINGS
@given(streams=segment_streams, seed=st.integers(0, 2**32),
       queries=st.lists(st.tuples(st.integers(0, 40), st.integers(-5, 40), st.integers(0, 40)),
                        max_size=30))
def test_active_stream_frames_match_a_list_model(tmp_path, streams, seed, queries):
    entries = interleave(streams, seed)
    index = ActiveIndex()
    for entry in entries:
        index.add(*entry)
    reloaded = ActiveIndex()
    reloaded.load(bytes(index.entries))
    assert reloaded.count == index.count == len(entries)
    per_stream = {}
    for offset, length, sid, delta, number in entries:
        per_stream.setdefault(sid, []).append((number, offset, length, delta))
    sids = sorted(per_stream) or [0]
    for which, start_at, span in queries:
        sid = sids[which % len(sids)]
        run = per_stream.get(sid, [])
        base = run[0][0] if run else 0
        start = max(0, base + start_at)
        stop = start + span
        want = [e for e in run if start <= e[0] < stop]
        for candidate in (index, reloaded):
            first, offsets, lengths, deltas = candidate.stream_columns(sid, start, stop)
            assert offsets == [e[1] for e in want]
            assert lengths == [e[2] for e in want]
            assert deltas == [e[3] for e in want]
            if want:
                assert first == want[0][0]
    # An absent stream has no frames.
    assert index.stream_columns(max(sids) + 1, 0, 10) == (0, [], [], [])


@INDEX_SETTINGS
@given(streams=segment_streams, seed=st.integers(0, 2**32), cut=st.integers(0, 200))
def test_active_index_flushed_in_pieces_equals_its_entries(tmp_path, streams, seed, cut):
    """Checkpoints append to the .pidx file; the file must equal the entries in memory."""
    entries = interleave(streams, seed)
    cut = min(cut, len(entries))
    with tempfile.TemporaryDirectory(dir=tmp_path) as directory:
        path = Path(directory) / "00000000000000000000.pidx"
        index = ActiveIndex()
        for entry in entries[:cut]:
            index.add(*entry)
        index.flush_to(path)
        for entry in entries[cut:]:
            index.add(*entry)
        index.flush_to(path)
        assert path.read_bytes() == bytes(index.entries)
        sealed = SealedIndex(path)
        try:
            for n, entry in enumerate(entries):
                assert sealed.entry(n) == entry
            if entries:
                offsets, lengths = sealed.frames(0, len(entries))
                assert (offsets, lengths) == ([e[0] for e in entries], [e[1] for e in entries])
        finally:
            sealed.close()


def test_empty_sealed_index_has_no_runs(tmp_path):
    path = tmp_path / "00000000000000000000.sidx"
    write_file(path, b"")
    index = SealedIndex(path)
    assert index.count == 0 and index.stream_run(0) == (0, 0)
    index.close()
