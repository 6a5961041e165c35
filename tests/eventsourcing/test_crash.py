"""End to end: the library's example bank-accounts application saves accounts through
MeiliES while the server is killed with ``kill -9`` and restarted, and a projection
counts the application's events into a materialised view on the same server.

Afterwards every account reloads with exactly the state its last successful save
gave it, and the view, after its runner was stopped part-way and a new one resumed
from the view's tracking position, has counted every event exactly once. What makes
that hold: the server keeps every acknowledged write through a crash (PROTOCOL.md,
"Durability"); the recorders retry a write whose reply was lost with the same event
ids, which the server answers without storing it twice ("Idempotent appends"); a
view's counter and its tracking record are one transaction ("Transactions"); and the
subscription resumes after the last position it yielded.
"""

from __future__ import annotations

import random
import threading
import time
from decimal import Decimal
from uuid import UUID

from eventsourcing.projection import Projection, ProjectionRunner
from eventsourcing.tests.application import BankAccounts
from eventsourcing.tests.domain import BankAccount

from meilies.client import Client
from serverproc import ServerProcess, free_port, wait_for
from views import MeiliesEventCounters

KILLS = 3
#: Saves between two kills (the writer keeps saving while the server is down).
SAVES_BETWEEN_KILLS = 40


class Bank(BankAccounts):
    name = "Bank"
    snapshotting_intervals = {BankAccount: 4}  # snapshots are written through crashes too


class BankCounters(Projection[MeiliesEventCounters]):
    name = "BankCounters"

    def process_event(self, domain_event, tracking) -> None:  # type: ignore[override]
        if isinstance(domain_event, BankAccount.Opened):
            self.view.incr_created_event_counter(tracking)
        else:
            self.view.incr_subsequent_event_counter(tracking)


class Writer(threading.Thread):
    """Opens and credits accounts until told to stop; ``expected`` is what each
    account must hold after the last save that returned."""

    def __init__(self, env: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.app = Bank(env=env)
        self.expected: dict[UUID, tuple[Decimal, int]] = {}
        self.saves = 0
        self.credits = 0
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        rng = random.Random(13)
        try:
            while not self.stopping.is_set():
                if not self.expected or rng.random() < 0.25:
                    account_id = self.app.open_account("Alice", "alice@example.com")
                    self.expected[account_id] = (Decimal("0.00"), 1)
                else:
                    account_id = rng.choice(list(self.expected))
                    amount = Decimal(rng.randint(1, 10_000)) / 100
                    self.app.credit_account(account_id, amount)
                    balance, version = self.expected[account_id]
                    self.expected[account_id] = (balance + amount, version + 1)
                    self.credits += 1
                self.saves += 1
        except BaseException as exc:  # the test reports it
            self.error = exc


def test_bank_accounts_survive_kill_9_and_a_resumed_projection_counts_once(tmp_path,
                                                                         caplog) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    server = ServerProcess(data_dir, port=port).start()
    env = {"PERSISTENCE_MODULE": "meilies.eventsourcing", "MEILIES_PORT": str(port),
           "MEILIES_RETRY_SECONDS": "60", "MEILIES_TIMEOUT": "10"}
    writer = Writer(env)
    runner = ProjectionRunner(application_class=Bank, projection_class=BankCounters,
                              view_class=MeiliesEventCounters, env=env)
    try:
        with runner:
            writer.start()
            for kill in range(KILLS):
                target = writer.saves + SAVES_BETWEEN_KILLS
                wait_for(lambda: writer.saves >= target or writer.error,
                         what=f"{SAVES_BETWEEN_KILLS} saves before kill {kill + 1}")
                time.sleep(random.uniform(0, 0.01))  # not always between two saves
                server.kill()
                server = ServerProcess(data_dir, port=port).start()
        # The first runner stopped part-way; the writer goes on, through one more kill.
        target = writer.saves + SAVES_BETWEEN_KILLS
        wait_for(lambda: writer.saves >= target or writer.error, what="saves")
        server.kill()
        server = ServerProcess(data_dir, port=port).start()
        target = writer.saves + 10
        wait_for(lambda: writer.saves >= target or writer.error, what="saves after")
        writer.stopping.set()
        writer.join(timeout=60)
        assert writer.error is None, f"a save failed: {writer.error!r}"

        # Every saved account reloads with its exact state, in a new application.
        app = Bank(env=env)
        for account_id, (balance, version) in writer.expected.items():
            account = app.get_account(account_id)
            assert (account.balance, account.version) == (balance, version), account_id
        # ... and no event was stored twice: each stream holds exactly its versions.
        client = Client(port=port)
        for account_id, (_, version) in writer.expected.items():
            events = client.range(f"Bank.events.{account_id}")
            assert [int(e.metadata) for e in events] == list(range(1, version + 1))
        notifications = app.recorder.select_notifications(None, 100_000)
        assert len(notifications) == len(writer.expected) + writer.credits

        # Writes were cut by the kills and retried (not merely paused between saves).
        retried = [r for r in caplog.records if r.name == "meilies.eventsourcing"]
        assert retried, "no operation was retried: the kills hit nothing"

        # A new runner resumes from the view's tracking position and counts the rest.
        last = app.recorder.max_notification_id()
        assert runner.projection.view.max_tracking_id("Bank") < last
        with ProjectionRunner(application_class=Bank, projection_class=BankCounters,
                              view_class=MeiliesEventCounters, env=env) as resumed:
            view = resumed.projection.view
            view.wait("Bank", last, timeout=60)
            assert view.get_created_event_counter() == len(writer.expected)
            assert view.get_subsequent_event_counter() == writer.credits
        assert len(writer.expected) > 10 and writer.credits > 50
    finally:
        writer.stopping.set()
        server.kill()
