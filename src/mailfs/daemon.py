"""Put a mount together, run it, and take it down in a fixed order.

Startup: lock the state dir, recover LMDB from the journal, mount, then report ready.
Shutdown (after the kernel unmounts us or SIGTERM): stop background tasks, commit
everything, close LMDB. The state-dir lock keeps two daemons off one LMDB.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from mailfs import __version__, adoption, mounts
from mailfs.cachemgr.backing import Backing, filesystem_type, inline_calls, stable_inodes
from mailfs.cachemgr.metastore import MetaStore
from mailfs.cachemgr.ownership import LosingVersion
from mailfs.config import Config
from mailfs.control import ControlServer
from mailfs.errors import UserError, ensure_directory
from mailfs.fs import session
from mailfs.fs.classifier import Classifier
from mailfs.fs.core import MailFS, Timeouts
from mailfs.fs.indexonly import IndexOnlyFS
from mailfs.fs.lockmirror import mirror_directory
from mailfs.fs.operations import ERROR_REPLIES, REQUESTS, Operations
from mailfs.fs.session import dispatch, keeper
from mailfs.replication.identity import node_namespace
from mailfs.replication.replicator import Replicator
from mailfs.replication.service import Replication

log = logging.getLogger(__name__)

FLUSH_PEER_TIMEOUT = 60.0
TAKEOVER_WAIT = 30.0
# `flush --caches` waits this long for the kernel to take the invalidations (a stalled
# backing store can hold some up; status and the reply say how many are still pending).
DROP_CACHES_WAIT = 30.0


@contextlib.contextmanager
def state_dir_lock(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"state dir {state_dir} is in use by another mailfs mount") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def check_privileges() -> None:
    if os.geteuid() != 0:
        raise UserError("mailfs must run as root (it mounts with allow_other and sets owners)")


def check_paths(config: Config) -> None:
    """Run with the state dir locked and no earlier keeper holding: clearing a dead mount
    while its keeper holds would bare the mountpoint directory for the whole hold."""
    if config.mode == "full" and not config.backing.is_dir():
        raise UserError(f"backing path {config.backing} does not exist or is not a directory")
    if mounts.is_dead_mailfs_mount(config.mountpoint, config.control_socket()):
        # A daemon that died (kill -9, OOM) leaves its mount behind; its journal has the
        # changes, so clearing the dead mount and mounting again loses nothing.
        log.warning("clearing the mount of a mailfs daemon that died at %s", config.mountpoint)
        mounts.clear_dead_mount(config.mountpoint)
    ensure_directory(config.state_dir, "state dir")
    ensure_directory(config.run_dir, "run dir")
    try:
        usable = config.mountpoint.is_dir()
    except OSError as exc:
        raise UserError(f"mountpoint {config.mountpoint} is unusable: {exc.strerror}") from None
    if not usable:
        raise UserError(f"mountpoint {config.mountpoint} does not exist or is not a directory")
    if os.path.ismount(config.mountpoint):
        raise UserError(f"mountpoint {config.mountpoint} is already in use by another mount")
    if config.mode == "full" and (os.path.realpath(config.backing)
                                  == os.path.realpath(config.mountpoint)):
        raise UserError("backing path and mountpoint must differ")


class Daemon:
    def __init__(self, config: Config, adopted: adoption.Adopted | None = None) -> None:
        self.config = config
        self.mountpoint = str(config.mountpoint)
        self.started = time.time()
        self.keeper: keeper.Keeper | None = None
        self.fast_waits = False  # dispatch.install() done: pyfuse3 waits for requests our way
        self._token: trio.lowlevel.TrioToken | None = None
        self.store = MetaStore(
            config.state_dir, config.ram_budget, config.lmdb_map_size,
            config.commit_interval, config.commit_bytes,
            node_id=config.node_id,
            namespace=node_namespace(config.node_id) if config.replication_enabled else 0,
            replicating=config.replication_enabled, log_limit=config.log_limit,
            dirs_stored=config.mode == "index-only",
            ownership_depth=config.ownership_depth,
        )
        self.index_only = config.mode == "index-only"
        self.backing_fs_type = ""
        timeouts = Timeouts(config.index_timeout, config.passthrough_timeout)
        if self.index_only:
            # Never served: no worker threads and no probe; no request reaches it.
            self.backing = Backing(config.state_dir, 1, config.backing_timeout)
            self.fs: MailFS = IndexOnlyFS(
                self.store, self.backing, Classifier(("*",), config.volatile), timeouts,
                import_on_access=False, install_wait=config.install_wait,
                full_disk_wait=config.full_disk_wait,
                root_stat=(adopted.record.root_stat if adopted is not None
                           else os.stat(config.mountpoint)),
                state_dir=str(config.state_dir),
            )
        else:
            self.backing = Backing(config.backing, config.backing_threads,
                                   config.backing_timeout)
            self.backing.enter_root()
            self.fs = MailFS(
                self.store, self.backing, Classifier(config.replicated, config.volatile),
                timeouts, import_on_access=config.import_on_access,
                install_wait=config.install_wait, full_disk_wait=config.full_disk_wait,
            )
            self.backing_fs_type = filesystem_type(config.backing)
            self.fs.table.stable_inodes = stable_inodes(config.backing_inodes,
                                                         self.backing_fs_type)
            self.backing.inline = inline_calls(config.backing_calls, self.backing_fs_type)
            log.debug("backing store %s (%s): system calls %s", config.backing,
                     self.backing_fs_type or "unknown type",
                     "inline" if self.backing.inline else "on worker threads")
            if not self.fs.table.stable_inodes:
                log.warning("the backing store (%s) may renumber files: mailfs knows passthrough "
                            "files by name there, so a file that another writer replaces under "
                            "the same name is taken for the old one",
                            self.backing_fs_type or "unknown type")
        self.replication: Replication | None = None
        if config.replication_enabled:
            self.replication = Replication(config, self.store, self.fs)

    def start_metrics(self) -> None:
        """Bind the metrics port before mounting, so that a busy port is a clear error."""
        if not self.config.metrics_port:
            return
        from mailfs.metrics import serve_metrics

        def status_from_trio() -> dict[str, Any]:
            # The exporter's thread must not read state the trio thread is changing.
            if self._token is None:
                return {}
            try:
                return trio.from_thread.run_sync(self.status, trio_token=self._token)
            except trio.RunFinishedError:
                return {}

        try:
            serve_metrics(self.config.metrics_port, status_from_trio)
        except OSError as exc:
            raise UserError(f"cannot serve metrics on 127.0.0.1:{self.config.metrics_port}: "
                            f"{exc.strerror}") from None

    def _backing_status(self) -> dict[str, Any]:
        if self.index_only:
            return {}
        backing = self.backing.stats
        return {
            "backing": str(self.config.backing),
            "backing_fs_type": self.backing_fs_type,
            "backing_inodes": "stable" if self.fs.table.stable_inodes else "unstable",
            "backing_call_mode": "inline" if self.backing.inline else "threads",
            "backing_calls": backing.calls,
            "backing_calls_by_op": dict(backing.by_call.most_common()),
            "backing_mean_ms_by_op": backing.mean_ms_by_call(),
            "backing_errors": backing.errors,
            "backing_timeouts": backing.timeouts,
            "backing_stalled_calls": self.backing.stalled_calls(),
            "backing_healthy": self.backing.healthy(),
        }

    def status(self) -> dict[str, Any]:
        store = self.store.stats
        healthy_backing = self.index_only or self.backing.healthy()
        return {
            "version": __version__,
            "mode": self.config.mode,
            "pid": os.getpid(),
            "mountpoint": str(self.config.mountpoint),
            "state_dir": str(self.config.state_dir),
            "uptime_seconds": round(time.time() - self.started, 1),
            **self.store.counts(),
            **self.fs.counts(),
            "ram_hits": store.ram_hits,
            "ram_misses": store.ram_misses,
            "evictions": store.evictions,
            "commits": store.commits,
            "commit_seconds": round(store.commit_seconds, 3),
            "commit_errors": store.commit_errors,
            "journal_errors": store.journal_errors,
            "journal_fsyncs": store.journal_fsyncs,
            "journal_reserve_bytes": self.store.journal.reserve_bytes(),
            "journal_reserve_records": self.store.journal.reserve_records,
            "last_commit_error": store.last_commit_error,
            "replayed_records": store.replayed_records,
            **self._backing_status(),
            "healthy": healthy_backing and not store.last_commit_error,
            "requests": dict(REQUESTS.most_common()),
            "requests_total": sum(REQUESTS.values()),
            "error_replies": dict(ERROR_REPLIES.most_common()),
            "invalidations": self.fs.invalidator.sent,
            "passthrough_invalidations": self.fs.passthrough_invalidator.sent,
            "fuse_session": session.status(),
            "request_waits": {"fast": self.fast_waits, **dispatch.waits.status()},
            "crash_hold": {"seconds": self.config.crash_hold, "fence": self.config.crash_fence,
                           "keeper_pid": self.keeper.pid if self.keeper else None,
                           "adopt_connection": self.index_only and self.config.adopt_connection},
            **({"replication": self.replication.replicator.status()}
               if self.replication is not None else {}),
        }

    async def _flush(self, request: dict[str, Any]) -> dict[str, Any]:
        await self.store.sync()
        result: dict[str, Any] = {"committed_seq": self.store.committed_seq}
        if request.get("caches"):
            result["caches"] = await self.fs.drop_caches()
            result["caches"]["pending"] = await self.fs.passthrough_invalidator.drain(
                DROP_CACHES_WAIT)
            log.info("caches dropped on request: %s", result["caches"])
        if self.replication is not None:
            timeout = float(request.get("peer_timeout", FLUSH_PEER_TIMEOUT))
            behind = await self.replication.replicator.wait_all_acked(timeout)
            result["peers_behind"] = behind
        return result

    async def _unmount_check(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.replication is None or request.get("force"):
            return {"blockers": []}
        return {"blockers": self.replication.replicator.unmount_blockers()}

    async def _status(self, _request: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    def _replicator(self) -> Replicator:
        if self.replication is None:
            raise UserError("this mount has no replication peers: nothing is owned")
        return self.replication.replicator

    async def _owners(self, _request: dict[str, Any]) -> dict[str, Any]:
        replicator = self._replicator()
        return {"node_id": replicator.node_id, "policy": replicator.policy,
                "depth": self.store.ownership_depth, "owners": self.store.owner_list()}

    async def _conflicts(self, request: dict[str, Any]) -> dict[str, Any]:
        self._replicator()
        versions = self.store.losing_versions()
        target = request.get("save")
        saved = []
        if target is not None:
            if not isinstance(target, str) or not target:
                raise UserError("conflicts --save needs an existing directory")
            problem = await trio.to_thread.run_sync(
                target_problem, target, self.config.mountpoint, "conflicts --save")
            if problem:
                raise UserError(problem)
            saved = await trio.to_thread.run_sync(save_losing_versions, target, versions)
        purged = self.store.purge_losing_versions() if request.get("purge") else 0
        return {"versions": [version_summary(v) for v in versions], "saved": saved,
                "purged": purged}

    async def _takeover(self, request: dict[str, Any]) -> dict[str, Any]:
        replicator = self._replicator()
        user = request.get("user")
        if not isinstance(user, str) or not user:
            raise UserError("takeover needs a user directory")
        timeout = float(request.get("wait", TAKEOVER_WAIT))
        try:
            result = await replicator.take_over(os.fsencode(user.strip("/")), timeout,
                                                bool(request.get("force")))
        except OSError as exc:
            raise UserError(f"takeover of {user} failed: {exc.strerror or exc}") from None
        await self.store.sync()
        return result

    async def _import(self, request: dict[str, Any]) -> dict[str, Any]:
        source = request.get("from")
        if isinstance(self.fs, IndexOnlyFS):
            if not isinstance(source, str) or not source:
                raise UserError("an index-only mount imports from a directory: give --from DIR")
            try:
                return {"imported": await self.fs.import_from(source)}
            except OSError as exc:
                raise UserError(f"import from {source} failed: {exc}") from None
        if source:
            raise UserError("--from is for index-only mounts; this one imports from its "
                            "backing path")
        imported = await self.fs.import_tree()
        await self.store.sync()
        return {"imported": imported}

    async def _export(self, request: dict[str, Any]) -> dict[str, Any]:
        target = request.get("to")
        if isinstance(self.fs, IndexOnlyFS):
            if not isinstance(target, str) or not target:
                raise UserError("an index-only mount exports to an existing directory: give "
                                "--to DIR")
            # On a worker thread: a target inside this mount is answered by this trio thread.
            problem = await trio.to_thread.run_sync(
                target_problem, target, self.config.mountpoint, "export --to")
            if problem:
                raise UserError(problem)
            try:
                return {"exported": await self.fs.export_to(target)}
            except OSError as exc:
                raise UserError(f"export to {target} failed: {exc}") from None
        if target:
            raise UserError("--to is for index-only mounts; this one exports to its backing "
                            "path")
        return {"exported": await self.fs.export_tree()}

    async def main(self, ready_fd: int | None, control_socket: Path) -> None:
        control = ControlServer(control_socket, {
            "status": self._status, "flush": self._flush,
            "import": self._import, "export": self._export,
            "unmount_check": self._unmount_check,
            "owners": self._owners, "conflicts": self._conflicts, "takeover": self._takeover,
        })
        async with trio.open_nursery() as nursery:
            if not self.index_only:
                await nursery.start(self.backing.serve)
                await nursery.start(self.fs.read_listings)
            await nursery.start(self.store.run_committer)
            await nursery.start(self.fs.invalidator.run)
            await nursery.start(self.fs.passthrough_invalidator.run)
            if self.replication is not None:
                await nursery.start(self.replication.run)
            await nursery.start(control.serve)
            nursery.start_soon(self._watch_signals)
            if self.index_only and self.config.adopt_connection:
                nursery.start_soon(self._record_connection)
            self._token = trio.lowlevel.current_trio_token()
            report_ready(ready_fd, "ok")
            log.info("mailfs %s mounted %s %s", __version__, self.config.mountpoint,
                     "index-only" if self.index_only else f"over {self.config.backing}")
            self.fast_waits = dispatch.install()
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await self.store.commit()

    async def _record_connection(self) -> None:
        """Once the kernel's INIT has come: what a restarted daemon needs to adopt this
        connection after a crash (adoption.py). An adopted connection keeps its record."""
        assert isinstance(self.fs, IndexOnlyFS)
        if self.fs.adopted:
            return
        for _ in range(RECORD_WAIT_STEPS):
            request = session.init_request()
            if request is not None:
                try:
                    device = await trio.to_thread.run_sync(adoption.mounted_device,
                                                           self.mountpoint)
                    if device is None:
                        raise OSError(errno.ENOENT, "the mount is not in the mount table")
                    record = adoption.ConnectionRecord(self.mountpoint, device, request,
                                                       self.fs.root_stat)
                    await trio.to_thread.run_sync(adoption.save_record,
                                                  self.config.state_dir, record)
                except OSError as exc:
                    log.warning("a crash of this daemon will stop the processes on the "
                                "mount: cannot save the connection record: %s", exc)
                return
            await trio.sleep(0.01)
        log.warning("the kernel's INIT was not seen: a crash of this daemon will stop the "
                    "processes on the mount (%s)", session.status())

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            # Those that came between mounting and now: the mount was visible already.
            for signum in early_stop_signals.take():
                await self._stop_on(signum)
            async for signum in signals:
                await self._stop_on(signum)

    async def _stop_on(self, signum: int) -> None:
        log.info("got signal %d: committing and unmounting", signum)
        self.fs.full_disk.stop()
        try:
            await self.store.commit()
        except OSError as exc:
            log.error("commit before unmounting failed (%s); the journal keeps the "
                      "changes for the next mount", exc)
        pyfuse3.terminate()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class EarlyStopSignals:
    """SIGTERM and SIGINT from mounting until the trio loop watches for them.

    The mount is visible (and systemd may stop the unit) as soon as pyfuse3.init returns,
    but the signal watcher runs only once the keeper is started and the loop is up. Without
    a handler, SIGTERM in that window killed the daemon outright: no final commit, and the
    mount left to the keeper's crash hold. Remembered here, the watcher acts on it first.
    Installed for the rest of the process: after the loop ends, a signal during the final
    commit is noted and ignored rather than cutting it short.
    """

    def __init__(self) -> None:
        self._signals: list[int] = []

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def take(self) -> list[int]:
        taken, self._signals = self._signals, []
        return taken


early_stop_signals = EarlyStopSignals()


# How much longer than its hold a new mount waits for a crashed daemon's keeper.
KEEPER_GRACE = 30.0
# How long the daemon looks for the kernel's INIT to record it (steps of 10 ms).
RECORD_WAIT_STEPS = 3000


def version_summary(version: LosingVersion) -> dict[str, Any]:
    return {"user": version.user.decode(errors="replace"),
            "path": version.path.decode(errors="replace"), "fid": f"{version.fid:#x}",
            "version": f"{version.version:#x}", "bytes": len(version.content),
            "winner": version.winner, "epoch": version.epoch,
            "when": version.time_ns / 1e9, "name": saved_name(version)}


def saved_name(version: LosingVersion) -> str:
    """A file name for a losing version: when, the user, the path, the file id."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(version.time_ns / 1e9))
    path = version.path.decode(errors="replace").replace("/", "_")
    return f"{stamp}-epoch{version.epoch}-{path}-{version.fid:x}"[:250]


def save_losing_versions(target: str, versions: list[LosingVersion]) -> list[str]:
    """Write each version to `target` (never over an existing file); returns the paths."""
    written = []
    for version in versions:
        path = os.path.join(target, saved_name(version))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as out:
            out.write(version.content)
        written.append(path)
    return written


def target_problem(target: str, mountpoint: Path, option: str) -> str:
    """What is wrong with a directory an admin command writes to, if anything. Touches the
    filesystem, so never on the trio thread: a path inside the mount would wait for the
    very thread that answers it."""
    if mounts_inside(target, mountpoint):
        return f"{option} must not be inside the mount itself"
    if not os.path.isdir(target):
        return f"{option} needs an existing directory"
    return ""


def mounts_inside(path: str, mountpoint: Path) -> bool:
    real, mount = os.path.realpath(path), os.path.realpath(mountpoint)
    return real == mount or real.startswith(mount + os.sep)


def report_ready(ready_fd: int | None, message: str) -> None:
    if ready_fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(ready_fd, message.encode() + b"\n")
        os.close(ready_fd)


def mount_options(config: Config) -> set[str]:
    options = set(pyfuse3.default_options)
    source = "index-only" if config.mode == "index-only" else config.backing
    options |= {f"fsname=mailfs:{source}", "subtype=mailfs", "noatime"}
    if config.allow_other:
        options.add("allow_other")
    return options


def choose_fuse_capabilities(config: Config) -> None:
    if config.auto_inval_data:
        return
    problem = session.clear(session.AUTO_INVAL_DATA)
    if problem is not None:
        log.warning("auto_inval_data stays on (every write costs a re-read): %s", problem)


def close_unmounted(daemon: Daemon) -> None:
    """After a start that failed once the store was recovered: a clean stop, not a crash."""
    with contextlib.suppress(OSError):
        daemon.store.mark_stopped()
        daemon.store.commit_now()
    daemon.store.close()


def wait_for_previous_keeper(config: Config) -> None:
    """A keeper of a crashed daemon of this state directory may still hold the old mount's
    connection for processes the supervisor has not stopped yet: never serve beside them."""
    pid = keeper.previous_keeper(config.state_dir)
    if pid is None:
        return
    limit = (keeper.hold_seconds(pid) or config.crash_hold) + KEEPER_GRACE
    log.warning("the previous daemon of %s crashed and its keeper (pid %d) still holds the "
                "old connection; waiting up to %g s for the processes on it to stop",
                config.state_dir, pid, limit)
    keeper.wait_for_keeper(pid, limit)


def start_keeper(config: Config, mountpoint: str, fuse_fds: set[int]) -> keeper.Keeper | None:
    if config.crash_hold <= 0:
        return None
    if len(fuse_fds) != 1:
        log.warning("no crash hold: expected one new /dev/fuse descriptor, found %d",
                    len(fuse_fds))
        return None
    try:
        return keeper.Keeper.start(fuse_fds.pop(), Path(mountpoint), config.state_dir,
                                   config.crash_hold, config.crash_fence)
    except OSError as exc:
        log.warning("no crash hold: cannot start the connection keeper: %s", exc)
        return None


def run(config: Config, ready_fd: int | None = None) -> int:
    check_privileges()
    # Never a user of its own mount: a keeper's fence must not find the daemon there.
    os.chdir("/")
    ensure_directory(config.state_dir, "state dir")
    # Resolved before mounting: once mounted, resolving the mountpoint would call into
    # this very daemon before it serves requests, and hang.
    control_socket = config.control_socket()
    mountpoint = mounts.real_mountpoint(config.mountpoint)
    with state_dir_lock(config.state_dir):
        adopted = (adoption.adopt(config.state_dir, mountpoint)
                   if config.mode == "index-only" and config.adopt_connection else None)
        if adopted is None:
            wait_for_previous_keeper(config)
            check_paths(config)
        else:
            ensure_directory(config.run_dir, "run dir")
        daemon = Daemon(config, adopted)
        daemon.mountpoint = mountpoint
        try:
            # Kept while adopting: a process may still have an unlinked file open.
            daemon.store.recover(keep_orphans=adopted is not None)
        except OSError as exc:
            daemon.store.close()
            raise UserError(f"cannot recover the state in {config.state_dir}: {exc}") from None
        if isinstance(daemon.fs, IndexOnlyFS) and config.adopt_connection:
            daemon.fs.start_lock_mirror(mirror_directory(config.run_dir, config.state_dir),
                                        adopted=adopted is not None)
        try:
            daemon.start_metrics()
            if daemon.replication is not None:
                daemon.replication.bind()
        except UserError:
            close_unmounted(daemon)
            raise
        choose_fuse_capabilities(config)
        early_stop_signals.install()
        fuse_fds_before = keeper.fuse_device_fds()
        try:
            if adopted is None:
                pyfuse3.init(Operations(daemon.fs), str(config.mountpoint),
                             mount_options(config))
            else:
                # libfuse takes /dev/fd/N as an open connection: no new mount.
                pyfuse3.init(Operations(daemon.fs), f"/dev/fd/{adopted.fuse_fd}",
                             mount_options(config))
                assert isinstance(daemon.fs, IndexOnlyFS)
                daemon.fs.adopted = True
                adoption.resume(adopted)
        except (RuntimeError, OSError) as exc:
            close_unmounted(daemon)
            raise UserError(f"cannot mount {config.mountpoint}: {exc}") from None
        served = False
        try:
            fuse_fds = ({adopted.fuse_fd} if adopted is not None
                        else keeper.fuse_device_fds() - fuse_fds_before)
            daemon.keeper = start_keeper(config, mountpoint, fuse_fds)
            trio.run(daemon.main, ready_fd, control_socket)
            served = True
        finally:
            if served or daemon.keeper is None:
                # Also after SIGTERM, when the kernel has not unmounted us: leave no dead
                # mount.
                pyfuse3.close(unmount=True)
                if adopted is not None:
                    # libfuse unmounts only what it mounted itself.
                    mounts.detach(mountpoint)
                if daemon.keeper is not None:
                    daemon.keeper.unmounted()
                adoption.remove_record(config.state_dir)
                if daemon.fs.lock_mirror is not None:
                    daemon.fs.lock_mirror.remove()
            else:
                # A failure inside the daemon is a crash like any other: the keeper holds
                # the connection for the processes on it.
                log.critical("mailfs failed; its keeper holds the mount's connection for "
                             "up to %g s (crash_hold)", config.crash_hold)
            try:
                daemon.store.mark_stopped()
                daemon.store.commit_now()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                log.error("final commit failed (%s); the journal keeps the changes", exc)
            daemon.store.close()
    log.info("unmounted %s; all changes committed", config.mountpoint)
    return 0
