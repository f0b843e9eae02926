"""What the connection keeper reads from /proc to find the processes on a mount."""

from __future__ import annotations

from mailfs.fs.session.keeper import (
    being_killed,
    fdinfo_mount_id,
    maps_device,
    mount_identity,
    under,
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
    assert (identity.mount_id, identity.major, identity.minor) == (97, 0, 70)
    assert identity.maps_device == "00:46"


def test_a_mountpoint_with_a_space_is_found_escaped() -> None:
    identity = mount_identity(MOUNTINFO, "/srv/mail box")
    assert identity is not None and identity.mount_id == 91
    assert mount_identity(MOUNTINFO, "/srv/other") is None


def test_fdinfo_names_the_mount_of_an_open_file() -> None:
    assert fdinfo_mount_id("pos:\t0\nflags:\t02100002\nmnt_id:\t97\nino:\t12\n") == 97
    assert fdinfo_mount_id("pos:\t0\nflags:\t02\n") is None


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


def test_paths_under_a_mountpoint() -> None:
    assert under("/srv/mail", "/srv/mail")
    assert under("/srv/mail/u/index", "/srv/mail")
    assert not under("/srv/mailbox", "/srv/mail")
