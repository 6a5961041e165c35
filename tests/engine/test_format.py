"""The segment format module: its version history, and its layout spelled in bytes."""

from __future__ import annotations

import re
import struct

import pytest

from engine_helpers import resp_frame
from meilies.engine import format as fmt
from meilies.engine.recovery import ScannedRecord, check_record


def test_format_history_lists_the_current_version():
    """NATS' fullStateVersion = 4 sits under a history that lists only 1 and 2."""
    assert fmt.FORMAT_VERSION in fmt.FORMAT_HISTORY
    assert max(fmt.FORMAT_HISTORY) == fmt.FORMAT_VERSION


def test_module_docstring_history_lists_every_version():
    history = fmt.__doc__.split("Version history")[1]
    listed = {int(v) for v in re.findall(r"^\s+(\d+) --", history, re.MULTILINE)}
    assert listed == set(fmt.FORMAT_HISTORY)


def test_header_offsets_match_the_documented_layout():
    assert (fmt.SEGMENT_HEADER_SIZE, fmt.RECORD_HEADER_SIZE, fmt.EVENT_HEADER_SIZE) == (32, 56, 8)
    assert (fmt.MAGIC_OFFSET, fmt.CHECKSUM_OFFSET, fmt.CHECKSUM_END, fmt.LENGTH_OFFSET) == (
        0, 4, 12, 16)


def test_segment_header_round_trips():
    raw = fmt.encode_segment_header(1048576)
    header = fmt.decode_segment_header(raw)
    assert (header.magic, header.version, header.header_size, header.base_position,
            header.checksum_ok) == (b"MEILIESG", fmt.FORMAT_VERSION, 32, 1048576, True)
    damaged = raw[:20] + bytes([raw[20] ^ 0xFF]) + raw[21:]
    assert not fmt.decode_segment_header(damaged).checksum_ok


@pytest.mark.parametrize("version", sorted(fmt.FORMAT_HISTORY))
def test_record_holds_each_event_as_its_resp_frame(version):
    events = [(b"created", b""), (b"paid", b"\r\n\x00$3\r\n")]
    record = fmt.encode_record(b"orders-17", 5, 100, 41, events, timestamp_ms=1234,
                               version=version)
    header = fmt.decode_record_header(record.data, 0)
    assert (header.magic, header.version, header.flags, header.stream_name_length,
            header.body_length, header.count, header.base_position, header.first_number,
            header.stream_id, header.timestamp_ms) == (
        b"MREC", version, 0, 9, len(record.data) - 56, 2, 100, 41, 5, 1234)
    assert header.checksum == fmt.record_checksum(record.data, 0, len(record.data))
    assert record.data[56:65] == b"orders-17"
    frames = [record.data[o:o + n] for o, n in record.frames]
    assert frames == [resp_frame(b"orders-17", 41, *events[0]),
                      resp_frame(b"orders-17", 42, *events[1])]
    lengths = [(len(frame), len(data)) for frame, (_name, data) in zip(frames, events)]
    if version == 1:  # each frame after its own lengths
        expected_body = b"".join(struct.pack("<II", *pair) + frame
                                 for pair, frame in zip(lengths, frames))
    else:  # the lengths, then the frames back to back
        expected_body = b"".join(struct.pack("<II", *pair) for pair in lengths) \
            + b"".join(frames)
    assert record.data[65:] == expected_body
    scanned = check_record(record.data, 0, len(record.data), deep=True)
    assert isinstance(scanned, ScannedRecord) and scanned.frames == record.frames


def test_one_event_record_differs_between_versions_only_in_version_and_checksum():
    one = [(b"created", b"{}")]
    old = fmt.encode_record(b"s", 0, 7, 3, one, timestamp_ms=1, version=1)
    new = fmt.encode_record(b"s", 0, 7, 3, one, timestamp_ms=1, version=2)
    assert old.data[12] == 1 and new.data[12] == 2
    assert old.data[13:] == new.data[13:] and old.frames == new.frames
    for version in (1, 2):
        single = fmt.encode_single(b"s", 0, 7, 3, b"created", b"{}", version)
        record = fmt.encode_record(b"s", 0, 7, 3, one, version=version)
        # Same bytes but the timestamp (and so the checksum): encode_single takes the clock.
        assert single[0][12:48] == record.data[12:48] and single[0][56:] == record.data[56:]
        assert (single[1], single[2]) == record.frames[0]


def test_a_version_the_code_does_not_know_is_not_written():
    with pytest.raises(ValueError):
        fmt.encode_record(b"s", 0, 0, 0, [(b"e", b"")], version=max(fmt.FORMAT_HISTORY) + 1)
