"""Hostile and broken peers: whatever arrives on the replication port that is not a
well-formed stream of the connecting peer's own changes, in order, gets the connection
closed, a log line and a count on the receiving node, and nothing of it is applied.

Node "a" runs for real; node "b" is never started: the test plays "b" (or an impostor)
itself, with a raw TLS client and hand-made frames. The first test proves that a
well-formed stream from the fake "b" IS applied, so every "nothing applied" below can fail.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
import xxhash

from mailfs.cachemgr.ownership import ManifestEntry, pack_manifest, pack_seq_map
from mailfs.cachemgr.records import Attrs, Op, Record, decode_one
from mailfs.cachemgr.records import encode as encode_record
from mailfs.replication.identity import make_fid, make_version, node_namespace
from mailfs.replication.protocol import (
    HEADER,
    MAX_FRAME_DEFAULT,
    PROTOCOL_VERSION,
    Ack,
    Change,
    Changes,
    Decoder,
    Goodbye,
    Hello,
    Message,
    MessageType,
    ProtocolError,
    Welcome,
    encode,
)
from tests.rigs.cluster import Cluster, Node, wait_for
from tests.rigs.mount import run_cli

IO_TIMEOUT = 15.0
EPOCH = 1
FILE = b"dovecot.index.log"
MODE = 0o100600
_fids = itertools.count(1)


# --- a fake peer ---------------------------------------------------------------------------


class Closed(Exception):
    """The receiving node closed the connection (or refused the TLS handshake)."""


class FakePeer:
    """A raw TLS client speaking the replication protocol by hand."""

    def __init__(self, node: Node, ca_path: Path, identity: tuple[Path, Path] | None
                 ) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(ca_path))
        if identity is not None:
            context.load_cert_chain(str(identity[0]), str(identity[1]))
        raw = socket.create_connection(("127.0.0.1", node.port), timeout=IO_TIMEOUT)
        self.address = f"127.0.0.1:{raw.getsockname()[1]}"
        try:
            self.tls = context.wrap_socket(raw, server_hostname=node.node_id)
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            raise Closed(f"TLS handshake refused: {exc}") from exc
        self.decoder = Decoder()
        self.received: list[Message] = []

    def close(self) -> None:
        self.tls.close()

    def send(self, data: bytes) -> None:
        """Send bytes; a connection the node already closed is not an error here."""
        with contextlib.suppress(ssl.SSLError, OSError):
            self.tls.sendall(data)

    def _receive(self) -> list[Message]:
        try:
            data = self.tls.recv(1 << 16)
        except TimeoutError:
            raise
        except (ssl.SSLError, OSError) as exc:
            raise Closed(str(exc)) from exc
        if not data:
            raise Closed("end of stream")
        messages = self.decoder.feed(data)
        self.received.extend(messages)
        return messages

    def handshake(self, node_id: str = "b", cluster: str = "test") -> Welcome:
        self.send(encode(Hello(PROTOCOL_VERSION, node_id, cluster, EPOCH, {})))
        while True:
            for message in self._receive():
                assert isinstance(message, Welcome), message
                return message

    def wait_ack(self, origin: str, seq: int) -> None:
        while True:
            for message in self._receive():
                if isinstance(message, Ack) and message.origin == origin and message.seq >= seq:
                    return

    def wait_closed_or_acked(self, origin: str, seq: int) -> str:
        """"closed" if the node closes the connection, "acked" if it acknowledges `seq`
        of `origin` (it applied and committed it)."""
        try:
            self.wait_ack(origin, seq)
        except Closed:
            return "closed"
        except TimeoutError:
            pytest.fail(f"the node neither acknowledged nor closed within {IO_TIMEOUT}s")
        return "acked"

    def wait_closed(self) -> list[Message]:
        """Read until the node closes the connection; returns what it sent meanwhile.

        Fails if the node keeps the connection open (it must close it on bad input).
        """
        try:
            while True:
                self._receive()
        except TimeoutError:
            pytest.fail(f"the node did not close the connection within {IO_TIMEOUT}s")
        except Closed:
            return self.received
        except ProtocolError as exc:  # pragma: no cover - the node sent garbage
            pytest.fail(f"the node sent a bad frame: {exc}")

    def goodbye(self) -> None:
        self.send(encode(Goodbye("test done")))
        self.wait_closed()


def connect(node: Node, cluster: Cluster, identity: tuple[Path, Path] | None
            ) -> FakePeer:
    return FakePeer(node, cluster.certs.ca_path, identity)


# --- changes -------------------------------------------------------------------------------


@dataclass
class Planned:
    """A file "b" creates and writes: the changes, and what they make on "a"."""

    dirpath: bytes
    content: bytes
    changes: list[Change]

    @property
    def last_seq(self) -> int:
        return self.changes[-1].seq


def plan_file(origin: str, first_seq: int, dirpath: bytes, content: bytes) -> Planned:
    """CREATE + WRITE of dirpath/dovecot.index.log with a fid in `origin`'s namespace."""
    namespace = node_namespace(origin)
    fid = make_fid(namespace, next(_fids))
    now = time.time_ns()
    create = Record(first_seq, Op.CREATE,
                    (fid, dirpath, FILE, Attrs(MODE, 0, 0, 1, 0, now, now, now)))
    write = Record(first_seq + 1, Op.WRITE, (fid, 0, now, content))
    return Planned(dirpath, content, [
        Change(first_seq, 0, encode_record(create)),
        Change(first_seq + 1, make_version(namespace, first_seq), encode_record(write)),
    ])


def reseq(change: Change, seq: int) -> Change:
    """The same change under another seq (its record re-encoded to match)."""
    record = decode_one(change.record)
    record.seq = seq
    return Change(seq, change.base_version, encode_record(record))


def damage_record(data: bytes) -> bytes:
    """Flip a bit in a record's body; its header (length, checksum) stays as it was."""
    damaged = bytearray(data)
    damaged[-1] ^= 0x40
    return bytes(damaged)


# --- the cluster ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_cluster() -> Iterator[Cluster]:
    """One real node "a" for the whole module; each case uses its own directory."""
    cluster = Cluster(2)
    try:
        cluster[0].start()  # "b" stays down: the tests play it
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def cluster(hostile_cluster: Cluster) -> Iterator[Cluster]:
    log_size = len(hostile_cluster[0].log())
    yield hostile_cluster
    # Shown by pytest only when the test failed.
    print(f"--- mailfs log of node a during the test\n{hostile_cluster[0].log()[log_size:]}")


@pytest.fixture
def node(cluster: Cluster) -> Node:
    return cluster[0]


@dataclass
class Before:
    """What node "a" showed before a hostile attempt, to compare with after it."""

    log_size: int
    rejected: int
    remote_applied: int
    applied_from_b: int
    names: set[str]


def case_dir(node: Node, name: str) -> bytes:
    """A fresh, empty directory (through a's mount) for one case's file."""
    path = node.path(name)
    path.mkdir()
    return name.encode()


def observe(node: Node) -> Before:
    replication = node.replication()
    return Before(len(node.log()), replication["rejected_connections"],
                  replication["remote_applied"],
                  replication["peers"]["b"]["applied_from_peer"],
                  set(node.checksums()))


def next_seq(node: Node) -> int:
    return int(node.replication()["peers"]["b"]["applied_from_peer"]) + 1


def assert_nothing_applied(node: Node, before: Before, dirpath: bytes) -> None:
    directory = node.path(dirpath.decode())
    assert os.listdir(directory) == [], f"a change was applied: {os.listdir(directory)}"
    assert not (directory / FILE.decode()).exists()
    replication = node.replication()
    assert replication["remote_applied"] == before.remote_applied
    assert replication["peers"]["b"]["applied_from_peer"] == before.applied_from_b
    assert set(node.checksums()) == before.names


def one_log_line(node: Node, before: Before, peer_address: str | None) -> str:
    """The one WARNING line about a refused or closed replication connection (from
    `peer_address`) logged since `before`."""
    new_log = node.log()[before.log_size:]
    lines = [line for line in new_log.splitlines()
             if "refused replication connection from" in line
             or ("replication stream from" in line and " closed: " in line)]
    if peer_address is not None:
        lines = [line for line in lines if f"({peer_address})" in line]
    assert len(lines) == 1, f"expected one such log line, got:\n{new_log}"
    assert " WARNING " in lines[0]
    return lines[0]


def assert_rejected(node: Node, before: Before, peer_address: str | None, *reasons: str
                    ) -> str:
    """The node logged and counted the refusal, naming the reason; returns the log line."""
    wait_for(lambda: node.replication()["rejected_connections"] > before.rejected,
             timeout=10, what="the rejection to be counted")
    replication = node.replication()
    assert replication["rejected_connections"] == before.rejected + 1
    line = one_log_line(node, before, peer_address)
    assert "refused replication connection from" in line
    for reason in reasons:
        assert reason in line, f"{reason!r} not in the log line {line!r}"
        assert reason in replication["last_rejection"], replication["last_rejection"]
    if peer_address is not None:
        assert peer_address in replication["last_rejection"]
    return line


def send_good_stream(node: Node, cluster: Cluster, name: str, content: bytes) -> None:
    """Play "b" correctly: its changes must show up through a's mount."""
    dirpath = case_dir(node, name)
    before = observe(node)
    peer = connect(node, cluster, cluster.certs.issue("b"))
    try:
        welcome = peer.handshake()
        assert welcome.node_id == "a"
        planned = plan_file("b", welcome.applied.get("b", 0) + 1, dirpath, content)
        peer.send(encode(Changes("b", EPOCH, tuple(planned.changes))))
        peer.wait_ack("b", planned.last_seq)  # committed on a
        assert node.replication()["peers"]["b"]["incoming_connected"]
        peer.goodbye()
    finally:
        peer.close()
    path = node.path(f"{name}/{FILE.decode()}")
    wait_for(lambda: path.exists() and path.read_bytes() == content, timeout=10,
             what=f"{path} to hold the replicated content")
    assert os.listdir(node.path(name)) == [FILE.decode()]
    replication = node.replication()
    assert replication["remote_applied"] == before.remote_applied + 2
    assert replication["peers"]["b"]["applied_from_peer"] == planned.last_seq
    assert replication["rejected_connections"] == before.rejected
    assert replication["conflicts"] == 0


# --- the proof that the negative cases can fail ---------------------------------------------


def test_a_well_formed_stream_from_b_is_applied(node: Node, cluster: Cluster) -> None:
    send_good_stream(node, cluster, "good-first", b"applied from the fake b\n")


# --- a, b: TLS -------------------------------------------------------------------------------


def _hostile_tls(node: Node, cluster: Cluster, identity: tuple[Path, Path] | None,
                 dirpath: bytes, *reasons: str) -> None:
    before = observe(node)
    address = None
    try:
        peer = connect(node, cluster, identity)
    except Closed:
        pass  # refused during the handshake itself (TLS 1.2 style)
    else:
        address = peer.address
        try:
            # With TLS 1.3 the client learns of the refusal only at its first read.
            planned = plan_file("b", next_seq(node), dirpath, b"must not arrive")
            peer.send(encode(Hello(PROTOCOL_VERSION, "b", "test", EPOCH, {})))
            peer.send(encode(Changes("b", EPOCH, tuple(planned.changes))))
            received = peer.wait_closed()
            assert not any(isinstance(m, Welcome) for m in received), received
        finally:
            peer.close()
    line = assert_rejected(node, before, address, "TLS error", *reasons)
    assert "refused replication connection from ?" in line  # no Hello was ever read
    assert_nothing_applied(node, before, dirpath)


def test_certificate_of_another_ca_is_refused(node: Node, cluster: Cluster) -> None:
    dirpath = case_dir(node, "foreign-ca")
    foreign = cluster.certs.issue("b", ca=trustme.CA())
    _hostile_tls(node, cluster, foreign, dirpath, "CERTIFICATE_VERIFY_FAILED")


def test_client_without_certificate_is_refused(node: Node, cluster: Cluster) -> None:
    dirpath = case_dir(node, "no-cert")
    _hostile_tls(node, cluster, None, dirpath, "PEER_DID_NOT_RETURN_A_CERTIFICATE")


# --- c: identity -----------------------------------------------------------------------------


@pytest.mark.parametrize(("cert_name", "claimed", "logged_as", "reason"), [
    ("c-impostor", "b", "b", "node id 'b' is not in its certificate (which names c-impostor)"),
    ("c", "c", "c", "node 'c' is not one of this node's configured peers"),
    ("a", "a", "?", "protocol error: peer claims our own node id 'a'"),
])
def test_wrong_identity_is_refused(node: Node, cluster: Cluster, cert_name: str,
                                   claimed: str, logged_as: str, reason: str) -> None:
    dirpath = case_dir(node, f"identity-{cert_name}-{claimed}")
    before = observe(node)
    peer = connect(node, cluster, cluster.certs.issue(cert_name))
    try:
        peer.send(encode(Hello(PROTOCOL_VERSION, claimed, "test", EPOCH, {})))
        received = peer.wait_closed()
        assert not any(isinstance(m, Welcome) for m in received), received
        # Whatever follows is never read.
        planned = plan_file(claimed, next_seq(node), dirpath, b"must not arrive")
        peer.send(encode(Changes(claimed, EPOCH, tuple(planned.changes))))
    finally:
        peer.close()
    line = assert_rejected(node, before, peer.address, reason)
    assert f"refused replication connection from {logged_as} " in line
    assert_nothing_applied(node, before, dirpath)


@pytest.mark.parametrize(("hello", "reason"), [
    (Hello(PROTOCOL_VERSION, "b", "another-cluster", EPOCH, {}),
     "belongs to cluster 'another-cluster', not 'test'"),
    (Hello(PROTOCOL_VERSION + 1, "b", "test", EPOCH, {}),
     f"peer speaks mailfs protocol version {PROTOCOL_VERSION + 1}"),
])
def test_bad_hello_is_refused(node: Node, cluster: Cluster, hello: Hello, reason: str
                              ) -> None:
    dirpath = case_dir(node, f"hello-{hello.cluster}-{hello.version}")
    before = observe(node)
    peer = connect(node, cluster, cluster.certs.issue("b"))
    try:
        peer.send(encode(hello))
        received = peer.wait_closed()
        assert not any(isinstance(m, Welcome) for m in received), received
    finally:
        peer.close()
    assert_rejected(node, before, peer.address, reason)
    assert_nothing_applied(node, before, dirpath)


# --- d, e, f: broken frames after the handshake -----------------------------------------------


def _flipped_payload(frame: bytes) -> bytes:
    damaged = bytearray(frame)
    damaged[HEADER.size + len(damaged[HEADER.size:]) // 2] ^= 0x01
    return bytes(damaged)


def _oversized(frame: bytes) -> bytes:
    return HEADER.pack(MAX_FRAME_DEFAULT + 1, MessageType.CHANGES, 0) + frame[HEADER.size:]


def _random_bytes(frame: bytes) -> bytes:
    return random.Random(20240611).randbytes(4096)


def _random_small_frame(frame: bytes) -> bytes:
    # A plausible length, so the frame is read whole and fails its checksum.
    junk = random.Random(7).randbytes(300)
    return HEADER.pack(len(junk) - HEADER.size, junk[4], 0x0123456789ABCDEF) + junk[HEADER.size:]


def _garbled_payload_good_checksum(frame: bytes) -> bytes:
    junk = random.Random(11).randbytes(200)
    checksum = xxhash.xxh3_64_intdigest(bytes((MessageType.CHANGES,)) + junk)
    return HEADER.pack(len(junk), MessageType.CHANGES, checksum) + junk


@pytest.mark.parametrize(("mangle", "reason"), [
    (_flipped_payload, "protocol error: frame checksum mismatch (type 3"),
    (_oversized, f"protocol error: frame of {MAX_FRAME_DEFAULT + 1} bytes exceeds the "
                 f"{MAX_FRAME_DEFAULT}-byte limit"),
    (_random_bytes, "protocol error: "),
    (_random_small_frame, "protocol error: frame checksum mismatch"),
    (_garbled_payload_good_checksum, "protocol error: garbled Changes frame"),
], ids=["bad-checksum", "oversized", "random-bytes", "random-frame", "garbled-payload"])
def test_broken_frame_is_refused(node: Node, cluster: Cluster,
                                 mangle: Callable[[bytes], bytes], reason: str) -> None:
    dirpath = case_dir(node, f"frame-{mangle.__name__.strip('_')}")
    before = observe(node)
    peer = connect(node, cluster, cluster.certs.issue("b"))
    try:
        welcome = peer.handshake()
        planned = plan_file("b", welcome.applied.get("b", 0) + 1, dirpath, b"x" * 1000)
        peer.send(mangle(encode(Changes("b", EPOCH, tuple(planned.changes)))))
        received = peer.wait_closed()
        assert not any(isinstance(m, Ack) for m in received), received
    finally:
        peer.close()
    assert_rejected(node, before, peer.address, reason)
    assert_nothing_applied(node, before, dirpath)


@pytest.mark.parametrize("orderly", [True, False], ids=["close-notify", "tcp-drop"])
def test_torn_frame_is_not_applied(node: Node, cluster: Cluster, orderly: bool) -> None:
    """The peer sends most of a frame and goes away: with a TLS close_notify that is a
    protocol error (counted); a bare TCP close is a dropped connection (logged only)."""
    dirpath = case_dir(node, f"torn-{orderly}")
    before = observe(node)
    peer = connect(node, cluster, cluster.certs.issue("b"))
    try:
        welcome = peer.handshake()
        planned = plan_file("b", welcome.applied.get("b", 0) + 1, dirpath, b"torn" * 100)
        frame = encode(Changes("b", EPOCH, tuple(planned.changes)))
        peer.send(frame[:-5])
        if orderly:
            peer.tls.settimeout(IO_TIMEOUT)
            peer.tls.unwrap()  # close_notify; returns once the node closed its side too
        else:
            peer.tls.shutdown(socket.SHUT_WR)  # FIN without close_notify
            peer.wait_closed()
    finally:
        peer.close()
    if orderly:
        assert_rejected(node, before, peer.address, "protocol error: connection closed "
                        "mid-frame")
    else:
        wait_for(lambda: "UNEXPECTED_EOF" in node.log()[before.log_size:], timeout=10,
                 what="the dropped connection to be logged")
        line = one_log_line(node, before, peer.address)
        assert f"replication stream from b ({peer.address}) closed: TLS error" in line
    assert_nothing_applied(node, before, dirpath)


# --- g: damaged records inside a valid frame ------------------------------------------------


def _record_checksum(changes: list[Change]) -> list[Change]:
    second = changes[1]
    return [changes[0], Change(second.seq, second.base_version, damage_record(second.record))]


def _record_truncated(changes: list[Change]) -> list[Change]:
    second = changes[1]
    return [changes[0], Change(second.seq, second.base_version, second.record[:-3])]


def _record_bad_op(changes: list[Change]) -> list[Change]:
    # A body that passes its own checksum but names no op.
    body = struct.pack("<QB", changes[1].seq, 99)
    record = struct.pack("<IQ", len(body), xxhash.xxh3_64_intdigest(body)) + body
    return [changes[0], Change(changes[1].seq, changes[1].base_version, record)]


def _record_wrong_seq(changes: list[Change]) -> list[Change]:
    # The record inside says another seq than the change carrying it.
    return [changes[0], Change(changes[1].seq, changes[1].base_version,
                               encode_record(Record(changes[1].seq + 7, Op.DROP, (1,))))]


def _record_snapshot_only(changes: list[Change]) -> list[Change]:
    record = Record(changes[1].seq, Op.SNAP_NAME, (b"", b"dovecot.index", 1))
    return [changes[0], Change(changes[1].seq, changes[1].base_version, encode_record(record))]


def _takeover(seq: int, node: bytes, entries: list[ManifestEntry]) -> Change:
    fields = (b"someone", node, 1, 1, pack_seq_map({}), pack_manifest(entries))
    return Change(seq, 0, encode_record(Record(seq, Op.OWN, fields)))


def _record_takeover_for_another_node(changes: list[Change]) -> list[Change]:
    return [changes[0], _takeover(changes[1].seq, b"c", [])]


def _record_takeover_outside_its_user(changes: list[Change]) -> list[Change]:
    entry = ManifestEntry(b"someone-else", b"dovecot.index", 1, 1, 0,
                          Attrs(0o100600, 0, 0, 1, 0, 0, 0, 0))
    return [changes[0], _takeover(changes[1].seq, b"b", [entry])]


@pytest.mark.parametrize(("damage", "reason"), [
    (_record_takeover_for_another_node, "is impossible: a takeover in the name of b'c'"),
    (_record_takeover_outside_its_user, "is impossible: OWN of b'someone' lists a name "
                                        "outside it"),
    (_record_checksum, "is damaged: record checksum mismatch"),
    (_record_truncated, "is damaged: record length"),
    (_record_bad_op, "is damaged: bad record head"),
    (_record_wrong_seq, "carries a DROP record with seq"),
    (_record_snapshot_only, "carries a SNAP_NAME record"),
], ids=["takeover-for-another", "takeover-outside", "checksum", "truncated", "unknown-op",
        "wrong-seq", "snapshot-op"])
def test_damaged_record_in_a_valid_frame_is_refused(
        node: Node, cluster: Cluster, damage: Callable[[list[Change]], list[Change]],
        reason: str) -> None:
    """The first change of the batch is fine, the second damaged: neither is applied."""
    dirpath = case_dir(node, f"record-{damage.__name__.strip('_')}")
    before = observe(node)
    peer = connect(node, cluster, cluster.certs.issue("b"))
    try:
        welcome = peer.handshake()
        planned = plan_file("b", welcome.applied.get("b", 0) + 1, dirpath, b"damaged")
        # encode() computes the frame checksum over the damaged record: the frame is valid.
        peer.send(encode(Changes("b", EPOCH, tuple(damage(planned.changes)))))
        received = peer.wait_closed()
        assert [m.reason for m in received if isinstance(m, Goodbye)] != []
        assert not any(isinstance(m, Ack) for m in received), received
    finally:
        peer.close()
    assert_rejected(node, before, peer.address, reason)
    assert_nothing_applied(node, before, dirpath)


# --- h: changes of another origin ------------------------------------------------------------


@pytest.mark.parametrize(("origin", "reason"), [
    ("c", "'b' sent changes of 'c'; a peer may only send its own"),
    ("a", "peer sent changes of our own origin"),
])
def test_changes_of_another_origin_are_refused(node: Node, cluster: Cluster, origin: str,
                                               reason: str) -> None:
    dirpath = case_dir(node, f"origin-{origin}")
    before = observe(node)
    peer = connect(node, cluster, cluster.certs.issue("b"))
    try:
        welcome = peer.handshake()
        planned = plan_file(origin, welcome.applied.get(origin, 0) + 1, dirpath, b"not b's")
        peer.send(encode(Changes(origin, EPOCH, tuple(planned.changes))))
        received = peer.wait_closed()
        assert not any(isinstance(m, Ack) for m in received), received
    finally:
        peer.close()
    assert_rejected(node, before, peer.address, reason)
    assert_nothing_applied(node, before, dirpath)
    assert origin not in node.replication()["peers"]


# --- i: seq gaps -----------------------------------------------------------------------------


def test_seq_gap_inside_a_batch_is_refused(node: Node, cluster: Cluster) -> None:
    dirpath = case_dir(node, "gap-in-batch")
    before = observe(node)
    peer = connect(node, cluster, cluster.certs.issue("b"))
    try:
        welcome = peer.handshake()
        first = welcome.applied.get("b", 0) + 1
        planned = plan_file("b", first, dirpath, b"gap")
        create, write = planned.changes
        peer.send(encode(Changes("b", EPOCH, (create, reseq(write, first + 2)))))
        received = peer.wait_closed()
        assert not any(isinstance(m, Ack) for m in received), received
    finally:
        peer.close()
    assert_rejected(node, before, peer.address,
                    f"seq {first + 2} where {first + 1} was expected")
    assert_nothing_applied(node, before, dirpath)


def test_seq_gap_between_batches_applies_only_the_first(node: Node, cluster: Cluster
                                                         ) -> None:
    """seq N is fine and applied; seq N+2 in the next frame closes the connection and is
    not applied."""
    dirpath = case_dir(node, "gap-between")
    peer = connect(node, cluster, cluster.certs.issue("b"))
    try:
        welcome = peer.handshake()
        first = welcome.applied.get("b", 0) + 1
        planned = plan_file("b", first, dirpath, b"after the gap")
        create, write = planned.changes
        peer.send(encode(Changes("b", EPOCH, (create,))))
        peer.wait_ack("b", first)
        before = observe(node)  # the CREATE is legitimately here now
        assert os.listdir(node.path("gap-between")) == [FILE.decode()]
        peer.send(encode(Changes("b", EPOCH, (reseq(write, first + 2),))))
        received = peer.wait_closed()
        assert not any(isinstance(m, Ack) and m.seq > first for m in received), received
    finally:
        peer.close()
    assert_rejected(node, before, peer.address,
                    f"seq {first + 2} where {first + 1} was expected")
    replication = node.replication()
    assert replication["remote_applied"] == before.remote_applied
    assert replication["peers"]["b"]["applied_from_peer"] == first
    assert node.path(f"gap-between/{FILE.decode()}").read_bytes() == b""


# --- records a peer may never send, although they parse ----------------------------------------


def test_export_never_writes_outside_the_backing_path(node: Node, cluster: Cluster) -> None:
    """Whatever a peer's records name, `mailfs export` on the receiving node writes only
    below its backing path. (Runs before the test below, whose names would make the export
    fail for another reason.)"""
    outside = cluster.base / "escape"
    outside.mkdir()
    peer = connect(node, cluster, cluster.certs.issue("b"))
    try:
        welcome = peer.handshake()
        planned = plan_file("b", welcome.applied.get("b", 0) + 1, b"../escape", b"pwned\n")
        peer.send(encode(Changes("b", EPOCH, tuple(planned.changes))))
        peer.wait_closed_or_acked("b", planned.last_seq)
    finally:
        peer.close()
    result = run_cli("export", str(node.mountpoint))
    assert result.returncode == 0, result.stderr
    escaped = sorted(os.listdir(outside))
    assert escaped == [], (f"mailfs export wrote {escaped} into {outside}, outside the "
                           f"backing path {cluster.backing} (export: {result.stdout.strip()}"
                           f"{result.stderr.strip()})")


@pytest.mark.parametrize(("where", "name"), [
    (b"", b"../escape-" + FILE),
    (b"../outside", FILE),
    (b"/etc", FILE),
    (b"", b"sub/" + FILE),
    (b"", b"nul\0" + FILE),
    (b"", b""),
], ids=["dotdot-name", "dotdot-dir", "absolute-dir", "slash-in-name", "nul-in-name",
        "empty-name"])
def test_record_with_an_impossible_path_is_refused(node: Node, cluster: Cluster,
                                                   where: bytes, name: bytes) -> None:
    """No file system hands mailfs such a name, and `mailfs export` would write it outside
    the backing path (or snapshots would carry a name every peer refuses): a peer sending
    one is broken or hostile, and it must be treated like a damaged record."""
    before = observe(node)
    peer = connect(node, cluster, cluster.certs.issue("b"))
    try:
        welcome = peer.handshake()
        seq = welcome.applied.get("b", 0) + 1
        now = time.time_ns()
        record = Record(seq, Op.CREATE, (make_fid(node_namespace("b"), next(_fids)), where,
                                         name, Attrs(MODE, 0, 0, 1, 0, now, now, now)))
        peer.send(encode(Changes("b", EPOCH, (Change(seq, 0, encode_record(record)),))))
        outcome = peer.wait_closed_or_acked("b", seq)
    finally:
        peer.close()
    assert outcome == "closed", f"node a applied and acknowledged a CREATE of {where!r}/{name!r}"
    assert_rejected(node, before, peer.address)
    replication = node.replication()
    assert replication["remote_applied"] == before.remote_applied
    assert replication["peers"]["b"]["applied_from_peer"] == before.applied_from_b


# --- afterwards -----------------------------------------------------------------------------


def test_zz_node_still_applies_a_good_stream_afterwards(node: Node, cluster: Cluster) -> None:
    send_good_stream(node, cluster, "good-last", b"still applied after all that\n")
    # The refusals are warnings, never errors or tracebacks.
    assert cluster.problems() == []
