"""``ApplicationRecorder.subscribe``: the application's notifications, then new ones as
they are stored, over one ``$all@<position>`` subscription with full frames.

Notification ids are positions + 1, so "ids greater than ``gt``" is "positions from
``gt``": the subscription is ``$all@<gt>`` (``$all@0`` for all). The client's
:class:`~meilies.client.Subscription` reconnects and resumes after the last position it
yielded, so a server restart costs no notification and repeats none. Events of other
applications and other kinds (snapshots, tracking records) and, when ``topics`` are
given, other topics, are dropped here (see the application recorder on what a
server-side filter would save).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from eventsourcing.persistence import Notification, Subscription

from ..client import MeiliesError
from .connector import persistence_error

if TYPE_CHECKING:
    from .recorders import MeiliesApplicationRecorder


class MeiliesSubscription(Subscription["MeiliesApplicationRecorder"]):
    """Iterate for notifications; :meth:`stop` (from any thread) ends the iteration."""

    def __init__(self, recorder: MeiliesApplicationRecorder, gt: int | None = None,
                 topics: Sequence[str] = ()) -> None:
        super().__init__(recorder=recorder, gt=gt, topics=topics)
        self._head = recorder.head
        self._wanted = frozenset(topics)
        self._events = recorder.connector.subscribe(f"$all@{gt or 0}")

    def __next__(self) -> Notification:
        head, wanted = self._head, self._wanted
        while not self._has_been_stopped:
            try:
                event = next(self._events)
            except StopIteration:
                break  # closed by stop()
            except MeiliesError as exc:  # the reconnects gave up, or the server misspoke
                raise persistence_error(exc) from exc
            if event.stream.startswith(head) and (not wanted or event.name in wanted):
                notification = self._recorder.notification(event)
                self._last_notification_id = notification.id
                return notification
        raise StopIteration

    def stop(self) -> None:
        super().stop()
        self._events.close()
