"""Bit rot: one flipped byte costs the damaged event and what follows it, never the whole
events stored before it in the same record (issue 10).

A pipelined run of publishes is stored as one record; each of its events had its own
``+OK``. Format 3 gives each frame its own check, so ``meilies-fsck`` names the exact
event (``stream:number`` and position) and ``--repair`` writes the record back with the
events before the damaged one. The grid: a flipped byte in the first, a middle and the
last frame of a record, in its header and in its lengths; in the first, a middle and
the newest segment. Each time: what fsck says, what the repair keeps (byte for byte),
a clean fsck after it, and the real server serving the repaired directory.
"""

from __future__ import annotations

import json

import pytest

from meilies.engine import Engine
from meilies.engine import format as fmt
from meilies.engine.recovery import ScannedRecord, check_record

from test_fsck import flip_byte, read_all, run_fsck, segment_files, write_events

#: Where in a record the byte is flipped, and how many of its events stay whole.
DAMAGE = {
    "first-frame": 0,
    "middle-frame": 5,
    "last-frame": 9,
    "header": 0,  # first_number: the checksum fails, no event of the record is trusted
    "lengths": 0,  # a frame length: the same
}


def damage(segment, which_record: int, where: str) -> tuple[ScannedRecord, int]:
    """Flip one byte of a record of ``segment``; return the record as it was and the
    offset of the flipped byte."""
    raw = segment.read_bytes()
    at = fmt.SEGMENT_HEADER_SIZE
    for _ in range(which_record):
        at = check_record(raw, at, len(raw)).end
    record = check_record(raw, at, len(raw), deep=True)
    assert isinstance(record, ScannedRecord) and record.header.count == 10
    if where.endswith("-frame"):
        frame_at, frame_len = record.frames[DAMAGE[where]]
        offset = frame_at + frame_len - 5  # a data byte: the frame still parses
    elif where == "header":
        offset = at + 33  # first_number
    else:
        offset = at + fmt.RECORD_HEADER_SIZE + record.header.stream_name_length + 12 * 3
    flip_byte(segment, offset)
    return record, offset


@pytest.mark.parametrize("where", list(DAMAGE))
@pytest.mark.parametrize("segment_at", ["first", "middle", "newest"])
def test_a_flipped_byte_costs_the_damaged_event_and_what_follows_only(
        tmp_path, start_server, segment_at, where):
    data_dir = tmp_path / "data"
    events = write_events(data_dir)
    segments = segment_files(data_dir)
    assert len(segments) >= 3
    segment = {"first": segments[0], "middle": segments[len(segments) // 2],
               "newest": segments[-1]}[segment_at]
    record, _offset = damage(segment, 1, where)  # records follow it in every segment
    header = record.header
    stream = record.stream.decode()
    kept = DAMAGE[where]
    good = header.base_position + kept  # events of the log before the damage

    done = run_fsck(data_dir)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"segment {segment.name}: ok_up_to={record.offset} " in done.stdout
    if where.endswith("-frame"):
        # The exact event: stream:number, its position, where it sits in the record.
        assert (f"event '{stream}':{header.first_number + kept} (position {good}, event"
                f" {kept} of the record's 10): its frame fails its checksum") in done.stdout
    else:
        assert 'reason="checksum mismatch"' in done.stdout
    if kept:
        assert (f"--repair would keep events {header.first_number}.."
                f"{header.first_number + kept - 1} of stream '{stream}'") in done.stdout
    else:
        assert "would keep" not in done.stdout

    removal = json.loads(run_fsck(data_dir, "--json").stdout)["removal"]
    if kept:
        assert removal["kept"]["first"] == header.first_number
        assert removal["kept"]["count"] == kept
        assert removal["kept"]["offset"] == record.offset
    else:
        assert removal["kept"] is None
    if where.endswith("-frame"):  # (a damaged header may misstate its own numbers)
        removed = removal["events"][0]
        assert (removed["stream"], removed["first"], removed["verified"]) == (
            stream, header.first_number + kept, False)

    repaired = run_fsck(data_dir, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    if kept:
        assert f"kept events {header.first_number}..{header.first_number + kept - 1}" \
            in repaired.stdout
    again = run_fsck(data_dir)
    assert again.returncode == 0, again.stdout
    # Every event before the damage, the whole ones of the damaged record included,
    # byte for byte; nothing after it.
    assert read_all(data_dir) == events[:good]

    server = start_server(data_dir=data_dir)
    client = server.client()
    last = header.first_number + kept - 1
    reply = client.call("last-event-number", stream)
    assert reply == (b"*3\r\n+last-event-number\r\n+%s\r\n:%d\r\n" % (stream.encode(), last)
                     if last >= 0 else
                     b"*3\r\n+last-event-number\r\n+%s\r\n$-1\r\n" % stream.encode())
    assert client.call("publish", stream, "after-repair", "x") == b"+OK\r\n"
    client.close()
    assert server.stop() == 0
    assert read_all(data_dir)[-1] == (stream.encode(), last + 1, b"after-repair", b"x")


def test_a_torn_tail_in_a_frame_is_never_shortened(tmp_path):
    # A record whose write a crash cut was never acknowledged, and an append is all or
    # nothing: its whole events are not kept, even though their checks hold.
    data_dir = tmp_path / "data"
    events = write_events(data_dir)
    newest = segment_files(data_dir)[-1]
    numbers = [e for e in events if e[0] == b"orders-0"]
    record = fmt.encode_record(b"orders-0", 0, len(events), len(numbers),
                               [(b"late", b"%d" % i) for i in range(10)])
    raw = bytearray(record.data)
    frame_at, frame_len = record.frames[6]
    raw[frame_at + frame_len - 3] ^= 0x01  # as if its last pages never reached the disk
    with open(newest, "ab") as handle:
        handle.write(bytes(raw))
    done = run_fsck(data_dir, "--repair")
    assert "kind=torn-tail" in done.stdout and "keep" not in done.stdout, done.stdout
    assert "'orders-0':%d (position %d" % (len(numbers) + 6, len(events) + 6) in done.stdout
    assert read_all(data_dir) == events


# -- --repair --salvage: everything after the damage stays ---------------------------------------

PLACEHOLDER = b"$damaged"


@pytest.mark.parametrize("where", list(DAMAGE))
@pytest.mark.parametrize("segment_at", ["first", "middle", "newest"])
def test_salvage_keeps_every_record_after_the_damage_with_placeholders(
        tmp_path, start_server, segment_at, where):
    data_dir = tmp_path / "data"
    events = write_events(data_dir)
    segments = segment_files(data_dir)
    segment = {"first": segments[0], "middle": segments[len(segments) // 2],
               "newest": segments[-1]}[segment_at]
    record, _offset = damage(segment, 1, where)
    header = record.header
    stream = record.stream
    # A frame's damage costs that event; a header's or a lengths table's, the record's
    # events (named by the header when it is still consistent, else by the numbers the
    # stream's next record shows missing).
    replaced = [DAMAGE[where]] if where.endswith("-frame") else list(range(10))
    expected = list(events)
    for i in replaced:
        expected[header.base_position + i] = (stream, header.first_number + i, PLACEHOLDER, b"")

    done = run_fsck(data_dir, "--repair", "--salvage")
    assert done.returncode == 0, done.stdout + done.stderr
    first = header.first_number + replaced[0]
    what = (f"event {first}" if len(replaced) == 1 else
            f"events {first}..{first + len(replaced) - 1}")
    assert f"  replaced {what} of stream '{stream.decode()}'" in done.stdout, done.stdout
    assert f"salvaged: {len(replaced)} events replaced by placeholders" in done.stdout
    report = json.loads(run_fsck(data_dir, "--json").stdout)
    assert report["clean"], report
    # Every event outside the damage, byte for byte, with its number and position.
    assert read_all(data_dir) == expected

    server = start_server(data_dir=data_dir)
    client = server.client()
    total = len([e for e in events if e[0] == stream])
    assert client.call("last-event-number", stream) == \
        b"*3\r\n+last-event-number\r\n+%s\r\n:%d\r\n" % (stream, total - 1)
    client.send(b"*2\r\n$9\r\nsubscribe\r\n$%d\r\n%s:%d:%d\r\n" % (
        len(stream) + len(b":%d:%d" % (first, first + 1)), stream, first, first + 1))
    client.expect(b"*2\r\n+subscribed\r\n+%s\r\n" % stream)
    client.expect(b"*5\r\n+event\r\n+%s\r\n:%d\r\n+$damaged\r\n$0\r\n\r\n" % (stream, first))
    client.close()
    assert server.stop() == 0


def test_salvage_refuses_when_the_log_after_does_not_say_what_was_lost(tmp_path):
    # The header of a stream's last record is damaged and the stream never writes
    # again: whose events were lost cannot be told. Nothing changes; plain --repair
    # still works.
    data_dir = tmp_path / "data"
    events = write_events(data_dir)
    newest = segment_files(data_dir)[-1]
    raw = newest.read_bytes()
    at, records = fmt.SEGMENT_HEADER_SIZE, []
    while at < len(raw):
        records.append(check_record(raw, at, len(raw)))
        at = records[-1].end
    victim = records[-5]  # a last-round record, with records after it
    flip_byte(newest, victim.offset + 33)  # its first_number: its header is not trusted
    before = {p.name: p.read_bytes() for p in data_dir.iterdir() if p.name != "LOCK"}
    done = run_fsck(data_dir, "--repair", "--salvage")
    assert done.returncode == 1
    assert "salvage refused, nothing was changed: 10 events were lost" in done.stdout
    assert {p.name: p.read_bytes() for p in data_dir.iterdir() if p.name != "LOCK"} == before
    assert run_fsck(data_dir, "--repair").returncode == 0
    assert read_all(data_dir) == events[:victim.header.base_position]


def test_salvage_without_repair_is_a_usage_error(tmp_path):
    data_dir = tmp_path / "data"
    write_events(data_dir, streams=2, batches=2)
    done = run_fsck(data_dir, "--salvage")
    assert done.returncode == 2 and "--salvage works with --repair" in done.stderr


# -- salvage at segment boundaries and other edges (found in review) -----------------------------


def small_segments(data_dir):
    """18 records of 10 events, over three streams, two records a segment."""
    with Engine.open(data_dir, fsync="no", segment_size=3000) as engine:
        for i in range(18):
            engine.append(b"s%d" % (i % 3), [(b"e", b"x" * 60)] * 10)
    return read_all(data_dir)


def records_of(segment):
    raw = segment.read_bytes()
    at, out = fmt.SEGMENT_HEADER_SIZE, []
    while at < len(raw):
        out.append(check_record(raw, at, len(raw)))
        at = out[-1].end
    return out


def in_lengths(record) -> int:
    return record.offset + fmt.RECORD_HEADER_SIZE + record.header.stream_name_length + 12 * 3


def placeholders(events, *records):
    expected = list(events)
    for record in records:
        header = record.header
        for i in range(header.count):
            expected[header.base_position + i] = (record.stream, header.first_number + i,
                                                  PLACEHOLDER, b"")
    return expected


def test_salvage_of_the_last_record_of_a_sealed_segment_stays_in_that_segment(tmp_path):
    data_dir = tmp_path / "data"
    events = small_segments(data_dir)
    segments = segment_files(data_dir)
    last = records_of(segments[0])[-1]
    flip_byte(segments[0], in_lengths(last))
    done = run_fsck(data_dir, "--repair", "--salvage")
    assert done.returncode == 0, done.stdout
    assert [p.name for p in segment_files(data_dir)] == [p.name for p in segments]
    assert read_all(data_dir) == placeholders(events, last)


def test_salvage_of_damage_spanning_two_segments(tmp_path):
    data_dir = tmp_path / "data"
    events = small_segments(data_dir)
    segments = segment_files(data_dir)
    end_of_one, start_of_next = records_of(segments[1])[-1], records_of(segments[2])[0]
    flip_byte(segments[1], in_lengths(end_of_one))
    flip_byte(segments[2], in_lengths(start_of_next))
    done = run_fsck(data_dir, "--repair", "--salvage")
    assert done.returncode == 0, done.stdout
    assert read_all(data_dir) == placeholders(events, end_of_one, start_of_next)


def test_salvage_refuses_a_missing_segment_and_a_damaged_new_stream_name(tmp_path):
    data_dir = tmp_path / "data"
    small_segments(data_dir)
    segment_files(data_dir)[2].unlink()
    done = run_fsck(data_dir, "--repair", "--salvage")
    assert done.returncode == 1 and "salvage refused, nothing was changed" in done.stdout
    # A damaged name in a new stream's first record could be a stream that never was.
    other = tmp_path / "other"
    with Engine.open(other, fsync="no") as engine:
        for stream in (b"s0", b"qq", b"s0"):
            engine.append(stream, [(b"e", b"1")] * 3)
    [segment] = segment_files(other)
    flip_byte(segment, records_of(segment)[1].offset + fmt.RECORD_HEADER_SIZE)
    done = run_fsck(other, "--repair", "--salvage")
    assert done.returncode == 1 and "salvage refused, nothing was changed" in done.stdout


def test_salvage_of_a_torn_newest_segment_header_drops_it_as_repair_does(tmp_path):
    data_dir = tmp_path / "data"
    events = small_segments(data_dir)
    (data_dir / ("%020d.seg" % len(events))).write_bytes(b"MEILIESG\x03\x00")
    done = run_fsck(data_dir, "--repair", "--salvage")
    assert done.returncode == 0, done.stdout
    assert read_all(data_dir) == events
