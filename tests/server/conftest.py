"""Every black-box server test runs against both backends (issue 14): the embedded
engine, and PostgreSQL as the log of record with the server's data directory as its
replica. A test that is about the embedded engine's own files or fsync says so with
``@pytest.mark.embedded_only`` and runs once.

The PostgreSQL server is real (pgproc.py), one per test session; each data directory
a test starts servers on gets a database of its own, so a restart on the same
directory finds its events and a fresh directory starts empty, as with the embedded
engine.
"""

from __future__ import annotations

import hashlib

import pytest

from pgproc import PostgresProcess
from serverproc import ServerProcess


def pytest_configure(config):
    config.addinivalue_line("markers", "embedded_only: about the embedded engine's files,"
                            " fsync or recovery; not run against --backend postgres")


def pytest_collection_modifyitems(config, items):
    """Leave out the postgres variant of an ``embedded_only`` test (deselected: it does
    not apply, it is not skipped for want of something)."""
    kept, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "postgres" and \
                item.get_closest_marker("embedded_only"):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def postgres(tmp_path_factory) -> PostgresProcess:
    pg = PostgresProcess(tmp_path_factory.mktemp("postgres")).init(max_connections="300")
    pg.start()
    yield pg
    pg.stop()


@pytest.fixture(params=["embedded", "postgres"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def start_server(tmp_path, backend, request):
    """Start ``meilies-server`` with extra arguments on the test's backend; every one
    started is stopped."""
    started: list[ServerProcess] = []
    pg = request.getfixturevalue("postgres") if backend == "postgres" else None

    def start(*args: str, data_dir=None, port=None, wait=True) -> ServerProcess:
        data_dir = data_dir or tmp_path / "data"
        if pg is not None:
            name = "m_" + hashlib.sha1(str(data_dir).encode()).hexdigest()[:20]
            args = ("--backend", "postgres", "--postgres-dsn", pg.create_database(name),
                    *args)
        server = ServerProcess(data_dir, *args, port=port)
        started.append(server)
        return server.start(wait=wait)

    yield start
    for server in started:
        server.kill()
