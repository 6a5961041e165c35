"""MeiliES' storage engine: segments of checksummed records, fixed-width indexes, mmap reads.

It knows nothing of sockets or gevent; the server drives it from one thread.
"""

from .errors import (CorruptIndex, CorruptionError, CorruptRecord, CorruptSegment,
                     DirectoryLocked, EngineClosed, EngineError, ForeignFile, InvalidArgument,
                     StorageError, UnreadableDirectory, UnsupportedFormatVersion,
                     WrongExpectedVersion)
from .log import ANY, FSYNC_POLICIES, NO_STREAM, AppendResult, Engine, Event, OpenReport

__all__ = [
    "ANY", "NO_STREAM", "FSYNC_POLICIES", "AppendResult", "Engine", "Event", "OpenReport",
    "CorruptIndex", "CorruptionError", "CorruptRecord", "CorruptSegment", "DirectoryLocked",
    "EngineClosed", "EngineError", "ForeignFile", "InvalidArgument", "StorageError",
    "UnreadableDirectory",
    "UnsupportedFormatVersion", "WrongExpectedVersion",
]
