"""The id index (engine/ids.py): derived from the log, found after restarts and crashes,
rebuilt when missing or damaged, and never trusted without the log's word."""

from __future__ import annotations

import logging
import shutil

import pytest

from engine_helpers import crash_copy, flip_byte
from meilies.engine import Engine, ids
from meilies.engine.errors import DuplicateEventId
from meilies.engine.files import id_state_path, id_table_path

#: A first table of 16 slots: a few dozen ids make several levels.
BITS = 4


def fill(engine: Engine, count: int, prefix: bytes = b"id") -> list[bytes]:
    made = [b"%s-%d" % (prefix, i) for i in range(count)]
    for i, event_id in enumerate(made):
        engine.append(b"s-%d" % (i % 5), [(b"e", b"%d" % i)], ids=[event_id])
    engine.sync()
    return made


def all_found(engine: Engine, made: list[bytes]) -> bool:
    return all(engine.find_event_id(event_id) is not None and
               engine.find_event_id(event_id).id == event_id for event_id in made)


def test_levels_grow_and_every_id_is_found_after_a_restart(tmp_path):
    directory = tmp_path / "d"
    with Engine.open(directory, id_index_bits=BITS) as engine:
        made = fill(engine, 100)
        levels = [level.bits for level in engine.ids.levels]
        assert levels == list(range(BITS, BITS + len(levels))) and len(levels) >= 3
        assert all(level.count <= level.capacity for level in engine.ids.levels)
    with Engine.open(directory, id_index_bits=BITS) as engine:
        assert engine.ids.covered == 100
        assert all_found(engine, made)
        assert engine.find_event_id(b"id-100") is None
        with pytest.raises(DuplicateEventId) as refused:
            engine.append(b"other", [(b"e", b"x")], ids=[b"id-42"])
        assert (refused.value.stream, refused.value.number) == (b"s-2", 8)


def test_a_crash_loses_no_id_stored_after_the_last_checkpoint(tmp_path):
    source = tmp_path / "d"
    with Engine.open(source, id_index_bits=BITS) as engine:
        made = fill(engine, 30)
        engine.checkpoint()
        made += fill(engine, 40, b"late")
        crashed = crash_copy(source, tmp_path / "crashed")
    with Engine.open(crashed, id_index_bits=BITS) as engine:
        assert all_found(engine, made)
        assert engine.ids.covered == 70  # caught up, and checkpointed on open


@pytest.mark.parametrize("damage", ["state-missing", "state-flipped", "table-missing",
                                    "table-flipped-header", "all-missing"])
def test_missing_or_damaged_id_files_are_rebuilt_from_the_log(tmp_path, damage, caplog):
    directory = tmp_path / "d"
    with Engine.open(directory, id_index_bits=BITS) as engine:
        made = fill(engine, 60)
    if damage == "state-missing":
        id_state_path(directory).unlink()
    elif damage == "state-flipped":
        flip_byte(id_state_path(directory), 20)
    elif damage == "table-missing":
        id_table_path(directory, 1).unlink()
    elif damage == "table-flipped-header":
        flip_byte(id_table_path(directory, 0), 13)
    else:
        for path in directory.glob("ids*"):
            path.unlink()
    with caplog.at_level(logging.INFO, logger="meilies.engine"):
        with Engine.open(directory, id_index_bits=BITS) as engine:
            assert all_found(engine, made)
            assert engine.ids.count == 60  # rebuilt, not added on top of what was there
    assert "id index" in caplog.text


def test_an_id_index_past_the_end_of_a_log_cut_back_is_rebuilt(tmp_path):
    """fsck --repair may cut the log back: positions after its end are handed out
    again, so an index that claims to cover them cannot be caught up from there."""
    directory = tmp_path / "d"
    with Engine.open(directory, id_index_bits=BITS) as engine:
        fill(engine, 20)
    saved = tmp_path / "state"
    shutil.copy(id_state_path(directory), saved)
    shutil.rmtree(directory)
    with Engine.open(directory, id_index_bits=BITS) as engine:
        made = fill(engine, 5, b"other")
    shutil.copy(saved, id_state_path(directory))  # covers 20 over a log of 5
    with Engine.open(directory, id_index_bits=BITS) as engine:
        assert engine.ids.covered == 5 and all_found(engine, made)
        engine.append(b"s", [(b"e", b"1")], ids=[b"fresh"])
        engine.sync()
    with Engine.open(directory, id_index_bits=BITS) as engine:
        assert all_found(engine, made + [b"fresh"])


def test_every_hit_is_checked_against_the_log(tmp_path, monkeypatch):
    """Every id hashing alike (the worst collisions) changes nothing but speed: the
    index only says where to look, the log says what is there."""
    monkeypatch.setattr(ids, "tag_of", lambda event_id: 12345)
    directory = tmp_path / "d"
    with Engine.open(directory, id_index_bits=BITS) as engine:
        made = fill(engine, 7)
        assert engine.find_event_id(b"absent") is None
        assert [engine.find_event_id(i).number for i in made[:5]] == [0] * 5
    with Engine.open(directory, id_index_bits=BITS) as engine:
        assert all_found(engine, made)
