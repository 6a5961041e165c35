"""The recorders: the library's ``AggregateRecorder``, ``ApplicationRecorder``,
``TrackingRecorder`` and ``ProcessRecorder`` over MeiliES.

    aggregate (originator id)   -> a stream (names.py)
    originator version          -> event number (versions.py), the version in metadata
    topic, state                -> event name, event data
    notification id             -> global position + 1 (the library counts from 1)
    insert_events of n runs     -> one append-full, or MULTI/EXEC of n appends
    tracking record             -> an event on "<ns>.tracking.<upstream>", in the same
                                   transaction as the events it tracks

Every event gets an id (a token per insert plus its index), so an insert whose reply
was lost is sent again safely: the server answers it as it first did (connector.py).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import (AggregateRecorder, ApplicationRecorder,
                                       IntegrityError, Notification, ProcessRecorder,
                                       Recorder, StoredEvent, Subscription, Tracking,
                                       TrackingRecorder)

from ..client import AppendResult, Client, Event, EventData, WrongExpectedVersion
from . import frames
from .connector import Connector
from .frames import DATA, METADATA, NAME, NUMBER, POSITION, STREAM, Frame
from .names import TRACKING_KIND, StreamNames, originator_id
from .versions import Contiguous, Increasing, Run, encode_version, plan

#: Events asked for per range request (the server's cap without COUNT).
PAGE = 10_000
#: Plans of one insert, at most: each retry learns a stream's state, so more means
#: other writers keep winning the race.
MAX_ATTEMPTS = 10
#: Event name of a tracking record; its data is the notification id, in ASCII decimal.
TRACKING_EVENT = "tracked"
#: The first version guessed for a stream whose base is not known yet when a read
#: starts after a version (the library's ``Aggregate.INITIAL_VERSION``).
GUESSED_BASE = 1
#: First COUNT when filtering $all client-side; grows by this factor up to PAGE.
FILTER_GROWTH = 4


class MeiliesRecorder(Recorder):
    """What every MeiliES recorder has: a connector, its application's stream names,
    and the writer of runs (an insert, with its tracking record)."""

    def __init__(self, connector: Connector, names: StreamNames, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.connector = connector
        self.names = names
        self.tracking_policy = Increasing()

    def _write(self, runs: list[Run]) -> list[AppendResult]:
        """Append every run, all or none, in one command or transaction; one result per
        run. A conflict is an IntegrityError (nothing stored)."""
        if not runs:
            return []
        streams = {run.stream: run for run in runs}
        for _attempt in range(MAX_ATTEMPTS):
            expected, states, guessed = plan(runs)
            try:
                results = self.connector.run(lambda client: _send(client, runs, expected))
            except WrongExpectedVersion as exc:
                run = streams.get(exc.stream or "")
                if run is None or (run.policy.exact and exc.stream not in guessed):
                    raise IntegrityError(str(exc)) from exc
                self.connector.run(lambda client: run.policy.refresh(client, run.stream))
                continue
            for stream, state in states.items():
                streams[stream].policy.remember(stream, state)  # type: ignore[arg-type]
            return results
        raise IntegrityError(f"gave up after {MAX_ATTEMPTS} attempts: other writers kept"
                             " appending to the same streams")

    def _tracking_run(self, tracking: Tracking, token: str, index: int) -> Run:
        event = EventData(TRACKING_EVENT, encode_version(tracking.notification_id),
                          id=f"{token}.{index}",
                          metadata=encode_version(tracking.notification_id))
        return Run(self.names.tracking(tracking.application_name), self.tracking_policy,
                   [tracking.notification_id], [event])


class MeiliesAggregateRecorder(MeiliesRecorder, AggregateRecorder):
    """Aggregate events in the streams ``<ns>.<purpose>.<id>``.

    ``increasing`` (the factory sets it for snapshots) allows gaps between the versions
    of a stream: see versions.py.
    """

    def __init__(self, connector: Connector, names: StreamNames, purpose: str = "events",
                 increasing: bool = False, **kwargs: Any) -> None:
        super().__init__(connector, names, **kwargs)
        self.purpose = purpose
        self.head = names.head(purpose)
        self.policy: Contiguous | Increasing = Increasing() if increasing else Contiguous()

    # -- writes -----------------------------------------------------------------------------

    def insert_events(self, stored_events: Sequence[StoredEvent],
                      **kwargs: Any) -> Sequence[int] | None:
        self._insert(stored_events, kwargs.get("tracking"))
        return None

    def _insert(self, stored_events: Sequence[StoredEvent],
                tracking: Tracking | None) -> list[int]:
        """Store the events (and the tracking record) all or none; their notification
        ids, in the order given."""
        token = _token()
        runs = self._runs(stored_events, token)
        if tracking is not None:
            runs.append(self._tracking_run(tracking, token, len(stored_events)))
        results = self._write(runs)
        ids: list[int] = []
        for run, result in zip(runs, results):
            if run.policy is self.tracking_policy:
                continue
            last_id = result.last_position + 1
            ids.extend(range(last_id - len(run.events) + 1, last_id + 1))
        return ids

    def _runs(self, stored_events: Sequence[StoredEvent], token: str) -> list[Run]:
        """Consecutive events of one originator make a run (one append); order is kept,
        so notification ids follow the order of ``stored_events``, as in SQL."""
        runs: list[Run] = []
        run: Run | None = None
        last_id: object = _NOTHING
        for i, stored in enumerate(stored_events):
            event = EventData(stored.topic, stored.state, id=f"{token}.{i}",
                              metadata=encode_version(stored.originator_version))
            if stored.originator_id != last_id or run is None:
                last_id = stored.originator_id
                run = Run(self.names.aggregate(self.head, stored.originator_id),
                          self.policy, [], [])
                runs.append(run)
            run.versions.append(stored.originator_version)
            run.events.append(event)
        return runs

    # -- reads ------------------------------------------------------------------------------

    def select_events(self, originator_id: Any, *, gt: int | None = None,
                      lte: int | None = None, desc: bool = False,
                      limit: int | None = None) -> Sequence[StoredEvent]:
        if limit is not None and limit < 1:
            return []
        stream = self.names.aggregate(self.head, originator_id)
        if isinstance(self.policy, Contiguous):
            events = self.connector.run(
                lambda client: self._select_contiguous(client, stream, gt, lte, desc, limit))
        else:
            events = self.connector.run(
                lambda client: _select_increasing(client, stream, gt, lte, desc, limit))
        return [StoredEvent(originator_id, int(f[METADATA]) if f[METADATA] else f[NUMBER],
                            f[NAME].decode(), f[DATA]) for f in events]

    def _select_contiguous(self, client: Client, stream: str, gt: int | None,
                           lte: int | None, desc: bool, limit: int | None) -> list[Frame]:
        policy: Contiguous = self.policy  # type: ignore[assignment]
        if gt is None and lte is None:
            events = _read(client, stream, "-", "+", desc, limit)
            policy.learn(stream, events)
            return events
        known = policy.known(stream)
        base = GUESSED_BASE if known is None else known
        events = _read_versions(client, stream, base, gt, lte, desc, limit)
        if known is not None:
            return events
        actual = policy.learn(stream, events) if events else policy.refresh(client, stream)
        if actual is None or actual == base:
            return events  # no stream, or the guess was right
        return _read_versions(client, stream, actual, gt, lte, desc, limit)


class MeiliesApplicationRecorder(MeiliesAggregateRecorder, ApplicationRecorder):
    """Aggregate events and the application's notification log: ``$all``, filtered to
    the streams of this application's ``events`` kind.

    The filter runs in the client: events of other applications (and of snapshots and
    tracking) on the same server travel to it and are dropped. A server-side filter on
    a stream-name prefix and event names would save that traffic, and turn
    :meth:`max_notification_id` on a busy shared server into one round trip.
    """

    def __init__(self, connector: Connector, names: StreamNames, **kwargs: Any) -> None:
        kwargs.setdefault("purpose", "events")
        super().__init__(connector, names, **kwargs)

    def insert_events(self, stored_events: Sequence[StoredEvent],
                      **kwargs: Any) -> Sequence[int] | None:
        return self._insert(stored_events, kwargs.get("tracking"))

    def select_notifications(self, start: int | None, limit: int, stop: int | None = None,
                             topics: Sequence[str] = (), *,
                             inclusive_of_start: bool = True) -> Sequence[Notification]:
        # Notification id = position + 1: id >= start is position >= start - 1.
        first = 0 if start is None else max(start - 1 if inclusive_of_start else start, 0)
        last = None if stop is None else stop - 1
        if limit < 1 or (last is not None and last < first):
            return []
        wanted = frozenset(topics)
        return self.connector.run(
            lambda client: self._notifications(client, first, last, limit, wanted))

    def _notifications(self, client: Client, first: int, last: int | None, limit: int,
                       topics: frozenset[str]) -> list[Notification]:
        head = self.head.encode()
        skip = len(head)
        wanted = frozenset(topic.encode() for topic in topics)
        ids: dict[bytes, Any] = {}  # stream -> originator id, parsed once per read
        found: list[Notification] = []
        count = min(limit, PAGE)
        end: int | str = "+" if last is None else last
        while True:
            page = frames.read(client, "range", "$all", first, end, count)
            for f in page:
                stream = f[STREAM]
                if not stream.startswith(head) or (wanted and f[NAME] not in wanted):
                    continue
                oid = ids.get(stream)
                if oid is None:
                    oid = ids[stream] = originator_id(stream[skip:].decode())
                metadata = f[METADATA]
                found.append(Notification(
                    id=f[POSITION] + 1, originator_id=oid,
                    originator_version=int(metadata) if metadata else f[NUMBER],
                    topic=f[NAME].decode(), state=f[DATA]))
                if len(found) == limit:
                    return found
            if len(page) < count:
                return found  # the end of the log, or of [first, last]
            first = page[-1][POSITION] + 1
            if last is not None and first > last:
                return found
            count = min(count * FILTER_GROWTH, PAGE)

    def notification(self, event: Event) -> Notification:
        """The notification of an event that came by subscription."""
        metadata = event.metadata
        return Notification(id=event.position + 1,
                            originator_id=originator_id(event.stream[len(self.head):]),
                            originator_version=int(metadata) if metadata else event.number,
                            topic=event.name, state=event.data)

    def max_notification_id(self) -> int | None:
        return self.connector.run(self._max_notification_id)

    def _max_notification_id(self, client: Client) -> int | None:
        """``revrange $all + - COUNT 1``, and further back while the last events belong
        to other applications (or to snapshots and tracking records)."""
        head = self.head.encode()
        end: int | str = "+"
        count = 1
        while True:
            page = frames.read(client, "revrange", "$all", end, "-", count)
            for f in page:
                if f[STREAM].startswith(head):
                    return f[POSITION] + 1
            if len(page) < count or page[-1][POSITION] == 0:
                return None
            end = page[-1][POSITION] - 1
            count = min(count * FILTER_GROWTH * 4, PAGE)

    def subscribe(self, gt: int | None = None,
                  topics: Sequence[str] = ()) -> Subscription[ApplicationRecorder]:
        from .subscription import MeiliesSubscription  # noqa: PLC0415 (it imports us)

        return MeiliesSubscription(self, gt=gt, topics=topics)


class MeiliesTrackingRecorder(MeiliesRecorder, TrackingRecorder):
    """Tracking records: one stream per upstream application, ``<ns>.tracking.<app>``,
    whose events carry the notification ids processed, increasing (a lower id inserted
    later is an IntegrityError, as is the same id twice)."""

    def insert_tracking(self, tracking: Tracking) -> None:
        self._write([self._tracking_run(tracking, _token(), 0)])

    def max_tracking_id(self, application_name: str) -> int | None:
        stream = self.names.tracking(application_name)
        last = self.connector.run(lambda client: self.tracking_policy.refresh(client, stream))
        return None if last is None else last.version


class MeiliesProcessRecorder(MeiliesTrackingRecorder, MeiliesApplicationRecorder,
                             ProcessRecorder):
    """Events and the tracking record of the notification they were made from, in one
    transaction."""


_NOTHING = object()


def _token() -> str:
    """22 characters unique to one insert: its events' ids are ``<token>.<index>``."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes)[:22].decode()


def _send(client: Client, runs: list[Run], expected: list) -> list[AppendResult]:
    if len(runs) == 1:
        run = runs[0]
        return [client.append(run.stream, run.events, expected=expected[0])]
    with client.transaction() as tx:
        for run, exp in zip(runs, expected):
            tx.append(run.stream, run.events, expected=exp)
    return tx.results  # type: ignore[return-value]


def _read(client: Client, stream: str, start: int | str, end: int | str, desc: bool,
          limit: int | None) -> list[Frame]:
    """Events of ``stream`` numbered ``start`` to ``end`` (both included), ascending or
    descending, at most ``limit``: as many requests of PAGE events as it takes."""
    events: list[Frame] = []
    while True:
        count = PAGE if limit is None else min(PAGE, limit - len(events))
        if desc:
            page = frames.read(client, "revrange", stream, end, start, count)
        else:
            page = frames.read(client, "range", stream, start, end, count)
        events.extend(page)
        if len(page) < count or (limit is not None and len(events) >= limit):
            return events
        if desc:
            if page[-1][NUMBER] == 0:
                return events
            end = page[-1][NUMBER] - 1
        else:
            start = page[-1][NUMBER] + 1


def _read_versions(client: Client, stream: str, base: int, gt: int | None,
                   lte: int | None, desc: bool, limit: int | None) -> list[Frame]:
    """Events with ``gt < version <= lte`` of a contiguous stream whose base is ``base``."""
    start = 0 if gt is None else max(gt + 1 - base, 0)
    if lte is None:
        end: int | str = "+"
    else:
        end = lte - base
        if end < start:
            return []
    return _read(client, stream, start, end, desc, limit)


def _select_increasing(client: Client, stream: str, gt: int | None, lte: int | None,
                       desc: bool, limit: int | None) -> list[Frame]:
    """Events with ``gt < version <= lte`` of a stream whose versions increase with
    gaps: read from the end (desc) or the start, skipping until the range is reached."""
    found: list[Frame] = []
    start: int | str = "-"
    end: int | str = "+"
    count = 1 if desc and limit == 1 else PAGE  # the last snapshot: the usual question
    while True:
        if desc:
            page = frames.read(client, "revrange", stream, end, "-", count)
        else:
            page = frames.read(client, "range", stream, start, "+", count)
        for event in page:
            version = frames.version(event)
            if desc:
                if gt is not None and version <= gt:
                    return found
                if lte is not None and version > lte:
                    continue
            else:
                if lte is not None and version > lte:
                    return found
                if gt is not None and version <= gt:
                    continue
            found.append(event)
            if limit is not None and len(found) >= limit:
                return found
        if len(page) < count:
            return found
        if desc:
            if page[-1][NUMBER] == 0:
                return found
            end = page[-1][NUMBER] - 1
        else:
            start = page[-1][NUMBER] + 1
        count = PAGE


__all__ = ["TRACKING_KIND", "MeiliesAggregateRecorder", "MeiliesApplicationRecorder",
           "MeiliesProcessRecorder", "MeiliesRecorder", "MeiliesTrackingRecorder"]
