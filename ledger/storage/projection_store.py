"""SQL of the projections: reading events to fold, loading and saving fold state, read queries.

The projector's batch — events, state changes and the checkpoint — commits in one transaction, with
the checkpoint row locked so that two projectors (two `ledger serve` processes) never interleave.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import orjson

from ledger.projections.fold import Bot, Deletion, Lifecycle, Portal, State, StoredEvent
from ledger.storage.store import Connection, Pool, translated_errors

_EVENT_COLUMNS = (
    "position, member_id, event_type, origin, bot_ids, occurred_at, received_at, payload, hash"
)
_EVENTS_AFTER = f"""
    SELECT {_EVENT_COLUMNS} FROM ledger.events
    WHERE position > $1 AND position <= $2 ORDER BY position LIMIT $3
"""


def _columns(model: type[Any]) -> list[str]:
    return [f.name for f in dataclasses.fields(model)]


def _upsert(table: str, model: type[Any], key: Sequence[str]) -> str:
    columns = _columns(model)
    values = ", ".join(f"${i + 1}" for i in range(len(columns)))
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c not in key)
    return (
        f"INSERT INTO projections.{table} ({', '.join(columns)}) VALUES ({values}) "
        f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}"
    )


_TABLES: tuple[tuple[str, type[Any], tuple[str, ...]], ...] = (
    ("bots", Bot, ("member_id", "bot_id")),
    ("deletions", Deletion, ("position", "bot_id")),
    ("portals", Portal, ("member_id",)),
    ("portal_lifecycle", Lifecycle, ("position",)),
)
_UPSERTS = {table: _upsert(table, model, key) for table, model, key in _TABLES}


def to_event(record: Any) -> StoredEvent:
    return StoredEvent(
        position=record["position"],
        member_id=record["member_id"],
        event_type=record["event_type"],
        origin=record["origin"],
        bot_ids=tuple(record["bot_ids"]),
        occurred_at=record["occurred_at"],
        received_at=record["received_at"],
        payload=orjson.loads(record["payload"]),
        hash=bytes(record["hash"]),
    )


def _values(row: Any) -> tuple[Any, ...]:
    return tuple(getattr(row, f.name) for f in dataclasses.fields(row))


class ProjectionBatch:
    """One locked projector transaction."""

    def __init__(self, connection: Connection, name: str, checkpoint: int) -> None:
        self._connection = connection
        self.name = name
        self.checkpoint = checkpoint

    async def events(self, up_to: int, limit: int) -> list[StoredEvent]:
        rows = await self._connection.fetch(_EVENTS_AFTER, self.checkpoint, up_to, limit)
        return [to_event(r) for r in rows]

    async def load(
        self, bot_keys: Iterable[tuple[str, int]], whole_portals: Iterable[str],
        portals: Iterable[str],
    ) -> State:
        """Exactly the state a batch of events may read."""
        state = State(position=self.checkpoint)
        keys = list(bot_keys)
        rows = await self._connection.fetch(
            f"SELECT {', '.join(_columns(Bot))} FROM projections.bots "
            "WHERE (member_id, bot_id) IN (SELECT * FROM unnest($1::text[], $2::bigint[])) "
            "OR member_id = ANY($3::text[])",
            [k[0] for k in keys], [k[1] for k in keys], list(whole_portals),
        )
        for row in rows:
            bot = Bot(**dict(row))
            state.bots[bot.key] = bot
        deleted = [b for b in state.bots.values() if b.last_deletion_position is not None]
        if deleted:
            rows = await self._connection.fetch(
                f"SELECT {', '.join(_columns(Deletion))} FROM projections.deletions "
                "WHERE (position, bot_id) IN (SELECT * FROM unnest($1::bigint[], $2::bigint[]))",
                [b.last_deletion_position for b in deleted], [b.bot_id for b in deleted],
            )
            for row in rows:
                deletion = Deletion(**{**dict(row), "event_hash": bytes(row["event_hash"])})
                state.deletions[deletion.key] = deletion
        rows = await self._connection.fetch(
            f"SELECT {', '.join(_columns(Portal))} FROM projections.portals "
            "WHERE member_id = ANY($1::text[])",
            list(portals),
        )
        for row in rows:
            state.portals[row["member_id"]] = Portal(**dict(row))
        return state

    async def save(self, state: State, position: int) -> None:
        """Write what the fold changed and move the checkpoint, in this transaction."""
        await self._write("bots", [state.bots[k] for k in sorted(state.dirty_bots)])
        await self._write("deletions", [state.deletions[k] for k in sorted(state.dirty_deletions)])
        await self._write("portals", [state.portals[k] for k in sorted(state.dirty_portals)])
        await self._write("portal_lifecycle", state.lifecycle)
        await self._move(position)

    async def load_all(self) -> State:
        """The whole projected state at this batch's checkpoint (for a snapshot)."""
        state = State(position=self.checkpoint)
        for row in await self._connection.fetch(
            f"SELECT {', '.join(_columns(Bot))} FROM projections.bots"
        ):
            bot = Bot(**dict(row))
            state.bots[bot.key] = bot
        for row in await self._connection.fetch(
            f"SELECT {', '.join(_columns(Deletion))} FROM projections.deletions"
        ):
            deletion = Deletion(**{**dict(row), "event_hash": bytes(row["event_hash"])})
            state.deletions[deletion.key] = deletion
        for row in await self._connection.fetch(
            f"SELECT {', '.join(_columns(Portal))} FROM projections.portals"
        ):
            state.portals[row["member_id"]] = Portal(**dict(row))
        state.lifecycle = [
            Lifecycle(**dict(row)) for row in await self._connection.fetch(
                f"SELECT {', '.join(_columns(Lifecycle))} FROM projections.portal_lifecycle "
                "ORDER BY position"
            )
        ]
        return state

    async def save_snapshot(self, blob: bytes) -> None:
        await self._connection.execute(
            "INSERT INTO projections.snapshots (projection, position, state) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING",
            self.name, self.checkpoint, blob,
        )

    async def replace(self, state: State, position: int) -> None:
        """Swap in a whole rebuilt state; readers see the old one until COMMIT.

        Snapshots go too: a rebuild is what one runs after the fold changed.
        """
        await self._connection.execute(
            "TRUNCATE projections.bots, projections.deletions, projections.portals, "
            "projections.portal_lifecycle"
        )
        await self._connection.execute(
            "DELETE FROM projections.snapshots WHERE projection = $1", self.name
        )
        for table, rows in (
            ("bots", sorted(state.bots.values(), key=lambda b: b.key)),
            ("deletions", sorted(state.deletions.values(), key=lambda d: d.key)),
            ("portals", sorted(state.portals.values(), key=lambda p: p.member_id)),
            ("portal_lifecycle", state.lifecycle),
        ):
            if rows:
                await self._connection.copy_records_to_table(
                    table, schema_name="projections", records=[_values(r) for r in rows],
                    columns=[f.name for f in dataclasses.fields(rows[0])],
                )
        await self._move(position)

    async def _write(self, table: str, rows: Sequence[Any]) -> None:
        if rows:
            await self._connection.executemany(_UPSERTS[table], [_values(r) for r in rows])

    async def _move(self, position: int) -> None:
        await self._connection.execute(
            "UPDATE projections.checkpoints SET position = $2, updated_at = now() "
            "WHERE projection = $1",
            self.name, position,
        )
        self.checkpoint = position


class ProjectionStore:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def batch(self, name: str) -> AsyncIterator[ProjectionBatch]:
        async with (
            translated_errors(f"project {name}"),
            self._pool.acquire() as connection,
            connection.transaction(),
        ):
            position = await connection.fetchval(
                "SELECT position FROM projections.checkpoints WHERE projection = $1 FOR UPDATE",
                name,
            )
            yield ProjectionBatch(connection, name, int(position))

    async def checkpoint(self, name: str) -> int:
        async with translated_errors("read checkpoint"), self._pool.acquire() as connection:
            value = await connection.fetchval(
                "SELECT position FROM projections.checkpoints WHERE projection = $1", name
            )
        return int(value)

    async def snapshot_before(self, name: str, position: int) -> tuple[int, bytes] | None:
        """The latest saved fold state at or before `position`."""
        async with translated_errors("read snapshot"), self._pool.acquire() as connection:
            row = await connection.fetchrow(
                "SELECT position, state FROM projections.snapshots "
                "WHERE projection = $1 AND position <= $2 ORDER BY position DESC LIMIT 1",
                name, position,
            )
        return (int(row["position"]), bytes(row["state"])) if row else None

    async def latest_snapshot(self, name: str) -> int:
        async with translated_errors("read snapshot"), self._pool.acquire() as connection:
            value = await connection.fetchval(
                "SELECT max(position) FROM projections.snapshots WHERE projection = $1", name
            )
        return int(value or 0)

    async def stream_events(
        self, up_to: int, batch: int = 2000, after: int = 0
    ) -> AsyncIterator[list[StoredEvent]]:
        """Events after..up_to in order, through a cursor in one read-only snapshot."""
        async with (
            translated_errors("read events"),
            self._pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            cursor = await connection.cursor(
                f"SELECT {_EVENT_COLUMNS} FROM ledger.events WHERE position > $2 "
                "AND position <= $1 ORDER BY position",
                up_to, after,
            )
            while rows := await cursor.fetch(batch):
                yield [to_event(r) for r in rows]

    async def position_at(self, moment: datetime) -> int:
        """The last position the ledger had received by `moment` (0 before the first event)."""
        async with translated_errors("find position"), self._pool.acquire() as connection:
            value = await connection.fetchval(
                "SELECT position FROM ledger.events WHERE received_at <= $1 "
                "ORDER BY received_at DESC LIMIT 1",
                moment,
            )
        return int(value or 0)

    async def bots(self, *, member_id: str | None, status: str | None) -> list[Bot]:
        async with translated_errors("read bots"), self._pool.acquire() as connection:
            rows = await connection.fetch(
                f"SELECT {', '.join(_columns(Bot))} FROM projections.bots "
                "WHERE ($1::text IS NULL OR member_id = $1) AND ($2::text IS NULL OR status = $2) "
                "ORDER BY member_id, bot_id",
                member_id, status,
            )
        return [Bot(**dict(r)) for r in rows]

    async def deletions(self, *, member_id: str | None) -> list[Deletion]:
        async with translated_errors("read deletions"), self._pool.acquire() as connection:
            rows = await connection.fetch(
                f"SELECT {', '.join(_columns(Deletion))} FROM projections.deletions "
                "WHERE ($1::text IS NULL OR member_id = $1) ORDER BY position, bot_id",
                member_id,
            )
        return [Deletion(**{**dict(r), "event_hash": bytes(r["event_hash"])}) for r in rows]

    async def portals(self) -> list[Portal]:
        async with translated_errors("read portals"), self._pool.acquire() as connection:
            rows = await connection.fetch(
                f"SELECT {', '.join(_columns(Portal))} FROM projections.portals "
                "ORDER BY member_id"
            )
        return [Portal(**dict(r)) for r in rows]

