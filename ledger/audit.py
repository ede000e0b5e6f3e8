"""The auditor's questions, answered once for the read API, the CLI and the exports."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson

from ledger import operations
from ledger.errors import BadQuery, FoldsBusy, NotFound, ReadsBusy
from ledger.projections import readers
from ledger.projections.fold import Bot, Deletion
from ledger.projections.projector import Projector
from ledger.projections.readers import DeletionFilter as DeletionFilter
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


_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def event_type_asked(text: str) -> str:
    """An event type as a reader typed it, upper-cased in ASCII only: `str.upper` maps the
    dotless i (U+0131) to `I` (and `ß` to `SS`), so `on\u0131mbotdelete` matched
    ONIMBOTDELETE. Stored types are ASCII: one with any other letter matches nothing."""
    return text.translate(_ASCII_UPPER)


def new_token() -> tuple[str, bytes]:
    """A bearer token and the SHA-256 the database keeps instead of it."""
    token = "lgr_" + secrets.token_urlsafe(32)
    return token, hashlib.sha256(token.encode()).digest()


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def _slot(slots: asyncio.Semaphore, wait: float) -> bool:
    """One of `slots`, waited for up to `wait` seconds (False: none came free)."""
    try:
        async with asyncio.timeout(wait):
            await slots.acquire()
    except TimeoutError:
        return False
    return True


class FoldGate:
    """At most `limit` "as of" folds at once in this process (one per question: each holds the
    registry as of then in memory, and folds on the event loop that serves everyone). One more
    waits up to `wait` seconds for a fold to end, then is refused with `FoldsBusy` (503,
    Retry-After) — queued instead, the waiting questions would pile up without bound."""

    def __init__(self, limit: int, wait: float) -> None:
        self.limit = limit
        self.wait = wait
        self.running = 0
        self._slots = asyncio.Semaphore(limit)

    @asynccontextmanager
    async def permit(self) -> AsyncIterator[None]:
        if not await _slot(self._slots, self.wait):
            raise FoldsBusy(self.running, retry_after=max(1, math.ceil(self.wait * 2)))
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()


class ReadPermit:
    """A read request's place at the database (`ReadGate`), given back once — at the end of
    the request, or earlier by a download whose rows are all read."""

    def __init__(self, slots: asyncio.Semaphore, gate: ReadGate) -> None:
        self._slots, self._gate, self._held = slots, gate, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gate.running -= 1
            self._slots.release()


class ReadGate:
    """At most `limit` read requests (read API, console) at the database at once in this
    process. Reads share the service's pool with the intake; unbounded, a few slow ones (a
    large download, a query PostgreSQL plans badly) take every connection, and the intake's
    installs and drains, and /readyz, wait behind them. One more waits up to `wait` seconds,
    then is refused with `ReadsBusy` (503, Retry-After)."""

    def __init__(self, limit: int, wait: float) -> None:
        self.limit = limit
        self.wait = wait
        self.running = 0
        self._slots = asyncio.Semaphore(limit)

    @asynccontextmanager
    async def permit(self) -> AsyncIterator[ReadPermit]:
        if not await _slot(self._slots, self.wait):
            raise ReadsBusy(self.running, retry_after=max(1, math.ceil(self.wait)))
        self.running += 1
        permit = ReadPermit(self._slots, self)
        try:
            yield permit
        finally:
            permit.release()


class AuditService:
    """Every question the read API, the CLI and the exports ask, over stores built by the app
    factory or the CLI (never here).

    With a `projector` (the CLI, which writes as the projector role) pending events are first
    folded into the projections; without one (the read API) answers come from what the serving
    projector committed, and this never writes projections.
    """

    def __init__(
        self, events: EventStore, projections: ProjectionStore, audit: AuditStore,
        projector: Projector | None = None, folds: FoldGate | None = None,
    ) -> None:
        """`folds`: the bound on concurrent "as of" folds (None: none, as in the CLI)."""
        self._events = events
        self._folds = folds
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
        async with self._folding(as_of):
            rows = await readers.bots(
                self._projections, self._projector, member_id=member_id, status=status,
                as_of=as_of,
            )
        return [BotOut.model_validate(b) for b in rows]

    async def deletions(
        self, where: DeletionFilter, as_of: readers.AsOf = None
    ) -> list[DeletionOut]:
        async with self._folding(as_of):
            rows = await readers.deletions(
                self._projections, self._projector, member_id=where.member_id, as_of=as_of,
            )
        return [deletion_out(d) for d in rows if where.accepts(d)]

    async def bot_page(
        self, *, member_id: str | None = None, status: str | None = None,
        as_of: readers.AsOf = None, after: tuple[str, int] | None = None, limit: int = MAX_PAGE,
    ) -> tuple[list[BotOut], tuple[str, int] | None]:
        """One page of the registry in (portal, bot id) order after the key `after`, and the
        key to ask the next page after (None: this was the last)."""
        _check_limit(limit)
        async with self._folding(as_of), contextlib.aclosing(readers.bot_pages(
            self._projections, self._projector, member_id=member_id, status=status,
            as_of=as_of, after=after, limit=limit + 1,
        )) as pages:
            bots: list[Bot] = await anext(pages, [])
        more = len(bots) > limit
        bots = bots[:limit]
        return [BotOut.model_validate(b) for b in bots], bots[-1].key if more else None

    async def bot_pages(
        self, *, member_id: str | None = None, status: str | None = None,
        as_of: readers.AsOf = None, at: readers.ReadAt | None = None,
    ) -> AsyncIterator[list[BotOut]]:
        """The whole registry, a page at a time (exports and the CLI: never all in memory);
        `at`: see `readers.bot_pages`."""
        async with self._folding(as_of):
            async for page in readers.bot_pages(
                self._projections, self._projector, member_id=member_id, status=status,
                as_of=as_of, at=at,
            ):
                yield [BotOut.model_validate(b) for b in page]

    async def deletion_page(
        self, where: DeletionFilter, *, as_of: readers.AsOf = None,
        after: tuple[int, int] | None = None, limit: int = MAX_PAGE,
    ) -> tuple[list[DeletionOut], tuple[int, int] | None]:
        """One page of the deletion timeline in (position, bot id) order, as `bot_page`."""
        _check_limit(limit)
        async with self._folding(as_of), contextlib.aclosing(readers.deletion_pages(
            self._projections, self._projector, where, as_of=as_of, after=after,
            limit=limit + 1,
        )) as pages:
            found: list[Deletion] = await anext(pages, [])
        more = len(found) > limit
        found = found[:limit]
        return [deletion_out(d) for d in found], found[-1].key if more else None

    async def deletion_pages(
        self, where: DeletionFilter, *, as_of: readers.AsOf = None,
        at: readers.ReadAt | None = None,
    ) -> AsyncIterator[list[DeletionOut]]:
        """The whole deletion timeline, a page at a time, as `bot_pages`."""
        async with self._folding(as_of):
            async for page in readers.deletion_pages(
                self._projections, self._projector, where, as_of=as_of, at=at,
            ):
                yield [deletion_out(d) for d in page]

    @asynccontextmanager
    async def _folding(self, as_of: readers.AsOf) -> AsyncIterator[None]:
        """A permit of `folds` for an answer as of a moment (live answers need none)."""
        if as_of is None or self._folds is None:
            yield
            return
        async with self._folds.permit():
            yield

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
        _check_limit(limit)
        rows = await self._audit.events(where, limit=limit, with_payload=with_payload)
        return {"items": rows, "next_after": rows[-1]["position"] if len(rows) == limit else None}

    async def rejections(self, where: RejectionFilter, *, limit: int = 100) -> Page[RejectionOut]:
        """Refused deliveries in log order (reason, time, portal, sizes, hashes; no excerpt)."""
        _check_limit(limit)
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
        # the one bot, by its key (not the portal's whole registry)
        found, _ = await self.bot_page(member_id=member_id, after=(member_id, bot_id - 1),
                                       limit=1)
        bot = found[0] if found and found[0].bot_id == bot_id else None
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


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise BadQuery(f"limit must be between 1 and {MAX_PAGE}")


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
