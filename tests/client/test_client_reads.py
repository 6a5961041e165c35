"""The read side of PROTOCOL.md v2 through ``meilies.client`` and ``meilies-cli``: range
reads, positions, scans, subscriptions by position and full frames."""

from __future__ import annotations

import json
import time
from datetime import datetime

import pytest
from client_support import TIMEOUT
from test_client_cli import cli

from meilies.client import Client, Event, Spec, parse_spec


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def filled(client) -> tuple[Client, int, int]:
    """Three streams, five appends; returns the client and the clock around them."""
    before = now_ms()
    client.append("s", [("a", b"1"), ("b", b"2")])
    client.publish("t", "c", b"3")
    client.append("s", [("d", b"4")])
    client.publish("u", "e", b"5")
    return client, before, now_ms()


def test_range_returns_events_with_positions_and_timestamps(filled):
    client, before, after = filled
    events = client.range("s")
    assert [(e.stream, e.number, e.name, e.data, e.position) for e in events] == [
        ("s", 0, "a", b"1", 0), ("s", 1, "b", b"2", 1), ("s", 2, "d", b"4", 3)]
    assert all(before <= e.timestamp <= after and e.id is None and e.metadata is None
               for e in events)
    assert events[0].timestamp == events[1].timestamp  # one append, one record
    assert [e.number for e in client.range("s", 1, 1)] == [1]
    assert [e.number for e in client.range("s", 1, count=1)] == [1]
    assert client.range("none") == []


def test_revrange_and_all(filled):
    client, _, _ = filled
    assert [e.number for e in client.revrange("s")] == [2, 1, 0]
    assert [e.number for e in client.revrange("s", count=1)] == [2]
    assert [e.position for e in client.range("$all", 1, 3)] == [1, 2, 3]
    assert [(e.stream, e.position) for e in client.revrange("$all", "+", 2)] == [
        ("u", 4), ("s", 3), ("t", 2)]


def test_last_position(client):
    assert client.last_position() is None
    client.publish("a", "e", b"")
    client.append("b", [("e", b"")] * 3)
    assert client.last_position() == 3


@pytest.mark.parametrize("bound", [-1, 1.5, "first", True])
def test_a_bad_range_bound_is_refused_before_sending(client, bound):
    with pytest.raises(ValueError, match="range bound"):
        client.range("s", bound)


def test_scan_streams_yields_pages_of_every_stream_once(client):
    names = [f"agg-{i:04d}" for i in range(2500)] + ["other-1", "z"]
    for name in names:
        client.publish(name, "e", b"")
    pages = list(client.scan_streams(count=1000))
    assert [len(p) for p in pages] == [1000, 1000, 502]
    assert [n for p in pages for n in p] == sorted(names)
    assert list(client.scan_streams(match="other*")) == [["other-1"]]
    assert list(client.scan_streams(match="none*")) == []


def test_parse_spec_by_position():
    assert parse_spec("$all@5") == Spec(None, 5, None, True)
    assert parse_spec("$all@5:9") == Spec(None, 5, 9, True)
    assert str(parse_spec("$all@5:9")) == "$all@5:9"
    for bad in ("$all@", "$all@x", "$all@9:5", "$all@1:2:3"):
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_subscribe_by_position_ends_at_its_stop(filled):
    client, _, _ = filled
    events = list(client.subscribe("$all@1:4"))
    assert [(e.stream, e.number, e.position) for e in events] == [
        ("s", 1, 1), ("t", 0, 2), ("s", 2, 3)]
    assert all(isinstance(e, Event) and e.timestamp for e in events)


def test_subscribe_full_gives_named_streams_positions(filled):
    client, before, after = filled
    events = list(client.subscribe("s:1:3", full=True))
    assert [(e.number, e.position) for e in events] == [(1, 1), (2, 3)]
    assert all(before <= e.timestamp <= after for e in events)
    plain = list(client.subscribe("s:1:3"))
    assert [(e.number, e.position, e.timestamp) for e in plain] == [(1, None, None),
                                                                    (2, None, None)]


def test_a_live_all_subscription_by_position_resumes_after_a_drop(client, proxy, collect):
    client.publish("old", "e", b"")
    via_proxy = Client(port=proxy.port, timeout=TIMEOUT)
    events = collect(via_proxy.subscribe("$all", backoff_base=0.05, backoff_max=0.2))
    client.publish("a", "e", b"0")
    events.wait_count(1)
    proxy.cut()
    for i in range(1, 20):
        client.publish("ab"[i % 2], "e", str(i).encode())
    events.wait_count(20)
    got = [int(e.data) for e in events.events]
    if proxy.older_server:  # resumed stream by stream: in order within each stream
        assert sorted(got) == list(range(20))
        for stream in "ab":
            numbers = [e.number for e in events.events if e.stream == stream]
            assert numbers == sorted(numbers)
    else:  # resumed by position: the server's global order, every position once
        assert got == list(range(20))
        assert [e.position for e in events.events] == list(range(1, 21))


def test_by_position_on_an_older_server_is_refused(server):
    from client_proxy import Proxy
    proxy = Proxy(server.port, older_server=True)
    try:
        with pytest.raises(Exception, match="no full frames or global positions"):
            Client(port=proxy.port, timeout=TIMEOUT).subscribe("$all@0")
    finally:
        proxy.close()


# -- meilies-cli ---------------------------------------------------------------------------


def test_cli_range_and_revrange_print_positions_and_timestamps(server, filled):
    _client, before, after = filled
    result = cli(server.port, "range", "s")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.rsplit(" ", 1)[0] for line in lines] == ["s 0 a 1 0", "s 1 b 2 1", "s 2 d 4 3"]
    stamp = datetime.fromisoformat(lines[0].rsplit(" ", 1)[1].replace("Z", "+00:00"))
    assert before <= stamp.timestamp() * 1000 <= after + 1
    result = cli(server.port, "revrange", "$all", "+", "-", "--count", "2", "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["stream"], r["number"], r["data"], r["position"]) for r in rows] == [
        ("u", 0, "5", 4), ("s", 2, "4", 3)]
    assert all(before <= r["timestamp"] <= after for r in rows)
    assert cli(server.port, "range", "s", "2", "+").stdout.startswith("s 2 d 4 3 ")
    assert cli(server.port, "range", "nope").stdout == ""


@pytest.mark.parametrize("args", [("range", "s", "x"), ("revrange", "s", "+", "1x"),
                                  ("range", "s", "-", "+", "--count", "0")])
def test_cli_range_refuses_bad_arguments_with_usage(server, args):
    result = cli(server.port, *args)
    assert result.exit_code == 2 and "Invalid value" in result.stderr


def test_cli_subscribe_full_prints_positions(server, filled):
    result = cli(server.port, "subscribe", "--full", "s:0:2")
    assert [line.rsplit(" ", 1)[0] for line in result.stdout.splitlines()] == [
        "s 0 a 1 0", "s 1 b 2 1"]
    result = cli(server.port, "subscribe", "--json", "--full", "$all@2:4")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["stream"], r["position"]) for r in rows] == [("t", 2), ("s", 3)]


def test_cli_subscribe_json_prints_positions_only_with_full(server, filled):
    """A $all subscription resumes by position, so its events have one; the output
    shows it only with --full, as the help says."""
    plain = cli(server.port, "subscribe", "--json", "$all@0:2")
    full = cli(server.port, "subscribe", "--json", "--full", "s:0:1")
    rows = [json.loads(line) for line in plain.stdout.splitlines()]
    assert [r["number"] for r in rows] == [0, 1] and all("position" not in r for r in rows)
    assert json.loads(full.stdout.splitlines()[0])["position"] == 0
