"""The segment format module: its version history, and its layout spelled in bytes."""

from __future__ import annotations

import re
import struct

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


def test_record_holds_each_event_as_its_resp_frame():
    events = [(b"created", b""), (b"paid", b"\r\n\x00$3\r\n")]
    record = fmt.encode_record(b"orders-17", 5, 100, 41, events, timestamp_ms=1234)
    header = fmt.decode_record_header(record.data, 0)
    assert (header.magic, header.version, header.flags, header.stream_name_length,
            header.body_length, header.count, header.base_position, header.first_number,
            header.stream_id, header.timestamp_ms) == (
        b"MREC", 1, 0, 9, len(record.data) - 56, 2, 100, 41, 5, 1234)
    assert header.checksum == fmt.record_checksum(record.data, 0, len(record.data))
    assert record.data[56:65] == b"orders-17"
    frames = [record.data[o:o + n] for o, n in record.frames]
    assert frames == [resp_frame(b"orders-17", 41, *events[0]),
                      resp_frame(b"orders-17", 42, *events[1])]
    at = 65
    for frame, (_name, data) in zip(frames, events):
        assert struct.unpack_from("<II", record.data, at) == (len(frame), len(data))
        at += 8 + len(frame)
    assert at == len(record.data)
    scanned = check_record(record.data, 0, len(record.data), deep=True)
    assert isinstance(scanned, ScannedRecord) and scanned.frames == record.frames
