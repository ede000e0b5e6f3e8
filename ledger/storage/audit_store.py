"""SQL behind the read API, the forensic CLI and the exports.

Every query is keyed by position and served by an index (README "Read API"): portal →
events_by_portal, type → events_by_type, bot → events_by_bot (GIN), time → events_by_received_at
(received_at, position).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ledger.errors import NoSuchToken, TokenExists
from ledger.storage.store import Connection, Pool, translated_errors


@dataclass(frozen=True)
class EventFilter:
    member_id: str | None = None
    event_type: str | None = None
    bot_id: int | None = None
    received_from: datetime | None = None
    received_to: datetime | None = None
    after: int = 0
    up_to: int | None = None  # a fixed head, for exports

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = ["position > $1"]
        args: list[Any] = [self.after]
        for clause, value in (
            ("member_id = ${}", self.member_id),
            ("event_type = ${}", self.event_type),
            ("bot_ids @> ARRAY[${}::bigint]", self.bot_id),
            ("received_at >= ${}", self.received_from),
            ("received_at < ${}", self.received_to),
            ("position <= ${}", self.up_to),
        ):
            if value is not None:
                args.append(value)
                clauses.append(clause.format(len(args)))
        return " AND ".join(clauses), args


@dataclass(frozen=True)
class RejectionFilter:
    member_id: str | None = None
    reason: str | None = None
    received_from: datetime | None = None
    received_to: datetime | None = None
    after: int = 0

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = ["position > $1"]
        args: list[Any] = [self.after]
        for clause, value in (
            ("portal_member_id = ${}", self.member_id),
            ("reason = ${}", self.reason),
            ("received_at >= ${}", self.received_from),
            ("received_at < ${}", self.received_to),
        ):
            if value is not None:
                args.append(value)
                clauses.append(clause.format(len(args)))
        return " AND ".join(clauses), args


# audit.rejections (migration 0009) never exposes the excerpt, only its size and hash.
_REJECTION_COLUMNS = """
    position, received_at, status, reason, detail, portal_member_id AS member_id,
    portal_domain AS domain, event_type, peer, content_type, body_size, body_sha256,
    excerpt_chars, excerpt_sha256, rejection_hash AS hash
"""

_EVENT_COLUMNS = """
    position, received_at, occurred_at, member_id, event_type, origin, bot_ids,
    payload::json #>> '{auth,user_id}' AS actor_user_id, encode(hash, 'hex') AS hash
"""


class AuditStore:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    # ---- tokens ------------------------------------------------------------------------

    async def create_token(self, name: str, token_sha256: bytes, by: str) -> None:
        async with translated_errors("create token"), self._pool.acquire() as connection:
            inserted = await connection.fetchval(
                "INSERT INTO ledger.api_tokens (name, token_sha256, created_at, created_by) "
                "VALUES ($1, $2, now(), $3) ON CONFLICT (name) DO NOTHING RETURNING name",
                name, token_sha256, by,
            )
        if inserted is None:
            raise TokenExists(name)

    async def revoke_token(self, name: str, by: str) -> None:
        async with translated_errors("revoke token"), self._pool.acquire() as connection:
            revoked = await connection.fetchval(
                "UPDATE ledger.api_tokens SET revoked_at = now(), revoked_by = $2 "
                "WHERE name = $1 AND revoked_at IS NULL RETURNING name",
                name, by,
            )
        if revoked is None:
            raise NoSuchToken(name)

    async def tokens(self) -> list[dict[str, Any]]:
        async with translated_errors("list tokens"), self._pool.acquire() as connection:
            rows = await connection.fetch(
                "SELECT name, created_at, created_by, revoked_at, revoked_by "
                "FROM ledger.api_tokens ORDER BY created_at"
            )
        return [dict(r) for r in rows]

    async def token_is_live(self, token_sha256: bytes) -> bool:
        async with translated_errors("check token"), self._pool.acquire() as connection:
            found = await connection.fetchval(
                "SELECT 1 FROM ledger.api_tokens WHERE token_sha256 = $1 AND revoked_at IS NULL",
                token_sha256,
            )
        return found is not None

    # ---- events ------------------------------------------------------------------------

    async def events(
        self, where: EventFilter, *, limit: int, with_payload: bool
    ) -> list[dict[str, Any]]:
        clause, args = where.where()
        columns = _EVENT_COLUMNS + (", payload" if with_payload else "")
        args.append(limit)
        async with translated_errors("read events"), self._pool.acquire() as connection:
            rows = await connection.fetch(
                f"SELECT {columns} FROM ledger.events WHERE {clause} "
                f"ORDER BY position LIMIT ${len(args)}",
                *args,
            )
        return [{**r, "bot_ids": list(r["bot_ids"])} for r in rows]

    async def rejections(self, where: RejectionFilter, *, limit: int) -> list[dict[str, Any]]:
        clause, args = where.where()
        args.append(limit)
        async with translated_errors("read rejections"), self._pool.acquire() as connection:
            rows = await connection.fetch(
                f"SELECT {_REJECTION_COLUMNS} FROM audit.rejections WHERE {clause} "
                f"ORDER BY position LIMIT ${len(args)}",
                *args,
            )
        return [dict(r) for r in rows]

    @asynccontextmanager
    async def export_snapshot(self) -> AsyncIterator[ExportSnapshot]:
        """A read-only snapshot: head, and cursors that read in constant memory."""
        async with (
            translated_errors("export"),
            self._pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            head = await connection.fetchrow(
                "SELECT position, encode(hash, 'hex') AS hash FROM ledger.stream_heads "
                "WHERE stream = 'events'"
            )
            assert head is not None
            yield ExportSnapshot(connection, int(head["position"]), str(head["hash"]))

    # ---- verification runs --------------------------------------------------------------

    async def record_verification(
        self, *, stream: str, verified_rows: int, head_position: int, head_hash: bytes,
        checkpoint_position: int | None, problem: str | None,
    ) -> None:
        async with translated_errors("record verification"), self._pool.acquire() as connection:
            await connection.execute(
                "INSERT INTO ledger.verifications (ran_at, stream, verified_rows, head_position, "
                "head_hash, checkpoint_position, ok, problem) "
                "VALUES (now(), $1, $2, $3, $4, $5, $6, $7)",
                stream, verified_rows, head_position, head_hash, checkpoint_position,
                problem is None, problem,
            )

    async def verification_status(self) -> list[dict[str, Any]]:
        async with translated_errors("verification status"), self._pool.acquire() as connection:
            rows = await connection.fetch(
                """
                SELECT h.stream, v.ran_at, v.ok, v.verified_rows, v.problem,
                       v.checkpoint_position, h.position AS head_position,
                       encode(h.hash, 'hex') AS head_hash
                FROM ledger.stream_heads h
                LEFT JOIN LATERAL (
                    SELECT * FROM ledger.verifications v
                    WHERE v.stream = h.stream ORDER BY v.id DESC LIMIT 1
                ) v ON true
                ORDER BY h.stream
                """
            )
        return [dict(r) for r in rows]


class ExportSnapshot:
    def __init__(self, connection: Connection, head_position: int, head_hash: str) -> None:
        self._connection = connection
        self.head_position = head_position
        self.head_hash = head_hash

    async def events(self, where: EventFilter, batch: int = 2000) -> AsyncIterator[list[Any]]:
        clause, args = where.where()
        cursor = await self._connection.cursor(
            f"SELECT {_EVENT_COLUMNS}, payload FROM ledger.events WHERE {clause} "
            "ORDER BY position",
            *args,
        )
        while rows := await cursor.fetch(batch):
            yield rows
