"""IMAP helpers for driving Dovecot in tests: connect, snapshot a mailbox, generate mail."""

from __future__ import annotations

import base64
import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

from imapclient import IMAPClient  # type: ignore[import-untyped]

Flags = frozenset[bytes]


def connect(port: int, user: str, password: str, host: str = "127.0.0.1") -> IMAPClient:
    client = IMAPClient(host, port=port, ssl=False, timeout=120)
    client.login(user, password)
    return client


@dataclass(frozen=True)
class MailboxState:
    """What must survive a restart unchanged: the UID space, flags, keywords and content."""

    uidvalidity: int
    uidnext: int
    highestmodseq: int | None
    messages: dict[int, tuple[Flags, Flags]] = field(default_factory=dict)
    digests: dict[int, str] = field(default_factory=dict)

    def diff(self, other: MailboxState) -> list[str]:
        """Human-readable differences, for assertion messages."""
        out = [
            f"{name}: {mine!r} != {theirs!r}"
            for name in ("uidvalidity", "uidnext", "highestmodseq")
            if (mine := getattr(self, name)) != (theirs := getattr(other, name))
        ]
        for uid in sorted(self.messages.keys() | other.messages.keys()):
            for what, mine, theirs in (
                ("flags", self.messages.get(uid), other.messages.get(uid)),
                ("body", self.digests.get(uid), other.digests.get(uid)),
            ):
                if mine != theirs:
                    out.append(f"uid {uid} {what}: {mine} != {theirs}")
        return out


def split_flags(flags: tuple[bytes, ...]) -> tuple[Flags, Flags]:
    # \Recent belongs to a session, not to the mailbox, so it never takes part in comparisons.
    system = frozenset(f for f in flags if f.startswith(b"\\") and f != b"\\Recent")
    keywords = frozenset(f for f in flags if not f.startswith(b"\\"))
    return system, keywords


def mailbox_state(client: IMAPClient, mailbox: str) -> MailboxState:
    # STATUS first: it reads the state without selecting, so nothing (not even \Recent) moves.
    status = client.folder_status(mailbox, ["UIDVALIDITY", "UIDNEXT", "HIGHESTMODSEQ"])
    client.select_folder(mailbox, readonly=True)
    try:
        fetched = fetch_all(client, ["FLAGS", "BODY.PEEK[]"])
    finally:
        client.unselect_folder()
    messages: dict[int, tuple[Flags, Flags]] = {}
    digests: dict[int, str] = {}
    for uid, data in fetched.items():
        messages[uid] = split_flags(data[b"FLAGS"])
        body = data.get(b"BODY[]")
        # A damaged mailbox can answer a FETCH without the body; that is a difference too.
        digests[uid] = hashlib.sha256(body).hexdigest() if body is not None else "no body"
    modseq = status.get(b"HIGHESTMODSEQ")
    return MailboxState(
        uidvalidity=int(status[b"UIDVALIDITY"]),
        uidnext=int(status[b"UIDNEXT"]),
        highestmodseq=None if modseq is None else int(modseq),
        messages=messages,
        digests=digests,
    )


def fetch_all(client: IMAPClient, items: list[str]) -> dict[int, dict[bytes, Any]]:
    """FETCH every message of the selected mailbox by UID (an empty mailbox gives {})."""
    uids = client.search(["ALL"])
    return dict(client.fetch(uids, items)) if uids else {}


def all_mailbox_states(client: IMAPClient) -> dict[str, MailboxState]:
    return {name: mailbox_state(client, name) for _flags, _sep, name in client.list_folders()}


# --- deterministic test mail -------------------------------------------------------------

WORDS = (
    "mail", "index", "dovecot", "fuse", "overlay", "cluster", "replica", "lmdb", "trio",
    "kernel", "cache", "flag", "keyword", "mailbox", "message", "header", "body",
    "attachment", "server", "client", "quota", "folder", "archive",
)


def _text(rng: random.Random, size: int) -> str:
    lines: list[str] = []
    length = 0
    while length < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12)))
        lines.append(line)
        length += len(line) + 2
    return "\r\n".join(lines) + "\r\n"


def make_message(index: int, size: int | None = None, *, seed: int = 1234) -> bytes:
    """RFC 822 bytes (CRLF), the same for the same (index, size, seed).

    Every third message is multipart/mixed with a base64 attachment; sizes vary from a few
    hundred bytes to ~64 KiB unless given, so that both tiny and page-spanning bodies occur.
    """
    rng = random.Random(seed * 1_000_003 + index)
    if size is None:
        size = rng.choice((200, 900, 3000, 12_000, 65_000))
    subject = f"Test message {index} {rng.choice(WORDS)}"
    headers = (
        f"From: Sender {index % 7} <sender{index % 7}@example.org>\r\n"
        f"To: Recipient <rcpt@example.org>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: Mon, 1 Jan 2024 {index % 24:02d}:{index % 60:02d}:00 +0000\r\n"
        f"Message-ID: <msg-{seed}-{index}@mailfs.test>\r\n"
        f"X-Mailfs-Index: {index}\r\n"
        "MIME-Version: 1.0\r\n"
    )
    if index % 3 != 2:
        body = _text(rng, size)
        return (headers + "Content-Type: text/plain; charset=us-ascii\r\n\r\n" + body).encode()
    boundary = f"=_mailfs_{seed}_{index}"
    text = _text(rng, size // 2)
    blob = rng.randbytes(max(size // 2, 16))
    encoded = base64.encodebytes(blob).decode().replace("\n", "\r\n")
    body = (
        f"--{boundary}\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"{text}"
        f"--{boundary}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f'Content-Disposition: attachment; filename="blob{index}.bin"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
        f"{encoded}"
        f"--{boundary}--\r\n"
    )
    return (headers + f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
            + body).encode()


def message_subject(message: bytes) -> str:
    for line in message.split(b"\r\n"):
        if line.startswith(b"Subject: "):
            return line[len(b"Subject: "):].decode()
    raise ValueError("message has no Subject")


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """(header block including the blank line, body), as IMAP's HEADER and TEXT sections."""
    head, sep, body = message.partition(b"\r\n\r\n")
    return head + sep, body
