"""Opens of mail files answered from what the store said a moment ago.

On a network store, mailfs opens a passthrough file on the store only when a read, write
or fsync reaches it, as long as the file's attributes were read from the store less than
`passthrough_timeout` ago and nothing this mount did has changed it since
(`mailfs/fs/freshness.py`, `MailFS._remembered_version`). The threads call path (what a
network store gets) is forced over a local directory, so the store can be changed behind
mailfs.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mount.conftest import Dirs
from tests.rigs.mount import MailfsMount, run_cli

TTL = 30.0


def counters(mount: MailfsMount) -> dict[str, int]:
    status = json.loads(run_cli("status", str(mount.mountpoint), "--json", check=True).stdout)
    return {key: status[key] for key in ("opens_remembered", "opens_completed")}


def read_through_open(path: os.PathLike[str] | str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)


def known_to_mailfs(mount: MailfsMount, dirs: Dirs, name: str, body: bytes) -> Path:
    """A file put on the store directly, then looked up through the mount (which reads
    its attributes from the store: a later open may be remembered)."""
    (dirs.backing / name).write_bytes(body)
    path = mount.mountpoint / name
    assert path.stat().st_size == len(body)
    return path


@pytest.fixture
def mount(make_mount) -> Iterator[MailfsMount]:  # type: ignore[no-untyped-def]
    yield make_mount(("-o", "backing_calls=threads", "-o", f"passthrough_timeout={TTL}"))


def test_an_open_after_a_lookup_needs_the_store_only_for_the_read(
        mount: MailfsMount, dirs: Dirs) -> None:
    (dirs.backing / "cur").mkdir()
    (dirs.backing / "cur" / "1.M1:2,").write_bytes(b"message one")
    message = mount.mountpoint / "cur" / "1.M1:2,"
    assert message.stat().st_size == len(b"message one")  # the lookup reads the store
    before = counters(mount)
    # Nothing in the kernel's page cache yet: the read reaches mailfs, which opens now.
    assert read_through_open(message) == b"message one"
    after = counters(mount)
    assert after["opens_remembered"] == before["opens_remembered"] + 1
    assert after["opens_completed"] == before["opens_completed"] + 1
    # The pages are the kernel's now (keep_cache): no read, no store at all.
    assert read_through_open(message) == b"message one"
    again = counters(mount)
    assert again["opens_remembered"] == after["opens_remembered"] + 1
    assert again["opens_completed"] == after["opens_completed"]


def test_writes_through_the_mount_make_the_next_open_ask_the_store(
        mount: MailfsMount, dirs: Dirs) -> None:
    message = mount.mountpoint / "draft"
    message.write_bytes(b"first")
    assert read_through_open(message) == b"first"
    fd = os.open(message, os.O_WRONLY)
    try:
        os.pwrite(fd, b"second, longer", 0)
    finally:
        os.close(fd)
    before = counters(mount)
    assert read_through_open(message) == b"second, longer"
    assert counters(mount)["opens_remembered"] == before["opens_remembered"]
    os.truncate(message, 3)
    assert read_through_open(message) == b"sec"
    assert counters(mount)["opens_remembered"] == before["opens_remembered"]


def test_a_read_write_open_opens_the_store_at_its_first_write(
        mount: MailfsMount, dirs: Dirs) -> None:
    """sdbox opens its mail files O_RDWR, also just to read them."""
    message = known_to_mailfs(mount, dirs, "u.1", b"body")
    before = counters(mount)
    fd = os.open(message, os.O_RDWR)
    try:
        assert counters(mount)["opens_remembered"] == before["opens_remembered"] + 1
        assert os.pwrite(fd, b"BO", 0) == 2
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (dirs.backing / "u.1").read_bytes() == b"BOdy"
    assert counters(mount)["opens_completed"] == before["opens_completed"] + 1
    assert read_through_open(message) == b"BOdy"


def test_ftruncate_through_a_remembered_open_acts_on_its_file(
        mount: MailfsMount, dirs: Dirs) -> None:
    """Not on whatever holds the name by then: the file is opened for it first."""
    message = known_to_mailfs(mount, dirs, "u.1", b"the message")
    fd = os.open(message, os.O_RDWR)
    try:
        os.ftruncate(fd, 3)
        assert os.fstat(fd).st_size == 3
    finally:
        os.close(fd)
    assert (dirs.backing / "u.1").read_bytes() == b"the"


def test_fsync_of_a_remembered_open_reaches_the_store(mount: MailfsMount, dirs: Dirs) -> None:
    """fsync covers what other handles wrote, so it is never skipped."""
    message = known_to_mailfs(mount, dirs, "m", b"body")
    before = counters(mount)
    fd = os.open(message, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    after = counters(mount)
    assert after["opens_remembered"] == before["opens_remembered"] + 1
    assert after["opens_completed"] == before["opens_completed"] + 1


def test_o_trunc_always_goes_to_the_store(mount: MailfsMount, dirs: Dirs) -> None:
    (dirs.backing / "m").write_bytes(b"body")
    message = mount.mountpoint / "m"
    assert message.stat().st_size == 4
    before = counters(mount)
    os.close(os.open(message, os.O_WRONLY | os.O_TRUNC))
    assert counters(mount)["opens_remembered"] == before["opens_remembered"]
    assert (dirs.backing / "m").read_bytes() == b""


def test_a_file_gone_from_the_store_fails_the_read_with_estale_and_a_flush_forgets_it(
        mount: MailfsMount, dirs: Dirs) -> None:
    """Something outside mailfs and its peers deleted the file within the ttl: the open
    still succeeds (as the kernel's cached entry would let it anyway), and a read that
    needs the store gets ESTALE, as on NFS. After `mailfs flush --caches`, the kernel
    looks the name up again and the open fails."""
    (dirs.backing / "gone").write_bytes(b"soon deleted")
    (dirs.backing / "kept").write_bytes(b"stays")
    gone, kept = mount.mountpoint / "gone", mount.mountpoint / "kept"
    assert gone.stat().st_size and kept.stat().st_size
    (dirs.backing / "gone").unlink()
    fd = os.open(gone, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as failed:
            os.pread(fd, 100, 0)
        assert failed.value.errno == errno.ESTALE
    finally:
        os.close(fd)

    run_cli("flush", str(mount.mountpoint), "--caches", check=True)
    with pytest.raises(FileNotFoundError):
        read_through_open(gone)
    assert read_through_open(kept) == b"stays"


def test_local_stores_always_open_on_the_store(make_mount, dirs: Dirs) -> None:  # type: ignore[no-untyped-def]
    mount: MailfsMount = make_mount(("-o", "backing_calls=inline"))
    (dirs.backing / "m").write_bytes(b"body")
    assert (mount.mountpoint / "m").stat().st_size == 4
    assert read_through_open(mount.mountpoint / "m") == b"body"
    assert read_through_open(mount.mountpoint / "m") == b"body"
    assert counters(mount)["opens_remembered"] == 0


@pytest.mark.parametrize("inodes", ["stable", "unstable"])
@pytest.mark.parametrize("how", ["unlink", "rename over"])
def test_a_remembered_open_stays_readable_after_its_name_goes_through_the_mount(
        make_mount, dirs: Dirs, how: str, inodes: str) -> None:  # type: ignore[no-untyped-def]
    """POSIX: an open file outlives its last name. A maildir expunge or an sdbox move by
    one Dovecot process while another reads the message.

    With unstable inode numbers (sshfs), opening by name waits for a name change of the
    file in flight: a first version opened the handles from inside the unlink's own name
    change and hung (IMAP timeouts in the sdbox benchmark over sshfs)."""
    mount: MailfsMount = make_mount(("-o", "backing_calls=threads", "-o",
                                     f"passthrough_timeout={TTL}", "-o",
                                     f"backing_inodes={inodes}"))
    (dirs.backing / "u.1").write_bytes(b"the message")
    (dirs.backing / "u.2").write_bytes(b"another one")
    message = mount.mountpoint / "u.1"
    assert message.stat().st_size == len(b"the message")
    before = counters(mount)
    fd = os.open(message, os.O_RDONLY)
    try:
        assert counters(mount)["opens_remembered"] == before["opens_remembered"] + 1
        if how == "unlink":
            message.unlink()
        else:
            os.rename(mount.mountpoint / "u.2", message)
        assert not (dirs.backing / "u.1").exists() or how != "unlink"
        assert os.pread(fd, 100, 0) == b"the message"
    finally:
        os.close(fd)
