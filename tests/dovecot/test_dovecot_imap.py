"""Real Dovecot over IMAP, with its mail root on mailfs (and on a local dir as the control)."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from hashlib import sha256

import pytest
from imapclient import IMAPClient  # type: ignore[import-untyped]

from tests.rigs.dovecot import DEFAULT_USERS, Dovecot
from tests.rigs.imap import (
    MailboxState,
    all_mailbox_states,
    connect,
    fetch_all,
    make_message,
    message_subject,
    split_flags,
    split_message,
)
from tests.rigs.mailstore import MailStore

pytestmark = [pytest.mark.dovecot, pytest.mark.timeout(900)]

ALICE, BOB = "alice", "bob"
SEEN, FLAGGED, DELETED, ANSWERED = b"\\Seen", b"\\Flagged", b"\\Deleted", b"\\Answered"


def login(server: Dovecot, user: str = ALICE) -> IMAPClient:
    return connect(server.port, user, DEFAULT_USERS[user])


def uid_from(response: bytes, code: str) -> list[int]:
    """The new UIDs from an [APPENDUID v n] response code."""
    match = re.search(rb"\[" + code.encode() + rb" \d+ (\S+)\]", response)
    assert match, f"no {code} in {response!r}"
    uids: list[int] = []
    for part in match.group(1).split(b","):
        low, _, high = part.partition(b":")
        uids.extend(range(int(low), int(high or low) + 1))
    return uids


def assert_clean(server: Dovecot, store: MailStore) -> None:
    assert server.log_problems() == [], "Dovecot logged errors"
    assert server.index_rebuild_lines() == [], "Dovecot repaired or rebuilt indexes"
    assert store.problems() == [], "mailfs logged problems"


def test_imap_operations(dovecot: Dovecot, store: MailStore) -> None:
    messages = [make_message(i) for i in range(12)]
    with login(dovecot) as client:
        caps = client.capabilities()
        assert {b"MOVE", b"UIDPLUS", b"CONDSTORE"} <= set(caps)

        for name in ("Work", "Work/Reports", "Archive", "Junk"):
            client.create_folder(name)
        names = {name for _f, _s, name in client.list_folders()}
        assert {"INBOX", "Work", "Work/Reports", "Archive", "Junk"} <= names

        uids = []
        for i, message in enumerate(messages):
            flags = (SEEN,) if i % 4 == 0 else ()
            uids += uid_from(client.append("INBOX", message, flags=flags), "APPENDUID")
        assert uids == list(range(1, 13))

        selected = client.select_folder("INBOX")
        assert selected[b"EXISTS"] == 12
        uidvalidity = selected[b"UIDVALIDITY"]

        _check_fetch(client, uids, messages)
        _check_store(client, uids)
        _check_search(client, uids, messages)

        client.copy(uids[:3], "Archive")
        client.move(uids[3:6], "Work/Reports")
        assert sorted(client.search(["ALL"])) == uids[:3] + uids[6:]

        client.add_flags(uids[6:8], [DELETED])
        client.expunge()
        client.add_flags([uids[8]], [DELETED])
        client.uid_expunge([uids[8]])
        remaining = uids[:3] + uids[9:]
        assert sorted(client.search(["ALL"])) == remaining
        fetched = client.fetch(remaining, ["BODY.PEEK[]"])
        for uid in remaining:
            assert fetched[uid][b"BODY[]"] == messages[uid - 1]
        assert client.select_folder("INBOX")[b"UIDVALIDITY"] == uidvalidity

        archive = client.select_folder("Archive", readonly=True)
        assert archive[b"EXISTS"] == 3
        fetched = fetch_all(client, ["BODY.PEEK[]", "FLAGS"])
        assert sorted(data[b"BODY[]"] for data in fetched.values()) == sorted(messages[:3])

        client.unselect_folder()
        client.rename_folder("Work", "Projects")
        names = {name for _f, _s, name in client.list_folders()}
        assert {"Projects", "Projects/Reports"} <= names
        assert not {"Work", "Work/Reports"} & names
        client.select_folder("Projects/Reports", readonly=True)
        fetched = fetch_all(client, ["BODY.PEEK[]"])
        assert sorted(d[b"BODY[]"] for d in fetched.values()) == sorted(messages[3:6])
        client.unselect_folder()

        client.delete_folder("Archive")
        client.delete_folder("Junk")
        client.subscribe_folder("Projects")
        names = {name for _f, _s, name in client.list_folders()}
        assert not {"Archive", "Junk"} & names
        assert "Projects" in {name for _f, _s, name in client.list_sub_folders()}

    with login(dovecot) as client:  # a new session sees what the old one left
        assert client.select_folder("INBOX")[b"EXISTS"] == len(remaining)
    assert_clean(dovecot, store)


def _check_fetch(client: IMAPClient, uids: list[int], messages: list[bytes]) -> None:
    fetched = client.fetch(uids, [
        "BODY.PEEK[]", "BODY.PEEK[HEADER]", "BODY.PEEK[TEXT]", "RFC822.SIZE", "ENVELOPE",
        "BODY.PEEK[]<0.10>", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]", "BODYSTRUCTURE",
    ])
    for uid, message in zip(uids, messages, strict=True):
        data = fetched[uid]
        header, text = split_message(message)
        assert data[b"BODY[]"] == message
        assert data[b"BODY[HEADER]"] == header
        assert data[b"BODY[TEXT]"] == text
        assert data[b"RFC822.SIZE"] == len(message)
        assert data[b"BODY[]<0>"] == message[:10]
        assert data[b"ENVELOPE"].subject.decode() == message_subject(message)
        assert data[b"BODY[HEADER.FIELDS (SUBJECT)]"].strip() == (
            f"Subject: {message_subject(message)}".encode()
        )
        assert data[b"BODYSTRUCTURE"].is_multipart == (b"multipart/mixed" in header)

    # A partial in the middle of a large body spans pages of the backing file.
    big = max(uids, key=lambda uid: len(messages[uid - 1]))
    section = client.fetch([big], ["BODY.PEEK[]<5000.3000>"])[big][b"BODY[]<5000>"]
    assert section == messages[big - 1][5000:8000]
    multipart = next(uid for uid in uids if b"multipart/mixed" in messages[uid - 1])
    part = client.fetch([multipart], ["BODY.PEEK[1]"])[multipart][b"BODY[1]"]
    assert part.split(b"\r\n")[0] in messages[multipart - 1]

    unseen = next(uid for uid in uids if SEEN not in client.get_flags([uid])[uid])
    client.fetch([unseen], ["BODY[]"])  # non-PEEK fetch sets \Seen
    assert SEEN in client.get_flags([unseen])[unseen]
    client.remove_flags([unseen], [SEEN])


def _check_store(client: IMAPClient, uids: list[int]) -> None:
    client.add_flags(uids[:4], [FLAGGED])
    client.add_flags(uids[2:6], [b"$Important", b"project-x"])
    client.remove_flags([uids[3]], [FLAGGED])
    client.set_flags([uids[11]], [ANSWERED, b"$Label1"])
    flags = {uid: split_flags(f) for uid, f in client.get_flags(uids).items()}
    for index, uid in enumerate(uids):
        system, keywords = flags[uid]
        assert (FLAGGED in system) == (index < 3)
        assert ({b"$Important", b"project-x"} <= keywords) == (2 <= index < 6)
        assert (SEEN in system) == (index % 4 == 0 and index != 11)
    assert flags[uids[11]] == (frozenset({ANSWERED}), frozenset({b"$Label1"}))


def _check_search(client: IMAPClient, uids: list[int], messages: list[bytes]) -> None:
    assert sorted(client.search(["FLAGGED"])) == uids[:3]
    assert sorted(client.search(["KEYWORD", "project-x"])) == uids[2:6]
    assert sorted(client.search(["UNKEYWORD", "project-x", "SEEN"])) == [
        uid for i, uid in enumerate(uids) if i % 4 == 0 and not 2 <= i < 6 and i != 11
    ]
    assert client.search(["HEADER", "X-Mailfs-Index", "7"]) == [uids[7]]
    assert client.search(["SUBJECT", message_subject(messages[5])]) == [uids[5]]
    assert sorted(client.search(["LARGER", 10_000])) == [
        uid for uid, m in zip(uids, messages, strict=True) if len(m) > 10_000
    ]
    word = "quota"
    expected = [
        uid for uid, m in zip(uids, messages, strict=True)
        if word.encode() in split_message(m)[1] and b"multipart" not in split_message(m)[0]
    ]
    found = client.search(["BODY", word])
    assert set(expected) <= set(found)


def test_concurrent_clients(dovecot: Dovecot, store: MailStore) -> None:
    workers, rounds = 4, 8
    with login(dovecot) as client:
        client.create_folder("Shared")
    start = threading.Barrier(workers, timeout=60)

    def work(worker: int) -> dict[int, tuple[bytes, frozenset[bytes]]]:
        mine: dict[int, tuple[bytes, frozenset[bytes]]] = {}
        with login(dovecot) as client:
            client.select_folder("Shared")
            start.wait()
            for n in range(rounds):
                message = make_message(1000 * worker + n, seed=worker)
                (uid,) = uid_from(client.append("Shared", message), "APPENDUID")
                client.noop()  # see the others' appends and flag changes
                keyword = f"w{worker}".encode()
                client.add_flags([uid], [FLAGGED, keyword] if n % 2 else [SEEN, keyword])
                body = client.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"]
                assert body == message
                client.search(["KEYWORD", keyword.decode()])
                fetch_all(client, ["FLAGS", "RFC822.SIZE"])
                flags = frozenset([FLAGGED, keyword] if n % 2 else [SEEN, keyword])
                mine[uid] = (message, flags)
        return mine

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(work, range(workers)))
    expected: dict[int, tuple[bytes, frozenset[bytes]]] = {}
    for result in results:
        assert not expected.keys() & result.keys(), "two appends got the same UID"
        expected |= result

    with login(dovecot) as client:
        client.select_folder("Shared", readonly=True)
        fetched = fetch_all(client, ["FLAGS", "BODY.PEEK[]"])
        assert len(fetched) == workers * rounds
        for uid, (message, flags) in expected.items():
            system, keywords = split_flags(fetched[uid][b"FLAGS"])
            assert system | keywords == flags
            assert sha256(fetched[uid][b"BODY[]"]).digest() == sha256(message).digest()
    assert_clean(dovecot, store)


def _workload(server: Dovecot) -> None:
    """Enough history that a lost index shows: gaps in UIDs, keywords, moves, expunges."""
    for user in (ALICE, BOB):
        with login(server, user) as client:
            for name in ("Lists", "Lists/Dev", "Sent"):
                client.create_folder(name)
            for i in range(15):
                box = ("INBOX", "Lists/Dev", "Sent")[i % 3]
                client.append(box, make_message(i, seed=len(user)), flags=(SEEN,) if i % 2 else ())
            client.select_folder("INBOX")
            uids = client.search(["ALL"])
            client.add_flags(uids[:2], [FLAGGED, b"$Important"])
            client.add_flags(uids[1:3], [b"custom-kw"])
            client.add_flags([uids[-1]], [DELETED])
            client.expunge()
            client.move([uids[0]], "Lists/Dev")
            client.select_folder("Lists/Dev")
            client.add_flags(client.search(["ALL"])[-2:], [ANSWERED])
            client.subscribe_folder("Lists")


def _snapshot(server: Dovecot) -> dict[str, dict[str, MailboxState]]:
    states = {}
    for user in (ALICE, BOB):
        with login(server, user) as client:
            states[user] = all_mailbox_states(client)
    return states


def _restart(server: Dovecot, store: MailStore, how: str) -> None:
    server.stop()
    if how == "umount":
        store.stop()
    else:
        store.crash()  # `mailfs flush`, then kill -9 of the daemon
    store.start()
    server.start()


def _changes(before: dict[str, dict[str, MailboxState]],
             after: dict[str, dict[str, MailboxState]]) -> list[str]:
    out = []
    for user, boxes in before.items():
        if boxes.keys() != after[user].keys():
            out.append(f"{user} mailboxes: {sorted(boxes)} != {sorted(after[user])}")
        for mailbox, state in boxes.items():
            if mailbox in after[user]:
                out += [f"{user}/{mailbox} {d}" for d in state.diff(after[user][mailbox])]
    return out


@pytest.mark.parametrize("how", ["umount", "kill9"])
def test_restart_keeps_state(dovecot: Dovecot, store: MailStore, how: str) -> None:
    _workload(dovecot)
    before = _snapshot(dovecot)
    _restart(dovecot, store, how)
    assert _changes(before, _snapshot(dovecot)) == []

    # The UID space continues where it stopped instead of being reassigned.
    with login(dovecot) as client:
        response = client.append("INBOX", make_message(99))
        assert uid_from(response, "APPENDUID") == [before[ALICE]["INBOX"].uidnext]
        assert f"{before[ALICE]['INBOX'].uidvalidity} " in response.decode()
    assert_clean(dovecot, store)


# What losing the index files does to each format; Dovecot stays silent about some of these,
# so only the state comparison sees them.
LOSE_INDEX = {
    "maildir": ["Maildir/dovecot-uidlist"],
    "sdbox": ["sdbox/mailboxes/INBOX/dbox-Mails/dovecot.index*"],
    "mdbox": ["mdbox/storage/dovecot.map.index*"],
}


@pytest.mark.parametrize("backend", ["local"])
def test_restart_check_catches_lost_index(dovecot: Dovecot, store: MailStore,
                                          mail_format: str) -> None:
    """Control: the restart test must fail when index files are lost, or it proves nothing."""
    _workload(dovecot)
    before = _snapshot(dovecot)
    dovecot.stop()
    home = dovecot.user_home(ALICE)
    lost = [path for pattern in LOSE_INDEX[mail_format] for path in home.glob(pattern)]
    assert lost, f"no index files matched {LOSE_INDEX[mail_format]} under {home}"
    for path in lost:
        path.unlink()
    dovecot.start()
    try:
        changes = _changes(before, _snapshot(dovecot))
    except IMAPClient.Error as exc:  # Dovecot may refuse the damaged mailbox outright
        changes = [f"IMAP failed: {exc}"]
    assert changes or dovecot.index_rebuild_lines()
