"""What a full index disk or a kill -9 does to Dovecot, with and without mailfs, side by side.

The soak run fills one node's state disk and kill -9s daemons, and then counts Dovecot's
corruption lines. This benchmark asks the question under it: how does Dovecot come
through the same disturbance when its indexes sit on a plain local filesystem? Each setup
runs the same IMAP load on one Dovecot, and:
- `--disturbance fill`: fills the disk that holds the indexes (a small tmpfs) for
  `--fill-seconds`, frees it, and keeps the load going;
- `--disturbance kill`: `--kills` times, `--kill-every` seconds apart, kill -9s Dovecot
  (and the mailfs daemon, with the mailfs setup) and starts them again at once, as the
  admin guide's systemd units do.
It counts, split by the time they were logged (during a disturbance plus a settling time,
or after):
- Dovecot's error lines, and of those its corruption and repair lines;
- errors the IMAP clients saw.

Setups:
- `tmpfs`: INDEX=/CONTROL= directly on the tmpfs (what ext4 or XFS would do: a write that
  needs a new block fails, an overwrite or truncate within the file's blocks succeeds);
- `mailfs`: INDEX=/CONTROL= on an index-only mailfs mount whose state directory is on the
  tmpfs; a change the full disk refuses waits for room (`full_disk_wait`, 60 s);
- `mailfs-enospc`: the same with `full_disk_wait = 0`: refused changes get ENOSPC at once,
  as on the tmpfs.

Not part of `make test`:

    python -m bench.disturbance                      # fill: sdbox, 100 s of load
    python -m bench.disturbance --disturbance kill   # 3 kills, 20 s apart
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "src"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from bench.imap_load import LoadConfig, run_load  # noqa: E402
from bench.run_all import PASSWORD, machine_info, work_dir  # noqa: E402
from bench.soak import (  # noqa: E402
    CORRUPTION,
    SETTLE_SECONDS,
    fill_to_the_last_page,
    kill_leftovers,
    log_time,
    wait_port_free,
)
from tests.rigs.dovecot import Dovecot, prepare_mail_root  # noqa: E402
from tests.rigs.mount import MailfsMount  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SETUPS = ("tmpfs", "mailfs", "mailfs-enospc")
MOUNT_OPTIONS = {"mailfs": (), "mailfs-enospc": ("-o", "full_disk_wait=0")}
TMPFS_SIZE = "64m"


@dataclass
class Outcome:
    setup: str
    mail_format: str
    ops: int = 0
    client_errors_in_window: int = 0
    client_errors_after: int = 0
    dovecot_lines_in_window: int = 0
    dovecot_lines_after: int = 0
    corruption_lines_in_window: int = 0
    corruption_lines_after: int = 0
    samples_after: list[str] = field(default_factory=list)


@contextlib.contextmanager
def tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def run_setup(setup: str, fmt: str, root: Path, args: argparse.Namespace) -> Outcome:
    users = {f"user{i}": PASSWORD for i in range(args.users)}
    outcome = Outcome(setup, fmt)
    root.mkdir(parents=True)
    root.chmod(0o755)
    with contextlib.ExitStack() as stack:
        disk = stack.enter_context(tmpfs(root / "disk"))
        mount: MailfsMount | None = None
        if setup == "tmpfs":
            index_root = prepare_mail_root(disk / "index")
        else:
            index_root = prepare_mail_root(root / "mnt")
            mount = MailfsMount(None, index_root, disk / "state", MOUNT_OPTIONS[setup],
                                log_path=root / "mailfs.log").start()
            stack.callback(mount.kill)
            stack.callback(mount.stop)
        dovecot = Dovecot(root / "dovecot", prepare_mail_root(root / "mail"), fmt, users,
                          index_root=index_root)
        dovecot.start()
        stack.callback(dovecot.kill)
        stack.callback(dovecot.stop)
        windows: list[tuple[float, float]] = []

        def say(text: str) -> None:
            print(f"[{datetime.now(UTC):%H:%M:%S}] {setup}: {text}", flush=True)

        def kill_and_restart() -> None:
            if mount is not None:
                mount.kill()
            dovecot.kill()
            kill_leftovers(dovecot.base_dir)
            if mount is not None:
                mount.start()
            wait_port_free(dovecot.port)  # the clients reconnect to the same port
            dovecot.start()

        def disturb() -> None:
            time.sleep(args.fill_at)
            if args.disturbance == "fill":
                start = time.time()
                say("index disk full")
                fill_to_the_last_page(disk / "filler")
                time.sleep(args.fill_seconds)
                (disk / "filler").unlink()
                windows.append((start, time.time()))
                say("index disk has room again")
                return
            for kill in range(args.kills):
                if kill:
                    time.sleep(args.kill_every)
                start = time.time()
                say("kill -9 of Dovecot" + (" and the mailfs daemon" if mount else ""))
                kill_and_restart()
                windows.append((start, time.time()))

        filler = threading.Thread(target=disturb, daemon=True)
        config = LoadConfig(port=dovecot.port, users=list(users), password=PASSWORD,
                            clients=args.clients, duration=args.seconds, reconnect_tries=20,
                            max_errors=100_000)
        result = run_load(config, on_start=filler.start)
        filler.join()

        def disturbed(when: float) -> bool:
            return any(start <= when <= end + SETTLE_SECONDS for start, end in windows)

        first = windows[0][0]
        outcome.ops = result.total_ops
        for client in result.clients:
            for issued, _what in client.error_log:
                if disturbed(issued):
                    outcome.client_errors_in_window += 1
                elif issued > first:
                    outcome.client_errors_after += 1
        for line in dovecot.log_problems():
            when = log_time(line)
            corrupt = bool(CORRUPTION.search(line))
            if when is not None and when > first and not disturbed(when):
                outcome.dovecot_lines_after += 1
                outcome.corruption_lines_after += corrupt
                if len(outcome.samples_after) < 5:
                    outcome.samples_after.append(line[:240])
            else:
                outcome.dovecot_lines_in_window += 1
                outcome.corruption_lines_in_window += corrupt
    return outcome


def report(outcomes: Sequence[Outcome], args: argparse.Namespace, info: dict[str, str]
           ) -> str:
    if args.disturbance == "fill":
        what = "A full index disk"
        how = (f"the {TMPFS_SIZE} tmpfs filled at {args.fill_at:g} s for "
               f"{args.fill_seconds:g} s; 'window' = the fill plus {SETTLE_SECONDS:g} s")
    else:
        what = "kill -9 and restart"
        how = (f"{args.kills} kill -9s of Dovecot (and of the mailfs daemon), from "
               f"{args.fill_at:g} s, {args.kill_every:g} s apart, each restarted at once; "
               f"'window' = each kill and restart plus {SETTLE_SECONDS:g} s")
    lines = [
        f"{what}, with and without mailfs: Dovecot's own index files on a tmpfs,",
        "and an index-only mailfs mount whose state directory is on a tmpfs",
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC",
        "",
        "machine:",
        *(f"  {key}: {value}" for key, value in info.items()),
        "",
        f"config: {args.seconds:g} s of IMAP load, {args.clients} clients over {args.users} "
        f"users; {how}",
        "",
        f"{'setup':13} {'format':7} {'ops':>7} {'client errors':>18} {'Dovecot lines':>18} "
        f"{'of them corruption':>20}",
        f"{'':13} {'':7} {'':>7} {'window / after':>18} {'window / after':>18} "
        f"{'window / after':>20}",
    ]
    for o in outcomes:
        lines.append(
            f"{o.setup:13} {o.mail_format:7} {o.ops:7} "
            f"{o.client_errors_in_window:>9} / {o.client_errors_after:<6} "
            f"{o.dovecot_lines_in_window:>9} / {o.dovecot_lines_after:<6} "
            f"{o.corruption_lines_in_window:>10} / {o.corruption_lines_after:<7}")
    for o in outcomes:
        if o.samples_after:
            lines.append("")
            lines.append(f"{o.setup} {o.mail_format}, Dovecot lines after the window:")
            lines.extend(f"  {sample}" for sample in o.samples_after)
    return "\n".join(lines) + "\n"


def chart(outcomes: Sequence[Outcome], path: Path, disturbance: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{o.setup}\n{o.mail_format}" for o in outcomes]
    series = (
        ("Dovecot lines, window", [o.dovecot_lines_in_window for o in outcomes]),
        ("Dovecot lines, after", [o.dovecot_lines_after for o in outcomes]),
        ("corruption lines, window", [o.corruption_lines_in_window for o in outcomes]),
        ("corruption lines, after", [o.corruption_lines_after for o in outcomes]),
        ("client errors, window", [o.client_errors_in_window for o in outcomes]),
    )
    fig, axis = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series):
        xs = [x + i * width for x in range(len(outcomes))]
        # log scale: zero is drawn as a stub at 0.5, and every bar carries its count
        axis.bar(xs, [max(v, 0.5) for v in values], width, label=name)
        for x, value in zip(xs, values, strict=True):
            axis.text(x, max(value, 0.5) * 1.1, str(value), ha="center", fontsize=7)
    axis.set_yscale("log")
    highest = max((max(values) for _name, values in series), default=1)
    axis.set_ylim(0.4, max(highest, 1) * 60)  # room for the legend above the bars
    axis.set_xticks([x + 0.4 - width / 2 for x in range(len(outcomes))], labels)
    axis.set_ylabel("count (log scale)")
    what = "a full index disk" if disturbance == "fill" else "kill -9 and restart"
    axis.set_title(f"{what}: Dovecot on a tmpfs vs an index-only mailfs mount", fontsize=10)
    axis.legend(fontsize=8, ncol=3, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--formats", default="sdbox")
    parser.add_argument("--seconds", type=float, default=100.0)
    parser.add_argument("--fill-at", type=float, default=20.0,
                        help="when the (first) disturbance starts, in seconds")
    parser.add_argument("--fill-seconds", type=float, default=30.0)
    parser.add_argument("--disturbance", choices=("fill", "kill"), default="fill")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--users", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"))
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    args.setup_list = [s for s in args.setups.split(",") if s]
    unknown = set(args.setup_list) - set(SETUPS)
    if unknown:
        parser.error(f"unknown setups {', '.join(sorted(unknown))}; known: {', '.join(SETUPS)}")
    busy = (args.fill_seconds if args.disturbance == "fill"
            else (args.kills - 1) * args.kill_every + 5)
    if args.fill_at + busy + SETTLE_SECONDS >= args.seconds:
        parser.error("the load must outlast the disturbances and their settling time")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    outcomes = []
    with work_dir(args.workdir, args.keep) as (base, _keep):
        info = machine_info(base)
        for fmt in args.formats.split(","):
            for setup in args.setup_list:
                outcomes.append(run_setup(setup, fmt, base / f"{setup}-{fmt}", args))
    text = report(outcomes, args, info)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = "full_disk" if args.disturbance == "fill" else "kill_restart"
    (args.results / f"{stem}.txt").write_text(text)
    (args.results / f"{stem}.json").write_text(
        json.dumps([asdict(o) for o in outcomes], indent=2) + "\n")
    chart(outcomes, args.results / f"{stem}.png", args.disturbance)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
