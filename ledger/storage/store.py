"""Every SQL statement the service runs, and the append at the store's serialisation point.

SQL and connection handling only; what a batch becomes is decided by `ledger.planner`. An append
batch is one transaction:
1. lock the `events` stream head (`SELECT … FOR UPDATE`): appends from every process serialise
   here, so positions are gap-free and commit-ordered and the chain has one predecessor;
2. load the facts: the trust of the batch's portals, the open allowances its installs could use,
   and the dedup keys it already holds;
3. plan (`ledger.planner.plan`, pure): judge, de-duplicate, number and chain, in memory;
4. write events, redeliveries and rejections with a handful of set-based statements — the trust
   tables follow from the trust events by a trigger the service role cannot bypass;
5. move the heads and COMMIT (synchronous_commit = on). Only then do callers hear back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import asyncpg
import orjson

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

from ledger.envelope import INSTALL
from ledger.errors import AppendFailed, DatabaseUnavailable
from ledger.hashing import chain_hash, rejection_entry, sha256
from ledger.models import (
    ORIGIN_BITRIX24,
    Draft,
    EventDraft,
    Outcome,
    PortalRow,
    Refusal,
    RejectionDraft,
    RejectionLogged,
)
from ledger.planner import Facts, Head, Plan, PlannedEffect, entry_of, plan
from ledger.settings import TrustPolicy
from ledger.trust import (
    Allowance,
    PortalTrust,
    TrustFacts,
    TrustState,
    effect_of,
    normalise_domain,
    token_accepted_under,
    token_matches,
)

log = logging.getLogger(__name__)

Pool = asyncpg.Pool  # asyncpg's pool type, named once for the layers that pass it around
Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

_LOCK_HEAD = "SELECT position, hash FROM ledger.stream_heads WHERE stream = $1 FOR UPDATE"
_HEAD = "SELECT position, hash FROM ledger.stream_heads WHERE stream = $1"
# Moving the head also wakes projectors everywhere (delivered at COMMIT; a hint, not delivery).
_MOVE_HEAD = """
    WITH moved AS (
        UPDATE ledger.stream_heads SET position = $2, hash = $3 WHERE stream = $1
        RETURNING stream, position
    )
    SELECT pg_notify('ledger_' || stream, position::text) FROM moved
"""
_TRUST_OF = """
    SELECT member_id, domain, state, token_sha256 FROM ledger.portal_trust
    WHERE member_id = ANY($1::text[])
"""
_OPEN_ALLOWANCES = """
    SELECT position, member_id, domain FROM ledger.portal_allowances
    WHERE consumed_position IS NULL AND (member_id = ANY($1::text[]) OR domain = ANY($2::text[]))
"""
_EXISTING = """
    SELECT e.member_id, e.dedup_key, e.position
    FROM unnest($1::text[], $2::bytea[]) AS k(member_id, dedup_key)
    JOIN ledger.events e USING (member_id, dedup_key)
"""
# The trust event a stored event was accepted under: the portal's last one before it, or, for an
# install, the establishment it caused (the follow-up right after it). Trust events are few
# (partial index events_trust_changes); asked only for redeliveries today's trust refuses.
_ACCEPTED_UNDER = """
    SELECT k.position, t.payload
    FROM unnest($1::text[], $2::bigint[]) AS k(member_id, position)
    CROSS JOIN LATERAL (
        SELECT t.payload FROM ledger.events t
        WHERE t.event_type = 'LEDGER.TRUST_CHANGED' AND t.origin <> 'bitrix24'
          AND t.member_id = k.member_id
          AND (t.position < k.position
               OR (t.position = k.position + 1
                   AND t.payload->>'change' = 'established'
                   AND t.payload->>'cause_position' = k.position::text))
        ORDER BY t.position DESC LIMIT 1
    ) t
"""
_INSERT_EVENTS = """
    INSERT INTO ledger.events (position, member_id, event_type, origin, bot_ids, occurred_at,
        received_at, dedup_key, body_sha256, payload, payload_sha256, metadata, prev_hash, hash,
        fold_record)
    SELECT p, m, t, o, b::bigint[], oa, ra, dk, bs, pl::json, ps, md::json, ph, h, fr::json
    FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                $6::timestamptz[], $7::timestamptz[], $8::bytea[], $9::bytea[], $10::text[],
                $11::bytea[], $12::text[], $13::bytea[], $14::bytea[], $15::text[])
        AS r(p, m, t, o, b, oa, ra, dk, bs, pl, ps, md, ph, h, fr)
    ORDER BY p
"""
# A drained draft that is "a duplicate" of the event it itself became (an append that timed out
# but committed, then drained from the spool) is no redelivery: the same arrival is not recorded
# twice. A real redelivery arrives at another time.
_INSERT_REDELIVERIES = """
    INSERT INTO ledger.redeliveries (position, received_at, body_sha256, peer)
    SELECT r.* FROM unnest($1::bigint[], $2::timestamptz[], $3::bytea[], $4::text[])
        AS r(position, received_at, body_sha256, peer)
    WHERE NOT EXISTS (
        SELECT 1 FROM ledger.events e
        WHERE e.position = r.position AND e.received_at = r.received_at
            AND e.body_sha256 IS NOT DISTINCT FROM r.body_sha256
    )
"""
_INSERT_REJECTIONS = """
    INSERT INTO ledger.rejections (position, received_at, status, reason, detail, member_id,
        event_type, peer, content_type, body_size, body_sha256, excerpt, prev_hash, hash)
    SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::smallint[], $4::text[],
        $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::bigint[],
        $11::bytea[], $12::text[], $13::bytea[], $14::bytea[])
"""
_TRUST_ROWS = """
    SELECT member_id, domain, state, token_sha256, changed_at, changed_position
    FROM ledger.portal_trust ORDER BY changed_position
"""
_ALLOWANCE_ROWS = """
    SELECT member_id, domain, allowed_at, position FROM ledger.portal_allowances
    WHERE consumed_position IS NULL ORDER BY position
"""
_ALL_TRUST = "SELECT member_id, domain, state, token_sha256 FROM ledger.portal_trust"
_TRUST_HEAD = """
    SELECT coalesce(max(position), 0) FROM ledger.events
    WHERE event_type = 'LEDGER.TRUST_CHANGED'
"""
_TRUST_EVENTS_SINCE = """
    SELECT position, payload FROM ledger.events
    WHERE event_type = 'LEDGER.TRUST_CHANGED' AND origin <> 'bitrix24' AND position > $1
    ORDER BY position
"""


async def _init_connection(connection: Connection) -> None:
    # jsonb read back as Python values (views); `json` columns stay text on purpose: the chain
    # hashes their exact bytes.
    await connection.set_type_codec(
        "jsonb", encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads,
        schema="pg_catalog",
    )


async def create_pool(
    dsn: str, *, size: int, connect: bool = True, connect_timeout: float = 5.0
) -> Pool:
    """A pool whose every connection commits durably, whatever the server's default is.

    `connect=False` opens no connection now (PostgreSQL may be down); the first use does.
    """
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1 if connect else 0,
            max_size=size,
            timeout=connect_timeout,  # an unreachable host must not hold a request for a minute
            command_timeout=60,  # bounds a statement stuck on a stalled server (or shutdown)
            init=_init_connection,
            server_settings={"synchronous_commit": "on", "application_name": "ledger"},
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
    assert pool is not None
    return pool


async def close_pool(pool: Pool, *, seconds: float = 5.0) -> None:
    """Close gracefully, but within `seconds`: asyncpg's `close` waits for every connection to
    be released, and one held by a task that did not stop would hold the shutdown for ever;
    past the deadline the remaining connections are terminated."""
    try:
        async with asyncio.timeout(seconds):
            await pool.close()
    except TimeoutError:
        log.error("connections still in use %gs into closing the pool; terminating them",
                  seconds)
        pool.terminate()


def _unavailable(exc: BaseException) -> bool:
    return isinstance(
        exc,
        OSError
        | asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.CannotConnectNowError
        | asyncpg.AdminShutdownError
        | TimeoutError,
    )


def _cancelled_meanwhile(exc: BaseException) -> None:
    """A driver error raised while the task was being cancelled (a rollback on a connection
    whose query the cancellation interrupted) stays a cancellation: translated, it would be an
    error a background loop retries, and the task would never stop (shutdown would hang)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


@asynccontextmanager
async def translated_errors(action: str) -> AsyncIterator[None]:
    """Driver errors become ledger errors exactly once, here."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        _cancelled_meanwhile(exc)
        if _unavailable(exc):
            raise DatabaseUnavailable(f"{action}: PostgreSQL is unavailable ({exc})") from exc
        raise AppendFailed(f"{action}: {exc.__class__.__name__}: {exc}") from exc
    except (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError, TimeoutError) as exc:
        # InternalClientError: the protocol state of a connection that broke mid-operation
        _cancelled_meanwhile(exc)
        raise DatabaseUnavailable(f"{action}: PostgreSQL is unavailable ({exc})") from exc


class EventStore:
    """Appends and reads of the ledger; the pool is owned by whoever created it."""

    def __init__(self, pool: Pool, *, policy: TrustPolicy) -> None:
        self._pool = pool
        self._policy = policy

    @property
    def pool(self) -> Pool:
        return self._pool

    async def append(self, drafts: Sequence[Draft], *, draining: bool = False) -> list[Outcome]:
        """Append a batch in one durable transaction; one outcome per draft, in order."""
        outcomes, _ = await self.append_planned(drafts, draining=draining)
        return outcomes

    async def append_planned(
        self, drafts: Sequence[Draft], *, draining: bool = False
    ) -> tuple[list[Outcome], list[PlannedEffect]]:
        """`append`, also answering the trust changes it committed (for the offline state)."""
        # what does not need the serialisation point is done before taking it
        prepared = {id(d): entry_of(d) for d in drafts if isinstance(d, EventDraft)}
        async with (
            translated_errors("append"),
            self._pool.acquire() as connection,
            connection.transaction(),
        ):
            return await self._append(connection, drafts, prepared, draining)

    async def _append(
        self,
        connection: Connection,
        drafts: Sequence[Draft],
        prepared: dict[int, tuple[bytes, bytes]],
        draining: bool,
    ) -> tuple[list[Outcome], list[PlannedEffect]]:
        event_drafts = [d for d in drafts if isinstance(d, EventDraft)]
        head: Head | None = None
        facts = Facts()
        if event_drafts:
            row = await connection.fetchrow(_LOCK_HEAD, "events")
            assert row is not None
            head = Head(row["position"], bytes(row["hash"]))
            facts = await self._load(connection, event_drafts)
        if head is None:  # rejections only: nothing to judge, number or chain in `events`
            planned = Plan(outcomes=[None] * len(drafts))
            planned.rejections = [
                (i, d) for i, d in enumerate(drafts) if isinstance(d, RejectionDraft)
            ]
        else:
            planned = plan(drafts, facts, head, policy=self._policy, draining=draining,
                           prepared=prepared)
        await self._write(connection, planned)
        outcomes = planned.outcomes
        if planned.rejections:
            positions = await self._write_rejections(connection, planned.rejections)
            for (index, _), position in zip(planned.rejections, positions, strict=True):
                current = outcomes[index]
                if isinstance(current, Refusal):
                    outcomes[index] = dataclasses.replace(current, rejection_position=position)
                else:
                    outcomes[index] = RejectionLogged(position)
        assert all(o is not None for o in outcomes)
        return [o for o in outcomes if o is not None], planned.effects

    async def _load(self, connection: Connection, drafts: list[EventDraft]) -> Facts:
        """The facts a batch is planned on: its portals' trust, the open allowances its
        installs could use, and which of its dedup keys are stored already."""
        facts = Facts()
        members = list({d.member_id for d in drafts})
        for row in await connection.fetch(_TRUST_OF, members):
            facts.trust.portals[row["member_id"]] = _trust_of(row)
        installs = [d for d in drafts if d.event_type == INSTALL]
        if installs:
            domains = list({n for d in installs if (n := normalise_domain(d.domain))})
            rows = await connection.fetch(
                _OPEN_ALLOWANCES, [d.member_id for d in installs], domains
            )
            for row in rows:
                facts.trust.allowances[row["position"]] = _allowance_of(row)
        rows = await connection.fetch(
            _EXISTING, [d.member_id for d in drafts], [d.dedup_key for d in drafts]
        )
        for row in rows:
            facts.seen[(row["member_id"], bytes(row["dedup_key"]))] = row["position"]
        # a redelivery today's trust would refuse may prove itself by the original's token
        doubtful = {
            (d.member_id, known)
            for d in drafts
            if d.origin == ORIGIN_BITRIX24
            and (known := facts.seen.get((d.member_id, d.dedup_key))) is not None
            and not token_matches(d.presented_sha256 or b"",
                                  facts.trust.portals.get(d.member_id))
        }
        if doubtful:
            keys = sorted(doubtful)
            rows = await connection.fetch(
                _ACCEPTED_UNDER, [m for m, _ in keys], [p for _, p in keys]
            )
            for row in rows:
                digest = token_accepted_under(effect_of(orjson.loads(row["payload"])))
                if digest is not None:
                    facts.accepted[row["position"]] = digest
        return facts

    async def _write(self, connection: Connection, planned: Plan) -> None:
        """Trust rows follow from the trust events by trigger (migration 0005), not from here."""
        if planned.events:
            assert planned.head is not None
            await connection.execute(
                _INSERT_EVENTS, *map(list, zip(*planned.events, strict=True))
            )
            await connection.execute(
                _MOVE_HEAD, "events", planned.head.position, planned.head.hash
            )
        if planned.redeliveries:
            await connection.execute(
                _INSERT_REDELIVERIES, *map(list, zip(*planned.redeliveries, strict=True))
            )

    async def _write_rejections(
        self, connection: Connection, rejections: list[tuple[int, RejectionDraft]]
    ) -> list[int]:
        row = await connection.fetchrow(_LOCK_HEAD, "rejections")
        assert row is not None
        head = Head(row["position"], bytes(row["hash"]))
        rows: list[tuple[Any, ...]] = []
        for _, r in rejections:
            position = head.position + 1
            entry = rejection_entry(
                received_at=r.received_at, status=r.status, reason=r.reason, detail=r.detail,
                member_id=r.member_id, event_type=r.event_type, peer=r.peer,
                content_type=r.content_type, body_size=r.body_size, body_sha256=r.body_sha256,
            )
            digest = chain_hash(head.hash, position, entry, sha256(r.excerpt.encode()))
            rows.append(
                (position, r.received_at, r.status, r.reason, r.detail, r.member_id,
                 r.event_type, r.peer, r.content_type, r.body_size, r.body_sha256, r.excerpt,
                 head.hash, digest)
            )
            head.position, head.hash = position, digest
        await connection.execute(_INSERT_REJECTIONS, *map(list, zip(*rows, strict=True)))
        await connection.execute(_MOVE_HEAD, "rejections", head.position, head.hash)
        return [r[0] for r in rows]

    # ---- trust, whole ------------------------------------------------------------------

    async def load_trust(self) -> tuple[TrustFacts, int]:
        """Every portal's trust and every open allowance, with the last trust event's position
        (consistent: one snapshot)."""
        async with (
            translated_errors("load trust"),
            self._pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            position = await connection.fetchval(_TRUST_HEAD)
            portals = await connection.fetch(_ALL_TRUST)
            allowances = await connection.fetch(_ALLOWANCE_ROWS)
        facts = TrustFacts(
            {r["member_id"]: _trust_of(r) for r in portals},
            {r["position"]: _allowance_of(r) for r in allowances},
        )
        return facts, int(position)

    async def trust_events_since(self, position: int) -> list[tuple[int, dict[str, Any]]]:
        """The trust events after `position`, in order, payloads parsed (for `fold_trust`)."""
        async with translated_errors("read trust events"), self._pool.acquire() as connection:
            rows = await connection.fetch(_TRUST_EVENTS_SINCE, position)
        return [(r["position"], orjson.loads(r["payload"])) for r in rows]

    # ---- reads -------------------------------------------------------------------------

    async def portals(self) -> list[PortalRow]:
        """Every portal the ledger trusts, trusted once, or was told to allow."""
        async with translated_errors("list portals"), self._pool.acquire() as connection:
            trusted = await connection.fetch(_TRUST_ROWS)
            allowances = await connection.fetch(_ALLOWANCE_ROWS)
        allowed_members = {a["member_id"] for a in allowances if a["member_id"]}
        allowed_domains = {a["domain"] for a in allowances if a["domain"]}
        rows = [
            PortalRow(
                member_id=r["member_id"],
                domain=r["domain"],
                state=r["state"],
                changed_at=r["changed_at"],
                changed_position=r["changed_position"],
                token_fingerprint=bytes(r["token_sha256"]).hex()[:12]
                if r["token_sha256"] is not None
                else None,
                allowed=r["member_id"] in allowed_members or r["domain"] in allowed_domains,
            )
            for r in trusted
        ]
        known_members = {r.member_id for r in rows}
        known_domains = {r.domain for r in rows if r.domain}
        rows.extend(
            PortalRow(
                member_id=a["member_id"] or "",
                domain=a["domain"],
                state="allowed",
                changed_at=a["allowed_at"],
                changed_position=a["position"],
                allowed=True,
            )
            for a in allowances
            if a["member_id"] not in known_members and a["domain"] not in known_domains
        )
        return rows

    async def head(self, stream: str = "events") -> tuple[int, bytes]:
        """The stream's last position and hash (0 and the genesis hash when empty)."""
        async with translated_errors("read head"), self._pool.acquire() as connection:
            row = await connection.fetchrow(_HEAD, stream)
        assert row is not None
        return int(row["position"]), bytes(row["hash"])

    @asynccontextmanager
    async def chain_snapshot(self, stream: str) -> AsyncIterator[ChainSnapshot]:
        """A consistent, read-only view of one chain: its head and its rows in order."""
        async with (
            translated_errors(f"read {stream}"),
            self._pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            row = await connection.fetchrow(_HEAD, stream)
            assert row is not None
            yield ChainSnapshot(connection, stream, int(row["position"]), bytes(row["hash"]))


def _allowance_of(row: Any) -> Allowance:
    return Allowance(row["position"], row["member_id"], row["domain"])


def _trust_of(row: Any) -> PortalTrust:
    token = row["token_sha256"]
    return PortalTrust(
        row["member_id"], row["domain"], TrustState(row["state"]),
        bytes(token) if token is not None else None,
    )


class ChainSnapshot:
    """Rows of one chain, read in position order through a server-side cursor."""

    _QUERIES: ClassVar[dict[str, str]] = {
        "events": "SELECT * FROM ledger.events ORDER BY position",
        "rejections": "SELECT * FROM ledger.rejections ORDER BY position",
    }

    def __init__(
        self, connection: Connection, stream: str, head_position: int, head_hash: bytes
    ) -> None:
        self._connection = connection
        self._stream = stream
        self.head_position = head_position
        self.head_hash = head_hash

    async def batches(self, size: int = 2000) -> AsyncIterator[list[asyncpg.Record]]:
        cursor = await self._connection.cursor(self._QUERIES[self._stream])
        while rows := await cursor.fetch(size):
            yield rows


async def schema_revision(pool: Pool) -> str | None:
    """The alembic revision the database is at, or None when it was never migrated."""
    async with translated_errors("read schema revision"), pool.acquire() as connection:
        exists = await connection.fetchval("SELECT to_regclass('public.alembic_version')")
        if exists is None:
            return None
        try:
            value = await connection.fetchval("SELECT version_num FROM public.alembic_version")
        except asyncpg.InsufficientPrivilegeError:
            return None
    return str(value) if value is not None else None


async def ping(pool: Pool) -> None:
    async with translated_errors("ping"), pool.acquire() as connection:
        await connection.fetchval("SELECT 1")
