"""Replication correctness through three real mounts, a, b and c.

Every test ends the same way: every replicated file, read through every running node's
mount, has the same sha256 (Cluster.wait_converged), and no node logged an ERROR line or
a traceback it was not meant to (Cluster.problems).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import MakeCluster
from tests.rigs.cluster import Cluster, Node, wait_for, write_synced
from tests.rigs.mount import is_mounted, run_cli

MAILDIR = "user1/Maildir"
WAIT = 30.0


# ------------------------------------------------------------------ helpers


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def first_difference(got: bytes, expected: bytes) -> int | None:
    pairs = zip(got, expected, strict=False)
    index = next((i for i, (x, y) in enumerate(pairs) if x != y), None)
    if index is None and len(got) != len(expected):
        return min(len(got), len(expected))
    return index



def pread_all(fd: int, limit: int = 1 << 24) -> bytes:
    return os.pread(fd, limit, 0)


def pwrite_chunks(path: Path, count: int, chunk: int = 64 * 1024) -> bytes:
    """Fill a file with `count` random 64 KiB pwrites, then fsync; returns the content."""
    content = bytearray(count * chunk)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for i in range(count):
            data = os.urandom(chunk)
            os.pwrite(fd, data, i * chunk)
            content[i * chunk:(i + 1) * chunk] = data
        os.fsync(fd)
    finally:
        os.close(fd)
    return bytes(content)


def has_nlink(path: Path, count: int) -> Callable[[], bool]:
    return lambda: os.stat(path).st_nlink == count


def has_names(directory: Path, names: set[str]) -> Callable[[], bool]:
    return lambda: set(os.listdir(directory)) == names


def make_mailbox(cluster: Cluster, relative: str, on: Node | None = None) -> None:
    """mkdir through one mount (passthrough, so on the shared backing dir), and wait until
    every running node sees it."""
    (on or cluster[0]).path(relative).mkdir(parents=True, exist_ok=True)
    for node in cluster.nodes:
        if node.running:
            wait_for(partial(os.path.isdir, node.path(relative)), WAIT,
                     f"{relative} to appear on node {node.node_id}")


def wait_content(node: Node, relative: str, expected: bytes, timeout: float = WAIT) -> None:
    seen: list[bytes | None] = [None]

    def matches() -> bool:
        seen[0] = read_or_none(node.path(relative))
        return seen[0] == expected

    try:
        wait_for(matches, timeout, f"{relative} on node {node.node_id}")
    except AssertionError:
        got = seen[0]
        detail = "missing" if got is None else (
            f"{len(got)} bytes, sha {sha256(got)[:12]}, first difference at "
            f"{first_difference(got, expected)}")
        raise AssertionError(f"{relative} on node {node.node_id} after {timeout:.0f}s: "
                             f"{detail}; expected {len(expected)} bytes, sha "
                             f"{sha256(expected)[:12]}") from None


def wait_absent(node: Node, relative: str) -> None:
    wait_for(lambda: not os.path.lexists(node.path(relative)), WAIT,
             f"{relative} to disappear on node {node.node_id}")


def flush(node: Node, timeout: float = 30.0) -> str:
    result = run_cli("flush", str(node.mountpoint), "--timeout", str(timeout))
    assert result.returncode == 0, result.stderr
    return result.stdout


def peer(node: Node, peer_id: str) -> dict[str, Any]:
    return node.replication()["peers"][peer_id]  # type: ignore[no-any-return]


def wait_peers_connected(node: Node, peer_ids: Sequence[str]) -> None:
    def connected() -> bool:
        peers = node.replication()["peers"]
        return all(peers[p]["connected"] for p in peer_ids)

    wait_for(connected, WAIT, f"node {node.node_id} to connect to {', '.join(peer_ids)}")


def finish(cluster: Cluster, expected: Mapping[str, bytes] | None = None,
           allowed: Sequence[str] = ()) -> dict[str, str]:
    """Every running node converged, to the expected contents; no unexpected errors."""
    sums = cluster.wait_converged()
    for relative, content in (expected or {}).items():
        assert relative in sums, f"{relative} is missing on every node"
        assert sums[relative] == sha256(content), f"{relative} converged to other content"
    problems = cluster.problems(allowed)
    assert not problems, "\n".join(problems)
    return sums


def run_bounded(action: Callable[[], None], timeout: float, what: str) -> None:
    """Run a call that must not hang (the test itself is not a stopwatch)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            action()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{what} still blocked after {timeout:.0f}s"
    if errors:
        raise errors[0]


def again(call: Callable[..., Any], *args: Any) -> Any:
    """A system call, retried while it fails with EAGAIN: a node refuses local changes
    (EAGAIN) for the moment it installs a snapshot, by design."""
    while True:
        try:
            return call(*args)
        except BlockingIOError:
            time.sleep(0.01)


class IndexWriter(threading.Thread):
    """Dovecot-like changes to the index files of some mailboxes, in a loop, until stopped.

    Keeps what every file must contain at the end.
    """

    def __init__(self, node: Node, boxes: Sequence[str], rounds: int | None = None,
                 pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.node = node
        self.boxes = list(boxes)
        self.rounds = rounds
        self.pause = pause
        self.done_rounds = 0
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self.expected: dict[str, bytes] = {}

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            self.error = exc

    def _write_file(self, path: Path, data: bytes) -> None:
        fd = again(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[again(os.write, fd, view):]
            again(os.fsync, fd)
        finally:
            os.close(fd)

    def _replace(self, root: Path, name: str, data: bytes) -> None:
        tmp = root / f"{name}.tmp"
        self._write_file(tmp, data)
        again(os.rename, tmp, root / name)

    def _loop(self) -> None:
        tag = self.node.node_id.encode()
        logs = {box: bytearray() for box in self.boxes}
        caches = {box: bytearray(64 * 1024) for box in self.boxes}
        for box in self.boxes:
            self._write_file(self.node.path(f"{box}/dovecot.index.cache"), bytes(caches[box]))
        i = 0
        while not self.halt.is_set() and (self.rounds is None or i < self.rounds):
            for box in self.boxes:
                root = self.node.path(box)
                record = b"%s log record %d %s\n" % (tag, i, os.urandom(8).hex().encode()) * 5
                fd = again(os.open, root / "dovecot.index.log",
                           os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                try:
                    assert again(os.write, fd, record) == len(record)
                    if i % 10 == 0:
                        again(os.fsync, fd)
                finally:
                    os.close(fd)
                logs[box] += record
                offset = (i * 1531) % (len(caches[box]) - 600)
                patch = os.urandom(600)
                fd = again(os.open, root / "dovecot.index.cache", os.O_RDWR)
                try:
                    again(os.pwrite, fd, patch, offset)
                finally:
                    os.close(fd)
                caches[box][offset:offset + len(patch)] = patch
                if i % 7 == 0:
                    index = b"%s index %d\n" % (tag, i) * 40
                    self._replace(root, "dovecot.index", index)
                    self.expected[f"{box}/dovecot.index"] = index
                if i % 11 == 0:
                    uidlist = b"3 V%d N%d G%s\n" % (i, i + 1, tag)
                    self._replace(root, "dovecot-uidlist", uidlist)
                    self.expected[f"{box}/dovecot-uidlist"] = uidlist
            i += 1
            self.done_rounds = i
            if self.pause:
                time.sleep(self.pause)
        for box in self.boxes:
            self.expected[f"{box}/dovecot.index.log"] = bytes(logs[box])
            self.expected[f"{box}/dovecot.index.cache"] = bytes(caches[box])

    def finish(self, timeout: float = 120.0) -> dict[str, bytes]:
        self.halt.set()
        self.join(timeout)
        assert not self.is_alive(), f"writer on {self.node.node_id} did not stop"
        if self.error is not None:
            raise self.error
        return self.expected


# ------------------------------------------------------------------ tests


def test_write_on_a_reads_identically_on_b_and_c_including_old_mmap_and_fd(
        cluster: Cluster) -> None:
    a, b, c = cluster.nodes
    make_mailbox(cluster, MAILDIR)
    rel = f"{MAILDIR}/dovecot.index.log"
    expected = bytearray()
    appender = os.open(a.path(rel), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    writer = os.open(a.path(rel), os.O_RDWR)
    try:
        for i in range(5):
            chunk = f"log record {i} ".encode() * 300 + os.urandom(777)
            os.write(appender, chunk)
            expected += chunk
            os.fsync(appender)
            for node in (b, c):
                wait_content(node, rel, bytes(expected))
        middle = len(expected) // 2
        patch = b"PATCHED IN THE MIDDLE " * 10
        os.pwrite(writer, patch, middle)
        expected[middle:middle + len(patch)] = patch
        os.fsync(writer)
        for node in (b, c):
            wait_content(node, rel, bytes(expected))

        # B maps the file and keeps a reader open before A changes it again.
        reader = os.open(b.path(rel), os.O_RDONLY)
        try:
            mapping = mmap.mmap(reader, len(expected), mmap.MAP_SHARED, mmap.PROT_READ)
            try:
                assert mapping[:] == expected  # B's page cache now holds the old pages
                assert pread_all(reader) == expected

                # In place, same size, across a page boundary.
                offset = 4096 + 100
                new = os.urandom(5000)
                os.pwrite(writer, new, offset)
                expected[offset:offset + len(new)] = new
                os.fsync(writer)
                wait_for(lambda: mapping[:] == expected, WAIT,
                         "B's existing shared mmap to show A's in-place overwrite")
                assert pread_all(reader) == expected
                wait_content(c, rel, bytes(expected))

                # Growth: B's old fd reads the appended bytes too.
                mapped = len(mapping)
                tail = b"appended after B mapped the file\n" * 50
                os.write(appender, tail)
                expected += tail
                os.fsync(appender)
                wait_for(lambda: pread_all(reader) == expected, WAIT,
                         "B's old fd to read A's append with pread")
                assert os.fstat(reader).st_size == len(expected)
                assert mapping[:] == expected[:mapped]
            finally:
                mapping.close()
        finally:
            os.close(reader)
    finally:
        os.close(appender)
        os.close(writer)
    finish(cluster, {rel: bytes(expected)})


def test_rename_over_link_and_unlink_replicate_with_posix_open_file_semantics(
        cluster: Cluster) -> None:
    a, b, c = cluster.nodes
    make_mailbox(cluster, MAILDIR)
    index, index_tmp = f"{MAILDIR}/dovecot.index", f"{MAILDIR}/dovecot.index.tmp"

    # Dovecot rewrites dovecot.index as .tmp and renames it over, again and again.
    version = b""
    for i in range(4):
        version = f"index version {i}\n".encode() * (500 + 37 * i)
        write_synced(a.path(index_tmp), version)
        os.rename(a.path(index_tmp), a.path(index))
        for node in (b, c):
            wait_content(node, index, version)
            wait_absent(node, index_tmp)

    # An fd opened on B (and C) before the next rename-over keeps reading the old file.
    old_fds = {node.node_id: os.open(node.path(index), os.O_RDONLY) for node in (b, c)}
    try:
        for fd in old_fds.values():
            assert pread_all(fd) == version
        newest = b"index version after the open\n" * 777
        write_synced(a.path(index_tmp), newest)
        os.rename(a.path(index_tmp), a.path(index))
        for node in (b, c):
            wait_content(node, index, newest)  # a fresh open reads the new file
            fd = old_fds[node.node_id]
            assert pread_all(fd) == version, f"old fd on {node.node_id} lost the old content"
            # How Dovecot notices that the index was replaced.
            assert os.stat(node.path(index)).st_ino != os.fstat(fd).st_ino
    finally:
        for fd in old_fds.values():
            os.close(fd)

    # dovecot-uidlist: written as .tmp, linked to the real name, the .tmp name unlinked.
    uidlist, uidlist_tmp = f"{MAILDIR}/dovecot-uidlist", f"{MAILDIR}/dovecot-uidlist.tmp"
    first = b"3 V1700000000 N3 G0123456789abcdef\n1 :1700000000.M1P1.host\n"
    write_synced(a.path(uidlist_tmp), first)
    os.link(a.path(uidlist_tmp), a.path(uidlist))
    for node in (b, c):
        wait_content(node, uidlist, first)
        wait_content(node, uidlist_tmp, first)
        wait_for(has_nlink(node.path(uidlist), 2), WAIT, f"nlink 2 on node {node.node_id}")
        assert os.stat(node.path(uidlist)).st_ino == os.stat(node.path(uidlist_tmp)).st_ino
    os.unlink(a.path(uidlist_tmp))
    for node in (b, c):
        wait_absent(node, uidlist_tmp)
        wait_for(has_nlink(node.path(uidlist), 1), WAIT, f"nlink 1 on node {node.node_id}")
        assert node.path(uidlist).read_bytes() == first
    second = first + b"2 :1700000001.M2P1.host\n"
    write_synced(a.path(uidlist_tmp), second)
    os.rename(a.path(uidlist_tmp), a.path(uidlist))
    for node in (b, c):
        wait_content(node, uidlist, second)
        wait_absent(node, uidlist_tmp)

    # A hard link, then the original unlinked: the file lives on under the new name.
    log, rotated = f"{MAILDIR}/dovecot.index.log", f"{MAILDIR}/dovecot.index.log.2"
    log_content = b"\x01\x02 transaction log " * 500
    write_synced(a.path(log), log_content)
    os.link(a.path(log), a.path(rotated))
    for node in (b, c):
        wait_content(node, rotated, log_content)
    os.unlink(a.path(log))
    more = b"written through the remaining link\n"
    write_synced(a.path(rotated), more, os.O_APPEND)
    log_content += more
    for node in (b, c):
        wait_absent(node, log)
        wait_content(node, rotated, log_content)
        assert os.stat(node.path(rotated)).st_nlink == 1

    names = {"dovecot.index", "dovecot-uidlist", "dovecot.index.log.2"}
    for node in (a, b, c):
        wait_for(has_names(node.path(MAILDIR), names), WAIT,
                 f"the names in {MAILDIR} on node {node.node_id}")
    finish(cluster, {index: newest, uidlist: second, rotated: log_content})


def test_peer_killed_mid_stream_catches_up_after_restart(cluster: Cluster) -> None:
    a, b, _c = cluster.nodes
    boxes = [f"user{n}/Maildir" for n in range(1, 4)]
    for box in boxes:
        make_mailbox(cluster, box)
    wait_peers_connected(a, ["b", "c"])
    writer = IndexWriter(a, boxes)
    writer.start()
    try:
        wait_for(lambda: writer.done_rounds >= 30 or writer.error is not None, WAIT,
                 "the writer to get going")
        wait_for(lambda: peer(a, "b")["acked_seq"] > 0, WAIT, "b to acknowledge something")
        b.kill()
        killed_at = writer.done_rounds
        wait_for(lambda: not peer(a, "b")["connected"], WAIT, "a to notice b is gone")
        wait_for(lambda: writer.done_rounds >= killed_at + 60 or writer.error is not None,
                 WAIT * 2, "the writer to go on while b is down")
        behind = peer(a, "b")
        assert behind["lag_changes"] > 0
        b.start()
        wait_for(lambda: peer(a, "b")["connected"]
                 and peer(a, "b")["acked_seq"] > behind["acked_seq"], WAIT,
                 "b to reconnect and acknowledge new changes")
        restarted_at = writer.done_rounds
        wait_for(lambda: writer.done_rounds >= restarted_at + 20 or writer.error is not None,
                 WAIT, "the writer to go on after b is back")
    finally:
        expected = writer.finish()
    # The log kept everything b missed, so nobody needs a snapshot; above all, b's copy
    # of a's files must never be pushed onto a, which has all of them and more.
    for node in cluster.nodes:
        for line in node.log().splitlines():
            assert "snapshot" not in line, f"node {node.node_id}: {line}"
    finish(cluster, expected)


def test_peer_cut_off_beyond_log_limit_is_rebuilt_by_snapshot(
        make_cluster: MakeCluster) -> None:
    cluster = make_cluster(options={"log_limit": "1M"})
    a, b, c = cluster.nodes
    expected: dict[str, bytes] = {}
    for node in cluster.nodes:
        box = f"user-{node.node_id}/Maildir"
        make_mailbox(cluster, box, on=node)
        content = f"index written on {node.node_id}\n".encode() * 100
        write_synced(node.path(f"{box}/dovecot.index"), content)
        expected[f"{box}/dovecot.index"] = content
    for node in cluster.nodes:
        flush(node)
    cluster.wait_converged()

    c.stop()
    for name in ("dovecot.index.cache", "dovecot.index.log", "dovecot.list.index.log",
                 "dovecot.mailbox.log"):
        rel = f"user-a/Maildir/{name}"
        expected[rel] = pwrite_chunks(a.path(rel), 16)
    small = b"b writes while c is away\n" * 10
    write_synced(b.path("user-b/Maildir/dovecot-keywords"), small)
    expected["user-b/Maildir/dovecot-keywords"] = small
    flush(a)
    flush(b)
    status = a.replication()
    assert status["peers"]["c"]["lag_changes"] > 0
    assert status["log_bytes"] <= status["log_limit_bytes"], status

    c.start()
    wait_for(lambda: peer(a, "c")["snapshots_sent"] >= 1
             or "installed a snapshot" in c.log(), WAIT, "a snapshot from a to c")
    assert "installed a snapshot from a" in c.log() or peer(a, "c")["snapshots_sent"] >= 1
    wait_for(lambda: peer(a, "c")["lag_changes"] == 0, WAIT, "c to catch up with a")
    finish(cluster, expected)


# Dovecot on c writes every 20 ms (busy) or every 250 ms (occasional) while c is rebuilt.
@pytest.mark.parametrize("pause", [0.02, 0.25], ids=["busy", "occasional"])
def test_snapshot_to_a_peer_that_keeps_writing_loses_none_of_its_changes(
        make_cluster: MakeCluster, pause: float) -> None:
    """Like the test above, but c is written to while it is rebuilt: the snapshot must
    neither throw away c's own changes nor be put off for as long as c writes."""
    cluster = make_cluster(options={"log_limit": "1M"})
    a, _b, c = cluster.nodes
    for box, node in (("user-a/Maildir", a), ("user-c/Maildir", c)):
        make_mailbox(cluster, box, on=node)
    c.stop()
    expected: dict[str, bytes] = {}
    for n in range(6):  # a snapshot of some size, so that it takes a moment to stream
        rel = f"user-a/Maildir/dovecot.index.cache{'' if n == 0 else f'.{n}'}"
        expected[rel] = pwrite_chunks(a.path(rel), 64)
    flush(a)

    c.start()
    writer = IndexWriter(c, ["user-c/Maildir"], pause=pause)
    writer.start()
    try:
        wait_for(lambda: "installed a snapshot from a" in c.log() or writer.error is not None,
                 WAIT * 2, "c to install a snapshot from a while it is written to")
        done = writer.done_rounds
        wait_for(lambda: writer.done_rounds >= done + 20 or writer.error is not None, WAIT,
                 "c's writer to go on after the snapshot")
    finally:
        expected.update(writer.finish())
    finish(cluster, expected)


def test_sync_fsync_survives_origin_kill_and_degrades_without_peers(
        make_cluster: MakeCluster) -> None:
    # A generous timeout while everyone is up, so that a slow machine does not degrade.
    cluster = make_cluster(options={"durability": "sync", "sync_timeout": "20"})
    a, b, c = cluster.nodes
    make_mailbox(cluster, MAILDIR)
    wait_peers_connected(a, ["b", "c"])
    assert not a.replication()["degraded"]

    rel = f"{MAILDIR}/dovecot.index"
    content = b"committed on every peer before fsync returned\n" * 1000 + os.urandom(3000)
    # On loopback an async stream is as quick as a sync one: what shows that fsync waits
    # for the peers is a peer that cannot answer. b is frozen; fsync on a must not return.
    assert b.mount is not None and b.mount.process is not None
    b_pid = b.mount.process.pid
    os.kill(b_pid, signal.SIGSTOP)
    try:
        errors: list[BaseException] = []

        def write() -> None:
            try:
                write_synced(a.path(rel), content)
            except BaseException as exc:
                errors.append(exc)

        fsync = threading.Thread(target=write, daemon=True)
        fsync.start()
        fsync.join(1.0)  # far below sync_timeout: a slower machine only blocks it longer
        assert fsync.is_alive(), "fsync on a returned while its sync peer b was frozen"
    finally:
        os.kill(b_pid, signal.SIGCONT)
    fsync.join(WAIT)
    assert not fsync.is_alive(), "fsync on a still blocked after b was thawed"
    if errors:
        raise errors[0]
    assert not a.replication()["degraded"]
    a.kill()
    for node in (b, c):
        wait_content(node, rel, content, timeout=10.0)  # committed there before fsync returned

    # Degrade: with both peers dead, fsync must return after sync_timeout, not hang.
    a.options["sync_timeout"] = "1"
    a.start()
    wait_peers_connected(a, ["b", "c"])
    assert not a.replication()["degraded"]
    b.kill()
    c.kill()
    alone = f"{MAILDIR}/dovecot.index.log"
    alone_content = b"written while b and c are down\n" * 100
    run_bounded(lambda: write_synced(a.path(alone), alone_content), 60,
                "fsync on a with its sync peers dead")
    status = a.replication()
    assert status["degraded"] is True
    assert status["degradations"] >= 1
    assert any(" ERROR " in line and "DEGRADED" in line for line in a.log().splitlines())

    b.start()
    c.start()
    wait_for(lambda: not a.replication()["degraded"], WAIT,
             "a to leave degraded mode once b and c caught up")
    for node in (b, c):
        wait_content(node, alone, alone_content)
    finish(cluster, {rel: content, alone: alone_content}, allowed=["DEGRADED"])


def test_async_writes_on_all_nodes_at_once_converge(cluster: Cluster) -> None:
    writers = []
    for node in cluster.nodes:
        boxes = [f"user-{node.node_id}/Maildir", f"user-{node.node_id}/Maildir/.Sent"]
        for box in boxes:
            make_mailbox(cluster, box, on=node)
        writers.append(IndexWriter(node, boxes, rounds=60))
    for writer in writers:
        writer.start()
    expected: dict[str, bytes] = {}
    for writer in writers:
        writer.join(180)
        expected.update(writer.finish())
    assert len(expected) == 3 * 2 * 4
    finish(cluster, expected)


def test_umount_refuses_while_a_sync_peer_is_behind(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(options={"durability": "sync", "sync_timeout": "1"})
    a, b, c = cluster.nodes
    make_mailbox(cluster, MAILDIR)
    wait_peers_connected(a, ["b", "c"])
    b.kill()
    c.kill()
    rel = f"{MAILDIR}/dovecot.index"
    content = b"only a has this\n" * 200
    run_bounded(lambda: write_synced(a.path(rel), content), 60, "fsync on a")

    result = run_cli("umount", str(a.mountpoint))
    assert result.returncode != 0, result.stdout
    assert "b is" in result.stderr and "c is" in result.stderr, result.stderr
    assert "--force" in result.stderr, result.stderr
    assert is_mounted(a.mountpoint)
    assert a.path(rel).read_bytes() == content

    a.stop("--force")
    assert not is_mounted(a.mountpoint)

    for node in cluster.nodes:
        node.start()
    for node in (b, c):
        wait_content(node, rel, content)
    finish(cluster, {rel: content}, allowed=["DEGRADED"])


def test_flush_returns_once_every_peer_acknowledged(cluster: Cluster) -> None:
    a, _b, _c = cluster.nodes
    make_mailbox(cluster, MAILDIR)
    wait_peers_connected(a, ["b", "c"])
    rel = f"{MAILDIR}/dovecot.index.log"
    content = bytearray()
    fd = os.open(a.path(rel), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for i in range(500):
            record = b"record %d %s\n" % (i, os.urandom(16).hex().encode())
            os.write(fd, record)
            content += record
    finally:
        os.close(fd)
    output = flush(a)
    assert "every peer has acknowledged every change" in output, output
    status = a.replication()
    for peer_id in ("b", "c"):
        state = status["peers"][peer_id]
        assert state["lag_changes"] == 0, (peer_id, state)
        assert state["acked_seq"] == status["seq"], (peer_id, state)
        assert state["unacked_log_bytes"] == 0, (peer_id, state)
    finish(cluster, {rel: bytes(content)})


def test_status_shows_per_peer_fields_while_a_peer_is_down(cluster: Cluster) -> None:
    a, b, _c = cluster.nodes
    make_mailbox(cluster, MAILDIR)
    wait_peers_connected(a, ["b", "c"])
    b.kill()
    wait_for(lambda: not peer(a, "b")["connected"], WAIT, "a to notice b is gone")
    rel = f"{MAILDIR}/dovecot.index.log"
    content = b"written while b is down\n" * 400
    write_synced(a.path(rel), content)
    flush(a)
    time.sleep(0.2)  # so that the oldest unacknowledged change has an age

    status = a.replication()
    assert status["node_id"] == "a"
    assert status["seq"] > 0
    down, up = status["peers"]["b"], status["peers"]["c"]
    expected_fields = {"connected", "incoming_connected", "acked_seq", "sent_seq",
                       "lag_changes", "lag_seconds", "unacked_log_bytes", "applied_from_peer",
                       "snapshot", "snapshot_fraction", "incoming_snapshot", "snapshots_sent",
                       "failures", "last_error"}
    assert expected_fields <= set(down), expected_fields - set(down)
    assert expected_fields <= set(up), expected_fields - set(up)

    assert down["connected"] is False
    assert down["incoming_connected"] is False
    assert down["lag_changes"] > 0
    assert down["acked_seq"] + down["lag_changes"] == status["seq"]
    assert down["lag_seconds"] > 0
    assert down["unacked_log_bytes"] >= len(content)
    assert down["snapshot"] is None and down["snapshot_fraction"] is None
    assert down["incoming_snapshot"] is None
    assert down["snapshots_sent"] == 0
    assert down["failures"] >= 1
    assert down["last_error"]

    assert up["connected"] is True
    assert up["incoming_connected"] is True
    assert up["lag_changes"] == 0
    assert up["acked_seq"] == status["seq"]
    assert up["lag_seconds"] == 0
    assert up["unacked_log_bytes"] == 0
    assert up["snapshot"] is None and up["snapshot_fraction"] is None

    b.start()
    wait_for(lambda: peer(a, "b")["connected"] and peer(a, "b")["lag_changes"] == 0, WAIT,
             "b to catch up")
    back = peer(a, "b")
    assert back["unacked_log_bytes"] == 0 and back["lag_seconds"] == 0
    finish(cluster, {rel: content})
