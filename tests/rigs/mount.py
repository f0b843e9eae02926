"""Run a real mailfs mount in a subprocess, and always take it down again.

Tests, the demo and the benchmarks share this rig so that all of them exercise
the same command line an admin would type.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from mailfs.mounts import mount_type, real_mountpoint

MOUNT_TIMEOUT = 30.0


def mailfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mailfs", *args]


def run_cli(
    *args: str, timeout: float = 120.0, check: bool = False
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        mailfs_cmd(*args), capture_output=True, text=True, timeout=timeout, check=check
    )


def is_mounted(path: Path) -> bool:
    # real_mountpoint, not realpath: its lstat of the mountpoint would ask the mounted
    # filesystem, and a crashed daemon's held connection would make that wait.
    return mount_type(Path(real_mountpoint(path))) is not None


def force_unmount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


class MailfsMount:
    """One mailfs daemon in the foreground, its stderr captured to a log file.

    `backing` None makes an index-only mount.
    """

    def __init__(
        self,
        backing: Path | None,
        mountpoint: Path,
        state_dir: Path,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
    ) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.state_dir = state_dir
        self.extra_args = list(extra_args)
        self.log_path = log_path or state_dir.parent / f"{state_dir.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> MailfsMount:
        for path in (self.backing, self.mountpoint, self.state_dir):
            # Not a mountpoint still mounted (a crashed daemon's, held for the next one to
            # adopt): mkdir would ask that mount and wait with the rest of its callers.
            if path is not None and not (path == self.mountpoint and is_mounted(path)):
                path.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its life
        self.process = subprocess.Popen(
            mailfs_cmd(
                "mount", *([str(self.backing)] if self.backing else ["--index-only"]),
                str(self.mountpoint),
                "--state-dir", str(self.state_dir), "--foreground", *self.extra_args,
            ),
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(self.mountpoint):
            if self.process.poll() is not None:
                raise RuntimeError(f"mailfs exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mailfs did not mount within {MOUNT_TIMEOUT}s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, *umount_args: str) -> None:
        """Unmount the way an admin does: `mailfs umount`, which flushes first."""
        if self.process is None:
            return
        if self.process.poll() is None:
            result = run_cli("umount", str(self.mountpoint), *umount_args)
            if result.returncode != 0:
                self.kill()
                raise RuntimeError(f"mailfs umount failed: {result.stderr.strip()}")
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        self.process = None

    def kill(self) -> None:
        """kill -9, as a crash would, then clear the dead mount."""
        if self.process is None:
            return  # never started, or already stopped: the mountpoint may be another's now
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        force_unmount(self.mountpoint)
        self.process = None

    def problems(self) -> list[str]:
        """Log lines that mean something went wrong inside the daemon."""
        return [
            line for line in self.log().splitlines()
            if "Traceback" in line or " ERROR " in line or " CRITICAL " in line
        ]


@contextlib.contextmanager
def mounted(
    backing: Path | None, mountpoint: Path, state_dir: Path, extra_args: Sequence[str] = ()
) -> Iterator[MailfsMount]:
    mount = MailfsMount(backing, mountpoint, state_dir, extra_args)
    mount.start()
    try:
        yield mount
    finally:
        try:
            mount.stop()
        finally:
            mount.kill()
