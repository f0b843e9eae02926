"""Dovecot's first-login race: several sessions of a brand-new user autocreate INBOX at once.

Dovecot 2.3 takes two locks in opposite orders on this path:
- the session that creates INBOX holds `mailboxes.lock` (mailbox_create) and then wants
  `dovecot.list.index.log` to record the new mailbox;
- a session that refreshes the mailbox list index holds `dovecot.list.index.log`, finds the
  half-made INBOX directory, opens it to read its GUID, autocreates it, and wants
  `mailboxes.lock`.
The kernel sees the cycle and fails one fcntl() with EDEADLK, and Dovecot panics. The
window is the time between INBOX's mkdir and the list index update, so any filesystem
slower than local disk widens it.

This benchmark shows that the race is Dovecot's and not mailfs's: it runs the same burst of
first logins on local disk, on local disk with every mkdir made slower by strace's fault
injection (as a network filesystem would), and on mailfs, and then on mailfs with each user
provisioned by one session first (what imap_load does, and what docs/ARCHITECTURE.md
recommends to admins). Not part of `make test`:

    python -m bench.first_login_race                # 40 users x 6 sessions per setup
"""

from __future__ import annotations

import argparse
import imaplib
import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "src"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from bench.imap_load import LoadConfig, provision  # noqa: E402
from bench.run_all import PASSWORD, SETUPS, Side, machine_info, work_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEADLOCK = "Resource deadlock avoided"
PANIC_USER = re.compile(r"imap\(([^)]+)\)<\d+><[^>]*>: Panic: ")


@dataclass
class Scenario:
    name: str
    setup: str  # a bench.run_all setup
    mkdir_delay_us: int = 0  # strace adds this after every mkdir of Dovecot's processes
    provisioned: bool = False


@dataclass
class Outcome:
    scenario: str
    users: int
    sessions_per_user: int
    users_with_a_panic: int
    edeadlk_lines: int
    failed_sessions: int


SCENARIOS = (
    Scenario("local disk", "local"),
    Scenario("local disk, mkdir +1 ms", "local", 1000),
    Scenario("local disk, mkdir +5 ms", "local", 5000),
    Scenario("mailfs full overlay", "full"),
    Scenario("mailfs index-only", "index-only"),
    Scenario("mailfs full overlay, provisioned", "full", provisioned=True),
    Scenario("mailfs index-only, provisioned", "index-only", provisioned=True),
)


def first_logins(port: int, user: str, sessions: int) -> int:
    """`sessions` clients of `user` log in and SELECT INBOX at the same instant; failures."""
    start = threading.Barrier(sessions)
    failed: list[str] = []

    def session() -> None:
        try:
            conn = imaplib.IMAP4("127.0.0.1", port, timeout=60)
            start.wait(timeout=60)
            conn.login(user, PASSWORD)
            if conn.select("INBOX")[0] != "OK":
                failed.append("SELECT")
            conn.logout()
        except Exception as exc:  # a panicking imap process drops the connection
            failed.append(repr(exc))

    threads = [threading.Thread(target=session) for _ in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(failed)


def slow_mkdir(dovecot_pid: int, delay_us: int) -> subprocess.Popen[bytes]:
    """strace on Dovecot's master and its children, delaying the return of every mkdir."""
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-p", str(dovecot_pid),
         "-e", "trace=mkdir,mkdirat", "-e", f"inject=mkdir,mkdirat:delay_exit={delay_us}"])
    time.sleep(1.0)  # attached to the master before any login forks a child
    return tracer


def run_scenario(scenario: Scenario, root: Path, users: int, sessions: int) -> Outcome:
    names = [f"u{i}" for i in range(users)]
    side = Side(SETUPS[scenario.setup], "sdbox", root, dict.fromkeys(names, PASSWORD))
    side.start()
    tracer = None
    failed = 0
    try:
        assert side.dovecot is not None and side.dovecot.process is not None
        port = side.dovecot.port
        if scenario.mkdir_delay_us:
            tracer = slow_mkdir(side.dovecot.process.pid, scenario.mkdir_delay_us)
        if scenario.provisioned:
            provision(LoadConfig(port=port, users=names, password=PASSWORD))
        for name in names:
            failed += first_logins(port, name, sessions)
        time.sleep(0.5)  # the master logs a killed child after the client saw EOF
        log = side.dovecot.log_text()
    finally:
        if tracer is not None:
            tracer.terminate()
            tracer.wait()
        side.stop()
    return Outcome(scenario.name, users, sessions,
                   len(set(PANIC_USER.findall(log))), log.count(DEADLOCK), failed)


def plot(outcomes: list[Outcome], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    shares = [100 * o.users_with_a_panic / o.users for o in outcomes]
    ax.barh([o.scenario for o in outcomes], shares, color="tab:red")
    ax.invert_yaxis()
    ax.set_xlabel("new users whose first logins hit a Dovecot panic (%)")
    ax.set_title("Dovecot 2.3 first-login race (sdbox, simultaneous LOGIN + SELECT INBOX)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--sessions", type=int, default=6, help="simultaneous logins per user")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "first_login_race")
    args = parser.parse_args()
    outcomes: list[Outcome] = []
    with work_dir(args.work_dir, args.keep) as (root, _):
        info = machine_info(root)
        for number, scenario in enumerate(SCENARIOS):
            outcome = run_scenario(scenario, root / f"s{number}", args.users, args.sessions)
            print(f"{outcome.scenario:<36} {outcome.users_with_a_panic:>3}/{outcome.users} "
                  f"users panicked, {outcome.edeadlk_lines} EDEADLK, "
                  f"{outcome.failed_sessions} sessions failed", flush=True)
            outcomes.append(outcome)
    lines = [
        "Dovecot's first-login race: new users, each with "
        f"{args.sessions} sessions doing LOGIN + SELECT INBOX at the same instant (sdbox)",
        *(f"  {key}: {value}" for key, value in info.items()),
        "",
        f"{'setup':<36}{'users panicked':>16}{'EDEADLK lines':>15}{'failed sessions':>17}",
        *(f"{o.scenario:<36}{o.users_with_a_panic:>9}/{o.users:<6}{o.edeadlk_lines:>15}"
          f"{o.failed_sessions:>17}" for o in outcomes),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps({"machine": info, "outcomes": [asdict(o) for o in outcomes]}, indent=1))
    plot(outcomes, args.out.with_suffix(".png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
