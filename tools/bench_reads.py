#!/usr/bin/env python3
"""Read benchmark: MeiliES ``range`` and catch-up subscriptions against Redis Streams.

    python3 tools/bench_reads.py                     # everything, median of 5 runs
    python3 tools/bench_reads.py --quick             # smaller counts, 1 run: a smoke run
    python3 tools/bench_reads.py --runs 3 --only aggregate

Not a test: figures only, nothing asserted (but every run checks that what it loaded
was stored and that every reply it counted was complete, and says so if not). Progress
goes to stderr, the JSON to stdout. Every figure is ``{"meilies": x, "redis": y,
"ratio": x / y}``, the median over runs; the runs alternate which server goes first.
Both servers run with fsync off (``--fsync no`` / ``appendfsync no``): only reads are
measured. Which core each process runs on is left to the scheduler, except in
``aggregate`` (see ``--pin``).

Scenarios (``--only``):

* ``aggregate``: loading an aggregate. 1,000 streams ``agg-<i>`` of 50 events of 100
  bytes each (MeiliES: one ``append agg-<i> any ev <data> ...`` of 50 events per stream;
  Redis: 50 ``XADD agg-<i> * ev <data>``). Then ONE connection asks for a whole stream,
  one request at a time (send, wait for the whole reply, send the next), a random
  stream each time: ``range agg-<i> - +`` against ``XRANGE agg-<i> - +``, for 3 s
  (``--quick``: 1 s) after a warm-up; requests/s, and the CPU time the server and the
  client spent per request. Client and server are pinned to ONE core (``--pin same``,
  the default): a ping-pong over loopback between two cores of a virtual machine
  measures mostly how fast the hypervisor wakes an idle vCPU, and swung between 7,000
  and 26,000 Redis requests/s from run to run when left to the scheduler; on one core
  the figure is stable and is the sum of the client's and the server's CPU per
  request. ``--pin split`` (one core each) and ``--pin none`` are there to compare.
  Target: ratio >= 1.
* ``catchup_singles``: catching up on events that were published one at a time, each
  its own record on MeiliES. 1,000,000 events (``--quick``: 100,000). The first half
  are published by 4 connections pipelining 60 ``publish`` each, alternating stream
  ``solo`` with 15 others ``c-0`` .. ``c-14`` (``solo, c-0, solo, c-1, ...``), so that
  no two consecutive publishes of one read go to one stream (MeiliES stores a read's
  run of publishes to one stream as one record; alternating keeps one record per
  event); a quarter of the events are in ``solo``, each between two of other streams.
  The second half go to stream ``run``, by 8 connections with one ``publish`` in
  flight each (one record per event again), so that ``run``'s events are consecutive
  positions: an aggregate or a topic written alone. Redis holds the same events in one
  stream key ``all`` (every event), and ``solo`` and ``run`` in keys of their own.
  Measured: ``all``: ``subscribe $all@0`` until every stored event has arrived, against
  ``XRANGE all - + COUNT 10000`` pages (``(<last id>`` onwards, as bench_server.py's
  replay); ``one_stream``: ``subscribe solo:0`` against the same pages of ``solo``;
  ``own_stream``: ``subscribe run:0`` against pages of ``run``. Events/s. Target:
  ratio >= 2.
* ``range_big``: one ``range big - + COUNT 100000`` over 100,000 events published one
  at a time (alternating ``big`` and ``other``) against ``XRANGE big - + COUNT 100000``;
  events/s, and each server's memory around the reply: VmRSS before, the peak VmRSS
  during the reply (VmHWM, reset through ``/proc/<pid>/clear_refs`` just before the
  request) and VmRSS after, beside the reply's size, to show whether the server holds
  the whole reply.

Client design (as tools/bench_server.py). The machine this was written on has 2 cores
and both servers are single-threaded, so the client is one process, one thread, raw
blocking sockets (the preloads: ``select.epoll`` over all their connections): one core
for the server, one for the client (but ``aggregate``'s ping-pong shares one, above).
The client never parses a reply into objects; it counts bytes:

* a ``range`` reply is complete when the client has seen as many frame endings as the
  reply holds events: every full frame of an event stored without id and metadata ends
  with ``\\r\\n$-1\\r\\n$-1\\r\\n`` exactly once, and the data (``x`` filler) never holds
  it; the count is carried across chunk boundaries;
* a subscription has caught up when the client has received the exact number of bytes
  its frames add up to (computed from the frame layout: stream names, numbers, event
  name and data length of every stored event);
* a Redis reply is complete when it has counted one ``$100`` data header per entry
  (``RedisEntries`` of bench_server.py, which also takes the last ID of a page).

The client's own ceiling is reported beside each scenario, so that a figure bounded by
the client can be told from one bounded by the server:

* ``cpu``: the share of one core the client process and each server used over the
  measured interval (the run with the median throughput);
* ``client_ceiling.in_process``: a reply captured from the server, fed through the very
  same counting code in chunks of the size the live run received, with no socket: what
  the counting itself can digest;
* ``client_ceiling.loopback``: the same measured loop, unchanged, against a forked
  stand-in server that answers each request with the captured reply (it does no work
  but ``sendall``): what the client plus the kernel's loopback can take.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (CLK_TCK, HOST, RAW, Client, close_all, command,  # noqa: E402
                          connect, figure, log, median, median_run, meilies_frames_total,
                          proc_status_kb, redis_available, report_meta, run_scenarios,
                          start_meilies, start_redis, stop_on_sigterm, summarize)
from bench_server import Cpu, RedisEntries, replay_redis  # noqa: E402

SCENARIOS = ("aggregate", "catchup_singles", "range_big")
DATA_LEN = 100  # RedisEntries counts b"\r\n$100\r\n": the data must be 100 bytes
DATA = b"x" * DATA_LEN
EVENT_NAME = b"ev"  # replay_redis finds a page's last ID by the field name "ev"
RECV_SIZE = 4 * 1024 * 1024
#: The end of every full frame of an event stored without id and metadata.
FULL_FRAME_END = b"\r\n$-1\r\n$-1\r\n"
#: The start of a subscription's event frames (original envelope) and of a range's.
EVENT_FRAME = b"*5\r\n+event\r\n+"
FULL_FRAME = b"*9\r\n+event\r\n+"

#: Every run's value behind each figure, for the "runs" section of the report.


class Settings:
    def __init__(self, quick: bool, runs: int, pin: str) -> None:
        self.quick = quick
        self.runs = runs
        self.pin = pin
        self.agg_streams = 1_000
        self.agg_events = 50
        self.agg_seconds = 1.0 if quick else 3.0
        self.agg_warmup = 0.2 if quick else 0.5
        self.catchup_events = 100_000 if quick else 1_000_000
        self.catchup_conns = 4
        self.catchup_depth = 60
        self.page = 10_000
        self.big_events = 100_000
        self.ceiling_seconds = 0.3 if quick else 1.0
        self.loop_limit = 120.0 if quick else 300.0  # seconds any one measured loop may take


# -- counting replies without parsing them ----------------------------------------------------
# Every counter has reset() and feed(buf, start, end) -> True once its reply is complete;
# ``buf[start:end]`` is the chunk just received (a bytearray live, bytes in-process).

class FullFrames:
    """One ``range`` reply of ``expected`` full frames, counted by their endings
    (``FULL_FRAME_END``, once per frame), across chunk boundaries."""

    L = len(FULL_FRAME_END)

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.head = b"*%d\r\n%s" % (expected, FULL_FRAME)
        self.reset()

    def reset(self) -> None:
        self.seen = 0
        self.carry = b""  # the last L-1 bytes received, for an ending cut by a chunk
        self.fresh = True

    def feed(self, buf, start: int, end: int) -> bool:
        mark = FULL_FRAME_END
        if self.fresh:
            self.fresh = False
            if end - start >= len(self.head) and not buf.startswith(self.head, start, end):
                raise RuntimeError(f"unexpected range reply {bytes(buf[start:start + 80])!r}")
        seen = self.seen + buf.count(mark, start, end)
        edge = self.carry + bytes(buf[start:min(end, start + self.L - 1)])
        if self.carry:
            seen += edge.count(mark)  # only endings that straddle the boundary fit in edge
        if seen < self.expected:
            self.seen = seen
            self.carry = (edge if end - start < self.L - 1 else
                          bytes(buf[end - self.L + 1:end]))[-(self.L - 1):]
            return False
        tail = (self.carry + bytes(buf[max(start, end - self.L):end]))[-self.L:]
        if seen != self.expected or tail != mark:
            raise RuntimeError(f"range reply: {seen} frame endings, expected {self.expected},"
                               f" reply ends {tail!r}")
        return True


class ByteCount:
    """A subscription's catch-up: complete at exactly ``expected`` bytes, which must begin
    with ``head`` and end with ``tail``."""

    def __init__(self, expected: int, head: bytes, tail: bytes) -> None:
        self.expected = expected
        self.want_head = head
        self.want_tail = tail
        self.reset()

    def reset(self) -> None:
        self.received = 0
        self.head = b""
        self.tail = b""

    def feed(self, buf, start: int, end: int) -> bool:
        self.received += end - start
        if len(self.head) < 200:
            self.head += bytes(buf[start:min(end, start + 200)])
        self.tail = self.tail[-200:] + bytes(buf[max(start, end - 200):end])
        if self.received < self.expected:
            return False
        if self.received != self.expected or not self.head.startswith(self.want_head) \
                or not self.tail.endswith(self.want_tail):
            raise RuntimeError(f"subscription: got {self.received} bytes, expected "
                               f"{self.expected}, head {self.head[:80]!r} tail "
                               f"{self.tail[-80:]!r}")
        return True


class RedisReply:
    """One Redis XRANGE reply of ``expected`` entries (bench_server.RedisEntries: one
    ``$100`` data header per entry)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.entries = RedisEntries(b"*")

    def reset(self) -> None:
        self.entries.reset()

    def feed(self, buf, start: int, end: int) -> bool:
        if not self.entries.feed(memoryview(buf)[start:end]):
            return False
        if self.entries.k != self.expected:
            raise RuntimeError(f"XRANGE reply of {self.entries.k} entries, expected "
                               f"{self.expected}")
        return True


def drain(sock: socket.socket, counter, buf: bytearray, deadline: float,
          chunks: list | None = None) -> int:
    """Receive until ``counter`` has its whole reply; returns how many recvs it took."""
    recv_into = sock.recv_into
    feed = counter.feed
    clock = time.perf_counter
    recvs = 0
    while True:
        n = recv_into(buf)
        if not n:
            raise ConnectionError("the server closed the connection")
        recvs += 1
        if chunks is not None:
            chunks.append(bytes(buf[:n]))
        if feed(buf, 0, n):
            return recvs
        if clock() > deadline:
            raise TimeoutError("a reply took longer than the loop limit")


def one_request(server, request: bytes, counter, limit: float, capture: bool = False) -> dict:
    """Send one request (a ``range`` or a ``subscribe``), time it until ``counter`` has its
    whole reply, close."""
    sock = connect(server.port)
    buf = bytearray(RECV_SIZE)
    chunks: list[bytes] | None = [] if capture else None
    counter.reset()
    try:
        cpu = Cpu(server)
        t0 = time.perf_counter()
        sock.sendall(request)
        recvs = drain(sock, counter, buf, t0 + limit, chunks)
        t1 = time.perf_counter()
        cpu_result = cpu.done()
    finally:
        close_all([sock])
    out = {"seconds": t1 - t0, "recvs": recvs, "cpu": cpu_result}
    if chunks is not None:
        out["reply"] = b"".join(chunks)
        out["bytes"] = len(out["reply"])
    return out


def request_loop(server, requests: list[bytes], counter, events: int, seconds: float,
                 warmup: float, limit: float) -> dict:
    """One connection: send a request, wait for its whole reply, send the next (cycling
    through ``requests``); requests/s completed over ``seconds`` after ``warmup``."""
    sock = connect(server.port)
    buf = bytearray(RECV_SIZE)
    mask = len(requests) - 1  # a power of two
    sendall = sock.sendall
    clock = time.perf_counter
    reset = counter.reset
    i = done = recvs = 0
    cpu = cpu_result = None
    try:
        start = clock()
        t0 = start + warmup
        t_end = t0 + seconds
        deadline = start + limit
        while True:
            reset()
            sendall(requests[i & mask])
            i += 1
            r = drain(sock, counter, buf, deadline)
            now = clock()
            if cpu is None:
                if now >= t0:
                    cpu = Cpu(server)
                    t0 = now
                    i0 = i
                continue
            done += 1
            recvs += r
            if now >= t_end:
                cpu_result = cpu.done()
                break
        elapsed = now - t0
    finally:
        close_all([sock])
    wall = cpu_result["wall_s"]
    return {"requests_per_s": done / elapsed, "events_per_s": done * events / elapsed,
            "requests": done, "recvs_per_request": recvs / done,
            "server_us_per_request": cpu_result["server_cpu"] * wall / done * 1e6,
            "client_us_per_request": cpu_result["client_cpu"] * wall / done * 1e6,
            "issued_measured": i - i0, "cpu": cpu_result}


def digest(counter, reply: bytes, chunk: int, min_seconds: float) -> float:
    """Replies per second the counting code gets through in-process: ``reply`` fed
    in ``chunk``-byte pieces, no socket."""
    chunk = max(1, chunk)
    size = len(reply)
    feed = counter.feed
    reps = 0
    t0 = time.perf_counter()
    while True:
        counter.reset()
        done = False
        for off in range(0, size, chunk):
            done = feed(reply, off, min(off + chunk, size))
        if not done:
            raise RuntimeError("the captured reply did not complete its counter")
        reps += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return reps / elapsed


class FakeServer:
    """A stand-in server for the client's ceiling: a forked child answering every recv
    it gets (the measured loops send one request at a time) with one canned reply. It
    has the ``port`` and ``cpu_seconds`` that the measuring code uses."""

    def __init__(self, reply: bytes) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, 0))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: serve until killed, never return into the caller
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                while True:
                    conn, _ = listener.accept()
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    try:
                        while conn.recv(65536):
                            conn.sendall(reply)
                    except OSError:
                        pass
                    finally:
                        conn.close()
            finally:
                os._exit(0)
        listener.close()
        self.pid = pid

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)


# -- loading ----------------------------------------------------------------------------------

def pipeline(port: int, batches: Iterator[tuple[bytes, int]], conns: int, limit: float) -> int:
    """Send ``batches`` (request bytes, newlines in their replies) over ``conns``
    connections, one batch in flight on each; returns the number of batches sent."""
    socks = [connect(port) for _ in range(conns)]
    ep = select.epoll()
    buf = bytearray(1 << 20)
    pending = [0] * conns
    sent = 0
    try:
        index = {}
        for i, sock in enumerate(socks):
            ep.register(sock.fileno(), select.EPOLLIN)
            index[sock.fileno()] = i

        def issue(i: int) -> None:
            nonlocal sent
            batch = next(batches, None)
            if batch is not None:
                socks[i].sendall(batch[0])
                pending[i] = batch[1]
                sent += 1

        for i in range(conns):
            issue(i)
        deadline = time.perf_counter() + limit
        while any(pending):
            for fd, _ in ep.poll(1.0):
                i = index[fd]
                n = socks[i].recv_into(buf)
                if not n:
                    raise ConnectionError("a server closed a loading connection")
                if buf.startswith(b"-", 0, n):
                    raise RuntimeError(f"error while loading: {bytes(buf[:min(n, 200)])!r}")
                pending[i] -= buf.count(b"\n", 0, n)
                if pending[i] <= 0:
                    if pending[i] < 0:
                        raise RuntimeError("more reply lines than requests while loading")
                    issue(i)
            if time.perf_counter() > deadline:
                raise TimeoutError(f"loading hit its {limit}s limit")
    finally:
        ep.close()
        close_all(socks)
    return sent


def batched(requests: Iterator[bytes], size: int, lines: int) -> Iterator[tuple[bytes, int]]:
    """``size`` requests per batch, each answered with ``lines`` lines."""
    batch = []
    for request in requests:
        batch.append(request)
        if len(batch) == size:
            yield b"".join(batch), lines * size
            batch = []
    if batch:
        yield b"".join(batch), lines * len(batch)


def meilies_info(port: int) -> dict:
    c = Client(port)
    try:
        text = c.call("INFO").decode()
    finally:
        c.close()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def check_meilies(port: int, counts: dict[bytes, int]) -> None:
    """INFO's ``events`` and each stream's last number must match what was sent."""
    info = meilies_info(port)
    if int(info["events"]) != sum(counts.values()):
        raise RuntimeError(f"meilies stored {info['events']} events, sent "
                           f"{sum(counts.values())}")
    c = Client(port)
    try:
        for stream, n in counts.items():
            reply = c.call("last-event-number", stream)
            if reply[2] != n - 1:
                raise RuntimeError(f"meilies {stream!r} ends at {reply[2]}, expected {n - 1}")
    finally:
        c.close()


def check_redis(port: int, counts: dict[bytes, int]) -> None:
    c = Client(port)
    try:
        for stream, n in counts.items():
            got = c.call("XLEN", stream)
            if got != n:
                raise RuntimeError(f"redis {stream!r} holds {got} entries, sent {n}")
    finally:
        c.close()


def load_alternating(server, pattern: list[bytes], total: int, depth: int, conns: int,
                     limit: float) -> tuple[dict[bytes, int], float]:
    """Publish ``total`` events one request each, cycling through ``pattern`` (in which
    no stream follows itself, nor the last the first) in batches of ``depth``; returns
    the events per stream and the publishes/s."""
    assert all(a != b for a, b in zip(pattern, pattern[1:] + pattern[:1]))
    assert depth % len(pattern) == 0
    requests = [command(b"publish", s, EVENT_NAME, DATA) for s in pattern]
    full = b"".join(requests) * (depth // len(pattern))
    counts = dict.fromkeys(pattern, 0)
    per_round = {s: pattern.count(s) for s in pattern}
    rounds, rest = divmod(total, len(pattern))
    for s in pattern:
        counts[s] = per_round[s] * rounds
    for s in pattern[:rest]:
        counts[s] += 1

    def batches():
        left = total
        while left >= depth:
            yield full, depth
            left -= depth
        # the rest is a prefix of the cycle, which every full batch ends where it began
        if left:
            yield b"".join(requests[k % len(pattern)] for k in range(left)), left

    t = time.perf_counter()
    pipeline(server.port, batches(), conns, limit)
    return counts, total / (time.perf_counter() - t)


#: Connections publishing ``run`` in catchup_singles, one request in flight each.
RUN_CONNS = 8


def load_one_stream(server, stream: bytes, total: int, conns: int, limit: float) -> float:
    """Publish ``total`` events to ``stream``, one request in flight per connection (so
    one record per event); returns the publishes/s."""
    request = command(b"publish", stream, EVENT_NAME, DATA)
    t = time.perf_counter()
    pipeline(server.port, ((request, 1) for _ in range(total)), conns, limit)
    return total / (time.perf_counter() - t)


def load_redis(server, counts: dict[bytes, int], limit: float) -> float:
    """XADD ``counts[key]`` entries to each key; returns entries/s."""
    def requests():
        for key, n in counts.items():
            request = command(b"XADD", key, b"*", EVENT_NAME, DATA)
            for _ in range(n):
                yield request
    t = time.perf_counter()
    pipeline(server.port, batched(requests(), 256, 2), 2, limit)
    rate = sum(counts.values()) / (time.perf_counter() - t)
    check_redis(server.port, counts)
    return rate


def memory_kb(pid: int) -> dict:
    """VmRSS is RssAnon (heap) + RssFile (here mostly the mapped segments) + RssShmem."""
    return {key.lower() + "_kb": proc_status_kb(pid, key)
            for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def memory_probe(server, request: bytes, counter, limit: float) -> dict:
    """One more request, untimed, sampling the server's RssAnon and RssFile after every
    recv: how much of the growth is heap (a reply held) and how much mapped file."""
    sock = connect(server.port)
    buf = bytearray(RECV_SIZE)
    counter.reset()
    before = memory_kb(server.pid)
    peak_anon, peak_file, samples = before["rssanon_kb"], before["rssfile_kb"], 0
    try:
        sock.sendall(request)
        deadline = time.perf_counter() + limit
        while True:
            n = sock.recv_into(buf)
            if not n:
                raise ConnectionError("the server closed the connection")
            samples += 1
            peak_anon = max(peak_anon, proc_status_kb(server.pid, "RssAnon"))
            peak_file = max(peak_file, proc_status_kb(server.pid, "RssFile"))
            if counter.feed(buf, 0, n):
                break
            if time.perf_counter() > deadline:
                raise TimeoutError("the memory probe took longer than the loop limit")
    finally:
        close_all([sock])
    return {"rssanon_before_mb": round(before["rssanon_kb"] / 1024, 1),
            "rssanon_peak_mb": round(peak_anon / 1024, 1),
            "rssanon_growth_mb": round((peak_anon - before["rssanon_kb"]) / 1024, 1),
            "rssfile_before_mb": round(before["rssfile_kb"] / 1024, 1),
            "rssfile_peak_mb": round(peak_file / 1024, 1),
            "samples": samples}


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current VmRSS (Linux: ``5`` to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def start_pair(workdir: Path, tag: str) -> dict:
    log(f"{tag}: starting servers (fsync no)")
    servers = {}
    servers["meilies"] = start_meilies(workdir, "no", tag)
    servers["redis"] = start_redis(workdir, "no", tag)
    return servers


def orders(runs: int) -> Iterator[tuple[int, tuple[str, str]]]:
    for run in range(runs):
        yield run, (("meilies", "redis") if run % 2 == 0 else ("redis", "meilies"))


ALL_CPUS = sorted(os.sched_getaffinity(0))


def place(server_pid: int, mode: str) -> None:
    """Pin this client and a server: ``same`` core, ``split`` over two cores, or ``none``
    (both may run anywhere, the scheduler decides)."""
    first, second = ALL_CPUS[0], ALL_CPUS[-1]
    if mode == "none":
        client, server = set(ALL_CPUS), set(ALL_CPUS)
    elif mode == "same":
        client, server = {first}, {first}
    else:
        client, server = {first}, {second}
    os.sched_setaffinity(0, client)
    os.sched_setaffinity(server_pid, server)


def loopback(fake_reply: bytes, measure, times: int, key: str,
             pin: str | None = None) -> tuple[float, dict]:
    """Run ``measure(fake)`` ``times`` against a FakeServer answering ``fake_reply``;
    the median of ``key`` and the cpu of the median run."""
    fake = FakeServer(fake_reply)
    if pin is not None:
        place(fake.pid, pin)
    try:
        results = [measure(fake) for _ in range(times)]
    finally:
        fake.stop()
    mid = median_run(results, key)
    return median([r[key] for r in results]), mid.get("cpu")


# -- aggregate --------------------------------------------------------------------------------

def scenario_aggregate(cfg: Settings, workdir: Path, results: dict, cpu_notes: dict) -> None:
    streams, per = cfg.agg_streams, cfg.agg_events
    names = [b"agg-%d" % i for i in range(streams)]
    servers = start_pair(workdir, "aggregate")
    # The same server with its frame cache off (every range assembled from the log):
    # what an aggregate read for the first time costs, or one the cache has let go.
    servers["meilies_uncached"] = start_meilies(workdir, "no", "aggregate-uncached",
                                                extra=["--range-cache-size", "0"])
    try:
        log(f"aggregate: preloading {streams:,} streams of {per} events")
        append_args = [EVENT_NAME, DATA] * per
        rates = {}
        for kind in ("meilies", "meilies_uncached"):
            t = time.perf_counter()
            pipeline(servers[kind].port,
                     batched((command(b"append", s, b"any", *append_args) for s in names),
                             20, 1),
                     2, cfg.loop_limit)
            rates[kind] = streams * per / (time.perf_counter() - t)
            check_meilies(servers[kind].port, dict.fromkeys(names, per))
        m_rate = rates["meilies"]
        r_rate = load_redis(servers["redis"], dict.fromkeys(names, per), cfg.loop_limit)
        log(f"aggregate: preloaded at {m_rate:,.0f} (meilies, appends of {per}) and "
            f"{r_rate:,.0f} (redis, XADD) events/s")

        rng = random.Random(20240611)
        picks = [rng.randrange(streams) for _ in range(4096)]
        requests = {"meilies": [command(b"range", names[i], b"-", b"+") for i in picks],
                    "redis": [command(b"XRANGE", names[i], b"-", b"+") for i in picks]}
        requests["meilies_uncached"] = requests["meilies"]
        counters = {"meilies": lambda: FullFrames(per), "redis": lambda: RedisReply(per),
                    "meilies_uncached": lambda: FullFrames(per)}

        def measure(kind, server):
            return request_loop(server, requests[kind], counters[kind](), per,
                                cfg.agg_seconds, cfg.agg_warmup, cfg.loop_limit)

        runs = {"meilies": [], "redis": [], "meilies_uncached": []}
        for run, order in orders(cfg.runs):
            for kind in (*order, "meilies_uncached"):
                place(servers[kind].pid, cfg.pin)
                r = measure(kind, servers[kind])
                runs[kind].append(r)
                log(f"aggregate run {run + 1} {kind}: {r['requests_per_s']:,.0f} requests/s "
                    f"({r['events_per_s']:,.0f} events/s, {r['recvs_per_request']:.2f} recvs "
                    f"per reply; server {r['server_us_per_request']:.1f} us, client "
                    f"{r['client_us_per_request']:.1f} us of CPU per request) cpu {r['cpu']}")

        ceiling = {}
        for kind in ("meilies", "redis"):
            request = requests[kind][0]
            captured = one_request(servers[kind], request, counters[kind](), cfg.loop_limit,
                                   capture=True)
            reply = captured["reply"]
            chunk = -(-len(reply) // max(1, round(median_run(runs[kind], "requests_per_s")
                                                  ["recvs_per_request"])))
            in_proc = digest(counters[kind](), reply, chunk, cfg.ceiling_seconds)
            fake_rate, fake_cpu = loopback(
                reply, lambda fake, k=kind: request_loop(
                    fake, [request], counters[k](), per, cfg.agg_seconds, cfg.agg_warmup,
                    cfg.loop_limit),
                min(cfg.runs, 3), "requests_per_s", pin=cfg.pin)
            ceiling[kind] = {"reply_bytes": len(reply),
                             "in_process_requests_per_s": round(in_proc, 1),
                             "loopback_requests_per_s": round(fake_rate, 1),
                             "loopback_cpu": fake_cpu}
            log(f"aggregate: client ceiling ({kind} replies of {len(reply):,} bytes): "
                f"{in_proc:,.0f} replies/s counted in-process, {fake_rate:,.0f} requests/s "
                f"against a stand-in server (cpu {fake_cpu})")
    finally:
        os.sched_setaffinity(0, set(ALL_CPUS))
        for s in servers.values():
            s.stop()
    m, rd = runs["meilies"], runs["redis"]
    cpu_notes["aggregate"] = {"meilies": median_run(m, "requests_per_s")["cpu"],
                              "redis": median_run(rd, "requests_per_s")["cpu"]}
    results["aggregate"] = {
        "streams": streams, "events_per_stream": per, "seconds": cfg.agg_seconds,
        "requests_per_s": summarize("aggregate.requests_per_s", m, rd, "requests_per_s", 1),
        "events_per_s": summarize("aggregate.events_per_s", m, rd, "events_per_s", 1),
        "server_cpu_us_per_request": summarize("aggregate.server_cpu_us_per_request", m, rd,
                                               "server_us_per_request", 1),
        "client_cpu_us_per_request": summarize("aggregate.client_cpu_us_per_request", m, rd,
                                               "client_us_per_request", 1),
        "uncached": {
            "meilies": "--range-cache-size 0: every range assembled from the log",
            "requests_per_s": summarize("aggregate.uncached.requests_per_s",
                                        runs["meilies_uncached"], rd, "requests_per_s", 1),
            "server_cpu_us_per_request": summarize(
                "aggregate.uncached.server_cpu_us_per_request", runs["meilies_uncached"], rd,
                "server_us_per_request", 1),
        },
        "placement": cfg.pin,
        "preload_events_per_s": figure(m_rate, r_rate, 1),
        "cpu": cpu_notes["aggregate"],
        "client_ceiling": ceiling,
    }


# -- catch-up of events published one at a time -----------------------------------------------

def scenario_catchup(cfg: Settings, workdir: Path, results: dict, cpu_notes: dict) -> None:
    total = cfg.catchup_events
    alternating = total // 2
    pattern = []
    for j in range(15):
        pattern += [b"solo", b"c-%d" % j]
    servers = start_pair(workdir, "catchup")
    try:
        log(f"catchup_singles: publishing {alternating:,} events one request each into "
            f"meilies ({cfg.catchup_conns} connections, depth {cfg.catchup_depth}, streams "
            f"alternating)")
        counts, m_rate = load_alternating(servers["meilies"], pattern, alternating,
                                          cfg.catchup_depth, cfg.catchup_conns,
                                          cfg.loop_limit)
        solo = counts[b"solo"]
        own = total - alternating
        log(f"catchup_singles: meilies took {m_rate:,.0f} publishes/s; publishing {own:,}"
            f" into run ({RUN_CONNS} connections, depth 1)")
        own_rate = load_one_stream(servers["meilies"], b"run", own, RUN_CONNS, cfg.loop_limit)
        counts[b"run"] = own
        check_meilies(servers["meilies"].port, counts)
        log(f"catchup_singles: meilies took {own_rate:,.0f} publishes/s; loading redis "
            f"(all: {total:,}, solo: {solo:,}, run: {own:,})")
        r_rate = load_redis(servers["redis"], {b"all": total, b"solo": solo, b"run": own},
                            cfg.loop_limit)
        log(f"catchup_singles: redis loaded at {r_rate:,.0f} XADD/s")

        confirm_all = b"*2\r\n+subscribed\r\n+$all\r\n"
        frames_all = sum(meilies_frames_total(s, EVENT_NAME, 0, n, DATA_LEN)
                         for s, n in counts.items())
        tail = b"\r\n+%s\r\n$%d\r\n%s\r\n" % (EVENT_NAME, DATA_LEN, DATA)

        def one_stream(name: bytes, events: int):
            confirm = b"*2\r\n+subscribed\r\n+%s\r\n" % name
            frames = meilies_frames_total(name, EVENT_NAME, 0, events, DATA_LEN)
            return (events, name, command(b"subscribe", name + b":0"),
                    lambda: ByteCount(len(confirm) + frames,
                                      confirm + EVENT_FRAME + name + b"\r\n:0\r\n",
                                      b":%d" % (events - 1) + tail))

        cases = {
            "all": (total, b"all", command(b"subscribe", b"$all@0"),
                    lambda: ByteCount(len(confirm_all) + frames_all,
                                      confirm_all + EVENT_FRAME, tail)),
            "one_stream": one_stream(b"solo", solo),
            "own_stream": one_stream(b"run", own),
        }

        def measure(kind, server, case):
            events, key, request, counter = cases[case]
            if kind == "meilies":
                r = one_request(server, request, counter(), cfg.loop_limit)
                r["bytes"] = counter().expected
            else:
                r = replay_redis(server, key, events, cfg.page, cfg.loop_limit)
            r["events_per_s"] = events / r["seconds"]
            r["mb_per_s"] = r["bytes"] / r["seconds"] / 1e6
            return r

        runs = {(k, c): [] for k in ("meilies", "redis") for c in cases}
        for run, order in orders(cfg.runs):
            for kind in order:
                for case in cases:
                    r = measure(kind, servers[kind], case)
                    runs[(kind, case)].append(r)
                    log(f"catchup_singles {case} run {run + 1} {kind}: "
                        f"{r['events_per_s']:,.0f} events/s, {r['mb_per_s']:.1f} MB/s "
                        f"({r['seconds']:.2f} s) cpu {r['cpu']}")

        # The client's ceiling, on the $all case.
        events, key, request, counter = cases["all"]
        m_mid = median_run(runs[("meilies", "all")], "events_per_s")
        captured = one_request(servers["meilies"], request, counter(), cfg.loop_limit,
                               capture=True)
        m_reply = captured["reply"]
        m_in_proc = digest(counter(), m_reply, -(-len(m_reply) // m_mid["recvs"]),
                           cfg.ceiling_seconds) * events
        m_fake, m_fake_cpu = loopback(
            m_reply, lambda fake: one_request(fake, request, counter(), cfg.loop_limit),
            min(cfg.runs, 3), "seconds")
        m_fake = events / m_fake
        del captured, m_reply
        page = min(cfg.page, events)
        r_page = one_request(servers["redis"],
                             command(b"XRANGE", key, b"-", b"+", b"COUNT", page),
                             RedisReply(page), cfg.loop_limit, capture=True)
        r_reply = r_page["reply"]
        r_in_proc = digest(RedisReply(page), r_reply, -(-len(r_reply) // r_page["recvs"]),
                           cfg.ceiling_seconds) * page
        r_fake, r_fake_cpu = loopback(
            r_reply, lambda fake: replay_redis(fake, key, events, page, cfg.loop_limit),
            min(cfg.runs, 3), "events_per_s")
        ceiling = {
            "meilies": {"in_process_events_per_s": round(m_in_proc, 1),
                        "loopback_events_per_s": round(m_fake, 1), "loopback_cpu": m_fake_cpu},
            "redis": {"in_process_events_per_s": round(r_in_proc, 1),
                      "loopback_events_per_s": round(r_fake, 1), "loopback_cpu": r_fake_cpu},
        }
        log(f"catchup_singles: client ceiling: meilies $all {m_in_proc:,.0f} events/s counted "
            f"in-process, {m_fake:,.0f} events/s from a stand-in server; redis pages "
            f"{r_in_proc:,.0f} in-process, {r_fake:,.0f} from a stand-in server")
    finally:
        for s in servers.values():
            s.stop()
    out = {"events": total, "events_in_one_stream": solo, "events_in_own_stream": own,
           "published": f"one publish per event: {alternating:,} by {cfg.catchup_conns}"
                        f" connections pipelining {cfg.catchup_depth}, alternating solo with"
                        f" c-0..c-14, then {own:,} to run by {RUN_CONNS} connections at"
                        " depth 1",
           "preload_events_per_s": figure(m_rate, r_rate, 1),
           "run_preload_events_per_s": round(own_rate, 1)}
    for case in cases:
        m, rd = runs[("meilies", case)], runs[("redis", case)]
        name = f"catchup_singles.{case}"
        cpu_notes[name] = {"meilies": median_run(m, "events_per_s")["cpu"],
                           "redis": median_run(rd, "events_per_s")["cpu"]}
        out[case] = {
            "meilies": ("subscribe $all@0" if case == "all"
                        else f"subscribe {cases[case][1].decode()}:0"),
            "redis": f"XRANGE {cases[case][1].decode()} pages of {cfg.page}",
            "events": cases[case][0],
            "events_per_s": summarize(f"{name}.events_per_s", m, rd, "events_per_s", 1),
            "mb_per_s": summarize(f"{name}.mb_per_s", m, rd, "mb_per_s", 2),
            "cpu": cpu_notes[name],
        }
    out["client_ceiling"] = {"case": "all", **ceiling}
    results["catchup_singles"] = out


# -- one big range ----------------------------------------------------------------------------

def scenario_range_big(cfg: Settings, workdir: Path, results: dict, cpu_notes: dict) -> None:
    n = cfg.big_events
    servers = start_pair(workdir, "range-big")
    try:
        log(f"range_big: publishing {n:,} events to 'big' one request each, alternating "
            f"with 'other'")
        counts, m_rate = load_alternating(servers["meilies"], [b"big", b"other"], 2 * n, 64,
                                          4, cfg.loop_limit)
        check_meilies(servers["meilies"].port, counts)
        r_rate = load_redis(servers["redis"], {b"big": n}, cfg.loop_limit)
        requests = {"meilies": command(b"range", b"big", b"-", b"+", b"COUNT", n),
                    "redis": command(b"XRANGE", b"big", b"-", b"+", b"COUNT", n)}
        counters = {"meilies": lambda: FullFrames(n), "redis": lambda: RedisReply(n)}
        time.sleep(0.5)
        memory = {k: {"before_first_range": memory_kb(s.pid)} for k, s in servers.items()}
        runs = {"meilies": [], "redis": []}
        peak_reset = True
        for run, order in orders(cfg.runs):
            for kind in order:
                server = servers[kind]
                before = proc_status_kb(server.pid, "VmRSS")
                peak_reset = reset_peak(server.pid) and peak_reset
                r = one_request(server, requests[kind], counters[kind](), cfg.loop_limit)
                r["peak_kb"] = proc_status_kb(server.pid, "VmHWM")
                r["rss_before_kb"] = before
                r["rss_after_kb"] = proc_status_kb(server.pid, "VmRSS")
                r["peak_growth_mb"] = (r["peak_kb"] - before) / 1024
                r["events_per_s"] = n / r["seconds"]
                runs[kind].append(r)
                log(f"range_big run {run + 1} {kind}: {r['events_per_s']:,.0f} events/s "
                    f"({r['seconds']:.3f} s); VmRSS {before / 1024:.1f} MB before, peak "
                    f"{r['peak_kb'] / 1024:.1f} MB during, {r['rss_after_kb'] / 1024:.1f} MB "
                    f"after; cpu {r['cpu']}")
        for kind, s in servers.items():
            memory[kind]["after_last_range"] = memory_kb(s.pid)
            memory[kind]["sampled"] = memory_probe(s, requests[kind], counters[kind](),
                                                   cfg.loop_limit)
            log(f"range_big: {kind} heap (RssAnon) {memory[kind]['sampled']}")

        ceiling = {}
        for kind in ("meilies", "redis"):
            reply = one_request(servers[kind], requests[kind], counters[kind](),
                                cfg.loop_limit, capture=True)["reply"]
            memory[kind]["reply_mb"] = round(len(reply) / 2 ** 20, 1)
            mid = median_run(runs[kind], "events_per_s")
            in_proc = digest(counters[kind](), reply, -(-len(reply) // mid["recvs"]),
                             cfg.ceiling_seconds) * n
            fake_s, fake_cpu = loopback(
                reply, lambda fake, k=kind: one_request(fake, requests[k], counters[k](),
                                                        cfg.loop_limit),
                min(cfg.runs, 3), "seconds")
            ceiling[kind] = {"in_process_events_per_s": round(in_proc, 1),
                             "loopback_events_per_s": round(n / fake_s, 1),
                             "loopback_cpu": fake_cpu}
            log(f"range_big: client ceiling ({kind}): {in_proc:,.0f} events/s counted "
                f"in-process, {n / fake_s:,.0f} events/s from a stand-in server")
    finally:
        for s in servers.values():
            s.stop()
    m, rd = runs["meilies"], runs["redis"]
    cpu_notes["range_big"] = {"meilies": median_run(m, "events_per_s")["cpu"],
                              "redis": median_run(rd, "events_per_s")["cpu"]}
    for kind, rs in runs.items():
        memory[kind]["peak_during_reply_mb"] = round(median([r["peak_kb"] for r in rs]) / 1024,
                                                     1)
        memory[kind]["peak_growth_mb"] = round(median([r["peak_growth_mb"] for r in rs]), 1)
        memory[kind]["first_run_peak_growth_mb"] = round(rs[0]["peak_growth_mb"], 1)
    results["range_big"] = {
        "events": n,
        "published": "one publish per event, alternating big and other",
        "events_per_s": summarize("range_big.events_per_s", m, rd, "events_per_s", 1),
        "seconds": summarize("range_big.seconds", m, rd, "seconds", 4),
        "peak_growth_mb": summarize("range_big.peak_growth_mb", m, rd, "peak_growth_mb", 1),
        "memory": {**memory, "peak_reset_per_run": peak_reset,
                   "note": "peak = VmHWM after resetting it (clear_refs) just before each "
                           "request; peak_growth = peak - VmRSS before the request; "
                           "before_first_range/after_last_range: /proc/<pid>/status (VmHWM "
                           "there is since the last reset); VmRSS counts mapped segment "
                           "pages (RssFile) as well as heap (RssAnon): 'sampled' is one more, "
                           "untimed request with RssAnon/RssFile read after every recv, the "
                           "heap growth being what a held reply would show in"},
        "preload_events_per_s": figure(m_rate, r_rate, 1),
        "cpu": cpu_notes["range_big"],
        "client_ceiling": ceiling,
    }


# -- targets and main -------------------------------------------------------------------------

def targets(results: dict) -> dict:
    out = {}

    def add(name, text, value, ok):
        out[name] = {"target": text, "value": None if value is None else round(value, 3),
                     "met": None if value is None else bool(ok(value))}

    if "aggregate" in results:
        add("aggregate_load", "MeiliES range requests/s >= Redis XRANGE (ratio >= 1)",
            results["aggregate"]["requests_per_s"]["ratio"], lambda v: v >= 1.0)
    if "catchup_singles" in results:
        for case in ("all", "one_stream"):
            add(f"catchup_singles_{case}", "MeiliES catch-up >= 2x Redis XRANGE pages "
                "(ratio >= 2)", results["catchup_singles"][case]["events_per_s"]["ratio"],
                lambda v: v >= 2.0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (smoke run)")
    parser.add_argument("--runs", type=int, default=None,
                        help="median of N runs per figure (default 5; 1 with --quick)")
    parser.add_argument("--only", choices=SCENARIOS, action="append",
                        help="run only this scenario (repeatable)")
    parser.add_argument("--pin", choices=("same", "split", "none"), default="same",
                        help="aggregate: client and server on the same core (default), on "
                             "two cores, or left to the scheduler")
    args = parser.parse_args()
    if args.runs is None:
        args.runs = 1 if args.quick else 5
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if not redis_available():
        print("bench_reads: /usr/bin/redis-server is missing: the figures are ratios to "
              "Redis, so there is nothing to compare against (apt-get install redis-server)",
              file=sys.stderr)
        return 2
    stop_on_sigterm()
    if len(ALL_CPUS) < 2 and args.pin == "split":
        parser.error("--pin split needs two CPUs")
    cfg = Settings(args.quick, args.runs, args.pin)
    chosen = args.only or list(SCENARIOS)
    results: dict = {}
    cpu_notes: dict = {}
    workdir = Path(tempfile.mkdtemp(prefix="meilies-bench-reads-"))
    started = time.perf_counter()
    load_before = os.getloadavg()
    try:
        failures = run_scenarios(
            {"aggregate": scenario_aggregate, "catchup_singles": scenario_catchup,
             "range_big": scenario_range_big},
            chosen, cfg, workdir, results, cpu_notes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    client = "one process, one thread, blocking sockets, replies counted not parsed"
    notes = [
        "figure = {meilies, redis, ratio = meilies/redis}; median over runs, which "
        "alternate the server that goes first; both servers with fsync off",
        "aggregate: one connection, one request at a time, a random stream of 50 "
        "100-byte events each time; client and server pinned per --pin "
        f"({cfg.pin}); *_cpu_us_per_request: CPU time per request (lower is better)",
        "catchup_singles: events published one request each (one record each on "
        "MeiliES); MB/s counts wire bytes received",
        "range_big: memory in MB from /proc/<pid>/status; lower is better",
        "cpu: share of one core used by the client process and the server over the "
        "measured interval (the run with the median throughput); /proc counts CPU "
        "in 10 ms ticks, so over intervals under ~0.5 s (catch-ups with --quick) "
        "these shares are coarse",
        "client_ceiling: in_process = the captured reply through the same counting "
        "code, no socket; loopback = the same measured loop against a forked "
        "stand-in server that only sends the captured reply",
        "runs: every run's value behind each median, in run order",
    ]
    report = {
        "meta": report_meta("tools/bench_reads.py", cfg, started, load_before, client, notes),
        **results,
        "targets": targets(results),
        "cpu": cpu_notes,
        "runs": RAW,
    }
    if failures:
        report["failures"] = failures
    print(json.dumps(report, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
