"""Telling the kernel to forget what a peer's change made stale.

Index files are cached by the kernel for a long time (attributes, names and pages),
which is only correct because mailfs invalidates them explicitly whenever they change
behind the kernel's back, that is, when a peer's change is applied here.

pyfuse3's notify calls wait for the kernel to drop the pages, and dropping a page can wait
for a read that this daemon has not answered yet: called on the trio thread, that would
deadlock. So they run on a worker thread, batched, while the trio thread keeps serving.

Every name is invalidated twice, the second time ENTRY_RECHECK later. A lookup answered just
before a peer's change was applied can still be on its way into the kernel when the first
invalidation runs: the kernel then makes its dentry (a missing index file, kept for
`index_timeout`) after the invalidation, and nothing else would remove it. Seen once: a peer
renamed a folder while this node looked up the new name; the folder's index files then
stayed missing here.
"""

from __future__ import annotations

import errno
import logging

import pyfuse3
import trio

from mailfs.cachemgr.records import Op, Record
from mailfs.fs.nodes import InodeTable

log = logging.getLogger(__name__)

# Long enough for a lookup reply already written to the kernel to have made its dentry.
ENTRY_RECHECK = 0.2


class KernelInvalidator:
    def __init__(self) -> None:
        self._inodes: set[int] = set()
        self._entries: set[tuple[int, bytes]] = set()
        # Queued entries that are a second pass already (see the module docstring).
        self._rechecks: set[tuple[int, bytes]] = set()
        self._wake = trio.Event()
        self._batches_taken = 0
        self._batches_sent = 0
        self._batch_sent = trio.Event()
        self.sent = 0
        self.errors = 0

    def inode(self, inode: int) -> None:
        self._inodes.add(inode)
        self._wake.set()

    def entry(self, parent_inode: int, name: bytes) -> None:
        self._entries.add((parent_inode, name))
        self._rechecks.discard((parent_inode, name))  # a new change: two passes again
        self._wake.set()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                inodes, entries = self._inodes, self._entries
                self._inodes, self._entries = set(), set()
                fresh = entries - self._rechecks
                self._rechecks = set()
                self._batches_taken += 1
                try:
                    await trio.to_thread.run_sync(self._notify, inodes, entries)
                finally:
                    self._batches_sent += 1
                    done, self._batch_sent = self._batch_sent, trio.Event()
                    done.set()
                if fresh:
                    nursery.start_soon(self._recheck, fresh)

    async def _recheck(self, entries: set[tuple[int, bytes]]) -> None:
        await trio.sleep(ENTRY_RECHECK)
        self._rechecks |= entries - self._entries
        self._entries |= entries
        self._wake.set()

    async def drain(self, timeout: float) -> int:
        """Wait (at most `timeout` s) until everything asked for before this call has
        reached the kernel; returns how many of those are still queued or in flight."""
        target = self._batches_taken + (1 if self._inodes or self._entries else 0)
        with trio.move_on_after(timeout):
            while self._batches_sent < target:
                await self._batch_sent.wait()
        return 0 if self._batches_sent >= target else len(self._inodes) + len(self._entries) + 1

    def _notify(self, inodes: set[int], entries: set[tuple[int, bytes]]) -> None:
        for parent, name in entries:
            self._call(pyfuse3.invalidate_entry, parent, name)
        for inode in inodes:
            self._call(pyfuse3.invalidate_inode, inode, False)

    def _call(self, notify: object, *args: object) -> None:
        try:
            notify(*args)  # type: ignore[operator]
            self.sent += 1
        except OSError as exc:
            # ENOENT: the kernel does not have it cached, which is just as good.
            if exc.errno != errno.ENOENT:
                self.errors += 1
                log.warning("kernel cache invalidation %s%r failed: %s",
                            getattr(notify, "__name__", "?"), args, exc)


FILE_OPS = frozenset({Op.WRITE, Op.TRUNCATE, Op.SETATTR, Op.LINK, Op.DROP, Op.PUT, Op.CREATE,
                      Op.OWN_DATA})


def names_changed(record: Record) -> list[tuple[bytes, bytes]]:
    """(directory path, name) pairs whose meaning a change alters."""
    f = record.fields
    match record.op:
        case Op.CREATE | Op.PUT | Op.LINK:
            return [(f[1], f[2])]  # type: ignore[list-item]
        case Op.UNLINK:
            return [(f[0], f[1])]  # type: ignore[list-item]
        case Op.RENAME:
            return [(f[0], f[1]), (f[2], f[3])]  # type: ignore[list-item]
        case Op.RENAME_DIR:
            return [_split(f[0]), _split(f[1])]  # type: ignore[arg-type]
    return []


def _split(path: bytes) -> tuple[bytes, bytes]:
    parent, _, name = path.rpartition(b"/")
    return parent, name


def invalidate_change(record: Record, displaced: list[int], table: InodeTable,
                      invalidator: KernelInvalidator) -> None:
    """Queue what the kernel must forget after a peer's change was applied here.

    `displaced` are the files the changed names pointed to before: they lost a link, so
    their nlink and ctime changed too.
    """
    fids = list(displaced)
    if record.op in FILE_OPS:
        fids.append(record.fields[0])  # type: ignore[arg-type]
    for fid in fids:
        inode = table.fid_inode.get(fid)
        if inode is not None:
            invalidator.inode(inode)
    for dirpath, name in names_changed(record):
        parent = table.dir_inode(dirpath)
        if parent is not None:
            invalidator.entry(parent, name)


def invalidate_everything(names: set[tuple[bytes, bytes]], table: InodeTable,
                          invalidator: KernelInvalidator) -> None:
    """After a snapshot replaced the whole store."""
    for inode in table.fid_inode.values():
        invalidator.inode(inode)
    for dirpath, name in names:
        parent = table.dir_inode(dirpath)
        if parent is not None and name:
            invalidator.entry(parent, name)
