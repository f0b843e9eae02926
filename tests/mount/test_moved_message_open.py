"""A message moved between folders stays readable under its new name, whatever else happens.

Dovecot moves an sdbox or mdbox message with link(): the file gets a second name in the
target folder, then the source name is unlinked when the source mailbox is expunged. Another
client opens the message through its new name meanwhile. The kernel does not lock a file
against open() while one of its other names is unlinked, and mailfs opens backing files by
name: it used the name it knew first, which the backing store no longer had, so the open
failed with ENOENT although the file was there under its new name. Dovecot then logged
`dbox: Unexpectedly lost uid` and reset the mailbox's index (issue 7, sdbox, 3-4 clients per
mailbox).

Also pins the readdir side of the same problem: a directory listing is handed to the
kernel over several requests, and a name renamed in between must not come back bound to
the moved file.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

from tests.mount.test_shared_open_files import contended_cpu
from tests.rigs.mount import MailfsMount

MOVE_SECONDS = 8.0
ENOUGH_MOVES = 150
MOVERS = 2
READERS = 3


def _move_messages(inbox: Path, sent: Path, mover: int, latest: multiprocessing.Array,
                   stop: EventType) -> None:  # type: ignore[type-arg]
    number = 0
    while not stop.is_set():
        number += 1
        name = f"u.{mover}.{number}"
        temp = inbox / f"temp.{mover}.{number}"
        temp.write_bytes(b"message %d %d\n" % (mover, number) * 64)
        os.rename(temp, inbox / name)
        os.link(inbox / name, sent / f"temp.{name}")
        os.rename(sent / f"temp.{name}", sent / name)
        latest[mover] = number  # readers now race the unlink below
        os.unlink(inbox / name)


def _read_moved(sent: Path, latest: multiprocessing.Array, stop: EventType,
                failures: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    while not stop.is_set():
        for mover in range(MOVERS):
            number = latest[mover]
            if number == 0:
                continue
            path = sent / f"u.{mover}.{number}"
            try:
                with open(path, "rb") as message:
                    if not message.read().startswith(b"message %d " % mover):
                        failures.put(f"{path.name}: wrong content")
            except FileNotFoundError:
                failures.put(f"{path.name}: ENOENT on open, exists: {path.exists()}")


def _list_and_check(folder: Path, stop: EventType,
                    failures: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    while not stop.is_set():
        for entry in os.scandir(folder):
            try:
                inode = entry.inode()
                now = os.stat(entry.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                continue  # renamed or unlinked since the listing: fine
            if entry.name.startswith("temp.") and inode != now:
                failures.put(f"{entry.name}: listed as inode {inode}, stat says {now}")


def test_a_moved_message_opens_under_its_new_name_while_the_old_one_is_expunged(
        make_mount) -> None:  # type: ignore[no-untyped-def]
    # Zero entry timeout: every open looks its name up, as after the kernel forgot it.
    mount: MailfsMount = make_mount(("-o", "passthrough_timeout=0"))
    inbox, sent = mount.mountpoint / "INBOX", mount.mountpoint / "Sent"
    inbox.mkdir()
    sent.mkdir()
    stop = multiprocessing.Event()
    latest = multiprocessing.Array("l", MOVERS)
    failures: multiprocessing.Queue[str] = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_move_messages,
                                       args=(inbox, sent, n, latest, stop))
               for n in range(MOVERS)]
    workers += [multiprocessing.Process(target=_read_moved, args=(sent, latest, stop, failures))
                for _ in range(READERS)]
    workers.append(multiprocessing.Process(target=_list_and_check,
                                           args=(inbox, stop, failures)))
    assert mount.process is not None
    with contended_cpu(mount.process.pid):
        for worker in workers:
            worker.start()
        try:
            # At least MOVE_SECONDS, and on a loaded machine until enough moves were made
            # to prove something (counted, not timed: CI machines vary a lot).
            deadline = time.monotonic() + MOVE_SECONDS * 8
            stop.wait(MOVE_SECONDS)
            while len(os.listdir(sent)) < ENOUGH_MOVES and time.monotonic() < deadline:
                stop.wait(0.5)
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=30)
    found = []
    while not failures.empty():
        found.append(failures.get())
    moved = len(os.listdir(sent))
    assert moved >= ENOUGH_MOVES, f"only {moved} messages moved: the test proves nothing"
    assert found == []
    assert [w.exitcode for w in workers] == [0] * len(workers)
    assert mount.problems() == []


def test_a_listing_read_across_renames_never_binds_an_old_name(
        make_mount) -> None:  # type: ignore[no-untyped-def]
    mount: MailfsMount = make_mount()
    folder = mount.mountpoint / "cur"
    folder.mkdir()
    names = [f"1700000000.M{n}P1.host:2,S" for n in range(3000)]
    for name in names:
        (folder / name).write_bytes(b"x")
    with os.scandir(folder) as listing:
        first = next(listing).name  # the daemon has read the whole directory by now
        for name in names:
            os.rename(folder / name, folder / name.replace(":2,S", ":2,RS"))
        rest = [entry.name for entry in listing]
    assert first in names
    # Names handed out before the renames may come back (the C library buffers them);
    # none may still resolve: the kernel would then have bound an old name to the file.
    still_there = [name for name in rest if name in names and os.path.lexists(folder / name)]
    assert still_there == []


def test_a_listing_keeps_every_name_the_kernel_forgot_meanwhile(
        make_mount) -> None:  # type: ignore[no-untyped-def]
    """The other side of the check above: a file whose node the kernel forgot between two
    readdir requests is still there and must still be listed (to Dovecot, a maildir file
    missing from a listing is an expunged message)."""
    mount: MailfsMount = make_mount()
    folder = mount.mountpoint / "cur"
    folder.mkdir()
    names = {f"1700000000.M{n}P1.host:2,S" for n in range(3000)}
    for name in names:
        (folder / name).write_bytes(b"x")
    for name in names:
        os.stat(folder / name)  # the kernel knows every one of them now
    with os.scandir(folder) as listing:
        seen = {next(listing).name}
        with open("/proc/sys/vm/drop_caches", "w") as caches:
            caches.write("2")  # the kernel forgets whatever nothing holds
        seen.update(entry.name for entry in listing)
    assert seen == names
