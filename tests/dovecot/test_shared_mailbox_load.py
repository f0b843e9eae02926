"""Several IMAP clients on one user's mailboxes at once, under the project's load generator.

A user's phone, laptop and webmail all work on the same mailboxes, so Dovecot processes
share index files, mail files and their fcntl locks. With one client per user this path
was never exercised, and mailfs made Dovecot panic on it (issue 7: fstat of a descriptor
that another request closed). Every format runs on mailfs and, as the control, on a plain
directory.

MAILFS_TEST_CLIENTS_PER_USER (default 3) and MAILFS_TEST_LOAD_SECONDS (default 8) change
the load; the benchmark runs the same generator longer (bench/run_all.py).
"""

from __future__ import annotations

import os

import pytest

from bench.imap_load import LoadConfig, run_load
from tests.rigs.dovecot import DEFAULT_USERS, Dovecot
from tests.rigs.mailstore import MailStore

pytestmark = [pytest.mark.dovecot, pytest.mark.timeout(600)]

USER = "alice"
# Dovecot's own maildir race between sessions syncing one uidlist, logged as a Warning on a
# plain local directory too (seen in the control runs of this test): not a filesystem fault.
MAILDIR_OWN_RACE = "Duplicate file entry"


def test_clients_sharing_a_mailbox(dovecot: Dovecot, store: MailStore) -> None:
    clients = int(os.environ.get("MAILFS_TEST_CLIENTS_PER_USER", "3"))
    seconds = float(os.environ.get("MAILFS_TEST_LOAD_SECONDS", "8"))
    config = LoadConfig(port=dovecot.port, users=[USER], password=DEFAULT_USERS[USER],
                        clients=clients, duration=seconds, populate=20)
    result = run_load(config)
    assert result.fatal == []
    assert result.total_errors == 0, result.error_samples()
    assert result.total_ops > 0
    assert result.verified > 0, "no whole body was checked against what was appended"
    assert dovecot.log_problems() == [], "Dovecot logged Error, Panic or Fatal lines"
    repairs = [line for line in dovecot.index_rebuild_lines() if MAILDIR_OWN_RACE not in line]
    assert repairs == [], "Dovecot repaired or rebuilt indexes"
    assert store.problems() == [], "mailfs logged problems"
