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


def process_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / 100.0, int(fields[12]) / 100.0  # utime, stime


def perf_report(perf: str, data: Path) -> list[str]:
    """perf's shares by binary (kernel, interpreter, libraries) and by symbol, and the
    call chains into the kernel's top symbols, which say what the kernel time is for."""
    def report(*options: str) -> list[str]:
        out = subprocess.run([perf, "report", "-i", str(data), "--stdio", "--no-children",
                              *options], capture_output=True, text=True, timeout=300).stdout
        return [line.rstrip() for line in out.splitlines()
                if line.strip() and not line.startswith("#")]
    by_symbol = report("--sort", "dso,sym", "-g", "none")
    return ["daemon CPU by binary (perf):", *report("--sort", "dso", "-g", "none")[:8], "",
            "daemon CPU by symbol:", *by_symbol[:TOP], "",
            "call chains into the top kernel symbols (caller-based, 2 % and up):",
            *report("--sort", "sym", "-g", "caller,2,callee", "--symbol-filter=",
                    "--percent-limit", "4", "--dsos", "[kernel.kallsyms]")[:80]]


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
    parser.add_argument("--native", action="store_true",
                        help="include C frames (pyfuse3's Cython, libfuse, libc); py-spy then "
                             "pauses the daemon for each sample, so it runs slower")
    parser.add_argument("--perf", action="store_true",
                        help="sample with perf instead of py-spy: kernel and C code by "
                             "symbol, Python only as the interpreter")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    perf = shutil.which("perf")
    if args.perf and perf is None:
        print("perf is not installed (apt-get install linux-perf)", file=sys.stderr)
        return 2
    if not args.perf and not Path(spy).exists():
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
            perf_data = root / "perf.data"
            sampler: subprocess.Popen[bytes] | None = None
            counters: dict[str, dict[str, int]] = {}
            cpu: dict[str, tuple[float, float]] = {}

            def on_start() -> None:
                nonlocal sampler
                before = control.call(sock, "status", timeout=10.0)
                counters["before"] = before["requests"]
                counters["getattr_before"] = before["getattr_by_kind"]
                cpu["before"] = process_cpu_seconds(pid)
                if perf is not None and args.perf:
                    sampler = subprocess.Popen(
                        [perf, "record", "-g", "-F", str(args.rate), "-p", str(pid),
                         "-o", str(perf_data)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    return
                sampler = subprocess.Popen(
                    [spy, "record", "--format", "raw", "--rate",
                     str(args.rate), "--output", str(raw_path), "--pid", str(pid),
                     *(["--native"] if args.native else ["--nonblocking"]),
                     *(["--gil"] if args.gil else [])],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

            def on_end() -> None:
                after = control.call(sock, "status", timeout=10.0)
                counters["after"] = after["requests"]
                counters["getattr_after"] = after["getattr_by_kind"]
                cpu["after"] = process_cpu_seconds(pid)
                if sampler is not None:
                    sampler.send_signal(signal.SIGINT)  # both write their data on SIGINT
                    sampler.wait(timeout=60)

            result = run_load(LoadConfig(
                port=side.dovecot.port, users=list(users), password=PASSWORD,
                clients=args.clients, duration=args.seconds, populate=30),
                on_start=on_start, on_end=on_end)
            time.sleep(0.5)
            raw = raw_path.read_text() if raw_path.exists() else ""
            perf_lines = perf_report(perf, perf_data) if perf and args.perf else []
        finally:
            side.stop()
    ops = max(result.total_ops, 1)
    requests = sum(counters["after"].values()) - sum(counters["before"].values())
    user = cpu["after"][0] - cpu["before"][0]
    system = cpu["after"][1] - cpu["before"][1]
    daemon_cpu = user + system
    total, own, inclusive = summarize(raw)
    sampled = (["", *perf_lines] if args.perf else [
        "",
        f"functions with the most CPU samples of their own (of {total}):",
        *(f"  {100 * count / max(total, 1):5.1f}%  {name}" for name, count in own),
        "",
        "functions on the stack for the most CPU samples (inclusive):",
        *(f"  {100 * count / max(total, 1):5.1f}%  {name}" for name, count in inclusive),
    ])
    lines = [
        f"mailfs daemon profile: full overlay over a local directory, {args.format}, "
        f"{args.clients} clients, {args.seconds:g} s, "
        f"{'perf' if args.perf else 'py-spy'} at {args.rate}/s"
        + (", samples holding the GIL only" if args.gil else "")
        + (", with C frames" if args.native else ""),
        *(f"  {key}: {value}" for key, value in info.items()),
        "",
        f"IMAP operations: {result.total_ops} ({result.ops_per_s:.0f}/s with the sampler "
        f"attached), errors {result.total_errors}",
        f"FUSE requests: {requests} ({requests / ops:.1f} per IMAP operation)",
        f"daemon CPU: {daemon_cpu:.1f} s, {1e6 * daemon_cpu / max(requests, 1):.0f} µs per "
        f"FUSE request, {1e3 * daemon_cpu / ops:.2f} ms per IMAP operation "
        f"(user {user:.1f} s, system {system:.1f} s)",
        "",
        "FUSE requests per IMAP operation:",
        *(f"  {name:<20}{value:6.2f}" for name, value in
          per_op(counters["after"], counters["before"], ops)),
        "",
        "getattr requests per IMAP operation, by kind of file:",
        *(f"  {name:<20}{value:6.2f}" for name, value in
          per_op(counters["getattr_after"], counters["getattr_before"], ops)),
        *sampled,
    ]
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / (f"daemon_profile_{args.format}{'_gil' if args.gil else ''}"
                          f"{'_native' if args.native else ''}"
                          f"{'_perf' if args.perf else ''}.txt")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
