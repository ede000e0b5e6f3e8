"""SQL of the projections: reading events to fold, loading and saving projection rows, reads.

Every statement names its columns (`COLUMNS`, written against the migrations, checked against
the database by a test); rows cross this boundary as plain mappings keyed by those names, so the
fold's types (`ledger.projections`) are not known here.

The projector's batch — events, row changes, the checkpoint and the chain head it reached —
commits in one transaction, with the checkpoint row locked so that two projectors (two
`ledger serve` processes) never interleave.
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, NamedTuple

from ledger.storage.store import Connection, Pool, translated_errors

Row = Mapping[str, Any]

# what the fold reads of an event, by index in this order: its fold record (migration 0011), not
# its payload — which comes along (index 9) only for rows stored without a record; a row whose
# record the caller cannot use (another version, not a record) gets it from `payloads`
FOLD_COLUMNS = (
    "position", "member_id", "event_type", "origin", "bot_ids", "occurred_at", "received_at",
    "hash", "fold_record",
)
EVENT_COLUMNS = (*FOLD_COLUMNS, "payload")
_FOLD_SELECT = ", ".join(FOLD_COLUMNS) + ", CASE WHEN fold_record IS NULL THEN payload END"
# a row to fold: `EVENT_COLUMNS` by index (asyncpg's records, passed on as the driver made them:
# a rebuild reads millions, and a named lookup or a copy per row is most of its cost)
EventRow = Sequence[Any]

COLUMNS: dict[str, tuple[str, ...]] = {
    "bots": (
        "member_id", "bot_id", "bot_code", "api_version", "status", "first_seen_position",
        "first_seen_at", "last_activity_position", "last_activity_at", "message_count",
        "command_count", "chat_join_count", "deleted_position", "deleted_at", "deleted_by",
        "deletion_cause", "code_position", "last_deletion_position",
    ),
    "deletions": (
        "position", "bot_id", "member_id", "domain", "bot_code", "occurred_at", "received_at",
        "actor_user_id", "cause", "event_type", "event_hash", "first_seen_at",
        "last_activity_at", "message_count", "never_seen", "repeated",
        "activity_after_deletion", "activity_after_position", "payload_anomalies",
    ),
    "portals": (
        "member_id", "domain", "trust_state", "trust_position", "installed_at",
        "installed_position", "uninstalled_at", "uninstalled_position", "install_count",
        "app_version", "event_count", "first_event_position", "last_event_at",
        "last_event_position",
    ),
    "portal_lifecycle": (
        "position", "member_id", "event_type", "occurred_at", "received_at", "version",
        "actor_user_id",
    ),
    "anomalies": ("position", "member_id", "event_type", "bot_ids", "notes"),
}
KEYS: dict[str, tuple[str, ...]] = {
    "bots": ("member_id", "bot_id"),
    "deletions": ("position", "bot_id"),
    "portals": ("member_id",),
    "portal_lifecycle": ("position",),
    "anomalies": ("position",),
}
TABLES = tuple(COLUMNS)


def _select(table: str, where: str = "") -> str:
    order = ", ".join(KEYS[table])
    return (f"SELECT {', '.join(COLUMNS[table])} FROM projections.{table} {where} "
            f"ORDER BY {order}")


def _upsert(table: str) -> str:
    """One statement for all of a batch's rows of `table`: an array of the table's own row
    type (`COLUMNS` is its column order, checked by a test), unnested — PostgreSQL plans and
    runs it once, where a statement per row costs a bind and an execution each."""
    columns, key = ", ".join(COLUMNS[table]), KEYS[table]
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS[table] if c not in key)
    return (
        f"INSERT INTO projections.{table} ({columns}) "
        f"SELECT {columns} FROM unnest($1::projections.{table}[]) "
        f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}"
    )


_UPSERTS = {table: _upsert(table) for table in TABLES}
_EVENTS_AFTER = f"""
    SELECT {_FOLD_SELECT} FROM ledger.events
    WHERE position > $1 AND position <= $2 ORDER BY position LIMIT $3
"""
_EVENTS_UP_TO = f"""
    SELECT {_FOLD_SELECT} FROM ledger.events WHERE position > $2
    AND position <= $1 ORDER BY position
"""
# "as of" a time: the positions of every event at that time or before, after `$2` (the
# snapshot's position), in position order. Such an event may be anywhere after $2 (a spooled
# delivery keeps its received time, a sender's `ts` may be early), so no position bounds the
# read; instead both time indexes hold the position after the time (migration 0015), and the
# positions come from the index alone, `time <= $1 AND position > $2` decided there — the
# rows then read (`_EVENTS_AT`) are the rows folded, not every row up to $1 nor every row
# from $2 to the head. The inner order is the index's own, so that it is what is walked: left
# to itself the planner takes the two conditions for independent (while received time and
# position run nearly together, and few rows meet both) and often reads from $2 to the head.
_POSITIONS_BY = """
    SELECT position FROM (
        SELECT position FROM ledger.events WHERE {time} <= $1 AND position > $2
        ORDER BY {time}, position OFFSET 0
    ) chosen ORDER BY position
"""
_POSITIONS_RECEIVED_BY = _POSITIONS_BY.format(time="received_at")
# by Bitrix24 time, never later than the received time (`ts` is the sender's; `least` skips a
# NULL `ts`): index `events_by_effective_time`, migrations 0014 and 0015
_POSITIONS_OCCURRED_BY = _POSITIONS_BY.format(time="least(occurred_at, received_at)")
_EVENTS_AT = f"""
    SELECT {_FOLD_SELECT} FROM ledger.events WHERE position = ANY($1::bigint[])
    ORDER BY position
"""
# The latest such time a snapshot holds. Saved before 0014 it has none: then the least of its
# latest Bitrix24 (coalesce) and received times, each an upper bound of it.
_SNAPSHOT_EFFECTIVE = "coalesce(max_effective_at, least(max_occurred_at, max_received_at))"


class SavedSnapshot(NamedTuple):
    """A saved fold state and the latest received and Bitrix24 (`least(occurred_at,
    received_at)`) times it claims to hold; NULL where it was saved without them."""

    position: int
    state: bytes
    max_received_at: datetime | None
    max_effective_at: datetime | None

# the bots named, one index lookup each (a join or `IN` is planned as a scan of every bot of
# the registry, each batch; LIMIT 1 — it is the key — keeps the planner from making it one),
# and every bot of the portals named (a bot both name comes twice: the same row); the same
# for the deletions
_BOT_COLUMNS = ", ".join(f"b.{c}" for c in COLUMNS["bots"])
_LOAD_BOTS = (
    f"SELECT {_BOT_COLUMNS} FROM unnest($1::text[], $2::bigint[]) AS k(member_id, bot_id) "
    "CROSS JOIN LATERAL (SELECT * FROM projections.bots b WHERE b.member_id = k.member_id "
    f"AND b.bot_id = k.bot_id LIMIT 1) b UNION ALL SELECT {_BOT_COLUMNS} FROM projections.bots b "
    "WHERE b.member_id = ANY($3::text[])"
)
_LOAD_DELETIONS = (
    f"SELECT {', '.join(f'd.{c}' for c in COLUMNS['deletions'])} "
    "FROM unnest($1::bigint[], $2::bigint[]) AS k(position, bot_id) "
    "CROSS JOIN LATERAL (SELECT * FROM projections.deletions d WHERE d.position = k.position "
    "AND d.bot_id = k.bot_id LIMIT 1) d"
)
_PAYLOADS = "SELECT position, payload FROM ledger.events WHERE position = ANY($1::bigint[])"


# a row's values in `COLUMNS` order, in one C call (a rebuild writes every bot and deletion)
_GETTERS = {table: operator.itemgetter(*columns) for table, columns in COLUMNS.items()}


def _values(table: str, row: Row) -> tuple[Any, ...]:
    values: tuple[Any, ...] = _GETTERS[table](row)
    return values


def _plain(record: Any) -> dict[str, Any]:
    row = dict(record)
    for name, value in row.items():
        if isinstance(value, memoryview):
            row[name] = bytes(value)
    return row


async def _payloads(connection: Connection, positions: Sequence[int]) -> dict[int, Any]:
    return {r[0]: r[1] for r in await connection.fetch(_PAYLOADS, list(positions))}


class _RowsAt:
    """A cursor of positions as a cursor of the rows at them (`EventStream` fetches from it)."""

    def __init__(self, connection: Connection, positions: Any) -> None:
        self._connection = connection
        self._positions = positions

    async def fetch(self, size: int) -> Sequence[EventRow]:
        positions = [r[0] for r in await self._positions.fetch(size)]
        if not positions:
            return []
        rows: Sequence[EventRow] = await self._connection.fetch(_EVENTS_AT, positions)
        return rows


class EventStream:
    """Rows to fold (`EventRow`), in batches, in position order, from one transaction.

    The next batch is asked for as soon as one is handed out, so that PostgreSQL reads it while
    the caller folds this one; `payloads` waits for that read first (a connection runs one
    statement at a time)."""

    def __init__(self, connection: Connection, cursor: Any, size: int) -> None:
        self._connection = connection
        self._cursor = cursor
        self._size = size
        self._ahead: asyncio.Future[Any] | None = None
        self._done = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Sequence[EventRow]:
        if self._done:
            raise StopAsyncIteration
        if self._ahead is None:
            self._ahead = asyncio.ensure_future(self._cursor.fetch(self._size))
        rows: Sequence[EventRow] = await self._ahead
        if len(rows) < self._size:
            self._done, self._ahead = True, None
            if not rows:
                raise StopAsyncIteration
            return rows
        self._ahead = asyncio.ensure_future(self._cursor.fetch(self._size))
        await asyncio.sleep(0)  # let it send the request before the caller folds for a while
        return rows

    async def payloads(self, positions: Sequence[int]) -> dict[int, Any]:
        """The payloads (JSON text) of these events, in this stream's snapshot."""
        await self.settle()
        return await _payloads(self._connection, positions)

    async def settle(self) -> None:
        """Until no read is in flight (before the connection is used again or given back)."""
        if self._ahead is not None and not self._ahead.done():
            await asyncio.wait([self._ahead])

    async def close(self) -> None:
        """Settle, and drop a read nobody will take (its failure included)."""
        await self.settle()
        ahead, self._ahead, self._done = self._ahead, None, True
        if ahead is not None and not ahead.cancelled():
            ahead.exception()  # retrieved: the caller stopped early, the transaction ends anyway


class ProjectionBatch:
    """One locked projector transaction."""

    def __init__(self, connection: Connection, name: str, checkpoint: int, head: int) -> None:
        self._connection = connection
        self.name = name
        self.checkpoint = checkpoint
        self.head = head  # of the event stream, read as the checkpoint was locked

    async def events(self, up_to: int, limit: int) -> Sequence[EventRow]:
        """The events after the checkpoint up to `up_to` (at most `limit`)."""
        rows: Sequence[EventRow] = await self._connection.fetch(
            _EVENTS_AFTER, self.checkpoint, up_to, limit)
        return rows

    async def payloads(self, positions: Sequence[int]) -> dict[int, Any]:
        """The payloads (JSON text) of these events."""
        return await _payloads(self._connection, positions)

    async def load(
        self, bot_keys: Iterable[tuple[str, int]], whole_portals: Iterable[str],
        portals: Iterable[str],
    ) -> dict[str, Sequence[Row]]:
        """Exactly the rows a batch of events may read: the bots named (and all bots of
        `whole_portals`), the latest deletion row of each of them, and the portals."""
        keys = list(bot_keys)
        bots = [_plain(r) for r in await self._connection.fetch(
            _LOAD_BOTS, [k[0] for k in keys], [k[1] for k in keys], list(whole_portals),
        )]
        deleted = [b for b in bots if b["last_deletion_position"] is not None]
        deletions = [_plain(r) for r in await self._connection.fetch(
            _LOAD_DELETIONS,
            [b["last_deletion_position"] for b in deleted], [b["bot_id"] for b in deleted],
        )] if deleted else []
        portal_rows = [_plain(r) for r in await self._connection.fetch(
            _select("portals", "WHERE member_id = ANY($1::text[])"), list(portals)
        )]
        return {"bots": bots, "deletions": deletions, "portals": portal_rows}

    async def load_all(self) -> dict[str, list[Row]]:
        """Every projection row at this batch's checkpoint (for a snapshot)."""
        return {table: [_plain(r) for r in await self._connection.fetch(_select(table))]
                for table in TABLES}

    async def save(self, rows: Mapping[str, Sequence[Row]], position: int, head: bytes) -> None:
        """Upsert the changed rows and move the checkpoint to `position` (whose chain hash is
        `head`), in this transaction."""
        for table in TABLES:
            if rows.get(table):
                await self._connection.execute(
                    _UPSERTS[table], [_values(table, r) for r in rows[table]]
                )
        await self._move(position, head)

    async def save_snapshot(self, blob: bytes) -> None:
        """Store the fold state at this checkpoint, with the latest received time and
        Bitrix24 time folded into it (so a time query knows whether it may start here).

        The Bitrix24 time a `ts:` question goes by is `least(occurred_at, received_at)`: the
        latest of those is bounded by the ledger's clock, whatever `ts` a sender wrote. It is
        carried on from the previous snapshot as the reader bounds it, so a year-9999 `ts`
        counted into a snapshot saved before migration 0014 does not come back."""
        await self._connection.execute(
            f"""
            INSERT INTO projections.snapshots
                (projection, position, state, max_received_at, max_occurred_at, max_effective_at)
            SELECT $1, $2, $3, greatest(max(received_at), (
                       SELECT max_received_at FROM projections.snapshots
                       WHERE projection = $1 AND position = $4)),
                   greatest(max(coalesce(occurred_at, received_at)), (
                       SELECT max_occurred_at FROM projections.snapshots
                       WHERE projection = $1 AND position = $4)),
                   greatest(max(least(occurred_at, received_at)), (
                       SELECT {_SNAPSHOT_EFFECTIVE} FROM projections.snapshots
                       WHERE projection = $1 AND position = $4))
            FROM ledger.events WHERE position > $4 AND position <= $2
            ON CONFLICT DO NOTHING
            """,
            self.name, self.checkpoint, blob, await self._latest_snapshot(),
        )

    async def _latest_snapshot(self) -> int:
        value = await self._connection.fetchval(
            "SELECT max(position) FROM projections.snapshots WHERE projection = $1 "
            "AND max_received_at IS NOT NULL", self.name,
        )
        return int(value or 0)

    async def replace(self, rows: Mapping[str, Sequence[Row]], position: int, head: bytes) -> None:
        """Swap in a whole rebuilt state; readers see the old one until COMMIT.

        Snapshots go too: a rebuild is what one runs after the fold changed.
        """
        await self._connection.execute(
            "TRUNCATE " + ", ".join(f"projections.{t}" for t in TABLES)
        )
        await self._connection.execute(
            "DELETE FROM projections.snapshots WHERE projection = $1", self.name
        )
        for table in TABLES:
            if rows.get(table):
                await self._connection.copy_records_to_table(
                    table, schema_name="projections", columns=list(COLUMNS[table]),
                    records=[_values(table, r) for r in rows[table]],
                )
        await self._move(position, head)

    async def _move(self, position: int, head: bytes) -> None:
        await self._connection.execute(
            "UPDATE projections.checkpoints SET position = $2, head_hash = $3, "
            "updated_at = now() WHERE projection = $1",
            self.name, position, head,
        )
        self.checkpoint = position


class ProjectionSnapshot:
    """One read-only, repeatable-read view of the store and the projections together (for
    `ledger verify --projections`, and listings read a page at a time): what it reads was all
    committed at one instant."""

    def __init__(self, connection: Connection, name: str) -> None:
        self._connection = connection
        self._name = name

    async def checkpoint(self) -> tuple[int, bytes]:
        row = await self._connection.fetchrow(
            "SELECT position, head_hash FROM projections.checkpoints WHERE projection = $1",
            self._name,
        )
        assert row is not None
        return int(row["position"]), bytes(row["head_hash"])

    async def head(self) -> int:
        return int(await self._connection.fetchval(
            "SELECT position FROM ledger.stream_heads WHERE stream = 'events'"
        ))

    async def page(
        self, table: str, *, after: tuple[Any, ...] | None, limit: int,
        where: Mapping[str, Any] | None = None,
    ) -> list[Row]:
        """`ProjectionStore.page`, in this view: a listing read a page at a time is one set,
        not rows of several moments (the projector commits between pages)."""
        return await _page(self._connection, table, after, limit, where or {})

    async def deletion_page(self, **filters: Any) -> list[Row]:
        return await _deletion_page(self._connection, **filters)

    async def event_hash(self, position: int) -> bytes:
        value = await self._connection.fetchval(
            "SELECT hash FROM ledger.events WHERE position = $1", position
        )
        return bytes(value) if value is not None else bytes(32)

    async def events(self, up_to: int, batch: int = 2000) -> AsyncIterator[list[Row]]:
        cursor = await self._connection.cursor(
            f"SELECT {', '.join(EVENT_COLUMNS)} FROM ledger.events WHERE position <= $1 "
            "ORDER BY position", up_to,
        )
        while rows := await cursor.fetch(batch):
            yield [_plain(r) for r in rows]

    async def rows(self, table: str) -> list[Row]:
        return [_plain(r) for r in await self._connection.fetch(_select(table))]

    async def portal_trust(self) -> list[Row]:
        return [_plain(r) for r in await self._connection.fetch(
            "SELECT member_id, domain, state, token_sha256, changed_at, changed_position "
            "FROM ledger.portal_trust ORDER BY member_id"
        )]

    async def open_allowances(self) -> list[Row]:
        """Allowances no install has used yet (what the next install may consume)."""
        return [_plain(r) for r in await self._connection.fetch(
            "SELECT position, member_id, domain FROM ledger.portal_allowances "
            "WHERE consumed_position IS NULL ORDER BY position"
        )]

    async def snapshots(self) -> list[SavedSnapshot]:
        """The saved fold states (compressed), in position order, with the times a time
        question decides by whether it may start from them (`snapshot_by_time`)."""
        return [
            SavedSnapshot(int(r["position"]), bytes(r["state"]), r["max_received_at"],
                          r["effective"])
            for r in await self._connection.fetch(
                f"SELECT position, state, max_received_at, {_SNAPSHOT_EFFECTIVE} AS effective "
                "FROM projections.snapshots WHERE projection = $1 ORDER BY position", self._name,
            )
        ]


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
            row = await connection.fetchrow(
                "SELECT c.position, h.position FROM projections.checkpoints c "
                "CROSS JOIN ledger.stream_heads h WHERE c.projection = $1 AND h.stream = 'events' "
                "FOR UPDATE OF c",
                name,
            )
            assert row is not None
            yield ProjectionBatch(connection, name, int(row[0]), int(row[1]))

    @asynccontextmanager
    async def snapshot(self, name: str) -> AsyncIterator[ProjectionSnapshot]:
        async with (
            translated_errors(f"read {name}"),
            self._pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            yield ProjectionSnapshot(connection, name)

    async def progress(self, name: str) -> Row:
        """How far the projection is behind, from the database alone (the projector runs in
        another process): `checkpoint`, `head`, `idle_seconds` since the checkpoint last moved,
        and `waiting_seconds` since the oldest event not yet folded was received (None: none)."""
        async with translated_errors("read projection progress"), \
                self._pool.acquire() as connection:
            row = await connection.fetchrow(
                "SELECT c.position AS checkpoint, h.position AS head, "
                "extract(epoch FROM now() - c.updated_at)::float8 AS idle_seconds, "
                "extract(epoch FROM now() - e.received_at)::float8 AS waiting_seconds "
                "FROM projections.checkpoints c "
                "CROSS JOIN ledger.stream_heads h "
                "LEFT JOIN ledger.events e ON e.position = c.position + 1 "
                "WHERE c.projection = $1 AND h.stream = 'events'",
                name,
            )
        assert row is not None
        return dict(row)

    async def checkpoint(self, name: str) -> Row:
        """How far the projection is folded: position, the chain hash there, and when."""
        async with translated_errors("read checkpoint"), self._pool.acquire() as connection:
            row = await connection.fetchrow(
                "SELECT projection, position, encode(head_hash, 'hex') AS head_hash, updated_at "
                "FROM projections.checkpoints WHERE projection = $1",
                name,
            )
        assert row is not None
        return dict(row)

    async def snapshot_before(self, name: str, position: int) -> tuple[int, bytes] | None:
        """The latest saved fold state at or before `position`."""
        async with translated_errors("read snapshot"), self._pool.acquire() as connection:
            row = await connection.fetchrow(
                "SELECT position, state FROM projections.snapshots "
                "WHERE projection = $1 AND position <= $2 ORDER BY position DESC LIMIT 1",
                name, position,
            )
        return (int(row["position"]), bytes(row["state"])) if row else None

    async def snapshot_by_time(
        self, name: str, moment: datetime, *, occurred: bool
    ) -> tuple[int, bytes] | None:
        """The latest saved fold state holding nothing later than `moment` (received time,
        or Bitrix24 time — never later than received — when `occurred`): folding on from it
        loses nothing."""
        column = _SNAPSHOT_EFFECTIVE if occurred else "max_received_at"
        async with translated_errors("read snapshot"), self._pool.acquire() as connection:
            row = await connection.fetchrow(
                f"SELECT position, state FROM projections.snapshots "
                f"WHERE projection = $1 AND {column} <= $2 ORDER BY position DESC LIMIT 1",
                name, moment,
            )
        return (int(row["position"]), bytes(row["state"])) if row else None

    async def latest_snapshot(self, name: str) -> int:
        async with translated_errors("read snapshot"), self._pool.acquire() as connection:
            value = await connection.fetchval(
                "SELECT max(position) FROM projections.snapshots WHERE projection = $1", name
            )
        return int(value or 0)

    @asynccontextmanager
    async def stream_events(
        self, up_to: int, *, after: int = 0, batch: int = 2000
    ) -> AsyncIterator[EventStream]:
        """Events after..up_to in order, through a cursor in one read-only snapshot."""
        async with self._stream(_EVENTS_UP_TO, (up_to, after), batch) as stream:
            yield stream

    @asynccontextmanager
    async def stream_events_by_time(
        self, moment: datetime, *, occurred: bool, after: int = 0, batch: int = 2000,
    ) -> AsyncIterator[EventStream]:
        """Every event received (or, `occurred`, that happened — by its `ts`, but never later
        than its received time) at `moment` or before, after position `after`, in position
        order — whatever order the times are in (spooled deliveries keep their received time
        but get later positions)."""
        query = _POSITIONS_OCCURRED_BY if occurred else _POSITIONS_RECEIVED_BY
        async with self._stream(query, (moment, after), batch, by_positions=True) as stream:
            yield stream

    @asynccontextmanager
    async def _stream(
        self, query: str, args: tuple[Any, ...], batch: int, *, by_positions: bool = False,
    ) -> AsyncIterator[EventStream]:
        """`query`'s rows through a cursor; `by_positions`: it selects positions, and the rows
        at them are read a batch at a time."""
        async with (
            translated_errors("read events"),
            self._pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            cursor: Any = await connection.cursor(query, *args)
            if by_positions:
                cursor = _RowsAt(connection, cursor)
            stream = EventStream(connection, cursor, batch)
            try:
                yield stream
            finally:
                await stream.close()

    async def rows(self, table: str, **where: Any) -> list[Row]:
        """Rows of one projection table, in key order, filtered by equality on columns."""
        clauses: list[str] = []
        args: list[Any] = []
        _equal(table, where, clauses, args)
        condition = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        async with translated_errors(f"read {table}"), self._pool.acquire() as connection:
            records = await connection.fetch(_select(table, condition), *args)
        return [_plain(r) for r in records]

    async def page(
        self, table: str, *, after: tuple[Any, ...] | None, limit: int,
        where: Mapping[str, Any] | None = None,
    ) -> list[Row]:
        """At most `limit` rows of a projection table in key order, after the key `after`
        (a keyset page: one index range, however large the table), filtered by equality on
        columns (None: any). Pages meant to be one set are read in one `snapshot`."""
        async with translated_errors(f"read {table}"), self._pool.acquire() as connection:
            return await _page(connection, table, after, limit, where or {})

    async def deletion_page(self, **filters: Any) -> list[Row]:
        """A keyset page of the deletion timeline (`_deletion_page`)."""
        async with translated_errors("read deletions"), self._pool.acquire() as connection:
            return await _deletion_page(connection, **filters)

    async def anomalies_at(self, positions: Sequence[int]) -> dict[int, list[str]]:
        async with translated_errors("read anomalies"), self._pool.acquire() as connection:
            records = await connection.fetch(
                "SELECT position, notes FROM projections.anomalies "
                "WHERE position = ANY($1::bigint[])", list(positions),
            )
        return {int(r["position"]): list(r["notes"]) for r in records}


def _equal(table: str, where: Mapping[str, Any], clauses: list[str], args: list[Any]) -> None:
    """Equality filters on known columns (None: any), numbered after the arguments so far —
    column names never come from a request."""
    for column, value in where.items():
        if value is None:
            continue
        if column not in COLUMNS[table]:
            raise ValueError(f"projections.{table} has no column {column}")
        args.append(value)
        clauses.append(f"{column} = ${len(args)}")


async def _page(
    connection: Connection, table: str, after: tuple[Any, ...] | None, limit: int,
    where: Mapping[str, Any], conditions: Sequence[str] = (), condition_args: Sequence[Any] = (),
) -> list[Row]:
    """A keyset page (`ProjectionStore.page`); `conditions`: this module's own SQL, over
    `condition_args` numbered from $1."""
    clauses = list(conditions)
    args = list(condition_args)
    _equal(table, where, clauses, args)
    key = KEYS[table]
    if after is not None:
        if len(after) != len(key):
            raise ValueError(f"projections.{table} is keyed by {', '.join(key)}")
        marks = []
        for value in after:
            args.append(value)
            marks.append(f"${len(args)}")
        clauses.append(f"({', '.join(key)}) > ({', '.join(marks)})")
    args.append(limit)
    condition = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    records = await connection.fetch(_select(table, condition) + f" LIMIT ${len(args)}", *args)
    return [_plain(r) for r in records]


async def _deletion_page(
    connection: Connection, *, after: tuple[int, int] | None, limit: int,
    member_id: str | None = None, occurred_from: datetime | None = None,
    occurred_to: datetime | None = None, actor_user_id: str | None = None,
    cause: str | None = None, anomalies_only: bool = False,
) -> list[Row]:
    """A keyset page of the deletion timeline (position, bot_id), filtered as the read API's
    `DeletionFilter` filters the folded rows: by Bitrix24 time, never later than the received
    time (`readers.deletion_time`; `least` skips a NULL `occurred_at`)."""
    conditions: list[str] = []
    args: list[Any] = []
    for clause, value in (
        ("least(occurred_at, received_at) >= ${}", occurred_from),
        ("least(occurred_at, received_at) < ${}", occurred_to),
    ):
        if value is not None:
            args.append(value)
            conditions.append(clause.format(len(args)))
    if anomalies_only:
        conditions.append("(never_seen OR repeated OR activity_after_deletion "
                          "OR cardinality(payload_anomalies) > 0)")
    return await _page(connection, "deletions", after, limit,
                       {"member_id": member_id, "actor_user_id": actor_user_id, "cause": cause},
                       conditions, args)
