"""Every request/reply call of ``meilies.client.Client`` against the real server."""

from __future__ import annotations

import socket
import threading

import pytest
from client_support import TIMEOUT
from serverproc import wait_for

from meilies.client import (ERROR_CLASSES, AuthenticationRequired, Client, ConnectionError,
                            InvalidPassword, ResponseError, ServerShuttingDown, TimeoutError,
                            WrongExpectedVersion, error_from_reply)


def read_back(client: Client, stream: str, count: int) -> list:
    """The first ``count`` events of ``stream``, through a bounded subscription."""
    return list(client.subscribe(f"{stream}:0:{count}"))


def test_ping_answers_pong_or_echoes(client):
    assert client.ping() == b"PONG"
    assert client.ping("héllo") == "héllo".encode()


def test_publish_accepts_str_and_bytes_and_data_comes_back_as_bytes(client):
    client.publish("s", "created", "données")
    client.publish(b"s", b"raw", b"a\r\nb\x00\xff")
    client.publish("s", "view", memoryview(b"mv"))
    client.publish("s", "array", bytearray(b"ba"))
    client.publish("s", "empty", b"")
    events = read_back(client, "s", 5)
    assert [(e.stream, e.number, e.name, e.data) for e in events] == [
        ("s", 0, "created", "données".encode()),
        ("s", 1, "raw", b"a\r\nb\x00\xff"),
        ("s", 2, "view", b"mv"),
        ("s", 3, "array", b"ba"),
        ("s", 4, "empty", b""),
    ]
    assert all(type(e.data) is bytes for e in events)


def test_publish_a_large_event_round_trips(client):
    data = bytes(range(256)) * 4096  # 1 MiB, sent as its own buffer
    client.publish("big", "blob", data)
    [event] = read_back(client, "big", 1)
    assert event.data == data


def test_append_returns_the_last_number_for_each_form_of_expected(client):
    assert client.append("a", [("e0", "0")], expected="none") == 0
    assert client.append("a", [("e1", b"1"), ("e2", b"2")], expected=0) == 2
    assert client.append("a", iter([("e3", "3")])) == 3  # "any" by default
    assert [e.name for e in read_back(client, "a", 4)] == ["e0", "e1", "e2", "e3"]


@pytest.mark.parametrize("expected, actual", [(5, 1), ("none", 1)])
def test_append_on_mismatch_raises_wrong_expected_version_with_actual(client, expected, actual):
    client.append("a", [("x", ""), ("y", "")])
    with pytest.raises(WrongExpectedVersion) as info:
        client.append("a", [("z", "")], expected=expected)
    assert (info.value.stream, info.value.actual, info.value.expected) == ("a", actual, expected)
    assert client.last_event_number("a") == 1  # nothing stored


def test_wrong_expected_version_on_an_empty_stream_says_none(client):
    with pytest.raises(WrongExpectedVersion) as info:
        client.append("empty", [("z", "")], expected=0)
    assert info.value.actual is None
    assert info.value.expected == 0


@pytest.mark.parametrize("events, expected", [([], "any"), ([("e", "")], -1),
                                              ([("e", "")], "all"), ([("e", "")], True)])
def test_append_refuses_bad_arguments_before_sending(events, expected):
    client = Client(port=1)  # nothing listens: any network use would fail differently
    with pytest.raises(ValueError):
        client.append("s", events, expected=expected)


def test_last_event_number_is_none_for_an_empty_stream(client):
    assert client.last_event_number("nothing") is None
    client.publish("s", "e", "")
    client.publish("s", "e", "")
    assert client.last_event_number("s") == 1


def test_stream_names_are_in_byte_order(client):
    assert client.stream_names() == []
    for name in ["b", "a", "Z", "é"]:
        client.publish(name, "e", "")
    assert client.stream_names() == ["Z", "a", "b", "é"]


def test_publish_many_pipelines_in_order_across_batches(client):
    count = client.publish_many("m", ((f"e{i}", str(i)) for i in range(2500)))
    assert count == 2500
    assert client.last_event_number("m") == 2499
    events = read_back(client, "m", 2500)
    assert [(e.number, e.name, e.data) for e in events] == [
        (i, f"e{i}", str(i).encode()) for i in range(2500)]


def test_publish_many_sends_megabytes_on_a_reused_connection(client):
    client.ping()  # the next call checks this idle connection first, then sends
    data = bytes(range(256)) * 800
    assert client.publish_many("big", [("e", data)] * 40) == 40
    assert [e.data for e in read_back(client, "big", 40)] == [data] * 40


def test_publish_many_stores_the_rest_and_raises_the_first_refusal(client):
    events = [("ok", "0"), ("bad\nname", "1"), ("ok", "2"), ("bad\x00", "3")]
    with pytest.raises(ResponseError) as info:
        client.publish_many("m", events)
    assert info.value.index == 1
    assert [e.data for e in read_back(client, "m", 2)] == [b"0", b"2"]
    assert client.ping() == b"PONG"  # the connection is still in step


def test_publish_many_sends_every_request_before_reading_a_reply():
    """A fake server that answers only once it has all N requests: a client that
    waited for each reply before sending the next would time out here."""
    listener = socket.create_server(("127.0.0.1", 0))
    n = 50

    def serve() -> None:
        conn, _ = listener.accept()
        received = b""
        while received.count(b"*4\r\n") < n:
            received += conn.recv(65536)
        conn.sendall(b"+OK\r\n" * n)
        conn.recv(1)  # until the client closes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with Client(port=listener.getsockname()[1], timeout=5) as client:
        assert client.publish_many("s", [("e", str(i)) for i in range(n)]) == n
    thread.join(TIMEOUT)
    listener.close()


def test_error_replies_map_to_named_exceptions(client):
    with pytest.raises(ResponseError) as info:
        client.execute_command("nosuchcommand")
    assert info.value.code == "ERR"
    assert type(info.value) is ResponseError
    with pytest.raises(ResponseError, match="invalid stream"):
        client.publish("has space", "e", "d")
    assert client.ping() == b"PONG"


def test_the_error_table_maps_each_prefix():
    assert ERROR_CLASSES == {"ERR": ResponseError, "WRONGEXPECTED": WrongExpectedVersion,
                             "NOAUTH": AuthenticationRequired, "WRONGPASS": InvalidPassword}
    assert type(error_from_reply("NOAUTH Authentication required.")) is AuthenticationRequired
    assert type(error_from_reply("WRONGPASS invalid password")) is InvalidPassword
    assert type(error_from_reply("ERR server is shutting down")) is ServerShuttingDown
    assert type(error_from_reply("SOMETHING new")) is ResponseError
    odd = error_from_reply("WRONGEXPECTED worded differently")
    assert type(odd) is WrongExpectedVersion and odd.actual is None


def test_password_is_sent_and_errors_are_named(start_server):
    server = start_server("--requirepass", "sesame")
    with Client(port=server.port, timeout=TIMEOUT) as anonymous:
        with pytest.raises(AuthenticationRequired):
            anonymous.publish("s", "e", "d")
    with pytest.raises(InvalidPassword):
        Client(port=server.port, password="wrong", timeout=TIMEOUT).ping()
    with Client(port=server.port, password="sesame", timeout=TIMEOUT) as client:
        client.publish("s", "e", "d")
        assert client.last_event_number("s") == 0
        sub = client.subscribe("s:0")  # the subscription's connection authenticates too
        assert next(sub).data == b"d"
        sub.close()


def test_connection_refused_is_a_connection_error():
    with pytest.raises(ConnectionError, match="cannot connect to 127.0.0.1:1") as info:
        Client(port=1, timeout=TIMEOUT).ping()
    assert isinstance(info.value, OSError)  # also the builtin ConnectionError


def test_a_silent_server_raises_timeout_error():
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), never answers
    with pytest.raises(TimeoutError):
        Client(port=listener.getsockname()[1], timeout=0.2).ping()
    listener.close()


def test_the_client_reconnects_after_a_server_restart(server, client, start_server):
    client.publish("s", "e", "0")
    server.kill()
    with pytest.raises(ConnectionError):
        client.publish("s", "e", "lost")  # nothing listens
    start_server(data_dir=server.data_dir, port=server.port)
    client.publish("s", "e", "1")
    assert client.last_event_number("s") == 1


def test_an_idle_connection_closed_by_the_server_is_replaced_before_a_write(
        server, client, start_server):
    client.publish("s", "e", "0")
    server.kill()
    start_server(data_dir=server.data_dir, port=server.port)
    client.publish("s", "e", "1")  # the stale socket is noticed before sending
    assert client.last_event_number("s") == 1


def test_one_client_is_shared_safely_by_threads(client):
    def work(t: int) -> None:
        for i in range(50):
            client.publish(f"t{t}", "e", str(i))
            assert client.last_event_number(f"t{t}") == i

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert [client.last_event_number(f"t{t}") for t in range(8)] == [49] * 8
    for t in range(8):
        assert [e.data for e in read_back(client, f"t{t}", 50)] == [
            str(i).encode() for i in range(50)]


def test_close_then_use_opens_a_new_connection(server, client):
    client.ping()
    client.close()
    assert client.ping() == b"PONG"
    wait_for(lambda: b"connected_clients:1" in client.execute_command("info"),
             what="one connection left")
