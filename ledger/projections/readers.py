"""Answers from the projections — live, or as of a moment — shaped for people and machines."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from ledger import asof
from ledger.errors import PastTheHead
from ledger.projections import projector as projector_module
from ledger.projections import rows
from ledger.projections.fold import Bot, Deletion, Portal, State
from ledger.projections.projector import Projector
from ledger.storage.projection_store import ProjectionStore

# a position, a received time or a Bitrix24 time (ledger.asof), or now (None); a bare int is a
# position and a bare datetime a received time
AsOf = asof.AsOf | int | datetime | None


# told where a listing's pages are read: the projection checkpoint's position and chain hash
ReadAt = Callable[[int, bytes], None]

REGISTRY = projector_module.REGISTRY
PAGE = 1000  # rows per read of a registry or timeline page (the read API's largest page)


def deletion_time(occurred_at: datetime | None, received_at: datetime) -> datetime:
    """When a deletion counts for every `from`/`to` window (API, CLI, exports, console, report):
    its Bitrix24 time (`ts`), never later than when the ledger received it, and the received
    time when it gave none — the `ts:` rule (docs/auditors.md). A sender's `ts` in the year 9999
    would otherwise keep the deletion out of every window that has an end. SQL's
    `least(occurred_at, received_at)` is the same (`least` skips a NULL)."""
    return received_at if occurred_at is None else min(occurred_at, received_at)


@dataclass(frozen=True)
class DeletionFilter:
    """Which deletions a reader asked for, by `deletion_time`. `anomalies_only`: every row
    whose `anomalies` list is not empty — `unexpected_payload` (a payload note) as much as the
    three flags."""

    member_id: str | None = None
    occurred_from: datetime | None = None
    occurred_to: datetime | None = None
    actor_user_id: str | None = None
    cause: str | None = None
    anomalies_only: bool = False

    def accepts(self, deletion: Deletion) -> bool:
        at = deletion_time(deletion.occurred_at, deletion.received_at)
        return (
            (self.member_id is None or deletion.member_id == self.member_id)
            and (self.occurred_from is None or at >= self.occurred_from)
            and (self.occurred_to is None or at < self.occurred_to)
            and (self.actor_user_id is None or deletion.actor_user_id == self.actor_user_id)
            and (self.cause is None or deletion.cause == self.cause)
            and (not self.anomalies_only or deletion.never_seen or deletion.repeated
                 or deletion.activity_after_deletion or bool(deletion.payload_anomalies))
        )


async def snapshot(
    projections: ProjectionStore, projector: Projector | None, as_of: AsOf
) -> State | None:
    """The folded state as of a position or moment (None: read the live projection, after
    `projector`, when given, caught up)."""
    if as_of is None:
        if projector is not None:
            await projector.catch_up()
        return None
    if isinstance(as_of, datetime):
        as_of = asof.Received(as_of)
    if isinstance(as_of, int):
        as_of = asof.Position(as_of)
    state = await projector_module.fold_to(projections, as_of)
    if isinstance(as_of, asof.Position) and state.position < as_of.position:
        # positions are gap-free: the fold stopped short only at the head. Answered, the
        # question would look pinned, yet change as the next events arrive.
        raise PastTheHead(f"as of position {as_of.position}: the chain ends at position "
                       f"{state.position}; nothing is stored after it yet — ask as of "
                       f"position {state.position} or earlier")
    return state


async def bots(
    projections: ProjectionStore,
    projector: Projector | None,
    *,
    member_id: str | None = None,
    status: str | None = None,
    as_of: AsOf = None,
) -> list[Bot]:
    state = await snapshot(projections, projector, as_of)
    if state is None:
        return [rows.bot(r) for r in
                await projections.rows("bots", member_id=member_id, status=status)]
    return sorted(
        (b for b in state.bots.values()
         if (member_id is None or b.member_id == member_id)
         and (status is None or b.status == status)),
        key=lambda b: b.key,
    )


async def deletions(
    projections: ProjectionStore,
    projector: Projector | None,
    *,
    member_id: str | None = None,
    as_of: AsOf = None,
) -> list[Deletion]:
    state = await snapshot(projections, projector, as_of)
    if state is None:
        return [rows.deletion(r) for r in await projections.rows("deletions", member_id=member_id)]
    return sorted(
        (d for d in state.deletions.values() if member_id is None or d.member_id == member_id),
        key=lambda d: d.key,
    )


async def bot_pages(
    projections: ProjectionStore,
    projector: Projector | None,
    *,
    member_id: str | None = None,
    status: str | None = None,
    as_of: AsOf = None,
    after: tuple[str, int] | None = None,
    limit: int | None = None,
    at: ReadAt | None = None,
) -> AsyncGenerator[list[Bot], None]:
    """The registry in key order (portal, bot id) after the key `after`, `limit` rows a page:
    live, each page is one keyset read of the projection (memory bounded by the page, however
    large the registry); as of a moment, the one fold's rows (the fold holds them all anyway).
    `at`: told, live, the projection checkpoint (position, chain hash) every page is read at —
    what an export's manifest stands on (the head read afterwards may be later)."""
    limit = limit or PAGE  # read now: a test makes the pages smaller
    state = await snapshot(projections, projector, as_of)
    if state is not None:
        chosen = (b for b in state.bots.values()
                  if (member_id is None or b.member_id == member_id)
                  and (status is None or b.status == status))
        for page in _pages(chosen, lambda b: b.key, after, limit):
            yield page
        return
    async with projections.snapshot(REGISTRY) as view:  # every page of one moment
        if at is not None:
            at(*await view.checkpoint())
        while True:
            found = [rows.bot(r) for r in await view.page(
                "bots", after=after, limit=limit,
                where={"member_id": member_id, "status": status})]
            if found:
                yield found
            if len(found) < limit:
                return
            after = found[-1].key


async def deletion_pages(
    projections: ProjectionStore,
    projector: Projector | None,
    where: DeletionFilter,
    *,
    as_of: AsOf = None,
    after: tuple[int, int] | None = None,
    limit: int | None = None,
    at: ReadAt | None = None,
) -> AsyncGenerator[list[Deletion], None]:
    """The deletion timeline in key order (position, bot id) after `after`, as `bot_pages`."""
    limit = limit or PAGE  # read now: a test makes the pages smaller
    state = await snapshot(projections, projector, as_of)
    if state is not None:
        chosen = (d for d in state.deletions.values() if where.accepts(d))
        for page in _pages(chosen, lambda d: d.key, after, limit):
            yield page
        return
    async with projections.snapshot(REGISTRY) as view:  # every page of one moment
        if at is not None:
            at(*await view.checkpoint())
        while True:
            found = [rows.deletion(r) for r in await view.deletion_page(
                after=after, limit=limit, member_id=where.member_id,
                occurred_from=where.occurred_from, occurred_to=where.occurred_to,
                actor_user_id=where.actor_user_id, cause=where.cause,
                anomalies_only=where.anomalies_only,
            )]
            if found:
                yield found
            if len(found) < limit:
                return
            after = found[-1].key


T = TypeVar("T")


def _pages(
    items: Iterable[T], key: Callable[[T], Any], after: Any, limit: int
) -> Iterable[list[T]]:
    """Folded rows in key order after `after`, `limit` at a time."""
    ordered = sorted((i for i in items if after is None or key(i) > after), key=key)
    for start in range(0, len(ordered), limit):
        yield ordered[start:start + limit]


async def portals(projections: ProjectionStore, projector: Projector | None) -> list[Portal]:
    if projector is not None:
        await projector.catch_up()
    return [rows.portal(r) for r in await projections.rows("portals")]


def as_record(row: Any) -> dict[str, Any]:
    """A projection row as a JSON-ready dict with snake_case fields."""
    record: dict[str, Any] = {}
    for f in dataclasses.fields(row):
        value = getattr(row, f.name)
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, bytes):
            value = value.hex()
        record[f.name] = value
    if isinstance(row, Deletion):
        record["anomalies"] = [
            name for name, flagged in (
                ("never_seen", row.never_seen), ("repeated", row.repeated),
                ("activity_after_deletion", row.activity_after_deletion),
                ("unexpected_payload", bool(row.payload_anomalies)),
            ) if flagged
        ]
    return record
