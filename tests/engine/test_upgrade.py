"""A data directory written by an older format version opens, reads and grows under
the newest (``fmt.FORMAT_VERSION``).

``data/format-v1`` was written by MeiliES at commit e5d1596 (the last version 1
writer), ``data/format-v2`` at commit 8586353 (the last version 2 writer), each by
``Engine.open(d, fsync="always", segment_size=2048)``, then
``engine.append(stream, events)`` for each of :func:`v1_batches`, ``sync()`` and a
clean ``close()`` (the ``LOCK`` file removed). Four segments: three sealed, the newest
active, all of the fixture's version. Tests work on a copy; a fixture is never opened
in place.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine_helpers import (crash_copy, read_everything, record_spans, resp_frame,
                            segment_files)
from meilies.engine import Engine, fsck
from meilies.engine import format as fmt

FIXTURES = {1: Path(__file__).parent / "data" / "format-v1",
            2: Path(__file__).parent / "data" / "format-v2"}
SEGMENT_SIZE = 2048


def v1_batches() -> list[tuple[bytes, list[tuple[bytes, bytes]]]]:
    """The appends behind the fixture, in order: (stream, [(event name, data), ...])."""
    out = []
    for i in range(40):
        stream = b"orders-%d" % (i % 3)
        if i % 4 == 0:
            out.append((stream, [(b"created", b'{"n": %d}' % i), (b"paid", b""),
                                 (b"shipped", b"\r\n\x00\xff")]))
        else:
            out.append((stream, [(b"touched", bytes(range(i % 7)) * 9)]))
    return out


def expected_events(batches) -> list[tuple[bytes, int, bytes, bytes, int]]:
    """(stream, number, name, data, position) of every event the batches append."""
    numbers: dict[bytes, int] = {}
    out = []
    for stream, events in batches:
        for name, data in events:
            number = numbers.get(stream, 0)
            numbers[stream] = number + 1
            out.append((stream, number, name, data, len(out)))
    return out


def segment_version(path: Path) -> int:
    return fmt.decode_segment_header(path.read_bytes()[:fmt.SEGMENT_HEADER_SIZE]).version


def record_versions(path: Path) -> set[int]:
    raw = path.read_bytes()
    return {fmt.decode_record_header(raw, span.offset).version for span in record_spans(path)}


@pytest.fixture(params=sorted(FIXTURES), ids=lambda v: f"v{v}")
def old_version(request) -> int:
    return request.param


@pytest.fixture
def v1_dir(tmp_path, old_version) -> Path:
    """A copy of the fixture written by ``old_version`` (1 or 2)."""
    return Path(shutil.copytree(FIXTURES[old_version], tmp_path / "data"))


def test_the_fixture_is_all_of_its_version(v1_dir, old_version):
    segments = segment_files(v1_dir)
    assert len(segments) == 4
    for path in segments:
        assert segment_version(path) == old_version
        assert record_versions(path) == {old_version}


def test_an_older_directory_reads_back_every_event(v1_dir):
    expected = expected_events(v1_batches())
    with Engine.open(v1_dir, segment_size=SEGMENT_SIZE) as engine:
        assert engine.open_report.used_checkpoint
        assert read_everything(engine) == expected
        for stream in (b"orders-0", b"orders-1", b"orders-2"):
            mine = [e for e in expected if e[0] == stream]
            frames, after = engine.stream_frames(stream, 0)
            assert after == len(mine)
            assert b"".join(frames) == b"".join(resp_frame(s, n, name, data)
                                                for s, n, name, data, _p in mine)
    assert fsck.verify(v1_dir).clean


def test_appends_fill_the_older_segment_then_roll_to_the_newest_version(v1_dir, old_version):
    more = [(b"orders-%d" % (i % 4), [(b"later", b"x" * (i % 50))] * (1 + i % 3))
            for i in range(60)]
    expected = expected_events(v1_batches() + more)
    with Engine.open(v1_dir, segment_size=SEGMENT_SIZE) as engine:
        for stream, events in more[:2]:
            engine.append(stream, events)
        # Still the upgraded directory's active segment: its records keep its version.
        assert len(segment_files(v1_dir)) == 4
        for stream, events in more[2:]:
            engine.append(stream, events)
        engine.sync()
        assert read_everything(engine) == expected
    segments = segment_files(v1_dir)
    assert len(segments) > 5
    versions = [segment_version(path) for path in segments]
    assert versions[:4] == [old_version] * 4 and set(versions[4:]) == {fmt.FORMAT_VERSION}
    for path, version in zip(segments, versions):
        assert record_versions(path) == {version}  # a segment never mixes versions
    with Engine.open(v1_dir, segment_size=SEGMENT_SIZE) as engine:
        assert read_everything(engine) == expected
    report = fsck.verify(v1_dir)
    assert report.clean, report.problems


def test_a_crash_after_the_upgrade_recovers_both_versions(v1_dir, tmp_path):
    more = [(b"orders-9", [(b"late", b"%d" % i)] * 4) for i in range(30)]
    expected = expected_events(v1_batches() + more)
    engine = Engine.open(v1_dir, segment_size=SEGMENT_SIZE)
    try:
        for stream, events in more:
            engine.append(stream, events)
        engine.sync()
        crashed = crash_copy(v1_dir, tmp_path / "crashed")
    finally:
        engine.close()
    with Engine.open(crashed, segment_size=SEGMENT_SIZE) as engine:
        assert read_everything(engine) == expected
    assert fsck.verify(crashed).clean


def test_a_record_of_another_version_than_its_segment_is_damage(tmp_path):
    """A segment never mixes versions: a version 1 record in a newer segment, even
    with a good checksum and the right numbers, is refused by open and by fsck."""
    from meilies.engine import CorruptRecord

    directory = tmp_path / "data"
    with Engine.open(directory) as engine:
        engine.append(b"s", [(b"e", b"0"), (b"e", b"1")])
    [segment] = segment_files(directory)
    newest = fmt.FORMAT_VERSION
    assert segment_version(segment) == newest
    foreign = fmt.encode_record(b"s", 0, 2, 2, [(b"e", b"2"), (b"e", b"3")], version=1)
    after = fmt.encode_record(b"s", 0, 4, 4, [(b"e", b"4")], version=newest)
    at = segment.stat().st_size
    with open(segment, "ab") as handle:
        handle.write(foreign.data + after.data)
    with pytest.raises(CorruptRecord) as refused:
        Engine.open(directory)
    assert refused.value.offset == at and "version 1 record" in refused.value.reason
    report = fsck.verify(directory)
    assert not report.clean
    assert any(p.offset == at and f"version 1 record in a version {newest} segment" in p.reason
               for p in report.problems), report.problems
