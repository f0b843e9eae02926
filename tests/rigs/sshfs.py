"""A real network filesystem on this machine: sshfs from an sshd in a private network namespace.

The test gets its own network namespace with a veth pair in a /30 of 10.213.0.0/16, an sshd
listening only on the namespace side (own host key, own config, one freshly generated client
key), and an sshfs mount of a local temp directory through it. All I/O on the mountpoint
therefore crosses TCP and the SFTP protocol, as with a remote server.

With `latency_ms`, sshfs reaches sshd through a delaying TCP proxy (tests/rigs/latency.py),
half the round trip each way: the kernel here has no netem.

`stall()` stops the sshfs process with SIGSTOP: every request that reaches it then waits,
like a mount of an NFS server that stopped answering. `resume()` lets it go on.

Teardown always runs, in reverse order of setup, even when the test fails: SIGCONT, lazy
unmount, sshfs and sshd killed by their pids (and any other process left in the namespace),
the namespace and the veth pair deleted.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.rigs.mount import force_unmount, is_mounted

SSHD = "/usr/sbin/sshd"
REQUIRED = (SSHD, "sshfs", "ssh", "ssh-keygen", "ip", "fusermount3")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
SSH_PORT = 22


def _run(*args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): "
                           f"{result.stderr.strip()}")
    return result


@functools.cache
def sshfs_unusable() -> str | None:
    """Why this machine cannot run the rig, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, sshd, allow_other)"
    missing = [name for name in REQUIRED if shutil.which(name) is None]
    if missing:
        return f"missing {', '.join(missing)} (run `make setup`)"
    if not Path("/dev/fuse").exists():
        return "/dev/fuse is missing"
    probe = f"mfs-probe-{secrets.token_hex(3)}"
    try:
        added = _run("ip", "netns", "add", probe, check=False)
        if added.returncode != 0:
            return f"ip netns does not work here: {added.stderr.strip()}"
        inside = _run("ip", "netns", "exec", probe, "ip", "link", "set", "lo", "up", check=False)
        if inside.returncode != 0:
            return f"ip netns exec does not work here: {inside.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


def sshfs_available() -> bool:
    return sshfs_unusable() is None


@dataclass
class SshfsMount:
    """One live sshfs mount; see the module docstring."""

    mountpoint: Path
    remote_dir: Path
    netns: str
    address: str
    sshfs_process: subprocess.Popen[bytes]
    sshd_process: subprocess.Popen[bytes]
    log_dir: Path
    stalled: bool = field(default=False)

    @property
    def sshfs_pid(self) -> int:
        return self.sshfs_process.pid

    @property
    def sshd_pid(self) -> int:
        return self.sshd_process.pid

    def stall(self) -> None:
        """Stop answering: every access to the mountpoint blocks until resume()."""
        os.kill(self.sshfs_pid, signal.SIGSTOP)
        self.stalled = True

    def resume(self) -> None:
        if self.sshfs_process.poll() is None:
            os.kill(self.sshfs_pid, signal.SIGCONT)
        self.stalled = False

    def log(self) -> str:
        parts = []
        for name in ("sshd.log", "sshfs.log"):
            with contextlib.suppress(FileNotFoundError):
                parts.append(f"--- {name}\n" + (self.log_dir / name).read_text(errors="replace"))
        return "\n".join(parts)


def _pick_subnet() -> tuple[str, str]:
    """Host and namespace addresses of a /30 in 10.213.0.0/16 that nobody here uses yet."""
    in_use = _run("ip", "-o", "-4", "addr", "show").stdout
    for _ in range(100):
        third, block = secrets.randbelow(256), secrets.randbelow(64) * 4
        prefix = f"10.213.{third}."
        if not any(f"{prefix}{block + n}/" in in_use for n in range(4)):
            return f"{prefix}{block + 1}", f"{prefix}{block + 2}"
    raise RuntimeError("no free /30 in 10.213.0.0/16")


def _wait_for_port(address: str, port: int, process: subprocess.Popen[bytes], what: str,
                   log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n"
                               f"{log.read_text(errors='replace')}")
        with socket.socket() as probe:
            probe.settimeout(1.0)
            try:
                probe.connect((address, port))
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {address}:{port} within "
                               f"{START_TIMEOUT}s:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGCONT)
        process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)


def _stop_sshd(netns: str, sshd: subprocess.Popen[bytes]) -> None:
    """Let sshd reap its session children first (sshfs is gone by now), then stop it."""
    deadline = time.monotonic() + STOP_TIMEOUT / 2
    while sshd.poll() is None and time.monotonic() < deadline:
        pids = set(_run("ip", "netns", "pids", netns, check=False).stdout.split())
        if pids <= {str(sshd.pid)}:
            break
        time.sleep(0.05)
    _stop_process(sshd)


def _kill_namespace_processes(netns: str) -> None:
    """Whatever still runs inside our namespace (sshd's per-connection children) goes too."""
    result = _run("ip", "netns", "pids", netns, check=False)
    for pid in result.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _delete_namespace(netns: str, host_veth: str) -> None:
    _kill_namespace_processes(netns)
    _run("ip", "netns", "del", netns, check=False)
    # Deleting the namespace destroys its veth end and with it ours; make sure of it.
    if _run("ip", "link", "show", host_veth, check=False).returncode == 0:
        _run("ip", "link", "del", host_veth, check=False)


def _unmount(mountpoint: Path, process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
    if is_mounted(mountpoint):
        _run("fusermount3", "-u", "-z", str(mountpoint), check=False)
    _stop_process(process)
    force_unmount(mountpoint)


def _write_sshd_config(ssh_dir: Path, address: str) -> Path:
    host_key = ssh_dir / "host_ed25519"
    client_key = ssh_dir / "client_ed25519"
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mailfs-test-host",
         "-f", str(host_key))
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mailfs-test-client",
         "-f", str(client_key))
    authorized = ssh_dir / "authorized_keys"
    authorized.write_text((ssh_dir / "client_ed25519.pub").read_text())
    authorized.chmod(0o644)
    config = ssh_dir / "sshd_config"
    config.write_text(
        f"ListenAddress {address}:{SSH_PORT}\n"
        f"HostKey {host_key}\n"
        f"PidFile {ssh_dir / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {authorized}\n"
        "PermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "StrictModes no\n"
        "UsePAM no\n"
        "UseDNS no\n"
        "PrintMotd no\n"
        "LogLevel INFO\n"
        "Subsystem sftp internal-sftp\n"
    )
    # sshd checks its own config before it forks off; fail here with its message if not.
    _run(SSHD, "-t", "-f", str(config))
    return client_key


def _allow_key_login(user: str) -> None:
    """sshd refuses a "locked" account ("!" password, useradd's default for system users)
    even for a key; "*" still allows no password but lets the key in."""
    with open("/etc/shadow") as shadow:
        locked = any(line.startswith(f"{user}:!") for line in shadow)
    if locked:
        _run("usermod", "-p", "*", user)


def _start_latency_proxy(cleanup: contextlib.ExitStack, target: tuple[str, int],
                         one_way_ms: float) -> int:
    """Start the delaying proxy in front of `target`; returns the local port it listens on."""
    proxy = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("latency.py")),
         "--target", f"{target[0]}:{target[1]}", "--delay-ms", str(one_way_ms)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
    )
    assert proxy.stdout is not None
    cleanup.callback(proxy.stdout.close)
    cleanup.callback(_stop_process, proxy)
    line = proxy.stdout.readline()
    if not line.strip().isdigit():
        raise RuntimeError(f"latency proxy did not start (exit {proxy.poll()}): {line!r}")
    return int(line)


@contextlib.contextmanager
def sshfs_backing(tmp: Path, latency_ms: float = 0.0, user: str = "root"
                  ) -> Iterator[SshfsMount]:
    """An sshfs mount of `tmp/remote` at `tmp/sshfs`, served over TCP from a private netns.

    `latency_ms` > 0 adds that much round trip between sshfs and sshd. The SFTP server runs
    as `user`, who owns `tmp/remote`: files created through the mount belong to that user
    whoever creates them, as with a real sshfs, so a mail store on it logs in as the mail user.

    `tmp` must be reachable by other users if the test acts as them (not pytest's tmp_path).
    """
    reason = sshfs_unusable()
    if reason is not None:
        raise RuntimeError(f"the sshfs rig cannot run here: {reason}")
    suffix = secrets.token_hex(3)
    netns, host_veth, ns_veth = f"mfs-{suffix}", f"mfsh-{suffix}", f"mfsn-{suffix}"
    host_addr, ns_addr = _pick_subnet()
    ssh_dir, remote_dir, mountpoint = tmp / "ssh", tmp / "remote", tmp / "sshfs"
    for path in (ssh_dir, remote_dir, mountpoint):
        path.mkdir(parents=True, exist_ok=True)
    ssh_dir.chmod(0o711)  # sshd reads authorized_keys as the login user; the keys are 0600
    remote_dir.chmod(0o755)
    account = pwd.getpwnam(user)
    os.chown(remote_dir, account.pw_uid, account.pw_gid)
    _allow_key_login(user)
    mountpoint.chmod(0o755)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir

    with contextlib.ExitStack() as cleanup:
        _run("ip", "netns", "add", netns)
        cleanup.callback(_delete_namespace, netns, host_veth)
        _run("ip", "link", "add", host_veth, "type", "veth", "peer", "name", ns_veth,
             "netns", netns)
        inside = ("ip", "netns", "exec", netns)
        # Only our two IPv4 addresses: no IPv6 link-local address on either end.
        _run("ip", "link", "set", host_veth, "addrgenmode", "none")
        _run(*inside, "ip", "link", "set", ns_veth, "addrgenmode", "none")
        _run("ip", "addr", "add", f"{host_addr}/30", "dev", host_veth)
        _run("ip", "link", "set", host_veth, "up")
        _run(*inside, "ip", "link", "set", "lo", "up")
        _run(*inside, "ip", "addr", "add", f"{ns_addr}/30", "dev", ns_veth)
        _run(*inside, "ip", "link", "set", ns_veth, "up")

        client_key = _write_sshd_config(ssh_dir, ns_addr)
        sshd_log = ssh_dir / "sshd.log"
        with open(sshd_log, "ab") as log:
            # `ip netns exec` execs sshd, so this pid is sshd's own.
            sshd = subprocess.Popen(
                [*inside, SSHD, "-D", "-e", "-f", str(ssh_dir / "sshd_config")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        cleanup.callback(_stop_sshd, netns, sshd)
        _wait_for_port(ns_addr, SSH_PORT, sshd, "sshd", sshd_log)

        server, port = ns_addr, SSH_PORT
        if latency_ms > 0:
            port = _start_latency_proxy(cleanup, (ns_addr, SSH_PORT), latency_ms / 2)
            server = "127.0.0.1"
        sshfs_log = ssh_dir / "sshfs.log"
        options = ",".join((
            f"Port={port}",
            f"IdentityFile={client_key}",
            "IdentitiesOnly=yes",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "BatchMode=yes",
            "ConnectTimeout=10",
            "LogLevel=ERROR",
            "allow_other",
            "default_permissions",
        ))
        with open(sshfs_log, "ab") as log:
            # -f: sshfs stays in the foreground, so we own its pid (the one stall() stops).
            sshfs = subprocess.Popen(
                ["sshfs", "-f", f"{user}@{server}:{remote_dir}", str(mountpoint), "-o", options],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        cleanup.callback(_unmount, mountpoint, sshfs)
        deadline = time.monotonic() + START_TIMEOUT
        while not is_mounted(mountpoint):
            if sshfs.poll() is not None:
                raise RuntimeError(f"sshfs exited with {sshfs.returncode}:\n"
                                   f"{sshfs_log.read_text(errors='replace')}\n"
                                   f"{sshd_log.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshfs did not mount within {START_TIMEOUT}s:\n"
                                   f"{sshfs_log.read_text(errors='replace')}")
            time.sleep(0.05)

        yield SshfsMount(mountpoint, remote_dir, netns, ns_addr, sshfs, sshd, ssh_dir)
