"""The postgres backend's failure semantics and its multi-server guarantees, on real
PostgreSQL servers (pgproc.py) and the real server process (issue 14).

- PostgreSQL unreachable at start: one line on stderr, exit 1.
- PostgreSQL gone during service: writes get ``-ERR backend unavailable``, reads and
  subscriptions go on from the replica and resume when it is back; the server lives.
- A commit whose wait for a synchronous standby is cancelled: the client hears
  ``outcome: not replicated``; the event is stored on the primary; a retry with the
  same id gets the first reply once the standby is back.
- Two servers on one database: expected-version races have one winner each, and
  ``$all@0`` subscribers on both servers see the same sequence.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from meilies.client import Client, ResponseError, WrongExpectedVersion
from pgproc import PostgresProcess
from serverproc import DEADLINE, ServerProcess, free_port, wait_for
from test_disk_full import disks, fill, free  # noqa: F401 (disks: a fixture)


@pytest.fixture
def pg(tmp_path):
    process = PostgresProcess(tmp_path / "pg").init()
    process.start()
    yield process
    process.stop()


def start(tmp_path, dsn: str, name: str = "data") -> ServerProcess:
    return ServerProcess(tmp_path / name, "--backend", "postgres", "--postgres-dsn",
                         dsn).start()


class Collector:
    """A subscription read in a thread, every event kept in arrival order."""

    def __init__(self, port: int, spec: str) -> None:
        self.client = Client(port=port)
        self.subscription = self.client.subscribe(spec, full=True)
        self.events = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for event in self.subscription:
            self.events.append(event)

    def wait_count(self, count: int) -> list:
        wait_for(lambda: len(self.events) >= count, what=f"{count} events")
        return list(self.events)

    def close(self) -> None:
        self.subscription.close()
        self.client.close()


def test_unreachable_at_start_is_one_line_and_exit_1(tmp_path):
    port = free_port()  # nothing listens there
    proc = subprocess.run(
        [sys.executable, "-m", "meilies.cli.server", "--data-dir", str(tmp_path / "d"),
         "--port", str(free_port()), "--backend", "postgres", "--postgres-dsn",
         f"host=127.0.0.1 port={port} user=postgres dbname=x connect_timeout=5"],
        capture_output=True, text=True, timeout=DEADLINE)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("meilies-server:")]
    assert len(errors) == 1 and "cannot reach PostgreSQL" in errors[0], proc.stderr


def test_missing_dsn_is_refused(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "meilies.cli.server", "--data-dir", str(tmp_path / "d"),
         "--backend", "postgres"], capture_output=True, text=True, timeout=DEADLINE,
        env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert "needs --postgres-dsn" in proc.stderr


def test_outage_during_service(tmp_path, pg):
    server = start(tmp_path, pg.create_database("outage"))
    client = Client(port=server.port)
    subscriber = Collector(server.port, "s:0")
    try:
        for i in range(3):
            client.publish("s", "e", f"before-{i}")
        subscriber.wait_count(3)
        pg.stop()
        with pytest.raises(ResponseError, match="backend unavailable"):
            client.publish("s", "e", "during")
        assert b"backend_available:0" in client.execute_command("info")
        # Reads are served from the replica meanwhile.
        assert [e.data for e in client.range("s")] == [b"before-0", b"before-1", b"before-2"]
        pg.start()

        def published() -> bool:
            try:
                client.publish("s", "e", "after")
                return True
            except ResponseError as exc:
                assert "backend unavailable" in str(exc)
                return False
        wait_for(published, what="a publish once PostgreSQL is back")
        assert b"backend_available:1" in client.execute_command("info")
        events = subscriber.wait_count(4)
        assert [(e.number, e.data) for e in events] == \
            [(0, b"before-0"), (1, b"before-1"), (2, b"before-2"), (3, b"after")]
        assert server.proc.poll() is None
        assert "PostgreSQL unavailable" in server.log()
    finally:
        subscriber.close()
        client.close()
        server.kill()


def test_cancelled_replication_wait_is_reported_and_retry_is_safe(tmp_path, pg):
    import psycopg

    dsn = pg.create_database("syncrep")
    start(tmp_path, dsn).stop()  # the schema, made while commits need no standby
    with psycopg.connect(pg.dsn("postgres"), autocommit=True) as admin:
        # A synchronous standby that never comes: every commit waits for it. Set before
        # the server connects, so that its sessions start with it.
        admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'ghost'")
        admin.execute("SELECT pg_reload_conf()")
    wait_for(lambda: _setting(pg, "synchronous_standby_names") == "ghost",
             what="the setting to apply")
    server = start(tmp_path, dsn)
    client = Client(port=server.port)
    admin = psycopg.connect(pg.dsn("postgres"), autocommit=True)
    try:
        outcome = {}

        def write() -> None:
            try:
                outcome["reply"] = client.append("s", [("e", "first")], ids=["id-0"])
            except ResponseError as exc:
                outcome["error"] = str(exc)
        writer = threading.Thread(target=write)
        writer.start()
        pid = wait_for(lambda: admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'").fetchone(),
            what="a commit waiting for the standby")[0]
        admin.execute("SELECT pg_cancel_backend(%s)", (pid,))
        writer.join(DEADLINE)
        assert "backend unavailable" in outcome.get("error", "") and \
            "outcome: not replicated" in outcome["error"], outcome
        # Committed on the primary: stored, and readable.
        assert [e.data for e in client.range("s")] == [b"first"]
        # The standby requirement goes (a restart, so that every session has it).
        admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
        admin.close()
        pg.stop()
        pg.start()

        def retried():
            try:
                return [client.append("s", [("e", "first")], ids=["id-0"])]
            except ResponseError as exc:
                assert "backend unavailable" in str(exc)
                return None
        result, = wait_for(retried, what="the retry once PostgreSQL is back")
        assert (int(result), result.last_position) == (0, 0)  # the first reply, once
        assert len(client.range("s")) == 1
    finally:
        admin.close()
        client.close()
        server.kill()


def _setting(pg, name: str) -> str:
    import psycopg

    with psycopg.connect(pg.dsn("postgres")) as conn:
        return conn.execute(f"SHOW {name}").fetchone()[0]


ROUNDS = 60


def test_two_servers_one_database(tmp_path, pg):
    """Each round, a client of each server appends to the same stream with the same
    expected version at once (a barrier releases both): exactly one wins, the other is
    told the stream moved on, whichever commits first. Then both servers' ``$all@0``
    subscribers have seen the same log."""
    dsn = pg.create_database("shared")
    a, b = start(tmp_path, dsn, "a"), start(tmp_path, dsn, "b")
    watchers = [Collector(a.port, "$all@0"), Collector(b.port, "$all@0")]
    barrier = threading.Barrier(2, timeout=DEADLINE)
    outcomes: dict[str, list] = {"a": [], "b": []}

    def race(name: str, port: int) -> None:
        client = Client(port=port)
        try:
            for k in range(ROUNDS):
                barrier.wait()
                try:
                    number = client.append("race", [("e", f"{name}-{k}")],
                                           expected="none" if k == 0 else k - 1)
                    outcomes[name].append(int(number))
                except WrongExpectedVersion as exc:
                    outcomes[name].append(("lost", exc.actual))
        finally:
            client.close()
    threads = [threading.Thread(target=race, args=("a", a.port)),
               threading.Thread(target=race, args=("b", b.port))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE * 2)
        assert len(outcomes["a"]) == len(outcomes["b"]) == ROUNDS
        client = Client(port=a.port)
        stored = client.range("race")
        client.close()
        assert len(stored) == ROUNDS  # one winner per round, numbers dense
        for k, (x, y) in enumerate(zip(outcomes["a"], outcomes["b"])):
            winner = "a" if x == k else "b"
            assert (x, y) in ((k, ("lost", k)), (("lost", k), k)), (k, x, y)
            assert stored[k].data == f"{winner}-{k}".encode()
        seen = [w.wait_count(ROUNDS) for w in watchers]
        for events in seen:
            assert [e.position for e in events] == list(range(ROUNDS))
        assert [(e.stream, e.number, e.data, e.timestamp) for e in seen[0]] == \
            [(e.stream, e.number, e.data, e.timestamp) for e in seen[1]]
    finally:
        for watcher in watchers:
            watcher.close()
        a.kill()
        b.kill()


def test_a_lost_replica_is_rebuilt_with_the_same_positions_and_stamps(tmp_path, pg):
    dsn = pg.create_database("rebuild")
    server = start(tmp_path, dsn)
    client = Client(port=server.port)
    client.publish_many("a", [("e", str(i)) for i in range(300)])
    with client.transaction() as tx:
        tx.append("b", [("e", "x")], ids=["tx-1"])
        tx.append("a", [("e", "y")], metadata="m")
    before = client.range("$all", "-", "+", count=1000)
    client.close()
    assert server.stop() == 0
    import shutil

    shutil.rmtree(tmp_path / "data")  # derived data: PostgreSQL has the log
    server = start(tmp_path, dsn)
    client = Client(port=server.port)
    try:
        assert client.range("$all", "-", "+", count=1000) == before
        assert "replica caught up: applied 302 events" in server.log()
        with pytest.raises(ResponseError, match="DUPLICATEID"):
            client.append("c", [("e", "z")], ids=["tx-1"])
    finally:
        client.close()
        server.kill()


def test_a_replica_of_another_log_is_moved_aside_and_rebuilt(tmp_path, pg):
    first, second = pg.create_database("first"), pg.create_database("second")
    server = start(tmp_path, first)
    client = Client(port=server.port)
    client.publish("s", "e", "from-first")
    client.close()
    assert server.stop() == 0
    other = start(tmp_path, second, "other")
    client = Client(port=other.port)
    client.publish("s", "e", "from-second")
    client.close()
    assert other.stop() == 0
    server = start(tmp_path, second)  # the directory holds the first database's replica
    client = Client(port=server.port)
    try:
        assert [e.data for e in client.range("s")] == [b"from-second"]
        assert "does not match PostgreSQL's log" in server.log()
        aside = [p for p in tmp_path.iterdir() if p.name.startswith("data.diverged-")]
        assert len(aside) == 1  # kept, not deleted
    finally:
        client.close()
        server.kill()


def test_a_database_of_a_newer_schema_is_refused(tmp_path, pg):
    import psycopg

    dsn = pg.create_database("newer")
    start(tmp_path, dsn).stop()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE meilies_schema SET version = 99")
    proc = subprocess.run(
        [sys.executable, "-m", "meilies.cli.server", "--data-dir", str(tmp_path / "data"),
         "--port", str(free_port()), "--backend", "postgres"], capture_output=True, text=True,
        timeout=DEADLINE, env={"PATH": "/usr/bin:/bin", "MEILIES_POSTGRES_DSN": dsn})
    assert proc.returncode == 1
    assert "schema is version 99" in proc.stderr and "upgrade meilies" in proc.stderr


def test_a_replica_whose_disk_is_full_catches_up_once_space_returns(tmp_path, pg, disks):
    """PostgreSQL commits a write, the replica's disk refuses it: the writer hears
    that it is committed but not applied (a retry with its ids would get its first
    reply), reads keep serving what the replica has, and once space returns the replica
    applies it without a restart."""
    point = disks.tmpfs("replica", "4m")
    server = disks.server(point / "data", "--backend", "postgres", "--postgres-dsn",
                          pg.create_database("diskfull"))
    client = Client(port=server.port)
    try:
        client.publish("s", "e", "before")
        filler = fill(point)
        with pytest.raises(ResponseError, match="committed, but the replica could not"
                                                " apply it.*outcome: stored"):
            client.publish("s", "e", "x" * 200_000)
        assert [e.data for e in client.range("s")] == [b"before"]
        free(filler, 2 << 20)
        wait_for(lambda: len(client.range("s")) == 2, what="the replica to catch up")
        client.publish("s", "e", "after")
        assert [e.data for e in client.range("s")] == [b"before", b"x" * 200_000, b"after"]
        assert server.proc.poll() is None
    finally:
        client.close()
