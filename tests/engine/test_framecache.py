"""The frame cache (engine/framecache.py): a stream's full frames kept after a read.

Every read through the cache must give exactly the bytes the engine assembles with the
cache off, whatever happened in between (appends to the cached stream, other streams,
rolls, ids and metadata, reads of any window, either direction, any byte cap); and
the cache must hold to its bounds.
"""

from __future__ import annotations

import random

import pytest

from meilies.engine import ANY, Engine
from meilies.engine.errors import EngineClosed
from meilies.engine.framecache import ENTRY_OVERHEAD, ENTRY_SHARE, FrameCache
from meilies.engine.writes import Write

STREAMS = [b"agg-%d" % i for i in range(12)]


def uncached(engine: Engine, *args, **kwargs):
    cache, engine.frame_cache = engine.frame_cache, None
    try:
        pieces, count, resume = engine.stream_full_frames(*args, **kwargs)
    finally:
        engine.frame_cache = cache
    return b"".join(pieces), count, resume


def cached(engine: Engine, *args, **kwargs):
    pieces, count, resume = engine.stream_full_frames(*args, **kwargs)
    return b"".join(pieces), count, resume


def store(engine: Engine, rnd: random.Random, stream: bytes, step: int) -> None:
    count = rnd.choice([1] * 8 + [2, 3, 50])
    events = [(b"e%d" % rnd.randrange(9), rnd.randbytes(rnd.randrange(0, 60)))
              for _ in range(count)]
    if rnd.random() < 0.3:
        ids = [b"id-%d-%d" % (step, i) if rnd.random() < 0.7 else None for i in range(count)]
        metadata = [rnd.randbytes(rnd.randrange(1, 30)) if rnd.random() < 0.5 else None
                    for _ in range(count)]
        engine.write([Write(stream, events, ANY, ids, metadata)], flush=False)
    else:
        engine.append(stream, events, ANY, flush=False)


@pytest.mark.parametrize("seed", range(6))
def test_reads_through_the_cache_equal_the_assembled_ones(tmp_path, seed):
    rnd = random.Random(seed)
    # Small segments: streams cross rolls. A small cache: entries are evicted, and big
    # streams outgrow an entry.
    with Engine.open(tmp_path, fsync="no", segment_size=8192,
                     frame_cache_bytes=(64 << 10, 1 << 20, 8 << 20)[seed % 3]) as engine:
        cache = engine.frame_cache
        for step in range(800):
            store(engine, rnd, rnd.choice(STREAMS), step)
            if rnd.random() < 0.3:
                engine.flush()
            stream = rnd.choice(STREAMS)
            visible = engine.next_number(stream)
            if not visible:
                continue
            lo = rnd.choice([0, 0, rnd.randrange(visible)])
            hi = rnd.choice([visible, visible, rnd.randint(lo + 1, visible)])
            caps = {"descending": rnd.random() < 0.25,
                    "max_bytes": rnd.choice([256 * 1024, 256 * 1024, rnd.randrange(1, 3000)]),
                    "max_events": rnd.choice([10_000, rnd.randrange(1, 60)])}
            assert cached(engine, stream, lo, hi, **caps) == uncached(engine, stream, lo, hi,
                                                                      **caps), (step, caps)
            assert 0 <= cache.size <= cache.max_bytes
        assert cache.hits > 50 and cache.misses >= 3  # both paths taken


def test_an_aggregate_read_again_after_appends_assembles_only_the_new_events(tmp_path):
    with Engine.open(tmp_path, fsync="no") as engine:
        engine.append(b"order-1", [(b"created", b"{}")] + [(b"line", b"%d" % i)
                                                           for i in range(49)], ANY)
        cache = engine.frame_cache
        first = cached(engine, b"order-1", 0, 50)
        assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
        assert cached(engine, b"order-1", 0, 50) == first
        assert cache.hits == 1
        engine.append(b"order-1", [(b"paid", b"12")], ANY)
        size = cache.size
        again = cached(engine, b"order-1", 0, 51)
        assert again == uncached(engine, b"order-1", 0, 51)
        assert again[0].startswith(first[0]) and (cache.hits, cache.misses) == (2, 1)
        assert cache.size > size
        # Any window inside the entry, either way.
        for lo, hi in [(0, 1), (3, 9), (50, 51), (10, 51)]:
            for descending in (False, True):
                assert cached(engine, b"order-1", lo, hi, descending=descending) == \
                    uncached(engine, b"order-1", lo, hi, descending=descending)
        assert cache.misses == 1


def test_the_least_recently_read_stream_goes_first_and_the_bound_holds(tmp_path):
    with Engine.open(tmp_path, fsync="no", frame_cache_bytes=64 * 1024) as engine:
        cache = engine.frame_cache
        for i in range(40):
            engine.append(b"s%d" % i, [(b"n", b"x" * 100)] * 20, ANY)
        for i in range(40):
            cached(engine, b"s%d" % i, 0, 20)
            assert cache.size <= 64 * 1024
        assert 10 < len(cache) < 40
        kept = len(cache)
        cached(engine, b"s39", 0, 20)  # held: a hit, nothing evicted
        assert cache.hits == 1 and len(cache) == kept
        hits = cache.hits
        cached(engine, b"s0", 0, 20)  # evicted long ago: assembled again
        assert cache.hits == hits and cache.misses == 41


def test_a_stream_larger_than_an_entry_may_hold_is_read_as_before(tmp_path):
    limit = 64 * 1024
    with Engine.open(tmp_path, fsync="no", frame_cache_bytes=limit) as engine:
        engine.append(b"big", [(b"n", b"x" * 200)] * (limit // ENTRY_SHARE // 200 + 1), ANY)
        count = engine.next_number(b"big")
        assert cached(engine, b"big", 0, count) == uncached(engine, b"big", 0, count)
        assert len(engine.frame_cache) == 0 and engine.frame_cache.size == 0


def test_an_entry_its_stream_outgrows_is_dropped(tmp_path):
    limit = 64 * 1024  # an entry holds at most 4 KiB
    with Engine.open(tmp_path, fsync="no", frame_cache_bytes=limit) as engine:
        cache = engine.frame_cache
        engine.append(b"s", [(b"n", b"x" * 100)] * 10, ANY)
        cached(engine, b"s", 0, 10)
        assert len(cache) == 1
        engine.append(b"s", [(b"n", b"x" * 100)] * 40, ANY)
        assert cached(engine, b"s", 0, 50) == uncached(engine, b"s", 0, 50)
        assert len(cache) == 0 and cache.size == 0


def test_a_cache_of_size_zero_is_none_and_reads_still_work(tmp_path):
    with Engine.open(tmp_path, fsync="no", frame_cache_bytes=0) as engine:
        assert engine.frame_cache is None
        engine.append(b"s", [(b"n", b"1")], ANY)
        pieces, count, _ = engine.stream_full_frames(b"s", 0, 1)
        assert count == 1 and b"".join(pieces).startswith(b"*9\r\n+event\r\n+s\r\n:0\r\n")


def test_a_closed_engine_lets_its_cache_go_and_refuses_cached_reads(tmp_path):
    engine = Engine.open(tmp_path, fsync="no")
    engine.append(b"s", [(b"n", b"1")] * 5, ANY)
    cached(engine, b"s", 0, 5)
    sid = engine.stream_id(b"s")
    assert engine.kept_full_frames(sid, 0, 5, 1 << 20) is not None
    engine.close()
    assert engine.frame_cache.size == 0 and len(engine.frame_cache) == 0
    with pytest.raises(EngineClosed):
        engine.kept_full_frames(sid, 0, 5, 1 << 20)


def test_entry_accounting_matches_what_entries_hold():
    cache = FrameCache(10_000)
    cache.put(1, 0, b"a" * 100, [40, 60])
    assert cache.size == 100 + 2 * 8 + ENTRY_OVERHEAD
    run = cache.get(1)
    cache.extend(1, run, b"b" * 30, [10, 20])
    assert run.stop == 4 and list(run.ends) == [40, 100, 110, 130]
    assert cache.size == 130 + 4 * 8 + ENTRY_OVERHEAD
    assert run.span(1, 4) == (40, 130) and run.span(0, 1) == (0, 40)
    assert run.reversed_pieces(0, 3) == [b"b" * 10, b"a" * 60, b"a" * 40]
    assert run.reversed_pieces(2, 4) == [b"b" * 20, b"b" * 10]
    assert cache.frames(1, 1, 4, 1000) == b"a" * 60 + b"b" * 30
    assert cache.frames(1, 1, 4, 89) is None  # more than max_bytes
    assert cache.frames(1, 2, 5, 1000) is None and cache.frames(2, 0, 1, 1000) is None
    cache.drop(1)
    assert cache.size == 0 and len(cache) == 0
    with pytest.raises(ValueError):
        FrameCache(-1)
