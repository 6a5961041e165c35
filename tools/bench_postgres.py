#!/usr/bin/env python3
"""The postgres backend next to the embedded engine and Redis, in one run (issue 14).

Starts a 3-node PostgreSQL cluster on loopback (a primary and two streaming standbys,
``synchronous_standby_names = 'ANY 1 (s1, s2)'``, fsync on: a commit waits for the
primary's WAL flush and one standby's), then three servers:

- ``embedded``: meilies-server --fsync always (the default engine);
- ``postgres``: meilies-server --backend postgres on the cluster's primary;
- ``redis``: redis-server --appendonly yes --appendfsync always.

Figures, medians of ``--runs`` runs with the servers' order alternating (the
measuring loops are bench_server.py's, whose client ceilings README states):

- publish at depth 1 and 64, 4 connections, events/s;
- catch-up: a subscriber replaying N events that were published pipelined
  (``s:0:N``; Redis: XRANGE pages), events/s;
- fan-out: one publisher at depth 64, 100 live subscribers, delivered events/s;
- design (a)'s floor: the same N events read straight from PostgreSQL
  (``SELECT ... ORDER BY position``, pages of 5,000, binary, no RESP built), the
  most a server reading everything from PostgreSQL could send, against the replica's
  catch-up above;
- failover (postgres only, once per run): one client publishing at depth 1 through a
  DSN naming all three nodes (``target_session_attrs=read-write``); the primary is
  killed with SIGKILL and the standby with the most WAL promoted *by hand* at once
  (``pg_ctl promote``, no failure detection: Patroni adds its TTL, ~10-30 s by
  default); the figure is the time from the kill to the first acknowledged publish.

    python3 tools/bench_postgres.py [--runs 3] [--quick]
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # pgproc.py: the tests' PostgreSQL driver

from bench_common import command, log, median, redis_available, start_meilies, start_redis  # noqa: E402
from bench_server import (Settings, preload, replay_meilies, replay_redis,  # noqa: E402
                          run_fanout, run_publish)
from pgproc import PostgresProcess  # noqa: E402
from serverproc import wait_for  # noqa: E402

KINDS = ("embedded", "postgres", "redis")


def start_cluster(workdir: Path) -> list[PostgresProcess]:
    primary = PostgresProcess(workdir / "pg-primary").init(max_wal_senders="10",
                                                           wal_keep_size="1GB")
    primary.configure(fsync="on", max_connections="200")
    primary.start()
    primary.create_database("meilies")
    standbys = [primary.standby(workdir / f"pg-{name}", name) for name in ("s1", "s2")]
    for standby in standbys:
        standby.start()
    primary.query("ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (s1, s2)'")
    primary.query("SELECT pg_reload_conf()")
    wait_for(lambda: len(primary.query("SELECT 1 FROM pg_stat_replication WHERE sync_state"
                                       " = 'quorum'")) == 2, what="two quorum standbys")
    return [primary, *standbys]


def dsn_of(nodes: list[PostgresProcess]) -> str:
    return ("host=" + ",".join("127.0.0.1" for _ in nodes) + " port="
            + ",".join(str(n.port) for n in nodes)
            + " user=postgres dbname=meilies target_session_attrs=read-write"
            " connect_timeout=2")


def read_from_postgres(dsn: str, count: int) -> float:
    """Events/s reading the log's last ``count`` events from PostgreSQL in pages."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        head = conn.execute("SELECT next_position FROM meilies_head").fetchone()[0]
        position = head - count
        t = time.perf_counter()
        cursor = conn.cursor(binary=True)
        while position < head:
            rows = cursor.execute(
                "SELECT position, stream, number, name, data, event_id, metadata,"
                " timestamp_ms FROM meilies_events WHERE position >= %s"
                " ORDER BY position LIMIT 5000", (position,)).fetchall()
            position = rows[-1][0] + 1
        return count / (time.perf_counter() - t)


def failover_seconds(workdir: Path, tag: str) -> float:
    """Kill -9 of the primary to the first acknowledged publish (see the docstring)."""
    nodes = start_cluster(workdir / f"failover-{tag}")
    server = start_meilies(workdir, "always", f"failover-{tag}",
                           ["--backend", "postgres", "--postgres-dsn", dsn_of(nodes)])
    try:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.settimeout(60)
        request = command(b"publish", b"f", b"ev", b"x" * 100)
        for _ in range(200):  # warm: a steady publisher
            sock.sendall(request)
            assert sock.recv(100).startswith(b"+OK")
        primary, standbys = nodes[0], nodes[1:]
        killed = time.perf_counter()
        primary.kill9()
        lsn = {s: s.query("SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0')")[0][0]
               for s in standbys}
        promoted = max(standbys, key=lambda s: lsn[s])
        promoted.promote()
        other = standbys[1 - standbys.index(promoted)]
        other.follow(promoted, "s2" if promoted is standbys[0] else "s1")
        while True:
            sock.sendall(request)
            reply = sock.recv(1000)
            if reply.startswith(b"+OK"):
                return time.perf_counter() - killed
            if not reply.startswith(b"-ERR backend unavailable"):
                raise RuntimeError(f"unexpected reply {reply!r}")
    finally:
        server.stop()
        for node in nodes:
            node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not redis_available():
        raise SystemExit("redis-server is needed (apt-get install redis-server)")
    cfg = Settings(args.quick, args.runs)
    replay_count = cfg.replay_events // 5
    workdir = Path(tempfile.mkdtemp(prefix="bench-postgres-"))
    nodes = start_cluster(workdir)
    servers = {}
    results: dict[tuple, list[float]] = {}
    try:
        servers["embedded"] = start_meilies(workdir, "always", "embedded")
        servers["postgres"] = start_meilies(workdir, "always", "postgres",
                                            ["--backend", "postgres", "--postgres-dsn",
                                             dsn_of(nodes[:1])])
        servers["redis"] = start_redis(workdir, "always", "redis")
        for run in range(args.runs):
            order = KINDS if run % 2 == 0 else tuple(reversed(KINDS))
            for kind in order:
                wire = "redis" if kind == "redis" else "meilies"
                server = servers[kind]
                for depth in (1, 64):
                    r = run_publish(wire, server, b"p-%d-%d" % (run, depth), depth,
                                    cfg.publish_conns, cfg.publish_seconds,
                                    cfg.publish_warmup, max_events=10_000_000,
                                    limit=cfg.loop_limit)
                    results.setdefault((f"publish depth {depth}", kind), []).append(
                        r["events_per_s"])
                    log(f"run {run + 1} {kind}: publish depth {depth}:"
                        f" {r['events_per_s']:,.0f} events/s")
                stream = b"r-%d" % run
                preload(wire, server, stream, replay_count, cfg.loop_limit)
                if wire == "meilies":
                    r = replay_meilies(server, stream, replay_count, cfg.loop_limit)
                else:
                    r = replay_redis(server, stream, replay_count, cfg.replay_page,
                                     cfg.loop_limit)
                results.setdefault(("catch-up", kind), []).append(r["events_per_s"])
                log(f"run {run + 1} {kind}: catch-up of {replay_count:,} events:"
                    f" {r['events_per_s']:,.0f} events/s")
                if kind == "postgres":
                    rate = read_from_postgres(nodes[0].dsn("meilies"), replay_count)
                    results.setdefault(("read from PostgreSQL", kind), []).append(rate)
                    log(f"run {run + 1}: design (a) floor, {replay_count:,} events read"
                        f" from PostgreSQL: {rate:,.0f} events/s")
                r = run_fanout(wire, server, b"f-%d" % run, cfg, cfg.fanout_events, None)
                results.setdefault(("fan-out", kind), []).append(r["delivered_per_s"])
                log(f"run {run + 1} {kind}: fan-out: {r['delivered_per_s']:,.0f}"
                    " delivered/s")
    finally:
        for server in servers.values():
            server.stop()
        for node in nodes:
            node.stop()
    failovers = []
    for run in range(args.runs):
        seconds = failover_seconds(workdir, str(run))
        failovers.append(seconds)
        log(f"run {run + 1}: failover (kill -9 to first acknowledged publish):"
            f" {seconds:.3f} s")

    print(f"\nMedians of {args.runs} runs (events/s; ratios against Redis appendfsync"
          " always in the same run)")
    print("| figure | embedded | postgres (3 nodes) | Redis | postgres / embedded |"
          " postgres / Redis |")
    print("| --- | --- | --- | --- | --- | --- |")
    for figure in ("publish depth 1", "publish depth 64", "catch-up", "fan-out"):
        e, p, r = (median(results[(figure, k)]) for k in KINDS)
        print(f"| {figure} | {e:,.0f} | {p:,.0f} | {r:,.0f} | {p / e:.2f} | {p / r:.2f} |")
    read = median(results[("read from PostgreSQL", "postgres")])
    print(f"| design (a)'s floor: the catch-up's events read from PostgreSQL, no RESP | |"
          f" {read:,.0f} | | | |")
    print(f"| failover: kill -9 of the primary to the first acknowledged publish (promotion"
          f" by hand) | | {median(failovers):.2f} s | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
