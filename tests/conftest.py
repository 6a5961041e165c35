"""Fixtures shared by every test folder."""

from __future__ import annotations

import errno
import os

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


class FailingFdatasync:
    """Stands in for ``os.fdatasync`` (the system call, not the engine): fails with EIO
    while ``failing`` is set. A healthy disk gives no other way to see a sync fail."""

    def __init__(self, real) -> None:
        self.real = real
        self.failing = False

    def __call__(self, fd: int) -> None:
        if self.failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.real(fd)


@pytest.fixture
def fdatasync(monkeypatch) -> FailingFdatasync:
    stand_in = FailingFdatasync(os.fdatasync)
    monkeypatch.setattr(os, "fdatasync", stand_in)
    return stand_in
