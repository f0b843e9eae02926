"""Per-node namespaces for file ids and versions.

Every mount in a replication cluster creates files and changes them on its own, at the
same time as the others, without asking anyone. A file id (fid) or a file version that
two nodes could both hand out would make one node's change overwrite or be mistaken for
another's. So each node owns a 16-bit namespace derived from its node id, and puts it in
the high bits of every fid and version it makes; the low bits are its own counter.
Config validation refuses a cluster in which two node ids map to the same namespace.

Namespace 0 belongs to no node: fids made before replication existed (a single-node
store counted from 1) have namespace 0 and stay valid.
"""

from __future__ import annotations

import xxhash

NAMESPACE_BITS = 16
NAMESPACE_MAX = (1 << NAMESPACE_BITS) - 1
FID_SHIFT = 40  # fid = namespace << 40 | counter
VERSION_SHIFT = 48  # version = namespace << 48 | seq
FID_COUNTER_MAX = (1 << FID_SHIFT) - 1
VERSION_SEQ_MAX = (1 << VERSION_SHIFT) - 1


def node_namespace(node_id: str) -> int:
    """The namespace (1..65535) of a node id: stable across restarts and hosts.

    Never 0, so a node's fids can be told apart from legacy single-node fids.
    """
    return int(xxhash.xxh3_64_intdigest(node_id.encode())) % 0xFFFF + 1


def _check(what: str, value: int, limit: int) -> None:
    if not 0 <= value <= limit:
        raise ValueError(f"{what} {value} is outside 0..{limit}")


def make_fid(namespace: int, counter: int) -> int:
    """The fid for a node's counter value: unique across nodes as long as namespaces are.

    A counter beyond 40 bits would spill into the namespace and collide with another
    node's fids, so it is refused rather than wrapped.
    """
    _check("namespace", namespace, NAMESPACE_MAX)
    _check("fid counter", counter, FID_COUNTER_MAX)
    return namespace << FID_SHIFT | counter


def fid_namespace(fid: int) -> int:
    """The namespace of the node that created a fid (0 for legacy single-node fids)."""
    _check("fid", fid, (NAMESPACE_MAX << FID_SHIFT) | FID_COUNTER_MAX)
    return fid >> FID_SHIFT


def make_version(namespace: int, seq: int) -> int:
    """A file version: the namespace of the node that made the change, and that node's seq.

    Two nodes changing the same file concurrently produce different versions even when
    their seqs happen to be equal, so a conflict is always visible.
    """
    _check("namespace", namespace, NAMESPACE_MAX)
    _check("version seq", seq, VERSION_SEQ_MAX)
    return namespace << VERSION_SHIFT | seq


def version_parts(version: int) -> tuple[int, int]:
    """(namespace, seq) of a version made by `make_version`."""
    _check("version", version, (NAMESPACE_MAX << VERSION_SHIFT) | VERSION_SEQ_MAX)
    return version >> VERSION_SHIFT, version & VERSION_SEQ_MAX
