"""The group commit (commit.py) in-process, with the real engine on real files.

A writer waits for the sync that covers its appends; any failure that took them back
meanwhile must reach it as an error, whoever's write or sync failed. Most tests run the
real helper process (syncer.py). Those that decide what happens while a sync is in
flight use :class:`HeldSyncer`, which runs the real ``os.fdatasync`` in-process only
when the test lets it, through a stand-in that can fail (a healthy disk gives no other
way): what happens during a sync is then decided by the test, not by timing.
"""

from __future__ import annotations

import array
import collections
import errno
import os
import signal
import socket

import gevent
import pytest

from meilies.engine import Engine, StorageError
from meilies.server.commit import GroupCommit

TIMEOUT = 60


class HeldSyncer:
    """A syncer (syncer.Syncer) whose requests wait until :meth:`release`."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self.requests: collections.deque[int] = collections.deque()
        self._results: collections.deque[OSError | None] = collections.deque()

    def fileno(self) -> int:
        return self._reader.fileno()

    def request(self, fd: int, file: object) -> None:
        self.requests.append(fd)

    def release(self) -> None:
        """Run the oldest request's fdatasync now; its answer reaches the loop."""
        fd = self.requests.popleft()
        try:
            os.fdatasync(fd)
            self._results.append(None)
        except OSError as exc:
            self._results.append(exc)
        self._writer.send(b"S")

    def result(self) -> OSError | None:
        self._reader.recv(1)
        return self._results.popleft()

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


@pytest.fixture
def engine(tmp_path):
    engine = Engine.open(tmp_path / "data", fsync="always", segment_size=400)
    yield engine
    engine.close()


@pytest.fixture
def big_engine(tmp_path):
    engine = Engine.open(tmp_path / "big", fsync="always")  # no roll in the test
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


def run_writers(engine, commit, count, results, data=b"x"):
    writers = [gevent.spawn(writer, engine, commit, b"s%d" % i, data, results)
               for i in range(count)]
    gevent.joinall(writers, timeout=TIMEOUT, raise_error=True)


def test_writers_are_stored_through_the_helper_process(big_engine):
    commit = GroupCommit(big_engine)
    commit.start()
    results = {}
    run_writers(big_engine, commit, 20, results)
    assert results == {b"s%d" % i: "stored" for i in range(20)}
    assert big_engine.durable_position == big_engine.visible_position == 20
    commit.close()


def test_writers_that_arrive_while_a_sync_runs_share_the_next_one(big_engine):
    syncer = HeldSyncer()
    commit = GroupCommit(big_engine, syncer)
    results = {}
    writers = [gevent.spawn(writer, big_engine, commit, b"s0", b"x", results)]
    gevent.sleep(0)  # s0 appends and waits: its sync starts and is held
    assert len(syncer.requests) == 1
    writers += [gevent.spawn(writer, big_engine, commit, b"s%d" % i, b"x", results)
                for i in range(1, 5)]
    gevent.sleep(0)  # they append and queue behind the held sync
    assert results == {} and big_engine.visible_position == 0
    syncer.release()
    gevent.wait([writers[0]], timeout=TIMEOUT)
    assert results == {b"s0": "stored"} and big_engine.visible_position == 1
    assert len(syncer.requests) == 1  # the next sync started: it covers the other four
    syncer.release()
    gevent.joinall(writers, timeout=TIMEOUT, raise_error=True)
    assert results == {b"s%d" % i: "stored" for i in range(5)}
    assert big_engine.durable_position == big_engine.visible_position == 5
    commit.close()


def test_a_waiting_writer_learns_that_another_writers_failed_roll_took_its_append(
        engine, fdatasync):
    syncer = HeldSyncer()
    commit = GroupCommit(engine, syncer)
    results = {}
    first = gevent.spawn(writer, engine, commit, b"first", b"x", results)
    gevent.sleep(0)  # `first` appends and waits; its sync is held
    assert len(syncer.requests) == 1 and engine.durable_position == 0
    fdatasync.failing = True
    with pytest.raises(StorageError):  # a batch that needs a roll, whose sync fails
        engine.append(b"second", [(b"e", b"y" * 300)])
    fdatasync.failing = False
    syncer.release()  # the held sync of `first` now succeeds: too late
    first.join(timeout=TIMEOUT)
    assert isinstance(results[b"first"], StorageError)
    assert engine.durable_position == 0 and engine.last_event_number(b"first") is None
    # The log goes on: the next writer is stored.
    third = gevent.spawn(writer, engine, commit, b"third", b"z", results)
    gevent.sleep(0)
    syncer.release()
    third.join(timeout=TIMEOUT)
    assert results[b"third"] == "stored" and engine.last_event_number(b"third") == 0
    commit.close()


def test_a_failed_sync_fails_every_writer_it_covered(big_engine, fdatasync):
    syncer = HeldSyncer()
    commit = GroupCommit(big_engine, syncer)
    results = {}
    writers = [gevent.spawn(writer, big_engine, commit, b"s%d" % i, b"x", results)
               for i in range(3)]
    gevent.sleep(0)
    fdatasync.failing = True
    syncer.release()  # covers s0; s1 and s2 were appended after it began
    gevent.wait([writers[0]], timeout=TIMEOUT)
    fdatasync.failing = False
    gevent.joinall(writers, timeout=TIMEOUT, raise_error=True)
    # Under "always" a failed sync takes back every append not durable: all three.
    assert all(isinstance(results[b"s%d" % i], StorageError) for i in range(3))
    assert big_engine.durable_position == 0 and big_engine.stream_names() == []
    assert not syncer.requests  # nothing left to sync
    commit.close()


def test_writers_are_still_stored_when_the_helper_process_dies(big_engine):
    commit = GroupCommit(big_engine)
    commit.start()
    helper = commit._syncer.process
    results = {}
    run_writers(big_engine, commit, 3, results)
    os.kill(helper.pid, signal.SIGSTOP)  # it will not answer the next request ...
    first = gevent.spawn(writer, big_engine, commit, b"late", b"x", results)
    gevent.sleep(0)  # ... which is sent now
    os.kill(helper.pid, signal.SIGKILL)  # ... and dies with it unanswered
    helper.wait(timeout=TIMEOUT)
    first.join(timeout=TIMEOUT)
    assert results[b"late"] == "stored" and big_engine.durable_position == 4
    results.clear()
    run_writers(big_engine, commit, 3, results, data=b"after")  # synced on the loop now
    assert results == {b"s0": "stored", b"s1": "stored", b"s2": "stored"}
    assert big_engine.durable_position == big_engine.visible_position == 7
    commit.close()


def test_take_backs_beyond_those_kept_answer_conservatively(engine, monkeypatch):
    """A writer whose mark is older than every take-back the engine still remembers
    is told its appends went (an error), never that they stayed when they did not."""
    from meilies.engine import log as log_module

    monkeypatch.setattr(log_module, "LOSSES_KEPT", 2)
    mark = engine.loss_mark
    monkeypatch.setattr(os, "pwrite", _failing_write)
    monkeypatch.setattr(os, "pwritev", _failing_write)
    for i in range(4):
        with pytest.raises(StorageError):
            engine.append(b"s", [(b"e", b"%d" % i)])
    monkeypatch.undo()
    assert engine.loss_mark == mark + 4
    assert isinstance(engine.lost_since(mark, 10**6), StorageError)
    assert engine.lost_since(engine.loss_mark, 10**6) is None


def _failing_write(fd, data, offset):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_the_helper_returns_quietly_when_the_server_is_gone_before_its_answer(tmp_path):
    """kill -9 of the server mid-sync: the helper's answer has nowhere to go."""
    from meilies.server import syncer

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with open(tmp_path / "file", "wb") as handle:
        handle.write(b"x")
        ours.sendmsg([syncer.FILE], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", [handle.fileno()]))])
    ours.close()
    syncer.serve(theirs)  # syncs, cannot answer, returns: no exception
    theirs.close()


def test_the_helper_keeps_the_file_it_was_given_and_answers_in_order(tmp_path):
    from meilies.server import syncer

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.send(syncer.REQUEST)  # no file yet: EBADF
    with open(tmp_path / "a", "wb") as first, open(tmp_path / "b", "wb") as second:
        ours.sendmsg([syncer.FILE], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", [first.fileno()]))])
        ours.send(syncer.REQUEST * 2)
        ours.sendmsg([syncer.FILE], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", [second.fileno()]))])
    # Our descriptors are closed now: the helper syncs its own copies.
    ours.send(syncer.REQUEST)
    ours.shutdown(socket.SHUT_WR)
    before = set(os.listdir("/proc/self/fd"))
    syncer.serve(theirs)
    assert set(os.listdir("/proc/self/fd")) <= before  # it closed every copy it got
    answers = b""
    while len(answers) < 6 * syncer.RESULT.size:
        answers += ours.recv(64)
    codes = [code for (code,) in syncer.RESULT.iter_unpack(answers)]
    assert codes == [errno.EBADF, 0, 0, 0, 0, 0]
    ours.close()
    theirs.close()


def test_the_server_sends_a_segment_to_the_helper_once(big_engine, monkeypatch):
    commit = GroupCommit(big_engine)
    commit.start()
    sent = []
    real_sendmsg = commit._syncer.sock.sendmsg
    real_send = commit._syncer.sock.send

    class Spy:  # socket methods cannot be patched on the instance: wrap the socket
        def __init__(self, sock):
            self._sock = sock

        def __getattr__(self, name):
            return getattr(self._sock, name)

        def sendmsg(self, *args):
            sent.append("file")
            return real_sendmsg(*args)

        def send(self, data):
            sent.append("sync")
            return real_send(data)

    commit._syncer.sock = Spy(commit._syncer.sock)
    results = {}
    for _ in range(3):
        run_writers(big_engine, commit, 2, results)
    assert sent[0] == "file" and set(sent[1:]) == {"sync"} and len(sent) >= 3
    assert big_engine.durable_position == 6
    commit.close()
