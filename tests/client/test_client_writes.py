"""The write side of PROTOCOL.md v2 through ``meilies.client`` and ``meilies-cli``, on
the real server: events with ids and metadata, idempotent retries, duplicate ids, and
transactions (all or none, chained expected versions, results)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import client_proxy
import pytest
from client_proxy import Proxy
from client_support import TIMEOUT
from serverproc import wait_for
from test_client_cli import cli

from meilies.client import (AppendResult, Client, DuplicateEventId, DuplicateIdInRequest,
                            EventData, ResponseError, TimeoutError, WrongExpectedVersion)

REPO = Path(__file__).resolve().parents[2]


class ReplyLosingProxy(Proxy):
    """A proxy that, while ``lose_replies`` is set, forwards requests to the server but
    drops its replies: the write is stored and the client never hears of it, which is
    the case idempotent appends exist for."""

    lose_replies = False

    def _pump(self, pair, src: socket.socket, dst: socket.socket) -> None:
        from_server = src is pair.sockets[1]
        try:
            while data := src.recv(65536):
                if not (from_server and self.lose_replies):
                    dst.sendall(data)
        except OSError:
            pass  # one side closed: end this direction
        pair.close()


@pytest.fixture
def lossy(server):
    proxy = ReplyLosingProxy(server.port)
    yield proxy
    proxy.close()


def stored(client: Client, stream: str) -> list[tuple]:
    """``(number, name, data, id, metadata)`` of every event of ``stream``."""
    return [(e.number, e.name, e.data, e.id, e.metadata) for e in client.range(stream)]


def total_events(client: Client) -> int:
    last = client.last_position()
    return 0 if last is None else last + 1


# -- append with ids and metadata -----------------------------------------------------------


def test_ids_and_metadata_round_trip_through_range(client):
    client.publish("other", "e", b"")  # position 0, so positions differ from numbers
    result = client.append("s", [EventData("created", b"{}", id="id-0", metadata=b'{"v": 1}'),
                                 ("plain", b"p"),
                                 EventData("paid", b"\x00\xff", id="id-2")],
                           expected="none")
    assert (result.last_number, result.last_position) == (2, 3)
    assert stored(client, "s") == [(0, "created", b"{}", "id-0", b'{"v": 1}'),
                                   (1, "plain", b"p", None, None),
                                   (2, "paid", b"\x00\xff", "id-2", None)]
    assert [e.position for e in client.range("s")] == [1, 2, 3]


def test_ids_and_metadata_arguments_fill_pairs(client):
    result = client.append("s", [("a", b"1"), ("b", b"2")], ids=["x", None],
                           metadata=b"shared")
    assert (result, result.last_position) == (1, 1)
    assert stored(client, "s") == [(0, "a", b"1", "x", b"shared"),
                                   (1, "b", b"2", None, b"shared")]
    client.append("s", [("c", b"3"), ("d", b"4")], metadata=["m", b""])  # b"": none
    assert stored(client, "s")[2:] == [(2, "c", b"3", None, b"m"), (3, "d", b"4", None, None)]


def test_plain_append_still_returns_the_number_as_an_int(client):
    result = client.append("s", [("a", b""), ("b", b"")])
    assert result == 1 and isinstance(result, int) and isinstance(result, AppendResult)
    assert result.last_position is None  # the plain command's reply has no position
    assert client.append("s", [("c", b"")], expected=result) == 2
    assert str(result) == "1"


def test_append_full_gives_the_position_without_ids(client):
    client.publish("other", "e", b"")
    result = client.append_full("s", [("a", b""), ("b", b"")], expected="none")
    assert (result.last_number, result.last_position) == (1, 2)
    assert stored(client, "s") == [(0, "a", b"", None, None), (1, "b", b"", None, None)]


def test_a_retry_with_the_same_ids_returns_the_first_result_and_stores_nothing(client):
    events = [EventData("a", b"1", id="r-1", metadata=b"m"), EventData("b", b"2", id="r-2")]
    first = client.append("s", events, expected="none")
    client.publish("s", "later", b"")  # the stream moved on: expected "none" is stale
    client.publish("elsewhere", "e", b"")
    again = client.append("s", events, expected="none")
    assert (again.last_number, again.last_position) == (first.last_number,
                                                        first.last_position) == (1, 1)
    assert [e.name for e in client.range("s")] == ["a", "b", "later"]
    assert total_events(client) == 4


def test_duplicate_event_id_names_where_the_id_is_stored(client):
    client.append("orders-1", [("a", b""), EventData("b", b"", id="order 17/paid")])
    with pytest.raises(DuplicateEventId) as info:
        client.append("orders-2", [EventData("c", b"", id="fresh"),
                                   EventData("d", b"", id="order 17/paid")])
    assert (info.value.event_id, info.value.stream, info.value.number) == (
        "order 17/paid", "orders-1", 1)
    assert client.range("orders-2") == []  # not even the event with a fresh id
    assert total_events(client) == 2


def test_an_id_reused_with_other_data_is_a_duplicate_not_a_retry(client):
    client.append("s", [EventData("a", b"1", id="k")])
    with pytest.raises(DuplicateEventId) as info:
        client.append("s", [EventData("a", b"changed", id="k")])
    assert (info.value.stream, info.value.number) == ("s", 0)
    assert stored(client, "s") == [(0, "a", b"1", "k", None)]


def test_the_idempotency_check_comes_before_the_expected_version(client):
    client.append("s", [("a", b"")])
    client.append("t", [EventData("b", b"", id="taken")])
    with pytest.raises(DuplicateEventId):
        client.append("s", [EventData("c", b"", id="taken")], expected=7)


def test_one_id_twice_in_a_request_is_refused(client):
    with pytest.raises(DuplicateIdInRequest) as info:
        client.append("s", [("a", b""), ("b", b"")], ids=["twice", "twice"])
    assert info.value.event_id == "twice"
    assert not isinstance(info.value, DuplicateEventId)
    assert client.range("s") == []


def test_wrong_expected_version_with_ids(client):
    client.append("s", [("a", b"")])
    with pytest.raises(WrongExpectedVersion) as info:
        client.append("s", [EventData("b", b"", id="new")], expected="none")
    assert (info.value.stream, info.value.actual, info.value.expected) == ("s", 0, "none")
    client.append("s", [EventData("b", b"", id="new")], expected=0)  # the id is still free


@pytest.mark.parametrize("events, kwargs", [
    ([("a", b"")], {"ids": ["x", "y"]}),                        # two ids for one event
    ([("a", b"")], {"ids": "x"}),                               # one str is not a list
    ([("a", b""), ("b", b"")], {"metadata": [b"m"]}),           # one list item for two
    ([EventData("a", b"", id="x")], {"ids": ["y"]}),            # two ids for one event
    ([EventData("a", b"", id="")], {}),                         # empty id means none
    ([], {"ids": []}),
])
def test_bad_ids_or_metadata_are_refused_before_sending(events, kwargs):
    client = Client(port=1)  # nothing listens: any network use would fail differently
    with pytest.raises(ValueError):
        client.append("s", events, **kwargs)


def test_a_lost_reply_is_not_retried_and_the_callers_retry_is_safe(client, lossy):
    client.publish("s", "before", b"")
    events = [EventData("a", b"1", id="lost-1"), EventData("b", b"2", id="lost-2")]
    with Client(port=lossy.port, timeout=0.5) as remote:
        remote.ping()
        lossy.lose_replies = True
        with pytest.raises(TimeoutError):
            remote.append("s", events, expected=0)
        wait_for(lambda: client.last_event_number("s") == 2, TIMEOUT, what="the append")
        assert lossy.accepted == 1  # no second attempt on a new connection
        lossy.lose_replies = False
        retried = remote.append("s", events, expected=0)  # expected is stale now: ignored
    assert (retried.last_number, retried.last_position) == (2, 2)
    assert [e.name for e in client.range("s")] == ["before", "a", "b"]


# -- transactions -----------------------------------------------------------------------------


def test_a_transaction_stores_every_write_and_returns_each_result(client):
    client.publish("before", "e", b"")
    with client.transaction() as tx:
        first = tx.publish("audit", "opened", b"o")
        second = tx.append("s", [("a", b"1"), ("b", b"2")], expected="none")
        third = tx.append("s", [EventData("c", b"3", id="tx-c", metadata=b"m")], expected=1)
        assert total_events(client) == 1  # nothing sent while the block runs
    assert (first, second, third) == (0, 1, 2)
    assert tx.results[0] is None
    assert (tx.results[1], tx.results[1].last_position) == (1, None)
    assert (tx.results[2].last_number, tx.results[2].last_position) == (2, 4)
    assert stored(client, "s") == [(0, "a", b"1", None, None), (1, "b", b"2", None, None),
                                   (2, "c", b"3", "tx-c", b"m")]
    assert [e.position for e in client.range("$all")] == [0, 1, 2, 3, 4]  # queue order
    assert [e.stream for e in client.range("$all")] == ["before", "audit", "s", "s", "s"]


def test_wrong_expected_version_from_exec_stores_nothing(client):
    client.append("s", [("a", b"")])
    with pytest.raises(WrongExpectedVersion) as info:
        with client.transaction() as tx:
            tx.publish("audit", "e", b"")
            tx.append("t", [("x", b"")], expected="none")
            tx.append("s", [("b", b"")], expected="none")  # s is at 0
    assert (info.value.stream, info.value.actual, info.value.expected) == ("s", 0, "none")
    assert total_events(client) == 1
    with pytest.raises(RuntimeError):
        tx.results  # noqa: B018 (a failed transaction has no results)
    client.publish("s", "after", b"")  # the connection left the transaction
    assert client.last_event_number("s") == 1


def test_appends_to_one_stream_chain_their_expected_versions(client):
    with client.transaction() as tx:
        tx.append("s", [("a", b"")], expected="none")
        tx.append("s", [("b", b"")], expected=0)
    assert tx.results == [0, 1]
    with pytest.raises(WrongExpectedVersion) as info:
        with client.transaction() as tx:
            tx.append("s", [("c", b"")], expected=1)
            tx.append("s", [("d", b"")], expected=1)  # c made it 2
    assert (info.value.actual, info.value.expected) == (2, 1)
    assert client.last_event_number("s") == 1


def test_duplicate_event_id_from_exec_stores_nothing(client):
    client.append("s", [EventData("a", b"", id="taken")])
    with pytest.raises(DuplicateEventId) as info:
        with client.transaction() as tx:
            tx.append("t", [EventData("b", b"", id="free")])
            tx.append("u", [EventData("c", b"", id="taken")])
    assert (info.value.event_id, info.value.stream, info.value.number) == ("taken", "s", 0)
    assert total_events(client) == 1
    client.append("t", [EventData("b", b"", id="free")])  # "free" was not stored


def test_one_id_in_two_writes_of_a_transaction_is_refused(client):
    with pytest.raises(DuplicateIdInRequest) as info:
        with client.transaction() as tx:
            tx.append("s", [EventData("a", b"", id="dup")])
            tx.append("t", [EventData("b", b"", id="dup")])
    assert info.value.event_id == "dup"
    assert total_events(client) == 0


def test_a_refused_queued_write_aborts_the_transaction_with_its_own_error(client):
    with pytest.raises(ResponseError) as info:
        with client.transaction() as tx:
            tx.publish("good", "e", b"")
            tx.publish("bad name", "e", b"")  # a space: refused when queued
    assert info.value.code == "ERR" and info.value.index == 1
    assert info.value.__cause__.code == "EXECABORT"
    assert total_events(client) == 0
    assert client.ping() == b"PONG"  # not stuck in MULTI: PING is not queued


def test_an_exception_in_the_block_sends_nothing(client):
    client.ping()
    with pytest.raises(KeyError):
        with client.transaction() as tx:
            tx.publish("s", "e", b"")
            raise KeyError("the caller changed its mind")
    with pytest.raises(RuntimeError):
        tx.publish("s", "e", b"")  # a transaction is used once
    client.publish("t", "e", b"")  # answered +OK, not +QUEUED: no MULTI was sent
    assert client.range("s") == [] and client.last_event_number("t") == 0


def test_retrying_a_transaction_of_appends_with_ids_returns_the_first_results(client):
    def run() -> list:
        with client.transaction() as tx:
            tx.append("s", [EventData("a", b"1", id="t-1")], expected="none")
            tx.append("t", [EventData("b", b"2", id="t-2"), EventData("c", b"3", id="t-3")])
        return [(r.last_number, r.last_position) for r in tx.results]

    first = run()
    assert first == [(0, 0), (1, 2)]
    assert run() == first  # as if the first reply had been lost
    assert total_events(client) == 3


def test_a_transaction_whose_reply_was_lost_is_retried_by_the_caller(client, lossy):
    def run(remote: Client) -> list:
        with remote.transaction() as tx:
            tx.append("s", [EventData("a", b"", id="tl-1")], expected="none")
            tx.append("t", [EventData("b", b"", id="tl-2")], expected="none")
        return [(r.last_number, r.last_position) for r in tx.results]

    with Client(port=lossy.port, timeout=0.5) as remote:
        with remote.transaction() as warm_up:  # MULTI answered: later ones are pipelined
            warm_up.publish("other", "e", b"")
        lossy.lose_replies = True
        with pytest.raises(TimeoutError):
            run(remote)
        wait_for(lambda: client.last_position() == 2, TIMEOUT, what="the transaction")
        lossy.lose_replies = False
        assert run(remote) == [(0, 1), (0, 2)]
    assert lossy.accepted == 2  # the failed attempt's connection, then the caller's retry
    assert total_events(client) == 3


def test_a_server_without_transactions_stores_none_of_the_writes(server, client,
                                                                monkeypatch):
    # The proxy's "older server" renames a request's command; here MULTI, not envelope.
    monkeypatch.setattr(client_proxy, "ENVELOPE", b"$5\r\nMULTI\r\n")
    monkeypatch.setattr(client_proxy, "UNKNOWN", b"$5\r\nMULTX\r\n")
    proxy = Proxy(server.port, older_server=True)
    try:
        with Client(port=proxy.port, timeout=TIMEOUT) as older:
            with pytest.raises(ResponseError, match="unknown command"):
                with older.transaction() as tx:
                    tx.publish("s", "e", b"")
                    tx.append("t", [("a", b"")])
            assert older.ping() == b"PONG"
    finally:
        proxy.close()
    assert total_events(client) == 0  # MULTI went alone; the writes never left


def test_an_empty_transaction_returns_no_results(client):
    with client.transaction() as tx:
        pass
    assert tx.results == []


def test_a_large_transaction_is_sent_in_batches(client):
    with client.transaction() as tx:
        for i in range(2500):
            tx.append(f"s{i % 3}", [EventData("e", b"x" * 100, id=f"big-{i}")])
    assert len(tx.results) == 2500
    assert tx.results[-1].last_position == 2499
    assert [client.last_event_number(f"s{k}") for k in range(3)] == [833, 832, 832]


# -- meilies-cli append --id / --metadata -----------------------------------------------------


def cli_process(port: int, *args: str) -> subprocess.CompletedProcess:
    """``meilies-cli`` as a real process (``python -m``, so the code under test runs)."""
    return subprocess.run([sys.executable, "-m", "meilies.cli.client", "-p", str(port), *args],
                          capture_output=True, timeout=TIMEOUT, cwd=REPO)


def test_cli_append_with_ids_and_metadata_prints_number_and_position(server, client):
    client.publish("other", "e", b"")
    args = ("append", "s", "none", "a", "1", "b", "2", "--id", "c-1", "--id", "c-2",
            "--metadata", '{"by": "ops"}', "--metadata", "")
    result = cli_process(server.port, *args)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"1 2\n", b"")
    assert stored(client, "s") == [(0, "a", b"1", "c-1", b'{"by": "ops"}'),
                                   (1, "b", b"2", "c-2", None)]
    again = cli_process(server.port, *args)  # a rerun after a lost reply
    assert (again.returncode, again.stdout) == (0, b"1 2\n")
    assert total_events(client) == 3


def test_cli_append_metadata_once_applies_to_every_event(server, client):
    result = cli_process(server.port, "append", "s", "any", "a", "1", "b", "2",
                         "--metadata", "m")
    assert (result.returncode, result.stdout) == (0, b"1 1\n")
    assert [e.metadata for e in client.range("s")] == [b"m", b"m"]


def test_cli_append_duplicate_id_exits_4_with_where_it_is_stored(server, client):
    client.append("s", [EventData("a", b"", id="used")])
    result = cli_process(server.port, "append", "t", "any", "b", "x", "--id", "used")
    assert result.returncode == 4
    assert result.stdout == b""
    assert result.stderr == (b"meilies-cli: DUPLICATEID event id used is already stored"
                             b" as s:0\n")


def test_cli_append_without_ids_keeps_its_output(server):
    result = cli_process(server.port, "append", "s", "none", "a", "1", "b", "2")
    assert (result.returncode, result.stdout) == (0, b"1\n")


@pytest.mark.parametrize("options", [("--id", "x"),                            # 1 id, 2 events
                                     ("--id", "x", "--id", "x"),               # the same id
                                     ("--id", "", "--id", "y"),                # an empty id
                                     ("--metadata", "m", "--metadata", "n",
                                      "--metadata", "o")])                     # 3 for 2
def test_cli_append_bad_ids_or_metadata_exit_2(server, options):
    result = cli(server.port, "append", "s", "any", "a", "1", "b", "2", *options)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
