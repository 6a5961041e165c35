"""Fixtures of the engine tests: every configuration a scenario should run under.

After NATS ``testFileStoreAllPermutations``: recovery scenarios run under each fsync
policy crossed with a tiny segment size (a roll every few records) and the default.
"""

from __future__ import annotations

import pytest

from meilies.engine import Engine
from meilies.engine.log import DEFAULT_SEGMENT_SIZE

#: A segment this small holds two or three records: reads and recovery cross files.
TINY_SEGMENT = 400


@pytest.fixture(params=["always", "everysec", "no"])
def fsync_policy(request) -> str:
    return request.param


@pytest.fixture(params=[TINY_SEGMENT, DEFAULT_SEGMENT_SIZE], ids=["tiny-segments", "default-segments"])
def segment_size(request) -> int:
    return request.param


@pytest.fixture
def open_engine():
    """``open_engine(dir, **options)``: Engine.open, closed at teardown if still open."""
    engines = []

    def _open(directory, **options):
        engine = Engine.open(directory, **options)
        engines.append(engine)
        return engine

    yield _open
    for engine in engines:
        try:
            engine.close()
        except Exception:  # a test that damaged a directory may leave it unclosable
            pass
