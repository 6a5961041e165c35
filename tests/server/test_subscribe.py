"""``subscribe``: every spec form, its confirmation, and malformed specs."""

import pytest

from serverproc import command, event_frame, subscribed, wait_for


def info_fields(client) -> dict[str, str]:
    body = client.call("info").split(b"\r\n", 1)[1]
    return dict(line.split(":", 1) for line in body.decode().splitlines() if ":" in line)


def wait_subscribers(client, count: int) -> None:
    wait_for(lambda: info_fields(client)["subscribers"] == str(count),
             what=f"subscribers:{count}")


def publish_all(client, events) -> None:
    """Publish ``(stream, name, data)`` in order, pipelined, and check every +OK."""
    client.send(b"".join(command("publish", s, n, d) for s, n, d in events))
    client.expect(b"+OK\r\n" * len(events))


def assert_nothing_pending(client) -> None:
    """The next thing on the connection is the reply to a PING: no event came before it."""
    client.send(command("ping", "sentinel"))
    client.expect(b"$8\r\nsentinel\r\n")


# -- name ---------------------------------------------------------------------------------


def test_plain_name_gets_only_events_published_after_the_subscription(server):
    publisher = server.client()
    publish_all(publisher, [(b"s", b"old", b"0"), (b"s", b"old", b"1")])
    reader = server.client()
    reader.send(command("subscribe", "s"))
    reader.expect(subscribed(b"s"))
    wait_subscribers(publisher, 1)
    publish_all(publisher, [(b"s", b"new", b"2"), (b"other", b"x", b"y"), (b"s", b"new", b"3")])
    reader.expect(event_frame(b"s", 2, b"new", b"2") + event_frame(b"s", 3, b"new", b"3"))


def test_plain_name_of_a_stream_that_does_not_exist_yet_gets_its_first_event(server):
    reader = server.client()
    reader.send(command("subscribe", "later"))
    reader.expect(subscribed(b"later"))
    publisher = server.client()
    wait_subscribers(publisher, 1)
    publish_all(publisher, [(b"later", b"first", b"")])
    reader.expect(event_frame(b"later", 0, b"first", b""))


# -- name:from ----------------------------------------------------------------------------


def test_name_from_replays_stored_events_from_that_number_then_live_ones(server):
    publisher = server.client()
    publish_all(publisher, [(b"s", b"e", b"%d" % i) for i in range(5)])
    reader = server.client()
    reader.send(command("subscribe", "s:2"))
    reader.expect(subscribed(b"s"))
    reader.expect(b"".join(event_frame(b"s", i, b"e", b"%d" % i) for i in range(2, 5)))
    publish_all(publisher, [(b"s", b"live", b"5")])
    reader.expect(event_frame(b"s", 5, b"live", b"5"))


def test_name_from_beyond_the_last_event_waits_then_flows_from_that_number(server):
    publisher = server.client()
    publish_all(publisher, [(b"s", b"e", b"0"), (b"s", b"e", b"1")])
    reader = server.client()
    reader.send(command("subscribe", "s:5"))
    reader.expect(subscribed(b"s"))
    wait_subscribers(publisher, 1)
    assert_nothing_pending(reader)
    publish_all(publisher, [(b"s", b"e", b"%d" % i) for i in range(2, 7)])
    reader.expect(event_frame(b"s", 5, b"e", b"5") + event_frame(b"s", 6, b"e", b"6"))
    assert_nothing_pending(reader)


def test_name_zero_on_a_missing_stream_gets_every_event_once_it_exists(server):
    reader = server.client()
    reader.send(command("subscribe", "s:0"))
    reader.expect(subscribed(b"s"))
    publisher = server.client()
    wait_subscribers(publisher, 1)
    publish_all(publisher, [(b"s", b"e", b"a"), (b"s", b"e", b"b")])
    reader.expect(event_frame(b"s", 0, b"e", b"a") + event_frame(b"s", 1, b"e", b"b"))


# -- name:from:to -------------------------------------------------------------------------


def test_name_from_to_sends_the_range_then_ends_quietly_and_the_connection_stays_usable(server):
    publisher = server.client()
    publish_all(publisher, [(b"s", b"e", b"%d" % i) for i in range(5)])
    reader = server.client()
    reader.send(command("subscribe", "s:1:3"))
    reader.expect(subscribed(b"s"))
    reader.expect(event_frame(b"s", 1, b"e", b"1") + event_frame(b"s", 2, b"e", b"2"))
    wait_subscribers(publisher, 0)
    publish_all(publisher, [(b"s", b"e", b"5")])
    assert_nothing_pending(reader)
    assert reader.call("publish", "s", "e", "6") == b"+OK\r\n"
    assert reader.call("last-event-number", "s") == b"*3\r\n+last-event-number\r\n+s\r\n:6\r\n"
    reader.send(command("subscribe", "s:6:7"))
    reader.expect(subscribed(b"s") + event_frame(b"s", 6, b"e", b"6"))


def test_name_from_to_past_the_end_waits_for_live_events_up_to_to(server):
    publisher = server.client()
    publish_all(publisher, [(b"s", b"e", b"0")])
    reader = server.client()
    reader.send(command("subscribe", "s:0:3"))
    reader.expect(subscribed(b"s") + event_frame(b"s", 0, b"e", b"0"))
    publish_all(publisher, [(b"s", b"e", b"%d" % i) for i in range(1, 6)])
    reader.expect(event_frame(b"s", 1, b"e", b"1") + event_frame(b"s", 2, b"e", b"2"))
    wait_subscribers(publisher, 0)
    assert_nothing_pending(reader)


def test_name_from_to_of_one_event_sends_exactly_that_event(server):
    publisher = server.client()
    publish_all(publisher, [(b"s", b"e", b"%d" % i) for i in range(3)])
    reader = server.client()
    reader.send(command("subscribe", "s:1:2"))
    reader.expect(subscribed(b"s") + event_frame(b"s", 1, b"e", b"1"))
    wait_subscribers(publisher, 0)
    assert_nothing_pending(reader)


# -- several specs --------------------------------------------------------------------------


def test_each_spec_is_confirmed_once_in_order_before_any_event(server):
    publisher = server.client()
    publish_all(publisher, [(b"a", b"e", b"a0"), (b"b", b"e", b"b0"), (b"a", b"e", b"a1")])
    reader = server.client()
    reader.send(command("subscribe", "a:0", "b:0", "c", "$all"))
    reader.expect(subscribed(b"a") + subscribed(b"b") + subscribed(b"c") + subscribed(b"$all"))
    frames = [reader.read_reply() for _ in range(3)]
    # Each subscription is in order; different subscriptions may interleave.
    assert [f for f in frames if b"+a\r\n" in f] == [event_frame(b"a", 0, b"e", b"a0"),
                                                     event_frame(b"a", 1, b"e", b"a1")]
    assert [f for f in frames if b"+b\r\n" in f] == [event_frame(b"b", 0, b"e", b"b0")]
    wait_subscribers(publisher, 4)
    assert_nothing_pending(reader)


def test_the_same_spec_twice_is_two_subscriptions(server):
    publisher = server.client()
    publish_all(publisher, [(b"s", b"e", b"x")])
    reader = server.client()
    reader.send(command("subscribe", "s:0:1", "s:0:1"))
    reader.expect(subscribed(b"s") * 2 + event_frame(b"s", 0, b"e", b"x") * 2)


def test_subscribing_again_on_a_subscribed_connection_adds_a_subscription(server):
    publisher = server.client()
    reader = server.client()
    reader.send(command("subscribe", "a"))
    reader.expect(subscribed(b"a"))
    reader.send(command("subscribe", "b"))
    reader.expect(subscribed(b"b"))
    wait_subscribers(publisher, 2)
    publish_all(publisher, [(b"b", b"e", b"1")])
    reader.expect(event_frame(b"b", 0, b"e", b"1"))
    publish_all(publisher, [(b"a", b"e", b"2")])
    reader.expect(event_frame(b"a", 0, b"e", b"2"))


# -- $all ----------------------------------------------------------------------------------


def test_all_gets_live_events_of_every_stream_in_acceptance_order(server):
    publisher = server.client()
    publish_all(publisher, [(b"a", b"old", b"x")])
    reader = server.client()
    reader.send(command("subscribe", "$all"))
    reader.expect(subscribed(b"$all"))
    wait_subscribers(publisher, 1)
    events = [(b"a", b"e", b"1"), (b"new", b"e", b"2"), (b"a", b"e", b"3"), (b"b", b"e", b"4")]
    publish_all(publisher, events)
    reader.expect(event_frame(b"a", 1, b"e", b"1") + event_frame(b"new", 0, b"e", b"2")
                  + event_frame(b"a", 2, b"e", b"3") + event_frame(b"b", 0, b"e", b"4"))


def test_all_from_zero_replays_everything_in_acceptance_order_then_live(server):
    publisher = server.client()
    publish_all(publisher, [(b"b", b"e", b"1"), (b"a", b"e", b"2"), (b"b", b"e", b"3")])
    reader = server.client()
    reader.send(command("subscribe", "$all:0"))
    reader.expect(subscribed(b"$all") + event_frame(b"b", 0, b"e", b"1")
                  + event_frame(b"a", 0, b"e", b"2") + event_frame(b"b", 1, b"e", b"3"))
    publish_all(publisher, [(b"c", b"e", b"4")])
    reader.expect(event_frame(b"c", 0, b"e", b"4"))


def test_all_from_skips_events_numbered_below_from_in_every_stream(server):
    publisher = server.client()
    publish_all(publisher, [(b"a", b"e", b"a0"), (b"b", b"e", b"b0"), (b"a", b"e", b"a1"),
                            (b"b", b"e", b"b1"), (b"a", b"e", b"a2")])
    reader = server.client()
    reader.send(command("subscribe", "$all:1"))
    reader.expect(subscribed(b"$all") + event_frame(b"a", 1, b"e", b"a1")
                  + event_frame(b"b", 1, b"e", b"b1") + event_frame(b"a", 2, b"e", b"a2"))
    publish_all(publisher, [(b"c", b"e", b"c0"), (b"c", b"e", b"c1"), (b"b", b"e", b"b2")])
    reader.expect(event_frame(b"c", 1, b"e", b"c1") + event_frame(b"b", 2, b"e", b"b2"))


def test_all_from_to_bounds_every_stream_including_streams_created_later(server):
    publisher = server.client()
    publish_all(publisher, [(b"a", b"e", b"a%d" % i) for i in range(5)]
                + [(b"b", b"e", b"b0"), (b"b", b"e", b"b1")])
    reader = server.client()
    reader.send(command("subscribe", "$all:1:3"))
    reader.expect(subscribed(b"$all") + event_frame(b"a", 1, b"e", b"a1")
                  + event_frame(b"a", 2, b"e", b"a2") + event_frame(b"b", 1, b"e", b"b1"))
    publish_all(publisher, [(b"c", b"e", b"c%d" % i) for i in range(4)]
                + [(b"a", b"e", b"a5"), (b"b", b"e", b"b2"), (b"d", b"e", b"d0"),
                   (b"d", b"e", b"d1")])
    # Global order: c1 c2 (c0, c3, a5 out of range) b2 (d0 out of range) d1.
    reader.expect(event_frame(b"c", 1, b"e", b"c1") + event_frame(b"c", 2, b"e", b"c2")
                  + event_frame(b"b", 2, b"e", b"b2") + event_frame(b"d", 1, b"e", b"d1"))


# -- malformed specs --------------------------------------------------------------------------


MALFORMED_SPECS = ["s:", "s::1", "s:-1", "s:3:3", "s:5:2", "a:1:2:3", "s:x", "s:1:y", "s:+1",
                   "s: 1", "s:1.5", "s:\u0661", ":1", "", "a b", "s:1:", "$all:", "$all:2:1",
                   "$all:x", "s\x01", "a\r\nb:1",
                   "s:" + "9" * 5000, "s:0:" + "9" * 5000, "s:18446744073709551616",
                   "$all:0:99999999999999999999999"]


@pytest.mark.parametrize("spec", MALFORMED_SPECS, ids=lambda spec: repr(spec)[:40])
def test_a_malformed_spec_is_an_error_and_makes_no_subscription(server, spec):
    publisher = server.client()
    publish_all(publisher, [(b"s", b"e", b"0"), (b"a", b"e", b"0")])
    reader = server.client()
    reply = reader.call("subscribe", spec.encode())
    assert reply.startswith(b"-ERR "), reply
    assert reply.endswith(b"\r\n") and reply.count(b"\r\n") == 1
    assert b"internal error" not in reply
    assert info_fields(publisher)["subscribers"] == "0"
    publish_all(publisher, [(b"s", b"e", b"1"), (b"a", b"e", b"1")])
    assert_nothing_pending(reader)
    assert info_fields(publisher)["subscribers"] == "0"
    assert "Traceback" not in server.log()


def test_the_largest_event_number_is_a_valid_bound(server):
    reader = server.client()
    reader.send(command("subscribe", "s:18446744073709551614:18446744073709551615"))
    reader.expect(subscribed(b"s"))
    assert_nothing_pending(reader)


@pytest.mark.parametrize("position", [0, 1, 2])
def test_one_malformed_spec_rejects_the_whole_command(server, position):
    specs = ["good:0", "$all", "s:5:2"]
    specs.insert(position, specs.pop(2))
    publisher = server.client()
    publish_all(publisher, [(b"good", b"e", b"0")])
    reader = server.client()
    reply = reader.call("subscribe", *specs)
    assert reply.startswith(b"-ERR ") and b"s:5:2" in reply, reply
    assert info_fields(publisher)["subscribers"] == "0"
    publish_all(publisher, [(b"good", b"e", b"1")])
    # A good subscription made now sees both events; the rejected one made none.
    reader.send(command("subscribe", "good:0:2"))
    reader.expect(subscribed(b"good") + event_frame(b"good", 0, b"e", b"0")
                  + event_frame(b"good", 1, b"e", b"1"))
    wait_subscribers(publisher, 0)
    assert_nothing_pending(reader)
