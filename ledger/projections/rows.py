"""The fold's values as projection rows and back, field by field.

Written out by hand on purpose: a renamed fold field must not silently rename (or drop) a column
of a table a migration defined. `tests/test_projection_rows.py` holds these to the columns of
the database and to a round trip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from ledger.foldrecord import FoldRecord, decode
from ledger.projections import fold
from ledger.projections.fold import Anomaly, Bot, Deletion, Lifecycle, Portal, State, StoredEvent

Row = Mapping[str, Any]


def event(row: Row, record: FoldRecord | None = None) -> StoredEvent:
    """A store row as the fold reads it: the payload parsed (whatever JSON it holds), and the
    fold reads it — unless `record` is given, which it reads instead."""
    return StoredEvent(
        position=row["position"],
        member_id=row["member_id"],
        event_type=row["event_type"],
        origin=row["origin"],
        bot_ids=tuple(row["bot_ids"]),
        occurred_at=row["occurred_at"],
        received_at=row["received_at"],
        payload=orjson.loads(row["payload"]),
        hash=bytes(row["hash"]),
        record=record,
    )


def stored_event(row: Sequence[Any], payload: str | None = None) -> StoredEvent | None:
    """A store row as the fold reads it (`projection_store.EventRow`: the columns by index), by
    its fold record (`ledger.foldrecord`) — or by its payload where it has no usable record
    (stored before migration 0011, of another version, or not a record): the row's own
    (index 9, read with rows that have no record) or `payload`; None when it has neither (the
    caller fetches it and asks again).
    """
    text = row[8]
    record = decode(text) if text is not None else None
    parsed = None
    if record is None:
        stored = row[9] if payload is None else payload
        if stored is None:
            return None
        parsed = orjson.loads(stored)
    # tuple.__new__ skips the named tuple's generated __new__ (a Python frame per event)
    return tuple.__new__(StoredEvent, (
        row[0], row[1], row[2], row[3], tuple(row[4]), row[5], row[6], parsed, row[7], record,
    ))


def fold_rows(state: State, batch: Sequence[Sequence[Any]]) -> int:
    """Fold store rows into `state` in order, each as soon as it is made (a rebuild must not
    hold a batch of made events: thousands of objects that live a moment are what wakes the
    garbage collector), until one whose payload is needed; returns how many were folded."""
    apply, make = fold.apply, stored_event
    folded = 0
    for row in batch:
        event = make(row)
        if event is None:
            return folded
        apply(state, event)
        folded += 1
    return folded


def fold_with_payloads(
    state: State, batch: Sequence[Sequence[Any]], payloads: Mapping[int, str]
) -> None:
    """Fold store rows into `state` in order, with the payloads (by position) of those that
    need theirs."""
    apply = fold.apply
    for row in batch:
        event = stored_event(row, payloads.get(row[0]))
        assert event is not None, "a row with its payload is always made"
        apply(state, event)


def needs(batch: Sequence[Sequence[Any]]) -> tuple[set[tuple[str, int]], set[str], set[str]]:
    """What folding these rows reads of the projections (`fold.needs`): bot keys, portals all
    of whose bots, and the portals."""
    bot_keys: set[tuple[str, int]] = set()
    whole: set[str] = set()
    portals: set[str] = set()
    for row in batch:
        keys, everything = fold.needs_of(row[1], row[2], row[4])
        bot_keys |= keys
        whole |= everything
        portals.add(row[1])
    return bot_keys, whole, portals


def bot_row(b: Bot) -> dict[str, Any]:
    return {
        "member_id": b.member_id, "bot_id": b.bot_id, "bot_code": b.bot_code,
        "api_version": b.api_version, "status": b.status,
        "first_seen_position": b.first_seen_position, "first_seen_at": b.first_seen_at,
        "last_activity_position": b.last_activity_position,
        "last_activity_at": b.last_activity_at, "message_count": b.message_count,
        "command_count": b.command_count, "chat_join_count": b.chat_join_count,
        "deleted_position": b.deleted_position, "deleted_at": b.deleted_at,
        "deleted_by": b.deleted_by, "deletion_cause": b.deletion_cause,
        "code_position": b.code_position, "last_deletion_position": b.last_deletion_position,
    }


def bot(r: Row) -> Bot:
    return Bot(
        member_id=r["member_id"], bot_id=r["bot_id"], bot_code=r["bot_code"],
        api_version=r["api_version"], status=r["status"],
        first_seen_position=r["first_seen_position"], first_seen_at=r["first_seen_at"],
        last_activity_position=r["last_activity_position"],
        last_activity_at=r["last_activity_at"], message_count=r["message_count"],
        command_count=r["command_count"], chat_join_count=r["chat_join_count"],
        deleted_position=r["deleted_position"], deleted_at=r["deleted_at"],
        deleted_by=r["deleted_by"], deletion_cause=r["deletion_cause"],
        code_position=r["code_position"], last_deletion_position=r["last_deletion_position"],
    )


def deletion_row(d: Deletion) -> dict[str, Any]:
    return {
        "position": d.position, "bot_id": d.bot_id, "member_id": d.member_id,
        "domain": d.domain, "bot_code": d.bot_code, "occurred_at": d.occurred_at,
        "received_at": d.received_at, "actor_user_id": d.actor_user_id, "cause": d.cause,
        "event_type": d.event_type, "event_hash": d.event_hash,
        "first_seen_at": d.first_seen_at, "last_activity_at": d.last_activity_at,
        "message_count": d.message_count, "never_seen": d.never_seen, "repeated": d.repeated,
        "activity_after_deletion": d.activity_after_deletion,
        "activity_after_position": d.activity_after_position,
        "payload_anomalies": list(d.payload_anomalies),
    }


def deletion(r: Row) -> Deletion:
    return Deletion(
        position=r["position"], bot_id=r["bot_id"], member_id=r["member_id"],
        domain=r["domain"], bot_code=r["bot_code"], occurred_at=r["occurred_at"],
        received_at=r["received_at"], actor_user_id=r["actor_user_id"], cause=r["cause"],
        event_type=r["event_type"], event_hash=bytes(r["event_hash"]),
        first_seen_at=r["first_seen_at"], last_activity_at=r["last_activity_at"],
        message_count=r["message_count"], never_seen=r["never_seen"], repeated=r["repeated"],
        activity_after_deletion=r["activity_after_deletion"],
        activity_after_position=r["activity_after_position"],
        payload_anomalies=list(r["payload_anomalies"]),
    )


def portal_row(p: Portal) -> dict[str, Any]:
    return {
        "member_id": p.member_id, "domain": p.domain, "trust_state": p.trust_state,
        "trust_position": p.trust_position, "installed_at": p.installed_at,
        "installed_position": p.installed_position, "uninstalled_at": p.uninstalled_at,
        "uninstalled_position": p.uninstalled_position, "install_count": p.install_count,
        "app_version": p.app_version, "event_count": p.event_count,
        "first_event_position": p.first_event_position, "last_event_at": p.last_event_at,
        "last_event_position": p.last_event_position,
    }


def portal(r: Row) -> Portal:
    return Portal(
        member_id=r["member_id"], domain=r["domain"], trust_state=r["trust_state"],
        trust_position=r["trust_position"], installed_at=r["installed_at"],
        installed_position=r["installed_position"], uninstalled_at=r["uninstalled_at"],
        uninstalled_position=r["uninstalled_position"], install_count=r["install_count"],
        app_version=r["app_version"], event_count=r["event_count"],
        first_event_position=r["first_event_position"], last_event_at=r["last_event_at"],
        last_event_position=r["last_event_position"],
    )


def lifecycle_row(item: Lifecycle) -> dict[str, Any]:
    return {
        "position": item.position, "member_id": item.member_id, "event_type": item.event_type,
        "occurred_at": item.occurred_at, "received_at": item.received_at,
        "version": item.version, "actor_user_id": item.actor_user_id,
    }


def lifecycle(r: Row) -> Lifecycle:
    return Lifecycle(
        position=r["position"], member_id=r["member_id"], event_type=r["event_type"],
        occurred_at=r["occurred_at"], received_at=r["received_at"], version=r["version"],
        actor_user_id=r["actor_user_id"],
    )


def anomaly_row(a: Anomaly) -> dict[str, Any]:
    return {"position": a.position, "member_id": a.member_id, "event_type": a.event_type,
            "bot_ids": list(a.bot_ids), "notes": list(a.notes)}


def anomaly(r: Row) -> Anomaly:
    return Anomaly(position=r["position"], member_id=r["member_id"],
                   event_type=r["event_type"], bot_ids=list(r["bot_ids"]),
                   notes=list(r["notes"]))


def changed_rows(state: State) -> dict[str, list[dict[str, Any]]]:
    """What a live batch changed, as rows per table (lifecycle and anomalies are new rows)."""
    return {
        "bots": [bot_row(state.bots[k]) for k in sorted(state.dirty_bots)],
        "deletions": [deletion_row(state.deletions[k]) for k in sorted(state.dirty_deletions)],
        "portals": [portal_row(state.portals[k]) for k in sorted(state.dirty_portals)],
        "portal_lifecycle": [lifecycle_row(item) for item in state.lifecycle],
        "anomalies": [anomaly_row(state.anomalies[k]) for k in sorted(state.anomalies)],
    }


def all_rows(state: State) -> dict[str, list[dict[str, Any]]]:
    """The whole state as rows per table, in key order."""
    return {
        "bots": [bot_row(state.bots[k]) for k in sorted(state.bots)],
        "deletions": [deletion_row(state.deletions[k]) for k in sorted(state.deletions)],
        "portals": [portal_row(state.portals[k]) for k in sorted(state.portals)],
        "portal_lifecycle": [lifecycle_row(item)
                             for item in sorted(state.lifecycle, key=lambda x: x.position)],
        "anomalies": [anomaly_row(state.anomalies[k]) for k in sorted(state.anomalies)],
    }


def state_of(rows: Mapping[str, Sequence[Row]], position: int) -> State:
    """Fold state from projection rows (any subset of tables)."""
    state = State(position=position)
    for r in rows.get("bots", ()):
        item = bot(r)
        state.bots[item.key] = item
    for r in rows.get("deletions", ()):
        gone = deletion(r)
        state.deletions[gone.key] = gone
    for r in rows.get("portals", ()):
        state.portals[r["member_id"]] = portal(r)
    state.lifecycle = [lifecycle(r) for r in rows.get("portal_lifecycle", ())]
    for r in rows.get("anomalies", ()):
        item_a = anomaly(r)
        state.anomalies[item_a.position] = item_a
    return state
