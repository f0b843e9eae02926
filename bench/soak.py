"""Soak run: a three-node cluster in the recommended layout under IMAP load for ten minutes,
with a daemon killed every minute and one node's state disk filled once.

Each node has an index-only mount (INDEX= and CONTROL= of its own Dovecot; sync durability)
and all three Dovecots keep their mail in one shared directory, standing in for the shared
mail store. Each Dovecot serves its own users. Every `--kill-every` seconds one node's
daemon (a, b, c in turn) gets kill -9 and is started again at once: by default
(`--after-kill adopt`) its Dovecot runs on and the new daemon adopts the held FUSE
connection; `stop-dovecot` stops that node's Dovecot with the daemon and starts it again
after a fresh mount; `dovecot-survives` leaves Dovecot running on a fresh mount (the dead
one cleared). At `--fill-at` node c's
state directory, a small tmpfs of its own, is filled to the last byte for `--fill-seconds`.

It reports the daemons' RSS over time, IMAP errors (split into those of the node that was
being disturbed at the time, and all others), Dovecot's error lines, replication lag, and
whether every node holds the same replicated state at the end. Not part of `make test`:

    python -m bench.soak                      # 10 minutes, as in issue 10
    python -m bench.soak --minutes 2 --kill-every 30 --fill-at 60    # a short look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "src"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from bench.imap_load import LoadConfig, LoadResult, run_load  # noqa: E402
from bench.replication import repl, status_of  # noqa: E402
from bench.run_all import PASSWORD, machine_info, work_dir  # noqa: E402
from tests.rigs.cluster import Cluster, Node  # noqa: E402
from tests.rigs.dovecot import Dovecot, prepare_mail_root  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Dovecot lines that say an index was damaged or repaired, as opposed to plain I/O errors
# while the mount was gone.
CORRUPTION = re.compile(r"[Cc]orrupt|indexid changed|already exists, rebuilding|"
                        r"Rebuilding index|Fixed index|Panic:")
# After a kill or the end of a full disk, errors of that node's clients count as its own
# for this long (Dovecot reopens its indexes, clients log in again).
SETTLE_SECONDS = 15.0
STATE_TMPFS = "64m"
AFTER_KILL = {
    "adopt": "Dovecot runs on, the next daemon adopts the held connection",
    "stop-dovecot": "Dovecot stopped, fresh mount, Dovecot started",
    "dovecot-survives": "Dovecot runs on, fresh mount (the dead one cleared)",
}
CONVERGE_TIMEOUT = 120.0


@dataclass
class Disturbance:
    node: str
    what: str  # kill | fill
    start: float  # wall clock
    end: float = 0.0


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_mib: dict[str, float]
    lag_seconds: dict[str, float]  # node a's view of each peer


@dataclass
class Soak:
    args: argparse.Namespace
    root: Path
    cluster: Cluster | None = None
    dovecots: dict[str, Dovecot] = field(default_factory=dict)
    results: dict[str, LoadResult] = field(default_factory=dict)
    disturbances: list[Disturbance] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    load_started: float = 0.0
    load_started_wall: float = 0.0
    converged: bool | None = None
    final_states: dict[str, int] = field(default_factory=dict)

    def log(self, text: str) -> None:
        print(f"[{datetime.now(UTC):%H:%M:%S}] {text}", flush=True)

    # -- setup ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        state_c = self.root / "cluster" / "c" / "state"
        state_c.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STATE_TMPFS}", "tmpfs",
                        str(state_c)], check=True)
        try:
            mail = prepare_mail_root(self.root / "mail")
            self.cluster = Cluster(3, {"durability": "sync"}, base=self.root / "cluster",
                                   index_only=True)
            for node in self.cluster.nodes:
                prepare_mail_root(node.mountpoint)  # the mount's root shows its owner
            self.cluster.start()
            self.cluster.wait_connected()
            for node in self.cluster.nodes:
                users = {f"{node.node_id}user{i}": PASSWORD for i in range(self.args.users)}
                dovecot = Dovecot(self.root / f"dovecot-{node.node_id}", mail,
                                  self.args.format, users, index_root=node.mountpoint)
                dovecot.start()
                self.dovecots[node.node_id] = dovecot
            yield
        finally:
            for dovecot in self.dovecots.values():
                with contextlib.suppress(Exception):
                    dovecot.stop()
                dovecot.kill()
            if self.cluster is not None:
                # The cluster removes its directory: keep the daemons' logs for a look later
                # (with --keep).
                logs = self.root / "mailfs-logs"
                logs.mkdir(exist_ok=True)
                for node in self.cluster.nodes:
                    with contextlib.suppress(Exception):
                        (logs / f"{node.node_id}.log").write_text(node.log())
                with contextlib.suppress(Exception):
                    self.cluster.close()
            subprocess.run(["umount", "-l", str(state_c)], check=False)

    # -- the run -------------------------------------------------------------------------

    def load(self, node: Node) -> None:
        dovecot = self.dovecots[node.node_id]
        config = LoadConfig(
            port=dovecot.port, users=sorted(dovecot.users), password=PASSWORD,
            clients=self.args.clients, duration=self.args.minutes * 60,
            populate=20, max_errors=10**9, reconnect_tries=60, reconnect_pause=0.5,
            io_timeout=60.0, seed=ord(node.node_id),
        )
        try:
            self.results[node.node_id] = run_load(config)
        except Exception as exc:
            self.problems.append(f"load on {node.node_id}: {exc!r}")

    def disturb(self, stop: threading.Event) -> None:
        assert self.cluster is not None
        begin = time.monotonic()
        kills, filled = 0, False
        while not stop.is_set():
            elapsed = time.monotonic() - begin
            if not filled and elapsed >= self.args.fill_at:
                filled = True
                self.fill(self.cluster[2], stop)
                continue
            if elapsed >= (kills + 1) * self.args.kill_every:
                node = self.cluster[kills % 3]
                kills += 1
                self.kill_and_restart(node)
                continue
            stop.wait(0.5)

    def kill_and_restart(self, node: Node) -> None:
        """kill -9 of the daemon, started again at once (see --after-kill). Without
        adoption, Dovecot processes that outlive their index mount hold dead files and
        locks the new mount does not know, and their recovery writes corrupt the indexes
        that the new mount serves: `stop-dovecot` stops them, as systemd units without
        adoption do."""
        event = Disturbance(node.node_id, "kill", time.time())
        self.disturbances.append(event)
        dovecot = self.dovecots[node.node_id]
        follows = self.args.after_kill == "stop-dovecot"
        self.log(f"kill -9 of node {node.node_id}'s daemon ({self.args.after_kill})")
        if self.args.after_kill == "adopt":
            node.crash()
        else:
            node.kill()
        if follows:
            dovecot.kill()
            kill_leftovers(dovecot.base_dir)
        try:
            node.start()
        except Exception as exc:
            self.problems.append(f"node {node.node_id} did not mount again: {exc!r}")
        if follows:
            try:
                # The clients reconnect to the same port: wait until nothing holds it.
                wait_port_free(dovecot.port)
                dovecot.start()
            except Exception as exc:
                self.problems.append(f"Dovecot of node {node.node_id} did not start: {exc!r}")
        event.end = time.time()

    def fill(self, node: Node, stop: threading.Event) -> None:
        event = Disturbance(node.node_id, "fill", time.time())
        self.disturbances.append(event)
        filler = node.state_dir / "filler"
        self.log(f"filling node {node.node_id}'s state disk for {self.args.fill_seconds:g} s")
        fill_to_the_last_page(filler)
        stop.wait(self.args.fill_seconds)
        filler.unlink()
        event.end = time.time()
        self.log(f"node {node.node_id}'s state disk has room again")

    def sample(self, stop: threading.Event) -> None:
        assert self.cluster is not None
        while not stop.wait(self.args.sample_every):
            rss = {}
            for node in self.cluster.nodes:
                process = node.mount.process if node.mount else None
                if process is not None and process.poll() is None:
                    rss[node.node_id] = rss_mib(process.pid)
            lag: dict[str, float] = {}
            with contextlib.suppress(Exception):
                peers = repl(self.cluster[0])["peers"]
                lag = {peer: float(state["lag_seconds"]) for peer, state in peers.items()}
            self.samples.append(Sample(time.monotonic() - self.load_started, rss, lag))

    def run(self) -> None:
        assert self.cluster is not None
        stop = threading.Event()
        loads = [threading.Thread(target=self.load, args=(node,)) for node in self.cluster.nodes]
        self.load_started = time.monotonic()
        self.load_started_wall = time.time()
        for thread in loads:
            thread.start()
        time.sleep(5)  # logins and populating first
        helpers = [threading.Thread(target=self.disturb, args=(stop,)),
                   threading.Thread(target=self.sample, args=(stop,))]
        for thread in helpers:
            thread.start()
        for thread in loads:
            thread.join()
        stop.set()
        for thread in helpers:
            thread.join()
        self.finish()

    def finish(self) -> None:
        assert self.cluster is not None
        for dovecot in self.dovecots.values():
            dovecot.stop()
        try:
            sums = self.cluster.wait_converged(timeout=CONVERGE_TIMEOUT)
            self.converged = True
            self.final_states = {"files and directories": len(sums)}
        except AssertionError as exc:
            self.converged = False
            self.problems.append(f"nodes differ at the end: {exc}")
        for node in self.cluster.nodes:
            with contextlib.suppress(Exception):
                status = status_of(node.mountpoint)
                self.final_states[f"{node.node_id} error replies"] = sum(
                    status.get("error_replies", {}).values())

    # -- figures -------------------------------------------------------------------------

    def own_error(self, node: str, when: float) -> bool:
        """Was the node disturbed then (or settling after it)?"""
        return self.disturbance_at(node, when) is not None

    def disturbance_at(self, node: str, when: float) -> str | None:
        """What disturbed the node then (or it was settling after): kill, fill or None."""
        for d in self.disturbances:
            if d.node == node and d.start - 1 <= when <= (d.end or d.start) + SETTLE_SECONDS:
                return d.what
        return None

    def corruption_by_disturbance(self, node: str) -> dict[str, int]:
        """The node's Dovecot corruption or repair lines, by what disturbed it then."""
        dovecot = self.dovecots[node]
        counts = {"kill": 0, "fill": 0, "none": 0}
        for line in dovecot.log_problems() + dovecot.index_rebuild_lines():
            if CORRUPTION.search(line):
                when = log_time(line)
                counts[(self.disturbance_at(node, when) if when is not None else None)
                       or "none"] += 1
        return counts

    def errors(self) -> dict[str, dict[str, int]]:
        split: dict[str, dict[str, int]] = {}
        for node, result in self.results.items():
            total = sum(client.total_errors for client in result.clients)
            other = len(self.other_errors(node))
            split[node] = {"total": total, "while disturbed": total - other, "other": other,
                           "fatal": len(result.fatal)}
        return split

    def other_errors(self, node: str) -> list[str]:
        """The node's clients' errors outside its own disturbances, with their time."""
        return [f"{when - self.load_started_wall:6.1f} s: {what}"
                for client in self.results[node].clients for when, what in client.error_log
                if not self.own_error(node, when)]

    def dovecot_problems(self) -> dict[str, dict[str, list[str]]]:
        """Dovecot's error, panic, fatal and index-rebuild lines per node, split like the
        IMAP errors: those of a node while it was disturbed (its index files vanished with
        the daemon, or its disk was full) and all others."""
        split: dict[str, dict[str, list[str]]] = {}
        for node, dovecot in self.dovecots.items():
            lines = dovecot.log_problems() + dovecot.index_rebuild_lines()
            own, other = [], []
            for line in lines:
                when = log_time(line)
                (own if when is not None and self.own_error(node, when) else other).append(line)
            # (A full disk once made 160,000 lines: no list membership tests here.)
            split[node] = {"while disturbed": own, "other": other}
        return split


def fill_to_the_last_page(filler: Path) -> None:
    """Take every last free page of the filesystem that `filler` is made on."""
    with open(filler, "wb", buffering=0) as out:
        for size in (1 << 20, 4096):
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * size)


def kill_leftovers(base_dir: Path) -> None:
    """SIGKILL what is left of a killed Dovecot: a child forked while its master was being
    killed escapes the kill, and its login processes (chrooted below `base_dir`) keep the
    login socket, so the next start refuses ("Dovecot is already running?")."""
    prefix = str(base_dir.resolve())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for link in ("root", "cwd"):
            try:
                target = os.readlink(f"/proc/{entry}/{link}")
            except OSError:
                continue
            if target == prefix or target.startswith(prefix + "/"):
                with contextlib.suppress(OSError):
                    os.kill(int(entry), signal.SIGKILL)
                break


def wait_port_free(port: int, timeout: float = 15.0) -> None:
    """Until 127.0.0.1:port can be bound again (a killed Dovecot's last processes may
    still hold its listener for a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        probe = socket.socket()
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        finally:
            probe.close()


def log_time(line: str) -> float | None:
    """The wall-clock time of a Dovecot log line ("Nov 30 13:03:59 imap(...)": local time,
    to the second; the year is this one)."""
    try:
        stamp = datetime.strptime(f"{datetime.now().year} {line[:15]}", "%Y %b %d %H:%M:%S")
    except ValueError:
        return None
    return time.mktime(stamp.timetuple()) + 0.999  # anywhere in that second


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def report(soak: Soak, info: dict[str, str]) -> str:
    errors = soak.errors()
    problems = soak.dovecot_problems()
    rss = {node: [s.rss_mib[node] for s in soak.samples if node in s.rss_mib] for node in "abc"}
    lag = {peer: [s.lag_seconds[peer] for s in soak.samples if peer in s.lag_seconds]
           for peer in "bc"}
    lines = [
        "mailfs soak run: 3 nodes, index-only layout, sync durability, IMAP load, kills and "
        "a full disk",
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC",
        "", "machine:", *(f"  {k}: {v}" for k, v in info.items()), "",
        f"config: {soak.args.minutes:g} min, {soak.args.format}, {soak.args.clients} clients "
        f"and {soak.args.users} users per node, kill -9 every {soak.args.kill_every:g} s "
        f"(a, b, c in turn; after each: {AFTER_KILL[soak.args.after_kill]}), "
        f"node c's state disk ({STATE_TMPFS} tmpfs) full at "
        f"{soak.args.fill_at:g} s for {soak.args.fill_seconds:g} s",
        "", "disturbances:",
        *(f"  {d.what:<5} node {d.node} at {d.start - soak.load_started_wall:6.1f} s "
          f"({(d.end or d.start) - d.start:.1f} s)" for d in soak.disturbances),
        "", "IMAP (per node; 'while disturbed' = errors of commands that node's clients issued "
        f"during its own kill or full disk, plus {SETTLE_SECONDS:g} s; times are when a failing "
        "command was issued):",
    ]
    for node, counts in sorted(errors.items()):
        result = soak.results[node]
        lines.append(f"  {node}: {result.total_ops} ops, {result.ops_per_s:.0f} ops/s, "
                     f"errors {counts['total']} (while disturbed {counts['while disturbed']}, "
                     f"other {counts['other']}), clients that gave up {counts['fatal']}, "
                     f"bodies verified {result.verified}")
        lines += [f"     gave up: {reason}" for reason in result.fatal]
        lines += [f"     other at {line}" for line in soak.other_errors(node)[:10]]
        lines += [f"     {sample}" for sample in result.error_samples()[:3]]
    lines += ["", "Dovecot error, panic, fatal and index rebuild lines (per node; split the "
              "same way):"]
    for node, found in sorted(problems.items()):
        damaged = [line for line in found["while disturbed"] + found["other"]
                   if CORRUPTION.search(line)]
        lines.append(f"  {node}: while disturbed {len(found['while disturbed'])}, "
                     f"other {len(found['other'])}; of all these, corruption or repair "
                     f"lines {len(damaged)}")
        by_kind = soak.corruption_by_disturbance(node)
        lines.append(f"     corruption or repair lines in its kill windows {by_kind['kill']}, "
                     f"in its full-disk window {by_kind['fill']}, outside them "
                     f"{by_kind['none']}")
        lines += [f"     other: {line[:240]}" for line in found["other"][:8]]
        lines += [f"     while disturbed: {line[:240]}" for line in found["while disturbed"][:3]]
    lines += ["", "daemon RSS, MiB (min / max over the run; a daemon is new after each kill):"]
    lines += [f"  {node}: {min(v):.0f} / {max(v):.0f}" if v else f"  {node}: -"
              for node, v in rss.items()]
    lines += ["", "replication lag seen by node a, s (median / max):"]
    for peer, values in lag.items():
        ordered = sorted(values)
        lines.append(f"  {peer}: {ordered[len(ordered) // 2]:.3f} / {ordered[-1]:.3f}"
                     if ordered else f"  {peer}: -")
    lines += ["", f"identical replicated state on every node at the end: "
              f"{'yes' if soak.converged else 'NO'} {soak.final_states}"]
    lines += ["", "problems:" if soak.problems else "problems: none",
              *(f"  {p}" for p in soak.problems)]
    return "\n".join(lines) + "\n"


def chart(soak: Soak, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for node in "abc":
        points = [(s.t, s.rss_mib[node]) for s in soak.samples if node in s.rss_mib]
        if points:
            top.plot(*zip(*points, strict=True), label=f"node {node}")
    for peer in "bc":
        points = [(s.t, s.lag_seconds[peer]) for s in soak.samples if peer in s.lag_seconds]
        if points:
            bottom.plot(*zip(*points, strict=True), label=f"a -> {peer}")
    for event in soak.disturbances:
        for axis in (top, bottom):
            axis.axvline(event.start - soak.load_started_wall, color="red" if
                         event.what == "kill" else "orange", alpha=0.4, linewidth=1)
    top.set_ylabel("daemon RSS, MiB")
    bottom.set_ylabel("replication lag, s")
    bottom.set_xlabel("seconds into the run (red: kill -9, orange: full state disk)")
    top.legend(fontsize=8)
    bottom.legend(fontsize=8)
    top.set_title(f"mailfs soak, {soak.args.minutes:g} min, {soak.args.format}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--kill-every", type=float, default=60.0)
    parser.add_argument("--fill-at", type=float, default=270.0, help="seconds into the run")
    parser.add_argument("--fill-seconds", type=float, default=30.0)
    parser.add_argument("--format", default="sdbox", choices=("maildir", "sdbox", "mdbox"))
    parser.add_argument("--clients", type=int, default=2, help="IMAP clients per node")
    parser.add_argument("--users", type=int, default=2, help="users per node")
    parser.add_argument("--sample-every", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--after-kill", choices=sorted(AFTER_KILL), default="adopt",
                        help="what follows each kill -9 of a daemon")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("must run as root (mounts, Dovecot, tmpfs)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    with work_dir(args.workdir, args.keep) as (root, keep):
        info = machine_info(root)
        soak = Soak(args, root)
        with soak.running():
            soak.run()
        errors = soak.errors()
        bad = (soak.problems or not soak.converged
               or any(counts["other"] or counts["fatal"] for counts in errors.values())
               or any(found["other"] for found in soak.dovecot_problems().values()))
        if bad:
            keep[0] = True
        args.results.mkdir(parents=True, exist_ok=True)
        text = report(soak, info)
        (args.results / "soak.txt").write_text(text)
        chart(soak, args.results / "soak.png")
        dump: dict[str, Any] = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "errors": errors, "disturbances": [vars(d) for d in soak.disturbances],
            "other_errors": {node: soak.other_errors(node) for node in soak.results},
            "samples": [vars(s) for s in soak.samples], "converged": soak.converged,
            "dovecot_problems": soak.dovecot_problems(),
            "problems": soak.problems,
        }
        (args.results / "soak.json").write_text(json.dumps(dump, indent=1) + "\n")
        print(text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
