"""Damage before the end of the log refuses the open, names the file and offset, drops nothing.

A torn tail is the end of the log (test_recovery.py); anything else that fails a check
is damage: a record that fails its checksum with a valid record after it, any bad byte
in a sealed segment or in what the checkpoint vouches for. The engine raises
:class:`CorruptRecord` (or :class:`CorruptSegment` where only a whole-segment hash or
the file's header can tell) and leaves every file as it found it, for ``meilies-fsck``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_helpers import (crash_copy, fix_checksum, flip_byte, newest_segment,
                            read_everything, record_spans, segment_files, shrink_tail,
                            truncate_file)
from meilies.engine import CorruptRecord, CorruptSegment, Engine
from meilies.engine import format as fmt
from meilies.engine.files import CHECKPOINT_NAME

#: Where a flipped byte lands inside a record, relative to its first byte.
RECORD_REGIONS = {
    "magic": lambda size: 1,
    "checksum": lambda size: 6,
    "body-length": lambda size: fmt.LENGTH_OFFSET,
    "event-count": lambda size: 21,
    "first-number": lambda size: 33,
    "stream-name": lambda size: fmt.RECORD_HEADER_SIZE,
    "event-data": lambda size: size - 4,
}


def write_log(directory: Path, segment_size: int, records: int = 12) -> None:
    with Engine.open(directory, segment_size=segment_size) as engine:
        for i in range(records):
            engine.append(b"stream-%d" % (i % 3), [(b"made", b"payload %d" % i),
                                                    (b"kept", b"\r\n\x00")])


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "LOCK"}


def assert_open_refused(directory: Path, error, path: Path, offset: int, **options) -> None:
    """Opening raises ``error`` at ``path``/``offset``, changes no file, and keeps
    refusing (the failed open released the directory lock)."""
    before = snapshot(directory)
    for _attempt in range(2):
        with pytest.raises(error) as caught:
            Engine.open(directory, **options)
        assert type(caught.value) is error
        assert (caught.value.path, caught.value.offset) == (path, offset), caught.value
        assert "meilies-fsck" in str(caught.value)
    assert snapshot(directory) == before


@pytest.mark.parametrize("keep_checkpoint", [True, False], ids=["checkpoint", "no-checkpoint"])
@pytest.mark.parametrize("region", sorted(RECORD_REGIONS))
def test_flipped_byte_in_a_sealed_segment_refuses_open(tmp_path, region, keep_checkpoint):
    write_log(tmp_path, segment_size=400)
    assert len(segment_files(tmp_path)) >= 3
    sealed = segment_files(tmp_path)[1]
    record = record_spans(sealed)[1]
    flip_byte(sealed, record.offset + RECORD_REGIONS[region](record.size))
    if not keep_checkpoint:
        (tmp_path / CHECKPOINT_NAME).unlink()
    assert_open_refused(tmp_path, CorruptRecord, sealed, record.offset)


@pytest.mark.parametrize("which", ["first", "middle", "last"])
@pytest.mark.parametrize("region", sorted(RECORD_REGIONS))
def test_flipped_byte_in_the_active_segments_checkpointed_prefix_refuses_open(tmp_path, region,
                                                                              which):
    """Even the last record: the checkpoint says it was durable, so it is not a torn tail."""
    write_log(tmp_path, segment_size=1 << 20)
    [active] = segment_files(tmp_path)
    spans = record_spans(active)
    record = {"first": spans[0], "middle": spans[len(spans) // 2], "last": spans[-1]}[which]
    flip_byte(active, record.offset + RECORD_REGIONS[region](record.size))
    assert_open_refused(tmp_path, CorruptRecord, active, record.offset)


def write_log_with_tail(root: Path, segment_size: int, *, keep_checkpoint: bool) -> Path:
    """A crash copy whose newest segment has records the checkpoint does not cover."""
    source = root / "live"
    engine = Engine.open(source, segment_size=segment_size, fsync="no")
    for i in range(5):
        engine.append(b"before", [(b"e", b"%d" % i)])
    engine.checkpoint()
    for i in range(4):
        engine.append(b"after-%d" % (i % 2), [(b"e", b"tail %d" % i), (b"f", b"")])
    crashed = crash_copy(source, root / "crashed")
    engine.close()
    if not keep_checkpoint:
        (crashed / CHECKPOINT_NAME).unlink()
    return crashed


@pytest.mark.parametrize("keep_checkpoint", [True, False], ids=["checkpoint", "no-checkpoint"])
@pytest.mark.parametrize("region", sorted(RECORD_REGIONS))
def test_flipped_byte_in_the_scanned_tail_followed_by_a_valid_record_refuses_open(
        tmp_path, region, keep_checkpoint):
    crashed = write_log_with_tail(tmp_path, 1 << 20, keep_checkpoint=keep_checkpoint)
    segment = newest_segment(crashed)
    record = record_spans(segment)[-2]
    flip_byte(segment, record.offset + RECORD_REGIONS[region](record.size))
    assert_open_refused(crashed, CorruptRecord, segment, record.offset)


def test_flipped_byte_in_the_last_record_of_the_scanned_tail_is_a_torn_tail(tmp_path):
    """Past the checkpoint, with no valid record after it, bit rot and a torn write look
    the same; the contract treats both as the end of the log."""
    crashed = write_log_with_tail(tmp_path, 1 << 20, keep_checkpoint=True)
    segment = newest_segment(crashed)
    last = record_spans(segment)[-1]
    flip_byte(segment, last.offset + 30)
    with Engine.open(crashed) as engine:
        [report] = engine.open_report.recovered
        assert (report.valid_bytes, report.truncated_bytes) == (last.offset, last.size)
        assert engine.last_event_number(b"after-1") == 1


@pytest.mark.parametrize("segment_index", [0, -1], ids=["sealed", "active"])
def test_record_rewritten_with_a_valid_checksum_is_caught_by_the_segment_hash(
        tmp_path, segment_index):
    write_log(tmp_path, segment_size=400)
    segment = segment_files(tmp_path)[segment_index]
    record = record_spans(segment)[0]
    flip_byte(segment, record.end - 3)  # a data byte: the framing still holds
    fix_checksum(segment, record.offset)
    assert_open_refused(tmp_path, CorruptSegment, segment, 0)


def test_sealed_segment_cut_short_refuses_open(tmp_path):
    write_log(tmp_path, segment_size=400)
    sealed = segment_files(tmp_path)[0]
    size = sealed.stat().st_size
    shrink_tail(sealed, 5)
    assert_open_refused(tmp_path, CorruptSegment, sealed, size - 5)


def test_sealed_segment_cut_short_without_a_checkpoint_is_not_a_torn_tail(tmp_path):
    write_log(tmp_path, segment_size=400)
    (tmp_path / CHECKPOINT_NAME).unlink()
    sealed = segment_files(tmp_path)[0]
    last = record_spans(sealed)[-1]
    truncate_file(sealed, last.end - 5)
    assert_open_refused(tmp_path, CorruptRecord, sealed, last.offset)


def test_active_segment_shorter_than_its_checkpoint_refuses_open(tmp_path):
    """The checkpoint is written after a sync: losing bytes it covers is damage."""
    write_log(tmp_path, segment_size=1 << 20)
    [active] = segment_files(tmp_path)
    last = record_spans(active)[-1]
    truncate_file(active, last.offset + 10)
    assert_open_refused(tmp_path, CorruptSegment, active, last.offset + 10)


@pytest.mark.parametrize("offset", [0, 9, 13, 17, 27])
def test_flipped_byte_in_a_segment_header_refuses_open(tmp_path, offset):
    write_log(tmp_path, segment_size=400)
    segment = segment_files(tmp_path)[1]
    flip_byte(segment, offset)
    assert_open_refused(tmp_path, CorruptSegment, segment, 0)


@pytest.mark.parametrize("newest", [True, False], ids=["newest", "older"])
def test_segment_shorter_than_a_header_with_foreign_bytes_refuses_open(tmp_path, newest):
    write_log(tmp_path, segment_size=400)
    segment = segment_files(tmp_path)[-1 if newest else 1]
    segment.write_bytes(b"not a segment")
    assert_open_refused(tmp_path, CorruptSegment, segment, 0)


def test_older_segment_cut_to_nothing_refuses_open(tmp_path):
    """Only the newest segment can be caught half-created by a crash."""
    write_log(tmp_path, segment_size=400)
    segment = segment_files(tmp_path)[1]
    truncate_file(segment, 0)
    assert_open_refused(tmp_path, CorruptSegment, segment, 0)


@pytest.mark.parametrize("keep_checkpoint", [True, False], ids=["checkpoint", "no-checkpoint"])
def test_missing_middle_segment_refuses_open(tmp_path, keep_checkpoint):
    write_log(tmp_path, segment_size=400)
    segments = segment_files(tmp_path)
    segments[1].unlink()
    if not keep_checkpoint:
        (tmp_path / CHECKPOINT_NAME).unlink()
    # The checkpoint names the missing file; without it, the gap in positions shows
    # at the next one.
    assert_open_refused(tmp_path, CorruptSegment, segments[1 if keep_checkpoint else 2], 0)


@pytest.mark.parametrize("keep_checkpoint", [True, False], ids=["checkpoint", "no-checkpoint"])
def test_segment_renamed_to_another_position_refuses_open(tmp_path, keep_checkpoint):
    write_log(tmp_path, segment_size=400)
    segments = segment_files(tmp_path)
    wrong = segments[-1].with_name("%020d.seg" % (int(segments[-1].stem) + 1))
    segments[-1].rename(wrong)
    if not keep_checkpoint:
        (tmp_path / CHECKPOINT_NAME).unlink()
    # The checkpoint misses the old name; without it, the header contradicts the new.
    assert_open_refused(tmp_path, CorruptSegment, segments[-1] if keep_checkpoint else wrong, 0)


def test_undamaged_log_opens_after_the_damage_tests_pattern(tmp_path):
    """The scenario above without damage: proves the refusals come from the damage."""
    write_log(tmp_path, segment_size=400)
    with Engine.open(tmp_path) as engine:
        assert len(read_everything(engine)) == 24
        assert engine.open_report.recovered == []


def test_without_verify_on_open_the_scanned_tail_is_still_checked(tmp_path):
    """verify_on_open=False skips hashing what the checkpoint covers; what opening
    scans is checked record by record all the same."""
    crashed = write_log_with_tail(tmp_path, 1 << 20, keep_checkpoint=True)
    segment = newest_segment(crashed)
    record = record_spans(segment)[-2]
    flip_byte(segment, record.offset + 60)
    assert_open_refused(crashed, CorruptRecord, segment, record.offset, verify_on_open=False)


def test_newest_segment_deleted_while_the_checkpoint_lists_it_refuses_open(tmp_path):
    """Without the checkpoint the log would just look shorter: acknowledged events
    would vanish without a word. The checkpoint knows better, so the open refuses."""
    write_log(tmp_path, segment_size=400)
    newest = segment_files(tmp_path)[-1]
    newest.unlink()
    with pytest.raises(CorruptSegment) as caught:
        Engine.open(tmp_path)
    assert (caught.value.path, caught.value.offset) == (newest, 0)
    assert "missing" in caught.value.reason
