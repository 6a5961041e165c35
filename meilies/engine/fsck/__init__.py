"""Checking a data directory record by record, and repairing it: ``meilies-fsck``'s library.

``verify(path)`` returns an :class:`FsckReport`; it prints nothing and exits nothing
(the CLI in ``meilies/cli/fsck.py`` maps the report to exit codes). What it checks,
against the format that ``format.py``, ``index.py``, ``checkpoint.py`` and ``files.py``
define (``docs/format.md`` says the same in prose):

* **The log** (the only data that matters). Every segment header; every record with
  :func:`recovery.check_record` in its deep mode (framing, one checksum per record,
  each frame spelling its stream, number and lengths), the shared verifier behind the
  engine's open; global positions dense and contiguous across records and segments;
  each stream's numbers contiguous from 0; stream id <-> name one-to-one, ids dense in
  order of creation. The first record that fails is the *cut*: everything from it to
  the end of the log is what ``--repair`` removes. It is a *torn tail* when it sits in
  the newest segment with no valid record after it, past what the checkpoint says was
  complete (an interrupted write; the engine would drop it on open), *damage*
  otherwise. Both are reported.
* **Derived files**, checked only for the part of the log before the cut (after it they
  are rebuilt anyway): a sealed segment's ``.pidx`` must equal the entries regenerated
  from its records, byte for byte, and its ``.sidx`` the same entries sorted by
  (stream id, number); the newest segment's ``.pidx`` may be shorter (it is flushed at
  checkpoints) but what it holds must match; its ``.sidx`` is not read (the engine
  rewrites it when it seals the segment). The checkpoint, when present: its trailer
  checksum, the segments it lists, each one's size, event count and xxhashes, and its
  stream table against the log prefix it claims to cover. A checkpoint that covers only
  a prefix of the log (the server stopped without a clean close) is normal: a note.

Severity, decided here and documented in ``docs/format.md``: any problem makes the
report unclean (exit 1). Log damage loses events on repair (``severity == "log"``);
index and checkpoint problems are ``"derived"``: repairing them loses nothing, it
rebuilds them from the log. A file in the directory that the engine does not write is
``"foreign"`` and not repairable (fsck never deletes what it did not write).

``verify(path, repair=True)`` then: deletes the checkpoint, every index file, truncates
the cut segment at the cut and deletes every later segment, opens and closes
:class:`~meilies.engine.Engine` (which rebuilds the derived files from the log) and
verifies again; ``report.repair`` says exactly what was removed, ``report.after`` is
the fresh report.

Speed. The deep per-record check is Python (about 1.7 us per 100-byte event here), so
records are checked in record-aligned chunks by one worker process per core. A worker
regenerates its chunk's index entries with array slicing (no Python per entry) and
compares them as bytes with its slice of the ``.pidx`` and, record by record, with the
``.sidx`` runs whose places a header walk planned. The parent merges per-chunk
summaries: per record and per stream, never per event.

Not thread-safe; holds the directory's lock (``files.DirectoryLock``) while it reads.

"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UnreadableDirectory
from .directory import _list_directory, _os_reason, _take_lock
from .repair import _rebuild, _remove, _salvage
from .report import (
    BadSegment,
    CheckpointProblem,
    DamagedRecord,
    EventRange,
    ForeignFileProblem,
    FsckReport,
    DuplicateId,
    IdIndexProblem,
    IndexProblem,
    LogDamage,
    Problem,
    Progress,
    Removal,
    RepairResult,
    TornTail,
)
from .verifier import _Verifier

__all__ = [
    "verify", "FsckReport", "Problem", "LogDamage", "DamagedRecord", "TornTail", "BadSegment",
    "IndexProblem", "IdIndexProblem", "DuplicateId", "CheckpointProblem", "ForeignFileProblem", "EventRange", "Removal",
    "RepairResult", "Progress", "UnreadableDirectory",
]


def verify(path: str | os.PathLike, repair: bool = False,
           progress: Progress | None = None, salvage: bool = False) -> FsckReport:
    """Verify the data directory at ``path``; with ``repair``, repair what is wrong;
    with ``salvage`` too, keep the log after the damage (placeholders for what cannot
    be trusted: salvage.py) instead of cutting it.

    Raises :class:`UnreadableDirectory` (missing, unreadable, not a data directory) and
    :class:`~meilies.engine.errors.DirectoryLocked` (a server has it open). Changes
    nothing without ``repair`` (but for the pid written into ``LOCK``).
    """
    directory = Path(path)
    _list_directory(directory)  # before the lock: never create LOCK in a stranger's directory
    lock = _take_lock(directory, write=repair)
    try:
        try:
            listing = _list_directory(directory)
            report = _Verifier(directory, listing, progress).run()
        except OSError as exc:
            raise UnreadableDirectory(directory, _os_reason(exc)) from exc
        if not repair or report.clean:
            return report
        report.repair = RepairResult()
        blockers = [p for p in report.problems if not p.repairable]
        if blockers:
            report.repair.error = (f"{blockers[0].path.name} is not a file MeiliES writes:"
                                   " move it out of the data directory, then repair")
            return report
        try:
            if salvage:
                _salvage(directory, report, listing.bases)
                if report.repair.error is not None:
                    return report
            else:
                _remove(directory, report)
        except OSError as exc:
            report.repair.error = f"repair stopped: {_os_reason(exc)}"
            return report
    finally:
        lock.release()
    _rebuild(directory, report.repair)
    if report.repair.error is None:
        report.after = verify(directory, repair=False, progress=progress)
    return report
