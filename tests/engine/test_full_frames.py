"""Full frames (PROTOCOL.md v2): every event with its position and timestamp, read
ascending and descending, by stream and over the whole log, against a model.

The frames are parsed with hiredis, as a client would; the timestamps are checked
against the wall clock around each append and against the record headers on disk.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import hiredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_helpers import record_spans, segment_files
from meilies.engine import ANY, Engine
from meilies.engine import format as fmt
from meilies.engine.envelope import suffix
from test_upgrade import FIXTURES, expected_events, v1_batches

STREAMS = [b"s0", b"s1", b"s2"]


def parse_frames(pieces: list, count: int) -> list[list]:
    reader = hiredis.Reader()
    reader.feed(b"".join(pieces))
    frames = [reader.gets() for _ in range(count)]
    assert reader.gets() is False, "more bytes than the frames announced"
    return frames


def read_stream(engine: Engine, stream: bytes, start: int, stop: int | None, *, descending,
                max_events, max_bytes) -> list[list]:
    """Every frame of a stream range, in as many calls as the caps make."""
    out = []
    if descending:
        while True:
            pieces, count, stop = engine.stream_full_frames(
                stream, start, stop, max_events=max_events, max_bytes=max_bytes,
                descending=True)
            if not count:
                return out
            out += parse_frames(pieces, count)
    while True:
        pieces, count, start = engine.stream_full_frames(
            stream, start, stop, max_events=max_events, max_bytes=max_bytes)
        if not count:
            return out
        out += parse_frames(pieces, count)


def read_all(engine: Engine, start: int, stop: int | None, *, descending, max_events,
             max_bytes) -> list[list]:
    out = []
    while True:
        if descending:
            pieces, count, stop = engine.all_full_frames(
                start, stop, max_events=max_events, max_bytes=max_bytes, descending=True)
        else:
            pieces, count, start = engine.all_full_frames(
                start, stop, max_events=max_events, max_bytes=max_bytes)
        if not count:
            return out
        out += parse_frames(pieces, count)


appends = st.lists(
    st.tuples(st.sampled_from(STREAMS),
              st.lists(st.tuples(st.sampled_from([b"a", b"created", b"x" * 40]),
                                 st.binary(max_size=60)), min_size=1, max_size=5)),
    min_size=1, max_size=30)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batches=appends, reads=st.lists(st.tuples(
    st.sampled_from(STREAMS + [None]), st.integers(0, 40), st.integers(0, 45),
    st.booleans(), st.integers(1, 7), st.sampled_from([1, 90, 300, 1 << 20])), max_size=12),
    reopen=st.booleans())
def test_full_frames_equal_the_model(tmp_path_factory, batches, reads, reopen):
    directory = tmp_path_factory.mktemp("full")
    model: list[tuple] = []  # (stream, number, name, data, position, earliest ms, latest ms)
    numbers = dict.fromkeys(STREAMS, 0)
    engine = Engine.open(directory, fsync="no", segment_size=400)
    try:
        for stream, events in batches:
            before = time.time_ns() // 1_000_000
            engine.append(stream, events, ANY)
            engine.flush()
            after = time.time_ns() // 1_000_000
            for name, data in events:
                model.append((stream, numbers[stream], name, data, len(model), before, after))
                numbers[stream] += 1
        if reopen:
            engine.close()
            engine = Engine.open(directory, fsync="no", segment_size=400)
        for stream, start, stop, descending, max_events, max_bytes in reads:
            if stream is None:
                wanted = [m for m in model if start <= m[4] < stop]
                got = read_all(engine, start, stop, descending=descending,
                               max_events=max_events, max_bytes=max_bytes)
            else:
                wanted = [m for m in model if m[0] == stream and start <= m[1] < stop]
                got = read_stream(engine, stream, start, stop, descending=descending,
                                  max_events=max_events, max_bytes=max_bytes)
            if descending:
                wanted.reverse()
            assert [f[:6] for f in got] == [[b"event", s, n, name, data, p]
                                            for s, n, name, data, p, _b, _a in wanted]
            for frame, (*_, earliest, latest) in zip(got, wanted):
                assert len(frame) == 9 and frame[7] is None and frame[8] is None
                assert earliest <= frame[6] <= latest
    finally:
        engine.close()


def test_a_batch_shares_its_timestamp_and_single_events_have_their_own(tmp_path):
    with Engine.open(tmp_path, fsync="no") as engine:
        engine.append(b"s", [(b"a", b"1"), (b"b", b"2"), (b"c", b"3")], ANY)
        engine.flush()
        stamps = [time.time_ns() // 1_000_000]
        for i in range(3):
            # Each append in a later millisecond than the one before: later, not merely
            # another (a step back of the host's clock once made it an earlier one).
            while time.time_ns() // 1_000_000 <= stamps[-1]:
                time.sleep(0.001)
            stamps.append(time.time_ns() // 1_000_000)
            engine.append(b"s" if i % 2 else b"t", [(b"n", b"%d" % i)], ANY)
            engine.flush()
        pieces, count, _ = engine.all_full_frames(0)
        frames = parse_frames(pieces, count)
    batch = [f[6] for f in frames[:3]]
    assert len(set(batch)) == 1
    singles = [f[6] for f in frames[3:]]
    assert singles == sorted(singles) and len(set(singles)) == 3
    assert batch[0] < singles[0]


def test_timestamps_are_the_record_headers(tmp_path):
    """Every event's timestamp is its record's, read straight from the segment files."""
    with Engine.open(tmp_path, fsync="no", segment_size=400) as engine:
        for i in range(30):
            engine.append(STREAMS[i % 3], [(b"e", b"x" * (i % 11))] * (1 + i % 4), ANY)
            time.sleep(0.0011)
        engine.flush()
        pieces, count, _ = engine.all_full_frames(0, max_events=10_000, max_bytes=1 << 30)
        got = [f[6] for f in parse_frames(pieces, count)]
    on_disk = []
    for path in segment_files(tmp_path):
        raw = path.read_bytes()
        for span in record_spans(path):
            on_disk += [fmt.decode_record_header(raw, span.offset).timestamp_ms] * span.count
    assert got == on_disk and len(set(got)) > 20


@pytest.mark.parametrize("version", sorted(FIXTURES))
def test_older_formats_give_full_frames(tmp_path, version):
    """Version 1 keeps an event header between a record's frames, version 2 does not:
    both find their records' timestamps."""
    directory = Path(shutil.copytree(FIXTURES[version], tmp_path / "data"))
    expected = expected_events(v1_batches())
    with Engine.open(directory, fsync="no") as engine:
        got = read_all(engine, 0, None, descending=False, max_events=7, max_bytes=1 << 20)
        backwards = read_stream(engine, b"orders-1", 0, None, descending=True,
                                max_events=4, max_bytes=1 << 20)
    assert [f[1:6] for f in got] == [[s, n, name, data, p] for s, n, name, data, p in expected]
    stamps = {f[5]: f[6] for f in got}
    assert all(ts > 1_700_000_000_000 for ts in stamps.values())
    assert [f[2] for f in backwards] == list(range(len(backwards)))[::-1]
    assert all(f[6] == stamps[f[5]] for f in backwards)


def test_suffix_carries_ids_and_metadata_when_given():
    assert suffix(7, 1000) == b":7\r\n:1000\r\n$-1\r\n$-1\r\n"
    assert suffix(7, 1000, b"id-1", b"") == b":7\r\n:1000\r\n$4\r\nid-1\r\n$0\r\n\r\n"
    assert suffix(7, 1000, None, b"{}") == b":7\r\n:1000\r\n$-1\r\n$2\r\n{}\r\n"
