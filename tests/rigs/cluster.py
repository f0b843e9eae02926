"""Several real mailfs mounts on one machine, replicating to each other over loopback TLS.

Each node has its own mountpoint, state dir (LMDB + journal), listen port and certificate
(from one trustme CA); all share one backing directory, as cluster nodes share NFS.
Tests, the demo and the benchmarks use the same rig.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import trustme

from mailfs.fs.classifier import DEFAULT_REPLICATED, DEFAULT_VOLATILE, Classifier
from tests.rigs.mount import MailfsMount, force_unmount, is_mounted, run_cli
from tests.rigs.partition import SeverableLink

CONVERGE_TIMEOUT = 30.0


def free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class Certificates:
    """A cluster CA and one certificate per node id, as PEM files in a directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca.cert_pem.write_to_path(str(self.ca_path))

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    def issue(self, node_id: str, ca: trustme.CA | None = None) -> tuple[Path, Path]:
        issuer = ca or self.ca
        cert = issuer.issue_cert(node_id)
        tag = "" if ca is None else "-foreign"
        cert_path = self.directory / f"{node_id}{tag}.crt"
        key_path = self.directory / f"{node_id}{tag}.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_path))
        cert.private_key_pem.write_to_path(str(key_path))
        key_path.chmod(0o600)
        return cert_path, key_path


class Node:
    def __init__(self, cluster: Cluster, node_id: str, port: int) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self.port = port
        base = cluster.base / node_id
        self.mountpoint = base / "mnt"
        self.state_dir = base / "state"
        self.cert, self.key = cluster.certs.issue(node_id)
        self.mount: MailfsMount | None = None
        self.options: dict[str, str] = {}

    def args(self) -> list[str]:
        peers = ";".join(f"{n.node_id}@127.0.0.1:{self.cluster.port_to(self, n)}"
                         for n in self.cluster.nodes if n is not self)
        options = {
            "node_id": self.node_id, "cluster": "test", "listen": f"127.0.0.1:{self.port}",
            "peers": peers, "tls_cert": str(self.cert), "tls_key": str(self.key),
            "tls_ca": str(self.cluster.certs.ca_path), "reconnect_interval": "0.2",
            **self.cluster.options, **self.options,
        }
        return [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]

    def start(self) -> Node:
        for path in (self.mountpoint, self.state_dir):
            if path == self.mountpoint and is_mounted(path):
                continue  # a crashed daemon's mount, held for the next one to adopt
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o755)
        backing = None if self.cluster.index_only else self.cluster.backing
        self.mount = MailfsMount(backing, self.mountpoint, self.state_dir,
                                 self.args(), log_path=self.state_dir.parent / "mailfs.log")
        self.mount.start()
        return self

    def stop(self, *args: str) -> None:
        if self.mount is not None:
            self.mount.stop(*args)
            self.mount = None

    def kill(self) -> None:
        if self.mount is not None:
            self.mount.kill()
            self.mount = None

    def crash(self) -> None:
        """kill -9 of the daemon alone: its keeper holds the mount for the next daemon."""
        if self.mount is not None and self.mount.process is not None:
            self.mount.process.send_signal(signal.SIGKILL)
            self.mount.process.wait(timeout=30)
        self.mount = None

    @property
    def running(self) -> bool:
        return self.mount is not None

    def status(self) -> dict:  # type: ignore[type-arg]
        result = run_cli("status", str(self.mountpoint), "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def replication(self) -> dict:  # type: ignore[type-arg]
        return self.status()["replication"]  # type: ignore[no-any-return]

    def log(self) -> str:
        path = self.state_dir.parent / "mailfs.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def path(self, relative: str) -> Path:
        return self.mountpoint / relative

    def checksums(self) -> dict[str, str]:
        if self.cluster.index_only:
            return index_only_checksums(self.mountpoint)
        return replicated_checksums(self.mountpoint)


class Cluster:
    """N nodes over one backing directory; everything is taken down by close()."""

    def __init__(self, size: int = 3, options: dict[str, str] | None = None,
                 base: Path | None = None, index_only: bool = False,
                 partitionable: bool = False) -> None:
        self.index_only = index_only  # no backing: directories are replicated too
        self.base = base or Path(tempfile.mkdtemp(prefix="mailfs-cluster-"))
        self.base.chmod(0o755)
        self.backing = self.base / "backing"
        self.backing.mkdir(exist_ok=True)
        self.backing.chmod(0o755)
        self.certs = Certificates(self.base / "tls")
        self.options = dict(options or {})
        self.nodes: list[Node] = []
        for node_id, port in zip("abcdefgh"[:size], free_ports(size), strict=True):
            self.nodes.append(Node(self, node_id, port))
        # (from, to) -> the forwarder `from` reaches `to` through (partition tests)
        self.links: dict[tuple[str, str], SeverableLink] = {}
        if partitionable:
            for source in self.nodes:
                for target in self.nodes:
                    if source is not target:
                        self.links[source.node_id, target.node_id] = SeverableLink(target.port)

    def port_to(self, source: Node, target: Node) -> int:
        link = self.links.get((source.node_id, target.node_id))
        return target.port if link is None else link.port

    def partition(self, *groups: Sequence[Node]) -> None:
        """Cut every link between nodes of different groups (both directions)."""
        group_of = {node.node_id: index for index, group in enumerate(groups) for node in group}
        for (source, target), link in self.links.items():
            if group_of.get(source) != group_of.get(target):
                link.sever()

    def heal(self) -> None:
        for link in self.links.values():
            link.restore()

    def __getitem__(self, index: int) -> Node:
        return self.nodes[index]

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        return self

    def wait_connected(self, timeout: float = CONVERGE_TIMEOUT) -> None:
        """Wait until every running node streams to, and is streamed to by, every other."""
        running = [n for n in self.nodes if n.running]

        def connected() -> bool:
            for node in running:
                peers = node.replication()["peers"]
                for other in running:
                    state = peers.get(other.node_id)
                    if other is not node and not (
                            state and state["connected"] and state["incoming_connected"]):
                        return False
            return True

        wait_for(connected, timeout, "every running node to connect to every other")

    def close(self) -> None:
        """Kill and unmount every node, even when one of them fails to go; then remove the
        temp dir (never through a mount that is still there)."""
        errors: list[BaseException] = []
        for link in self.links.values():
            link.close()
        for node in self.nodes:
            for step in (node.kill, partial(force_unmount, node.mountpoint)):
                try:
                    step()
                except Exception as exc:  # the other nodes must still go
                    errors.append(exc)
        if not any(is_mounted(node.mountpoint) for node in self.nodes):
            shutil.rmtree(self.base, ignore_errors=True)
        if errors:
            raise errors[0]

    def problems(self, allowed: Sequence[str] = ()) -> list[str]:
        found = []
        for node in self.nodes:
            for line in node.log().splitlines():
                if ("Traceback" in line or " ERROR " in line or " CRITICAL " in line) and \
                        not any(text in line for text in allowed):
                    found.append(f"{node.node_id}: {line}")
        return found

    def wait_converged(self, nodes: Sequence[Node] | None = None,
                       timeout: float = CONVERGE_TIMEOUT) -> dict[str, str]:
        """Wait until every running node has the same replicated files, byte for byte."""
        chosen = [n for n in (nodes or self.nodes) if n.running]
        deadline = time.monotonic() + timeout
        while True:
            sums = [node.checksums() for node in chosen]
            if all(s == sums[0] for s in sums):
                return sums[0]
            if time.monotonic() > deadline:
                raise AssertionError(describe_difference(chosen, sums))
            time.sleep(0.1)


def write_synced(path: os.PathLike[str] | str, data: bytes, flags: int = os.O_TRUNC) -> None:
    """Write a whole file and fsync it, as Dovecot does before a rename."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def wait_for(predicate: Callable[[], bool], timeout: float = CONVERGE_TIMEOUT,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def replicated_checksums(root: Path) -> dict[str, str]:
    """sha256 of every replicated (index/control) file under root, read through the mount."""
    classifier = Classifier(DEFAULT_REPLICATED, DEFAULT_VOLATILE)
    found: dict[str, str] = {}
    for directory, _subdirs, files in os.walk(root):
        _hash_files(root, Path(directory), [
            name for name in files
            if classifier.classify(os.fsencode(name)).value == "replicated"], found)
    return found


def _hash_files(root: Path, directory: Path, names: list[str], found: dict[str, str]) -> None:
    for name in names:
        path = directory / name
        try:
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                digest = f"link -> {os.readlink(path)!r}"
            else:  # never opened: a fifo would block
                digest = f"{stat.filemode(st.st_mode)} {st.st_rdev}"
        except FileNotFoundError:
            continue  # renamed away while we walked; the next round sees the new name
        found[str(path.relative_to(root))] = digest


def index_only_checksums(root: Path) -> dict[str, str]:
    """Every directory (owner and mode) and every file but locks, on an index-only mount."""
    classifier = Classifier(DEFAULT_REPLICATED, DEFAULT_VOLATILE)
    found: dict[str, str] = {}
    for directory, subdirs, files in os.walk(root):
        for name in subdirs:
            path = Path(directory) / name
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            found[f"{path.relative_to(root)}/"] = f"dir {st.st_mode:o} {st.st_uid}:{st.st_gid}"
        _hash_files(root, Path(directory), [
            name for name in files
            if classifier.classify(os.fsencode(name)).value != "volatile"], found)
    return found


def describe_difference(nodes: Sequence[Node], sums: list[dict[str, str]]) -> str:
    lines = ["replicated files differ:"]
    keys = sorted(set().union(*sums))
    for key in keys:
        row = [s.get(key, "-")[:8] for s in sums]
        if len(set(row)) > 1:
            lines.append(f"  {key}: " + " ".join(f"{n.node_id}={v}"
                                                 for n, v in zip(nodes, row, strict=True)))
    return "\n".join(lines[:50])


def cluster_fixture(size: int = 3, options: dict[str, str] | None = None
                    ) -> Iterator[Cluster]:
    cluster = Cluster(size, options)
    try:
        yield cluster
    finally:
        cluster.close()
