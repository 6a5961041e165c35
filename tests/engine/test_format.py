"""The segment format module: its version history, and its layout spelled in bytes."""

from __future__ import annotations

import re
import struct

import pytest
import xxhash

from engine_helpers import resp_frame
from meilies.engine import format as fmt
from meilies.engine.recovery import BadRecord, ScannedRecord, check_record


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
    assert record.data[56:65] == b"orders-17"
    frames = [record.data[o:o + n] for o, n in record.frames]
    assert frames == [resp_frame(b"orders-17", 41, *events[0]),
                      resp_frame(b"orders-17", 42, *events[1])]
    lengths = [(len(frame), len(data)) for frame, (_name, data) in zip(frames, events)]
    if version == 1:  # each frame after its own lengths
        expected_body = b"".join(struct.pack("<II", *pair) + frame
                                 for pair, frame in zip(lengths, frames))
    elif version == 2:  # the lengths, then the frames back to back
        expected_body = b"".join(struct.pack("<II", *pair) for pair in lengths) \
            + b"".join(frames)
    else:  # the lengths with each frame's xxh32, then the frames back to back
        expected_body = b"".join(struct.pack("<III", *pair, xxhash.xxh32_intdigest(frame))
                                 for pair, frame in zip(lengths, frames)) + b"".join(frames)
    assert record.data[65:] == expected_body
    # The checksum covers the header after itself, the name and the lengths; in versions
    # 1 and 2 the frames too.
    covered_end = 65 + 12 * 2 if version >= 3 else len(record.data)
    assert header.checksum == xxhash.xxh3_64_intdigest(record.data[12:covered_end])
    scanned = check_record(record.data, 0, len(record.data), deep=True)
    assert isinstance(scanned, ScannedRecord) and scanned.frames == record.frames


def test_one_event_record_differs_between_versions_only_in_version_and_checksum():
    one = [(b"created", b"{}")]
    old = fmt.encode_record(b"s", 0, 7, 3, one, timestamp_ms=1, version=1)
    new = fmt.encode_record(b"s", 0, 7, 3, one, timestamp_ms=1, version=2)
    assert old.data[12] == 1 and new.data[12] == 2
    assert old.data[13:] == new.data[13:] and old.frames == new.frames
    for version in sorted(fmt.FORMAT_HISTORY):
        single = fmt.encode_single(b"s", 0, 7, 3, b"created", b"{}", version)
        record = fmt.encode_record(b"s", 0, 7, 3, one, version=version)
        # Same bytes but the timestamp (and so the checksum): encode_single takes the clock.
        assert single[0][12:48] == record.data[12:48] and single[0][56:] == record.data[56:]
        assert (single[1], single[2]) == record.frames[0]


def test_a_version_the_code_does_not_know_is_not_written():
    with pytest.raises(ValueError):
        fmt.encode_record(b"s", 0, 0, 0, [(b"e", b"")], version=max(fmt.FORMAT_HISTORY) + 1)


# -- format 3: a check per frame --------------------------------------------------------------


def batch(count: int = 5):
    events = [(b"e%d" % i, b"data-%d" % i * (i + 1)) for i in range(count)]
    return events, fmt.encode_record(b"orders-5", 2, 1000, 40, events, version=3)


@pytest.mark.parametrize("event", [0, 2, 4])
@pytest.mark.parametrize("where", ["first", "data", "last"])
def test_a_flipped_byte_in_a_frame_names_that_event_and_no_other(event, where):
    events, record = batch()
    raw = bytearray(record.data)
    at, length = record.frames[event]
    raw[{"first": at, "data": at + length - 4, "last": at + length - 1}[where]] ^= 0x20
    for deep in (False, True):
        bad = check_record(bytes(raw), 0, len(raw), deep=deep)
        assert isinstance(bad, BadRecord) and bad.event == event, bad
        assert bad.reason.startswith(f"event 'orders-5':{40 + event} (position {1000 + event},"
                                     f" event {event} of the record's 5)"), bad.reason
        assert bad.header.count == 5 and bad.stream == b"orders-5"


@pytest.mark.parametrize("where", ["header", "name", "lengths"])
def test_a_flipped_byte_before_the_frames_fails_the_whole_record(where):
    _events, record = batch()
    raw = bytearray(record.data)
    raw[{"header": 30, "name": 58, "lengths": 56 + 8 + 12 * 3 + 1}[where]] ^= 0x01
    bad = check_record(bytes(raw), 0, len(raw))
    assert isinstance(bad, BadRecord) and bad.event is None and bad.header is None


@pytest.mark.parametrize("keep", [1, 2, 4])
def test_a_record_shortened_to_its_whole_events_is_a_valid_record_of_them(keep):
    events, record = batch()
    raw = bytearray(record.data)
    raw[record.frames[keep][0] + 3] ^= 0x20
    short = fmt.shortened_record(bytes(raw), 0, fmt.decode_record_header(raw, 0), keep)
    expected = fmt.encode_record(b"orders-5", 2, 1000, 40, events[:keep],
                                 timestamp_ms=fmt.decode_record_header(raw, 0).timestamp_ms,
                                 version=3)
    assert short == expected.data
    assert isinstance(check_record(short, 0, len(short), deep=True), ScannedRecord)


# -- format 4: ids, metadata and the transaction flag -----------------------------------------


def test_ids_and_metadata_sit_between_the_lengths_and_the_frames():
    events = [(b"created", b"{}"), (b"paid", b"x" * 10), (b"shipped", b"")]
    extras = [fmt.encode_extras(b"id-1", b'{"user":"ann"}'), fmt.NO_EXTRAS,
              fmt.encode_extras(None, b"")]
    record = fmt.encode_record(b"orders-3", 1, 50, 7, events, timestamp_ms=99, version=4,
                               extras=extras, flags=fmt.FLAG_CONTINUED)
    header = fmt.decode_record_header(record.data, 0)
    region = struct.pack("<3I", *map(len, extras)) + b"".join(extras)
    assert header.extras_length == len(region) and header.flags == fmt.FLAG_CONTINUED
    table_end = 56 + len(b"orders-3") + 12 * 3
    assert record.data[table_end:table_end + len(region)] == region
    # The frames stay back to back, right after the extras, and end the record.
    assert record.offsets[0] == table_end + len(region)
    assert record.offsets[-1] + record.lengths[-1] == len(record.data)
    # The checksum covers everything before the frames, the extras included.
    assert header.checksum == xxhash.xxh3_64_intdigest(record.data[12:record.offsets[0]])
    scanned = check_record(record.data, 0, len(record.data), deep=True)
    assert isinstance(scanned, ScannedRecord) and scanned.frames == record.frames
    assert fmt.record_extras(record.data, 0, header) == extras
    assert [fmt.decode_extras(raw) for raw in extras] == [
        (b"id-1", b'{"user":"ann"}'), (None, None), (None, b"")]


def test_a_flipped_byte_in_the_extras_fails_the_record_checksum():
    events = [(b"e", b"1"), (b"e", b"2")]
    record = fmt.encode_record(b"s", 0, 0, 0, events, version=4,
                               extras=[fmt.encode_extras(b"a", None), fmt.encode_extras(b"b", None)])
    raw = bytearray(record.data)
    raw[record.offsets[0] - 3] ^= 0x01  # inside the last event's id
    bad = check_record(raw, 0, len(raw))
    assert isinstance(bad, BadRecord) and bad.reason == "checksum mismatch"


def test_malformed_extras_under_a_good_checksum_are_refused():
    record = fmt.encode_record(b"s", 0, 0, 0, [(b"e", b"1")], version=4,
                               extras=[b"$5\r\nab\r\n$-1\r\n"])
    bad = check_record(record.data, 0, len(record.data))
    assert isinstance(bad, BadRecord) and "malformed id and metadata" in bad.reason


@pytest.mark.parametrize("version", [1, 2, 3])
def test_older_versions_carry_neither_extras_nor_flags(version):
    with pytest.raises(ValueError):
        fmt.encode_record(b"s", 0, 0, 0, [(b"e", b"")], version=version, extras=[fmt.NO_EXTRAS])
    with pytest.raises(ValueError):
        fmt.encode_record(b"s", 0, 0, 0, [(b"e", b"")], version=version, flags=fmt.FLAG_CONTINUED)
