"""A directory's attributes after mailfs changed something in it, on both backing call paths.

On a local disk (inline calls) each changing call takes the directory's lstat right after the
change. On a network store (worker threads) that lstat would be one more round trip inside
every create, unlink and rename, so mailfs derives the new attributes from the last known
ones instead (`MailFS._dir_changed`). Here the threads path is forced over a local directory,
so the derived attributes can be compared with what the backing store really has.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.mount.conftest import Dirs
from tests.rigs.mount import MailfsMount, run_cli

# (what, the change, the directory whose attributes it changes)
CHANGES: list[tuple[str, Callable[[Path], object], str]] = [
    ("create", lambda root: (root / "a" / "new").write_bytes(b"x"), "a"),
    ("mkdir", lambda root: (root / "a" / "sub").mkdir(), "a"),
    ("link", lambda root: os.link(root / "a" / "new", root / "a" / "new2"), "a"),
    ("unlink", lambda root: os.unlink(root / "a" / "new2"), "a"),
    ("rename", lambda root: os.rename(root / "a" / "new", root / "a" / "renamed"), "a"),
    ("rename into", lambda root: os.rename(root / "a" / "renamed", root / "b" / "moved"), "b"),
    ("move a dir out", lambda root: os.rename(root / "a" / "sub", root / "b" / "sub"), "a"),
    ("move a dir in", lambda root: os.rename(root / "b" / "sub", root / "a" / "sub"), "a"),
    ("replace a dir", lambda root: (
        (root / "b" / "empty").mkdir(), os.rename(root / "b" / "empty", root / "a" / "sub")),
        "a"),
    ("rmdir", lambda root: (root / "a" / "sub").rmdir(), "a"),
]


@pytest.mark.parametrize("calls", ["inline", "threads"])
def test_directory_attributes_follow_every_change(make_mount, dirs: Dirs,  # type: ignore[no-untyped-def]
                                                  calls: str) -> None:
    mount: MailfsMount = make_mount(("-o", f"backing_calls={calls}"))
    status = run_cli("status", str(dirs.mnt), "--json", check=True)
    assert f'"backing_call_mode": "{calls}"' in status.stdout
    root = dirs.mnt
    for name in ("a", "b"):
        (root / name).mkdir()
    derived = 0
    for what, change, where in CHANGES:
        seen_before = os.stat(root / where)
        time.sleep(0.002)
        change(root)
        seen = os.stat(root / where)
        real = os.stat(dirs.backing / where)
        assert seen.st_mtime_ns > seen_before.st_mtime_ns, what
        assert seen.st_ctime_ns > seen_before.st_ctime_ns, what
        assert seen.st_nlink == real.st_nlink, what
        assert (seen.st_mode, seen.st_uid, seen.st_gid, seen.st_ino) == (
            real.st_mode, real.st_uid, real.st_gid, seen_before.st_ino), what
        derived += seen.st_mtime_ns != real.st_mtime_ns
    if calls == "inline":
        assert derived == 0, "the lstat taken inside the change is the backing store's own"
    else:
        assert derived > 0, "derived attributes carry mailfs's clock, not the store's"
        # Dropping the caches brings the store's own values back.
        run_cli("flush", str(dirs.mnt), "--caches", check=True)
        assert os.stat(root / "a").st_mtime_ns == os.stat(dirs.backing / "a").st_mtime_ns
    assert mount.problems() == []


@pytest.mark.parametrize("calls", ["inline", "threads"])
def test_a_renamed_directory_shows_its_new_ctime(make_mount, dirs: Dirs,  # type: ignore[no-untyped-def]
                                                 calls: str) -> None:
    """A rename moves the renamed directory's own ctime. The attributes mailfs kept from the
    last change inside it (a create) were served after the rename, until they expired
    (found by a randomized comparison with ext4)."""
    mount: MailfsMount = make_mount(("-o", f"backing_calls={calls}"))
    root = dirs.mnt
    (root / "box").mkdir()
    (root / "box" / "message").write_bytes(b"x")  # mailfs now holds the directory's attributes
    before = os.stat(root / "box")
    time.sleep(0.01)
    os.rename(root / "box", root / "renamed")
    seen = os.stat(root / "renamed")
    assert seen.st_ctime_ns > before.st_ctime_ns
    assert seen.st_ctime_ns == os.stat(dirs.backing / "renamed").st_ctime_ns
    assert mount.problems() == []
