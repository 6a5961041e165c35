#!/usr/bin/env python3
"""The floor benchmark: how fast a Python server can publish durably at all on this
machine, beside MeiliES and Redis, so that what the design costs can be told from
what MeiliES' own code costs. Prints JSON.

    python3 tools/bench_floor.py                 # depth 1, 5 rounds of 3 s per server
    python3 tools/bench_floor.py --depth 64 --rounds 3

Why it exists. Issue 3 asks for durable publishing (``--fsync always``) at depth 1 at
least as fast as Redis' ``appendfsync always``. At depth 1 each of the 4 connections
waits for its reply before it sends again, so the figure is set by the time around
one fdatasync: the fdatasync itself, plus everything the server does between two of
them. Redis spends a few microseconds of C there. These servers show what Python
spends, doing nothing else:

* ``redis``: Redis, ``appendonly yes``, ``appendfsync always``, ``XADD``.
* ``meilies``: ``meilies-server --fsync always``.
* ``python-epoll``: the least a Python server can do per request. One process, one
  thread, ``select.epoll`` and no gevent: each pass reads every ready socket, appends
  the bytes read to a file with one ``write``, fdatasyncs it, and answers ``+OK`` for
  each request read (the ``*`` counted: nothing parsed, checked, numbered or indexed).
* ``gevent``: the same work built as MeiliES is: a greenlet per connection, one write
  and one fdatasync on the event loop at the end of each loop turn (Redis'
  ``beforeSleep``), then every waiting greenlet is woken to answer.
* ``gevent-helper``: the same, with the fdatasync done by MeiliES' own helper process
  (``meilies/server/syncer.py``), asked at the end of each loop turn, several in flight.

The three floor servers are not servers anyone could use (they answer before a request
is whole and keep no numbering); they are upper bounds. Each round runs every server
once, in turn, so that a change in the host's load reaches them all alike; figures are
medians over the rounds, with each server's ratio to Redis.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import select
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (HOST, REPO, ServerProcess, free_port, log, median,  # noqa: E402
                          redis_available, start_meilies, start_redis)

FLOORS = ("python-epoll", "gevent", "gevent-helper")
SERVERS = ("redis", "meilies", *FLOORS)
OK = b"+OK\r\n"
PONG = b"+PONG\r\n"


# -- the floor servers (run as ``bench_floor.py --serve KIND``) ------------------------------

def _replies(data: bytes) -> bytes:
    """``+OK`` per request in ``data`` (a PING, which readiness checks send: ``+PONG``)."""
    if b"PING" in data.upper():
        return PONG
    return OK * data.count(b"*")


def serve_python_epoll(port: int, path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    listener = socket.create_server((HOST, port), backlog=128)
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    connections: dict[int, socket.socket] = {}
    buf = bytearray(1 << 20)
    while True:
        written: list[bytes] = []
        answers: list[tuple[socket.socket, bytes]] = []
        for ready, _events in poller.poll():
            if ready == listener.fileno():
                conn, _addr = listener.accept()
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                connections[conn.fileno()] = conn
                poller.register(conn.fileno(), select.EPOLLIN)
                continue
            conn = connections[ready]
            try:
                n = conn.recv_into(buf)
            except BlockingIOError:
                continue
            except ConnectionError:
                n = 0
            if not n:
                poller.unregister(ready)
                del connections[ready]
                conn.close()
                continue
            data = bytes(buf[:n])
            written.append(data)
            answers.append((conn, _replies(data)))
        if written:
            os.write(fd, b"".join(written))
            os.fdatasync(fd)
        for conn, reply in answers:
            try:
                conn.sendall(reply)
            except (BlockingIOError, ConnectionError):
                pass  # a floor server: a client that cannot take 5 bytes is gone


def serve_gevent(port: int, path: Path, helper: bool) -> None:
    import gevent.server
    from gevent.hub import Waiter, get_hub

    sys.path.insert(0, str(REPO))
    from meilies.server.syncer import SyncProcess

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    hub = get_hub()
    written: list[bytes] = []
    queued: list[Waiter] = []
    inflight: collections.deque[list[Waiter]] = collections.deque()
    scheduled = False
    syncer = SyncProcess() if helper else None

    def end_of_turn() -> None:
        nonlocal scheduled, queued
        scheduled = False
        if not queued:
            return
        os.write(fd, b"".join(written))
        written.clear()
        waiters, queued = queued, []
        if syncer is None:
            os.fdatasync(fd)
            for waiter in waiters:
                waiter.switch(None)
            return
        syncer.request(fd, path)
        inflight.append(waiters)

    def answered() -> None:
        while inflight:
            try:
                error = syncer.result()
            except BlockingIOError:
                return
            if error is not None:  # the helper failed or died: no figure to give
                print(f"bench_floor: fdatasync helper: {error}", file=sys.stderr, flush=True)
                os._exit(1)
            for waiter in inflight.popleft():
                waiter.switch(None)

    if syncer is not None:
        watcher = hub.loop.io(syncer.fileno(), 1, ref=False)
        watcher.start(answered)

    def handle(conn, _address) -> None:
        nonlocal scheduled
        buf = bytearray(1 << 20)
        while True:
            n = conn.recv_into(buf)
            if not n:
                return
            data = bytes(buf[:n])
            reply = _replies(data)
            if reply is not PONG:
                written.append(data)
                waiter = Waiter()
                queued.append(waiter)
                if not scheduled:
                    scheduled = True
                    hub.loop.run_callback(end_of_turn)
                waiter.get()
            conn.sendall(reply)

    gevent.server.StreamServer((HOST, port), handle, backlog=128).serve_forever()


# -- the benchmark -----------------------------------------------------------------------------

def start(kind: str, workdir: Path, tag: str) -> tuple[ServerProcess, str]:
    """Start one server; returns it and the request format it takes."""
    if kind == "redis":
        return start_redis(workdir, "always", tag), "redis"
    if kind == "meilies":
        return start_meilies(workdir, "always", tag), "meilies"
    port = free_port()
    argv = [sys.executable, __file__, "--serve", kind, "--port", str(port),
            "--file", str(workdir / f"{kind}-{tag}.log")]
    server = ServerProcess(kind, argv, port, workdir / f"{kind}-{tag}.out", cwd=REPO)
    server.wait_ready()
    return server, "meilies"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=1, help="pipeline depth (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="measured seconds per server per round (default 3)")
    parser.add_argument("--only", choices=SERVERS, action="append",
                        help="run only this server (repeatable; redis is always run)")
    parser.add_argument("--serve", choices=FLOORS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "python-epoll":
        serve_python_epoll(args.port, args.file)
        return 0
    if args.serve is not None:
        serve_gevent(args.port, args.file, helper=args.serve == "gevent-helper")
        return 0
    if args.depth < 1 or args.rounds < 1 or args.seconds <= 0:
        parser.error("--depth and --rounds must be at least 1, --seconds positive")
    if not redis_available():
        print("bench_floor: /usr/bin/redis-server is missing: the figures are ratios to "
              "Redis (apt-get install redis-server)", file=sys.stderr)
        return 2
    import bench_server  # the publish loop, the same client as bench_server.py's

    kinds = ["redis"] + [k for k in SERVERS[1:] if not args.only or k in args.only]
    runs: dict[str, list[float]] = {kind: [] for kind in kinds}
    cpu: dict[str, list[dict]] = {kind: [] for kind in kinds}
    workdir = Path(tempfile.mkdtemp(prefix="meilies-floor-"))
    load_before = os.getloadavg()
    started = time.perf_counter()
    try:
        for round_ in range(args.rounds):
            for kind in kinds:
                server, wire = start(kind, workdir, str(round_))
                try:
                    result = bench_server.run_publish(
                        wire, server, b"floor", args.depth, 4, args.seconds, 0.5, 10**9, 300)
                finally:
                    server.stop()
                runs[kind].append(round(result["events_per_s"]))
                cpu[kind].append(result["cpu"])
                log(f"round {round_ + 1}/{args.rounds} {kind}: "
                    f"{result['events_per_s']:,.0f} events/s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {kind: median(values) for kind, values in runs.items()}
    report = {
        "meta": {
            "tool": "tools/bench_floor.py", "argv": sys.argv[1:],
            "depth": args.depth, "connections": 4, "event_bytes": 100,
            "rounds": args.rounds, "seconds_per_run": args.seconds,
            "seconds": round(time.perf_counter() - started, 1),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "notes": ["events/s: median over rounds; ratio: to Redis' median",
                      "python-epoll, gevent, gevent-helper: upper bounds, not servers "
                      "(see the module docstring)"],
        },
        "events_per_s": {kind: round(value) for kind, value in medians.items()},
        "ratio_to_redis": {kind: round(value / medians["redis"], 3)
                           for kind, value in medians.items()},
        "runs": runs,
        "cpu": cpu,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
