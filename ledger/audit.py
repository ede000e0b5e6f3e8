"""The auditor's questions, answered once for the read API, the CLI and the exports."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from ledger import operations
from ledger.errors import BadQuery, NotFound
from ledger.projections import readers
from ledger.projections.fold import Deletion
from ledger.projections.projector import Projector
from ledger.readmodels import (
    BotHistory,
    BotOut,
    DeletionOut,
    EventOut,
    Page,
    PortalOut,
    ProjectionOut,
    RejectionOut,
    VerificationOut,
)
from ledger.storage.audit_store import AuditStore, EventFilter, ExportSnapshot, RejectionFilter
from ledger.storage.projection_store import ProjectionStore
from ledger.storage.store import EventStore

MAX_PAGE = 1000


def new_token() -> tuple[str, bytes]:
    """A bearer token and the SHA-256 the database keeps instead of it."""
    token = "lgr_" + secrets.token_urlsafe(32)
    return token, hashlib.sha256(token.encode()).digest()


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class DeletionFilter:
    member_id: str | None = None
    occurred_from: datetime | None = None
    occurred_to: datetime | None = None
    actor_user_id: str | None = None
    cause: str | None = None
    anomalies_only: bool = False

    def accepts(self, deletion: Deletion) -> bool:
        at = deletion.occurred_at or deletion.received_at
        return (
            (self.occurred_from is None or at >= self.occurred_from)
            and (self.occurred_to is None or at < self.occurred_to)
            and (self.actor_user_id is None or deletion.actor_user_id == self.actor_user_id)
            and (self.cause is None or deletion.cause == self.cause)
            and (not self.anomalies_only
                 or deletion.never_seen or deletion.repeated or deletion.activity_after_deletion)
        )


class AuditService:
    """Every question the read API, the CLI and the exports ask, over stores built by the app
    factory or the CLI (never here).

    With a `projector` (the CLI, which writes as the projector role) pending events are first
    folded into the projections; without one (the read API) answers come from what the serving
    projector committed, and this never writes projections.
    """

    def __init__(
        self, events: EventStore, projections: ProjectionStore, audit: AuditStore,
        projector: Projector | None = None,
    ) -> None:
        self._events = events
        self._projections = projections
        self._audit = audit
        self._projector = projector

    async def portals(self) -> list[PortalOut]:
        rows = await readers.portals(self._projections, self._projector)
        return [PortalOut.model_validate(p) for p in rows]

    async def bots(
        self, *, member_id: str | None = None, status: str | None = None,
        as_of: readers.AsOf = None,
    ) -> list[BotOut]:
        rows = await readers.bots(
            self._projections, self._projector, member_id=member_id, status=status, as_of=as_of,
        )
        return [BotOut.model_validate(b) for b in rows]

    async def deletions(
        self, where: DeletionFilter, as_of: readers.AsOf = None
    ) -> list[DeletionOut]:
        rows = await readers.deletions(
            self._projections, self._projector, member_id=where.member_id, as_of=as_of,
        )
        return [deletion_out(d) for d in rows if where.accepts(d)]

    async def projection(self) -> ProjectionOut:
        """How far the registry is folded: the position and chain hash its answers stand on."""
        return ProjectionOut.model_validate(await self._projections.checkpoint(readers.REGISTRY))

    async def progress(self) -> dict[str, Any]:
        """The registry's checkpoint against the chain's head, and how long each has waited
        (`ProjectionStore.progress`): what readiness and the lag metric report."""
        return dict(await self._projections.progress(readers.REGISTRY))

    async def head(self) -> tuple[int, bytes]:
        """The event chain's head now."""
        return await self._events.head()

    @asynccontextmanager
    async def export_snapshot(self) -> AsyncIterator[ExportSnapshot]:
        async with self._audit.export_snapshot() as snapshot:
            yield snapshot

    async def create_token(self, name: str, token_sha256: bytes, by: str) -> None:
        await self._audit.create_token(name, token_sha256, by)

    async def revoke_token(self, name: str, by: str) -> None:
        await self._audit.revoke_token(name, by)

    async def tokens(self) -> list[dict[str, Any]]:
        return await self._audit.tokens()

    async def token_is_live(self, token_sha256: bytes) -> bool:
        return await self._audit.token_is_live(token_sha256)

    async def record_verification(
        self, *, stream: str, verified_rows: int, head_position: int, head_hash: bytes,
        checkpoint_position: int | None, problem: str | None,
    ) -> None:
        await self._audit.record_verification(
            stream=stream, verified_rows=verified_rows, head_position=head_position,
            head_hash=head_hash, checkpoint_position=checkpoint_position, problem=problem,
        )

    async def events(
        self, where: EventFilter, *, limit: int = 100, with_payload: bool = False
    ) -> Page[EventOut]:
        page = await self.event_page(where, limit=limit, with_payload=with_payload)
        return Page[EventOut](
            items=[event_out(r) for r in page["items"]], next_after=page["next_after"]
        )

    async def event_page(
        self, where: EventFilter, *, limit: int = 100, with_payload: bool = False
    ) -> dict[str, Any]:
        """The same page as `events`, as plain JSON-ready data: the API's hot path skips
        building models (the tests hold these answers to the `Page[EventOut]` schema)."""
        if not 1 <= limit <= MAX_PAGE:
            raise BadQuery(f"limit must be between 1 and {MAX_PAGE}")
        rows = await self._audit.events(where, limit=limit, with_payload=with_payload)
        return {"items": rows, "next_after": rows[-1]["position"] if len(rows) == limit else None}

    async def rejections(self, where: RejectionFilter, *, limit: int = 100) -> Page[RejectionOut]:
        """Refused deliveries in log order (reason, time, portal, sizes, hashes; no excerpt)."""
        if not 1 <= limit <= MAX_PAGE:
            raise BadQuery(f"limit must be between 1 and {MAX_PAGE}")
        rows = await self._audit.rejections(where, limit=limit)
        return Page[RejectionOut](
            items=[RejectionOut.model_validate(r) for r in rows],
            next_after=rows[-1]["position"] if len(rows) == limit else None,
        )

    async def resolve_portal(self, portal: str | None) -> str | None:
        """`portal` as a member_id or a domain (see `operations.resolve_portal`)."""
        return await operations.resolve_portal(self._events, portal)

    async def bot_history(
        self, member_id: str, bot_id: int, *, after: int = 0, limit: int = 1000
    ) -> BotHistory:
        bots = await self.bots(member_id=member_id)
        bot = next((b for b in bots if b.bot_id == bot_id), None)
        if bot is None:
            raise NotFound(f"no bot {bot_id} on portal {member_id}")
        page = await self.events(
            EventFilter(member_id=member_id, bot_id=bot_id, after=after), limit=limit
        )
        noted = await self._projections.anomalies_at([e.position for e in page.items])
        items = [e.model_copy(update={"anomalies": noted[e.position]}) if e.position in noted
                 else e for e in page.items]
        return BotHistory(bot=bot, events=items, next_after=page.next_after)

    async def verification(self) -> list[VerificationOut]:
        return [VerificationOut.model_validate(r)
                for r in await self._audit.verification_status()]


def event_out(row: dict[str, Any]) -> EventOut:
    payload = row.get("payload")
    return EventOut(
        position=row["position"], received_at=row["received_at"],
        occurred_at=row["occurred_at"], member_id=row["member_id"],
        event_type=row["event_type"], origin=row["origin"], bot_ids=list(row["bot_ids"]),
        actor_user_id=row["actor_user_id"], hash=row["hash"],
        payload=orjson.loads(payload) if payload is not None else None,
    )


def deletion_out(deletion: Deletion) -> DeletionOut:
    return DeletionOut.model_validate(readers.as_record(deletion))
