"""One process at a time: the data directory's flock.

``flock`` locks belong to an open file description, so a second ``Engine.open`` in the
same process conflicts too; the cross-process cases run a real second interpreter.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from meilies.engine import DirectoryLocked, Engine

REPO = Path(__file__).resolve().parents[2]
LOCKED_EXIT = 3

HOLDER = """
import sys
from meilies.engine import DirectoryLocked, Engine
try:
    engine = Engine.open(sys.argv[1])
except DirectoryLocked:
    sys.exit(%d)
engine.append(b"from-child", [(b"e", b"1")])
engine.sync()
print("open", flush=True)
sys.stdin.readline()
engine.close()
""" % LOCKED_EXIT


def start_holder(directory: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_second_open_in_the_same_process_is_locked_out(tmp_path):
    with Engine.open(tmp_path):
        with pytest.raises(DirectoryLocked) as caught:
            Engine.open(tmp_path)
        assert caught.value.path == tmp_path
    Engine.open(tmp_path).close()  # released by close()


def test_open_in_another_process_is_locked_out(tmp_path):
    with Engine.open(tmp_path):
        child = start_holder(tmp_path)
        out, _ = child.communicate(timeout=60)
        assert child.returncode == LOCKED_EXIT, out


def test_open_is_locked_out_while_another_process_holds_the_directory(tmp_path):
    child = start_holder(tmp_path)
    try:
        assert child.stdout.readline() == "open\n"
        with pytest.raises(DirectoryLocked):
            Engine.open(tmp_path)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    with Engine.open(tmp_path) as engine:
        assert engine.last_event_number(b"from-child") == 0


def test_lock_of_a_killed_process_is_released(tmp_path):
    child = start_holder(tmp_path)
    try:
        assert child.stdout.readline() == "open\n"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    with Engine.open(tmp_path) as engine:
        assert engine.last_event_number(b"from-child") == 0
