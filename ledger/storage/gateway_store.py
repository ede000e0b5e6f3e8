"""SQL of gateway mode: the route events a forwarder folds, and the record of forward attempts.

Attempts never carry a body (nor anything from it but the portal and the event's identity).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg
import orjson

from ledger.errors import DatabaseUnavailable
from ledger.storage.store import Pool, translated_errors

_ROUTE_EVENTS = """
    SELECT position, received_at, payload FROM ledger.events
    WHERE event_type = $1 AND origin = 'operator' AND position > $2 ORDER BY position
"""
_ATTEMPTS = """
    SELECT id, route_id, portal_member_id, position, event_type, event_hash, spool_id, attempt,
           outcome, status, error, latency_ms, accepted_at, attempted_at
    FROM audit.forwards
    WHERE ($1::text IS NULL OR route_id = $1)
      AND ($2::bigint IS NULL OR position = $2)
      AND ($3::text IS NULL OR outcome = $3)
    ORDER BY id DESC LIMIT $4
"""

# which deliveries written ahead of their commit are stored (position, chain hash), and the
# routes a forward of each was already settled to (delivered or given up) by any record
_STORED = """
    SELECT k.member_id, k.dedup_key, e.position, e.hash,
           ARRAY(SELECT DISTINCT a.route_id FROM ledger.forward_attempts a
                 WHERE a.member_id = k.member_id AND a.dedup_key = k.dedup_key
                   AND a.outcome <> 'failed') AS settled
    FROM unnest($1::text[], $2::bytea[]) AS k(member_id, dedup_key)
    JOIN ledger.events e ON e.member_id = k.member_id AND e.dedup_key = k.dedup_key
"""


class StoredEvent(NamedTuple):
    position: int
    event_hash: bytes
    settled: frozenset[str]  # routes a forward of it was delivered or given up to


# of these forwards (portal, dedup keys), the ones already recorded as given up for `reason`
_GIVEN_UP = """
    SELECT DISTINCT dedup_key FROM ledger.forward_attempts
    WHERE member_id = $1 AND dedup_key = ANY($2::bytea[]) AND outcome = 'given_up'
      AND error = $3
"""


class AttemptRecord(NamedTuple):
    """One attempt (or the giving up) to forward one event to one route: a row of
    `ledger.forward_attempts`, fields named and ordered as its columns (a tuple: one is made
    per forward, and COPY writes it as it is)."""

    route_id: str
    member_id: str
    position: int | None
    dedup_key: bytes
    attempt: int
    outcome: str  # delivered, failed, given_up
    status: int | None
    error: str | None
    latency_ms: float | None
    accepted_at: datetime
    attempted_at: datetime


_ATTEMPT_COLUMNS = AttemptRecord._fields  # the table's columns, as a record holds them
# SQLSTATE classes that are a record's own fault (data exception, integrity violation)
_DATA_CLASSES = ("22", "23")


class GatewayStore:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def route_events(
        self, event_type: str, after: int
    ) -> list[tuple[int, datetime, dict[str, Any]]]:
        """Route changes after a position, in position order (positions are gap-free and
        commit-ordered, so `after` is a safe cursor)."""
        async with translated_errors("read routes"), self._pool.acquire() as connection:
            rows = await connection.fetch(_ROUTE_EVENTS, event_type, after)
        return [(r["position"], r["received_at"], orjson.loads(r["payload"])) for r in rows]

    async def record_attempts(self, records: list[AttemptRecord]) -> None:
        """One batch, by binary COPY (cheaper than an INSERT of unnested arrays on both sides
        for the forwarder's batches: bench.forwarder)."""
        async with translated_errors("record forward attempts"), self._pool.acquire() as conn:
            try:
                await conn.copy_records_to_table(
                    "forward_attempts", schema_name="ledger", columns=_ATTEMPT_COLUMNS,
                    records=records)
            except asyncpg.PostgresError as exc:
                # anything but the data (out of disk, a read-only primary after a failover, a
                # cancelled statement) refuses every record alike: the forwarder must hold
                # them and try again, not write them one by one and drop each
                task = asyncio.current_task()
                if (exc.sqlstate or "")[:2] in _DATA_CLASSES or (
                        task is not None and task.cancelling()):
                    raise
                raise DatabaseUnavailable(
                    f"record forward attempts: PostgreSQL refuses writes for now "
                    f"({type(exc).__name__}: {exc})") from exc

    async def stored(
        self, identities: list[tuple[str, bytes]]
    ) -> dict[tuple[str, bytes], StoredEvent]:
        """Of these deliveries (portal, dedup key), the ones stored: by the unique index of
        `ledger.events` and that of `ledger.forward_attempts` on the same identity."""
        async with translated_errors("look up deliveries"), self._pool.acquire() as conn:
            rows = await conn.fetch(_STORED, [m for m, _ in identities],
                                    [k for _, k in identities])
        return {(r["member_id"], bytes(r["dedup_key"])): StoredEvent(
            r["position"], bytes(r["hash"]), frozenset(r["settled"])) for r in rows}

    async def given_up(self, member_id: str, dedup_keys: list[bytes], reason: str) -> set[bytes]:
        """Which of these forwards of `member_id` are recorded as given up for `reason`: what a
        run interrupted midway already wrote (by the identity index)."""
        async with translated_errors("read forward attempts"), self._pool.acquire() as conn:
            rows = await conn.fetch(_GIVEN_UP, member_id, dedup_keys, reason)
        return {bytes(r["dedup_key"]) for r in rows}

    async def attempts(
        self, *, route_id: str | None = None, position: int | None = None,
        outcome: str | None = None, limit: int = 100,
    ) -> list[dict[str, Any]]:
        """The newest attempts first, as `audit.forwards` shows them."""
        async with translated_errors("read forward attempts"), self._pool.acquire() as conn:
            rows = await conn.fetch(_ATTEMPTS, route_id, position, outcome, limit)
        return [dict(r) for r in rows]
