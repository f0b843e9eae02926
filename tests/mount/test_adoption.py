"""A restarted daemon takes over the FUSE connection of a crashed one (index-only mounts).

A child process holds files of the mount open across a kill -9 of the daemon, asks for
something while no daemon runs, and goes on using its descriptors once the next daemon
has adopted the connection: no call fails, and nothing written is lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rigs.mount import MailfsMount, force_unmount, is_mounted, run_cli

# Holds a file and its directory open; runs one command per stdin line, prints the result.
CHILD = textwrap.dedent("""
    import errno, os, sys
    path = sys.argv[1]
    fd = os.open(path, os.O_RDWR)
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
    print("open", flush=True)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        try:
            if command == "stat":
                result = str(os.stat(path).st_size)
            elif command == "fstat":
                result = str(os.fstat(fd).st_size)
            elif command == "read":
                result = os.pread(fd, 4096, 0).decode()
            elif command == "write":
                result = str(os.pwrite(fd, argument.encode(), 0))
            elif command == "fsync":
                os.fsync(fd)
                result = "synced"
            elif command == "list":
                result = ",".join(sorted(os.listdir(f"/proc/self/fd/{dir_fd}")))
            else:
                result = "unknown command"
        except OSError as exc:
            result = errno.errorcode[exc.errno]
        print(result, flush=True)
""")


class Child:
    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", CHILD, str(path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin, self.stdout = self.process.stdin, self.process.stdout
        assert self.stdout.readline().strip() == "open"
        self._answers: list[str] = []
        self._reader: threading.Thread | None = None

    def send(self, command: str) -> None:
        self.stdin.write(command + "\n")
        self.stdin.flush()
        self._reader = threading.Thread(
            target=lambda: self._answers.append(self.stdout.readline().strip()), daemon=True)
        self._reader.start()

    def answer(self, timeout: float) -> str | None:
        assert self._reader is not None
        self._reader.join(timeout)
        return self._answers.pop() if self._answers else None

    def ask(self, command: str, timeout: float = 30.0) -> str | None:
        self.send(command)
        return self.answer(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.close()


@pytest.fixture
def index_mount(base: Path) -> Iterator[MailfsMount]:
    mount = MailfsMount(None, base / "mnt", base / "state", ["-o", "crash_hold=60"])
    mount.start()
    try:
        yield mount
    finally:
        try:
            mount.stop()
        finally:
            mount.kill()  # and the dead mount cleared: its keeper then has no one to hold


def status(mount: MailfsMount) -> dict[str, object] | None:
    result = run_cli("status", str(mount.mountpoint), "--json")
    if result.returncode != 0:
        return None
    found: dict[str, object] = json.loads(result.stdout)
    return found


def crash(mount: MailfsMount) -> None:
    """kill -9 of the daemon alone: its keeper holds the connection."""
    assert mount.process is not None
    mount.process.send_signal(signal.SIGKILL)
    mount.process.wait(timeout=30)


def restart(mount: MailfsMount) -> dict[str, object]:
    """The next daemon of the same state directory; returns its status once it serves."""
    mount.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = status(mount)
        if found is not None:
            return found
        assert mount.process is not None and mount.process.poll() is None, mount.log()
        time.sleep(0.1)
    raise AssertionError(f"the restarted daemon never answered status:\n{mount.log()}")


def test_calls_waiting_at_the_crash_complete_and_open_files_work_on(
        index_mount: MailfsMount, children: list[Child]) -> None:
    user = index_mount.mountpoint / "alice"
    user.mkdir()
    (user / "dovecot.index").write_bytes(b"before the crash")
    child = Child(user / "dovecot.index")
    children.append(child)
    crash(index_mount)
    child.send("stat")
    assert child.answer(1.5) is None, "a call on the crashed mount did not wait"
    after = restart(index_mount)
    assert child.answer(30) == str(len(b"before the crash")), index_mount.log()
    assert after["connection_adopted"] is True
    assert "adopting the FUSE connection" in index_mount.log()
    assert child.ask("read") == "before the crash"
    assert child.ask("write AFTER") == "5"
    assert child.ask("fsync") == "synced"
    assert child.ask("fstat") == str(len(b"before the crash"))
    assert child.ask("list") == "dovecot.index"
    adopted_nodes = status(index_mount)
    assert adopted_nodes is not None and int(str(adopted_nodes["adopted_nodes"])) >= 2
    child.close()
    index_mount.stop()
    assert not is_mounted(index_mount.mountpoint), "the adopted mount was left mounted"
    index_mount.start()
    assert (user / "dovecot.index").read_bytes() == b"AFTERe the crash"
    assert index_mount.problems() == []


def test_an_unlinked_file_held_open_survives_the_takeover(
        index_mount: MailfsMount, children: list[Child]) -> None:
    user = index_mount.mountpoint / "bob"
    user.mkdir()
    (user / "dovecot.index").write_bytes(b"the old index")
    child = Child(user / "dovecot.index")
    children.append(child)
    (user / "dovecot.index.tmp").write_bytes(b"the new index, rewritten")
    os.rename(user / "dovecot.index.tmp", user / "dovecot.index")
    crash(index_mount)
    restart(index_mount)
    assert child.ask("read") == "the old index", index_mount.log()
    assert child.ask("stat") == str(len(b"the new index, rewritten"))
    assert (user / "dovecot.index").read_bytes() == b"the new index, rewritten"
    child.close()
    index_mount.stop()
    index_mount.start()
    assert sorted(os.listdir(user)) == ["dovecot.index"]
    after = status(index_mount)
    assert after is not None and after["replicated_files"] == 2  # bob/ and his index
    assert index_mount.problems() == []


def test_a_mount_already_cleared_is_mounted_afresh(
        index_mount: MailfsMount, children: list[Child]) -> None:
    """An admin (or a test rig) lazily unmounted the crashed mount: the held connection no
    longer serves the mountpoint, and the next daemon mounts a new one."""
    (index_mount.mountpoint / "carol").mkdir()
    (index_mount.mountpoint / "carol" / "dovecot.index").write_bytes(b"kept")
    crash(index_mount)
    force_unmount(index_mount.mountpoint)
    after = restart(index_mount)
    assert after["connection_adopted"] is False
    assert (index_mount.mountpoint / "carol" / "dovecot.index").read_bytes() == b"kept"
