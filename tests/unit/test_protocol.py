"""The replication wire protocol: frames round trip, damage is always caught, sessions
enforce the handshake and the ordering rules."""

from __future__ import annotations

import itertools
import struct

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from mailfs.replication.protocol import (
    HEADER,
    MAGIC,
    MAX_FRAME_DEFAULT,
    MIN_FRAME_LIMIT,
    PROTOCOL_VERSION,
    Ack,
    Change,
    Changes,
    Decoder,
    Goodbye,
    Hello,
    Message,
    MessageType,
    Ping,
    Pong,
    ProtocolError,
    Session,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotEnd,
    SnapshotProgress,
    Welcome,
    batch_changes,
    changes_payload_size,
    encode,
    snapshot_chunks,
)

CLUSTER = "mail-eu"

u64 = st.integers(min_value=0, max_value=2**64 - 1)
names = st.text(
    st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp")),
    min_size=1,
    max_size=12,
)
seq_maps = st.dictionaries(names, u64, max_size=4)
blobs = st.binary(max_size=64)

hellos = st.builds(Hello, st.just(PROTOCOL_VERSION), names, names, u64, seq_maps)
welcomes = st.builds(Welcome, names, u64, seq_maps)
change = st.builds(Change, u64, u64, blobs)
changes = st.builds(Changes, names, u64, st.lists(change, max_size=4).map(tuple))
acks = st.builds(Ack, names, u64)
snapshot_begins = st.builds(SnapshotBegin, seq_maps, u64, u64)
snapshot_chunks_st = st.builds(SnapshotChunk, u64, u64, blobs)
snapshot_ends = st.builds(SnapshotEnd, u64, u64)
pings = st.builds(Ping, u64)
pongs = st.builds(Pong, u64)
goodbyes = st.builds(Goodbye, st.text(max_size=40))

messages: st.SearchStrategy[Message] = st.one_of(
    hellos, welcomes, changes, acks, snapshot_begins, snapshot_chunks_st, snapshot_ends,
    pings, pongs, goodbyes,
)


def frame(message_type: int, payload: bytes) -> bytes:
    """A frame with a correct checksum around an arbitrary payload."""
    hasher = xxhash.xxh3_64()
    hasher.update(bytes((message_type,)))
    hasher.update(payload)
    digest: int = hasher.intdigest()
    return HEADER.pack(len(payload), message_type, digest) + payload


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# --- frames -------------------------------------------------------------------------------


@given(messages)
def test_every_message_round_trips(message: Message) -> None:
    assert Decoder().feed(encode(message)) == [message]


@given(st.lists(messages, max_size=8), st.lists(st.integers(min_value=0), max_size=12))
def test_any_chunking_yields_the_same_messages(batch: list[Message], cuts: list[int]) -> None:
    stream = b"".join(encode(m) for m in batch)
    decoder = Decoder()
    out: list[Message] = []
    for piece in split(stream, cuts):
        out.extend(decoder.feed(piece))
    decoder.eof()
    assert out == batch
    assert decoder.buffered == 0


@given(st.lists(messages, min_size=1, max_size=3))
def test_byte_by_byte(batch: list[Message]) -> None:
    decoder = Decoder()
    out: list[Message] = []
    for byte in b"".join(encode(m) for m in batch):
        out.extend(decoder.feed(bytes((byte,))))
    assert out == batch


@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_a_flipped_bit_is_always_detected(batch: list[Message], data: st.DataObject) -> None:
    stream = bytearray(b"".join(encode(m) for m in batch))
    bit = data.draw(st.integers(min_value=0, max_value=len(stream) * 8 - 1))
    stream[bit // 8] ^= 1 << (bit % 8)
    cuts = data.draw(st.lists(st.integers(min_value=0), max_size=4))
    decoder = Decoder()
    out: list[Message] = []
    with pytest.raises(ProtocolError):
        for piece in split(bytes(stream), cuts):
            out.extend(decoder.feed(piece))
        decoder.eof()
    # Only undamaged frames before the flipped bit came out, never a wrong message.
    assert out == batch[:len(out)]
    assert len(b"".join(encode(m) for m in out)) <= bit // 8


@given(st.integers(min_value=MAX_FRAME_DEFAULT + 1, max_value=2**32 - 1))
def test_oversized_length_is_refused_from_the_length_alone(length: int) -> None:
    decoder = Decoder()
    with pytest.raises(ProtocolError, match=f"frame of {length} bytes exceeds the "
                       f"{MAX_FRAME_DEFAULT}-byte limit"):
        decoder.feed(struct.pack("<I", length))
    assert decoder.buffered == 0
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(b"")


def test_oversized_length_is_refused_with_a_small_limit() -> None:
    decoder = Decoder(max_frame=MIN_FRAME_LIMIT)
    big = frame(MessageType.PING, b"\0" * (MIN_FRAME_LIMIT + 1))
    assert decoder.feed(big[:3]) == []
    with pytest.raises(ProtocolError, match="exceeds the 4096-byte limit"):
        decoder.feed(big[3:HEADER.size])
    with pytest.raises(ValueError, match="frame limit"):
        encode(Goodbye("x" * 10), max_frame=5)


@given(st.binary(min_size=1, max_size=300), st.lists(st.integers(min_value=0), max_size=6))
def test_garbage_only_ever_gives_protocol_error(garbage: bytes, cuts: list[int]) -> None:
    decoder = Decoder()
    with pytest.raises(ProtocolError):
        for piece in split(garbage, cuts):
            assert decoder.feed(piece) == []
        decoder.eof()


@given(st.integers(min_value=0, max_value=255), st.binary(max_size=200))
def test_checksummed_garbage_parses_or_gives_protocol_error(kind: int, payload: bytes) -> None:
    try:
        out = Decoder().feed(frame(kind, payload))
    except ProtocolError:
        return
    assert len(out) == 1
    encode(out[0])  # whatever parsed is a well-formed message


@given(messages, st.data())
def test_mutated_payloads_parse_or_give_protocol_error(
    message: Message, data: st.DataObject
) -> None:
    raw = encode(message)
    kind, payload = raw[4], bytearray(raw[HEADER.size:])
    if payload:
        for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
            at = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
            payload[at] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(payload)))
    try:
        out = Decoder().feed(frame(kind, bytes(payload[:cut])))
    except ProtocolError:
        return
    assert len(out) == 1
    encode(out[0])


def test_clear_reasons() -> None:
    with pytest.raises(ProtocolError, match="unknown message type 77"):
        Decoder().feed(frame(77, b"abc"))
    damaged = bytearray(encode(Ping(5)))
    damaged[-1] ^= 0x10
    with pytest.raises(ProtocolError, match="frame checksum mismatch"):
        Decoder().feed(bytes(damaged))
    huge_count = b"\x01\0\0\0o" + struct.pack("<QI", 1, 10**6)
    with pytest.raises(ProtocolError, match="garbled Changes frame: change count 1000000"):
        Decoder().feed(frame(MessageType.CHANGES, huge_count))
    fits_not = b"\x01\0\0\0o" + struct.pack("<QI", 1, 60_000) + b"\0" * 100
    with pytest.raises(ProtocolError, match="change count 60000 does not fit in the payload"):
        Decoder().feed(frame(MessageType.CHANGES, fits_not))
    twice = struct.pack("<I", 2) + (b"\x01\0\0\0o" + struct.pack("<Q", 1)) * 2
    with pytest.raises(ProtocolError, match="garbled Welcome frame: applied names origin 'o'"):
        Decoder().feed(frame(MessageType.WELCOME, b"\x01\0\0\0n" + b"\0" * 8 + twice))
    with pytest.raises(ProtocolError, match="garbled Ping frame: 1 stray bytes"):
        Decoder().feed(frame(MessageType.PING, b"\0" * 9))
    with pytest.raises(ProtocolError, match="garbled Ack frame: origin is not valid UTF-8"):
        Decoder().feed(frame(MessageType.ACK, b"\x02\0\0\0\xff\xfe" + b"\0" * 8))
    with pytest.raises(ProtocolError, match="not a mailfs peer"):
        Decoder().feed(frame(MessageType.HELLO, b"IMAPv4" + b"\0" * 30))
    wrong = encode(Hello(7, "a", "c", 0, {}))
    with pytest.raises(ProtocolError, match="protocol version 7, this node speaks version 1"):
        Decoder().feed(wrong)
    decoder = Decoder()
    decoder.feed(encode(Ping(1))[:5])
    with pytest.raises(ProtocolError, match="connection closed mid-frame"):
        decoder.eof()


def test_a_failed_decoder_stays_failed() -> None:
    decoder = Decoder()
    with pytest.raises(ProtocolError):
        decoder.feed(frame(99, b""))
    with pytest.raises(ProtocolError, match="already failed: unknown message type 99"):
        decoder.feed(encode(Ping(1)))


def test_invalid_messages_cannot_be_built() -> None:
    with pytest.raises(ValueError):
        Ack("", 1)
    with pytest.raises(ValueError):
        Ack("node\n", 1)
    with pytest.raises(ValueError):
        Ping(2**64)
    with pytest.raises(ValueError):
        Ping(-1)
    with pytest.raises(ValueError):
        Welcome("n" * 256, 0, {})
    with pytest.raises(ValueError):
        Goodbye("x" * 5000)


@given(st.lists(st.builds(Change, u64, u64, st.binary(max_size=3000)), max_size=30))
def test_batches_fit_the_frame_limit_and_keep_order(items: list[Change]) -> None:
    limit = MIN_FRAME_LIMIT * 2
    batches = list(batch_changes("node-a", 3, items, max_frame=limit, max_count=7))
    assert [c for b in batches for c in b.records] == items
    for b in batches:
        assert 0 < len(b.records) <= 7
        assert len(encode(b, max_frame=limit)) - HEADER.size == changes_payload_size(
            "node-a", b.records
        )
    with pytest.raises(ValueError, match="cannot fit"):
        list(batch_changes("a", 0, [Change(1, 0, b"x" * limit)], max_frame=limit))


# --- sessions -----------------------------------------------------------------------------


def make_pair(
    client_applied: dict[str, int] | None = None,
    server_applied: dict[str, int] | None = None,
) -> tuple[Session, Session]:
    client = Session("client", "node-a", CLUSTER, 4, lambda: client_applied or {})
    server = Session("server", "node-b", CLUSTER, 9, lambda: server_applied or {})
    return client, server


def handshake(client: Session, server: Session) -> None:
    [hello] = server.receive(client.hello())
    assert isinstance(hello, Hello)
    [welcome] = client.receive(server.welcome())
    assert isinstance(welcome, Welcome)


def test_handshake_happy_path() -> None:
    client, server = make_pair({"node-b": 5, "node-c": 2}, {"node-a": 7})
    [hello] = server.receive(client.hello())
    assert hello == Hello(PROTOCOL_VERSION, "node-a", CLUSTER, 4, {"node-b": 5, "node-c": 2})
    assert not server.established
    [welcome] = client.receive(server.welcome())
    assert welcome == Welcome("node-b", 9, {"node-a": 7})
    assert client.established and server.established
    assert server.peer_node_id == "node-a" and server.peer_epoch == 4
    assert server.peer_applied == {"node-b": 5, "node-c": 2}
    assert client.peer_node_id == "node-b" and client.peer_epoch == 9
    assert client.peer_applied == {"node-a": 7}

    # The server resumes sending its own changes after what the client has applied.
    batch = Changes("node-b", 9, (Change(6, 0, b"r6"), Change(7, 3, b"r7")))
    assert client.receive(server.send(batch)) == [batch]
    assert client.received_through("node-b") == 7
    assert server.receive(client.send(Ack("node-b", 7))) == [Ack("node-b", 7)]
    assert server.acknowledged_through("node-b") == 7
    # And the client sends its own from 8.
    mine = Changes("node-a", 4, (Change(8, 1, b"r8"),))
    assert server.receive(client.send(mine)) == [mine]
    assert client.receive(server.send(Ack("node-a", 8))) == [Ack("node-a", 8)]
    assert client.receive(server.send(Ping(42))) == [Ping(42)]
    assert server.receive(client.send(Pong(42))) == [Pong(42)]
    assert client.receive(server.send(Goodbye("shutting down"))) == [Goodbye("shutting down")]
    assert client.goodbye_received
    client.eof()
    server.eof()


def test_snapshot_then_live_stream() -> None:
    client, server = make_pair()
    handshake(client, server)
    body = bytes(range(256)) * 40
    begin = SnapshotBegin({"node-b": 50, "node-c": 3}, len(body), 11)
    stream = server.send(begin)
    for chunk in snapshot_chunks(11, 0, body, chunk_size=1000):
        stream += server.send(chunk)
    checksum = server.outgoing_snapshot_checksum()
    assert checksum == xxhash.xxh3_64_intdigest(body)
    stream += server.send(SnapshotEnd(11, checksum))
    stream += server.send(Changes("node-b", 9, (Change(51, 0, b"live"),)))
    progress: list[SnapshotProgress] = []
    out: list[Message] = []
    for piece in split(stream, list(range(0, len(stream), 777))):
        out.extend(client.receive(piece))
        if client.incoming_snapshot is not None:
            progress.append(client.incoming_snapshot)
    assert b"".join(m.data for m in out if isinstance(m, SnapshotChunk)) == body
    assert progress[-1].complete and progress[-1].fraction == 1.0
    fractions = [p.fraction for p in progress]
    assert fractions == sorted(fractions) and fractions[0] < 1.0
    assert "of 10240 bytes" in str(progress[-1])
    assert client.received_through("node-b") == 51
    assert client.received_through("node-c") == 3
    assert server.outgoing_snapshot is not None and server.outgoing_snapshot.complete
    # The peer can now acknowledge up to what the snapshot covered.
    server.receive(client.send(Ack("node-c", 3)))


def refused(session: Session, data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        session.receive(data)
    assert session.failed
    with pytest.raises(ProtocolError, match="already failed"):
        session.receive(encode(Ping(1)))


def test_server_refuses_changes_before_hello() -> None:
    _, server = make_pair()
    refused(server, encode(Changes("node-a", 1, (Change(1, 0, b"x"),))),
            "expected Hello as the first frame, got Changes")


def test_server_refuses_a_wrong_version() -> None:
    _, server = make_pair()
    refused(server, encode(Hello(2, "node-a", CLUSTER, 1, {})), "protocol version 2")


def test_server_refuses_a_wrong_cluster() -> None:
    _, server = make_pair()
    refused(server, encode(Hello(1, "node-a", "other", 1, {})),
            "belongs to cluster 'other', not 'mail-eu'")


def test_server_refuses_its_own_node_id() -> None:
    _, server = make_pair()
    refused(server, encode(Hello(1, "node-b", CLUSTER, 1, {})), "our own node id 'node-b'")


def test_client_refuses_its_own_node_id_and_a_missing_welcome() -> None:
    client, _ = make_pair()
    client.hello()
    refused(client, encode(Welcome("node-a", 1, {})), "our own node id")
    client, _ = make_pair()
    client.hello()
    refused(client, encode(Ping(3)), "expected Welcome as the first frame, got Ping")
    client, _ = make_pair()
    refused(client, encode(Welcome("node-b", 1, {})), "before sending Hello")


def test_a_disconnect_during_the_handshake_is_an_error() -> None:
    client, server = make_pair()
    server.receive(client.hello())
    with pytest.raises(ProtocolError, match="closed before the handshake finished"):
        server.eof()
    client, server = make_pair()
    client.hello()
    client.receive(server.send(Goodbye("wrong cluster")))
    client.eof()  # the server said why; nothing more to report


def test_expected_peer_id_is_checked() -> None:
    server = Session("server", "node-b", CLUSTER, 1, dict, expected_peer_id="node-x")
    refused(server, encode(Hello(1, "node-a", CLUSTER, 1, {})),
            "identifies as 'node-a', expected 'node-x'")


def test_a_non_mailfs_client_is_refused() -> None:
    _, server = make_pair()
    refused(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad handshake: .*not a mailfs peer")
    _, server = make_pair()
    refused(server, frame(MessageType.HELLO, b"SMTP!!" + b"\0" * 20), "not a mailfs peer")


def test_client_must_wait_for_welcome() -> None:
    client, server = make_pair()
    early = client.hello() + encode(Changes("node-a", 4, (Change(1, 0, b"x"),)))
    refused(server, early, "before Welcome was sent")
    client, server = make_pair()
    client.hello()
    with pytest.raises(ProtocolError, match="handshake has not finished"):
        client.send(Ping(1))


def test_duplicate_hello_is_refused() -> None:
    client, server = make_pair()
    handshake(client, server)
    refused(server, encode(Hello(1, "node-a", CLUSTER, 4, {})), "duplicate Hello")


def established() -> tuple[Session, Session]:
    client, server = make_pair({"node-b": 10})
    handshake(client, server)
    return client, server


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (Changes("node-b", 1, (Change(10, 0, b"x"),)), r"seq 10 where 11 was expected"),
        (Changes("node-b", 1, (Change(12, 0, b"x"),)), r"seq 12 where 11 was expected"),
        (Changes("node-b", 1, (Change(11, 0, b"x"), Change(11, 0, b"y"))), "seq 11 where 12"),
        (Changes("node-b", 1, ()), "empty Changes batch"),
        (Changes("node-a", 1, (Change(1, 0, b"x"),)), "our own origin"),
        (Ack("node-a", 1), "only seqs through 0 were sent"),
        (Pong(77), "Pong for nonce 77, which we never sent"),
        (SnapshotChunk(1, 0, b"x"), "chunk without SnapshotBegin"),
        (SnapshotEnd(1, 0), "SnapshotEnd without SnapshotBegin"),
    ],
)
def test_client_refuses_out_of_order_traffic(message: Message, match: str) -> None:
    client, _ = established()
    refused(client, encode(message), match)


def test_non_contiguous_mode_allows_gaps_but_not_regressions() -> None:
    client = Session("client", "node-a", CLUSTER, 1, lambda: {"node-b": 10},
                     contiguous_seqs=False)
    server = Session("server", "node-b", CLUSTER, 1, dict, contiguous_seqs=False)
    handshake(client, server)
    client.receive(server.send(Changes("node-b", 1, (Change(15, 0, b"x"),))))
    refused(client, encode(Changes("node-b", 1, (Change(15, 0, b"x"),))),
            "seq 15 does not follow 15")


def test_acks_may_not_go_backwards() -> None:
    client, server = established()
    server.receive(client.send(Changes("node-a", 4, (Change(1, 0, b"a"), Change(2, 0, b"b")))))
    client.receive(server.send(Ack("node-a", 2)))
    refused(client, encode(Ack("node-a", 1)), "goes back from 2")


def snapshot_session() -> tuple[Session, Session]:
    client, server = established()
    client.receive(server.send(SnapshotBegin({"node-b": 20}, 10, 5)))
    client.receive(server.send(SnapshotChunk(5, 0, b"0123")))
    return client, server


BODY = b"0123456789"


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (SnapshotChunk(5, 5, b"56789"), "chunk at offset 5, expected offset 4"),
        (SnapshotChunk(5, 2, b"23456"), "chunk at offset 2, expected offset 4"),
        (SnapshotChunk(5, 4, b"4567890"), "past the declared total of 10 bytes"),
        (SnapshotChunk(6, 4, b"456789"), "chunk of snapshot 6 during snapshot 5"),
        (SnapshotChunk(5, 4, b""), "empty chunk"),
        (SnapshotEnd(5, xxhash.xxh3_64_intdigest(b"0123")), "ended after 4 of 10 bytes"),
        (SnapshotBegin({}, 1, 6), "while snapshot 5 is in progress"),
        (Changes("node-b", 1, (Change(11, 0, b"x"),)), "during snapshot 5"),
    ],
)
def test_snapshot_violations_are_refused(message: Message, match: str) -> None:
    client, _ = snapshot_session()
    refused(client, encode(message), match)


def test_a_bad_snapshot_checksum_is_refused() -> None:
    client, server = snapshot_session()
    client.receive(server.send(SnapshotChunk(5, 4, b"456789")))
    assert client.incoming_snapshot == SnapshotProgress(5, 10, 10, False)
    bad = xxhash.xxh3_64_intdigest(BODY) ^ 1
    with pytest.raises(ProtocolError, match=r"refusing to send SnapshotEnd: .*checksum mismatch"):
        server.send(SnapshotEnd(5, bad))
    refused(client, encode(SnapshotEnd(5, bad)), "snapshot 5 checksum mismatch")


def test_a_disconnect_mid_snapshot_is_an_error() -> None:
    client, _ = snapshot_session()
    with pytest.raises(ProtocolError, match="connection closed during incoming snapshot 5"):
        client.eof()


def test_nothing_may_follow_goodbye() -> None:
    client, server = established()
    data = server.send(Goodbye("bye")) + encode(Ping(1))
    refused(client, data, "Ping after Goodbye")
    with pytest.raises(ProtocolError, match="after Goodbye"):
        server.send(Ping(2))


def test_a_failed_session_can_still_say_goodbye() -> None:
    _, server = make_pair()
    refused(server, encode(Ping(1)), "expected Hello")
    assert Decoder().feed(server.send(Goodbye("protocol error"))) == [Goodbye("protocol error")]


def test_sending_is_checked_too() -> None:
    client, server = established()
    with pytest.raises(ProtocolError, match=r"refusing to send Changes: .*seq 1 where 11"):
        server.send(Changes("node-b", 9, (Change(1, 0, b"x"),)))
    with pytest.raises(ProtocolError, match="the peer's own changes"):
        server.send(Changes("node-a", 9, (Change(1, 0, b"x"),)))
    with pytest.raises(ProtocolError, match="no snapshot in progress"):
        server.send(SnapshotChunk(1, 0, b"x"))
    with pytest.raises(ProtocolError, match="only a client sends Hello"):
        server.send(Hello(1, "node-b", CLUSTER, 0, {}))
    # A refused send changes nothing: the right batch still goes through.
    batch = Changes("node-b", 9, (Change(11, 0, b"x"),))
    assert client.receive(server.send(batch)) == [batch]


# --- damage at the transport --------------------------------------------------------------


def live_stream(chunks: int, batches: int) -> tuple[Session, list[bytes]]:
    """A client after the handshake, and the server's frames: a snapshot then changes."""
    client, server = make_pair()
    handshake(client, server)
    body = bytes(range(chunks * 3))
    frames = [server.send(SnapshotBegin({"node-b": 100}, len(body), 1))]
    frames += [server.send(c) for c in snapshot_chunks(1, 0, body, chunk_size=3)]
    frames.append(server.send(SnapshotEnd(1, xxhash.xxh3_64_intdigest(body))))
    frames += [
        server.send(Changes("node-b", 9, (Change(101 + i, 0, b"c%d" % i),)))
        for i in range(batches)
    ]
    return client, frames


def deliver(client: Session, frames: list[bytes], cuts: list[int]) -> list[Message]:
    out: list[Message] = []
    for piece in split(b"".join(frames), cuts):
        out.extend(client.receive(piece))
    client.eof()
    return out


@settings(max_examples=60)
@given(
    st.integers(min_value=0, max_value=4),
    st.integers(min_value=1, max_value=4),
    st.data(),
)
def test_reordered_dropped_or_duplicated_frames_are_detected(
    chunks: int, batches: int, data: st.DataObject
) -> None:
    client, frames = live_stream(chunks, batches)
    kind = data.draw(st.sampled_from(["permute", "drop", "duplicate"]))
    if kind == "permute":
        damaged = data.draw(st.permutations(frames))
        if damaged == frames:
            return
    elif kind == "drop":
        # Dropping the very last frame looks like a clean disconnect; any other drop shows.
        at = data.draw(st.integers(min_value=0, max_value=len(frames) - 2))
        damaged = frames[:at] + frames[at + 1:]
    else:
        at = data.draw(st.integers(min_value=0, max_value=len(frames) - 1))
        damaged = frames[:at + 1] + frames[at:]
    cuts = data.draw(st.lists(st.integers(min_value=0), max_size=5))
    with pytest.raises(ProtocolError):
        deliver(client, damaged, cuts)


@given(st.integers(min_value=0, max_value=4), st.integers(min_value=1, max_value=3), st.data())
def test_a_disconnect_anywhere_is_clean_or_an_error(
    chunks: int, batches: int, data: st.DataObject
) -> None:
    client, frames = live_stream(chunks, batches)
    stream = b"".join(frames)
    cut = data.draw(st.integers(min_value=0, max_value=len(stream)))
    boundaries = {sum(len(f) for f in frames[:i]) for i in range(len(frames) + 1)}
    snapshot_done = sum(len(f) for f in frames[:chunks + 2])
    out: list[Message] = []
    try:
        out = client.receive(stream[:cut])
        client.eof()
    except ProtocolError:
        # Torn frames and torn snapshots are errors ...
        assert cut not in boundaries or 0 < cut < snapshot_done
        return
    # ... a disconnect between frames after the snapshot is not, and gives a clean prefix.
    assert cut in boundaries and (cut == 0 or cut >= snapshot_done)
    assert [encode(m) for m in out] == frames[:len(out)]


def test_the_decoder_limit_applies_to_sessions() -> None:
    client = Session("client", "node-a", CLUSTER, 1, dict, max_frame=MIN_FRAME_LIMIT)
    server = Session("server", "node-b", CLUSTER, 1, dict)
    handshake(client, server)
    big = server.send(SnapshotBegin({}, 10_000, 1)) + server.send(
        SnapshotChunk(1, 0, b"x" * 10_000)
    )
    refused(client, big, "exceeds the 4096-byte limit")


def test_magic_is_the_start_of_the_hello_payload() -> None:
    raw = encode(Hello(PROTOCOL_VERSION, "n", "c", 0, {}))
    assert raw[HEADER.size:HEADER.size + len(MAGIC)] == MAGIC
    assert raw[4] == MessageType.HELLO
