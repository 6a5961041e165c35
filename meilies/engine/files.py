"""Names of the files in a data directory, and the directory's lock.

Layout of a data directory::

    LOCK                          flock()ed by the process that has the directory open
    checkpoint                    derived state (checkpoint.py); rebuilt from the log if bad
    00000000000000000000.seg      segment whose first event has global position 0
    00000000000000000000.pidx     its position index (index.py)
    00000000000000000000.sidx     its stream index, written when the segment is sealed
    00000000000000000000.frm      its frame copy (framecopy.py), written when it is sealed
    00000000000001048576.seg      the next segment, first position 1048576, ...
    ids-00.table, ids-01.table... the id index's tables (ids.py); derived, rebuilt if bad
    ids.state                     how far the id tables are complete (ids.py)

Positions are zero-padded to 20 digits so that ``ls`` sorts segments in log order.
``segment_path`` and friends are the only way to build these names.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from pathlib import Path

from .errors import DirectoryLocked, ForeignFile

SEGMENT_SUFFIX = ".seg"
POSITION_INDEX_SUFFIX = ".pidx"
STREAM_INDEX_SUFFIX = ".sidx"
FRAME_COPY_SUFFIX = ".frm"
LOCK_NAME = "LOCK"
CHECKPOINT_NAME = "checkpoint"
#: Suffix of files being written before an atomic rename; removed on open.
TEMP_SUFFIX = ".tmp"

ID_STATE_NAME = "ids.state"
_SEGMENT_FILE = re.compile(r"^(\d{20})\.(seg|pidx|sidx|frm)$")
#: The id index's files (ids.py).
ID_FILE = re.compile(r"^(ids-\d{2}\.table|ids\.state)$")
#: The temporary files the engine writes (index.write_file, checkpoint.write, the active
#: segment's growing frame copy) and ``meilies-fsck --repair --salvage`` writes (a
#: segment's new bytes before the rename):
#: only these are removed on open; any other name ending in .tmp is someone else's file.
_TEMP_FILE = re.compile(r"^(checkpoint|ids\.state|\d{20}\.(pidx|sidx|seg|frm))\.tmp$")


def _stem(base_position: int) -> str:
    return f"{base_position:020d}"


def segment_path(directory: Path, base_position: int) -> Path:
    """Path of the segment whose first global position is ``base_position``."""
    return directory / (_stem(base_position) + SEGMENT_SUFFIX)


def position_index_path(directory: Path, base_position: int) -> Path:
    return directory / (_stem(base_position) + POSITION_INDEX_SUFFIX)


def stream_index_path(directory: Path, base_position: int) -> Path:
    return directory / (_stem(base_position) + STREAM_INDEX_SUFFIX)


def frame_copy_path(directory: Path, base_position: int) -> Path:
    """Path of a sealed segment's frame copy (framecopy.py)."""
    return directory / (_stem(base_position) + FRAME_COPY_SUFFIX)


def checkpoint_path(directory: Path) -> Path:
    return directory / CHECKPOINT_NAME


def id_table_path(directory: Path, level: int) -> Path:
    """Path of the id index's table of ``level`` (ids.py)."""
    return directory / f"ids-{level:02d}.table"


def id_state_path(directory: Path) -> Path:
    return directory / ID_STATE_NAME


def list_segments(directory: Path, *, remove_temp: bool = False) -> list[int]:
    """Base positions of the segments in ``directory``, in log order.

    Raises :class:`ForeignFile` for any file the engine does not write: a data
    directory is ours alone, and a stray file usually means a wrong ``--data-dir``.
    With ``remove_temp``, leftovers of an interrupted atomic write are deleted.
    """
    bases = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        name = entry.name
        if name in (LOCK_NAME, CHECKPOINT_NAME) or ID_FILE.match(name):
            continue
        if _TEMP_FILE.match(name) and entry.is_file():
            if remove_temp:
                os.unlink(entry.path)
            continue
        match = _SEGMENT_FILE.match(name)
        if match is None or not entry.is_file():
            raise ForeignFile(Path(entry.path))
        if match.group(2) == "seg":
            bases.append(int(match.group(1)))
    return bases


class DirectoryLock:
    """An exclusive ``flock`` on ``DIR/LOCK``, held for as long as the engine is open.

    The kernel drops the lock when the process dies, so a ``kill -9`` never leaves a
    stale lock behind.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`DirectoryLocked` at once."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DirectoryLocked(self.path.parent) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def fsync_directory(directory: Path) -> None:
    """Make a created, renamed or removed file name durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
