"""Every error the engine raises, in one place.

Each error is a value with named attributes (path, offset, reason, ...), so that the
server, the CLIs and the tests act on fields, never on message text.
"""

from __future__ import annotations

from pathlib import Path


class EngineError(Exception):
    """Base class of every error raised by :mod:`meilies.engine`."""


# -- bad input -------------------------------------------------------------------------


class InvalidArgument(EngineError):
    """A stream name, event name, size or number that the contract forbids.

    ``argument`` names which argument is wrong (``"stream"``, ``"event-name"``,
    ``"data"``, ``"expected"``) so that the server can say so on the wire.
    """

    def __init__(self, argument: str, reason: str) -> None:
        super().__init__(f"invalid {argument}: {reason}")
        self.argument = argument
        self.reason = reason


class WrongExpectedVersion(EngineError):
    """An ``append`` whose expected version does not match the stream; nothing was stored.

    ``actual`` is the stream's last event number, or ``None`` when it has no events.
    """

    def __init__(self, stream: str, actual: int | None, expected: str) -> None:
        at = "none" if actual is None else str(actual)
        super().__init__(f"stream {stream} is at {at}, expected {expected}")
        self.stream = stream
        self.actual = actual
        self.expected = expected


class DuplicateEventId(EngineError):
    """A write reuses an event id that is already stored (and is not an exact retry of
    the write that stored it); nothing of the write, or of its transaction, was stored.

    ``stream`` and ``number`` say where the id is stored."""

    def __init__(self, event_id: bytes, stream: bytes, number: int) -> None:
        super().__init__(f"event id {event_id.decode('utf-8', 'replace')} is already stored"
                         f" as {stream.decode('utf-8', 'replace')}:{number}")
        self.event_id = event_id
        self.stream = stream
        self.number = number


class DuplicateIdInRequest(InvalidArgument):
    """One event id given twice in one request or one transaction."""

    def __init__(self, event_id: bytes) -> None:
        EngineError.__init__(self, f"duplicate event id {event_id.decode('utf-8', 'replace')}"
                             " in request")
        self.argument = "id"
        self.reason = "given twice"
        self.event_id = event_id


# -- the data directory ----------------------------------------------------------------


class DirectoryLocked(EngineError):
    """Another process (a running server, an fsck) holds the data directory's lock."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"data directory {path} is locked by another process")
        self.path = path


class UnreadableDirectory(EngineError):
    """The path is missing, not a directory, unreadable, or not a MeiliES data directory.

    ``meilies-fsck`` exits 2 on it (usage or unreadable directory).
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot check {path}: {reason}")
        self.path = path
        self.reason = reason


class ForeignFile(EngineError):
    """The data directory holds a file the engine did not write; we refuse to guess."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"unexpected file in data directory: {path}")
        self.path = path


class UnsupportedFormatVersion(EngineError):
    """A file written by a newer (or unknown) version of the on-disk format."""

    def __init__(self, path: Path, version: int, supported: int) -> None:
        super().__init__(
            f"{path} has format version {version}; this MeiliES reads version {supported}"
            " and older"
        )
        self.path = path
        self.version = version
        self.supported = supported


# -- damage ------------------------------------------------------------------------------


class CorruptionError(EngineError):
    """Damage the engine will not repair by itself: run ``meilies-fsck --repair``."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(
            f"corrupt data in {path} at offset {offset}: {reason}"
            f" (run `meilies-fsck {path.parent} --repair` to inspect and repair)"
        )
        self.path = path
        self.offset = offset
        self.reason = reason


class CorruptRecord(CorruptionError):
    """A log record that fails its checksum or framing before the end of the log."""


class CorruptSegment(CorruptionError):
    """A segment whose file header, name or position sequence is wrong."""


class CorruptIndex(EngineError):
    """An index or checkpoint file that fails its checks.

    Indexes and checkpoints are derived data: the engine catches this, logs one warning
    and rebuilds them from the log. It is never raised to the engine's callers.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"index {path}: {reason}")
        self.path = path
        self.reason = reason


# -- I/O ----------------------------------------------------------------------------------


class BadFrameCopy(EngineError):
    """A frame copy (framecopy.py) that is not its segment's whole, undamaged copy.

    Derived data: the engine drops it with a warning and reads the segment instead;
    ``meilies-fsck`` reports it and ``--repair`` deletes it.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class StorageError(EngineError):
    """A write or sync failed (disk full, I/O error, file too large).

    Nothing of the failed append is visible or survives a restart; what was stored
    before stays readable. ``errno`` is the operating system's error number.
    """

    def __init__(self, path: Path, operation: str, cause: OSError) -> None:
        super().__init__(f"{operation} {path} failed: {cause.strerror or cause}")
        self.path = path
        self.operation = operation
        self.errno = cause.errno
        self.cause = cause


class EngineClosed(EngineError):
    """The engine was closed; no more reads or writes."""
