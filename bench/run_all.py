"""Dovecot in several storage setups side by side, under the same IMAP load.

For each mail format, one Dovecot per setup (see SETUPS: mail and indexes on a local
directory, on sshfs with added latency, on mailfs in either mode, on a two-node cluster)
runs at once, idle until its turn. Rounds alternate the order of the setups (forward, then
backward ...) so that slow drifts of a shared, noisy machine hit all alike; every round uses
fresh users, so each starts from the same mailbox state. The headlines are ratios of medians
between setups (COMPARISONS), against the targets the project set.

    python -m bench.run_all                       # full overlay vs local: maildir, sdbox
    python -m bench.run_all --layout index-only   # index-only mount vs INDEX= on local disk
    python -m bench.run_all --layout all          # every setup, local and over sshfs
    python -m bench.run_all --setups local,full --duration 5 --rounds 1   # check the harness
    python -m bench.run_all --replication         # then bench/replication.py as well
    python -m bench.run_all --replication-only    # only the replication benchmark
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from bench.imap_load import DEFAULT_MIX, LoadConfig, LoadResult, run_load  # noqa: E402
from tests.rigs.cluster import Cluster  # noqa: E402
from tests.rigs.dovecot import MAIL_USER, Dovecot, prepare_mail_root  # noqa: E402
from tests.rigs.mount import MailfsMount, is_mounted, run_cli  # noqa: E402
from tests.rigs.sshfs import SshfsMount, sshfs_backing  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PASSWORD = "bench-secret"
TICK = float(os.sysconf("SC_CLK_TCK"))
DISTURBED = 0.15  # foreign CPU share above which a round is flagged as disturbed
MAX_LOG_LINES = 8  # Dovecot/mailfs problem lines quoted per round
# Counters from `mailfs status` worth dividing by the number of IMAP operations.
MAILFS_COUNTERS = (
    "backing_calls", "backing_errors", "backing_timeouts", "ram_hits", "ram_misses", "commits",
    "commit_errors", "evictions", "requests_total", "listing_missing_answered", "listings_read",
    "opens_remembered", "opens_completed",
)
# FUSE requests per IMAP operation, by kind (from status "requests").
REQUEST_KINDS = ("getattr", "read", "write", "lookup", "open", "release")
COUNTER_COLUMNS = (*MAILFS_COUNTERS, *(f"req_{kind}" for kind in REQUEST_KINDS))


# -- CPU accounting from /proc ------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, str, float]]:
    """pid -> (ppid, comm, CPU seconds incl. reaped children) for every process."""
    table: dict[int, tuple[int, str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        # After the comm: state ppid ... utime(14) stime(15) cutime(16) cstime(17), 1-based
        # over the whole line, so indices 11..14 here.
        ticks = sum(int(value) for value in fields[11:15])
        table[int(entry)] = (int(fields[1]), comm, ticks / TICK)
    return table


def _tree(table: dict[int, tuple[int, str, float]], root: int) -> set[int]:
    found = {root} if root in table else set()
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, row in table.items() if row[0] in frontier} - found
        found |= frontier
    return found


def tree_cpu(pid: int | None) -> float:
    """CPU seconds of a process, its live descendants and every child it has reaped.

    Dovecot's imap processes exit at logout and are reaped by the master, so their time
    lands in the master's cutime; sampling live ones as well keeps the delta exact.
    """
    if pid is None:
        return 0.0
    table = _proc_table()
    return sum(table[p][2] for p in _tree(table, pid))


def live_children_named(pid: int, comm: str) -> int:
    table = _proc_table()
    return sum(1 for p in _tree(table, pid) if table[p][1] == comm and p != pid)


def system_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    idle = values[3] + values[4]
    return float(sum(values) - idle), float(sum(values))


# -- the setups -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    name: str
    mail: str  # local | sshfs | full (mailfs over a local dir) | full-sshfs (mailfs over sshfs)
    index: str  # with-mail (Dovecot's default) | local | index-only | index-only-sync2
    description: str
    # mailfs config keys (-o KEY=VALUE) for the single mount of the setup, as --mailfs-arg
    options: tuple[str, ...] = ()

    def mount_args(self, common: list[str]) -> list[str]:
        return [*common, *(arg for option in self.options for arg in ("-o", option))]

    @property
    def on_sshfs(self) -> bool:
        return "sshfs" in self.mail

    @property
    def on_mailfs(self) -> bool:
        return self.mail.startswith("full") or self.index.startswith("index-only")


SETUPS = {setup.name: setup for setup in (
    Setup("local", "local", "with-mail", "Dovecot on a local directory"),
    Setup("full", "full", "with-mail",
          "the whole mail_location on a mailfs full overlay over a local directory"),
    Setup("local-index", "local", "local",
          "mail on a local directory, INDEX=/CONTROL= on another local directory"),
    Setup("index-only", "local", "index-only",
          "mail on a local directory, INDEX=/CONTROL= on an index-only mailfs mount"),
    Setup("index-only-no-adopt", "local", "index-only",
          "as index-only, without connection adoption and so without the lock mirror",
          ("adopt_connection=false",)),
    Setup("index-only-sync2", "local", "index-only-sync2",
          "as index-only, the mount replicating to a second node with sync durability"),
    Setup("sshfs", "sshfs", "with-mail", "Dovecot directly on sshfs"),
    Setup("sshfs+local-index", "sshfs", "local",
          "mail on sshfs, INDEX=/CONTROL= on a local directory (no replication)"),
    Setup("sshfs+index-only", "sshfs", "index-only",
          "mail on sshfs, INDEX=/CONTROL= on an index-only mailfs mount"),
    Setup("full-sshfs", "full-sshfs", "with-mail",
          "the whole mail_location on a mailfs full overlay over sshfs"),
)}
LAYOUTS = {
    "full": ("local", "full"),
    "index-only": ("local-index", "index-only"),
    "all": ("local-index", "index-only", "index-only-sync2", "sshfs", "sshfs+local-index",
            "sshfs+index-only", "local", "full", "full-sshfs"),
    # Issue 9's comparison: the full overlay over a network filesystem.
    "network": ("sshfs", "sshfs+local-index", "sshfs+index-only", "full-sshfs"),
}
RESULT_STEMS = {"full": "imap_load", "index-only": "imap_index_only", "all": "imap_layouts",
                "network": "imap_network"}


@dataclass(frozen=True)
class Comparison:
    setup: str
    against: str
    targets: dict[str, float]  # format ("*": any) -> the ratio the project asks for

    def target(self, fmt: str) -> float | None:
        return self.targets.get(fmt, self.targets.get("*"))


# What each setup is measured against, and the targets of issues 8 and 9.
COMPARISONS = (
    Comparison("full", "local", {"*": 0.4}),
    Comparison("index-only", "local-index", {"maildir": 0.65, "sdbox": 0.75}),
    Comparison("index-only-sync2", "local-index", {}),
    # What surviving a daemon crash costs: the lock mirror's writes (fs/lockmirror.py).
    Comparison("index-only", "index-only-no-adopt", {}),
    Comparison("sshfs+index-only", "sshfs+local-index", {"*": 0.8}),
    Comparison("sshfs+index-only", "sshfs", {"*": 2.0}),
    Comparison("sshfs+local-index", "sshfs", {}),
    Comparison("full-sshfs", "sshfs", {"*": 2.0}),
    Comparison("full-sshfs", "sshfs+local-index", {}),
    Comparison("full-sshfs", "sshfs+index-only", {}),
)


@dataclass
class Side:
    """One Dovecot in one setup, with whatever mounts the setup needs."""

    setup: Setup
    fmt: str
    root: Path
    users: dict[str, str]
    mount_args: list[str] = field(default_factory=list)
    network: SshfsMount | None = None  # the format's sshfs, for setups that use it
    dovecot: Dovecot | None = None
    mount: MailfsMount | None = None  # the mount Dovecot uses (node a of a cluster)
    cluster: Cluster | None = None
    problems_seen: int = 0
    broken: str | None = None

    @property
    def peer(self) -> MailfsMount | None:
        return self.cluster[1].mount if self.cluster is not None else None

    def _mail_root(self) -> Path:
        if self.setup.on_sshfs:
            assert self.network is not None, f"{self.setup.name} needs the sshfs"
            base = self.network.mountpoint / self.root.name
        else:
            base = self.root
        if self.setup.mail in ("local", "sshfs"):
            return prepare_mail_root(base / "mail")
        backing = prepare_mail_root(base / "backing")
        mountpoint = prepare_mail_root(self.root / "mnt")
        self.mount = MailfsMount(backing, mountpoint, self.root / "state",
                                 self.setup.mount_args(self.mount_args),
                                 log_path=self.root / "mailfs.log").start()
        return mountpoint

    def _index_root(self) -> Path | None:
        index = self.setup.index
        if index == "with-mail":
            return None
        if index == "local":
            return prepare_mail_root(self.root / "index")
        if index == "index-only":
            mountpoint = prepare_mail_root(self.root / "mnt")  # the root shows its owner
            self.mount = MailfsMount(None, mountpoint, self.root / "state",
                                     self.setup.mount_args(self.mount_args),
                                     log_path=self.root / "mailfs.log").start()
            return mountpoint
        (self.root / "cluster").mkdir()
        cluster = Cluster(2, {"durability": "sync"}, base=self.root / "cluster",
                          index_only=True)
        self.cluster = cluster
        for node in cluster.nodes:
            prepare_mail_root(node.mountpoint)
        cluster.start()
        cluster.wait_connected()
        self.mount = cluster[0].mount
        return cluster[0].mountpoint

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        mail_root = self._mail_root()
        index_root = self._index_root()
        self.dovecot = Dovecot(self.root / "dovecot", mail_root, self.fmt, self.users,
                               index_root=index_root)
        self.dovecot.start()

    def stop(self) -> list[str]:
        """Stop Dovecot, then unmount; returns what went wrong, if anything."""
        trouble: list[str] = []
        if self.dovecot is not None:
            try:
                self.dovecot.stop()
            except Exception as exc:
                trouble.append(f"{self.label}: dovecot stop: {exc}")
            finally:
                self.dovecot.kill()
        if self.cluster is not None:
            try:
                self.cluster.close()
            except Exception as exc:
                trouble.append(f"{self.label}: cluster close: {exc}")
        elif self.mount is not None:
            try:
                self.mount.stop()
            except Exception as exc:
                trouble.append(f"{self.label}: mailfs umount: {exc}")
            finally:
                self.mount.kill()
        return trouble

    @property
    def label(self) -> str:
        return f"{self.fmt}/{self.setup.name}"

    @property
    def dovecot_pid(self) -> int | None:
        process = self.dovecot.process if self.dovecot else None
        return process.pid if process else None

    @staticmethod
    def _pid(mount: MailfsMount | None) -> int | None:
        process = mount.process if mount else None
        return process.pid if process else None

    @property
    def mailfs_pid(self) -> int | None:
        return self._pid(self.mount)

    @property
    def peer_pid(self) -> int | None:
        return self._pid(self.peer)

    def health(self) -> str | None:
        """Why this side can no longer be measured, or None."""
        for mount in (self.mount, self.peer):
            if mount is None:
                continue
            process = mount.process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                return f"mailfs daemon at {mount.mountpoint} exited (code {code})"
            if not is_mounted(mount.mountpoint):
                return f"mailfs mount {mount.mountpoint} disappeared"
        if self.dovecot is not None and (
            self.dovecot.process is None or self.dovecot.process.poll() is not None
        ):
            killed = [line for line in self.dovecot.log_lines() if "Killed with signal" in line]
            return "dovecot master exited" + (f" ({killed[-1]})" if killed else "")
        return None

    def new_problems(self, dovecot_mark: int) -> list[str]:
        lines: list[str] = []
        if self.dovecot is not None:
            lines += [f"dovecot: {line}" for line in self.dovecot.log_problems(dovecot_mark)]
        if self.cluster is not None:
            found = self.cluster.problems()
        else:
            found = self.mount.problems() if self.mount is not None else []
        lines += [f"mailfs: {line}" for line in found[self.problems_seen :]]
        self.problems_seen = len(found)
        return lines

    def mailfs_log_tail(self, lines: int = 40) -> list[str]:
        return self.mount.log().splitlines()[-lines:] if self.mount else []


@dataclass
class Round:
    fmt: str
    round: int
    position: int
    setup: str
    ops_per_s: float
    total_ops: int
    errors: int
    verified: int
    elapsed: float
    dovecot_cpu: float
    mailfs_cpu: float | None  # the daemon Dovecot uses
    peer_cpu: float | None  # the second node's daemon, in a cluster setup
    client_cpu: float
    machine_busy: float  # fraction of all CPUs busy during the timed window
    machine_other: float  # fraction of all CPUs used by processes outside this benchmark
    per_op: dict[str, dict[str, float]]
    fatal: list[str]
    error_samples: list[str]
    mailfs_counters: dict[str, float] | None = None  # daemon counters per IMAP operation

    @property
    def mailfs_core(self) -> float | None:
        """The daemon's CPU as a share of one core; near 1.0 it is the bottleneck."""
        if self.mailfs_cpu is None or not self.elapsed:
            return None
        return self.mailfs_cpu / self.elapsed

    @property
    def failed(self) -> bool:
        """A client gave up: the figure says nothing about speed, so medians skip it."""
        return bool(self.fatal) or self.total_ops == 0

    def per_op_ms(self, cpu: float | None) -> float | None:
        return None if cpu is None or not self.total_ops else 1000.0 * cpu / self.total_ops


def measure(side: Side, config: LoadConfig, round_no: int, position: int) -> tuple[Round, int]:
    assert side.dovecot is not None
    os.sync()  # dirty pages of the last run must not be written back during this one
    mark = side.dovecot.log_offset()
    sample: dict[str, float] = {}
    counters: list[dict[str, float] | None] = []
    pids = {"dovecot": side.dovecot_pid, "mailfs": side.mailfs_pid, "peer": side.peer_pid}

    def on_start() -> None:
        if side.mount is not None:
            counters.append(mailfs_counters(side.mount.mountpoint))
        for name, pid in pids.items():
            sample[name] = tree_cpu(pid)
        sample["busy"], sample["total"] = system_cpu()

    def on_end() -> None:
        busy, total = system_cpu()
        sample["busy_s"] = (busy - sample.get("busy", busy)) / TICK
        sample["total_s"] = max(1.0, total - sample["total"]) / TICK
        sample["busy"] = sample["busy_s"] / sample["total_s"]
        if side.mount is not None:
            counters.append(mailfs_counters(side.mount.mountpoint))
        pid = side.dovecot_pid
        deadline = time.monotonic() + 5
        while pid and live_children_named(pid, "imap") and time.monotonic() < deadline:
            time.sleep(0.05)  # let the master reap the imap processes, to count their CPU
        for name, pid in pids.items():
            sample[name] = tree_cpu(pid) - sample.get(name, 0.0)

    result: LoadResult = run_load(config, on_start=on_start, on_end=on_end)
    per_op = {
        name: {"count": stat.count, "errors": stat.errors, "seconds": stat.seconds}
        for name, stat in result.per_op().items()
    }
    elapsed = max((c.elapsed for c in result.clients), default=0.0)
    ours = sum(sample.get(name, 0.0) for name in pids) + result.client_cpu_seconds
    per_op_counters: dict[str, float] | None = None
    before, after = [*counters, None, None][:2]
    if before and after and result.total_ops:
        per_op_counters = {
            key: (after[key] - before[key]) / result.total_ops for key in after if key in before
        }
    figures = Round(
        fmt=side.fmt, round=round_no, position=position, setup=side.setup.name,
        ops_per_s=result.ops_per_s, total_ops=result.total_ops, errors=result.total_errors,
        verified=result.verified,
        elapsed=elapsed, dovecot_cpu=sample.get("dovecot", 0.0),
        mailfs_cpu=sample.get("mailfs") if side.mount else None,
        peer_cpu=sample.get("peer") if side.peer else None,
        client_cpu=result.client_cpu_seconds, machine_busy=sample.get("busy", 0.0),
        machine_other=max(0.0, sample.get("busy_s", 0.0) - ours) / sample.get("total_s", 1.0),
        per_op=per_op, fatal=result.fatal, error_samples=result.error_samples(),
        mailfs_counters=per_op_counters,
    )
    return figures, mark


def mailfs_counters(mountpoint: Path) -> dict[str, float] | None:
    """The daemon's own counters, asked over its control socket (in-process: a few ms)."""
    try:
        control = importlib.import_module("mailfs.control")
        cli = importlib.import_module("mailfs.cli")
        config = importlib.import_module("mailfs.config")
        path = config.control_socket_for(cli.DEFAULT_RUN_DIR, mountpoint)
        status = control.call(path, "status", timeout=5.0)
    except Exception:
        return None
    if not isinstance(status, dict):
        return None
    counters = {
        key: float(status[key]) for key in MAILFS_COUNTERS
        if isinstance(status.get(key), int | float)
    }
    requests = status.get("requests")
    if isinstance(requests, dict):
        counters |= {f"req_{name}": float(count) for name, count in requests.items()
                     if name in REQUEST_KINDS}
    return counters


def load_config(
    args: argparse.Namespace, port: int, users: list[str], duration: float
) -> LoadConfig:
    return LoadConfig(
        port=port, users=users, password=PASSWORD, clients=args.clients, duration=duration,
        populate=args.populate, seed=args.seed, mix=dict(DEFAULT_MIX),
    )


def round_users(tag: str, clients: int, per_user: int) -> list[str]:
    """Fresh users for one round, each shared by `per_user` clients (the last by fewer)."""
    return [f"{tag}c{i}" for i in range(-(-clients // max(1, per_user)))]


# -- the run --------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    root: Path
    rounds: list[Round] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # What went wrong in setups without mailfs (e.g. Dovecot's own dotlock races on sshfs):
    # reported, but they say nothing about mailfs and do not fail the run.
    baseline_problems: list[str] = field(default_factory=list)
    status: dict[str, dict[str, object]] = field(default_factory=dict)
    started: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def setups(self) -> list[Setup]:
        return [SETUPS[name] for name in self.args.setup_list]

    def log(self, text: str) -> None:
        print(text, flush=True)

    def problem(self, text: str, side: Side | None = None) -> None:
        if side is not None and not side.setup.on_mailfs:
            self.baseline_problems.append(text)
            print(f"BASELINE PROBLEM {text}", flush=True)
            return
        self.problems.append(text)
        print(f"PROBLEM {text}", flush=True)

    def run_format(self, fmt: str) -> None:
        with contextlib.ExitStack() as network_scope:
            network = None
            if any(setup.on_sshfs for setup in self.setups):
                # One sshfs per format, shared by its sshfs setups; as the mail user, who then
                # owns what Dovecot creates on it, as on a real sshfs.
                network = network_scope.enter_context(sshfs_backing(
                    self.root / fmt / "network", latency_ms=self.args.sshfs_latency_ms,
                    user=MAIL_USER))
            self._run_sides(fmt, network)

    def _run_sides(self, fmt: str, network: SshfsMount | None) -> None:
        args = self.args
        users = {
            user: PASSWORD
            for tag in ["w", *(f"r{r}" for r in range(args.rounds))]
            for user in round_users(tag, args.clients, args.clients_per_user)
        }
        sides = [Side(setup, fmt, self.root / fmt / setup.name, users, list(args.mailfs_arg),
                      network=network)
                 for setup in self.setups]
        live: list[Side] = []
        try:
            for side in sides:
                live.append(side)  # so that stop() clears whatever did start
                try:
                    side.start()
                except Exception as exc:
                    self.problem(f"{side.label}: could not start: {exc}")
                    side.broken = "did not start"
            usable = [side for side in live if side.broken is None]
            if args.warmup > 0:
                for side in usable:
                    assert side.dovecot is not None
                    self.log(f"{side.label}: warm-up {args.warmup:.0f} s")
                    config = load_config(
                        args, side.dovecot.port,
                        round_users("w", args.clients, args.clients_per_user), args.warmup
                    )
                    self.run_one(side, config, -1, 0)
            for round_no in range(args.rounds):
                order = usable if round_no % 2 == 0 else usable[::-1]
                for position, side in enumerate(order):
                    if side.broken is not None:
                        continue
                    assert side.dovecot is not None
                    config = load_config(
                        args, side.dovecot.port,
                        round_users(f"r{round_no}", args.clients, args.clients_per_user),
                        args.duration,
                    )
                    figures = self.run_one(side, config, round_no, position)
                    if figures is not None:
                        self.rounds.append(figures)
            for side in usable:
                if side.mount is not None and side.broken is None:
                    self.status.setdefault(fmt, {})[side.setup.name] = \
                        mailfs_status(side.mount.mountpoint)
        finally:
            for side in live:
                for trouble in side.stop():
                    self.problem(trouble)

    def run_one(self, side: Side, config: LoadConfig, round_no: int, position: int) -> Round | None:
        name = "warm-up" if round_no < 0 else f"round {round_no + 1}"
        try:
            figures, mark = measure(side, config, round_no, position)
        except Exception as exc:
            self.problem(f"{side.label} {name}: harness error: {exc!r}")
            side.broken = "harness error"
            return None
        mailfs_ms = figures.per_op_ms(figures.mailfs_cpu)
        self.log(
            f"{side.label:<26} {name:<8} {figures.ops_per_s:9.1f} ops/s  "
            f"{figures.total_ops:6d} ops  {figures.errors} errors  "
            f"dovecot {figures.per_op_ms(figures.dovecot_cpu) or 0:.2f} ms/op"
            + (f"  mailfs {mailfs_ms:.2f} ms/op" if mailfs_ms is not None else "")
        )
        trouble = side.new_problems(mark)
        if figures.errors or figures.fatal or trouble:
            self.problem(
                f"{side.label} {name}: {figures.errors} IMAP errors, "
                f"{len(figures.fatal)} clients gave up", side
            )
            shown = [*figures.fatal, *figures.error_samples[:10], *trouble[:MAX_LOG_LINES]]
            if len(trouble) > MAX_LOG_LINES:
                shown.append(f"... and {len(trouble) - MAX_LOG_LINES} more log lines")
            for line in shown:
                self.problem(f"  {line}", side)
        why = side.health()
        if why is not None:
            side.broken = why
            self.problem(f"{side.label} after {name}: {why}", side)
            for line in side.mailfs_log_tail():
                self.problem(f"  mailfs log: {line}", side)
        return figures if round_no >= 0 else None


def mailfs_status(mountpoint: Path) -> dict[str, object]:
    try:
        result = run_cli("status", str(mountpoint), "--json", timeout=15)
    except Exception as exc:
        return {"unavailable": repr(exc)}
    if result.returncode != 0:
        return {"unavailable": (result.stderr or result.stdout).strip()[:500]}
    try:
        found = json.loads(result.stdout)
    except ValueError:
        return {"raw": result.stdout[:2000]}
    return found if isinstance(found, dict) else {"raw": found}


# -- machine description and summaries ---------------------------------------------------------


def command_output(*cmd: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return "?"
    if done.returncode != 0:
        return "?"
    return (done.stdout or done.stderr).strip()


def machine_info(root: Path) -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    debian = Path("/etc/debian_version")
    fs = command_output("df", "--output=source,fstype", str(root)).splitlines()[-1].split()
    dirty = command_output("git", "status", "--porcelain", "--", "src")
    commit = command_output("git", "rev-parse", "--short", "HEAD")
    commit = "(no commit yet)" if commit == "?" else commit
    return {
        "nproc": str(os.cpu_count()),
        "cpus usable": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "memory": f"{mem_gib:.1f} GiB",
        "kernel": platform.release(),
        "os": f"Debian {debian.read_text().strip()}" if debian.exists() else platform.platform(),
        "python": platform.python_version(),
        "dovecot": command_output("dovecot", "--version"),
        "loadavg at start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "work dir": f"{root} ({' on '.join(reversed(fs)) if len(fs) == 2 else '?'})",
        "mailfs commit": commit + (" + uncommitted changes in src/" if dirty not in ("", "?")
                                   else ""),
    }


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def median_ms(rounds: Sequence[Round], attr: str) -> float | None:
    """Median over rounds of a CPU counter (seconds) per IMAP operation, in ms."""
    values = [v for r in rounds if (v := r.per_op_ms(getattr(r, attr))) is not None]
    return median(values)


def median_counter(rounds: Sequence[Round], key: str) -> float | None:
    return median([r.mailfs_counters[key] for r in rounds
                   if r.mailfs_counters and key in r.mailfs_counters])


@dataclass
class SetupSummary:
    fmt: str
    setup: str
    ops_per_s: float | None  # median over rounds that did not fail
    rounds: list[float]
    failed: int  # rounds left out of the median
    disturbed: int  # rounds where other processes used much of the machine
    dovecot_ms_per_op: float | None
    mailfs_ms_per_op: float | None
    peer_ms_per_op: float | None
    requests_per_op: float | None


@dataclass
class ComparisonSummary:
    fmt: str
    setup: str
    against: str
    ratio: float | None  # median(setup) / median(against)
    paired: list[float]  # setup / against in each round where both ran
    best_ratio: float | None  # best round / best round: noise only ever slows a round down
    target: float | None

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio >= self.target


def good_rounds(rounds: Sequence[Round], fmt: str, setup: str) -> list[Round]:
    return [r for r in rounds if r.fmt == fmt and r.setup == setup and not r.failed]


def summarize(rounds: list[Round], formats: Sequence[str], setups: Sequence[Setup]
              ) -> list[SetupSummary]:
    summaries: list[SetupSummary] = []
    for fmt in formats:
        for setup in setups:
            mine = [r for r in rounds if r.fmt == fmt and r.setup == setup.name]
            good = [r for r in mine if not r.failed]
            summaries.append(SetupSummary(
                fmt=fmt, setup=setup.name, ops_per_s=median([r.ops_per_s for r in good]),
                rounds=[r.ops_per_s for r in good], failed=len(mine) - len(good),
                disturbed=sum(1 for r in mine if r.machine_other > DISTURBED),
                dovecot_ms_per_op=median_ms(good, "dovecot_cpu"),
                mailfs_ms_per_op=median_ms(good, "mailfs_cpu"),
                peer_ms_per_op=median_ms(good, "peer_cpu"),
                requests_per_op=median_counter(good, "requests_total"),
            ))
    return summaries


def compare(rounds: list[Round], formats: Sequence[str], setups: Sequence[Setup]
            ) -> list[ComparisonSummary]:
    names = {setup.name for setup in setups}
    found: list[ComparisonSummary] = []
    for fmt in formats:
        for comparison in COMPARISONS:
            if not {comparison.setup, comparison.against} <= names:
                continue
            mine = good_rounds(rounds, fmt, comparison.setup)
            theirs = good_rounds(rounds, fmt, comparison.against)
            mine_median = median([r.ops_per_s for r in mine])
            theirs_median = median([r.ops_per_s for r in theirs])
            theirs_by_round = {r.round: r.ops_per_s for r in theirs}
            found.append(ComparisonSummary(
                fmt=fmt, setup=comparison.setup, against=comparison.against,
                ratio=(mine_median / theirs_median
                       if mine_median is not None and theirs_median else None),
                paired=[r.ops_per_s / theirs_by_round[r.round] for r in mine
                        if theirs_by_round.get(r.round)],
                best_ratio=(max(r.ops_per_s for r in mine) / max(r.ops_per_s for r in theirs)
                            if mine and theirs else None),
                target=comparison.target(fmt),
            ))
    return found


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)]


def fmt_num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def with_failed(value: float | None, failed: int) -> str:
    return fmt_num(value) + (f" ({failed} FAILED)" if failed else "")


def render_report(run: Run, info: dict[str, str], formats: Sequence[str]) -> str:
    args = run.args
    lines = [
        "mailfs IMAP load benchmark: Dovecot in several storage setups, side by side",
        f"date: {run.started:%Y-%m-%d %H:%M:%S} UTC",
        "",
        "machine:",
        *(f"  {key}: {value}" for key, value in info.items()),
        "",
        "config:",
        f"  formats: {', '.join(formats)}",
        "  setups:",
        *(f"    {setup.name}: {setup.description}" for setup in run.setups),
        *([f"  sshfs: from sshd in a network namespace, {args.sshfs_latency_ms:g} ms round "
           "trip added by a delaying TCP proxy (tests/rigs/latency.py)"]
          if any(setup.on_sshfs for setup in run.setups) else []),
        "  every local directory, backing directory and mailfs state dir on the same disk",
        f"  {args.clients} client processes, {args.clients_per_user} per user "
        "(fresh users every round), "
        f"{args.populate} messages pre-filled per user",
        f"  {args.rounds} rounds x {args.duration:g} s per setup, order alternating "
        f"(forward / backward), warm-up {args.warmup:g} s",
        f"  mailfs extra args: {' '.join(args.mailfs_arg) or '(none)'}",
        "  mix (weights): " + ", ".join(f"{k}={v}" for k, v in DEFAULT_MIX.items()),
        "",
        "per round (cpu columns: CPU ms per IMAP operation, mailfs = the daemon Dovecot uses,",
        "peer = the second node's daemon; mailfs core: the daemon's CPU as a share of one core;",
        "busy: share of all CPUs used; verified: whole-body FETCHes that matched the appended",
        "bytes; other: share of all CPUs used by processes outside this benchmark (the sshfs",
        f"and sshd of the sshfs setups count as outside), '!' above {100 * DISTURBED:.0f} %):",
    ]
    rows = [
        [
            r.fmt, str(r.round + 1), str(r.position + 1), r.setup,
            "FAILED" if r.failed else fmt_num(r.ops_per_s),
            str(r.total_ops), str(r.errors), str(r.verified),
            fmt_num(r.per_op_ms(r.dovecot_cpu), 3),
            fmt_num(r.per_op_ms(r.mailfs_cpu), 3),
            fmt_num(r.per_op_ms(r.peer_cpu), 3),
            "-" if r.mailfs_core is None else f"{100 * r.mailfs_core:.0f}%",
            fmt_num(r.per_op_ms(r.client_cpu), 3),
            f"{100 * r.machine_busy:.0f}%",
            f"{100 * r.machine_other:.0f}%" + (" !" if r.machine_other > DISTURBED else ""),
        ]
        for r in run.rounds
    ]
    lines += table(
        ["format", "round", "order", "setup", "ops/s", "ops", "errors", "verified",
         "dovecot cpu", "mailfs cpu", "peer cpu", "mailfs core", "client cpu", "busy", "other"],
        rows,
    )
    lines += ["", "per setup (medians over rounds that did not fail):"]
    lines += table(
        ["format", "setup", "ops/s", "rounds", "disturbed", "mailfs requests/op",
         "mailfs cpu ms/op", "peer cpu ms/op", "dovecot cpu ms/op"],
        [
            [s.fmt, s.setup, with_failed(s.ops_per_s, s.failed),
             " ".join(f"{v:.0f}" for v in s.rounds) or "-", str(s.disturbed),
             fmt_num(s.requests_per_op, 2), fmt_num(s.mailfs_ms_per_op, 3),
             fmt_num(s.peer_ms_per_op, 3), fmt_num(s.dovecot_ms_per_op, 3)]
            for s in summarize(run.rounds, formats, run.setups)
        ],
    )
    comparisons = compare(run.rounds, formats, run.setups)
    if comparisons:
        lines += ["", "ratios (median / median; per round: same round; best-of: best round / "
                  "best round; target: what the project asks for):"]
        lines += table(
            ["format", "setup / against", "ratio", "per-round ratios", "best-of", "target",
             "met"],
            [
                [c.fmt, f"{c.setup} / {c.against}", fmt_num(c.ratio, 3),
                 " ".join(f"{p:.3f}" for p in c.paired) or "-", fmt_num(c.best_ratio, 3),
                 "-" if c.target is None else f">= {c.target:g}",
                 {None: "-", True: "yes", False: "NO"}[c.met]]
                for c in comparisons
            ],
        )
    counter_rows = []
    for fmt in formats:
        for setup in run.setups:
            measured = [r.mailfs_counters for r in good_rounds(run.rounds, fmt, setup.name)
                        if r.mailfs_counters]
            if measured:
                counter_rows.append([fmt, setup.name] + [
                    fmt_num(median([m[key] for m in measured if key in m] or [0.0]), 2)
                    for key in COUNTER_COLUMNS
                ])
    if counter_rows:
        lines += ["", "mailfs daemon counters per IMAP operation (mailfs status, round median):"]
        lines += table(["format", "setup", *COUNTER_COLUMNS], counter_rows)
    for fmt in formats:
        lines += latency_table(run, fmt)
    lines += ["", "problems:" if run.problems else "problems: none"]
    lines += [f"  {p}" for p in run.problems]
    if run.baseline_problems:
        lines += ["", "problems in setups without mailfs (Dovecot's own, not counted):"]
        lines += [f"  {p}" for p in run.baseline_problems]
    return "\n".join(lines) + "\n"


def latency_table(run: Run, fmt: str) -> list[str]:
    merged: dict[str, dict[str, list[float]]] = {}  # setup -> operation -> [count, seconds]
    for r in run.rounds:
        if r.fmt != fmt:
            continue
        for name, stat in r.per_op.items():
            into = merged.setdefault(r.setup, {}).setdefault(name, [0.0, 0.0])
            into[0] += stat["count"]
            into[1] += stat["seconds"]
    names = sorted({name for ops in merged.values() for name in ops})
    setups = [setup.name for setup in run.setups if setup.name in merged]
    if not names:
        return []

    def mean(setup: str, name: str) -> float | None:
        count, seconds = merged[setup].get(name, (0.0, 0.0))
        return 1000 * seconds / count if count else None

    return ["", f"{fmt}: mean latency per operation, ms (all rounds):", *table(
        ["operation", *setups],
        [[name, *(fmt_num(mean(setup, name), 2) for setup in setups)] for name in names],
    )]


def render_chart(run: Run, formats: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = run.setups
    summaries = {(s.fmt, s.setup): s for s in summarize(run.rounds, formats, setups)}
    comparisons = compare(run.rounds, formats, setups)
    fig, (bars, ratios) = plt.subplots(
        1, 2, figsize=(max(9.0, 1.1 * len(setups) * len(formats) + 5), 5.0),
        gridspec_kw={"width_ratios": [3, 2]},
    )
    colors = plt.get_cmap("tab10")
    width = 0.8 / len(setups)
    tallest = 0.0
    for s_index, setup in enumerate(setups):
        xs = [f_index + (s_index - (len(setups) - 1) / 2) * width
              for f_index in range(len(formats))]
        heights = [summaries[(fmt, setup.name)].ops_per_s or 0.0 for fmt in formats]
        tallest = max([tallest, *heights])
        bars.bar(xs, heights, width * 0.92, label=setup.name, color=colors(s_index % 10))
        for x, fmt in zip(xs, formats, strict=True):
            points = summaries[(fmt, setup.name)].rounds
            tallest = max([tallest, *points])
            bars.scatter([x] * len(points), points, s=10, color="black", zorder=3)
            if summaries[(fmt, setup.name)].failed:
                bars.annotate("FAILED", (x, 0), xytext=(0, 4), textcoords="offset points",
                              ha="center", fontsize=7, color="red", rotation=90)
    bars.set_xticks(range(len(formats)), formats)
    bars.set_ylabel("IMAP operations per second (median; dots: rounds)")
    bars.set_ylim(0, tallest * 1.15 or 1)
    bars.legend(fontsize=7, loc="upper right")
    bars.grid(axis="y", alpha=0.3)
    bars.set_title(
        f"Dovecot IMAP load, {run.args.clients} clients ({run.args.clients_per_user} per user), "
        f"{run.args.rounds} x {run.args.duration:g} s\n{run.started:%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPUs, kernel {platform.release()}",
        fontsize=9,
    )
    labels = [f"{c.fmt}: {c.setup} / {c.against}" for c in comparisons]
    values = [c.ratio or 0.0 for c in comparisons]
    ys = list(range(len(comparisons)))
    ratios.barh(ys, values, color=["#2ca02c" if c.met else "#d62728" if c.met is False
                                   else "#7f7f7f" for c in comparisons])
    for y, c in zip(ys, comparisons, strict=True):
        if c.target is not None:
            ratios.plot([c.target, c.target], [y - 0.4, y + 0.4], color="black", linewidth=2)
        ratios.annotate(fmt_num(c.ratio, 2), (c.ratio or 0.0, y), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=8)
    ratios.set_yticks(ys, labels, fontsize=7)
    ratios.invert_yaxis()
    ratios.set_xlabel("ratio of medians (black bar: target; green: met, red: missed)")
    ratios.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- entry point ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run_all", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--clients-per-user", type=int, default=2,
                        help="clients sharing one user's mailboxes (1: each its own user)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first")
    parser.add_argument("--populate", type=int, default=60, help="messages per user up front")
    parser.add_argument("--formats", default="maildir,sdbox")
    parser.add_argument("--mdbox", action="store_true", help="add mdbox to the formats")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="full",
                        help="which setups to run: " + "; ".join(
                            f"{name}: {', '.join(names)}" for name, names in LAYOUTS.items()))
    parser.add_argument("--setups", help="comma-separated setups instead of a layout's: "
                        + ", ".join(SETUPS))
    parser.add_argument("--sshfs-latency-ms", type=float, default=1.0,
                        help="round trip added to the sshfs of the sshfs setups")
    parser.add_argument("--mailfs-arg", action="append", default=[],
                        help="extra argument for `mailfs mount` of single mounts (repeat; "
                             "use --mailfs-arg=--x)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the mail, backing dirs and mounts live (one disk for all)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the work dir afterwards")
    parser.add_argument("--replication", action="store_true",
                        help="also run the replication benchmark (bench/replication.py) after")
    parser.add_argument("--replication-only", action="store_true",
                        help="run only the replication benchmark")
    parser.add_argument("--replication-arg", action="append", default=[],
                        help="extra argument for bench.replication (repeat; "
                             "use --replication-arg=--quick)")
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if args.mdbox and "mdbox" not in formats:
        formats.append("mdbox")
    args.format_list = formats
    if args.setups:
        args.setup_list = [name.strip() for name in args.setups.split(",") if name.strip()]
        unknown = [name for name in args.setup_list if name not in SETUPS]
        if unknown:
            parser.error(f"unknown setups {', '.join(unknown)}; known: {', '.join(SETUPS)}")
        args.result_stem = "imap_" + "_".join(args.setup_list).replace("-", "_").replace(
            "+", "_")
    else:
        args.setup_list = list(LAYOUTS[args.layout])
        args.result_stem = RESULT_STEMS[args.layout]
    if os.geteuid() != 0:
        parser.error("must run as root (Dovecot drops to the vmail user, mailfs mounts FUSE)")
    return args


@contextlib.contextmanager
def work_dir(parent: Path, keep: bool) -> Iterator[tuple[Path, list[bool]]]:
    root = Path(tempfile.mkdtemp(prefix="mailfs-bench-", dir=parent))
    root.chmod(0o755)
    keep_flag = [keep]
    try:
        yield root, keep_flag
    finally:
        if keep_flag[0]:
            print(f"work dir kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def run_replication(args: argparse.Namespace) -> int:
    """bench/replication.py with this run's work dir, results dir and --keep."""
    from bench import replication  # imports this module: not at the top

    forwarded = ["--workdir", str(args.workdir), "--results", str(args.results),
                 "--seed", str(args.seed), *(["--keep"] if args.keep else []),
                 *args.replication_arg]
    return replication.main(forwarded)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replication_only:
        return run_replication(args)
    formats: list[str] = args.format_list
    # The daemon runs as `python -m mailfs`; let it import from this checkout.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])
    )
    with work_dir(args.workdir, args.keep) as (root, keep):
        info = machine_info(root)
        run = Run(args, root)
        for fmt in formats:
            try:
                run.run_format(fmt)
            except Exception as exc:  # e.g. the sshfs rig could not start: say so, go on
                run.problem(f"{fmt}: {exc!r}")
        if run.problems:
            keep[0] = True  # the logs in it are the evidence
        args.results.mkdir(parents=True, exist_ok=True)
        report = render_report(run, info, formats)
        stem = args.result_stem
        (args.results / f"{stem}.txt").write_text(report)
        render_chart(run, formats, args.results / f"{stem}.png")
        dump = {
            "machine": info,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rounds": [asdict(r) for r in run.rounds],
            "setups": [asdict(s) for s in summarize(run.rounds, formats, run.setups)],
            "ratios": [asdict(c) for c in compare(run.rounds, formats, run.setups)],
            "mailfs_status": run.status,
            "problems": run.problems,
            "baseline_problems": run.baseline_problems,
        }
        (args.results / f"{stem}.json").write_text(json.dumps(dump, indent=1) + "\n")
        print()
        print(report)
        print(f"wrote {args.results / stem}.txt, .png, .json")
    code = 1 if run.problems else 0
    if args.replication:
        code = max(code, run_replication(args))
    return code


if __name__ == "__main__":
    sys.exit(main())
