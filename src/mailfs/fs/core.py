"""The filesystem logic behind the pyfuse3 adapter.

Methods raise OSError; the adapter turns that into FUSEError. Every path is split by its
file class:
- replicated names live in the MetaStore (RAM over LMDB, journaled),
- volatile names live in `self.volatile` (RAM, this node only),
- everything else, and every directory, is the backing path, reached on worker threads.

Atomicity note: replicated and volatile operations contain no `await` between checking a
name and changing it, so they are atomic with respect to other requests. Passthrough
operations await the backing store and are as atomic as the backing store makes them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import stat
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from mailfs.cachemgr.backing import Backing, BackingFd
from mailfs.cachemgr.metastore import MetaStore, StoredFile
from mailfs.cachemgr.ownership import user_of
from mailfs.cachemgr.records import Attrs, Op, Record, key_problem, path_problem
from mailfs.fs.classifier import Classifier, FileClass
from mailfs.fs.freshness import Freshness
from mailfs.fs.fulldisk import FullDiskHold
from mailfs.fs.held_names import HeldNames
from mailfs.fs.invalidation import KernelInvalidator
from mailfs.fs.listings import ListingCache
from mailfs.fs.lockmirror import LockMirror
from mailfs.fs.nodes import (
    REPLICATED_BASE,
    ROOT,
    Handle,
    InodeTable,
    Kind,
    Node,
    VolatileFile,
    backing_identity,
)
from mailfs.fs.privileges import process_groups, set_id_bits_to_drop

log = logging.getLogger(__name__)

# Kernel cache time for directory attributes served stale while the backing store stalls.
STALE_TIMEOUT = 1.0
# Index files bigger than this on the backing path are not index files; leave them there.
IMPORT_LIMIT = 1 << 30
# O_TRUNC is not stripped: libfuse negotiates atomic O_TRUNC, so the kernel sends no
# setattr for it, drops its own pages and size, and expects open() to truncate.
# O_DIRECT is the kernel's to honour: it sends the caller's I/O straight to us, past its
# page cache. Passed on to the backing file, it would make the store refuse our own
# buffers, which are not page-aligned (EINVAL on every read and write).
OPEN_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_DIRECT
DEVICE_NUMBER = struct.Struct("<Q")
NAME_MAX = 255  # ext4's, and what peers accept in a record
# Missing passthrough names remembered for `mailfs flush --caches` (about 100 bytes each).
REMEMBERED_MISSING = 10_000
# Directories up to this size (ext4: about 100 names per 4 KiB) are read in the background
# after a lookup in them missed, so that the next lookups of missing names need no round
# trip. Bigger ones are only kept when the kernel lists them anyway (readdir).
SMALL_DIRECTORY_BYTES = 64 << 10
DROP_CHUNK = 10_000  # nodes handled between two yields of `drop_caches`


def oserror(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code) + (f": {what}" if what else ""))


@dataclass(frozen=True)
class Timeouts:
    index: float
    passthrough: float


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int
    umask: int
    pid: int = 0

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in process_groups(self.pid)

    def truncate_clears(self, mode: int, file_gid: int) -> int:
        """The set-id bits of a file that this caller's truncate clears (`privileges`)."""
        return set_id_bits_to_drop(mode, self.uid, self.in_group, file_gid)


@dataclass
class DirListing:
    node: Node
    entries: list[tuple[bytes, pyfuse3.EntryAttributes, Node]] | None = None
    opens: int = 1  # as Handle.opens


class MailFS:
    def __init__(
        self,
        store: MetaStore,
        backing: Backing,
        classifier: Classifier,
        timeouts: Timeouts,
        import_on_access: bool = True,
        install_wait: float = 30.0,
        full_disk_wait: float = 60.0,
    ) -> None:
        self.store = store
        self.backing = backing
        self.classifier = classifier
        self.timeouts = timeouts
        self.import_on_access = import_on_access
        # How long a change waits while a peer's snapshot is installed, before EAGAIN.
        self.install_wait = install_wait
        self.full_disk = FullDiskHold(store, full_disk_wait)
        self.table = InodeTable()
        self.volatile: dict[tuple[bytes, bytes], VolatileFile] = {}
        # Where lock files outlive a daemon crash, for a successor that adopts the
        # connection (IndexOnlyFS; fs/lockmirror.py).
        self.lock_mirror: LockMirror | None = None
        self.handles: dict[int, Handle] = {}
        self.dir_handles: dict[int, DirListing] = {}
        # Passthrough files whose backing names are changing right now (a rename, link or
        # unlink between its backing call and our table update): inode -> set when done.
        self.name_changes: dict[int, trio.Event] = {}
        # The same for a directory rename, which changes the paths of everything below.
        self.dir_rename: trio.Event | None = None
        self.dir_renames = 0
        self._imports: dict[int, trio.Event] = {}
        self.getattr_by_kind: Counter[str] = Counter()
        self._next_fh = 1
        self.invalidator = KernelInvalidator()
        # Its own worker: invalidating a passthrough name can wait in the kernel for a
        # request stuck on a stalled backing store; index-file invalidations must not.
        self.passthrough_invalidator = KernelInvalidator()
        self.missing: OrderedDict[tuple[int, bytes], None] = OrderedDict()
        self.caches_dropped = 0
        # Names of passthrough directories, on stores where a lookup is a round trip.
        self.listings = ListingCache(timeouts.passthrough)
        self._listings_wanted: OrderedDict[int, None] = OrderedDict()
        self._listings_wake = trio.Event()
        # What the store said about passthrough files, for opens that need not ask again.
        self.freshness = Freshness(timeouts.passthrough)
        self.held_names = HeldNames(timeouts.passthrough)
        self.opens_remembered = 0  # opens answered without the store
        self.opens_completed = 0  # of those, opened on the store after all (read, write...)
        # Sync replication: what fsync of an index file waits for after the local commit.
        self.wait_replicated: Callable[[int], Awaitable[None]] | None = None
        store.in_use = self.table.fid_inode.__contains__

    # ------------------------------------------------------------------ helpers

    async def _changes_allowed(self) -> None:
        """Wait out a snapshot install (bounded): Dovecot takes EAGAIN as an I/O error."""
        if self.store.installing:
            await self.store.wait_installed(self.install_wait)

    def _fh(self, node: Node) -> int:
        """A handle number for a new open of `node`: here a fresh one every time (a
        passthrough handle holds its own descriptor); IndexOnlyFS derives it from the
        inode, and an open may then share a handle (`Handle.opens`)."""
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _dir(self, inode: int) -> Node:
        node = self.table.nodes.get(inode)
        if node is None:
            raise oserror(errno.ENOENT)
        if node.kind is not Kind.DIR:
            raise oserror(errno.ENOTDIR)
        return node

    def _node(self, inode: int) -> Node:
        node = self.table.nodes.get(inode)
        if node is None:
            raise oserror(errno.ENOENT)
        return node

    def _entry(self, node: Node, timeout: float, st_mode: int, st_nlink: int, st_uid: int,
               st_gid: int, st_size: int, atime: int, mtime: int, ctime: int,
               blocks: int | None = None, rdev: int = 0) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = node.inode  # type: ignore[assignment]
        entry.generation = 0
        entry.entry_timeout = timeout
        entry.attr_timeout = timeout
        entry.st_mode = st_mode  # type: ignore[assignment]
        entry.st_nlink = st_nlink
        entry.st_uid = st_uid
        entry.st_gid = st_gid
        entry.st_rdev = rdev
        entry.st_size = st_size
        entry.st_blksize = 4096
        entry.st_blocks = (st_size + 511) // 512 if blocks is None else blocks
        entry.st_atime_ns = atime
        entry.st_mtime_ns = mtime
        entry.st_ctime_ns = ctime
        return entry

    def _stat_entry(self, node: Node, st: os.stat_result,
                    timeout: float | None = None) -> pyfuse3.EntryAttributes:
        return self._entry(node, self.timeouts.passthrough if timeout is None else timeout,
                           st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_size,
                           st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, st.st_blocks,
                           st.st_rdev)

    def _remember_dir_stat(self, node: Node | None, st: os.stat_result) -> None:
        if node is None or node.kind is not Kind.DIR:
            return
        cached = node.stat_cache
        if node.stat_derived and cached is not None and (
                st.st_mtime_ns <= cached[1].st_mtime_ns):
            # The store's clock has not passed the times our own changes moved to (a
            # coarse timestamp; see _dir_changed): keep ours, or mtime would go backwards.
            st = _with_times(st, cached[1].st_mtime_ns,
                             max(st.st_ctime_ns, cached[1].st_ctime_ns))
        else:
            node.stat_derived = False
        node.stat_cache = (time.monotonic(), st)

    def _parent_to_stat(self, parent: Node) -> bytes | None:
        """The backing path of a directory a change is about to touch, for the changing
        call to lstat afterwards; None where that lstat is left out (see `_dir_changed`)."""
        if self.backing.inline or parent.stat_cache is None:
            return self.backing.path(self.table.dirpath(parent))
        return None

    def _parent_reference(self, parent: Node) -> bytes | os.stat_result:
        """For calls that make a file: the parent's path to lstat, or (where that lstat is
        left out) its last known attributes, which decide the new file's group."""
        path = self._parent_to_stat(parent)
        if path is not None:
            return path
        assert parent.stat_cache is not None
        return parent.stat_cache[1]

    def _dir_changed(self, node: Node, st: os.stat_result | None, links: int = 0) -> None:
        """Remember a directory's attributes after a create, unlink, rename or link in it.

        `st` is its lstat right after the change, taken inside the changing call, so the
        getattr the kernel sends next is answered without another call. On a store whose
        calls go to the worker threads (a network store) that lstat would be one more
        round trip inside every change, so it is left out: the attributes are derived from
        the last known ones instead (mtime and ctime one nanosecond past them, nlink moved
        by `links`). Not our clock: the store's own later mtime must not come out earlier
        than what we showed. They expire when the ones they came from would have; the lstat
        after that brings the store's own values back, unless the store's timestamp has not
        moved past ours (`_remember_dir_stat`). Dovecot compares a directory's mtime with
        the one it saw last, to the nanosecond, so it sees every change.
        """
        if st is not None:
            self._remember_dir_stat(node, st)
            return
        cached = node.stat_cache
        if cached is not None:
            node.stat_cache = (cached[0], _touched(cached[1], links))
            node.stat_derived = True

    def _cached_dir_entry(self, node: Node) -> pyfuse3.EntryAttributes | None:
        """A directory's attributes from our own last change to it, while still fresh.

        While the backing store is stalled, the last known attributes serve whatever their
        age: the kernel revalidates directories on every path walk once its cache expires,
        and index files inside them must stay reachable.
        """
        cached = node.stat_cache
        if cached is None:
            return None
        left = self.timeouts.passthrough - (time.monotonic() - cached[0])
        if left <= 0:
            if not self.backing.stalled():
                return None
            left = STALE_TIMEOUT
        return self._stat_entry(node, cached[1], left)

    def _stalled_dir_entry(self, parent: Node, name: bytes) -> pyfuse3.EntryAttributes | None:
        if not self.backing.stalled():
            return None
        inode = self.table.entries.get((parent.inode, name))
        node = self.table.nodes.get(inode) if inode is not None else None
        if node is None or node.kind is not Kind.DIR or node.stat_cache is None:
            return None
        node.lookups += 1
        return self._stat_entry(node, node.stat_cache[1], STALE_TIMEOUT)

    def _attrs_entry(self, node: Node, attrs: Attrs) -> pyfuse3.EntryAttributes:
        if stat.S_ISCHR(attrs.mode) or stat.S_ISBLK(attrs.mode):
            # A device node in the store keeps its device number as its content.
            content = self._stored(node).content
            rdev = DEVICE_NUMBER.unpack(content)[0] if len(content) == DEVICE_NUMBER.size else 0
            return self._entry(node, self.timeouts.index, attrs.mode, attrs.nlink, attrs.uid,
                               attrs.gid, 0, attrs.atime_ns, attrs.mtime_ns, attrs.ctime_ns,
                               rdev=rdev)
        return self._entry(node, self.timeouts.index, attrs.mode, attrs.nlink, attrs.uid,
                           attrs.gid, attrs.size, attrs.atime_ns, attrs.mtime_ns,
                           attrs.ctime_ns)

    def _negative(self, timeout: float) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = 0  # type: ignore[assignment]
        entry.entry_timeout = timeout
        return entry

    def _stored(self, node: Node) -> StoredFile:
        return self.store.get(node.fid)

    def _node_entry(self, node: Node) -> pyfuse3.EntryAttributes | None:
        """Attributes without touching the backing store, where possible."""
        if node.kind is Kind.REPLICATED:
            return self._attrs_entry(node, self._stored(node).attrs)
        if node.kind is Kind.VOLATILE:
            assert node.volatile is not None
            return self._attrs_entry(node, node.volatile.attrs)
        return None

    async def _backing_stat(self, relative: bytes) -> os.stat_result:
        return await self.backing.run(os.lstat, self.backing.path(relative))

    def _new_attrs(self, mode: int, caller: Caller, parent: Node) -> Attrs:
        """Attributes of a file the caller makes in the store; `mode` has its type and
        the permissions the caller's umask left."""
        now = time.time_ns()
        return Attrs(mode, caller.uid, self._new_file_group(parent, caller), 1, 0,
                     now, now, now)

    def _new_file_group(self, parent: Node, caller: Caller) -> int:
        """The group of a file made in the store: the directory's in a set-group-ID
        directory, as ext4 does (known from the directory's last stat, which its lookup
        took; directory modes and groups rarely change)."""
        cached = parent.stat_cache
        if cached is not None and cached[1].st_mode & stat.S_ISGID:
            return cached[1].st_gid
        return caller.gid

    # ------------------------------------------------------------------ lookup / getattr

    async def lookup(self, parent_inode: int, name: bytes) -> pyfuse3.EntryAttributes:
        parent = self._dir(parent_inode)
        if len(name) > NAME_MAX:
            # The kernel looks every new name up before making it, so this refuses create,
            # mkdir, mknod, symlink, link and rename to such a name too, as ext4 does (peers
            # refuse longer names, so one made here would stall replication).
            raise oserror(errno.ENAMETOOLONG)
        if name == b".":
            return await self.getattr(parent_inode, count_lookup=True)
        if name == b"..":
            return await self.getattr(parent.parent or ROOT, count_lookup=True)
        cls = self.classifier.classify(name)
        if cls is FileClass.PASSTHROUGH:
            return await self._lookup_passthrough(parent, name)
        dirpath = self.table.dirpath(parent)
        if cls is FileClass.VOLATILE:
            volatile = self.volatile.get((dirpath, name))
            if volatile is None:
                return self._negative(self.timeouts.index)
            node = self.table.nodes[volatile.inode]
            node.lookups += 1
            return self._attrs_entry(node, volatile.attrs)
        fid = self.store.lookup(dirpath, name)
        if fid is None and self.import_on_access and not parent.import_checked:
            await self._import_dir(parent, dirpath)
            fid = self.store.lookup(dirpath, name)
        if fid is None:
            return self._negative(self.timeouts.index)
        node = self.table.replicated(fid)
        entry = self._attrs_entry(node, self._stored(node).attrs)
        node.lookups += 1
        return entry

    async def _lookup_passthrough(self, parent: Node, name: bytes) -> pyfuse3.EntryAttributes:
        stale = self._stalled_dir_entry(parent, name)
        if stale is not None:
            return stale
        if self._listed_missing(parent, name):
            self._remember_missing(parent.inode, name)
            self._hand_to_kernel(parent, name)
            return self._negative(self.timeouts.passthrough)
        asked_at = time.monotonic()
        try:
            st = await self._backing_stat(self.table.child_path(parent, name))
        except FileNotFoundError:
            self._remember_missing(parent.inode, name)
            self._hand_to_kernel(parent, name)
            return self._negative(self.timeouts.passthrough)
        kind = Kind.DIR if stat.S_ISDIR(st.st_mode) else Kind.PASSTHROUGH
        node = self.table.placed(parent, name, kind, backing_identity(st))
        self._remember_dir_stat(node, st)
        self._verified(node, st, asked_at)
        node.lookups += 1
        self._hand_to_kernel(parent, name)
        return self._stat_entry(node, st)

    def _hand_to_kernel(self, parent: Node, name: bytes) -> None:
        """Note a passthrough name the kernel will hold, for `peer_changed` (`held_names`)."""
        if self.listings_enabled:
            self.held_names.handed(self._user_of(self.table.dirpath(parent)), parent.inode,
                                   name, time.monotonic())

    # ------------------------------------------------------------------ directory names

    @property
    def listings_enabled(self) -> bool:
        """Only where a lookup costs a round trip: on a local disk, the lstat is cheaper
        than keeping the names."""
        return not self.backing.inline

    def _listed_missing(self, parent: Node, name: bytes) -> bool:
        """Whether a fresh listing of `parent` says `name` is missing; without one, a small
        directory is queued to be read in the background for the lookups after this."""
        if not self.listings_enabled:
            return False
        missing = self.listings.is_missing(parent.inode, name, time.monotonic())
        if missing is None:
            cached = parent.stat_cache
            if cached is not None and cached[1].st_size <= SMALL_DIRECTORY_BYTES:
                self._listings_wanted[parent.inode] = None
                self._listings_wake.set()
            return False
        return missing

    async def read_listings(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                            ) -> None:
        """Reads the directories `_listed_missing` queued, one at a time."""
        task_status.started()
        while True:
            await self._listings_wake.wait()
            self._listings_wake = trio.Event()
            while self._listings_wanted:
                inode, _ = self._listings_wanted.popitem(last=False)
                node = self.table.nodes.get(inode)
                if node is None or node.kind is not Kind.DIR or node.fid or (
                        self.listings.fresh(inode, time.monotonic())):
                    continue
                await self._read_listing(node)

    async def _read_listing(self, node: Node) -> None:
        dirpath = self.table.dirpath(node)
        token = self.listings.begin_read(node.inode)
        read_at = time.monotonic()
        names: set[bytes] | None = None
        try:
            names = set(await self.backing.run(os.listdir, self.backing.path(dirpath)))
        except OSError:
            pass  # the lookups go to the store, as without a listing
        finally:
            self.listings.finish_read(node.inode, token, names, self._user_of(dirpath),
                                      read_at)

    def _user_of(self, dirpath: bytes) -> bytes | None:
        return user_of(dirpath, self.store.ownership_depth)

    def peer_changed(self, record: Record) -> None:
        """A peer changed the index files of the users `record` touches, and with them,
        perhaps, their mail files on the shared store: their listings, and what the store
        said about their files, are stale. Called for every change a peer sends, so
        nothing is worked out while nothing is kept."""
        if self.listings.idle and not self.remembers_opens:
            return
        users = self.store.users_of_change(record)
        if users is None:
            self._forget_store_readings()
            return
        now = time.monotonic()
        for user in users:
            self.listings.drop_user(user)
            self.freshness.drop_user(user, now)
            self._kernel_forgets(self.held_names.take_user(user, now))

    def _kernel_forgets(self, names: list[tuple[int, bytes]]) -> None:
        """Make the kernel ask again about these passthrough names (found or missing), their
        files' attributes and their directories' attributes."""
        invalidate = self.passthrough_invalidator
        parents = set()
        for parent, name in names:
            parents.add(parent)
            inode = self.table.entries.get((parent, name))
            node = self.table.nodes.get(inode) if inode is not None else None
            if node is None:
                invalidate.entry(parent, name)  # a missing name, or a file since forgotten
                continue
            invalidate.inode(node.inode)
            if node.kind is Kind.DIR:
                # Its name stays, as in drop_caches: invalidating it would break getcwd()
                # of processes inside and detach what is mounted below.
                node.stat_cache = None
            else:
                invalidate.entry(parent, name)
        for parent in parents:
            node = self.table.nodes.get(parent)
            if node is not None:
                node.stat_cache = None
                if parent != ROOT:
                    invalidate.inode(parent)

    def store_replaced(self) -> None:
        """A peer's snapshot replaced the meta store: every user's index files changed."""
        self._forget_store_readings()

    def _forget_store_readings(self) -> None:
        """Every listing, every file's attributes that opens may be answered from, and
        every passthrough name the kernel holds."""
        now = time.monotonic()
        self.listings.drop_all()
        self.freshness.drop_all(now)
        self._kernel_forgets(self.held_names.take_all(now))

    @contextlib.contextmanager
    def _listing_change(self, *dirs: Node) -> Iterator[None]:
        """Around a backing call that changes names in `dirs`: if it fails, it may still
        have happened (a timeout), so their listings are dropped."""
        try:
            yield
        except BaseException:
            for node in dirs:
                self.listings.uncertain(node.inode)
            raise

    async def getattr(self, inode: int, count_lookup: bool = False) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        self.getattr_by_kind[node.kind.value] += 1
        entry = self._node_entry(node)
        if entry is None and node.kind is Kind.DIR:
            entry = self._cached_dir_entry(node)
            if entry is None:
                st = await self._backing_stat(self.table.dirpath(node))
                self._remember_dir_stat(node, st)
                entry = self._stat_entry(node, st)
        elif entry is None:
            asked_at = time.monotonic()
            st = await self._passthrough_stat(node)
            self._verified(node, st, asked_at)
            entry = self._stat_entry(node, st)
        if count_lookup:
            node.lookups += 1
        return entry

    async def _passthrough_stat(self, node: Node) -> os.stat_result:
        """An open file may have lost its name (expunged, or renamed over): its own fd
        still describes it, its old path does not. A handle released while we ask is
        skipped (its fd says EBADF), never mistaken for whatever reuses its number."""
        while (fd := self._open_fd(node)) is not None:
            try:
                return await self.backing.run_on(fd, os.fstat)
            except OSError as exc:
                if exc.errno != errno.EBADF or not fd.closing:
                    raise
        if node.detached:
            raise oserror(errno.ESTALE)
        _, st = await self._by_name(node, _lstat_as_open)
        return st

    async def _open_by_name(self, node: Node, flags: int) -> tuple[int, os.stat_result]:
        """Open a passthrough file through any of its backing names."""
        truncate = bool(flags & os.O_TRUNC)
        fd, st = await self._by_name(node, _open_stat, flags & ~os.O_TRUNC)
        if truncate:  # only once the name is known to be this file's
            try:
                st = await self.backing.run(_truncate_fd, fd)
            except BaseException:
                await self.backing.run(os.close, fd)
                raise
        return fd, st

    async def _by_name(self, node: Node, opener: Callable[..., tuple[Any, os.stat_result]],
                       *args: Any) -> tuple[Any, os.stat_result]:
        """`opener(path, *args)` on the backing name of a passthrough file the kernel asks for
        by inode: (what it made: an fd, -1 or a link target; stat) of the first name that
        still is this file.

        The kernel does not lock a file against open or stat while another process unlinks
        or renames one of its names, so the name we know may already be gone from the
        backing store, with our table updated a moment later (a message moved with link,
        then expunged from the source, is opened through its new name in that window).
        So every name of the file is tried, a name now holding another file is refused,
        and when none works while a name change is in flight, we wait for it and retry.
        """
        while True:
            if not self.table.stable_inodes:
                # Nothing tells a file the store renumbered from one renamed over its name
                # by this mount, so wait until our own name changes have reached the table.
                in_flight = self.name_changes.get(node.inode)
                if in_flight is None:
                    in_flight = self.dir_rename  # (trio events refuse to be used as bools)
                if in_flight is not None:
                    await in_flight.wait()
                    continue
            version = (node.names_version, self.dir_renames)
            for relative in self._backing_names(node):
                try:
                    fd, st = await self.backing.run_undoable(
                        _close_opened, opener, self.backing.path(relative), *args)
                except FileNotFoundError:
                    continue
                if backing_identity(st) == node.backing_ino or not self.table.stable_inodes:
                    node.backing_ino = backing_identity(st)
                    return fd, st
                if isinstance(fd, int) and fd >= 0:
                    await self.backing.run(os.close, fd)
            pending = self.name_changes.get(node.inode)
            if pending is None:
                pending = self.dir_rename  # (trio events refuse to be used as bools)
            if pending is not None:
                await pending.wait()
            elif (node.names_version, self.dir_renames) == version:
                raise oserror(errno.ENOENT)

    @contextlib.contextmanager
    def _renaming_directory(self) -> Iterator[None]:
        """Directory renames are rare: one event for all of them is enough."""
        done = self.dir_rename = trio.Event()
        try:
            yield
        finally:
            self.dir_renames += 1
            if self.dir_rename is done:
                self.dir_rename = None
            done.set()

    def _backing_names(self, node: Node) -> list[bytes]:
        names = [] if node.detached else [(node.parent, node.name)]
        return [self.table.child_path(self.table.nodes[parent], name)
                for parent, name in [*names, *node.aliases] if parent in self.table.nodes]

    @contextlib.contextmanager
    def _changing_names(self, node: Node | None) -> Iterator[None]:
        """Around a backing rename, link or unlink and the table update that follows it."""
        if node is not None and node.kind is Kind.DIR:
            with self._renaming_directory():
                yield
            return
        if node is None or node.kind is not Kind.PASSTHROUGH:
            yield
            return
        done = self.name_changes[node.inode] = trio.Event()
        try:
            yield
        finally:
            node.names_version += 1
            if self.name_changes.get(node.inode) is done:
                del self.name_changes[node.inode]
            done.set()

    def _open_fd(self, node: Node) -> BackingFd | None:
        if node.opens:
            for handle in self.handles.values():
                if handle.node is node and handle.fd is not None and not handle.fd.closing:
                    return handle.fd
        return None

    def forget(self, inode: int, count: int) -> None:
        node = self.table.nodes.get(inode)
        if node is None or inode == ROOT:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_release(node)

    def _drop_unlinked(self, fid: int) -> None:
        """Forget an index file with no names left. While a peer's snapshot is installed,
        or with the state disk full, it cannot be journaled: the file stays an orphan,
        which the next mount drops (the kernel has forgotten it either way, and a forget
        has nobody to report an error to)."""
        try:
            self.store.drop(fid)
        except OSError as exc:
            log.info("dropping unlinked index file %d at the next mount instead: %s",
                     fid, exc.strerror)

    def _maybe_release(self, node: Node) -> None:
        """Free a node nobody holds: not the kernel, not an open file."""
        if node.lookups or node.opens:
            return
        if node.kind is Kind.REPLICATED:
            try:
                stored = self.store.get(node.fid)
            except FileNotFoundError:
                stored = None
            if stored is not None and stored.attrs.nlink == 0:
                self._drop_unlinked(node.fid)
            self.table.fid_inode.pop(node.fid, None)
            del self.table.nodes[node.inode]
        elif node.kind is Kind.VOLATILE:
            # The node is the lock's identity: while a name refers to it, it stays.
            assert node.volatile is not None
            if node.volatile.attrs.nlink <= 0:
                del self.table.nodes[node.inode]
        elif node.children == 0:
            self.table.forget_placed(node)

    # ------------------------------------------------------------------ import

    async def _import_dir(self, parent: Node, dirpath: bytes) -> None:
        """Adopt index files that already sit on the backing path (migration from NFS).

        Concurrent first lookups in one directory wait for the same import: answering one
        of them "no such file" meanwhile would be cached by the kernel as a negative entry.
        """
        running = self._imports.get(parent.inode)
        if running is not None:
            await running.wait()
            return
        if self.store.is_imported(dirpath):
            parent.import_checked = True
            return
        done = self._imports[parent.inode] = trio.Event()
        try:
            imported = await self.import_directory(dirpath)
            parent.import_checked = True
        finally:
            del self._imports[parent.inode]
            done.set()
        if imported:
            log.info("imported %d index files from %s", imported,
                     dirpath.decode(errors="replace") or "/")

    async def import_directory(self, dirpath: bytes) -> int:
        found = await self.backing.run(self._scan_index_files, self.backing.path(dirpath))
        count = 0
        for name, st, content in found:
            if self.store.lookup(dirpath, name) is not None:
                continue
            if key_problem(dirpath, name) is not None:
                log.warning("not importing %r: too deep for the store", dirpath + b"/" + name)
                continue
            attrs = Attrs(st.st_mode, st.st_uid, st.st_gid, 1, len(content), st.st_atime_ns,
                          st.st_mtime_ns, st.st_ctime_ns)
            self.store.put(dirpath, name, attrs, content)
            count += 1
        if not self.store.is_imported(dirpath):
            self._mark_imported(dirpath)
        return count

    def _mark_imported(self, dirpath: bytes) -> None:
        """Note that `dirpath` holds nothing more to import. Only a shortcut for the next
        mount, which otherwise scans it again: on a full state disk it is left out, and the
        request that made or scanned the directory (a mkdir has happened) succeeds."""
        try:
            self.store.mark_imported(dirpath)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise

    def _scan_index_files(self, path: bytes) -> list[tuple[bytes, os.stat_result, bytes]]:
        found = []
        try:
            entries = list(os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        for entry in entries:
            if self.classifier.classify(entry.name) is not FileClass.REPLICATED:
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
                if st.st_size > IMPORT_LIMIT:
                    log.warning("not importing %r: %d bytes is too big for an index file",
                                entry.path, st.st_size)
                    continue
                with open(entry.path, "rb") as handle:
                    found.append((entry.name, st, handle.read()))
            except FileNotFoundError:
                continue
        return found

    async def import_tree(self) -> int:
        """Import every directory below the root (`mailfs import`)."""
        total = 0
        pending = [b""]
        while pending:
            dirpath = pending.pop()
            total += await self.import_directory(dirpath)
            subdirs = await self.backing.run(self._subdirs, self.backing.path(dirpath))
            pending.extend((dirpath + b"/" + s) if dirpath else s for s in subdirs)
        return total

    @staticmethod
    def _subdirs(path: bytes) -> list[bytes]:
        try:
            return [e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    async def export_tree(self) -> int:
        """Write every replicated file back to the backing path (`mailfs export`)."""
        await self.store.sync()
        count = 0
        for dirpath, name, fid in list(self.store.all_files()):
            stored = self.store.get(fid)
            relative = dirpath + b"/" + name if dirpath else name
            if path_problem(Record(0, Op.UNLINK, (dirpath, name, 0))) is not None:
                log.error("export skips %r: not a valid path inside the mount", relative)
                continue
            await self.backing.run(self._write_back, self.backing.path(relative),
                                   bytes(stored.content), stored.attrs.copy())
            count += 1
        return count

    @staticmethod
    def _write_back(path: bytes, content: bytes, attrs: Attrs) -> None:
        # A short temp name beside it: the file's own name may already be 255 bytes.
        directory, _, _ = path.rpartition(b"/")
        temp = (directory + b"/" if directory else b"") + b".mailfs-export.tmp"
        if not stat.S_ISREG(attrs.mode):
            _write_back_special(temp, content, attrs)
            os.rename(temp, path)
            return
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, content)
            os.fchown(fd, attrs.uid, attrs.gid)
            os.fchmod(fd, attrs.mode & 0o7777)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.utime(temp, ns=(attrs.atime_ns, attrs.mtime_ns))
        os.rename(temp, path)

    # ------------------------------------------------------------------ create / mkdir

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     caller: Caller) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        await self._changes_allowed()
        parent = self._dir(parent_inode)
        cls = self.classifier.classify(name)
        if cls is FileClass.PASSTHROUGH:
            return await self._create_passthrough(parent, name, mode, flags, caller)
        dirpath = self.table.dirpath(parent)
        if cls is FileClass.VOLATILE:
            if (dirpath, name) in self.volatile:
                raise oserror(errno.EEXIST)
            # Numbered like a stored file, from a fid of its own: renamed over an index
            # file it becomes that file with the same number (`_rename_volatile_to_replicated`),
            # which a daemon adopting this connection after a crash derives again.
            node = Node(REPLICATED_BASE + self.store.reserve_fid(), Kind.VOLATILE)
            attrs = self._new_attrs(stat.S_IFREG | (mode & 0o7777 & ~caller.umask), caller,
                                    parent)
            node.volatile = VolatileFile(attrs, bytearray(), node.inode)
            self.table.nodes[node.inode] = node
            self.volatile[(dirpath, name)] = node.volatile
            self._mirror_lock(node.volatile)
        else:
            if self.import_on_access and not parent.import_checked:
                await self._import_dir(parent, dirpath)
            if self.store.lookup(dirpath, name) is not None:
                raise oserror(errno.EEXIST)
            attrs = self._new_attrs(stat.S_IFREG | (mode & 0o7777 & ~caller.umask), caller,
                                    parent)
            stored = self.store.create(dirpath, name, attrs.mode, attrs.uid, attrs.gid)
            node = self.table.replicated(stored.fid)
        entry = self._node_entry(node)
        assert entry is not None
        node.lookups += 1
        return self._open_node(node, flags), entry

    async def _create_passthrough(self, parent: Node, name: bytes, mode: int, flags: int,
                                  caller: Caller
                                  ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self.backing.path(self.table.child_path(parent, name))
        open_flags = (flags & ~OPEN_STRIP) | os.O_CREAT | os.O_EXCL
        with self._listing_change(parent):
            fd, st, parent_st = await self.backing.run_undoable(
                _close_opened, _create_owned, path, open_flags, mode & 0o7777 & ~caller.umask,
                caller.uid, caller.gid, self._parent_reference(parent))
        self.listings.added(parent.inode, name)
        self._dir_changed(parent, parent_st)
        node = self.table.placed(parent, name, Kind.PASSTHROUGH, backing_identity(st))
        node.lookups += 1
        node.opens += 1
        node.cached_version = (st.st_mtime_ns, st.st_size)
        handle = Handle(self._fh(node), node, BackingFd(fd))
        self.handles[handle.fh] = handle
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=True), self._stat_entry(node, st)  # type: ignore[arg-type]

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      caller: Caller) -> pyfuse3.EntryAttributes:
        await self._changes_allowed()
        parent = self._dir(parent_inode)
        cls = self.classifier.classify(name)
        if cls is FileClass.PASSTHROUGH:
            return await self._make_passthrough(parent, name, _symlink_owned, target,
                                                caller.uid, caller.gid)
        # The store holds a link as a file whose content is the target (its size, as ext4).
        return self._make_stored(parent, name, cls,
                                 self._new_attrs(stat.S_IFLNK | 0o777, caller, parent), target)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    caller: Caller) -> pyfuse3.EntryAttributes:
        """Fifos, sockets (bind of a unix socket), devices, and regular files (mknod(2)
        with S_IFREG). The kernel already refused devices to callers without CAP_MKNOD."""
        await self._changes_allowed()
        parent = self._dir(parent_inode)
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise oserror(errno.EINVAL)
        mode = kind | (mode & 0o7777 & ~caller.umask)
        cls = self.classifier.classify(name)
        if cls is FileClass.PASSTHROUGH:
            return await self._make_passthrough(parent, name, _mknod_owned, mode, rdev,
                                                caller.uid, caller.gid)
        if kind == stat.S_IFREG and cls is FileClass.VOLATILE:
            info, entry = await self.create(parent_inode, name, mode, os.O_RDONLY, caller)
            await self.release(info.fh)
            return entry
        device = kind in (stat.S_IFCHR, stat.S_IFBLK)
        return self._make_stored(parent, name, cls, self._new_attrs(mode, caller, parent),
                                 DEVICE_NUMBER.pack(rdev) if device else b"")

    async def _make_passthrough(self, parent: Node, name: bytes,
                                maker: Callable[..., os.stat_result],
                                *args: Any) -> pyfuse3.EntryAttributes:
        with self._listing_change(parent):
            st, parent_st = await self.backing.run(
                _made_with_parent, maker,
                self.backing.path(self.table.child_path(parent, name)),
                self._parent_to_stat(parent), *args)
        self.listings.added(parent.inode, name)
        self._dir_changed(parent, parent_st)
        node = self.table.placed(parent, name, Kind.PASSTHROUGH, backing_identity(st))
        node.lookups += 1
        return self._stat_entry(node, st)

    def _make_stored(self, parent: Node, name: bytes, cls: FileClass, attrs: Attrs,
                     content: bytes) -> pyfuse3.EntryAttributes:
        if cls is FileClass.VOLATILE:
            raise oserror(errno.EPERM, "lock file names hold regular files only")
        dirpath = self.table.dirpath(parent)
        if self.store.lookup(dirpath, name) is not None:
            raise oserror(errno.EEXIST)
        stored = self.store.put(dirpath, name, attrs, content)
        node = self.table.replicated(stored.fid)
        node.lookups += 1
        return self._attrs_entry(node, stored.attrs)

    async def readlink(self, inode: int) -> bytes:
        node = self._node(inode)
        if node.kind is Kind.REPLICATED:
            stored = self._stored(node)
            if not stat.S_ISLNK(stored.attrs.mode):
                raise oserror(errno.EINVAL)
            return bytes(stored.content)
        if node.kind is not Kind.PASSTHROUGH:
            raise oserror(errno.EINVAL)
        target, _ = await self._by_name(node, _readlink_stat)
        return target  # type: ignore[no-any-return]

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    caller: Caller) -> pyfuse3.EntryAttributes:
        await self._changes_allowed()
        parent = self._dir(parent_inode)
        if self.classifier.classify(name) is not FileClass.PASSTHROUGH:
            log.warning("refusing mkdir of %r: the name belongs to an index or lock file", name)
            raise oserror(errno.EPERM, "name reserved for index files")
        relative = self.table.child_path(parent, name)
        with self._listing_change(parent):
            st, parent_st = await self.backing.run(
                _mkdir_owned, self.backing.path(relative), mode & 0o7777 & ~caller.umask,
                caller.uid, caller.gid, self._parent_reference(parent))
        self.listings.added(parent.inode, name)
        self._dir_changed(parent, parent_st, links=1)
        node = self.table.placed(parent, name, Kind.DIR, backing_identity(st))
        # A directory made here holds no index files on the backing path to import.
        self._mark_imported(relative)
        node.import_checked = True
        self._remember_dir_stat(node, st)
        node.lookups += 1
        return self._stat_entry(node, st)

    # ------------------------------------------------------------------ unlink / rmdir

    async def unlink(self, parent_inode: int, name: bytes) -> None:
        await self._changes_allowed()
        parent = self._dir(parent_inode)
        cls = self.classifier.classify(name)
        dirpath = self.table.dirpath(parent)
        if cls is FileClass.REPLICATED:
            fid = self.store.lookup(dirpath, name)
            if fid is None:
                raise oserror(errno.ENOENT)
            self.store.unlink(dirpath, name)
            self._release_if_unused(fid)
        elif cls is FileClass.VOLATILE:
            volatile = self.volatile.pop((dirpath, name), None)
            if volatile is None:
                raise oserror(errno.ENOENT)
            self._volatile_lost_link(volatile)
        else:
            known = self.table.entries.get((parent.inode, name))
            unlinked = self.table.nodes.get(known) if known else None
            await self._pin_remembered_opens(unlinked)
            with self._changing_names(unlinked):
                with self._listing_change(parent):
                    parent_st = await self.backing.run(
                        _unlink, self.backing.path(self.table.child_path(parent, name)),
                        self._parent_to_stat(parent))
                self.listings.removed(parent.inode, name)
                self._dir_changed(parent, parent_st)
                self.table.unplace(parent.inode, name)

    def _release_if_unused(self, fid: int) -> None:
        inode = self.table.fid_inode.get(fid)
        if inode is None:
            try:
                stored = self.store.get(fid)
            except FileNotFoundError:
                return
            if stored.attrs.nlink == 0 and stored.opens == 0:
                self._drop_unlinked(fid)
        else:
            self._maybe_release(self.table.nodes[inode])

    def _volatile_lost_link(self, volatile: VolatileFile) -> None:
        volatile.attrs.nlink -= 1
        volatile.attrs.ctime_ns = time.time_ns()
        self._mirror_lock(volatile)
        node = self.table.nodes.get(volatile.inode)
        if node is not None:
            self._maybe_release(node)

    def _mirror_lock(self, volatile: VolatileFile) -> None:
        """After a lock file's names, attributes or size changed."""
        mirror = self.lock_mirror
        if mirror is None:
            return
        fid = volatile.inode - REPLICATED_BASE
        if volatile.attrs.nlink <= 0:
            # Unlinked, or now an index file: a process that still has it open after a
            # crash gets EBADF, as it did before locks were mirrored.
            mirror.dropped(fid)
            return
        names = [key for key, known in self.volatile.items() if known is volatile]
        mirror.saved(fid, volatile.attrs, len(volatile.content), names)

    async def rmdir(self, parent_inode: int, name: bytes) -> None:
        await self._changes_allowed()
        parent = self._dir(parent_inode)
        relative = self.table.child_path(parent, name)
        if self.import_on_access and not self.store.is_imported(relative):
            # Adopt what the backing path holds first: the check below must see it.
            await self.import_directory(relative)
        if self.store.names_in(relative) or self._volatile_in(relative):
            raise oserror(errno.ENOTEMPTY)
        with self._listing_change(parent):
            parent_st = await self.backing.run(
                _rmdir_with_stale_copies, self.backing.path(relative),
                self._parent_to_stat(parent), self._hidden_name)
        self.listings.removed(parent.inode, name)
        self._dir_changed(parent, parent_st, links=-1)
        self.store.remove_dir(relative)
        self.table.unplace(parent.inode, name)

    def _hidden_name(self, name: bytes) -> bool:
        """Names the mount never shows from the backing path (the store owns them)."""
        return self.classifier.classify(name) is not FileClass.PASSTHROUGH

    def _volatile_in(self, dirpath: bytes) -> bool:
        return any(d == dirpath for d, _ in self.volatile)

    # ------------------------------------------------------------------ rename / link

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                     flags: int) -> None:
        await self._changes_allowed()
        src_dir, dst_dir = self._dir(old_parent), self._dir(new_parent)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise oserror(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        noreplace = bool(flags & pyfuse3.RENAME_NOREPLACE)
        src_cls = self.classifier.classify(old_name)
        dst_cls = self.classifier.classify(new_name)
        src_path, dst_path = self.table.dirpath(src_dir), self.table.dirpath(dst_dir)
        if src_cls is FileClass.PASSTHROUGH:
            await self._rename_passthrough(src_dir, old_name, dst_dir, new_name, dst_cls,
                                           noreplace)
        elif src_cls is FileClass.REPLICATED:
            if dst_cls is not FileClass.REPLICATED:
                raise oserror(errno.EXDEV)
            if self.store.lookup(src_path, old_name) is None:
                raise oserror(errno.ENOENT)
            replaced = self.store.lookup(dst_path, new_name)
            if replaced is not None and noreplace:
                raise oserror(errno.EEXIST)
            self.store.rename(src_path, old_name, dst_path, new_name)
            if replaced is not None:
                self._release_if_unused(replaced)
        elif dst_cls is FileClass.VOLATILE:
            self._rename_volatile(src_path, old_name, dst_path, new_name, noreplace)
        elif dst_cls is FileClass.REPLICATED:
            self._promote(src_path, old_name, dst_path, new_name, noreplace)
        else:
            raise oserror(errno.EXDEV)

    def _rename_volatile(self, src_path: bytes, old_name: bytes, dst_path: bytes,
                         new_name: bytes, noreplace: bool) -> None:
        volatile = self.volatile.get((src_path, old_name))
        if volatile is None:
            raise oserror(errno.ENOENT)
        replaced = self.volatile.get((dst_path, new_name))
        if replaced is volatile:
            return
        if replaced is not None and noreplace:
            raise oserror(errno.EEXIST)
        del self.volatile[(src_path, old_name)]
        self.volatile[(dst_path, new_name)] = volatile
        volatile.attrs.ctime_ns = time.time_ns()
        # The replaced lock's mirror first: a crash between the two must not leave both
        # claiming the name.
        if replaced is not None:
            self._volatile_lost_link(replaced)
        self._mirror_lock(volatile)

    def _promote(self, src_path: bytes, old_name: bytes, dst_path: bytes, new_name: bytes,
                 noreplace: bool) -> None:
        """Rename a dot-lock over an index file: its content becomes the replicated file.

        The kernel moves its dentry, so the lock's inode now names the index file, and
        Dovecot may keep writing through the lock's fd (the transaction log does). So the
        same node turns into the replicated file instead of a new one being made.
        """
        volatile = self.volatile.get((src_path, old_name))
        if volatile is None:
            raise oserror(errno.ENOENT)
        replaced = self.store.lookup(dst_path, new_name)
        if replaced is not None and noreplace:
            raise oserror(errno.EEXIST)
        node = self.table.nodes.get(volatile.inode)
        # Its last name: the lock file's node and number become the index file's.
        becomes = node is not None and volatile.attrs.nlink == 1
        stored = self.store.put(dst_path, new_name, volatile.attrs, bytes(volatile.content),
                                space_neutral=True,
                                fid=volatile.inode - REPLICATED_BASE if becomes else None)
        del self.volatile[(src_path, old_name)]
        volatile.attrs.nlink -= 1
        self._mirror_lock(volatile)
        if node is not None and becomes:
            node.kind = Kind.REPLICATED
            node.fid = stored.fid
            node.volatile = None
            stored.opens += node.opens
            self.table.fid_inode[stored.fid] = node.inode
        if replaced is not None:
            self._release_if_unused(replaced)

    async def _rename_passthrough(self, src_dir: Node, old_name: bytes, dst_dir: Node,
                                  new_name: bytes, dst_cls: FileClass, noreplace: bool) -> None:
        if dst_cls is not FileClass.PASSTHROUGH:
            raise oserror(errno.EXDEV)
        old_rel = self.table.child_path(src_dir, old_name)
        new_rel = self.table.child_path(dst_dir, new_name)
        moving_inode = self.table.entries.get((src_dir.inode, old_name))
        moving = self.table.nodes.get(moving_inode) if moving_inode else None
        is_dir = moving.kind is Kind.DIR if moving else stat.S_ISDIR(
            (await self._backing_stat(old_rel)).st_mode)
        if is_dir and (self.store.names_in(new_rel) or self._volatile_in(new_rel)):
            raise oserror(errno.ENOTEMPTY)
        if is_dir:
            self.store.check_rename_dir(old_rel, new_rel)
        replaced_inode = self.table.entries.get((dst_dir.inode, new_name))
        replaced = self.table.nodes.get(replaced_inode) if replaced_inode else None
        await self._pin_remembered_opens(replaced)
        renaming = self._renaming_directory() if is_dir else self._changing_names(moving)
        with renaming, self._changing_names(replaced):
            with self._listing_change(src_dir, dst_dir):
                src_st, dst_st = await self.backing.run(
                    _rename, self.backing.path(old_rel), self.backing.path(new_rel),
                    noreplace, self._parent_to_stat(src_dir), self._parent_to_stat(dst_dir))
            self.listings.removed(src_dir.inode, old_name)
            self.listings.added(dst_dir.inode, new_name)
            # Each subdirectory's ".." is a link of its parent: a directory moving to
            # another parent takes one along, and one it replaces takes its own away.
            lost_link = 1 if replaced is not None and replaced.kind is Kind.DIR else 0
            if dst_dir is src_dir:
                self._dir_changed(src_dir, src_st, -lost_link)
            else:
                moved_link = 1 if is_dir else 0
                self._dir_changed(src_dir, src_st, -moved_link)
                self._dir_changed(dst_dir, dst_st, moved_link - lost_link)
            if is_dir:
                self.store.rename_dir(old_rel, new_rel)
                self._rename_volatile_dir(old_rel, new_rel)
            self.table.unplace(dst_dir.inode, new_name)
            if moving is not None:
                self.table.move(moving, (src_dir.inode, old_name), (dst_dir.inode, new_name))
                if moving.kind is Kind.DIR:
                    # The store moved the directory's own ctime: what we remembered of it
                    # (from a change inside it) is stale.
                    moving.stat_cache = None

    def _rename_volatile_dir(self, old: bytes, new: bytes) -> None:
        moved = []
        for dirpath, name in list(self.volatile):
            if dirpath == old or dirpath.startswith(old + b"/"):
                volatile = self.volatile.pop((dirpath, name))
                self.volatile[(new + dirpath[len(old):], name)] = volatile
                moved.append(volatile)
        for volatile in moved:
            self._mirror_lock(volatile)

    async def link(self, inode: int, new_parent: int, new_name: bytes
                   ) -> pyfuse3.EntryAttributes:
        await self._changes_allowed()
        node = self._node(inode)
        parent = self._dir(new_parent)
        dst_cls = self.classifier.classify(new_name)
        dirpath = self.table.dirpath(parent)
        if node.kind is Kind.REPLICATED:
            if dst_cls is not FileClass.REPLICATED:
                raise oserror(errno.EXDEV)
            if self.store.lookup(dirpath, new_name) is not None:
                raise oserror(errno.EEXIST)
            self.store.link(node.fid, dirpath, new_name)
        elif node.kind is Kind.VOLATILE:
            assert node.volatile is not None
            if dst_cls is FileClass.VOLATILE:
                if (dirpath, new_name) in self.volatile:
                    raise oserror(errno.EEXIST)
                self.volatile[(dirpath, new_name)] = node.volatile
                node.volatile.attrs.nlink += 1
                node.volatile.attrs.ctime_ns = time.time_ns()
                self._mirror_lock(node.volatile)
            elif dst_cls is FileClass.REPLICATED:
                # The lock keeps its own inode; the index file gets a copy of its content.
                if self.store.lookup(dirpath, new_name) is not None:
                    raise oserror(errno.EEXIST)
                stored = self.store.put(dirpath, new_name, node.volatile.attrs,
                                        bytes(node.volatile.content), space_neutral=True)
                node = self.table.replicated(stored.fid)
            else:
                raise oserror(errno.EXDEV)
        elif node.kind is Kind.PASSTHROUGH:
            if dst_cls is not FileClass.PASSTHROUGH:
                raise oserror(errno.EXDEV)
            source = self.table.child_path(self.table.nodes[node.parent], node.name)
            with self._changing_names(node):
                with self._listing_change(parent):
                    parent_st = await self.backing.run(
                        _hardlink, self.backing.path(source),
                        self.backing.path(self.table.child_path(parent, new_name)),
                        self._parent_to_stat(parent))
                self.listings.added(parent.inode, new_name)
                self._dir_changed(parent, parent_st)
                self.table.entries[(parent.inode, new_name)] = node.inode
                node.aliases.append((parent.inode, new_name))
        else:
            raise oserror(errno.EPERM)
        entry = await self.getattr(node.inode)
        node.lookups += 1
        return entry

    # ------------------------------------------------------------------ attributes

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      caller: Caller) -> pyfuse3.EntryAttributes:
        await self._changes_allowed()
        node = self._node(inode)
        if node.kind is Kind.REPLICATED:
            stored = self._stored(node)
            if fields.update_size:
                # Even to the same size: ext4 moves mtime and ctime then too.
                self.store.truncate(stored, attr.st_size)
            if _sets_more_than_size(fields):
                self.store.set_attrs(stored, self._updated_attrs(stored.attrs, attr, fields))
            return self._attrs_entry(node, stored.attrs)
        if node.kind is Kind.VOLATILE:
            volatile = node.volatile
            assert volatile is not None
            if fields.update_size:
                size = attr.st_size
                del volatile.content[size:]
                volatile.content.extend(bytes(size - len(volatile.content)))
                volatile.attrs.size = size
                volatile.attrs.mtime_ns = time.time_ns()
            volatile.attrs = self._updated_attrs(volatile.attrs, attr, fields)
            self._mirror_lock(volatile)
            return self._attrs_entry(node, volatile.attrs)
        handle = self.handles.get(fh) if fh is not None else None
        if handle is not None and handle.fd is None and node.kind is Kind.PASSTHROUGH:
            await self._open_remembered(handle)  # ftruncate and futimens act on its file
        if node.kind is Kind.DIR:
            relative = self.table.dirpath(node)
        else:
            relative = self.table.child_path(self.table.nodes[node.parent], node.name)
        fd = handle.fd if handle is not None else None
        if fd is None and node.kind is Kind.PASSTHROUGH and node.detached:
            # Its name is another file's now; only an open handle still reaches it (a
            # read-only one cannot truncate: EINVAL, as for ftruncate on such an fd).
            fd = self._open_fd(node)
            if fd is None:
                raise oserror(errno.ESTALE)
        with self._changing_content(node):
            st = await self.backing.run(
                _apply_setattr, self.backing.path(relative), fd,
                attr.st_size if fields.update_size else None,
                attr.st_mode & 0o7777 if fields.update_mode else None,
                attr.st_uid if fields.update_uid else -1,
                attr.st_gid if fields.update_gid else -1,
                attr.st_atime_ns if fields.update_atime else None,
                attr.st_mtime_ns if fields.update_mtime else None,
            )
        self._remember_dir_stat(node, st)
        return self._stat_entry(node, st)

    @staticmethod
    def _updated_attrs(old: Attrs, attr: pyfuse3.EntryAttributes,
                       fields: pyfuse3.SetattrFields) -> Attrs:
        new = old.copy()
        if fields.update_mode:
            new.mode = stat.S_IFMT(old.mode) | (attr.st_mode & 0o7777)
        if fields.update_uid:
            new.uid = attr.st_uid
        if fields.update_gid:
            new.gid = attr.st_gid
        if fields.update_atime:
            new.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            new.mtime_ns = attr.st_mtime_ns
        # Every setattr that succeeds moves ctime on ext4, also one that changes nothing
        # (chmod to the same mode) or asks for nothing (chown(-1, -1)).
        new.ctime_ns = time.time_ns()
        return new

    # ------------------------------------------------------------------ open / io

    def _open_node(self, node: Node, flags: int) -> pyfuse3.FileInfo:
        fh = self._fh(node)
        handle = self.handles.get(fh)
        if handle is None:
            handle = self.handles[fh] = Handle(fh, node, None)
        else:
            handle.opens += 1
        node.opens += 1
        if node.kind is Kind.REPLICATED:
            self._stored(node).opens += 1
        # keep_cache: index pages change only through this mount, which invalidates them.
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=True)  # type: ignore[arg-type]

    async def open(self, inode: int, flags: int, caller: Caller | None = None
                   ) -> pyfuse3.FileInfo:
        """`caller`: who opens; an unprivileged O_TRUNC clears set-id bits (`privileges`)."""
        if flags & os.O_TRUNC:
            await self._changes_allowed()
        node = self._node(inode)
        if node.kind in (Kind.REPLICATED, Kind.VOLATILE):
            if flags & os.O_TRUNC:  # Linux truncates even with O_RDONLY, so do we
                self._truncate_on_open(node, caller)
            return self._open_node(node, flags)
        if node.kind is Kind.DIR:
            raise oserror(errno.EISDIR)
        remembered = self._remembered_version(node, flags)
        if remembered is not None:
            # Opened on the store at the first read that reaches us, if one ever does.
            version, backing_fd = remembered, None
            self.opens_remembered += 1
        else:
            asked_at = time.monotonic()
            truncating = (self._changing_content(node) if flags & os.O_TRUNC
                          else contextlib.nullcontext())
            with truncating:
                fd, st = await self._open_by_name(node, flags & ~OPEN_STRIP)
                drop = (caller.truncate_clears(st.st_mode, st.st_gid)
                        if flags & os.O_TRUNC and caller is not None else 0)
                if drop:
                    try:
                        st = await self.backing.run(_fchmod_stat, fd,
                                                    stat.S_IMODE(st.st_mode) & ~drop)
                    except OSError as exc:  # a store that squashes root: its bits stand
                        log.debug("cannot clear set-id bits after O_TRUNC: %s", exc)
            version, backing_fd = (st.st_mtime_ns, st.st_size), BackingFd(fd)
            if not flags & os.O_TRUNC:
                self._verified(node, st, asked_at)
        keep = version == node.cached_version and not flags & os.O_TRUNC
        node.cached_version = version
        handle = Handle(self._fh(node), node, backing_fd, flags & ~OPEN_STRIP)
        self.handles[handle.fh] = handle
        node.opens += 1
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=keep)  # type: ignore[arg-type]

    @property
    def remembers_opens(self) -> bool:
        """Only where an open costs a round trip, as with listings: on a local disk the
        open is cheaper than the risk of answering for a file that has just gone."""
        return not self.backing.inline

    def _verified(self, node: Node, st: os.stat_result, asked_at: float) -> None:
        if (node.kind is Kind.PASSTHROUGH and stat.S_ISREG(st.st_mode)
                and asked_at > node.changed_at):
            node.verified = (asked_at, st.st_mtime_ns, st.st_size)

    @contextlib.contextmanager
    def _changing_content(self, node: Node) -> Iterator[None]:
        """Around a write, truncate or attribute change of a passthrough file: what the
        store said about it before, or while the change was under way, is stale."""
        node.verified = None
        try:
            yield
        finally:
            node.changed_at = time.monotonic()
            node.verified = None

    def _remembered_version(self, node: Node, flags: int) -> tuple[int, int] | None:
        """(mtime_ns, size) of a passthrough file that an open may take from what the
        store said a moment ago instead of asking it again (fs/freshness.py). Any access
        mode: the kernel has checked permissions (default_permissions), and sdbox opens
        its mail files O_RDWR to read them. Not O_TRUNC, which changes the file."""
        verified = node.verified
        if (verified is None or not self.remembers_opens or node.detached
                or node.inode in self.name_changes  # an unlink may be under way
                or flags & os.O_TRUNC):
            return None
        parent = self.table.nodes.get(node.parent)
        if parent is None:
            return None
        user = self._user_of(self.table.dirpath(parent))
        if not self.freshness.fresh(verified[0], user, time.monotonic()):
            return None
        return verified[1], verified[2]

    async def _pin_remembered_opens(self, node: Node | None) -> None:
        """Before a name of `node` goes away through this mount: the handles that open()
        answered from memory get the store's file now, as an open file stays readable
        after its unlink (and the name may have been its only one).

        Called before the caller registers its name change, with nothing awaited between
        the last check here and that registration: opening by name waits for a name
        change of the file in flight (on stores without stable inode numbers), which
        would be the caller's own, and from the registration on, no open of the file is
        answered from memory."""
        if node is None or node.kind is not Kind.PASSTHROUGH:
            return
        tried: set[int] = set()
        while node.opens:
            waiting = [h for h in self.handles.values()
                       if h.node is node and h.fd is None and h.fh not in tried]
            if not waiting:
                return
            for handle in waiting:
                tried.add(handle.fh)
                with contextlib.suppress(OSError):  # gone already: its reads get ESTALE
                    await self._open_remembered(handle)

    async def _open_remembered(self, handle: Handle) -> BackingFd:
        """The store's file behind a handle that open() answered from memory."""
        asked_at = time.monotonic()
        try:
            fd, st = await self._open_by_name(handle.node, handle.open_flags)
        except FileNotFoundError:
            # Gone since the store last said it was there: NFS's word for it.
            raise oserror(errno.ESTALE) from None
        if handle.fd is not None or self.handles.get(handle.fh) is not handle:
            # Another read opened it meanwhile, or the handle was released.
            await self.backing.run(os.close, fd)
            if handle.fd is None:
                raise oserror(errno.EBADF)
            return handle.fd
        handle.fd = BackingFd(fd)
        self.opens_completed += 1
        self._verified(handle.node, st, asked_at)
        return handle.fd

    def _truncate_on_open(self, node: Node, caller: Caller | None) -> None:
        """open(O_TRUNC) of an index or lock file (the kernel already dropped its pages).

        Ignoring it left the old bytes behind a shorter rewrite, and the kernel's idea of
        the size (0) disagreed with ours: pages that other processes had mapped were cut
        off under them (SIGBUS in Dovecot with several clients on one mailbox).
        """
        if node.kind is Kind.REPLICATED:
            stored = self._stored(node)
            self.store.truncate(stored, 0)  # an empty file's times move too
            drop = (caller.truncate_clears(stored.attrs.mode, stored.attrs.gid)
                    if caller is not None else 0)
            if drop:
                attrs = stored.attrs.copy()
                attrs.mode &= ~drop
                self.store.set_attrs(stored, attrs)
            return
        volatile = node.volatile
        assert volatile is not None
        volatile.content.clear()
        volatile.attrs.size = 0
        volatile.attrs.mtime_ns = volatile.attrs.ctime_ns = time.time_ns()
        if caller is not None:
            volatile.attrs.mode &= ~caller.truncate_clears(volatile.attrs.mode,
                                                           volatile.attrs.gid)
        self._mirror_lock(volatile)

    def _handle(self, fh: int) -> Handle:
        handle = self.handles.get(fh)
        if handle is None:
            raise oserror(errno.EBADF)
        return handle

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self._handle(fh)
        node = handle.node
        if node.kind is Kind.REPLICATED:
            content = self._stored(node).content
            return bytes(memoryview(content)[offset:offset + size])
        if node.kind is Kind.VOLATILE:
            assert node.volatile is not None
            return bytes(memoryview(node.volatile.content)[offset:offset + size])
        fd = handle.fd if handle.fd is not None else await self._open_remembered(handle)
        return await self.backing.run_on(fd, os.pread, size, offset)

    async def write(self, fh: int, offset: int, data: bytes, appending: bool = False) -> int:
        """`appending`: the file has O_APPEND at the time of this write. The kernel chose
        `offset` from its cached size then; the end of what this mount holds is surer
        (a peer's change may have moved it)."""
        handle = self._handle(fh)
        node = handle.node
        if node.kind is Kind.REPLICATED:
            await self._changes_allowed()
            stored = self._stored(node)
            self.store.write(stored, stored.size if appending else offset, data)
            return len(data)
        if node.kind is Kind.VOLATILE:
            volatile = node.volatile
            assert volatile is not None
            start = len(volatile.content) if appending else offset
            growth = start + len(data) - len(volatile.content)
            if (growth > 0 and self.store.journal.short_of_space()
                    and not self.store.journal.spend_freed(growth)):
                # Lock files live in RAM, but the index file one is renamed over must fit
                # the state disk: refused here, as a real full disk would, Dovecot drops
                # the lock cleanly instead of failing the rename that installs it.
                raise oserror(errno.ENOSPC, "state disk full")
            if start > len(volatile.content):
                volatile.content.extend(bytes(start - len(volatile.content)))
            volatile.content[start:start + len(data)] = data
            volatile.attrs.size = len(volatile.content)
            volatile.attrs.mtime_ns = volatile.attrs.ctime_ns = time.time_ns()
            if self.lock_mirror is not None:
                self.lock_mirror.wrote(volatile.inode - REPLICATED_BASE, start, data,
                                       volatile.attrs.mtime_ns)
            return len(data)
        fd = handle.fd if handle.fd is not None else await self._open_remembered(handle)
        with self._changing_content(node):
            return await self.backing.run_on(fd, os.pwrite, data, offset)

    async def _sync_replicated(self) -> None:
        target = self.store.journal.seq
        await self.store.sync()
        if self.wait_replicated is not None:
            await self.wait_replicated(target)

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handle(fh)
        if handle.node.kind is Kind.REPLICATED:
            await self._sync_replicated()
        elif handle.node.kind is Kind.PASSTHROUGH:
            # Even with no write of its own, fsync covers what other handles wrote.
            fd = handle.fd if handle.fd is not None else await self._open_remembered(handle)
            await self.backing.run_on(fd, os.fdatasync if datasync else os.fsync,
                                      waiting=True)

    async def release(self, fh: int) -> None:
        handle = self.handles.get(fh)
        if handle is None:
            return
        handle.opens -= 1
        if handle.opens <= 0:
            del self.handles[fh]
        node = handle.node
        node.opens -= 1
        if node.kind is Kind.REPLICATED:
            stored = self.store.cached(node.fid)
            if stored is not None:
                stored.opens -= 1
        if handle.fd is not None:
            await self.backing.run(handle.fd.close)
        self._maybe_release(node)

    # ------------------------------------------------------------------ directories

    async def opendir(self, inode: int) -> int:
        node = self._dir(inode)
        fh = self._fh(node)
        listing = self.dir_handles.get(fh)
        if listing is None:
            self.dir_handles[fh] = DirListing(node)
        else:
            listing.opens += 1
        return fh

    def releasedir(self, fh: int) -> None:
        listing = self.dir_handles.get(fh)
        if listing is not None:
            listing.opens -= 1
            if listing.opens <= 0:
                del self.dir_handles[fh]

    async def list_directory(self, listing: DirListing
                             ) -> list[tuple[bytes, pyfuse3.EntryAttributes, Node]]:
        parent = listing.node
        dirpath = self.table.dirpath(parent)
        if self.import_on_access and not parent.import_checked:
            await self._import_dir(parent, dirpath)
        token = self.listings.begin_read(parent.inode)
        read_at = time.monotonic()
        backing_entries: list[tuple[bytes, os.stat_result]] | None = None
        try:
            backing_entries = await self.backing.run(_list_with_stats,
                                                     self.backing.path(dirpath))
        finally:
            names = None if backing_entries is None or not self.listings_enabled else {
                name for name, _ in backing_entries}
            self.listings.finish_read(parent.inode, token, names, self._user_of(dirpath),
                                      read_at)
        result: list[tuple[bytes, pyfuse3.EntryAttributes, Node]] = []
        user = self._user_of(dirpath)
        for name, st in backing_entries:
            if self.classifier.classify(name) is not FileClass.PASSTHROUGH:
                continue  # backing copies of index files are hidden; the store has them
            kind = Kind.DIR if stat.S_ISDIR(st.st_mode) else Kind.PASSTHROUGH
            node = self.table.placed(parent, name, kind, backing_identity(st))
            result.append((name, self._stat_entry(node, st), node))
            if self.listings_enabled:
                self.held_names.handed(user, parent.inode, name, read_at)
        for name, fid in sorted(self.store.names_in(dirpath).items()):
            node = self.table.replicated(fid)
            result.append((name, self._attrs_entry(node, self._stored(node).attrs), node))
        for (volatile_dir, name), volatile in sorted(self.volatile.items()):
            if volatile_dir == dirpath:
                node = self.table.nodes[volatile.inode]
                result.append((name, self._attrs_entry(node, volatile.attrs), node))
        return result

    def entries_from(self, listing: DirListing, start: int
                     ) -> Iterator[tuple[int, bytes, pyfuse3.EntryAttributes, Node]]:
        """The listing from `start` on, each entry with the node its name refers to now.

        A listing is read once and handed out over several readdir requests; in between, the
        directory is unlocked. A name renamed or unlinked meanwhile is left out: the kernel
        makes a dentry of every entry it gets, and a stale one would bind the old name to a
        file that now lives elsewhere. A node the kernel forgot meanwhile is looked up
        again instead (its name is still good), or the entry would go missing: to Dovecot,
        a maildir file missing from a listing is an expunged message.
        """
        assert listing.entries is not None
        parent = listing.node
        dirpath = self.table.dirpath(parent)
        for index in range(start, len(listing.entries)):
            name, entry, node = listing.entries[index]
            current = self._named_now(parent, dirpath, name, node)
            if current is not None:
                entry.st_ino = current.inode  # type: ignore[assignment]
                yield index, name, entry, current

    def _named_now(self, parent: Node, dirpath: bytes, name: bytes, node: Node) -> Node | None:
        """The node `name` refers to now, if it is still the file the listing saw."""
        if node.kind is Kind.VOLATILE:
            volatile = self.volatile.get((dirpath, name))
            if volatile is None or volatile is not node.volatile:
                return None
            return self.table.nodes.get(volatile.inode)
        if node.kind is Kind.REPLICATED or node.fid:  # index-only directories have fids
            fid = self.store.lookup(dirpath, name)
            if fid != node.fid:
                return None
            return self._node_for(parent, name, fid)
        inode = self.table.entries.get((parent.inode, name))
        if inode is not None:
            current = self.table.nodes.get(inode)
            if current is None:
                return None
            if self.table.stable_inodes:
                if current.backing_ino != node.backing_ino:
                    return None  # renamed over, or another file took the name
            elif current is not node and node.inode in self.table.nodes:
                return None  # the listed file is still known, under another name: renamed
            return current
        if node.inode in self.table.nodes:
            # Still known (this node, or a later one for the same file: numbers are kept
            # per file) but not under this name: renamed or unlinked here.
            return None
        return self.table.placed(parent, name, node.kind, node.backing_ino)

    def _node_for(self, parent: Node, name: bytes, fid: int) -> Node:
        return self.table.replicated(fid)

    def listing(self, fh: int) -> DirListing:
        listing = self.dir_handles.get(fh)
        if listing is None:
            raise oserror(errno.EBADF)
        return listing

    async def fsyncdir(self, fh: int) -> None:
        listing = self.listing(fh)
        await self._sync_replicated()
        await self.backing.run_waiting(_fsync_dir,
                                       self.backing.path(self.table.dirpath(listing.node)))

    async def statfs(self) -> pyfuse3.StatvfsData:
        return statvfs_data(await self.backing.run(os.statvfs, self.backing.path(b"")))

    # ------------------------------------------------------------------ status

    def _remember_missing(self, parent_inode: int, name: bytes) -> None:
        """Names the kernel holds as missing (for the passthrough timeout), so that
        `drop_caches` can make it ask again."""
        self.missing[(parent_inode, name)] = None
        self.missing.move_to_end((parent_inode, name))
        if len(self.missing) > REMEMBERED_MISSING:
            self.missing.popitem(last=False)

    async def drop_caches(self) -> dict[str, int]:
        """Make the kernel and this daemon ask the backing store again about every
        passthrough file and directory (`mailfs flush --caches`): for changes made on the
        backing store behind mailfs, which are otherwise seen within the passthrough
        timeout. Index files are not touched: they change only through mailfs.

        Directories lose their attributes and listings but keep their names: invalidating
        a directory's name would detach whatever is mounted below it and make getcwd()
        fail in processes working inside it."""
        invalidate = self.passthrough_invalidator
        inodes = entries = 0
        for count, node in enumerate(list(self.table.nodes.values()), 1):
            if node.kind in (Kind.PASSTHROUGH, Kind.DIR) and not node.fid:
                node.stat_cache = None
                node.stat_derived = False
                node.cached_version = (0, 0)  # the next open drops the kernel's pages too
                if node.inode != ROOT:
                    invalidate.inode(node.inode)
                    inodes += 1
            if count % DROP_CHUNK == 0:
                await trio.sleep(0)  # a big table must not hold up other requests
        for count, ((parent, name), inode) in enumerate(list(self.table.entries.items()), 1):
            named = self.table.nodes.get(inode)
            if named is not None and named.kind is Kind.PASSTHROUGH:
                invalidate.entry(parent, name)
                entries += 1
            if count % DROP_CHUNK == 0:
                await trio.sleep(0)
        for parent, name in self.missing:
            invalidate.entry(parent, name)
        missing, self.missing = len(self.missing), OrderedDict()
        self.held_names.clear()  # every name was invalidated above
        self._forget_store_readings()
        self.caches_dropped += 1
        return {"inodes": inodes, "entries": entries, "missing_names": missing}

    def counts(self) -> dict[str, object]:
        return {
            "caches_dropped": self.caches_dropped,
            "missing_names_remembered": len(self.missing),
            "inodes": len(self.table.nodes),
            "open_files": len(self.handles),
            "volatile_files": len(self.volatile),
            "volatile_bytes": sum(len(v.content) for v in self.volatile.values()),
            "getattr_by_kind": dict(self.getattr_by_kind),
            "listings": len(self.listings),
            "listing_names": self.listings.names,
            "listing_missing_answered": self.listings.stats.missing_answered,
            "listings_read": self.listings.stats.listings_read,
            "listings_discarded": self.listings.stats.listings_discarded,
            "listings_dropped": self.listings.stats.listings_dropped,
            "opens_remembered": self.opens_remembered,
            "opens_completed": self.opens_completed,
            "kernel_names_held": len(self.held_names),
            "kernel_names_forgotten_early": self.held_names.forgotten,
            **self.full_disk.counts(),
        }


def statvfs_data(st: os.statvfs_result) -> pyfuse3.StatvfsData:
    data = pyfuse3.StatvfsData()
    for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                 "f_ffree", "f_favail", "f_namemax"):
        setattr(data, attr, getattr(st, attr))
    return data


# ---------------------------------------------------------------------- thread functions


# Functions that change a directory also return its new stat: the kernel asks for the
# directory's attributes right after such a change, and this answers without another call.


def _parent_stat(parent: bytes | os.stat_result) -> tuple[os.stat_result, bool]:
    """(the parent's attributes, whether they were just taken)."""
    if isinstance(parent, bytes):
        return os.lstat(parent), True
    return parent, False


def _touched(st: os.stat_result, links: int) -> os.stat_result:
    """A directory's attributes after a change in it that mailfs made (see _dir_changed).

    Stores that do not count subdirectories in a directory's link count show 1 (sshfs,
    btrfs): that stays as it is."""
    moved = st.st_mtime_ns + 1
    links = max(links, 2 - st.st_nlink) if st.st_nlink >= 2 else 0
    return _with_times(st, moved, max(st.st_ctime_ns + 1, moved), links)


def _with_times(st: os.stat_result, mtime_ns: int, ctime_ns: int, links: int = 0
                ) -> os.stat_result:
    fields = [getattr(st, name) for name in _STAT_FIELDS]
    fields[3] += links
    fields[8], fields[9] = mtime_ns // 1_000_000_000, ctime_ns // 1_000_000_000
    fields[11], fields[12] = mtime_ns / 1e9, ctime_ns / 1e9
    fields[14], fields[15] = mtime_ns, ctime_ns
    return os.stat_result(fields)


# os.stat_result's fields in the order its constructor takes them.
_STAT_FIELDS = ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size",
                "st_atime", "st_mtime", "st_ctime", "st_atime", "st_mtime", "st_ctime",
                "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blksize", "st_blocks",
                "st_rdev")


def _create_owned(path: bytes, flags: int, mode: int, uid: int, gid: int,
                  parent: bytes | os.stat_result
                  ) -> tuple[int, os.stat_result, os.stat_result | None]:
    fd = os.open(path, flags, mode)
    try:
        parent_st, fresh = _parent_stat(parent)
        st = _settle(fd, os.fstat(fd), uid, gid, mode, parent_st)
        return fd, st, parent_st if fresh else None
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise


def _settle(target: bytes | int, st: os.stat_result, uid: int, gid: int, mode: int | None,
            parent_st: os.stat_result) -> os.stat_result:
    """Give a file the daemon just made the owner and mode the caller would have got.

    In a set-group-ID directory the group is the directory's and a new directory keeps
    the bit, as the backing filesystem itself decided. Only what differs is changed: each
    change moves the file's ctime away from its mtime, which a file made by the caller
    would not show.
    """
    if parent_st.st_mode & stat.S_ISGID:
        gid = parent_st.st_gid
        if mode is not None and stat.S_ISDIR(st.st_mode):
            mode |= stat.S_ISGID
    changed = False
    if (st.st_uid, st.st_gid) != (uid, gid):
        if isinstance(target, bytes):
            os.lchown(target, uid, gid)
            st = os.lstat(target)
        else:
            os.fchown(target, uid, gid)
            st = os.fstat(target)
        changed = True  # and a chown may have cleared set-user-ID and set-group-ID
    if mode is not None and stat.S_IMODE(st.st_mode) != mode:
        os.chmod(target, mode)  # the daemon's own umask must not narrow the caller's mode
        changed = True
    if not changed:
        return st
    return os.lstat(target) if isinstance(target, bytes) else os.fstat(target)


def _write_back_special(temp: bytes, content: bytes, attrs: Attrs) -> None:
    """A link, fifo, socket or device node from the store, as such (its content is the
    link's target, or a device's number)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)
    if stat.S_ISLNK(attrs.mode):
        os.symlink(content, temp)
    else:
        device = stat.S_ISCHR(attrs.mode) or stat.S_ISBLK(attrs.mode)
        rdev = DEVICE_NUMBER.unpack(content)[0] if device and len(content) == 8 else 0
        os.mknod(temp, attrs.mode, rdev)
        os.chmod(temp, attrs.mode & 0o7777)
    os.lchown(temp, attrs.uid, attrs.gid)
    os.utime(temp, ns=(attrs.atime_ns, attrs.mtime_ns), follow_symlinks=False)


def _made_with_parent(maker: Callable[..., os.stat_result], path: bytes,
                      parent: bytes | None, *args: Any
                      ) -> tuple[os.stat_result, os.stat_result | None]:
    return maker(path, *args), None if parent is None else os.lstat(parent)


def _symlink_owned(path: bytes, target: bytes, uid: int, gid: int) -> os.stat_result:
    os.symlink(target, path)
    return _owned(path, uid, gid, None)


def _mknod_owned(path: bytes, mode: int, rdev: int, uid: int, gid: int) -> os.stat_result:
    os.mknod(path, mode, rdev)
    return _owned(path, uid, gid, stat.S_IMODE(mode))


def _owned(path: bytes, uid: int, gid: int, mode: int | None) -> os.stat_result:
    """`_settle` a file just made by name; it is removed again if that fails."""
    try:
        return _settle(path, os.lstat(path), uid, gid, mode,
                       os.lstat(os.path.dirname(path) or b"."))
    except BaseException:
        os.unlink(path)
        raise


def _readlink_stat(path: bytes) -> tuple[bytes, os.stat_result]:
    st = os.lstat(path)
    if not stat.S_ISLNK(st.st_mode):
        raise OSError(errno.EINVAL, "not a symbolic link")
    return os.readlink(path), st


def _mkdir_owned(path: bytes, mode: int, uid: int, gid: int, parent: bytes | os.stat_result
                 ) -> tuple[os.stat_result, os.stat_result | None]:
    os.mkdir(path, mode)
    try:
        parent_st, fresh = _parent_stat(parent)
        st = _settle(path, os.lstat(path), uid, gid, mode, parent_st)
        return st, parent_st if fresh else None
    except BaseException:
        os.rmdir(path)
        raise


def _unlink(path: bytes, parent: bytes | None) -> os.stat_result | None:
    os.unlink(path)
    return None if parent is None else os.lstat(parent)


def _rmdir_with_stale_copies(path: bytes, parent: bytes | None,
                             hidden: Callable[[bytes], bool]) -> os.stat_result | None:
    """rmdir, after removing backing copies of index files that import left behind.

    The directory looks empty through the mount, and the store holds no names in it, so
    such copies are stale: keeping them would make the rmdir fail with ENOTEMPTY.
    """
    try:
        entries = [e.name for e in os.scandir(path)]
    except FileNotFoundError:
        entries = []
    if entries and all(hidden(name) for name in entries):
        for name in entries:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(path + b"/" + name)
    os.rmdir(path)
    return None if parent is None else os.lstat(parent)


def _close_opened(result: tuple[Any, ...]) -> None:
    """Undo an open or create whose caller already got EIO: close the fd it made."""
    if isinstance(result[0], int) and result[0] >= 0:
        os.close(result[0])


def _lstat_as_open(path: bytes) -> tuple[int, os.stat_result]:
    return -1, os.lstat(path)


def _truncate_fd(fd: int) -> os.stat_result:
    # Through /proc: the fd may be open read-only, and Linux truncates on O_RDONLY|O_TRUNC.
    path = f"/proc/self/fd/{fd}"
    os.truncate(path, 0)
    # open(O_TRUNC) marks mtime and ctime even when the file was empty; truncate does not.
    os.utime(path, ns=(os.fstat(fd).st_atime_ns, time.time_ns()))
    return os.fstat(fd)


def _open_stat(path: bytes, flags: int) -> tuple[int, os.stat_result]:
    fd = os.open(path, flags)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


_LIBC = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _rename(old: bytes, new: bytes, noreplace: bool, old_parent: bytes | None,
            new_parent: bytes | None) -> tuple[os.stat_result | None, os.stat_result | None]:
    if not noreplace:
        os.rename(old, new)
    # os.rename cannot refuse to clobber; renameat2 does it atomically in the kernel.
    elif _LIBC.renameat2(_AT_FDCWD, old, _AT_FDCWD, new, _RENAME_NOREPLACE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), new)
    old_st = None if old_parent is None else os.lstat(old_parent)
    if new_parent == old_parent:
        return old_st, old_st
    return old_st, None if new_parent is None else os.lstat(new_parent)


def _hardlink(source: bytes, target: bytes, parent: bytes | None) -> os.stat_result | None:
    os.link(source, target, follow_symlinks=False)
    return None if parent is None else os.lstat(parent)


def _fchmod_stat(fd: int, mode: int) -> os.stat_result:
    os.fchmod(fd, mode)
    return os.fstat(fd)


def _sets_more_than_size(fields: pyfuse3.SetattrFields) -> bool:
    """Whether a setattr asks for anything but a size, or for nothing at all."""
    return (fields.update_mode or fields.update_uid or fields.update_gid
            or fields.update_atime or fields.update_mtime or not fields.update_size)


def _apply_setattr(path: bytes, fd: BackingFd | None, size: int | None, mode: int | None,
                   uid: int, gid: int, atime_ns: int | None,
                   mtime_ns: int | None) -> os.stat_result:
    """Through the caller's open file where it has one: its name may be another file's now."""
    if fd is not None:
        return fd.call(_set_attributes, size, mode, uid, gid, atime_ns, mtime_ns)
    return _set_attributes(path, size, mode, uid, gid, atime_ns, mtime_ns)


def _set_attributes(target: bytes | int, size: int | None, mode: int | None, uid: int,
                    gid: int, atime_ns: int | None, mtime_ns: int | None) -> os.stat_result:
    """On an open fd, or on a path without following a symlink at its end."""
    follow = isinstance(target, int)  # an fd has no symlink to follow; a path must not
    if size is not None:
        os.truncate(target, size)
    if mode is not None:
        os.chmod(target, mode)
    if uid != -1 or gid != -1 or (size is None and mode is None and atime_ns is None
                                  and mtime_ns is None):
        # chown(-1, -1) reaches us as a setattr that asks for nothing; the store's own
        # chown(-1, -1) moves ctime as the caller's would have.
        os.chown(target, uid, gid, follow_symlinks=follow)
    if atime_ns is not None or mtime_ns is not None:
        current = os.stat(target, follow_symlinks=follow)
        os.utime(target, ns=(atime_ns if atime_ns is not None else current.st_atime_ns,
                             mtime_ns if mtime_ns is not None else current.st_mtime_ns),
                 follow_symlinks=follow)
    return os.stat(target, follow_symlinks=follow)


def _list_with_stats(path: bytes) -> list[tuple[bytes, os.stat_result]]:
    result = []
    with os.scandir(path) as entries:
        for entry in entries:
            try:
                result.append((entry.name, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
    return result


def _fsync_dir(path: bytes) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
