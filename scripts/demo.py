"""mailfs demo: Dovecot with mailfs, one short IMAP session per layout, then a clean shutdown.

First the recommended index-only layout (mail on a plain directory, INDEX= and CONTROL= on
an index-only mailfs mount), then the full overlay (the whole mail_location on mailfs).

Run with `make demo` (as root: it mounts with allow_other and runs Dovecot as vmail).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.rigs.dovecot import DEFAULT_USERS, MAIL_FORMATS, Dovecot, prepare_mail_root
from tests.rigs.imap import connect, make_message, message_subject
from tests.rigs.mailstore import MailStore
from tests.rigs.mount import MailfsMount, run_cli

console = Console(highlight=False)
USER = "alice"


def step(text: str) -> None:
    console.print(f"[bold cyan]>[/] {text}")


def imap_session(port: int) -> None:
    step(f"login as {USER}")
    client = connect(port, USER, DEFAULT_USERS[USER])
    try:
        step("create folder Projects")
        client.create_folder("Projects")

        messages = [make_message(i, size) for i, size in enumerate((400, 3000, 20_000))]
        for message in messages:
            response = client.append("INBOX", message)
            step(f"append {len(message):>6} bytes '{message_subject(message)}': "
                 f"{response.decode(errors='replace')}")

        info = client.select_folder("INBOX")
        step(f"select INBOX: EXISTS={info[b'EXISTS']} UIDVALIDITY={info[b'UIDVALIDITY']} "
             f"UIDNEXT={info[b'UIDNEXT']}")

        uids = client.search(["ALL"])
        fetched = client.fetch(uids, ["ENVELOPE", "RFC822.SIZE", "BODY.PEEK[]<0.40>"])
        table = Table("UID", "size", "subject", "first 40 bytes")
        for uid in uids:
            data = fetched[uid]
            table.add_row(str(uid), str(data[b"RFC822.SIZE"]),
                          data[b"ENVELOPE"].subject.decode(), repr(data[b"BODY[]<0>"]))
        step("fetch envelopes, sizes and a partial body")
        console.print(table)

        client.add_flags([uids[0]], [b"\\Flagged", b"$Important"])
        step(f"flag UID {uids[0]}: {client.get_flags([uids[0]])[uids[0]]}")
        step(f"search FLAGGED: {client.search(['FLAGGED'])}")

        client.move([uids[1]], "Projects")
        step(f"move UID {uids[1]} to Projects: INBOX now {client.search(['ALL'])}")

        client.add_flags([uids[2]], [b"\\Deleted"])
        client.expunge()
        step(f"expunge UID {uids[2]}: INBOX now {client.search(['ALL'])}")
    finally:
        client.logout()
        step("logout")


def show_split(store: MailStore) -> None:
    """Which files Dovecot sees on the mount, and which of them reached the backing dir."""
    table = Table("file on the mount", "in backing dir?")
    for path in sorted(store.root.rglob("*")):
        if path.is_file() and path.name.startswith(("dovecot", "subscriptions")):
            relative = path.relative_to(store.root)
            table.add_row(str(relative), "yes" if (store.backing / relative).exists() else "no")
    console.print(table)


def show_status(mountpoint: Path) -> None:
    step("mailfs status")
    status = run_cli("status", str(mountpoint))
    console.print(status.stdout.rstrip() or status.stderr.rstrip(), markup=False)


def report(problems: list[str]) -> bool:
    for line in problems:
        console.print(f"[red]problem:[/] {line}", markup=True)
    return not problems


def index_only_layout(args: argparse.Namespace, workdir: Path) -> bool:
    """Mail on a plain directory; INDEX= and CONTROL= on an index-only mailfs mount."""
    console.rule("index-only layout (recommended)")
    mail_root = prepare_mail_root(workdir / "mail")
    index_root = prepare_mail_root(workdir / "index")  # vmail's: the mount root shows it
    mount = MailfsMount(None, index_root, workdir / "state", shlex.split(args.mount_args),
                        log_path=workdir / "mailfs.log")
    dovecot = Dovecot(workdir / "dovecot", mail_root, args.format, index_root=index_root)
    ok = False
    try:
        step(f"mount mailfs --index-only at {index_root} (state {workdir / 'state'})")
        mount.start()
        step(f"start Dovecot ({args.format}) with mail in {mail_root} and INDEX=/CONTROL= on "
             f"the mount, 127.0.0.1:{dovecot.port}")
        dovecot.start()
        imap_session(dovecot.port)
        show_status(index_root)
        table = Table("on the index-only mount", "bytes")
        for path in sorted(index_root.rglob("*")):
            if path.is_file():
                table.add_row(str(path.relative_to(index_root)), str(path.stat().st_size))
        console.print(table)
        ok = report(dovecot.log_problems() + dovecot.index_rebuild_lines() + mount.problems())
    except Exception as exc:
        console.print(f"[bold red]demo failed:[/] {type(exc).__name__}: {exc}")
    finally:
        step("stop Dovecot, mailfs umount")
        try:
            dovecot.stop()
        finally:
            dovecot.kill()
            try:
                mount.stop()
            except Exception as exc:
                console.print(f"[bold red]umount failed:[/] {exc}")
                ok = False
            finally:
                mount.kill()
    return ok


def full_overlay(args: argparse.Namespace, workdir: Path) -> bool:
    """The whole mail_location on a mailfs mount over a backing directory."""
    console.rule("full overlay")
    store = MailStore("mailfs", workdir, shlex.split(args.mount_args))
    dovecot = Dovecot(workdir / "dovecot", store.root, args.format)
    ok = False
    try:
        step(f"mount mailfs: {store.backing} -> {store.mountpoint} (state {store.state_dir})")
        store.start()
        step(f"start Dovecot ({args.format}) on 127.0.0.1:{dovecot.port}, log {dovecot.log_path}")
        dovecot.start()
        imap_session(dovecot.port)
        show_status(store.mountpoint)
        show_split(store)
        ok = report(dovecot.log_problems() + dovecot.index_rebuild_lines() + store.problems())
    except Exception as exc:
        console.print(f"[bold red]demo failed:[/] {type(exc).__name__}: {exc}")
        for line in dovecot.log_problems() + store.problems():
            console.print(f"[red]log:[/] {line}")
    finally:
        step("stop Dovecot")
        try:
            dovecot.stop()
        finally:
            dovecot.kill()
            step("mailfs umount")
            try:
                store.stop()
            except Exception as exc:
                console.print(f"[bold red]umount failed:[/] {exc}")
                ok = False
            finally:
                store.close()
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--format", choices=MAIL_FORMATS, default="maildir")
    parser.add_argument("--layout", choices=("both", "index-only", "full"), default="both")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--mount-args", default="", metavar="ARGS",
                        help="extra `mailfs mount` arguments, e.g. \"-o index_timeout=60\"")
    args = parser.parse_args()

    # Under /tmp, not the checkout: vmail must be able to reach the mail root.
    workdir = Path(tempfile.mkdtemp(prefix="mailfs-demo-", dir="/tmp"))
    workdir.chmod(0o755)
    ok = True
    if args.layout in ("both", "index-only"):
        ok = index_only_layout(args, workdir / "index-only") and ok
    if args.layout in ("both", "full"):
        ok = full_overlay(args, workdir / "full") and ok
    if args.keep or not ok:
        console.print(f"logs and data kept in {workdir}")
    elif not any(p.is_mount() for p in workdir.rglob("*") if p.is_dir()):
        shutil.rmtree(workdir, ignore_errors=True)
    console.print("[bold green]demo finished cleanly[/]" if ok else "[bold red]demo failed[/]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
