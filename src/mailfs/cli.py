"""mailfs mount | umount | flush | status | import | export, and mount.mailfs for fstab.

User errors print one line on stderr and exit 1; they never show a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mailfs import __version__, control, mounts
from mailfs.config import Config, apply_overrides, build, control_socket_for
from mailfs.errors import UserError, ensure_directory
from mailfs.fs.session import keeper

EXIT_USER_ERROR = 1
DEFAULT_CONFIG = Path("/etc/mailfs/mailfs.toml")
DEFAULT_RUN_DIR = Path("/run/mailfs")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mailfs", description=__doc__.splitlines()[0])
    top.add_argument("--version", action="version", version=f"mailfs {__version__}")
    sub = top.add_subparsers(dest="command", required=True)

    mount = sub.add_parser(
        "mount", help="mount a mailfs overlay over a backing path, or an index-only mount",
        usage="mailfs mount [--index-only] [BACKING] MOUNTPOINT [options]")
    mount.add_argument("paths", type=Path, nargs="+", metavar="[BACKING] MOUNTPOINT")
    mount.add_argument("--index-only", action="store_true",
                       help="no backing path: every file and directory in the meta store "
                            "(for Dovecot's INDEX= and CONTROL=)")
    mount.add_argument("--config", type=Path, help=f"TOML config (default {DEFAULT_CONFIG} "
                                                   "if it exists)")
    mount.add_argument("--state-dir", type=Path, help="LMDB and journal directory")
    mount.add_argument("--run-dir", type=Path, help="where the control socket goes")
    mount.add_argument("--ram-budget", help="RAM for cached index files, e.g. 256M")
    mount.add_argument("--foreground", "-f", action="store_true",
                       help="stay in the foreground and log to stderr")
    mount.add_argument("--log-file", type=Path,
                       help="log file in background mode (default STATE_DIR/mailfs.log)")
    mount.add_argument("--debug", action="store_true", help="log every request")
    mount.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config key, e.g. -o index_timeout=60")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    for name, text in (("umount", "flush, unmount, and wait until the data is safe"),
                       ("flush", "commit everything to LMDB and wait for it"),
                       ("status", "show counts, sizes, cache use and health"),
                       ("import", "adopt index files already on the backing path, or "
                                  "(index-only) from --from DIR"),
                       ("export", "write all index files back to the backing path, or "
                                  "(index-only) to --to DIR"),
                       ("owners", "list which node owns each user directory, with epochs"),
                       ("conflicts", "list this node's versions of files that lost to "
                                     "another node's takeover"),
                       ("takeover", "move a user directory to this node (a planned move: "
                                    "waits until its owner has sent every change)")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("mountpoint", type=Path)
        cmd.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "umount":
            cmd.add_argument("--timeout", type=float, default=300.0,
                             help="seconds to wait for the daemon to finish")
            cmd.add_argument("--force", action="store_true",
                             help="unmount even while a sync replication peer is behind")
        if name == "import":
            cmd.add_argument("--from", dest="source", type=Path,
                             help="index-only mounts: a directory tree to adopt")
        if name == "export":
            cmd.add_argument("--to", dest="target", type=Path,
                             help="index-only mounts: an existing directory to write into")
        if name in ("owners", "conflicts"):
            cmd.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "conflicts":
            cmd.add_argument("--save", type=Path,
                             help="write each version's content into this directory")
            cmd.add_argument("--purge", action="store_true",
                             help="forget the listed versions (after --save)")
        if name == "takeover":
            cmd.add_argument("user", help="the user directory, relative to the mount "
                                          "(as deep as ownership.depth)")
            cmd.add_argument("--timeout", type=float, default=30.0,
                             help="seconds to wait for the owner to show it has sent all")
            cmd.add_argument("--force", action="store_true",
                             help="take over even if the owner does not answer (its unsent "
                                  "changes are then fenced)")
        if name == "flush":
            cmd.add_argument("--timeout", type=float, default=60.0,
                             help="seconds to wait for connected peers to acknowledge")
            cmd.add_argument("--caches", action="store_true",
                             help="also make the kernel ask the backing store again about "
                                  "every mail file and directory (after changes made on the "
                                  "backing store directly)")
    return top


def parse_options(options: Sequence[str]) -> dict[str, str]:
    result = {}
    for option in options:
        for item in option.split(","):
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep:
                raise UserError(f"option {item!r} must look like key=value")
            result[key.strip()] = value.strip()
    return result


def mount_config(args: argparse.Namespace) -> Config:
    options = parse_options(args.option)
    for name in ("config", "state_dir", "run_dir", "log_file"):
        value = getattr(args, name, None)
        if value is not None and not str(value).strip(". "):
            raise UserError(f"--{name.replace('_', '-')} must not be empty")
    if "config" in options and not options["config"]:
        raise UserError("option config= must name a file")
    config_file = args.config or (Path(options.pop("config")) if "config" in options else None)
    if config_file is None and DEFAULT_CONFIG.exists():
        config_file = DEFAULT_CONFIG
    if len(args.paths) > 2:
        raise UserError("mount takes BACKING MOUNTPOINT, or MOUNTPOINT with --index-only")
    values: dict[str, object] = {"mountpoint": args.paths[-1].absolute()}
    if len(args.paths) == 2:
        values["backing"] = args.paths[0].absolute()
    if args.index_only:
        values["mode"] = "index-only"
    apply_overrides(values, options)
    if args.state_dir:
        values["state_dir"] = args.state_dir.absolute()
    if args.run_dir:
        values["run_dir"] = args.run_dir.absolute()
    if args.ram_budget:
        apply_overrides(values, {"ram_budget": args.ram_budget})
    if args.debug:
        values["log_level"] = "DEBUG"
    config = build(config_file, values)
    if config.mode == "full" and str(config.backing) in ("", "."):
        raise UserError("a full mount needs a backing path: mailfs mount BACKING MOUNTPOINT "
                        "(or --index-only MOUNTPOINT)")
    return config


def setup_logging(level: str, log_file: Path | None = None) -> None:
    handler: logging.Handler = (logging.FileHandler(log_file) if log_file
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if level != "DEBUG":
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def cmd_mount(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise UserError("mailfs must run as root (it mounts with allow_other and sets owners)")
    config = mount_config(args)
    if args.foreground:
        from mailfs import daemon

        setup_logging(config.log_level)
        try:
            return daemon.run(config, args.ready_fd)
        except UserError as exc:
            if args.ready_fd is not None:
                daemon.report_ready(args.ready_fd, f"error: {exc}")
            raise
    return spawn_background(args, config)


def spawn_background(args: argparse.Namespace, config: Config) -> int:
    """Start the daemon detached and return once it is mounted (or report why not)."""
    ensure_directory(config.state_dir, "state dir")
    log_file = args.log_file or config.state_dir / "mailfs.log"
    try:
        log = open(log_file, "ab")  # noqa: SIM115 - handed to the child below
    except OSError as exc:
        raise UserError(f"cannot open log file {log_file}: {exc.strerror}") from None
    read_end, write_end = os.pipe()
    argv = [
        sys.executable, "-m", "mailfs", "mount",
        *(["--index-only"] if config.mode == "index-only" else [str(config.backing)]),
        str(config.mountpoint),
        "--state-dir", str(config.state_dir), "--run-dir", str(config.run_dir),
        "--foreground", "--ready-fd", str(write_end),
        *(["--config", str(args.config)] if args.config else []),
        *[arg for option in args.option if option for arg in ("-o", option)],
        *(["--ram-budget", args.ram_budget] if args.ram_budget else []),
        *(["--debug"] if args.debug else []),
    ]
    with log:
        child = subprocess.Popen(argv, pass_fds=(write_end,), stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=log, start_new_session=True)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        answer = ready.readline().decode(errors="replace").strip()
    if answer == "ok":
        return 0
    if answer.startswith("error: "):
        raise UserError(answer[len("error: "):])
    child.wait(timeout=30)
    raise UserError(f"mailfs daemon exited with {child.returncode} before mounting; "
                    f"see {log_file}")


def socket_path(args: argparse.Namespace) -> Path:
    if os.geteuid() != 0:
        raise UserError("mailfs admin commands must run as root")
    return control_socket_for(args.run_dir, args.mountpoint)


def cmd_status(args: argparse.Namespace) -> int:
    status = control.call(socket_path(args), "status")
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print_status(status)
    return 0


def print_status(status: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    replication = status.get("replication")
    console.print(key_value_table(f"mailfs {status['mountpoint']}",
                                  {k: v for k, v in status.items() if k != "replication"}))
    if not isinstance(replication, dict):
        return
    peers = replication.get("peers", {})
    console.print(key_value_table(f"replication: node {replication['node_id']}",
                                  {k: v for k, v in replication.items()
                                   if k not in ("peers", "ownership")}))
    ownership = replication.get("ownership")
    if isinstance(ownership, dict):
        console.print(key_value_table("ownership of user directories", ownership))
    columns = {"connected": "out", "incoming_connected": "in", "acked_seq": "acked",
               "lag_changes": "lag", "lag_seconds": "lag s", "unacked_log_bytes": "unacked",
               "snapshot": "snapshot", "last_error": "last error"}
    table = Table(title="peers (out: our stream to it, in: its stream to us)")
    table.add_column("peer", style="bold")
    for header in columns.values():
        table.add_column(header, overflow="fold")
    for node_id, peer in peers.items():
        table.add_row(node_id, *(shown_value(column, peer.get(column)) for column in columns))
    console.print(table)


def key_value_table(title: str, values: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in values.items():
        table.add_row(key.replace("_", " "), shown_value(key, value))
    return table


def shown_value(key: str, value: Any) -> str:
    if key.endswith("_bytes") and isinstance(value, int):
        return human_size(value)
    return "-" if value is None or value == "" else str(value)


def human_size(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def cmd_flush(args: argparse.Namespace) -> int:
    result = control.call(socket_path(args), "flush", timeout=args.timeout + 60,
                          peer_timeout=args.timeout, caches=args.caches)
    print(f"flushed: committed through change {result['committed_seq']}")
    dropped = result.get("caches")
    if dropped is not None:
        print(f"caches dropped: {dropped['inodes']} files and directories, "
              f"{dropped['entries']} names, {dropped['missing_names']} missing names")
        if dropped.get("pending"):
            print(f"the kernel has not taken {dropped['pending']} of them yet (a stalled "
                  f"backing store holds it up); they follow when it answers")
    behind = result.get("peers_behind")
    if behind:
        print(f"peers still behind (unreachable, or slower than {args.timeout:.0f}s): "
              f"{', '.join(behind)}")
    elif behind is not None:
        print("every peer has acknowledged every change")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    source: dict[str, Any] = {"from": str(args.source.absolute())} if args.source else {}
    result = control.call(socket_path(args), "import", **source)
    print(f"imported {result['imported']} index files"
          + (f" from {args.source}" if args.source else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    target: dict[str, Any] = {"to": str(args.target.absolute())} if args.target else {}
    result = control.call(socket_path(args), "export", **target)
    print(f"exported {result['exported']} index files to "
          + (str(args.target) if args.target else "the backing path"))
    return 0


def cmd_owners(args: argparse.Namespace) -> int:
    result = control.call(socket_path(args), "owners")
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"owners seen by node {result['node_id']} (policy "
                        f"{result['policy']}, depth {result['depth']})")
    for column in ("user", "owner", "epoch", "since (UTC)", "lost here"):
        table.add_column(column)
    for owner in result["owners"]:
        table.add_row(owner["user"], owner["node"], str(owner["epoch"]),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(owner["since"])),
                      "yes: writes refused" if owner["lost_here"] else "")
    Console().print(table)
    return 0


def cmd_conflicts(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {"purge": args.purge}
    if args.save is not None:
        extra["save"] = str(args.save.absolute())
    result = control.call(socket_path(args), "conflicts", **extra)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    if not result["versions"]:
        print("no versions on this node lost to a takeover")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="versions on this node that lost to a takeover")
    for column in ("when (UTC)", "user", "path", "bytes", "lost to", "epoch"):
        table.add_column(column, overflow="fold")
    for version in result["versions"]:
        table.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(version["when"])),
                      version["user"], version["path"], str(version["bytes"]),
                      version["winner"], str(version["epoch"]))
    Console().print(table)
    if result["saved"]:
        print(f"saved {len(result['saved'])} versions into {args.save}")
    if result["purged"]:
        print(f"forgot {result['purged']} versions")
    return 0


def cmd_takeover(args: argparse.Namespace) -> int:
    result = control.call(socket_path(args), "takeover", timeout=args.timeout + 60,
                          user=args.user, wait=args.timeout, force=args.force)
    before = result["previous_owner"] or "nobody"
    print(f"{result['user']} is owned by this node now (epoch {result['epoch']}, "
          f"was {before})")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    path = socket_path(args)
    try:
        pid = int(control.call(path, "status")["pid"])
    except UserError:
        if not mounts.is_dead_mailfs_mount(args.mountpoint, path):
            raise
        mountpoint = mounts.real_mountpoint(args.mountpoint)
        os.chdir("/")  # a shell inside the dead mount must not make us one of its users
        if keeper.end_holds(mountpoint):
            print("ended the crash hold of its FUSE connection (the daemon's log names the "
                  "processes that still used it)")
        mounts.clear_dead_mount(Path(mountpoint))
        print(f"cleared the mount of a mailfs daemon that had died; its changes are replayed "
              f"from the journal at the next mount of {args.mountpoint}")
        return 0
    control.call(path, "flush")
    blockers = control.call(path, "unmount_check", force=args.force)["blockers"]
    if blockers:
        raise UserError(f"not unmounting {args.mountpoint}: sync replication peer "
                        f"{'; '.join(blockers)}; wait for it, or use --force")
    result = subprocess.run(["fusermount3", "-u", str(args.mountpoint)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        raise UserError(f"cannot unmount {args.mountpoint}: {reason}")
    deadline = time.monotonic() + args.timeout
    while os.path.exists(f"/proc/{pid}") and not is_zombie(pid):
        if time.monotonic() > deadline:
            raise UserError(f"unmounted, but the daemon (pid {pid}) did not finish within "
                            f"{args.timeout:.0f}s; its data is in its journal")
        time.sleep(0.05)
    return 0


def is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


COMMANDS = {"mount": cmd_mount, "umount": cmd_umount, "flush": cmd_flush,
            "status": cmd_status, "import": cmd_import, "export": cmd_export,
            "owners": cmd_owners, "conflicts": cmd_conflicts, "takeover": cmd_takeover}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"mailfs: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


def mount_helper_main(argv: Sequence[str] | None = None) -> int:
    """mount.mailfs BACKING MOUNTPOINT [-o opts]: what mount(8) calls for fstab entries.

    mount(8) passes generic options (rw, noauto, _netdev, ...) along with ours; the
    generic ones are mount(8)'s business, so drop them.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    generic = {"rw", "ro", "auto", "noauto", "user", "nouser", "users", "owner", "group",
               "_netdev", "nofail", "defaults", "exec", "noexec", "suid", "nosuid", "dev",
               "nodev", "atime", "noatime", "relatime", "norelatime", "strictatime",
               "nostrictatime", "lazytime", "nolazytime", "diratime", "nodiratime", "async",
               "sync", "dirsync", "mand", "nomand", "iversion", "noiversion", "silent",
               "loud", "remount", "bind", "rbind", "comment"}
    positional: list[str] = []
    options: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "-o" and index + 1 < len(args):
            options.extend(o for o in args[index + 1].split(",")
                           if o and o not in generic and not o.startswith("x-"))
            index += 2
            continue
        if arg in ("-n", "-s", "-v", "-f", "-r", "-w"):  # mount(8) flags, no meaning here
            index += 1
            continue
        if arg in ("-t", "-N") and index + 1 < len(args):  # fs type, namespace: mount's
            index += 2
            continue
        positional.append(arg)
        index += 1
    if len(positional) != 2:
        print("usage: mount.mailfs BACKING MOUNTPOINT [-o key=value,...]", file=sys.stderr)
        return EXIT_USER_ERROR
    # An index-only fstab line has no backing path; its source field is a mere label.
    index_only = "mode=index-only" in options
    forwarded = ["mount", *(positional[1:] if index_only else positional)]
    for option in options:
        key, _, value = option.partition("=")
        if key in ("state_dir", "config", "run_dir"):
            if not value:
                print(f"mailfs: option {key}= must name a path", file=sys.stderr)
                return EXIT_USER_ERROR
            forwarded += [f"--{key.replace('_', '-')}", value]
        else:
            forwarded += ["-o", option]
    return main(forwarded)
