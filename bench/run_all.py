"""Dovecot on a local directory against Dovecot on a mailfs mount, under the same IMAP load.

For each mail format, one Dovecot serves a plain directory and another serves a mailfs mount
whose backing directory sits on the same disk. Rounds alternate which backend goes first
(A,B then B,A ...) so that slow drifts of a shared, noisy machine hit both alike; every round
uses fresh users, so each starts from the same mailbox state. The headline is the median
of mailfs's rounds divided by the median of local's rounds.

    python -m bench.run_all                       # maildir and sdbox, 3 rounds of 20 s
    python -m bench.run_all --only local --duration 5 --rounds 1   # check the harness
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
from tests.rigs.dovecot import Dovecot, prepare_mail_root  # noqa: E402
from tests.rigs.mount import MailfsMount, is_mounted, run_cli  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PASSWORD = "bench-secret"
BACKENDS = ("local", "mailfs")
TICK = float(os.sysconf("SC_CLK_TCK"))
DISTURBED = 0.15  # foreign CPU share above which a round is flagged as disturbed
MAX_LOG_LINES = 8  # Dovecot/mailfs problem lines quoted per round
# Counters from `mailfs status` worth dividing by the number of IMAP operations.
MAILFS_COUNTERS = (
    "backing_calls", "backing_errors", "backing_timeouts", "ram_hits", "ram_misses", "commits",
    "commit_errors", "evictions", "requests_total",
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


# -- the two sides --------------------------------------------------------------------------


@dataclass
class Side:
    """One Dovecot, on a local directory or on a mailfs mount."""

    backend: str
    fmt: str
    root: Path
    users: dict[str, str]
    mount_args: list[str] = field(default_factory=list)
    layout: str = "full"  # or "index-only": mail local, INDEX/CONTROL on the mount
    dovecot: Dovecot | None = None
    mount: MailfsMount | None = None
    problems_seen: int = 0
    broken: str | None = None

    @property
    def mountpoint(self) -> Path:
        """The mailfs mount (or, for the local side, where it would be)."""
        if self.layout == "index-only":
            return self.root / ("mnt" if self.backend == "mailfs" else "index")
        return self.root / ("mnt" if self.backend == "mailfs" else "mail")

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        if self.layout == "index-only":
            # Mail on a plain directory; INDEX= and CONTROL= on an index-only mount (or, for
            # the local side, on a plain directory: Dovecot's own `:INDEX=` layout).
            mail_root = prepare_mail_root(self.root / "mail")
            index_root = prepare_mail_root(self.mountpoint)  # vmail's: the mount shows it
            if self.backend == "mailfs":
                self.mount = MailfsMount(None, index_root, self.root / "state",
                                         self.mount_args,
                                         log_path=self.root / "mailfs.log").start()
            self.dovecot = Dovecot(self.root / "dovecot", mail_root, self.fmt, self.users,
                                   index_root=index_root)
            self.dovecot.start()
            return
        if self.backend == "mailfs":
            backing = prepare_mail_root(self.root / "backing")
            self.mount = MailfsMount(
                backing, self.mountpoint, self.root / "state", self.mount_args,
                log_path=self.root / "mailfs.log",
            ).start()
        prepare_mail_root(self.mountpoint)
        self.dovecot = Dovecot(self.root / "dovecot", self.mountpoint, self.fmt, self.users)
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
        if self.mount is not None:
            try:
                self.mount.stop()
            except Exception as exc:
                trouble.append(f"{self.label}: mailfs umount: {exc}")
            finally:
                self.mount.kill()
        return trouble

    @property
    def label(self) -> str:
        return f"{self.fmt}/{self.backend}"

    @property
    def dovecot_pid(self) -> int | None:
        process = self.dovecot.process if self.dovecot else None
        return process.pid if process else None

    @property
    def mailfs_pid(self) -> int | None:
        process = self.mount.process if self.mount else None
        return process.pid if process else None

    def health(self) -> str | None:
        """Why this side can no longer be measured, or None."""
        if self.mount is not None:
            process = self.mount.process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                return f"mailfs daemon exited (code {code})"
            if not is_mounted(self.mountpoint):
                return "mailfs mount disappeared"
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
        if self.mount is not None:
            found = self.mount.problems()
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
    backend: str
    ops_per_s: float
    total_ops: int
    errors: int
    verified: int
    elapsed: float
    dovecot_cpu: float
    mailfs_cpu: float | None
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

    def on_start() -> None:
        if side.mount is not None:
            counters.append(mailfs_counters(side.mountpoint))
        sample["dovecot"] = tree_cpu(side.dovecot_pid)
        sample["mailfs"] = tree_cpu(side.mailfs_pid)
        sample["busy"], sample["total"] = system_cpu()

    def on_end() -> None:
        busy, total = system_cpu()
        sample["busy_s"] = (busy - sample.get("busy", busy)) / TICK
        sample["total_s"] = max(1.0, total - sample["total"]) / TICK
        sample["busy"] = sample["busy_s"] / sample["total_s"]
        if side.mount is not None:
            counters.append(mailfs_counters(side.mountpoint))
        pid = side.dovecot_pid
        deadline = time.monotonic() + 5
        while pid and live_children_named(pid, "imap") and time.monotonic() < deadline:
            time.sleep(0.05)  # let the master reap the imap processes, to count their CPU
        sample["dovecot"] = tree_cpu(pid) - sample.get("dovecot", 0.0)
        sample["mailfs"] = tree_cpu(side.mailfs_pid) - sample.get("mailfs", 0.0)

    result: LoadResult = run_load(config, on_start=on_start, on_end=on_end)
    per_op = {
        name: {"count": stat.count, "errors": stat.errors, "seconds": stat.seconds}
        for name, stat in result.per_op().items()
    }
    elapsed = max((c.elapsed for c in result.clients), default=0.0)
    ours = sample.get("dovecot", 0.0) + sample.get("mailfs", 0.0) + result.client_cpu_seconds
    per_op_counters: dict[str, float] | None = None
    before, after = [*counters, None, None][:2]
    if before and after and result.total_ops:
        per_op_counters = {
            key: (after[key] - before[key]) / result.total_ops for key in after if key in before
        }
    figures = Round(
        fmt=side.fmt, round=round_no, position=position, backend=side.backend,
        ops_per_s=result.ops_per_s, total_ops=result.total_ops, errors=result.total_errors,
        verified=result.verified,
        elapsed=elapsed, dovecot_cpu=sample.get("dovecot", 0.0),
        mailfs_cpu=sample.get("mailfs") if side.mount else None,
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
    status: dict[str, object] = field(default_factory=dict)
    started: datetime = field(default_factory=lambda: datetime.now(UTC))

    def log(self, text: str) -> None:
        print(text, flush=True)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        print(f"PROBLEM {text}", flush=True)

    def run_format(self, fmt: str) -> None:
        args = self.args
        users = {
            user: PASSWORD
            for tag in ["w", *(f"r{r}" for r in range(args.rounds))]
            for user in round_users(tag, args.clients, args.clients_per_user)
        }
        sides = [
            Side(backend, fmt, self.root / fmt / backend, users, list(args.mailfs_arg),
                 layout=args.layout)
            for backend in BACKENDS
            if args.only in (None, backend)
        ]
        live: list[Side] = []
        try:
            for side in sides:
                try:
                    side.start()
                    live.append(side)
                except Exception as exc:
                    self.problem(f"{side.label}: could not start: {exc}")
                    live.append(side)  # so that stop() clears whatever did start
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
                    self.status[fmt] = mailfs_status(side.mountpoint)
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
            f"{side.label:<15} {name:<8} {figures.ops_per_s:9.1f} ops/s  "
            f"{figures.total_ops:6d} ops  {figures.errors} errors  "
            f"dovecot {figures.per_op_ms(figures.dovecot_cpu) or 0:.2f} ms/op"
            + (f"  mailfs {mailfs_ms:.2f} ms/op" if mailfs_ms is not None else "")
        )
        trouble = side.new_problems(mark)
        if figures.errors or figures.fatal or trouble:
            self.problem(
                f"{side.label} {name}: {figures.errors} IMAP errors, "
                f"{len(figures.fatal)} clients gave up"
            )
            shown = [*figures.fatal, *figures.error_samples[:10], *trouble[:MAX_LOG_LINES]]
            if len(trouble) > MAX_LOG_LINES:
                shown.append(f"... and {len(trouble) - MAX_LOG_LINES} more log lines")
            for line in shown:
                self.problem(f"  {line}")
        why = side.health()
        if why is not None:
            side.broken = why
            self.problem(f"{side.label} after {name}: {why}")
            for line in side.mailfs_log_tail():
                self.problem(f"  mailfs log: {line}")
        return figures if round_no >= 0 else None


def mailfs_status(mountpoint: Path) -> object:
    try:
        result = run_cli("status", str(mountpoint), "--json", timeout=15)
    except Exception as exc:
        return {"unavailable": repr(exc)}
    if result.returncode != 0:
        return {"unavailable": (result.stderr or result.stdout).strip()[:500]}
    try:
        return json.loads(result.stdout)
    except ValueError:
        return {"raw": result.stdout[:2000]}


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


def best_ratio(local: Sequence[Round], mailfs: Sequence[Round]) -> float | None:
    if not local or not mailfs:
        return None
    return max(r.ops_per_s for r in mailfs) / max(r.ops_per_s for r in local)


def median_ms(rounds: Sequence[Round], attr: str) -> float | None:
    """Median over rounds of a CPU counter (seconds) per IMAP operation, in ms."""
    values = [v for r in rounds if (v := r.per_op_ms(getattr(r, attr))) is not None]
    return median(values)


@dataclass
class Summary:
    fmt: str
    local: float | None
    mailfs: float | None
    ratio: float | None  # median(mailfs) / median(local)
    paired: list[float]  # mailfs / local for each round where both ran
    mailfs_ms_per_op: float | None
    local_dovecot_ms: float | None
    mailfs_dovecot_ms: float | None
    failed: dict[str, int]  # rounds left out of the medians, per backend
    best_ratio: float | None  # best mailfs round / best local round: noise only slows down
    disturbed: int  # rounds where other processes used much of the machine


def summarize(rounds: list[Round], formats: Sequence[str]) -> list[Summary]:
    summaries: list[Summary] = []
    for fmt in formats:
        mine = [r for r in rounds if r.fmt == fmt]
        by_backend = {b: [r for r in mine if r.backend == b and not r.failed] for b in BACKENDS}
        local = median([r.ops_per_s for r in by_backend["local"]])
        mailfs = median([r.ops_per_s for r in by_backend["mailfs"]])
        local_by_round = {r.round: r.ops_per_s for r in by_backend["local"]}
        paired = [
            r.ops_per_s / local_by_round[r.round]
            for r in by_backend["mailfs"]
            if local_by_round.get(r.round)
        ]

        summaries.append(Summary(
            fmt=fmt, local=local, mailfs=mailfs,
            ratio=mailfs / local if local and mailfs is not None else None, paired=paired,
            mailfs_ms_per_op=median_ms(by_backend["mailfs"], "mailfs_cpu"),
            local_dovecot_ms=median_ms(by_backend["local"], "dovecot_cpu"),
            mailfs_dovecot_ms=median_ms(by_backend["mailfs"], "dovecot_cpu"),
            failed={b: sum(1 for r in mine if r.backend == b and r.failed) for b in BACKENDS},
            best_ratio=best_ratio(by_backend["local"], by_backend["mailfs"]),
            disturbed=sum(1 for r in mine if r.machine_other > DISTURBED),
        ))
    return summaries


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
        "mailfs IMAP load benchmark: Dovecot on a local directory vs on a mailfs mount",
        f"date: {run.started:%Y-%m-%d %H:%M:%S} UTC",
        "",
        "machine:",
        *(f"  {key}: {value}" for key, value in info.items()),
        "",
        "config:",
        f"  formats: {', '.join(formats)}; backends: {args.only or 'local, mailfs'}; "
        f"layout: {args.layout}" + (" (mail on a local directory; INDEX=/CONTROL= on a local "
                                    "directory vs an index-only mailfs mount)"
                                    if args.layout == "index-only" else ""),
        f"  {args.clients} client processes, {args.clients_per_user} per user "
        "(fresh users every round), "
        f"{args.populate} messages pre-filled per user",
        f"  {args.rounds} rounds x {args.duration:g} s per backend, order alternating "
        f"(A,B / B,A), warm-up {args.warmup:g} s",
        f"  mailfs extra args: {' '.join(args.mailfs_arg) or '(none)'}",
        "  mix (weights): " + ", ".join(f"{k}={v}" for k, v in DEFAULT_MIX.items()),
        "",
        "per round (cpu columns: CPU ms per IMAP operation; mailfs core: the daemon's CPU as a",
        "share of one core; busy: share of all CPUs used; verified: whole-body FETCHes that",
        "matched the appended bytes; other: share of all CPUs used by processes outside this",
        f"benchmark, '!' above {100 * DISTURBED:.0f} %, i.e. the round was disturbed):",
    ]
    rows = [
        [
            r.fmt, str(r.round + 1), str(r.position + 1), r.backend,
            "FAILED" if r.failed else fmt_num(r.ops_per_s),
            str(r.total_ops), str(r.errors), str(r.verified),
            fmt_num(r.per_op_ms(r.dovecot_cpu), 3),
            fmt_num(r.per_op_ms(r.mailfs_cpu), 3),
            "-" if r.mailfs_core is None else f"{100 * r.mailfs_core:.0f}%",
            fmt_num(r.per_op_ms(r.client_cpu), 3),
            f"{100 * r.machine_busy:.0f}%",
            f"{100 * r.machine_other:.0f}%" + (" !" if r.machine_other > DISTURBED else ""),
        ]
        for r in run.rounds
    ]
    lines += table(
        ["format", "round", "order", "backend", "ops/s", "ops", "errors", "verified", "dovecot cpu",
         "mailfs cpu", "mailfs core", "client cpu", "busy", "other"],
        rows,
    )
    summaries = summarize(run.rounds, formats)
    lines += [
        "",
        "summary (medians over rounds that did not fail; ratio = median mailfs / median local):",
    ]
    lines += table(
        ["format", "local ops/s", "mailfs ops/s", "ratio", "per-round ratios", "best-of ratio",
         "disturbed", "mailfs cpu ms/op", "dovecot cpu ms/op local/mailfs"],
        [
            [
                s.fmt, with_failed(s.local, s.failed["local"]),
                with_failed(s.mailfs, s.failed["mailfs"]), fmt_num(s.ratio, 3),
                " ".join(f"{p:.3f}" for p in s.paired) or "-", fmt_num(s.best_ratio, 3),
                str(s.disturbed), fmt_num(s.mailfs_ms_per_op, 3),
                f"{fmt_num(s.local_dovecot_ms, 3)} / {fmt_num(s.mailfs_dovecot_ms, 3)}",
            ]
            for s in summaries
        ],
    )
    counter_rows = []
    for fmt in formats:
        measured = [r.mailfs_counters for r in run.rounds
                    if r.fmt == fmt and r.mailfs_counters and not r.failed]
        if measured:
            counter_rows.append([fmt] + [
                fmt_num(median([m[key] for m in measured if key in m] or [0.0]), 2)
                for key in COUNTER_COLUMNS
            ])
    if counter_rows:
        lines += ["", "mailfs daemon counters per IMAP operation (mailfs status, round median):"]
        lines += table(["format", *COUNTER_COLUMNS], counter_rows)
    for fmt in formats:
        merged: dict[str, dict[str, dict[str, float]]] = {b: {} for b in BACKENDS}
        for r in run.rounds:
            if r.fmt != fmt:
                continue
            for name, stat in r.per_op.items():
                into = merged[r.backend].setdefault(name, {"count": 0, "seconds": 0.0})
                into["count"] += stat["count"]
                into["seconds"] += stat["seconds"]
        names = sorted(set(merged["local"]) | set(merged["mailfs"]))
        if not names:
            continue

        def mean(backend: str, name: str, merged: dict[str, dict[str, dict[str, float]]] = merged
                 ) -> float | None:
            stat = merged[backend].get(name)
            return 1000 * stat["seconds"] / stat["count"] if stat and stat["count"] else None

        lines += ["", f"{fmt}: mean latency per operation, ms (all rounds):"]
        rows = []
        for name in names:
            local, mailfs = mean("local", name), mean("mailfs", name)
            slower = mailfs / local if local and mailfs is not None else None
            rows.append([name, fmt_num(local, 2), fmt_num(mailfs, 2), fmt_num(slower, 2)])
        lines += table(["operation", "local", "mailfs", "mailfs/local"], rows)
    lines += ["", "problems:" if run.problems else "problems: none"]
    lines += [f"  {p}" for p in run.problems]
    return "\n".join(lines) + "\n"


def render_chart(run: Run, formats: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = summarize(run.rounds, formats)
    backends = [b for b in BACKENDS if run.args.only in (None, b)]
    colors = {"local": "#7f7f7f", "mailfs": "#1f77b4"}
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(max(5.0, 2.6 * len(formats)), 4.5))
    tallest = 0.0
    for b_index, backend in enumerate(backends):
        xs = [f_index + (b_index - (len(backends) - 1) / 2) * width
              for f_index in range(len(formats))]
        heights = [getattr(s, backend) or 0.0 for s in summaries]
        tallest = max([tallest, *heights])
        ax.bar(xs, heights, width * 0.92, label=f"{backend} (median)", color=colors[backend])
        for x, fmt in zip(xs, formats, strict=True):
            points = [
                r.ops_per_s for r in run.rounds
                if r.fmt == fmt and r.backend == backend and not r.failed
            ]
            tallest = max([tallest, *points])
            ax.scatter([x] * len(points), points, s=14, color="black", zorder=3,
                       label="rounds" if (b_index, fmt) == (0, formats[0]) else None)
    for f_index, summary in enumerate(summaries):
        if summary.ratio is None and summary.failed["mailfs"]:
            ax.annotate(f"mailfs: {summary.failed['mailfs']} rounds FAILED", (f_index, 0),
                        xytext=(0, 20), textcoords="offset points", ha="center",
                        fontsize=9, color="red")
        if summary.ratio is not None:
            top = max(
                [summary.local or 0.0, summary.mailfs or 0.0]
                + [r.ops_per_s for r in run.rounds if r.fmt == summary.fmt and not r.failed]
            )
            ax.annotate(f"mailfs/local = {summary.ratio:.2f}", (f_index, top),
                        xytext=(0, 10), textcoords="offset points", ha="center", fontsize=9)
    ax.set_xticks(range(len(formats)), formats)
    ax.set_ylabel("IMAP operations per second")
    ax.set_ylim(0, tallest * 1.3 or 1)
    ax.set_title(
        f"Dovecot IMAP load, {run.args.clients} clients, {run.args.rounds} x "
        f"{run.args.duration:g} s rounds\n{run.started:%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPUs, kernel {platform.release()}",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper center", ncols=3)
    ax.grid(axis="y", alpha=0.3)
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
    parser.add_argument("--only", choices=BACKENDS, help="run one backend only")
    parser.add_argument("--layout", choices=("full", "index-only"), default="full",
                        help="full: the whole mail_location on the mount; index-only: mail "
                             "on a local directory, INDEX=/CONTROL= on the mount (and, for "
                             "the local side, on a local directory)")
    parser.add_argument("--mailfs-arg", action="append", default=[],
                        help="extra argument for `mailfs mount` (repeat; use --mailfs-arg=--x)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the mail, backing dirs and mount live (same disk for both)")
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
            run.run_format(fmt)
        if run.problems:
            keep[0] = True  # the logs in it are the evidence
        args.results.mkdir(parents=True, exist_ok=True)
        report = render_report(run, info, formats)
        stem = "imap_load" if args.layout == "full" else "imap_index_only"
        (args.results / f"{stem}.txt").write_text(report)
        render_chart(run, formats, args.results / f"{stem}.png")
        dump = {
            "machine": info,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rounds": [asdict(r) for r in run.rounds],
            "summary": [asdict(s) for s in summarize(run.rounds, formats)],
            "mailfs_status": run.status,
            "problems": run.problems,
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
