"""Where the full overlay's time goes on a network backing store, by system call.

Runs Dovecot on the full overlay over the sshfs rig (with added latency) under the IMAP
load generator, with `strace -c -w -f` on the mailfs daemon: the wall time each kind of
backing system call took, summed over the worker threads. Also the FUSE requests and
backing calls per IMAP operation from `mailfs status`. strace slows everything, so the
rates here are not comparable with bench/run_all.py's; the shares are what matters: they
say which backing calls a cache could save and which a correct overlay must make. Not
part of `make test`:

    python -m bench.backing_profile --format maildir
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "src"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from bench.imap_load import LoadConfig, run_load  # noqa: E402
from bench.run_all import PASSWORD, SETUPS, Side, machine_info, work_dir  # noqa: E402
from mailfs import cli, control  # noqa: E402
from mailfs import config as mailfs_config  # noqa: E402
from tests.rigs.dovecot import MAIL_USER  # noqa: E402
from tests.rigs.sshfs import sshfs_backing  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def per_op(after: dict[str, int], before: dict[str, int], ops: int) -> list[tuple[str, float]]:
    rows = [(key, (value - before.get(key, 0)) / ops) for key, value in after.items()]
    return sorted(((k, v) for k, v in rows if v > 0), key=lambda row: -row[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", default="maildir", choices=("maildir", "sdbox", "mdbox"))
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--latency-ms", type=float, default=1.0)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if shutil.which("strace") is None:
        print("strace is not installed (make setup installs it)", file=sys.stderr)
        return 2
    users = {f"p{i}": PASSWORD for i in range(args.clients)}
    with work_dir(args.work_dir, args.keep) as (root, _), \
            sshfs_backing(root / "network", latency_ms=args.latency_ms, user=MAIL_USER) as net:
        info = machine_info(root)
        side = Side(SETUPS["full-sshfs"], args.format, root / "side", users, network=net)
        side.start()
        try:
            assert side.mount is not None and side.mount.process is not None
            assert side.dovecot is not None
            sock = mailfs_config.control_socket_for(cli.DEFAULT_RUN_DIR, side.mount.mountpoint)
            before = control.call(sock, "status", timeout=10.0)
            table = root / "strace.txt"
            tracer = subprocess.Popen(
                ["strace", "-c", "-w", "-f", "-o", str(table),
                 "-e", "trace=%file,%desc,getdents64", "-p", str(side.mount.process.pid)])
            time.sleep(1.0)
            try:
                result = run_load(LoadConfig(
                    port=side.dovecot.port, users=list(users), password=PASSWORD,
                    clients=args.clients, duration=args.seconds, populate=30))
                after = control.call(sock, "status", timeout=10.0)
            finally:
                tracer.terminate()
                tracer.wait()
            strace_table = table.read_text()
        finally:
            side.stop()
    ops = max(result.total_ops, 1)
    lines = [
        f"Full overlay over sshfs (+{args.latency_ms:g} ms), {args.format}, {args.clients} "
        f"clients, {args.seconds:g} s, strace attached to the daemon",
        *(f"  {key}: {value}" for key, value in info.items()),
        "",
        f"IMAP operations: {result.total_ops} ({result.ops_per_s:.0f}/s under strace), "
        f"errors {result.total_errors}",
        "",
        "backing calls per IMAP operation (mailfs status):",
        *(f"  {name:<20}{value:6.2f}" for name, value in
          per_op(after["backing_calls_by_op"], before["backing_calls_by_op"], ops)),
        "",
        "FUSE requests per IMAP operation:",
        *(f"  {name:<20}{value:6.2f}" for name, value in
          per_op(after["requests"], before["requests"], ops)),
        "",
        "daemon system calls, wall time summed over threads (strace -c -w -f):",
        strace_table,
    ]
    out = RESULTS / f"backing_profile_{args.format}.txt"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
