"""Failover benchmark: kill -9 of the node serving a user under IMAP load, Dovecot on the
other node takes over, the killed node comes back (tests/rigs/failover.py).

Per mail format and durability mode, over several rounds:
- seconds from the kill until Dovecot on B answers a SELECT of the user's INBOX (this
  includes starting Dovecot on B, as an admin or a load balancer would);
- changes A's IMAP client was told of (APPEND and STORE answered OK) that B lacks: the
  changes lost in async mode (sync with mail_fsync=always must lose none);
- changes of A that B fenced when A came back, and the losing versions A kept;
- whether A's return changed anything B's Dovecot sees, or made it log trouble.

    python -m bench.failover                   # 3 formats x async/sync, 3 rounds: ~6 min
    python -m bench.failover --rounds 1 --formats sdbox
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from bench.run_all import machine_info, table  # noqa: E402
from tests.rigs.failover import FailoverResult, failover_rig, run_failover  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def summarize(results: dict[str, list[FailoverResult]]) -> list[str]:
    rows = []
    for label, runs in results.items():
        serve = [r.seconds_to_serve for r in runs]
        rows.append([
            label, str(len(runs)),
            f"{statistics.median(serve):.2f}", f"{max(serve):.2f}",
            str(sum(r.acknowledged_appends + r.acknowledged_stores for r in runs)),
            str(sum(r.lost_changes for r in runs)),
            ", ".join(str(r.lost_changes) for r in runs),
            str(sum(r.fenced_on_b for r in runs)),
            str(sum(r.conflict_versions_on_a for r in runs)),
            str(sum(bool(r.dovecot_b_trouble_after_return or r.b_changes_by_return)
                    for r in runs)),
        ])
    return table(["config", "rounds", "serve s p50", "serve s max", "acked changes",
                  "lost", "lost per round", "fenced on B", "losing versions on A",
                  "rounds where A's return touched B"], rows)


def chart(results: dict[str, list[FailoverResult]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, label in enumerate(labels):
        serve = [r.seconds_to_serve for r in results[label]]
        left.scatter([index] * len(serve), serve, color="tab:blue")
        lost = [r.lost_changes for r in results[label]]
        right.scatter([index] * len(lost), lost, color="tab:red")
    for axis, title in ((left, "kill -9 of A -> Dovecot on B answers SELECT (s)"),
                        (right, "changes A's client was told of, missing on B")):
        axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        axis.set_title(title)
        axis.set_ylim(bottom=0)
        axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--formats", default="maildir,sdbox,mdbox")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results: dict[str, list[FailoverResult]] = {}
    for mail_format in args.formats.split(","):
        for durability in ("async", "sync"):
            label = f"{mail_format} {durability}"
            for round_number in range(args.rounds):
                with failover_rig(mail_format, durability) as rig:
                    result = run_failover(rig)
                results.setdefault(label, []).append(result)
                print(f"{label} round {round_number + 1}: serve {result.seconds_to_serve:.2f}s,"
                      f" lost {result.lost_changes} of "
                      f"{result.acknowledged_appends + result.acknowledged_stores}, fenced "
                      f"{result.fenced_on_b}", flush=True)
    info = machine_info(RESULTS)
    text = "\n".join([
        "Failover: kill -9 of A (mailfs and Dovecot) under IMAP load, Dovecot on B takes "
        "over, A comes back",
        f"machine: {info}",
        "full overlay, 2 nodes over one local backing directory, loopback TLS; sync = "
        "durability sync with Dovecot mail_fsync=always",
        "",
        *summarize(results),
        "",
    ])
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "failover.txt").write_text(text)
    (args.results / "failover.json").write_text(json.dumps(
        {label: [asdict(r) for r in runs] for label, runs in results.items()}, indent=1))
    chart(results, args.results / "failover.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
