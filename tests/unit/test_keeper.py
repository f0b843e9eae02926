"""What the connection keeper reads from /proc to find the processes on a mount."""

from __future__ import annotations

import os

from mailfs.fs.session.keeper import (
    FUSE_IN_HEADER,
    being_killed,
    cached_device,
    maps_device,
    mount_identity,
    requester,
)

MOUNTINFO = """\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
88 22 0:52 / /srv/mail rw,nosuid,nodev shared:40 - fuse.mailfs mailfs:/nfs rw,user_id=0
91 22 0:61 / /srv/mail\\040box rw,nosuid,nodev shared:41 - fuse.mailfs mailfs:index-only rw
97 22 0:70 / /srv/mail rw,nosuid,nodev shared:45 - fuse.mailfs mailfs:/nfs rw,user_id=0
"""


def test_the_newest_mount_at_a_path_is_the_one_held() -> None:
    identity = mount_identity(MOUNTINFO, "/srv/mail")
    assert identity is not None
    assert (identity.major, identity.minor) == (0, 70)
    assert identity.maps_device == "00:46"


def test_a_mountpoint_with_a_space_is_found_escaped() -> None:
    identity = mount_identity(MOUNTINFO, "/srv/mail box")
    assert identity is not None and identity.minor == 61
    assert mount_identity(MOUNTINFO, "/srv/other") is None


def test_a_request_names_the_process_waiting_for_it() -> None:
    def request(opcode: int, pid: int) -> bytes:
        return FUSE_IN_HEADER.pack(FUSE_IN_HEADER.size, opcode, 7, 1, 0, 0, pid, 0, 0)

    assert requester(request(1, 4321)) == 4321  # LOOKUP
    assert requester(request(2, 4321)) is None  # FORGET: nobody waits
    assert requester(request(36, 4321)) is None  # INTERRUPT
    assert requester(request(15, 0)) is None  # from the kernel itself
    assert requester(b"short") is None


def test_the_cached_device_of_a_proc_link_is_the_files_device() -> None:
    here = os.stat("/proc/self/cwd")
    assert cached_device("/proc/self/cwd") == (os.major(here.st_dev), os.minor(here.st_dev))
    assert cached_device("/proc/self/no-such-link") is None


def test_a_mapping_counts_only_on_the_mounts_device() -> None:
    maps = ("7f00-7f10 r--s 00000000 00:46 1234  /srv/mail/u/dovecot.index\n"
            "7f10-7f20 r-xp 00000000 fd:01 99  /usr/lib/libc.so.6\n"
            "7f20-7f30 rw-p 00000000 00:00 0 \n")
    assert maps_device(maps, "00:46")
    assert not maps_device(maps, "00:47")
    assert not maps_device("7f20-7f30 rw-p 00000000 00:46 0\n", "00:46")  # anonymous


def test_a_process_with_sigkill_pending_or_exiting_is_being_killed() -> None:
    running = "State:\tD (disk sleep)\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000004000\n"
    assert not being_killed(running)
    assert being_killed(running.replace("ShdPnd:\t0000000000004000",
                                        "ShdPnd:\t0000000000000100"))
    assert being_killed(running.replace("SigPnd:\t0000000000000000",
                                        "SigPnd:\t0000000000000100"))
    assert being_killed("State:\tZ (zombie)\nSigPnd:\t0\nShdPnd:\t0\n")
    stat = "123 (imap) D 1 123 123 0 -1 {flags} 0 0 0 0"
    assert not being_killed(running, stat.format(flags=0x400100))
    assert being_killed(running, stat.format(flags=0x400104))  # PF_EXITING


def test_the_fence_kills_the_process_the_scan_found_and_no_later_one() -> None:
    import subprocess

    from mailfs.fs.session.keeper import fence_processes, start_time

    found = subprocess.Popen(["sleep", "60"])
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        found_started = start_time(found.pid)
        assert found_started is not None
        # The stranger stands for a process that got the pid of one the scan found after
        # that one exited: its start time is not the one the scan saw.
        killed = fence_processes({found.pid: found_started, stranger.pid: "1",
                                  2**22 + 7: "1"})  # and a pid that is gone
        assert killed == [found.pid]
        assert found.wait(timeout=10) == -9
        assert stranger.poll() is None
    finally:
        for process in (found, stranger):
            process.kill()
            process.wait()
