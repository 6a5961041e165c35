#!/usr/bin/env python3
"""Write benchmark: MeiliES ``publish``, ``append-full``, transactions and idempotent
retries against Redis Streams, on the real servers, side by side in the same run.
Prints a figure block the README can quote (``--json``: the whole report as JSON).

    python3 tools/bench_writes.py                   # everything, medians of 3 runs (~4.5 min)
    python3 tools/bench_writes.py --quick           # 1 run of 1 s each: a smoke run (< 1 min)
    python3 tools/bench_writes.py --only transactions --runs 5
    python3 tools/bench_writes.py --fsync no --pin split

Not a test: figures only, nothing asserted. But every measured run checks that the
server stored exactly what was sent (``INFO`` events / ``XLEN``, before and after),
every reply is checked for errors as it arrives, and a run that fails is reported by
name while the others go on. Progress goes to stderr, the block (or the JSON) to stdout.

The servers. Each scenario starts a fresh pair on free loopback ports with data
directories under a temp dir (``--dir`` picks its parent; the block names the file
system, which must be a real disk for ``--fsync always`` to mean anything):
``meilies-server --fsync always`` (``python -m meilies.cli.server``, as the other
benchmarks start it; ``--fsync`` picks the policy) and Redis 7 with ``appendonly yes``
and the matching ``appendfsync`` (``always`` by default), so that durability is
comparable: with ``always`` both answer a write only after the fdatasync that covers
it (Redis in its ``beforeSleep``, MeiliES through its group commit). Every figure is
``{meilies, redis, ratio = meilies / redis}``, the median over ``--runs`` runs, and
the runs alternate which server goes first; the block also shows each run's ratio.
Events carry 100 bytes of data and the event name ``ev``; Redis: ``XADD s * ev
<100 bytes>``.

Scenarios (``--only``):

* ``single``: each connection sends one write, waits for its reply, sends the next
  (depth 1), with ``--conns`` connections (default 4 and 64), all to one stream:
  ``publish s ev <data>``; ``append-full s any <id> ev "" <data>`` with a fresh
  36-byte UUID-shaped id per request and empty metadata; against ``XADD``. Events/s
  and ack latency p50/p99.
* ``pipelined``: the same with ``--depth`` (64) requests sent at once per connection,
  the next batch once all their replies are in. (MeiliES stores a read's run of
  ``publish`` to one stream as one record; each ``append-full`` is a write of its own.)
* ``transactions``: ``MULTI``, three ``append-full`` to three streams, ``EXEC``, sent
  together, one transaction at a time per connection, against ``MULTI``, three
  ``XADD``, ``EXEC``. Connection c writes streams c, c+1, c+2 (mod 6), so that
  neighbouring connections share streams. Transactions/s and events/s (3 per
  transaction), latency per transaction.
* ``retries``: the cost of an idempotent retry. ``--retry-pool`` (40,000) events are
  stored with ``append-full`` by ``--retry-conns`` (4) connections, then the very same
  requests are sent again, cycling through the pool, at depth 1 and ``--depth``: every
  request is a retry, answered with its first reply, storing nothing (checked). Redis
  has no idempotent append; its peer is the usual idiom, a script that keeps a key per
  event id (``EVALSHA``: ``GET id:<id>``, else ``XADD`` and ``SET``), whose retries
  read that key and store nothing either. Retries/s; the block also gives each
  server's rate for storing the pool in the first place (one pass at ``--depth``, on
  an empty server: indicative).

Client design (as tools/bench_server.py). The machine this was written on has 2 cores
and both servers run their requests on one thread, so the client is one process, one
thread, raw blocking sockets driven by ``select.epoll``: one core for the server, one
for the client (``--pin``: left to the scheduler by default; ``same`` puts the client,
the server and its helper process on one core, ``split`` the client on one and the
server with its helper on the other). Requests are encoded before the measured window:
``publish`` and ``XADD`` batches are fixed bytes sent again and again; an
``append-full`` batch is one pre-encoded template whose ids end in a counter, filled by
one ``%`` formatting call per batch (~0.1 us per id at depth 64, ~0.4 us per request at
depth 1, against ~11 us of client CPU per request for the loop at depth 1); retries send
a pre-encoded pool. Replies are not parsed: the client counts their newlines (a
``publish`` reply has 1, ``XADD`` 2, ``append-full`` 3, a transaction 14 against
Redis' 11) and looks for an error line (``-`` at a line start) in every chunk; hiredis
parses the setup's and the checks' replies.

The client's own ceiling is measured beside each configuration: the very same loop
(connections, depth, request size, id formatting) against the scenario's Redis
answering ``ECHO`` with a message of the request's size (``MULTI``, 3 ``ECHO``,
``EXEC`` for transactions). Redis does almost nothing for an ECHO (no write, no fsync),
and the echoed reply is larger than any write's, so the figure is a lower bound of what
the client can drive. At depth 1 it is bound by round trips (each connection waits for
its reply; on this VM a wake-up costs more than the work), so the block also gives the
client's CPU time per request in that loop and the rate it would allow if the client
were the only limit, each beside the highest server figure of that configuration.
The CPU share of the client, the server and MeiliES' fdatasync helper
process over the measured window (the run with the median figure) is in the JSON and
the block, so that a figure bounded by the client can be told from one bounded by a
server.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (CLK_TCK, RAW, Client, close_all, command, connect,  # noqa: E402
                          figure, log, median_run, percentile, redis_available,
                          report_meta, run_scenarios, start_meilies, start_redis,
                          stop_on_sigterm, summarize)

SCENARIOS = ("single", "pipelined", "transactions", "retries")
DATA_LEN = 100
DATA = b"x" * DATA_LEN  # no '%', '*' or newline: the templates and counts rely on it
EVENT_NAME = b"ev"
RECV_SIZE = 1 << 20
#: Stands for a 36-byte id in an encoded request until the template is made.
ID_SLOT = b"\x00" * 36
#: Streams the transactions write, connection c taking c, c+1, c+2 (mod this).
TX_STREAMS = 6
#: Newlines in each reply (the measured loop counts them instead of parsing).
LINES = {"publish": 1, "append-full": 3, "xadd": 2, "echo": 2,
         "meilies-tx": 1 + 3 + 1 + 3 * 3,  # +OK, 3 +QUEUED, *3, 3 x (*2 :n :p)
         "redis-tx": 1 + 3 + 1 + 3 * 2}    # +OK, 3 +QUEUED, *3, 3 x ($n id)
#: Redis' idempotent append: a key per event id, checked and set with the XADD.
RETRY_SCRIPT = b"""
local seen = redis.call('GET', KEYS[2])
if seen then return seen end
local id = redis.call('XADD', KEYS[1], '*', ARGV[1], ARGV[2])
redis.call('SET', KEYS[2], id)
return id
"""
ALL_CPUS = sorted(os.sched_getaffinity(0))


class Settings:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick = args.quick
        self.runs = args.runs
        self.seconds = args.seconds
        self.warmup = args.warmup
        self.conns = args.conns
        self.depth = args.depth
        self.fsync = args.fsync
        self.pin = args.pin
        self.retry_conns = args.retry_conns
        # Whole batches of --depth per connection, so that the pool cycles evenly.
        per = max(1, args.retry_pool // (args.retry_conns * args.depth)) * args.depth
        self.retry_per_conn = per
        self.ceiling = not args.no_ceiling
        self.loop_limit = 120.0 if args.quick else 300.0  # seconds any one loop may take


# -- ids and requests -------------------------------------------------------------------------

def id_prefix() -> bytes:
    """The first 23 bytes of a fresh UUID-shaped id (version 4, variant 8); the id ends
    in ``-`` and 12 hex digits of a counter: 36 bytes in all."""
    h = os.urandom(9).hex()
    return f"{h[0:8]}-{h[8:12]}-4{h[12:15]}-8{h[15:18]}".encode()


def make_id(prefix: bytes, counter: int) -> bytes:
    return b"%s-%012x" % (prefix, counter)


def append_full_request(stream: bytes, event_id: bytes = ID_SLOT) -> bytes:
    return command(b"append-full", stream, b"any", event_id, EVENT_NAME, b"", DATA)


def xadd_request(stream: bytes) -> bytes:
    return command(b"XADD", stream, b"*", EVENT_NAME, DATA)


def echo_request(size: int) -> bytes:
    """``ECHO`` of a message that starts with an id slot, ``size`` bytes encoded."""
    pad = max(0, size - len(command(b"ECHO", ID_SLOT)))
    while True:
        request = command(b"ECHO", ID_SLOT + b"x" * pad)
        if len(request) <= size or pad == 0:
            return request
        pad -= 1


def template(encoded: bytes, prefix: bytes) -> bytes:
    """``encoded`` with each id slot made ``<prefix>-%012x``: a ``%`` template."""
    return encoded.replace(b"%", b"%%").replace(ID_SLOT, prefix + b"-%012x")


def fresh_ids(batch_template: bytes) -> Callable[[], bytes]:
    """The next batch of a template, its ids' counters going on from the last batch's:
    one formatting call per batch."""
    slots = batch_template.count(b"%012x")
    fill = batch_template.__mod__

    def batches() -> Iterator[bytes]:
        i = 0
        while True:
            yield fill(tuple(range(i, i + slots)))
            i += slots

    return batches().__next__


def repeat(batch: bytes) -> Callable[[], bytes]:
    return itertools.repeat(batch).__next__


def tx_streams(conns_tag: bytes, c: int) -> list[bytes]:
    return [b"tx-%s-%d" % (conns_tag, (c + k) % TX_STREAMS) for k in range(3)]


def meilies_tx(streams: list[bytes]) -> bytes:
    return b"".join([command(b"MULTI")] + [append_full_request(s) for s in streams]
                    + [command(b"EXEC")])


def redis_tx(streams: list[bytes]) -> bytes:
    return b"".join([command(b"MULTI")] + [xadd_request(s) for s in streams]
                    + [command(b"EXEC")])


# -- processes: placement and CPU -------------------------------------------------------------

def process_tree(pid: int) -> tuple[list[int], list[int]]:
    """(every thread id of ``pid`` and its descendants, the descendants' pids)."""
    tids, children, stack = [], [], [pid]
    while stack:
        p = stack.pop()
        try:
            threads = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in threads:
            tids.append(int(tid))
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                kids = []
            children += kids
            stack += kids
    return tids, children


def place(server, mode: str) -> None:
    """Pin this client, and the server with its helper processes: ``same`` core,
    ``split`` over two cores, or ``none`` (the scheduler decides)."""
    first, last = ALL_CPUS[0], ALL_CPUS[-1]
    if mode == "none":
        client, srv = set(ALL_CPUS), set(ALL_CPUS)
    elif mode == "same":
        client, srv = {first}, {first}
    else:
        client, srv = {first}, {last}
    os.sched_setaffinity(0, client)
    for tid in process_tree(server.pid)[0]:
        try:
            os.sched_setaffinity(tid, srv)
        except OSError:
            pass  # a thread that just ended


def proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except OSError:
        return 0.0


class Cpu:
    """CPU used over an interval by the client, the server, and the server's helper
    processes (MeiliES' fdatasync helper; Redis has none), as shares of one core."""

    def __init__(self, server) -> None:
        self.pid = server.pid
        self.helpers = process_tree(server.pid)[1]
        self.wall = time.perf_counter()
        self.client = time.process_time()
        self.srv = proc_cpu(self.pid)
        self.help = sum(map(proc_cpu, self.helpers))

    def done(self) -> dict:
        wall = time.perf_counter() - self.wall
        return {"wall_s": round(wall, 3),
                "client_cpu": round((time.process_time() - self.client) / wall, 3),
                "server_cpu": round((proc_cpu(self.pid) - self.srv) / wall, 3),
                "helper_cpu": round((sum(map(proc_cpu, self.helpers)) - self.help) / wall, 3)}


# -- the measured loop ------------------------------------------------------------------------

def error_line(buf: bytearray, n: int) -> str:
    at = buf.find(b"\n-", 0, n)
    at = 0 if at < 0 else at + 1
    end = buf.find(b"\r\n", at, n)
    return bytes(buf[at:end if end >= 0 else min(n, at + 200)]).decode("utf-8", "replace")


def drive(server, sources: list[Callable[[], bytes | None]], lines: int, seconds: float,
          warmup: float, limit: float, what: str) -> dict:
    """One connection per source; each sends the source's next batch, waits for all its
    replies (``lines`` newlines), sends the next. Batches acknowledged between the end
    of the warm-up and the end count, with their latency (send to last reply); no batch
    is sent after the end, and every batch sent is waited for. A source that returns
    None is done (a finite preload)."""
    conns = len(sources)
    socks = [connect(server.port) for _ in range(conns)]
    ep = select.epoll()
    buf = bytearray(RECV_SIZE)
    pending = [0] * conns
    sent_at = [0.0] * conns
    line_start = [True] * conns  # whether the connection's last chunk ended a line
    clock = time.perf_counter
    issued = counted = 0
    latencies: list[float] = []
    cpu = cpu_result = None
    try:
        index = {}
        for i, sock in enumerate(socks):
            ep.register(sock.fileno(), select.EPOLLIN)
            index[sock.fileno()] = i
        start = clock()
        t0 = start + warmup
        t_end = t0 + seconds
        hard_end = start + limit
        busy = 0
        for i in range(conns):
            batch = sources[i]()
            if batch is not None:
                socks[i].sendall(batch)
                pending[i] = lines
                sent_at[i] = start
                issued += 1
                busy += 1
        poll = ep.poll
        while busy:
            for fd, _ in poll(1.0):
                i = index[fd]
                n = socks[i].recv_into(buf)
                if not n:
                    raise ConnectionError(f"{what}: the server closed a connection")
                if buf.find(b"\n-", 0, n) >= 0 or (buf[0] == 45 and line_start[i]):
                    raise RuntimeError(f"{what}: error reply {error_line(buf, n)!r}")
                line_start[i] = buf[n - 1] == 10
                left = pending[i] - buf.count(b"\n", 0, n)
                if left > 0:
                    pending[i] = left
                    continue
                if left < 0:
                    raise RuntimeError(f"{what}: more reply lines than requests")
                now = clock()
                if t0 <= now <= t_end:
                    counted += 1
                    latencies.append(now - sent_at[i])
                batch = sources[i]() if now < t_end else None
                if batch is None:
                    pending[i] = 0
                    busy -= 1
                    continue
                socks[i].sendall(batch)
                pending[i] = lines
                sent_at[i] = now
                issued += 1
            now = clock()
            if cpu is None:
                if now >= t0:
                    cpu = Cpu(server)
            elif cpu_result is None and now >= t_end:
                cpu_result = cpu.done()
            if now > hard_end:
                raise TimeoutError(f"{what}: the loop hit its {limit}s limit")
        end = clock()
        if cpu is not None and cpu_result is None:
            cpu_result = cpu.done()
    finally:
        ep.close()
        close_all(socks)
    elapsed = min(t_end, end) - t0
    latencies.sort()
    ms = [x * 1000.0 for x in (percentile(latencies, 50), percentile(latencies, 99))
          if x is not None]
    return {"batches_per_s": counted / elapsed if elapsed > 0 else None,
            "issued": issued, "counted": counted, "seconds": end - start,
            "p50_ms": ms[0] if ms else None, "p99_ms": ms[1] if ms else None,
            "cpu": cpu_result}


def finite(batches: list[bytes]) -> Callable[[], bytes | None]:
    return lambda it=iter(batches): next(it, None)


# -- what the servers hold --------------------------------------------------------------------

def meilies_events(port: int) -> int:
    c = Client(port)
    try:
        text = c.call("INFO").decode()
    finally:
        c.close()
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return int(info["events"])


def redis_entries(port: int, streams: list[bytes]) -> int:
    c = Client(port)
    try:
        return sum(c.call("XLEN", s) for s in streams)
    finally:
        c.close()


def stored(kind: str, server, streams: list[bytes]) -> int:
    return meilies_events(server.port) if kind == "meilies" else \
        redis_entries(server.port, streams)


def measure(cfg: Settings, kind: str, server, sources, lines: int, per_batch: int,
            events_per_unit: int, streams: list[bytes], what: str,
            stores: bool = True) -> dict:
    """One measured run: place, drive, check what was stored. ``per_batch`` units (events,
    transactions, retries) per batch, ``events_per_unit`` events stored per unit."""
    before = stored(kind, server, streams)
    place(server, cfg.pin)
    r = drive(server, sources, lines, cfg.seconds, cfg.warmup, cfg.loop_limit, what)
    after = stored(kind, server, streams)
    want = r["issued"] * per_batch * events_per_unit if stores else 0
    if after - before != want:
        raise RuntimeError(f"{what}: {r['issued']} batches sent, {after - before} events "
                           f"stored, expected {want}")
    rate = r["batches_per_s"]
    r["per_s"] = None if rate is None else rate * per_batch
    r["events_per_s"] = None if rate is None else rate * per_batch * events_per_unit
    r["client_us"] = client_us(r, per_batch)
    return r


def client_us(r: dict, per_batch: int) -> float | None:
    """The client's CPU time per unit (request or transaction) over the measured window."""
    cpu = r["cpu"]
    if not cpu or not r["counted"]:
        return None
    return cpu["client_cpu"] * cpu["wall_s"] / (r["counted"] * per_batch) * 1e6


def ceiling(cfg: Settings, redis, conns: int, depth: int, shape: str, what: str) -> dict:
    """The same loop against Redis answering ECHO (see the module docstring)."""
    size = len(append_full_request(b"s-c%d-d%d-r0" % (conns, depth)))
    echo = echo_request(size)
    if shape == "tx":
        batch = b"".join([command(b"MULTI")] + [echo] * 3 + [command(b"EXEC")])
        lines, per_batch = LINES["redis-tx"], 1
    else:
        batch, lines, per_batch = echo * depth, LINES["echo"] * depth, depth
    sources = [fresh_ids(template(batch, id_prefix())) for _ in range(conns)]
    place(redis, cfg.pin)
    r = drive(redis, sources, lines, cfg.seconds, cfg.warmup, cfg.loop_limit, what)
    per_s = r["batches_per_s"] * per_batch
    us = client_us(r, per_batch)
    alone = None if not us else 1e6 / us
    log(f"{what}: {per_s:,.0f}/s against Redis ECHO of {len(echo)}-byte requests, client "
        f"{us or 0:.1f} us of CPU each (~{alone or 0:,.0f}/s if the client were the only "
        f"limit), cpu {r['cpu']}")
    return {"per_s": round(per_s, 1), "request_bytes": len(echo), "client_us": us and round(us, 2),
            "client_alone_per_s": alone and round(alone, 1), "cpu": r["cpu"]}


# -- scenarios --------------------------------------------------------------------------------

def start_pair(cfg: Settings, workdir: Path, tag: str) -> dict:
    log(f"{tag}: starting meilies-server --fsync {cfg.fsync} and redis-server appendfsync "
        f"{cfg.fsync}")
    servers = {}
    try:
        servers["meilies"] = start_meilies(workdir, cfg.fsync, tag)
        servers["redis"] = start_redis(workdir, cfg.fsync, tag)
    except BaseException:
        stop_pair(servers, workdir, tag)
        raise
    return servers


def stop_pair(servers: dict, workdir: Path, tag: str) -> None:
    for kind, server in servers.items():
        code = server.stop()
        if code not in (0, None) and kind == "meilies":
            log(f"{tag}: meilies-server exited with {code}: {server.log_tail(500)}")
    for kind in ("meilies", "redis"):
        shutil.rmtree(workdir / f"{kind}-{tag}", ignore_errors=True)


def orders(runs: int) -> Iterator[tuple[int, tuple[str, str]]]:
    for run in range(runs):
        yield run, (("meilies", "redis") if run % 2 == 0 else ("redis", "meilies"))


def cpu_of(runs: list[dict], key: str) -> dict | None:
    return median_run(runs, key)["cpu"] if runs else None


def scenario_writes(cfg: Settings, workdir: Path, results: dict, depth: int,
                    name: str) -> None:
    """``single`` (depth 1) and ``pipelined`` (``--depth``): publish and append-full
    against XADD, per connection count."""
    servers = start_pair(cfg, workdir, name)
    out = {"depth": depth}
    try:
        runs: dict[tuple, list] = {}
        for run, order in orders(cfg.runs):
            for conns in cfg.conns:
                for kind in order:
                    labels = ("publish", "append-full") if kind == "meilies" else ("xadd",)
                    for label in (labels if run % 2 == 0 else labels[::-1]):
                        stream = b"%s-c%d-d%d-r%d" % (label.encode(), conns, depth, run)
                        if label == "publish":
                            batch = command(b"publish", stream, EVENT_NAME, DATA) * depth
                            sources = [repeat(batch) for _ in range(conns)]
                        elif label == "xadd":
                            sources = [repeat(xadd_request(stream) * depth)
                                       for _ in range(conns)]
                        else:
                            batch = append_full_request(stream) * depth
                            sources = [fresh_ids(template(batch, id_prefix()))
                                       for _ in range(conns)]
                        what = f"{name} {label} {conns} conns depth {depth} run {run + 1}"
                        r = measure(cfg, kind, servers[kind], sources,
                                    LINES[label] * depth, depth, 1, [stream], what)
                        runs.setdefault((label, conns), []).append(r)
                        log(f"{what}: {r['events_per_s']:,.0f} events/s, p50 "
                            f"{r['p50_ms']:.3f} ms p99 {r['p99_ms']:.3f} ms, cpu {r['cpu']}")
        for conns in cfg.conns:
            pub, full = runs[("publish", conns)], runs[("append-full", conns)]
            xadd = runs[("xadd", conns)]
            base = f"{name}.c{conns}"
            section = {
                "publish_events_per_s": summarize(f"{base}.publish.events_per_s", pub, xadd,
                                                  "events_per_s", 1),
                "append_full_events_per_s": summarize(f"{base}.append_full.events_per_s",
                                                      full, xadd, "events_per_s", 1),
                "cpu": {"publish": cpu_of(pub, "events_per_s"),
                        "append_full": cpu_of(full, "events_per_s"),
                        "xadd": cpu_of(xadd, "events_per_s")},
            }
            for q in ("p50", "p99"):
                section[f"publish_ack_{q}_ms"] = summarize(f"{base}.publish.ack_{q}_ms", pub,
                                                           xadd, f"{q}_ms", 4)
                section[f"append_full_ack_{q}_ms"] = summarize(
                    f"{base}.append_full.ack_{q}_ms", full, xadd, f"{q}_ms", 4)
            if cfg.ceiling:
                section["client_ceiling"] = ceiling(
                    cfg, servers["redis"], conns, depth, "request",
                    f"{name} client ceiling {conns} conns depth {depth}")
            out[f"c{conns}"] = section
    finally:
        os.sched_setaffinity(0, set(ALL_CPUS))
        stop_pair(servers, workdir, name)
    results[name] = out


def scenario_single(cfg: Settings, workdir: Path, results: dict) -> None:
    scenario_writes(cfg, workdir, results, 1, "single")


def scenario_pipelined(cfg: Settings, workdir: Path, results: dict) -> None:
    scenario_writes(cfg, workdir, results, cfg.depth, "pipelined")


def scenario_transactions(cfg: Settings, workdir: Path, results: dict) -> None:
    name = "transactions"
    servers = start_pair(cfg, workdir, name)
    out = {"events_per_transaction": 3, "streams": TX_STREAMS}
    try:
        runs: dict[tuple, list] = {}
        for run, order in orders(cfg.runs):
            for conns in cfg.conns:
                tag = b"c%d-r%d" % (conns, run)
                streams = [b"tx-%s-%d" % (tag, k) for k in range(TX_STREAMS)]
                for kind in order:
                    if kind == "meilies":
                        sources = [fresh_ids(template(meilies_tx(tx_streams(tag, c)),
                                                      id_prefix()))
                                   for c in range(conns)]
                        lines = LINES["meilies-tx"]
                    else:
                        sources = [repeat(redis_tx(tx_streams(tag, c))) for c in range(conns)]
                        lines = LINES["redis-tx"]
                    what = f"{name} {kind} {conns} conns run {run + 1}"
                    r = measure(cfg, kind, servers[kind], sources, lines, 1, 3, streams, what)
                    runs.setdefault((kind, conns), []).append(r)
                    log(f"{what}: {r['per_s']:,.0f} transactions/s ({r['events_per_s']:,.0f} "
                        f"events/s), p50 {r['p50_ms']:.3f} ms p99 {r['p99_ms']:.3f} ms, cpu "
                        f"{r['cpu']}")
        for conns in cfg.conns:
            m, rd = runs[("meilies", conns)], runs[("redis", conns)]
            base = f"{name}.c{conns}"
            section = {
                "transactions_per_s": summarize(f"{base}.transactions_per_s", m, rd, "per_s", 1),
                "events_per_s": summarize(f"{base}.events_per_s", m, rd, "events_per_s", 1),
                "latency_p50_ms": summarize(f"{base}.latency_p50_ms", m, rd, "p50_ms", 4),
                "latency_p99_ms": summarize(f"{base}.latency_p99_ms", m, rd, "p99_ms", 4),
                "cpu": {"meilies": cpu_of(m, "per_s"), "redis": cpu_of(rd, "per_s")},
            }
            if cfg.ceiling:
                section["client_ceiling"] = ceiling(
                    cfg, servers["redis"], conns, 1, "tx",
                    f"{name} client ceiling {conns} conns")
            out[f"c{conns}"] = section
    finally:
        os.sched_setaffinity(0, set(ALL_CPUS))
        stop_pair(servers, workdir, name)
    results[name] = out


def scenario_retries(cfg: Settings, workdir: Path, results: dict) -> None:
    name = "retries"
    conns, per, depth = cfg.retry_conns, cfg.retry_per_conn, cfg.depth
    total = conns * per
    servers = start_pair(cfg, workdir, name)
    out = {"pool": total, "conns": conns}
    try:
        streams = [b"r-%d" % c for c in range(conns)]
        prefixes = [id_prefix() for _ in range(conns)]
        meilies_pool = [[append_full_request(streams[c], make_id(prefixes[c], j))
                         for j in range(per)] for c in range(conns)]
        redis = Client(servers["redis"].port)
        try:
            sha = redis.call("SCRIPT", "LOAD", RETRY_SCRIPT)
        finally:
            redis.close()
        redis_pool = [[command(b"EVALSHA", sha, b"2", streams[c],
                               b"id:" + make_id(prefixes[c], j), EVENT_NAME, DATA)
                       for j in range(per)] for c in range(conns)]
        pools = {"meilies": meilies_pool, "redis": redis_pool}
        lines = {"meilies": LINES["append-full"], "redis": LINES["xadd"]}

        def batches(kind: str, c: int, d: int) -> list[bytes]:
            pool = pools[kind][c]
            return [b"".join(pool[k:k + d]) for k in range(0, per, d)]

        fresh = {}
        for kind in ("meilies", "redis"):
            log(f"{name}: storing {total:,} events in {kind} ({conns} connections, depth "
                f"{depth})")
            server = servers[kind]
            before = stored(kind, server, streams)
            t = time.perf_counter()
            r = drive(server, [finite(batches(kind, c, depth)) for c in range(conns)],
                      lines[kind] * depth, float("inf"), 0.0, cfg.loop_limit,
                      f"{name} {kind} preload")
            fresh[kind] = total / (time.perf_counter() - t)
            if stored(kind, server, streams) - before != total:
                raise RuntimeError(f"{name}: {kind} stored {stored(kind, server, streams)}"
                                   f" of the {total} events of the pool")
            log(f"{name}: {kind} stored the pool at {fresh[kind]:,.0f} events/s, cpu "
                f"{r['cpu']}")
        # One write and its retry by hand, parsed: the retry gets the first reply back
        # and stores nothing.
        for kind in ("meilies", "redis"):
            server, check = servers[kind], [b"r-check"]
            event_id = make_id(id_prefix(), 0)
            request = append_full_request(check[0], event_id) if kind == "meilies" else \
                command(b"EVALSHA", sha, b"2", check[0], b"id:" + event_id, EVENT_NAME, DATA)
            before = stored(kind, server, check)
            c = Client(server.port)
            try:
                replies = [c.call(*_args(request)) for _ in range(2)]
            finally:
                c.close()
            added = stored(kind, server, check) - before
            if replies[0] != replies[1] or any(isinstance(x, Exception) for x in replies) \
                    or added != 1:
                raise RuntimeError(f"{name}: {kind} answered {replies!r} to a write and its "
                                   f"retry, and stored {added} events (expected 1)")
            log(f"{name}: {kind} answered a write and its retry alike: {replies[0]!r}")
        out["store_pool_events_per_s"] = figure(fresh["meilies"], fresh["redis"], 1)

        runs: dict[tuple, list] = {}
        for run, order in orders(cfg.runs):
            for d in (1, depth):
                for kind in order:
                    sources = [itertools.cycle(batches(kind, c, d)).__next__
                               for c in range(conns)]
                    what = f"{name} {kind} {conns} conns depth {d} run {run + 1}"
                    r = measure(cfg, kind, servers[kind], sources, lines[kind] * d, d, 1,
                                streams, what, stores=False)
                    runs.setdefault((kind, d), []).append(r)
                    log(f"{what}: {r['per_s']:,.0f} retries/s, p50 {r['p50_ms']:.3f} ms p99 "
                        f"{r['p99_ms']:.3f} ms, cpu {r['cpu']}")
        for d in (1, depth):
            m, rd = runs[("meilies", d)], runs[("redis", d)]
            base = f"{name}.d{d}"
            section = {
                "retries_per_s": summarize(f"{base}.retries_per_s", m, rd, "per_s", 1),
                "latency_p50_ms": summarize(f"{base}.latency_p50_ms", m, rd, "p50_ms", 4),
                "latency_p99_ms": summarize(f"{base}.latency_p99_ms", m, rd, "p99_ms", 4),
                "cpu": {"meilies": cpu_of(m, "per_s"), "redis": cpu_of(rd, "per_s")},
            }
            if cfg.ceiling:
                section["client_ceiling"] = ceiling(
                    cfg, servers["redis"], conns, d, "request",
                    f"{name} client ceiling {conns} conns depth {d}")
            out[f"d{d}"] = section
    finally:
        os.sched_setaffinity(0, set(ALL_CPUS))
        stop_pair(servers, workdir, name)
    results[name] = out


def _args(request: bytes) -> list[bytes]:
    """The arguments of one encoded request (to send it again through Client)."""
    parts = request.split(b"\r\n")
    return [parts[i] for i in range(2, len(parts) - 1, 2)]


# -- the block --------------------------------------------------------------------------------

def fmt_rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}/s"


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def run_ratios(name: str) -> str:
    raw = RAW.get(name)
    if not raw:
        return ""
    return " ".join("-" if (m is None or r is None or r == 0) else f"{m / r:.2f}"
                    for m, r in zip(raw["meilies"], raw["redis"]))


def fmt_cpu(cpu: dict | None) -> str:
    if not cpu:
        return "-"
    helper = f" + helper {cpu['helper_cpu']:.2f}" if cpu.get("helper_cpu") else ""
    return f"server {cpu['server_cpu']:.2f}{helper}, client {cpu['client_cpu']:.2f}"


def fs_type(path: Path) -> str:
    try:
        out = subprocess.run(["df", "--output=fstype,target", str(path)], capture_output=True,
                             text=True, timeout=10).stdout.split("\n")[1].split()
        return f"{out[0]} at {out[1]}"
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown file system"


def print_block(report: dict, cfg: Settings) -> None:
    meta = report["meta"]
    p = print
    redis = meta.get("redis") or "?"
    p(f"MeiliES writes against Redis {redis} (tools/bench_writes.py "
      f"{' '.join(meta['argv'])}), {meta['date']}")
    p(f"  meilies-server --fsync {cfg.fsync} against redis-server appendonly yes appendfsync "
      f"{cfg.fsync}" + (" (durability comparable: both answer a write once an fdatasync "
                        "covers it)" if cfg.fsync == "always" else ""))
    p(f"  data on {meta['data_fs']}; {meta['cpus']} CPUs, load average "
      f"{meta['loadavg_before'][0]} before, {meta['loadavg_after'][0]} after; pin "
      f"{cfg.pin}; medians of {cfg.runs} runs of {cfg.seconds} s after {cfg.warmup} s "
      f"warm-up, alternating which server goes first ({meta['seconds']} s in all)")
    p("  100-byte data, event name 'ev', append-full with a fresh 36-byte UUID-shaped id "
      "and empty metadata; Redis: XADD s * ev <data>")
    p("")
    p("| figure | MeiliES | Redis | ratio | runs |")
    p("| --- | --- | --- | --- | --- |")
    rows_ceiling = []
    for name in ("single", "pipelined"):
        sec = report.get(name)
        if not sec:
            continue
        depth = sec["depth"]
        for conns in cfg.conns:
            s = sec.get(f"c{conns}")
            if not s:
                continue
            base = f"{name}.c{conns}"
            for label, key, raw in (("publish", "publish_events_per_s", "publish"),
                                    ("append-full", "append_full_events_per_s",
                                     "append_full")):
                f = s[key]
                p(f"| {label} vs XADD, {conns} conns, depth {depth} | {fmt_rate(f['meilies'])}"
                  f" | {fmt_rate(f['redis'])} | {fmt_ratio(f['ratio'])} | "
                  f"{run_ratios(f'{base}.{raw}.events_per_s')} |")
            if depth == 1:
                for label, raw in (("publish", "publish"), ("append-full", "append_full")):
                    a, b = s[f"{raw}_ack_p50_ms"], s[f"{raw}_ack_p99_ms"]
                    p(f"| ... {label} ack p50 / p99, {conns} conns | {fmt_ms(a['meilies'])} / "
                      f"{fmt_ms(b['meilies'])} ms | {fmt_ms(a['redis'])} / "
                      f"{fmt_ms(b['redis'])} ms | | |")
            if "client_ceiling" in s:
                best = max(x for x in (s["publish_events_per_s"]["meilies"],
                                       s["append_full_events_per_s"]["meilies"],
                                       s["publish_events_per_s"]["redis"]) if x is not None)
                rows_ceiling.append((f"{name}, {conns} conns, depth {depth}",
                                     s["client_ceiling"], best, "request"))
    sec = report.get("transactions")
    if sec:
        for conns in cfg.conns:
            s = sec.get(f"c{conns}")
            if not s:
                continue
            t, e = s["transactions_per_s"], s["events_per_s"]
            p(f"| MULTI + 3 append-full + EXEC vs MULTI + 3 XADD + EXEC, {conns} conns | "
              f"{fmt_rate(t['meilies'])} ({fmt_rate(e['meilies'])} events) | "
              f"{fmt_rate(t['redis'])} ({fmt_rate(e['redis'])} events) | "
              f"{fmt_ratio(t['ratio'])} | "
              f"{run_ratios(f'transactions.c{conns}.transactions_per_s')} |")
            a, b = s["latency_p50_ms"], s["latency_p99_ms"]
            p(f"| ... transaction latency p50 / p99, {conns} conns | {fmt_ms(a['meilies'])} / "
              f"{fmt_ms(b['meilies'])} ms | {fmt_ms(a['redis'])} / {fmt_ms(b['redis'])} ms "
              f"| | |")
            if "client_ceiling" in s:
                best = max(x for x in (t["meilies"], t["redis"]) if x is not None)
                rows_ceiling.append((f"transactions, {conns} conns", s["client_ceiling"],
                                     best, "transaction"))
    sec = report.get("retries")
    if sec:
        conns = sec["conns"]
        for key, s in sec.items():
            if not key.startswith("d"):
                continue
            d = key[1:]
            f = s["retries_per_s"]
            p(f"| idempotent retry: append-full vs EVALSHA dedupe script, {conns} conns, depth "
              f"{d} | {fmt_rate(f['meilies'])} | {fmt_rate(f['redis'])} | "
              f"{fmt_ratio(f['ratio'])} | "
              f"{run_ratios(f'retries.{key}.retries_per_s')} |")
            if "client_ceiling" in s:
                best = max(x for x in (f["meilies"], f["redis"]) if x is not None)
                rows_ceiling.append((f"retries, {conns} conns, depth {d}",
                                     s["client_ceiling"], best, "request"))
        f = sec["store_pool_events_per_s"]
        p(f"| ... storing the {sec['pool']:,} events first (one pass, depth {cfg.depth}, "
          f"empty server) | {fmt_rate(f['meilies'])} | {fmt_rate(f['redis'])} | "
          f"{fmt_ratio(f['ratio'])} | |")
    if rows_ceiling:
        p("")
        p("Client ceiling: the same loop (connections, depth, request size, id formatting) "
          "against Redis answering ECHO, beside the highest server figure of the "
          "configuration; at depth 1 ECHO is bound by round trips, so the client's CPU per "
          "request gives what it could drive alone:")
        for label, c, best, unit in rows_ceiling:
            alone = c.get("client_alone_per_s")
            tail = "" if not alone else (f"; client CPU {c['client_us']:.1f} us per {unit}, "
                                         f"~{alone:,.0f}/s alone ({best / alone:.0%})")
            p(f"  {label}: highest server figure {fmt_rate(best)}; against ECHO "
              f"{fmt_rate(c['per_s'])} ({best / c['per_s']:.0%}){tail}")
    p("")
    p("CPU, share of one core over the measured window of the median run (server + "
      "MeiliES' fdatasync helper, client):")
    for name in ("single", "pipelined", "transactions", "retries"):
        sec = report.get(name)
        if not sec:
            continue
        for key, s in sec.items():
            if isinstance(s, dict) and "cpu" in s:
                parts = "; ".join(f"{k} {fmt_cpu(v)}" for k, v in s["cpu"].items())
                p(f"  {name} {key}: {parts}")
    if report.get("failures"):
        p("")
        for name, why in report["failures"].items():
            p(f"FAILED {name}: {why}")


# -- main -------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 run of 1 s per figure, 0.2 s warm-up, a 10,000-event retry "
                             "pool: a smoke run")
    parser.add_argument("--runs", type=int, default=None,
                        help="median of N runs per figure (default 3; 1 with --quick)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="measured seconds per run (default 3; 1 with --quick)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before the measured window (default 0.5; 0.2 with "
                             "--quick)")
    parser.add_argument("--only", choices=SCENARIOS, action="append",
                        help="run only this scenario (repeatable)")
    parser.add_argument("--conns", type=int, action="append",
                        help="connections for single, pipelined and transactions "
                             "(repeatable; default 4 and 64)")
    parser.add_argument("--depth", type=int, default=64,
                        help="requests per batch when pipelined (default 64)")
    parser.add_argument("--fsync", choices=("always", "everysec", "no"), default="always",
                        help="meilies-server --fsync and Redis appendfsync (default always)")
    parser.add_argument("--pin", choices=("none", "same", "split"), default="none",
                        help="client and server (with its helper) left to the scheduler "
                             "(default), on one core, or one core each")
    parser.add_argument("--retry-pool", type=int, default=None,
                        help="events stored then retried (default 40,000; 10,000 with "
                             "--quick)")
    parser.add_argument("--retry-conns", type=int, default=4,
                        help="connections sending retries (default 4)")
    parser.add_argument("--no-ceiling", action="store_true",
                        help="skip the client-ceiling runs against Redis ECHO")
    parser.add_argument("--dir", default=None,
                        help="parent of the scratch directory (default: the system temp "
                             "dir); it must be on the disk under test")
    parser.add_argument("--json", action="store_true",
                        help="print the report as JSON (every run's value) instead of the "
                             "block")
    args = parser.parse_args()
    q = args.quick
    args.runs = args.runs if args.runs is not None else (1 if q else 3)
    args.seconds = args.seconds if args.seconds is not None else (1.0 if q else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.2 if q else 0.5)
    args.retry_pool = args.retry_pool if args.retry_pool is not None else \
        (10_000 if q else 40_000)
    args.conns = args.conns or [4, 64]
    if args.runs < 1 or args.seconds <= 0 or args.warmup < 0 or args.depth < 1 or \
            args.retry_conns < 1 or args.retry_pool < 1 or min(args.conns) < 1:
        parser.error("--runs, --seconds, --depth, --conns, --retry-* must be positive, "
                     "--warmup not negative")
    if len(ALL_CPUS) < 2 and args.pin == "split":
        parser.error("--pin split needs two CPUs")
    if not redis_available():
        print("bench_writes: /usr/bin/redis-server is missing: the figures are ratios to "
              "Redis, so there is nothing to compare against (apt-get install redis-server)",
              file=sys.stderr)
        return 2
    stop_on_sigterm()
    cfg = Settings(args)
    chosen = args.only or list(SCENARIOS)
    results: dict = {}
    workdir = Path(tempfile.mkdtemp(prefix="meilies-bench-writes-", dir=args.dir))
    data_fs = fs_type(workdir)
    started = time.perf_counter()
    load_before = os.getloadavg()
    try:
        failures = run_scenarios(
            {"single": scenario_single, "pipelined": scenario_pipelined,
             "transactions": scenario_transactions, "retries": scenario_retries},
            chosen, cfg, workdir, results)
    finally:
        os.sched_setaffinity(0, set(ALL_CPUS))
        shutil.rmtree(workdir, ignore_errors=True)
    client = ("one process, one thread, blocking sockets driven by epoll, requests "
              "pre-encoded (ids filled into a template by one % call per batch), replies' "
              "newlines counted and error lines looked for, not parsed")
    notes = [
        "figure = {meilies, redis, ratio = meilies/redis}; median over runs, which "
        "alternate the server that goes first",
        f"fsync: meilies-server --fsync {cfg.fsync}, Redis appendonly yes appendfsync "
        f"{cfg.fsync}",
        "single/pipelined: all connections write one stream; publish and append-full "
        "against XADD s * ev <100 bytes>; latency per batch (send to last reply)",
        "transactions: MULTI + 3 append-full + EXEC (Redis: 3 XADD) sent together, one "
        f"at a time per connection; connection c writes streams c..c+2 mod {TX_STREAMS}",
        "retries: every request re-sends an append-full already stored (its first reply "
        "back, nothing stored); Redis: EVALSHA of GET id:<id> else XADD + SET, on ids "
        "already stored",
        "client_ceiling: the same loop against Redis answering ECHO of the request's size",
        "cpu: share of one core over the median run's measured window; helper_cpu is "
        "MeiliES' fdatasync helper process",
        "runs: every run's value behind each median, in run order",
    ]
    report = {
        "meta": {**report_meta("tools/bench_writes.py", cfg, started, load_before, client,
                               notes),
                 "date": time.strftime("%Y-%m-%d %H:%M"), "data_fs": data_fs,
                 "fsync": cfg.fsync, "pin": cfg.pin, "seconds_per_run": cfg.seconds,
                 "warmup": cfg.warmup, "conns": cfg.conns, "depth": cfg.depth},
        **results,
        "runs": RAW,
    }
    if failures:
        report["failures"] = failures
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_block(report, cfg)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
