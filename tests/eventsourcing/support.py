"""A fresh ``meilies-server`` for every test of the library's test cases.

The library's test cases assume an empty store (the first notification id is 1, a
new recorder sees no tracking records), so each test gets its own server on a free
loopback port and its own data directory: about 0.3 s of start-up, cheaper than
reasoning about what an earlier test left behind. The library also reads its settings
from ``os.environ`` in places (``Application()`` without an env), so the server's
port is put there for the duration of the test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from unittest import TestCase

from eventsourcing.utils import Environment

from meilies.eventsourcing import MeiliesFactory
from serverproc import ServerProcess


class MeiliesServerCase(TestCase):
    """Starts the server before the library's ``setUp`` and stops it after its
    ``tearDown``; ``meilies_env`` holds the settings that reach it."""

    #: Extra ``meilies-server`` arguments.
    server_args: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.data_root = Path(tempfile.mkdtemp(prefix="meilies-es-"))
        self.server = ServerProcess(self.data_root / "data", *self.server_args).start()
        self.meilies_env = {
            "PERSISTENCE_MODULE": "meilies.eventsourcing",
            "MEILIES_PORT": str(self.server.port),
        }
        self._saved_environ = {key: os.environ.get(key) for key in self.meilies_env}
        os.environ.update(self.meilies_env)
        self._factories: list[MeiliesFactory] = []
        super().setUp()

    def tearDown(self) -> None:
        try:
            super().tearDown()
        finally:
            for factory in self._factories:
                factory.close()
            self.server.kill()
            for key, value in self._saved_environ.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            shutil.rmtree(self.data_root, ignore_errors=True)

    def factory(self, name: str = "", **settings: str) -> MeiliesFactory:
        """A factory for this test's server (closed after the test)."""
        factory = MeiliesFactory(Environment(name, {**self.meilies_env, **settings}))
        self._factories.append(factory)
        return factory
