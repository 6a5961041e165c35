"""Subscriptions through real crashes: ``kill -9`` the server while a subscriber iterates
in a thread, restart it on the same port and data directory, publish more. What the
subscriber yields is exactly 0..N-1 per stream: no gap, no duplicate."""

from __future__ import annotations

import logging

import pytest
from client_proxy import Proxy
from client_support import TIMEOUT

from meilies.client import Client

RETRY = {"backoff_base": 0.05, "backoff_max": 0.5}
ROUNDS = 3


def resumes(caplog) -> int:
    """How many times a subscription logged that it reconnected and resumed."""
    return sum(r.getMessage().startswith("reconnected") for r in caplog.records)


def per_stream(events) -> dict[str, list[tuple[int, bytes]]]:
    result: dict[str, list[tuple[int, bytes]]] = {}
    for event in events:
        result.setdefault(event.stream, []).append((event.number, event.data))
    return result


def test_named_streams_survive_kill_9_restarts(server, start_server, collect, caplog):
    caplog.set_level(logging.INFO, logger="meilies.client")
    client = Client(port=server.port, timeout=TIMEOUT)
    client.publish_many("s", [("e", f"s{i}") for i in range(50)])
    events = collect(client.subscribe("s:0", "live", **RETRY))  # live: pinned at 0
    published = {"s": 50, "live": 0}
    for _ in range(ROUNDS):
        for stream, count in (("s", 150), ("live", 40)):
            start = published[stream]
            client.publish_many(stream, [("e", f"{stream}{i}")
                                         for i in range(start, start + count)])
            published[stream] += count
        server.kill()  # the subscriber is somewhere in the middle of catching up
        server = start_server(data_dir=server.data_dir, port=server.port)
        client.publish("s", "e", f"s{published['s']}")
        published["s"] += 1
        events.wait_count(sum(published.values()))  # back, and caught up
    assert per_stream(events.events) == {
        stream: [(i, f"{stream}{i}".encode()) for i in range(count)]
        for stream, count in published.items()}
    assert resumes(caplog) == ROUNDS


@pytest.fixture(params=["positions", "older-server"])
def all_port(request, server):
    """Where a ``$all`` subscriber connects: the server (it resumes by global position),
    or a proxy that hides PROTOCOL.md v2 (it resumes stream by stream)."""
    if request.param == "positions":
        yield server.port
        return
    proxy = Proxy(server.port, older_server=True)
    yield proxy.port
    proxy.close()


def test_the_older_server_proxy_hides_envelope(server):
    proxy = Proxy(server.port, older_server=True)
    try:
        with Client(port=proxy.port, timeout=TIMEOUT) as client:
            with pytest.raises(Exception, match="unknown command 'envelopx'"):
                client.execute_command("envelope", "full")
            assert client.range("s") == []
    finally:
        proxy.close()


def test_all_streams_survive_kill_9_restarts(server, start_server, collect, caplog, all_port):
    caplog.set_level(logging.INFO, logger="meilies.client")
    client = Client(port=server.port, timeout=TIMEOUT)
    subscriber = Client(port=all_port, timeout=TIMEOUT)
    client.publish("before", "e", "not wanted: published before the subscription")
    events = collect(subscriber.subscribe("$all", **RETRY))
    counts: dict[str, int] = {}

    def publish_round(streams: list[str], n: int) -> None:
        for i in range(n):
            stream = streams[i % len(streams)]
            number = counts.get(stream, 0)
            client.publish(stream, "e", f"{stream}{number}")
            counts[stream] = number + 1

    for round_ in range(ROUNDS):
        publish_round(["a", "b", "c", "before", f"new{round_}"], 60)
        server.kill()
        server = start_server(data_dir=server.data_dir, port=server.port)
        publish_round(["a", f"after{round_}"], 10)  # likely before the subscriber is back
        events.wait_count(sum(counts.values()))
    # "before" had event 0 before the subscription: its events here are numbered from 1.
    expected = {stream: [(i + (stream == "before"), f"{stream}{i}".encode())
                         for i in range(count)] for stream, count in counts.items()}
    assert per_stream(events.events) == expected
    assert resumes(caplog) == ROUNDS


def test_all_from_zero_survives_a_kill_9_mid_replay(server, start_server, collect, caplog,
                                                    all_port):
    caplog.set_level(logging.INFO, logger="meilies.client")
    client = Client(port=server.port, timeout=TIMEOUT)
    for stream in ("x", "y", "z"):
        client.publish_many(stream, [("e", f"{stream}{i}") for i in range(300)])
    events = collect(Client(port=all_port, timeout=TIMEOUT).subscribe("$all:0", **RETRY))
    events.wait_count(1)
    server.kill()
    server = start_server(data_dir=server.data_dir, port=server.port)
    client.publish_many("x", [("e", f"x{i}") for i in range(300, 400)])
    client.publish_many("w", [("e", f"w{i}") for i in range(50)])
    events.wait_count(1050)
    got = per_stream(events.events)
    assert got == {stream: [(i, f"{stream}{i}".encode()) for i in range(count)]
                   for stream, count in (("x", 400), ("y", 300), ("z", 300), ("w", 50))}
    assert resumes(caplog) == 1
