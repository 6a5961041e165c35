"""The library's ``InfrastructureFactoryTestCase`` (mapper, compressor, cipher, each
recorder class, topics), and our settings: host, port, password, stream prefix and
the application namespaces that let several applications share one server."""

from __future__ import annotations

from functools import cached_property
from uuid import uuid4

import pytest
from eventsourcing.persistence import (InfrastructureFactory, OperationalError,
                                       StoredEvent, Tracking)
from eventsourcing.tests import persistence as cases
from eventsourcing.utils import Environment

from meilies.eventsourcing import (MeiliesAggregateRecorder, MeiliesApplicationRecorder,
                                   MeiliesFactory, MeiliesProcessRecorder,
                                   MeiliesTrackingRecorder)
from support import MeiliesServerCase


class MyTrackingRecorder(MeiliesTrackingRecorder):
    """A tracking recorder class named by topic (``TRACKING_RECORDER_TOPIC``)."""


class TestFactory(MeiliesServerCase, cases.InfrastructureFactoryTestCase[MeiliesFactory]):
    @cached_property
    def env(self) -> Environment:  # the library's setUp reads (and edits) self.env
        return Environment(env=dict(self.meilies_env))

    def expected_factory_class(self) -> type[MeiliesFactory]:
        return MeiliesFactory

    def expected_aggregate_recorder_class(self) -> type[MeiliesAggregateRecorder]:
        return MeiliesAggregateRecorder

    def expected_application_recorder_class(self) -> type[MeiliesApplicationRecorder]:
        return MeiliesApplicationRecorder

    def expected_tracking_recorder_class(self) -> type[MeiliesTrackingRecorder]:
        return MeiliesTrackingRecorder

    def tracking_recorder_subclass(self) -> type[MeiliesTrackingRecorder]:
        return MyTrackingRecorder

    def expected_process_recorder_class(self) -> type[MeiliesProcessRecorder]:
        return MeiliesProcessRecorder


def event(originator_id, version=1, topic="topic") -> StoredEvent:
    return StoredEvent(originator_id=originator_id, originator_version=version, topic=topic,
                       state=b"{}")


def test_settings_are_read_with_the_application_name_first() -> None:
    factory = MeiliesFactory(Environment("Bank", {
        "MEILIES_HOST": "localhost", "MEILIES_PORT": "1", "BANK_MEILIES_PORT": "7001",
        "MEILIES_PASSWORD": "secret", "MEILIES_STREAM_PREFIX": "team-a/",
        "MEILIES_TIMEOUT": "2.5", "MEILIES_RETRY_SECONDS": "0", "MEILIES_POOL_SIZE": "3"}))
    connector = factory.connector
    assert (connector.host, connector.port, connector.password) == ("localhost", 7001, "secret")
    assert (connector.timeout, connector.retry_seconds, connector.pool_size) == (2.5, 0.0, 3)
    assert factory.names.head("events") == "team-a/Bank.events."


@pytest.mark.parametrize("key, value", [("MEILIES_PORT", "http"),
                                        ("MEILIES_TIMEOUT", "-1"),
                                        ("MEILIES_STREAM_PREFIX", "$sys"),
                                        ("MEILIES_STREAM_PREFIX", "a:b"),
                                        ("MEILIES_STREAM_PREFIX", "a b")])
def test_a_bad_setting_is_an_environment_error_naming_it(key, value) -> None:
    with pytest.raises(OSError, match=key):
        MeiliesFactory(Environment("Bank", {key: value}))


def test_applications_on_one_server_have_their_own_notification_logs(server) -> None:
    env = {"MEILIES_PORT": str(server.port)}
    bank = MeiliesFactory(Environment("Bank", env)).application_recorder()
    shop = MeiliesFactory(Environment("Shop", env)).application_recorder()
    bank_id, shop_id = uuid4(), uuid4()
    assert bank.insert_events([event(bank_id, 1), event(bank_id, 2)]) == [1, 2]
    assert shop.insert_events([event(shop_id)]) == [3]
    assert bank.insert_events([event(bank_id, 3)]) == [4]
    # Each sees its own events, under the server's positions (+1): ids have gaps.
    assert [n.id for n in bank.select_notifications(None, 10)] == [1, 2, 4]
    assert [(n.id, n.originator_id) for n in shop.select_notifications(None, 10)] == [
        (3, shop_id)]
    assert bank.max_notification_id() == 4
    assert shop.max_notification_id() == 3
    # The same originator id in two applications is two aggregates.
    shop.insert_events([event(bank_id, 1)])
    assert len(bank.select_events(bank_id)) == 3
    assert len(shop.select_events(bank_id)) == 1
    # A limit counts the application's own notifications, not the events skipped.
    assert [n.id for n in bank.select_notifications(2, 1, inclusive_of_start=False)] == [4]
    with bank.subscribe(gt=2) as subscription:
        assert next(subscription).id == 4


def test_a_stream_prefix_separates_deployments_of_one_application(server) -> None:
    env = {"MEILIES_PORT": str(server.port)}
    blue = MeiliesFactory(Environment("Bank", {**env, "MEILIES_STREAM_PREFIX": "blue."}))
    green = MeiliesFactory(Environment("Bank", {**env, "MEILIES_STREAM_PREFIX": "green."}))
    blue.application_recorder().insert_events([event(uuid4())])
    assert green.application_recorder().max_notification_id() is None
    assert green.application_recorder().select_notifications(None, 10) == []
    tracking = blue.tracking_recorder()
    tracking.insert_tracking(Tracking("Upstream", 5))
    assert green.tracking_recorder().max_tracking_id("Upstream") is None
    assert tracking.max_tracking_id("Upstream") == 5


def test_a_password_is_sent_and_a_wrong_one_is_an_operational_error(start_server) -> None:
    server = start_server("--requirepass", "s3cret")
    env = {"PERSISTENCE_MODULE": "meilies.eventsourcing", "MEILIES_PORT": str(server.port)}
    good = InfrastructureFactory.construct(Environment("Bank", {**env,
                                                                "MEILIES_PASSWORD": "s3cret"}))
    recorder = good.application_recorder()
    recorder.insert_events([event(uuid4())])
    assert recorder.max_notification_id() == 1
    bad = MeiliesFactory(Environment("Bank", {**env, "MEILIES_PASSWORD": "nope"}))
    with pytest.raises(OperationalError, match="WRONGPASS"):
        bad.application_recorder().max_notification_id()
