"""Fixtures of the client tests: a Client on the real server, a controllable proxy, and
threads that collect what subscriptions yield (helpers in client_support.py: a module
named ``conftest`` is ambiguous to import, with one per test directory)."""

from __future__ import annotations

import pytest
from client_proxy import Proxy
from client_support import TIMEOUT, Collector

from meilies.client import Client


@pytest.fixture
def client(server):
    with Client(port=server.port, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(params=[False, True], ids=["v2-server", "older-server"])
def proxy(server, request):
    """A proxy to the server; also as a server from before PROTOCOL.md v2, so that a
    client's fallbacks (``$all`` resumed stream by stream) stay tested."""
    proxy = Proxy(server.port, older_server=request.param)
    yield proxy
    proxy.close()


@pytest.fixture
def collect():
    collectors: list[Collector] = []

    def start(subscription) -> Collector:
        collector = Collector(subscription)
        collectors.append(collector)
        return collector

    yield start
    for collector in collectors:
        collector.stop()
