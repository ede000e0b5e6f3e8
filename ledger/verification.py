"""Recomputing the hash chains and naming the first place where history was changed.

Pure code: rows come in position order from the store, problems go out. The verifier looks one row
ahead, which is what it takes to tell a swap from a deletion. What it can and cannot see:
- a payload edited in place (its SHA-256 no longer matches)           → `payload_changed`
- anything else about an event edited (its own hash no longer matches) → `event_changed`
- a position gap, or a row linking to a predecessor nobody has        → `event_missing`
- a row whose successor links past it to the row before               → `event_inserted`
- two neighbours whose links cross                                    → `order_changed`
- history rewritten with every later hash recomputed (a self-consistent forgery): only a signed
  checkpoint taken earlier can show it                                  → `checkpoint_mismatch`
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from ledger import merkle
from ledger.hashing import GENESIS_HASH, chain_hash, event_entry, rejection_entry, sha256


class ProblemKind(StrEnum):
    PAYLOAD_CHANGED = "payload_changed"
    EVENT_CHANGED = "event_changed"
    EVENT_MISSING = "event_missing"
    EVENT_INSERTED = "event_inserted"
    ORDER_CHANGED = "order_changed"
    HEAD_MISMATCH = "head_mismatch"
    CHECKPOINT_MISMATCH = "checkpoint_mismatch"
    TREE_NODE_CHANGED = "tree_node_changed"
    TREE_NODE_MISSING = "tree_node_missing"
    TREE_HEAD_MISMATCH = "tree_head_mismatch"


@dataclass(frozen=True, slots=True)
class Problem:
    stream: str
    position: int
    kind: ProblemKind
    detail: str

    def __str__(self) -> str:
        return f"{self.stream} position {self.position}: {self.kind.value} — {self.detail}"


@dataclass(frozen=True, slots=True)
class ChainRow:
    """What the verifier needs of a row: its links and its hashes, stored and recomputed."""

    position: int
    prev_hash: bytes
    hash: bytes
    content_sha256: bytes  # stored payload_sha256 (events) / SHA-256 of the excerpt (rejections)
    content_ok: bool  # the stored content still hashes to content_sha256
    entry: bytes  # canonical metadata, recomputed from the row
    # the same, re-canonicalised from parsed JSON: for rows whose metadata text was not stored
    # canonically (tried only when `entry` does not reproduce the hash)
    reparsed: Callable[[], bytes] | None = None


def event_row(record: Any) -> ChainRow:
    """An event row from the store (mapping-like: asyncpg Record or dict)."""
    payload_sha256 = bytes(record["payload_sha256"])
    body_sha256 = record["body_sha256"]

    def entry(metadata: Any) -> bytes:
        return event_entry(
            member_id=record["member_id"],
            event_type=record["event_type"],
            origin=record["origin"],
            bot_ids=record["bot_ids"],
            occurred_at=record["occurred_at"],
            received_at=record["received_at"],
            dedup_key=bytes(record["dedup_key"]),
            body_sha256=bytes(body_sha256) if body_sha256 is not None else None,
            metadata=metadata,
        )

    return ChainRow(
        position=record["position"],
        prev_hash=bytes(record["prev_hash"]),
        hash=bytes(record["hash"]),
        content_sha256=payload_sha256,
        content_ok=sha256(record["payload"].encode()) == payload_sha256,
        # metadata is stored canonical: hash its text as it is, no parse
        entry=entry(orjson.Fragment(record["metadata"])),
        reparsed=lambda: entry(orjson.loads(record["metadata"])),
    )


def rejection_row(record: Any) -> ChainRow:
    excerpt_sha256 = sha256(record["excerpt"].encode())
    return ChainRow(
        position=record["position"],
        prev_hash=bytes(record["prev_hash"]),
        hash=bytes(record["hash"]),
        content_sha256=excerpt_sha256,
        content_ok=True,  # the excerpt is chained by hash: an edit shows as event_changed
        entry=rejection_entry(
            received_at=record["received_at"],
            status=record["status"],
            reason=record["reason"],
            detail=record["detail"],
            member_id=record["member_id"],
            event_type=record["event_type"],
            peer=record["peer"],
            content_type=record["content_type"],
            body_size=record["body_size"],
            body_sha256=bytes(record["body_sha256"]),
        ),
    )


@dataclass(frozen=True, slots=True)
class Anchor:
    """A (position, hash) pair vouched for from outside: a signed checkpoint."""

    position: int
    hash: bytes


class ChainVerifier:
    """Feed rows in position order; `problem` holds the first one found (and feeding stops)."""

    def __init__(self, stream: str, *, anchor: Anchor | None = None) -> None:
        self.stream = stream
        self.anchor = anchor
        self.problem: Problem | None = None
        self.verified = 0  # rows checked and found good
        self.last_hash = GENESIS_HASH
        self._expected = 1
        self._held: ChainRow | None = None
        self._recent: deque[ChainRow] = deque(maxlen=2)  # the last good rows

    def feed(self, row: ChainRow) -> bool:
        """Check the row held back, with `row` as its lookahead; False once a problem is found."""
        if self.problem is not None:
            return False
        held, self._held = self._held, row
        if held is not None:
            self._check(held, row)
        return self.problem is None

    def finish(self, head_position: int, head_hash: bytes) -> Problem | None:
        """Check the last row and the stream head; then the anchor must have been reached."""
        if self.problem is None and self._held is not None:
            self._check(self._held, None)
            self._held = None
        if self.problem is None:
            last = self._expected - 1
            if head_position > last:
                self._fail(last + 1, ProblemKind.EVENT_MISSING,
                           f"the head records {head_position} rows, the table ends at {last}")
            elif head_position != last or head_hash != self.last_hash:
                self._fail(last, ProblemKind.HEAD_MISMATCH,
                           "the stream head does not match the last row")
        if self.problem is None and self.anchor and self.anchor.position >= self._expected:
            self._fail(self._expected, ProblemKind.EVENT_MISSING,
                       f"the checkpoint vouches for {self.anchor.position} rows, "
                       f"the table ends at {self._expected - 1}")
        return self.problem

    def _fail(self, position: int, kind: ProblemKind, detail: str) -> None:
        self.problem = Problem(self.stream, position, kind, detail)

    def _check(self, row: ChainRow, lookahead: ChainRow | None) -> None:
        if row.position != self._expected:
            self._fail(self._expected, ProblemKind.EVENT_MISSING,
                       f"positions {self._expected}..{row.position - 1} are absent")
            return
        if not row.content_ok:
            self._fail(row.position, ProblemKind.PAYLOAD_CHANGED,
                       "the payload no longer hashes to its recorded payload_sha256")
            return
        linked = row.prev_hash == self.last_hash
        if not linked:
            self._classify_broken_link(row, lookahead)
            return
        if chain_hash(row.prev_hash, row.position, row.entry, row.content_sha256) != row.hash and (
            row.reparsed is None
            or chain_hash(row.prev_hash, row.position, row.reparsed(), row.content_sha256)
            != row.hash
        ):
            self._fail(row.position, ProblemKind.EVENT_CHANGED,
                       "the row's content no longer hashes to its recorded hash")
            return
        if self.anchor and row.position == self.anchor.position and row.hash != self.anchor.hash:
            self._fail(row.position, ProblemKind.CHECKPOINT_MISMATCH,
                       "history up to here differs from what the signed checkpoint vouches for")
            return
        self._recent.append(row)
        self.last_hash = row.hash
        self._expected += 1
        self.verified += 1

    def _classify_broken_link(self, row: ChainRow, lookahead: ChainRow | None) -> None:
        if (
            lookahead is not None
            and lookahead.prev_hash == self.last_hash
            and row.prev_hash == lookahead.hash
        ):
            self._fail(row.position, ProblemKind.ORDER_CHANGED,
                       f"positions {row.position} and {lookahead.position} were swapped")
        elif len(self._recent) == 2 and row.prev_hash == self._recent[0].hash:
            inserted = self._recent[1].position
            self._fail(inserted, ProblemKind.EVENT_INSERTED,
                       f"position {inserted} is not in the chain: its successor links past it")
        else:
            self._fail(row.position, ProblemKind.EVENT_MISSING,
                       "links to a predecessor that is not in the table: an earlier row was "
                       "removed (or this row's prev_hash edited)")


class TreeVerifier:
    """Recompute a log's Merkle tree from its leaves (the chain's entry hashes, in order) and
    compare every stored node; `problem` names the first node that differs or is missing.

    Feed leaves in batches; for each batch, `expected` says which nodes it completes (fetch
    those) and `check` compares them. Only the tree's right edge is kept in memory.
    """

    def __init__(self, log_id: str) -> None:
        self.stream = f"tree {log_id}"
        self.size = 0
        self.problem: Problem | None = None
        self._frontier: dict[merkle.NodeId, bytes] = {}

    def expected(self, leaves: list[bytes]) -> list[tuple[int, int, bytes]]:
        made = merkle.new_nodes(self.size, [merkle.leaf_hash(x) for x in leaves], self._frontier)
        known = {**self._frontier, **{(level, index): h for level, index, h in made}}
        self.size += len(leaves)
        self._frontier = {n: known[n] for n in merkle.frontier_nodes(self.size)}
        return made

    def check(
        self, made: list[tuple[int, int, bytes]], stored: dict[merkle.NodeId, bytes]
    ) -> bool:
        """False (and `problem` set) at the first node, in order of completion, that is off."""
        for level, index, value in made:
            if level == 0:  # leaf hashes are not stored: the chain is checked on its own
                continue
            last_leaf = ((index + 1) << level)  # 1-based position of its last leaf
            first_leaf = (index << level) + 1
            where = f"node level {level} index {index} (positions {first_leaf}..{last_leaf})"
            found = stored.get((level, index))
            if found is None:
                self._fail(last_leaf, ProblemKind.TREE_NODE_MISSING, f"{where} is not stored")
                return False
            if found != value:
                self._fail(last_leaf, ProblemKind.TREE_NODE_CHANGED,
                           f"{where} is stored as {found.hex()[:16]}…, the chain gives "
                           f"{value.hex()[:16]}…")
                return False
        return True

    def finish(self, size: int, root: bytes, stored_nodes: int) -> Problem | None:
        """The log's recorded size and root must be the recomputed ones, and no node may be
        stored past them."""
        if self.problem is not None:
            return self.problem
        if self.size != size:
            self._fail(self.size + 1, ProblemKind.EVENT_MISSING,
                       f"the tree holds {size} leaves, the chain has only {self.size} of them")
        elif merkle.root_from(size, self._frontier) != root:
            self._fail(size, ProblemKind.TREE_HEAD_MISMATCH,
                       "the recorded root is not the root of the stored nodes")
        elif stored_nodes != size - size.bit_count():
            self._fail(size, ProblemKind.TREE_NODE_CHANGED,
                       f"{stored_nodes} nodes are stored, a tree of {size} leaves has "
                       f"{size - size.bit_count()} above its leaves: nodes were added past "
                       "the tree")
        return self.problem

    def _fail(self, position: int, kind: ProblemKind, detail: str) -> None:
        self.problem = Problem(self.stream, position, kind, detail)
