"""Helpers of the client tests: deadlines, and a thread that collects what a
subscription yields."""

from __future__ import annotations

import threading

from serverproc import wait_for

#: The deadline for anything a client test waits on (restarts included).
TIMEOUT = 30.0


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
