"""Failover: Dovecot on node A of a mailfs cluster, then Dovecot on node B over B's mount.

Both layouts: the full overlay (the whole mail_location on each node's mount over one
shared backing directory) and the index-only layout (mail on the shared directory itself,
INDEX= and CONTROL= on each node's index-only mount, directories replicated by mailfs).

Node B must see exactly what A's IMAP clients were told: the same UIDs, UIDVALIDITY, UIDNEXT,
HIGHESTMODSEQ, flags, keywords, bodies, folders and subscriptions, without Dovecot repairing
or rebuilding a single index. Two ways A goes away:

- "stop-flush": Dovecot on A stops cleanly and `mailfs flush` waits until B acknowledged
  everything (async replication); A's mount stays up and gets B's changes afterwards.
- "kill9": kill -9 of A's mailfs right after the last IMAP command returned, then of A's
  Dovecot, with durability=sync. Sync durability holds fsync until B committed the change,
  so Dovecot runs with mail_fsync=always here: then every change an IMAP command confirmed
  was fsync'd, and must be on B. (On loopback, async replication is usually as quick as
  the kill, so this case shows that B takes over a crashed A cleanly; that fsync really
  waits for the peer is proven in tests/cluster/test_replication.py, with the peer frozen.)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from hashlib import sha256

import pytest
from imapclient import IMAPClient  # type: ignore[import-untyped]

from tests.rigs.cluster import wait_for
from tests.rigs.dovecot import DEFAULT_USERS, Dovecot
from tests.rigs.failover import Rig, failover_rig
from tests.rigs.imap import MailboxState, all_mailbox_states, connect, make_message, split_flags
from tests.rigs.mount import run_cli

pytestmark = [pytest.mark.dovecot, pytest.mark.timeout(900)]

ALICE, BOB = "alice", "bob"
SEEN, FLAGGED, DELETED, ANSWERED = b"\\Seen", b"\\Flagged", b"\\Deleted", b"\\Answered"
HOW = ("stop-flush", "kill9")
LAYOUTS = ("full", "index-only")
FINAL = b"$Final"

# Besides Dovecot's own repair messages (REBUILD_RE in the rig): any index reset.
RESET_RE = re.compile(r"reset_id|[Rr]esetting|[Rr]eset (index|log|cache)")
# What mailfs on B rightly logs as an error once its sync peer A is dead.
DEGRADED = "SYNC REPLICATION DEGRADED"


@dataclass
class UserState:
    mailboxes: dict[str, MailboxState]
    subscribed: set[str]


State = dict[str, UserState]


@pytest.fixture(params=HOW)
def how(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=LAYOUTS)
def layout(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def rig(how: str, mail_format: str, layout: str) -> Iterator[Rig]:
    """full: each node's Dovecot has its whole mail_location on the node's mount over the
    shared backing directory. index-only: mail on the shared directory itself, INDEX= and
    CONTROL= on the node's index-only mount. kill9 runs with sync durability and Dovecot's
    mail_fsync=always."""
    durability = "sync" if how == "kill9" else "async"
    with failover_rig(mail_format, durability, index_only=layout == "index-only") as made:
        yield made


def login(server: Dovecot, user: str = ALICE) -> IMAPClient:
    return connect(server.port, user, DEFAULT_USERS[user])


def appended(response: bytes) -> tuple[int, int]:
    """(UIDVALIDITY, UID) from an [APPENDUID v n] response code."""
    match = re.search(rb"\[APPENDUID (\d+) (\d+)\]", response)
    assert match, f"no APPENDUID in {response!r}"
    return int(match.group(1)), int(match.group(2))


def append(client: IMAPClient, mailbox: str, message: bytes,
           flags: tuple[bytes, ...] = ()) -> int:
    return appended(client.append(mailbox, message, flags=flags))[1]


def workload(server: Dovecot) -> None:
    """Appends, system flags, keywords, expunges, a move, a rename and subscriptions."""
    with login(server, ALICE) as client:
        for name in ("Projects", "Old", "Old/Sub"):
            client.create_folder(name)
        inbox = [append(client, "INBOX", make_message(i), (SEEN,) if i % 3 == 0 else ())
                 for i in range(10)]
        assert inbox == list(range(1, 11))
        projects = [append(client, "Projects", make_message(100 + i)) for i in range(6)]
        for i in range(3):
            append(client, "Old", make_message(200 + i), (FLAGGED,))
        append(client, "Old/Sub", make_message(300))

        client.select_folder("INBOX")
        client.add_flags(inbox[:3], [FLAGGED])
        client.add_flags(inbox[1:5], [b"$Important", b"project-x"])
        client.add_flags(inbox[7:9], [SEEN])
        client.remove_flags([inbox[0]], [SEEN])
        client.add_flags(inbox[4:6], [DELETED])
        client.expunge()                                     # expunges 5 and 6
        client.add_flags([inbox[6]], [DELETED])              # \Deleted, kept
        client.set_flags([inbox[9]], [ANSWERED, b"$Label1"])
        client.move([inbox[8]], "Projects")
        assert sorted(client.search(["ALL"])) == inbox[:4] + inbox[6:8] + inbox[9:]

        client.select_folder("Projects")
        client.add_flags(projects[::2], [SEEN, b"$Label2"])
        client.add_flags([projects[1]], [FLAGGED, DELETED])
        client.uid_expunge([projects[1]])
        client.remove_flags([projects[2]], [b"$Label2"])
        client.unselect_folder()

        client.rename_folder("Old", "Archive")
        client.subscribe_folder("Projects")
        client.subscribe_folder("Archive/Sub")
        # A UID after the expunges, so the UID space has gaps that a rebuild would close.
        append(client, "INBOX", make_message(11), (b"late",))

    with login(server, BOB) as client:
        client.create_folder("Sent")
        uids = [append(client, box, make_message(400 + i, seed=7))
                for i, box in enumerate(("INBOX", "Sent") * 3)]
        client.select_folder("INBOX")
        client.add_flags(uids[:2], [SEEN, b"bob-kw"])
        client.add_flags([uids[0]], [DELETED])
        client.expunge()
        client.subscribe_folder("Sent")


def snapshot(server: Dovecot) -> State:
    states: State = {}
    for user in (ALICE, BOB):
        with login(server, user) as client:
            subscribed = {name for _f, _s, name in client.list_sub_folders()}
            states[user] = UserState(all_mailbox_states(client), subscribed)
    return states


def differences(before: State, after: State) -> list[str]:
    out = []
    for user, mine in before.items():
        theirs = after[user]
        if mine.mailboxes.keys() != theirs.mailboxes.keys():
            out.append(f"{user} mailboxes: {sorted(mine.mailboxes)} != "
                       f"{sorted(theirs.mailboxes)}")
        if mine.subscribed != theirs.subscribed:
            out.append(f"{user} subscriptions: {sorted(mine.subscribed)} != "
                       f"{sorted(theirs.subscribed)}")
        for mailbox, state in mine.mailboxes.items():
            if mailbox in theirs.mailboxes:
                out += [f"{user}/{mailbox} {d}" for d in state.diff(theirs.mailboxes[mailbox])]
    return out


def check_workload_state(state: State) -> None:
    """The snapshot on A is what the workload meant, so comparing it with B means something."""
    alice = state[ALICE]
    assert set(alice.mailboxes) == {"INBOX", "Projects", "Archive", "Archive/Sub"}
    assert alice.subscribed == {"Projects", "Archive/Sub"}
    inbox = alice.mailboxes["INBOX"]
    assert sorted(inbox.messages) == [1, 2, 3, 4, 7, 8, 10, 11]
    assert inbox.uidnext == 12
    assert inbox.messages[2] == (frozenset({FLAGGED}), frozenset({b"$Important", b"project-x"}))
    assert inbox.messages[7] == (frozenset({SEEN, DELETED}), frozenset())
    assert inbox.messages[10] == (frozenset({ANSWERED}), frozenset({b"$Label1"}))
    assert inbox.messages[11] == (frozenset(), frozenset({b"late"}))
    projects = alice.mailboxes["Projects"]
    assert len(projects.messages) == 6  # 6 appended, 1 expunged, 1 moved in
    assert {flags for flags in projects.messages.values()} >= {
        (frozenset({SEEN}), frozenset({b"$Label2"})), (frozenset({SEEN}), frozenset())}
    assert len(alice.mailboxes["Archive"].messages) == 3
    bob = state[BOB]
    assert len(bob.mailboxes["INBOX"].messages) == 2
    assert bob.subscribed == {"Sent"}


def final_writes(client: IMAPClient, told: State) -> State:
    """Change INBOX once more; returns the state A's client has now been told of.

    The last changes right before A goes away are the ones a failover could lose.
    """
    inbox = told[ALICE].mailboxes["INBOX"]
    message = make_message(12)
    uid = inbox.uidnext
    assert appended(client.append("INBOX", message, flags=(FINAL,))) == (inbox.uidvalidity, uid)
    client.select_folder("INBOX")
    client.add_flags([1], [SEEN, FINAL])
    # The STORE is the newest change, so its MODSEQ is the mailbox's HIGHESTMODSEQ now.
    (modseq,) = client.fetch([1], ["MODSEQ"])[1][b"MODSEQ"]
    system, keywords = inbox.messages[1]
    messages = inbox.messages | {1: (system | {SEEN}, keywords | {FINAL}),
                                 uid: (frozenset(), frozenset({FINAL}))}
    digests = inbox.digests | {uid: sha256(message).hexdigest()}
    changed = replace(inbox, uidnext=uid + 1, highestmodseq=modseq, messages=messages,
                      digests=digests)
    alice = replace(told[ALICE], mailboxes=told[ALICE].mailboxes | {"INBOX": changed})
    return told | {ALICE: alice}


def dovecot_trouble(server: Dovecot) -> list[str]:
    return (server.log_problems() + server.index_rebuild_lines()
            + [line for line in server.log_lines() if RESET_RE.search(line)])


@pytest.mark.parametrize("mail_format", ["maildir", "sdbox", "mdbox"])
def test_failover_keeps_mailbox_state(rig: Rig, how: str, mail_format: str) -> None:
    a, b = rig.node("a"), rig.node("b")
    server_a, server_b = rig.servers["a"], rig.servers["b"]
    wait_for(lambda: a.replication()["peers"]["b"]["connected"]
             and b.replication()["peers"]["a"]["connected"], what="a and b connected")
    assert a.replication()["durability"] == ("sync" if how == "kill9" else "async")

    server_a.start()
    workload(server_a)
    told = snapshot(server_a)
    check_workload_state(told)
    assert dovecot_trouble(server_a) == [], "Dovecot on A logged errors or index repairs"
    assert not a.replication()["degraded"]
    client = login(server_a)
    try:
        told = final_writes(client, told)
        if how == "kill9":  # right after the last IMAP command on A returned
            a.kill()
            server_a.kill()
    finally:
        with contextlib.suppress(IMAPClient.Error, OSError):
            if how == "kill9":
                client.shutdown()  # the server is gone: no LOGOUT
            else:
                client.logout()
    if how == "stop-flush":
        server_a.stop()
        result = run_cli("flush", str(a.mountpoint))
        assert result.returncode == 0, result.stderr
        assert "every peer has acknowledged every change" in result.stdout, result.stdout
        rig.cluster.wait_converged()  # names the index files that differ, if any
        assert dovecot_trouble(server_a) == [], "Dovecot on A logged errors or index repairs"

    server_b.start()
    after = snapshot(server_b)
    assert differences(told, after) == []

    # B carries on in the same UID space, and its changes are ordinary ones.
    inbox = told[ALICE].mailboxes["INBOX"]
    with login(server_b) as client:
        assert appended(client.append("INBOX", make_message(13))) == (
            inbox.uidvalidity, inbox.uidnext)
        client.select_folder("INBOX")
        client.add_flags([1], [b"after-failover"])
        assert split_flags(client.get_flags([1])[1])[1] == {FINAL, b"after-failover"}
        client.create_folder("Failover")

    assert dovecot_trouble(server_b) == [], "Dovecot on B logged errors or index repairs"
    if how == "stop-flush":
        # A is still up: B's changes reach it as successors of A's own versions.
        rig.cluster.wait_converged()
    running = [node for node in (a, b) if node.running]
    status = {node.node_id: node.replication() for node in running}
    assert status["b"]["remote_applied"] > 0
    assert {node_id: s["last_conflict"] for node_id, s in status.items() if s["conflicts"]} \
        == {}, "a takeover with one writer at a time is no conflict"
    assert rig.cluster.problems(allowed=[DEGRADED] if how == "kill9" else []) == []
