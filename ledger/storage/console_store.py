"""SQL behind the auditor's console and the evidence report: paged, keyset-ordered reads.

Every query here returns a bounded page (a LIMIT) found through an index: the registry by its
primary key (member_id, bot_id), the deletion timeline by (position, bot_id), events by position
or by portal (events_by_portal), rejections by position. Nothing here writes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ledger.storage.store import Pool, translated_errors

_EVENT = """
    position, received_at, occurred_at, member_id, event_type, origin, bot_ids,
    payload::json #>> '{auth,user_id}' AS actor_user_id, encode(hash, 'hex') AS hash,
    encode(payload_sha256, 'hex') AS payload_sha256
"""
_BOT = """
    member_id, bot_id, bot_code, api_version, status, first_seen_position, first_seen_at,
    last_activity_position, last_activity_at, message_count, command_count, chat_join_count,
    deleted_position, deleted_at, deleted_by, deletion_cause
"""
_DELETION = """
    position, bot_id, member_id, domain, bot_code, occurred_at, received_at, actor_user_id, cause,
    event_type, encode(event_hash, 'hex') AS event_hash, first_seen_at, last_activity_at,
    message_count, never_seen, repeated, activity_after_deletion, activity_after_position,
    payload_anomalies
"""
# A person's name as the portal's own payloads gave it: v1 events carry data.USER{ID,NAME,…},
# v2 events data.user{id,name,…}. Only the newest `$4` events of the portal before the deleting
# event are searched, so the cost of a lookup is bounded however long the portal's history is.
_NAMED_USER = """
    SELECT position, (payload::json -> 'data' -> 'USER')::jsonb AS v1,
           (payload::json -> 'data' -> 'user')::jsonb AS v2
    FROM (
        SELECT position, payload FROM ledger.events
        WHERE member_id = $1 AND position < $2
        ORDER BY position DESC LIMIT $4
    ) recent
    WHERE payload::json -> 'data' -> 'USER' ->> 'ID' = $3
       OR payload::json -> 'data' -> 'user' ->> 'id' = $3
    ORDER BY position DESC LIMIT 1
"""


class ConsoleStore:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def _fetch(self, action: str, sql: str, *args: Any) -> list[dict[str, Any]]:
        async with translated_errors(action), self._pool.acquire() as connection:
            rows = await connection.fetch(sql, *args)
        return [dict(r) for r in rows]

    # ---- portals -----------------------------------------------------------------------

    async def portals(self, *, after: str, limit: int) -> list[dict[str, Any]]:
        return await self._fetch(
            "read portals",
            "SELECT * FROM projections.portals WHERE member_id > $1 ORDER BY member_id LIMIT $2",
            after, limit,
        )

    async def portal_domains(self, limit: int) -> list[dict[str, Any]]:
        return await self._fetch(
            "read portal domains",
            "SELECT member_id, domain FROM projections.portals ORDER BY domain NULLS LAST, "
            "member_id LIMIT $1", limit,
        )

    async def members_of(self, portal: str) -> list[str]:
        """Portals a reader named by domain (any case) or by member_id."""
        rows = await self._fetch(
            "find portal",
            "SELECT member_id FROM projections.portals WHERE member_id = $1 OR domain = lower($1) "
            "ORDER BY member_id LIMIT 10", portal,
        )
        return [r["member_id"] for r in rows]

    async def domains(self, member_ids: list[str]) -> dict[str, str | None]:
        rows = await self._fetch(
            "read domains",
            "SELECT member_id, domain FROM projections.portals WHERE member_id = ANY($1::text[])",
            member_ids,
        )
        return {r["member_id"]: r["domain"] for r in rows}

    # ---- registry and deletions (live projections) ----------------------------------------

    async def bots(
        self, *, member_id: str | None, status: str | None, after: tuple[str, int], limit: int
    ) -> list[dict[str, Any]]:
        return await self._fetch(
            "read bots",
            f"SELECT {_BOT} FROM projections.bots "
            "WHERE (member_id, bot_id) > ($1, $2) AND ($3::text IS NULL OR member_id = $3) "
            "AND ($4::text IS NULL OR status = $4) ORDER BY member_id, bot_id LIMIT $5",
            after[0], after[1], member_id, status, limit,
        )

    async def deletions(
        self, *, member_id: str | None, before: tuple[int, int] | None, limit: int
    ) -> list[dict[str, Any]]:
        """Newest first."""
        position, bot_id = before if before is not None else (2**63 - 1, 2**63 - 1)
        return await self._fetch(
            "read deletions",
            f"SELECT {_DELETION} FROM projections.deletions "
            "WHERE (position, bot_id) < ($1, $2) AND ($3::text IS NULL OR member_id = $3) "
            "ORDER BY position DESC, bot_id DESC LIMIT $4",
            position, bot_id, member_id, limit,
        )

    async def head(self, stream: str = "events") -> tuple[int, str]:
        """A chain's head now: position and hash (hex)."""
        rows = await self._fetch(
            "read head",
            "SELECT position, encode(hash, 'hex') AS hash FROM ledger.stream_heads "
            "WHERE stream = $1", stream,
        )
        return (int(rows[0]["position"]), str(rows[0]["hash"])) if rows else (0, "0" * 64)

    async def position_at(self, moment: datetime) -> int:
        """The last position the ledger had received by `moment` (0 before the first event)."""
        async with translated_errors("find position"), self._pool.acquire() as connection:
            value = await connection.fetchval(
                "SELECT position FROM ledger.events WHERE received_at <= $1 "
                "ORDER BY received_at DESC LIMIT 1",
                moment,
            )
        return int(value or 0)

    async def projection_checkpoint(self) -> int:
        async with translated_errors("read checkpoint"), self._pool.acquire() as connection:
            position = await connection.fetchval(
                "SELECT position FROM projections.checkpoints WHERE projection = 'registry'"
            )
        return int(position or 0)

    # ---- events --------------------------------------------------------------------------

    async def event(self, position: int) -> dict[str, Any] | None:
        rows = await self._fetch(
            "read event",
            f"SELECT {_EVENT}, payload, metadata FROM ledger.events WHERE position = $1",
            position,
        )
        return rows[0] if rows else None

    async def bot_events(
        self, member_id: str, bot_id: int, *, newest_first: bool, cursor: int | None, limit: int
    ) -> list[dict[str, Any]]:
        """One page of the events naming a bot; `cursor` is the last position already shown."""
        if newest_first:
            sql = ("position < $3 ORDER BY position DESC", cursor or 2**63 - 1)
        else:
            sql = ("position > $3 ORDER BY position", cursor or 0)
        return await self._fetch(
            "read bot events",
            f"SELECT {_EVENT}, payload, metadata FROM ledger.events "
            f"WHERE member_id = $1 AND bot_ids @> ARRAY[$2::bigint] AND {sql[0]} LIMIT $4",
            member_id, bot_id, sql[1], limit,
        )

    async def named_user(
        self, member_id: str, user_id: str, before: int, window: int
    ) -> dict[str, Any] | None:
        rows = await self._fetch(
            "find user name", _NAMED_USER, member_id, before, user_id, window
        )
        return rows[0] if rows else None

    # ---- rejections ----------------------------------------------------------------------

    async def rejections(self, *, before: int | None, limit: int) -> list[dict[str, Any]]:
        """Newest first; never the excerpt (it may hold what a sender should not see again)."""
        return await self._fetch(
            "read rejections",
            "SELECT position, received_at, status, reason, member_id, event_type, body_size, "
            "encode(body_sha256, 'hex') AS body_sha256, encode(hash, 'hex') AS hash "
            "FROM ledger.rejections WHERE position < $1 ORDER BY position DESC LIMIT $2",
            before or 2**63 - 1, limit,
        )

    async def rejection_summary(
        self, received_from: datetime | None, received_to: datetime | None,
        members: list[str] | None,
    ) -> list[dict[str, Any]]:
        """Rejections per reason in a time range (for the report: a full scan of the range)."""
        return await self._fetch(
            "summarise rejections",
            "SELECT reason, status, count(*) AS count, min(received_at) AS first_at, "
            "max(received_at) AS last_at, min(position) AS first_position, "
            "max(position) AS last_position FROM ledger.rejections "
            "WHERE ($1::timestamptz IS NULL OR received_at >= $1) "
            "AND ($2::timestamptz IS NULL OR received_at < $2) "
            "AND ($3::text[] IS NULL OR member_id = ANY($3::text[])) "
            "GROUP BY reason, status ORDER BY count(*) DESC, reason",
            received_from, received_to, members,
        )

    async def rejections_since(self, moment: datetime, cap: int) -> int:
        """How many rejections arrived since `moment`, counting at most `cap` of the newest
        (the log has no time index; positions follow arrival)."""
        async with translated_errors("count rejections"), self._pool.acquire() as connection:
            count = await connection.fetchval(
                "SELECT count(*) FROM (SELECT received_at FROM ledger.rejections "
                "ORDER BY position DESC LIMIT $2) r WHERE received_at >= $1",
                moment, cap,
            )
        return int(count or 0)
