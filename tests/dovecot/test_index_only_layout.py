"""Real Dovecot in the index-only layout: mail on a plain directory, INDEX= and CONTROL= on an
index-only mailfs mount. Every format, under several clients per mailbox, and across a
remount and a kill -9 of the daemon."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.imap_load import LoadConfig, run_load
from tests.dovecot.test_dovecot_imap import _changes, _snapshot, _workload
from tests.dovecot.test_shared_mailbox_load import MAILDIR_OWN_RACE
from tests.rigs.dovecot import DEFAULT_USERS, MAIL_FORMATS, Dovecot, prepare_mail_root
from tests.rigs.mount import MailfsMount, force_unmount, is_mounted, run_cli

pytestmark = [pytest.mark.dovecot, pytest.mark.timeout(600)]


@dataclass
class Layout:
    mail_root: Path
    index_mount: MailfsMount
    dovecot: Dovecot

    def restart(self, how: str) -> None:
        self.dovecot.stop()
        if how == "kill9":
            result = run_cli("flush", str(self.index_mount.mountpoint))
            assert result.returncode == 0, result.stderr
            self.index_mount.kill()
        else:
            self.index_mount.stop()
        self.index_mount.start()
        self.dovecot.start()

    def problems(self) -> list[str]:
        repairs = [line for line in self.dovecot.index_rebuild_lines()
                   if MAILDIR_OWN_RACE not in line]
        return self.dovecot.log_problems() + repairs + self.index_mount.problems()


@pytest.fixture(params=MAIL_FORMATS)
def layout(request: pytest.FixtureRequest) -> Iterator[Layout]:
    work = Path(tempfile.mkdtemp(prefix="mfs-io-", dir="/tmp"))
    work.chmod(0o755)
    mail_root = prepare_mail_root(work / "mail")
    index_root = prepare_mail_root(work / "index")  # vmail's: the mount root shows it
    mount = MailfsMount(None, index_root, work / "state", log_path=work / "mailfs.log")
    dovecot = Dovecot(work / "dovecot", mail_root, str(request.param), index_root=index_root)
    try:
        mount.start()
        dovecot.start()
        yield Layout(mail_root, mount, dovecot)
    finally:
        try:
            dovecot.stop()
        finally:
            dovecot.kill()
            try:
                mount.stop()
            finally:
                mount.kill()
                print(f"--- mailfs log\n{mount.log()[-20000:]}")
                print(f"--- dovecot log\n{dovecot.log_text()[-20000:]}")
                force_unmount(index_root)
                if not is_mounted(index_root):
                    shutil.rmtree(work, ignore_errors=True)


def index_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("dovecot*") if p.is_file()]


def test_dovecot_keeps_indexes_on_the_index_only_mount(layout: Layout) -> None:
    config = LoadConfig(port=layout.dovecot.port, users=["alice"],
                        password=DEFAULT_USERS["alice"], clients=3, duration=6, populate=15)
    result = run_load(config)
    assert result.fatal == []
    assert result.total_errors == 0, result.error_samples()
    assert result.verified > 0
    assert index_files(layout.index_mount.mountpoint), "no index file reached the mount"
    assert index_files(layout.mail_root) == [], "index files were written next to the mail"
    assert layout.problems() == []


@pytest.mark.parametrize("how", ["umount", "kill9"])
def test_restart_keeps_uids_flags_and_uidvalidity(layout: Layout, how: str) -> None:
    _workload(layout.dovecot)
    before = _snapshot(layout.dovecot)
    layout.restart(how)
    assert _changes(before, _snapshot(layout.dovecot)) == []
    assert layout.problems() == []


def test_dovecot_rides_through_a_daemon_crash(layout: Layout) -> None:
    """kill -9 of the index-only daemon under IMAP load, Dovecot left running: the next
    daemon adopts the held connection, and neither the clients nor Dovecot's log see it."""
    config = LoadConfig(port=layout.dovecot.port, users=["alice"],
                        password=DEFAULT_USERS["alice"], clients=3, duration=14, populate=15)
    results = []
    load = threading.Thread(target=lambda: results.append(run_load(config)))
    load.start()
    time.sleep(6)
    mount = layout.index_mount
    assert mount.process is not None
    mount.process.send_signal(signal.SIGKILL)
    mount.process.wait(timeout=30)
    time.sleep(1)  # the clients wait meanwhile
    mount.start()  # the mountpoint is still mounted: this returns at once
    load.join(timeout=300)
    assert results, "the load never finished"
    result = results[0]
    assert result.fatal == []
    assert result.total_errors == 0, result.error_samples()
    assert result.verified > 0
    status = run_cli("status", str(mount.mountpoint), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["connection_adopted"] is True
    assert layout.problems() == []
