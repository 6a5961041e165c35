"""The group commit (commit.py) in-process, with the real engine on real files.

A writer waits for the sync that covers its appends; any failure that took them back
meanwhile must reach it as an error, whoever's write or sync failed. fdatasync fails
through a stand-in for ``os.fdatasync`` (a healthy disk gives no other way).
"""

from __future__ import annotations

import errno
import os

import gevent
import pytest

from meilies.engine import Engine, StorageError
from meilies.server.commit import GroupCommit


class FailingFdatasync:
    def __init__(self, real) -> None:
        self.real = real
        self.failing = False

    def __call__(self, fd: int) -> None:
        if self.failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.real(fd)


@pytest.fixture
def fdatasync(monkeypatch) -> FailingFdatasync:
    stand_in = FailingFdatasync(os.fdatasync)
    monkeypatch.setattr(os, "fdatasync", stand_in)
    return stand_in


@pytest.fixture
def engine(tmp_path):
    engine = Engine.open(tmp_path / "data", fsync="always", segment_size=400)
    yield engine
    engine.close()


def writer(engine: Engine, commit: GroupCommit, stream: bytes, data: bytes, results: dict):
    """What a connection does for one publish: note the loss mark, append, wait."""
    mark = engine.loss_mark
    result = engine.append(stream, [(b"e", data)], flush=False)
    try:
        commit.wait(result.end_position, mark)
        results[stream] = "stored"
    except StorageError as exc:
        results[stream] = exc


def test_writers_sharing_a_sync_are_all_answered(engine):
    commit = GroupCommit(engine)
    results = {}
    writers = [gevent.spawn(writer, engine, commit, b"s%d" % i, b"x", results) for i in range(5)]
    gevent.joinall(writers, timeout=60, raise_error=True)
    assert results == {b"s%d" % i: "stored" for i in range(5)}
    assert engine.durable_position == 5
    commit.close()


def test_a_waiting_writer_learns_that_another_writers_failed_roll_took_its_append(
        engine, fdatasync):
    commit = GroupCommit(engine)
    results = {}
    first = gevent.spawn(writer, engine, commit, b"first", b"x", results)
    gevent.sleep(0)  # runs `first` up to its wait; the group's sync comes later
    assert len(commit._waiters) == 1 and engine.durable_position == 0
    fdatasync.failing = True
    with pytest.raises(StorageError):  # a batch that needs a roll, whose sync fails
        engine.append(b"second", [(b"e", b"y" * 300)])
    fdatasync.failing = False
    first.join(timeout=60)
    assert isinstance(results[b"first"], StorageError)
    assert engine.durable_position == 0 and engine.last_event_number(b"first") is None
    # The log goes on: the next writer is stored.
    gevent.spawn(writer, engine, commit, b"third", b"z", results).join(timeout=60)
    assert results[b"third"] == "stored" and engine.last_event_number(b"third") == 0
    commit.close()


def test_a_failed_group_sync_fails_every_writer_in_the_group(engine, fdatasync):
    commit = GroupCommit(engine)
    results = {}
    fdatasync.failing = True
    writers = [gevent.spawn(writer, engine, commit, b"s%d" % i, b"x", results) for i in range(3)]
    gevent.joinall(writers, timeout=60, raise_error=True)
    assert all(isinstance(results[b"s%d" % i], StorageError) for i in range(3))
    fdatasync.failing = False
    assert engine.durable_position == 0 and engine.stream_names() == []
    commit.close()


def test_take_backs_beyond_those_kept_answer_conservatively(engine, monkeypatch):
    """A writer whose mark is older than every take-back the engine still remembers
    is told its appends went (an error), never that they stayed when they did not."""
    from meilies.engine import log as log_module

    monkeypatch.setattr(log_module, "LOSSES_KEPT", 2)
    mark = engine.loss_mark
    monkeypatch.setattr(os, "pwrite", _failing_pwrite)
    for i in range(4):
        with pytest.raises(StorageError):
            engine.append(b"s", [(b"e", b"%d" % i)])
    monkeypatch.undo()
    assert engine.loss_mark == mark + 4
    assert isinstance(engine.lost_since(mark, 10**6), StorageError)
    assert engine.lost_since(engine.loss_mark, 10**6) is None


def _failing_pwrite(fd, data, offset):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
