"""What fsck reports: the problems it finds (named, with file, offset and reason), and what
a repair removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ..names import quoted

if TYPE_CHECKING:
    from .salvage import SalvageResult

#: ``progress(done_bytes, total_bytes)``: called as segment bytes are verified.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Problem:
    """One thing wrong, with the file, the byte offset in it (None: the whole file) and why."""

    #: Short name of the problem class, as the JSON report spells it.
    kind: ClassVar[str] = "problem"
    #: "log": repair removes events; "derived": repair rebuilds a file from the log and
    #: loses nothing; "foreign": not ours, never touched.
    severity: ClassVar[str] = "derived"
    repairable: ClassVar[bool] = True
    #: What the text line calls the file.
    noun: ClassVar[str] = "file"

    path: Path
    offset: int | None
    reason: str

    def describe(self) -> str:
        """One line: what, which file, where, why (``redis-check-aof`` style)."""
        name = self.noun if self.path.name == self.noun else f"{self.noun} {self.path.name}"
        at = "" if self.offset is None else f" offset={self.offset}"
        return f'{name}:{at} reason="{self.reason}"'

    def to_dict(self) -> dict:
        return {"kind": self.kind, "severity": self.severity, "repairable": self.repairable,
                "path": str(self.path), "file": self.path.name, "offset": self.offset,
                "reason": self.reason}


@dataclass(frozen=True)
class LogDamage(Problem):
    """The log is good up to ``offset`` of this segment (``ok_up_to``), bad after it."""

    severity: ClassVar[str] = "log"
    noun: ClassVar[str] = "segment"
    #: The segment file's size in bytes.
    size: int = 0

    @property
    def ok_up_to(self) -> int:
        return self.offset or 0

    @property
    def bad_bytes(self) -> int:
        return self.size - self.ok_up_to

    def describe(self) -> str:
        return (f"segment {self.path.name}: ok_up_to={self.ok_up_to} size={self.size}"
                f' bad_bytes={self.bad_bytes} reason="{self.reason}" kind={self.kind}')

    def to_dict(self) -> dict:
        return {**super().to_dict(), "size": self.size, "ok_up_to": self.ok_up_to,
                "bad_bytes": self.bad_bytes}


@dataclass(frozen=True)
class DamagedRecord(LogDamage):
    """A record that fails its checks, or breaks numbering, with more log after it."""

    kind: ClassVar[str] = "damaged-record"


@dataclass(frozen=True)
class TornTail(LogDamage):
    """An incomplete record (or segment header) at the very end of the log: a write
    that a crash interrupted. The engine would drop it on open; fsck reports it."""

    kind: ClassVar[str] = "torn-tail"


@dataclass(frozen=True)
class BadSegment(LogDamage):
    """A segment whose header is wrong, or that does not start where the log is."""

    kind: ClassVar[str] = "bad-segment"


@dataclass(frozen=True)
class IndexProblem(Problem):
    """A missing, orphaned or wrong .pidx/.sidx file (derived data: rebuilt on repair)."""

    kind: ClassVar[str] = "index"
    noun: ClassVar[str] = "index"


@dataclass(frozen=True)
class IdIndexProblem(Problem):
    """The id index (ids-*.table, ids.state) lacks an id the log holds below the
    position it says it covers: derived data, deleted and rebuilt on repair."""

    kind: ClassVar[str] = "id-index"
    noun: ClassVar[str] = "id index"


@dataclass(frozen=True)
class DuplicateId(Problem):
    """One event id stored at two positions: what idempotent appends exist to prevent.
    Not a torn write nor bit rot (each record checks), so repair does not pick which
    event to drop: it reports it again, for an operator to decide."""

    kind: ClassVar[str] = "duplicate-id"
    severity: ClassVar[str] = "log"
    noun: ClassVar[str] = "segment"


@dataclass(frozen=True)
class CheckpointProblem(Problem):
    """A checkpoint that fails its checksum or says something false about the log."""

    kind: ClassVar[str] = "checkpoint"
    noun: ClassVar[str] = "checkpoint"


@dataclass(frozen=True)
class ForeignFileProblem(Problem):
    """A file the engine does not write. The engine refuses to open the directory."""

    kind: ClassVar[str] = "foreign-file"
    severity: ClassVar[str] = "foreign"
    repairable: ClassVar[bool] = False


@dataclass
class EventRange:
    """Events ``first`` .. ``last`` of a stream that a repair removes."""

    stream: bytes
    first: int
    last: int
    #: False when only the header of a record that fails its checks names them.
    verified: bool = True

    def describe(self) -> str:
        what = f"event {self.first}" if self.first == self.last else \
            f"events {self.first}..{self.last}"
        return f"{what} of stream {quoted(self.stream)}"

    def to_dict(self) -> dict:
        return {"stream": self.stream.decode("utf-8", "replace"), "first": self.first,
                "last": self.last, "count": self.last - self.first + 1,
                "verified": self.verified}


@dataclass
class Removal:
    """The part of the log from the cut to its end: what ``--repair`` removes."""

    #: (segment, size it is cut to, bytes removed) for the segment holding the cut.
    truncate: list[tuple[Path, int, int]] = field(default_factory=list)
    #: (segment, size) for every segment removed whole.
    delete: list[tuple[Path, int]] = field(default_factory=list)
    #: Per stream, in order of first appearance after the cut.
    events: list[EventRange] = field(default_factory=list)
    #: Bytes after the cut that no record header could be decoded from (the bytes of a
    #: record whose checks fail but whose header still names its events are not counted).
    undecodable_bytes: int = 0
    #: A damaged record (format 3) whose events before the damaged one are whole: the
    #: repair writes it back at the cut holding only those (``truncate`` then cuts after
    #: it), as (segment, offset, the shortened record, the events it keeps).
    rewrite: tuple[Path, int, bytes, EventRange] | None = None
    #: Where the log is cut: (index of the segment in log order, offset), and whether
    #: it is a torn tail (what ``--salvage`` starts from).
    cut: tuple[int, int] | None = None
    torn: bool = False

    @property
    def bytes(self) -> int:
        return sum(n for _p, _s, n in self.truncate) + sum(n for _p, n in self.delete)

    @property
    def event_count(self) -> int:
        return sum(r.last - r.first + 1 for r in self.events)

    def to_dict(self) -> dict:
        return {"bytes": self.bytes, "event_count": self.event_count,
                "truncate": [{"file": p.name, "path": str(p), "new_size": s, "bytes": n}
                             for p, s, n in self.truncate],
                "delete": [{"file": p.name, "path": str(p), "bytes": n} for p, n in self.delete],
                "events": [r.to_dict() for r in self.events],
                "undecodable_bytes": self.undecodable_bytes,
                "kept": None if self.rewrite is None else {
                    "file": self.rewrite[0].name, "offset": self.rewrite[1],
                    "bytes": len(self.rewrite[2]), **self.rewrite[3].to_dict()}}


@dataclass
class RepairResult:
    """What ``verify(..., repair=True)`` did."""

    #: The log removed (None when the log had no damage and only derived files were bad).
    removed: Removal | None = None
    #: Index files and checkpoint deleted, then rebuilt by opening the engine.
    deleted_derived: list[str] = field(default_factory=list)
    #: Index files the engine reported rebuilding, and its recovery notes.
    rebuilt: list[str] = field(default_factory=list)
    #: Why the repair did not happen or did not finish; None when it did.
    error: str | None = None
    #: With ``--salvage``: what was replaced by placeholders and what was lost (then
    #: ``removed`` is None: nothing after the damage was cut).
    salvaged: SalvageResult | None = None

    def to_dict(self) -> dict:
        return {"removed": self.removed.to_dict() if self.removed else None,
                "deleted_derived": self.deleted_derived, "rebuilt": self.rebuilt,
                "salvaged": self.salvaged.to_dict() if self.salvaged else None,
                "error": self.error}


@dataclass
class FsckReport:
    """Everything ``verify`` found. ``clean`` is the verdict."""

    path: Path
    segments: int = 0
    streams: int = 0
    #: Events verified good (the log up to the cut, when there is one).
    events: int = 0
    #: Bytes of segment files.
    bytes: int = 0
    #: Bytes of index files.
    index_bytes: int = 0
    #: Bytes of frame copies (framecopy.py), not counted in ``index_bytes``.
    frame_copy_bytes: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    #: Observations that are not problems (a stale checkpoint, a short newest index...).
    notes: list[str] = field(default_factory=list)
    #: What ``--repair`` removes from the log; None when the log is intact.
    removal: Removal | None = None
    repair: RepairResult | None = None
    #: The report of the verification that follows a repair.
    after: FsckReport | None = None

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def repaired(self) -> bool:
        """A repair ran to the end and left a clean directory."""
        return (self.repair is not None and self.repair.error is None
                and self.after is not None and self.after.clean)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"path": str(self.path), "clean": self.clean, "segments": self.segments,
                "streams": self.streams, "events": self.events, "bytes": self.bytes,
                "index_bytes": self.index_bytes, "frame_copy_bytes": self.frame_copy_bytes,
                "seconds": round(self.seconds, 6),
                "problems": [p.to_dict() for p in self.problems], "notes": self.notes,
                "removal": self.removal.to_dict() if self.removal else None,
                "repair": self.repair.to_dict() if self.repair else None,
                "repaired": self.repaired,
                "after": self.after.to_dict() if self.after else None}
