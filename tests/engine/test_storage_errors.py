"""Failed writes and syncs: StorageError, nothing partial visible, nothing partial kept.

Writes fail for real: a child process lowers RLIMIT_FSIZE (with SIGXFSZ ignored, so
the kernel answers EFBIG instead of killing it) and appends past it. A failing
``fdatasync`` cannot be provoked on a healthy disk, so those tests replace
``os.fdatasync`` (the operating-system call, not the engine) with one that fails.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine_helpers import read_everything, segment_files
from meilies.engine import Engine, StorageError
from meilies.engine import format as fmt

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import errno, json, os, resource, signal, sys
from meilies.engine import Engine, StorageError

directory, fsync, segment_size, limit, crash = sys.argv[1:]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
engine = Engine.open(directory, fsync=fsync, segment_size=int(segment_size))
engine.append(b"before", [(b"e", b"small %d" % i) for i in range(3)])
engine.sync()
before = [(e.stream.decode(), e.number, bytes(e.data).decode()) for e in engine.read_all()]
sizes = {p: os.path.getsize(os.path.join(directory, p)) for p in os.listdir(directory)
         if p.endswith(".seg")}
resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
report = {"before": before}
try:
    engine.append(b"too-big", [(b"e", b"x" * 3000), (b"f", b"y")])
    report["error"] = None
except StorageError as exc:
    report["error"] = [exc.errno, exc.operation]
report["visible_after_error"] = [(e.stream.decode(), e.number) for e in engine.read_all()]
report["last_too_big"] = engine.last_event_number(b"too-big")
report["written_position"] = engine.written_position
report["sizes_kept"] = all(
    os.path.getsize(os.path.join(directory, p)) == size for p, size in sizes.items()
    if os.path.getsize(os.path.join(directory, p)) <= int(limit))
engine.append(b"after", [(b"e", b"fits")])
engine.sync()
report["after"] = engine.last_event_number(b"after")
print(json.dumps(report), flush=True)
if crash == "crash":
    os._exit(0)  # no close(): no checkpoint, as after kill -9
engine.close()
"""


def run_child(directory: Path, fsync: str, segment_size: int, limit: int, crash: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(directory), fsync, str(segment_size), str(limit),
         "crash" if crash else "close"],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("crash", [False, True], ids=["close", "crash"])
def test_write_past_the_file_size_limit_raises_and_keeps_nothing(tmp_path, fsync_policy, crash):
    report = run_child(tmp_path, fsync_policy, 1 << 20, limit=1500, crash=crash)
    assert report["error"] == [errno.EFBIG, "write"]
    assert report["last_too_big"] is None
    assert report["written_position"] == 3
    assert report["visible_after_error"] == [["before", n] for n in range(3)]
    assert report["sizes_kept"]
    assert report["after"] == 0
    with Engine.open(tmp_path) as engine:
        assert engine.open_report.recovered == []
        assert [(e[0], e[1], e[3]) for e in read_everything(engine)] == [
            (b"before", 0, b"small 0"), (b"before", 1, b"small 1"), (b"before", 2, b"small 2"),
            (b"after", 0, b"fits")]
        assert engine.last_event_number(b"too-big") is None


def test_failed_first_write_of_a_new_stream_after_a_roll_leaves_no_trace(tmp_path,
                                                                         fsync_policy):
    """The roll writes a checkpoint before the write that fails; after a crash the
    next stream's records must agree with it."""
    report = run_child(tmp_path, fsync_policy, 200, limit=1500, crash=True)
    assert report["error"] == [errno.EFBIG, "write"]
    assert report["after"] == 0
    assert len(segment_files(tmp_path)) == 2
    with Engine.open(tmp_path, segment_size=200) as engine:
        assert engine.stream_names() == [b"after", b"before"]
        assert engine.last_event_number(b"too-big") is None


@pytest.mark.parametrize("roll_first", [False, True], ids=["same-segment", "after-a-roll"])
def test_failed_sync_takes_back_unsynced_appends_under_always(tmp_path, fdatasync, roll_first):
    engine = Engine.open(tmp_path, fsync="always", segment_size=600)
    engine.append(b"kept", [(b"e", b"k" * (400 if roll_first else 60))])
    engine.sync()
    kept = engine.written_position
    durable_size = segment_files(tmp_path)[-1].stat().st_size
    if roll_first:
        # Rolls: the roll syncs the full segment, the record starts the next one, and
        # no sync covers it, so it is taken back with the rest.
        engine.append(b"lost", [(b"e", b"r" * 200)])
        assert len(segment_files(tmp_path)) == 2
        durable_size = fmt.SEGMENT_HEADER_SIZE
    active = segment_files(tmp_path)[-1]
    engine.append(b"lost", [(b"e", b"l" * 10)])
    engine.append(b"kept", [(b"e", b"l" * 10)])
    assert segment_files(tmp_path)[-1] == active
    fdatasync.failing = True
    with pytest.raises(StorageError) as caught:
        engine.sync()
    fdatasync.failing = False
    assert caught.value.errno == errno.EIO
    assert engine.written_position == kept
    assert active.stat().st_size == durable_size
    assert engine.last_event_number(b"lost") is None
    # The engine goes on: numbers continue from what was kept.
    result = engine.append(b"kept", [(b"e", b"after")])
    assert result.first_number == kept and result.end_position == kept + 1
    engine.sync()
    visible = read_everything(engine)
    engine.close()
    assert len(segment_files(tmp_path)) == (2 if roll_first else 1)
    with Engine.open(tmp_path, segment_size=600) as engine:
        assert read_everything(engine) == visible
        assert [e[0] for e in visible] == [b"kept"] * (kept + 1)
        assert engine.last_event_number(b"lost") is None


CHECKPOINT_CHILD = r"""
import json, resource, signal, sys
from meilies.engine import Engine, StorageError

directory, limit = sys.argv[1:]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
# Small segments, many streams: the checkpoint (every stream's name and counters)
# outgrows the file size limit long before a segment does.
resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
engine = Engine.open(directory, fsync="no", segment_size=2000)
report = {"appended": 0, "append_error": None}
try:
    for i in range(400):
        engine.append(b"stream-%05d-with-a-long-name" % i, [(b"e", b"%d" % i)])
        report["appended"] += 1
except Exception as exc:
    report["append_error"] = type(exc).__name__
for call in ("checkpoint", "close"):
    try:
        getattr(engine, call)()
        report[call] = None
    except Exception as exc:
        report[call] = type(exc).__name__
print(json.dumps(report), flush=True)
"""


def test_checkpoint_that_cannot_be_written_loses_no_event(tmp_path):
    """A roll's checkpoint is derived data: when it cannot be written the append still
    succeeds (opening will scan more); an explicit checkpoint or close says so."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", CHECKPOINT_CHILD, str(tmp_path), "6000"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report == {"appended": 400, "append_error": None, "checkpoint": "StorageError",
                      "close": "StorageError"}
    with Engine.open(tmp_path) as engine:
        assert len(engine.stream_names()) == 400
        assert engine.stats()["events"] == 400


def test_sync_tickets_in_flight_together_end_in_order(tmp_path):
    """begin_sync twice before either ends (a helper process syncing while the next
    request waits behind): each end makes its own prefix durable and visible."""
    with Engine.open(tmp_path / "d", fsync="always") as engine:
        engine.append(b"s", [(b"e", b"one")], flush=False)
        first = engine.begin_sync()
        engine.append(b"s", [(b"e", b"two")], flush=False)
        second = engine.begin_sync()
        assert (first.position, second.position) == (1, 2)
        assert engine.visible_position == 0
        os.fdatasync(second.fd)  # one fdatasync after both writes covers both
        assert engine.end_sync(first, None) == 1
        assert engine.visible_position == 1 and engine.last_event_number(b"s") == 0
        assert engine.end_sync(second, None) == 2
        assert [bytes(e.data) for e in engine.read_stream(b"s")] == [b"one", b"two"]


def test_a_failed_ticket_takes_back_the_appends_of_the_tickets_after_it(tmp_path):
    with Engine.open(tmp_path / "d", fsync="always") as engine:
        engine.append(b"s", [(b"e", b"kept")])
        engine.sync()
        mark = engine.loss_mark
        engine.append(b"s", [(b"e", b"lost 1")], flush=False)
        first = engine.begin_sync()
        engine.append(b"s", [(b"e", b"lost 2")], flush=False)
        second = engine.begin_sync()
        size = os.path.getsize(segment_files(tmp_path / "d")[-1])
        with pytest.raises(StorageError):
            engine.end_sync(first, OSError(errno.EIO, "I/O error"))
        assert isinstance(engine.lost_since(mark, second.position), StorageError)
        # The later ticket's success comes too late: it changes nothing.
        assert engine.end_sync(second, None) == 1
        assert engine.visible_position == 1 and engine.last_event_number(b"s") == 0
        assert os.path.getsize(segment_files(tmp_path / "d")[-1]) < size  # cut back
        engine.append(b"s", [(b"e", b"after")])
        engine.sync()
    with Engine.open(tmp_path / "d", fsync="always") as engine:
        assert [(s, n, d) for s, n, _name, d, _p in read_everything(engine)] == \
            [(b"s", 0, b"kept"), (b"s", 1, b"after")]
