"""The library's DCB recorder test case (dynamic consistency boundaries) against a
real server, and the DCB side of its projection cases; plus an append whose reply is
lost, and a condition that another append breaks in between."""

from __future__ import annotations

from typing import ClassVar

from eventsourcing.dcb import tests as dcb_cases
from eventsourcing.dcb.api import DCBAppendCondition, DCBEvent, DCBQuery, DCBQueryItem
from eventsourcing.dcb.msgpack import MessagePackMapper
from eventsourcing.persistence import IntegrityError
from eventsourcing.tests import projection as projection_cases
from eventsourcing.utils import get_topic

from lossy_proxy import LossyProxy
from meilies.eventsourcing import MeiliesDCBRecorder
from support import MeiliesServerCase
from views import MeiliesEventCounters


class TestDCBRecorder(MeiliesServerCase, dcb_cases.DCBRecorderTestCase):
    def recorder(self, **settings: str) -> MeiliesDCBRecorder:
        return self.factory("DCBApplication", **settings).dcb_recorder()

    def test_append_read(self) -> None:
        self._test_append_read(self.recorder())

    def test_append_subscribe(self) -> None:
        self._test_append_subscribe(self.recorder())

    def test_an_append_in_between_is_checked_against_the_condition(self) -> None:
        recorder, other = self.recorder(), self.recorder()
        recorder.append([DCBEvent("Opened", b"", ["account-1"])])
        seen = recorder.read(DCBQuery([DCBQueryItem(tags=["account-1"])]))
        assert list(seen) and seen.head == 1
        # Someone else appends after our read: unrelated first, then related.
        other.append([DCBEvent("Opened", b"", ["account-2"])])
        condition = DCBAppendCondition(DCBQuery([DCBQueryItem(tags=["account-1"])]),
                                       after=seen.head)
        assert recorder.append([DCBEvent("Paid", b"", ["account-1"])], condition) == 3
        other.append([DCBEvent("Closed", b"", ["account-1"])])
        with self.assertRaises(IntegrityError):
            recorder.append([DCBEvent("Paid", b"", ["account-1"])], condition)
        assert recorder.read().head == 4

    def test_an_append_whose_reply_is_lost_is_stored_once(self) -> None:
        proxy = LossyProxy(self.server.port)
        try:
            recorder = self.recorder(MEILIES_PORT=str(proxy.port))
            recorder.append([DCBEvent("Opened", b"", ["account-1"])])
            proxy.lose_reply_to = b"append-full"
            # The retry finds its own events (their ids) past the condition's position,
            # not a conflict.
            condition = DCBAppendCondition(DCBQuery([DCBQueryItem(tags=["account-1"])]),
                                           after=1)
            position = recorder.append([DCBEvent("Paid", b"1", ["account-1"]),
                                        DCBEvent("Paid", b"2", ["account-1"])], condition)
            assert proxy.lost == 1 and position == 3
            assert [e.position for e in self.recorder().read()] == [1, 2, 3]
        finally:
            proxy.close()


class TestTaggedDecisionCountersProjection(
        MeiliesServerCase, projection_cases.TaggedDecisionCountersProjectionTestCase):
    view_class = MeiliesEventCounters
    env: ClassVar[dict[str, str]] = {}

    def setUp(self) -> None:
        super().setUp()
        self.env = {**self.meilies_env, "MAPPER_TOPIC": get_topic(MessagePackMapper)}
