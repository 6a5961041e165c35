"""The directory fsck checks: which files are there, and its lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DirectoryLocked, UnreadableDirectory
from ..files import (
    CHECKPOINT_NAME,
    FRAME_COPY_SUFFIX,
    ID_FILE,
    LOCK_NAME,
    POSITION_INDEX_SUFFIX,
    SEGMENT_SUFFIX,
    STREAM_INDEX_SUFFIX,
    TEMP_SUFFIX,
    DirectoryLock,
)

_INDEX_FILE = re.compile(r"^(\d{20})(" + re.escape(SEGMENT_SUFFIX) + "|"
                         + re.escape(POSITION_INDEX_SUFFIX) + "|"
                         + re.escape(STREAM_INDEX_SUFFIX) + "|"
                         + re.escape(FRAME_COPY_SUFFIX) + ")$")


#: The engine's own leftovers of an atomic write (files.py removes these on open; any
#: other name ending in .tmp is someone else's file).
_TEMP_FILE = re.compile(r"^(" + re.escape(CHECKPOINT_NAME) + r"|ids\.state|\d{20}("
                        + re.escape(POSITION_INDEX_SUFFIX) + "|"
                        + re.escape(STREAM_INDEX_SUFFIX) + "|"
                        + re.escape(FRAME_COPY_SUFFIX) + "|"
                        + re.escape(SEGMENT_SUFFIX) + "))" + re.escape(TEMP_SUFFIX) + "$")


@dataclass
class _Listing:
    bases: list[int]
    sizes: list[int]
    index_files: list[tuple[int, str]]  # (base, file name)
    foreign: list[str]
    temporary: list[str]
    has_checkpoint: bool


def _list_directory(directory: Path) -> _Listing:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        raise UnreadableDirectory(directory, "no such directory") from None
    except NotADirectoryError:
        raise UnreadableDirectory(directory, "not a directory") from None
    except OSError as exc:
        raise UnreadableDirectory(directory, _os_reason(exc)) from None
    listing = _Listing([], [], [], [], [], False)
    for entry in entries:
        name = entry.name
        match = _INDEX_FILE.match(name)
        if name == LOCK_NAME or ID_FILE.match(name):
            continue  # the id index is derived data; verify.py checks it against the log
        if name == CHECKPOINT_NAME:
            listing.has_checkpoint = True
        elif _TEMP_FILE.match(name) and entry.is_file(follow_symlinks=False):
            listing.temporary.append(name)
        elif match is None or not entry.is_file(follow_symlinks=False):
            listing.foreign.append(name)
        elif match.group(2) == SEGMENT_SUFFIX:
            listing.bases.append(int(match.group(1)))
            listing.sizes.append(entry.stat(follow_symlinks=False).st_size)
        else:
            listing.index_files.append((int(match.group(1)), name))
    if listing.foreign and not listing.bases:
        shown = ", ".join(listing.foreign[:3]) + (", ..." if len(listing.foreign) > 3 else "")
        raise UnreadableDirectory(directory, f"not a MeiliES data directory: it holds {shown}"
                                  " and no segment files")
    return listing


def _os_reason(exc: OSError) -> str:
    name = f"{Path(exc.filename).name}: " if exc.filename else ""
    return f"{name}{exc.strerror or exc}"


class _ReadOnlyLock:
    """A shared flock on an existing LOCK, for a directory we may not write (a
    snapshot, read-only media): it still fails while a server holds the lock."""

    def __init__(self, directory: Path) -> None:
        self._fd: int | None = None
        try:
            self._fd = os.open(directory / LOCK_NAME, os.O_RDONLY)
        except FileNotFoundError:
            return  # no LOCK and no way to create one: no server ever ran here as is
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            self._fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DirectoryLocked(directory) from None
            raise

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _take_lock(directory: Path, write: bool) -> DirectoryLock | _ReadOnlyLock:
    lock = DirectoryLock(directory)
    try:
        lock.acquire()
        return lock
    except DirectoryLocked:
        raise
    except OSError as exc:
        if write or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UnreadableDirectory(directory, f"cannot take its lock: {_os_reason(exc)}"
                                      ) from None
    try:
        return _ReadOnlyLock(directory)
    except OSError as exc:
        raise UnreadableDirectory(directory, f"cannot take its lock: {_os_reason(exc)}"
                                  ) from None
