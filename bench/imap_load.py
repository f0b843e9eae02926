"""IMAP load generator: N client processes run a weighted, realistic mix for a fixed time.

Clients share users round-robin when there are fewer users than clients, so several
clients work on one mailbox at once, as a user's phone, laptop and webmail do; that is the
default of the benchmark (bench/run_all.py --clients-per-user). Each fills its mailbox
with a few messages (not timed), waits for the others, then runs the mix until the
duration is up or it has done --max-ops operations.

The mix covers what mail clients actually do: APPEND of 2-50 KB messages (some multipart),
SELECT of another folder, FETCH of FLAGS, ENVELOPE, headers and whole bodies, STORE of
flags and keywords, SEARCH, STATUS, MOVE, EXPUNGE, and LOGOUT/LOGIN cycles. Whole bodies
are checked against what this client appended, so a filesystem that corrupts data shows up
as "corrupt" errors rather than as a good figure.

Run standalone against any IMAP server on loopback:

    python bench/imap_load.py --port 10143 --user alice --user bob --password secret
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import email.utils
import hashlib
import imaplib
import json
import multiprocessing as mp
import os
import random
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.synchronize import Barrier

LOOPBACK = "127.0.0.1"

# Weights of the timed mix. They add up to 100 so they read as percentages.
DEFAULT_MIX: dict[str, int] = {
    "append": 12,
    "select": 6,
    "fetch_flags": 14,
    "fetch_envelope": 10,
    "fetch_header": 10,
    "fetch_body": 12,
    "store_flags": 12,
    "store_keyword": 6,
    "search": 9,
    "status": 3,
    "move": 2,
    "expunge": 3,
    "relogin": 1,
}

FOLDERS = ("INBOX", "Archive", "Sent")
KEYWORDS = ("$Label1", "$Label2", "$Work", "Todo", "$Junk")
SYSTEM_FLAGS = ("\\Seen", "\\Flagged", "\\Answered", "\\Draft")
WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
    "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra",
    "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "invoice", "meeting",
    "report", "quarterly", "budget", "release", "schedule", "server", "cluster", "index",
    "mailbox", "storage", "replica", "latency", "throughput", "review", "draft", "urgent",
    "lunch", "travel", "contract",
)
PEOPLE = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")

APPENDUID_RE = re.compile(rb"\[APPENDUID \d+ (\d+)\]")

# MOVE (RFC 6851) is not in imaplib's table; Dovecot supports it.
imaplib.Commands.setdefault("MOVE", ("SELECTED",))


MAX_ERROR_LOG = 1000


@dataclass
class LoadConfig:
    port: int
    users: list[str]
    password: str
    host: str = LOOPBACK
    clients: int = 4
    duration: float = 20.0
    max_ops: int = 1_000_000  # per client
    populate: int = 60  # messages per user put into INBOX before timing starts
    max_messages: int = 400  # per folder; above this, appends turn into expunges
    seed: int = 1
    mix: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MIX))
    io_timeout: float = 60.0
    max_errors: int = 50  # per client, then it gives up
    reconnect_tries: int = 1  # after a dropped connection (the soak run retries longer)
    reconnect_pause: float = 0.5
    start_timeout: float = 300.0  # for login + populate of all clients
    # Each user's folders are made by one session before the clients start, as an admin's
    # provisioning would. Dovecot 2.3 can panic with EDEADLK when several sessions of a
    # brand-new user autocreate INBOX at once on any filesystem slower than local disk
    # (docs/ARCHITECTURE.md, "Dovecot's first-login race"); False reproduces that.
    provision: bool = True


@dataclass
class OpStats:
    count: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def mean_ms(self) -> float:
        return 1000.0 * self.seconds / self.count if self.count else 0.0

    def p95_ms(self) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return 1000.0 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


@dataclass
class ClientResult:
    client: int
    user: str
    elapsed: float = 0.0
    cpu_seconds: float = 0.0  # this client's own CPU during the timed window
    verified: int = 0  # whole-body FETCHes that matched the appended bytes
    populate_seconds: float = 0.0
    ops: dict[str, OpStats] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    # (wall clock, what) of every error, the first MAX_ERROR_LOG: the soak run splits them
    # by what was going on at the time.
    # (wall-clock time the failing command was issued, what failed)
    error_log: list[tuple[float, str]] = field(default_factory=list)
    fatal: str | None = None

    @property
    def total_ops(self) -> int:
        return sum(stat.count for stat in self.ops.values())

    @property
    def total_errors(self) -> int:
        return sum(stat.errors for stat in self.ops.values())


@dataclass
class LoadResult:
    clients: list[ClientResult]
    duration: float

    @property
    def total_ops(self) -> int:
        return sum(client.total_ops for client in self.clients)

    @property
    def total_errors(self) -> int:
        return sum(client.total_errors for client in self.clients)

    @property
    def ops_per_s(self) -> float:
        """Sum of each client's own rate: every client is timed over its own window."""
        return sum(c.total_ops / c.elapsed for c in self.clients if c.elapsed > 0)

    @property
    def verified(self) -> int:
        return sum(client.verified for client in self.clients)

    @property
    def client_cpu_seconds(self) -> float:
        return sum(client.cpu_seconds for client in self.clients)

    @property
    def fatal(self) -> list[str]:
        return [f"client {c.client} ({c.user}): {c.fatal}" for c in self.clients if c.fatal]

    def per_op(self) -> dict[str, OpStats]:
        merged: dict[str, OpStats] = {}
        for client in self.clients:
            for name, stat in client.ops.items():
                into = merged.setdefault(name, OpStats())
                into.count += stat.count
                into.errors += stat.errors
                into.seconds += stat.seconds
                into.latencies.extend(stat.latencies)
        return dict(sorted(merged.items()))

    def error_samples(self, limit: int = 20) -> list[str]:
        samples: list[str] = []
        for client in self.clients:
            samples.extend(f"client {client.client}: {line}" for line in client.error_samples)
        return samples[:limit]

    def summary(self) -> dict[str, object]:
        return {
            "ops_per_s": round(self.ops_per_s, 2),
            "total_ops": self.total_ops,
            "total_errors": self.total_errors,
            "bodies_verified": self.verified,
            "fatal": self.fatal,
            "per_op": {
                name: {
                    "count": stat.count,
                    "errors": stat.errors,
                    "mean_ms": round(stat.mean_ms(), 3),
                    "p95_ms": round(stat.p95_ms(), 3),
                }
                for name, stat in self.per_op().items()
            },
            "error_samples": self.error_samples(),
        }


class CorruptMessage(Exception):
    """A whole-body FETCH returned other bytes than the client appended."""


class MessageFactory:
    """Builds messages of 2-50 KB from a small pool of pre-generated bodies.

    Generating 50 KB of text per APPEND would spend client CPU that the server under test
    needs, so bodies are made once and only the headers change per message.
    """

    def __init__(self, rng: random.Random, user: str, pool_size: int = 48) -> None:
        self.rng = rng
        self.user = user
        self.serial = 0
        self.bodies = [self._body() for _ in range(pool_size)]

    def _text(self, size: int) -> str:
        lines: list[str] = []
        total = 0
        while total < size:
            line = " ".join(self.rng.choices(WORDS, k=self.rng.randint(6, 13)))
            lines.append(line)
            total += len(line) + 2
        return "\r\n".join(lines)

    def _body(self) -> tuple[str, bytes]:
        """A (content-type header block, body) pair; size is log-uniform in 2-50 KB."""
        size = int(2048 * (25 ** self.rng.random()))
        if self.rng.random() < 0.3:
            boundary = f"=_bench_{self.rng.getrandbits(48):012x}"
            text = self._text(min(size, 1500))
            blob = base64.encodebytes(self.rng.randbytes(max(256, (size - len(text)) * 3 // 4)))
            attachment = blob.decode().replace("\n", "\r\n")
            name = f"{self.rng.choice(WORDS)}.bin"
            body = (
                "This is a multi-part message in MIME format.\r\n\r\n"
                f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Transfer-Encoding: 7bit\r\n\r\n{text}\r\n\r\n"
                f"--{boundary}\r\nContent-Type: application/octet-stream; name=\"{name}\"\r\n"
                "Content-Transfer-Encoding: base64\r\n"
                f"Content-Disposition: attachment; filename=\"{name}\"\r\n\r\n"
                f"{attachment}\r\n--{boundary}--\r\n"
            )
            headers = f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n'
        else:
            body = self._text(size) + "\r\n"
            headers = "Content-Type: text/plain; charset=utf-8\r\n"
        return headers, body.encode()

    def make(self) -> bytes:
        self.serial += 1
        content_headers, body = self.rng.choice(self.bodies)
        sender = self.rng.choice(PEOPLE)
        subject = " ".join(self.rng.choices(WORDS, k=self.rng.randint(2, 6)))
        headers = (
            f"From: {sender.title()} <{sender}@example.org>\r\n"
            f"To: {self.user} <{self.user}@example.org>\r\n"
            f"Subject: {subject} #{self.serial}\r\n"
            f"Date: {email.utils.formatdate()}\r\n"
            f"Message-ID: <{self.serial}.{self.rng.getrandbits(40):x}.{self.user}@bench>\r\n"
            "MIME-Version: 1.0\r\n"
            f"{content_headers}\r\n"
        )
        return headers.encode() + body


class ImapClient:
    """One IMAP session plus what the client remembers about its mailboxes."""

    def __init__(self, config: LoadConfig, user: str, index: int, shared: bool = False) -> None:
        self.config = config
        self.user = user
        self.shared = shared  # other clients use this user too, so messages may vanish
        self.rng = random.Random(config.seed * 1_000_003 + index)
        self.messages = MessageFactory(self.rng, user)
        self.conn: imaplib.IMAP4 | None = None
        self.selected = "INBOX"
        self.uids: dict[str, list[int]] = {folder: [] for folder in FOLDERS}
        self.digests: dict[tuple[str, int], bytes] = {}
        self.verified = 0  # whole bodies compared with what this client appended

    # -- session ---------------------------------------------------------------------------

    def connect(self) -> None:
        conn = imaplib.IMAP4(self.config.host, self.config.port, timeout=self.config.io_timeout)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            check(conn.login(self.user, self.config.password), "LOGIN")
        except BaseException:
            with contextlib.suppress(Exception):
                conn.shutdown()
            raise
        self.conn = conn

    def close(self) -> None:
        if self.conn is None:
            return
        with contextlib.suppress(Exception):
            self.conn.logout()
        with contextlib.suppress(Exception):
            self.conn.shutdown()
        self.conn = None

    @property
    def c(self) -> imaplib.IMAP4:
        assert self.conn is not None, "not connected"
        self.conn.untagged_responses.clear()  # imaplib keeps every untagged line otherwise
        return self.conn

    def create_folders(self) -> None:
        existing = self.c.list()[1]
        for folder in FOLDERS[1:]:
            if not any(folder.encode() in (line or b"") for line in existing):
                typ, data = self.c.create(folder)
                if not (self.shared and b"ALREADYEXISTS" in b" ".join(data)):
                    check((typ, data), f"CREATE {folder}")

    def setup(self) -> None:
        self.connect()
        self.create_folders()
        check(self.c.subscribe("Archive"), "SUBSCRIBE")
        for folder in FOLDERS:
            self.select(folder)
        self.select("INBOX")
        while len(self.uids["INBOX"]) < self.config.populate:
            self.append("INBOX")
        for folder in FOLDERS[1:]:
            while len(self.uids[folder]) < self.config.populate // 10:
                self.append(folder)

    # -- helpers ---------------------------------------------------------------------------

    def pick(self, count: int = 1) -> list[int]:
        uids = self.uids[self.selected]
        if not uids:
            return []
        if count == 1:
            return [self.rng.choice(uids)]
        start = self.rng.randrange(max(1, len(uids) - count + 1))
        return uids[start : start + count]

    def window(self, most: int) -> str | None:
        """A contiguous UID range like a client's message list would show."""
        uids = self.pick(self.rng.randint(1, most))
        if not uids:
            return None
        return f"{uids[0]}:{uids[-1]}" if len(uids) > 1 else str(uids[0])

    # -- operations ------------------------------------------------------------------------

    def select(self, folder: str | None = None) -> None:
        folder = folder or self.rng.choice(FOLDERS)
        check(self.c.select(folder), f"SELECT {folder}")
        typ, data = self.c.uid("SEARCH", "ALL")
        check((typ, data), "UID SEARCH ALL")
        self.uids[folder] = [int(uid) for uid in (data[0] or b"").split()]
        self.selected = folder

    def append(self, folder: str | None = None) -> None:
        folder = folder or ("INBOX" if self.rng.random() < 0.8 else self.rng.choice(FOLDERS))
        if len(self.uids[folder]) >= self.config.max_messages:
            if folder == self.selected:
                self.expunge(many=True)
            return
        message = self.messages.make()
        flags = "(\\Seen)" if folder != "INBOX" or self.rng.random() < 0.2 else None
        typ, data = self.c.append(folder, flags, None, message)
        check((typ, data), f"APPEND {folder}")
        found = APPENDUID_RE.search(data[0] or b"")
        if found:
            uid = int(found.group(1))
            self.uids[folder].append(uid)
            self.digests[(folder, uid)] = digest(message)

    def fetch_flags(self) -> None:
        uids = self.window(50)
        if uids:
            check(self.c.uid("FETCH", uids, "(UID FLAGS)"), "FETCH FLAGS")

    def fetch_envelope(self) -> None:
        uids = self.window(20)
        if uids:
            check(self.c.uid("FETCH", uids, "(UID RFC822.SIZE FLAGS ENVELOPE)"), "FETCH ENVELOPE")

    def fetch_header(self) -> None:
        uids = self.window(5)
        if uids:
            check(self.c.uid("FETCH", uids, "(UID BODY.PEEK[HEADER])"), "FETCH HEADER")

    def fetch_body(self) -> None:
        picked = self.pick()
        if not picked:
            return
        uid = picked[0]
        typ, data = self.c.uid("FETCH", str(uid), "(UID BODY.PEEK[])")
        check((typ, data), "FETCH BODY[]")
        expected = self.digests.get((self.selected, uid))
        if expected is None:
            return
        bodies = [item[1] for item in data if isinstance(item, tuple)]
        if not bodies and self.shared:  # another client expunged or moved it
            self.digests.pop((self.selected, uid), None)
            self.uids[self.selected].remove(uid)
            return
        if not bodies:
            raise CorruptMessage(f"UID {uid} in {self.selected}: FETCH BODY[] returned nothing")
        if digest(bodies[0]) != expected:
            raise CorruptMessage(
                f"UID {uid} in {self.selected}: body differs from the appended message "
                f"({len(bodies[0])} bytes back)"
            )
        self.verified += 1

    def store_flags(self) -> None:
        uids = self.window(3)
        if uids:
            sign = "+" if self.rng.random() < 0.7 else "-"
            flag = self.rng.choice(SYSTEM_FLAGS)
            check(self.c.uid("STORE", uids, f"{sign}FLAGS", f"({flag})"), "STORE FLAGS")

    def store_keyword(self) -> None:
        uids = self.window(3)
        if uids:
            sign = "+" if self.rng.random() < 0.7 else "-"
            keyword = self.rng.choice(KEYWORDS)
            check(self.c.uid("STORE", uids, f"{sign}FLAGS.SILENT", f"({keyword})"), "STORE KW")

    def search(self) -> None:
        criteria = self.rng.choice(
            (
                ("UNSEEN",),
                ("FLAGGED",),
                ("KEYWORD", self.rng.choice(KEYWORDS)),
                ("FROM", f'"{self.rng.choice(PEOPLE)}"'),
                ("SUBJECT", f'"{self.rng.choice(WORDS)}"'),
                ("SINCE", time.strftime("%d-%b-%Y", time.gmtime(time.time() - 86400))),
                ("LARGER", str(self.rng.randint(5, 40) * 1024)),
                ("NOT", "DELETED", "UNANSWERED"),
            )
        )
        check(self.c.uid("SEARCH", *criteria), f"SEARCH {' '.join(criteria)}")

    def status(self) -> None:
        folder = self.rng.choice(FOLDERS)
        check(self.c.status(folder, "(MESSAGES UNSEEN UIDNEXT)"), f"STATUS {folder}")

    def move(self) -> None:
        uids = self.pick()
        target = self.rng.choice([f for f in FOLDERS if f != self.selected])
        if not uids or len(self.uids[target]) >= self.config.max_messages:
            return
        typ, data = self.c.uid("MOVE", str(uids[0]), target)
        if not (self.shared and typ == "NO" and expunged_by_another(data)):
            check((typ, data), f"MOVE {target}")
        self.uids[self.selected].remove(uids[0])
        self.digests.pop((self.selected, uids[0]), None)

    def expunge(self, many: bool = False) -> None:
        current = self.uids[self.selected]
        if len(current) <= 5:
            return
        count = self.rng.randint(10, 30) if many else self.rng.randint(1, 3)
        victims = self.rng.sample(current, min(count, len(current) - 5))
        uidset = ",".join(str(uid) for uid in victims)
        check(self.c.uid("STORE", uidset, "+FLAGS.SILENT", "(\\Deleted)"), "STORE \\Deleted")
        check(self.c.uid("EXPUNGE", uidset), "UID EXPUNGE")
        gone = set(victims)
        self.uids[self.selected] = [uid for uid in current if uid not in gone]
        for uid in victims:
            self.digests.pop((self.selected, uid), None)

    def relogin(self) -> None:
        self.close()
        self.connect()
        self.c.list()
        self.select("INBOX")


def digest(message: bytes) -> bytes:
    return hashlib.blake2b(message.replace(b"\r\n", b"\n"), digest_size=16).digest()


def expunged_by_another(data: Sequence[object]) -> bool:
    """RFC 9051's answer when another session already expunged the message: expected when
    several clients share a mailbox, so not an error."""
    return any(isinstance(d, bytes) and b"[EXPUNGEISSUED]" in d for d in data)


def check(result: tuple[str, Sequence[object]], what: str) -> None:
    typ, data = result
    if typ != "OK":
        detail = b" ".join(d for d in data if isinstance(d, bytes)).decode(errors="replace")
        raise imaplib.IMAP4.error(f"{what}: {typ} {detail}".strip())


def provision(config: LoadConfig) -> None:
    """One session per user makes INBOX and the folders, before any client logs in."""
    for index, user in enumerate(dict.fromkeys(config.users)):
        client = ImapClient(config, user, -1 - index, shared=True)
        try:
            client.connect()
            client.create_folders()
            for folder in FOLDERS:
                check(client.c.select(folder), f"SELECT {folder}")
        finally:
            client.close()


def run_client(
    index: int, user: str, config: LoadConfig, barrier: Barrier, out: mp.Queue[ClientResult]
) -> None:
    result = ClientResult(client=index, user=user)
    client = ImapClient(config, user, index, shared=config.clients > len(config.users))
    try:
        started = time.monotonic()
        client.setup()
        result.populate_seconds = time.monotonic() - started
    except Exception as exc:
        result.fatal = f"setup failed: {describe(exc)}"
        with contextlib.suppress(Exception):
            barrier.abort()
        client.close()
        out.put(result)
        return
    try:
        barrier.wait(timeout=config.start_timeout)
    except Exception:
        result.fatal = "another client failed during setup"
        client.close()
        out.put(result)
        return

    names = [name for name, weight in config.mix.items() if weight > 0]
    weights = [config.mix[name] for name in names]
    actions: dict[str, Callable[[], None]] = {name: getattr(client, name) for name in names}
    for name in names:
        result.ops[name] = OpStats()
    errors = 0
    cpu_start = process_cpu()
    start = time.monotonic()
    deadline = start + config.duration
    done = 0
    now = start
    while now < deadline and done < config.max_ops:
        name = client.rng.choices(names, weights)[0]
        stat = result.ops[name]
        try:
            actions[name]()
        except (imaplib.IMAP4.abort, OSError) as exc:
            errors += 1
            stat.errors += 1
            note(result, name, exc, issued=time.time() - (time.monotonic() - now))
            client.close()
            failure = reconnect(client, config)
            if failure is not None:
                result.fatal = f"reconnect after {name} failed: {failure}"
                break
        except (imaplib.IMAP4.error, CorruptMessage) as exc:
            errors += 1
            stat.errors += 1
            note(result, name, exc, issued=time.time() - (time.monotonic() - now))
            if client.conn is None:  # a relogin whose LOGIN was refused (Dovecot restarting)
                failure = reconnect(client, config)
                if failure is not None:
                    result.fatal = f"reconnect after {name} failed: {failure}"
                    break
        end = time.monotonic()
        stat.count += 1
        stat.seconds += end - now
        stat.latencies.append(end - now)
        now = end
        done += 1
        if errors >= config.max_errors:
            result.fatal = f"gave up after {errors} errors"
            break
    result.elapsed = now - start
    result.cpu_seconds = process_cpu() - cpu_start
    result.verified = client.verified
    client.close()
    out.put(result)


def process_cpu() -> float:
    times = os.times()
    return times.user + times.system


def reconnect(client: ImapClient, config: LoadConfig) -> str | None:
    """Log in again after a dropped connection; why it failed every time, or None."""
    failure = "no attempt"
    for attempt in range(max(1, config.reconnect_tries)):
        if attempt:
            time.sleep(config.reconnect_pause)
        try:
            client.connect()
            client.select("INBOX")
            return None
        except Exception as again:
            failure = describe(again)
            client.close()
    return failure


def note(result: ClientResult, name: str, exc: BaseException, issued: float) -> None:
    """`issued`: when the failing command was sent. A command that waited out a
    disturbance fails long after it; it belongs to the time it was issued."""
    if len(result.error_log) < MAX_ERROR_LOG:
        result.error_log.append((issued, f"{name}: {describe(exc)}"))
    if len(result.error_samples) < 10:
        result.error_samples.append(f"{name}: {describe(exc)}")


def describe(exc: BaseException) -> str:
    text = str(exc).strip() or traceback.format_exception_only(exc)[-1].strip()
    return f"{type(exc).__name__}: {text}"[:400]


def run_load(
    config: LoadConfig,
    on_start: Callable[[], None] | None = None,
    on_end: Callable[[], None] | None = None,
) -> LoadResult:
    """Run the clients in their own processes and collect what they counted.

    on_start runs in this process once every client has logged in and populated its
    mailbox, right as the timed window opens; on_end runs once every client has reported
    (and so has logged out). Both are for sampling CPU counters around the timed window.
    """
    if config.host != LOOPBACK:
        raise ValueError("the load generator only talks to 127.0.0.1")
    if not config.users:
        raise ValueError("no users given")
    unknown = set(config.mix) - set(DEFAULT_MIX)
    if unknown:
        raise ValueError(f"unknown operations in mix: {', '.join(sorted(unknown))}")
    if config.provision:
        provision(config)
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(config.clients + 1)  # the clients, and this process
    out: mp.Queue[ClientResult] = ctx.Queue()
    workers = [
        ctx.Process(
            target=run_client,
            args=(i, config.users[i % len(config.users)], config, barrier, out),
            name=f"imap-load-{i}",
            daemon=True,
        )
        for i in range(config.clients)
    ]
    for worker in workers:
        worker.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(timeout=config.start_timeout)
    if on_start is not None:
        on_start()
    limit = time.monotonic() + config.duration + 2 * config.io_timeout + 30
    results: list[ClientResult] = []
    while len(results) < len(workers):
        try:
            results.append(out.get(timeout=max(1.0, limit - time.monotonic())))
        except Exception:
            break
    for worker in workers:
        worker.join(timeout=5)
        if worker.is_alive():
            worker.kill()
            worker.join()
    seen = {r.client for r in results}
    for i in range(config.clients):
        if i not in seen:
            user = config.users[i % len(config.users)]
            results.append(ClientResult(client=i, user=user, fatal="never reported back"))
    if on_end is not None:
        on_end()
    return LoadResult(sorted(results, key=lambda r: r.client), config.duration)


def parse_mix(text: str) -> dict[str, int]:
    mix = dict(DEFAULT_MIX)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition("=")
        if name not in DEFAULT_MIX:
            raise argparse.ArgumentTypeError(f"unknown operation {name!r}")
        mix[name] = int(weight)
    return mix


def format_result(result: LoadResult) -> str:
    lines = [f"{'op':<16}{'count':>8}{'errors':>8}{'mean ms':>10}{'p95 ms':>10}"]
    for name, stat in result.per_op().items():
        lines.append(
            f"{name:<16}{stat.count:>8}{stat.errors:>8}{stat.mean_ms():>10.2f}{stat.p95_ms():>10.2f}"
        )
    lines.append(
        f"{'total':<16}{result.total_ops:>8}{result.total_errors:>8}"
        f"   -> {result.ops_per_s:.1f} ops/s over {result.duration:.0f} s"
    )
    lines.append(f"{result.verified} whole bodies matched what was appended")
    lines.extend(f"FATAL {line}" for line in result.fatal)
    lines.extend(f"error {line}" for line in result.error_samples())
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", action="append", dest="users", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--max-ops", type=int, default=1_000_000, help="per client")
    parser.add_argument("--populate", type=int, default=60)
    parser.add_argument("--max-messages", type=int, default=400)
    parser.add_argument("--seed", type=int, default=int(os.environ.get("BENCH_SEED", "1")))
    parser.add_argument("--mix", type=parse_mix, default=dict(DEFAULT_MIX),
                        help="override weights, e.g. append=20,relogin=0")
    parser.add_argument("--no-provision", dest="provision", action="store_false",
                        help="let every client of a new user autocreate INBOX at once")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    args = parser.parse_args(argv)
    config = LoadConfig(
        port=args.port, users=args.users, password=args.password, clients=args.clients,
        duration=args.duration, max_ops=args.max_ops, populate=args.populate,
        max_messages=args.max_messages, seed=args.seed, mix=args.mix, provision=args.provision,
    )
    result = run_load(config)
    if args.json:
        print(json.dumps({"config": asdict(config) | {"password": "***"}} | result.summary()))
    else:
        print(format_result(result))
    return 1 if result.fatal else 0


if __name__ == "__main__":
    sys.exit(main())
