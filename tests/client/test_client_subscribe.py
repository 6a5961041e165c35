"""``Client.subscribe``: specs, pinned starts, bounded ranges, and resuming after drops
(a proxy cuts, blocks or black-holes the connection; no sleep decides anything)."""

from __future__ import annotations

import logging
import threading

import pytest
from client_support import TIMEOUT
from serverproc import wait_for

from meilies.client import Client, ConnectionError, Event, ResponseError, Spec, parse_spec

FAST = {"backoff_base": 0.02, "backoff_max": 0.2}


def numbers(events, stream=None) -> list[int]:
    return [e.number for e in events if stream is None or e.stream == stream]


def by_stream(events) -> dict[str, list[int]]:
    result: dict[str, list[int]] = {}
    for event in events:
        result.setdefault(event.stream, []).append(event.number)
    return result


@pytest.fixture
def via_proxy(proxy):
    with Client(port=proxy.port, timeout=TIMEOUT) as client:
        yield client


# -- specs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, spec", [
    ("s", Spec(b"s")), ("s:3", Spec(b"s", 3)), (b"s:3:5", Spec(b"s", 3, 5)),
    ("$all", Spec(None)), ("$all:0", Spec(None, 0)), ("$all:2:9", Spec(None, 2, 9)),
])
def test_parse_spec(raw, spec):
    assert parse_spec(raw) == spec
    assert str(spec) == (raw.decode() if isinstance(raw, bytes) else raw)


@pytest.mark.parametrize("raw", ["", "s:", "s::1", "s:-1", "s:3:3", "s:5:2", "a:1:2:3",
                                 "s:x", "has space", ":1"])
def test_parse_spec_refuses_malformed_specs(raw):
    with pytest.raises(ValueError):
        parse_spec(raw)


@pytest.mark.parametrize("specs", [(), ("$all", "s"), ("s:0", "s:5")])
def test_subscribe_refuses_specs_it_could_not_tell_apart(client, specs):
    with pytest.raises(ValueError):
        client.subscribe(*specs)


def test_a_spec_the_server_refuses_raises_at_subscribe(client):
    with pytest.raises(ResponseError, match="invalid"):
        client.subscribe("é" * 200)  # over 255 bytes: only the server knows


# -- what a subscription yields ---------------------------------------------------------------------


def test_from_a_number_gets_stored_events_then_live_ones(client, collect):
    client.publish_many("s", [("e", str(i)) for i in range(5)])
    events = collect(client.subscribe("s:2"))
    assert numbers(events.wait_count(3)) == [2, 3, 4]
    client.publish("s", "live", b"\x00")
    assert events.wait_count(4)[-1] == Event("s", 5, "live", b"\x00")


def test_a_live_spec_starts_when_subscribe_returns(client, collect):
    client.publish("s", "before", "")
    sub = client.subscribe("s", "fresh")  # pinned here: fresh is empty, s is at 0
    client.publish("fresh", "after", "")
    client.publish("s", "after", "")
    events = collect(sub).wait_count(2)
    assert sorted((e.stream, e.number) for e in events) == [("fresh", 0), ("s", 1)]


def test_bounded_ranges_end_once_every_range_is_complete(client, collect):
    client.publish_many("a", [("e", "")] * 5)
    client.publish_many("b", [("e", "")] * 2)
    events = collect(client.subscribe("a:1:3", "b:0:4"))
    events.wait_count(4)
    assert not events.finished.is_set()  # b's 2 and 3 are not published yet
    client.publish_many("b", [("e", "")] * 3)
    assert events.finished.wait(TIMEOUT)
    assert events.error is None
    assert by_stream(events.events) == {"a": [1, 2], "b": [0, 1, 2, 3]}


def test_all_from_a_number_bounds_each_stream(client, collect):
    client.publish_many("a", [("e", "")] * 4)
    client.publish_many("b", [("e", "")] * 1)
    client.publish_many("a", [("e", "")] * 1)
    events = collect(client.subscribe("$all:1:4"))
    client.publish_many("b", [("e", "")] * 4)
    client.publish("c", "e", "")
    events.wait_count(6)
    assert by_stream(events.events) == {"a": [1, 2, 3], "b": [1, 2, 3]}


def test_all_live_starts_when_subscribe_returns_in_global_order(client, collect):
    client.publish("old", "e", "")
    sub = client.subscribe("$all")
    for stream in ["x", "old", "y", "x"]:
        client.publish(stream, "e", "")
    events = collect(sub).wait_count(4)
    assert [(e.stream, e.number) for e in events] == [("x", 0), ("old", 1), ("y", 0), ("x", 1)]


# -- drops and resumes (through the proxy) --------------------------------------------------------------


def test_a_live_spec_that_saw_nothing_resumes_from_its_pinned_start(client, via_proxy,
                                                                     proxy, collect):
    client.publish("s", "old", "")
    events = collect(via_proxy.subscribe("s", **FAST))
    proxy.block()
    proxy.cut()
    client.publish("s", "while-down", "")  # number 1: after the pin, before any event
    wait_for(lambda: proxy.refused >= 1, TIMEOUT, what="a refused reconnect")
    proxy.unblock()
    client.publish("s", "after", "")
    assert [(e.number, e.name) for e in events.wait_count(2)] == [(1, "while-down"),
                                                                  (2, "after")]


def test_named_streams_resume_after_the_last_event_yielded(client, via_proxy, proxy,
                                                           collect):
    client.publish_many("a", [("e", "")] * 3)
    events = collect(via_proxy.subscribe("a:1", "b", **FAST))
    events.wait_count(2)
    proxy.block()
    proxy.cut()
    client.publish_many("a", [("e", "")] * 2)
    client.publish_many("b", [("e", "")] * 2)
    wait_for(lambda: proxy.refused >= 1, TIMEOUT, what="a refused reconnect")
    proxy.unblock()
    client.publish("b", "e", "")
    events.wait_count(7)
    assert by_stream(events.events) == {"a": [1, 2, 3, 4], "b": [0, 1, 2]}


def test_all_live_loses_nothing_published_while_disconnected(client, via_proxy, proxy,
                                                             collect):
    client.publish("a", "old", "")
    events = collect(via_proxy.subscribe("$all", **FAST))
    proxy.block()
    proxy.cut()  # before any event arrived: the pin must hold
    client.publish("a", "e", "")  # a:1
    client.publish("b", "e", "")  # b:0, a stream new since the pin
    wait_for(lambda: proxy.refused >= 1, TIMEOUT, what="a refused reconnect")
    proxy.unblock()
    client.publish("a", "e", "")  # a:2
    events.wait_count(3)
    assert by_stream(events.events) == {"a": [1, 2], "b": [0]}
    proxy.block()
    proxy.cut()  # again, after events: positions per stream
    client.publish_many("b", [("e", "")] * 3)
    client.publish_many("c", [("e", "")] * 2)
    client.publish("a", "e", "")
    wait_for(lambda: proxy.refused >= 2, TIMEOUT, what="a refused reconnect")
    proxy.unblock()
    client.publish("c", "e", "")
    events.wait_count(10)
    assert by_stream(events.events) == {"a": [1, 2, 3], "b": [0, 1, 2, 3], "c": [0, 1, 2]}


def test_all_from_zero_resumes_per_stream_without_a_replay(client, via_proxy, proxy,
                                                           collect):
    for i in range(30):
        client.publish(f"s{i % 3}", "e", str(i))
    events = collect(via_proxy.subscribe("$all:0:12", **FAST))
    events.wait_count(30)
    proxy.cut()
    for i in range(30):
        client.publish(f"s{i % 4}", "e", str(i))
    wait_for(lambda: proxy.accepted >= 2, TIMEOUT, what="a reconnect")
    events.wait_count(43)  # per stream, every number below 12
    expected = {f"s{k}": list(range(12 if k < 3 else 7)) for k in range(4)}
    assert by_stream(events.events) == expected


def test_reconnect_false_raises_the_connection_error(via_proxy, proxy):
    sub = via_proxy.subscribe("s", reconnect=False)
    proxy.cut()
    with pytest.raises(ConnectionError):
        next(sub)
    assert sub.closed


def test_max_retries_gives_up_with_a_connection_error(via_proxy, proxy):
    sub = via_proxy.subscribe("s", max_retries=2, **FAST)
    proxy.block()
    proxy.cut()
    with pytest.raises(ConnectionError, match="after 2 attempts"):
        next(sub)
    assert proxy.refused == 2


def test_a_silent_connection_is_detected_by_the_heartbeat(client, via_proxy, proxy, collect):
    events = collect(via_proxy.subscribe("s", heartbeat=0.2, **FAST))
    proxy.freeze()  # the connection stays open, nothing goes through
    client.publish("s", "e", "")
    events.wait_count(1)
    assert proxy.accepted >= 2


def test_reconnects_are_logged(client, via_proxy, proxy, collect, caplog):
    caplog.set_level(logging.INFO, logger="meilies.client")
    events = collect(via_proxy.subscribe("s", **FAST))
    proxy.cut()
    wait_for(lambda: proxy.accepted >= 2, TIMEOUT, what="a reconnect")
    client.publish("s", "e", "")
    events.wait_count(1)
    messages = [r.getMessage() for r in caplog.records if r.name == "meilies.client"]
    assert any("lost" in m and "reconnecting" in m for m in messages), messages
    assert any(m.startswith("reconnected") and "s from 0" in m for m in messages), messages


def test_close_from_another_thread_ends_the_iteration(client, collect):
    events = collect(client.subscribe("s"))
    wait_for(lambda: b"subscribers:1" in client.execute_command("info"), what="subscribed")
    threading.Timer(0, events.subscription.close).start()
    assert events.finished.wait(TIMEOUT)
    assert events.error is None and events.events == []


def test_close_racing_the_reader_never_raises(client, collect):
    """close() from another thread at any moment of the reader's loop (here: while
    events stream in) ends the iteration without an error, even when it closes the
    socket between two of the reader's calls on it (EBADF, seen under load)."""
    client.publish_many("busy", [("e", "x" * 100) for _ in range(2000)])
    for attempt in range(100):
        events = collect(client.subscribe("busy:0"))
        wait_for(lambda: len(events.events) > attempt * 10 % 1500, what="events flowing")
        events.subscription.close()
        assert events.finished.wait(TIMEOUT)
        assert events.error is None, f"attempt {attempt}: {events.error!r}"
