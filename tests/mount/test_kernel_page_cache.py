"""The kernel keeps the pages Dovecot writes: libfuse's auto_inval_data is off.

With it on (libfuse's default, which pyfuse3 cannot change), every write made the kernel
drop the page it had just written and read it back from the daemon: about one READ per
IMAP operation. mailfs wraps libfuse's session setup (fs/session/fuse_caps.c) to turn it
off, and `cache.auto_inval_data = true` turns it back on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.rigs.mount import MailfsMount, run_cli

ROUNDS = 50


def status(mountpoint: Path) -> dict:  # type: ignore[type-arg]
    result = run_cli("status", str(mountpoint), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def reads_after_writes(mountpoint: Path, name: str) -> int:
    """READ requests the daemon saw while a file was appended to and read back."""
    path = mountpoint / name
    before = status(mountpoint)["requests"].get("read", 0)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for n in range(ROUNDS):
            os.write(fd, b"%05d" % n)
            assert os.pread(fd, 5, 5 * n) == b"%05d" % n
    finally:
        os.close(fd)
    return int(status(mountpoint)["requests"].get("read", 0)) - before


@pytest.mark.parametrize("name", ["dovecot.index.log", "m.1"])
def test_written_pages_stay_in_the_kernel(make_mount, name: str) -> None:  # type: ignore[no-untyped-def]
    mount: MailfsMount = make_mount()
    session = status(mount.mountpoint)["fuse_session"]
    assert session["auto_inval_data"] is False
    # Appends then follow fcntl(F_SETFL) on index files whose size a peer moved.
    assert session["writes_tagged"] is True
    assert reads_after_writes(mount.mountpoint, name) <= 1


def test_auto_inval_data_can_be_turned_back_on(make_mount) -> None:  # type: ignore[no-untyped-def]
    mount: MailfsMount = make_mount(("-o", "auto_inval_data=true"))
    assert status(mount.mountpoint)["fuse_session"]["auto_inval_data"] is True
    assert reads_after_writes(mount.mountpoint, "dovecot.index.log") >= ROUNDS - 1
