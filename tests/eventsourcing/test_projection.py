"""The library's projection test cases that apply to an event store: a materialised
view whose counters and tracking records are written in one transaction, the
projection runner following an application through a subscription, and an
event-sourced projection (a process recorder: new events and the tracking record of
the notification they came from, all or none). The DCB projection case is in
test_dcb.py."""

from __future__ import annotations

from eventsourcing.tests import projection as cases

from support import MeiliesServerCase
from views import MeiliesEventCounters


class WithEnv(MeiliesServerCase):
    def setUp(self) -> None:
        super().setUp()
        self.env = dict(self.meilies_env)  # the cases pass self.env to runners


class TestEventCountersView(MeiliesServerCase, cases.EventCountersViewTestCase):
    def construct_event_counters_view(self) -> MeiliesEventCounters:
        return self.factory("eventcounters").tracking_recorder(MeiliesEventCounters)


class TestAggregateEventCountersProjection(WithEnv,
                                           cases.AggregateEventCountersProjectionTestCase):
    view_class = MeiliesEventCounters


class TestEventSourcedProjection(WithEnv, cases.EventSourcedProjectionTestCase):
    pass
