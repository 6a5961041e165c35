"""The MeiliES Python client: plain sockets and hiredis, threads or gevent.

    from meilies.client import Client

    client = Client(port=6480)
    client.publish("orders-17", "created", b'{"total": 12}')
    last = client.append("orders-17", [("paid", b"{}"), ("shipped", b"{}")], expected=0)
    for event in client.subscribe("orders-17:0"):      # reconnects and resumes by itself
        print(event.stream, event.number, event.name, event.data)
"""

from .client import Client
from .connection import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_TIMEOUT, Connection
from .errors import (ERROR_CLASSES, AuthenticationError, AuthenticationRequired,
                     ConnectionError, InvalidPassword, MeiliesError, ProtocolError,
                     ResponseError, ServerShuttingDown, TimeoutError, WrongExpectedVersion,
                     error_from_reply)
from .subscriber import Event, Spec, Subscription, event_from_frame, parse_spec

__all__ = [
    "DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_TIMEOUT", "ERROR_CLASSES",
    "AuthenticationError", "AuthenticationRequired", "Client", "Connection",
    "ConnectionError", "Event", "InvalidPassword", "MeiliesError", "ProtocolError",
    "ResponseError", "ServerShuttingDown", "Spec", "Subscription", "TimeoutError",
    "WrongExpectedVersion", "error_from_reply", "event_from_frame", "parse_spec",
]
