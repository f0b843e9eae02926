"""Where the daemon's CPU goes under IMAP load, by Python function (py-spy).

Runs Dovecot on the full overlay over a local directory (the `full` setup of
bench/run_all.py) under the IMAP load generator, with `py-spy record` sampling the mailfs
daemon. The daemon is CPU-bound there (one core, about 100 µs per FUSE request), so its
profile says what to make cheaper before anything is cached. Reports the daemon's CPU per
FUSE request, the FUSE requests per IMAP operation, and the functions with the most samples
on the CPU: their own (leaf) samples and all samples they are on the stack for. py-spy
slows the daemon a little; the shares are what matters. Not part of `make test`:

    python -m bench.daemon_profile --format maildir
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "src"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from bench.backing_profile import per_op  # noqa: E402
from bench.imap_load import LoadConfig, run_load  # noqa: E402
from bench.run_all import PASSWORD, SETUPS, Side, machine_info, work_dir  # noqa: E402
from mailfs import cli, control  # noqa: E402
from mailfs import config as mailfs_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOP = 30


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / 100.0


def frame_name(frame: str) -> str:
    """'function (path/to/module.py:123)' -> 'function (module.py)'."""
    name, _, where = frame.partition(" (")
    module = where.rsplit("/", 1)[-1].split(":", 1)[0]
    return f"{name} ({module})" if module else name


def summarize(raw: str) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """py-spy's collapsed stacks ('frame;frame;... count') -> total, self, inclusive."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return total, own.most_common(TOP), inclusive.most_common(TOP)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", default="maildir", choices=("maildir", "sdbox", "mdbox"))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--gil", action="store_true",
                        help="only samples that hold the GIL: Python's own CPU, not the "
                             "time threads spend in system calls or waiting")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy is not installed (make setup installs it)", file=sys.stderr)
        return 2
    users = {f"p{i}": PASSWORD for i in range(args.clients)}
    with work_dir(args.work_dir, args.keep) as (root, _):
        info = machine_info(root)
        side = Side(SETUPS["full"], args.format, root / "side", users)
        side.start()
        try:
            assert side.mount is not None and side.mount.process is not None
            assert side.dovecot is not None
            pid = side.mount.process.pid
            sock = mailfs_config.control_socket_for(cli.DEFAULT_RUN_DIR, side.mount.mountpoint)
            raw_path = root / "py-spy.txt"
            sampler: subprocess.Popen[bytes] | None = None
            counters: dict[str, dict[str, int]] = {}
            cpu: dict[str, float] = {}

            def on_start() -> None:
                nonlocal sampler
                before = control.call(sock, "status", timeout=10.0)
                counters["before"] = before["requests"]
                counters["getattr_before"] = before["getattr_by_kind"]
                cpu["before"] = process_cpu_seconds(pid)
                sampler = subprocess.Popen(
                    [spy, "record", "--nonblocking", "--format", "raw", "--rate",
                     str(args.rate), "--output", str(raw_path), "--pid", str(pid),
                     *(["--gil"] if args.gil else [])],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

            def on_end() -> None:
                after = control.call(sock, "status", timeout=10.0)
                counters["after"] = after["requests"]
                counters["getattr_after"] = after["getattr_by_kind"]
                cpu["after"] = process_cpu_seconds(pid)
                if sampler is not None:
                    sampler.send_signal(signal.SIGINT)  # py-spy writes on SIGINT
                    sampler.wait(timeout=60)

            result = run_load(LoadConfig(
                port=side.dovecot.port, users=list(users), password=PASSWORD,
                clients=args.clients, duration=args.seconds, populate=30),
                on_start=on_start, on_end=on_end)
            time.sleep(0.5)
            raw = raw_path.read_text() if raw_path.exists() else ""
        finally:
            side.stop()
    ops = max(result.total_ops, 1)
    requests = sum(counters["after"].values()) - sum(counters["before"].values())
    daemon_cpu = cpu["after"] - cpu["before"]
    total, own, inclusive = summarize(raw)
    lines = [
        f"mailfs daemon profile: full overlay over a local directory, {args.format}, "
        f"{args.clients} clients, {args.seconds:g} s, py-spy at {args.rate}/s"
        + (", samples holding the GIL only" if args.gil else ""),
        *(f"  {key}: {value}" for key, value in info.items()),
        "",
        f"IMAP operations: {result.total_ops} ({result.ops_per_s:.0f}/s with py-spy "
        f"attached), errors {result.total_errors}",
        f"FUSE requests: {requests} ({requests / ops:.1f} per IMAP operation)",
        f"daemon CPU: {daemon_cpu:.1f} s, {1e6 * daemon_cpu / max(requests, 1):.0f} µs per "
        f"FUSE request, {1e3 * daemon_cpu / ops:.2f} ms per IMAP operation",
        "",
        "FUSE requests per IMAP operation:",
        *(f"  {name:<20}{value:6.2f}" for name, value in
          per_op(counters["after"], counters["before"], ops)),
        "",
        "getattr requests per IMAP operation, by kind of file:",
        *(f"  {name:<20}{value:6.2f}" for name, value in
          per_op(counters["getattr_after"], counters["getattr_before"], ops)),
        "",
        f"functions with the most CPU samples of their own (of {total}):",
        *(f"  {100 * count / max(total, 1):5.1f}%  {name}" for name, count in own),
        "",
        "functions on the stack for the most CPU samples (inclusive):",
        *(f"  {100 * count / max(total, 1):5.1f}%  {name}" for name, count in inclusive),
    ]
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"daemon_profile_{args.format}{'_gil' if args.gil else ''}.txt"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
