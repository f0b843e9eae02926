"""Where Dovecot keeps mail and indexes in a test: a plain local directory, a mailfs full
overlay over one or over sshfs with added latency, or the index-only layout (mail on a plain
directory or on sshfs, INDEX= and CONTROL= on an index-only mailfs mount).

The local backend is the control: a test that fails on it is wrong, not mailfs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from tests.rigs.dovecot import MAIL_USER, ensure_vmail_user, prepare_mail_root
from tests.rigs.mount import MailfsMount, is_mounted, run_cli
from tests.rigs.sshfs import SshfsMount, sshfs_backing

# local: everything on a plain directory. mailfs: the whole mail_location on a full overlay.
# index-only: mail on a plain directory, INDEX/CONTROL on an index-only mount.
# index-only-sshfs: the same with the mail on sshfs from a network namespace.
# mailfs-sshfs: the full overlay over that sshfs, with a round trip of about 1 ms added, as
# over NFS in a LAN (issue 9).
BACKENDS = ("local", "mailfs", "index-only", "index-only-sshfs", "mailfs-sshfs")
SSHFS_BACKENDS = ("index-only-sshfs", "mailfs-sshfs")
FULL_OVERLAY_LATENCY_MS = 1.0


class MailStore:
    def __init__(self, backend: str, workdir: Path, extra_args: Sequence[str] = ()) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}, expected one of {BACKENDS}")
        self.backend = backend
        self.workdir = workdir
        self.backing = workdir / "backing"
        self.mountpoint = workdir / "mnt"
        self.state_dir = workdir / "state"
        self.mount: MailfsMount | None = None
        self.sshfs: SshfsMount | None = None
        self._network = contextlib.ExitStack()
        if backend != "local":
            backing = self.backing if self.full_overlay else None
            self.mount = MailfsMount(
                backing, self.mountpoint, self.state_dir, extra_args,
                log_path=workdir / "mailfs.log",
            )

    @property
    def index_only(self) -> bool:
        return self.backend.startswith("index-only")

    @property
    def full_overlay(self) -> bool:
        return self.backend in ("mailfs", "mailfs-sshfs")

    @property
    def root(self) -> Path:
        """Dovecot's mail root."""
        if self.full_overlay:
            return self.mountpoint
        if self.sshfs is not None:
            return self.sshfs.mountpoint
        return self.backing

    @property
    def index_root(self) -> Path | None:
        """Where INDEX= and CONTROL= point, or None for Dovecot's default (next to the mail)."""
        return self.mountpoint if self.index_only else None

    def start(self) -> MailStore:
        if self.backend in SSHFS_BACKENDS and self.sshfs is None:
            latency = FULL_OVERLAY_LATENCY_MS if self.full_overlay else 0.0
            self.sshfs = self._network.enter_context(sshfs_backing(
                self.workdir / "network", latency_ms=latency, user=MAIL_USER))
            if self.full_overlay:
                self.backing = self.sshfs.mountpoint / "backing"
                assert self.mount is not None
                self.mount.backing = self.backing
        prepare_mail_root(self.backing if self.full_overlay else self.root)
        if self.mount is None:
            return self
        if self.index_only:
            prepare_mail_root(self.mountpoint)  # the mount's root shows this directory's owner
            self.mount.start()
            return self
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.mountpoint.chmod(0o755)
        self.mount.start()
        uid, gid = ensure_vmail_user()
        if self.mountpoint.stat().st_uid != uid:
            # Dovecot creates each user's home in the root as vmail, so the root must be
            # vmail's; mailfs should pass the backing root's owner through, this is a fallback.
            os.chown(self.mountpoint, uid, gid)
        return self

    def stop(self) -> None:
        """`mailfs umount`: the clean way, which must keep everything."""
        if self.mount is not None:
            self.mount.stop()

    def crash(self) -> None:
        """`mailfs flush`, then kill -9 of the daemon: the remount must restore everything."""
        if self.mount is None:
            return
        result = run_cli("flush", str(self.mountpoint))
        if result.returncode != 0:
            raise RuntimeError(f"mailfs flush failed ({result.returncode}): {result.stderr}")
        self.mount.kill()

    def close(self) -> None:
        """Fixture teardown: never leaves a mount, a daemon or a namespace behind."""
        try:
            if self.mount is not None:
                try:
                    self.mount.stop()
                finally:
                    self.mount.kill()
        finally:
            self.sshfs = None
            self._network.close()

    def is_mounted(self) -> bool:
        return self.mount is not None and is_mounted(self.mountpoint)

    def problems(self) -> list[str]:
        return self.mount.problems() if self.mount is not None else []

    def log(self) -> str:
        return self.mount.log() if self.mount is not None else ""
