"""Admin-facing errors and recovery through the real command line (found in review)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mount.conftest import Dirs
from tests.mount.test_cli import assert_one_line_error, run_mount_helper
from tests.rigs.mount import force_unmount, is_mounted, run_cli


@pytest.fixture
def cleanup(dirs: Dirs) -> Iterator[list[Path]]:
    """Mountpoints to take down at the end (background daemons exit on unmount)."""
    extra: list[Path] = [dirs.mnt]
    yield extra
    for path in extra:
        if is_mounted(path):
            run_cli("umount", str(path), timeout=30)
        force_unmount(path)


def mount_bg(dirs: Dirs, *more: str) -> subprocess.CompletedProcess[str]:
    return run_cli("mount", str(dirs.backing), str(dirs.mnt), "--state-dir", str(dirs.state),
                   *more, timeout=60)


def test_state_dir_is_a_file(dirs: Dirs, cleanup: list[Path]) -> None:
    afile = dirs.state.parent / "afile"
    afile.write_text("")
    for extra in ((), ("--foreground",)):
        result = run_cli("mount", str(dirs.backing), str(dirs.mnt), "--state-dir", str(afile),
                         *extra, timeout=30)
        assert_one_line_error(result, str(afile))


def test_run_dir_is_a_file_and_log_dir_missing(dirs: Dirs, cleanup: list[Path]) -> None:
    afile = dirs.state.parent / "afile"
    afile.write_text("")
    result = run_cli("mount", str(dirs.backing), str(dirs.mnt), "--state-dir", str(dirs.state),
                     "--run-dir", str(afile), "--foreground", timeout=30)
    assert_one_line_error(result, str(afile))
    assert not is_mounted(dirs.mnt)
    result = mount_bg(dirs, "--log-file", str(dirs.state.parent / "nodir" / "x.log"))
    assert_one_line_error(result, "nodir")


def test_config_path_is_a_directory_or_not_utf8(dirs: Dirs, cleanup: list[Path]) -> None:
    result = mount_bg(dirs, "--config", str(dirs.backing), "--foreground")
    assert_one_line_error(result, str(dirs.backing))
    bad = dirs.state.parent / "bad.toml"
    bad.write_bytes(b"\xff[mount]\n")
    assert_one_line_error(mount_bg(dirs, "--config", str(bad), "--foreground"), str(bad))


def test_bad_numbers_in_config_are_one_line(dirs: Dirs, cleanup: list[Path]) -> None:
    config = dirs.state.parent / "c.toml"
    for text, needle in (("[commit]\ninterval = nan", "commit.interval"),
                         ("[log]\nmetrics_port = 70000", "metrics_port")):
        config.write_text(text)
        result = mount_bg(dirs, "--config", str(config), "--foreground")
        force_unmount(dirs.mnt)
        assert_one_line_error(result, needle)


def test_metrics_port_in_use_is_one_line(dirs: Dirs, cleanup: list[Path]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = mount_bg(dirs, "-o", f"metrics_port={port}")
        if is_mounted(dirs.mnt):
            run_cli("umount", str(dirs.mnt), timeout=30)
        assert_one_line_error(result, str(port))


def test_empty_o_option_works_in_background(dirs: Dirs, cleanup: list[Path]) -> None:
    # `-o ""` is accepted in --foreground (parse_options skips empty items) ...
    result = mount_bg(dirs, "-o", "")
    # ... but the background parent re-passes it as a bare "-o" and the child dies (exit 2).
    assert result.returncode == 0, result.stderr
    assert is_mounted(dirs.mnt)


def test_mount_helper_empty_state_dir_is_refused(dirs: Dirs, cleanup: list[Path]) -> None:
    cwd = dirs.state.parent / "cwd"
    cwd.mkdir()
    helper = run_mount_helper(str(dirs.backing), str(dirs.mnt), "-o", "rw,state_dir=", cwd=cwd)
    used_cwd = (cwd / "lock").exists()
    if is_mounted(dirs.mnt):
        run_cli("umount", str(dirs.mnt), timeout=30)
    assert not used_cwd, "an empty state_dir= put LMDB and the lock into the cwd"
    assert_one_line_error(helper, "state_dir")


def test_mount_helper_ignores_generic_options(dirs: Dirs, cleanup: list[Path]) -> None:
    helper = run_mount_helper(str(dirs.backing), str(dirs.mnt), "-o",
                              f"rw,nodiratime,async,state_dir={dirs.state}")
    assert helper.returncode == 0, helper.stderr


def kill9(mnt: Path) -> None:
    state = json.loads(run_cli("status", str(mnt), "--json").stdout)
    os.kill(state["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{state['pid']}") and time.monotonic() < deadline:
        time.sleep(0.05)


def test_remount_after_kill9(dirs: Dirs, cleanup: list[Path]) -> None:
    """A mount over the dead mount a kill -9 left behind works, and loses nothing."""
    assert mount_bg(dirs).returncode == 0
    (dirs.mnt / "dovecot.index").write_bytes(b"kept")
    kill9(dirs.mnt)
    result = mount_bg(dirs)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert (dirs.mnt / "dovecot.index").read_bytes() == b"kept"


def test_umount_clears_a_crashed_mount(dirs: Dirs, cleanup: list[Path]) -> None:
    assert mount_bg(dirs).returncode == 0
    kill9(dirs.mnt)
    result = run_cli("umount", str(dirs.mnt), timeout=30)
    # The admin is told the daemon is "not answering" and the dead mount stays.
    assert not is_mounted(dirs.mnt), result.stderr


def test_control_socket_names_do_not_collide(dirs: Dirs, cleanup: list[Path]) -> None:
    base = dirs.state.parent
    first, second = base / "a-b" / "c", base / "a" / "b-c"
    for path in (first, second):
        path.mkdir(parents=True)
        path.chmod(0o755)
    cleanup += [first, second]
    assert run_cli("mount", str(dirs.backing), str(first), "--state-dir",
                   str(base / "s1")).returncode == 0
    first_pid = json.loads(run_cli("status", str(first), "--json").stdout)["pid"]
    try:
        assert run_cli("mount", str(dirs.backing), str(second), "--state-dir",
                       str(base / "s2")).returncode == 0
        state = json.loads(run_cli("status", str(first), "--json").stdout)
        assert state["mountpoint"] == str(first), "status of one mount answered by another"
    finally:
        run_cli("umount", str(second), timeout=60)
        force_unmount(first)
        if os.path.exists(f"/proc/{first_pid}"):
            os.kill(first_pid, signal.SIGTERM)


def test_backing_replaced_by_empty_dir_is_unhealthy(dirs: Dirs, cleanup: list[Path]) -> None:
    # e.g. the NFS export is unmounted under a running mailfs: an empty directory remains.
    assert mount_bg(dirs).returncode == 0
    (dirs.mnt / "INBOX").mkdir()
    (dirs.mnt / "INBOX" / "u.1").write_bytes(b"mail")
    moved = dirs.backing.with_name("backing.moved")
    dirs.backing.rename(moved)
    dirs.backing.mkdir()
    try:
        deadline = time.monotonic() + 30  # the probe runs every half second; CI may be slow
        while True:
            state = json.loads(run_cli("status", str(dirs.mnt), "--json").stdout)
            if state["healthy"] is False or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert state["healthy"] is False, "backing root swapped under the mount, status healthy"
    finally:
        dirs.backing.rmdir()
        moved.rename(dirs.backing)
