"""Frame copies (framecopy.py): reads of consecutive positions come from a segment's
copy in one view, and return exactly the log's frames; a copy that is missing, torn,
damaged, stale or unwritable is dropped and the log read instead, and appends never
notice.

The expected bytes always come from ``all_frames``/``stream_frames``, which read one
view of the log per frame and never a copy.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import pytest

from engine_helpers import crash_copy, flip_byte, truncate_file
from meilies.engine import Engine, StorageError
from meilies.engine import fsck
from meilies.engine.files import frame_copy_path
from meilies.engine.framecopy import COPY_BATCH, COPY_STEP, FOOTER_SIZE, SealedCopy

SEGMENT_SIZE = 256 * 1024


def publish_mixed(engine: Engine, count: int, seed: int = 7) -> None:
    """Single events over several streams, a run of one stream's single events at
    consecutive positions, and a few batches."""
    rng = random.Random(seed)
    i = 0
    while i < count:
        roll = rng.random()
        if roll < 0.05:
            size = rng.randrange(2, 6)
            engine.append(b"batch", [(b"b", os.urandom(rng.randrange(0, 30)))
                                     for _ in range(size)])
            i += size
        elif (i // 1000) % 3 == 1:
            engine.append(b"solo", [(b"s", os.urandom(rng.randrange(0, 50)))])
            i += 1
        else:
            engine.append(b"s%d" % rng.randrange(6), [(b"e", os.urandom(rng.randrange(0, 50)))])
            i += 1
    engine.sync()


def log_frames(engine: Engine) -> list[bytes]:
    """Every visible frame, one by one from the log (never from a copy)."""
    frames, position = [], 0
    while True:
        views, after = engine.all_frames(position)
        if after == position:
            return frames
        frames += [bytes(v) for v in views]
        position = after


def catch_up(engine: Engine, position: int, max_bytes: int) -> tuple[bytes, list[int]]:
    """What a ``$all@position`` subscriber is sent (read with all_spans), and how many
    views each read returned."""
    out, pieces = [], []
    while True:
        views, after = engine.all_spans(position, max_bytes=max_bytes)
        if after == position:
            return b"".join(out), pieces
        out += [bytes(v) for v in views]
        pieces.append(len(views))
        position = after


def check_catch_ups(engine: Engine, frames: list[bytes], rng: random.Random) -> None:
    for _ in range(25):
        position = rng.randrange(len(frames))
        budget = rng.choice([1, 100, 4096, 65536, 1 << 20])
        got, _pieces = catch_up(engine, position, budget)
        assert got == b"".join(frames[position:]), (position, budget)


def stream_catch_up(engine: Engine, stream: bytes, number: int, max_bytes: int) -> bytes:
    out = []
    while True:
        views, after = engine.stream_spans(stream, number, max_bytes=max_bytes)
        if after == number:
            return b"".join(out)
        out += [bytes(v) for v in views]
        number = after


def stream_log_frames(engine: Engine, stream: bytes) -> list[bytes]:
    frames, number = [], 0
    while True:
        views, after = engine.stream_frames(stream, number)
        if after == number:
            return frames
        frames += [bytes(v) for v in views]
        number = after


def copies(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.frm"))


def test_catch_ups_read_copies_and_return_the_log_frames(tmp_path):
    rng = random.Random(1)
    with Engine.open(tmp_path, fsync="no", segment_size=SEGMENT_SIZE) as engine:
        publish_mixed(engine, 12_000)
        frames = log_frames(engine)
        assert len(frames) >= 12_000
        sealed = engine.segments[:-1]
        assert len(sealed) >= 3 and len(copies(tmp_path)) == len(sealed)
        check_catch_ups(engine, frames, rng)
        # A sealed segment is one view per read: the copy was used.
        first = sealed[1]
        views, after = engine.all_spans(first.base_position, max_bytes=1 << 30)
        assert len(views) == 1 and after == sealed[2].base_position
        assert bytes(views[0]) == b"".join(frames[first.base_position:after])
        for stream in (b"solo", b"s1", b"batch"):
            expected = b"".join(stream_log_frames(engine, stream))
            for budget in (1, 333, 1 << 20):
                assert stream_catch_up(engine, stream, 0, budget) == expected


def test_the_active_segments_copy_grows_as_events_become_visible(tmp_path):
    with Engine.open(tmp_path, fsync="always", segment_size=64 << 20) as engine:
        for i in range(COPY_BATCH + 10):
            engine.append(b"one", [(b"e", b"%d" % i)])
            engine.sync()
        active = engine.segments[-1]
        assert active.copies.current() is not None and active.copies.current().copied >= COPY_BATCH
        assert (tmp_path / "00000000000000000000.frm.tmp").exists()
        frames = log_frames(engine)
        views, after = engine.all_spans(0, max_bytes=1 << 30)
        assert len(views) == 1 and after == active.copies.current().copied
        got, _pieces = catch_up(engine, 0, 1 << 30)
        assert got == b"".join(frames)
        assert stream_catch_up(engine, b"one", 5, 1000) == b"".join(frames[5:])


def test_copies_survive_a_restart_and_a_crash(tmp_path):
    rng = random.Random(2)
    data = tmp_path / "data"
    engine = Engine.open(data, fsync="no", segment_size=SEGMENT_SIZE)
    publish_mixed(engine, 9_000, seed=3)
    frames = log_frames(engine)
    crashed = crash_copy(data, tmp_path / "crashed")
    engine.close()
    for directory in (data, crashed):
        with Engine.open(directory, fsync="no", segment_size=SEGMENT_SIZE) as engine:
            assert log_frames(engine) == frames
            check_catch_ups(engine, frames, rng)
            assert all(s.copies.current() is not None for s in engine.segments[:-1])
            publish_mixed(engine, 3_000, seed=4)  # the active copy is made again first
            more = log_frames(engine)
            assert more[:len(frames)] == frames
            check_catch_ups(engine, more, rng)
        assert fsck.verify(directory).clean


@pytest.mark.parametrize("damage", ["frame byte", "footer byte", "truncated", "another's"])
def test_a_bad_copy_is_dropped_and_the_log_read(tmp_path, caplog, damage):
    with Engine.open(tmp_path, fsync="no", segment_size=SEGMENT_SIZE) as engine:
        publish_mixed(engine, 6_000, seed=5)
        frames = log_frames(engine)
        second = engine.segments[1]
    path = frame_copy_path(tmp_path, second.base_position)
    size = path.stat().st_size
    if damage == "frame byte":
        flip_byte(path, 1234)
    elif damage == "footer byte":
        flip_byte(path, size - FOOTER_SIZE + 30)
    elif damage == "truncated":
        truncate_file(path, size - 100)
    else:
        path.write_bytes(frame_copy_path(tmp_path, 0).read_bytes())
    report = fsck.verify(tmp_path)
    assert [(p.kind, p.path.name) for p in report.problems] == [("index", path.name)]
    assert "frame copy" in report.problems[0].reason
    with caplog.at_level(logging.WARNING, logger="meilies.engine"):
        with Engine.open(tmp_path, fsync="no", segment_size=SEGMENT_SIZE) as engine:
            got, _pieces = catch_up(engine, 0, 1 << 16)
            assert got == b"".join(frames)
            assert engine.segments[1].copies.current() is None
            assert engine.segments[0].copies.current() is not None
    assert any("dropping the frame copy" in r.getMessage() for r in caplog.records)
    assert not path.exists()
    assert fsck.verify(tmp_path).clean  # a missing copy is no problem


def test_fsck_repair_makes_a_damaged_copy_again(tmp_path):
    with Engine.open(tmp_path, fsync="no", segment_size=SEGMENT_SIZE) as engine:
        publish_mixed(engine, 6_000, seed=6)
        frames = log_frames(engine)
    path = frame_copy_path(tmp_path, 0)
    good = path.read_bytes()
    flip_byte(path, 10)
    report = fsck.verify(tmp_path, repair=True)
    assert not report.clean and report.after.clean
    assert path.read_bytes() == good
    with Engine.open(tmp_path, fsync="no", segment_size=SEGMENT_SIZE) as engine:
        assert catch_up(engine, 0, 1 << 16)[0] == b"".join(frames)


def test_fsck_names_the_first_frame_that_differs_from_the_log(tmp_path):
    """A copy whose sums were made over wrong frames passes its own checks; only the
    comparison with the log finds it."""
    with Engine.open(tmp_path, fsync="no", segment_size=SEGMENT_SIZE) as engine:
        publish_mixed(engine, 3_000, seed=8)
        segment = engine.segments[0]
        state = segment.state
        copy = segment.copies.current()
        end = copy.ends[40]
        frames = bytearray(copy.frames)
        ends = copy.ends.tobytes()
    frames[end - 3] ^= 0x01  # inside event 40's data
    path = frame_copy_path(tmp_path, 0)
    rewrite_copy(path, bytes(frames), ends, state)
    SealedCopy.open(path, 0, state.event_count, state.size, state.segment_hash).close()
    report = fsck.verify(tmp_path)
    assert [p.reason for p in report.problems] == [
        "frame copy: the frame of event 40 (position delta 40) differs from the log"]


def rewrite_copy(path: Path, frames: bytes, ends: bytes, state) -> None:
    """Write a copy with valid sums and footer over ``frames`` (test helper)."""
    from array import array

    from meilies.engine import format as fmt
    from meilies.engine.framecopy import BLOCK_SIZE, FOOTER, MAGIC, VERSION
    sums = array("Q", (fmt.checksum(frames[at:at + BLOCK_SIZE])
                       for at in range(0, len(frames), BLOCK_SIZE)))
    fields = FOOTER.pack(MAGIC, VERSION, BLOCK_SIZE, state.base_position, 0, state.event_count,
                         len(frames), state.size, state.segment_hash, 0)[:FOOTER_SIZE - 8]
    tables = ends + sums.tobytes()
    path.write_bytes(frames + tables + fields
                     + fmt.checksum(tables + fields).to_bytes(8, "little"))


def test_a_segment_of_batches_gets_no_copy(tmp_path):
    with Engine.open(tmp_path, fsync="no", segment_size=1 << 20) as engine:
        for i in range(3 * COPY_STEP // 10):
            engine.append(b"b%d" % (i % 3), [(b"e", b"x" * 20) for _ in range(10)])
        engine.sync()
        assert len(engine.segments) >= 2
        assert all(s.copies.current() is None for s in engine.segments)
        assert not list(tmp_path.glob("*.frm*"))
        frames = log_frames(engine)
        assert catch_up(engine, 0, 1 << 16)[0] == b"".join(frames)


@pytest.mark.parametrize("segment_size", [64 << 20, 2 << 20])
def test_a_segment_that_turns_to_single_events_is_copied_from_there(tmp_path, segment_size):
    """Batches first, then single events: the copy starts at the first window of single
    events (the active segment's, and a sealed one's through its footer's ``first``)."""
    with Engine.open(tmp_path, fsync="no", segment_size=segment_size) as engine:
        for i in range(1000):
            engine.append(b"b%d" % (i % 3), [(b"e", b"x" * 20) for _ in range(10)])
        for i in range(3 * COPY_STEP):
            engine.append(b"s%d" % (i % 5), [(b"e", b"%040d" % i)])
        engine.sync()
        first = engine.segments[0]
        copy = first.copies.current()
        assert copy is not None and 0 < copy.first <= 10_000 + COPY_BATCH
        frames = log_frames(engine)
        views, after = engine.all_spans(copy.first, max_events=1 << 30, max_bytes=1 << 30)
        assert len(views) == 1 and after == first.base_position + copy.copied
        rng = random.Random(3)
        check_catch_ups(engine, frames, rng)
        assert catch_up(engine, 0, 1 << 16)[0] == b"".join(frames)
    assert fsck.verify(tmp_path).clean
    with Engine.open(tmp_path, fsync="no", segment_size=segment_size) as engine:
        if engine.segments[0].is_active:  # made again, a step per append, from a window
            for i in range(3):
                engine.append(b"s0", [(b"e", b"after %d" % i)])
            assert engine.segments[0].copies.current().first >= COPY_STEP
            frames = log_frames(engine)
        else:
            assert engine.segments[0].copies.current().first == copy.first
        check_catch_ups(engine, frames, rng)


def test_a_copy_that_cannot_be_written_is_given_up_and_appends_go_on(tmp_path, caplog):
    with Engine.open(tmp_path, fsync="no", segment_size=64 << 20) as engine:
        (tmp_path / "00000000000000000000.frm.tmp").mkdir()  # open() fails: EISDIR
        with caplog.at_level(logging.WARNING, logger="meilies.engine"):
            for i in range(COPY_BATCH + 5):
                engine.append(b"one", [(b"e", b"%d" % i)])
            engine.sync()
        assert any("giving up the frame copy" in r.getMessage() for r in caplog.records)
        assert engine.segments[-1].copies.current() is None
        frames = log_frames(engine)
        assert len(frames) == COPY_BATCH + 5
        assert catch_up(engine, 0, 1 << 16)[0] == b"".join(frames)
        (tmp_path / "00000000000000000000.frm.tmp").rmdir()


def test_a_seal_that_fails_keeps_the_copy_growing_and_a_later_roll_seals_it(tmp_path):
    """A roll whose index cannot be written fails the append that rolled; the segment
    stays active with its copy, and the next roll seals both."""
    segment_size = 512 * 1024
    with Engine.open(tmp_path, fsync="no", segment_size=segment_size) as engine:
        blocker = tmp_path / "00000000000000000000.pidx.tmp"
        blocker.mkdir()  # write_file() cannot create its temporary file
        failed = 0
        i = 0
        while not failed:
            try:
                engine.append(b"s%d" % (i % 3), [(b"e", b"%060d" % i)])
            except StorageError:  # the failed roll's
                failed += 1
            i += 1
        assert len(engine.segments) == 1
        assert engine.segments[0].copies.current().copied >= COPY_BATCH
        blocker.rmdir()
        for j in range(3 * COPY_BATCH):
            engine.append(b"s%d" % (j % 3), [(b"e", b"%060d" % j)])
        engine.sync()
        assert len(engine.segments) >= 2
        assert isinstance(engine.segments[0].copies.current(), SealedCopy)
        frames = log_frames(engine)
        assert catch_up(engine, 0, 1 << 16)[0] == b"".join(frames)
    assert fsck.verify(tmp_path).clean


def test_disk_bytes_counts_the_copies(tmp_path):
    with Engine.open(tmp_path, fsync="no", segment_size=128 * 1024) as engine:
        publish_mixed(engine, 5_000, seed=9)
    with Engine.open(tmp_path, fsync="no", segment_size=128 * 1024) as engine:
        on_disk = sum(p.stat().st_size for p in tmp_path.iterdir()
                      if p.suffix in (".seg", ".pidx", ".sidx", ".frm", ".tmp"))
        assert copies(tmp_path)
        assert engine.stats()["disk_bytes"] == on_disk
        engine.all_spans(0)  # the first copy is opened and checked: still counted once
        assert engine.stats()["disk_bytes"] == on_disk


def test_after_an_open_the_active_copy_catches_up_a_step_per_append(tmp_path):
    from meilies.engine.framecopy import COPY_STEP
    total = 2 * COPY_STEP + 100
    with Engine.open(tmp_path, fsync="no", segment_size=64 << 20) as engine:
        for i in range(total):
            engine.append(b"s%d" % (i % 2), [(b"e", b"%d" % i)])
        engine.sync()
    with Engine.open(tmp_path, fsync="no", segment_size=64 << 20) as engine:
        active = engine.segments[-1]
        assert active.copies.current() is None  # opening made none
        copied = []
        for i in range(4):
            engine.append(b"s0", [(b"e", b"more %d" % i)])
            copy = active.copies.current()
            copied.append(copy.copied)
            frames = log_frames(engine)
            assert catch_up(engine, 0, 1 << 16)[0] == b"".join(frames)
        assert copied == [COPY_STEP, 2 * COPY_STEP, total + 3, total + 3]


def test_a_segment_sealed_without_a_copy_deletes_an_older_one(tmp_path):
    """A .frm left by an earlier seal of the segment (before a crash, say) is not this
    segment's copy once it is sealed without one: it goes, not waits for a reader."""
    with Engine.open(tmp_path, fsync="no", segment_size=1 << 20) as engine:
        stale = frame_copy_path(tmp_path, 0)
        stale.write_bytes(b"an older copy")
        for i in range(3 * COPY_STEP // 10):
            engine.append(b"b%d" % (i % 3), [(b"e", b"x" * 20) for _ in range(10)])
        engine.sync()
        assert len(engine.segments) >= 2
        assert not stale.exists()
