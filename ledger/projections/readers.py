"""Answers from the projections — live, or as of a moment — shaped for people and machines."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from ledger.projections.fold import Bot, Deletion, Portal, State
from ledger.projections.projector import Projector
from ledger.storage.projection_store import ProjectionStore

AsOf = int | datetime | None  # a position, a moment, or now


async def snapshot(
    projections: ProjectionStore,
    projector: Projector,
    as_of: AsOf,
    *,
    catch_up: bool = True,
) -> State | None:
    """The folded state as of a position or moment (None: read the live projection instead)."""
    if as_of is None:
        if catch_up:
            await projector.catch_up()
        return None
    position = as_of if isinstance(as_of, int) else await projections.position_at(as_of)
    return await projector.fold_to(position)


async def bots(
    projections: ProjectionStore,
    projector: Projector,
    *,
    member_id: str | None = None,
    status: str | None = None,
    as_of: AsOf = None,
    catch_up: bool = True,
) -> list[Bot]:
    state = await snapshot(projections, projector, as_of, catch_up=catch_up)
    if state is None:
        return await projections.bots(member_id=member_id, status=status)
    return sorted(
        (b for b in state.bots.values()
         if (member_id is None or b.member_id == member_id)
         and (status is None or b.status == status)),
        key=lambda b: b.key,
    )


async def deletions(
    projections: ProjectionStore,
    projector: Projector,
    *,
    member_id: str | None = None,
    as_of: AsOf = None,
    catch_up: bool = True,
) -> list[Deletion]:
    state = await snapshot(projections, projector, as_of, catch_up=catch_up)
    if state is None:
        return await projections.deletions(member_id=member_id)
    return sorted(
        (d for d in state.deletions.values() if member_id is None or d.member_id == member_id),
        key=lambda d: d.key,
    )


async def portals(
    projections: ProjectionStore, projector: Projector, *, catch_up: bool = True
) -> list[Portal]:
    if catch_up:
        await projector.catch_up()
    return await projections.portals()


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
            ) if flagged
        ]
    return record
