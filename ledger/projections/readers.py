"""Answers from the projections — live, or as of a moment — shaped for people and machines."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from ledger import asof
from ledger.projections import projector as projector_module
from ledger.projections import rows
from ledger.projections.fold import Bot, Deletion, Portal, State
from ledger.projections.projector import Projector
from ledger.storage.projection_store import ProjectionStore

# a position, a received time or a Bitrix24 time (ledger.asof), or now (None); a bare int is a
# position and a bare datetime a received time
AsOf = asof.AsOf | int | datetime | None


REGISTRY = projector_module.REGISTRY


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
    return await projector_module.fold_to(projections, as_of)


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
