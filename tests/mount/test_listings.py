"""Lookups of missing names answered from a directory's listing (network stores only).

The threads call path (what a network store gets) is forced over a local directory, so the
backing store can be changed behind mailfs and compared. The rules are in
`mailfs/fs/listings.py`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.mount.conftest import Dirs
from tests.rigs.cluster import wait_for
from tests.rigs.mount import MailfsMount, run_cli

TTL = 2.0


def counters(mount: MailfsMount) -> dict[str, int]:
    status = json.loads(run_cli("status", str(mount.mountpoint), "--json", check=True).stdout)
    return {key: value for key, value in status.items() if key.startswith("listing")}


def read_since(mount: MailfsMount, reads: int) -> bool:
    return counters(mount)["listings_read"] > reads


def listing_ready(mount: MailfsMount, directory: Path) -> None:
    """A fresh listing of `directory`: a miss there queues the background read."""
    for attempt in range(50):
        before = counters(mount)
        assert not (directory / f"probe-{time.monotonic_ns()}").exists()
        after = counters(mount)
        if after["listing_missing_answered"] > before["listing_missing_answered"]:
            return
        if attempt == 0:
            wait_for(partial(read_since, mount, before["listings_read"]),
                     timeout=10, what="the background listing read")
    raise AssertionError("the listing never answered")


@pytest.fixture
def mount(make_mount) -> Iterator[MailfsMount]:  # type: ignore[no-untyped-def]
    yield make_mount(("-o", "backing_calls=threads", "-o", f"passthrough_timeout={TTL}"))


def test_missing_names_are_answered_from_the_listing_and_own_changes_show_at_once(
        mount: MailfsMount, dirs: Dirs) -> None:
    box = mount.mountpoint / "box"
    box.mkdir()
    (box / "kept").write_bytes(b"1")
    listing_ready(mount, box)
    answered = counters(mount)["listing_missing_answered"]
    for number in range(5):
        assert not (box / f"missing-{number}").exists()
    assert counters(mount)["listing_missing_answered"] >= answered + 5
    # The listing follows this mount's own changes.
    (box / "new").write_bytes(b"2")
    assert (box / "new").read_bytes() == b"2"
    os.rename(box / "new", box / "renamed")
    assert not (box / "new").exists() and (box / "renamed").exists()
    os.link(box / "renamed", box / "linked")
    assert (box / "linked").exists()
    os.unlink(box / "renamed")
    assert not (box / "renamed").exists()
    (box / "sub").mkdir()
    assert (box / "sub").is_dir()
    with open(box / "excl", "x") as made:  # O_EXCL: the kernel always asks again
        made.write("3")
    assert sorted(os.listdir(box)) == sorted(os.listdir(dirs.backing / "box"))
    assert mount.problems() == []


def test_a_name_made_behind_mailfs_shows_within_the_timeout_or_after_a_flush(
        mount: MailfsMount, dirs: Dirs) -> None:
    box = mount.mountpoint / "box"
    box.mkdir()
    listing_ready(mount, box)
    (dirs.backing / "box" / "delivered").write_bytes(b"mail")
    started = time.monotonic()
    wait_for(lambda: (box / "delivered").exists(), timeout=TTL + 3,
             what="a file made on the backing store directly")
    assert time.monotonic() - started <= TTL + 3
    listing_ready(mount, box)
    (dirs.backing / "box" / "second").write_bytes(b"mail")
    run_cli("flush", str(mount.mountpoint), "--caches", check=True)
    assert (box / "second").exists()
