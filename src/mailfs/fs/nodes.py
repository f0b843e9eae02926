"""The inode table: what each FUSE inode number stands for.

mailfs allocates its own inode numbers and never reuses one during a mount: backing
filesystems reuse theirs, and with kernel caching a reused number would merge two files.
Replicated files get `REPLICATED_BASE + fid`, so their numbers are stable across remounts.
"""

from __future__ import annotations

import enum
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import pyfuse3

from mailfs.cachemgr.backing import BackingFd
from mailfs.cachemgr.records import Attrs

ROOT = int(pyfuse3.ROOT_INODE)
REPLICATED_BASE = 1 << 40
REMEMBERED_NUMBERS = 1 << 20
# Index-only mounts: a handle number carries its file's inode number in its low bits, so
# that a daemon that adopts a crashed one's FUSE connection can rebuild the handles the
# kernel still uses from the number alone (pyfuse3 passes read, write and release only
# the handle). A serial in bits 57-61 tells apart opens of one file; bit 62 is the C
# part's append tag.
HANDLE_INODE_BITS = 57  # REPLICATED_BASE + fid < 2**57 (fids have 56 bits)
HANDLE_SERIALS = 31


def handle_number(serial: int, inode: int) -> int:
    return (serial << HANDLE_INODE_BITS) | inode


def inode_of_handle(fh: int) -> int:
    return fh & ((1 << HANDLE_INODE_BITS) - 1)


def backing_identity(st: os.stat_result) -> int:
    """One integer for (st_dev, st_ino): a backing path may span several filesystems."""
    return (st.st_dev << 64) | st.st_ino


class Kind(enum.Enum):
    DIR = "dir"
    PASSTHROUGH = "passthrough"
    REPLICATED = "replicated"
    VOLATILE = "volatile"


@dataclass(eq=False)
class VolatileFile:
    """A lock file: RAM only, this node only, gone at restart."""

    attrs: Attrs
    content: bytearray
    inode: int


@dataclass(eq=False, slots=True)
class Node:
    inode: int
    kind: Kind
    # Directories and passthrough files: where they sit (for building backing paths).
    parent: int = 0
    name: bytes = b""
    fid: int = 0
    volatile: VolatileFile | None = None
    backing_ino: int = 0
    lookups: int = 0
    opens: int = 0
    children: int = 0
    import_checked: bool = False
    # A passthrough file whose name now belongs to another file (unlinked, renamed over).
    detached: bool = False
    # (mtime_ns, size) of the backing file when the kernel last cached its pages.
    cached_version: tuple[int, int] = (0, 0)
    # Passthrough files: (monotonic time it was asked for, mtime_ns, size) of the last
    # stat of the backing file, while nothing this mount did has changed it since.
    verified: tuple[float, int, int] | None = None
    # When a change of this mount's to the file last ended (monotonic): a stat asked for
    # before then may have been answered before the change.
    changed_at: float = 0.0
    # Directories: (monotonic time, backing stat) taken right after our own change to the
    # directory, so the getattr the kernel sends after that change needs no backing call.
    stat_cache: tuple[float, os.stat_result] | None = None
    # Its times were moved by our own changes, not read from the store (MailFS._dir_changed).
    stat_derived: bool = False
    # Extra names of a hard-linked passthrough file: (parent inode, name).
    aliases: list[tuple[int, bytes]] = field(default_factory=list)
    # Bumped whenever a rename, link or unlink has changed this file's names.
    names_version: int = 0


@dataclass(eq=False, slots=True)
class Handle:
    fh: int
    node: Node
    # Passthrough files only; index and lock files are served from RAM. None on a
    # passthrough file: open() was answered from memory (MailFS._remembered_version).
    fd: BackingFd | None = None
    # What the store's file is opened with when it is needed (passthrough files).
    open_flags: int = os.O_RDONLY
    # Opens sharing this handle number (index-only: more opens of one file than serials).
    opens: int = 1


class InodeTable:
    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {ROOT: Node(ROOT, Kind.DIR, lookups=1)}
        self.entries: dict[tuple[int, bytes], int] = {}
        self.fid_inode: dict[int, int] = {}
        # backing identity -> our inode number, kept after the kernel forgets the inode so
        # that a file keeps its number for the life of the mount (within this bound).
        self.numbers: OrderedDict[int, int] = OrderedDict()
        self._next = 2
        # False when the backing store renumbers files (sshfs): a name then keeps its node
        # whatever number the store reports now, and no open refuses a name for it.
        self.stable_inodes = True

    def allocate(self) -> int:
        inode = self._next
        self._next += 1
        return inode

    def _number_for(self, backing_ino: int) -> int:
        """The inode number a backing file had before the kernel forgot it, or a new one.

        A number still in use is never handed out again: if the backing store reused an
        inode number while the kernel still holds our old inode, sharing it would merge two
        files, so that case gets a fresh number.
        """
        number = self.numbers.get(backing_ino)
        if number is None or number in self.nodes:
            number = self.allocate()
        self.numbers[backing_ino] = number
        self.numbers.move_to_end(backing_ino)
        if len(self.numbers) > REMEMBERED_NUMBERS:
            self.numbers.popitem(last=False)
        return number

    def dirpath(self, node: Node) -> bytes:
        """Path of a directory relative to the mount root; b'' for the root."""
        parts = []
        while node.inode != ROOT:
            parts.append(node.name)
            node = self.nodes[node.parent]
        return b"/".join(reversed(parts))

    def dir_inode(self, dirpath: bytes) -> int | None:
        """The inode of a directory the kernel knows, by path; None if it knows none."""
        inode = ROOT
        if not dirpath:
            return inode
        for part in dirpath.split(b"/"):
            found = self.entries.get((inode, part))
            if found is None:
                return None
            inode = found
        return inode

    def child_path(self, parent: Node, name: bytes) -> bytes:
        base = self.dirpath(parent)
        return base + b"/" + name if base else name

    def replicated(self, fid: int) -> Node:
        inode = self.fid_inode.get(fid)
        if inode is not None:
            return self.nodes[inode]
        inode = REPLICATED_BASE + fid
        node = Node(inode, Kind.REPLICATED, fid=fid)
        self.nodes[inode] = node
        self.fid_inode[fid] = inode
        return node

    def placed(self, parent: Node, name: bytes, kind: Kind, backing_ino: int) -> Node:
        """The node for a backing entry, new if the backing file is not the one we knew."""
        key = (parent.inode, name)
        inode = self.entries.get(key)
        if inode is not None:
            node = self.nodes[inode]
            if node.kind is kind and (node.backing_ino == backing_ino
                                      or not self.stable_inodes):
                node.backing_ino = backing_ino
                return node
            self.unplace(parent.inode, name)
        node = Node(self._number_for(backing_ino), kind, parent=parent.inode, name=name,
                    backing_ino=backing_ino)
        self.nodes[node.inode] = node
        self.entries[key] = node.inode
        parent.children += 1
        return node

    def unplace(self, parent_inode: int, name: bytes) -> Node | None:
        inode = self.entries.pop((parent_inode, name), None)
        if inode is None:
            return None
        node = self.nodes[inode]
        if (node.parent, node.name) == (parent_inode, name):
            if node.aliases:
                node.parent, node.name = node.aliases.pop()
                return node
            node.detached = True
        elif (parent_inode, name) in node.aliases:
            node.aliases.remove((parent_inode, name))
        return node

    def move(self, node: Node, old: tuple[int, bytes], new: tuple[int, bytes]) -> None:
        self.entries.pop(old, None)
        self.entries[new] = node.inode
        if (node.parent, node.name) == old:
            if node.parent != new[0]:
                self.nodes[node.parent].children -= 1
                self.nodes[new[0]].children += 1
            node.parent, node.name = new
        elif old in node.aliases:
            node.aliases[node.aliases.index(old)] = new

    def forget_placed(self, node: Node) -> None:
        """Remove a directory or passthrough node the kernel no longer knows."""
        for key in [(node.parent, node.name), *node.aliases]:
            if self.entries.get(key) == node.inode:
                del self.entries[key]
        parent = self.nodes.get(node.parent)
        if parent is not None:
            parent.children -= 1
        del self.nodes[node.inode]
