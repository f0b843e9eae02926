"""Mutual TLS between mounts: both sides present a certificate issued by the cluster's CA.

Each node has a certificate, its key and the cluster CA (config keys `tls_cert`,
`tls_key`, `tls_ca`). Only that CA is trusted, never the system store: any certificate the
public CAs issue would otherwise be able to join the cluster. A client connects with
`server_hostname` set to the node id it expects, so a node's certificate must carry its
node id as a DNS subjectAltName; the server in turn refuses a client without a certificate
from the CA, and can read the client's names with `certificate_names`.

Stdlib `ssl` only; the contexts are used with `trio.SSLStream`.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Protocol

from mailfs.errors import UserError, read_small_file


class PeerCertificateHolder(Protocol):
    """`ssl.SSLObject` or `ssl.SSLSocket`, or a `trio.SSLStream` after its handshake."""

    def getpeercert(self) -> dict[str, Any] | None: ...


class _EncryptedKey(Exception):
    """The key file asked for a password; we never prompt (we run as a daemon)."""


def _refuse_password() -> str:
    raise _EncryptedKey


def _read(what: str, path: Path) -> bytes:
    if not str(path) or str(path) == ".":
        raise UserError(f"{what} file is not set")
    return read_small_file(what, path)


def _pem_certificates(what: str, path: Path) -> str:
    """The text of a file that must hold one or more PEM certificates (parsed to check)."""
    data = _read(what, path)
    try:
        text = data.decode("ascii")
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except (ValueError, ssl.SSLError):  # ValueError: empty, or not ASCII
        raise UserError(f"{what} {path} is not a PEM certificate file") from None
    return text


def _load(context: ssl.SSLContext, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # OpenSSL picks 1.3 when both have it
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=_pem_certificates("TLS CA", ca))
    _pem_certificates("TLS certificate", cert)
    _read("TLS key", key)
    try:
        context.load_cert_chain(cert, key, password=_refuse_password)
    except _EncryptedKey:
        raise UserError(f"TLS key {key} is encrypted; mailfs needs an unencrypted key "
                        f"(readable by root only)") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise UserError(f"TLS key {key} does not belong to certificate {cert}") from None
        # The certificate was parsed above, so what OpenSSL could not read is the key.
        raise UserError(f"TLS key {key} is not a PEM private key") from None
    except OSError as exc:  # the file changed since we read it
        raise UserError(f"TLS certificate {cert} or key {key} cannot be read: "
                        f"{exc.strerror}") from None
    return context


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """The listening side: TLS 1.2 or later, and the client must present a cert from `ca`."""
    context = _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key, ca)
    context.num_tickets = 0  # our clients never resume sessions
    return context


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """The connecting side: the server's cert must be from `ca` and name `server_hostname`.

    Connect with `server_hostname` = the node id of the peer you mean to reach.
    """
    context = _load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert, key, ca)
    context.check_hostname = True
    return context


def certificate_names(ssl_object: PeerCertificateHolder) -> set[str]:
    """The DNS subjectAltNames and the common name of the verified peer certificate.

    Empty if there is no verified peer certificate (before the handshake, for example).
    """
    cert = ssl_object.getpeercert()
    if not cert:
        return set()
    names = {value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}
    for rdn in cert.get("subject", ()):
        names.update(value for key, value in rdn if key == "commonName")
    return names
