"""Append notifications: wake the subscriptions whose streams got new events.

Each subscription owns one ``gevent.event.Event``, set here and cleared only by its
owner, so that no subscription can clear another's wake-up. A wake-up means
"something happened at least once" (gevent's ``Event`` contract): the woken
subscription re-reads the log from the last number it sent, so many appends cost
one wake-up and nothing is lost between them.
"""

from __future__ import annotations

from gevent.event import Event

from ..engine import Engine


class Notifier:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._by_stream: dict[bytes, set[Event]] = {}
        self._all: set[Event] = set()
        engine.add_listener(self._on_visible)

    def watch(self, stream: bytes | None) -> Event:
        """A new wake-up for ``stream`` (None: every stream, for ``$all``)."""
        event = Event()
        if stream is None:
            self._all.add(event)
        else:
            self._by_stream.setdefault(stream, set()).add(event)
        return event

    def unwatch(self, stream: bytes | None, event: Event) -> None:
        if stream is None:
            self._all.discard(event)
            return
        watchers = self._by_stream.get(stream)
        if watchers is not None:
            watchers.discard(event)
            if not watchers:
                del self._by_stream[stream]

    @property
    def subscriptions(self) -> int:
        return len(self._all) + sum(len(w) for w in self._by_stream.values())

    def _on_visible(self, stream_ids: set[int]) -> None:
        if self._by_stream:
            name_of = self._engine.stream_name
            for sid in stream_ids:
                watchers = self._by_stream.get(name_of(sid))
                if watchers:
                    for event in watchers:
                        event.set()
        for event in self._all:
            event.set()
