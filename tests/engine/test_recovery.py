"""Crash recovery: a torn tail is the end of the log, and what was written before it stays.

Each scenario writes a log, takes a copy of the directory while the engine is still
open (what a ``kill -9`` leaves: ``close()`` would write a checkpoint, a crash does
not), then damages the newest segment's tail the way a crash can and reopens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine_helpers import (RecordSpan, append_garbage, copy_dir, crash_copy, newest_segment,
                            read_everything, record_spans, segment_files, truncate_file)
from meilies.engine import NO_STREAM, Engine
from meilies.engine import checkpoint as ckpt
from meilies.engine import format as fmt
from meilies.engine.files import CHECKPOINT_NAME


@dataclass
class CrashedLog:
    """A data directory as a crash left it, and what it must hold."""

    directory: Path
    #: (stream, number, name, data, position) of every event, the last record's included.
    events: list[tuple[bytes, int, bytes, bytes, int]]
    #: The newest segment's last record: the one a crash may cut.
    last: RecordSpan


def write_crashed_log(root: Path, fsync: str, segment_size: int, *, last_stream: bytes,
                      keep_checkpoint: bool) -> CrashedLog:
    """Write batches to a few streams, checkpoint, write two more records, crash.

    The two records after the checkpoint are the tail that opening must scan; the last
    one goes to ``last_stream`` (a new stream, or one that has events).
    """
    source = root / "live"
    engine = Engine.open(source, fsync=fsync, segment_size=segment_size)
    for i in range(6):
        engine.append(b"orders-%d" % (i % 2), [(b"created", b"\x00\r\n" * i), (b"paid", b"")])
    engine.checkpoint()
    engine.append(b"orders-1", [(b"shipped", b"box")])
    engine.append(last_stream, [(b"opened", b"first\r\n"), (b"noted", b"\x00" * 9),
                                (b"closed", b"")])
    engine.sync()
    events = read_everything(engine)
    crashed = crash_copy(source, root / "crashed")
    engine.close()
    if not keep_checkpoint:
        (crashed / CHECKPOINT_NAME).unlink()
    last = record_spans(newest_segment(crashed))[-1]
    assert last.stream == last_stream and last.count == 3
    return CrashedLog(crashed, events, last)


def assert_appends_continue(directory: Path, fsync: str, segment_size: int, events) -> None:
    """After recovery, new events get the next numbers and positions, and survive a reopen."""
    engine = Engine.open(directory, fsync=fsync, segment_size=segment_size)
    try:
        next_position = len(events)
        fresh = engine.append(b"after-crash", [(b"e", b"1")], expected=NO_STREAM)
        existing = engine.append(b"orders-1", [(b"e", b"2")])
        engine.sync()
        assert (fresh.first_number, fresh.end_position) == (0, next_position + 1)
        orders_1 = sum(1 for e in events if e[0] == b"orders-1")
        assert (existing.first_number, existing.end_position) == (orders_1, next_position + 2)
    finally:
        engine.close()
    with Engine.open(directory, fsync=fsync, segment_size=segment_size) as engine:
        assert engine.open_report.recovered == []
        assert read_everything(engine) == events + [
            (b"after-crash", 0, b"e", b"1", next_position),
            (b"orders-1", orders_1, b"e", b"2", next_position + 1)]


@pytest.mark.parametrize("keep_checkpoint", [True, False], ids=["checkpoint", "no-checkpoint"])
@pytest.mark.parametrize("last_stream", [b"fresh", b"orders-0"], ids=["new-stream", "old-stream"])
def test_record_torn_at_every_offset_is_truncated(tmp_path, segment_size, keep_checkpoint,
                                                  last_stream):
    # The fsync policy changes when bytes reach the disk, not which bytes: one policy
    # here (hundreds of reopens each), all three in the cheaper scenarios below.
    fsync_policy = "always"
    crashed = write_crashed_log(tmp_path, fsync_policy, segment_size, last_stream=last_stream,
                                keep_checkpoint=keep_checkpoint)
    before = crashed.events[:-3]
    segment = newest_segment(crashed.directory).name
    for cut in range(1, crashed.last.size):
        work = copy_dir(crashed.directory, tmp_path / f"cut-{cut}")
        truncate_file(work / segment, crashed.last.offset + cut)
        with Engine.open(work, fsync=fsync_policy, segment_size=segment_size) as engine:
            [report] = engine.open_report.recovered
            assert (report.path, report.valid_bytes, report.truncated_bytes) == (
                work / segment, crashed.last.offset, cut)
            assert read_everything(engine) == before
            if last_stream == b"fresh":
                assert engine.last_event_number(b"fresh") is None
                assert b"fresh" not in engine.stream_names()
        assert (work / segment).stat().st_size == crashed.last.offset
        if cut % 17 == 1 or cut == crashed.last.size - 1:  # enough to cover every region
            assert_appends_continue(work, fsync_policy, segment_size, before)


def test_log_that_ends_at_a_record_boundary_needs_no_recovery(tmp_path, segment_size):
    crashed = write_crashed_log(tmp_path, "always", segment_size, last_stream=b"fresh",
                                keep_checkpoint=False)
    truncate_file(newest_segment(crashed.directory), crashed.last.offset)
    with Engine.open(crashed.directory, segment_size=segment_size) as engine:
        assert engine.open_report.recovered == []
        assert read_everything(engine) == crashed.events[:-3]


def test_tail_written_after_the_checkpoint_is_served_after_a_crash(tmp_path, fsync_policy,
                                                                   segment_size):
    crashed = write_crashed_log(tmp_path, fsync_policy, segment_size, last_stream=b"orders-0",
                                keep_checkpoint=True)
    with Engine.open(crashed.directory, fsync=fsync_policy, segment_size=segment_size) as engine:
        report = engine.open_report
        assert report.used_checkpoint and report.recovered == []
        assert report.scanned_bytes > 0
        assert read_everything(engine) == crashed.events
    assert_appends_continue(crashed.directory, fsync_policy, segment_size, crashed.events)


GARBAGE = {
    "one-byte": b"\x01",
    "random": random.Random(7).randbytes(5000),
    "shorter-than-a-header": random.Random(8).randbytes(fmt.RECORD_HEADER_SIZE - 1),
    "exactly-a-header": random.Random(9).randbytes(fmt.RECORD_HEADER_SIZE),
    "record-magic-then-random": fmt.RECORD_MAGIC + random.Random(10).randbytes(300),
    "zeros": bytes(4096),
    "huge-length": fmt.RECORD_MAGIC + bytes(8) + b"\x01\x00\x01\x00" + b"\xff" * 4 + bytes(36),
}


@pytest.mark.parametrize("keep_checkpoint", [True, False], ids=["checkpoint", "no-checkpoint"])
@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_after_the_last_record_is_truncated(tmp_path, fsync_policy, segment_size, kind,
                                                    keep_checkpoint):
    crashed = write_crashed_log(tmp_path, fsync_policy, segment_size, last_stream=b"fresh",
                                keep_checkpoint=keep_checkpoint)
    segment = newest_segment(crashed.directory)
    size = segment.stat().st_size
    append_garbage(segment, GARBAGE[kind])
    with Engine.open(crashed.directory, fsync=fsync_policy, segment_size=segment_size) as engine:
        [report] = engine.open_report.recovered
        assert (report.path, report.valid_bytes, report.truncated_bytes) == (
            segment, size, len(GARBAGE[kind]))
        assert read_everything(engine) == crashed.events
    assert segment.stat().st_size == size
    assert_appends_continue(crashed.directory, fsync_policy, segment_size, crashed.events)


def test_a_copy_of_the_last_record_header_left_unfinished_is_truncated(tmp_path):
    """The start of a record that repeats a real header (a retried write) is a torn tail."""
    crashed = write_crashed_log(tmp_path, "always", 1 << 20, last_stream=b"fresh",
                                keep_checkpoint=True)
    segment = newest_segment(crashed.directory)
    raw = segment.read_bytes()
    append_garbage(segment, raw[crashed.last.offset:crashed.last.end - 1])
    with Engine.open(crashed.directory) as engine:
        [report] = engine.open_report.recovered
        assert report.truncated_bytes == crashed.last.size - 1
        assert read_everything(engine) == crashed.events


@pytest.mark.parametrize("left", [0, 1, fmt.SEGMENT_HEADER_SIZE - 1])
def test_segment_cut_short_while_being_created_is_recreated(tmp_path, fsync_policy, left):
    """A crash during a roll, between creating the next segment and writing its header.

    Rolling writes the checkpoint only after the new segment's header is durable, so
    the checkpoint does not know the new file and its lost header is a torn tail.
    """
    crashed = write_crashed_log(tmp_path, fsync_policy, 1 << 20, last_stream=b"fresh",
                                keep_checkpoint=True)
    Engine.open(crashed.directory, fsync=fsync_policy).close()  # a checkpoint covers all
    next_base = len(crashed.events)
    torn = crashed.directory / newest_segment(crashed.directory).name.replace(
        "%020d" % 0, "%020d" % next_base)
    torn.write_bytes(fmt.encode_segment_header(next_base)[:left])
    with Engine.open(crashed.directory, fsync=fsync_policy) as engine:
        [report] = engine.open_report.recovered
        assert report.path == torn and report.truncated_bytes == left
        assert read_everything(engine) == crashed.events
        # The open's own checkpoint (not close's) already knows the sealed segment
        # and the recreated one.
        [sealed, active] = ckpt.read(crashed.directory).segments
        assert sealed.sidx_hash != 0 and active.base_position == next_base
    assert len(segment_files(crashed.directory)) == 2
    assert_appends_continue(crashed.directory, fsync_policy, 1 << 20, crashed.events)


def test_torn_event_whose_data_holds_a_whole_record_is_a_torn_tail(tmp_path):
    """Event data may be anything, a MeiliES record included (a backup of a segment, a
    test fixture). A crash that cuts such an event after the embedded record must not
    make the embedded record pass for a valid one that follows damage."""
    source = tmp_path / "live"
    engine = Engine.open(source)
    engine.append(b"orders", [(b"created", b"1")])
    engine.sync()
    embedded = fmt.encode_record(b"orders", 0, 0, 0, [(b"created", b"1")]).data
    engine.append(b"backups", [(b"segment", embedded + b"and more data after it")])
    engine.sync()
    events = read_everything(engine)
    crashed = crash_copy(source, tmp_path / "crashed")
    engine.close()
    segment = newest_segment(crashed)
    last = record_spans(segment)[-1]
    data_end = last.end - 2  # the frame's closing \r\n
    truncate_file(segment, data_end - 5)
    with Engine.open(crashed) as engine:
        [report] = engine.open_report.recovered
        assert (report.valid_bytes, report.truncated_bytes) == (last.offset,
                                                                data_end - 5 - last.offset)
        assert read_everything(engine) == events[:1]
