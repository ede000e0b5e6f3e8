"""The RFC 6962 tree: roots and proofs agree with the RFC's definitions and with pymerkle."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymerkle import InmemoryTree, verify_inclusion
from pymerkle.core import _inclusion_path_layout
from pymerkle.proof import InclusionProof

from ledger import merkle
from ledger.merkle import MemoryTree, ProofError


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def mth(leaves: list[bytes]) -> bytes:
    """MTH straight from RFC 6962 §2.1."""
    if not leaves:
        return _sha(b"")
    if len(leaves) == 1:
        return _sha(b"\x00" + leaves[0])
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return _sha(b"\x01" + mth(leaves[:k]) + mth(leaves[k:]))


def rfc_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) straight from RFC 6962 §2.1.1."""
    if len(leaves) == 1:
        return []
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    if m < k:
        return [*rfc_path(m, leaves[:k]), mth(leaves[k:])]
    return [*rfc_path(m - k, leaves[k:]), mth(leaves[:k])]


def rfc_subproof(m: int, leaves: list[bytes], b: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) straight from RFC 6962 §2.1.2."""
    if m == len(leaves):
        return [] if b else [mth(leaves)]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    if m <= k:
        return [*rfc_subproof(m, leaves[:k], b), mth(leaves[k:])]
    return [*rfc_subproof(m - k, leaves[k:], False), mth(leaves[:k])]


def leaves_of(n: int, salt: bytes = b"") -> list[bytes]:
    return [_sha(salt + i.to_bytes(8, "big")) for i in range(n)]


def tree_of(leaves: list[bytes]) -> MemoryTree:
    tree = MemoryTree()
    for leaf in leaves:
        tree.append(leaf)
    return tree


def test_roots_proofs_and_consistency_match_the_rfc_definitions_up_to_70_leaves() -> None:
    leaves = leaves_of(70)
    tree = tree_of(leaves)
    for n in range(1, 71):
        assert tree.root(n) == mth(leaves[:n])
        for i in range(n):
            path = tree.inclusion(i, n)
            assert path == rfc_path(i, leaves[:n])
            merkle.verify_inclusion(leaves[i], i, n, path, tree.root(n))
        for m in range(1, n + 1):
            proof = tree.consistency(m, n)
            assert proof == rfc_subproof(m, leaves[:n], True)
            merkle.verify_consistency(m, tree.root(m), n, tree.root(n), proof)
    assert MemoryTree().root() == _sha(b"")


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 3000), data=st.data())
def test_pymerkle_verifies_our_inclusion_proofs_and_computes_our_roots(
    size: int, data: st.DataObject
) -> None:
    leaves = leaves_of(size)
    ours = tree_of(leaves)
    theirs = InmemoryTree(algorithm="sha256")  # RFC 6962 hashing (0x00/0x01 prefixes)
    for leaf in leaves:
        theirs.append_entry(leaf)
    assert theirs.get_root() == ours.root()
    index = data.draw(st.integers(0, size - 1))
    # pymerkle's proof layout: the leaf hash first, then the RFC audit path; its `rule` bits are
    # a function of (index, size) alone, which pymerkle recomputes and checks when verifying
    rule, _ = _inclusion_path_layout(index + 1, size)
    proof = InclusionProof("sha256", True, size, index + 1, rule,
                           [merkle.leaf_hash(leaves[index]), *ours.inclusion(index)])
    verify_inclusion(merkle.leaf_hash(leaves[index]), theirs.get_root(), proof,
                     index=index + 1, size=size)
    assert ours.inclusion(index) == theirs.prove_inclusion(index + 1).path[1:]


def test_a_wrong_leaf_index_size_or_path_fails() -> None:
    leaves = leaves_of(13)
    tree = tree_of(leaves)
    path = tree.inclusion(5)
    with pytest.raises(ProofError):
        merkle.verify_inclusion(leaves[6], 5, 13, path, tree.root())
    with pytest.raises(ProofError):
        merkle.verify_inclusion(leaves[5], 4, 13, path, tree.root())
    with pytest.raises(ProofError):  # (a size with the same path shape would pass: the
        # checkpoint binds the size, not the path)
        merkle.verify_inclusion(leaves[5], 5, 6, path, tree.root())
    with pytest.raises(ProofError):
        merkle.verify_inclusion(leaves[5], 5, 13, path[:-1], tree.root())
    with pytest.raises(ProofError):
        merkle.verify_inclusion(leaves[5], 5, 13, [*path, path[0]], tree.root())


def test_consistency_with_a_forked_history_fails() -> None:
    honest = leaves_of(1500)
    forked = honest[:700] + leaves_of(800, b"fork")
    old, new = tree_of(honest[:1000]), tree_of(forked)
    proof = new.consistency(1000)
    with pytest.raises(ProofError, match="older root"):
        merkle.verify_consistency(1000, old.root(), 1500, new.root(), proof)
    honest_tree = tree_of(honest)
    merkle.verify_consistency(1000, old.root(), 1500, honest_tree.root(),
                              honest_tree.consistency(1000))


def test_new_nodes_only_completes_perfect_subtrees() -> None:
    tree = tree_of(leaves_of(11))
    # 11 leaves: 11 level-0, 5 level-1, 2 level-2, 1 level-3 node
    assert sorted({level for level, _ in tree.nodes}) == [0, 1, 2, 3]
    assert len(tree.nodes) == 11 + 5 + 2 + 1
    assert merkle.frontier_nodes(11) == [(3, 0), (1, 4), (0, 10)]


def test_from_the_empty_tree_the_proof_is_empty_and_the_old_root_is_checked() -> None:
    """RFC 9162: the empty tree's root is SHA-256 of the empty string (§2.1.1), and it is a
    prefix of every tree (the proof is empty). The verifier ignored the older root it was
    given at size 0: any root passed as "size 0"."""
    tree = tree_of(leaves_of(5))
    for n in range(0, 6):
        merkle.verify_consistency(0, _sha(b""), n, tree.root(n), [])
        for wrong in (b"\0" * 32, tree.root(5), _sha(b"\0")):
            with pytest.raises(ProofError, match="empty"):
                merkle.verify_consistency(0, wrong, n, tree.root(n), [])
    with pytest.raises(ProofError, match="empty"):
        merkle.verify_consistency(0, _sha(b""), 3, tree.root(3), [tree.root(3)])
