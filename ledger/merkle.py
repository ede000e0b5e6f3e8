"""RFC 6962 Merkle trees: hashing, which stored nodes a proof needs, and proof verification.

Pure code (docs/spec/merkle.md is the contract). The tree over leaves D[0:n] is the one RFC 6962
§2.1 defines: MTH({}) = SHA-256(""), MTH({d}) = SHA-256(0x00 ‖ d), and for n > 1 with k the
largest power of two below n, MTH(D[0:n]) = SHA-256(0x01 ‖ MTH(D[0:k]) ‖ MTH(D[k:n])).

Storage keeps only *perfect* subtrees: node (level, index) is MTH(D[index·2^level :
(index+1)·2^level]), written once its last leaf exists and never changed again. Every subtree the
RFC recursion visits is a perfect node or splits into at most log2(n) of them, so any root,
inclusion proof or consistency proof needs O(log n) stored nodes: `*_nodes` below name them,
the store fetches them in one query, and `*_from` turn them into the RFC's hashes.
Verification follows RFC 9162 §2.1.3.2 and §2.1.4.2 and needs nothing from the store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence

NodeId = tuple[int, int]  # (level, index): leaves index·2^level .. (index+1)·2^level - 1
Range = tuple[int, int]  # leaves [lo, hi)

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(width: int) -> int:
    """The largest power of two strictly below `width` (width > 1)."""
    return 1 << ((width - 1).bit_length() - 1)


def perfect_nodes(lo: int, hi: int) -> list[NodeId]:
    """The perfect nodes whose hashes make MTH(D[lo:hi]) for a range the RFC recursion visits
    (lo is a multiple of the largest power of two ≤ hi - lo), left to right."""
    nodes: list[NodeId] = []
    while lo < hi:
        level = (hi - lo).bit_length() - 1
        nodes.append((level, lo >> level))
        lo += 1 << level
    return nodes


def range_hash(lo: int, hi: int, nodes: Mapping[NodeId, bytes]) -> bytes:
    """MTH(D[lo:hi]) from its perfect nodes: fold them right to left, as the recursion does."""
    if lo == hi:
        return EMPTY_ROOT
    parts = [nodes[n] for n in perfect_nodes(lo, hi)]
    value = parts[-1]
    for part in reversed(parts[:-1]):
        value = node_hash(part, value)
    return value


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """PATH(index, D[0:size]) of RFC 6962 §2.1.1 as leaf ranges, leaf-side first."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    ranges: list[Range] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo += k
    return ranges[::-1]


def consistency_ranges(old: int, new: int) -> list[Range]:
    """PROOF(old, D[0:new]) of RFC 6962 §2.1.2 as leaf ranges, in proof order."""
    if not 0 < old <= new:
        raise ValueError(f"no consistency proof from size {old} to size {new}")
    ranges: list[Range] = []
    lo, hi, complete = 0, new, True
    m = old
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo, m, complete = lo + k, m - k, False
    if not complete:
        ranges.append((lo, hi))
    return ranges[::-1]


def nodes_for(ranges: Iterable[Range]) -> set[NodeId]:
    return {n for lo, hi in ranges for n in perfect_nodes(lo, hi)}


def hashes_for(ranges: Sequence[Range], nodes: Mapping[NodeId, bytes]) -> list[bytes]:
    return [range_hash(lo, hi, nodes) for lo, hi in ranges]


def new_nodes(size: int, leaves: Sequence[bytes], frontier: Mapping[NodeId, bytes]) -> list[
    tuple[int, int, bytes]
]:
    """The perfect nodes that appending `leaves` (already leaf-hashed) to a tree of `size`
    leaves completes, as (level, index, hash); `frontier` holds `frontier_nodes(size)`."""
    known = dict(frontier)
    made: list[tuple[int, int, bytes]] = []
    for offset, value in enumerate(leaves):
        index, level = size + offset, 0
        known[(0, index)] = value
        made.append((0, index, value))
        while index & 1:
            value = node_hash(known[(level, index - 1)], value)
            level, index = level + 1, index >> 1
            known[(level, index)] = value
            made.append((level, index, value))
    return made


def frontier_nodes(size: int) -> list[NodeId]:
    """The perfect nodes along the right edge of a tree of `size` leaves: all that appending
    needs, and what its root folds (one per set bit of `size`)."""
    return perfect_nodes(0, size)


def root_from(size: int, nodes: Mapping[NodeId, bytes]) -> bytes:
    return range_hash(0, size, nodes)


class ProofError(ValueError):
    """A proof that does not verify (pure; callers translate it into their own error)."""


def _lsb(value: int) -> bool:
    return bool(value & 1)


def verify_inclusion(
    leaf: bytes, index: int, size: int, path: Sequence[bytes], root: bytes,
    *, hasher: Callable[[bytes], bytes] = leaf_hash,
) -> None:
    """RFC 9162 §2.1.3.2: `leaf` (the entry, not yet leaf-hashed) is leaf `index` of the tree
    of `size` leaves whose root is `root`; raise `ProofError` if not."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    fn, sn, r = index, size - 1, hasher(leaf)
    for p in path:
        if sn == 0:
            raise ProofError("the audit path is longer than the tree is deep")
        if _lsb(fn) or fn == sn:
            r = node_hash(p, r)
            while not _lsb(fn) and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("the audit path is shorter than the tree is deep")
    if r != root:
        raise ProofError("the audit path does not lead to the signed root: the entry is not "
                         "in this tree")


def verify_consistency(
    old_size: int, old_root: bytes, new_size: int, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 §2.1.4.2: the tree of `new_size` leaves extends the one of `old_size`. From
    the empty tree the proof is empty, but the older root is still checked: it must be the
    empty tree's (§2.1.1), or any root would pass as "size 0"."""
    if old_size > new_size:
        raise ProofError(f"the older tree ({old_size}) is larger than the newer ({new_size})")
    if old_size == 0 and old_root != EMPTY_ROOT:  # RFC 9162 §2.1.1: MTH({}) = SHA-256()
        raise ProofError("the older tree is empty, so its root must be the SHA-256 of the "
                         "empty string; this one is not: the checkpoint is not of this log")
    if old_size == new_size:
        if proof or old_root != new_root:
            raise ProofError("two trees of one size must have one root and an empty proof")
        return
    if old_size == 0:  # the empty tree is a prefix of every tree: nothing more to prove
        if proof:
            raise ProofError("a proof from the empty tree must be empty")
        return
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    if not path:
        raise ProofError("the consistency proof is empty")
    fn, sn = old_size - 1, new_size - 1
    while _lsb(fn):
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is longer than it can be")
        if _lsb(fn) or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not _lsb(fn) and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("the consistency proof is shorter than it must be")
    if fr != old_root:
        raise ProofError("the proof does not reproduce the older root: the older tree is not "
                         "a prefix of the newer one (history was rewritten)")
    if sr != new_root:
        raise ProofError("the proof does not reproduce the newer root")


class MemoryTree:
    """The whole tree in memory: for tests, benches and verifiers that hold all leaves."""

    def __init__(self) -> None:
        self.size = 0
        self.nodes: dict[NodeId, bytes] = {}

    def append(self, leaf: bytes) -> None:
        for level, index, value in new_nodes(self.size, [leaf_hash(leaf)], self.nodes):
            self.nodes[(level, index)] = value
        self.size += 1

    def root(self, size: int | None = None) -> bytes:
        return root_from(self.size if size is None else size, self.nodes)

    def inclusion(self, index: int, size: int | None = None) -> list[bytes]:
        return hashes_for(inclusion_ranges(index, self.size if size is None else size),
                          self.nodes)

    def consistency(self, old: int, new: int | None = None) -> list[bytes]:
        return hashes_for(consistency_ranges(old, self.size if new is None else new), self.nodes)
