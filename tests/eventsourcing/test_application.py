"""The library's application test cases on MeiliES: its example bank-accounts
application (snapshots included) and the generic ``ApplicationTestCase``."""

from __future__ import annotations

from eventsourcing.tests import application as cases

from support import MeiliesServerCase


class TestExampleApplication(MeiliesServerCase, cases.ExampleApplicationTestCase):
    expected_factory_topic = "meilies.eventsourcing.factory:MeiliesFactory"


class TestApplication(MeiliesServerCase, cases.ApplicationTestCase):
    pass
