"""Fixtures shared by the server and integration tests."""

from __future__ import annotations

import pytest

from serverproc import ServerProcess


@pytest.fixture
def start_server(tmp_path):
    """Start ``meilies-server`` with extra arguments; every one started is stopped."""
    started: list[ServerProcess] = []

    def start(*args: str, data_dir=None, port=None, wait=True) -> ServerProcess:
        server = ServerProcess(data_dir or tmp_path / "data", *args, port=port)
        started.append(server)
        return server.start(wait=wait)

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def server(start_server) -> ServerProcess:
    """A server with the defaults (``--fsync always``)."""
    return start_server()
