"""The library's DCB recorder (dynamic consistency boundaries: events tagged, read by
tags and types, appended on the condition that no event matching a query came after
a position) over MeiliES.

    an application's DCB events  -> one stream, ``<prefix><app>.dcb.events``
    position                     -> event number + 1 (the library's positions start
                                    at 1, and an application's are contiguous)
    type / data / tags           -> event name / event data / metadata (a JSON list)
    read(query, after, limit)    -> ``range <stream> <after> +``, the query matched in
                                    the client
    append(events, condition)    -> the events after ``condition.after`` are read and
                                    matched against the condition's query; if none
                                    match, ``append-full`` expects the last number read,
                                    so the check and the append are one: an event
                                    appended in between fails the expectation, and only
                                    it is read and matched before trying again
    subscribe(query, after)      -> ``subscribe <stream>:<after>`` with full frames

MeiliES checks one stream's expected version, not a query, so an application's DCB
appends are serialised through its one stream (the library's PostgreSQL DCB recorder
locks a table for the same reason); each append costs one read of the events since
the position its decision was made at. A server-side condition ("no event with these
tags and names after position p") would make it one round trip.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

from eventsourcing.dcb.api import (DCBAppendCondition, DCBEvent, DCBQuery, DCBReadResponse,
                                   DCBRecorder, DCBSequencedEvent, DCBSubscription)
from eventsourcing.persistence import IntegrityError, ProgrammingError

from ..client import Client, Event, EventData, MeiliesError, WrongExpectedVersion
from .connector import Connector, persistence_error
from .names import StreamNames
from .recorders import MAX_ATTEMPTS, PAGE, _token

DCB_KIND = "dcb"


class MeiliesDCBRecorder(DCBRecorder):
    def __init__(self, connector: Connector, names: StreamNames) -> None:
        self.connector = connector
        self.names = names
        self.stream = names.head(DCB_KIND) + "events"

    def read(self, query: DCBQuery | None = None, *, after: int | None = None,
             limit: int | None = None) -> DCBReadResponse:
        if limit is not None and limit < 1:
            return _Response([], None)
        return self.connector.run(lambda client: self._read(client, query, after, limit))

    def _read(self, client: Client, query: DCBQuery | None, after: int | None,
              limit: int | None) -> _Response:
        found: list[DCBSequencedEvent] = []
        last: int | None = None  # the last position read
        for event in _events(client, self.stream, after or 0):
            last = event.number + 1
            if query is None or _matches(query, event):
                found.append(_sequenced(event))
                if limit is not None and len(found) == limit:
                    return _Response(found, last)
        if limit is not None:  # the head is the last event returned
            return _Response(found, found[-1].position if found else None)
        if last is None:  # nothing after ``after``: the head is the stream's end
            number = client.last_event_number(self.stream)
            last = None if number is None else number + 1
        return _Response(found, last)

    def append(self, events: Sequence[DCBEvent],
               condition: DCBAppendCondition | None = None) -> int:
        if not events:
            raise ProgrammingError("an append needs at least one event")
        token = _token()
        data = [EventData(e.type, e.data, id=f"{token}.{i}", metadata=_tags(e.tags))
                for i, e in enumerate(events)]
        if condition is None:
            result = self.connector.run(lambda client: client.append(self.stream, data))
            return int(result) + 1
        return self.connector.run(
            lambda client: self._append(client, data, condition, f"{token}."))

    def _append(self, client: Client, data: list[EventData], condition: DCBAppendCondition,
                ours: str) -> int:
        """Check and append, until no other append comes in between. Run again from
        the start after a lost connection: events whose ids begin with ``ours`` are
        this append's, stored by the attempt whose reply was lost."""
        query = condition.fail_if_events_match
        checked = condition.after or 0  # numbers below this need no check
        last: int | None = None  # the stream's last number, as far as we read
        for _attempt in range(MAX_ATTEMPTS):
            for event in _events(client, self.stream, checked):
                if event.id is not None and event.id.startswith(ours):
                    return event.number + len(data) - int(event.id[len(ours):])
                if _matches(query, event):
                    raise IntegrityError(f"an event matching the append condition is at"
                                         f" position {event.number + 1}: {condition}")
                last = event.number
            if last is None:
                last = client.last_event_number(self.stream)  # nothing after ``after``
            checked = 0 if last is None else last + 1
            try:
                result = client.append(self.stream, data,
                                       expected="none" if last is None else last)
            except WrongExpectedVersion:
                continue  # appended in between: check those events too
            return int(result) + 1
        raise IntegrityError(f"gave up after {MAX_ATTEMPTS} attempts: other appends kept"
                             " coming in between")

    def subscribe(self, query: DCBQuery | None = None, *,
                  after: int | None = None) -> MeiliesDCBSubscription:
        return MeiliesDCBSubscription(self, query=query, after=after)


class MeiliesDCBSubscription(DCBSubscription[MeiliesDCBRecorder]):
    """Events after ``after`` that match the query, then new ones as they are appended;
    resumed over reconnects by the client. :meth:`stop` may be called from any thread."""

    def __init__(self, recorder: MeiliesDCBRecorder, query: DCBQuery | None = None,
                 after: int | None = None) -> None:
        super().__init__(recorder=recorder, query=query, after=after)
        # Positions after ``after`` are numbers from ``after``.
        self._events = recorder.connector.subscribe(f"{recorder.stream}:{after or 0}")

    def __next__(self) -> DCBSequencedEvent:
        while not self._has_been_stopped:
            try:
                event = next(self._events)
            except StopIteration:
                break
            except MeiliesError as exc:
                raise persistence_error(exc) from exc
            if self._query is None or _matches(self._query, event):
                sequenced = _sequenced(event)
                self._last_position = sequenced.position
                return sequenced
        raise StopIteration

    def stop(self) -> None:
        super().stop()
        self._events.close()


class _Response(DCBReadResponse):
    def __init__(self, events: list[DCBSequencedEvent], head: int | None) -> None:
        self._events = iter(events)
        self._head = head

    @property
    def head(self) -> int | None:
        return self._head

    def __next__(self) -> DCBSequencedEvent:
        return next(self._events)


def _events(client: Client, stream: str, start: int) -> Iterator[Event]:
    """The stream's events numbered ``start`` and on, a page at a time."""
    while True:
        page = client.range(stream, start, "+", count=PAGE)
        yield from page
        if len(page) < PAGE:
            return
        start = page[-1].number + 1


def _tags(tags: list[str]) -> bytes:
    return json.dumps(tags, ensure_ascii=False, separators=(",", ":")).encode() if tags else b""


def _tags_of(event: Event) -> list[str]:
    return json.loads(event.metadata) if event.metadata else []


def _matches(query: DCBQuery, event: Event) -> bool:
    """An event matches a query with no items, or one item whose types (if any) hold
    its type and whose tags it all has."""
    if not query.items:
        return True
    tags: set[str] | None = None
    for item in query.items:
        if item.types and event.name not in item.types:
            continue
        if item.tags:
            if tags is None:
                tags = set(_tags_of(event))
            if not tags.issuperset(item.tags):
                continue
        return True
    return False


def _sequenced(event: Event) -> DCBSequencedEvent:
    return DCBSequencedEvent(DCBEvent(event.name, event.data, _tags_of(event)),
                             event.number + 1)
