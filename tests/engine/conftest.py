"""Fixtures of the engine tests: every configuration a scenario should run under.

After NATS ``testFileStoreAllPermutations``: recovery scenarios run under each fsync
policy crossed with a tiny segment size (a roll every few records) and the default.
"""

from __future__ import annotations

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
