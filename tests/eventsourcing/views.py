"""A materialised view on MeiliES for the library's projection test cases (and the crash
test): event counters whose increments and tracking records share one transaction."""

from __future__ import annotations

from eventsourcing.persistence import Tracking
from eventsourcing.tests.projection import EventCountersView

from meilies.client import EventData
from meilies.eventsourcing import MeiliesTrackingRecorder
from meilies.eventsourcing.recorders import _token
from meilies.eventsourcing.versions import Increasing, Run, encode_version


class MeiliesEventCounters(MeiliesTrackingRecorder, EventCountersView):
    """Two counters, each a stream ``<ns>.counters.<name>`` with one event per
    increment (the count is its last number + 1), appended in the same transaction
    as the tracking record of the notification counted: a notification is counted
    once, or not at all. Each increment carries the notification id as its version,
    so the counter's stream also refuses an id it has already counted."""

    CREATED = "created"
    SUBSEQUENT = "subsequent"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.head = self.names.head("counters")
        self.counter_policy = Increasing()

    def get_created_event_counter(self) -> int:
        return self._count(self.CREATED)

    def get_subsequent_event_counter(self) -> int:
        return self._count(self.SUBSEQUENT)

    def incr_created_event_counter(self, tracking: Tracking) -> None:
        self._increment(self.CREATED, tracking)

    def incr_subsequent_event_counter(self, tracking: Tracking) -> None:
        self._increment(self.SUBSEQUENT, tracking)

    def _count(self, name: str) -> int:
        last = self.connector.run(
            lambda client: client.last_event_number(self.head + name))
        return 0 if last is None else last + 1

    def _increment(self, name: str, tracking: Tracking) -> None:
        token = _token()
        version = tracking.notification_id
        increment = EventData("incremented", b"", id=f"{token}.0",
                              metadata=encode_version(version))
        self._write([self._tracking_run(tracking, token, 1),
                     Run(self.head + name, self.counter_policy, [version], [increment])])
