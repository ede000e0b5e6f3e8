"""Every SQL statement of the Merkle tree: growing it from the chain, reading proof nodes,
recording signed checkpoints. All keyed by a log id (docs/spec/merkle.md).

The tree is built *after* the append, never inside it: `extend` takes the log's own row lock
(not the chain head's), reads the chain from the tree's size onward and adds the nodes those
leaves complete, all in one transaction — so any number of processes may call it at once and
the append path pays nothing for the tree.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from ledger import merkle
from ledger.errors import TreeNotReady
from ledger.merkle import NodeId
from ledger.storage.store import Connection, Pool, translated_errors

EVENTS_LOG = "events"

_LOCK_LOG = "SELECT source, size, root FROM ledger.tree_logs WHERE log_id = $1 FOR UPDATE"
_LOG = "SELECT source, size, root FROM ledger.tree_logs WHERE log_id = $1"
_NODES = """
    SELECT n.level, n.index, n.hash
    FROM unnest($2::smallint[], $3::bigint[]) AS k(level, index)
    JOIN ledger.tree_nodes n ON n.log_id = $1 AND n.level = k.level AND n.index = k.index
"""
_INSERT_NODES = """
    INSERT INTO ledger.tree_nodes (log_id, level, index, hash)
    SELECT $1, * FROM unnest($2::smallint[], $3::bigint[], $4::bytea[])
"""
_MOVE_LOG = "UPDATE ledger.tree_logs SET size = $2, root = $3, updated_at = now() WHERE log_id = $1"
_COUNT_NODES = "SELECT count(*) FROM ledger.tree_nodes WHERE log_id = $1"
_INSERT_CHECKPOINT = """
    INSERT INTO ledger.tree_checkpoints (log_id, size, root, signed_at, note)
    VALUES ($1, $2, $3, $4, $5)
"""
_LATEST_CHECKPOINT = """
    SELECT note FROM ledger.tree_checkpoints WHERE log_id = $1 AND size >= $2
    ORDER BY size DESC, signed_at DESC LIMIT 1
"""


@dataclass(frozen=True, slots=True)
class TreeHead:
    log_id: str
    size: int
    root: bytes
    leaf: bytes | None  # the last leaf (the chain head hash at `size`), None when empty


class _Source:
    """How a log reads its leaves from the chain it is built over."""

    LEAVES: ClassVar[dict[str, str]] = {
        # leaf i (0-based) = the stored chain entry hash of the event at position i + 1
        "events": "SELECT position, hash FROM ledger.events WHERE position > $1 "
                  "ORDER BY position LIMIT $2",
    }
    LEAVES_AT: ClassVar[dict[str, str]] = {
        "events": "SELECT position, hash FROM ledger.events WHERE position = ANY($1::bigint[])",
    }
    LEAF: ClassVar[dict[str, str]] = {
        "events": "SELECT hash FROM ledger.events WHERE position = $1",
    }
    ROW: ClassVar[dict[str, str]] = {
        "events": "SELECT * FROM ledger.events WHERE position = $1",
    }
    ALL: ClassVar[dict[str, str]] = {
        "events": "SELECT position, hash FROM ledger.events WHERE position <= $1 "
                  "ORDER BY position",
    }


async def _nodes(
    connection: Connection, source: str, log_id: str, ids: Iterable[NodeId]
) -> dict[NodeId, bytes]:
    """Stored nodes by (level, index); level 0 (leaf hashes) is computed from the chain."""
    wanted = list(ids)
    found: dict[NodeId, bytes] = {}
    leaves = [index + 1 for level, index in wanted if level == 0]
    if leaves:
        for r in await connection.fetch(_Source.LEAVES_AT[source], leaves):
            found[(0, r["position"] - 1)] = merkle.leaf_hash(bytes(r["hash"]))
    upper = [(level, index) for level, index in wanted if level > 0]
    if upper:
        rows = await connection.fetch(
            _NODES, log_id, [level for level, _ in upper], [index for _, index in upper]
        )
        found.update({(r["level"], r["index"]): bytes(r["hash"]) for r in rows})
    return found


def _require(found: dict[NodeId, bytes], wanted: Iterable[NodeId], log_id: str) -> None:
    missing = [n for n in wanted if n not in found]
    if missing:
        level, index = missing[0]
        raise TreeNotReady(
            f"log {log_id}: tree node level {level} index {index} is missing; run "
            "`ledger verify` (the tree may have been tampered with)"
        )


class TreeStore:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def extend(self, log_id: str = EVENTS_LOG, *, limit: int = 5000) -> tuple[int, int]:
        """Add up to `limit` leaves from the chain; (new size, leaves added)."""
        async with (
            translated_errors(f"extend tree {log_id}"),
            self._pool.acquire() as connection,
            connection.transaction(),
        ):
            # Derived data, rebuilt from the durable chain after a crash: no fsync of its own
            # (atomicity and order stay; only the last moments may be redone).
            await connection.execute("SET LOCAL synchronous_commit = off")
            log = await connection.fetchrow(_LOCK_LOG, log_id)
            if log is None:
                raise TreeNotReady(f"no Merkle log {log_id!r}: run `ledger migrate`")
            size = int(log["size"])
            rows = await connection.fetch(_Source.LEAVES[log["source"]], size, limit)
            leaves: list[bytes] = []
            for offset, row in enumerate(rows):
                if row["position"] != size + offset + 1:  # the chain has a gap: stop before it
                    break
                leaves.append(merkle.leaf_hash(bytes(row["hash"])))
            if not leaves:
                return size, 0
            frontier_ids = merkle.frontier_nodes(size)
            frontier = await _nodes(connection, log["source"], log_id, frontier_ids)
            _require(frontier, frontier_ids, log_id)
            made = merkle.new_nodes(size, leaves, frontier)
            stored = [m for m in made if m[0] > 0]  # level 0 stays in the chain
            await connection.execute(
                _INSERT_NODES, log_id, [m[0] for m in stored], [m[1] for m in stored],
                [m[2] for m in stored],
            )
            new_size = size + len(leaves)
            known = {**frontier, **{(m[0], m[1]): m[2] for m in made}}
            await connection.execute(_MOVE_LOG, log_id, new_size, merkle.root_from(new_size, known))
            return new_size, len(leaves)

    async def catch_up(self, log_id: str = EVENTS_LOG, *, limit: int = 5000) -> int:
        """Extend until the tree holds every leaf the chain had when this was called."""
        while True:
            size, added = await self.extend(log_id, limit=limit)
            if added < limit:
                return size

    async def progress(self, log_id: str = EVENTS_LOG) -> dict[str, Any]:
        """How far the tree is behind the event chain, from the database alone (its follower
        may run in another process): `size`, `head`, `idle_seconds` since the tree last grew,
        `waiting_seconds` since the oldest event not yet in it was received (None: none)."""
        async with translated_errors(f"read tree {log_id}"), self._pool.acquire() as connection:
            row = await connection.fetchrow(
                "SELECT t.size, h.position AS head, "
                "extract(epoch FROM now() - t.updated_at)::float8 AS idle_seconds, "
                "extract(epoch FROM now() - e.received_at)::float8 AS waiting_seconds "
                "FROM ledger.tree_logs t CROSS JOIN ledger.stream_heads h "
                "LEFT JOIN ledger.events e ON e.position = t.size + 1 "
                "WHERE t.log_id = $1 AND h.stream = 'events'",
                log_id,
            )
        if row is None:
            raise TreeNotReady(f"no Merkle log {log_id!r}: run `ledger migrate`")
        return dict(row)

    async def head(self, log_id: str = EVENTS_LOG) -> TreeHead:
        async with translated_errors(f"read tree {log_id}"), self._pool.acquire() as connection:
            log = await connection.fetchrow(_LOG, log_id)
            if log is None:
                raise TreeNotReady(f"no Merkle log {log_id!r}: run `ledger migrate`")
            size = int(log["size"])
            leaf = None
            if size:
                leaf = await connection.fetchval(_Source.LEAF[log["source"]], size)
            return TreeHead(log_id, size, bytes(log["root"]), None if leaf is None else bytes(leaf))

    async def proof_material(
        self, log_id: str, size: int, *, leaf_position: int | None = None,
        old_size: int | None = None,
    ) -> tuple[dict[NodeId, bytes], Any]:
        """The stored nodes for the root at `size` and for an inclusion proof of the leaf at
        `leaf_position` (1-based) or a consistency proof from `old_size`, read in one snapshot;
        plus the event row at `leaf_position` when one was asked for."""
        ranges = [(0, size)]
        if leaf_position is not None:
            ranges += merkle.inclusion_ranges(leaf_position - 1, size)
        if old_size is not None:
            ranges.append((0, old_size))
            if 0 < old_size < size:
                ranges += merkle.consistency_ranges(old_size, size)
        wanted = merkle.nodes_for(ranges)
        async with (
            translated_errors(f"read proof of {log_id}"),
            self._pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            log = await connection.fetchrow(_LOG, log_id)
            if log is None:
                raise TreeNotReady(f"no Merkle log {log_id!r}: run `ledger migrate`")
            if int(log["size"]) < size:
                raise TreeNotReady(
                    f"log {log_id}: the tree holds {log['size']} leaves, not yet {size}; "
                    "wait for the tree follower (or run `ledger checkpoint`)"
                )
            nodes = await _nodes(connection, log["source"], log_id, wanted)
            _require(nodes, wanted, log_id)
            row = None
            if leaf_position is not None:
                row = await connection.fetchrow(_Source.ROW[log["source"]], leaf_position)
            return nodes, row

    async def record_checkpoint(
        self, log_id: str, size: int, root: bytes, signed_at: datetime, note: str
    ) -> None:
        async with translated_errors("record checkpoint"), self._pool.acquire() as connection:
            await connection.execute(_INSERT_CHECKPOINT, log_id, size, root, signed_at, note)

    async def latest_checkpoint(self, log_id: str, at_least: int) -> str | None:
        """The newest signed checkpoint of `log_id` covering `at_least` leaves, if any."""
        async with translated_errors("read checkpoint"), self._pool.acquire() as connection:
            note = await connection.fetchval(_LATEST_CHECKPOINT, log_id, at_least)
        return None if note is None else str(note)

    @asynccontextmanager
    async def snapshot(self, log_id: str = EVENTS_LOG) -> AsyncIterator[TreeSnapshot]:
        """A consistent read-only view of a log's tree and the chain under it (for verify)."""
        async with (
            translated_errors(f"read tree {log_id}"),
            self._pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            log = await connection.fetchrow(_LOG, log_id)
            if log is None:
                raise TreeNotReady(f"no Merkle log {log_id!r}: run `ledger migrate`")
            yield TreeSnapshot(connection, log_id, log["source"], int(log["size"]),
                               bytes(log["root"]))


class TreeSnapshot:
    def __init__(
        self, connection: Connection, log_id: str, source: str, size: int, root: bytes
    ) -> None:
        self._connection, self._source = connection, source
        self.log_id, self.size, self.root = log_id, size, root

    async def leaves(self, batch: int = 5000) -> AsyncIterator[list[tuple[int, bytes]]]:
        """(position, chain hash) of every leaf the tree claims to hold, in order."""
        cursor = await self._connection.cursor(_Source.ALL[self._source], self.size)
        while rows := await cursor.fetch(batch):
            yield [(r["position"], bytes(r["hash"])) for r in rows]

    async def nodes(self, ids: Iterable[NodeId]) -> dict[NodeId, bytes]:
        """Stored nodes of level 1 and up (level 0 is the chain itself)."""
        wanted = [(level, index) for level, index in ids if level > 0]
        return await _nodes(self._connection, self._source, self.log_id, wanted)

    async def node_count(self) -> int:
        return int(await self._connection.fetchval(_COUNT_NODES, self.log_id))
