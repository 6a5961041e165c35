"""Reads by number and by position against an in-memory model, through restarts and
``kill -9``; and positions under concurrent publishers (PROTOCOL.md v2).

The model test drives one real server (small segments, so that reads cross files)
with hypothesis-chosen publishes, pipelined publishes (records of several events),
appends, ``range``/``revrange`` over streams and ``$all``, bounded ``$all@from:to``
subscriptions, graceful restarts and ``kill -9`` restarts. Under ``--fsync always``
every acknowledged event survives the crash, so the model never forgets one; each
read must equal the model's answer exactly (timestamps: present, and equal within a
record).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import hiredis
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from serverproc import DEADLINE, ServerProcess, command, wait_for

EXAMPLES = int(os.environ.get("MEILIES_READS_MODEL_EXAMPLES", "40"))
STREAMS = [b"a", b"b", b"c-long-stream-name", b"d"]


def read_values(sock, reader: hiredis.Reader, count: int) -> list:
    out = []
    while len(out) < count:
        value = reader.gets()
        if value is not False:
            out.append(value)
            continue
        chunk = sock.recv(1 << 20)
        assert chunk, "the server closed the connection"
        reader.feed(chunk)
    return out


class Model:
    """Every event acknowledged, in position order: (stream, number, name, data)."""

    def __init__(self) -> None:
        self.events: list[tuple[bytes, int, bytes, bytes]] = []
        self.numbers: dict[bytes, int] = {}

    def add(self, stream: bytes, name: bytes, data: bytes) -> None:
        number = self.numbers.get(stream, 0)
        self.numbers[stream] = number + 1
        self.events.append((stream, number, name, data))

    def frames(self, positions) -> list[list]:
        return [[b"event", *self.events[p], p] for p in positions]


class Harness:
    """One server for the whole test (hypothesis examples append to the same log)."""

    def __init__(self, directory: Path) -> None:
        self.server = ServerProcess(directory / "data", "--segment-size", "2048",
                                    "--fsync", "always").start()
        self.model = Model()
        self._connect()

    def _connect(self) -> None:
        self.client = self.server.client()
        self.reader = hiredis.Reader()

    def call(self, *args):
        self.client.send(command(*args))
        return read_values(self.client.sock, self.reader, 1)[0]

    def restart(self, crash: bool) -> None:
        self.client.close()
        if crash:
            self.server.kill()
        else:
            assert self.server.stop() == 0
        self.server.start()
        self._connect()


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("reads-model"))
    yield h
    h.server.kill()


names = st.sampled_from([b"created", b"x", b"a-longer-event-name"])
datas = st.binary(max_size=120) | st.sampled_from([b"", b"\r\n", b"*9\r\n$-1\r\n"])
bound = st.one_of(st.just("-"), st.just("+"), st.integers(0, 60))
ops = st.one_of(
    st.tuples(st.just("publish"), st.sampled_from(STREAMS), names, datas),
    st.tuples(st.just("pipeline"), st.lists(st.tuples(st.sampled_from(STREAMS), names, datas),
                                            min_size=1, max_size=12)),
    st.tuples(st.just("append"), st.sampled_from(STREAMS),
              st.lists(st.tuples(names, datas), min_size=1, max_size=8)),
    st.tuples(st.just("range"), st.sampled_from(STREAMS + [b"$all", b"none"]), bound, bound,
              st.one_of(st.none(), st.integers(1, 30)), st.booleans()),
    st.tuples(st.just("subscribe"), st.integers(0, 200), st.integers(1, 40)),
    st.tuples(st.just("restart"), st.booleans()),
)


def resolve(raw, last: int) -> int:
    return 0 if raw == "-" else (2**64 - 1 if raw == "+" else raw)


@settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(steps=st.lists(ops, min_size=1, max_size=25))
def test_reads_equal_the_model_through_restarts_and_crashes(harness, steps):
    model = harness.model
    for step in steps:
        kind = step[0]
        if kind == "publish":
            _, stream, name, data = step
            assert harness.call("publish", stream, name, data) == b"OK"
            model.add(stream, name, data)
        elif kind == "pipeline":
            requests = step[1]
            harness.client.send(b"".join(command("publish", s, n, d) for s, n, d in requests))
            assert read_values(harness.client.sock, harness.reader, len(requests)) == \
                [b"OK"] * len(requests)
            for s, n, d in requests:
                model.add(s, n, d)
        elif kind == "append":
            _, stream, events = step
            args = ["append", stream, "any"]
            for n, d in events:
                args += [n, d]
            assert harness.call(*args) == model.numbers.get(stream, 0) + len(events) - 1
            for n, d in events:
                model.add(stream, n, d)
        elif kind == "range":
            _, stream, first, second, count, descending = step
            check_range(harness, stream, first, second, count, descending)
        elif kind == "subscribe":
            _, start, length = step
            check_subscription(harness, start, length)
        else:
            harness.restart(crash=step[1])
    check_range(harness, b"$all", "-", "+", 100_000, False)


def check_range(harness, stream, first, second, count, descending) -> None:
    model = harness.model
    args = ["revrange" if descending else "range", stream, first, second]
    if count is not None:
        args += ["COUNT", count]
    got = harness.call(*args)
    assert isinstance(got, list), got
    # The model's answer: positions of the events in range, in the order asked.
    low, high = (resolve(second, 0), resolve(first, 0)) if descending else \
        (resolve(first, 0), resolve(second, 0))
    if stream == b"$all":
        positions = [p for p in range(len(model.events)) if low <= p <= high]
    else:
        positions = [p for p, e in enumerate(model.events)
                     if e[0] == stream and low <= e[1] <= high]
    if descending:
        positions.reverse()
    positions = positions[:count if count is not None else 10_000]
    assert [f[:6] for f in got] == model.frames(positions)
    assert all(len(f) == 9 and isinstance(f[6], int) and f[7] is None and f[8] is None
               for f in got)


def check_subscription(harness, start: int, length: int) -> None:
    """``$all@start:stop`` over what is stored: exactly the model's events, then done."""
    model = harness.model
    end = len(model.events)
    start = min(start, end)
    stop = min(start + length, end)
    if start >= stop:
        return
    sub = harness.server.client()
    try:
        sub.send(command("envelope", "full") + command("subscribe", f"$all@{start}:{stop}"))
        reader = hiredis.Reader()
        assert read_values(sub.sock, reader, 2) == [b"OK", [b"subscribed", b"$all"]]
        frames = read_values(sub.sock, reader, stop - start)
        assert [f[:6] for f in frames] == model.frames(range(start, stop))
        sub.send(command("ping"))
        assert read_values(sub.sock, reader, 1) == [b"PONG"]  # and nothing after its stop
    finally:
        sub.close()


# -- positions under concurrency -----------------------------------------------------------


def last_position(server) -> int:
    client = server.client()
    try:
        return int(client.call("info").split(b"last_position:")[1].split(b"\r\n")[0])
    finally:
        client.close()


def publishers(port: int, streams: int, each: int, stop: threading.Event) -> list[threading.Thread]:
    """``streams`` threads, each publishing ``each`` events to its own stream, pipelined
    in small bursts (several records per read, several readers' worth at once)."""
    from serverproc import RawClient

    def run(k: int) -> None:
        client = RawClient(port)
        sent = 0
        try:
            while sent < each and not stop.is_set():
                burst = min(1 + (sent % 7), each - sent)
                client.send(b"".join(command("publish", f"p{k}", "e", f"{k}-{sent + i}")
                                     for i in range(burst)))
                for _ in range(burst):
                    assert client.read_reply() == b"+OK\r\n"
                sent += burst
        except OSError:
            if not stop.is_set():  # only the crash test breaks connections, after stop
                raise
        finally:
            client.close()

    return [threading.Thread(target=run, args=(k,)) for k in range(streams)]


@pytest.mark.parametrize("fsync", ["always", "no"])
def test_a_position_subscriber_sees_consecutive_positions_from_catch_up_to_live(
        start_server, fsync):
    """Publishers on several streams run before and while a ``$all@p`` subscriber
    catches up and goes live: every position from p once, strictly increasing by one,
    each stream's numbers in order. Under ``--fsync always`` this is also "a reader
    never sees p+1 before p": events become visible only when durable."""
    server = start_server("--fsync", fsync, "--segment-size", "65536")
    stop = threading.Event()
    threads = publishers(server.port, 6, 1500, stop)
    for thread in threads:
        thread.start()
    wait_for(lambda: last_position(server) > 1000, what="a thousand events stored")
    sub = server.client()
    sub.send(command("envelope", "full") + command("subscribe", "$all@500"))
    reader = hiredis.Reader()
    assert read_values(sub.sock, reader, 2) == [b"OK", [b"subscribed", b"$all"]]
    total = 6 * 1500
    frames = read_values(sub.sock, reader, total - 500)
    for thread in threads:
        thread.join(DEADLINE)
    assert [f[5] for f in frames] == list(range(500, total))
    numbers: dict[bytes, int] = {}
    for f in frames:
        expected = numbers.get(f[1], f[2])
        assert f[2] == expected
        numbers[f[1]] = expected + 1
        assert f[4] == b"%s-%d" % (f[1][1:], f[2])


def test_after_a_crash_a_position_subscriber_sees_exactly_the_stored_suffix(start_server):
    server = start_server("--fsync", "always", "--segment-size", "65536")
    stop = threading.Event()
    threads = publishers(server.port, 4, 100_000, stop)
    for thread in threads:
        thread.start()
    wait_for(lambda: last_position(server) > 3000, what="3,000 events stored")
    stop.set()
    server.kill()  # publishers are mid-request: their connections break
    for thread in threads:
        thread.join(DEADLINE)
    server.start()
    c = server.client()
    last = last_position(server)
    everything = hiredis.Reader()
    everything.feed(c.call("range", "$all", "-", "+", "COUNT", "100000"))
    stored = everything.gets()
    assert [f[5] for f in stored] == list(range(last + 1))
    for start in (0, last // 2, last, last + 1):
        sub = server.client()
        sub.send(command("envelope", "full") + command("subscribe", f"$all@{start}"))
        reader = hiredis.Reader()
        assert read_values(sub.sock, reader, 2) == [b"OK", [b"subscribed", b"$all"]]
        got = read_values(sub.sock, reader, last + 1 - start)
        assert got == stored[start:]
        sub.send(command("ping"))
        assert read_values(sub.sock, reader, 1) == [b"PONG"]
        sub.close()
