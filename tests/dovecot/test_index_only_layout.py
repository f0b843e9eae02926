"""Real Dovecot in the index-only layout: mail on a plain directory, INDEX= and CONTROL= on an
index-only mailfs mount. Every format, under several clients per mailbox, and across a
remount and a kill -9 of the daemon."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.imap_load import LoadConfig, LoadResult, run_load
from tests.dovecot.test_dovecot_imap import _changes, _snapshot, _workload
from tests.dovecot.test_shared_mailbox_load import MAILDIR_OWN_RACE
from tests.mount.test_durability import fill_to_the_last_page
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


@contextlib.contextmanager
def running_layout(mail_format: str, state_disk_size: str = "") -> Iterator[Layout]:
    """`state_disk_size`: the state directory on a tmpfs of that size, to fill."""
    work = Path(tempfile.mkdtemp(prefix="mfs-io-", dir="/tmp"))
    work.chmod(0o755)
    mail_root = prepare_mail_root(work / "mail")
    index_root = prepare_mail_root(work / "index")  # vmail's: the mount root shows it
    state = work / "state"
    if state_disk_size:
        state.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={state_disk_size}", "tmpfs",
                        str(state)], check=True)
    mount = MailfsMount(None, index_root, state, log_path=work / "mailfs.log")
    dovecot = Dovecot(work / "dovecot", mail_root, mail_format, index_root=index_root)
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
                if state_disk_size:
                    subprocess.run(["umount", "-l", str(state)], check=False)
                if not is_mounted(index_root):
                    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(params=MAIL_FORMATS)
def layout(request: pytest.FixtureRequest) -> Iterator[Layout]:
    with running_layout(str(request.param)) as running:
        yield running


def start_load(layout: Layout, seconds: float, results: list[LoadResult]) -> threading.Thread:
    """Three IMAP clients on one user for `seconds`; the result goes into `results`."""
    config = LoadConfig(port=layout.dovecot.port, users=["alice"],
                        password=DEFAULT_USERS["alice"], clients=3, duration=seconds,
                        populate=15)
    load = threading.Thread(target=lambda: results.append(run_load(config)))
    load.start()
    return load


def assert_no_client_errors(results: list[LoadResult]) -> None:
    assert results, "the load never finished"
    result = results[0]
    assert result.fatal == []
    assert result.total_errors == 0, result.error_samples()
    assert result.verified > 0


def mount_status(mount: MailfsMount) -> dict[str, Any]:
    status = run_cli("status", str(mount.mountpoint), "--json")
    assert status.returncode == 0, status.stderr
    return json.loads(status.stdout)  # type: ignore[no-any-return]


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
    results: list[LoadResult] = []
    load = start_load(layout, seconds=14, results=results)
    time.sleep(6)
    mount = layout.index_mount
    assert mount.process is not None
    mount.process.send_signal(signal.SIGKILL)
    mount.process.wait(timeout=30)
    time.sleep(1)  # the clients wait meanwhile
    mount.start()  # the mountpoint is still mounted: this returns at once
    load.join(timeout=300)
    assert_no_client_errors(results)
    assert mount_status(mount)["connection_adopted"] is True
    assert layout.problems() == []


@pytest.mark.parametrize("mail_format", MAIL_FORMATS)
def test_a_brief_full_state_disk_costs_dovecot_nothing(mail_format: str) -> None:
    """The state disk full for 5 s under IMAP load: changes to index files wait for room
    (full_disk_wait) instead of failing, so no client sees an error and Dovecot logs no
    error and rebuilds nothing. (With ENOSPC it logs thousands of errors and corrupted
    caches: bench/results/full_disk.txt.)"""
    with running_layout(mail_format, state_disk_size="64m") as layout:
        results: list[LoadResult] = []
        load = start_load(layout, seconds=16, results=results)
        filler = layout.index_mount.state_dir / "filler"
        try:
            time.sleep(5)
            fill_to_the_last_page(filler)
            time.sleep(5)
        finally:
            filler.unlink(missing_ok=True)
            load.join(timeout=300)
        assert_no_client_errors(results)
        counts = mount_status(layout.index_mount)
        assert counts["full_disk_held"] > 0, "the disk never filled up under the load"
        assert counts["full_disk_refused"] == 0
        # mailfs's own alarms for the admin about the full disk are expected, nothing else.
        alarms = ("LMDB commit of", "cannot journal a change to an index file ([Errno 28]")
        assert [line for line in layout.problems()
                if not any(alarm in line for alarm in alarms)] == []
