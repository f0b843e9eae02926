"""Mutual TLS between nodes: real handshakes over a real TCP connection on 127.0.0.1."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme
from cryptography.hazmat.primitives import serialization

from mailfs.errors import UserError
from mailfs.replication.tls import certificate_names, client_context, server_context

ContextFactory = Callable[[Path, Path, Path], ssl.SSLContext]


@dataclass
class NodeFiles:
    cert: Path
    key: Path
    ca: Path

    def server(self) -> ssl.SSLContext:
        return server_context(self.cert, self.key, self.ca)

    def client(self) -> ssl.SSLContext:
        return client_context(self.cert, self.key, self.ca)


def node_files(tmp_path: Path, issuer: trustme.CA, *identities: str,
               trusted: trustme.CA | None = None, common_name: str | None = None) -> NodeFiles:
    """A node's cert and key from `issuer`, and the CA it trusts (`issuer` unless given)."""
    leaf = issuer.issue_cert(*identities, common_name=common_name)
    directory = tmp_path / f"{identities[0]}-{id(leaf)}"
    directory.mkdir()
    files = NodeFiles(directory / "cert.pem", directory / "key.pem", directory / "ca.pem")
    files.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(files.key))
    (trusted or issuer).cert_pem.write_to_path(str(files.ca))
    return files


@dataclass
class Side:
    """What one end of a connection saw."""

    names: set[str] | None = None
    version: str | None = None
    received: bytes | bytearray = b""
    error: trio.BrokenResourceError | None = None

    def reason(self) -> str | None:
        cause = self.error.__cause__ if self.error is not None else None
        return cause.reason if isinstance(cause, ssl.SSLError) else None


async def converse(stream: trio.SSLStream[trio.SocketStream], message: bytes) -> Side:
    """Handshake, send `message`, receive the other side's; always closes the stream."""
    side = Side()
    try:
        await stream.do_handshake()
        side.names = certificate_names(stream)
        side.version = stream.version()
        await stream.send_all(message)
        # With TLS 1.3 the client's handshake ends before the server has checked the
        # client's certificate: a refused client finds out here.
        side.received = await stream.receive_some()
    except trio.BrokenResourceError as exc:
        side.error = exc
    finally:
        await stream.aclose()
    return side


async def connect(server: ssl.SSLContext, client: ssl.SSLContext,
                  server_hostname: str) -> tuple[Side, Side]:
    """One connection from `client` to `server`: (what the server saw, what the client saw)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    sides: dict[str, Side] = {}

    async def serve() -> None:
        transport = await listener.accept()
        stream = trio.SSLStream(transport, server, server_side=True)
        sides["server"] = await converse(stream, b"from server")

    async def dial() -> None:
        transport = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(transport, client, server_hostname=server_hostname)
        sides["client"] = await converse(stream, b"from client")

    async with listener:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                nursery.start_soon(dial)
    return sides["server"], sides["client"]


async def test_nodes_of_one_ca_connect_and_see_each_others_node_id(tmp_path: Path) -> None:
    ca = trustme.CA()
    node_a = node_files(tmp_path, ca, "node-a")
    node_b = node_files(tmp_path, ca, "node-b")
    server, client = await connect(node_a.server(), node_b.client(), "node-a")
    assert server.error is None and client.error is None
    assert server.names == {"node-b"}
    assert client.names == {"node-a"}
    assert (server.received, client.received) == (b"from client", b"from server")
    assert server.version == client.version == "TLSv1.3"


def test_contexts_trust_only_the_cluster_ca_and_require_certificates(tmp_path: Path) -> None:
    node = node_files(tmp_path, trustme.CA(), "node-a")
    for context in (node.server(), node.client()):
        assert context.verify_mode is ssl.CERT_REQUIRED
        assert context.minimum_version is ssl.TLSVersion.TLSv1_2
        assert len(context.get_ca_certs()) == 1
    assert node.client().check_hostname


async def test_certificate_names_are_dns_names_and_common_name(tmp_path: Path) -> None:
    ca = trustme.CA()
    node_a = node_files(tmp_path, ca, "node-a")
    node_b = node_files(tmp_path, ca, "node-b", "b.example", "127.0.0.1", common_name="legacy-b")
    server, client = await connect(node_a.server(), node_b.client(), "node-a")
    assert server.names == {"node-b", "b.example", "legacy-b"}  # not the IP address
    assert client.names == {"node-a"}


async def test_client_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    ca = trustme.CA()
    node_a = node_files(tmp_path, ca, "node-a")
    stranger = node_files(tmp_path, trustme.CA(), "node-b", trusted=ca)
    server, client = await connect(node_a.server(), stranger.client(), "node-a")
    assert server.error is not None and server.names is None
    assert server.reason() == "CERTIFICATE_VERIFY_FAILED"
    assert client.error is not None and client.received == b""


async def test_client_without_certificate_is_refused(tmp_path: Path) -> None:
    ca = trustme.CA()
    node_a = node_files(tmp_path, ca, "node-a")
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(anonymous)
    server, client = await connect(node_a.server(), anonymous, "node-a")
    assert server.error is not None and server.names is None
    assert server.reason() == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert client.error is not None and client.received == b""


async def test_server_with_another_node_id_is_refused(tmp_path: Path) -> None:
    ca = trustme.CA()
    node_c = node_files(tmp_path, ca, "node-c")
    node_b = node_files(tmp_path, ca, "node-b")
    server, client = await connect(node_c.server(), node_b.client(), "node-a")
    assert client.error is not None and client.names is None
    assert isinstance(client.error.__cause__, ssl.SSLCertVerificationError)
    assert "Hostname mismatch" in client.error.__cause__.verify_message
    assert server.error is not None and server.received == b""


async def test_server_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    ca = trustme.CA()
    impostor = node_files(tmp_path, trustme.CA(), "node-a", trusted=ca)
    node_b = node_files(tmp_path, ca, "node-b")
    server, client = await connect(impostor.server(), node_b.client(), "node-a")
    assert client.error is not None and client.names is None
    assert client.reason() == "CERTIFICATE_VERIFY_FAILED"
    assert server.error is not None and server.received == b""


def encrypted(key: Path) -> bytes:
    private_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
    return private_key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.BestAvailableEncryption(b"secret"))


@pytest.mark.parametrize("factory", [server_context, client_context])
def test_unusable_files_give_one_line_errors(tmp_path: Path, factory: ContextFactory) -> None:
    ca = trustme.CA()
    node = node_files(tmp_path, ca, "node-a")
    other = node_files(tmp_path, ca, "node-b")
    factory(node.cert, node.key, node.ca)  # the good files load
    junk = tmp_path / "junk.pem"
    junk.write_text("not PEM at all\n")
    locked = tmp_path / "locked.pem"
    locked.write_bytes(encrypted(node.key))
    missing = tmp_path / "missing.pem"
    cases = [
        ((node.cert, other.key, node.ca), f"TLS key {other.key} does not belong to certificate "
                                          f"{node.cert}"),
        ((node.cert, junk, node.ca), f"TLS key {junk} is not a PEM private key"),
        ((node.cert, node.cert, node.ca), f"TLS key {node.cert} is not a PEM private key"),
        ((node.cert, locked, node.ca), f"TLS key {locked} is encrypted"),
        ((node.cert, missing, node.ca), f"TLS key {missing} does not exist"),
        ((node.cert, tmp_path, node.ca), f"TLS key {tmp_path} is a directory"),
        ((junk, node.key, node.ca), f"TLS certificate {junk} is not a PEM certificate file"),
        ((node.key, node.key, node.ca), f"TLS certificate {node.key} is not a PEM certificate"),
        ((missing, node.key, node.ca), f"TLS certificate {missing} does not exist"),
        ((node.cert, node.key, junk), f"TLS CA {junk} is not a PEM certificate file"),
        ((node.cert, node.key, missing), f"TLS CA {missing} does not exist"),
        ((node.cert, node.key, Path()), "TLS CA file is not set"),
    ]
    for args, message in cases:
        with pytest.raises(UserError) as caught:
            factory(*args)
        assert str(caught.value).startswith(message), (args, str(caught.value))
        assert "\n" not in str(caught.value)
