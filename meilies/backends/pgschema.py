"""The PostgreSQL schema of the postgres backend, created on first start, versioned.

Tables (all names start with ``meilies_``, so the database can hold others):

``meilies_schema(version)``
    One row: the schema version below. A server refuses a database whose version is
    newer than it knows; an older one is migrated here, in one transaction.
``meilies_head(one, next_position)``
    One row: the global position the next event gets. Every write transaction locks
    it (``SELECT ... FOR UPDATE``) before anything else and holds it through its
    commit, so writers are serialized: positions are dense, and a transaction that
    commits later always has the later positions, so a reader of committed rows in
    position order never sees position p+1 before p.
``meilies_streams(stream, next_number)``
    Every stream with events and the number its next event gets.
``meilies_events``
    One row per event, primary key ``position``; ``UNIQUE (stream, number)`` (reads by
    number, and a second guard on dense numbering) and ``UNIQUE (event_id)`` (a second
    guard on idempotency; the checks themselves run under the head lock, pgplan.py).
    ``write_start`` (the position of its write's first event), ``group_end`` (the
    position past its PostgreSQL transaction) and ``full_write`` let a replica store
    every write again as the record the embedded engine would have made, and every
    transaction whole.

Writers ``NOTIFY meilies_appended`` (payload: the new head position, a space, and the
notifying server's random token) in the same transaction, delivered on commit: the
other servers' replicas wake on it.
"""

from __future__ import annotations

#: The version this code writes and reads.
SCHEMA_VERSION = 1
#: The channel writers notify on commit.
CHANNEL = "meilies_appended"
#: Held (transaction-scoped) while the schema is created or migrated, so that
#: servers starting together on an empty database do it once.
SCHEMA_LOCK_KEY = 0x6D65696C6965  # "meilie"

CREATE = """
CREATE TABLE meilies_schema (version integer NOT NULL);
CREATE TABLE meilies_head (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    next_position bigint NOT NULL
);
CREATE TABLE meilies_streams (
    stream bytea PRIMARY KEY,
    next_number bigint NOT NULL
);
CREATE TABLE meilies_events (
    position bigint PRIMARY KEY,
    stream bytea NOT NULL,
    number bigint NOT NULL,
    name bytea NOT NULL,
    data bytea NOT NULL,
    event_id bytea UNIQUE,
    metadata bytea,
    timestamp_ms bigint NOT NULL,
    write_start bigint NOT NULL,
    group_end bigint NOT NULL,
    full_write boolean NOT NULL,
    UNIQUE (stream, number)
);
INSERT INTO meilies_head (next_position) VALUES (0);
"""


class SchemaTooNew(Exception):
    """The database was made by a newer MeiliES: this one cannot read it."""

    def __init__(self, found: int) -> None:
        super().__init__(f"the database's MeiliES schema is version {found}; this server"
                         f" knows versions up to {SCHEMA_VERSION}: upgrade meilies")
        self.found = found


def ensure_schema(conn) -> bool:
    """Create the schema in ``conn``'s database if missing; True if it was created.
    Raises :class:`SchemaTooNew` for a database of a newer version."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        exists = conn.execute("SELECT to_regclass('meilies_schema')").fetchone()[0]
        if exists is None:
            conn.execute(CREATE)
            conn.execute("INSERT INTO meilies_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
            return True
        found = conn.execute("SELECT max(version) FROM meilies_schema").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(found)
        return False
