"""Every SQL statement the service runs, and the append at the store's serialisation point.

An append batch is one transaction:
1. lock the `events` stream head (`SELECT … FOR UPDATE`): appends from every process serialise
   here, so positions are gap-free and commit-ordered and the chain has one predecessor;
2. read the trust of the batch's portals and the dedup keys it already holds;
3. judge, de-duplicate, number and chain each draft in order, in memory;
4. write events, redeliveries, trust rows and rejections with a handful of set-based statements;
5. move the heads and COMMIT (synchronous_commit = on). Only then do callers hear back.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import asyncpg
import orjson

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

from ledger.drafts import follow_up, refusal
from ledger.envelope import INSTALL
from ledger.errors import AppendFailed, DatabaseUnavailable
from ledger.hashing import canonical_json, chain_hash, event_entry, rejection_entry, sha256
from ledger.models import (
    ORIGIN_BITRIX24,
    Draft,
    Duplicate,
    EventDraft,
    Outcome,
    PortalRow,
    Refusal,
    RejectionDraft,
    RejectionLogged,
    Stored,
)
from ledger.settings import TrustPolicy
from ledger.trust import PortalTrust, Refused, TrustChange, TrustState, judge

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
_ALLOWED = """
    SELECT member_id, domain FROM ledger.portal_allowances
    WHERE member_id = ANY($1::text[]) OR domain = ANY($2::text[])
"""
_EXISTING = """
    SELECT e.member_id, e.dedup_key, e.position
    FROM unnest($1::text[], $2::bytea[]) AS k(member_id, dedup_key)
    JOIN ledger.events e USING (member_id, dedup_key)
"""
_INSERT_EVENTS = """
    INSERT INTO ledger.events (position, member_id, event_type, origin, bot_ids, occurred_at,
        received_at, dedup_key, body_sha256, payload, payload_sha256, metadata, prev_hash, hash)
    SELECT p, m, t, o, b::bigint[], oa, ra, dk, bs, pl::json, ps, md::json, ph, h
    FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                $6::timestamptz[], $7::timestamptz[], $8::bytea[], $9::bytea[], $10::text[],
                $11::bytea[], $12::text[], $13::bytea[], $14::bytea[])
        AS r(p, m, t, o, b, oa, ra, dk, bs, pl, ps, md, ph, h)
"""
_INSERT_REDELIVERIES = """
    INSERT INTO ledger.redeliveries (position, received_at, body_sha256, peer)
    SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::bytea[], $4::text[])
"""
_UPSERT_TRUST = """
    INSERT INTO ledger.portal_trust AS t
        (member_id, domain, state, token_sha256, changed_at, changed_position)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (member_id) DO UPDATE SET
        domain = coalesce(EXCLUDED.domain, t.domain), state = EXCLUDED.state,
        token_sha256 = EXCLUDED.token_sha256, changed_at = EXCLUDED.changed_at,
        changed_position = EXCLUDED.changed_position
"""
_INSERT_ALLOWANCE = """
    INSERT INTO ledger.portal_allowances (member_id, domain, allowed_at, position)
    VALUES (nullif($1, ''), $2, $3, $4)
    ON CONFLICT DO NOTHING
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


@asynccontextmanager
async def translated_errors(action: str) -> AsyncIterator[None]:
    """Driver errors become ledger errors exactly once, here."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        if _unavailable(exc):
            raise DatabaseUnavailable(f"{action}: PostgreSQL is unavailable ({exc})") from exc
        raise AppendFailed(f"{action}: {exc.__class__.__name__}: {exc}") from exc
    except (OSError, asyncpg.InterfaceError, asyncpg.InternalClientError, TimeoutError) as exc:
        # InternalClientError: the protocol state of a connection that broke mid-operation
        raise DatabaseUnavailable(f"{action}: PostgreSQL is unavailable ({exc})") from exc


@dataclasses.dataclass
class _Head:
    position: int
    hash: bytes


def _entry_of(draft: EventDraft) -> tuple[bytes, bytes]:
    """The metadata text (canonical, so a verifier hashes it as it is) and the chained entry:
    everything of an event's hash that does not depend on its position or predecessor."""
    metadata = canonical_json(draft.metadata)
    entry = event_entry(
        member_id=draft.member_id,
        event_type=draft.event_type,
        origin=draft.origin,
        bot_ids=draft.bot_ids,
        occurred_at=draft.occurred_at,
        received_at=draft.received_at,
        dedup_key=draft.dedup_key,
        body_sha256=draft.body_sha256,
        metadata=orjson.Fragment(metadata),
    )
    return metadata, entry


class _Batch:
    """The in-memory work of one append transaction (steps 2 and 3 of the module docstring)."""

    def __init__(self, policy: TrustPolicy, prepared: dict[int, tuple[bytes, bytes]]) -> None:
        self.policy = policy
        # entries computed before the head lock was taken, by id() of their draft
        self.prepared = prepared
        self.trust: dict[str, PortalTrust] = {}
        self.allowed_members: set[str] = set()
        self.allowed_domains: set[str] = set()
        self.seen: dict[tuple[str, bytes], int] = {}
        self.events: list[tuple[Any, ...]] = []
        self.redeliveries: list[tuple[Any, ...]] = []
        self.trust_rows: dict[str, tuple[Any, ...]] = {}
        self.allowances: list[tuple[Any, ...]] = []
        self.rejections: list[tuple[int, RejectionDraft]] = []

    def add_event(self, head: _Head, draft: EventDraft) -> int:
        position = head.position + 1
        metadata, entry = self.prepared.get(id(draft)) or _entry_of(draft)
        digest = chain_hash(head.hash, position, entry, draft.payload_sha256)
        self.events.append(
            (position, draft.member_id, draft.event_type, draft.origin,
             "{" + ",".join(map(str, draft.bot_ids)) + "}", draft.occurred_at,
             draft.received_at, draft.dedup_key, draft.body_sha256, draft.payload.decode(),
             draft.payload_sha256, metadata.decode(), head.hash, digest)
        )
        self.seen[(draft.member_id, draft.dedup_key)] = position
        head.position, head.hash = position, digest
        return position

    def apply_trust(self, draft: EventDraft, position: int) -> None:
        change, member = draft.trust_change, draft.member_id
        if change is TrustChange.ALLOWED:
            if member:
                self.allowed_members.add(member)
            if draft.allow_domain:
                self.allowed_domains.add(draft.allow_domain)
            self.allowances.append((member, draft.allow_domain, draft.received_at, position))
            return
        if change in (TrustChange.ESTABLISHED, TrustChange.PROVISIONED):
            state, token = TrustState.TRUSTED, draft.new_token_sha256
        else:
            state, token = TrustState.ENDED, None
        previous = self.trust.get(member)
        domain = draft.domain or (previous.domain if previous else None)
        self.trust[member] = PortalTrust(member, domain, state, token)
        self.trust_rows[member] = (member, domain, state.value, token, draft.received_at, position)


class EventStore:
    """Appends and reads of the ledger; the pool is owned by whoever created it."""

    def __init__(
        self, pool: Pool, *, policy: TrustPolicy, trust_file: Path | None = None
    ) -> None:
        self._pool = pool
        self._policy = policy
        # Trust as last seen by this process: what an outage is judged against (README "Spool"),
        # kept in `trust_file` too (token digests only) so a restart during an outage has it.
        self.trust_cache: dict[str, PortalTrust] = {}
        self._trust_file = trust_file

    async def load_trust_cache(self) -> None:
        """From PostgreSQL; when it is unreachable, from the last saved copy (if any)."""
        try:
            async with translated_errors("load trust"), self._pool.acquire() as connection:
                rows = await connection.fetch(
                    "SELECT member_id, domain, state, token_sha256 FROM ledger.portal_trust"
                )
        except DatabaseUnavailable:
            if self._trust_file is None or not self._trust_file.exists():
                raise
            saved = orjson.loads(self._trust_file.read_bytes())
            self.trust_cache = {
                m: PortalTrust(m, t["domain"], TrustState(t["state"]),
                               bytes.fromhex(t["token_sha256"]) if t["token_sha256"] else None)
                for m, t in saved.items()
            }
            log.warning("PostgreSQL unreachable: judging deliveries by the trust saved in %s",
                        self._trust_file)
            return
        self.trust_cache = {r["member_id"]: _trust_of(r) for r in rows}
        self._save_trust()

    def _save_trust(self) -> None:
        if self._trust_file is None:
            return
        data = {
            m: {"domain": t.domain, "state": t.state.value,
                "token_sha256": t.token_sha256.hex() if t.token_sha256 else None}
            for m, t in self.trust_cache.items()
        }
        temporary = self._trust_file.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(orjson.dumps(data))
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(self._trust_file)

    def judge_offline(self, draft: EventDraft) -> Refused | None:
        """While PostgreSQL is away: refuse what the cached trust refuses; spool the rest.

        An ONAPPINSTALL cannot be judged offline (allowances may have changed): it is spooled
        and judged on drain, and its token is trusted provisionally so the portal's next
        deliveries are spooled too — and judged on drain as well.
        """
        if draft.origin != ORIGIN_BITRIX24 or draft.presented_sha256 is None:
            return None
        if draft.event_type == INSTALL:
            current = self.trust_cache.get(draft.member_id)
            if current is None or current.state is not TrustState.TRUSTED:
                self.trust_cache[draft.member_id] = PortalTrust(
                    draft.member_id, draft.domain, TrustState.TRUSTED, draft.presented_sha256
                )
            return None
        verdict = judge(
            draft.event_type, draft.presented_sha256, self.trust_cache.get(draft.member_id),
            allowed=False, policy=self._policy,
        )
        return verdict if isinstance(verdict, Refused) else None

    @property
    def pool(self) -> Pool:
        return self._pool

    async def append(self, drafts: Sequence[Draft]) -> list[Outcome]:
        """Append a batch in one durable transaction; one outcome per draft, in order."""
        # what does not need the serialisation point is done before taking it
        prepared = {id(d): _entry_of(d) for d in drafts if isinstance(d, EventDraft)}
        async with (
            translated_errors("append"),
            self._pool.acquire() as connection,
            connection.transaction(),
        ):
            outcomes, batch = await self._append(connection, drafts, prepared)
        # committed: now it is what we know
        changed = {m: t for m, t in batch.trust.items() if self.trust_cache.get(m) != t}
        if changed:
            self.trust_cache.update(changed)
            self._save_trust()
        return outcomes

    async def _append(
        self,
        connection: Connection,
        drafts: Sequence[Draft],
        prepared: dict[int, tuple[bytes, bytes]],
    ) -> tuple[list[Outcome], _Batch]:
        batch = _Batch(self._policy, prepared)
        outcomes: list[Outcome | None] = [None] * len(drafts)
        event_drafts = [d for d in drafts if isinstance(d, EventDraft)]
        head: _Head | None = None
        if event_drafts:
            row = await connection.fetchrow(_LOCK_HEAD, "events")
            assert row is not None
            head = _Head(row["position"], bytes(row["hash"]))
            await self._load(connection, batch, event_drafts)

        for index, draft in enumerate(drafts):
            if isinstance(draft, RejectionDraft):
                batch.rejections.append((index, draft))
                continue
            assert head is not None
            change = draft.trust_change
            if draft.origin == ORIGIN_BITRIX24:
                assert draft.presented_sha256 is not None
                verdict = judge(
                    draft.event_type,
                    draft.presented_sha256,
                    batch.trust.get(draft.member_id),
                    allowed=draft.member_id in batch.allowed_members
                    or (draft.domain is not None and draft.domain in batch.allowed_domains),
                    policy=self._policy,
                )
                if isinstance(verdict, Refused):
                    outcomes[index] = Refusal(verdict.status, verdict.code, verdict.message, 0)
                    record = refusal(
                        draft, status=verdict.status, reason=verdict.code, detail=verdict.message
                    )
                    if record is not None:
                        batch.rejections.append((index, record))
                    continue
                change = verdict.change
            known = batch.seen.get((draft.member_id, draft.dedup_key))
            if known is not None:
                outcomes[index] = Duplicate(known)
                batch.redeliveries.append(
                    (known, draft.received_at, draft.body_sha256, draft.metadata.get("peer"))
                )
                continue
            position = batch.add_event(head, draft)
            outcomes[index] = Stored(position, head.hash, change)
            if change is None:
                continue
            if draft.origin == ORIGIN_BITRIX24:
                trust_draft = follow_up(change, draft, position)
                trust_position = batch.add_event(head, trust_draft)
                batch.apply_trust(trust_draft, trust_position)
            else:
                batch.apply_trust(draft, position)

        await self._write(connection, batch, head)
        if batch.rejections:
            positions = await self._write_rejections(connection, batch.rejections)
            for (index, _), position in zip(batch.rejections, positions, strict=True):
                current = outcomes[index]
                if isinstance(current, Refusal):
                    outcomes[index] = dataclasses.replace(current, rejection_position=position)
                else:
                    outcomes[index] = RejectionLogged(position)
        assert all(o is not None for o in outcomes)
        return [o for o in outcomes if o is not None], batch

    async def _load(
        self, connection: Connection, batch: _Batch, drafts: list[EventDraft]
    ) -> None:
        members = list({d.member_id for d in drafts})
        for row in await connection.fetch(_TRUST_OF, members):
            batch.trust[row["member_id"]] = _trust_of(row)
        installs = [d for d in drafts if d.event_type == INSTALL]
        if installs:
            domains = list({d.domain for d in installs if d.domain})
            for row in await connection.fetch(_ALLOWED, [d.member_id for d in installs], domains):
                if row["member_id"]:
                    batch.allowed_members.add(row["member_id"])
                if row["domain"]:
                    batch.allowed_domains.add(row["domain"])
        rows = await connection.fetch(
            _EXISTING, [d.member_id for d in drafts], [d.dedup_key for d in drafts]
        )
        for row in rows:
            batch.seen[(row["member_id"], bytes(row["dedup_key"]))] = row["position"]

    async def _write(
        self, connection: Connection, batch: _Batch, head: _Head | None
    ) -> None:
        if batch.events:
            assert head is not None
            await connection.execute(_INSERT_EVENTS, *map(list, zip(*batch.events, strict=True)))
            await connection.execute(_MOVE_HEAD, "events", head.position, head.hash)
        if batch.redeliveries:
            await connection.execute(
                _INSERT_REDELIVERIES, *map(list, zip(*batch.redeliveries, strict=True))
            )
        for row in batch.trust_rows.values():
            await connection.execute(_UPSERT_TRUST, *row)
        for allowance in batch.allowances:
            await connection.execute(_INSERT_ALLOWANCE, *allowance)

    async def _write_rejections(
        self, connection: Connection, rejections: list[tuple[int, RejectionDraft]]
    ) -> list[int]:
        row = await connection.fetchrow(_LOCK_HEAD, "rejections")
        assert row is not None
        head = _Head(row["position"], bytes(row["hash"]))
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
