"""fsx-style random operations on one file, checked byte for byte (tests/rigs/fsx.py).

On every file class of the full overlay, on an index-only mount, and on a mail file over a
network filesystem (sshfs with latency). The same sequences run on the local disk first,
so a failure on mailfs is a difference from ext4, not a fault of the exerciser.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rigs.fsx import Exerciser, Mismatch, exercise
from tests.rigs.mount import MailfsMount, force_unmount, mounted
from tests.rigs.sshfs import sshfs_backing, sshfs_unusable

SEEDS = (1, 2, 3)
OPERATIONS = 3000
NAMES = {
    "replicated": "dovecot.index.cache",
    "volatile": "dovecot-uidlist.lock",
    "passthrough": "u.1",
}


def test_the_exerciser_agrees_with_the_local_disk(tmp_path: Path) -> None:
    for seed in SEEDS:
        exercise(tmp_path / f"file{seed}", seed, OPERATIONS)


def test_the_exerciser_notices_a_byte_changed_behind_its_back(tmp_path: Path) -> None:
    exerciser = Exerciser(tmp_path / "file", seed=7)
    try:
        exerciser.run(200)
        while len(exerciser.model) < 2:
            exerciser.write()
        os.pwrite(exerciser.fd, bytes([exerciser.model[1] ^ 0xFF]), 1)
        with pytest.raises(Mismatch, match="first wrong byte at 1"):
            exerciser.check_whole_file()
    finally:
        exerciser.close()


@pytest.mark.parametrize("file_class", sorted(NAMES))
def test_random_operations_on_the_full_overlay(mount: MailfsMount, file_class: str) -> None:
    mailbox = mount.mountpoint / "INBOX"
    mailbox.mkdir()
    for seed in SEEDS:
        exercise(mailbox / NAMES[file_class], seed, OPERATIONS)


@pytest.fixture
def index_only_root() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="mailfs-fsx-"))
    try:
        with mounted(None, base / "mnt", base / "state") as mount:
            yield mount.mountpoint
        assert mount.problems() == []
    finally:
        force_unmount(base / "mnt")
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("name", ["dovecot.index.cache", "dovecot-uidlist.lock", "notes.txt"])
def test_random_operations_on_an_index_only_mount(index_only_root: Path, name: str) -> None:
    mailbox = index_only_root / "INBOX"
    mailbox.mkdir()
    for seed in SEEDS:
        exercise(mailbox / name, seed, OPERATIONS)


def test_random_operations_on_a_mail_file_over_sshfs_with_latency() -> None:
    reason = sshfs_unusable()
    if reason is not None:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="mailfs-fsx-sshfs-"))
    base.chmod(0o755)
    try:
        with sshfs_backing(base, latency_ms=0.5) as sshfs, \
                mounted(sshfs.mountpoint, base / "mnt", base / "state") as mount:
            mailbox = mount.mountpoint / "INBOX"
            mailbox.mkdir()
            exercise(mailbox / "u.1", SEEDS[0], OPERATIONS // 2)
            # What mailfs passed through is what the store holds.
            assert (sshfs.mountpoint / "INBOX" / "u.1").read_bytes() == \
                (mailbox / "u.1").read_bytes()
        assert mount.problems() == []
    finally:
        force_unmount(base / "mnt")
        shutil.rmtree(base, ignore_errors=True)
