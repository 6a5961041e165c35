"""Fixtures of the client tests: a Client on the real server, a controllable proxy, and
a thread that collects what a subscription yields."""

from __future__ import annotations

import threading

import pytest
from client_proxy import Proxy
from serverproc import wait_for

from meilies.client import Client

#: Short waits for what a test expects to happen quickly, long ones for restarts.
TIMEOUT = 30.0


@pytest.fixture
def client(server):
    with Client(port=server.port, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture
def proxy(server):
    proxy = Proxy(server.port)
    yield proxy
    proxy.close()


class Collector:
    """Iterates a subscription in a daemon thread; ``events`` grows as they come."""

    def __init__(self, subscription) -> None:
        self.subscription = subscription
        self.events: list = []
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self.subscription:
                self.events.append(event)
        except BaseException as exc:  # handed to the test through .error
            self.error = exc
        finally:
            self.finished.set()

    def wait_count(self, n: int, timeout: float = TIMEOUT) -> list:
        try:
            wait_for(lambda: len(self.events) >= n or self.error is not None, timeout,
                     what=f"{n} events")
        except AssertionError:
            last: dict = {}
            for event in self.events:
                last[event.stream] = event.number
            raise AssertionError(f"timed out waiting for {n} events; have {len(self.events)},"
                                 f" last number per stream {last}") from None
        if self.error is not None:
            raise AssertionError(f"subscription failed: {self.error!r}") from self.error
        return self.events

    def stop(self) -> None:
        self.subscription.close()
        self.finished.wait(TIMEOUT)


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
