"""The pyfuse3 Operations adapter: argument plumbing and error translation only.

pyfuse3's C layer handles nothing but FUSEError, so every handler turns OSError into
FUSEError here and anything unexpected into EIO with a logged traceback.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import pyfuse3

from mailfs.fs import session
from mailfs.fs.core import Caller, MailFS
from mailfs.fs.fulldisk import task_effects

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# Requests served, by handler: the number that decides FUSE performance (see status).
REQUESTS: Counter[str] = Counter()
# "request errno-name" -> count of error replies, for status: a read or getattr failing
# under an mmap'd file is a SIGBUS in the application, so these must be visible.
ERROR_REPLIES: Counter[str] = Counter()


def fuse_errors(handler: F) -> F:
    name = handler.__name__

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        REQUESTS[name] += 1
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            code = exc.errno or errno.EIO
            ERROR_REPLIES[f"{name} {errno.errorcode.get(code, code)}"] += 1
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("internal error in %s%r", name, args[1:])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return cast(F, wrapper)


def held_on_full_disk(handler: F) -> F:
    """For requests that change something: refused for want of room on the state disk,
    one waits for room (bounded) and runs again (fs/fulldisk.py)."""

    @functools.wraps(handler)
    async def wrapper(self: Operations, *args: Any, **kwargs: Any) -> Any:
        # FullDiskHold.run, inlined: every write and create comes this way, and only a
        # refused one needs the closure.
        before = task_effects()
        try:
            return await handler(self, *args, **kwargs)
        except OSError as exc:
            return await self.fs.full_disk.after_refusal(
                exc, before, functools.partial(handler, self, *args, **kwargs))

    return cast(F, wrapper)


def caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.umask, ctx.pid)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, fs: MailFS) -> None:
        super().__init__()
        self.fs = fs

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes,  # type: ignore[override]
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        log.debug("lookup %d %r", parent_inode, name)
        return await self.fs.lookup(parent_inode, name)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:  # type: ignore[override]
        REQUESTS["forget"] += 1
        for inode, count in inode_list:
            try:
                self.fs.forget(inode, count)
            except Exception:
                log.exception("internal error in forget(%d, %d)", inode, count)

    @fuse_errors
    async def getattr(self, inode: int,  # type: ignore[override]
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        log.debug("getattr %d", inode)
        return await self.fs.getattr(inode)

    @fuse_errors
    @held_on_full_disk
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,  # type: ignore[override]
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        log.debug("setattr %d fh=%s", inode, fh)
        return await self.fs.setattr(inode, attr, fields, fh, caller(ctx))

    @fuse_errors
    @held_on_full_disk
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,  # type: ignore[override]
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        log.debug("mkdir %d %r", parent_inode, name)
        return await self.fs.mkdir(parent_inode, name, mode, caller(ctx))

    @fuse_errors
    @held_on_full_disk
    async def unlink(self, parent_inode: int, name: bytes,  # type: ignore[override]
                     ctx: pyfuse3.RequestContext) -> None:
        log.debug("unlink %d %r", parent_inode, name)
        await self.fs.unlink(parent_inode, name)

    @fuse_errors
    @held_on_full_disk
    async def rmdir(self, parent_inode: int, name: bytes,  # type: ignore[override]
                    ctx: pyfuse3.RequestContext) -> None:
        log.debug("rmdir %d %r", parent_inode, name)
        await self.fs.rmdir(parent_inode, name)

    @fuse_errors
    @held_on_full_disk
    async def rename(self, parent_inode_old: int, name_old: bytes,  # type: ignore[override]
                     parent_inode_new: int, name_new: bytes, flags: int,
                     ctx: pyfuse3.RequestContext) -> None:
        log.debug("rename %d %r -> %d %r", parent_inode_old, name_old, parent_inode_new,
                  name_new)
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @fuse_errors
    @held_on_full_disk
    async def link(self, inode: int, new_parent_inode: int,  # type: ignore[override]
                   new_name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        log.debug("link %d -> %d %r", inode, new_parent_inode, new_name)
        return await self.fs.link(inode, new_parent_inode, new_name)

    @fuse_errors
    @held_on_full_disk
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,  # type: ignore[override]
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        log.debug("symlink %d %r -> %r", parent_inode, name, target)
        return await self.fs.symlink(parent_inode, name, target, caller(ctx))

    @fuse_errors
    @held_on_full_disk
    async def mknod(self, parent_inode: int, name: bytes, mode: int,  # type: ignore[override]
                    rdev: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        log.debug("mknod %d %r mode=%o rdev=%d", parent_inode, name, mode, rdev)
        return await self.fs.mknod(parent_inode, name, mode, rdev, caller(ctx))

    @fuse_errors
    async def readlink(self, inode: int,  # type: ignore[override]
                       ctx: pyfuse3.RequestContext) -> bytes:
        log.debug("readlink %d", inode)
        return await self.fs.readlink(inode)

    @fuse_errors
    @held_on_full_disk
    async def open(self, inode: int, flags: int,  # type: ignore[override]
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        log.debug("open %d flags=%o", inode, flags)
        # Only a truncating open asks who the caller is (set-id bits); opens are frequent.
        return await self.fs.open(inode, flags, caller(ctx) if flags & os.O_TRUNC else None)

    @fuse_errors
    @held_on_full_disk
    async def create(self, parent_inode: int, name: bytes, mode: int,  # type: ignore[override]
                     flags: int, ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        log.debug("create %d %r mode=%o", parent_inode, name, mode)
        return await self.fs.create(parent_inode, name, mode, flags, caller(ctx))

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:  # type: ignore[override]
        log.debug("read fh=%d off=%d size=%d", fh, off, size)
        return await self.fs.read(fh, off, size)

    @fuse_errors
    @held_on_full_disk
    async def write(self, fh: int, off: int, buf: bytes) -> int:  # type: ignore[override]
        appending = bool(fh & session.FH_APPENDING)
        fh &= ~session.FH_APPENDING
        log.debug("write fh=%d off=%d len=%d appending=%s", fh, off, len(buf), appending)
        return await self.fs.write(fh, off, buf, appending)

    async def flush(self, fh: int) -> None:  # type: ignore[override]
        # Nothing happens at close() that release() does not do, and ENOSYS here makes
        # the kernel stop sending FLUSH at all: one request fewer for every close().
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_errors
    async def release(self, fh: int) -> None:  # type: ignore[override]
        log.debug("release fh=%d", fh)
        await self.fs.release(fh)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:  # type: ignore[override]
        log.debug("fsync fh=%d datasync=%s", fh, datasync)
        await self.fs.fsync(fh, datasync)

    @fuse_errors
    async def opendir(self, inode: int,  # type: ignore[override]
                      ctx: pyfuse3.RequestContext) -> int:
        log.debug("opendir %d", inode)
        return await self.fs.opendir(inode)

    @fuse_errors
    async def readdir(self, fh: int, start_id: int,  # type: ignore[override]
                      token: pyfuse3.ReaddirToken) -> None:
        log.debug("readdir fh=%d start=%d", fh, start_id)
        listing = self.fs.listing(fh)
        if listing.entries is None or start_id == 0:
            listing.entries = await self.fs.list_directory(listing)
        for index, name, entry, node in self.fs.entries_from(listing, start_id):
            if not pyfuse3.readdir_reply(token, name, entry, index + 1):
                break
            node.lookups += 1

    @fuse_errors
    async def releasedir(self, fh: int) -> None:  # type: ignore[override]
        log.debug("releasedir fh=%d", fh)
        self.fs.releasedir(fh)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:  # type: ignore[override]
        log.debug("fsyncdir fh=%d", fh)
        await self.fs.fsyncdir(fh)

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:  # type: ignore[override]
        log.debug("statfs")
        return await self.fs.statfs()
