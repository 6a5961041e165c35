"""A system of the library's applications on one MeiliES server: the bank-accounts
application leads, a process application follows it, each with its own namespace,
under the single- and the multi-threaded runner; a follower that was not running
catches up from its tracking position through the leader's notification log."""

from __future__ import annotations

from uuid import NAMESPACE_URL, UUID, uuid5

import pytest
from eventsourcing.application import AggregateNotFoundError
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.domain import Aggregate, event
from eventsourcing.system import (MultiThreadedRunner, ProcessApplication,
                                  SingleThreadedRunner, System)
from eventsourcing.tests.application import BankAccounts, EmailAddressAsStr
from eventsourcing.tests.domain import BankAccount

from serverproc import wait_for


class Welcomes(Aggregate):
    """How many welcome emails went out: one aggregate, one event per account."""

    def __init__(self) -> None:
        self.account_ids: list[UUID] = []

    @classmethod
    def create_id(cls) -> UUID:
        return uuid5(NAMESPACE_URL, "/welcomes")

    @event("Sent")
    def send(self, account_id: UUID) -> None:
        self.account_ids.append(account_id)


class Emails(ProcessApplication[UUID]):
    def register_transcodings(self, transcoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(EmailAddressAsStr())  # the accounts' events hold one

    @singledispatchmethod
    def policy(self, domain_event, processing_event) -> None:
        if isinstance(domain_event, BankAccount.Opened):
            welcomes = self.welcomes() or Welcomes()
            welcomes.send(domain_event.originator_id)
            processing_event.collect_events(welcomes)

    def welcomes(self) -> Welcomes | None:
        try:
            return self.repository.get(Welcomes.create_id())
        except AggregateNotFoundError:
            return None

    def sent(self) -> list[UUID]:
        welcomes = self.welcomes()
        return [] if welcomes is None else welcomes.account_ids


SYSTEM = System(pipes=[[BankAccounts, Emails]])


@pytest.fixture
def env(server) -> dict[str, str]:
    return {"PERSISTENCE_MODULE": "meilies.eventsourcing", "MEILIES_PORT": str(server.port)}


def open_accounts(app: BankAccounts, count: int) -> list[UUID]:
    return [app.open_account(f"Customer {i}", f"c{i}@example.com") for i in range(count)]


def test_a_follower_processes_each_event_once_and_catches_up_after_a_stop(env) -> None:
    runner = SingleThreadedRunner(SYSTEM, env=env)
    runner.start()
    accounts = open_accounts(runner.get(BankAccounts), 3)
    assert runner.get(Emails).sent() == accounts
    runner.stop()

    # Accounts opened while the follower does not run ...
    alone = BankAccounts(env=env)
    accounts += open_accounts(alone, 4)
    alone.credit_account(accounts[0], 10)

    # ... are pulled (select_notifications from its tracking position) on the next
    # recording event the leader sends, before that one is processed.
    runner = SingleThreadedRunner(SYSTEM, env=env)
    runner.start()
    accounts += open_accounts(runner.get(BankAccounts), 1)
    emails = runner.get(Emails)
    assert emails.sent() == accounts
    assert emails.recorder.max_tracking_id("BankAccounts") == \
        runner.get(BankAccounts).recorder.max_notification_id()
    # The two applications' logs are apart: the follower's holds its own events only.
    own = emails.recorder.select_notifications(start=None, limit=100)
    assert {n.originator_id for n in own} == {Welcomes.create_id()}
    assert len(own) == 1 + len(accounts)  # Welcomes.Created, then one Sent each
    runner.stop()


def test_the_multi_threaded_runner(env) -> None:
    runner = MultiThreadedRunner(SYSTEM, env=env)
    runner.start()
    try:
        accounts = open_accounts(runner.get(BankAccounts), 5)
        emails = runner.get(Emails)
        wait_for(lambda: len(emails.sent()) == len(accounts), what="emails")
        assert sorted(emails.sent()) == sorted(accounts)
    finally:
        runner.stop()
