#!/usr/bin/env python3
"""Server benchmark: MeiliES over RESP against Redis Streams, side by side. Prints JSON.

    python3 tools/bench_server.py                  # everything, median of 3 runs
    python3 tools/bench_server.py --quick          # smaller counts, 1 run: a smoke run (< 1 min)
    python3 tools/bench_server.py --runs 5 --only replay

Not a test: figures only, nothing asserted (but every run checks that what it sent
was stored and what it received was complete, and says so if not). Progress goes to
stderr, the JSON to stdout. Every figure is ``{"meilies": x, "redis": y, "ratio":
x / y}``; for latencies and memory lower is better, so a ratio under 1 is a win.

Scenarios (``--only``):

* ``publish``: 4 connections publishing 100-byte events at pipeline depth 1 and 64,
  under fsync always / everysec / no (Redis: ``XADD s * ev <data>`` with the same
  ``appendfsync``); events/s and, at depth 1, ack latency p50/p99.
* ``replay``: one subscriber catching up on 1,000,000 stored 100-byte events
  (``subscribe s:0:1000000``; Redis: ``XRANGE s (<last-id> + COUNT 10000`` pages);
  events/s and MB/s of wire bytes received. The events are published by 2 connections
  pipelining 256 each (MeiliES stores a read's run of publishes as one record, sent
  as one slice); ``replay_published_singly`` replays 200,000 published one at a time
  by 4 connections (a record each), for comparison.
* ``fanout``: one publisher (pipelined, depth 64) and 100 live subscribers of one
  stream (Redis: ``XREAD COUNT 1000 BLOCK 0 STREAMS s <last-id>`` loops); delivered
  events/s over all subscribers and publish-to-delivery latency p50/p99, at full
  speed and at a paced 200 events/s.
* ``idle``: 10,000 connections each subscribed to a stream of its own (Redis: each
  blocked in ``XREAD BLOCK 0 STREAMS s-<i> $``); the server's VmRSS.

Client design. The machine this was written on has 2 cores and the servers are
single-threaded, so the client is one process, one thread, driving every socket
through ``selectors`` (epoll): one core for the server, one for the client, and no
context switches between client threads or GIL hand-offs. The client does as little
as it can per event: publish replies are counted by their newlines
(``bytearray.count``), a MeiliES subscriber counts bytes against the exact total its
frames must add up to (computed from the frame layout), a Redis reader counts the
``$100`` data headers of its entries (one per entry) to know when a reply is complete
and pulls the last ID out with two ``rfind``s. Latency samples are taken by one
regular expression over each chunk received (both servers, same code). The CPU time
of the client and of the server over each measurement is reported under ``cpu`` so
that a figure limited by the client can be told apart from one limited by the server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import select
import selectors
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (RAW, Client, close_all, command, connect, figure,  # noqa: E402
                          log, median_run, meilies_frames_total, percentile, redis_available,
                          report_meta, run_scenarios, start_meilies, start_redis,
                          stop_on_sigterm, summarize)

SCENARIOS = ("publish", "replay", "fanout", "idle")
FSYNC_POLICIES = ("always", "everysec", "no")
DATA_LEN = 100
EVENT_NAME = b"ev"
RECV_SIZE = 4 * 1024 * 1024
#: One per entry in a Redis stream reply: the header of the 100-byte data bulk.
REDIS_DATA_MARK = b"\r\n$%d\r\n" % DATA_LEN
#: A timestamped payload: ``T`` + 19-digit perf_counter_ns + padding to 100 bytes.
TS_RE = re.compile(rb"\$100\r\nT(\d{19})")
TS_PAD = b"y" * (DATA_LEN - 20)


#: Every run's value behind each figure, for the "runs" section of the report.


class Settings:
    def __init__(self, quick: bool, runs: int) -> None:
        self.quick = quick
        self.runs = runs
        self.publish_seconds = 1.0 if quick else 3.0
        self.publish_warmup = 0.2 if quick else 0.5
        self.publish_conns = 4
        self.replay_events = 100_000 if quick else 1_000_000
        self.replay_single_events = 50_000 if quick else 200_000
        self.replay_page = 10_000
        self.fanout_subscribers = 100
        self.fanout_probes = 10
        self.fanout_events = 5_000 if quick else 20_000
        self.fanout_depth = 64
        self.fanout_read_count = 1000
        self.fanout_paced_rate = 200
        self.fanout_paced_seconds = 1.0 if quick else 3.0
        self.idle_connections = 1_000 if quick else 10_000
        self.idle_batch = 500
        self.loop_limit = 120.0 if quick else 300.0  # seconds any one measured loop may take


class Cpu:
    """CPU used by the client (this process) and a server over an interval."""

    def __init__(self, server) -> None:
        self.server = server
        self.wall = time.perf_counter()
        self.client = time.process_time()
        self.srv = server.cpu_seconds()

    def done(self) -> dict:
        wall = time.perf_counter() - self.wall
        return {"wall_s": round(wall, 3),
                "client_cpu": round((time.process_time() - self.client) / wall, 3),
                "server_cpu": round((self.server.cpu_seconds() - self.srv) / wall, 3)}


def stored_count(kind: str, port: int, stream: bytes) -> int:
    c = Client(port)
    try:
        if kind == "meilies":
            reply = c.call("last-event-number", stream)
            return 0 if reply[2] is None else reply[2] + 1
        return c.call("XLEN", stream)
    finally:
        c.close()


# -- publish ----------------------------------------------------------------------------------

def publish_request(kind: str, stream: bytes, data: bytes) -> tuple[bytes, int]:
    """The request and how many newlines its reply has (``+OK`` / ``$n id``)."""
    if kind == "meilies":
        return command(b"publish", stream, EVENT_NAME, data), 1
    return command(b"XADD", stream, b"*", EVENT_NAME, data), 2


def run_publish(kind: str, server, stream: bytes, depth: int, conns: int, seconds: float,
                warmup: float, max_events: int, limit: float) -> dict:
    """``conns`` connections each send ``depth`` requests, wait for all replies, repeat.

    Counts the events acknowledged between the end of the warm-up and the end; ack
    latency per batch (at depth 1, per request).
    """
    request, nl = publish_request(kind, stream, b"x" * DATA_LEN)
    batch = request * depth
    socks = [connect(server.port) for _ in range(conns)]
    ep = select.epoll()
    buf = bytearray(1 << 20)
    pending = [0] * conns
    sent_at = [0.0] * conns
    issued = 0
    latencies: list[float] = []
    counted = 0
    cpu = cpu_result = None
    try:
        start = time.perf_counter()
        t0 = start + warmup
        t_end = t0 + seconds
        hard_end = start + limit

        def issue(i: int, now: float) -> None:
            nonlocal issued
            n = min(depth, max_events - issued)
            if n <= 0 or now >= t_end:
                return
            socks[i].sendall(batch if n == depth else request * n)
            issued += n
            pending[i] = n * nl
            sent_at[i] = now

        index = {}
        for i, sock in enumerate(socks):
            ep.register(sock.fileno(), select.EPOLLIN)
            index[sock.fileno()] = i
        now = time.perf_counter()
        for i in range(conns):
            issue(i, now)
        poll = ep.poll
        while any(pending) and now < hard_end:
            for fd, _ in poll(1.0):
                i = index[fd]
                n = socks[i].recv_into(buf)
                if not n:
                    raise ConnectionError(f"{kind} closed a publishing connection")
                pending[i] -= buf.count(b"\n", 0, n)
                if pending[i] <= 0:
                    now = time.perf_counter()
                    if t0 <= now <= t_end:
                        counted += depth
                        if depth == 1:
                            latencies.append((now - sent_at[i]) * 1000.0)
                    issue(i, now)
            now = time.perf_counter()
            if cpu is None and now >= t0:
                cpu = Cpu(server)
            elif cpu is not None and cpu_result is None and now >= t_end:
                cpu_result = cpu.done()
        if any(pending):
            raise TimeoutError(f"{kind} publish loop hit its {limit}s limit")
    finally:
        ep.close()
        close_all(socks)
    elapsed = min(t_end, time.perf_counter()) - t0
    latencies.sort()
    return {"events_per_s": counted / elapsed if elapsed > 0 else None,
            "issued": issued,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "cpu": cpu_result}


def preload(kind: str, server, stream: bytes, count: int, limit: float, depth: int = 256,
            conns: int = 2) -> float:
    """Publish ``count`` events, ``conns`` connections pipelining ``depth`` each; returns
    events/s."""
    t = time.perf_counter()
    result = run_publish(kind, server, stream, depth=depth, conns=conns, seconds=limit,
                         warmup=0.0, max_events=count, limit=limit)
    elapsed = time.perf_counter() - t
    stored = stored_count(kind, server.port, stream)
    if stored != count:
        raise RuntimeError(f"{kind} preload stored {stored} events, expected {count}")
    del result
    return count / elapsed


def scenario_publish(cfg: Settings, workdir: Path, results: dict, cpu_notes: dict) -> None:
    out = {}
    for policy in FSYNC_POLICIES:
        log(f"publish: fsync {policy}: starting servers")
        servers = {}
        try:
            servers["meilies"] = start_meilies(workdir, policy, f"publish-{policy}")
            servers["redis"] = start_redis(workdir, policy, f"publish-{policy}")
            runs: dict[tuple, list] = {}
            for run in range(cfg.runs):
                order = ("meilies", "redis") if run % 2 == 0 else ("redis", "meilies")
                for depth in (1, 64):
                    for kind in order:
                        stream = b"s-%d-%d" % (run, depth)
                        r = run_publish(kind, servers[kind], stream, depth, cfg.publish_conns,
                                        cfg.publish_seconds, cfg.publish_warmup,
                                        max_events=10_000_000, limit=cfg.loop_limit)
                        stored = stored_count(kind, servers[kind].port, stream)
                        if stored != r["issued"]:
                            raise RuntimeError(f"{kind}: {r['issued']} publishes sent, "
                                               f"{stored} stored")
                        runs.setdefault((kind, depth), []).append(r)
                        log(f"publish: fsync {policy} depth {depth} run {run + 1} {kind}: "
                            f"{r['events_per_s']:,.0f} events/s"
                            + (f", p50 {r['p50_ms']:.3f} ms p99 {r['p99_ms']:.3f} ms"
                               if depth == 1 else "") + f" cpu {r['cpu']}")
            section = {}
            for depth in (1, 64):
                m, rd = runs[("meilies", depth)], runs[("redis", depth)]
                name = f"publish.fsync_{policy}.depth{depth}"
                section[f"depth{depth}_events_per_s"] = summarize(
                    f"{name}.events_per_s", m, rd, "events_per_s", 1)
                if depth == 1:
                    for q in ("p50", "p99"):
                        section[f"depth1_ack_{q}_ms"] = summarize(
                            f"{name}.ack_{q}_ms", m, rd, f"{q}_ms", 4)
                cpu_notes[name] = {"meilies": median_run(m, "events_per_s")["cpu"],
                                   "redis": median_run(rd, "events_per_s")["cpu"]}
            out[f"fsync_{policy}"] = section
        finally:
            for s in servers.values():
                s.stop()
    results["publish"] = out


# -- replay -----------------------------------------------------------------------------------

def replay_meilies(server, stream: bytes, count: int, limit: float) -> dict:
    """Subscribe ``stream:0:count`` and count bytes until every frame has arrived."""
    confirm = b"*2\r\n+subscribed\r\n+%s\r\n" % stream
    expected = len(confirm) + meilies_frames_total(stream, EVENT_NAME, 0, count, DATA_LEN)
    sock = connect(server.port)
    buf = bytearray(RECV_SIZE)
    received = 0
    try:
        sock.settimeout(10.0)
        cpu = Cpu(server)
        t0 = time.perf_counter()
        sock.sendall(command(b"subscribe", b"%s:0:%d" % (stream, count)))
        head = tail = b""
        deadline = t0 + limit
        recv_into = sock.recv_into
        while received < expected:
            n = recv_into(buf)
            if not n:
                raise ConnectionError("meilies closed the replaying connection")
            received += n
            if len(head) < 200:
                head += bytes(buf[:min(n, 200)])
            tail = tail[-200:] + bytes(buf[max(0, n - 200):n])
            if time.perf_counter() > deadline:
                raise TimeoutError(f"meilies replay hit its {limit}s limit")
        t1 = time.perf_counter()
        cpu_result = cpu.done()
    finally:
        close_all([sock])
    first = confirm + b"*5\r\n+event\r\n+%s\r\n:0\r\n+%s\r\n$%d\r\n" % (stream, EVENT_NAME,
                                                                     DATA_LEN)
    if received != expected or not head.startswith(first) or \
            not tail.endswith(b":%d\r\n+%s\r\n$%d\r\n%s\r\n" % (count - 1, EVENT_NAME, DATA_LEN,
                                                             b"x" * DATA_LEN)):
        raise RuntimeError(f"meilies replay: got {received} bytes, expected {expected}, "
                           f"head {head[:80]!r} tail {tail[-80:]!r}")
    seconds = t1 - t0
    return {"events_per_s": count / seconds, "mb_per_s": received / seconds / 1e6,
            "seconds": seconds, "bytes": received, "cpu": cpu_result}


class RedisEntries:
    """Incremental reader of one Redis stream reply (XRANGE: ``*K`` then K entries; XREAD:
    ``*1 *2 $name *K`` then K entries), without building objects per entry."""

    def __init__(self, header_prefix: bytes) -> None:
        self.prefix = header_prefix  # what comes before K's digits
        self.buf = bytearray()
        self.reset()

    def reset(self) -> None:
        self.buf.clear()
        self.k = None
        self.marks = 0
        self.scan = 0

    def feed(self, data) -> bool:
        """Add bytes; True when the reply is complete (then see ``k`` and ``last_id``)."""
        buf = self.buf
        buf += data
        if self.k is None:
            p = len(self.prefix)
            if buf[:1] == b"*" and buf.startswith(b"*0\r\n") and self.prefix == b"*":
                self.k = 0
                return True
            end = buf.find(b"\r\n", p)
            if end < 0:
                return False
            if not buf.startswith(self.prefix):
                raise RuntimeError(f"unexpected Redis reply {bytes(buf[:120])!r}")
            self.k = int(buf[p:end])
            self.scan = end
        self.marks += buf.count(REDIS_DATA_MARK, self.scan)
        self.scan = max(self.scan, len(buf) - len(REDIS_DATA_MARK) + 1)
        if self.marks < self.k:
            return False
        last = buf.rfind(REDIS_DATA_MARK)
        return len(buf) == last + len(REDIS_DATA_MARK) + DATA_LEN + 2

    def last_id(self) -> bytes:
        buf = self.buf
        at = buf.rfind(b"\r\n*2\r\n$%d\r\n%s\r\n" % (len(EVENT_NAME), EVENT_NAME))
        return bytes(buf[buf.rfind(b"\n", 0, at) + 1:at])


def replay_redis(server, stream: bytes, count: int, page: int, limit: float) -> dict:
    sock = connect(server.port)
    sock.settimeout(10.0)
    buf = bytearray(RECV_SIZE)
    view = memoryview(buf)
    reader = RedisEntries(b"*")
    got = 0
    received = 0
    pages = 0
    try:
        cpu = Cpu(server)
        t0 = time.perf_counter()
        deadline = t0 + limit
        start = b"-"
        while got < count:
            sock.sendall(command(b"XRANGE", stream, start, b"+", b"COUNT", page))
            pages += 1
            while True:
                n = sock.recv_into(buf)
                if not n:
                    raise ConnectionError("redis closed the replaying connection")
                received += n
                if reader.feed(view[:n]):
                    break
            if reader.k == 0:
                break
            got += reader.k
            start = b"(" + reader.last_id()
            reader.reset()
            if time.perf_counter() > deadline:
                raise TimeoutError(f"redis replay hit its {limit}s limit")
        t1 = time.perf_counter()
        cpu_result = cpu.done()
    finally:
        close_all([sock])
    if got != count:
        raise RuntimeError(f"redis replay: got {got} entries, expected {count}")
    seconds = t1 - t0
    return {"events_per_s": count / seconds, "mb_per_s": received / seconds / 1e6,
            "seconds": seconds, "bytes": received, "pages": pages, "cpu": cpu_result}


def scenario_replay(cfg: Settings, workdir: Path, results: dict, cpu_notes: dict) -> None:
    """Replay of events published in pipelines (depth 256: MeiliES stores each read's
    run of publishes as one record), the target's figure; and, beside it, of events
    published one at a time (one record each), which MeiliES cannot send as batches."""
    servers = {}
    try:
        log("replay: starting servers (fsync no)")
        servers["meilies"] = start_meilies(workdir, "no", "replay")
        servers["redis"] = start_redis(workdir, "no", "replay")
        for name, stream, count, depth, conns in (
                ("replay", b"s", cfg.replay_events, 256, 2),
                ("replay_published_singly", b"single", cfg.replay_single_events, 1, 4)):
            results[name] = _replay_figures(cfg, servers, name, stream, count, depth, conns,
                                            cpu_notes)
    finally:
        for s in servers.values():
            s.stop()


def _replay_figures(cfg: Settings, servers: dict, name: str, stream: bytes, count: int,
                    depth: int, conns: int, cpu_notes: dict) -> dict:
    preload_rate = {}
    for kind in ("meilies", "redis"):
        log(f"{name}: preloading {count:,} events into {kind} ({conns} connections, depth"
            f" {depth})")
        preload_rate[kind] = preload(kind, servers[kind], stream, count, cfg.loop_limit,
                                     depth=depth, conns=conns)
        log(f"{name}: {kind} preloaded at {preload_rate[kind]:,.0f} events/s")
    runs = {"meilies": [], "redis": []}
    for run in range(cfg.runs):
        order = ("meilies", "redis") if run % 2 == 0 else ("redis", "meilies")
        for kind in order:
            if kind == "meilies":
                r = replay_meilies(servers[kind], stream, count, cfg.loop_limit)
            else:
                r = replay_redis(servers[kind], stream, count, cfg.replay_page,
                                 cfg.loop_limit)
            runs[kind].append(r)
            log(f"{name} run {run + 1} {kind}: {r['events_per_s']:,.0f} events/s, "
                f"{r['mb_per_s']:.1f} MB/s ({r['seconds']:.2f} s) cpu {r['cpu']}")
    m, rd = runs["meilies"], runs["redis"]
    cpu_notes[name] = {"meilies": median_run(m, "events_per_s")["cpu"],
                       "redis": median_run(rd, "events_per_s")["cpu"]}
    return {
        "events": count,
        "published": f"{conns} connections, pipeline depth {depth}",
        "events_per_s": summarize(f"{name}.events_per_s", m, rd, "events_per_s", 1),
        "mb_per_s": summarize(f"{name}.mb_per_s", m, rd, "mb_per_s", 2),
        "preload_events_per_s": figure(preload_rate["meilies"], preload_rate["redis"], 1),
    }


# -- fan-out ----------------------------------------------------------------------------------

class Sub:
    __slots__ = ("sock", "probe", "received", "expected", "done", "carry", "entries",
                 "events")

    def __init__(self, sock, probe) -> None:
        self.sock = sock
        self.probe = probe
        self.received = 0
        self.expected = 0
        self.done = False
        self.carry = b""
        self.entries = None
        self.events = 0


def _latency_samples(sub: Sub, chunk, now_ns: int, out: list[float]) -> None:
    data = sub.carry + bytes(chunk)
    end = 0
    for m in TS_RE.finditer(data):
        out.append((now_ns - int(m.group(1))) / 1e6)
        end = m.end()
    sub.carry = data[max(end, len(data) - 40):]


def run_fanout(kind: str, server, stream: bytes, cfg: Settings, events: int,
               pace: float | None) -> dict:
    """One publisher, ``cfg.fanout_subscribers`` live subscribers of ``stream``.

    ``pace``: None publishes as fast as acks allow at depth ``cfg.fanout_depth``;
    otherwise one event every ``1/pace`` seconds (depth 1).
    """
    nsubs = cfg.fanout_subscribers
    socks = []
    subs: list[Sub] = []
    sel = selectors.DefaultSelector()
    latencies: list[float] = []
    buf = bytearray(RECV_SIZE)
    view = memoryview(buf)
    read_count = cfg.fanout_read_count
    xread_prefix = b"*1\r\n*2\r\n$%d\r\n%s\r\n*" % (len(stream), stream)
    try:
        pub = connect(server.port)
        socks.append(pub)
        for i in range(nsubs):
            sock = connect(server.port)
            socks.append(sock)
            subs.append(Sub(sock, i < cfg.fanout_probes))
        if kind == "meilies":
            confirm = b"*2\r\n+subscribed\r\n+%s\r\n" % stream
            for sub in subs:
                sub.sock.sendall(command(b"subscribe", stream))
            for sub in subs:
                got = b""
                while len(got) < len(confirm):
                    part = sub.sock.recv(len(confirm) - len(got))
                    if not part:
                        raise ConnectionError("meilies closed a subscriber")
                    got += part
                if got != confirm:
                    raise RuntimeError(f"meilies subscribe answered {got!r}")
                sub.expected = meilies_frames_total(stream, EVENT_NAME, 0, events, DATA_LEN)
        else:
            for sub in subs:
                sub.entries = RedisEntries(xread_prefix)
                sub.sock.sendall(command(b"XREAD", b"COUNT", read_count, b"BLOCK", b"0",
                                         b"STREAMS", stream, b"$"))
            admin = Client(server.port)
            try:
                deadline = time.monotonic() + 30
                while True:
                    info = admin.call("INFO", "clients").decode()
                    blocked = int(re.search(r"blocked_clients:(\d+)", info).group(1))
                    if blocked >= nsubs:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"only {blocked} Redis subscribers blocked")
                    time.sleep(0.01)
            finally:
                admin.close()
        for sub in subs:
            sub.sock.setblocking(False)
            sel.register(sub.sock, selectors.EVENT_READ, sub)
        sel.register(pub, selectors.EVENT_READ, None)

        prefix = (command(b"publish", stream, EVENT_NAME, b"") if kind == "meilies"
                  else command(b"XADD", stream, b"*", EVENT_NAME, b""))
        # The data bulk is last: cut its empty "$0\r\n\r\n" and put "$100\r\n<data>\r\n".
        prefix = prefix[:-len(b"$0\r\n\r\n")] + b"$%d\r\n" % DATA_LEN
        nl = 1 if kind == "meilies" else 2
        depth = 1 if pace else cfg.fanout_depth
        published = 0
        pub_pending = 0
        next_at = 0.0

        def publish_batch(now: float) -> None:
            nonlocal published, pub_pending, next_at
            n = min(depth, events - published)
            one = prefix + b"T%019d" % time.perf_counter_ns() + TS_PAD + b"\r\n"
            pub.sendall(one * n)
            published += n
            pub_pending = n * nl
            if pace:
                next_at = max(next_at + 1.0 / pace, now)

        remaining = nsubs
        published_at = None
        cpu = Cpu(server)
        t0 = time.perf_counter()
        deadline = t0 + cfg.loop_limit
        next_at = t0
        publish_batch(t0)
        now = t0
        while remaining and now < deadline:
            timeout = 1.0
            if pace and published < events and not pub_pending:
                timeout = max(0.0, next_at - time.perf_counter())
            for key, _ in sel.select(timeout=timeout):
                sub = key.data
                if sub is None:
                    n = pub.recv_into(buf)
                    if not n:
                        raise ConnectionError(f"{kind} closed the publisher")
                    pub_pending -= buf.count(b"\n", 0, n)
                    if pub_pending <= 0:
                        if published < events and not pace:
                            publish_batch(time.perf_counter())
                        elif published >= events and published_at is None:
                            published_at = time.perf_counter()
                    continue
                try:
                    n = sub.sock.recv_into(buf)
                except BlockingIOError:
                    continue
                if not n:
                    raise ConnectionError(f"{kind} closed a subscriber")
                if sub.probe:
                    _latency_samples(sub, view[:n], time.perf_counter_ns(), latencies)
                if kind == "meilies":
                    sub.received += n
                    if sub.received >= sub.expected:
                        sub.done = True
                        sub.events = events
                        remaining -= 1
                        sel.unregister(sub.sock)
                else:
                    sub.received += n
                    if sub.entries.feed(view[:n]):
                        sub.events += sub.entries.k
                        last = sub.entries.last_id()
                        sub.entries.reset()
                        if sub.events >= events:
                            sub.done = True
                            remaining -= 1
                            sel.unregister(sub.sock)
                        else:
                            sub.sock.sendall(command(b"XREAD", b"COUNT", read_count, b"BLOCK",
                                                     b"0", b"STREAMS", stream, last))
            now = time.perf_counter()
            if pace and published < events and not pub_pending and now >= next_at:
                publish_batch(now)
        t1 = time.perf_counter()
        cpu_result = cpu.done()
        if remaining:
            raise TimeoutError(f"{kind} fan-out: {remaining} subscribers incomplete after "
                               f"{cfg.loop_limit}s")
    finally:
        sel.close()
        close_all(socks)
    bad = [s for s in subs if kind == "meilies" and s.received != s.expected]
    if bad:
        raise RuntimeError(f"meilies fan-out: a subscriber got {bad[0].received} bytes, "
                           f"expected {bad[0].expected}")
    expected_samples = cfg.fanout_probes * events
    if len(latencies) != expected_samples:
        raise RuntimeError(f"{kind} fan-out: {len(latencies)} latency samples, expected "
                           f"{expected_samples}")
    latencies.sort()
    delivered = sum(s.events for s in subs)
    seconds = t1 - t0
    return {"delivered_per_s": delivered / seconds, "seconds": seconds,
            "publisher_per_s": events / (published_at - t0) if published_at else None,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "cpu": cpu_result}


def scenario_fanout(cfg: Settings, workdir: Path, results: dict, cpu_notes: dict) -> None:
    servers = {}
    policy = "everysec"
    try:
        log(f"fanout: starting servers (fsync {policy})")
        servers["meilies"] = start_meilies(workdir, policy, "fanout")
        servers["redis"] = start_redis(workdir, policy, "fanout")
        runs = {}
        paced_events = int(cfg.fanout_paced_rate * cfg.fanout_paced_seconds)
        for run in range(cfg.runs):
            order = ("meilies", "redis") if run % 2 == 0 else ("redis", "meilies")
            for mode, events, pace in (("full", cfg.fanout_events, None),
                                       ("paced", paced_events, cfg.fanout_paced_rate)):
                for kind in order:
                    stream = b"f-%s-%d" % (mode.encode(), run)
                    r = run_fanout(kind, servers[kind], stream, cfg, events, pace)
                    runs.setdefault((kind, mode), []).append(r)
                    log(f"fanout {mode} run {run + 1} {kind}: {r['delivered_per_s']:,.0f} "
                        f"delivered/s, p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms "
                        f"({r['seconds']:.2f} s; publisher {r['publisher_per_s'] or 0:,.0f} "
                        f"events/s) cpu {r['cpu']}")
        out = {"subscribers": cfg.fanout_subscribers, "events": cfg.fanout_events,
               "fsync": policy}

        full = (runs[("meilies", "full")], runs[("redis", "full")])
        paced = (runs[("meilies", "paced")], runs[("redis", "paced")])
        out["delivered_events_per_s"] = summarize("fanout.full.delivered_per_s", *full,
                                                  "delivered_per_s", 1)
        out["publisher_events_per_s"] = summarize("fanout.full.publisher_per_s", *full,
                                                  "publisher_per_s", 1)
        for q in ("p50", "p99"):
            out[f"latency_{q}_ms"] = summarize(f"fanout.full.latency_{q}_ms", *full,
                                               f"{q}_ms", 3)
        for q in ("p50", "p99"):
            out[f"paced_{cfg.fanout_paced_rate}_per_s_latency_{q}_ms"] = summarize(
                f"fanout.paced.latency_{q}_ms", *paced, f"{q}_ms", 3)
        results["fanout"] = out
        for mode in ("full", "paced"):
            m, rd = runs[("meilies", mode)], runs[("redis", mode)]
            cpu_notes[f"fanout.{mode}"] = {"meilies": median_run(m, "delivered_per_s")["cpu"],
                                           "redis": median_run(rd, "delivered_per_s")["cpu"]}
    finally:
        for s in servers.values():
            s.stop()


# -- idle subscribers -------------------------------------------------------------------------

def run_idle(kind: str, server, count: int, batch: int, limit: float) -> dict:
    socks = []
    deadline = time.monotonic() + limit
    try:
        time.sleep(0.2)
        base_kb = server.rss_kb()
        for lo in range(0, count, batch):
            group = []
            for i in range(lo, min(count, lo + batch)):
                sock = connect(server.port)
                socks.append(sock)
                group.append((i, sock))
                name = b"s-%d" % i
                if kind == "meilies":
                    sock.sendall(command(b"subscribe", name))
                else:
                    sock.sendall(command(b"XREAD", b"BLOCK", b"0", b"STREAMS", name, b"$"))
            if kind == "meilies":
                for i, sock in group:
                    confirm = b"*2\r\n+subscribed\r\n+s-%d\r\n" % i
                    got = b""
                    while len(got) < len(confirm):
                        part = sock.recv(len(confirm) - len(got))
                        if not part:
                            raise ConnectionError(f"meilies closed idle connection {i}")
                        got += part
                    if got != confirm:
                        raise RuntimeError(f"meilies answered {got!r} to subscribe s-{i}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kind} idle: {len(socks)} connections after {limit}s")
        # Check the server's own count, polling: MeiliES confirms a subscription before
        # its greenlet has registered it, so INFO's "subscribers" may lag a little.
        # MeiliES is asked through one of the subscribed connections (a subscribed
        # connection may send any command), Redis through an extra connection.
        confirmed = time.perf_counter()
        key = "subscribers" if kind == "meilies" else "blocked_clients"
        admin = None if kind == "meilies" else Client(server.port)
        try:
            while True:
                if kind == "meilies":
                    info = _meilies_info(socks[-1])
                else:
                    info = admin.call("INFO", "clients").decode()
                seen = int(re.search(key + r":(\d+)", info).group(1))
                if seen >= count or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        finally:
            if admin is not None:
                admin.close()
        settle = time.perf_counter() - confirmed
        if seen != count:
            raise RuntimeError(f"{kind} idle: server reports {key}:{seen}, expected {count}")
        time.sleep(0.5)
        rss_kb = server.rss_kb()
    finally:
        close_all(socks)
    return {"rss_mb": rss_kb / 1024, "base_mb": base_kb / 1024,
            "kb_per_connection": (rss_kb - base_kb) / count, "settle_s": settle}


def _meilies_info(sock) -> str:
    sock.sendall(command(b"INFO"))
    data = b""
    while not data.endswith(b"\r\n\r\n"):
        part = sock.recv(65536)
        if not part:
            raise ConnectionError("meilies closed the INFO connection")
        data += part
    return data.decode()


def scenario_idle(cfg: Settings, workdir: Path, results: dict, cpu_notes: dict) -> None:
    count = cfg.idle_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = count + 1024
    if soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < want:
            log(f"idle: open-file limit only {target}, wanted {want}")
    runs = {"meilies": [], "redis": []}
    for run in range(cfg.runs):
        for kind in ("meilies", "redis"):
            server = None
            try:
                if kind == "meilies":
                    server = start_meilies(workdir, "no", f"idle-{run}")
                else:
                    server = start_redis(workdir, "no", f"idle-{run}",
                                         ["--maxclients", str(count + 128)])
                t = time.perf_counter()
                r = run_idle(kind, server, count, cfg.idle_batch, cfg.loop_limit)
                r["seconds"] = time.perf_counter() - t
                runs[kind].append(r)
                log(f"idle run {run + 1} {kind}: {count:,} subscribers, RSS "
                    f"{r['rss_mb']:.1f} MB (base {r['base_mb']:.1f} MB, "
                    f"{r['kb_per_connection']:.1f} KB each; {r['seconds']:.1f} s to connect; "
                    f"server count caught up {r['settle_s'] * 1000:.0f} ms after the last "
                    f"confirmation)")
            finally:
                if server is not None:
                    server.stop()
    m, rd = runs["meilies"], runs["redis"]
    results["idle"] = {
        "connections": count,
        "rss_mb": summarize("idle.rss_mb", m, rd, "rss_mb", 1),
        "base_rss_mb": summarize("idle.base_rss_mb", m, rd, "base_mb", 1),
        "kb_per_connection": summarize("idle.kb_per_connection", m, rd, "kb_per_connection", 2),
    }


# -- targets and main -------------------------------------------------------------------------

def targets(results: dict) -> dict:
    out = {}

    def add(name, text, value, ok):
        out[name] = {"target": text, "value": None if value is None else round(value, 3),
                     "met": None if value is None else bool(ok(value))}

    pub = results.get("publish", {})
    always = pub.get("fsync_always", {})
    for depth in (1, 64):
        fig = always.get(f"depth{depth}_events_per_s")
        if fig:
            add(f"durable_publish_depth{depth}",
                "MeiliES fsync always >= Redis appendfsync always (ratio >= 1)",
                fig["ratio"], lambda v: v >= 1.0)
    fig = pub.get("fsync_no", {}).get("depth64_events_per_s")
    if fig:
        add("nondurable_publish_depth64", "MeiliES fsync no >= half of Redis appendfsync no "
            "(ratio >= 0.5)", fig["ratio"], lambda v: v >= 0.5)
    if "replay" in results:
        add("catchup_replay", "MeiliES replay >= 2x Redis XRANGE (ratio >= 2)",
            results["replay"]["events_per_s"]["ratio"], lambda v: v >= 2.0)
    if "fanout" in results:
        add("fanout_delivered", "MeiliES delivered events/s >= Redis (ratio >= 1)",
            results["fanout"]["delivered_events_per_s"]["ratio"], lambda v: v >= 1.0)
    if "idle" in results:
        add("idle_rss", f"{results['idle']['connections']:,} idle subscribers < 300 MB RSS",
            results["idle"]["rss_mb"]["meilies"],
            lambda v: v < 300 * results["idle"]["connections"] / 10_000)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (smoke run)")
    parser.add_argument("--runs", type=int, default=None,
                        help="median of N runs per figure (default 3; 1 with --quick)")
    parser.add_argument("--only", choices=SCENARIOS, action="append",
                        help="run only this scenario (repeatable)")
    args = parser.parse_args()
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if not redis_available():
        print("bench_server: /usr/bin/redis-server is missing: the figures are ratios to "
              "Redis, so there is nothing to compare against (apt-get install redis-server)",
              file=sys.stderr)
        return 2
    stop_on_sigterm()
    cfg = Settings(args.quick, args.runs)
    chosen = args.only or list(SCENARIOS)
    results: dict = {}
    cpu_notes: dict = {}
    workdir = Path(tempfile.mkdtemp(prefix="meilies-bench-"))
    started = time.perf_counter()
    load_before = os.getloadavg()
    try:
        failures = run_scenarios(
            {"publish": scenario_publish, "replay": scenario_replay,
             "fanout": scenario_fanout, "idle": scenario_idle},
            chosen, cfg, workdir, results, cpu_notes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    client = ("one process, one thread, epoll over all sockets (2 cores: one for the "
              "server, one for the client)")
    notes = [
        "figure = {meilies, redis, ratio = meilies/redis}; median over runs",
        "latency and memory: lower is better (ratio < 1 is a MeiliES win)",
        f"publish: {cfg.publish_conns} connections, 100-byte events, each connection "
        f"sends depth requests then waits for all replies; {cfg.publish_seconds}s "
        f"measured after {cfg.publish_warmup}s warm-up; latency per request at depth 1",
        "replay: MB/s counts wire bytes received (RESP framing included)",
        f"fanout: {cfg.fanout_subscribers} subscribers, fsync everysec, publisher depth "
        f"{cfg.fanout_depth}; latency from {cfg.fanout_probes} probe subscribers, every "
        f"event; paced: {cfg.fanout_paced_rate} events/s at depth 1; "
        "publisher_events_per_s: events / time until the last publish was acked",
        "cpu: share of one core used by the client process and the server over the "
        "measured interval (the run with the median throughput)",
        "runs: every run's value behind each median, in run order",
    ]
    report = {
        "meta": report_meta("tools/bench_server.py", cfg, started, load_before, client, notes),
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
