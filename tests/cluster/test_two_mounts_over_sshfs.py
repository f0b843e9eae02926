"""Two full-overlay mounts over one sshfs store with latency: random maildir changes through
either mount or straight on the store, each view checked against the store.

alice's Dovecot runs on node a, which owns her index files (ARCHITECTURE, "Ownership").
What each mount may show, and when (ARCHITECTURE, "Kernel caching"):
- its own changes, at once;
- a change made through a, which moves alice's index with it as Dovecot does: on b from the
  moment b has that index change. Nothing stale after it: not a listing, not a name the
  kernel still holds, not a missing name it holds. This is what b serves alice from
  after a failover;
- a change made another way (through b without an index change, as a delivery agent
  outside Dovecot would; or on the store outside mailfs, as an MTA writing to NFS):
  within `passthrough_timeout`.
Views are read through both mounts after every change, so each change meets names, missing
names and listings that the kernels and the daemons hold from before.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.rigs.cluster import Cluster, Node, wait_for
from tests.rigs.mount import run_cli
from tests.rigs.sshfs import SshfsMount, sshfs_backing, sshfs_unusable

TTL = 3.0  # passthrough_timeout
# The kernel is told to forget on a worker thread, right after the peer's change is applied.
NOTICE_LATENCY = 0.5
MAILDIR = Path("alice/Maildir")
MESSAGES = range(3)
# Mostly through a: every other change waits out the ttl.
WHERE = ("a", "a", "a", "a", "b", "store")


def names_of(number: int) -> list[str]:
    """Every name message `number` can have: delivered, seen, flagged."""
    return [f"new/m{number}", f"cur/m{number}:2,S", f"cur/m{number}:2,FS"]


CANDIDATES = [name for number in MESSAGES for name in names_of(number)] + ["notes"]


def view(root: Path) -> dict[str, object]:
    """For every candidate name its size by stat and its content, or the errno; then the
    listings of new/ and cur/. Names first: listing a directory refreshes the kernel's
    entries for the names listed, and would hide a stale one."""
    seen: dict[str, object] = {}
    for name in CANDIDATES:
        try:
            seen[name] = (os.lstat(root / name).st_size, (root / name).read_bytes())
        except OSError as exc:
            seen[name] = errno.errorcode[exc.errno or 0]
    for sub in ("new", "cur"):
        seen[f"{sub}/"] = sorted(os.listdir(root / sub))
    return seen


def current_name(root: Path, number: int) -> str | None:
    for name in names_of(number):
        if (root / name).exists():
            return name
    return None


def change(root: Path, op: str, number: int, serial: int) -> bool:
    """Do `op` on message `number` in the maildir at `root`; False if it does not apply."""
    name = current_name(root, number)
    if op == "deliver":
        if name is not None:
            return False
        temp = root / "tmp" / f"m{number}"
        temp.write_bytes(f"message {number}, delivery {serial}\n".encode() * (serial % 5 + 1))
        os.rename(temp, root / f"new/m{number}")
    elif op == "see":
        if name is None or not name.startswith("new/"):
            return False
        os.rename(root / name, root / f"cur/m{number}:2,S")
    elif op == "flag":
        if name is None or not name.startswith("cur/"):
            return False
        other = f"cur/m{number}:2,FS" if name.endswith(",S") else f"cur/m{number}:2,S"
        os.rename(root / name, root / other)
    elif op == "expunge":
        if name is None:
            return False
        os.unlink(root / name)
    elif op == "note":
        (root / "notes").write_bytes(f"note {serial}\n".encode() * (serial % 7 + 1))
    return True


def announce(node: Node, peer: Node, serial: int) -> None:
    """What Dovecot does with every change: the user's index moves too. Waits until the
    peer has it."""
    line = f"change {serial}\n".encode()
    with open(node.mountpoint / MAILDIR / "dovecot.index.log", "ab") as log:
        log.write(line)
    wait_for(lambda: (peer.mountpoint / MAILDIR / "dovecot.index.log").read_bytes()
             .endswith(line), what=f"{peer.node_id} to get the index change")


@pytest.fixture(scope="module")
def rig() -> Iterator[tuple[SshfsMount, Cluster]]:
    reason = sshfs_unusable()
    if reason is not None:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="mailfs-two-mounts-"))
    base.chmod(0o755)
    cluster = None
    try:
        with sshfs_backing(base / "network", latency_ms=1.0) as sshfs:
            store = sshfs.mountpoint / "backing"
            store.mkdir()
            (base / "cluster").mkdir()
            cluster = Cluster(2, {"passthrough_timeout": str(TTL)}, base=base / "cluster")
            cluster.backing = store
            cluster.start()
            cluster.wait_connected()
            yield sshfs, cluster
            assert cluster.problems() == []
    finally:
        if cluster is not None:
            cluster.close()
        shutil.rmtree(base, ignore_errors=True)


def check(store: Path, readers: list[Node], when: str, within: float = 0.0) -> None:
    truth = view(store / MAILDIR)
    for reader in readers:
        deadline = time.monotonic() + within
        while True:
            seen = view(reader.mountpoint / MAILDIR)
            stale = {key: (seen[key], truth[key]) for key in truth if seen[key] != truth[key]}
            if not stale or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not stale, f"{when}, {reader.node_id} shows (its view, the store's): {stale}"


def reset(store: Path, cluster: Cluster) -> None:
    """An empty maildir, and no cache on either node that knows of an earlier example."""
    box = store / MAILDIR
    shutil.rmtree(box, ignore_errors=True)
    for sub in ("new", "cur", "tmp"):
        (box / sub).mkdir(parents=True)
    for node in cluster.nodes:
        run_cli("flush", str(node.mountpoint), "--caches", check=True)
    (cluster.nodes[0].mountpoint / MAILDIR / "dovecot.index.log").touch()  # a owns alice


OPS = st.tuples(st.sampled_from(("deliver", "see", "flag", "expunge", "note")),
                st.sampled_from(MESSAGES),
                st.sampled_from(WHERE))


def test_random_maildir_changes_are_seen_through_both_mounts(
        rig: tuple[SshfsMount, Cluster]) -> None:
    sshfs, cluster = rig
    store = sshfs.mountpoint / "backing"
    a, b = cluster.nodes

    @settings(max_examples=8, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(OPS, min_size=4, max_size=12))
    # Found with the kernel's names unforgotten: b kept "notes" missing, and a delivered,
    # seen and expunged message present, until the ttl ran out.
    @example([("note", 0, "a"), ("note", 0, "a"), ("deliver", 0, "a"), ("see", 0, "a"),
              ("flag", 0, "a"), ("expunge", 0, "a")])
    def same_as_the_store(ops: list[tuple[str, int, str]]) -> None:
        reset(store, cluster)
        for serial, (op, number, where) in enumerate(ops):
            node = {"a": a, "b": b}.get(where)
            root = store / MAILDIR if node is None else node.mountpoint / MAILDIR
            if not change(root, op, number, serial):
                continue
            if node is a:
                announce(a, b, serial)
                check(store, [a, b], f"after {op} of m{number} through a and its index",
                      within=NOTICE_LATENCY)
                continue
            if node is b:
                check(store, [b], f"after {op} of m{number} through b itself")
            time.sleep(TTL + 0.5)
            check(store, [a, b], f"{TTL + 0.5} s after {op} of m{number} through {where}")

    same_as_the_store()


def test_a_peers_index_change_leaves_directories_in_use_reachable(
        rig: tuple[SshfsMount, Cluster]) -> None:
    """The kernel forgets the user's file names, not the names of directories: a process
    working inside one (an admin's shell, a Dovecot process in its home) keeps a working
    directory that getcwd() can name."""
    sshfs, cluster = rig
    store = sshfs.mountpoint / "backing"
    a, b = cluster.nodes
    reset(store, cluster)
    inside = b.mountpoint / MAILDIR / "cur"
    os.listdir(inside)
    worker = subprocess.Popen(
        [sys.executable, "-c", "import os, sys\nos.chdir(sys.argv[1])\nprint('in', flush=True)\n"
         "sys.stdin.readline()\nprint(os.getcwd(), flush=True)", str(inside)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None and worker.stdin is not None
        assert worker.stdout.readline().strip() == "in"
        assert change(a.mountpoint / MAILDIR, "deliver", 0, 1)
        announce(a, b, 1)
        time.sleep(NOTICE_LATENCY)  # the kernel has been told to forget by now
        out, err = worker.communicate("\n", timeout=30)
        assert worker.returncode == 0, err
        assert out.strip() == str(inside)
        assert (inside.parent / "new" / "m0").exists()
    finally:
        worker.kill()
