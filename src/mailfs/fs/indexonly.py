"""Index-only mounts: every file *and directory* lives in the meta store; no backing path.

Dovecot's INDEX= and CONTROL= point here while it reads mail straight from the shared
store, so this mount holds only index and control files, and the directories around them.
Directories are stored files with an S_IFDIR mode under their parent's path, so they are
journaled, committed and replicated by the same records as index files (CREATE, RENAME,
RENAME_DIR, UNLINK, SETATTR); their inode numbers are `REPLICATED_BASE + fid`, stable
across remounts. Lock names stay volatile (RAM, this node only); every other name is
replicated, whatever it is called (the classifier is built with `*` as its pattern).

The mount root has no store entry: it shows the owner and mode of the mountpoint directory
underneath, so an admin sets them there (the same on every node) before mounting.

Atomicity: as in MailFS, no `await` comes between a check and the change it guards; the
only await in a changing request is `_changes_allowed`, before anything is checked.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from pathlib import Path

import pyfuse3
import trio

from mailfs.cachemgr.metastore import MAX_FILE_SIZE
from mailfs.cachemgr.records import Attrs, Op, Record, path_problem
from mailfs.fs.classifier import FileClass
from mailfs.fs.core import (
    DEVICE_NUMBER,
    NAME_MAX,
    Caller,
    DirListing,
    MailFS,
    oserror,
    statvfs_data,
)
from mailfs.fs.invalidation import invalidate_everything
from mailfs.fs.lockmirror import LockMirror, MirroredLock
from mailfs.fs.nodes import (
    HANDLE_SERIALS,
    REPLICATED_BASE,
    ROOT,
    Handle,
    Kind,
    Node,
    VolatileFile,
    handle_number,
    inode_of_handle,
)

log = logging.getLogger(__name__)

# A directory's stored nlink is 1 (its one name); stat shows the customary 2.
DIR_NLINK = 2
# The lookup count of a node that an adopted connection named before this daemon knew it:
# the kernel's own count is unknown, so the node stays until the next mount.
ADOPTED_LOOKUPS = 1 << 62


class IndexOnlyFS(MailFS):
    def __init__(self, *args: object, root_stat: os.stat_result, state_dir: str,
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.root_stat = root_stat
        self.state_dir = state_dir
        # Serving a FUSE connection that a crashed daemon opened (daemon.py, "adoption").
        self.adopted = False
        self.adopted_nodes = 0
        self.adopted_locks = 0
        self._fh_serial = 0
        self._directory_paths: dict[int, bytes] | None = None

    # ------------------------------------------------------------------ adoption

    def _fh(self, node: Node) -> int:
        """The inode number plus a serial (nodes.handle_number). An index or lock file's
        handle holds nothing but its node, so when all serials of a file are taken, a
        further open shares one; a directory's shares its listing too."""
        for _ in range(HANDLE_SERIALS):
            self._fh_serial = self._fh_serial % HANDLE_SERIALS + 1
            fh = handle_number(self._fh_serial, node.inode)
            if fh not in self.handles and fh not in self.dir_handles:
                return fh
        return fh

    def _node(self, inode: int) -> Node:
        node = self._resolved(inode)
        if node is None:
            raise oserror(errno.ENOENT)
        return node

    def _resolved(self, inode: int) -> Node | None:
        node = self.table.nodes.get(inode)
        if node is None and self.adopted:
            node = self._known_before(inode)
        return node

    def _dir(self, inode: int) -> Node:
        node = self._node(inode)
        if node.kind is not Kind.DIR:
            raise oserror(errno.ENOTDIR)
        return node

    def _handle(self, fh: int) -> Handle:
        handle = self.handles.get(fh)
        if handle is None and self.adopted:
            handle = self._handle_known_before(fh)
        if handle is None:
            raise oserror(errno.EBADF)
        return handle

    def listing(self, fh: int) -> DirListing:
        listing = self.dir_handles.get(fh)
        if listing is None and self.adopted:
            with contextlib.suppress(OSError):
                listing = self.dir_handles[fh] = DirListing(self._dir(inode_of_handle(fh)))
        if listing is None:
            raise oserror(errno.EBADF)
        return listing

    def counts(self) -> dict[str, object]:
        return {**super().counts(), "connection_adopted": self.adopted,
                "adopted_nodes": self.adopted_nodes, "adopted_locks": self.adopted_locks,
                "lock_mirror_failures": (self.lock_mirror.failures
                                         if self.lock_mirror is not None else 0)}

    def _known_before(self, inode: int) -> Node | None:
        """The node for a number the crashed daemon gave the kernel. Stored files and
        directories have numbers derived from their fid; lock files (RAM only) are gone."""
        if inode < REPLICATED_BASE:
            return None
        fid = inode - REPLICATED_BASE
        try:
            attrs = self.store.get(fid).attrs
        except FileNotFoundError:
            return None
        node = (self._stored_directory(fid) if stat.S_ISDIR(attrs.mode)
                else self.table.replicated(fid))
        if node is not None:
            node.lookups += ADOPTED_LOOKUPS
            self.adopted_nodes += 1
        return node

    def _stored_directory(self, fid: int) -> Node | None:
        """A stored directory's node, placed under its parents. Its path comes from a map
        of all directories, built once and again if a directory has moved since."""
        if self._directory_paths is not None:
            node = self._directory_placed(fid, self._directory_paths)
            if node is not None:
                return node
        self._directory_paths = self.store.directory_paths()
        return self._directory_placed(fid, self._directory_paths)

    def _directory_placed(self, fid: int, paths: dict[int, bytes]) -> Node | None:
        path = paths.get(fid)
        node = self._directory_at(path) if path is not None else None
        return node if node is not None and node.fid == fid else None

    def _directory_at(self, path: bytes) -> Node | None:
        node = self.table.nodes[ROOT]
        dirpath = b""
        for name in path.split(b"/"):
            fid = self._stored_dir(dirpath, name)
            if fid is None:
                return None
            node = self._dir_node(node, name, fid)
            dirpath = dirpath + b"/" + name if dirpath else name
        return node

    def _handle_known_before(self, fh: int) -> Handle | None:
        """A file handle the crashed daemon gave the kernel: its number holds the inode."""
        node = self._resolved(inode_of_handle(fh))
        if node is None or node.kind not in (Kind.REPLICATED, Kind.VOLATILE):
            return None
        handle = self.handles[fh] = Handle(fh, node, None)
        node.opens += 1
        if node.kind is Kind.REPLICATED:
            self._stored(node).opens += 1
        return handle

    def start_lock_mirror(self, directory: Path, adopted: bool) -> None:
        """Mirror lock files into `directory` from now on; on an adopted connection, first
        take back the locks the crashed daemon mirrored there (fs/lockmirror.py)."""
        mirror = LockMirror(directory)
        try:
            locks = mirror.open(keep=adopted)
        except OSError as exc:
            log.error("lock files are not mirrored (%s): after a crash of this daemon, "
                      "processes on the mount lose the locks they hold", exc)
            return
        self.lock_mirror = mirror
        for lock in locks:
            self._take_back_lock(mirror, lock)

    def _take_back_lock(self, mirror: LockMirror, lock: MirroredLock) -> None:
        inode = REPLICATED_BASE + lock.fid
        # Killed between renaming the lock over an index file and dropping its mirror:
        # the index file is the lock now.
        taken = inode in self.table.nodes
        with contextlib.suppress(FileNotFoundError):
            self.store.get(lock.fid)
            taken = True
        names = [key for key in lock.names if key not in self.volatile]
        if taken or not names:
            mirror.dropped(lock.fid)
            return
        node = Node(inode, Kind.VOLATILE)
        node.volatile = VolatileFile(lock.attrs, lock.content, inode)
        node.volatile.attrs.nlink = len(names)
        node.lookups = ADOPTED_LOOKUPS
        self.table.nodes[inode] = node
        for key in names:
            self.volatile[key] = node.volatile
        if len(names) != len(lock.names):
            self._mirror_lock(node.volatile)  # or the next crash brings the lost names back
        self.adopted_locks += 1
        log.info("took back lock file %s of the crashed daemon",
                 os.fsdecode(b"/".join(part for part in names[0] if part)))

    # ------------------------------------------------------------------ nodes

    @property
    def listings_enabled(self) -> bool:
        return False  # no backing store: every name is in the meta store already

    @property
    def remembers_opens(self) -> bool:
        return False  # no passthrough files

    def _stored_dir(self, dirpath: bytes, name: bytes) -> int | None:
        fid = self.store.lookup(dirpath, name)
        if fid is not None and stat.S_ISDIR(self.store.get(fid).attrs.mode):
            return fid
        return None

    def _dir_node(self, parent: Node, name: bytes, fid: int) -> Node:
        inode = REPLICATED_BASE + fid
        node = self.table.nodes.get(inode)
        if node is None:
            node = Node(inode, Kind.DIR, parent=parent.inode, name=name, fid=fid,
                        import_checked=True)
            self.table.nodes[inode] = node
            self.table.fid_inode[fid] = inode
            parent.children += 1
        elif (node.parent, node.name) != (parent.inode, name):
            # Renamed by a peer: the kernel learns the new place from this lookup.
            self.table.move(node, (node.parent, node.name), (parent.inode, name))
        self.table.entries[(parent.inode, name)] = inode
        return node

    def _parent_attrs(self, parent: Node) -> tuple[int, int]:
        """(mode, gid) of a directory: stored, or the mountpoint directory for the root."""
        if parent.inode == ROOT:
            return self.root_stat.st_mode, self.root_stat.st_gid
        attrs = self.store.get(parent.fid).attrs
        return attrs.mode, attrs.gid

    def _new_file_group(self, parent: Node, caller: Caller) -> int:
        """In a set-group-ID directory, new entries take the directory's group."""
        mode, gid = self._parent_attrs(parent)
        return gid if mode & stat.S_ISGID else caller.gid

    def _node_for(self, parent: Node, name: bytes, fid: int) -> Node:
        if stat.S_ISDIR(self.store.get(fid).attrs.mode):
            return self._dir_node(parent, name, fid)
        return self.table.replicated(fid)

    def _dir_entry(self, node: Node) -> pyfuse3.EntryAttributes:
        if node.inode == ROOT:
            st = self.root_stat
            return self._entry(node, self.timeouts.index, st.st_mode, DIR_NLINK, st.st_uid,
                               st.st_gid, 0, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
        attrs = self.store.get(node.fid).attrs
        return self._entry(node, self.timeouts.index, attrs.mode, DIR_NLINK, attrs.uid,
                           attrs.gid, 0, attrs.atime_ns, attrs.mtime_ns, attrs.ctime_ns)

    def _maybe_release(self, node: Node) -> None:
        if node.kind is not Kind.DIR or node.inode == ROOT:
            super()._maybe_release(node)
            return
        if node.lookups or node.children:
            return
        self.table.forget_placed(node)
        self.table.fid_inode.pop(node.fid, None)
        try:
            gone = self.store.get(node.fid).attrs.nlink == 0
        except FileNotFoundError:
            return
        if gone:
            self._drop_unlinked(node.fid)

    # ------------------------------------------------------------------ lookup / getattr

    async def lookup(self, parent_inode: int, name: bytes) -> pyfuse3.EntryAttributes:
        parent = self._dir(parent_inode)
        if len(name) > NAME_MAX:
            # The kernel looks every new name up before creating it, so this also refuses
            # create, mkdir, mknod, symlink, link and rename to such a name, as ext4 does.
            raise oserror(errno.ENAMETOOLONG)
        if name in (b".", b"..") or self.classifier.classify(name) is FileClass.VOLATILE:
            return await super().lookup(parent_inode, name)
        fid = self.store.lookup(self.table.dirpath(parent), name)
        if fid is None:
            return self._negative(self.timeouts.index)
        node = self._node_for(parent, name, fid)
        node.lookups += 1
        if node.kind is Kind.DIR:
            return self._dir_entry(node)
        return self._attrs_entry(node, self._stored(node).attrs)

    async def getattr(self, inode: int, count_lookup: bool = False) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if node.kind is not Kind.DIR:
            return await super().getattr(inode, count_lookup)
        self.getattr_by_kind[node.kind.value] += 1
        if count_lookup:
            node.lookups += 1
        return self._dir_entry(node)

    async def list_directory(self, listing: DirListing
                             ) -> list[tuple[bytes, pyfuse3.EntryAttributes, Node]]:
        parent = listing.node
        dirpath = self.table.dirpath(parent)
        result: list[tuple[bytes, pyfuse3.EntryAttributes, Node]] = []
        for name, fid in sorted(self.store.names_in(dirpath).items()):
            node = self._node_for(parent, name, fid)
            entry = (self._dir_entry(node) if node.kind is Kind.DIR
                     else self._attrs_entry(node, self._stored(node).attrs))
            result.append((name, entry, node))
        for (volatile_dir, name), volatile in sorted(self.volatile.items()):
            if volatile_dir == dirpath:
                node = self.table.nodes[volatile.inode]
                result.append((name, self._attrs_entry(node, volatile.attrs), node))
        return result

    # ------------------------------------------------------------------ directories

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    caller: Caller) -> pyfuse3.EntryAttributes:
        await self._changes_allowed()
        parent = self._dir(parent_inode)
        if self.classifier.classify(name) is FileClass.VOLATILE:
            raise oserror(errno.EPERM, "name reserved for lock files")
        dirpath = self.table.dirpath(parent)
        if self.store.lookup(dirpath, name) is not None:
            raise oserror(errno.EEXIST)
        mode = stat.S_IFDIR | (mode & 0o7777 & ~caller.umask)
        if self._parent_attrs(parent)[0] & stat.S_ISGID:
            mode |= stat.S_ISGID  # a set-group-ID directory passes the bit on, as on ext4
        stored = self.store.create(dirpath, name, mode, caller.uid,
                                   self._new_file_group(parent, caller))
        node = self._dir_node(parent, name, stored.fid)
        node.lookups += 1
        return self._dir_entry(node)

    async def rmdir(self, parent_inode: int, name: bytes) -> None:
        await self._changes_allowed()
        parent = self._dir(parent_inode)
        dirpath = self.table.dirpath(parent)
        fid = self.store.lookup(dirpath, name)
        if fid is None:
            raise oserror(errno.ENOENT)
        if self._stored_dir(dirpath, name) is None:
            raise oserror(errno.ENOTDIR)
        path = self.table.child_path(parent, name)
        if self.store.names_in(path) or self._volatile_in(path):
            raise oserror(errno.ENOTEMPTY)
        self.store.unlink(dirpath, name)
        self.table.unplace(parent.inode, name)
        self._release_if_unused(fid)

    async def unlink(self, parent_inode: int, name: bytes) -> None:
        parent = self._dir(parent_inode)
        if self._stored_dir(self.table.dirpath(parent), name) is not None:
            raise oserror(errno.EISDIR)
        await super().unlink(parent_inode, name)

    async def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
                     flags: int) -> None:
        await self._changes_allowed()
        src_dir, dst_dir = self._dir(old_parent), self._dir(new_parent)
        src_path, dst_path = self.table.dirpath(src_dir), self.table.dirpath(dst_dir)
        moving = self._stored_dir(src_path, old_name)
        if moving is None:
            if (self._stored_dir(dst_path, new_name) is not None
                    and self.store.lookup(src_path, old_name) is not None):
                raise oserror(errno.EISDIR)
            await super().rename(old_parent, old_name, new_parent, new_name, flags)
            return
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise oserror(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        old = self.table.child_path(src_dir, old_name)
        new = self.table.child_path(dst_dir, new_name)
        if new == old:
            return
        if new.startswith(old + b"/"):
            raise oserror(errno.EINVAL, "a directory cannot move into itself")
        if self.classifier.classify(new_name) is FileClass.VOLATILE:
            raise oserror(errno.EPERM, "name reserved for lock files")
        replaced = self.store.lookup(dst_path, new_name)
        if replaced is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise oserror(errno.EEXIST)
            if self._stored_dir(dst_path, new_name) is None:
                raise oserror(errno.ENOTDIR)
            if self.store.names_in(new) or self._volatile_in(new):
                raise oserror(errno.ENOTEMPTY)
        self.store.check_rename_dir(old, new)
        self.store.rename(src_path, old_name, dst_path, new_name)
        self.store.rename_dir(old, new)
        self._rename_volatile_dir(old, new)
        node = self.table.nodes.get(REPLICATED_BASE + moving)
        self.table.unplace(dst_dir.inode, new_name)
        if node is not None:
            self.table.move(node, (src_dir.inode, old_name), (dst_dir.inode, new_name))
        if replaced is not None:
            self._release_if_unused(replaced)

    async def link(self, inode: int, new_parent: int, new_name: bytes
                   ) -> pyfuse3.EntryAttributes:
        if self._node(inode).kind is Kind.DIR:
            raise oserror(errno.EPERM, "directories cannot be hard-linked")
        return await super().link(inode, new_parent, new_name)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      caller: Caller) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if node.kind is not Kind.DIR:
            return await super().setattr(inode, attr, fields, fh, caller)
        await self._changes_allowed()
        if node.inode == ROOT:
            raise oserror(errno.EPERM, "set the mount root's owner and mode on the mountpoint "
                                       "directory, before mounting")
        if fields.update_size:
            raise oserror(errno.EISDIR)
        stored = self._stored(node)
        self.store.set_attrs(stored, self._updated_attrs(stored.attrs, attr, fields))
        return self._dir_entry(node)

    async def fsyncdir(self, fh: int) -> None:
        self.listing(fh)
        await self._sync_replicated()

    async def statfs(self) -> pyfuse3.StatvfsData:
        return statvfs_data(os.statvfs(self.state_dir))  # local disk: fine on the trio thread

    # ------------------------------------------------------------------ migration

    async def export_to(self, target: str) -> int:
        """Write every directory and file but locks under `target` (`mailfs export --to`):
        for leaving mailfs, back to INDEX=/CONTROL= on a local disk. Stop Dovecot first;
        what changes meanwhile may or may not be in the copy."""
        await self.store.sync()
        count = 0
        directories: list[tuple[str, Attrs]] = []
        # Sorted, a directory comes before everything in it.
        for dirpath, name, fid in sorted(self.store.all_files()):
            relative = dirpath + b"/" + name if dirpath else name
            if path_problem(Record(0, Op.UNLINK, (dirpath, name, 0))) is not None:
                log.error("export skips %r: not a valid path inside the mount", relative)
                continue
            stored = self.store.get(fid)
            destination = os.path.join(target, os.fsdecode(relative))
            if stat.S_ISDIR(stored.attrs.mode):
                await trio.to_thread.run_sync(_make_directory, destination, stored.attrs)
                directories.append((destination, stored.attrs.copy()))
            else:
                await trio.to_thread.run_sync(self._write_back, os.fsencode(destination),
                                              bytes(stored.content), stored.attrs.copy())
            count += 1
        for destination, attrs in reversed(directories):  # after their contents changed
            await trio.to_thread.run_sync(_set_times, destination, attrs)
        return count

    async def import_from(self, source: str) -> int:
        """Adopt a tree of index and control files from local disk (`mailfs import --from`):
        today's `:INDEX=` users moving onto mailfs. Files replace what the mount has under
        the same name; lock files are skipped; directories keep their owner and mode."""
        walked = await trio.to_thread.run_sync(_walk, source)
        imported: set[tuple[bytes, bytes]] = set()
        count = 0
        for relative, st in walked:
            dirpath, _, name = relative.rpartition(b"/")
            # path_problem also skips a path longer than the store keeps.
            if (self.classifier.classify(name) is FileClass.VOLATILE
                    or path_problem(Record(0, Op.UNLINK, (dirpath, name, 0))) is not None):
                continue
            attrs = Attrs(st.st_mode, st.st_uid, st.st_gid, 1, 0, st.st_atime_ns,
                          st.st_mtime_ns, st.st_ctime_ns)
            existing = self.store.lookup(dirpath, name)
            if stat.S_ISDIR(st.st_mode):
                if existing is None:
                    self.store.put(dirpath, name, attrs, b"")
                    imported.add((dirpath, name))
                    count += 1
                continue
            if st.st_size > MAX_FILE_SIZE:
                log.warning("import skips %r: %d bytes is more than an index file can be",
                            relative, st.st_size)
                continue
            path = os.path.join(source, os.fsdecode(relative))
            content = await trio.to_thread.run_sync(_content_of, path, st)
            attrs.size = len(content)
            self.store.put(dirpath, name, attrs, content)
            imported.add((dirpath, name))
            count += 1
        await self.store.sync()
        # The kernel may have cached these names as absent, or their old content.
        invalidate_everything(imported, self.table, self.invalidator)
        return count


def _make_directory(path: str, attrs: Attrs) -> None:
    os.makedirs(path, exist_ok=True)
    os.chown(path, attrs.uid, attrs.gid)
    os.chmod(path, attrs.mode & 0o7777)


def _set_times(path: str, attrs: Attrs) -> None:
    os.utime(path, ns=(attrs.atime_ns, attrs.mtime_ns))


def _content_of(path: str, st: os.stat_result) -> bytes:
    """What the store keeps for a file: its bytes, a link's target, a device's number."""
    if stat.S_ISLNK(st.st_mode):
        return os.fsencode(os.readlink(path))
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return DEVICE_NUMBER.pack(st.st_rdev)
    if not stat.S_ISREG(st.st_mode):
        return b""  # a fifo or a socket: never opened, it would block
    with open(path, "rb") as handle:
        return handle.read()


def _walk(source: str) -> list[tuple[bytes, os.stat_result]]:
    """(path relative to source, lstat) of every directory and file, parents first."""
    if not os.path.isdir(source):
        raise FileNotFoundError(errno.ENOENT, f"{source} is not a directory")
    found: list[tuple[bytes, os.stat_result]] = []
    root = os.fsencode(source)
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in [*sorted(subdirs), *sorted(files)]:
            path = os.path.join(directory, name)
            found.append((os.path.relpath(path, root), os.lstat(path)))
    found.sort(key=lambda item: item[0].count(b"/"))
    return found
