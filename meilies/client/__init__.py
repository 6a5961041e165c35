"""The MeiliES Python client: plain sockets and hiredis, threads or gevent.

    from uuid import uuid4
    from meilies.client import Client, EventData

    client = Client(port=6480)
    client.publish("orders-17", "created", b'{"total": 12}')
    last = client.append("orders-17", [("paid", b"{}"), ("shipped", b"{}")], expected=0)
    client.append("orders-17", [EventData("refunded", b"{}", id=str(uuid4()))])  # idempotent
    with client.transaction() as tx:                   # all or none
        tx.append("orders-17", [("closed", b"")], expected=3)
        tx.publish("audit", "closed", b"orders-17")
    for event in client.subscribe("orders-17:0"):      # reconnects and resumes by itself
        print(event.stream, event.number, event.name, event.data)
"""

from .client import Client
from .connection import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_TIMEOUT, Connection
from .errors import (ERROR_CLASSES, EVENT_STORE_ERROR_CLASSES, AuthenticationError,
                     AuthenticationRequired, ConnectionError, DuplicateEventId,
                     DuplicateIdInRequest, InvalidPassword, MeiliesError, ProtocolError,
                     ResponseError, ServerShuttingDown, TimeoutError, TransactionAborted,
                     WrongExpectedVersion, error_from_reply)
from .subscriber import Event, Spec, Subscription, event_from_frame, parse_spec
from .writes import AppendResult, EventData, Transaction

__all__ = [
    "DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_TIMEOUT", "ERROR_CLASSES",
    "EVENT_STORE_ERROR_CLASSES", "AppendResult", "AuthenticationError",
    "AuthenticationRequired", "Client", "Connection", "ConnectionError",
    "DuplicateEventId", "DuplicateIdInRequest", "Event", "EventData", "InvalidPassword",
    "MeiliesError", "ProtocolError", "ResponseError", "ServerShuttingDown", "Spec",
    "Subscription", "TimeoutError", "Transaction", "TransactionAborted",
    "WrongExpectedVersion", "error_from_reply", "event_from_frame", "parse_spec",
]
