"""The mail root Dovecot writes into: a plain local directory, or a mailfs mount over one.

The local backend is the control: a test that fails on it is wrong, not mailfs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tests.rigs.dovecot import ensure_vmail_user, prepare_mail_root
from tests.rigs.mount import MailfsMount, is_mounted, run_cli

BACKENDS = ("local", "mailfs")


class MailStore:
    def __init__(self, backend: str, workdir: Path, extra_args: Sequence[str] = ()) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}, expected one of {BACKENDS}")
        self.backend = backend
        self.backing = workdir / "backing"
        self.mountpoint = workdir / "mnt"
        self.state_dir = workdir / "state"
        self.mount: MailfsMount | None = None
        if backend == "mailfs":
            self.mount = MailfsMount(
                self.backing, self.mountpoint, self.state_dir, extra_args,
                log_path=workdir / "mailfs.log",
            )

    @property
    def root(self) -> Path:
        return self.mountpoint if self.mount is not None else self.backing

    def start(self) -> MailStore:
        prepare_mail_root(self.backing)
        if self.mount is None:
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
        """Fixture teardown: never leaves a mount or a daemon behind."""
        if self.mount is None:
            return
        try:
            self.mount.stop()
        finally:
            self.mount.kill()

    def is_mounted(self) -> bool:
        return self.mount is not None and is_mounted(self.mountpoint)

    def problems(self) -> list[str]:
        return self.mount.problems() if self.mount is not None else []

    def log(self) -> str:
        return self.mount.log() if self.mount is not None else ""
