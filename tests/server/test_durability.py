"""Under load and across crashes: no gap, no duplicate, no reordering, nothing
acknowledged lost; a slow subscriber lags without making the server buffer."""

import random
import socket
import threading

import pytest

from serverproc import DEADLINE, RawClient, command, event_frame, subscribed, wait_for


def parse_frame(frame: bytes) -> tuple[bytes, int, bytes, bytes]:
    """``(stream, number, name, data)`` of one event frame (asserting its shape)."""
    head, rest = frame.split(b"\r\n", 1)
    assert head == b"*5" and rest.startswith(b"+event\r\n"), frame[:80]
    rest = rest[len(b"+event\r\n"):]
    stream, rest = rest.split(b"\r\n", 1)
    number, rest = rest.split(b"\r\n", 1)
    name, rest = rest.split(b"\r\n", 1)
    length, data = rest.split(b"\r\n", 1)
    assert stream[:1] == b"+" and number[:1] == b":" and name[:1] == b"+" and length[:1] == b"$"
    assert len(data) == int(length[1:]) + 2 and data.endswith(b"\r\n")
    return stream[1:], int(number[1:]), name[1:], data[:-2]


def read_stream(client, stream: bytes) -> list[tuple[bytes, bytes]]:
    """Every stored ``(name, data)`` of ``stream``, by number, read with a fresh
    bounded subscription."""
    reply = client.call("last-event-number", stream)
    if reply.endswith(b"$-1\r\n"):
        return []
    count = int(reply.rsplit(b":", 1)[1]) + 1
    client.send(command("subscribe", b"%s:0:%d" % (stream, count)))
    client.expect(subscribed(stream))
    events = []
    for number in range(count):
        got_stream, got_number, name, data = parse_frame(client.read_reply())
        assert (got_stream, got_number) == (stream, number)
        events.append((name, data))
    return events


def info_field(client, key: str) -> str:
    body = client.call("info").split(b"\r\n", 1)[1].decode()
    return dict(line.split(":", 1) for line in body.splitlines() if ":" in line)[key]


def payload(rng: random.Random) -> bytes:
    return rng.choice([b"", b"\r\n", b"\x00", b"*5\r\n+event\r\n", b"$-1\r\n",
                       rng.randbytes(rng.randrange(1, 300))])


class Publisher(threading.Thread):
    """Pipelines ``publish`` requests ``depth`` at a time; records what was acknowledged."""

    def __init__(self, port: int, events: list[tuple[bytes, bytes, bytes]], depth: int) -> None:
        super().__init__(daemon=True)
        self.client = RawClient(port)
        self.events = events
        self.depth = depth
        self.acked = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for at in range(0, len(self.events), self.depth):
                batch = self.events[at:at + self.depth]
                self.client.send(b"".join(command("publish", *e) for e in batch))
                for _ in batch:
                    assert self.client.read_reply() == b"+OK\r\n"
                    self.acked += 1
        except BaseException as exc:  # reported by the test through .error
            self.error = exc


class Subscriber(threading.Thread):
    """Subscribes with ``spec`` and collects ``count`` events."""

    def __init__(self, port: int, spec: bytes, count: int | None = None) -> None:
        super().__init__(daemon=True)
        self.client = RawClient(port)
        self.client.send(command("subscribe", spec))
        self.client.expect(subscribed(spec.split(b":")[0]))
        self.count = count
        self.events: list[tuple[bytes, int, bytes, bytes]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while self.count is None or len(self.events) < self.count:
                self.events.append(parse_frame(self.client.read_reply()))
        except BaseException as exc:
            self.error = exc


def join_all(threads) -> None:
    for thread in threads:
        thread.join(DEADLINE)
        assert not thread.is_alive(), f"{thread} still running"
        assert thread.error is None, thread.error


# -- no gap, no duplicate ------------------------------------------------------------------


def test_concurrent_pipelined_publishers_and_subscribers_see_no_gap_and_no_duplicate(server):
    rng = random.Random(42)
    streams = [b"a", b"b", b"c"]
    per_publisher = 2000
    plans = [[(rng.choice(streams), b"p%d-%d" % (p, i), payload(rng))
              for i in range(per_publisher)] for p in range(3)]
    totals = {s: sum(1 for plan in plans for e in plan if e[0] == s) for s in streams}
    control = server.client()
    # Some subscribers before anything is published: from 0, live, and $all.
    early = [Subscriber(server.port, b"a:0", totals[b"a"]),
             Subscriber(server.port, b"b", totals[b"b"]),
             Subscriber(server.port, b"$all:0", sum(totals.values()))]
    wait_for(lambda: info_field(control, "subscribers") == "3", what="subscribers:3")
    for subscriber in early:
        subscriber.start()
    publishers = [Publisher(server.port, plan, depth=50) for plan in plans]
    for publisher in publishers:
        publisher.start()
    # More while the publishers run: from the middle of a stream, live, $all live.
    wait_for(lambda: sum(p.acked for p in publishers) >= 1500, what="1500 acknowledged")
    middle = Subscriber(server.port, b"c:300", totals[b"c"] - 300)
    live_c = Subscriber(server.port, b"c")
    live_all = Subscriber(server.port, b"$all")
    late = [middle, live_c, live_all]
    for subscriber in late:
        subscriber.start()
    join_all(publishers)
    join_all(early + [middle])
    # One last event, so that the live subscriptions have something to end on even if
    # they were made after the publishers finished.
    assert control.call("publish", "c", "tail", "end") == b"+OK\r\n"

    stored = {s: read_stream(control, s) for s in streams}
    for s in streams:
        assert len(stored[s]) == totals[s] + (s == b"c")
        # Each publisher's events of a stream are stored in the order it sent them.
        for p, plan in enumerate(plans):
            mine = [(name, data) for stream, name, data in plan if stream == s]
            assert [e for e in stored[s] if e[0].startswith(b"p%d-" % p)] == mine

    def assert_as_stored(events, stream, first, count):
        """``events`` are ``count`` stored events of ``stream`` from ``first`` on."""
        assert len(events) == count
        assert [num for _s, num, _n, _d in events] == list(range(first, first + count))
        assert [(n, d) for _s, _num, n, d in events] == stored[stream][first:first + count]

    assert_as_stored(early[0].events, b"a", 0, totals[b"a"])
    assert_as_stored(early[1].events, b"b", 0, totals[b"b"])
    assert_as_stored(middle.events, b"c", 300, totals[b"c"] - 300)
    # $all:0 holds every stream's events in per-stream order, each exactly once.
    all_events = early[2].events
    for s in streams:
        assert_as_stored([e for e in all_events if e[0] == s], s, 0, totals[s])
    # A second $all:0, made after everything was published, sees the same global order.
    replay = Subscriber(server.port, b"$all:0", len(all_events) + 1)
    replay.run()
    assert replay.error is None and replay.events[:-1] == all_events
    assert replay.events[-1] == (b"c", totals[b"c"], b"tail", b"end")
    # The live subscriptions end up with a suffix of what is stored: no gap, no duplicate.
    wait_for(lambda: live_c.events and live_c.events[-1][2] == b"tail",
             what="live c subscriber to reach the end")
    first = live_c.events[0][1]
    assert_as_stored(live_c.events, b"c", first, totals[b"c"] + 1 - first)
    wait_for(lambda: live_all.events and live_all.events[-1][2] == b"tail",
             what="live $all subscriber to reach the end")
    assert live_all.events == replay.events[len(replay.events) - len(live_all.events):]


# -- slow subscriber -----------------------------------------------------------------------


def slow_client(port: int) -> RawClient:
    """A client with a small receive buffer, so that not reading pushes back at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.settimeout(DEADLINE)
    sock.connect(("127.0.0.1", port))
    client = RawClient.__new__(RawClient)
    client.sock, client.buffer = sock, b""
    return client


def rss_anon_kib(server) -> int:
    with open(f"/proc/{server.proc.pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon")


def expect_stream_bytes(client: RawClient, expected: bytes) -> None:
    """Read exactly ``expected`` (which may be large) and compare it piece by piece."""
    at = 0
    while at < len(expected):
        n = min(1 << 20, len(expected) - at)
        got = client.read_exactly(n)
        assert got == expected[at:at + n], f"mismatch within bytes {at}..{at + n}"
        at += n


def test_a_subscriber_that_never_reads_neither_grows_the_server_nor_slows_others(server):
    count, size = 5000, 10 * 1024
    datas = [(b"%06d" % i) * (size // 6) for i in range(count)]
    frames = b"".join(event_frame(b"big", i, b"e", d) for i, d in enumerate(datas))
    slow = slow_client(server.port)
    slow.send(command("subscribe", "big:0"))
    slow.expect(subscribed(b"big"))
    fast = Subscriber(server.port, b"big:0", count)
    control = server.client()
    wait_for(lambda: info_field(control, "subscribers") == "2", what="subscribers:2")
    fast.start()
    rss_before, anon_before = server.rss_kib(), rss_anon_kib(server)
    samples = []

    class Sampling(Publisher):
        def run(self) -> None:
            super().run()
            samples.append((server.rss_kib(), rss_anon_kib(server)))

    publishers = []
    for at in range(0, count, 1000):
        chunk = [(b"big", b"e", d) for d in datas[at:at + 1000]]
        publisher = Sampling(server.port, chunk, depth=50)
        publisher.start()
        publisher.join(DEADLINE)  # one after the other: numbers follow ``datas``
        publishers.append(publisher)
    # Another publisher on another stream is not held up by the lagging subscriber.
    other = Publisher(server.port, [(b"small", b"e", b"x")] * 500, depth=50)
    other.start()
    join_all(publishers + [other, fast])
    assert [e[3] for e in fast.events] == datas
    peak_rss = max(r for r, _a in samples)
    peak_anon = max(a for _r, a in samples)
    assert peak_rss - rss_before < 150 * 1024, (rss_before, samples)
    assert peak_anon - anon_before < 100 * 1024, (anon_before, samples)
    # Now the slow one reads: everything, in order, byte for byte.
    expect_stream_bytes(slow, frames)
    assert slow.call("ping") == b"+PONG\r\n"


@pytest.mark.parametrize("spec", ["$all:0", "big:0"])
def test_catching_up_on_large_events_without_reading_buffers_no_backlog(start_server, spec):
    server = start_server("--fsync", "no")
    client = server.client()
    datas = [(b"%04d" % i) * (1024 * 1024 // 4 - 64) for i in range(100)]  # ~100 MB
    for data in datas:
        assert client.call("publish", "big", "e", data) == b"+OK\r\n"
    anon_before = rss_anon_kib(server)
    slow = slow_client(server.port)
    slow.send(command("subscribe", spec))
    slow.expect(subscribed(spec.split(":")[0].encode()))
    # Once INFO counts it, the subscription has read its first batch and is blocked
    # sending it to a client that does not read.
    wait_for(lambda: info_field(client, "subscribers") == "1", what="subscribers:1")
    assert client.call("ping") == b"+PONG\r\n"
    assert rss_anon_kib(server) - anon_before < 40 * 1024
    expect_stream_bytes(slow, b"".join(event_frame(b"big", i, b"e", d)
                                       for i, d in enumerate(datas)))


# -- crash ---------------------------------------------------------------------------------


class CrashPublisher(threading.Thread):
    """Publishes to its own stream (so numbers follow its order) and, every few
    requests, an atomic ``append`` of three events; stops at the first error."""

    def __init__(self, port: int, stream: bytes, seed: int) -> None:
        super().__init__(daemon=True)
        self.client = RawClient(port)
        self.stream = stream
        self.rng = random.Random(seed)
        self.sent: list[list[tuple[bytes, bytes]]] = []  # requests, each a list of events
        self.acked_events = 0
        self.error = None

    def run(self) -> None:
        rng = self.rng
        try:
            while True:
                batch = []
                for _ in range(20):
                    n = len(self.sent)
                    if n % 7 == 3:
                        events = [(b"batch-%d-%d" % (n, k), payload(rng)) for k in range(3)]
                        request = command("append", self.stream, "any",
                                          *[x for e in events for x in e])
                    else:
                        events = [(b"one-%d" % n, payload(rng))]
                        request = command("publish", self.stream, *events[0])
                    self.sent.append(events)
                    batch.append((request, events))
                self.client.send(b"".join(r for r, _ in batch))
                for _request, events in batch:
                    reply = self.client.read_reply()
                    assert reply in (b"+OK\r\n", b":%d\r\n" % (self.acked_events + 2)), reply
                    self.acked_events += len(events)
        except (OSError, ConnectionError, AssertionError):
            pass  # the server was killed


@pytest.mark.parametrize("fsync", ["always", "everysec", "no"])
def test_kill_9_while_publishing_loses_no_acknowledged_event(start_server, tmp_path, fsync):
    server = start_server("--fsync", fsync)
    publishers = [CrashPublisher(server.port, b"crash-%d" % k, k) for k in range(4)]
    for publisher in publishers:
        publisher.start()
    wait_for(lambda: all(p.acked_events >= 500 for p in publishers), what="500 acked each")
    server.kill()
    for publisher in publishers:
        publisher.join(DEADLINE)
        assert not publisher.is_alive()

    restarted = start_server("--fsync", fsync, data_dir=tmp_path / "data")
    client = restarted.client()
    for publisher in publishers:
        sent = [e for request in publisher.sent for e in request]
        stored = read_stream(client, publisher.stream)
        # Every acknowledged event is there, with its number and bytes; what follows is
        # a prefix of what was sent (unacknowledged, possibly stored), never garbage.
        assert len(stored) >= publisher.acked_events
        assert stored == sent[:len(stored)]
        # Appends are atomic: a stored request is stored whole.
        boundaries = {0}
        at = 0
        for request in publisher.sent:
            at += len(request)
            boundaries.add(at)
        assert len(stored) in boundaries
    # Numbering continues where the log ends.
    stream = publishers[0].stream
    next_number = len(read_stream(client, stream))
    assert client.call("publish", stream, "after", "x") == b"+OK\r\n"
    assert client.call("last-event-number", stream) == \
        b"*3\r\n+last-event-number\r\n+%s\r\n:%d\r\n" % (stream, next_number)


# -- fsync policies ----------------------------------------------------------------------------


@pytest.mark.parametrize("fsync", ["always", "everysec", "no"])
def test_publishes_are_visible_at_once_and_survive_a_sigterm_restart(start_server, tmp_path,
                                                                     fsync):
    server = start_server("--fsync", fsync)
    client = server.client()
    reader = server.client()
    reader.send(command("subscribe", "s:0"))
    reader.expect(subscribed(b"s"))
    events = [(b"e%d" % i, b"data\r\n%d" % i) for i in range(300)]
    client.send(b"".join(command("publish", "s", n, d) for n, d in events))
    client.expect(b"+OK\r\n" * len(events))
    assert client.call("last-event-number", "s") == b"*3\r\n+last-event-number\r\n+s\r\n:299\r\n"
    assert client.call("append", "s", "299", "last", "x") == b":300\r\n"
    events.append((b"last", b"x"))
    reader.expect(b"".join(event_frame(b"s", i, n, d) for i, (n, d) in enumerate(events)))
    assert server.stop() == 0
    restarted = start_server("--fsync", fsync, data_dir=tmp_path / "data")
    assert read_stream(restarted.client(), b"s") == events
    assert restarted.client().call("publish", "s", "more", "y") == b"+OK\r\n"
    assert info_field(restarted.client(), "fsync") == fsync
