"""Config parsing: the shipped example is valid, and overrides win."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from mailfs.cachemgr.backing import filesystem_type, inline_calls, stable_inodes
from mailfs.config import (
    Config,
    Peer,
    apply_overrides,
    build,
    is_name,
    load_file,
    parse_size,
    split_patterns,
)
from mailfs.errors import UserError
from mailfs.fs.classifier import Classifier, FileClass
from mailfs.replication.identity import node_namespace

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "mailfs.example.toml"


def test_example_config_is_valid() -> None:
    values = load_file(EXAMPLE)
    config = build(EXAMPLE, {"backing": Path("/b"), "mountpoint": Path("/m")})
    assert values["ram_budget"] == config.ram_budget == 256 << 20
    assert config.commit_interval == 1.0


def test_overrides_beat_the_file(tmp_path: Path) -> None:
    config = build(EXAMPLE, {"ram_budget": 8 << 20})
    assert config.ram_budget == 8 << 20


@pytest.mark.parametrize(("text", "size"), [("256M", 256 << 20), ("1g", 1 << 30),
                                            ("512KiB", 512 << 10), (4096, 4096)])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text, "x") == size


@pytest.mark.parametrize("bad", ["lots", "-1M", True, -5, "1.5.5M"])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(UserError):
        parse_size(bad, "x")


@pytest.mark.parametrize(("name", "cls"), [
    (b"dovecot.index", FileClass.REPLICATED),
    (b"dovecot.index.log", FileClass.REPLICATED),
    (b"dovecot.index.log.2", FileClass.REPLICATED),
    (b"dovecot.index.tmp", FileClass.REPLICATED),
    (b"dovecot.index.cache", FileClass.REPLICATED),
    (b"dovecot.list.index.log", FileClass.REPLICATED),
    (b"dovecot.map.index", FileClass.REPLICATED),
    (b"dovecot-uidlist", FileClass.REPLICATED),
    (b"dovecot-uidvalidity.5f3a2b1c", FileClass.REPLICATED),
    (b"subscriptions", FileClass.REPLICATED),
    (b"dovecot.index.log.newlock", FileClass.VOLATILE),
    (b"dovecot-uidlist.lock", FileClass.VOLATILE),
    (b"mailboxes.lock9c1d576f25952f83", FileClass.VOLATILE),
    (b"dovecot-uidlist.tmp", FileClass.REPLICATED),
    (b"x.lockfile", FileClass.PASSTHROUGH),
    (b"u.1", FileClass.PASSTHROUGH),
    (b"m.3", FileClass.PASSTHROUGH),
    (b"1700000000.M1P2.host,S=100:2,S", FileClass.PASSTHROUGH),
    (b".temp.host.12345.abc", FileClass.PASSTHROUGH),
    (b"maildirfolder", FileClass.PASSTHROUGH),
])
def test_default_classes(name: bytes, cls: FileClass) -> None:
    assert Classifier().classify(name) is cls


def test_pattern_overrides_split_on_colons() -> None:
    assert split_patterns("*.lock:re:.*\\.lock[0-9a-f]+:dovecot.index") == [
        "*.lock", "re:.*\\.lock[0-9a-f]+", "dovecot.index"]
    with pytest.raises(UserError, match="invalid pattern"):
        apply_overrides({}, {"volatile": "re:("})


# ------------------------------------------------------------------------- replication


def tls_files(tmp_path: Path) -> dict[str, Path]:
    """Config validation only checks that the files are readable; tls.py parses them."""
    files = {}
    for name in ("tls_cert", "tls_key", "tls_ca"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text("-----BEGIN PLACEHOLDER-----\n")
    return files


def write_config(tmp_path: Path, replication: str) -> Path:
    path = tmp_path / "mailfs.toml"
    path.write_text(f"[replication]\n{replication}\n")
    return path


def replication_toml(tmp_path: Path, extra: str = "") -> str:
    files = tls_files(tmp_path)
    return "\n".join([
        'node_id = "node-a"',
        'peers = ["node-b@10.0.0.2:7070"]',
        *(f'{name} = "{path}"' for name, path in files.items()),
        extra,
    ])


def test_replication_is_off_by_default() -> None:
    config = build(EXAMPLE, {})
    assert not config.replication_enabled
    assert (config.node_id, config.peers, config.listen) == ("", (), "")
    assert config.durability == "async"
    assert not Config(listen="").replication_enabled
    assert Config(listen="0.0.0.0:7070").replication_enabled
    assert Config(peers=(Peer("b", "h", 1),)).replication_enabled


def test_replication_section(tmp_path: Path) -> None:
    files = tls_files(tmp_path)
    path = write_config(tmp_path, "\n".join([
        'node_id = "node-a"',
        'cluster = "east.mail"',
        'listen = "[::]:7070"',
        'peers = ["node-b@10.0.0.2:7070", "node-c@[2001:db8::3]:7071", "node_d@host-d:1"]',
        *(f'{name} = "{path}"' for name, path in files.items()),
        'durability = "sync"',
        "quorum = 2",
        "sync_timeout = 0.5",
        'log_limit = "64M"',
        "reconnect_interval = 3",
    ]))
    config = build(path, {})
    assert config.replication_enabled
    assert config.node_id == "node-a"
    assert config.cluster == "east.mail"
    assert config.listen == "[::]:7070"
    assert config.peers == (Peer("node-b", "10.0.0.2", 7070), Peer("node-c", "2001:db8::3", 7071),
                            Peer("node_d", "host-d", 1))
    assert (config.tls_cert, config.tls_key, config.tls_ca) == (
        files["tls_cert"], files["tls_key"], files["tls_ca"])
    assert config.durability == "sync"
    assert config.quorum == 2
    assert config.sync_timeout == 0.5
    assert config.log_limit == 64 << 20
    assert config.reconnect_interval == 3.0


def test_flat_overrides_of_replication_keys(tmp_path: Path) -> None:
    values: dict[str, object] = {}
    options = {"node-id": "a", "peers": "b@10.0.0.2:7070; c@[::1]:7071;", "listen": "[::1]:7070",
               "durability": "sync", "quorum": "1", "sync_timeout": "2.5", "log_limit": "2M"}
    options.update({name: str(path) for name, path in tls_files(tmp_path).items()})
    apply_overrides(values, options)
    config = build(None, values)
    assert config.node_id == "a"
    assert config.peers == (Peer("b", "10.0.0.2", 7070), Peer("c", "::1", 7071))
    assert (config.listen, config.durability, config.quorum) == ("[::1]:7070", "sync", 1)
    assert (config.sync_timeout, config.log_limit) == (2.5, 2 << 20)
    apply_overrides(values, {"peers": ""})
    assert values["peers"] == ()


def test_overrides_beat_the_replication_section(tmp_path: Path) -> None:
    path = write_config(tmp_path, replication_toml(tmp_path, 'durability = "sync"'))
    values: dict[str, object] = {}
    apply_overrides(values, {"peers": "node-x@h:1;node-y@h:2", "durability": "async"})
    config = build(path, values)
    assert [peer.node_id for peer in config.peers] == ["node-x", "node-y"]
    assert config.durability == "async"


def test_node_id_defaults_to_the_host_name(tmp_path: Path) -> None:
    path = write_config(tmp_path, replication_toml(tmp_path).replace('node_id = "node-a"', ""))
    host = socket.gethostname()
    if is_name(host) and host != "node-b":
        assert build(path, {}).node_id == host
    else:
        with pytest.raises(UserError, match="node_id"):
            build(path, {})


@pytest.mark.parametrize(("line", "match"), [
    ('node_id = "node a"', "replication.node_id must be 1 to 64"),
    ('node_id = ""', "replication.node_id must be"),
    (f'node_id = "{"n" * 65}"', "replication.node_id must be"),
    ("node_id = 5", "replication.node_id must be"),
    ('cluster = "a/b"', "replication.cluster must be"),
    ('listen = "7070"', "replication.listen must look like host:port"),
    ('listen = "host:0"', "replication.listen must look like"),
    ('listen = "host:65536"', "replication.listen must look like"),
    ('listen = ":7070"', "replication.listen must look like"),
    ('listen = "::1:7070"', "replication.listen must look like"),
    ('listen = "[nohost]:7070"', "replication.listen must look like"),
    ('listen = "host:http"', "replication.listen must look like"),
    ("listen = 7070", "replication.listen must be a host:port string"),
    ('peers = "b@h:1"', "replication.peers must be a list"),
    ('peers = ["h:1"]', "replication.peers entries must look like id@host:port"),
    ("peers = [1]", "replication.peers entries must look like"),
    ('peers = ["b c@h:1"]', "replication.peers has an invalid node id"),
    ('peers = ["b@h"]', "replication.peers entry 'b' must look like host:port"),
    ('durability = "fast"', "replication.durability must be one of async, sync"),
    ("quorum = -1", "replication.quorum must be a finite, non-negative number"),
    ('sync_timeout = "soon"', "replication.sync_timeout must be a number of seconds"),
    ('log_limit = "lots"', "replication.log_limit must be a size"),
    ('tls_ca = ""', "replication.tls_ca must be a path"),
    ("bogus = 1", "unknown key 'bogus' in \\[replication\\]"),
])
def test_bad_replication_values(tmp_path: Path, line: str, match: str) -> None:
    path = write_config(tmp_path, line)
    with pytest.raises(UserError, match=match):
        load_file(path)


@pytest.mark.parametrize(("option", "match"), [
    ({"peers": "b@h:1,c@h:2"}, "peers entry 'b' must look like host:port"),
    ({"peers": "b@h:1;nonsense"}, "peers entries must look like id@host:port"),
    ({"durability": "SYNC"}, "durability must be one of async, sync"),
    ({"node_id": "a b"}, "node_id must be 1 to 64"),
])
def test_bad_replication_overrides(option: dict[str, str], match: str) -> None:
    with pytest.raises(UserError, match=match):
        apply_overrides({}, option)


@pytest.mark.parametrize(("extra", "match"), [
    ("sync_timeout = 0", "replication.sync_timeout must be above 0"),
    ("reconnect_interval = 0", "replication.reconnect_interval must be above 0"),
    ('log_limit = "512K"', "replication.log_limit must be at least 1M"),
    ("quorum = 2", r"replication.quorum \(2\) is more than the number of peers \(1\)"),
    ('peers = ["node-b@h:1", "node-a@h:2"]',
     "replication.peers includes this node's own node_id 'node-a'"),
    ('peers = ["node-b@h:1", "node-b@h:2"]', "replication.peers lists node id 'node-b' twice"),
])
def test_replication_validation(tmp_path: Path, extra: str, match: str) -> None:
    toml = replication_toml(tmp_path)
    build(write_config(tmp_path, toml), {})  # valid without `extra`
    key = extra.split(" =")[0]
    toml = "\n".join(line for line in toml.splitlines() if not line.startswith(f"{key} ="))
    with pytest.raises(UserError, match=match):
        build(write_config(tmp_path, f"{toml}\n{extra}"), {})


def test_sync_timeout_checked_when_replication_is_off(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"replication\.sync_timeout must be above 0"):
        build(write_config(tmp_path, "sync_timeout = 0"), {})


@pytest.mark.parametrize("name", ["tls_cert", "tls_key", "tls_ca"])
def test_tls_files_are_required(tmp_path: Path, name: str) -> None:
    files = tls_files(tmp_path)
    values: dict[str, object] = {"node_id": "a", "listen": "127.0.0.1:7070", **files}
    build(None, values)
    with pytest.raises(UserError, match=f"replication.{name} must be set when replication is on"):
        build(None, {**values, name: Path()})
    with pytest.raises(UserError, match=f"replication.{name} .*/missing.pem does not exist"):
        build(None, {**values, name: tmp_path / "missing.pem"})
    with pytest.raises(UserError, match=f"replication.{name} .* is a directory"):
        build(None, {**values, name: tmp_path})
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UserError, match=f"replication.{name} .*/fifo is not a regular file"):
        build(None, {**values, name: tmp_path / "fifo"})


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_tls_file(tmp_path: Path) -> None:
    files = tls_files(tmp_path)
    files["tls_key"].chmod(0)
    with pytest.raises(UserError, match=r"replication\.tls_key .* is not readable"):
        build(None, {"node_id": "a", "listen": "127.0.0.1:7070", **files})


def colliding_node_ids() -> tuple[str, str]:
    seen: dict[int, str] = {}
    for number in range(100_000):
        name = f"node-{number}"
        other = seen.setdefault(node_namespace(name), name)
        if other != name:
            return other, name
    raise AssertionError("no two node ids share a namespace")


def test_node_ids_with_the_same_namespace_are_refused(tmp_path: Path) -> None:
    first, second = colliding_node_ids()
    assert node_namespace(first) == node_namespace(second)
    values: dict[str, object] = {"node_id": first, **tls_files(tmp_path)}
    apply_overrides(values, {"peers": f"other@h:1;{second}@h:2"})
    with pytest.raises(UserError, match=f"node ids '{first}' and '{second}' map to the same "
                                        f"file-id namespace; rename one"):
        build(None, values)
    apply_overrides(values, {"peers": f"other@h:1;{second}x@h:2"})
    assert build(None, values).node_id == first


def test_mode_from_the_file_and_from_overrides(tmp_path: Path) -> None:
    path = tmp_path / "mailfs.toml"
    path.write_text('[mount]\nmode = "index-only"\n')
    assert build(path, {"mountpoint": Path("/m")}).mode == "index-only"
    values: dict[str, object] = {}
    apply_overrides(values, {"mode": "full"})
    assert build(path, values).mode == "full"
    with pytest.raises(UserError, match="mode"):
        apply_overrides({}, {"mode": "half"})


def test_an_index_only_mount_with_a_backing_path_is_refused() -> None:
    with pytest.raises(UserError, match="no backing path"):
        build(None, {"mode": "index-only", "backing": Path("/b"), "mountpoint": Path("/m")})


def test_backing_inodes_setting(tmp_path: Path) -> None:
    assert build(EXAMPLE, {}).backing_inodes == "auto"
    values: dict[str, object] = {}
    apply_overrides(values, {"backing_inodes": "unstable"})
    assert values["backing_inodes"] == "unstable"
    with pytest.raises(UserError, match="inodes"):
        apply_overrides({}, {"backing_inodes": "sometimes"})


@pytest.mark.parametrize(("setting", "fs_type", "stable"), [
    ("auto", "nfs4", True), ("auto", "ext4", True), ("auto", "fuse.sshfs", False),
    ("auto", "fuse.glusterfs", True), ("auto", "fuse.mfs", True), ("auto", "fuse.rclone", False),
    ("stable", "fuse.sshfs", True), ("unstable", "nfs4", False),
])
def test_which_backing_stores_keep_inode_numbers(setting: str, fs_type: str,
                                                 stable: bool) -> None:
    assert stable_inodes(setting, fs_type) is stable


def test_filesystem_type_comes_from_the_mount_table() -> None:
    assert filesystem_type("/proc/self") == "proc"
    assert filesystem_type("/") != ""
    assert filesystem_type("/no/such/path") == ""


@pytest.mark.parametrize(("setting", "fs_type", "inline"), [
    ("auto", "ext4", True), ("auto", "xfs", True), ("auto", "tmpfs", True),
    ("auto", "nfs4", False), ("auto", "fuse.sshfs", False), ("auto", "cifs", False),
    ("auto", "", False), ("inline", "nfs4", True), ("threads", "ext4", False),
])
def test_backing_calls_run_inline_only_on_local_filesystems(setting: str, fs_type: str,
                                                            inline: bool) -> None:
    assert inline_calls(setting, fs_type) is inline


def test_backing_calls_setting() -> None:
    assert build(EXAMPLE, {}).backing_calls == "auto"
    values: dict[str, object] = {}
    apply_overrides(values, {"backing_calls": "threads"})
    assert values["backing_calls"] == "threads"
    with pytest.raises(UserError, match="calls"):
        apply_overrides({}, {"backing_calls": "sometimes"})
