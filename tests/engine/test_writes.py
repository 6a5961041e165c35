"""Writes with ids and metadata, idempotent retries and transactions, on the engine
(engine/writes.py): all or none, also at every byte a crash may cut a transaction at."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine_helpers import crash_copy, newest_segment, read_everything, segment_files
from meilies.engine import Engine
from meilies.engine import format as fmt
from meilies.engine.reads import stored_event
from meilies.engine.errors import (DuplicateEventId, DuplicateIdInRequest, InvalidArgument,
                                   StorageError, WrongExpectedVersion)
from meilies.engine.writes import Write

FIXTURES = Path(__file__).parent / "data"


def full(engine: Engine) -> list[bytes]:
    """Every visible event's full frame, as readers get them."""
    pieces, _count, _next = engine.all_full_frames(0, max_events=100_000, max_bytes=1 << 30)
    return [b"".join(bytes(p) for p in pieces)]


def ids_and_positions(engine: Engine) -> dict[bytes, int]:
    """Every stored id and its position, read from the log; no id twice."""
    found = {}
    for position in range(engine.visible_position):
        event = stored_event(engine, position)
        if event.id is not None:
            assert event.id not in found, f"id {event.id!r} stored twice"
            found[event.id] = position
    return found


def transaction(tag: str) -> list[Write]:
    return [
        Write(b"orders", [(b"placed", b"o-" + tag.encode())], "any", [b"o-" + tag.encode()],
              [b'{"user":"ann"}']),
        Write(b"stock", [(b"reserved", b"s1"), (b"reserved", b"s2")], "any",
              [b"s1-" + tag.encode(), b"s2-" + tag.encode()], None),
        Write(b"audit-" + tag.encode(), [(b"noted", b"")], "none", None, [b"m"]),
    ]


def test_a_write_with_ids_and_metadata_reads_back_in_full_frames(tmp_path):
    with Engine.open(tmp_path / "d") as engine:
        result = engine.append(b"s", [(b"a", b"1"), (b"b", b"2")], "none",
                               ids=[b"id-1", None], metadata=[None, b"meta"])
        engine.sync()
        assert (result.first_number, result.last_number, result.end_position) == (0, 1, 2)
        [frames] = full(engine)
    stamp = frames.split(b":")[3]
    assert frames.startswith(b"*9\r\n+event\r\n+s\r\n:0\r\n+a\r\n$1\r\n1\r\n:0\r\n")
    assert b"$4\r\nid-1\r\n$-1\r\n*9\r\n" in frames and frames.endswith(
        b"\r\n$-1\r\n$4\r\nmeta\r\n") and stamp


def test_an_exact_retry_gets_its_first_numbers_and_stores_nothing(tmp_path):
    with Engine.open(tmp_path / "d") as engine:
        events = [(b"a", b"1"), (b"b", b"2")]
        first = engine.append(b"s", events, "none", ids=[b"x", b"y"], metadata=[b"m", None])
        # Before it is durable (still in memory) and after; the expected version is
        # ignored for a retry (the first attempt moved the stream on).
        again = engine.append(b"s", events, "none", ids=[b"x", b"y"], metadata=[b"m", None])
        engine.sync()
        later = engine.append(b"s", events, 7, ids=[b"x", b"y"], metadata=[b"m", None])
        assert first == again == later
        assert engine.written_position == 2


def test_a_run_of_stored_events_is_a_retry_even_if_first_sent_in_a_larger_write(tmp_path):
    """PROTOCOL.md's test is on the events: all stored, in that stream, consecutively,
    in order, the same. A retry that splits the first request is one."""
    with Engine.open(tmp_path / "d") as engine:
        engine.append(b"s", [(b"a", b"1"), (b"b", b"2")], ids=[b"x", b"y"], metadata=[b"m", None])
        again = engine.append(b"s", [(b"b", b"2")], ids=[b"y"])
        assert (again.first_number, again.last_number, again.end_position) == (1, 1, 2)
        assert engine.written_position == 2


@pytest.mark.parametrize("change", ["data", "name", "metadata", "stream", "order", "more",
                                    "unnamed"])
def test_any_other_reuse_of_a_stored_id_is_refused_and_stores_nothing(tmp_path, change):
    with Engine.open(tmp_path / "d") as engine:
        engine.append(b"s", [(b"a", b"1"), (b"b", b"2")], ids=[b"x", b"y"], metadata=[b"m", None])
        stream, events, ids, meta = b"s", [(b"a", b"1"), (b"b", b"2")], [b"x", b"y"], [b"m", None]
        if change == "data":
            events = [(b"a", b"1"), (b"b", b"other")]
        elif change == "name":
            events = [(b"z", b"1"), (b"b", b"2")]
        elif change == "metadata":
            meta = [b"m2", None]
        elif change == "stream":
            stream = b"t"
        elif change == "order":
            events, ids, meta = events[::-1], ids[::-1], meta[::-1]
        elif change == "more":
            events, ids, meta = events + [(b"c", b"3")], ids + [b"z"], meta + [None]
        elif change == "unnamed":  # an event without an id cannot be a retry
            events, ids, meta = events + [(b"c", b"3")], ids + [None], meta + [None]
        with pytest.raises(DuplicateEventId) as refused:
            engine.append(stream, events, ids=ids, metadata=meta)
        first = next(i for i in ids if i is not None)
        assert refused.value.event_id == first
        assert (refused.value.stream, refused.value.number) == (b"s", {b"x": 0, b"y": 1}[first])
        assert engine.written_position == 2 and engine.stream_id(b"t") is None


def test_the_id_check_comes_before_the_expected_version_and_ids_must_differ(tmp_path):
    with Engine.open(tmp_path / "d") as engine:
        engine.append(b"s", [(b"a", b"1")], ids=[b"x"])
        with pytest.raises(DuplicateEventId):
            engine.append(b"s", [(b"a", b"2")], 5, ids=[b"x"])
        with pytest.raises(DuplicateIdInRequest) as twice:
            engine.append(b"s", [(b"a", b"1"), (b"a", b"2")], ids=[b"q", b"q"])
        assert str(twice.value) == "duplicate event id q in request"
        with pytest.raises(DuplicateIdInRequest):
            engine.write([Write(b"s", [(b"a", b"1")], ids=[b"q"]),
                          Write(b"t", [(b"a", b"1")], ids=[b"q"])])
        for bad in (b"", b"x" * 256, b"a\nb", b"\xff"):
            with pytest.raises(InvalidArgument):
                engine.append(b"s", [(b"a", b"1")], ids=[bad])
        assert engine.written_position == 1


def test_data_plus_metadata_is_bounded_by_the_event_size(tmp_path):
    with Engine.open(tmp_path / "d", max_event_size=100) as engine:
        engine.append(b"s", [(b"a", b"x" * 60)], metadata=[b"m" * 40])
        with pytest.raises(InvalidArgument) as refused:
            engine.append(b"s", [(b"a", b"x" * 60)], metadata=[b"m" * 41])
        assert refused.value.argument == "data"


def test_a_transaction_checks_each_write_after_the_ones_before_it(tmp_path):
    with Engine.open(tmp_path / "d") as engine:
        results = engine.write([Write(b"a", [(b"e", b"0")], "none"),
                                Write(b"a", [(b"e", b"1")], 0),
                                Write(b"b", [(b"e", b"2")], "none", [b"i"])])
        assert [(r.first_number, r.last_number, r.end_position) for r in results] == [
            (0, 0, 1), (1, 1, 2), (0, 0, 3)]
        with pytest.raises(WrongExpectedVersion):
            engine.write([Write(b"new", [(b"e", b"x")], "none"),
                          Write(b"a", [(b"e", b"y")], 0)])
        with pytest.raises(DuplicateEventId):
            engine.write([Write(b"new", [(b"e", b"x")], "none"),
                          Write(b"c", [(b"e", b"2")], "any", [b"i"], None)])
        engine.sync()
        # Nothing of a failed transaction: no event, no stream it would have created.
        assert engine.written_position == 3 and engine.stream_id(b"new") is None
        assert engine.stream_names() == [b"a", b"b"]


def test_a_retried_transaction_replays_its_writes_with_ids(tmp_path):
    with Engine.open(tmp_path / "d") as engine:
        first = engine.write(transaction("t1")[:2])
        again = engine.write(transaction("t1")[:2])
        assert first == again and engine.written_position == 3


def test_a_transaction_is_one_run_of_records_flagged_until_its_last(tmp_path):
    with Engine.open(tmp_path / "d") as engine:
        engine.append(b"before", [(b"e", b"0")])
        engine.write(transaction("t1"))
        engine.append(b"after", [(b"e", b"1")])
    raw = newest_segment(tmp_path / "d").read_bytes()
    at, flags = fmt.SEGMENT_HEADER_SIZE, []
    while at < len(raw):
        header = fmt.decode_record_header(raw, at)
        flags.append(header.flags)
        at += header.size
    assert flags == [0, fmt.FLAG_CONTINUED, fmt.FLAG_CONTINUED, 0, 0]


def test_a_crash_at_any_byte_of_a_transaction_keeps_all_of_it_or_none(tmp_path):
    source = tmp_path / "d"
    with Engine.open(source) as engine:
        engine.append(b"orders", [(b"placed", b"before")], ids=[b"early"])
        engine.sync()
        start = newest_segment(source).stat().st_size
        engine.write(transaction("t1"))
        engine.sync()
        end = newest_segment(source).stat().st_size
        crashed = crash_copy(source, tmp_path / "crashed")
    with Engine.open(shutil.copytree(crashed, tmp_path / "whole")) as engine:
        whole = read_everything(engine)
        assert len(whole) == 5 and set(ids_and_positions(engine)) == {
            b"early", b"o-t1", b"s1-t1", b"s2-t1"}
    for cut in range(start, end):
        copy = tmp_path / f"cut-{cut}"
        shutil.copytree(crashed, copy)
        with open(newest_segment(copy), "r+b") as handle:
            handle.truncate(cut)
        with Engine.open(copy) as engine:
            assert read_everything(engine) == whole[:1], cut
            assert engine.stream_names() == [b"orders"]
            assert engine.find_event_id(b"s1-t1") is None
            # The client's retry (its reply was lost) stores it now, once.
            engine.write(transaction("t1"))
            engine.sync()
            assert read_everything(engine) == whole
        shutil.rmtree(copy)


def test_a_transaction_never_spans_segments(tmp_path):
    with Engine.open(tmp_path / "d", segment_size=600) as engine:
        for i in range(3):
            engine.append(b"filler", [(b"e", b"x" * 100)])
        engine.write(transaction("t1"))
        engine.sync()
        before = read_everything(engine)
    for path in segment_files(tmp_path / "d"):
        raw = path.read_bytes()
        at, last_flags = fmt.SEGMENT_HEADER_SIZE, 0
        while at < len(raw):
            header = fmt.decode_record_header(raw, at)
            last_flags = header.flags
            at += header.size
        assert not last_flags & fmt.FLAG_CONTINUED, path.name
    with Engine.open(tmp_path / "d", segment_size=600) as engine:
        assert read_everything(engine) == before


def test_a_failed_sync_takes_back_a_transaction_and_forgets_its_ids(tmp_path, fdatasync):
    with Engine.open(tmp_path / "d") as engine:
        engine.append(b"x", [(b"e", b"0")])
        engine.sync()
        engine.write(transaction("t1"))
        fdatasync.failing = True
        with pytest.raises(StorageError):
            engine.sync()
        fdatasync.failing = False
        assert engine.find_event_id(b"o-t1") is None and engine.written_position == 1
        engine.write(transaction("t1"))
        engine.sync()
        assert set(ids_and_positions(engine)) == {b"o-t1", b"s1-t1", b"s2-t1"}


def test_an_older_active_segment_rolls_before_ids_or_a_transaction(tmp_path):
    directory = Path(shutil.copytree(FIXTURES / "format-v2", tmp_path / "d"))
    with Engine.open(directory) as engine:
        engine.append(b"plain", [(b"e", b"old format")])  # still fits the old segment
        count = len(segment_files(directory))
        engine.append(b"s", [(b"e", b"1")], ids=[b"new-id"])
        assert len(segment_files(directory)) == count + 1
        engine.sync()
        assert engine.find_event_id(b"new-id").stream == b"s"
    versions = [fmt.decode_segment_header(p.read_bytes()[:32]).version
                for p in segment_files(directory)]
    assert versions[-1] == fmt.FORMAT_VERSION and versions[-2] == 2


def test_an_empty_older_active_segment_is_made_anew_in_the_newest_version(tmp_path):
    from engine_helpers import rewrite_segment_header

    directory = tmp_path / "d"
    with Engine.open(directory):
        pass
    [segment] = segment_files(directory)
    rewrite_segment_header(segment, version=3)
    # The checkpoint an older MeiliES would have left: over that header.
    from meilies.engine import checkpoint as ckpt
    state = ckpt.read(directory)
    state.segments[0].segment_hash = fmt.checksum(segment.read_bytes())
    ckpt.write(directory, state)
    for _ in range(2):  # and the checkpoint written after that agrees with it
        with Engine.open(directory) as engine:
            assert engine.segments[-1].version == fmt.FORMAT_VERSION
    with Engine.open(directory) as engine:
        engine.write(transaction("t1"))
        engine.sync()
        assert len(segment_files(directory)) == 1 and engine.written_position == 4
