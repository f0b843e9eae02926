"""Replication benchmark: what peer replication costs, and how fast peers keep up.

Everything runs on real FUSE mounts on this machine: a Cluster(3) of mailfs mounts
(tests/rigs/cluster.py; node a is where the writes happen, b and c are its peers, over
loopback TLS) next to a baseline measured in the same run, so that the figures that matter
are ratios (the machine is shared and noisy):

1. throughput: writer threads doing 100-byte pwrites at EOF of dovecot.index.log in several
   mailbox directories for N seconds; changes (a's replication seq delta) per second until
   b and c have acknowledged them all, against the same writer on a single mailfs mount
   without replication. Rounds alternate which configuration goes first.
2. lag: bench/imap_load.py's IMAP load against a real Dovecot on node a's mount; a's own
   lag_p50/p99_seconds (change made -> peer's LMDB commit acknowledged), plus the peers'
   lag_seconds polled every 100 ms. The same load on a single mount gives the ops/s ratio.
3. fsync: write(4 KiB) + fsync of a dovecot.index.log in a loop: local ext4 (same disk),
   single mailfs mount, cluster in async mode, cluster in sync mode (-o durability=sync).
   Rounds rotate the order; p50/p99 and ratios to local ext4.
4. catch-up: b stopped, ~64 MB of 64 KiB writes on a, b restarted; time from b's start
   until a sees b's acked_seq == a's seq (replication log large enough, log_limit=1G).
5. snapshot: the same with log_limit=1M on another cluster, so c needs a snapshot.

    python -m bench.replication                        # everything, about 5-8 minutes
    python -m bench.replication --only fsync,throughput --rounds 2
    python -m bench.replication --quick                # short everything: check the harness
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from bench.imap_load import DEFAULT_MIX, LoadConfig, LoadResult, run_load  # noqa: E402
from bench.run_all import (  # noqa: E402
    DISTURBED,
    TICK,
    live_children_named,
    machine_info,
    system_cpu,
    table,
    tree_cpu,
    work_dir,
)
from mailfs import control  # noqa: E402
from mailfs.cli import DEFAULT_RUN_DIR  # noqa: E402
from mailfs.config import control_socket_for  # noqa: E402
from tests.rigs.cluster import Cluster, Node  # noqa: E402
from tests.rigs.dovecot import Dovecot, prepare_mail_root  # noqa: E402
from tests.rigs.mount import MailfsMount  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PASSWORD = "bench-secret"
SECTIONS = ("throughput", "lag", "fsync", "catchup", "snapshot")
FSYNC_CONFIGS = ("ext4", "single", "async", "sync")
MB = 1e6
WAIT_LIMIT = 300.0  # a peer that has not caught up after this long is a problem, not a figure


# -- small helpers ---------------------------------------------------------------------------


def status_of(mountpoint: Path, timeout: float = 10.0) -> dict[str, Any]:
    """`mailfs status` over the control socket, in-process (a few ms, no CLI start-up)."""
    path = control_socket_for(DEFAULT_RUN_DIR, mountpoint)
    result = control.call(path, "status", timeout=timeout)
    assert isinstance(result, dict), result
    return result


def repl(node: Node) -> dict[str, Any]:
    return status_of(node.mountpoint)["replication"]  # type: ignore[no-any-return]


def pid_of(mount: MailfsMount | None) -> int | None:
    process = mount.process if mount else None
    return process.pid if process else None


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest rank, the way mailfs computes lag_p50/p99."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def all_acked(origin: Node, seq: int, peers: Sequence[str] | None = None) -> bool:
    state = repl(origin)["peers"]
    return all(state[p]["acked_seq"] >= seq for p in (peers or state))


def append_load(dirs: Sequence[Path], size: int, duration: float) -> tuple[int, float, float]:
    """One thread per directory pwrites `size` bytes at the end of its dovecot.index.log
    until `duration` is up. Returns (writes, start, end) on the monotonic clock."""
    fds = []
    for directory in dirs:
        directory.mkdir(parents=True, exist_ok=True)
        fds.append(os.open(directory / "dovecot.index.log", os.O_RDWR | os.O_CREAT, 0o600))
    counts = [0] * len(fds)
    barrier = threading.Barrier(len(fds) + 1)
    deadline = [0.0]

    def work(index: int) -> None:
        fd, offset, done = fds[index], 0, 0
        payload = bytes([65 + index % 26]) * size
        barrier.wait()
        while time.monotonic() < deadline[0]:
            os.pwrite(fd, payload, offset)
            offset += size
            done += 1
        counts[index] = done

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(fds))]
    for thread in threads:
        thread.start()
    start = time.monotonic()
    deadline[0] = start + duration
    barrier.wait()
    for thread in threads:
        thread.join()
    end = time.monotonic()
    for fd in fds:
        os.close(fd)
    return sum(counts), start, end


def bulk_write(dirs: Sequence[Path], total: int, chunk: int) -> tuple[int, int, float]:
    """64 KiB appends round-robin over dovecot.index.log in `dirs`, `total` bytes in all.
    Returns (bytes, writes, seconds)."""
    fds = []
    for directory in dirs:
        directory.mkdir(parents=True, exist_ok=True)
        fds.append(os.open(directory / "dovecot.index.log", os.O_RDWR | os.O_CREAT, 0o600))
    offsets = [0] * len(fds)
    block = os.urandom(chunk)
    written = writes = 0
    start = time.monotonic()
    while written < total:
        index = writes % len(fds)
        os.pwrite(fds[index], block, offsets[index])
        offsets[index] += chunk
        written += chunk
        writes += 1
    seconds = time.monotonic() - start
    for fd in fds:
        os.close(fd)
    return written, writes, seconds


def fsync_loop(directory: Path, seconds: float, most: int, warmup: int = 5
               ) -> tuple[list[float], list[float]]:
    """write(4 KiB) at EOF + fsync until `seconds` or `most` iterations; the latencies of
    the fsync alone and of write+fsync, in seconds."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / "dovecot.index.log", os.O_RDWR | os.O_CREAT, 0o600)
    block = os.urandom(4096)
    fsyncs: list[float] = []
    both: list[float] = []
    offset = 0
    try:
        for _ in range(warmup):
            os.pwrite(fd, block, offset)
            os.fsync(fd)
            offset += len(block)
        deadline = time.monotonic() + seconds
        while len(fsyncs) < most and time.monotonic() < deadline:
            t0 = time.perf_counter()
            os.pwrite(fd, block, offset)
            t1 = time.perf_counter()
            os.fsync(fd)
            t2 = time.perf_counter()
            offset += len(block)
            fsyncs.append(t2 - t1)
            both.append(t2 - t0)
    finally:
        os.close(fd)
    return fsyncs, both


class LagPoller:
    """Polls the origin's status every `interval` seconds in a thread: each peer's
    lag_seconds (age of its oldest unacknowledged change) and lag_changes."""

    def __init__(self, origin: Node, interval: float = 0.1) -> None:
        self.origin = origin
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self.errors = 0
        self.poll_seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.start_time = 0.0

    def start(self) -> None:
        self.start_time = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            asked = time.monotonic()
            try:
                peers = repl(self.origin)["peers"]
            except Exception:
                self.errors += 1
            else:
                self.poll_seconds.append(time.monotonic() - asked)
                self.samples.append({
                    "t": round(asked - self.start_time, 3),
                    "lag_seconds": {p: s["lag_seconds"] for p, s in peers.items()},
                    "lag_changes": {p: s["lag_changes"] for p, s in peers.items()},
                })
            tick += 1
            self._stop.wait(max(0.0, self.start_time + tick * self.interval - time.monotonic()))

    def values(self, peer: str, key: str = "lag_seconds") -> list[float]:
        return [float(s[key][peer]) for s in self.samples if peer in s[key]]


class CpuWindow:
    """CPU used during a window: per daemon (as a share of one core), the whole machine, and
    the part of it outside this benchmark's process tree (other tenants: noise)."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.me = os.getpid()
        self.start = time.monotonic()
        self.cpu = {name: tree_cpu(pid) for name, pid in pids.items()}
        self.ours = tree_cpu(self.me)
        self.busy, self.total = system_cpu()

    def stop(self) -> tuple[dict[str, float], float, float]:
        """(daemon -> core share, machine busy share, other share)."""
        wall = max(1e-6, time.monotonic() - self.start)
        cores = {name: (tree_cpu(pid) - self.cpu[name]) / wall for name, pid in self.pids.items()}
        ours = tree_cpu(self.me) - self.ours
        busy, total = system_cpu()
        busy_s, total_s = (busy - self.busy) / TICK, max(1.0, total - self.total) / TICK
        return cores, busy_s / total_s, max(0.0, busy_s - ours) / total_s


# -- results -----------------------------------------------------------------------------------


@dataclass
class ThroughputRound:
    config: str  # single | replicated
    round: int
    position: int
    writes: int
    changes: int
    write_seconds: float
    applied_seconds: float  # writer start -> every peer acknowledged (= write_seconds alone)
    machine_busy: float
    machine_other: float  # share of all CPUs used outside this benchmark
    cpu_core: dict[str, float] = field(default_factory=dict)  # daemon -> CPU s / wall s

    @property
    def writes_per_s(self) -> float:
        return self.writes / self.write_seconds if self.write_seconds else 0.0

    @property
    def applied_per_s(self) -> float:
        return self.changes / self.applied_seconds if self.applied_seconds else 0.0


@dataclass
class FsyncRound:
    config: str
    round: int
    position: int
    count: int
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    write_fsync_p50_ms: float | None
    machine_busy: float = 0.0
    machine_other: float = 0.0
    mean_commit_ms: float | None = None  # the mount's own LMDB commits during the round
    samples_ms: list[float] = field(repr=False, default_factory=list)


@dataclass
class ImapRun:
    config: str  # single | cluster
    round: int
    ops_per_s: float
    total_ops: int
    errors: int
    fatal: list[str]
    error_samples: list[str]
    elapsed: float
    machine_busy: float
    machine_other: float
    cpu_core: dict[str, float]  # process -> CPU seconds / wall seconds
    peer_commits: dict[str, dict[str, float]] = field(default_factory=dict)
    lag_p50_seconds: float | None = None  # mailfs's own, from a's status
    lag_p99_seconds: float | None = None
    polled: dict[str, dict[str, float | None]] = field(default_factory=dict)
    poll_count: int = 0
    poll_errors: int = 0
    poll_p50_ms: float | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    final_status: dict[str, Any] = field(default_factory=dict)


@dataclass
class CatchUp:
    kind: str  # log | snapshot
    peer: str
    written_mb: float
    writes: int
    changes: int
    write_seconds: float
    behind_mb: float  # a's unacked log bytes for the peer when it restarted
    log_mb: float  # a's replication log size then
    mount_seconds: float  # peer start -> mounted
    connect_seconds: float | None  # peer start -> a's sender connected to it
    total_seconds: float | None  # peer start -> a sees acked_seq == seq
    snapshot_mb: float | None = None
    snapshot_log: list[str] = field(default_factory=list)
    snapshots_sent: int = 0
    snapshots_to_others: dict[str, int] = field(default_factory=dict)
    converged: bool | None = None
    progress: list[tuple[float, float]] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float | None:
        return self.written_mb / self.total_seconds if self.total_seconds else None

    @property
    def behind_mb_per_s(self) -> float | None:
        size = self.snapshot_mb if self.snapshot_mb else self.behind_mb
        return size / self.total_seconds if self.total_seconds and size else None


@dataclass
class Run:
    args: argparse.Namespace
    root: Path
    throughput: list[ThroughputRound] = field(default_factory=list)
    fsync: list[FsyncRound] = field(default_factory=list)
    imap: list[ImapRun] = field(default_factory=list)
    catchups: list[CatchUp] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    statuses: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    started: datetime = field(default_factory=lambda: datetime.now(UTC))

    def log(self, text: str) -> None:
        print(text, flush=True)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        print(f"PROBLEM {text}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)


# -- the benchmark -------------------------------------------------------------------------------


class Bench:
    def __init__(self, run: Run) -> None:
        self.run = run
        self.args = run.args
        self.root = run.root
        self.logs = run.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.single: MailfsMount | None = None
        self.clusters: dict[str, Cluster] = {}
        self.dovecots: list[Dovecot] = []

    # -- set-up and tear-down

    def start_single(self) -> MailfsMount:
        base = self.root / "single"
        backing = prepare_mail_root(base / "backing")
        for path in (base / "mnt", base / "state"):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o755)
        base.chmod(0o755)
        self.single = MailfsMount(backing, base / "mnt", base / "state",
                                  log_path=base / "mailfs.log").start()
        return self.single

    def start_cluster(self, name: str, options: dict[str, str]) -> Cluster:
        base = self.root / f"cluster-{name}"
        base.mkdir(parents=True)
        cluster = Cluster(3, options, base=base)
        self.clusters[name] = cluster
        prepare_mail_root(cluster.backing)
        cluster.start()
        origin = cluster[0]
        if not wait_until(lambda: all(p["connected"] and p["incoming_connected"]
                                      for p in repl(origin)["peers"].values()), 30, 0.05):
            self.run.problem(f"cluster {name}: peers did not connect within 30 s")
        self.run.log(f"cluster {name} up ({', '.join(f'{k}={v}' for k, v in options.items())})")
        return cluster

    def close_cluster(self, name: str) -> None:
        cluster = self.clusters.pop(name, None)
        if cluster is None:
            return
        try:
            for node in cluster.nodes:
                if node.running:
                    try:
                        self.run.statuses[f"{name}/{node.node_id}"] = status_of(node.mountpoint)
                    except Exception as exc:
                        self.run.problem(f"cluster {name}: status of {node.node_id}: {exc}")
            for node in cluster.nodes:
                if node.running:
                    conflicts = self.run.statuses.get(f"{name}/{node.node_id}", {}).get(
                        "replication", {}).get("conflicts", 0)
                    if conflicts:
                        self.run.problem(f"cluster {name}: node {node.node_id} counted "
                                         f"{conflicts} conflicts with a single writer")
            for line in cluster.problems():
                self.run.problem(f"cluster {name}: {line}")
        finally:
            for node in cluster.nodes:
                log = node.state_dir.parent / "mailfs.log"
                if log.exists():
                    shutil.copy(log, self.logs / f"{name}-{node.node_id}.log")
            cluster.close()

    def close(self) -> None:
        for dovecot in self.dovecots:
            try:
                dovecot.stop()
            except Exception as exc:
                self.run.problem(f"dovecot stop: {exc}")
            finally:
                dovecot.kill()
        self.dovecots = []
        for name in list(self.clusters):
            self.close_cluster(name)
        if self.single is not None:
            try:
                self.run.statuses["single"] = status_of(self.single.mountpoint)
                for line in self.single.problems():
                    self.run.problem(f"single mount: {line}")
                self.single.stop()
            except Exception as exc:
                self.run.problem(f"single mount stop: {exc}")
            finally:
                self.single.kill()
                if self.single.log_path.exists():
                    shutil.copy(self.single.log_path, self.logs / "single.log")
                self.single = None

    def converged(self, cluster: Cluster, what: str, timeout: float = 120.0) -> bool:
        """Byte-for-byte check of every replicated file on every running node (untimed)."""
        try:
            cluster.wait_converged(timeout=timeout)
            return True
        except AssertionError as exc:
            self.run.problem(f"{what}: nodes did not converge: {exc}")
            return False

    # -- 1. throughput

    def throughput(self) -> None:
        args, run = self.args, self.run
        assert self.single is not None
        origin = self.clusters["async"][0]
        targets: dict[str, Path] = {"single": self.single.mountpoint,
                                    "replicated": origin.mountpoint}
        daemons = {"single": {"single": pid_of(self.single)},
                   "replicated": {n.node_id: pid_of(n.mount)
                                  for n in self.clusters["async"].nodes}}
        order = list(targets)
        for round_no in range(args.rounds):
            for position, config in enumerate(order if round_no % 2 == 0 else order[::-1]):
                dirs = [targets[config] / "tput" / f"r{round_no}box{i}"
                        for i in range(args.writers)]
                os.sync()
                window = CpuWindow(daemons[config])
                if config == "single":
                    seq0 = status_of(targets[config])["journal_seq"]
                    writes, start, end = append_load(dirs, 100, args.duration)
                    changes = status_of(targets[config])["journal_seq"] - seq0
                    applied = end
                else:
                    seq0 = repl(origin)["seq"]
                    writes, start, end = append_load(dirs, 100, args.duration)
                    seq1 = repl(origin)["seq"]
                    changes = seq1 - seq0
                    if not wait_until(partial(all_acked, origin, seq1), WAIT_LIMIT, 0.005):
                        run.problem(f"throughput round {round_no + 1}: peers did not "
                                    f"acknowledge {changes} changes within {WAIT_LIMIT:.0f} s")
                    applied = time.monotonic()
                cpu, busy, other = window.stop()
                figures = ThroughputRound(
                    config=config, round=round_no, position=position, writes=writes,
                    changes=changes, write_seconds=end - start, applied_seconds=applied - start,
                    machine_busy=busy, machine_other=other, cpu_core=cpu,
                )
                run.throughput.append(figures)
                tail = figures.applied_seconds - figures.write_seconds
                run.log(f"throughput {config:<10} round {round_no + 1}: "
                        f"{figures.writes_per_s:8.0f} writes/s at the writer, "
                        f"{figures.applied_per_s:8.0f} changes/s applied, "
                        f"{changes} changes, acked {tail:.3f} s after the last write")
        self.converged(self.clusters["async"], "throughput")

    # -- 2. lag under IMAP load

    def lag(self) -> None:
        args, run = self.args, self.run
        assert self.single is not None
        cluster = self.clusters["async"]
        origin = cluster[0]
        users = {f"r{r}c{i}": PASSWORD for r in range(args.imap_rounds)
                 for i in range(args.clients)}
        sides: dict[str, tuple[Dovecot, MailfsMount, list[Node]]] = {}
        for config, mountpoint, mount, nodes in (
            ("cluster", origin.mountpoint, origin.mount, list(cluster.nodes)),
            ("single", self.single.mountpoint, self.single, []),
        ):
            assert mount is not None
            mail_root = prepare_mail_root(mountpoint / "imap")
            dovecot = Dovecot(self.root / f"dovecot-{config}", mail_root, args.format, users)
            self.dovecots.append(dovecot)
            dovecot.start()
            sides[config] = (dovecot, mount, nodes)
        order = list(sides)
        for round_no in range(args.imap_rounds):
            for config in order if round_no % 2 == 0 else order[::-1]:
                dovecot, mount, nodes = sides[config]
                figures = self.imap_round(config, round_no, dovecot, mount, nodes)
                run.imap.append(figures)
                lag = ""
                if config == "cluster":
                    lag = (f"  lag p50/p99 {fmt(figures.lag_p50_seconds, 4)}/"
                           f"{fmt(figures.lag_p99_seconds, 4)} s (mailfs), polled p99 "
                           + " ".join(f"{p}={fmt(v.get('p99'), 3)}"
                                      for p, v in figures.polled.items()))
                run.log(f"imap {config:<8} round {round_no + 1}: {figures.ops_per_s:7.1f} ops/s "
                        f"{figures.errors} errors" + lag)
                if figures.errors or figures.fatal:
                    run.problem(f"imap {config} round {round_no + 1}: {figures.errors} IMAP "
                                f"errors, {len(figures.fatal)} clients gave up: "
                                + "; ".join([*figures.fatal, *figures.error_samples[:5]]))
        for config, (dovecot, _mount, _nodes) in sides.items():
            for line in dovecot.log_problems()[:10]:
                run.problem(f"dovecot on {config}: {line}")
        self.converged(cluster, "lag")

    def imap_round(self, config: str, round_no: int, dovecot: Dovecot, mount: MailfsMount,
                   nodes: list[Node]) -> ImapRun:
        args = self.args
        load = LoadConfig(
            port=dovecot.port, users=[f"r{round_no}c{i}" for i in range(args.clients)],
            password=PASSWORD, clients=args.clients, duration=args.imap_duration,
            populate=args.populate, seed=args.seed, mix=dict(DEFAULT_MIX),
        )
        origin = nodes[0] if nodes else None
        daemons = ({n.node_id: pid_of(n.mount) for n in nodes} if nodes
                   else {"single": pid_of(mount)})
        poller = LagPoller(origin, 0.1) if origin is not None else None
        before: dict[str, Any] = {}
        after: dict[str, Any] = {}
        dovecot_pid = dovecot.process.pid if dovecot.process else None

        def sample(into: dict[str, Any]) -> None:
            into["cpu"] = {name: tree_cpu(pid) for name, pid in daemons.items()}
            into["cpu"]["dovecot"] = tree_cpu(dovecot_pid)
            into["busy"], into["total"] = system_cpu()
            into["ours"] = tree_cpu(os.getpid())
            into["time"] = time.monotonic()
            into["commits"] = {}
            for node in nodes:
                status = status_of(node.mountpoint)
                into["commits"][node.node_id] = (status["commits"], status["commit_seconds"])

        def on_start() -> None:
            sample(before)
            if poller is not None:
                poller.start()

        def on_end() -> None:
            if poller is not None:
                poller.stop()
            deadline = time.monotonic() + 5
            while (dovecot_pid and live_children_named(dovecot_pid, "imap")
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            sample(after)

        os.sync()
        result: LoadResult = run_load(load, on_start=on_start, on_end=on_end)
        wall = max(1e-6, after.get("time", 0.0) - before.get("time", 0.0))
        total_s = max(1.0, after.get("total", 0.0) - before.get("total", 0.0)) / TICK
        busy_s = (after.get("busy", 0.0) - before.get("busy", 0.0)) / TICK
        busy = busy_s / total_s
        other = max(0.0, busy_s - (after.get("ours", 0.0) - before.get("ours", 0.0))) / total_s
        cpu_core = {name: (after["cpu"][name] - before["cpu"][name]) / wall
                    for name in before.get("cpu", {}) if name in after.get("cpu", {})}
        figures = ImapRun(
            config=config, round=round_no, ops_per_s=result.ops_per_s,
            total_ops=result.total_ops, errors=result.total_errors, fatal=result.fatal,
            error_samples=result.error_samples(),
            elapsed=max((c.elapsed for c in result.clients), default=0.0),
            machine_busy=busy, machine_other=other, cpu_core=cpu_core,
        )
        for node_id in before.get("commits", {}):
            (c0, s0), (c1, s1) = before["commits"][node_id], after["commits"][node_id]
            figures.peer_commits[node_id] = {
                "commits_per_s": (c1 - c0) / wall,
                "mean_commit_ms": 1000 * (s1 - s0) / (c1 - c0) if c1 > c0 else 0.0,
                "commit_busy": (s1 - s0) / wall,  # share of the wall time spent committing
            }
        if origin is not None and poller is not None:
            final = repl(origin)
            figures.final_status = final
            figures.lag_p50_seconds = final["lag_p50_seconds"]
            figures.lag_p99_seconds = final["lag_p99_seconds"]
            for peer in final["peers"]:
                values = poller.values(peer)
                changes = poller.values(peer, "lag_changes")
                figures.polled[peer] = {
                    "p50": percentile(values, 0.5), "p99": percentile(values, 0.99),
                    "max": max(values) if values else None,
                    "mean": statistics.fmean(values) if values else None,
                    "zero_share": (sum(1 for v in values if v == 0) / len(values)
                                   if values else None),
                    "changes_p50": percentile(changes, 0.5),
                    "changes_p99": percentile(changes, 0.99),
                }
            figures.poll_count = len(poller.samples)
            figures.poll_errors = poller.errors
            figures.poll_p50_ms = 1000 * (percentile(poller.poll_seconds, 0.5) or 0.0)
            figures.samples = poller.samples
        return figures

    # -- 3. fsync latency

    def fsync(self) -> None:
        args, run = self.args, self.run
        assert self.single is not None
        targets = {
            "ext4": self.root / "ext4",
            "single": self.single.mountpoint,
            "async": self.clusters["async"][0].mountpoint,
            "sync": self.clusters["sync"][0].mountpoint,
        }
        order = list(FSYNC_CONFIGS)
        for round_no in range(args.rounds):
            shift = round_no % len(order)
            for position, config in enumerate(order[shift:] + order[:shift]):
                os.sync()
                mailfs = config != "ext4"
                status0 = status_of(targets[config]) if mailfs else {}
                window = CpuWindow({})
                fsyncs, both = fsync_loop(targets[config] / "fsync" / f"r{round_no}",
                                          args.fsync_seconds, args.fsync_max)
                _cores, busy, other = window.stop()
                commit_ms = None
                if mailfs:
                    status1 = status_of(targets[config])
                    commits = status1["commits"] - status0["commits"]
                    if commits:
                        commit_ms = 1000 * (status1["commit_seconds"]
                                            - status0["commit_seconds"]) / commits
                ms = [1000 * v for v in fsyncs]
                figures = FsyncRound(
                    config=config, round=round_no, position=position, count=len(ms),
                    p50_ms=percentile(ms, 0.5), p99_ms=percentile(ms, 0.99),
                    mean_ms=statistics.fmean(ms) if ms else None, max_ms=max(ms, default=None),
                    write_fsync_p50_ms=percentile([1000 * v for v in both], 0.5),
                    machine_busy=busy, machine_other=other, mean_commit_ms=commit_ms,
                    samples_ms=[round(v, 4) for v in ms],
                )
                run.fsync.append(figures)
                run.log(f"fsync {config:<7} round {round_no + 1}: {len(ms)} fsyncs, "
                        f"p50 {fmt(figures.p50_ms, 3)} ms, p99 {fmt(figures.p99_ms, 3)} ms")
        sync_state = repl(self.clusters["sync"][0])
        if sync_state["degraded"] or sync_state["degradations"]:
            run.problem(f"sync cluster degraded to async during the fsync loop "
                        f"({sync_state['degradations']} times): its figures are partly async")

    # -- 4 and 5. catch-up from the log, and by snapshot

    def catch_up(self, cluster_name: str, peer_index: int, kind: str, total_mb: float) -> None:
        run = self.run
        cluster = self.clusters[cluster_name]
        origin, peer = cluster[0], cluster[peer_index]
        others = [n.node_id for n in cluster.nodes[1:] if n is not peer]
        # The peer has some of a's changes before it goes, so that a snapshot is needed
        # because the log was trimmed, not because the peer never had anything.
        warm = origin.path(f"{kind}/warm")
        warm.mkdir(parents=True, exist_ok=True)
        (warm / "dovecot.index").write_bytes(b"w" * 100)
        if not wait_until(partial(all_acked, origin, repl(origin)["seq"]), 30, 0.05):
            run.problem(f"{kind}: peers did not acknowledge a's first change")
        before = repl(origin)["peers"][peer.node_id]
        sent0 = {p: s["snapshots_sent"] for p, s in repl(origin)["peers"].items()}
        acked0 = before["acked_seq"]
        peer.stop()
        wait_until(lambda: not repl(origin)["peers"][peer.node_id]["connected"], 30, 0.05)
        seq0 = repl(origin)["seq"]
        dirs = [origin.path(f"{kind}/box{i}") for i in range(self.args.bulk_files)]
        written, writes, write_seconds = bulk_write(dirs, int(total_mb * MB), 64 << 10)
        seq1 = repl(origin)["seq"]
        if not wait_until(lambda: all_acked(origin, seq1, others), WAIT_LIMIT, 0.05):
            run.problem(f"{kind}: the running peers did not acknowledge the bulk write")
        time.sleep(1.5)  # a's committer (1 s interval) writes the bulk to LMDB before we time
        state = repl(origin)
        seq = state["seq"]
        behind = state["peers"][peer.node_id]
        snapshots0 = behind["snapshots_sent"]
        log_mark = len(origin.log())
        run.log(f"{kind}: {written / MB:.1f} MB in {writes} writes on a in {write_seconds:.2f} s "
                f"({written / MB / write_seconds:.1f} MB/s); {peer.node_id} is "
                f"{seq - behind['acked_seq']} changes, {behind['unacked_log_bytes'] / MB:.1f} MB "
                f"behind; a's log {state['log_bytes'] / MB:.1f} MB")
        os.sync()
        figures = CatchUp(
            kind=kind, peer=peer.node_id, written_mb=written / MB, writes=writes,
            changes=seq1 - seq0, write_seconds=write_seconds,
            behind_mb=behind["unacked_log_bytes"] / MB, log_mb=state["log_bytes"] / MB,
            mount_seconds=0.0, connect_seconds=None, total_seconds=None,
        )
        start = time.monotonic()
        peer.start()
        figures.mount_seconds = time.monotonic() - start
        span = max(1, seq - acked0)
        deadline = start + WAIT_LIMIT
        while time.monotonic() < deadline:
            now = time.monotonic() - start
            state = repl(origin)["peers"][peer.node_id]
            if state["connected"] and figures.connect_seconds is None:
                figures.connect_seconds = now
            if state["snapshot_fraction"] is not None:
                done = float(state["snapshot_fraction"])
            else:
                done = (state["acked_seq"] - acked0) / span
            # A sent snapshot counts as done until the acknowledgement after its install.
            done = max([done, *(p[1] for p in figures.progress[-1:])])
            figures.progress.append((round(now, 3), round(min(1.0, max(0.0, done)), 4)))
            finished = state["acked_seq"] >= seq and (
                kind != "snapshot" or state["snapshots_sent"] > snapshots0)
            if finished:
                figures.total_seconds = now
                figures.snapshots_sent = state["snapshots_sent"] - snapshots0
                break
            time.sleep(0.05)
        else:
            run.problem(f"{kind}: {peer.node_id} had not caught up after {WAIT_LIMIT:.0f} s")
        time.sleep(0.5)  # the sender logs its summary line just after the last chunk
        lines = [line for line in origin.log()[log_mark:].splitlines()
                 if f"snapshot to {peer.node_id}" in line]
        figures.snapshot_log = [line.strip() for line in lines][-6:]
        for line in lines:
            found = re.search(r"sending a snapshot to \S+ \(.*\): ([\d.]+) MB", line)
            if found:
                figures.snapshot_mb = float(found.group(1))
        text = origin.log()[log_mark:]
        pushed = text.count(f"receiving a snapshot from {peer.node_id}:")
        refused = text.count(f"refused replication connection from {peer.node_id} ")
        if pushed or refused:
            run.note(f"{kind}: while catching up, {peer.node_id} also tried to send a "
                     f"snapshot of its own state to a {pushed + refused} times ({refused} refused "
                     f"by a, {pushed} installed on a): its sender took a, which has applied "
                     "no peer's change, for 'a new peer with no state'; this is in the "
                     "timed figure")
        figures.snapshots_to_others = {
            n.node_id: repl(origin)["peers"][n.node_id]["snapshots_sent"] - sent0[n.node_id]
            for n in cluster.nodes[1:] if n is not peer}
        for other, count in figures.snapshots_to_others.items():
            if count:
                run.note(f"{kind}: a also sent {count} snapshot(s) to {other}, which was "
                         f"connected all along, during the {figures.written_mb:.0f} MB write "
                         f"(log_limit {repl(origin)['log_limit_bytes'] / MB:.0f} MB)")
        if kind == "snapshot" and not figures.snapshot_mb:
            run.problem(f"snapshot: a did not log a snapshot to {peer.node_id}")
        if kind == "log" and figures.snapshots_sent:
            run.note(f"catch-up: {peer.node_id} got a snapshot although the log had room")
        figures.converged = self.converged(cluster, kind)
        run.catchups.append(figures)
        run.log(f"{kind}: {peer.node_id} caught up in {fmt(figures.total_seconds, 2)} s after "
                f"its start (mounted after {figures.mount_seconds:.2f} s, connected after "
                f"{fmt(figures.connect_seconds, 2)} s): {fmt(figures.mb_per_s)} MB/s of "
                f"written data" + (f", snapshot {figures.snapshot_mb:.1f} MB"
                                   if figures.snapshot_mb else ""))
        for line in figures.snapshot_log:
            run.log(f"  a: {line}")

    # -- the whole run

    def run_all(self) -> None:
        args, run = self.args, self.run
        wanted = args.sections
        needs_single = {"throughput", "lag", "fsync"} & set(wanted)
        needs_async = {"throughput", "lag", "fsync", "catchup"} & set(wanted)
        if needs_single:
            self.start_single()
        if needs_async:
            self.start_cluster("async", {"log_limit": "1G"})
        steps: list[tuple[str, Callable[[], None]]] = [
            # The IMAP load goes first: a's lag percentiles then cover that load only.
            ("lag", self.lag),
            ("throughput", self.throughput),
            ("fsync", self.fsync_section),
            ("catchup", lambda: self.catch_up("async", 1, "log", args.catchup_mb)),
            ("snapshot", self.snapshot_section),
        ]
        for name, step in steps:
            if name not in wanted:
                continue
            started = time.monotonic()
            run.log(f"== {name}")
            try:
                step()
            except Exception as exc:
                run.problem(f"{name}: harness error: {exc!r}")
            run.timings[name] = round(time.monotonic() - started, 1)
            if name == "fsync":
                self.close_cluster("sync")
            if name == "lag":
                for dovecot in self.dovecots:
                    try:
                        dovecot.stop()
                    finally:
                        dovecot.kill()
                self.dovecots = []

    def fsync_section(self) -> None:
        self.start_cluster("sync", {"durability": "sync"})
        self.fsync()

    def snapshot_section(self) -> None:
        self.close_cluster("async")  # fewer daemons competing for the CPUs
        self.start_cluster("snapshot", {"log_limit": "1M"})
        self.catch_up("snapshot", 2, "snapshot", self.args.snapshot_mb)


# -- summaries ------------------------------------------------------------------------------------


def throughput_summary(run: Run) -> dict[str, Any]:
    single = [r for r in run.throughput if r.config == "single"]
    replicated = [r for r in run.throughput if r.config == "replicated"]
    out: dict[str, Any] = {
        "single_changes_per_s": median([r.applied_per_s for r in single]),
        "single_writes_per_s": median([r.writes_per_s for r in single]),
        "replicated_writes_per_s": median([r.writes_per_s for r in replicated]),
        "replicated_applied_per_s": median([r.applied_per_s for r in replicated]),
        "ack_after_last_write_s": median(
            [r.applied_seconds - r.write_seconds for r in replicated]),
    }
    out["ratio_applied"] = ratio(out["replicated_applied_per_s"], out["single_changes_per_s"])
    out["ratio_writer"] = ratio(out["replicated_writes_per_s"], out["single_writes_per_s"])
    by_round = {r.round: r.applied_per_s for r in single}
    out["per_round_ratios"] = [r.applied_per_s / by_round[r.round] for r in replicated
                               if by_round.get(r.round)]
    return out


def fsync_summary(run: Run) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for config in FSYNC_CONFIGS:
        rounds = [r for r in run.fsync if r.config == config]
        if not rounds:
            continue
        pooled = [v for r in rounds for v in r.samples_ms]
        out[config] = {
            "count": float(len(pooled)),
            "p50_ms": percentile(pooled, 0.5),
            "p99_ms": percentile(pooled, 0.99),
            "mean_ms": statistics.fmean(pooled) if pooled else None,
            "round_p50_min_ms": min((r.p50_ms for r in rounds if r.p50_ms is not None),
                                    default=None),
            "round_p50_max_ms": max((r.p50_ms for r in rounds if r.p50_ms is not None),
                                    default=None),
            "fsyncs_per_s": 1000 / statistics.fmean(pooled) if pooled else None,
        }
    base = out.get("ext4", {})
    for figures in out.values():
        figures["p50_vs_ext4"] = ratio(figures["p50_ms"], base.get("p50_ms"))
        figures["p99_vs_ext4"] = ratio(figures["p99_ms"], base.get("p99_ms"))
    return out


def summary(run: Run) -> dict[str, Any]:
    cluster_runs = [r for r in run.imap if r.config == "cluster"]
    single_runs = [r for r in run.imap if r.config == "single"]
    imap: dict[str, Any] = {
        "cluster_ops_per_s": median([r.ops_per_s for r in cluster_runs]),
        "single_ops_per_s": median([r.ops_per_s for r in single_runs]),
    }
    imap["ratio"] = ratio(imap["cluster_ops_per_s"], imap["single_ops_per_s"])
    if cluster_runs:
        last = cluster_runs[-1]
        imap["lag_p50_seconds"] = last.lag_p50_seconds
        imap["lag_p99_seconds"] = last.lag_p99_seconds
        imap["polled"] = last.polled
    return {
        "throughput": throughput_summary(run),
        "fsync": fsync_summary(run),
        "imap": imap,
        "catchup": [asdict(c) | {"mb_per_s": c.mb_per_s, "behind_mb_per_s": c.behind_mb_per_s}
                    for c in run.catchups],
    }


# -- report ---------------------------------------------------------------------------------------


def other_cell(share: float) -> str:
    return f"{100 * share:.0f}%" + (" !" if share > DISTURBED else "")


def render_report(run: Run, info: dict[str, str]) -> str:
    args = run.args
    s = summary(run)
    lines = [
        "mailfs replication benchmark: Cluster(3) of real mounts (a origin, b and c peers) "
        "against baselines",
        f"date: {run.started:%Y-%m-%d %H:%M:%S} UTC",
        "",
        "machine:",
        *(f"  {key}: {value}" for key, value in info.items()),
        "",
        "config:",
        f"  sections: {', '.join(args.sections)}; seconds per section: "
        + ", ".join(f"{k} {v:g}" for k, v in run.timings.items()),
        f"  throughput: {args.rounds} rounds x {args.duration:g} s per configuration, "
        f"{args.writers} writer threads (one mailbox dir each), 100-byte pwrite at EOF of "
        "dovecot.index.log; order alternating",
        f"  lag: {args.imap_rounds} round(s) x {args.imap_duration:g} s of the IMAP load "
        f"({args.clients} clients, {args.format}, {args.populate} messages pre-filled), "
        "peers' lag polled on a every 100 ms",
        f"  fsync: {args.rounds} rounds x up to {args.fsync_seconds:g} s or {args.fsync_max} "
        "fsyncs per configuration, write(4 KiB) at EOF + fsync, order rotating",
        f"  catch-up: {args.catchup_mb:g} MB (log_limit=1G); snapshot: {args.snapshot_mb:g} MB "
        f"(log_limit=1M); 64 KiB appends over {args.bulk_files} dovecot.index.log files",
        "  all clusters: async durability unless stated, reconnect_interval=0.2, "
        "commit interval 1 s (default)",
        "  busy: share of all CPUs used; other: share used outside this benchmark's process "
        f"tree (other tenants), '!' above {100 * DISTURBED:.0f} %: that round was disturbed",
    ]

    if run.throughput:
        t = s["throughput"]
        lines += ["", "1. replicated changes per second (100-byte appends; median over rounds)"]
        lines += table(
            ["config", "round", "order", "writes", "changes", "writer writes/s",
             "applied changes/s", "acked after last write s", "busy", "other",
             "daemon CPU (of a core)"],
            [[r.config, str(r.round + 1), str(r.position + 1), str(r.writes), str(r.changes),
              fmt(r.writes_per_s, 0), fmt(r.applied_per_s, 0),
              fmt(r.applied_seconds - r.write_seconds, 3) if r.config == "replicated" else "-",
              f"{100 * r.machine_busy:.0f}%", other_cell(r.machine_other),
              " ".join(f"{k}={100 * v:.0f}%" for k, v in r.cpu_core.items())]
             for r in run.throughput],
        )
        paired = t["per_round_ratios"]
        lines += [
            "",
            f"  single mount, no replication: {fmt(t['single_changes_per_s'], 0)} changes/s",
            f"  cluster, applied at b and c:  {fmt(t['replicated_applied_per_s'], 0)} changes/s "
            f"(writer on a: {fmt(t['replicated_writes_per_s'], 0)} writes/s; the last change "
            f"acknowledged {fmt(t['ack_after_last_write_s'], 3)} s after the last write)",
            f"  ratio replicated/single: {fmt(t['ratio_applied'], 3)} (per round: "
            + (" ".join(f"{p:.3f}" for p in paired) or "-")
            + f"); writer-side ratio {fmt(t['ratio_writer'], 3)}",
        ]

    if run.imap:
        lines += ["", "2. replication lag under the IMAP load (Dovecot on a's mount)"]
        lines += table(
            ["config", "round", "ops/s", "ops", "errors", "busy", "other",
             "CPU share of one core"],
            [[r.config, str(r.round + 1), fmt(r.ops_per_s), str(r.total_ops), str(r.errors),
              f"{100 * r.machine_busy:.0f}%", other_cell(r.machine_other),
              " ".join(f"{k}={100 * v:.0f}%" for k, v in r.cpu_core.items())]
             for r in run.imap],
        )
        imap = s["imap"]
        lines += [
            "",
            f"  IMAP ops/s cluster/single: {fmt(imap['ratio'], 3)} "
            f"({fmt(imap['cluster_ops_per_s'])} / {fmt(imap['single_ops_per_s'])})",
        ]
        for r in (r for r in run.imap if r.config == "cluster"):
            lines += [
                f"  round {r.round + 1}: mailfs's own lag (a's status, change made -> peer "
                f"commit acknowledged, last 10000 acks incl. mailbox populate): "
                f"p50 {fmt(r.lag_p50_seconds, 4)} s, p99 {fmt(r.lag_p99_seconds, 4)} s",
                f"  polled peers' lag_seconds (age of the oldest unacknowledged change; "
                f"{r.poll_count} polls, {r.poll_errors} failed, poll p50 "
                f"{fmt(r.poll_p50_ms, 1)} ms):",
            ]
            lines += ["    " + line for line in table(
                ["peer", "p50 s", "p99 s", "max s", "mean s", "polls at 0", "lag changes p50/p99",
                 "peer commits/s", "mean commit ms", "time committing"],
                [[peer, fmt(v["p50"], 3), fmt(v["p99"], 3), fmt(v["max"], 3), fmt(v["mean"], 4),
                  f"{100 * (v['zero_share'] or 0):.0f}%",
                  f"{fmt(v['changes_p50'], 0)}/{fmt(v['changes_p99'], 0)}",
                  fmt(r.peer_commits.get(peer, {}).get("commits_per_s"), 1),
                  fmt(r.peer_commits.get(peer, {}).get("mean_commit_ms"), 2),
                  f"{100 * r.peer_commits.get(peer, {}).get('commit_busy', 0):.0f}%"]
                 for peer, v in r.polled.items()],
            )]
            a_commits = r.peer_commits.get("a")
            if a_commits:
                lines.append(f"    a (origin): {fmt(a_commits['commits_per_s'], 1)} commits/s, "
                             f"mean {fmt(a_commits['mean_commit_ms'], 2)} ms")

    if run.fsync:
        f = s["fsync"]
        lines += ["", "3. fsync latency, write(4 KiB) + fsync of dovecot.index.log, ms"]
        lines += table(
            ["config", "round", "order", "fsyncs", "p50", "p99", "mean", "max",
             "write+fsync p50", "mean LMDB commit", "busy", "other"],
            [[r.config, str(r.round + 1), str(r.position + 1), str(r.count), fmt(r.p50_ms, 3),
              fmt(r.p99_ms, 3), fmt(r.mean_ms, 3), fmt(r.max_ms, 2),
              fmt(r.write_fsync_p50_ms, 3), fmt(r.mean_commit_ms, 3),
              f"{100 * r.machine_busy:.0f}%",
              other_cell(r.machine_other)]
             for r in run.fsync],
        )
        lines += ["", "  all rounds pooled:"]
        lines += ["  " + line for line in table(
            ["config", "fsyncs", "p50 ms", "p99 ms", "mean ms", "fsyncs/s", "p50/ext4",
             "p99/ext4", "round p50 range"],
            [[config, fmt(v["count"], 0), fmt(v["p50_ms"], 3), fmt(v["p99_ms"], 3),
              fmt(v["mean_ms"], 3), fmt(v["fsyncs_per_s"], 0), fmt(v["p50_vs_ext4"], 2),
              fmt(v["p99_vs_ext4"], 2),
              f"{fmt(v['round_p50_min_ms'], 3)}-{fmt(v['round_p50_max_ms'], 3)}"]
             for config, v in f.items()],
        )]
        lines += ["  (ext4: a file in the work dir, same disk; single: mailfs without "
                  "replication; async/sync: node a of a 3-node cluster)"]

    for c in run.catchups:
        title = ("4. catch-up from the replication log (b stopped, written on a, b restarted)"
                 if c.kind == "log" else
                 "5. catch-up by snapshot (log_limit=1M; c stopped, written on a, c restarted)")
        lines += ["", title]
        lines += [
            f"  written on a: {c.written_mb:.1f} MB in {c.writes} writes ({c.changes} changes) "
            f"in {c.write_seconds:.2f} s = {c.written_mb / c.write_seconds:.1f} MB/s",
            f"  {c.peer} behind by {c.behind_mb:.1f} MB of a's log; a's log {c.log_mb:.1f} MB",
            f"  {c.peer} start -> mounted {c.mount_seconds:.2f} s, -> connected "
            f"{fmt(c.connect_seconds, 2)} s, -> acked_seq == a's seq "
            f"{fmt(c.total_seconds, 2)} s",
            f"  catch-up speed: {fmt(c.mb_per_s)} MB/s of written data"
            + (f"; snapshot {c.snapshot_mb:.1f} MB -> {fmt(c.behind_mb_per_s)} MB/s"
               if c.snapshot_mb else
               f"; {fmt(c.behind_mb_per_s)} MB/s of log")
            + f"; snapshots sent: {c.snapshots_sent}; converged: {c.converged}",
        ]
        others = ", ".join(f"{k}: {v}" for k, v in c.snapshots_to_others.items())
        if others:
            lines.append(f"  snapshots a sent meanwhile to the peers that stayed up: {others}")
        lines += [f"  a's log: {line}" for line in c.snapshot_log]

    lines += ["", "notes:" if run.notes else "notes: none"]
    lines += [f"  {n}" for n in run.notes]
    lines += ["", "problems:" if run.problems else "problems: none"]
    lines += [f"  {p}" for p in run.problems]
    return "\n".join(lines) + "\n"


def render_charts(run: Run, results: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(run)
    written: list[Path] = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (ax_t, ax_f), (ax_l, ax_c) = axes

    t = s["throughput"]
    if run.throughput:
        labels = ["single mount\n(no replication)", "cluster: writer on a",
                  "cluster: applied\nat b and c"]
        values = [t["single_changes_per_s"] or 0, t["replicated_writes_per_s"] or 0,
                  t["replicated_applied_per_s"] or 0]
        ax_t.bar(range(3), values, color=["#7f7f7f", "#aec7e8", "#1f77b4"])
        for x, config, key in ((0, "single", "applied_per_s"), (1, "replicated", "writes_per_s"),
                               (2, "replicated", "applied_per_s")):
            points = [getattr(r, key) for r in run.throughput if r.config == config]
            ax_t.scatter([x] * len(points), points, s=14, color="black", zorder=3)
        ax_t.set_xticks(range(3), labels, fontsize=8)
        ax_t.set_ylabel("changes per second")
        ax_t.set_title(f"1. 100-byte appends, {run.args.writers} writers; "
                       f"replicated/single = {fmt(t['ratio_applied'], 2)}", fontsize=9)
        ax_t.grid(axis="y", alpha=0.3)
    else:
        ax_t.set_axis_off()

    f = s["fsync"]
    if f:
        configs = list(f)
        xs = range(len(configs))
        ax_f.bar([x - 0.2 for x in xs], [f[c]["p50_ms"] or 0 for c in configs], 0.4,
                 label="p50", color="#1f77b4")
        ax_f.bar([x + 0.2 for x in xs], [f[c]["p99_ms"] or 0 for c in configs], 0.4,
                 label="p99", color="#ff7f0e")
        for x, c in zip(xs, configs, strict=True):
            ax_f.annotate(f"x{fmt(f[c]['p50_vs_ext4'], 2)}", (x - 0.2, f[c]["p50_ms"] or 0),
                          xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
        ax_f.set_yscale("log")
        ax_f.set_xticks(list(xs), configs)
        ax_f.set_ylabel("ms (log scale)")
        ax_f.set_title("3. write(4 KiB) + fsync latency (xN: p50 / ext4 p50)", fontsize=9)
        ax_f.legend(fontsize=8)
        ax_f.grid(axis="y", alpha=0.3)
    else:
        ax_f.set_axis_off()

    cluster_runs = [r for r in run.imap if r.config == "cluster"]
    if cluster_runs:
        r = cluster_runs[-1]
        for peer, color in zip(r.polled, ("#1f77b4", "#2ca02c", "#d62728"), strict=False):
            ts = [x["t"] for x in r.samples if peer in x["lag_seconds"]]
            ys = [1000 * float(x["lag_seconds"][peer]) for x in r.samples
                  if peer in x["lag_seconds"]]
            ax_l.plot(ts, ys, lw=0.8, color=color,
                      label=f"{peer}: p50 {1000 * (r.polled[peer]['p50'] or 0):.0f} ms, "
                            f"p99 {1000 * (r.polled[peer]['p99'] or 0):.0f} ms")
        ax_l.set_xlabel("seconds into the IMAP load")
        ax_l.set_ylabel("peer lag_seconds polled on a, ms")
        ax_l.set_title(f"2. lag under IMAP load ({r.ops_per_s:.0f} ops/s); mailfs p50/p99 "
                       f"{1000 * (r.lag_p50_seconds or 0):.0f}/"
                       f"{1000 * (r.lag_p99_seconds or 0):.0f} ms", fontsize=9)
        ax_l.legend(fontsize=8)
        ax_l.grid(alpha=0.3)
    else:
        ax_l.set_axis_off()

    if run.catchups:
        for c, color in zip(run.catchups, ("#1f77b4", "#d62728"), strict=False):
            ts = [p[0] for p in c.progress]
            ys = [100 * p[1] for p in c.progress]
            label = (f"{c.kind} ({c.peer}): {c.written_mb:.0f} MB in "
                     f"{fmt(c.total_seconds, 1)} s = {fmt(c.mb_per_s)} MB/s")
            ax_c.plot(ts, ys, color=color, label=label)
            ax_c.axvline(c.mount_seconds, color=color, ls=":", lw=0.8)
        ax_c.set_xlabel("seconds since the peer was started (dotted: mounted)")
        ax_c.set_ylabel("% caught up (snapshot: % sent)")
        ax_c.set_title("4./5. catch-up after a restart", fontsize=9)
        ax_c.legend(fontsize=8)
        ax_c.grid(alpha=0.3)
    else:
        ax_c.set_axis_off()

    fig.suptitle(f"mailfs replication, {run.started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, "
                 f"kernel {platform.release()}", fontsize=10)
    fig.tight_layout()
    path = results / "replication.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    if run.fsync:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for config in FSYNC_CONFIGS:
            pooled = sorted(v for r in run.fsync if r.config == config for v in r.samples_ms)
            if pooled:
                ys = [100 * (i + 1) / len(pooled) for i in range(len(pooled))]
                ax.plot(pooled, ys, label=f"{config} ({len(pooled)})")
        ax.set_xscale("log")
        ax.set_xlabel("fsync latency, ms (log scale)")
        ax.set_ylabel("% of fsyncs at most this long")
        ax.set_title("write(4 KiB) + fsync of dovecot.index.log: distribution", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = results / "replication_fsync.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# -- entry point ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.replication", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--rounds", type=int, default=3, help="throughput and fsync rounds")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds of appends per throughput round and configuration")
    parser.add_argument("--writers", type=int, default=4, help="writer threads (mailbox dirs)")
    parser.add_argument("--imap-duration", type=float, default=20.0)
    parser.add_argument("--imap-rounds", type=int, default=2,
                        help="IMAP rounds per configuration, order alternating")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--populate", type=int, default=60, help="messages per user up front")
    parser.add_argument("--format", default="maildir", help="Dovecot mail format for the load")
    parser.add_argument("--fsync-seconds", type=float, default=3.0,
                        help="per fsync round and configuration")
    parser.add_argument("--fsync-max", type=int, default=1000, help="fsyncs per round at most")
    parser.add_argument("--catchup-mb", type=float, default=64.0)
    parser.add_argument("--snapshot-mb", type=float, default=64.0)
    parser.add_argument("--bulk-files", type=int, default=8,
                        help="index files the catch-up/snapshot data is spread over")
    parser.add_argument("--quick", action="store_true",
                        help="short everything (checks the harness, figures are rough)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"),
                        help="where mounts, backing dirs and the ext4 fsync file live")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the work dir afterwards")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    if args.quick:
        args.rounds, args.duration, args.imap_duration, args.imap_rounds = 1, 2.0, 5.0, 1
        args.populate, args.fsync_seconds = 10, 1.0
        args.catchup_mb, args.snapshot_mb = 8.0, 8.0
    if os.geteuid() != 0:
        parser.error("must run as root (mailfs mounts FUSE, Dovecot drops to vmail)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The daemons run as `python -m mailfs`; let them import from this checkout.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])
    )
    began = time.monotonic()
    with work_dir(args.workdir, args.keep) as (root, keep):
        info = machine_info(root)
        run = Run(args, root)
        bench = Bench(run)
        try:
            bench.run_all()
        finally:
            bench.close()
        run.timings["total"] = round(time.monotonic() - began, 1)
        if run.problems:
            keep[0] = True  # the logs in it are the evidence
        args.results.mkdir(parents=True, exist_ok=True)
        report = render_report(run, info)
        (args.results / "replication.txt").write_text(report)
        charts = render_charts(run, args.results)
        dump = {
            "machine": info,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "summary": summary(run),
            "throughput": [asdict(r) | {"writes_per_s": r.writes_per_s,
                                        "applied_per_s": r.applied_per_s}
                           for r in run.throughput],
            "fsync": [asdict(r) for r in run.fsync],
            "imap": [asdict(r) for r in run.imap],
            "catchup": [asdict(c) for c in run.catchups],
            "timings": run.timings,
            "mailfs_status": run.statuses,
            "notes": run.notes,
            "problems": run.problems,
        }
        (args.results / "replication.json").write_text(json.dumps(dump, indent=1) + "\n")
        print()
        print(report)
        print(f"wrote {args.results / 'replication.txt'}, replication.json, "
              + ", ".join(p.name for p in charts))
    return 1 if run.problems else 0


if __name__ == "__main__":
    sys.exit(main())
