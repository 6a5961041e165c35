"""Originator versions and event numbers: what an insert expects of each stream, so
that it is stored all or none and a conflict is an ``IntegrityError``.

MeiliES numbers a stream's events 0, 1, 2, ... with no gaps and checks an append's
expected last number atomically (PROTOCOL.md, ``append``). The library numbers an
aggregate's events from ``Aggregate.INITIAL_VERSION`` (1 by default), and its test cases
start other sequences at 0; in SQL a version is a column of a primary key. Two kinds of
stream bridge the difference; both keep each event's originator version in its
metadata (ASCII decimal), so that a notification read from ``$all`` has its version
without a lookup.

Contiguous (aggregate events)
    ``number = version - base``, where ``base`` is the version of the stream's first
    event, whatever it is. An insert of versions v..v+k expects the stream's last number
    to be ``v - base - 1`` ("none" when that is -1): a version already stored, or one
    that leaves a gap, fails the server's check and stores nothing. A base never changes
    once stored, so it is cached for good. A stream this process has not seen is
    guessed to be new (expected "none", one round trip for the usual first save); if
    the server says it is not, the base is read (``range <s> - - COUNT 1``) and the
    insert planned again.

Increasing (snapshots, tracking records)
    Versions only grow along the stream, gaps allowed (a snapshot every N events; a
    tracking record per processed notification). An insert needs its first version to
    be above the stream's last, and expects the stream's last number. The cached last
    (number, version) may be stale when other processes write, so a refused expectation
    reads the stream's last event (``revrange <s> + - COUNT 1``) and plans again; the
    insert is an ``IntegrityError`` when its first version is not above the last.

What differs from SQL, knowingly: an aggregate's events cannot skip a version nor be
inserted below its first one (the library never does either), and a snapshot older
than an aggregate's newest snapshot is refused rather than stored.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Union

from eventsourcing.persistence import IntegrityError

from ..client import Client, EventData
from . import frames
from .frames import Frame

Expected = Union[int, Literal["none"]]

#: Streams whose state each policy remembers; the oldest are forgotten first.
DEFAULT_CACHE_SIZE = 100_000


def encode_version(version: int) -> bytes:
    return b"%d" % version


class _Cache:
    """stream -> state, at most ``size`` entries, the oldest dropped first. Thread-safe."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._states: dict[str, object] = {}
        self._lock = threading.Lock()

    def get(self, stream: str) -> object | None:
        return self._states.get(stream)

    def put(self, stream: str, state: object) -> None:
        with self._lock:
            states = self._states
            states.pop(stream, None)
            states[stream] = state
            if len(states) > self.size:
                del states[next(iter(states))]

    def forget(self, stream: str) -> None:
        with self._lock:
            self._states.pop(stream, None)


class Contiguous:
    """``number = version - base``; the state of a stream is its base (an int)."""

    #: A refused expectation computed from a cached base is a real conflict.
    exact = True

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self._bases = _Cache(cache_size)

    def known(self, stream: str) -> int | None:
        return self._bases.get(stream)  # type: ignore[return-value]

    def remember(self, stream: str, base: int) -> None:
        self._bases.put(stream, base)

    def learn(self, stream: str, events: Sequence[Frame]) -> int | None:
        """Remember the base that any one of ``events`` of ``stream`` shows."""
        if not events:
            return None
        base = frames.version(events[0]) - events[0][frames.NUMBER]
        if self._bases.get(stream) != base:
            self._bases.put(stream, base)
        return base

    def refresh(self, client: Client, stream: str) -> int | None:
        """Read the stream's base (None: the stream has no events)."""
        return self.learn(stream, frames.read(client, "range", stream, "-", "-", 1))

    def plan(self, base: int | None, versions: Sequence[int]) -> tuple[Expected, int]:
        """The expected last number for appending ``versions`` (consecutive), and the
        base after it; ``base`` None means "guess the stream is new"."""
        _check_consecutive(versions)
        if base is None:
            return "none", versions[0]
        last = versions[0] - base - 1
        if last < -1:
            raise IntegrityError(f"version {versions[0]} is below the aggregate's first"
                                 f" version {base}, which is already stored")
        return ("none" if last == -1 else last), base


@dataclass(frozen=True)
class Last:
    """The last event of an increasing stream: its number and its version."""

    number: int
    version: int


class Increasing:
    """Versions strictly increase along the stream; the state is its :class:`Last`."""

    #: A cached Last may be stale (another process wrote): refresh and plan again.
    exact = False

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self._lasts = _Cache(cache_size)

    def known(self, stream: str) -> Last | None:
        return self._lasts.get(stream)  # type: ignore[return-value]

    def remember(self, stream: str, last: Last) -> None:
        self._lasts.put(stream, last)

    def refresh(self, client: Client, stream: str) -> Last | None:
        events = frames.read(client, "revrange", stream, "+", "-", 1)
        if not events:
            self._lasts.forget(stream)
            return None
        last = Last(events[0][frames.NUMBER], frames.version(events[0]))
        self._lasts.put(stream, last)
        return last

    def plan(self, last: Last | None, versions: Sequence[int]) -> tuple[Expected, Last]:
        for before, after in zip(versions, versions[1:]):
            if after <= before:
                raise IntegrityError(f"versions must increase: {before} then {after}")
        if last is None:
            return "none", Last(len(versions) - 1, versions[-1])
        if versions[0] <= last.version:
            raise IntegrityError(f"version {versions[0]} is not above the last one"
                                 f" stored, {last.version}")
        return last.number, Last(last.number + len(versions), versions[-1])


Policy = Union[Contiguous, Increasing]


@dataclass
class Run:
    """Events for one stream, appended with one command: consecutive events of one
    originator in an insert (or one tracking record)."""

    stream: str
    policy: Policy
    versions: list[int]
    events: list[EventData]


def plan(runs: Iterable[Run]) -> tuple[list[Expected], dict[str, object], set[str]]:
    """Each run's expected last number, as if the runs before it were applied (two runs
    of one stream chain, as the server checks them in a transaction); the state of every
    stream afterwards; and the streams whose state was guessed (not known)."""
    expected: list[Expected] = []
    states: dict[str, object] = {}
    guessed: set[str] = set()
    for run in runs:
        if run.stream in states:
            state = states[run.stream]
        else:
            state = run.policy.known(run.stream)
            if state is None:
                guessed.add(run.stream)
        exp, states[run.stream] = run.policy.plan(state, run.versions)  # type: ignore[arg-type]
        expected.append(exp)
    return expected, states, guessed


def _check_consecutive(versions: Sequence[int]) -> None:
    first = versions[0]
    for i, version in enumerate(versions):
        if version != first + i:
            raise IntegrityError(f"an aggregate's versions must follow each other:"
                                 f" {versions[i - 1]} then {version}")
