"""Full event frames as hiredis parses them, read without making a client ``Event`` of
each: the notification log reads tens of thousands of events a second, and every
object made per event shows in that figure (a third of the time, measured).

    *9 +event +<stream> :<number> +<event-name> $<data> :<position> :<timestamp-ms> $<id> $<metadata>

(PROTOCOL.md, "The full event frame"; names and the stream arrive as bytes.)
"""

from __future__ import annotations

from ..client import Client, ProtocolError

Frame = list
STREAM, NUMBER, NAME, DATA, POSITION, TIMESTAMP, ID, METADATA = range(1, 9)


def read(client: Client, command: str, stream: str, first: int | str, second: int | str,
         count: int) -> list[Frame]:
    """``range``/``revrange <stream> <first> <second> COUNT <count>``: its frames."""
    reply = client.execute_command(command, stream, first, second, "COUNT", count)
    if type(reply) is not list or (reply and not _is_frame(reply[0])):
        raise ProtocolError(f"unexpected reply to {command}: {reply!r}"[:300])
    return reply


def version(frame: Frame) -> int:
    """The event's originator version: its metadata, or its number when it has none
    (an event written into the namespace by something other than this module)."""
    metadata = frame[METADATA]
    return int(metadata) if metadata else frame[NUMBER]


def _is_frame(frame: object) -> bool:
    return (type(frame) is list and len(frame) == 9 and frame[0] == b"event"
            and type(frame[NUMBER]) is int and type(frame[POSITION]) is int)
