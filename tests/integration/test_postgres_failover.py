"""A 3-node PostgreSQL cluster (a primary and two synchronous standbys, ``ANY 1``)
under two MeiliES servers: ``kill -9`` of the primary under load, a standby promoted
by hand, and nothing acknowledged lost (issue 14).

The servers are given all three nodes in one DSN with
``target_session_attrs=read-write`` and are never restarted: they find the promoted
node themselves. Writers retry every request that failed with the same ids until it
is answered; at the end every acknowledged event is where its reply said, every id is
stored once, both servers hold the same log, and subscribers on both saw it with no
gap and no duplicate.
"""

from __future__ import annotations

import threading
import time

from meilies.client import Client, MeiliesError
from pgproc import PostgresProcess
from serverproc import DEADLINE, ServerProcess, wait_for

from test_postgres_backend import Collector

WRITERS_PER_SERVER = 2
#: Acknowledged writes per writer before the kill, and after the promotion.
BEFORE, AFTER = 40, 40


class Writer(threading.Thread):
    """Appends ``<stream>-<i>`` with id and exact expected version, retrying each one
    until it is answered."""

    def __init__(self, port: int, stream: str) -> None:
        super().__init__(daemon=True)
        self.port, self.stream = port, stream
        self.acked: list[tuple[int, int]] = []  # (number, position) of event i
        self.errors = 0
        self.stop = False

    def run(self) -> None:
        client = Client(port=self.port, timeout=DEADLINE)
        i = 0
        while not self.stop:
            try:
                result = client.append(self.stream, [("e", f"{self.stream}-{i}")],
                                       expected="none" if i == 0 else i - 1,
                                       ids=[f"{self.stream}-{i}"])
            except MeiliesError:
                self.errors += 1  # unavailable, or the outcome is unknown: same ids again
                time.sleep(0.05)  # pacing the retries, not a wait for correctness
                continue
            self.acked.append((int(result), result.last_position))
            i += 1
        client.close()


def test_primary_killed_standby_promoted_nothing_acknowledged_lost(tmp_path):
    primary = PostgresProcess(tmp_path / "p").init(max_wal_senders="10",
                                                   wal_keep_size="512MB")
    primary.start()
    primary.create_database("meilies")
    standbys = [primary.standby(tmp_path / name, name) for name in ("s1", "s2")]
    nodes = [primary, *standbys]
    servers, watchers, writers = [], [], []
    try:
        for standby in standbys:
            standby.start()
        primary.query("ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (s1, s2)'")
        primary.query("SELECT pg_reload_conf()")
        wait_for(lambda: len(primary.query("SELECT 1 FROM pg_stat_replication WHERE"
                                           " sync_state = 'quorum'")) == 2,
                 what="two quorum standbys")
        dsn = ("host=" + ",".join("127.0.0.1" for _ in nodes) + " port="
               + ",".join(str(n.port) for n in nodes)
               + " user=postgres dbname=meilies target_session_attrs=read-write"
               " connect_timeout=5")
        servers = [ServerProcess(tmp_path / f"m{k}", "--backend", "postgres",
                                 "--postgres-dsn", dsn).start() for k in range(2)]
        watchers = [Collector(s.port, "$all@0") for s in servers]
        writers = [Writer(s.port, f"w{k}-{j}") for k, s in enumerate(servers)
                   for j in range(WRITERS_PER_SERVER)]
        for writer in writers:
            writer.start()
        wait_for(lambda: all(len(w.acked) >= BEFORE for w in writers),
                 what="acknowledged writes before the kill")

        primary.kill9()
        lsn = {s: s.query("SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0')")[0][0]
               for s in standbys}
        promoted = max(standbys, key=lambda s: lsn[s])
        other = standbys[1 - standbys.index(promoted)]
        promoted.promote()
        other.follow(promoted, "s2" if promoted is standbys[0] else "s1")
        marks = [len(w.acked) for w in writers]
        wait_for(lambda: all(len(w.acked) >= m + AFTER for w, m in zip(writers, marks)),
                 timeout=DEADLINE * 3, what="acknowledged writes after the promotion")
        for writer in writers:
            writer.stop = True
        for writer in writers:
            writer.join(DEADLINE)

        clients = [Client(port=s.port) for s in servers]
        wait_for(lambda: len({c.last_position() for c in clients}) == 1,
                 what="both replicas at PostgreSQL's head")  # the writers have stopped
        for client in clients:
            client.close()
        logs = []
        for server in servers:
            client = Client(port=server.port)
            logs.append([(e.position, e.stream, e.number, e.data, e.id, e.timestamp)
                         for e in client.range("$all", "-", "+", count=100_000)])
            client.close()
        assert logs[0] == logs[1]
        log = logs[0]
        assert [p for p, *_ in log] == list(range(len(log)))
        ids = [event_id for *_, event_id, _ts in log]
        assert len(ids) == len(set(ids))  # nothing stored twice
        at = {event_id: (number, position) for position, _s, number, _d, event_id, _t in log}
        for writer in writers:
            for i, acked in enumerate(writer.acked):
                assert at[f"{writer.stream}-{i}"] == acked  # as its reply said
        # Only events written by the writers, each stream dense from 0.
        for writer in writers:
            numbers = [n for _p, s, n, *_ in log if s == writer.stream]
            assert numbers == list(range(len(numbers)))
            assert len(numbers) in (len(writer.acked), len(writer.acked) + 1)
        for watcher in watchers:
            seen = watcher.wait_count(len(log))
            assert [(e.position, e.stream, e.number, e.data, e.id, e.timestamp)
                    for e in seen[:len(log)]] == log
        assert sum(w.errors for w in writers) > 0  # the kill was felt
    finally:
        for writer in writers:
            writer.stop = True
        for watcher in watchers:
            watcher.close()
        for server in servers:
            server.kill()
        for node in nodes:
            node.stop()
