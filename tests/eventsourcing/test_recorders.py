"""The library's recorder test cases against a real ``meilies-server``, subclassed as
third-party persistence modules do (``eventsourcing-kurrentdb``, the library's own
``sqlite`` and ``postgres`` tests), with UUID and str originator ids."""

from __future__ import annotations

from uuid import UUID, uuid4

from eventsourcing.tests import persistence as cases

from meilies.eventsourcing import (MeiliesAggregateRecorder, MeiliesApplicationRecorder,
                                   MeiliesProcessRecorder, MeiliesTrackingRecorder)
from support import MeiliesServerCase


class WithStrOriginatorIDs:
    """The library allows str ids; SQL needs ``ORIGINATOR_ID_TYPE=text`` for them, our
    stream names say which kind an id is (names.py)."""

    def new_originator_id(self) -> UUID | str:
        return "test-" + str(uuid4())


class TestAggregateRecorder(MeiliesServerCase, cases.AggregateRecorderTestCase):
    def create_recorder(self) -> MeiliesAggregateRecorder:
        return self.factory().aggregate_recorder()


class TestAggregateRecorderStrIDs(WithStrOriginatorIDs, TestAggregateRecorder):
    pass


class TestSnapshotRecorder(MeiliesServerCase, cases.AggregateRecorderTestCase):
    """The snapshots' recorder allows gaps between versions; the same cases hold."""

    def create_recorder(self) -> MeiliesAggregateRecorder:
        return self.factory().aggregate_recorder("snapshots")


class TestApplicationRecorder(MeiliesServerCase, cases.ApplicationRecorderTestCase):
    def create_recorder(self) -> MeiliesApplicationRecorder:
        return self.factory().application_recorder()

    def test_insert_subscribe(self) -> None:
        # Optional in the library (a recorder may lack subscriptions): ours has them.
        self.optional_test_insert_subscribe()


class TestApplicationRecorderStrIDs(WithStrOriginatorIDs, TestApplicationRecorder):
    pass


class TestTrackingRecorder(MeiliesServerCase, cases.TrackingRecorderTestCase):
    def create_recorder(self) -> MeiliesTrackingRecorder:
        return self.factory().tracking_recorder()


class TestProcessRecorder(MeiliesServerCase, cases.ProcessRecorderTestCase):
    def create_recorder(self) -> MeiliesProcessRecorder:
        return self.factory().process_recorder()


class TestProcessRecorderStrIDs(WithStrOriginatorIDs, TestProcessRecorder):
    pass


class TestNonInterleavingNotificationIDs(MeiliesServerCase,
                                         cases.NonInterleavingNotificationIDsBaseCase):
    def create_recorder(self) -> MeiliesApplicationRecorder:
        return self.factory().application_recorder()
