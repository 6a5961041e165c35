"""Repair: cut the log at the first bad record, drop the derived files, rebuild them.

A damaged record of format 3 whose first events are whole is not cut whole: it is
written back holding only those events (``Removal.rewrite``), and the log is cut
after it. With ``--salvage`` nothing after the damage is cut (salvage.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DirectoryLocked, EngineError
from ..files import (CHECKPOINT_NAME, FRAME_COPY_SUFFIX, ID_FILE, ID_STATE_NAME,
                     POSITION_INDEX_SUFFIX, STREAM_INDEX_SUFFIX, fsync_directory)
from . import salvage
from .directory import _INDEX_FILE
from .report import FsckReport, RepairResult


def _remove(directory: Path, report: FsckReport) -> None:
    """Delete the derived files, then cut the log (the caller holds the lock)."""
    repair = report.repair
    assert repair is not None
    _delete_derived(directory, repair)
    removal = report.removal
    if removal is None:
        return
    for path, _size_ in reversed(removal.delete):
        os.unlink(path)
    for path, new_size, _removed in removal.truncate:
        fd = os.open(path, os.O_RDWR)
        try:
            if removal.rewrite is not None and removal.rewrite[0] == path:
                # Written over the damaged record's own bytes, then cut after it: an
                # interrupted repair leaves the damaged record, or the shortened one with
                # leftover bytes after it, which the next fsck finds and cuts.
                _path, offset, record, _kept = removal.rewrite
                os.pwrite(fd, record, offset)
            os.ftruncate(fd, new_size)
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_directory(directory)
    repair.removed = removal


def _salvage(directory: Path, report: FsckReport, bases: list[int]) -> None:
    """``--salvage``: plan first (nothing changes if it is refused), then delete the
    derived files and write the salvaged segments (the caller holds the lock)."""
    repair = report.repair
    assert repair is not None
    removal = report.removal
    if removal is None or removal.cut is None:  # only derived files were bad
        _delete_derived(directory, repair)
        return
    if removal.torn:  # a write never acknowledged: dropping it is all there is to do
        _remove(directory, report)
        return
    try:
        result, outputs = salvage.plan(directory, bases, removal.cut, removal.torn)
    except salvage.SalvageRefused as exc:
        repair.error = f"salvage refused, nothing was changed: {exc}"
        return
    _delete_derived(directory, repair)
    salvage.write(outputs, result)
    repair.salvaged = result


def _delete_derived(directory: Path, repair: RepairResult) -> None:
    """Delete the checkpoint and the id index's state, then every index file and frame
    copy (the engine makes a sealed segment's copy again when it seals it anew).

    The checkpoint and the state go first, so that an interrupted repair never leaves
    one that claims log which is gone; the engine rebuilds whatever is missing.
    """
    for name in [CHECKPOINT_NAME, ID_STATE_NAME] + sorted(
            name for name in os.listdir(directory)
            if (name.endswith((POSITION_INDEX_SUFFIX, STREAM_INDEX_SUFFIX, FRAME_COPY_SUFFIX))
                and _INDEX_FILE.match(name)) or (ID_FILE.match(name) and name != ID_STATE_NAME)):
        try:
            os.unlink(directory / name)
        except FileNotFoundError:
            continue
        repair.deleted_derived.append(name)
    fsync_directory(directory)


def _rebuild(directory: Path, repair: RepairResult) -> None:
    """Open and close the engine: it rebuilds every index file and the checkpoint."""
    from ..log import Engine  # the engine is only needed to repair

    try:
        engine = Engine.open(directory)
    except DirectoryLocked as exc:
        repair.error = f"log cut, but the rebuild could not start: {exc}"
        return
    except (EngineError, OSError) as exc:
        repair.error = f"log cut, but the engine still refuses to open it: {exc}"
        return
    try:
        report = engine.open_report
        repair.rebuilt = list(report.rebuilt_indexes or [])
        for recovered in report.recovered or []:
            repair.rebuilt.append(f"{recovered.path.name}: the engine truncated"
                                  f" {recovered.truncated_bytes} more bytes ({recovered.reason})")
    finally:
        engine.close()
