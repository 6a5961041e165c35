"""The engine against a model: random operations, then every read compared with a list.

Hypothesis draws sequences of appends (to several streams, batches of 1..5 events,
payloads that look like RESP or hold NUL bytes), expected-version checks that match
and that do not, syncs, checkpoints, clean reopens and crash reopens (a copy of the
directory taken while the engine is open), with segments of 300..2000 bytes so that
rolls happen every few records. After each step the engine's answers are compared with
a plain in-memory model: the list of every event written, in order.

Visibility: with ``fsync="always"`` an event is readable only once a ``sync`` covers it
(a roll syncs too, and the model does not predict rolls), so the model only requires
the visible events to be a prefix of the written ones that contains every synced one;
with ``everysec`` and ``no`` everything written is visible at once.

``MEILIES_MODEL_EXAMPLES`` raises the number of examples for a longer run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from engine_helpers import (crash_copy, newest_segment, read_everything, record_spans, resp_frame,
                            truncate_file)
from meilies.engine import ANY, NO_STREAM, Engine, StorageError, WrongExpectedVersion
from meilies.engine.files import CHECKPOINT_NAME

STREAMS = [b"a", b"orders-17", "\u00e9t\u00e9".encode(), b"s" * 255, b"x-\xe2\x9c\x93", b"B"]
EVENT_NAMES = [b"created", b"e", "\u00f1".encode(), b"$5*x+", b"a b"]
PAYLOADS = [b"", b"\r\n", b"\x00", b"\x00\r\n\x00", b"*5\r\n+event\r\n+a\r\n", b"MREC" * 3,
            b"$-1\r\n", bytes(range(256))]

payloads = st.one_of(st.binary(max_size=120), st.sampled_from(PAYLOADS))
batches = st.lists(st.tuples(st.sampled_from(EVENT_NAMES), payloads), min_size=1, max_size=5)
stream_indexes = st.integers(0, len(STREAMS) - 1)

appends = st.tuples(st.just("append"), stream_indexes, batches,
                    st.sampled_from(["any", "none", "match", "mismatch"]), st.integers(0, 40))
operations = st.one_of(
    appends, appends, appends, appends, appends,
    st.just(("sync",)),
    st.just(("failed_sync",)),
    st.just(("checkpoint",)),
    st.just(("reopen",)),
    st.tuples(st.just("crash"), st.sampled_from([None, "checkpoint", "indexes"])),
    st.tuples(st.just("torn_crash"), st.floats(0, 1)),
    st.tuples(st.just("read_stream"), stream_indexes, st.integers(0, 25),
              st.one_of(st.none(), st.integers(0, 25))),
    st.tuples(st.just("stream_frames"), stream_indexes, st.integers(0, 25), st.integers(1, 5),
              st.integers(1, 400)),
    st.tuples(st.just("all_frames"), st.integers(0, 80), st.integers(1, 6), st.integers(0, 3),
              st.one_of(st.none(), st.integers(1, 6))),
)

EXAMPLES = int(os.environ.get("MEILIES_MODEL_EXAMPLES", "120"))


def assert_whole_frames(views, frames) -> None:
    """Each view ends where a frame ends: views hold whole frames only."""
    ends = set(accumulate(len(f) for f in frames))
    assert set(accumulate(len(v) for v in views)) <= ends


@dataclass
class Model:
    """Every event written, in global order: (stream, number, name, data)."""

    log: list[tuple[bytes, int, bytes, bytes]] = field(default_factory=list)
    written: dict[bytes, int] = field(default_factory=dict)
    #: Events known durable: the engine must show at least these.
    synced: int = 0

    def last(self, stream: bytes) -> int | None:
        count = self.written.get(stream, 0)
        return count - 1 if count else None


class Run:
    """One example: an engine on a fresh directory, and its model."""

    def __init__(self, root: Path, fsync: str, segment_size: int, fdatasync) -> None:
        self.root = root
        self.fdatasync = fdatasync
        self.fsync = fsync
        self.segment_size = segment_size
        self.crashes = 0
        self.directory = root / "data"
        self.engine = self._open()
        self.model = Model()

    def _open(self) -> Engine:
        return Engine.open(self.directory, fsync=self.fsync, segment_size=self.segment_size)

    # -- operations -------------------------------------------------------------------------

    def append(self, stream: bytes, events, kind: str, number: int) -> None:
        model = self.model
        last = model.last(stream)
        if kind == "any":
            expected, fails = ANY, False
        elif kind == "none":
            expected, fails = NO_STREAM, last is not None
        elif kind == "match":
            expected, fails = (NO_STREAM if last is None else last), False
        else:
            expected = number + 1 if number == last else number
            fails = True
        before = self.engine.written_position
        if fails:
            with pytest.raises(WrongExpectedVersion) as caught:
                self.engine.append(stream, events, expected=expected)
            assert caught.value.actual == last
            assert self.engine.written_position == before
            return
        result = self.engine.append(stream, events, expected=expected)
        first = model.written.get(stream, 0)
        assert (result.first_number, result.last_number) == (first, first + len(events) - 1)
        assert result.end_position == before + len(events)
        for i, (name, data) in enumerate(events):
            model.log.append((stream, first + i, name, data))
        model.written[stream] = first + len(events)

    def sync(self) -> None:
        assert self.engine.sync() == len(self.model.log)
        self.model.synced = len(self.model.log)

    def failed_sync(self) -> None:
        """An fdatasync that fails (EIO): under ``always`` every append since the last
        successful sync is taken back; under the other policies they stay."""
        durable = self.engine.durable_position
        self.fdatasync.failing = True
        try:
            if durable < len(self.model.log):
                with pytest.raises(StorageError):
                    self.engine.sync()
            else:  # nothing to make durable: no fdatasync to fail
                assert self.engine.sync() == durable
        finally:
            self.fdatasync.failing = False
        if self.fsync == "always":
            del self.model.log[durable:]
            self.model.written = {}
            for stream, number, _name, _data in self.model.log:
                self.model.written[stream] = number + 1
        assert self.engine.written_position == len(self.model.log)
        self.model.synced = min(self.model.synced, len(self.model.log))

    def checkpoint(self) -> None:
        self.engine.checkpoint()
        self.model.synced = len(self.model.log)

    def reopen(self) -> None:
        self.engine.close()
        self.engine = self._open()
        self.model.synced = len(self.model.log)
        self.check_everything()

    def crash(self, lose: str | None) -> None:
        """Reopen a copy taken while the engine was open: nothing it wrote is lost.

        ``lose`` also deletes derived files from the copy (the checkpoint, or every
        index file), which the engine must rebuild from the log.
        """
        self.crashes += 1
        copy = crash_copy(self.directory, self.root / f"crash-{self.crashes}")
        for path in copy.iterdir():
            if (lose == "checkpoint" and path.name == CHECKPOINT_NAME) or (
                    lose == "indexes" and path.suffix in (".pidx", ".sidx")):
                path.unlink()
        self.engine.close()
        shutil.rmtree(self.directory)
        self.directory = copy
        self.engine = self._open()
        self.model.synced = len(self.model.log)
        self.check_everything()

    def torn_crash(self, fraction: float) -> None:
        """A crash that also tears the tail: the newest segment is cut somewhere in the
        bytes no sync covered. Records cut are lost, every one before stays."""
        durable = self.engine.durable_position
        self.crashes += 1
        copy = crash_copy(self.directory, self.root / f"crash-{self.crashes}")
        newest = newest_segment(copy)
        spans = record_spans(newest)
        unsynced = [span for span in spans if span.base_position >= durable]
        cut = None
        if unsynced:
            low, high = unsynced[0].offset, newest.stat().st_size
            cut = low + int((high - low) * fraction)
            truncate_file(newest, cut)
            keep = next(span.base_position for span in spans if span.end > cut) \
                if cut < high else len(self.model.log)
            del self.model.log[keep:]
            self.model.written = {}
            for stream, number, _name, _data in self.model.log:
                self.model.written[stream] = number + 1
        self.engine.close()
        shutil.rmtree(self.directory)
        self.directory = copy
        self.engine = self._open()
        torn = cut is not None and cut not in {span.offset for span in spans} | {
            spans[-1].end}
        assert len(self.engine.open_report.recovered) == (1 if torn else 0)
        self.model.synced = len(self.model.log)
        self.check_everything()

    # -- what the engine must show ------------------------------------------------------------

    def visible(self) -> list[tuple[bytes, int, bytes, bytes]]:
        seen = self.engine.visible_position
        assert self.model.synced <= seen <= len(self.model.log)
        if self.fsync != "always":
            assert seen == len(self.model.log)
        return self.model.log[:seen]

    def check_counters(self) -> list[tuple[bytes, int, bytes, bytes]]:
        visible = self.visible()
        counts: dict[bytes, int] = {}
        for stream, _number, _name, _data in visible:
            counts[stream] = counts.get(stream, 0) + 1
        for stream in STREAMS:
            count = counts.get(stream, 0)
            assert self.engine.next_number(stream) == count
            assert self.engine.last_event_number(stream) == (count - 1 if count else None)
        assert self.engine.stream_names() == sorted(counts)
        stats = self.engine.stats()
        assert (stats["events"], stats["streams"]) == (len(visible), len(counts))
        return visible

    def check_everything(self) -> None:
        visible = self.check_counters()
        expected = [(s, n, name, data, position)
                    for position, (s, n, name, data) in enumerate(visible)]
        assert read_everything(self.engine) == expected
        for stream in STREAMS:
            frames, after = self.engine.stream_frames(stream, 0, max_events=10**6,
                                                      max_bytes=10**9)
            want = [resp_frame(*event) for event in visible if event[0] == stream]
            assert [bytes(f) for f in frames] == want
            assert after == len(want)

    def read_stream(self, stream: bytes, start: int, stop: int | None) -> None:
        visible = self.visible()
        want = [(n, name, data) for s, n, name, data in visible
                if s == stream and n >= start and (stop is None or n < stop)]
        got = [(e.number, e.name, bytes(e.data), e.stream, e.position)
               for e in self.engine.read_stream(stream, start, stop)]
        assert got == [(n, name, data, stream, None) for n, name, data in want]

    def stream_frames(self, stream: bytes, start: int, max_events: int, max_bytes: int) -> None:
        visible = self.visible()
        want = [resp_frame(*e) for e in visible if e[0] == stream and e[1] >= start]
        got = []
        number = start
        while True:
            frames, after = self.engine.stream_frames(stream, number, max_events=max_events,
                                                      max_bytes=max_bytes)
            if not frames:
                assert after == number
                break
            assert len(frames) <= max_events
            assert len(frames) == 1 or sum(len(f) for f in frames) <= max_bytes
            assert after == number + len(frames)
            # The same read as few views: the same bytes, whole frames in each view.
            views, spans_after = self.engine.stream_spans(stream, number, max_events=max_events,
                                                          max_bytes=max_bytes)
            assert spans_after == after and len(views) <= len(frames)
            assert b"".join(views) == b"".join(frames)
            assert_whole_frames(views, frames)
            got += [bytes(f) for f in frames]
            number = after
        assert got == want

    def all_frames(self, position: int, max_events: int, min_number: int,
                   max_number: int | None) -> None:
        visible = self.visible()
        want = [resp_frame(*e) for p, e in enumerate(visible)
                if p >= position and e[1] >= min_number
                and (max_number is None or e[1] < max_number)]
        got = []
        at = position
        while True:
            frames, after = self.engine.all_frames(at, max_events=max_events,
                                                   min_number=min_number,
                                                   max_number=max_number)
            assert len(frames) <= max_events and after <= max(at, len(visible))
            views, spans_after = self.engine.all_spans(at, max_events=max_events,
                                                       min_number=min_number,
                                                       max_number=max_number)
            assert spans_after == after and b"".join(views) == b"".join(frames)
            assert_whole_frames(views, frames)
            if after == at:
                assert not frames
                break
            got += [bytes(f) for f in frames]
            at = after
        assert at == max(position, len(visible))
        assert got == want

    def step(self, operation) -> None:
        kind, *args = operation
        if kind == "append":
            index, events, expected, number = args
            self.append(STREAMS[index], events, expected, number)
        elif kind in ("read_stream", "stream_frames"):
            getattr(self, kind)(STREAMS[args[0]], *args[1:])
        else:
            getattr(self, kind)(*args)
        self.check_counters()


def run_operations(tmp_path: Path, fsync: str, segment_size: int, steps, fdatasync) -> None:
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    run = Run(root, fsync, segment_size, fdatasync)
    try:
        for operation in steps:
            run.step(operation)
        run.check_everything()
        run.reopen()
    finally:
        run.engine.close()
        shutil.rmtree(root)


@settings(max_examples=EXAMPLES, deadline=None,
          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(operations, min_size=1, max_size=60), segment_size=st.integers(300, 2000))
def test_random_operations_match_the_model(tmp_path, fdatasync, fsync_policy, steps,
                                          segment_size):
    run_operations(tmp_path, fsync_policy, segment_size, steps, fdatasync)


def test_appends_with_always_become_visible_only_after_sync(tmp_path):
    engine = Engine.open(tmp_path / "data", fsync="always")
    try:
        result = engine.append(b"s", [(b"e", b"1"), (b"e", b"2")])
        assert (result.first_number, result.last_number, result.end_position) == (0, 1, 2)
        assert engine.last_event_number(b"s") is None
        assert engine.stream_names() == [] and list(engine.read_all()) == []
        # The expected-version check sees written events, visible or not.
        with pytest.raises(WrongExpectedVersion) as caught:
            engine.append(b"s", [(b"e", b"3")], expected=NO_STREAM)
        assert caught.value.actual == 1
        assert engine.sync() == 2
        assert engine.last_event_number(b"s") == 1
        assert engine.stream_names() == [b"s"]
    finally:
        engine.close()


@pytest.mark.parametrize("fsync", ["everysec", "no"])
def test_appends_without_always_are_visible_at_once(tmp_path, fsync):
    engine = Engine.open(tmp_path / "data", fsync=fsync)
    try:
        engine.append(b"s", [(b"e", b"1")])
        assert engine.last_event_number(b"s") == 0
        assert [bytes(f) for f in engine.stream_frames(b"s", 0)[0]] == [
            resp_frame(b"s", 0, b"e", b"1")]
    finally:
        engine.close()


def test_listeners_hear_streams_when_their_events_become_visible(tmp_path):
    engine = Engine.open(tmp_path / "data", fsync="always")
    heard = []
    engine.add_listener(lambda ids: heard.append({engine.stream_name(i) for i in ids}))
    try:
        engine.append(b"a", [(b"e", b"1")])
        engine.append(b"b", [(b"e", b"1")])
        assert heard == []
        engine.sync()
        assert heard == [{b"a", b"b"}]
    finally:
        engine.close()
