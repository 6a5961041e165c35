"""The write side of PROTOCOL.md "Event-store extensions, version 2", byte for byte over
a raw socket against the real server: ``append-full``, idempotent appends (event ids)
and MULTI/EXEC/DISCARD transactions.

A full frame's timestamp is the server's clock: each check takes it from the reply,
checks it lies between clock reads taken around the write, then compares every byte
of the reply with the frames it expects. "Nothing stored" is checked as the bytes of
``range $all`` and ``stream-names`` unchanged, and the refused ids still free.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from dataclasses import dataclass

import hiredis
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from serverproc import DEADLINE, RawClient, command, event_frame, subscribed, wait_for

OK = b"+OK\r\n"
QUEUED = b"+QUEUED\r\n"
PONG = b"+PONG\r\n"
EXECABORT = b"-EXECABORT Transaction discarded because of previous errors.\r\n"
NO_STREAMS = b"*1\r\n+stream-names\r\n"

#: One event of an append-full: (id, event name, metadata, data); b"" means none.
Event = tuple[bytes, bytes, bytes, bytes]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def bulk(value: bytes | None) -> bytes:
    return b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value)


def full_reply(last_number: int, last_position: int) -> bytes:
    """What append-full answers."""
    return b"*2\r\n:%d\r\n:%d\r\n" % (last_number, last_position)


def duplicate_id(event_id: bytes, stream: bytes, number: int) -> bytes:
    return b"-DUPLICATEID event id %s is already stored as %s:%d\r\n" % (event_id, stream, number)


def flat(events: list[Event]) -> list[bytes]:
    return [part for event in events for part in event]


def append_full(stream: bytes | str, expected: bytes | str, events: list[Event]) -> bytes:
    """One append-full request's bytes."""
    return command("append-full", stream, expected, *flat(events))


def parse(raw: bytes):
    """``raw`` as hiredis reads it: exactly one RESP value."""
    reader = hiredis.Reader()
    reader.feed(raw)
    value = reader.gets()
    assert value is not False and reader.gets() is False, raw[:300]
    return value


def parse_all(raw: bytes) -> list:
    reader = hiredis.Reader()
    reader.feed(raw)
    values = []
    while (value := reader.gets()) is not False:
        values.append(value)
    return values


def info_fields(client: RawClient) -> dict[str, str]:
    body = client.call("info").split(b"\r\n", 1)[1].decode()
    return dict(line.split(":", 1) for line in body.splitlines() if ":" in line)


def snapshot(client: RawClient) -> bytes:
    """Everything stored, as bytes: a write that stores nothing leaves it unchanged."""
    return client.call("range", "$all", "-", "+", "COUNT", "100000") + client.call("stream-names")


@dataclass(frozen=True)
class Stored:
    """One event as a test expects to read it back; its timestamp lies in
    ``earliest..latest`` (clock reads around its write)."""

    stream: bytes
    number: int
    name: bytes
    data: bytes
    position: int
    id: bytes | None
    metadata: bytes | None
    earliest: int
    latest: int

    def frame(self, timestamp: int) -> bytes:
        return (b"*9\r\n+event\r\n+%s\r\n:%d\r\n+%s\r\n" % (self.stream, self.number, self.name)
                + bulk(self.data) + b":%d\r\n:%d\r\n" % (self.position, timestamp)
                + bulk(self.id) + bulk(self.metadata))


def expect_frames(raw: bytes, events: list[Stored], header: bool = True) -> None:
    """``raw`` is exactly ``events`` as full frames (an array of them if ``header``)."""
    frames = parse(raw) if header else parse_all(raw)
    assert isinstance(frames, list) and len(frames) == len(events), raw[:400]
    stamps = [f[6] if isinstance(f, list) and len(f) == 9 else -1 for f in frames]
    expected = (b"*%d\r\n" % len(events) if header else b"") + b"".join(
        e.frame(ts) for ts, e in zip(stamps, events))
    assert raw == expected
    for ts, e in zip(stamps, events):
        assert e.earliest <= ts <= e.latest, (ts, e)


class Ledger:
    """A connection and what a test stored through it, in position order. Its write
    methods assert the reply that a store (not a retry) must get."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.events: list[Stored] = []
        self.numbers: dict[bytes, int] = {}

    def record(self, stream: bytes, events: list[Event], earliest: int, latest: int) -> None:
        for event_id, name, metadata, data in events:
            number = self.numbers.get(stream, -1) + 1
            self.numbers[stream] = number
            self.events.append(Stored(stream, number, name, data, len(self.events),
                                      event_id or None, metadata or None, earliest, latest))

    def next_reply(self, stream: bytes, count: int) -> bytes:
        """append-full's reply if ``count`` events were stored to ``stream`` now."""
        return full_reply(self.numbers.get(stream, -1) + count, len(self.events) + count - 1)

    def append_full(self, stream: bytes, expected: bytes, *events: Event) -> bytes:
        before = now_ms()
        reply = self.client.call("append-full", stream, expected, *flat(list(events)))
        after = now_ms()
        assert reply == self.next_reply(stream, len(events)), reply
        self.record(stream, list(events), before, after)
        return reply

    def publish(self, stream: bytes, name: bytes, data: bytes) -> None:
        before = now_ms()
        assert self.client.call("publish", stream, name, data) == OK
        self.record(stream, [(b"", name, b"", data)], before, now_ms())

    def append(self, stream: bytes, expected: bytes, *pairs: tuple[bytes, bytes]) -> None:
        before = now_ms()
        args = [part for pair in pairs for part in pair]
        reply = self.client.call("append", stream, expected, *args)
        assert reply == b":%d\r\n" % (self.numbers.get(stream, -1) + len(pairs)), reply
        self.record(stream, [(b"", name, b"", data) for name, data in pairs], before, now_ms())

    def stream(self, stream: bytes) -> list[Stored]:
        return [e for e in self.events if e.stream == stream]

    def check(self) -> None:
        """``range $all`` and each stream's range are exactly what was stored."""
        expect_frames(self.client.call("range", "$all", "-", "+", "COUNT", "100000"), self.events)
        for stream in self.numbers:
            expect_frames(self.client.call("range", stream, "-", "+", "COUNT", "100000"),
                          self.stream(stream))


@pytest.fixture
def ledger(server) -> Ledger:
    return Ledger(server.client())


# -- append-full -------------------------------------------------------------------------


def test_append_full_answers_the_last_number_and_the_last_position(server):
    c = server.client()
    assert c.call("append-full", "s", "none", "id-1", "a", "m1", "1", "id-2", "b", "m2", "2") \
        == full_reply(1, 1)
    assert c.call("publish", "t", "e", "x") == OK
    assert c.call("APPEND-FULL", "s", "1", "id-3", "c", "", "3") == full_reply(2, 3)
    assert c.call("Append-Full", "t", "any", "id-4", "d", "m", "") == full_reply(1, 4)
    assert c.call("last-event-number", "s") == b"*3\r\n+last-event-number\r\n+s\r\n:2\r\n"
    assert info_fields(c)["last_position"] == "4"


def test_ids_and_metadata_come_back_in_range_and_revrange_byte_for_byte(ledger):
    """Metadata is any bytes (RESP-looking ones too); an id is any UTF-8 without controls."""
    ledger.append_full(b"s", b"none", (b"7f0c4e2a-uuid", b"created", b'{"user": 1}', b'{"n": 12}'),
                       (b"id \xc3\xa9t\xc3\xa9", b"paid", b"\r\n\x00$-1\r\n", b"bin\r\n\x00"))
    ledger.publish(b"t", b"plain", b"p")
    ledger.append_full(b"t", b"0", (b"t-1", b"named", b"", b"d"))
    ledger.append_full(b"s", b"any", (b"", b"no id", b"metadata only", b""))
    c = ledger.client
    ledger.check()
    expect_frames(c.call("revrange", "s", "+", "-"), ledger.stream(b"s")[::-1])
    expect_frames(c.call("range", "s", "1", "1"), ledger.stream(b"s")[1:2])
    expect_frames(c.call("revrange", "$all", "+", "-", "COUNT", "2"), ledger.events[:-3:-1])
    expect_frames(c.call("range", "$all", "2", "3"), ledger.events[2:4])


def test_an_empty_id_or_metadata_means_none(ledger):
    """Empty ids are no ids: two in one request are no duplicate, and the same request
    again is stored again (there is nothing to recognise it by)."""
    events = [(b"", b"a", b"", b"1"), (b"", b"b", b"", b"2")]
    ledger.append_full(b"s", b"any", *events)
    ledger.append_full(b"s", b"any", *events)
    ledger.append_full(b"s", b"any", (b"", b"c", b"m", b"3"), (b"i", b"d", b"", b"4"))
    raw = ledger.client.call("range", "s", "-", "+")
    expect_frames(raw, ledger.stream(b"s"))
    assert raw.count(b"$-1\r\n$-1\r\n") == 4


def test_envelope_full_subscriptions_show_ids_and_metadata(server, ledger):
    """Catch-up and live, by stream, by position and live ``$all``: one frame everywhere."""
    ledger.append_full(b"s", b"none", (b"i1", b"a", b"m1", b"1"), (b"i2", b"b", b"", b"2"))
    ledger.publish(b"t", b"p", b"x")
    by_stream, by_position, live_all = server.client(), server.client(), server.client()
    for sub, spec in [(by_stream, "s:0"), (by_position, "$all@0"), (live_all, "$all")]:
        assert sub.call("envelope", "full") == OK
        sub.send(command("subscribe", spec))
        sub.expect(subscribed(spec.split(":")[0].split("@")[0].encode()))
    expect_frames(b"".join(by_stream.read_reply() for _ in range(2)), ledger.stream(b"s"),
                  header=False)
    expect_frames(b"".join(by_position.read_reply() for _ in range(3)), ledger.events,
                  header=False)
    wait_for(lambda: info_fields(ledger.client)["subscribers"] == "3", what="3 subscribers")
    ledger.append_full(b"s", b"1", (b"i3", b"c", b"live \r\n", b"3"), (b"", b"d", b"", b""))
    live = ledger.stream(b"s")[2:]
    for sub in (by_stream, by_position, live_all):
        expect_frames(b"".join(sub.read_reply() for _ in range(2)), live, header=False)


def test_original_frames_of_append_full_events_are_unchanged(server):
    """A client of the original protocol never sees ids or metadata."""
    c = server.client()
    assert c.call("append-full", "s", "none", "i1", "a", "meta", "1", "", "b", "", "2") == \
        full_reply(1, 1)
    c.send(command("subscribe", "s:0:2"))
    c.expect(subscribed(b"s") + event_frame(b"s", 0, b"a", b"1") + event_frame(b"s", 1, b"b", b"2"))


def test_publish_and_append_replies_are_unchanged_beside_append_full(ledger):
    """The Ledger asserts ``+OK`` and ``:<n>``; their frames have nil id and metadata."""
    ledger.publish(b"s", b"a", b"1")
    ledger.append_full(b"s", b"0", (b"x", b"b", b"m", b"2"))
    ledger.append(b"s", b"1", (b"c", b"3"), (b"d", b"4"))
    ledger.publish(b"t", b"e", b"5")
    ledger.append(b"t", b"any", (b"f", b"6"))
    ledger.check()


@pytest.mark.parametrize("expected, reply", [
    ("none", b"-WRONGEXPECTED stream s is at 1, expected none\r\n"),
    ("0", b"-WRONGEXPECTED stream s is at 1, expected 0\r\n"),
    ("2", b"-WRONGEXPECTED stream s is at 1, expected 2\r\n"),
])
def test_append_full_with_a_wrong_expected_version_stores_nothing(server, expected, reply):
    """As ``append``; and the refused request's id is not taken."""
    c = server.client()
    assert c.call("append-full", "s", "none", "i1", "a", "", "1", "i2", "b", "", "2") == \
        full_reply(1, 1)
    before = snapshot(c)
    assert c.call("append-full", "s", expected, "i3", "c", "", "3") == reply
    assert snapshot(c) == before
    assert c.call("append-full", "s", "1", "i3", "c", "", "3") == full_reply(2, 2)  # i3 is free


def test_append_full_expecting_a_number_of_a_missing_stream(server):
    c = server.client()
    assert c.call("append-full", "fresh", "0", "i", "a", "", "1") == \
        b"-WRONGEXPECTED stream fresh is at none, expected 0\r\n"
    assert c.call("stream-names") == NO_STREAMS


@pytest.mark.parametrize("args", [
    (), ("s",), ("s", "any"), ("s", "any", "i"), ("s", "any", "i", "e"),
    ("s", "any", "i", "e", "m"),
    ("s", "any", "i", "e", "m", "d", "j"), ("s", "any", "i", "e", "m", "d", "j", "f", "n"),
])
def test_append_full_with_a_wrong_number_of_arguments(server, args):
    c = server.client()
    assert c.call("append-full", *args) == b"-ERR wrong number of arguments for 'append-full'\r\n"
    assert c.call("stream-names") == NO_STREAMS
    assert c.call("ping") == PONG


#: (arguments after "append-full", a word the error must hold). Each holds the good id
#: "ok-1" somewhere or not at all; after the error it must still be free.
BAD_APPEND_FULL = [
    pytest.param(("s", "any", b"i" * 256, "e", "", "1"), b"", id="id-of-256-bytes"),
    pytest.param(("s", "any", "\u00e9".encode() * 128, "e", "", "1"), b"",
                 id="id-of-256-utf8-bytes"),
    pytest.param(("s", "any", b"a\x00b", "e", "", "1"), b"", id="id-with-nul"),
    pytest.param(("s", "any", b"a\x01", "e", "", "1"), b"", id="id-with-soh"),
    pytest.param(("s", "any", b"a\nb", "e", "", "1"), b"", id="id-with-newline"),
    pytest.param(("s", "any", b"a\tb", "e", "", "1"), b"", id="id-with-tab"),
    pytest.param(("s", "any", b"a\x7f", "e", "", "1"), b"", id="id-with-del"),
    pytest.param(("s", "any", b"a\xc2\x85", "e", "", "1"), b"", id="id-with-c1-control"),
    pytest.param(("s", "any", b"\xff\xfe", "e", "", "1"), b"", id="id-not-utf8"),
    pytest.param(("s", "-1", "ok-1", "e", "", "1"), b"expected", id="expected-negative"),
    pytest.param(("s", "one", "ok-1", "e", "", "1"), b"expected", id="expected-word"),
    pytest.param(("s", "", "ok-1", "e", "", "1"), b"expected", id="expected-empty"),
    pytest.param(("s", "1.5", "ok-1", "e", "", "1"), b"expected", id="expected-fraction"),
    pytest.param(("a:b", "any", "ok-1", "e", "", "1"), b"stream", id="stream-with-colon"),
    pytest.param(("a b", "any", "ok-1", "e", "", "1"), b"stream", id="stream-with-space"),
    pytest.param(("", "any", "ok-1", "e", "", "1"), b"stream", id="stream-empty"),
    pytest.param(("$all", "any", "ok-1", "e", "", "1"), b"stream", id="stream-all"),
    pytest.param(("$mine", "any", "ok-1", "e", "", "1"), b"stream", id="stream-reserved"),
    pytest.param(("s", "any", "ok-1", "", "", "1"), b"name", id="event-name-empty"),
    pytest.param(("s", "any", "ok-1", b"bad\x01", "", "1"), b"name", id="event-name-control"),
    pytest.param(("s", "any", "ok-1", "a", "", "1", b"x\x00", "b", "", "2"), b"",
                 id="one-bad-id-after-a-good-event"),
    pytest.param(("s", "any", "ok-1", "a", "", "1", "ok-2", b"", "", "2"), b"name",
                 id="one-bad-name-after-a-good-event"),
]


@pytest.mark.parametrize("args, word", BAD_APPEND_FULL)
def test_bad_append_full_arguments_are_errors_that_store_nothing(server, args, word):
    """Each refused whole: nothing stored, not even the good event's id before the bad one."""
    c = server.client()
    reply = c.call("append-full", *args)
    assert reply.startswith(b"-ERR ") and reply.count(b"\r\n") == 1, reply
    assert word in reply, reply
    assert c.call("stream-names") == NO_STREAMS
    assert c.call("range", "$all", "-", "+") == b"*0\r\n"
    assert c.call("append-full", "s", "none", "ok-1", "a", "", "1") == full_reply(0, 0)


def test_ids_of_255_bytes_are_accepted(ledger):
    ledger.append_full(b"s", b"none", (b"i" * 255, b"a", b"", b"1"),
                       ("\u00e9".encode() * 127 + b"i", b"b", b"", b"2"),
                       ("\u20ac".encode() * 85, b"c", b"", b"3"))
    ledger.check()


def test_data_plus_metadata_is_bounded_by_max_event_size(start_server):
    """The bound is on data and metadata together, not on each."""
    server = start_server("--max-event-size", "100")
    ledger = Ledger(server.client())
    ledger.append_full(b"s", b"any", (b"i1", b"a", b"m" * 60, b"d" * 40),
                       (b"i2", b"b", b"m" * 100, b""))
    c = ledger.client
    before = snapshot(c)
    for metadata, data in [(b"m" * 61, b"d" * 40), (b"m" * 101, b""), (b"m", b"d" * 100)]:
        reply = c.call("append-full", "s", "any", "i3", "c", metadata, data)
        assert reply.startswith(b"-ERR "), reply
        assert snapshot(c) == before
    ledger.append_full(b"s", b"1", (b"i3", b"c", b"m" * 50, b"d" * 50))
    ledger.check()


# -- idempotent appends --------------------------------------------------------------------

FIRST: list[Event] = [(b"id-1", b"created", b"m1", b"one"), (b"id-2", b"paid", b"", b"two")]
THIRD: Event = (b"id-3", b"shipped", b"m3", b"three")
NEW: Event = (b"id-new", b"x", b"", b"y")


@pytest.fixture
def stored(ledger) -> Ledger:
    """s:0-1 = FIRST (positions 0-1) in one append-full, t:0 (2), then s:2 = THIRD (3)."""
    ledger.append_full(b"s", b"none", *FIRST)
    ledger.publish(b"t", b"other", b"x")
    ledger.append_full(b"s", b"1", THIRD)
    return ledger


@pytest.mark.parametrize("expected", ["none", "any", "0", "1", "2", "99"])
def test_a_retry_gets_its_first_reply_stores_nothing_and_ignores_expected(stored, expected):
    """A client that lost a reply sends the same request: whatever its stale expected
    version, it gets the first reply, and the next write lands right after."""
    c = stored.client
    before = snapshot(c)
    assert c.call("append-full", "s", expected, *flat(FIRST)) == full_reply(1, 1)
    assert c.call("append-full", "s", expected, *flat([THIRD])) == full_reply(2, 3)
    assert c.call("append-full", "s", expected, *flat(FIRST)) == full_reply(1, 1)
    assert snapshot(c) == before
    stored.append_full(b"s", b"2", NEW)  # the next write lands right after: nothing hid
    stored.check()


@pytest.mark.parametrize("stream, events, reply", [
    pytest.param(b"s", [FIRST[0], NEW], duplicate_id(b"id-1", b"s", 0), id="stored-then-new"),
    pytest.param(b"s", [NEW, FIRST[1]], duplicate_id(b"id-2", b"s", 1), id="new-then-stored"),
    pytest.param(b"s", FIRST + [NEW], duplicate_id(b"id-1", b"s", 0), id="one-event-more"),
    pytest.param(b"s", [FIRST[0], (b"id-2", b"paid", b"", b"TWO")], duplicate_id(b"id-1", b"s", 0),
                 id="different-data"),
    pytest.param(b"s", [FIRST[0], (b"id-2", b"PAID", b"", b"two")], duplicate_id(b"id-1", b"s", 0),
                 id="different-name"),
    pytest.param(b"s", [(b"id-1", b"created", b"M1", b"one"), FIRST[1]],
                 duplicate_id(b"id-1", b"s", 0), id="different-metadata"),
    pytest.param(b"s", [(b"id-1", b"created", b"", b"one"), FIRST[1]],
                 duplicate_id(b"id-1", b"s", 0), id="metadata-left-out"),
    pytest.param(b"s", [FIRST[0], (b"id-2", b"paid", b"m", b"two")],
                 duplicate_id(b"id-1", b"s", 0), id="metadata-added"),
    pytest.param(b"t", FIRST, duplicate_id(b"id-1", b"s", 0), id="another-stream"),
    pytest.param(b"fresh", [THIRD], duplicate_id(b"id-3", b"s", 2), id="same-event-another-stream"),
    pytest.param(b"s", FIRST[::-1], duplicate_id(b"id-2", b"s", 1), id="other-order"),
    pytest.param(b"s", [NEW, FIRST[1], FIRST[0]], duplicate_id(b"id-2", b"s", 1),
                 id="first-reused-in-request-order"),
    pytest.param(b"u", [NEW, THIRD], duplicate_id(b"id-3", b"s", 2), id="reused-in-a-new-stream"),
    pytest.param(b"s", [(b"id-1", b"other", b"", b"other")], duplicate_id(b"id-1", b"s", 0),
                 id="id-alone-reused"),
])
def test_any_other_reuse_of_a_stored_id_is_duplicateid_and_stores_nothing(stored, stream, events,
                                                                         reply):
    """Anything short of the exact stored request names the first reused id in request
    order, whatever the expected version, and stores nothing (NEW stays free)."""
    c = stored.client
    before = snapshot(c)
    for expected in ("any", "none", "2"):
        assert c.call("append-full", stream, expected, *flat(events)) == reply, expected
        assert snapshot(c) == before
    assert c.call("append-full", "v", "none", *flat([NEW])) == full_reply(0, 4)  # NEW is free


def test_the_idempotency_check_comes_before_the_expected_version_check(stored):
    c = stored.client
    before = snapshot(c)
    # t is at 0 and the request expects 5: still DUPLICATEID, not WRONGEXPECTED.
    assert c.call("append-full", "t", "5", *flat(FIRST)) == duplicate_id(b"id-1", b"s", 0)
    assert c.call("append-full", "s", "none", *flat([NEW, THIRD])) == \
        duplicate_id(b"id-3", b"s", 2)
    assert c.call("append-full", "s", "none", *flat([THIRD])) == full_reply(2, 3)
    assert snapshot(c) == before
    stored.append_full(b"t", b"0", NEW)
    stored.check()


@pytest.mark.parametrize("events", [
    [(b"dup", b"a", b"", b"1"), (b"dup", b"a", b"", b"1")],
    [(b"dup", b"a", b"", b"1"), (b"other", b"b", b"", b"2"), (b"dup", b"c", b"m", b"3")],
])
def test_one_id_twice_in_one_request_is_an_error_and_stores_nothing(server, events):
    c = server.client()
    assert c.call("append-full", "s", "any", *flat(events)) == \
        b"-ERR duplicate event id dup in request\r\n"
    assert c.call("range", "$all", "-", "+") == b"*0\r\n"
    assert c.call("append-full", "s", "none", *flat(events[1:])) == full_reply(len(events) - 2,
                                                                              len(events) - 2)


def test_an_id_of_a_refused_request_stays_free(stored):
    """Refused for its expected version or another id, a request leaves its new ids free."""
    c = stored.client
    assert c.call("append-full", "s", "7", *flat([NEW])) == \
        b"-WRONGEXPECTED stream s is at 2, expected 7\r\n"
    assert c.call("append-full", "t", "any", *flat([NEW, FIRST[0]])) == \
        duplicate_id(b"id-1", b"s", 0)
    stored.append_full(b"t", b"0", NEW)
    stored.check()


@pytest.mark.parametrize("fsync", ["always", "everysec", "no"])
@pytest.mark.parametrize("stop", ["sigterm", "kill-9", "kill-9-derived-files-gone"])
def test_retries_are_recognised_after_a_restart(start_server, stop, fsync):
    """Ids outlive the process, whether it stopped cleanly or was killed (no fsync
    policy loses an acknowledged event on a process crash), across many segments; and
    with only the log left (docs/format.md: every other file is derived, rebuilt from
    the segments), the ids are found in the log."""
    server = start_server("--segment-size", "1024", "--fsync", fsync)
    c = server.client()
    rng = random.Random(5)
    requests: list[tuple[bytes, list[Event], bytes]] = []
    total = 0
    for i in range(120):
        stream = b"s%d" % (i % 4)
        events = [(b"req-%d-%d" % (i, j), b"e%d" % j, rng.randbytes(rng.randrange(0, 20)),
                   rng.randbytes(rng.randrange(0, 60))) for j in range(1 + i % 3)]
        reply = c.call("append-full", stream, "any", *flat(events))
        total += len(events)
        assert reply.startswith(b"*2\r\n") and reply.endswith(b":%d\r\n" % (total - 1)), reply
        requests.append((stream, events, reply))
    assert len(list(server.data_dir.glob("*.seg"))) > 5
    before = snapshot(c)
    if stop == "sigterm":
        assert server.stop() == 0
    else:
        server.kill()
    if stop == "kill-9-derived-files-gone":
        for path in server.data_dir.iterdir():
            if path.suffix != ".seg" and path.name != "LOCK":
                path.unlink()
    server.start()
    c = server.client()
    assert snapshot(c) == before
    for stream, events, reply in requests:
        assert c.call("append-full", stream, "none", *flat(events)) == reply
    assert snapshot(c) == before
    stream, events, reply = requests[50]
    first_number = int(parse(reply)[0]) - len(events) + 1
    assert c.call("append-full", b"other", "any", *flat([events[0], NEW])) == \
        duplicate_id(events[0][0], stream, first_number)
    assert c.call("append-full", b"other", "none", *flat([NEW])) == full_reply(0, total)


def test_the_same_append_full_from_many_connections_is_stored_once(server):
    """Clients racing with one request (a retry sent while the first is in flight) all
    get the one reply; racing with other data under the same ids, one wins and the rest
    are told where it is."""
    clients = [server.client() for _ in range(8)]
    assert clients[0].call("publish", "z", "e", "0") == OK
    request = append_full("s", "any", FIRST + [THIRD])
    for client in clients:
        client.send(request)
    assert {client.read_reply() for client in clients} == {full_reply(2, 3)}
    for i, client in enumerate(clients):
        client.send(append_full("t", "any", [(b"race", b"e", b"", b"%d" % i)]))
    replies = [client.read_reply() for client in clients]
    winners = [i for i, reply in enumerate(replies) if reply == full_reply(0, 4)]
    assert len(winners) == 1
    assert sorted(replies) == sorted([full_reply(0, 4)] + [duplicate_id(b"race", b"t", 0)] * 7)
    frames = parse(clients[0].call("range", "$all", "-", "+"))
    assert [(f[1], f[2], f[7]) for f in frames] == [
        (b"z", 0, None), (b"s", 0, b"id-1"), (b"s", 1, b"id-2"), (b"s", 2, b"id-3"),
        (b"t", 0, b"race")]
    assert frames[-1][4] == b"%d" % winners[0]


# -- transactions ------------------------------------------------------------------------


def test_multi_queues_writes_and_exec_answers_each_usual_reply(ledger):
    ledger.publish(b"before", b"e", b"0")
    c = ledger.client
    earliest = now_ms()
    assert c.call("MULTI") == OK
    assert c.call("publish", "a", "created", "1") == QUEUED
    assert c.call("append", "b", "none", "x", "2", "y", "3") == QUEUED
    assert c.call("append-full", "a", "0", "id-1", "paid", "meta", "4") == QUEUED
    assert c.call("exec") == b"*3\r\n+OK\r\n:1\r\n*2\r\n:1\r\n:4\r\n"
    latest = now_ms()
    ledger.record(b"a", [(b"", b"created", b"", b"1")], earliest, latest)
    ledger.record(b"b", [(b"", b"x", b"", b"2"), (b"", b"y", b"", b"3")], earliest, latest)
    ledger.record(b"a", [(b"id-1", b"paid", b"meta", b"4")], earliest, latest)
    ledger.check()
    ledger.publish(b"after", b"e", b"5")  # out of the transaction: +OK, not +QUEUED
    ledger.check()


@pytest.mark.parametrize("queued", [
    ("range", "$all", "-", "+"), ("revrange", "a", "+", "-"), ("PING",), ("ping", "hi"),
    ("last-event-number", "a"), ("stream-names",), ("subscribe", "a"), ("subscribe", "$all@0"),
    ("envelope", "full"), ("info",), ("scan-streams", "0"), ("nosuch", "x"),
])
def test_a_queued_command_that_is_not_a_write_makes_exec_abort(server, queued):
    """Only writes queue: anything else is refused and dooms the whole transaction, writes
    queued before and after it included; EXEC ends the transaction all the same."""
    c = server.client()
    assert c.call("publish", "a", "e", "0") == OK
    before = snapshot(c)
    assert c.call("multi") == OK
    assert c.call("publish", "a", "e", "1") == QUEUED
    reply = c.call(*queued)
    assert reply.startswith(b"-ERR") and reply.count(b"\r\n") == 1, reply
    assert c.call("append-full", "a", "any", "i", "e", "", "2") == QUEUED
    assert c.call("exec") == EXECABORT
    assert snapshot(c) == before
    assert info_fields(c)["subscribers"] == "0"
    assert c.call("exec").startswith(b"-ERR")  # out of the transaction
    assert c.call("append-full", "a", "0", "i", "e", "", "2") == full_reply(1, 1)  # i is free


@pytest.mark.parametrize("queued", [
    pytest.param(("publish", "a", "e"), id="publish-arity"),
    pytest.param(("publish", "a", "e", "x", "y"), id="publish-arity-over"),
    pytest.param(("publish", "a:b", "e", "x"), id="publish-bad-stream"),
    pytest.param(("publish", "$all", "e", "x"), id="publish-to-all"),
    pytest.param(("publish", "a", b"bad\nname", "x"), id="publish-bad-name"),
    pytest.param(("publish", "a", "e", b"x" * (1024 * 1024 + 1)), id="publish-too-big"),
    pytest.param(("append", "a", "any", "e"), id="append-arity"),
    pytest.param(("append", "a", "soon", "e", "x"), id="append-bad-expected"),
    pytest.param(("append", "bad name", "any", "e", "x"), id="append-bad-stream"),
    pytest.param(("append-full", "a", "any", "i", "e", ""), id="append-full-arity"),
    pytest.param(("append-full", "a", "any", b"bad\x01", "e", "", "x"), id="append-full-bad-id"),
    pytest.param(("append-full", "a", "any", b"i" * 256, "e", "", "x"), id="append-full-long-id"),
    pytest.param(("append-full", "a", "-1", "i", "e", "", "x"), id="append-full-bad-expected"),
    pytest.param(("append-full", "$x", "any", "i", "e", "", "x"), id="append-full-reserved-stream"),
])
def test_a_malformed_queued_write_makes_exec_abort(server, queued):
    """A write refused as it is queued dooms the transaction, as in Redis."""
    c = server.client()
    assert c.call("publish", "a", "e", "0") == OK
    before = snapshot(c)
    assert c.call("multi") == OK
    assert c.call("append-full", "b", "any", "j", "e", "", "1") == QUEUED
    reply = c.call(*queued)
    assert reply.startswith(b"-ERR") and reply.count(b"\r\n") == 1, reply
    assert c.call("publish", "a", "e", "2") == QUEUED
    assert c.call("exec") == EXECABORT
    assert snapshot(c) == before
    assert c.call("publish", "a", "e", "3") == OK
    assert c.call("append-full", "b", "none", "j", "e", "", "1") == full_reply(0, 2)


def test_multi_inside_multi_is_an_error_and_the_transaction_goes_on(server):
    """Whether the refused MULTI also dooms the EXEC, the contract leaves open (Redis does
    not; "any other command" would): either way EXEC is whole and ends the transaction."""
    c = server.client()
    assert c.call("multi") == OK
    assert c.call("publish", "a", "e", "1") == QUEUED
    assert c.call("multi").startswith(b"-ERR")
    assert c.call("publish", "a", "e", "2") == QUEUED  # still queueing
    result = c.call("exec")
    if result == EXECABORT:
        assert c.call("range", "$all", "-", "+") == b"*0\r\n"
    else:
        assert result == b"*2\r\n+OK\r\n+OK\r\n"
        assert c.call("last-event-number", "a") == b"*3\r\n+last-event-number\r\n+a\r\n:1\r\n"
    assert c.call("exec").startswith(b"-ERR")
    stored = 0 if result == EXECABORT else 2
    assert c.call("append-full", "a", "any", "i", "e", "", "3") == full_reply(stored, stored)


@pytest.mark.parametrize("name", ["EXEC", "exec", "DISCARD", "discard"])
def test_exec_or_discard_without_multi_is_an_error(server, name):
    c = server.client()
    reply = c.call(name)
    assert reply.startswith(b"-ERR") and reply.count(b"\r\n") == 1, reply
    assert c.call("publish", "a", "e", "1") == OK
    assert c.call("ping") == PONG


def test_discard_drops_the_queue_and_ends_the_transaction(server):
    c = server.client()
    assert c.call("publish", "a", "e", "0") == OK
    before = snapshot(c)
    assert c.call("multi") == OK
    assert c.call("publish", "a", "e", "1") == QUEUED
    assert c.call("append-full", "a", "any", "i", "e", "", "2") == QUEUED
    assert c.call("discard") == OK
    assert snapshot(c) == before
    assert c.call("exec").startswith(b"-ERR")
    assert c.call("discard").startswith(b"-ERR")
    # DISCARD forgets the queue's errors too: the next transaction runs.
    assert c.call("multi") == OK
    assert c.call("ping").startswith(b"-ERR")
    assert c.call("discard") == OK
    assert c.call("multi") == OK
    assert c.call("append-full", "a", "0", "i", "e", "", "2") == QUEUED
    assert c.call("exec") == b"*1\r\n" + full_reply(1, 1)


def test_an_empty_transaction_execs_to_an_empty_array(server):
    c = server.client()
    assert c.call("multi") == OK
    assert c.call("exec") == b"*0\r\n"
    assert c.call("publish", "a", "e", "1") == OK
    assert c.call("MULTI") == OK
    assert c.call("EXEC") == b"*0\r\n"
    assert c.call("append-full", "a", "0", "i", "e", "", "2") == full_reply(1, 1)


def test_appends_to_one_stream_chain_their_expected_versions(ledger):
    """EXEC checks each write as if the ones before it were applied, both ways."""
    c = ledger.client
    earliest = now_ms()
    c.send(command("multi") + command("append", "s", "none", "a", "1")
           + command("append", "s", "0", "b", "2")
           + command("append-full", "s", "1", "id-c", "c", "m", "3")
           + command("publish", "s", "d", "4") + command("append", "s", "3", "e", "5")
           + command("exec"))
    c.expect(OK + QUEUED * 5 + b"*5\r\n:0\r\n:1\r\n*2\r\n:2\r\n:2\r\n+OK\r\n:4\r\n")
    latest = now_ms()
    ledger.record(b"s", [(b"", b"a", b"", b"1"), (b"", b"b", b"", b"2"),
                         (b"id-c", b"c", b"m", b"3"), (b"", b"d", b"", b"4"),
                         (b"", b"e", b"", b"5")], earliest, latest)
    ledger.check()
    # A chained expectation that does not hold fails as if the earlier write were applied.
    before = snapshot(c)
    c.send(command("multi") + command("append", "s", "4", "f", "6")
           + command("append", "s", "4", "g", "7") + command("exec"))
    c.expect(OK + QUEUED * 2 + b"-WRONGEXPECTED stream s is at 5, expected 4\r\n")
    c.send(command("multi") + command("append", "fresh", "none", "f", "6")
           + command("append-full", "fresh", "none", "id-g", "g", "", "7") + command("exec"))
    c.expect(OK + QUEUED * 2 + b"-WRONGEXPECTED stream fresh is at 0, expected none\r\n")
    assert snapshot(c) == before
    ledger.append(b"s", b"4", (b"f", b"6"))  # the next write lands right after: nothing hid
    ledger.check()


def test_a_wrong_expected_version_at_exec_stores_nothing_and_is_the_answer(server):
    """The writes before the failing one are not stored either."""
    c = server.client()
    assert c.call("publish", "a", "e", "0") == OK
    before = snapshot(c)
    assert c.call("multi") == OK
    for queued in [("publish", "other", "e", "1"), ("append-full", "a", "0", "id-w", "e", "", "1"),
                   ("append", "b", "3", "e", "1"), ("append", "a", "7", "e", "1")]:
        assert c.call(*queued) == QUEUED
    # The first write that fails, in queue order, is the answer.
    assert c.call("exec") == b"-WRONGEXPECTED stream b is at none, expected 3\r\n"
    assert snapshot(c) == before
    assert c.call("last-event-number", "other") == \
        b"*3\r\n+last-event-number\r\n+other\r\n$-1\r\n"
    assert c.call("exec").startswith(b"-ERR")  # out of the transaction
    assert c.call("append-full", "a", "0", "id-w", "e", "", "1") == full_reply(1, 1)


def test_a_duplicate_id_at_exec_stores_nothing_and_is_the_answer(server):
    c = server.client()
    assert c.call("append-full", "a", "none", "id-1", "e", "", "1") == full_reply(0, 0)
    before = snapshot(c)
    c.send(command("multi") + command("publish", "b", "e", "1")
           + command("append-full", "c", "any", "id-2", "e", "", "2")
           + command("append-full", "c", "any", "id-1", "e", "", "other") + command("exec"))
    c.expect(OK + QUEUED * 3 + duplicate_id(b"id-1", b"a", 0))
    # Before the expected-version check, in a transaction too.
    c.send(command("multi") + command("append-full", "c", "5", "id-2", "e", "", "2", "id-1", "e",
                                      "", "1") + command("exec"))
    c.expect(OK + QUEUED + duplicate_id(b"id-1", b"a", 0))
    assert snapshot(c) == before
    assert c.call("append-full", "c", "none", "id-2", "e", "", "2") == full_reply(0, 1)


def test_one_id_twice_in_a_transaction_is_an_error_and_stores_nothing(server):
    """Found when queued or at EXEC (the contract names the error, not the moment)."""
    c = server.client()
    assert c.call("publish", "z", "e", "0") == OK
    before = snapshot(c)
    duplicate = b"-ERR duplicate event id id-x in request\r\n"
    assert c.call("multi") == OK
    assert c.call("append-full", "a", "any", "id-x", "e", "", "1") == QUEUED
    assert c.call("publish", "b", "e", "2") == QUEUED
    second = c.call("append-full", "b", "any", "id-y", "e", "", "3", "id-x", "e", "", "1")
    if second == QUEUED:
        assert c.call("exec") == duplicate
    else:
        assert second == duplicate
        assert c.call("exec") == EXECABORT
    assert snapshot(c) == before
    assert c.call("append-full", "b", "any", "id-y", "e", "", "3", "id-x", "e", "", "1") == \
        full_reply(1, 2)


def test_a_retried_transaction_of_append_full_gets_its_first_reply(server):
    """A client that lost EXEC's reply sends the transaction again: every append-full in
    it is a retry, answered as first, with stale expected versions ignored."""
    c = server.client()
    assert c.call("publish", "z", "e", "0") == OK
    txn = (command("multi")
           + append_full("a", "none", [(b"t-1", b"e", b"m", b"1"), (b"t-2", b"e", b"", b"2")])
           + append_full("b", "none", [(b"t-3", b"e", b"", b"3")])
           + append_full("a", "1", [(b"t-4", b"e", b"m4", b"4")]) + command("exec"))
    first = b"*3\r\n" + full_reply(1, 2) + full_reply(0, 3) + full_reply(2, 4)
    c.send(txn)
    c.expect(OK + QUEUED * 3 + first)
    before = snapshot(c)
    for _ in range(2):
        c.send(txn)
        c.expect(OK + QUEUED * 3 + first)
    assert c.call("append-full", "a", "none", "t-4", "e", "m4", "4") == full_reply(2, 4)
    assert c.call("append-full", "b", "7", "t-3", "e", "", "3") == full_reply(0, 3)
    assert snapshot(c) == before
    assert c.call("append-full", "a", "2", "t-5", "e", "", "5") == full_reply(3, 5)


def test_expected_versions_are_checked_at_exec_and_others_are_not_held_up(server):
    queuing, other = server.client(), server.client()
    assert queuing.call("multi") == OK
    assert queuing.call("append", "s", "none", "e", "1") == QUEUED
    assert other.call("append", "s", "none", "e", "x") == b":0\r\n"
    assert other.call("MULTI") == OK
    assert other.call("publish", "s", "e", "y") == QUEUED
    assert other.call("EXEC") == b"*1\r\n+OK\r\n"
    assert queuing.call("exec") == b"-WRONGEXPECTED stream s is at 1, expected none\r\n"


def test_a_transaction_has_contiguous_positions_in_queue_order_while_others_publish(server):
    publisher, c = server.client(), server.client()
    publisher.send(b"".join(command("publish", b"p%d" % (i % 3), "single", str(i))
                            for i in range(3000)))
    writes = [("a", [(b"x-%d" % i, b"txn", b"", b"%d" % i)]) for i in range(3)] + \
             [("p1", [(b"x-3", b"txn", b"", b"3"), (b"x-4", b"txn", b"", b"4")]),
              ("b", [(b"x-5", b"txn", b"", b"5")]), ("p0", [(b"x-6", b"txn", b"", b"6")])]
    c.send(command("multi") + b"".join(append_full(s, "any", e) for s, e in writes)
           + command("exec"))
    c.expect(OK + QUEUED * len(writes))
    replies = parse(c.read_reply())
    for _ in range(3000):
        assert publisher.read_reply() == OK
    frames = parse(c.call("range", "$all", "-", "+", "COUNT", "100000"))
    assert [f[5] for f in frames] == list(range(3007))
    mine = [f for f in frames if f[3] == b"txn"]
    assert [f[7] for f in mine] == [b"x-%d" % i for i in range(7)]
    first = mine[0][5]
    assert [f[5] for f in mine] == list(range(first, first + 7))
    assert [r[1] for r in replies] == [first, first + 1, first + 2, first + 4, first + 5, first + 6]


@pytest.mark.parametrize("stop", ["sigterm", "kill-9"])
def test_a_transaction_across_a_segment_roll_is_whole_after_a_restart(start_server, stop):
    """A 2.5 KB transaction with 1 KiB segments: it rolls the log and comes back whole."""
    server = start_server("--segment-size", "1024")
    ledger = Ledger(server.client())
    for i in range(3):
        ledger.publish(b"x", b"fill", b"f" * 200)
    segments = len(list(server.data_dir.glob("*.seg")))
    writes = [(b"x", b"2"), (b"y", b"none"), (b"x", b"6")]
    events = {i: [(b"roll-%d-%d" % (i, j), b"e", b"m" * 20, bytes([65 + i]) * 150)
                  for j in range(4)] for i in range(3)}
    earliest = now_ms()
    c = ledger.client
    txn = (command("multi") + b"".join(append_full(s, e, events[i])
                                       for i, (s, e) in enumerate(writes)) + command("exec"))
    c.send(txn)
    first = b"*3\r\n" + full_reply(6, 6) + full_reply(3, 10) + full_reply(10, 14)
    c.expect(OK + QUEUED * 3 + first)
    latest = now_ms()
    for i, (stream, _) in enumerate(writes):
        ledger.record(stream, events[i], earliest, latest)
    ledger.publish(b"y", b"after", b"a")
    assert len(list(server.data_dir.glob("*.seg"))) > segments
    before = snapshot(c)
    if stop == "sigterm":
        assert server.stop() == 0
    else:
        server.kill()
    server.start()
    ledger.client = c = server.client()
    assert snapshot(c) == before
    ledger.check()
    c.send(txn)
    c.expect(OK + QUEUED * 3 + first)
    assert snapshot(c) == before


# -- what other connections see of transactions --------------------------------------------

TXN_STREAMS = [b"acct-%d" % i for i in range(5)]


@dataclass(frozen=True)
class Planned:
    """Where one planned event sits in its transaction."""

    txn: tuple[int, int]
    index: int
    size: int
    last_in_stream: bool


Transaction = list[tuple[bytes, list[Event]]]


def plan_transactions(rng: random.Random, writer: int, count: int) -> list[Transaction]:
    txns = []
    for k in range(count):
        writes = []
        for w in range(rng.randint(1, 3)):
            events = [(b"w%d.%d.%d.%d" % (writer, k, w, j), b"txn", b"m%d" % j,
                       rng.randbytes(rng.randrange(0, 80))) for j in range(rng.randint(1, 3))]
            writes.append((rng.choice(TXN_STREAMS), events))
        txns.append(writes)
    return txns


def index_plan(plans: list[list[Transaction]]) -> dict[bytes, Planned]:
    where: dict[bytes, Planned] = {}
    for writer, txns in enumerate(plans):
        for k, writes in enumerate(txns):
            ids = [(stream, e[0]) for stream, events in writes for e in events]
            last_of_stream = {stream: event_id for stream, event_id in ids}
            for index, (stream, event_id) in enumerate(ids):
                where[event_id] = Planned((writer, k), index, len(ids),
                                          last_of_stream[stream] == event_id)
    return where


def transaction_request(writes: Transaction) -> bytes:
    return (command("multi") + b"".join(append_full(s, "any", e) for s, e in writes)
            + command("exec"))


class TransactionWriter(threading.Thread):
    """Runs its transactions one after the other; keeps each EXEC reply."""

    def __init__(self, port: int, txns: list[Transaction]) -> None:
        super().__init__(daemon=True)
        self.client = RawClient(port)
        self.txns = txns
        self.replies: list[bytes] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for writes in self.txns:
                self.client.send(transaction_request(writes))
                self.client.expect(OK + QUEUED * len(writes))
                reply = self.client.read_reply()
                assert reply.startswith(b"*%d\r\n*2\r\n" % len(writes)), reply
                self.replies.append(reply)
        except BaseException as exc:  # reported by the test through .error
            self.error = exc


class Poller(threading.Thread):
    """Reads the newest event of ``$all`` and of each stream until told to stop: each
    must end its transaction (in that stream), or be no transaction's."""

    def __init__(self, port: int, where: dict[bytes, Planned], done: threading.Event) -> None:
        super().__init__(daemon=True)
        self.client = RawClient(port)
        self.where, self.done = where, done
        self.seen = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.done.is_set():
                for stream in [b"$all"] + TXN_STREAMS:
                    frames = parse(self.client.call("revrange", stream, "+", "-", "COUNT", "1"))
                    for frame in frames:
                        planned = self.where.get(frame[7])
                        if planned is None:
                            continue
                        self.seen += 1
                        if stream == b"$all":
                            assert planned.index == planned.size - 1, (frame, planned)
                        else:
                            assert planned.last_in_stream, (frame, planned)
        except BaseException as exc:
            self.error = exc


def check_whole_transactions(frames: list, where: dict[bytes, Planned]) -> int:
    """In ``frames`` (consecutive positions), every transaction's events come together,
    whole and in queue order, from the first frame (a reader that starts mid-transaction
    saw part of it). Returns how many transactions were seen."""
    seen, expecting = 0, None
    for frame in frames:
        planned = where.get(frame[7])
        if expecting is not None:
            assert planned is not None and planned.txn == expecting[0] \
                and planned.index == expecting[1], (frame, expecting)
        elif planned is not None:
            assert planned.index == 0, (frame, planned)
        if planned is not None and planned.index + 1 < planned.size:
            expecting = (planned.txn, planned.index + 1)
        else:
            expecting = None
            seen += planned is not None
    assert expecting is None, "a transaction's last events are missing"
    return seen


def test_readers_never_see_part_of_a_transaction(server):
    """Four connections run transactions over five shared streams while a fifth
    publishes single events. Readers look while it happens: a ``$all@0`` subscriber, late
    ``$all`` subscribers (each must start at a transaction's first event), and a poller of
    the newest events. Whatever the timing, none may see a transaction in part."""
    rng = random.Random(2024)
    plans = [plan_transactions(rng, w, 40) for w in range(4)]
    where = index_plan(plans)
    everything = server.client()
    assert everything.call("envelope", "full") == OK
    everything.send(command("subscribe", "$all@0"))
    everything.expect(subscribed(b"$all"))
    done = threading.Event()
    poller = Poller(server.port, where, done)
    writers = [TransactionWriter(server.port, txns) for txns in plans]
    publisher = RawClient(server.port)
    poller.start()
    for writer in writers:
        writer.start()
    publisher.send(b"".join(command("publish", TXN_STREAMS[i % 5], "single", b"%d" % i)
                            for i in range(400)))
    late: list[RawClient] = []
    for threshold in (5, 20, 40, 60, 90, 120):
        wait_for(lambda: sum(len(w.replies) for w in writers) >= threshold or
                 any(w.error or not w.is_alive() for w in writers), what="transactions")
        sub = server.client()
        assert sub.call("envelope", "full") == OK
        sub.send(command("subscribe", "$all"))
        sub.expect(subscribed(b"$all"))
        late.append(sub)
    for writer in writers:
        writer.join(DEADLINE)
        assert writer.error is None, writer.error
    for _ in range(400):
        assert publisher.read_reply() == OK
    done.set()
    poller.join(DEADLINE)
    assert poller.error is None, poller.error
    assert publisher.call("publish", "fence", "fence", "") == OK
    total_events = len(where) + 400 + 1
    frames = [parse(everything.read_reply()) for _ in range(total_events)]
    assert [f[5] for f in frames] == list(range(total_events))
    assert frames[-1][1] == b"fence"
    assert check_whole_transactions(frames, where) == 160
    ranged = parse(everything.call("range", "$all", "-", "+", "COUNT", "100000"))
    assert ranged == frames
    for sub in late:
        got = []
        while not got or got[-1][1] != b"fence":
            got.append(parse(sub.read_reply()))
        assert [f[5] for f in got] == list(range(got[0][5], total_events))
        check_whole_transactions(got, where)
    # Each EXEC reply names its writes' last numbers and positions as stored.
    by_id = {f[7]: f for f in frames if f[7] is not None}
    for writer in writers:
        for writes, reply in zip(writer.txns, writer.replies):
            expected = b"*%d\r\n" % len(writes) + b"".join(
                full_reply(by_id[events[-1][0]][2], by_id[events[-1][0]][5])
                for _, events in writes)
            assert reply == expected
    for stream in TXN_STREAMS:
        numbers = [f[2] for f in frames if f[1] == stream]
        assert numbers == list(range(len(numbers)))


# -- real clients and hostile ones --------------------------------------------------------


def redis_py(server, **kwargs) -> redis.Redis:
    return redis.Redis(port=server.port, socket_timeout=DEADLINE, socket_connect_timeout=DEADLINE,
                       retry=Retry(NoBackoff(), 0), **kwargs)


@pytest.mark.parametrize("protocol", [2, 3])
def test_redis_py_transaction_pipeline(server, protocol):
    """redis-py's MULTI/EXEC pipeline, RESP2 and RESP3: results, errors, a retry."""
    r = redis_py(server, protocol=protocol)
    try:
        pipe = r.pipeline(transaction=True)
        pipe.execute_command("publish", "a", "e", "1")
        pipe.execute_command("append", "a", 0, "e", "2", "e", "3")
        pipe.execute_command("append-full", "b", "none", "id-1", "e", b"m\x00", b"4\r\n")
        published, appended, full = pipe.execute()
        assert published in (b"OK", True) and appended == 2 and full == [0, 3]
        pipe = r.pipeline(transaction=True)
        pipe.execute_command("publish", "c", "e", "5")
        pipe.execute_command("append", "a", "none", "e", "6")
        with pytest.raises(redis.ResponseError, match="WRONGEXPECTED stream a is at 2"):
            pipe.execute()
        pipe = r.pipeline(transaction=True)
        pipe.execute_command("publish", "c", "e", "5")
        pipe.execute_command("range", "a", "-", "+")
        with pytest.raises(redis.ResponseError):
            pipe.execute()
        pipe = r.pipeline(transaction=True)
        pipe.execute_command("append-full", "b", "none", "id-1", "e", b"m\x00", b"4\r\n")
        assert pipe.execute() == [[0, 3]]
        assert r.execute_command("stream-names") == [b"stream-names", b"a", b"b"]
        frames = r.execute_command("range", "$all", "-", "+")
        assert [f[1:6] + f[7:] for f in frames] == [
            [b"a", 0, b"e", b"1", 0, None, None], [b"a", 1, b"e", b"2", 1, None, None],
            [b"a", 2, b"e", b"3", 2, None, None], [b"b", 0, b"e", b"4\r\n", 3, b"id-1", b"m\x00"]]
    finally:
        r.close()


def test_garbage_inside_multi_closes_only_that_connection(server, ledger):
    """Hostile connections open a transaction, queue a write and send garbage (never
    EXEC: the alphabet has no 'x'), while another connection's transactions go on."""
    rng = random.Random(99)
    alphabet = b"*$+-:\r\n0123456789 abcPING publish s e"
    c = ledger.client
    for round_ in range(25):
        hostile = server.client()
        assert hostile.call("multi") == OK
        assert hostile.call("publish", "s", "hostile", "x") == QUEUED
        if round_ == 0:
            hostile.send(b"*1\r\n$x\r\n")
        else:
            hostile.send(bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 300))))
        earliest = now_ms()
        c.send(command("multi") + command("publish", "s", "worker", b"%d" % round_)
               + append_full("t", "any", [(b"r-%d" % round_, b"worker", b"", b"")])
               + command("exec"))
        c.expect(OK + QUEUED * 2 + b"*2\r\n+OK\r\n"
                 + full_reply(ledger.numbers.get(b"t", -1) + 1, len(ledger.events) + 1))
        latest = now_ms()
        ledger.record(b"s", [(b"", b"worker", b"", b"%d" % round_)], earliest, latest)
        ledger.record(b"t", [(b"r-%d" % round_, b"worker", b"", b"")], earliest, latest)
        try:
            if round_ == 0:
                hostile.expect(b"-ERR Protocol error: ")
            else:
                hostile.sock.shutdown(socket.SHUT_WR)
            assert hostile.closed_by_peer()
        except OSError:
            pass
        finally:
            hostile.close()
        assert b"Traceback" not in hostile.buffer and b"internal error" not in hostile.buffer
    ledger.check()
    assert "Traceback" not in server.log()


def test_a_client_gone_inside_multi_leaves_nothing_stored(server):
    """A connection that ends without EXEC is a DISCARD."""
    keeper = server.client()
    gone = server.client()
    assert gone.call("multi") == OK
    assert gone.call("publish", "s", "e", "1") == QUEUED
    assert gone.call("append-full", "s", "any", "id-g", "e", "", "2") == QUEUED
    gone.close()
    wait_for(lambda: info_fields(keeper)["connected_clients"] == "1", what="one client")
    assert keeper.call("range", "$all", "-", "+") == b"*0\r\n"
    assert keeper.call("append-full", "s", "none", "id-g", "e", "", "2") == full_reply(0, 0)


def append_request(stream: str, count: int) -> bytes:
    return command("append", stream, "any", *([b"e", b""] * count))


def test_a_transaction_holds_at_most_100000_events(start_server):
    """Exactly 100,000 is stored; one more is refused whole, when queued or at EXEC."""
    server = start_server("--fsync", "no")
    c = server.client()
    c.send(command("multi") + append_request("s", 50_000) + append_request("t", 50_000)
           + command("exec"))
    c.expect(OK + QUEUED * 2 + b"*2\r\n:49999\r\n:49999\r\n")
    assert info_fields(c)["last_position"] == "99999"
    c.send(command("multi") + append_request("u", 60_000) + append_request("u", 40_001)
           + command("exec"))
    replies = [c.read_reply() for _ in range(4)]
    assert replies[:2] == [OK, QUEUED]
    if replies[2] == QUEUED:
        assert replies[3].startswith(b"-") and replies[3].count(b"\r\n") == 1, replies[3]
    else:
        assert replies[2].startswith(b"-ERR") and replies[3] == EXECABORT, replies[2:]
    assert c.call("last-event-number", "u") == b"*3\r\n+last-event-number\r\n+u\r\n$-1\r\n"
    assert info_fields(c)["last_position"] == "99999"
    assert c.call("publish", "u", "e", "after") == OK  # out of the transaction
    assert c.call("last-event-number", "u") == b"*3\r\n+last-event-number\r\n+u\r\n:0\r\n"
    assert info_fields(c)["last_position"] == "100000"
