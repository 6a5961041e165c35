"""Every command of PROTOCOL.md and its reply, byte for byte, over a raw socket."""

import re

import pytest

from serverproc import command, event_frame, subscribed, wait_for


def info_fields(client) -> dict[str, str]:
    reply = client.call("info")
    header, body = reply.split(b"\r\n", 1)
    assert header.startswith(b"$") and int(header[1:]) == len(body) - 2
    return dict(line.split(":", 1) for line in body.decode().splitlines() if ":" in line)


# -- publish ----------------------------------------------------------------------------


def test_publish_answers_ok_and_numbers_events_per_stream_from_zero(server):
    client = server.client()
    assert client.call("publish", "a", "e", "1") == b"+OK\r\n"
    assert client.call("publish", "b", "e", "1") == b"+OK\r\n"
    assert client.call("publish", "a", "e", "2") == b"+OK\r\n"
    assert client.call("last-event-number", "a") == b"*3\r\n+last-event-number\r\n+a\r\n:1\r\n"
    assert client.call("last-event-number", "b") == b"*3\r\n+last-event-number\r\n+b\r\n:0\r\n"


def test_publish_stores_binary_data_byte_exact(server):
    client = server.client()
    data = bytes(range(256)) + b"\r\n\x00\r\n"
    assert client.call("publish", "s", "bin", data) == b"+OK\r\n"
    assert client.call("publish", "s", "empty", b"") == b"+OK\r\n"
    client.send(command("subscribe", "s:0:2"))
    client.expect(subscribed(b"s"))
    client.expect(event_frame(b"s", 0, b"bin", data))
    client.expect(event_frame(b"s", 1, b"empty", b""))


def test_publish_accepts_a_utf8_event_name_with_spaces_and_colons(server):
    client = server.client()
    name = "créé: le 1er".encode()
    assert client.call("publish", "s", name, "x") == b"+OK\r\n"
    client.send(command("subscribe", "s:0:1"))
    client.expect(subscribed(b"s"))
    client.expect(event_frame(b"s", 0, name, b"x"))


# -- last-event-number and stream-names ---------------------------------------------------


def test_last_event_number_of_a_stream_without_events_is_nil(server):
    client = server.client()
    assert client.call("last-event-number", "nothing") == \
        b"*3\r\n+last-event-number\r\n+nothing\r\n$-1\r\n"


def test_stream_names_of_an_empty_store_is_just_the_header(server):
    assert server.client().call("stream-names") == b"*1\r\n+stream-names\r\n"


def test_stream_names_are_listed_in_byte_order(server):
    client = server.client()
    for name in ["b", "a", "B", "\u00e9t\u00e9", "a-1", "_", "Z9"]:
        assert client.call("publish", name, "e", "x") == b"+OK\r\n"
    names = sorted(n.encode() for n in ["b", "a", "B", "\u00e9t\u00e9", "a-1", "_", "Z9"])
    expected = b"*8\r\n+stream-names\r\n" + b"".join(b"+%s\r\n" % n for n in names)
    assert client.call("stream-names") == expected


# -- append -------------------------------------------------------------------------------


def test_append_with_expected_none_creates_the_stream_and_answers_the_last_number(server):
    client = server.client()
    assert client.call("append", "s", "none", "a", "1", "b", "2", "c", "3") == b":2\r\n"
    assert client.call("last-event-number", "s") == b"*3\r\n+last-event-number\r\n+s\r\n:2\r\n"


def test_append_with_expected_any_continues_the_numbering(server):
    client = server.client()
    assert client.call("publish", "s", "e", "0") == b"+OK\r\n"
    assert client.call("append", "s", "any", "a", "1") == b":1\r\n"
    assert client.call("append", "s", "ANY", "a", "2", "b", "3") == b":3\r\n"


def test_append_with_the_matching_last_number_appends(server):
    client = server.client()
    assert client.call("append", "s", "none", "a", "1") == b":0\r\n"
    assert client.call("append", "s", "0", "b", "2", "c", "3") == b":2\r\n"
    assert client.call("append", "s", "2", "d", "4") == b":3\r\n"


def test_append_events_arrive_contiguous_with_their_names_and_data(server):
    client = server.client()
    assert client.call("append", "s", "any", "a", b"1\r\n", "b", b"", "c", b"\x00") == b":2\r\n"
    client.send(command("subscribe", "s:0"))
    client.expect(subscribed(b"s"))
    client.expect(event_frame(b"s", 0, b"a", b"1\r\n"))
    client.expect(event_frame(b"s", 1, b"b", b""))
    client.expect(event_frame(b"s", 2, b"c", b"\x00"))


@pytest.mark.parametrize("expected, reply", [
    ("none", b"-WRONGEXPECTED stream s is at 1, expected none\r\n"),
    ("0", b"-WRONGEXPECTED stream s is at 1, expected 0\r\n"),
    ("7", b"-WRONGEXPECTED stream s is at 1, expected 7\r\n"),
])
def test_append_with_a_wrong_expected_version_stores_nothing(server, expected, reply):
    client = server.client()
    assert client.call("append", "s", "none", "a", "1", "b", "2") == b":1\r\n"
    assert client.call("append", "s", expected, "x", "1", "y", "2") == reply
    assert client.call("last-event-number", "s") == b"*3\r\n+last-event-number\r\n+s\r\n:1\r\n"


def test_append_expecting_a_number_on_a_missing_stream_says_it_is_at_none(server):
    client = server.client()
    assert client.call("append", "fresh", "0", "a", "1") == \
        b"-WRONGEXPECTED stream fresh is at none, expected 0\r\n"
    assert client.call("stream-names") == b"*1\r\n+stream-names\r\n"


@pytest.mark.parametrize("expected", ["-1", "one", "", "1.5", "0x1"])
def test_append_with_an_unparsable_expected_is_an_error_naming_it(server, expected):
    client = server.client()
    reply = client.call("append", "s", expected, "a", "1")
    assert reply.startswith(b"-ERR ") and b"expected" in reply
    assert client.call("stream-names") == b"*1\r\n+stream-names\r\n"


def test_append_with_one_bad_event_name_stores_none_of_the_batch(server):
    client = server.client()
    reply = client.call("append", "s", "any", "good", "1", "bad\x01", "2")
    assert reply.startswith(b"-ERR ") and b"event-name" in reply
    assert client.call("last-event-number", "s") == b"*3\r\n+last-event-number\r\n+s\r\n$-1\r\n"


def test_append_with_an_event_name_but_no_data_is_a_wrong_arity(server):
    client = server.client()
    assert client.call("append", "s", "any", "a", "1", "b") == \
        b"-ERR wrong number of arguments for 'append'\r\n"
    assert client.call("append", "s", "any", "a") == \
        b"-ERR wrong number of arguments for 'append'\r\n"
    assert client.call("stream-names") == b"*1\r\n+stream-names\r\n"


def test_concurrent_appends_expecting_the_same_version_let_exactly_one_win(server):
    clients = [server.client() for _ in range(5)]
    assert clients[0].call("append", "s", "none", "a", "1") == b":0\r\n"
    for client in clients:
        client.send(command("append", "s", "0", "b", "2"))
    replies = sorted(client.read_reply() for client in clients)
    assert replies == [b"-WRONGEXPECTED stream s is at 1, expected 0\r\n"] * 4 + [b":1\r\n"]


# -- AUTH -------------------------------------------------------------------------------


def test_requirepass_refuses_every_command_but_auth_and_quit_before_auth(start_server):
    server = start_server("--requirepass", "s3cret")
    client = server.client()
    for request in [("publish", "s", "e", "x"), ("subscribe", "s:0"), ("last-event-number", "s"),
                    ("stream-names",), ("append", "s", "any", "e", "x"), ("ping",),
                    ("info",), ("command",)]:
        assert client.call(*request) == b"-NOAUTH Authentication required.\r\n", request
    assert client.call("quit") == b"+OK\r\n"
    assert client.closed_by_peer()


def test_an_unknown_command_before_auth_is_noauth_and_after_it_unknown(start_server):
    server = start_server("--requirepass", "s3cret")
    client = server.client()
    assert client.call("flushall") == b"-NOAUTH Authentication required.\r\n"
    client.send(b"nosuch inline\r\n")
    assert client.read_reply() == b"-NOAUTH Authentication required.\r\n"
    assert client.call("auth", "s3cret") == b"+OK\r\n"
    assert client.call("flushall") == b"-ERR unknown command 'flushall'\r\n"


def test_auth_on_a_server_without_requirepass_is_wrongpass(server):
    client = server.client()
    assert client.call("auth", "anything") == b"-WRONGPASS invalid password\r\n"
    assert client.call("auth", "default", "anything") == b"-WRONGPASS invalid password\r\n"
    assert client.call("ping") == b"+PONG\r\n"


def test_auth_with_a_wrong_password_is_wrongpass_and_stays_unauthenticated(start_server):
    server = start_server("--requirepass", "s3cret")
    client = server.client()
    assert client.call("auth", "nope") == b"-WRONGPASS invalid password\r\n"
    assert client.call("ping") == b"-NOAUTH Authentication required.\r\n"


def test_auth_with_the_password_unlocks_the_connection_only(start_server):
    server = start_server("--requirepass", "s3cret")
    client = server.client()
    assert client.call("auth", "s3cret") == b"+OK\r\n"
    assert client.call("publish", "s", "e", "x") == b"+OK\r\n"
    assert client.call("ping") == b"+PONG\r\n"
    other = server.client()
    assert other.call("stream-names") == b"-NOAUTH Authentication required.\r\n"


def test_a_wrong_password_after_a_good_auth_leaves_the_connection_authenticated(start_server):
    server = start_server("--requirepass", "s3cret")
    client = server.client()
    assert client.call("auth", "s3cret") == b"+OK\r\n"
    assert client.call("auth", "wrong") == b"-WRONGPASS invalid password\r\n"
    assert client.call("auth", "someone", "s3cret") == b"-WRONGPASS invalid password\r\n"
    assert client.call("ping") == b"+PONG\r\n"
    assert client.call("auth", "default", "s3cret") == b"+OK\r\n"


def test_quit_before_auth_closes_without_storing_anything(start_server):
    server = start_server("--requirepass", "pw")
    client = server.client()
    client.send(command("publish", "s", "e", "x") + command("quit") + command("auth", "pw"))
    client.expect(b"-NOAUTH Authentication required.\r\n+OK\r\n")
    assert client.closed_by_peer()
    assert client.buffer == b""
    admin = server.client()
    assert admin.call("auth", "pw") == b"+OK\r\n"
    assert admin.call("stream-names") == b"*1\r\n+stream-names\r\n"


# -- PING, QUIT, COMMAND, INFO ---------------------------------------------------------------


def test_ping_without_message_is_pong(server):
    assert server.client().call("ping") == b"+PONG\r\n"


def test_ping_with_a_message_echoes_it_as_a_bulk_string(server):
    client = server.client()
    assert client.call("ping", "hello world") == b"$11\r\nhello world\r\n"
    assert client.call("ping", b"") == b"$0\r\n\r\n"
    assert client.call("ping", b"a\r\nb") == b"$4\r\na\r\nb\r\n"


def test_quit_answers_ok_then_closes_and_ignores_what_follows(server):
    client = server.client()
    client.send(command("quit") + command("publish", "s", "e", "x"))
    client.expect(b"+OK\r\n")
    assert client.closed_by_peer()
    assert client.buffer == b""
    assert server.client().call("stream-names") == b"*1\r\n+stream-names\r\n"


def test_command_replies_are_well_formed(server):
    client = server.client()
    for request in [("command",), ("command", "docs"), ("COMMAND", "DOCS", "publish"),
                    ("command", "info", "publish")]:
        reply = client.call(*request)
        assert reply.startswith(b"*"), request
    assert re.fullmatch(rb":\d+\r\n", client.call("command", "count"))
    assert client.call("ping") == b"+PONG\r\n"


def test_info_has_every_required_key_with_sensible_values(start_server):
    server = start_server("--fsync", "everysec")
    client = server.client()
    client.call("publish", "a", "e", "x")
    client.call("publish", "b", "e", "y")
    client.call("publish", "b", "e", "z")
    fields = info_fields(client)
    for key in ["meilies_version", "uptime_in_seconds", "connected_clients", "subscribers",
                "streams", "events", "disk_bytes", "fsync"]:
        assert key in fields, key
    assert fields["fsync"] == "everysec"
    assert fields["streams"] == "2"
    assert fields["events"] == "3"
    assert fields["subscribers"] == "0"
    assert int(fields["connected_clients"]) >= 1
    assert int(fields["disk_bytes"]) > 0
    assert int(fields["uptime_in_seconds"]) >= 0


def test_info_last_position_is_minus_one_when_empty_then_the_last_event_s(start_server):
    server = start_server()
    client = server.client()
    assert info_fields(client)["last_position"] == "-1"
    client.send(command("publish", "a", "e", "x") + command("append", "b", "any", "e", "y",
                                                            "e", "z"))
    client.expect(b"+OK\r\n:1\r\n")
    assert info_fields(client)["last_position"] == "2"
    client.close()
    assert server.stop() == 0
    server = start_server()
    assert info_fields(server.client())["last_position"] == "2"


def test_info_counts_live_subscriptions(server):
    client = server.client()
    watcher = server.client()
    watcher.send(command("subscribe", "a", "b:0", "$all"))
    watcher.expect(subscribed(b"a") + subscribed(b"b") + subscribed(b"$all"))
    wait_for(lambda: info_fields(client)["subscribers"] == "3", what="subscribers:3")
    watcher.close()
    wait_for(lambda: info_fields(client)["subscribers"] == "0", what="subscribers:0")


# -- command names, pipelining, inline --------------------------------------------------------


@pytest.mark.parametrize("name", ["publish", "PUBLISH", "Publish", "pUbLiSh"])
def test_command_names_are_case_insensitive(server, name):
    client = server.client()
    assert client.call(name, "s", "e", "x") == b"+OK\r\n"
    assert client.call("LAST-EVENT-NUMBER", "s") == b"*3\r\n+last-event-number\r\n+s\r\n:0\r\n"
    assert client.call("Stream-Names") == b"*2\r\n+stream-names\r\n+s\r\n"
    assert client.call("PiNg") == b"+PONG\r\n"


def test_many_pipelined_requests_in_one_send_are_answered_in_order(server):
    client = server.client()
    requests, expected = [], []
    for i in range(500):
        requests.append(command("publish", "s", "e", str(i)))
        expected.append(b"+OK\r\n")
        if i % 100 == 99:
            requests.append(command("last-event-number", "s"))
            expected.append(b"*3\r\n+last-event-number\r\n+s\r\n:%d\r\n" % i)
            requests.append(command("ping", str(i)))
            expected.append(b"$%d\r\n%d\r\n" % (len(str(i)), i))
            requests.append(command("nosuch"))
            expected.append(b"-ERR unknown command 'nosuch'\r\n")
    client.send(b"".join(requests))
    client.expect(b"".join(expected))
    client.send(command("subscribe", "s:0:500"))
    client.expect(subscribed(b"s") + b"".join(event_frame(b"s", i, b"e", str(i).encode())
                                              for i in range(500)))


def test_a_request_split_into_single_bytes_is_still_one_request(server):
    client = server.client()
    for byte in command("publish", "s", "e", b"a\r\nb"):
        client.send(bytes([byte]))
    client.expect(b"+OK\r\n")
    client.send(command("subscribe", "s:0:1"))
    client.expect(subscribed(b"s") + event_frame(b"s", 0, b"e", b"a\r\nb"))


def test_inline_ping_is_answered(server):
    client = server.client()
    client.send(b"PING\r\n")
    client.expect(b"+PONG\r\n")
    client.send(b"ping\n")
    client.expect(b"+PONG\r\n")


def test_inline_commands_take_quoted_arguments(server):
    client = server.client()
    client.send(b'publish s "my event" "a b\\r\\nc\\x00"\r\n')
    client.expect(b"+OK\r\n")
    client.send(b"publish s 'single quoted' 'x y'\r\n")
    client.expect(b"+OK\r\n")
    client.send(b"last-event-number s\r\n")
    client.expect(b"*3\r\n+last-event-number\r\n+s\r\n:1\r\n")
    client.send(command("subscribe", "s:0:2"))
    client.expect(subscribed(b"s") + event_frame(b"s", 0, b"my event", b"a b\r\nc\x00")
                  + event_frame(b"s", 1, b"single quoted", b"x y"))


def test_inline_json_is_stored_as_typed(server):
    # A quote inside a word is a plain byte (resp.split_inline says why).
    client = server.client()
    client.send(b'publish s created {"total":12,"tags":["a","b"]}\r\n')
    client.expect(b"+OK\r\n")
    client.send(command("subscribe", "s:0:1"))
    client.expect(subscribed(b"s") + event_frame(b"s", 0, b"created",
                                                   b'{"total":12,"tags":["a","b"]}'))


def test_inline_and_resp_requests_mix_in_one_send(server):
    client = server.client()
    client.send(b"PING\r\n" + command("ping", "x") + b"PING y\r\n" + command("ping"))
    client.expect(b"+PONG\r\n$1\r\nx\r\n$1\r\ny\r\n+PONG\r\n")


def test_a_subscribed_connection_can_still_publish_and_query(server):
    client = server.client()
    client.send(command("subscribe", "s"))
    client.expect(subscribed(b"s"))
    client.send(command("publish", "other", "e", "x"))
    client.expect(b"+OK\r\n")
    client.send(command("last-event-number", "other"))
    client.expect(b"*3\r\n+last-event-number\r\n+other\r\n:0\r\n")
    client.send(command("publish", "s", "mine", "y"))
    # The reply and the event share the connection; both come, each whole.
    got = {client.read_reply(), client.read_reply()}
    assert got == {b"+OK\r\n", event_frame(b"s", 0, b"mine", b"y")}


# -- HELLO (redis-py 8 and redis-cli -3 open every connection with it) ----------------------


def hello_fields(version: int) -> list[bytes]:
    return [b"$6\r\nserver\r\n$7\r\nmeilies\r\n", b"$7\r\nversion\r\n", b"$5\r\nproto\r\n:%d\r\n"
            % version, b"$2\r\nid\r\n:", b"$4\r\nmode\r\n$10\r\nstandalone\r\n",
            b"$4\r\nrole\r\n$6\r\nmaster\r\n", b"$7\r\nmodules\r\n*0\r\n"]


def read_hello(client) -> tuple[bytes, bytes]:
    """The header line and the body of a HELLO reply (RawClient knows no RESP3 map:
    a map of 7 pairs is read as an array of 14 values)."""
    first = client.read_exactly(1)
    header = first + client.read_exactly(3 if first == b"%" else 4)
    assert header in (b"*14\r\n", b"%7\r\n"), header
    client.buffer = b"*14\r\n" + client.buffer
    return header, client.read_reply()[5:]


@pytest.mark.parametrize("args, version, header", [
    ((), 2, b"*14\r\n"), (("2",), 2, b"*14\r\n"), (("3",), 3, b"%7\r\n"),
    (("3", "SETNAME", "me"), 3, b"%7\r\n"),
])
def test_hello_answers_the_handshake_for_protocol_2_and_3(server, args, version, header):
    client = server.client()
    client.send(command("hello", *args))
    got_header, body = read_hello(client)
    assert got_header == header
    for field in hello_fields(version):
        assert field in body, field
    assert client.call("publish", "s", "e", "x") == b"+OK\r\n"
    assert client.call("last-event-number", "nil") == \
        b"*3\r\n+last-event-number\r\n+nil\r\n$-1\r\n"


@pytest.mark.parametrize("args, reply", [
    (("4",), b"-NOPROTO unsupported protocol version\r\n"),
    (("1",), b"-NOPROTO unsupported protocol version\r\n"),
    (("x",), b"-ERR Protocol version is not an integer or out of range\r\n"),
    (("3", "bogus"), b"-ERR Syntax error in HELLO option 'bogus'\r\n"),
    (("3", "AUTH", "default"), b"-ERR Syntax error in HELLO option 'AUTH'\r\n"),
])
def test_hello_with_bad_arguments_is_an_error(server, args, reply):
    client = server.client()
    assert client.call("hello", *args) == reply
    assert client.call("ping") == b"+PONG\r\n"


def test_hello_authenticates_with_requirepass(start_server):
    server = start_server("--requirepass", "pw")
    client = server.client()
    assert client.call("hello", "3") == b"-NOAUTH Authentication required.\r\n"
    assert client.call("hello", "3", "AUTH", "default", "nope") == \
        b"-WRONGPASS invalid password\r\n"
    assert client.call("ping") == b"-NOAUTH Authentication required.\r\n"
    client.send(command("hello", "3", "AUTH", "default", "pw"))
    assert read_hello(client)[0] == b"%7\r\n"
    assert client.call("ping") == b"+PONG\r\n"


def test_a_bad_publish_inside_a_pipelined_run_gets_its_own_error(server):
    # Pipelined publishes to one stream are stored as one record; a refused one must
    # still be refused alone, the others stored with contiguous numbers, in order.
    client = server.client()
    names = [b"a", b"b", b"bad\x01name", b"d", b"e"]
    client.send(b"".join(command("publish", "run", name, b"data-" + name) for name in names))
    client.expect(b"+OK\r\n+OK\r\n")
    error = client.read_reply()
    assert error.startswith(b"-ERR invalid event-name"), error
    client.expect(b"+OK\r\n+OK\r\n")
    assert client.call("last-event-number", "run") == b"*3\r\n+last-event-number\r\n+run\r\n:3\r\n"
    client.send(command("subscribe", "run:0:4"))
    client.expect(subscribed(b"run"))
    for number, name in enumerate([b"a", b"b", b"d", b"e"]):
        client.expect(event_frame(b"run", number, name, b"data-" + name))
