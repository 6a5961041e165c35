"""The first contact: the real server answers the original's commands byte for byte."""

from serverproc import event_frame, subscribed


def test_publish_then_subscribe_from_zero_gets_every_event(server):
    client = server.client()
    assert client.call("publish", "s", "created", b"a\r\nb\x00") == b"+OK\r\n"
    assert client.call("publish", "s", "renamed", b"") == b"+OK\r\n"
    reader = server.client()
    reader.send(b"*2\r\n$9\r\nsubscribe\r\n$3\r\ns:0\r\n")
    reader.expect(subscribed(b"s"))
    reader.expect(event_frame(b"s", 0, b"created", b"a\r\nb\x00"))
    reader.expect(event_frame(b"s", 1, b"renamed", b""))
    client.call("publish", "s", "live", "x")
    reader.expect(event_frame(b"s", 2, b"live", b"x"))
