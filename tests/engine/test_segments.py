"""Segments roll, reads cross them, and derived files (indexes, checkpoint) are disposable.

The log is sacred; ``.pidx``, ``.sidx`` and ``checkpoint`` are rebuilt from it, with one
warning, whenever they are missing or fail a check. Files the engine did not write,
and segments from a newer format, are refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from engine_helpers import (append_garbage, flip_byte, read_everything, read_stream_plain,
                            record_spans, resp_frame, rewrite_segment_header, segment_files,
                            truncate_file)
from meilies.engine import (Engine, EngineClosed, ForeignFile, UnsupportedFormatVersion)
from meilies.engine import format as fmt
from meilies.engine.files import CHECKPOINT_NAME

SEGMENT_SIZE = 400
STREAMS = [b"alpha", b"beta", b"gamma"]


def write_rolling_log(directory: Path, fsync: str = "always") -> list[tuple]:
    """About twenty segments; one batch is larger than a whole segment."""
    with Engine.open(directory, fsync=fsync, segment_size=SEGMENT_SIZE) as engine:
        for i in range(40):
            stream = STREAMS[i % 3 if i % 7 else 0]
            size = 600 if i == 20 else (i * 13) % 90
            batch = [(b"event-%d" % j, bytes([i]) * size + b"\r\n") for j in range(1 + i % 4)]
            engine.append(stream, batch)
        engine.sync()
        return read_everything(engine)


def by_stream(events, stream: bytes) -> list[tuple[int, bytes, bytes]]:
    return [(n, name, data) for s, n, name, data, _p in events if s == stream]


def test_segments_roll_when_full_and_are_named_by_their_first_position(tmp_path):
    events = write_rolling_log(tmp_path)
    segments = segment_files(tmp_path)
    assert len(segments) > 10
    for path in segments:
        spans = record_spans(path)
        assert spans, f"{path.name} holds no record"
        assert spans[0].base_position == int(path.stem)
        if len(spans) > 1:  # only a lone oversized record may pass the segment size
            assert path.stat().st_size <= SEGMENT_SIZE
    big = [p for p in segments if p.stat().st_size > SEGMENT_SIZE]
    assert big and all(len(record_spans(p)) == 1 for p in big)
    with Engine.open(tmp_path, segment_size=SEGMENT_SIZE) as engine:
        assert read_everything(engine) == events
        assert engine.stats()["segments"] == len(segments)


def test_reads_cross_segment_boundaries(tmp_path, fsync_policy):
    events = write_rolling_log(tmp_path, fsync_policy)
    with Engine.open(tmp_path, fsync=fsync_policy, segment_size=SEGMENT_SIZE) as engine:
        for stream in STREAMS:
            expected = by_stream(events, stream)
            count = len(expected)
            for start in range(0, count + 2):
                for stop in (None, start + 1, start + 5, count):
                    got = read_stream_plain(engine, stream, start, stop)
                    assert got == [e for e in expected
                                   if e[0] >= start and (stop is None or e[0] < stop)]
            frames = []
            number = 0
            while True:  # two frames a call: every page boundary falls somewhere
                page, number = engine.stream_frames(stream, number, max_events=2)
                if not page:
                    break
                frames += [bytes(f) for f in page]
            assert frames == [resp_frame(stream, *e) for e in expected]
        for position in range(0, len(events) + 1, 3):
            assert read_everything_from(engine, position) == events[position:]


def read_everything_from(engine, position):
    return [(e.stream, e.number, e.name, bytes(e.data), e.position)
            for e in engine.read_all(position)]


def test_appends_after_reopen_continue_in_the_newest_segment(tmp_path):
    events = write_rolling_log(tmp_path)
    newest = segment_files(tmp_path)[-1]
    with Engine.open(tmp_path, segment_size=1 << 20) as engine:
        result = engine.append(b"beta", [(b"late", b"x")])
        assert result.end_position == len(events) + 1
    assert segment_files(tmp_path)[-1] == newest
    assert record_spans(newest)[-1].base_position == len(events)


INDEX_DAMAGE = {
    "deleted": lambda path: path.unlink(),
    "flipped-byte": lambda path: flip_byte(path, 5),
    "cut-short": lambda path: truncate_file(path, path.stat().st_size - 24),
    "garbage-appended": lambda path: append_garbage(path, b"\x00" * 24),
    "emptied": lambda path: truncate_file(path, 0),
}


@pytest.mark.parametrize("suffix", [".pidx", ".sidx"])
@pytest.mark.parametrize("damage", sorted(INDEX_DAMAGE))
def test_damaged_sealed_index_is_rebuilt_from_the_log(tmp_path, caplog, suffix, damage):
    events = write_rolling_log(tmp_path)
    sealed = segment_files(tmp_path)[2]
    index = sealed.with_suffix(suffix)
    original = index.read_bytes()
    INDEX_DAMAGE[damage](index)
    with caplog.at_level(logging.WARNING, logger="meilies.engine"):
        with Engine.open(tmp_path, segment_size=SEGMENT_SIZE) as engine:
            assert engine.open_report.rebuilt_indexes == [sealed.name]
            assert read_everything(engine) == events
            for stream in STREAMS:
                assert read_stream_plain(engine, stream) == by_stream(events, stream)
    assert index.read_bytes() == original
    assert sum(sealed.name in r.getMessage() for r in caplog.records) == 1
    with Engine.open(tmp_path, segment_size=SEGMENT_SIZE) as engine:
        assert engine.open_report.rebuilt_indexes == []


@pytest.mark.parametrize("damage", sorted(set(INDEX_DAMAGE) - {"garbage-appended"}))
def test_damaged_index_of_the_active_segment_is_rebuilt_from_the_log(tmp_path, damage):
    events = write_rolling_log(tmp_path)
    active = segment_files(tmp_path)[-1]
    index = active.with_suffix(".pidx")
    original = index.read_bytes()
    INDEX_DAMAGE[damage](index)
    with Engine.open(tmp_path, segment_size=SEGMENT_SIZE) as engine:
        assert engine.open_report.rebuilt_indexes == [active.name]
        assert read_everything(engine) == events
    assert index.read_bytes() == original


def test_entries_past_the_checkpoint_in_the_active_index_are_ignored(tmp_path):
    """The checkpoint counts the active segment's entries; more bytes are not read,
    and the next checkpoint cuts them off."""
    events = write_rolling_log(tmp_path)
    index = segment_files(tmp_path)[-1].with_suffix(".pidx")
    original = index.read_bytes()
    append_garbage(index, b"\xff" * 48)
    with Engine.open(tmp_path, segment_size=SEGMENT_SIZE) as engine:
        assert engine.open_report.rebuilt_indexes == []
        assert read_everything(engine) == events
    assert index.read_bytes() == original


def test_every_index_deleted_is_rebuilt(tmp_path):
    events = write_rolling_log(tmp_path)
    for path in tmp_path.iterdir():
        if path.suffix in (".pidx", ".sidx"):
            path.unlink()
    with Engine.open(tmp_path, segment_size=SEGMENT_SIZE) as engine:
        assert len(engine.open_report.rebuilt_indexes) == len(segment_files(tmp_path))
        assert read_everything(engine) == events
        for stream in STREAMS:
            assert read_stream_plain(engine, stream) == by_stream(events, stream)


CHECKPOINT_DAMAGE = {
    "deleted": lambda path: path.unlink(),
    "flipped-byte": lambda path: flip_byte(path, 40),
    "flipped-trailer": lambda path: flip_byte(path, path.stat().st_size - 1),
    "cut-short": lambda path: truncate_file(path, path.stat().st_size - 3),
    "emptied": lambda path: truncate_file(path, 0),
    "garbage-appended": lambda path: append_garbage(path, b"junk"),
}


@pytest.mark.parametrize("damage", sorted(CHECKPOINT_DAMAGE))
def test_damaged_checkpoint_is_rebuilt_from_the_log(tmp_path, fsync_policy, damage):
    events = write_rolling_log(tmp_path, fsync_policy)
    CHECKPOINT_DAMAGE[damage](tmp_path / CHECKPOINT_NAME)
    with Engine.open(tmp_path, fsync=fsync_policy, segment_size=SEGMENT_SIZE) as engine:
        assert not engine.open_report.used_checkpoint
        assert engine.open_report.recovered == []
        assert read_everything(engine) == events
        assert engine.stream_names() == sorted(STREAMS)
        for stream in STREAMS:
            assert engine.last_event_number(stream) == len(by_stream(events, stream)) - 1
        engine.append(b"alpha", [(b"more", b"1")])
        events.append((b"alpha", len(by_stream(events, b"alpha")), b"more", b"1", len(events)))
    with Engine.open(tmp_path, fsync=fsync_policy, segment_size=SEGMENT_SIZE) as engine:
        assert engine.open_report.used_checkpoint
        assert engine.open_report.scanned_bytes == 0
        assert read_everything(engine) == events


def test_checkpoint_older_than_several_rolls_is_caught_up_from_the_log(tmp_path):
    """A checkpoint is replaced atomically, so any older one may be what a crash leaves."""
    with Engine.open(tmp_path, segment_size=SEGMENT_SIZE) as engine:
        engine.append(b"alpha", [(b"e", b"early")])
        engine.checkpoint()
        old_checkpoint = (tmp_path / CHECKPOINT_NAME).read_bytes()
    events = write_rolling_log(tmp_path)
    (tmp_path / CHECKPOINT_NAME).write_bytes(old_checkpoint)
    with Engine.open(tmp_path, segment_size=SEGMENT_SIZE) as engine:
        assert engine.open_report.used_checkpoint
        assert read_everything(engine) == events
        for stream in STREAMS:
            assert read_stream_plain(engine, stream) == by_stream(events, stream)


def test_reopen_after_checkpoint_and_tail_scans_only_the_tail(tmp_path):
    with Engine.open(tmp_path) as engine:
        engine.append(b"alpha", [(b"e", b"1")])
        engine.checkpoint()
        size = segment_files(tmp_path)[0].stat().st_size
        engine.append(b"beta", [(b"e", b"2")])
        engine.close()
    with Engine.open(tmp_path) as engine:
        assert engine.open_report.scanned_bytes == 0
        assert [e[0] for e in read_everything(engine)] == [b"alpha", b"beta"]
    assert segment_files(tmp_path)[0].stat().st_size > size


@pytest.mark.parametrize("name", ["notes.txt", "00000000000000000000.segx", "0.seg", "LOCK2",
                                  "00000000000000000000.SEG"])
def test_stray_file_refuses_open_as_foreign(tmp_path, name):
    write_rolling_log(tmp_path)
    (tmp_path / name).write_bytes(b"hello")
    with pytest.raises(ForeignFile) as caught:
        Engine.open(tmp_path)
    assert caught.value.path == tmp_path / name
    (tmp_path / name).unlink()
    Engine.open(tmp_path).close()  # the failed open released the lock


def test_stray_directory_refuses_open_as_foreign(tmp_path):
    (tmp_path / "00000000000000000000.seg").mkdir()
    with pytest.raises(ForeignFile) as caught:
        Engine.open(tmp_path)
    assert caught.value.path == tmp_path / "00000000000000000000.seg"


def test_leftover_temporary_files_are_removed_on_open(tmp_path):
    events = write_rolling_log(tmp_path)
    # (A .seg.tmp is what an interrupted `meilies-fsck --repair --salvage` leaves: the
    # segment itself is whole until the rename.)
    leftovers = [tmp_path / "checkpoint.tmp", tmp_path / "00000000000000000000.pidx.tmp",
                 tmp_path / "00000000000000000000.seg.tmp"]
    for path in leftovers:
        path.write_bytes(b"half written")
    with Engine.open(tmp_path, segment_size=SEGMENT_SIZE) as engine:
        assert read_everything(engine) == events
    assert not any(path.exists() for path in leftovers)


@pytest.mark.parametrize("which", [0, -1], ids=["oldest", "newest"])
@pytest.mark.parametrize("version", [fmt.FORMAT_VERSION + 1, 0xFFFFFFFF, 0])
def test_segment_of_another_format_version_is_refused(tmp_path, which, version):
    write_rolling_log(tmp_path)
    segment = segment_files(tmp_path)[which]
    rewrite_segment_header(segment, version=version)
    before = segment.read_bytes()
    with pytest.raises(UnsupportedFormatVersion) as caught:
        Engine.open(tmp_path)
    error = caught.value
    assert (error.path, error.version, error.supported) == (segment, version, fmt.FORMAT_VERSION)
    assert segment.read_bytes() == before


def test_closed_engine_refuses_every_call_and_closes_twice(tmp_path):
    engine = Engine.open(tmp_path)
    engine.append(b"alpha", [(b"e", b"1")])
    engine.close()
    engine.close()
    for call in (lambda: engine.append(b"alpha", [(b"e", b"2")]), engine.sync,
                 engine.checkpoint, lambda: engine.stream_frames(b"alpha", 0),
                 lambda: engine.all_frames(0), lambda: list(engine.read_all()),
                 lambda: list(engine.read_stream(b"alpha"))):
        with pytest.raises(EngineClosed):
            call()


@pytest.mark.parametrize("name", ["notes.tmp", "00000000000000000000.log.tmp", "LOCK.tmp",
                                  "0000000000000000000.seg.tmp"])
def test_stray_file_ending_in_tmp_is_foreign_and_kept(tmp_path, name):
    """Only the engine's own temporary files are removed on open; anything else that
    happens to end in .tmp is someone else's and is neither deleted nor accepted."""
    write_rolling_log(tmp_path)
    (tmp_path / name).write_bytes(b"someone's data")
    with pytest.raises(ForeignFile) as caught:
        Engine.open(tmp_path)
    assert caught.value.path == tmp_path / name
    assert (tmp_path / name).read_bytes() == b"someone's data"


def test_frames_held_by_a_reader_survive_appends_rolls_and_close(tmp_path, fsync_policy):
    """Zero-copy frames are views of a map: remapping the active segment, sealing it
    and closing the engine must neither fail (BufferError) nor change their bytes."""
    engine = Engine.open(tmp_path, fsync=fsync_policy, segment_size=SEGMENT_SIZE)
    held = []
    expected = []
    for i in range(30):
        engine.append(b"alpha", [(b"e", b"%d" % i * 20)])
        engine.sync()
        frames, _ = engine.stream_frames(b"alpha", i)
        events = list(engine.read_stream(b"alpha", i))
        held += frames + [events[0].data]
        expected += [resp_frame(b"alpha", i, b"e", b"%d" % i * 20), b"%d" % i * 20]
        all_frames, _ = engine.all_frames(i)
        held += all_frames
        expected += [resp_frame(b"alpha", i, b"e", b"%d" % i * 20)]
    assert len(segment_files(tmp_path)) > 3
    engine.close()
    assert [bytes(view) for view in held] == expected


def test_a_stored_batch_is_read_as_one_view(tmp_path):
    """Format 2 keeps a record's frames back to back: a catch-up read of a batch is one
    slice of the log, one of single publishes is one slice each (headers between)."""
    with Engine.open(tmp_path, fsync="no") as engine:
        batch = [(b"e", b"%d" % i * 30) for i in range(50)]
        engine.append(b"alpha", batch)
        engine.append(b"beta", [(b"other", b"")])
        engine.append(b"alpha", batch[:3])
        for i in range(4):
            engine.append(b"alpha", [(b"one", b"%d" % i)])
        frames, after = engine.stream_frames(b"alpha", 0)
        views, spans_after = engine.stream_spans(b"alpha", 0)
        assert (after, spans_after) == (57, 57)
        assert [len(v) for v in views] == [sum(len(f) for f in frames[:50]),
                                           sum(len(f) for f in frames[50:53]),
                                           *[len(f) for f in frames[53:]]]
        assert b"".join(views) == b"".join(frames)
        views, after = engine.stream_spans(b"alpha", 10, 20)  # the middle of a batch
        assert after == 20 and len(views) == 1 and bytes(views[0]) == b"".join(frames[10:20])
        views, after = engine.all_spans(0)
        assert after == 58 and len(views) == 7  # alpha's 50, beta's 1, alpha's 3, then 4
        assert b"".join(views) == b"".join(engine.all_frames(0)[0])


def test_a_stream_read_keeps_one_byte_budget_across_segments(tmp_path):
    """What one read returns is bounded by its byte budget in all, not per segment: a
    stream spread over many small segments is read in the longest prefix of frames that
    fits (at least one frame), whatever the segment boundaries."""
    with Engine.open(tmp_path, fsync="no", segment_size=1024) as engine:
        for i in range(200):
            engine.append(b"s%d" % (i % 2), [(b"e", b"x" * (i % 37))])
            if i % 9 == 0:
                engine.append(b"s0", [(b"batch", b"y" * 5)] * 3)
        assert engine.stats()["segments"] > 20
        frames, _ = engine.stream_frames(b"s0", 0, max_bytes=1 << 30)
        lengths = [len(f) for f in frames]
        for start in (0, 3, 40):
            for budget in (1, 100, 700, 2000, 5000):
                views, after = engine.stream_spans(b"s0", start, max_bytes=budget)
                fits, used = start, 0
                while fits < len(lengths) and used + lengths[fits] <= budget:
                    used += lengths[fits]
                    fits += 1
                want = max(fits, start + 1)
                assert after == want, (start, budget)
                assert b"".join(views) == b"".join(frames[start:want])


def test_thousands_of_records_waiting_for_one_flush_are_all_written(tmp_path):
    """A flush writes its records with pwritev, whose buffer count the kernel caps."""
    with Engine.open(tmp_path, fsync="no") as engine:
        for i in range(3000):
            engine.append(b"s%d" % (i % 7), [(b"e", b"%d" % i)], flush=False)
        engine.flush()
        assert [bytes(e.data) for e in engine.read_all()] == [b"%d" % i for i in range(3000)]
    with Engine.open(tmp_path, fsync="no") as engine:
        assert [bytes(e.data) for e in engine.read_all()] == [b"%d" % i for i in range(3000)]
