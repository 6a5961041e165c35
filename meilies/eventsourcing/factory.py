"""The infrastructure factory: ``PERSISTENCE_MODULE=meilies.eventsourcing`` and settings
read the library's way (``<APPLICATION>_MEILIES_PORT`` before ``MEILIES_PORT``)."""

from __future__ import annotations

from eventsourcing.dcb.persistence import DCBInfrastructureFactory
from eventsourcing.persistence import (AggregateRecorder, ApplicationRecorder,
                                       InfrastructureFactory, ProcessRecorder)
from eventsourcing.utils import Environment, EnvType, resolve_topic

from ..client import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_TIMEOUT
from .connector import DEFAULT_POOL_SIZE, DEFAULT_RETRY_SECONDS, Connector
from .dcb import MeiliesDCBRecorder
from .names import StreamNames
from .recorders import (MeiliesAggregateRecorder, MeiliesApplicationRecorder,
                        MeiliesProcessRecorder, MeiliesTrackingRecorder)

#: The purpose whose streams may skip versions (versions.py, "Increasing").
SNAPSHOTS = "snapshots"


class MeiliesFactory(InfrastructureFactory[MeiliesTrackingRecorder],
                     DCBInfrastructureFactory[MeiliesTrackingRecorder]):
    """Recorders on one MeiliES server: the four of the library's applications, and the
    DCB recorder of its ``DCBApplication`` (dcb.py).

    Settings (environment variables, each also read with the application's name as a
    prefix, e.g. ``BANKACCOUNTS_MEILIES_PORT``):

    ``MEILIES_HOST``, ``MEILIES_PORT``
        The server (default ``127.0.0.1:6480``).
    ``MEILIES_PASSWORD``
        Sent with ``AUTH`` on every connection (a server with ``--requirepass``).
    ``MEILIES_STREAM_PREFIX``
        Begins every stream name, so that several deployments share a server (default
        empty). Within one, each application has its own namespace: its name.
    ``MEILIES_TIMEOUT``
        Seconds to wait for a reply (default 10).
    ``MEILIES_RETRY_SECONDS``
        How long an operation is retried after a lost connection, e.g. while the
        server restarts (default 10); then ``OperationalError``.
    ``MEILIES_POOL_SIZE``
        Idle connections kept (default 10; busier threads open more).
    """

    MEILIES_HOST = "MEILIES_HOST"
    MEILIES_PORT = "MEILIES_PORT"
    MEILIES_PASSWORD = "MEILIES_PASSWORD"  # noqa: S105 (the setting's name)
    MEILIES_STREAM_PREFIX = "MEILIES_STREAM_PREFIX"
    MEILIES_TIMEOUT = "MEILIES_TIMEOUT"
    MEILIES_RETRY_SECONDS = "MEILIES_RETRY_SECONDS"
    MEILIES_POOL_SIZE = "MEILIES_POOL_SIZE"

    aggregate_recorder_class = MeiliesAggregateRecorder
    application_recorder_class = MeiliesApplicationRecorder
    tracking_recorder_class = MeiliesTrackingRecorder
    process_recorder_class = MeiliesProcessRecorder

    def __init__(self, env: Environment | EnvType | None) -> None:
        super().__init__(env)
        try:
            self.names = StreamNames(self.env.name,
                                     self.env.get(self.MEILIES_STREAM_PREFIX) or "")
        except ValueError as exc:
            raise OSError(f"{self.MEILIES_STREAM_PREFIX}: {exc}") from None
        self.connector = Connector(
            host=self.env.get(self.MEILIES_HOST) or DEFAULT_HOST,
            port=self._number(self.MEILIES_PORT, DEFAULT_PORT, int),
            password=self.env.get(self.MEILIES_PASSWORD) or None,
            timeout=self._number(self.MEILIES_TIMEOUT, DEFAULT_TIMEOUT, float),
            retry_seconds=self._number(self.MEILIES_RETRY_SECONDS, DEFAULT_RETRY_SECONDS,
                                       float),
            pool_size=self._number(self.MEILIES_POOL_SIZE, DEFAULT_POOL_SIZE, int),
        )

    def _number(self, key: str, default: float, kind: type) -> float:
        text = (self.env.get(key) or "").strip()
        if not text:
            return default
        try:
            value = kind(text)
        except ValueError:
            value = -1
        if value < 0:
            keys = ", ".join(self.env.create_keys(key))
            raise OSError(f"MeiliES setting {keys} is {text!r}: expected a number >= 0")
        return value

    def aggregate_recorder(self, purpose: str = "events") -> AggregateRecorder:
        return self.aggregate_recorder_class(self.connector, self.names, purpose=purpose,
                                             increasing=purpose == SNAPSHOTS)

    def application_recorder(self) -> ApplicationRecorder:
        topic = self.env.get(self.APPLICATION_RECORDER_TOPIC)
        cls = resolve_topic(topic) if topic else self.application_recorder_class
        return cls(self.connector, self.names)

    def tracking_recorder(self, tracking_recorder_class: type[MeiliesTrackingRecorder]
                          | None = None) -> MeiliesTrackingRecorder:
        cls = tracking_recorder_class
        if cls is None:
            topic = self.env.get(self.TRACKING_RECORDER_TOPIC)
            cls = resolve_topic(topic) if topic else self.tracking_recorder_class
        return cls(self.connector, self.names)

    def process_recorder(self) -> ProcessRecorder:
        topic = self.env.get(self.PROCESS_RECORDER_TOPIC)
        cls = resolve_topic(topic) if topic else self.process_recorder_class
        return cls(self.connector, self.names)

    def dcb_recorder(self) -> MeiliesDCBRecorder:
        return MeiliesDCBRecorder(self.connector, self.names)

    def close(self) -> None:
        self.connector.close()
