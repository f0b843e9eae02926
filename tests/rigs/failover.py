"""A kill -9 failover under IMAP load, and the old owner's return (issue: ownership).

Node A serves alice while a client appends and flags as fast as it can; A's mailfs and
Dovecot are killed with kill -9 in the middle of that. Dovecot on B then serves alice (its
first write takes the user over), and A's mailfs comes back without Dovecot. What is
measured and checked:

- how long from the kill until B answers a SELECT of alice's INBOX;
- which changes A's client was told of (tagged OK) that B does not have: none with sync
  durability and mail_fsync=always, a few with async;
- that A, back, converges to B's bytes and never changes what B's Dovecot sees;
- what A's return costs B's Dovecot in log lines (none wanted).

The tests (tests/dovecot/test_ownership_failover.py) assert on it; bench/failover.py
repeats it and writes the figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from imapclient import IMAPClient  # type: ignore[import-untyped]

from tests.rigs.cluster import Cluster, Node, wait_for
from tests.rigs.dovecot import DEFAULT_USERS, Dovecot, ensure_vmail_user, prepare_mail_root
from tests.rigs.imap import connect, make_message
from tests.rigs.mount import run_cli

ALICE = "alice"
LOAD_SECONDS = 3.0
SERVE_TIMEOUT = 60.0


@dataclass
class Acknowledged:
    """What A's client was told: appended UIDs and the keyword each flagged message got."""

    appended: list[int] = field(default_factory=list)
    keywords: dict[int, bytes] = field(default_factory=dict)
    error: str = ""


@dataclass
class FailoverResult:
    seconds_to_serve: float
    acknowledged_appends: int
    acknowledged_stores: int
    lost_appends: list[int]
    lost_stores: list[int]
    fenced_on_b: int
    conflict_versions_on_a: int
    dovecot_b_trouble_after_return: list[str]
    b_changes_by_return: list[str]
    a_owner_view: tuple[str, int, bool]

    @property
    def lost_changes(self) -> int:
        return len(self.lost_appends) + len(self.lost_stores)


@dataclass
class Rig:
    cluster: Cluster
    servers: dict[str, Dovecot]  # node id -> the Dovecot serving that node's mount

    def node(self, node_id: str) -> Node:
        return next(node for node in self.cluster.nodes if node.node_id == node_id)


@contextlib.contextmanager
def failover_rig(mail_format: str, durability: str, index_only: bool = False,
                 partitionable: bool = False) -> Iterator[Rig]:
    options = {"durability": durability, "sync_timeout": "3"}
    fsync = "always" if durability == "sync" else "optimized"
    with contextlib.ExitStack() as teardown:
        cluster = Cluster(2, options, index_only=index_only, partitionable=partitionable)
        teardown.callback(cluster.close)
        servers = {
            node.node_id: Dovecot(
                cluster.base / f"dovecot-{node.node_id}",
                cluster.backing if index_only else node.mountpoint, mail_format,
                mail_fsync=fsync, index_root=node.mountpoint if index_only else None)
            for node in cluster.nodes
        }
        teardown.callback(print_logs, cluster, servers)
        for server in servers.values():
            teardown.callback(server.kill)
            teardown.callback(server.stop)
        prepare_mail_root(cluster.backing)
        if index_only:
            for node in cluster.nodes:
                prepare_mail_root(node.mountpoint)
        cluster.start()
        uid, gid = ensure_vmail_user()
        for node in cluster.nodes:
            if node.mountpoint.stat().st_uid != uid:
                os.chown(node.mountpoint, uid, gid)
        cluster.wait_connected()
        yield Rig(cluster, servers)


def print_logs(cluster: Cluster, servers: dict[str, Dovecot]) -> None:
    for node_id, server in servers.items():
        print(f"--- dovecot log ({node_id})\n{server.log_text()[-20000:]}")
    for node in cluster.nodes:
        print(f"--- mailfs log ({node.node_id})\n{node.log()[-20000:]}")


def login(server: Dovecot) -> IMAPClient:
    return connect(server.port, ALICE, DEFAULT_USERS[ALICE])


def appended_uid(response: bytes) -> int:
    match = re.search(rb"\[APPENDUID \d+ (\d+)\]", response)
    assert match, f"no APPENDUID in {response!r}"
    return int(match.group(1))


def load(server: Dovecot, told: Acknowledged, stop: threading.Event) -> None:
    """Append and flag until stopped or until the server goes away."""
    try:
        with login(server) as client:
            client.select_folder("INBOX")
            index = 0
            while not stop.is_set():
                uid = appended_uid(client.append("INBOX", make_message(1000 + index)))
                told.appended.append(uid)
                if index % 2 and told.appended:
                    target = told.appended[len(told.appended) // 2]
                    keyword = b"k%d" % index
                    client.add_flags([target], [keyword])
                    told.keywords[target] = keyword
                index += 1
    except Exception as exc:  # the kill ends it; what was told so far stands
        told.error = repr(exc)


def inbox_view(server: Dovecot) -> dict[int, frozenset[bytes]]:
    with login(server) as client:
        client.select_folder("INBOX")
        flags = client.get_flags(client.search(["ALL"]))
    # \Recent belongs to the session that saw a message first, not to the mailbox.
    return {uid: frozenset(value) - {b"\\Recent"} for uid, value in flags.items()}


def owner_view(node: Node, user: str) -> tuple[str, int, bool]:
    result = run_cli("owners", str(node.mountpoint), "--json")
    assert result.returncode == 0, result.stderr
    for entry in json.loads(result.stdout)["owners"]:
        if entry["user"] == user:
            return entry["node"], entry["epoch"], entry["lost_here"]
    raise AssertionError(f"{node.node_id} knows no owner of {user}")


def run_failover(rig: Rig) -> FailoverResult:
    a, b = rig.cluster.nodes
    server_a, server_b = rig.servers["a"], rig.servers["b"]
    server_a.start()
    with login(server_a) as client:  # provision INBOX and some history before the load
        for index in range(5):
            client.append("INBOX", make_message(index))
    told = Acknowledged()
    stop = threading.Event()
    writer = threading.Thread(target=load, args=(server_a, told, stop), daemon=True)
    writer.start()
    time.sleep(LOAD_SECONDS)
    server_a.freeze()  # mid-load, both at one instant, as a machine that dies
    a.kill()
    killed = time.monotonic()
    server_a.kill()
    stop.set()
    writer.join(30)

    server_b.start()
    deadline = killed + SERVE_TIMEOUT
    while True:
        try:
            view = inbox_view(server_b)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    seconds = time.monotonic() - killed
    lost_appends = [uid for uid in told.appended if uid not in view]
    lost_stores = [uid for uid, keyword in told.keywords.items()
                   if uid in view and keyword not in view[uid]]
    # B's first write takes alice over, with A down. An sdbox mail file that A's Dovecot
    # had renamed into place when the machine died, without its index record, makes B's
    # Dovecot rebuild the index and fail that command once, as after any crash.
    with login(server_b) as client:
        try:
            client.append("INBOX", make_message(5000))
        except IMAPClient.Error:
            client.append("INBOX", make_message(5001))
    wait_for(lambda: owner_view(b, ALICE)[:2] == ("b", 2), what="b to own alice")
    before_return = inbox_view(server_b)
    mark = server_b.log_offset()

    a.start()  # A comes back, without its Dovecot
    rig.cluster.wait_connected()
    rig.cluster.wait_converged()
    wait_for(lambda: owner_view(a, ALICE) == ("b", 2, True), what="a to learn it lost alice")
    after_return = inbox_view(server_b)
    trouble = server_b.log_problems(mark) + server_b.index_rebuild_lines(mark)
    ownership_b = b.replication()["ownership"]
    ownership_a = a.replication()["ownership"]
    return FailoverResult(
        seconds_to_serve=seconds,
        acknowledged_appends=len(told.appended),
        acknowledged_stores=len(told.keywords),
        lost_appends=lost_appends,
        lost_stores=lost_stores,
        fenced_on_b=ownership_b["fenced_changes"],
        conflict_versions_on_a=ownership_a["conflict_versions"],
        dovecot_b_trouble_after_return=trouble,
        b_changes_by_return=[
            f"uid {uid}: {before_return.get(uid)} -> {after_return.get(uid)}"
            for uid in sorted(before_return.keys() | after_return.keys())
            if before_return.get(uid) != after_return.get(uid)],
        a_owner_view=owner_view(a, ALICE),
    )

