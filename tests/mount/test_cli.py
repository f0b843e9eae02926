"""Every admin command and every user error, through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailfs.cli import is_zombie
from tests.mount.conftest import Dirs
from tests.rigs.mount import MailfsMount, force_unmount, is_mounted, run_cli

MakeMount = Callable[..., MailfsMount]
REPO = Path(__file__).resolve().parents[2]
VENV_SITE = next((REPO / ".venv" / "lib").glob("python3*/site-packages"), None)


def assert_one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mailfs: ")
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture
def background(dirs: Dirs) -> Iterator[Path]:
    """A mount started the way an admin does: `mailfs mount` without --foreground."""
    yield dirs.mnt
    if is_mounted(dirs.mnt):
        run_cli("umount", str(dirs.mnt))
    force_unmount(dirs.mnt)


def test_background_mount_status_flush_umount(dirs: Dirs, background: Path) -> None:
    result = run_cli("mount", str(dirs.backing), str(dirs.mnt), "--state-dir", str(dirs.state))
    assert result.returncode == 0, result.stderr
    assert is_mounted(dirs.mnt)
    (dirs.mnt / "dovecot.index").write_bytes(b"x" * 1000)
    (dirs.mnt / "dovecot.index.log.newlock").write_bytes(b"y")
    (dirs.mnt / "u.1").write_bytes(b"mail")
    flushed = run_cli("flush", str(dirs.mnt))
    assert flushed.returncode == 0 and "flushed" in flushed.stdout
    state = json.loads(run_cli("status", str(dirs.mnt), "--json").stdout)
    assert state["replicated_files"] == 1
    assert state["volatile_files"] == 1
    assert state["dirty_files"] == 0
    assert state["committed_seq"] == state["journal_seq"]
    assert state["healthy"] is True
    pretty = run_cli("status", str(dirs.mnt))
    assert pretty.returncode == 0 and "replicated files" in pretty.stdout
    pid = state["pid"]
    result = run_cli("umount", str(dirs.mnt))
    assert result.returncode == 0, result.stderr
    assert not is_mounted(dirs.mnt)
    assert is_zombie(pid), "umount returned before the daemon finished"
    log = (dirs.state / "mailfs.log").read_text()
    assert "all changes committed" in log
    assert "ERROR" not in log and "Traceback" not in log


def test_umount_refuses_busy_mount(dirs: Dirs, background: Path) -> None:
    assert run_cli("mount", str(dirs.backing), str(dirs.mnt), "--state-dir",
                   str(dirs.state)).returncode == 0
    holder = subprocess.Popen(["sleep", "60"], cwd=dirs.mnt)
    try:
        assert_one_line_error(run_cli("umount", str(dirs.mnt)), "cannot unmount")
        assert is_mounted(dirs.mnt)
    finally:
        holder.kill()
        holder.wait()


def run_mount_helper(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """mount.mailfs as mount(8) runs it for an fstab line."""
    return subprocess.run(
        [sys.executable, "-c", "from mailfs.cli import mount_helper_main as m; "
                               "raise SystemExit(m())", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd)


def test_mount_helper_for_fstab(dirs: Dirs, background: Path) -> None:
    helper = run_mount_helper(str(dirs.backing), str(dirs.mnt), "-o",
                              f"rw,noauto,_netdev,state_dir={dirs.state},index_timeout=30")
    assert helper.returncode == 0, helper.stderr
    assert is_mounted(dirs.mnt)
    assert "mailfs:" in Path("/proc/self/mountinfo").read_text()


def test_bad_config_is_one_line(dirs: Dirs, tmp_path: Path) -> None:
    cases = {
        "[cache\nram_budget = 1": "not valid TOML",
        "[cache]\nram_budget = 'lots'": "cache.ram_budget must be a size",
        "[cache]\nbogus = 1": "unknown key 'bogus'",
        "[nonsense]\nx = 1": "unknown section [nonsense]",
        "[classify]\nreplicated = 'dovecot.index'": "list of file-name patterns",
        "[log]\nlevel = 'LOUD'": "log.level must be one of",
    }
    for text, needle in cases.items():
        config = tmp_path / "bad.toml"
        config.write_text(text)
        result = run_cli("mount", str(dirs.backing), str(dirs.mnt), "--state-dir",
                         str(dirs.state), "--config", str(config), "--foreground")
        assert_one_line_error(result, needle)
    assert_one_line_error(run_cli("mount", str(dirs.backing), str(dirs.mnt), "--config",
                                  str(tmp_path / "missing.toml")), "does not exist")
    assert_one_line_error(run_cli("mount", str(dirs.backing), str(dirs.mnt), "-o", "nope=1"),
                          "unknown option 'nope'")


def test_config_file_values_are_used(dirs: Dirs, tmp_path: Path, background: Path) -> None:
    config = tmp_path / "mailfs.toml"
    config.write_text(f"""
[mount]
state_dir = "{dirs.state}"
[cache]
ram_budget = "8M"
[classify]
replicated = ["*.idx"]
volatile = ["*.lck"]
""")
    assert run_cli("mount", str(dirs.backing), str(dirs.mnt), "--config",
                   str(config)).returncode == 0
    (dirs.mnt / "a.idx").write_text("kept in lmdb")
    (dirs.mnt / "dovecot.index").write_text("now passthrough")
    assert sorted(os.listdir(dirs.backing)) == ["dovecot.index"]
    state = json.loads(run_cli("status", str(dirs.mnt), "--json").stdout)
    assert state["ram_budget_bytes"] == 8 << 20
    assert state["state_dir"] == str(dirs.state)


def test_missing_backing_path(dirs: Dirs) -> None:
    result = run_cli("mount", str(dirs.backing / "gone"), str(dirs.mnt), "--state-dir",
                     str(dirs.state), "--foreground")
    assert_one_line_error(result, "does not exist")


def test_mountpoint_in_use(make_mount: MakeMount, dirs: Dirs) -> None:
    make_mount()
    other_state = dirs.state.parent / "other-state"
    result = run_cli("mount", str(dirs.backing), str(dirs.mnt), "--state-dir", str(other_state))
    assert_one_line_error(result, "already in use")


def test_state_dir_in_use(make_mount: MakeMount, dirs: Dirs) -> None:
    make_mount()
    second = dirs.state.parent / "mnt2"
    second.mkdir()
    result = run_cli("mount", str(dirs.backing), str(second), "--state-dir", str(dirs.state),
                     "--foreground")
    assert_one_line_error(result, "in use by another mailfs mount")


def test_commands_without_a_mount(dirs: Dirs) -> None:
    for command in ("status", "flush", "umount", "import", "export"):
        assert_one_line_error(run_cli(command, str(dirs.mnt)), "no mailfs mount is running")


@pytest.mark.skipif(VENV_SITE is None, reason="needs the project venv")
def test_not_root(dirs: Dirs) -> None:
    env = {"PYTHONPATH": f"{REPO / 'src'}:{VENV_SITE}", "PATH": "/usr/bin:/bin"}
    for args in (["mount", str(dirs.backing), str(dirs.mnt)], ["status", str(dirs.mnt)]):
        result = subprocess.run(["/usr/bin/python3", "-m", "mailfs", *args], user=65534,
                                group=65534, extra_groups=[], env=env, capture_output=True,
                                text=True, timeout=60, cwd="/")
        assert_one_line_error(result, "must run as root")


def test_import_on_access_and_export(make_mount: MakeMount, dirs: Dirs) -> None:
    box = dirs.backing / "INBOX"
    box.mkdir()
    (box / "dovecot.index").write_bytes(b"from plain NFS")
    (box / "dovecot-uidlist").write_bytes(b"3 V99 N7\n")
    os.chown(box / "dovecot-uidlist", 65534, 65534)
    os.chmod(box / "dovecot-uidlist", 0o600)
    (box / "dovecot-uidlist.lock").write_bytes(b"stale lock")
    deep = dirs.backing / "a" / "b"
    deep.mkdir(parents=True)
    (deep / "dovecot.index.log").write_bytes(b"deep log")
    mount = make_mount()
    inbox = mount.mountpoint / "INBOX"
    assert (inbox / "dovecot.index").read_bytes() == b"from plain NFS"
    st = os.stat(inbox / "dovecot-uidlist")
    assert (st.st_uid, st.st_mode & 0o777) == (65534, 0o600)
    assert sorted(os.listdir(inbox)) == ["dovecot-uidlist", "dovecot.index"]
    result = run_cli("import", str(mount.mountpoint))
    assert result.returncode == 0 and "imported 1 index files" in result.stdout
    (inbox / "dovecot.index").write_bytes(b"changed on mailfs")
    (inbox / "dovecot.index.cache").write_bytes(b"new on mailfs")
    assert (box / "dovecot.index").read_bytes() == b"from plain NFS"
    result = run_cli("export", str(mount.mountpoint))
    assert result.returncode == 0 and "exported 4 index files" in result.stdout
    assert (box / "dovecot.index").read_bytes() == b"changed on mailfs"
    assert (box / "dovecot.index.cache").read_bytes() == b"new on mailfs"
    assert (deep / "dovecot.index.log").read_bytes() == b"deep log"
    assert os.stat(box / "dovecot-uidlist").st_uid == 65534
    mount.stop()
    (box / "dovecot.index").write_bytes(b"edited behind mailfs's back")
    time.sleep(0.01)
    mount = make_mount()
    # Imported once: the store owns the file now, and later backing copies are ignored.
    assert (mount.mountpoint / "INBOX" / "dovecot.index").read_bytes() == b"changed on mailfs"


def test_sigterm_commits_and_unmounts(make_mount: MakeMount, dirs: Dirs) -> None:
    mount = make_mount()
    (mount.mountpoint / "dovecot-uidlist").write_bytes(b"3 V1 N2\n")
    assert mount.process is not None
    mount.process.terminate()
    assert mount.process.wait(timeout=60) == 0
    assert not is_mounted(dirs.mnt)
    assert "all changes committed" in mount.log()
    mount.process = None
    mount = make_mount()
    assert (mount.mountpoint / "dovecot-uidlist").read_bytes() == b"3 V1 N2\n"


def test_sigterm_the_moment_the_mount_appears_still_commits_and_unmounts(dirs: Dirs) -> None:
    """The mount shows up before the daemon's loop (and its signal watcher) runs; systemd
    may stop the unit in that window. SIGTERM must mean an orderly unmount there too, not
    death by signal with the mount left to the keeper (seen once in `make test`)."""
    for attempt in range(3):
        mount = MailfsMount(dirs.backing, dirs.mnt, dirs.state)
        log = open(mount.log_path, "ab")  # noqa: SIM115 - the child owns it for its life
        process = subprocess.Popen(
            [sys.executable, "-m", "mailfs", "mount", str(dirs.backing), str(dirs.mnt),
             "--state-dir", str(dirs.state), "--foreground"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            deadline = time.monotonic() + 30
            while not is_mounted(dirs.mnt):
                assert process.poll() is None, mount.log()
                assert time.monotonic() < deadline, "did not mount"
                time.sleep(0.001)
            process.terminate()
            assert process.wait(timeout=60) == 0, f"attempt {attempt}:\n{mount.log()}"
            assert not is_mounted(dirs.mnt)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            force_unmount(dirs.mnt)
    assert mount.log().count("all changes committed") == 3


def test_prometheus_metrics(make_mount: MakeMount) -> None:
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mount = make_mount(("-o", f"metrics_port={port}"))
    (mount.mountpoint / "dovecot.index").write_bytes(b"x")
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
            break
        except OSError:
            assert time.monotonic() < deadline, "metrics endpoint never answered"
            time.sleep(0.1)
    assert "mailfs_requests_total" in text
    assert "mailfs_ram_budget_bytes 2.68435456e+08" in text
