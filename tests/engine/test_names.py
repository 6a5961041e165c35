"""Names and sizes (PROTOCOL.md): a violation names the argument and stores nothing."""

from __future__ import annotations

import pytest

from meilies.engine import ANY, NO_STREAM, Engine, InvalidArgument, WrongExpectedVersion

BAD_STREAMS = {
    "empty": b"",
    "colon": b"orders:17",
    "space": b"orders 17",
    "tab": b"orders\t17",
    "newline": b"orders\n",
    "carriage-return": b"orders\r",
    "nul": b"a\x00b",
    "escape": b"a\x1b",
    "delete": b"a\x7f",
    "c1-control": "a\u0085b".encode(),
    "no-break-space": "a\u00a0b".encode(),
    "ideographic-space": "a\u3000b".encode(),
    "line-separator": "a\u2028b".encode(),
    "too-long": b"s" * 256,
    "too-long-multibyte": "\u00e9".encode() * 128,
    "all-streams": b"$all",
    "reserved-dollar": b"$",
    "reserved-dollar-prefix": b"$all2",
    "invalid-utf8": b"a\xffb",
    "truncated-utf8": b"a\xc3",
    "overlong-utf8": b"\xc0\xaf",
    "surrogate-utf8": b"\xed\xa0\x80",
}

BAD_EVENT_NAMES = {
    "empty": b"",
    "nul": b"a\x00b",
    "newline": b"created\n",
    "carriage-return": b"created\r",
    "tab": b"a\tb",
    "delete": b"a\x7f",
    "c1-control": "a\u0085b".encode(),
    "too-long": b"e" * 256,
    "invalid-utf8": b"\xff",
}

GOOD_STREAMS = [b"s", b"s" * 255, "\u00e9" .encode() * 127, b"all$", b"a-b_c.d/e",
                "\u2713".encode(), b"a$b"]
GOOD_EVENT_NAMES = [b"e", b"e" * 255, b"with space", b"with:colon", b"$all", "\u00f1".encode()]


@pytest.fixture
def engine(tmp_path):
    engine = Engine.open(tmp_path, fsync="no", max_event_size=100)
    yield engine
    engine.close()


def assert_nothing_stored(engine) -> None:
    assert engine.written_position == 0 and engine.stream_names() == []


@pytest.mark.parametrize("expected", [ANY, NO_STREAM, 3], ids=["any", "none", "number"])
@pytest.mark.parametrize("kind", sorted(BAD_STREAMS))
def test_bad_stream_name_is_refused(engine, kind, expected):
    with pytest.raises(InvalidArgument) as caught:
        engine.append(BAD_STREAMS[kind], [(b"e", b"data")], expected=expected)
    assert caught.value.argument == "stream"
    assert_nothing_stored(engine)


@pytest.mark.parametrize("kind", sorted(BAD_EVENT_NAMES))
def test_bad_event_name_is_refused_and_the_batch_with_it(engine, kind):
    batch = [(b"good", b"1"), (BAD_EVENT_NAMES[kind], b"2")]
    with pytest.raises(InvalidArgument) as caught:
        engine.append(b"s", batch)
    assert caught.value.argument == "event-name"
    assert_nothing_stored(engine)


def test_data_over_max_event_size_is_refused(engine):
    with pytest.raises(InvalidArgument) as caught:
        engine.append(b"s", [(b"e", b"x" * 100), (b"e", b"x" * 101)])
    assert caught.value.argument == "data"
    assert_nothing_stored(engine)


def test_data_of_exactly_max_event_size_and_empty_data_are_stored(engine):
    engine.append(b"s", [(b"e", b"x" * 100), (b"e", b"")])
    assert [bytes(e.data) for e in engine.read_stream(b"s")] == [b"x" * 100, b""]


def test_empty_batch_is_refused(engine):
    with pytest.raises(InvalidArgument) as caught:
        engine.append(b"s", [])
    assert caught.value.argument == "events"
    assert_nothing_stored(engine)


@pytest.mark.parametrize("expected", [-1, "3", "ANY", None, 1.0, True])
def test_bad_expected_version_is_refused(engine, expected):
    engine.append(b"s", [(b"e", b"1"), (b"e", b"2")])
    with pytest.raises(InvalidArgument) as caught:
        engine.append(b"s", [(b"e", b"3")], expected=expected)
    assert caught.value.argument == "expected"
    assert engine.written_position == 2


def test_wrong_expected_version_carries_the_actual_last_number(engine):
    with pytest.raises(WrongExpectedVersion) as caught:
        engine.append(b"s", [(b"e", b"1")], expected=0)
    assert caught.value.actual is None
    engine.append(b"s", [(b"e", b"1"), (b"e", b"2")], expected=NO_STREAM)
    for expected in (0, 2, NO_STREAM):
        with pytest.raises(WrongExpectedVersion) as caught:
            engine.append(b"s", [(b"e", b"3")], expected=expected)
        assert caught.value.actual == 1 and caught.value.stream == "s"
    assert engine.append(b"s", [(b"e", b"3")], expected=1).last_number == 2
    assert engine.written_position == 3


@pytest.mark.parametrize("stream", GOOD_STREAMS)
def test_unusual_but_valid_stream_names_are_stored_and_survive_reopen(tmp_path, stream):
    with Engine.open(tmp_path) as engine:
        engine.append(stream, [(b"e", b"1")])
    with Engine.open(tmp_path) as engine:
        assert engine.stream_names() == [stream]
        assert [bytes(e.data) for e in engine.read_stream(stream)] == [b"1"]


@pytest.mark.parametrize("name", GOOD_EVENT_NAMES)
def test_unusual_but_valid_event_names_are_stored(engine, name):
    engine.append(b"s", [(name, b"1")])
    [event] = engine.read_stream(b"s")
    assert event.name == name


@pytest.mark.parametrize("name, shown", [
    (b"orders-17", "'orders-17'"),
    ("été".encode(), "'été'"),
    (b"it's", "\"it's\""),
    (b"a\xffb", "'a\\\\xffb'"),  # not UTF-8: escaped, never a bytes literal
    (b"a\x00b", "'a\\x00b'"),
])
def test_messages_show_names_quoted_as_text_with_unprintable_bytes_escaped(name, shown):
    from meilies.engine.names import quoted

    assert quoted(name) == shown


def test_a_stream_named_with_a_dollar_in_an_older_log_stays_readable_and_writable(tmp_path):
    # Names beginning with '$' are reserved for new streams (PROTOCOL.md v2); a log that
    # already holds one (written before the rule) opens, reads, takes appends, checks clean.
    from meilies.engine import fsck
    from meilies.engine import format as fmt
    from meilies.engine.files import CHECKPOINT_NAME

    with Engine.open(tmp_path) as engine:
        with pytest.raises(InvalidArgument) as refused:
            engine.append(b"$legacy", [(b"e", b"x")])
        assert "reserved" in str(refused.value)
    [segment] = sorted(tmp_path.glob("*.seg"))
    record = fmt.encode_record(b"$legacy", 0, 0, 0, [(b"e", b"old")]).data
    with open(segment, "ab") as handle:
        handle.write(record)
    (tmp_path / CHECKPOINT_NAME).unlink()
    with Engine.open(tmp_path) as engine:
        assert engine.append(b"$legacy", [(b"e", b"new")]).first_number == 1
        engine.sync()
        assert [bytes(e.data) for e in engine.read_stream(b"$legacy")] == [b"old", b"new"]
    assert fsck.verify(tmp_path).clean
