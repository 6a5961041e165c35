"""``resp.RequestParser`` fed directly: what it returns, what it refuses, and why.

The parser trusts hiredis for arrays of bulk strings and checks the rest cheaply (the
canonical size of what hiredis completed against the bytes fed, and ``has_data()`` right
after a request for a clean boundary); the slow byte scan runs only when that check
fails or a read ends inside a request. These tests pin the answers where the shortcut
could go wrong: elements that are not bulk strings (hiredis parses them all), reads
ending inside a request, inline lines after RESP, and a clean boundary after many
requests. They need no server.
"""

from __future__ import annotations

import random

import hiredis
import pytest

from meilies.server import resp

MAX_BULK = 1024 * 1024 + 64 * 1024


def command(*args: bytes) -> bytes:
    """The canonical RESP encoding of a request: an array of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


PING = [b"ping"]
PUBLISH = [b"publish", b"s", b"ev", bytes(range(100))]


def feed(parser: resp.RequestParser, *reads: bytes) -> list[list[bytes]]:
    """Every request the reads yield, in order."""
    requests: list[list[bytes]] = []
    for data in reads:
        requests += parser.feed(data)
    return requests


def refusal(*reads: bytes) -> tuple[str, list[list[bytes]]]:
    """Feed a fresh parser until it refuses: the reason, and every request it gave."""
    parser = resp.RequestParser(max_bulk=MAX_BULK)
    requests: list[list[bytes]] = []
    for data in reads:
        try:
            requests += parser.feed(data)
        except resp.ProtocolError as exc:
            return exc.reason, requests + exc.requests
    raise AssertionError(f"accepted: {requests!r}")


def varied_requests(rng: random.Random, count: int) -> list[list[bytes]]:
    """Requests whose element counts and lengths cross every digit-count boundary."""
    lengths = [0, 1, 9, 10, 11, 99, 100, 101, 999, 1000, 4095, 4096, 9999, 10000]
    return [[bytes([65 + i % 26]) * rng.choice(lengths)
             for i in range(rng.choice([1, 2, 4, 9, 10, 11]))] for _ in range(count)]


# -- well-formed input ----------------------------------------------------------------------


def test_many_pipelined_requests_in_one_read_come_back_whole_and_in_order():
    requests = varied_requests(random.Random(1), 1000)
    parser = resp.RequestParser(max_bulk=MAX_BULK)
    assert parser.feed(b"".join(command(*r) for r in requests)) == requests
    assert not parser._partial  # a clean boundary holds no bytes
    # ... and what starts there is read afresh: a line that is not RESP is inline.
    assert parser.feed(b"PING\r\n") == [[b"PING"]]
    assert parser.feed(command(*PUBLISH) * 256) == [PUBLISH] * 256
    assert not parser._partial


SHAPES = [(count, length) for count in [1, 9, 10, 11, 99, 100, 1000, 1023, 1024, 1025, 9999,
                                       10000, 10001]
          for length in [0, 1, 9, 10, 99, 100, 999, 1000, 4095, 4096, 9999, 10000, 10001,
                         100_000, 1_000_000] if count * length <= 4_000_000]


@pytest.mark.parametrize("count, length", SHAPES)
def test_canonical_requests_need_no_byte_scan(monkeypatch, count, length):
    # The size check accounts for every digit of every length exactly: were it off by
    # one anywhere, a well-formed read would be walked byte by byte (and a request that
    # is not well formed could be taken for one).
    def no_scan(*args):
        raise AssertionError("well-formed requests were scanned")

    monkeypatch.setattr(resp.RequestParser, "_scan", no_scan)
    request = [b"x" * length] * count
    parser = resp.RequestParser(max_bulk=MAX_BULK)
    assert parser.feed(command(*request)) == [request]
    assert parser.feed(command(*PING) + command(*request) * 3) == [PING] + [request] * 3
    assert not parser._partial


def test_requests_mixing_short_and_long_elements_need_no_byte_scan(monkeypatch):
    def no_scan(*args):
        raise AssertionError("well-formed requests were scanned")

    monkeypatch.setattr(resp.RequestParser, "_scan", no_scan)
    lengths = [0, 1, 9, 10, 99, 100, 999, 1000, 9999, 10000, 10001, 100_000]
    mixed = [b"y" * n for n in lengths + lengths[::-1]]
    # An append-sized request: more elements than one header table entry covers.
    append = [b"append", b"s", b"any"] + [b"e", b"z" * 50] * 600 + mixed
    parser = resp.RequestParser(max_bulk=MAX_BULK)
    assert parser.feed(command(*mixed) + command(*append) + command(*PING)) == \
        [mixed, append, PING]
    assert not parser._partial


def test_a_read_ending_inside_a_request_gets_the_rest_later():
    requests = varied_requests(random.Random(2), 40)
    data = b"".join(command(*r) for r in requests)
    step = max(1, len(data) // 2000)  # a couple of thousand cut points, all kinds of places
    for cut in range(0, len(data) + 1, step):
        parser = resp.RequestParser(max_bulk=MAX_BULK)
        assert feed(parser, data[:cut], data[cut:]) == requests, cut
        assert not parser._partial
        assert parser.feed(b"PING\r\n") == [[b"PING"]]


def test_a_pipeline_in_random_pieces_is_parsed_whole():
    rng = random.Random(3)
    requests = varied_requests(rng, 300)
    data = b"".join(command(*r) for r in requests)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(data)), 30))
        reads = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        parser = resp.RequestParser(max_bulk=MAX_BULK)
        assert feed(parser, *reads) == requests
        assert not parser._partial


def test_a_request_arriving_byte_by_byte_is_one_request():
    data = command(*PUBLISH) + command(*PING)
    parser = resp.RequestParser(max_bulk=MAX_BULK)
    assert feed(parser, *(data[i:i + 1] for i in range(len(data)))) == [PUBLISH, PING]
    assert not parser._partial


def test_requests_followed_by_an_inline_line_in_the_same_read():
    parser = resp.RequestParser(max_bulk=MAX_BULK)
    assert parser.feed(command(*PUBLISH) * 3 + b"PING\r\n") == [PUBLISH] * 3 + [[b"PING"]]
    assert parser.feed(command(*PING) + b"+PING\r\n" + command(*PING)) == \
        [PING, [b"+PING"], PING]
    # The inline line split across reads, RESP after it.
    assert parser.feed(command(*PING) + b"ECHO 'a b'") == [PING]
    assert parser.feed(b" c\r\n" + command(*PUBLISH)) == [[b"ECHO", b"a b", b"c"], PUBLISH]
    assert not parser._partial


def test_a_push_type_after_a_request_is_taken_as_inline_lines():
    # hiredis returns '>' (RESP3 push) as a list subclass: not a request.
    parser = resp.RequestParser(max_bulk=MAX_BULK)
    assert parser.feed(command(*PING) + b">1\r\n$4\r\nPING\r\n") == \
        [PING, [b">1"], [b"$4"], [b"PING"]]


# -- elements that are not bulk strings ----------------------------------------------------

# Each parses in hiredis as an element of an array; a request may hold only bulk strings.
NOT_BULK = [
    pytest.param(b"+PING\r\n", "expected '$', got '+'", id="simple-string"),
    pytest.param(b"+0123456789\r\n", "expected '$', got '+'", id="long-simple-string"),
    pytest.param(b":12\r\n", "expected '$', got ':'", id="integer"),
    pytest.param(b"$-1\r\n", "invalid bulk length", id="nil-bulk"),
    pytest.param(b"*-1\r\n", "expected '$', got '*'", id="nil-array"),
    pytest.param(b"*0\r\n", "expected '$', got '*'", id="empty-array"),
    pytest.param(b"*1\r\n$1\r\nx\r\n", "expected '$', got '*'", id="nested-array"),
    pytest.param(b"-ERR x\r\n", "expected '$', got '-'", id="error"),
    pytest.param(b"_\r\n", "expected '$', got '_'", id="resp3-null"),
    pytest.param(b",1.5\r\n", "expected '$', got ','", id="resp3-double"),
    pytest.param(b"#t\r\n", "expected '$', got '#'", id="resp3-boolean"),
    pytest.param(b"(123\r\n", "expected '$', got '('", id="resp3-big-number"),
    pytest.param(b"=8\r\ntxt:PING\r\n", "expected '$', got '='", id="resp3-verbatim"),
    pytest.param(b"%1\r\n$1\r\na\r\n$1\r\nb\r\n", "expected '$', got '%'", id="resp3-map"),
    pytest.param(b"~1\r\n$1\r\nx\r\n", "expected '$', got '~'", id="resp3-set"),
    pytest.param(b">1\r\n$1\r\nx\r\n", "expected '$', got '>'", id="resp3-push"),
]


@pytest.mark.parametrize("element, reason", NOT_BULK)
@pytest.mark.parametrize("where", ["first", "last", "alone"])
def test_an_element_that_is_not_a_bulk_string_is_refused(element, reason, where):
    bad = {"first": b"*2\r\n" + element + b"$4\r\nping\r\n",
           "last": b"*2\r\n$4\r\nping\r\n" + element,
           "alone": b"*1\r\n" + element}[where]
    # Alone in a read; after good requests (these run); with good ones after it.
    assert refusal(bad) == (reason, [])
    assert refusal(command(*PUBLISH) * 5 + bad) == (reason, [PUBLISH] * 5)
    good = command(*PING) + command(*PUBLISH)
    data = good + bad + good
    assert refusal(data) == (reason, [PING, PUBLISH])
    # Wherever the reads are cut, the same refusal after the same requests.
    for cut in range(1, len(data)):
        assert refusal(data[:cut], data[cut:]) == (reason, [PING, PUBLISH]), cut


def test_a_short_element_then_a_read_ending_inside_a_request_is_refused():
    # The simple string makes its request 4 bytes shorter than its canonical encoding,
    # and the read ends after 4 bytes of the next request: the sizes agree, but hiredis
    # holds part of a request, so this is no clean boundary and the scan must run.
    bad = b"*1\r\n+0123456789\r\n"
    assert refusal(bad + b"*2\r\n") == ("expected '$', got '+'", [])
    assert refusal(command(*PING) + bad + b"*2\r\n") == ("expected '$', got '+'", [PING])
    assert refusal(command(*PING) + bad + b"*2\r\n", command(*PING)[4:]) == \
        ("expected '$', got '+'", [PING])


def test_a_request_completed_by_a_later_read_with_a_bad_element_is_refused():
    head = command(*PING) + b"*3\r\n$7\r\npublish\r\n$1\r\ns\r\n"
    parser = resp.RequestParser(max_bulk=MAX_BULK)
    assert parser.feed(head) == [PING]
    with pytest.raises(resp.ProtocolError) as caught:
        parser.feed(b"+e\r\n$1\r\nx\r\n" + command(*PING))
    assert caught.value.reason == "expected '$', got '+'"
    assert caught.value.requests == []


@pytest.mark.parametrize("request_", [b"*0\r\n", b"*-1\r\n"])
def test_an_empty_or_nil_array_as_a_request_is_refused(request_):
    assert refusal(command(*PING) + request_ + command(*PING)) == \
        ("invalid multibulk length", [PING])


def test_a_resp_line_cut_short_by_an_inline_line_is_refused():
    assert refusal(command(*PING) + b"*2\r\n$1\r\na\r\nPING\r\n") == \
        ("expected '$', got 'P'", [PING])


def test_what_hiredis_refuses_is_refused_with_its_reason_after_the_good_requests():
    bad = b"*1\r\n$01\r\nx\r\n"  # leading zero: our scan would pass it, hiredis does not
    reader = hiredis.Reader()
    reader.feed(bad)
    with pytest.raises(hiredis.ProtocolError) as caught:
        reader.gets()
    assert refusal(command(*PING) * 2 + bad + command(*PING)) == \
        (str(caught.value), [PING, PING])


# -- what hiredis may be made to allocate (issue 10) ----------------------------------------
#
# hiredis reserves a list of the announced size the moment it reads an aggregate header,
# at any depth. ``*2000000000\r\n`` made it reserve 16 GB, and releasing that held the
# event loop for seconds. These tests watch the process' address space: a header that
# reached hiredis shows as gigabytes in VmSize.


def vm_size_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1])
    raise AssertionError("no VmSize in /proc/self/status")


HUGE_HEADERS = [
    pytest.param(b"*2000000000\r\n", "invalid multibulk length", id="array"),
    pytest.param(b"*1\r\n*2000000000\r\n", "expected '$', got '*'", id="nested-array"),
    pytest.param(b"*2\r\n$4\r\nping\r\n~2000000000\r\n", "expected '$', got '~'", id="set"),
    pytest.param(b"*1\r\n>2000000000\r\n", "expected '$', got '>'", id="push"),
    pytest.param(b"*1\r\n%1000000000\r\n", "expected '$', got '%'", id="map"),
    pytest.param(b"*1\r\n|1000000000\r\n", "expected '$', got '|'", id="attribute"),
    pytest.param(b"*3\r\n" + b"*1\r\n" * 50 + b"*1048576\r\n", "expected '$', got '*'",
                 id="deep-then-large"),
]


@pytest.mark.parametrize("attack, reason", HUGE_HEADERS)
def test_a_huge_aggregate_header_is_refused_before_hiredis_reserves_it(attack, reason):
    before = vm_size_kib()
    good = command(*PUBLISH)
    # Whole, after a good request, and cut at every byte (the header split between reads).
    cuts = [None] + list(range(1, len(attack)))
    for cut in cuts:
        reads = [good + attack] if cut is None else [good + attack[:cut], attack[cut:]]
        got_reason, requests = refusal(*reads)
        assert got_reason == reason, (cut, got_reason)
        assert requests == [PUBLISH], cut
        assert vm_size_kib() - before < 512 * 1024, f"hiredis reserved memory (cut {cut})"


def test_a_huge_header_after_a_stalled_partial_request_is_refused_without_reserving_it():
    # A request cut in the middle is held by hiredis; the next read finishes it and
    # announces a huge array: the checked path takes the partial request back first.
    before = vm_size_kib()
    parser = resp.RequestParser(max_bulk=MAX_BULK)
    whole = command(*PUBLISH)
    assert parser.feed(whole[:20]) == []
    with pytest.raises(resp.ProtocolError) as refused:
        parser.feed(whole[20:] + b"*2000000000\r\n")
    assert refused.value.reason == "invalid multibulk length"
    assert refused.value.requests == [PUBLISH]
    assert vm_size_kib() - before < 512 * 1024


def test_a_refusal_lets_go_of_what_the_parser_held():
    parser = resp.RequestParser(max_bulk=MAX_BULK)
    parser.feed(b"*3\r\n$100000\r\n" + b"x" * 90_000)
    assert parser._partial
    with pytest.raises(resp.ProtocolError):
        parser.feed(b"y" * 10_000 + b"\r\n:1\r\n")
    assert not parser._partial and parser._checked is None and not parser._inline


LARGE_APPEND = [b"append", b"s", b"any"] + [item for i in range(700) for item in
                                             (b"e%d" % i, b"*1234 %5678 ~9999 >1000 |2000")]


def test_a_request_of_over_a_thousand_elements_takes_the_checked_path_and_is_whole():
    data = command(*PING) + command(*LARGE_APPEND) + command(*PUBLISH) + b"PING\r\n"
    expected = [PING, LARGE_APPEND, PUBLISH, [b"PING"]]
    parser = resp.RequestParser(max_bulk=MAX_BULK)
    assert parser.feed(data) == expected
    assert parser._checked is None and not parser._partial
    rng = random.Random(11)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(data)), rng.choice([1, 2, 5, 40])))
        reads = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        parser = resp.RequestParser(max_bulk=MAX_BULK)
        assert feed(parser, *reads) == expected
        assert parser._checked is None and not parser._partial


@pytest.mark.parametrize("data", [b"*1234", b"x*12345\r\n*9999", b"~1000", b"%20202020",
                                  b"a>1000b|9999", b"*" * 10 + b"0" * 10])
def test_event_data_that_looks_like_a_large_header_is_stored_as_sent(data):
    # False alarms of the search take the checked path, whole or cut anywhere.
    requests = [PING, [b"publish", b"s", b"e", data], [b"publish", b"s", data, b"x"], PING]
    stream = b"".join(command(*r) for r in requests)
    for cut in range(len(stream) + 1):
        parser = resp.RequestParser(max_bulk=MAX_BULK)
        assert feed(parser, stream[:cut], stream[cut:]) == requests, cut
        assert parser._checked is None and not parser._partial


def test_the_fast_path_comes_back_after_a_checked_request(monkeypatch):
    parser = resp.RequestParser(max_bulk=MAX_BULK)
    assert parser.feed(command(*LARGE_APPEND)) == [LARGE_APPEND]

    def no_scan(*args):
        raise AssertionError("well-formed requests were scanned")

    monkeypatch.setattr(resp.RequestParser, "_scan", no_scan)
    monkeypatch.setattr(resp.RequestParser, "_skip_request", no_scan)
    assert parser.feed(command(*PUBLISH) * 100) == [PUBLISH] * 100


@pytest.mark.parametrize("mark", [b"~", b">", b"%", b"|"])
def test_a_resp3_aggregate_where_a_request_starts_is_inline_wherever_reads_end(mark):
    # hiredis reads a set (a push...) as it reads an array; a request that does not start
    # with '*' is an inline command. Found by tools/fuzz_parser.py: cut at some points,
    # the same bytes were a request and inline lines both, so a publish ran twice.
    aggregate = mark + b"4\r\n$7\r\npublish\r\n$1\r\ns\r\n$1\r\ne\r\n$1\r\nx\r\n"
    data = command(*PING) + aggregate + command(*PING)
    expected = [PING] + [[line] for line in aggregate.split(b"\r\n")[:-1]] + [PING]
    for cut in range(len(data) + 1):
        for reads in ([data[:cut], data[cut:]], [data[:cut // 2], data[cut // 2:cut], data[cut:]]):
            parser = resp.RequestParser(max_bulk=MAX_BULK)
            assert feed(parser, *reads) == expected, (cut, reads)


@pytest.mark.parametrize("attack, reason", HUGE_HEADERS)
def test_a_huge_header_arriving_a_byte_or_two_at_a_time_never_reaches_hiredis(attack, reason):
    # Found by review: only the last read's bytes were kept to search across reads, so
    # reads of 1-3 bytes let '*' and its digits reach hiredis separately.
    before = vm_size_kib()
    for size in (1, 2, 3):
        parser = resp.RequestParser(max_bulk=MAX_BULK)
        data = command(*PUBLISH)[:-3]  # a request in progress: hiredis holds part of it
        rest = command(*PUBLISH)[-3:] + attack
        assert parser.feed(data) == []
        with pytest.raises(resp.ProtocolError) as refused:
            for at in range(0, len(rest), size):
                parser.feed(rest[at:at + size])
        assert refused.value.reason == reason, (size, refused.value.reason)
        assert vm_size_kib() - before < 512 * 1024, f"hiredis reserved memory (reads of {size})"


def test_a_resp3_aggregate_arriving_a_byte_at_a_time_is_inline():
    aggregate = b"~2\r\n$4\r\nping\r\n$1\r\nx\r\n"
    data = command(*PING)[:-1]
    parser = resp.RequestParser(max_bulk=MAX_BULK)
    got = parser.feed(data)
    for byte in (command(*PING)[-1:] + aggregate + command(*PING)):
        got += parser.feed(bytes([byte]))
    assert got == [PING] + [[line] for line in aggregate.split(b"\r\n")[:-1]] + [PING]
