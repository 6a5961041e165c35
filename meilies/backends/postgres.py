"""The postgres backend: PostgreSQL as the log of record, the engine as its replica.

Writes (backends/__init__.py's interface) are queued by the connections' greenlets and
stored by one committer greenlet, a group at a time: all requests queued while the
previous group was committing go into one PostgreSQL transaction (group commit). That
transaction locks the head row, reads the state the writes depend on, checks them
(pgplan.py: the embedded engine's checks, in its order), inserts their events,
notifies, and commits; with ``synchronous_standby_names`` set, the commit returns
once a standby has the WAL. The committer then applies the group to the engine (the
replica) and answers: a reply always means "committed and readable here".

The replica is derived data: it is only ever written with committed rows, in position
order, whole PostgreSQL transactions at a time (so a reader never sees part of one).
The tailer greenlet applies other servers' rows, woken by ``NOTIFY`` (or once a
second, should a notification be lost). At start the replica is checked against the
log (its last event must be the log's event at that position); one that does not match
(a log restored from an older backup, a different database) is moved aside and rebuilt.

All PostgreSQL I/O runs in a small thread pool (psycopg releases the GIL while it
waits), never on the gevent hub: the server is not monkey-patched, and the engine is
only touched on the hub's thread. Three connections: the committer's, the replica's
reader, and the listener's.

Failures (README "Running on more than one machine"): while PostgreSQL is unreachable,
writes get :class:`BackendUnavailable` (``-ERR backend unavailable ...``), reads and
subscriptions go on from the replica and catch up once it is back; each connection
is made again on next use (libpq's multi-host DSNs with
``target_session_attrs=read-write`` follow a failover).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import deque
from pathlib import Path

import gevent
from gevent.event import AsyncResult, Event
from gevent.lock import Semaphore
from gevent.threadpool import ThreadPool

from ..engine import ANY, Engine
from ..engine.appends import AppendResult
from ..engine.reads import StoredEvent, stored_event
from ..engine.writes import MAX_TRANSACTION_BYTES, MAX_TRANSACTION_EVENTS, Write
from . import BackendUnavailable
from .pgplan import GroupPlan, Row, writes_of
from .pgschema import CHANNEL, ensure_schema

log = logging.getLogger("meilies.postgres")

#: Rows the replica reads per query while catching up.
FETCH_ROWS = 5000
#: The tailer looks for new rows at least this often, notification or not.
POLL_SECONDS = 1.0
#: Between two attempts to reach an unreachable PostgreSQL (pacing, not correctness).
RETRY_SECONDS = 1.0
#: Connection settings used unless the DSN sets them: give up connecting after 10 s,
#: and notice a peer gone silent (a partition, a host powered off: no RST ever comes)
#: within ~20 s through TCP keepalives and tcp_user_timeout, rather than the kernel's
#: 15 minutes, so that writes get an answer and the server reconnects.
CONNECTION_DEFAULTS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10,
                       "keepalives_interval": 3, "keepalives_count": 3,
                       "tcp_user_timeout": 20_000}

_COLUMNS = ("position, stream, number, name, data, event_id, metadata, timestamp_ms,"
            " write_start, group_end, full_write")
_INSERT = (
    "INSERT INTO meilies_events (" + _COLUMNS + ")"
    " SELECT p, s, n, nm, d, i, m, %s, ws, %s, f FROM unnest("
    "%s::bigint[], %s::bytea[], %s::bigint[], %s::bytea[], %s::bytea[], %s::bytea[],"
    " %s::bytea[], %s::bigint[], %s::boolean[]) AS t(p, s, n, nm, d, i, m, ws, f)")
_UPSERT_STREAMS = (
    "INSERT INTO meilies_streams (stream, next_number)"
    " SELECT * FROM unnest(%s::bytea[], %s::bigint[])"
    " ON CONFLICT (stream) DO UPDATE SET next_number = EXCLUDED.next_number")


def _psycopg():
    try:
        import psycopg
    except ImportError as exc:  # the optional extra is not installed
        raise BackendUnavailable("the postgres backend needs psycopg 3:"
                                 " pip install 'meilies[postgres]'") from exc
    return psycopg


def describe(exc: BaseException) -> str:
    """One line for a PostgreSQL error (libpq's messages run over several lines)."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) \
        or type(exc).__name__


class _Request:
    __slots__ = ("writes", "result", "events", "size")

    def __init__(self, writes: list[Write]) -> None:
        self.writes = writes
        self.result = AsyncResult()
        self.events = sum(len(w.events) for w in writes)
        self.size = sum(len(d) + len(n) for w in writes for n, d in w.events)


class PostgresBackend:
    """Writes through PostgreSQL, reads from ``engine`` kept as its replica (see the
    module docstring). Make it with :meth:`open`; :meth:`start` once the gevent hub
    runs the server; :meth:`close` at the end."""

    def __init__(self, dsn: str, engine: Engine, commit: str = "always") -> None:
        self.psycopg = _psycopg()
        self.dsn = dsn
        #: ``--fsync``: "always" waits for PostgreSQL's commit to be durable (and, with
        #: synchronous standbys, replicated); the others set ``synchronous_commit = off``
        #: (PostgreSQL then loses at most ~3 x wal_writer_delay of commits in a crash
        #: of its own, never a torn transaction).
        self.commit_policy = commit
        self.engine = engine
        self._conns: dict[str, object] = {}
        self._pool: ThreadPool | None = None
        self._queue: deque[_Request] = deque()
        self._wake = Event()
        self._apply_lock = Semaphore()
        self._closed = False
        self._greenlets: list[gevent.Greenlet] = []
        self._unavailable_since: float | None = None
        #: Signs this server's notifications: its tailer leaves its own commits to
        #: the committer, which applies them without reading them back.
        self._token = uuid.uuid4().hex

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, dsn: str, data_dir: str | os.PathLike, commit: str = "always",
             **engine_options) -> PostgresBackend:
        """Connect, create the schema if missing, open the replica in ``data_dir``
        (moving aside one that does not match the log) and bring it up to date.
        ``commit`` is the ``--fsync`` policy (see ``commit_policy``). Raises
        :class:`BackendUnavailable` if PostgreSQL cannot be reached."""
        engine_options["fsync"] = "no"  # derived data: the log of record is PostgreSQL
        engine = Engine.open(data_dir, **engine_options)
        backend = cls(dsn, engine, commit)
        try:
            conn = backend._conn("writer")
            if ensure_schema(conn):
                log.info("created the MeiliES schema in PostgreSQL")
            if not backend._replica_matches():
                engine.close()
                aside = Path(f"{data_dir}.diverged-{time.strftime('%Y%m%d-%H%M%S')}")
                os.rename(data_dir, aside)
                log.warning("the replica in %s does not match PostgreSQL's log (restored"
                            " from an older backup, or another database?); moved it to %s"
                            " and rebuilding it", data_dir, aside)
                backend.engine = engine = Engine.open(data_dir, **engine_options)
            backend._catch_up_at_start()
        except BaseException:
            backend._close_connections()
            backend.engine.close()
            raise
        return backend

    def _replica_matches(self) -> bool:
        end = self.engine.visible_position
        head = self._conn("writer").execute(
            "SELECT next_position FROM meilies_head").fetchone()[0]
        if end == 0:
            return True
        if end > head:
            return False
        mine = stored_event(self.engine, end - 1)
        rows = self._fetch_rows(end - 1, end)
        if not rows:
            return False
        row = rows[0]
        return (row.stream, row.number, row.name, row.data, row.event_id, row.metadata) == \
            (mine.stream, mine.number, mine.name, mine.data, mine.id, mine.metadata)

    def _catch_up_at_start(self) -> None:
        """Apply every committed row the replica lacks (the hub does not run yet: plain
        blocking calls), showing progress against PostgreSQL's head."""
        head = self._conn("reader").execute(
            "SELECT next_position FROM meilies_head").fetchone()[0]
        start = self.engine.visible_position
        self._catch_up(self._fetch, total=head)
        if self.engine.visible_position > start:
            log.info("replica caught up: applied %d events, at position %d",
                     self.engine.visible_position - start, self.engine.visible_position)

    def _catch_up(self, fetch, upto: int | None = None, total: int | None = None) -> None:
        """Apply committed rows from the replica's end, each batch from
        ``fetch(position)`` (:meth:`_fetch` itself at start, through the pool once
        serving), until PostgreSQL has no more or, given ``upto``, the replica reaches
        it (rows missing below it are an error). Logs progress every 2 s."""
        shown = time.monotonic()
        while upto is None or self.engine.visible_position < upto:
            rows = fetch(self.engine.visible_position)
            if not rows:
                if upto is not None:
                    raise BackendUnavailable(f"position {self.engine.visible_position} is"
                                             " missing from PostgreSQL's log", "stored")
                return
            self._apply(rows)
            if time.monotonic() - shown > 2.0:
                shown = time.monotonic()
                done = self.engine.visible_position
                log.info("replica catching up: at position %d%s", done,
                         "" if total is None else
                         f" of {total} ({100.0 * done / max(total, 1):.0f}%)")

    def _fetch_in_pool(self, position: int) -> list[Row]:
        return self._pool.apply(self._fetch, (position,))

    def start(self) -> None:
        """Start the committer and the tailer (on the running gevent hub)."""
        self._pool = ThreadPool(3)
        self._greenlets = [gevent.spawn(self._commit_loop), gevent.spawn(self._tail_loop)]

    def close(self) -> None:
        """Finish the queued writes, stop the greenlets, close the connections."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        gevent.joinall(self._greenlets, timeout=POLL_SECONDS * 5)
        gevent.killall([g for g in self._greenlets if not g.dead])
        for request in self._queue:
            request.result.set_exception(BackendUnavailable("server is shutting down"))
        self._queue.clear()
        if self._pool is not None:
            self._pool.kill()
        self._close_connections()

    # -- the write interface ------------------------------------------------------------

    def append(self, stream: bytes, events: list[tuple[bytes, bytes]],
               expected: str | int = ANY, *, flush: bool = True) -> AppendResult:
        """An ``append``/``publish``: see :class:`~meilies.backends.WriteBackend`."""
        return self.submit([Write(stream, events, expected)]).get()[0]

    def write(self, writes: list[Write], *, flush: bool = True) -> list[AppendResult]:
        """An ``append-full`` or a transaction: see :class:`~meilies.backends.WriteBackend`."""
        if not writes:
            return []
        return self.submit(writes).get()

    def submit(self, writes: list[Write]) -> AsyncResult:
        """Queue one request (stored all or none) and return at once: its results
        (or the error refusing it) arrive in the returned AsyncResult. A connection
        submits its pipelined writes this way, so that they share commits; requests are
        checked and stored in the order they were submitted."""
        request = _Request(writes)
        if self._closed:
            request.result.set_exception(BackendUnavailable("server is shutting down"))
            return request.result
        self._queue.append(request)
        self._wake.set()
        return request.result

    # -- the committer (hub side) -------------------------------------------------------

    def _commit_loop(self) -> None:
        while True:
            while not self._queue:
                if self._closed:
                    return
                self._wake.wait()
                self._wake.clear()
            group = self._take_group()
            try:
                outcomes, plan = self._pool.apply(self._commit_group,
                                                  ([r.writes for r in group],))
            except BackendUnavailable as exc:
                self._note_unavailable(exc)
                for request in group:
                    request.result.set_exception(exc)
                continue
            except Exception as exc:  # a bug: answer, log, and keep serving
                log.exception("internal error committing %d requests", len(group))
                for request in group:
                    request.result.set_exception(exc)
                continue
            self._note_available()
            try:
                self._apply_own(plan)
            except Exception as exc:
                log.exception("could not apply committed writes to the replica")
                failure = BackendUnavailable(f"committed, but the replica could not apply"
                                             f" it: {describe(exc)}", "stored")
                # The refused requests stay refused; the stored ones hear the failure.
                outcomes = [o if isinstance(o, BaseException) else failure
                            for o in outcomes]
            for request, outcome in zip(group, outcomes):
                if isinstance(outcome, BaseException):
                    request.result.set_exception(outcome)
                else:
                    request.result.set(outcome)

    def _take_group(self) -> list[_Request]:
        """The queued requests that fit one replica transaction (the engine's limits)."""
        queue = self._queue
        group = [queue.popleft()]
        events, size = group[0].events, group[0].size
        while queue and events + queue[0].events <= MAX_TRANSACTION_EVENTS and \
                size + queue[0].size <= MAX_TRANSACTION_BYTES:
            request = queue.popleft()
            events += request.events
            size += request.size
            group.append(request)
        return group

    def _apply_own(self, plan: GroupPlan) -> None:
        """Apply a committed group: the rows before it first (other servers', and any
        a retry's reply points to), then its own rows, unless the tailer got there
        first."""
        with self._apply_lock:
            self._catch_up(self._fetch_in_pool, plan.first_position)
            if not plan.events:
                return
            if self.engine.visible_position == plan.first_position:
                end = plan.next_position
                self._apply([Row(p, s, n, nm, d, i, m, plan.timestamp_ms, ws, end, f)
                             for p, s, n, nm, d, i, m, ws, f in plan.events])
                return
            # The tailer applied it first: it must be this group, or the replica holds
            # a history PostgreSQL does not (a log restored from an older backup).
            mine = stored_event(self.engine, plan.first_position)
            _p, stream, number, _n, data, event_id, *_ = plan.events[0]
            if (mine.stream, mine.number, mine.data, mine.id) != (stream, number, data,
                                                                 event_id):
                log.critical("the replica in %s holds events PostgreSQL's log does not"
                             " (position %d); restart the server to rebuild it",
                             self.engine.directory, plan.first_position)
                raise BackendUnavailable("the replica diverged from PostgreSQL's log; the"
                                         " write is committed", "stored")

    # -- the committer (thread side) ----------------------------------------------------

    def _commit_group(self, requests: list[list[Write]]
                      ) -> tuple[list[list[AppendResult] | BaseException], GroupPlan]:
        """One PostgreSQL transaction for ``requests`` (in a pool thread), in two round
        trips (pipeline mode): the head lock and the state the writes depend on; then
        the inserts and the commit."""
        psycopg = self.psycopg
        conn = self._conn("writer")
        streams = list({w.stream for writes in requests for w in writes})
        ids = [i for writes in requests for w in writes for i in (w.ids or ()) if i]
        notices: list[str] = []
        handler = (lambda diag: notices.append(diag.message_primary or ""))
        conn.add_notice_handler(handler)
        committing = False
        try:
            with conn.pipeline():
                conn.execute("BEGIN")
                head_cursor = conn.execute("SELECT next_position FROM meilies_head"
                                           " FOR UPDATE")
                numbers_cursor = conn.execute(
                    "SELECT stream, next_number FROM meilies_streams WHERE stream = ANY(%s)",
                    (streams,))
                ids_cursor = conn.cursor()
                if ids:
                    ids_cursor.execute(
                        "SELECT event_id, stream, number, position, name, data, metadata"
                        " FROM meilies_events WHERE event_id = ANY(%s)", (ids,))
            head = head_cursor.fetchone()[0]
            numbers = dict(numbers_cursor.fetchall())
            stored: dict[bytes, StoredEvent] = {}
            if ids:
                for event_id, stream, number, position, name, data, meta in ids_cursor:
                    stored[event_id] = StoredEvent(stream, number, position, name, data,
                                                   event_id, meta)
            plan = GroupPlan(head, numbers, stored, self.engine.max_event_size,
                             time.time_ns() // 1_000_000)
            outcomes = [plan.add(writes) for writes in requests]
            if not plan.events:  # refusals and retries only: nothing to commit
                conn.execute("ROLLBACK")
                return outcomes, plan
            columns = [list(column) for column in zip(*plan.events)]
            touched = {e[1]: e[2] + 1 for e in plan.events}
            with conn.pipeline():
                conn.execute(_INSERT, (plan.timestamp_ms, plan.next_position, *columns))
                conn.execute(_UPSERT_STREAMS, (list(touched), list(touched.values())))
                conn.execute("UPDATE meilies_head SET next_position = %s",
                             (plan.next_position,))
                conn.execute("SELECT pg_notify(%s, %s)",
                             (CHANNEL, f"{plan.next_position} {self._token}"))
                committing = True
                conn.execute("COMMIT")
        except psycopg.Error as exc:
            if conn.closed or isinstance(exc, psycopg.OperationalError):
                self._drop("writer")
                if committing:
                    raise BackendUnavailable(f"PostgreSQL connection lost while committing:"
                                             f" {describe(exc)}", "unknown") from None
            else:  # refused by the server: the transaction is aborted, nothing stored
                self._rollback_quietly(conn)
            raise BackendUnavailable(describe(exc)) from None
        finally:
            conn.remove_notice_handler(handler)
        if any("synchronous replication" in notice for notice in notices):
            cancelled = BackendUnavailable(
                "the commit's wait for a synchronous standby was cancelled: it is committed"
                " on the primary, but a failover may lose it", "not replicated")
            outcomes = [cancelled if not isinstance(o, BaseException) else o
                        for o in outcomes]
        return outcomes, plan

    # -- the replica --------------------------------------------------------------------

    def _tail_loop(self) -> None:
        while not self._closed:
            try:
                self._pool.apply(self._wait_notification)
                if self._closed:
                    return
                with self._apply_lock:
                    self._catch_up(self._fetch_in_pool)
                self._note_available()
            except BackendUnavailable as exc:
                self._note_unavailable(exc)
                gevent.sleep(RETRY_SECONDS)
            except Exception:  # a bug or a replica that cannot apply: say so, go on
                log.exception("the replica could not catch up; trying again")
                gevent.sleep(RETRY_SECONDS)

    def _wait_notification(self) -> None:
        """Return on another server's notification of new rows, or after POLL_SECONDS
        (pool thread)."""
        psycopg = self.psycopg
        deadline = time.monotonic() + POLL_SECONDS
        try:
            conn = self._conns.get("listener")
            if conn is None:
                conn = self._conn("listener")
                conn.execute(f"LISTEN {CHANNEL}")
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                for notify in conn.notifies(timeout=left, stop_after=1):
                    if not notify.payload.endswith(self._token):
                        return
        except psycopg.Error as exc:
            self._drop("listener")
            raise BackendUnavailable(describe(exc)) from None

    def _fetch(self, position: int) -> list[Row]:
        """Committed rows from ``position`` on, whole transactions (pool thread)."""
        rows = self._fetch_rows(position, position + FETCH_ROWS)
        if rows and rows[-1].group_end > rows[-1].position + 1:
            rows += self._fetch_rows(rows[-1].position + 1, rows[-1].group_end)
        for k, row in enumerate(rows):  # dense by construction; never apply past a gap
            if row.position != position + k:
                log.error("PostgreSQL's log has a gap at position %d", position + k)
                del rows[k:]
                break
        while rows and rows[-1].group_end > rows[-1].position + 1:
            rows.pop()  # never part of a transaction
        return rows

    def _fetch_rows(self, start: int, stop: int) -> list[Row]:
        psycopg = self.psycopg
        try:
            conn = self._conn("reader")
            return [Row(*r) for r in conn.execute(
                "SELECT " + _COLUMNS + " FROM meilies_events WHERE position >= %s"
                " AND position < %s ORDER BY position", (start, stop)).fetchall()]
        except psycopg.Error as exc:
            self._drop("reader")
            raise BackendUnavailable(describe(exc)) from None

    def _apply(self, rows: list[Row]) -> None:
        """Store committed rows (whole transactions, from the replica's end) in it."""
        engine = self.engine
        at = 0
        for writes, timestamp_ms in writes_of(rows):
            first = rows[at].position
            if first != engine.visible_position:
                raise BackendUnavailable(f"the replica is at {engine.visible_position}, the"
                                         f" rows at {first}", "stored")
            engine.write(writes, flush=True, timestamp_ms=timestamp_ms)
            at += sum(len(w.events) for w in writes)
            if engine.visible_position != rows[at - 1].position + 1:
                raise BackendUnavailable("the replica numbered a transaction differently"
                                         " from PostgreSQL", "stored")

    # -- connections --------------------------------------------------------------------

    def _conn(self, role: str):
        conn = self._conns.get(role)
        if conn is not None and not conn.closed:
            return conn
        psycopg = self.psycopg
        options = {key: value for key, value in CONNECTION_DEFAULTS.items()
                   if key not in self.dsn}
        try:
            # Autocommit everywhere: the writer sends its own BEGIN and COMMIT, so that
            # a commit travels in the same round trip as the inserts.
            conn = psycopg.connect(self.dsn, autocommit=True, **options)
            if role == "writer" and self.commit_policy != "always":
                conn.execute("SET synchronous_commit = off")
        except psycopg.Error as exc:
            raise BackendUnavailable(f"cannot reach PostgreSQL: {describe(exc)}") from None
        self._conns[role] = conn
        return conn

    def _drop(self, role: str) -> None:
        conn = self._conns.pop(role, None)
        if conn is not None:
            try:
                conn.close()
            except self.psycopg.Error as exc:
                log.debug("closing the %s connection: %s", role, exc)

    def _rollback_quietly(self, conn) -> None:
        try:
            conn.execute("ROLLBACK")
        except self.psycopg.Error as exc:
            log.debug("rollback failed (%s); making the connection again", exc)
            self._drop("writer")

    def _close_connections(self) -> None:
        for role in list(self._conns):
            self._drop(role)

    @property
    def available(self) -> bool:
        """False from a failure to reach PostgreSQL until the next success (INFO)."""
        return self._unavailable_since is None

    def _note_unavailable(self, exc: BackendUnavailable) -> None:
        if self._unavailable_since is None:
            self._unavailable_since = time.monotonic()
            log.error("PostgreSQL unavailable: %s", exc)

    def _note_available(self) -> None:
        if self._unavailable_since is not None:
            log.warning("PostgreSQL available again after %.1fs",
                        time.monotonic() - self._unavailable_since)
            self._unavailable_since = None
