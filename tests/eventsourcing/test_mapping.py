"""The mapping's own decisions, beyond what the library's cases check: stream names,
versions that start anywhere, runs of several aggregates in one transaction, snapshots
with gaps, what is stored on the server, and a write whose reply is lost."""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import (DataError, IntegrityError, OperationalError,
                                       StoredEvent, Tracking)
from eventsourcing.utils import Environment
from hypothesis import given
from hypothesis import strategies as st

from lossy_proxy import LossyProxy
from meilies.client import Client
from meilies.engine.errors import InvalidArgument
from meilies.engine.names import check_new_stream_name
from meilies.eventsourcing import MeiliesFactory
from meilies.eventsourcing.names import StreamNames, originator_id

NAMES = StreamNames("Bank")
HEAD = NAMES.head("events")


def event(oid, version, topic="topic", state=b"{}") -> StoredEvent:
    return StoredEvent(originator_id=oid, originator_version=version, topic=topic,
                       state=state)


# -- names -----------------------------------------------------------------------------------

def valid_or_too_long(make):
    """``make()``'s stream name, checked as the server checks a new one; None when it
    was refused as longer than a stream name may be (a DataError that says so)."""
    try:
        name = make()
    except DataError as exc:
        assert "more than the 255" in str(exc)
        return None
    check_new_stream_name(name.encode())
    return name


@given(st.text(max_size=60))
def test_any_str_id_makes_a_valid_stream_name_that_gives_it_back(text) -> None:
    name = valid_or_too_long(lambda: NAMES.aggregate(HEAD, text))
    if name is not None:
        assert name.startswith(HEAD)
        assert originator_id(name[len(HEAD):]) == text


@given(st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30))
def test_any_application_name_makes_a_namespace_of_its_own(app, upstream) -> None:
    names = StreamNames(app)
    tracking = valid_or_too_long(lambda: names.tracking(upstream))
    # No application's events head is a prefix of another application's streams.
    other = StreamNames(app + ".events")
    assert not other.head("events").startswith(names.head("events"))
    assert tracking is None or not tracking.startswith(names.head("events"))


def test_uuid_and_str_ids_stay_apart() -> None:
    uid = uuid4()
    assert NAMES.aggregate(HEAD, uid) == HEAD + str(uid)
    assert NAMES.aggregate(HEAD, str(uid)) == HEAD + "~" + str(uid)
    assert originator_id(str(uid)) == uid and isinstance(originator_id(str(uid)), UUID)
    assert originator_id("~" + str(uid)) == str(uid)


def test_a_name_the_server_would_refuse_is_a_data_error() -> None:
    with pytest.raises(DataError, match="255"):
        NAMES.aggregate(HEAD, "x" * 250)
    with pytest.raises(DataError):
        NAMES.aggregate(HEAD, 17)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        check_new_stream_name(b"$" + HEAD.encode())
    assert StreamNames("$sys").head("events") == "%24sys.events."


# -- against a server ------------------------------------------------------------------------

@pytest.fixture
def env(server) -> dict[str, str]:
    return {"MEILIES_PORT": str(server.port)}


def recorders(env, name="Bank"):
    factory = MeiliesFactory(Environment(name, env))
    return factory.application_recorder(), factory.aggregate_recorder("snapshots")


def test_what_is_stored_is_the_mapping(env, server) -> None:
    app, _ = recorders(env)
    oid = uuid4()
    app.insert_events([event(oid, 1, "bank:Opened", b'{"a":1}'), event(oid, 2, "bank:Paid")])
    stored = Client(port=server.port).range(f"Bank.events.{oid}")
    assert [(e.number, e.name, e.data, e.metadata, e.position) for e in stored] == [
        (0, "bank:Opened", b'{"a":1}', b"1", 0), (1, "bank:Paid", b"{}", b"2", 1)]
    assert all(e.id for e in stored) and stored[0].id != stored[1].id


def test_versions_may_start_anywhere_and_are_found_by_a_process_that_never_saw_them(env) -> None:
    writer, _ = recorders(env)
    oid = uuid4()
    writer.insert_events([event(oid, v) for v in range(5, 10)])
    reader, _ = recorders(env)  # a new process: no cached first version
    assert [e.originator_version for e in reader.select_events(oid, gt=6, lte=8)] == [7, 8]
    reader2, _ = recorders(env)
    assert [e.originator_version for e in reader2.select_events(oid, gt=7, desc=True)] == [9, 8]
    reader3, _ = recorders(env)
    assert reader3.select_events(oid, gt=9) == []
    assert reader3.select_events(uuid4(), gt=1) == []
    # A new process appends after the last version (it learns the first one on the way).
    late, _ = recorders(env)
    late.insert_events([event(oid, 10)])
    stale, _ = recorders(env)
    with pytest.raises(IntegrityError):
        stale.insert_events([event(oid, 10)])  # already stored
    with pytest.raises(IntegrityError):
        stale.insert_events([event(oid, 12)])  # a gap: the library never makes one
    with pytest.raises(IntegrityError):
        stale.insert_events([event(oid, 4)])  # below the first version
    assert [e.originator_version for e in stale.select_events(oid)] == list(range(5, 11))


def test_an_insert_of_several_aggregates_is_one_transaction_in_the_order_given(env) -> None:
    app, _ = recorders(env)
    a, b = uuid4(), uuid4()
    ids = app.insert_events([event(a, 1), event(b, 1), event(a, 2), event(b, 2)])
    assert ids == [1, 2, 3, 4]
    assert [(n.originator_id, n.originator_version) for n in
            app.select_notifications(None, 10)] == [(a, 1), (b, 1), (a, 2), (b, 2)]
    # All or none: a new aggregate with one whose version is taken stores nothing.
    c = uuid4()
    with pytest.raises(IntegrityError):
        app.insert_events([event(c, 1), event(b, 2)])
    assert app.select_events(c) == []
    assert app.max_notification_id() == 4


def test_a_tracking_record_is_stored_with_the_events_or_not_at_all(env) -> None:
    process = MeiliesFactory(Environment("Process", env)).process_recorder()
    a = uuid4()
    process.insert_events([event(a, 1)], tracking=Tracking("Up", 1))
    with pytest.raises(IntegrityError):  # the events conflict: the tracking is not stored
        process.insert_events([event(a, 1)], tracking=Tracking("Up", 2))
    assert process.max_tracking_id("Up") == 1
    with pytest.raises(IntegrityError):  # the tracking conflicts: the events are not stored
        process.insert_events([event(a, 2)], tracking=Tracking("Up", 1))
    assert len(process.select_events(a)) == 1
    # Another process's recorder (nothing cached) sees where tracking stands.
    other = MeiliesFactory(Environment("Process", env)).process_recorder()
    with pytest.raises(IntegrityError):
        other.insert_events([event(a, 2)], tracking=Tracking("Up", 1))
    other.insert_events([event(a, 2)], tracking=Tracking("Up", 7))
    assert process.max_tracking_id("Up") == 7
    process.insert_events([event(a, 3)], tracking=Tracking("Up", 8))  # its cache was stale
    assert [n.originator_version for n in process.select_notifications(None, 10)] == [1, 2, 3]


def test_snapshots_have_gaps_and_the_latest_at_or_below_a_version_is_found(env) -> None:
    _, snapshots = recorders(env)
    oid = uuid4()
    for version in (3, 7, 20):
        snapshots.insert_events([event(oid, version, state=b"%d" % version)])
    _, fresh = recorders(env)
    assert fresh.select_events(oid, desc=True, limit=1)[0].originator_version == 20
    assert fresh.select_events(oid, desc=True, limit=1, lte=19)[0].originator_version == 7
    assert fresh.select_events(oid, desc=True, limit=1, lte=2) == []
    assert [s.originator_version for s in fresh.select_events(oid, gt=3)] == [7, 20]
    with pytest.raises(IntegrityError):
        fresh.insert_events([event(oid, 7)])  # older than the newest snapshot
    fresh.insert_events([event(oid, 21)])


def test_an_event_larger_than_the_server_allows_is_a_data_error(start_server, tmp_path) -> None:
    server = start_server("--max-event-size", "1000", data_dir=tmp_path / "small")
    app, _ = recorders({"MEILIES_PORT": str(server.port)})
    with pytest.raises(DataError, match="data"):
        app.insert_events([event(uuid4(), 1, state=b"x" * 2000)])


@pytest.mark.parametrize("aggregates", [1, 2])
def test_a_write_whose_reply_is_lost_is_retried_and_stored_once(env, server,
                                                                aggregates) -> None:
    proxy = LossyProxy(server.port)
    try:
        app, _ = recorders({"MEILIES_PORT": str(proxy.port)})
        first = uuid4()
        app.insert_events([event(first, 1)])
        # One aggregate: one append-full; two: MULTI/EXEC. Either reply is lost.
        proxy.lose_reply_to = b"append-full" if aggregates == 1 else b"EXEC"
        oids = [uuid4() for _ in range(aggregates)]
        ids = app.insert_events([event(oid, 1) for oid in oids])
        assert proxy.lost == 1
        assert ids == list(range(2, 2 + aggregates))  # the first attempt's positions
        direct, _ = recorders(env)
        assert [n.originator_id for n in direct.select_notifications(None, 10)] == [
            first, *oids]
    finally:
        proxy.close()


def test_a_server_that_stays_away_is_an_operational_error(tmp_path) -> None:
    from serverproc import free_port

    app, _ = recorders({"MEILIES_PORT": str(free_port()), "MEILIES_RETRY_SECONDS": "0.2"})
    with pytest.raises(OperationalError, match="retried for 0.2s"):
        app.insert_events([event(uuid4(), 1)])
    with pytest.raises(OperationalError):
        app.max_notification_id()
