"""Run Debian's real Dovecot against a mail root (a mailfs mount or a plain directory).

Every instance is private: its own config, base_dir, state_dir, log file and loopback port,
so several can run side by side with a system Dovecot and never touch /run/dovecot.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

DOVECOT = "/usr/sbin/dovecot"
DOVEADM = "/usr/bin/doveadm"
MAIL_USER = "vmail"
MAIL_FORMATS = ("maildir", "sdbox", "mdbox")
DEFAULT_USERS: Mapping[str, str] = {"alice": "alice-secret", "bob": "bob-secret"}
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

PROBLEM_RE = re.compile(r"\b(Error|Panic|Fatal):")

# Messages Dovecot 2.3 logs when it finds an index, log, cache, list index or uidlist that is
# damaged, missing or inconsistent and repairs or rebuilds it.  They were taken from the
# format strings in libdovecot-storage.so (2.3.19) and cross-checked against the sources;
# most are logged as Error:, but several (fsck, rebuild, "Fixed", sdbox/mdbox rebuilds) are
# Warning: or Info:, which is why log_problems() alone is not enough after a restart.
# Some losses are silent (a deleted dovecot-uidlist or sdbox index, a garbled log header):
# only comparing imap.mailbox_state() before and after catches those.
REBUILD_PATTERNS: tuple[str, ...] = (
    r"[Cc]orrupt",                        # index/log/cache/list index/dbox/uidlist corruption
    r"[Rr]ebuild",                        # sdbox/mdbox "Rebuilding index", list index rebuilds
    r"fscking",                           # mail_index_fsck after an inconsistency
    r"\bFixed ",                          # "Fixed index file", "Fixed a duplicate"
    r"UIDVALIDITY changed",               # maildir uidlist or index lost its uidvalidity
    r"reappeared",                        # expunged messages came back: uidlist/index rolled back
    r"Lost log for seq",                  # transaction log gone or truncated under the index
    r"Missing middle file seq",           # a .log/.log.2 in the chain is missing
    r"generating missing logs",
    r"indexid changed",                   # index file replaced by an unrelated one
    r"Broken (file|index|or unexpectedly|.* indexes, resetting)",
    r"Duplicate file entry",              # dovecot-uidlist lists one file twice
    r"inserted in the middle of mailbox",
    r"view is inconsistent",
    r"Need to recreate index",
    r"recreated while we had it locked",  # log replaced under an fcntl lock: locking broken
    r"unexpectedly (deleted|replaced|lost)",
    r"Purging (lost|unexpectedly lost)",
    r"keeps breaking",
    r"X-IMAPbase uid-last",
    r"uidvalidity mismatch",              # mdbox map index does not match the storage
    r"map uid lost",
    r"Failed to map transaction log",
)
REBUILD_RE = re.compile("|".join(f"(?:{p})" for p in REBUILD_PATTERNS))


def ensure_vmail_user() -> tuple[int, int]:
    """Create the unprivileged mail user Dovecot runs as (it refuses to touch mail as root)."""
    try:
        grp.getgrnam(MAIL_USER)
    except KeyError:
        subprocess.run(["groupadd", "--system", MAIL_USER], check=True)
    try:
        entry = pwd.getpwnam(MAIL_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--gid", MAIL_USER, "--home-dir", "/nonexistent",
             "--no-create-home", "--shell", "/usr/sbin/nologin", MAIL_USER],
            check=True,
        )
        entry = pwd.getpwnam(MAIL_USER)
    return entry.pw_uid, entry.pw_gid


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mail_location(mail_format: str, index_root: Path | None = None) -> str:
    """Index and control files next to the mail (the full-overlay layout), or, with
    index_root, under it (the index-only layout: INDEX= and CONTROL= on an index-only
    mailfs mount, mail read straight from the mail root)."""
    if mail_format not in MAIL_FORMATS:
        raise ValueError(f"unknown mail format {mail_format!r}, expected one of {MAIL_FORMATS}")
    directory = "Maildir" if mail_format == "maildir" else mail_format
    location = f"{mail_format}:~/{directory}"
    if index_root is not None:
        location += f":INDEX={index_root}/%u/index:CONTROL={index_root}/%u/control"
    return location


def render_config(
    *, base_dir: Path, state_dir: Path, log_path: Path, passwd_file: Path, mail_root: Path,
    mail_format: str, port: int, uid: int, gid: int, instance: str, greeting: str,
    mail_fsync: str = "optimized", index_root: Path | None = None,
) -> str:
    # Built from scratch rather than from /etc/dovecot so a system config cannot leak in.
    return f"""\
instance_name = {instance}
login_greeting = {greeting}
base_dir = {base_dir}
state_dir = {state_dir}
protocols = imap
listen = 127.0.0.1
log_path = {log_path}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = {min(uid, 500)}
first_valid_gid = {min(gid, 500)}
mail_max_userip_connections = 200

mail_location = {mail_location(mail_format, index_root)}
# Settings for mail on a FUSE filesystem: mailfs serves index files from its cache, so
# mmap is fine and fcntl locks work; O_EXCL dot-locks are what mailfs's lock class expects.
mmap_disable = no
mail_fsync = {mail_fsync}
lock_method = fcntl
dotlock_use_excl = yes
mail_nfs_index = no
mail_nfs_storage = no

namespace inbox {{
  inbox = yes
  separator = /
}}

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd_file}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={mail_root}/%u
}}

service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""


class Dovecot:
    """One private Dovecot master in the foreground, IMAP on 127.0.0.1:port."""

    def __init__(
        self,
        workdir: Path,
        mail_root: Path,
        mail_format: str = "maildir",
        users: Mapping[str, str] = DEFAULT_USERS,
        port: int | None = None,
        mail_fsync: str = "optimized",
        index_root: Path | None = None,
    ) -> None:
        """mail_fsync="always" makes Dovecot fsync every index change, not only mail files:
        what a node crash may then lose is only what no IMAP command has confirmed yet."""
        if mail_fsync not in ("optimized", "always", "never"):
            raise ValueError(f"unknown mail_fsync {mail_fsync!r}")
        self.mail_fsync = mail_fsync
        self.index_root = index_root
        self.workdir = workdir
        self.mail_root = mail_root
        self.mail_format = mail_format
        self.users = dict(users)
        self._auto_port = port is None
        self.port = port or free_port()
        self.config_path = workdir / "dovecot.conf"
        self.log_path = workdir / "dovecot.log"
        self.stdout_path = workdir / "dovecot.stdout"
        self.base_dir = workdir / "run"
        self.process: subprocess.Popen[bytes] | None = None
        self.greeting = f"mailfs-test-{os.getpid()}-{id(self):x}"
        mail_location(mail_format)  # validate early

    def write_config(self) -> None:
        uid, gid = ensure_vmail_user()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The auth process (user dovecot) reads the passwd-file and the login process
        # (dovenull) chroots under base_dir, so the work dir must be traversable by them.
        self.workdir.chmod(0o755)
        state_dir = self.workdir / "state"
        state_dir.mkdir(exist_ok=True)
        passwd_file = self.workdir / "passwd"
        passwd_file.write_text(
            "".join(f"{user}:{{PLAIN}}{password}::::::\n" for user, password in self.users.items())
        )
        passwd_file.chmod(0o644)
        self.config_path.write_text(render_config(
            base_dir=self.base_dir, state_dir=state_dir, log_path=self.log_path,
            passwd_file=passwd_file, mail_root=self.mail_root, mail_format=self.mail_format,
            port=self.port, uid=uid, gid=gid, instance=f"mailfs-test-{self.port}",
            greeting=self.greeting, mail_fsync=self.mail_fsync, index_root=self.index_root,
        ))

    def start(self) -> Dovecot:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("Dovecot is already running")
        for _attempt in range(3):
            if self._start_once():
                return self
            # Someone took the port between free_port() and Dovecot's bind: take another.
            self.port = free_port() if self._auto_port else self.port
        raise RuntimeError(f"dovecot could not bind a port:\n{self._startup_output()}")

    def _start_once(self) -> bool:
        self.write_config()
        log_mark = self.log_offset()
        with open(self.stdout_path, "ab") as out:
            process = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(self.config_path)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        self.process = process
        deadline = time.monotonic() + START_TIMEOUT
        while not self._greets():
            if process.poll() is not None:
                if self._auto_port and "Address already in use" in self.log_text()[log_mark:]:
                    return False
                raise RuntimeError(
                    f"dovecot exited with {process.returncode}:\n{self._startup_output()}"
                )
            if time.monotonic() > deadline:
                self._kill_all()
                raise RuntimeError(f"dovecot did not listen within {START_TIMEOUT}s:\n"
                                   f"{self._startup_output()}")
            time.sleep(0.05)
        return True

    def _greets(self) -> bool:
        # Only our own greeting counts: a bare connect could reach another server on the port,
        # and the greeting only comes once imap-login is up.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                return self.greeting.encode() in sock.recv(256)
        except OSError:
            return False

    def _startup_output(self) -> str:
        parts = []
        for path in (self.stdout_path, self.log_path):
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop cleanly and wait until every imap process has gone, so the mount is idle."""
        if self.process is None:
            return
        if self.process.poll() is None:
            children = _descendants(self.process.pid)
            # SIGTERM is what `doveadm stop` sends too, but doveadm then polls for ~3 s.
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._kill_all()
                raise RuntimeError("dovecot did not stop; killed it") from None
            if not _wait_gone(children, STOP_TIMEOUT):
                _kill_pids(children)
                raise RuntimeError(f"dovecot children {sorted(children)} outlived the master")
        self.process = None

    def kill(self) -> None:
        """Last-resort cleanup for fixtures: never raises, leaves no process behind."""
        if self.process is not None and self.process.poll() is None:
            self._kill_all()
        self.process = None

    def freeze(self) -> None:
        """SIGSTOP the master and every child: with a kill -9 of mailfs right after, what
        a machine that dies does to both at one instant."""
        if self.process is None:
            return
        for pid in {self.process.pid} | _descendants(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def _kill_all(self) -> None:
        if self.process is None:
            return
        children = _descendants(self.process.pid)
        self.process.kill()
        self.process.wait(timeout=STOP_TIMEOUT)
        _kill_pids(children)
        _wait_gone(children, STOP_TIMEOUT)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self, since: int = 0) -> list[str]:
        return self.log_text()[since:].splitlines()

    def log_offset(self) -> int:
        """A mark to pass as `since`, to look only at what was logged after it."""
        return len(self.log_text())

    def log_problems(self, since: int = 0) -> list[str]:
        return [line for line in self.log_lines(since) if PROBLEM_RE.search(line)]

    def index_rebuild_lines(self, since: int = 0) -> list[str]:
        return [line for line in self.log_lines(since) if REBUILD_RE.search(line)]

    def user_home(self, user: str) -> Path:
        return self.mail_root / user

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()


def _descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # The command name may contain spaces; the ppid is the 2nd field after ")".
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents[int(entry)] = ppid
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pids: set[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill_pids(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def prepare_mail_root(path: Path) -> Path:
    """A directory vmail can create user homes in, reachable through 0755 parents."""
    uid, gid = ensure_vmail_user()
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, gid)
    path.chmod(0o755)
    for parent in path.resolve().parents:
        if parent.stat().st_mode & 0o001 == 0:
            raise PermissionError(f"{parent} is not searchable by {MAIL_USER}; use /tmp")
    return path


def dovecot_available() -> bool:
    return Path(DOVECOT).exists() and Path(DOVEADM).exists()
