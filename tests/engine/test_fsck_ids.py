"""meilies-fsck on format 4: ids once in the log and in the id index, transactions
whole (engine/fsck/verifier.py)."""

from __future__ import annotations

import shutil
import struct

from engine_helpers import crash_copy, newest_segment, read_everything
from meilies.engine import Engine, fsck
from meilies.engine import format as fmt
from meilies.engine import ids
from meilies.engine.files import id_table_path
from meilies.engine.writes import Write


def transaction(tag: bytes) -> list[Write]:
    return [Write(b"a", [(b"e", b"1")], "any", [b"a-" + tag], [b"m"]),
            Write(b"b", [(b"e", b"2"), (b"e", b"3")], "any", [b"b1-" + tag, b"b2-" + tag])]


def test_ids_and_transactions_verify_clean(tmp_path):
    with Engine.open(tmp_path / "d", id_index_bits=4) as engine:
        for i in range(20):
            engine.write(transaction(b"%d" % i))
    report = fsck.verify(tmp_path / "d")
    assert report.clean, [p.describe() for p in report.problems]


def test_a_transaction_cut_short_is_a_torn_tail_that_repair_removes_whole(tmp_path):
    source = tmp_path / "d"
    with Engine.open(source) as engine:
        engine.write(transaction(b"kept"))
        engine.sync()
        start = newest_segment(source).stat().st_size
        engine.write(transaction(b"cut"))
        engine.sync()
        end = newest_segment(source).stat().st_size
        crashed = crash_copy(source, tmp_path / "crashed")
    for cut in (end - 1, end - 30, start + 60):  # in its last record, and before it
        copy = shutil.copytree(crashed, tmp_path / f"cut-{cut}")
        with open(newest_segment(copy), "r+b") as handle:
            handle.truncate(cut)
        report = fsck.verify(copy)
        [problem] = report.problems
        assert isinstance(problem, fsck.TornTail) and problem.offset == start, problem
        if cut > start + 100:  # its first record whole: the transaction is named
            assert "transaction cut short" in problem.reason
        repaired = fsck.verify(copy, repair=True)
        assert repaired.after.clean
        with Engine.open(copy) as engine:
            assert len(read_everything(engine)) == 3
            assert engine.find_event_id(b"a-cut") is None
            assert engine.find_event_id(b"b2-kept").number == 1


def test_an_id_stored_twice_is_reported(tmp_path):
    directory = tmp_path / "d"
    with Engine.open(directory) as engine:
        engine.append(b"s", [(b"e", b"1")], ids=[b"twice"])
    # What the engine refuses to write, written behind its back.
    record = fmt.encode_record(b"s", 0, 1, 1, [(b"e", b"2")], version=fmt.FORMAT_VERSION,
                               extras=[fmt.encode_extras(b"twice", None)])
    with open(newest_segment(directory), "ab") as handle:
        handle.write(record.data)
    report = fsck.verify(directory)
    duplicates = [p for p in report.problems if isinstance(p, fsck.DuplicateId)]
    assert len(duplicates) == 1 and "positions 0 and 1" in duplicates[0].reason


def test_an_id_missing_from_the_index_is_reported_and_rebuilt_on_repair(tmp_path):
    directory = tmp_path / "d"
    with Engine.open(directory, id_index_bits=4) as engine:
        for i in range(6):
            engine.append(b"s", [(b"e", b"%d" % i)], ids=[b"id-%d" % i])
    table = id_table_path(directory, 0)
    raw = bytearray(table.read_bytes())
    tag = ids.tag_of(b"id-3")
    for at in range(ids.HEADER_SIZE, len(raw), ids.SLOT_SIZE):
        if struct.unpack_from("<Q", raw, at)[0] == tag:
            raw[at:at + ids.SLOT_SIZE] = bytes(ids.SLOT_SIZE)
    table.write_bytes(raw)
    report = fsck.verify(directory)
    [problem] = report.problems
    assert isinstance(problem, fsck.IdIndexProblem) and "'id-3'" in problem.reason
    repaired = fsck.verify(directory, repair=True)
    assert repaired.after.clean
    with Engine.open(directory) as engine:
        assert engine.find_event_id(b"id-3").number == 3


def test_a_crash_in_the_middle_of_a_roll_leaves_notes_not_problems(tmp_path):
    """Found by tools/torture.py: a kill -9 between creating the next segment and
    sealing the active one leaves its .pidx as the last checkpoint wrote it, no .sidx,
    and the new segment without a .pidx. The engine completes them on open; fsck must
    not call a legitimate crash state damage."""
    from meilies.engine.files import position_index_path, stream_index_path
    from meilies.engine.segment import Segment

    source = tmp_path / "d"
    with Engine.open(source) as engine:
        for i in range(20):
            engine.append(b"s", [(b"e", b"%d" % i)])
        engine.checkpoint()
        for i in range(5):
            engine.append(b"s", [(b"e", b"late %d" % i)])
        engine.sync()
        crashed = crash_copy(source, tmp_path / "crashed")
    # What the roll had done when the kill came: the next segment, nothing else.
    Segment.create(crashed, 25).close()
    assert not stream_index_path(crashed, 0).exists()
    assert not position_index_path(crashed, 25).exists()
    report = fsck.verify(crashed)
    assert report.clean, [p.describe() for p in report.problems]
    assert any("middle of a segment roll" in note for note in report.notes)
    with Engine.open(crashed) as engine:
        assert len(read_everything(engine)) == 25
    assert fsck.verify(crashed).clean
