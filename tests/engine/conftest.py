"""Fixtures of the engine tests: every configuration a scenario should run under.

After NATS ``testFileStoreAllPermutations``: recovery scenarios run under each fsync
policy crossed with a tiny segment size (a roll every few records) and the default.
"""

from __future__ import annotations

import errno
import os

import pytest

from meilies.engine.log import DEFAULT_SEGMENT_SIZE

#: A segment this small holds two or three records: reads and recovery cross files.
TINY_SEGMENT = 400


@pytest.fixture(params=["always", "everysec", "no"])
def fsync_policy(request) -> str:
    return request.param


@pytest.fixture(params=[TINY_SEGMENT, DEFAULT_SEGMENT_SIZE],
                ids=["tiny-segments", "default-segments"])
def segment_size(request) -> int:
    return request.param


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
