"""Figures: the library's recorders on MeiliES, SQLite and PostgreSQL, in one run.

    python3 tools/bench_recorders.py [--rounds 3]

The insert rows are the library's own ``test_performance`` and
``test_concurrent_throughput`` cases (their printed rates, parsed), run with a
recorder of each kind; the select and notification rows are measured here the same
way for all three. Each figure is the median of ``--rounds`` runs, taken in turn.

Every store is durable: ``meilies-server --fsync always`` (its default), SQLite on a
file (the library's WAL mode), PostgreSQL with ``fsync`` and ``synchronous_commit``
on (its defaults). PostgreSQL is a throwaway cluster on a free loopback port, made
with Debian's ``postgresql`` binaries (``apt-get install postgresql``; ``psycopg`` from
PyPI: ``pip install 'psycopg[binary,pool]'``); ``--postgres-port`` uses a running
server instead (user, password and database ``eventsourcing``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
import statistics
import sys
import tempfile
import time
import unittest
from pathlib import Path
from uuid import uuid4

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # serverproc, pgproc

from eventsourcing.persistence import InfrastructureFactory, StoredEvent  # noqa: E402
from eventsourcing.tests import persistence as cases  # noqa: E402
from eventsourcing.utils import Environment  # noqa: E402

from pgproc import PostgresProcess, postgres_bindir  # noqa: E402
from serverproc import ServerProcess  # noqa: E402

#: Events in the aggregate the select row reads.
SELECT_EVENTS = 10
SELECTS = 1000
#: Events the notification row reads, in pages of NOTIFICATION_PAGE.
NOTIFICATIONS = 10_000
NOTIFICATION_PAGE = 500

RATE = re.compile(r"(\d+) inserts per second")


class Backend:
    def __init__(self, name: str, settings: dict[str, str], fresh) -> None:
        self.name = name
        self.settings = settings
        self.fresh = fresh  # () -> settings of an empty store (or namespace)
        self.factories: list[InfrastructureFactory] = []

    def factory(self, app_name: str) -> InfrastructureFactory:
        env = {**self.settings, **self.fresh()}
        factory = InfrastructureFactory.construct(Environment(app_name, env))
        self.factories.append(factory)
        return factory

    def measure(self, measure) -> float:
        try:
            return measure(self)
        finally:
            for factory in self.factories:
                factory.close()
            self.factories.clear()


def run_case(base: type, method: str, make_recorder) -> float:
    """Run one of the library's test methods with our recorder; its printed rate."""
    case_class = type(f"Bench{base.__name__}", (base,), {
        "create_recorder": lambda self: make_recorder()})
    case = case_class(method)
    output = io.StringIO()
    result = unittest.TestResult()
    with contextlib.redirect_stdout(output):
        case.run(result)
    if result.errors or result.failures:
        raise RuntimeError((result.errors + result.failures)[0][1])
    return float(RATE.search(output.getvalue()).group(1))


def select_rate(backend: Backend) -> float:
    recorder = backend.factory(f"Select{uuid4().hex[:8]}").application_recorder()
    oid = uuid4()
    recorder.insert_events([StoredEvent(oid, v, "topic1", b"state1")
                            for v in range(1, SELECT_EVENTS + 1)])
    recorder.select_events(oid)
    started = time.perf_counter()
    for _ in range(SELECTS):
        assert len(recorder.select_events(oid)) == SELECT_EVENTS
    return SELECTS / (time.perf_counter() - started)


def notification_rate(backend: Backend) -> float:
    recorder = backend.factory(f"Notes{uuid4().hex[:8]}").application_recorder()
    start = None
    for _ in range(NOTIFICATIONS // 100):
        oid = uuid4()
        ids = recorder.insert_events([StoredEvent(oid, v, "topic1", b"state1" * 10)
                                      for v in range(1, 101)])
        start = ids[0] - 1 if start is None else start
    # Read from this application's first notification, as its followers do: MeiliES
    # shares one log among the applications on a server (the earlier rows' events
    # precede these), which the store with a table per application has not to skip.
    started = time.perf_counter()
    seen = 0
    position = start
    while seen < NOTIFICATIONS:
        page = recorder.select_notifications(position, NOTIFICATION_PAGE,
                                             inclusive_of_start=False)
        seen += len(page)
        position = page[-1].id
    return seen / (time.perf_counter() - started)


ROWS = [
    ("insert 1 event (AggregateRecorder test_performance), inserts/s",
     lambda b: run_case(cases.AggregateRecorderTestCase, "test_performance",
                        lambda: b.factory(f"Agg{uuid4().hex[:8]}").aggregate_recorder())),
    ("insert 1 event (ApplicationRecorder test_performance), inserts/s",
     lambda b: run_case(cases.ApplicationRecorderTestCase, "test_performance",
                        lambda: b.factory(f"App{uuid4().hex[:8]}").application_recorder())),
    ("insert 1 event + tracking (ProcessRecorder test_performance), inserts/s",
     lambda b: run_case(cases.ProcessRecorderTestCase, "test_performance",
                        lambda: b.factory(f"Proc{uuid4().hex[:8]}").process_recorder())),
    ("insert 50 events x 4 threads (test_concurrent_throughput), events/s",
     lambda b: run_case(cases.ApplicationRecorderTestCase, "test_concurrent_throughput",
                        lambda: b.factory(f"Conc{uuid4().hex[:8]}").application_recorder())),
    (f"select an aggregate's {SELECT_EVENTS} events, selects/s", select_rate),
    (f"select_notifications, pages of {NOTIFICATION_PAGE}, notifications/s",
     notification_rate),
]


@contextlib.contextmanager
def postgres_cluster(port: int | None):
    """A PostgreSQL server on loopback with user/password/database ``eventsourcing``:
    the one at ``port``, or a throwaway one (the tests' pgproc.py, with fsync on)."""
    if port is not None:
        yield port
        return
    if postgres_bindir() is None:
        raise SystemExit("no PostgreSQL binaries: apt-get install postgresql"
                         " (or give --postgres-port)")
    directory = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    pg = PostgresProcess(directory).init()
    pg.configure(fsync="on", full_page_writes="on")  # as a deployment runs it
    pg.start()
    try:
        import psycopg

        with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
            conn.execute("CREATE USER eventsourcing WITH PASSWORD 'eventsourcing'")
            conn.execute("CREATE DATABASE eventsourcing OWNER eventsourcing")
        yield pg.port
    finally:
        pg.stop()
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres-port", type=int)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-recorders-"))
    server = ServerProcess(work / "meilies").start()
    try:
        with postgres_cluster(args.postgres_port) as pg_port:
            backends = [
                Backend("MeiliES", {"PERSISTENCE_MODULE": "meilies.eventsourcing",
                                    "MEILIES_PORT": str(server.port)}, dict),
                Backend("SQLite (file)", {"PERSISTENCE_MODULE": "eventsourcing.sqlite"},
                        lambda: {"SQLITE_DBNAME": str(work / f"{uuid4().hex}.db")}),
                Backend("PostgreSQL", {
                    "PERSISTENCE_MODULE": "eventsourcing.postgres",
                    "POSTGRES_DBNAME": "eventsourcing", "POSTGRES_HOST": "127.0.0.1",
                    "POSTGRES_PORT": str(pg_port), "POSTGRES_USER": "eventsourcing",
                    "POSTGRES_PASSWORD": "eventsourcing"}, dict),
            ]
            table = []
            for label, measure in ROWS:
                # Rounds go round the backends, so that a slow spell of the machine
                # (a disk busy elsewhere) falls on all of them alike.
                rates: list[list[float]] = [[] for _ in backends]
                for _ in range(args.rounds):
                    for backend, backend_rates in zip(backends, rates):
                        backend_rates.append(backend.measure(measure))
                for backend, backend_rates in zip(backends, rates):
                    print(f"  {backend.name:14} {label}: "
                          + ", ".join(f"{r:,.0f}" for r in backend_rates), file=sys.stderr)
                table.append((label, [statistics.median(r) for r in rates]))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    names = [b.name for b in backends]
    print(f"| median of {args.rounds} | " + " | ".join(names) + " | MeiliES / PostgreSQL |")
    print("|---|" + "---:|" * (len(names) + 1))
    for label, figures in table:
        ratio = figures[0] / figures[2]
        print(f"| {label} | " + " | ".join(f"{f:,.0f}" for f in figures)
              + f" | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
