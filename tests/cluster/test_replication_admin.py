"""Admin-facing errors of replication, through the real command line and real mounts.

Every mistake an admin can make in the replication settings (a busy listen port, a TLS
file that is missing or does not fit, a bad option value) must end `mailfs mount` with
exit status 1 and one line on stderr that names the culprit, never a traceback, with no
mount and no daemon left behind, and nothing lost: the same node mounts with the right
settings afterwards and still has what it had. Both ways an admin mounts are covered,
--foreground and the default background mode (where the daemon is a child process and
its error must still reach the command line, not only the log).

A node whose peers are all down is not an error: it mounts, serves its index files,
says in `mailfs status` that the peers are not connected and why, and catches the peers
up once they come.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.conftest import MakeCluster
from tests.mount.test_cli import assert_one_line_error
from tests.rigs.cluster import Cluster, Node, wait_for, write_synced
from tests.rigs.mount import is_mounted, run_cli

MAILDIR = "user1/Maildir"
WAIT = 30.0
MODES = ["foreground", "background"]


# ------------------------------------------------------------------ helpers


def prepare(node: Node) -> None:
    """The directories Node.start makes, for a mount attempted without it."""
    for path in (node.mountpoint, node.state_dir):
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755)


def mount_cli(node: Node, mode: str, *more: str,
              options: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`mailfs mount` for this node as an admin types it, with its replication options
    (`options` replace some of them); a mount that came up anyway is taken down again,
    so that the caller can assert on the result and on what is left behind."""
    prepare(node)
    saved = node.options
    node.options = {**saved, **(options or {})}
    try:
        args = node.args()
    finally:
        node.options = saved
    mode_args = (["--foreground"] if mode == "foreground"
                 else ["--log-file", str(node.state_dir.parent / "mailfs.log")])
    result = run_cli("mount", str(node.cluster.backing), str(node.mountpoint),
                     "--state-dir", str(node.state_dir), *mode_args, *args, *more, timeout=90)
    if is_mounted(node.mountpoint):
        # Only when mailfs wrongly mounted (the assertions then fail): in foreground mode
        # run_cli returns only after the daemon exits, so this is a background daemon.
        run_cli("umount", str(node.mountpoint), "--force", timeout=60)
    return result


def assert_refused(node: Node, result: subprocess.CompletedProcess[str], needle: str) -> None:
    """One line naming `needle`, exit 1, no traceback; no mount, no daemon left behind."""
    was_mounted = is_mounted(node.mountpoint)  # mount_cli has unmounted it by now
    assert_one_line_error(result, needle)
    assert not was_mounted, "the mount failed but a mount is left behind"
    assert not is_mounted(node.mountpoint)
    assert not state_dir_locked(node.state_dir), "a mailfs daemon still holds the state dir"


def state_dir_locked(state_dir: Path) -> bool:
    """True while a daemon holds the state dir's lock (it does while it runs)."""
    path = state_dir / "lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False



def write_mailbox(node: Node, tag: bytes) -> dict[str, bytes]:
    """Dovecot-like index files in one mailbox, written through the node's mount; returns
    what each must contain."""
    root = node.path(MAILDIR)
    root.mkdir(parents=True, exist_ok=True)
    index = b"%s index\n" % tag * 50
    write_synced(root / "dovecot.index.tmp", index)
    os.rename(root / "dovecot.index.tmp", root / "dovecot.index")
    log = b""
    for i in range(5):
        record = b"%s log record %d\n" % (tag, i) * 20
        write_synced(root / "dovecot.index.log", record, os.O_APPEND)
        log += record
    uidlist = b"3 V1 N2 G%s\n1 u.1\n" % tag
    write_synced(root / "dovecot-uidlist", uidlist)
    return {f"{MAILDIR}/dovecot.index": index, f"{MAILDIR}/dovecot.index.log": log,
            f"{MAILDIR}/dovecot-uidlist": uidlist}


def assert_contents(node: Node, expected: dict[str, bytes]) -> None:
    for relative, content in expected.items():
        got = node.path(relative).read_bytes()
        assert got == content, (f"{relative} on node {node.node_id}: {len(got)} bytes, "
                                f"expected {len(content)}")


@contextlib.contextmanager
def port_held_by_another_process(port: int) -> Iterator[subprocess.Popen[str]]:
    """Another program listening on 127.0.0.1:port until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import socket, sys\n"
         "s = socket.socket()\n"
         f"s.bind(('127.0.0.1', {port}))\n"
         "s.listen()\n"
         "print('listening', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "listening", "the port holder failed"
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=30)


def problems(cluster: Cluster, allowed: tuple[str, ...] = ()) -> None:
    found = cluster.problems(allowed)
    assert not found, "\n".join(found)


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("mode", MODES)
def test_busy_listen_port_is_one_line_and_leaves_nothing_behind(
        make_cluster: MakeCluster, mode: str) -> None:
    cluster = make_cluster(size=2, start=False)
    a = cluster[0]
    a.start()
    expected = write_mailbox(a, b"a")
    assert state_dir_locked(a.state_dir), "the check for a daemon left behind cannot fail"
    a.stop()

    with port_held_by_another_process(a.port):
        result = mount_cli(a, mode)
    assert_refused(a, result, f"127.0.0.1:{a.port}")
    assert "listen" in result.stderr, result.stderr

    # The port is free again: the same node mounts, with what it had.
    a.start()
    assert_contents(a, expected)
    assert a.replication()["node_id"] == "a"
    a.stop()
    problems(cluster)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("host", ["192.0.2.1", "no-such-host.invalid"])
def test_listen_address_not_on_this_machine_is_one_line(make_cluster: MakeCluster, mode: str,
                                                        host: str) -> None:
    cluster = make_cluster(size=2, start=False)
    a = cluster[0]
    address = f"{host}:{a.port}"
    result = mount_cli(a, mode, options={"listen": address})
    assert_refused(a, result, address)


def tls_cases(cluster: Cluster) -> list[tuple[dict[str, str], str]]:
    """(options that replace a's TLS settings, the file the error must name)."""
    a, b = cluster[0], cluster[1]
    missing = cluster.base / "tls" / "missing.crt"
    not_pem = cluster.base / "tls" / "not-pem-ca.pem"
    not_pem.write_text("this is not a certificate\n")
    binary_ca = cluster.base / "tls" / "binary-ca.der"
    binary_ca.write_bytes(os.urandom(600))
    empty = cluster.base / "tls" / "empty.key"
    empty.write_bytes(b"")
    return [
        ({"tls_cert": str(missing)}, str(missing)),
        ({"tls_key": str(cluster.base / "tls" / "missing.key")},
         str(cluster.base / "tls" / "missing.key")),
        ({"tls_ca": str(missing)}, str(missing)),
        # b's key with a's certificate: a key that does not match the cert.
        ({"tls_key": str(b.key)}, str(b.key)),
        ({"tls_cert": str(b.cert)}, str(a.key)),
        ({"tls_ca": str(not_pem)}, str(not_pem)),
        ({"tls_ca": str(binary_ca)}, str(binary_ca)),
        ({"tls_key": str(empty)}, str(empty)),
        # The certificate and the key swapped.
        ({"tls_cert": str(a.key), "tls_key": str(a.cert)}, str(a.key)),
        ({"tls_key": str(a.cert)}, str(a.cert)),
    ]


@pytest.mark.parametrize("mode", MODES)
def test_bad_tls_files_are_one_line_naming_the_file(make_cluster: MakeCluster,
                                                    mode: str) -> None:
    cluster = make_cluster(size=2, start=False)
    a = cluster[0]
    a.start()
    expected = write_mailbox(a, b"a")
    a.stop()

    failures = []
    for options, needle in tls_cases(cluster):
        result = mount_cli(a, mode, options=options)
        try:
            assert_refused(a, result, needle)
        except AssertionError as exc:
            failures.append(f"{options}: {exc}")
    assert not failures, "\n".join(failures)

    a.start()
    assert_contents(a, expected)
    a.stop()
    problems(cluster)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("setting", ["tls_ca", "tls_cert"])
def test_empty_tls_certificate_file_is_one_line_naming_the_file(
        make_cluster: MakeCluster, mode: str, setting: str) -> None:
    """An empty file where a certificate belongs: `touch ca.pem`, or a copy that failed."""
    cluster = make_cluster(size=2, start=False)
    a = cluster[0]
    empty = cluster.base / "tls" / "empty.pem"
    empty.write_bytes(b"")
    result = mount_cli(a, mode, options={setting: str(empty)})
    assert_refused(a, result, str(empty))
    assert "Traceback" not in a.log(), a.log()


def test_node_with_every_peer_down_serves_and_catches_peers_up_later(
        make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=3, start=False)
    a, b, c = cluster.nodes
    a.start()
    expected = write_mailbox(a, b"alone")
    assert_contents(a, expected)
    wait_for(lambda: all(s["last_error"] for s in a.replication()["peers"].values()), WAIT,
             "a to record why it cannot reach b and c")
    status = a.replication()
    for peer_id in ("b", "c"):
        state = status["peers"][peer_id]
        assert state["connected"] is False, (peer_id, state)
        assert state["incoming_connected"] is False, (peer_id, state)
        assert state["failures"] >= 1, (peer_id, state)
        assert state["lag_changes"] > 0, (peer_id, state)
        port = (b if peer_id == "b" else c).port
        assert f"127.0.0.1:{port}" in state["last_error"], (peer_id, state)
    # `mailfs flush` does not hang on peers that are down; it names them.
    flushed = run_cli("flush", str(a.mountpoint), "--timeout", "1", timeout=90)
    assert flushed.returncode == 0, flushed.stderr
    assert "peers still behind" in flushed.stdout and "b" in flushed.stdout, flushed.stdout

    b.start()
    c.start()
    cluster.wait_connected()
    sums = cluster.wait_converged()
    for relative in expected:
        assert relative in sums, f"{relative} did not reach b and c"
    assert_contents(b, expected)
    assert_contents(c, expected)
    status = a.replication()
    for peer_id in ("b", "c"):
        state = status["peers"][peer_id]
        assert state["connected"] is True and state["last_error"] == "", (peer_id, state)
    wait_for(lambda: all(s["lag_changes"] == 0 for s in a.replication()["peers"].values()),
             WAIT, "b and c to acknowledge everything a wrote alone")
    problems(cluster)


def test_human_status_shows_replication_and_peer_tables(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=3, start=False)
    a, b, _c = cluster.nodes
    a.start()
    b.start()
    wait_for(lambda: a.replication()["peers"]["b"]["connected"], WAIT, "a to connect to b")
    wait_for(lambda: bool(a.replication()["peers"]["c"]["last_error"]), WAIT,
             "a to record why it cannot reach c")

    result = run_cli("status", str(a.mountpoint))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    text = result.stdout
    assert "replication: node a" in text, text
    for key in ("durability", "degraded", "seq", "conflicts", "rejected connections"):
        assert key in text, f"{key!r} missing from the replication table:\n{text}"
    assert "peers (out: our stream to it, in: its stream to us)" in text, text
    header = next((line for line in text.splitlines() if "peer" in line and "acked" in line),
                  None)
    assert header is not None, f"no header row in the peers table:\n{text}"
    for column in ("peer", "out", "in", "acked", "lag", "unacked", "snapshot", "last"):
        assert re.search(rf"\b{column}\b", header), f"{column!r} not in {header!r}"
    rows = {match.group(1): line for line in text.splitlines()
            if (match := re.match(r"^\W*\b([bc])\b\s*│", line))}
    assert set(rows) == {"b", "c"}, f"peer rows not found:\n{text}"
    assert "True" in rows["b"], rows["b"]
    assert "False" in rows["c"], rows["c"]
    # c's last error, folded over several lines in the last column, is all there.
    shown = last_column_of_row(text, rows["c"])
    wanted = a.replication()["peers"]["c"]["last_error"]
    assert shown.replace(" ", "") == wanted.replace(" ", ""), (shown, wanted)
    problems(cluster)


def last_column_of_row(text: str, first_line: str) -> str:
    """The last cell of a table row, joined over the lines rich folded it onto."""
    lines = text.splitlines()
    start = lines.index(first_line)
    cells = [lines[start].split("│")[-2].strip()]
    for line in lines[start + 1:]:
        parts = line.split("│")
        if len(parts) < 3 or parts[1].strip():  # the table ended, or the next row began
            break
        cells.append(parts[-2].strip())
    return " ".join(cell for cell in cells if cell)


def test_background_mount_reports_bad_replication_config_on_the_command_line(
        make_cluster: MakeCluster) -> None:
    """As an admin runs it (no --foreground), from a config file: each error reaches the
    command line, not only the daemon's log."""
    cluster = make_cluster(size=3, start=False)
    a, b = cluster[0], cluster[1]
    config = cluster.base / "mailfs.toml"
    not_pem = cluster.base / "tls" / "garbage.pem"
    not_pem.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n"
                       "-----END CERTIFICATE-----\n")
    cases = [
        # Found by the command-line process itself, from the config file:
        ('[replication]\ndurability = "eventually"\n', "durability"),
        ("[replication]\nquorum = 3\n", "quorum"),
        ('[replication]\npeers = ["b@127.0.0.1"]\n', "peers"),
        # Found only by the daemon (a child process) when it loads the TLS files:
        (f'[replication]\ntls_ca = "{not_pem}"\n', str(not_pem)),
        (f'[replication]\ntls_key = "{b.key}"\n', str(b.key)),
    ]
    failures = []
    for text, needle in cases:
        config.write_text(text)
        # The -o options a's node uses, minus the ones the config file sets.
        result = run_background_with_config(a, config, text)
        try:
            assert_refused(a, result, needle)
        except AssertionError as exc:
            failures.append(f"{text!r}: {exc}")
    assert not failures, "\n".join(failures)

    with port_held_by_another_process(a.port):
        result = mount_cli(a, "background")
    assert_refused(a, result, f"127.0.0.1:{a.port}")
    problems(cluster)


def run_background_with_config(node: Node, config: Path, text: str
                               ) -> subprocess.CompletedProcess[str]:
    keys = set(re.findall(r"^(\w+) =", text, re.MULTILINE))
    args = node.args()
    options = [arg for i in range(0, len(args), 2)
               if args[i + 1].partition("=")[0] not in keys
               for arg in args[i:i + 2]]
    prepare(node)
    result = run_cli("mount", str(node.cluster.backing), str(node.mountpoint),
                     "--state-dir", str(node.state_dir), "--config", str(config),
                     "--log-file", str(node.state_dir.parent / "mailfs.log"), *options,
                     timeout=90)
    if is_mounted(node.mountpoint):
        run_cli("umount", str(node.mountpoint), "--force", timeout=60)
    return result


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("options", "needles"), [
    ({"durability": "bogus"}, ("durability", "'bogus'", "async, sync")),
    ({"quorum": "5"}, ("quorum", "(5)", "(2)")),
    ({"peers": "b@host"}, ("peers", "host:port", "'b'", "'host'")),
    ({"peers": "b@127.0.0.1:7002;c@host"}, ("peers", "host:port", "'c'", "'host'")),
], ids=["durability", "quorum", "peer-without-port", "second-peer-without-port"])
def test_bad_replication_option_is_one_line(make_cluster: MakeCluster, mode: str,
                                            options: dict[str, str],
                                            needles: tuple[str, ...]) -> None:
    cluster = make_cluster(size=3, start=False)
    a = cluster[0]
    result = mount_cli(a, mode, options=options)
    assert_refused(a, result, needles[0])
    for needle in needles[1:]:
        assert needle in result.stderr, (needle, result.stderr)
