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
import time

import gevent
import pytest

from meilies.engine import Engine, StorageError
from meilies.server import commit as commit_module
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

    def release(self, error: OSError | None = None) -> None:
        """Run the oldest request's fdatasync now, or report ``error`` for it instead
        (as the helper would after its own fdatasync failed); the answer reaches the
        loop."""
        fd = self.requests.popleft()
        if error is None:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                error = exc
        self._results.append(error)
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


def end_of_turn() -> None:
    """Let the greenlets that are ready run, then what the loop does at the end of the
    turn (the group commit asks for its sync there). Two passes over the callbacks: the
    first runs the writers, which schedule the start of their sync after ours."""
    gevent.sleep(0)
    gevent.sleep(0)


EIO = OSError(errno.EIO, os.strerror(errno.EIO))


def sync_until_done(syncer: HeldSyncer, greenlets) -> None:
    """Let every sync the writers ask for run (succeed) until they are all answered.
    (Polls with short sleeps: the loop must turn for the syncer's answers to arrive.)"""
    deadline = time.monotonic() + TIMEOUT
    while not all(g.ready() for g in greenlets):
        assert time.monotonic() < deadline, "writers still waiting"
        if syncer.requests:
            syncer.release()
        gevent.sleep(0.001)


def all_stored(engine: Engine, syncer: HeldSyncer, writers, results: dict) -> None:
    """Every writer (one event each, streams s0, s1, ...) is answered "stored", each
    event is durable and visible, and no sync is left asked."""
    gevent.joinall(writers, timeout=TIMEOUT, raise_error=True)
    assert results == {b"s%d" % i: "stored" for i in range(len(writers))}
    assert engine.durable_position == engine.visible_position == len(writers)
    assert not syncer.requests


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


def test_writers_of_one_loop_turn_share_one_sync(big_engine):
    syncer = HeldSyncer()
    commit = GroupCommit(big_engine, syncer)
    results = {}
    writers = [gevent.spawn(writer, big_engine, commit, b"s%d" % i, b"x", results)
               for i in range(5)]
    end_of_turn()
    assert len(syncer.requests) == 1 and results == {}
    syncer.release()
    all_stored(big_engine, syncer, writers, results)
    commit.close()


def test_writers_that_arrive_while_a_sync_runs_share_the_next_one(big_engine):
    syncer = HeldSyncer()
    commit = GroupCommit(big_engine, syncer)
    results = {}
    writers = [gevent.spawn(writer, big_engine, commit, b"s0", b"x", results)]
    end_of_turn()  # s0 appends and waits: its sync starts and is held
    assert len(syncer.requests) == 1
    writers += [gevent.spawn(writer, big_engine, commit, b"s%d" % i, b"x", results)
                for i in range(1, 5)]
    end_of_turn()  # they append and wait: one sync for the four is asked at once,
    # behind the held one, so that it can start the moment that one returns
    assert len(syncer.requests) == 2
    assert results == {} and big_engine.visible_position == 0
    syncer.release()
    gevent.wait([writers[0]], timeout=TIMEOUT)
    assert results == {b"s0": "stored"} and big_engine.visible_position == 1
    syncer.release()
    all_stored(big_engine, syncer, writers, results)
    commit.close()


def test_syncs_in_flight_are_bounded_and_the_writers_beyond_wait_for_an_answer(
        big_engine, monkeypatch):
    monkeypatch.setattr(commit_module, "MAX_IN_FLIGHT", 2)
    syncer = HeldSyncer()
    commit = GroupCommit(big_engine, syncer)
    results = {}
    writers = []
    for i in range(4):  # one writer per loop turn: each would want a sync of its own
        writers.append(gevent.spawn(writer, big_engine, commit, b"s%d" % i, b"x", results))
        end_of_turn()
    assert len(syncer.requests) == 2  # s2 and s3 wait for an answer
    syncer.release()
    gevent.wait([writers[0]], timeout=TIMEOUT)
    end_of_turn()
    assert len(syncer.requests) == 2  # the answer made room: one sync for s2 and s3
    sync_until_done(syncer, writers)
    assert results == {b"s%d" % i: "stored" for i in range(4)}
    assert big_engine.durable_position == 4 and not syncer.requests
    commit.close()


def test_answers_to_syncs_whose_appends_an_earlier_failure_took_back_change_nothing(
        big_engine, fdatasync):
    """Two syncs in flight; the first fails and takes back every append not durable,
    the second's too. The second's answer (success) then concerns nothing left."""
    syncer = HeldSyncer()
    commit = GroupCommit(big_engine, syncer)
    results = {}
    first = gevent.spawn(writer, big_engine, commit, b"first", b"x", results)
    end_of_turn()
    second = gevent.spawn(writer, big_engine, commit, b"second", b"y", results)
    end_of_turn()
    assert len(syncer.requests) == 2
    syncer.release(EIO)
    gevent.joinall([first, second], timeout=TIMEOUT, raise_error=True)
    assert isinstance(results[b"first"], StorageError)
    assert isinstance(results[b"second"], StorageError)
    third = gevent.spawn(writer, big_engine, commit, b"third", b"z", results)
    end_of_turn()
    syncer.release()  # the second sync succeeds: its appends are gone all the same
    end_of_turn()
    assert big_engine.durable_position == big_engine.visible_position == 0
    assert big_engine.last_event_number(b"second") is None
    sync_until_done(syncer, [third])
    assert results[b"third"] == "stored"
    assert big_engine.durable_position == big_engine.visible_position == 1
    assert big_engine.stream_names() == [b"third"]
    commit.close()


def test_a_waiting_writer_learns_that_another_writers_failed_roll_took_its_append(
        engine, fdatasync):
    syncer = HeldSyncer()
    commit = GroupCommit(engine, syncer)
    results = {}
    first = gevent.spawn(writer, engine, commit, b"first", b"x", results)
    end_of_turn()  # `first` appends and waits; its sync is held
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
    end_of_turn()
    syncer.release()
    third.join(timeout=TIMEOUT)
    assert results[b"third"] == "stored" and engine.last_event_number(b"third") == 0
    commit.close()


def test_a_failed_sync_fails_every_writer_it_covered(big_engine, fdatasync):
    syncer = HeldSyncer()
    commit = GroupCommit(big_engine, syncer)
    results = {}
    writers = [gevent.spawn(writer, big_engine, commit, b"s0", b"x", results)]
    end_of_turn()
    writers += [gevent.spawn(writer, big_engine, commit, b"s%d" % i, b"x", results)
                for i in (1, 2)]
    end_of_turn()  # s1 and s2 were appended after s0's sync began: a second sync
    fdatasync.failing = True
    syncer.release()  # covers s0
    gevent.joinall(writers, timeout=TIMEOUT, raise_error=True)
    fdatasync.failing = False
    # Under "always" a failed sync takes back every append not durable: all three.
    assert all(isinstance(results[b"s%d" % i], StorageError) for i in range(3))
    assert big_engine.durable_position == 0 and big_engine.stream_names() == []
    syncer.release()  # the second sync's answer: nothing left for it to change
    end_of_turn()
    assert big_engine.durable_position == 0 and big_engine.stream_names() == []
    commit.close()


def test_writers_are_still_stored_when_the_helper_process_dies(big_engine):
    commit = GroupCommit(big_engine)
    commit.start()
    helper = commit._syncer.process
    results = {}
    run_writers(big_engine, commit, 3, results)
    os.kill(helper.pid, signal.SIGSTOP)  # it will not answer the next request ...
    first = gevent.spawn(writer, big_engine, commit, b"late", b"x", results)
    end_of_turn()  # ... which is sent now
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


def test_the_helper_covers_every_request_waiting_with_one_fdatasync(tmp_path, monkeypatch):
    """Requests sent while a sync runs wait in the socket; the next fdatasync, once
    started, covers what was written before each of them: one for all."""
    from meilies.server import syncer

    synced = []
    real_fdatasync = os.fdatasync

    def counted(fd):
        synced.append(fd)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", counted)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with open(tmp_path / "a", "wb") as handle:
        ours.sendmsg([syncer.FILE], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", [handle.fileno()]))])
    for _ in range(4):
        ours.send(syncer.REQUEST)
    ours.shutdown(socket.SHUT_WR)
    syncer.serve(theirs)
    answers = b""
    while len(answers) < 5 * syncer.RESULT.size:
        answers += ours.recv(64)
    assert [code for (code,) in syncer.RESULT.iter_unpack(answers)] == [0] * 5
    assert len(synced) == 1
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


def read_all(directory, segment_size) -> list[tuple[bytes, int, bytes]]:
    with Engine.open(directory, fsync="always", segment_size=segment_size) as engine:
        return [(e.stream, e.number, bytes(e.data)) for e in engine.read_all()]


def test_a_sync_that_fails_after_its_appends_were_taken_back_touches_nothing_else(
        tmp_path, fdatasync):
    """A roll's failed sync took back the appends a helper sync was for; a retried
    batch then rolled fine into a new segment; then the helper's sync reports EIO.
    That answer concerns nothing that remains: the retried batch and the writers after
    it are stored, and the log opens again with exactly them."""
    engine = Engine.open(tmp_path / "d", fsync="always", segment_size=600)
    engine.append(b"w0", [(b"e", b"p" * 300)])
    engine.sync()  # durable: the failed roll takes back only what comes after
    syncer = HeldSyncer()
    commit = GroupCommit(engine, syncer)
    results = {}
    w1 = gevent.spawn(writer, engine, commit, b"w1", b"x", results)
    end_of_turn()  # T1 for w1, held
    fdatasync.failing = True
    with pytest.raises(StorageError):  # the roll's sync fails: w1 is taken back
        engine.append(b"w2", [(b"e", b"y" * 300)])
    fdatasync.failing = False
    w3 = gevent.spawn(writer, engine, commit, b"w3", b"z" * 250, results)  # rolls, fine
    end_of_turn()
    assert len(engine.segments) == 2
    syncer.release(EIO)  # T1 answers: failed
    sync_until_done(syncer, [w1, w3])
    assert isinstance(results[b"w1"], StorageError) and results[b"w3"] == "stored"
    w4 = gevent.spawn(writer, engine, commit, b"w4", b"acked", results)
    sync_until_done(syncer, [w4])
    assert results[b"w4"] == "stored"
    commit.close()
    engine.close()
    assert read_all(tmp_path / "d", 600) == [(b"w0", 0, b"p" * 300), (b"w3", 0, b"z" * 250),
                                             (b"w4", 0, b"acked")]


def test_a_failed_helper_sync_that_a_roll_covered_is_logged_not_lost(tmp_path, caplog):
    engine = Engine.open(tmp_path / "d", fsync="always", segment_size=400)
    syncer = HeldSyncer()
    commit = GroupCommit(engine, syncer)
    results = {}
    w1 = gevent.spawn(writer, engine, commit, b"w1", b"x", results)
    end_of_turn()
    engine.append(b"big", [(b"e", b"y" * 300)])  # rolls: its own sync covers w1
    syncer.release(EIO)
    w1.join(timeout=TIMEOUT)
    assert results[b"w1"] == "stored" and engine.durable_position == 1  # "big" waits
    assert any("failed" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    commit.close()
    engine.close()


# -- a whole server in-process: one connection's pipeline across a failed roll -------------


def resp_command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def read_lines(sock, count: int) -> list[bytes]:
    data = b""
    while data.count(b"\r\n") < count:
        more = sock.recv(65536)
        assert more, "the server closed the connection"
        data += more
    return data.split(b"\r\n")[:count]


class FailNext:
    """Stands in for an os call: the next ``armed`` calls fail with ``errno``."""

    def __init__(self, real, code: int) -> None:
        self.real, self.code, self.armed = real, code, 0

    def __call__(self, *args):
        if self.armed:
            self.armed -= 1
            raise OSError(self.code, os.strerror(self.code))
        return self.real(*args)


def serve(tmp_path, policy: str):
    from gevent import socket as gsocket

    from meilies.server.app import Config, Server

    engine = Engine.open(tmp_path / "d", fsync=policy, segment_size=600)
    server = Server(engine, Config(port=0, fsync=policy))
    server.start()
    client = gsocket.create_connection(("127.0.0.1", server.port))
    client.sendall(resp_command(b"publish", b"warm", b"e", b"w" * 200))
    assert read_lines(client, 1) == [b"+OK"]
    return engine, server, client


def pipeline_across_a_roll(client) -> list[bytes]:
    """publish a, then b (which rolls the segment), then c, in one read."""
    client.sendall(resp_command(b"publish", b"a", b"e", b"x")
                   + resp_command(b"publish", b"b", b"e", b"y" * 400)
                   + resp_command(b"publish", b"c", b"e", b"z"))
    return read_lines(client, 3)


def test_a_pipeline_across_a_roll_whose_sync_fails_answers_each_publish_truly(
        tmp_path, monkeypatch):
    engine, server, client = serve(tmp_path, "always")
    stand_in = FailNext(os.fdatasync, errno.EIO)
    monkeypatch.setattr(os, "fdatasync", stand_in)
    stand_in.armed = 1  # the roll's own fdatasync, on the server's loop
    replies = pipeline_across_a_roll(client)
    # a was taken back by the failed roll, b failed, c was appended after: stored.
    assert replies[0].startswith(b"-ERR storage failure") and \
        replies[1].startswith(b"-ERR storage failure") and replies[2] == b"+OK", replies
    client.sendall(resp_command(b"publish", b"d", b"e", b"later"))
    assert read_lines(client, 1) == [b"+OK"]
    client.close()
    server.stop()
    assert [s for s, _n, _d in read_all(tmp_path / "d", 600)] == [b"warm", b"c", b"d"]


@pytest.mark.parametrize("policy", ["always", "everysec", "no"])
def test_a_pipeline_across_a_roll_whose_write_fails_answers_each_publish_truly(
        tmp_path, monkeypatch, policy):
    engine, server, client = serve(tmp_path, policy)
    stand_in = FailNext(os.pwritev, errno.ENOSPC)
    monkeypatch.setattr(os, "pwritev", stand_in)
    stand_in.armed = 1  # the roll's write of a, before it syncs: disk full
    replies = pipeline_across_a_roll(client)
    assert replies[0].startswith(b"-ERR storage failure") and \
        replies[1].startswith(b"-ERR storage failure") and replies[2] == b"+OK", replies
    client.close()
    server.stop()
    assert [s for s, _n, _d in read_all(tmp_path / "d", 600)] == [b"warm", b"c"]


def test_a_retry_pipelined_after_a_new_append_full_waits_for_the_new_one(tmp_path):
    """A retry answers with the position its events were first stored at, before the
    new append pipelined ahead of it: the connection must still wait until that new
    append is durable before it answers either (found by tools/torture.py: an
    acknowledged transaction lost to a kill -9)."""
    import select

    from gevent import socket as gsocket

    from meilies.server.app import Config, Server

    engine = Engine.open(tmp_path / "d", fsync="always")
    server = Server(engine, Config(port=0, fsync="always"))
    syncer = HeldSyncer()
    server.commit = GroupCommit(engine, syncer)
    server.start()
    client = gsocket.create_connection(("127.0.0.1", server.port))
    first = resp_command(b"append-full", b"s", b"any", b"id-1", b"e", b"", b"one")
    client.sendall(first)
    stored = gevent.spawn(read_lines, client, 3)
    sync_until_done(syncer, [stored])
    assert stored.value == [b"*2", b":0", b":0"]

    client.sendall(resp_command(b"append-full", b"t", b"any", b"id-2", b"e", b"", b"two")
                   + first)
    deadline = time.monotonic() + TIMEOUT
    while not syncer.requests and not select.select([client.fileno()], [], [], 0)[0]:
        assert time.monotonic() < deadline, "neither a sync asked nor an answer"
        gevent.sleep(0.001)
    assert not select.select([client.fileno()], [], [], 0)[0], \
        "answered before the new append-full was durable"
    assert engine.durable_position == 1
    replies = gevent.spawn(read_lines, client, 6)
    sync_until_done(syncer, [replies])
    assert replies.value == [b"*2", b":0", b":1", b"*2", b":0", b":0"]
    assert engine.durable_position == 2
    client.close()
    server.stop()
