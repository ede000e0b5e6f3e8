"""The one fold from events to the bot registry, portals and the deletion timeline.

Pure code, used three ways — the live projector (state loaded for a batch's keys), a rebuild from
position 0, and point-in-time answers (folding up to a position) — so the three cannot disagree.
Every value comes from the events; nothing reads a clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import orjson

from ledger import codec
from ledger.envelope import INSTALL, UNINSTALL, UPDATE
from ledger.errors import CodecError
from ledger.foldrecord import FoldRecord, fold_record
from ledger.models import ORIGIN_BITRIX24, TRUST_EVENT
from ledger.projections.values import Anomaly as Anomaly  # re-exported: where readers find them
from ledger.projections.values import Bot as Bot
from ledger.projections.values import Deletion as Deletion
from ledger.projections.values import Lifecycle as Lifecycle
from ledger.projections.values import Portal as Portal

BOT_DELETED = "bot deleted"
APP_UNINSTALLED = "application uninstalled"

_MESSAGE_ADDS = {"ONIMBOTMESSAGEADD", "ONIMBOTV2MESSAGEADD"}
_COMMANDS = {"ONIMCOMMANDADD", "ONIMBOTV2COMMANDADD"}
_JOINS = {"ONIMBOTJOINCHAT", "ONIMBOTV2JOINCHAT"}
_DELETES = {"ONIMBOTDELETE", "ONIMBOTV2DELETE"}
_LIFECYCLE = {INSTALL, UPDATE, UNINSTALL}


class StoredEvent(NamedTuple):
    """An event as the fold sees it: the store row with its fold record (what the fold reads
    of the payload, computed at intake) — or, for events stored without a usable one, the
    payload parsed (any JSON value: the fold never trusts its shape), read here instead.

    A named tuple: a rebuild makes one per stored event, and it is the cheapest immutable
    record Python builds."""

    position: int
    member_id: str
    event_type: str
    origin: str
    bot_ids: tuple[int, ...]
    occurred_at: datetime | None
    received_at: datetime
    payload: Any
    hash: bytes
    record: FoldRecord | None = None

    def facts(self) -> FoldRecord:
        """The fold record: the stored one, else read from the payload (`ledger.foldrecord`)."""
        if self.record is not None:
            return self.record
        return fold_record(self.event_type, self.origin, self.payload)

    @property
    def at(self) -> datetime:
        """When it happened as far as we know: Bitrix24's `ts`, else when we received it."""
        return self.occurred_at or self.received_at


@dataclass
class State:
    """Projection state; what the live projector loads is exactly what a batch may touch."""

    bots: dict[tuple[str, int], Bot] = field(default_factory=dict)
    deletions: dict[tuple[int, int], Deletion] = field(default_factory=dict)
    portals: dict[str, Portal] = field(default_factory=dict)
    lifecycle: list[Lifecycle] = field(default_factory=list)
    anomalies: dict[int, Anomaly] = field(default_factory=dict)
    dirty_bots: set[tuple[str, int]] = field(default_factory=set)
    dirty_deletions: set[tuple[int, int]] = field(default_factory=set)
    dirty_portals: set[str] = field(default_factory=set)
    position: int = 0

    def bots_of(self, member_id: str) -> list[Bot]:
        return [b for b in self.bots.values() if b.member_id == member_id]


def needs(event: StoredEvent) -> tuple[set[tuple[str, int]], set[str]]:
    """The bot keys and the portals (all of whose bots) the fold reads for this event."""
    return needs_of(event.member_id, event.event_type, event.bot_ids)


def needs_of(
    member_id: str, event_type: str, bot_ids: Sequence[int]
) -> tuple[set[tuple[str, int]], set[str]]:
    """`needs` of an event's columns (the live projector asks before it makes the events)."""
    portals_whole = {member_id} if event_type == UNINSTALL else set()
    return {(member_id, b) for b in bot_ids}, portals_whole


def apply(state: State, event: StoredEvent) -> None:
    """Fold one event into the state, in position order.

    Total: whatever a payload holds, this returns. What it cannot use (a bot id that is not
    ASCII digits in int64 range, a list where an object belongs, a number where text belongs)
    is left out of the registry and noted as an anomaly of the event instead.
    """
    position = event.position
    assert position > state.position, "events must be folded in position order"
    state.position = position
    facts = event.record  # `event.facts()`, inlined: this runs once per event of a rebuild
    if facts is None:
        facts = fold_record(event.event_type, event.origin, event.payload)
    if facts.notes:
        state.anomalies[position] = Anomaly(
            position, event.member_id, event.event_type, list(event.bot_ids),
            list(facts.notes),
        )
    if not event.member_id:
        return  # operator events not tied to a portal (an allowance by domain)
    portal = _portal(state, event, facts)
    event_type = event.event_type
    if event_type == TRUST_EVENT and event.origin != ORIGIN_BITRIX24:
        _trust(portal, event, facts)
    elif event_type in _LIFECYCLE:
        _lifecycle(state, portal, event, facts)
    for bot_id in event.bot_ids:
        _bot_event(state, portal, event, facts, bot_id)


def _portal(state: State, event: StoredEvent, facts: FoldRecord) -> Portal:
    portal = state.portals.get(event.member_id)
    if portal is None:
        portal = state.portals[event.member_id] = Portal(event.member_id, facts.domain)
        portal.first_event_position = event.position
    if facts.domain and portal.domain != facts.domain:
        portal.domain = facts.domain
    if event.origin == "bitrix24":
        portal.event_count += 1
        portal.last_event_at = event.received_at
        portal.last_event_position = event.position
    state.dirty_portals.add(portal.member_id)
    return portal


def _trust(portal: Portal, event: StoredEvent, facts: FoldRecord) -> None:
    state = {"allowed": "allowed", "established": "trusted", "provisioned": "trusted",
             "ended": "ended"}.get(facts.change or "")
    if state is None or (state == "allowed" and portal.trust_state in ("trusted", "ended")):
        return
    portal.trust_state, portal.trust_position = state, event.position


def _lifecycle(state: State, portal: Portal, event: StoredEvent, facts: FoldRecord) -> None:
    state.lifecycle.append(Lifecycle(
        event.position, event.member_id, event.event_type, event.occurred_at,
        event.received_at, facts.version, facts.actor,
    ))
    if facts.version is not None:
        portal.app_version = facts.version
    if event.event_type == INSTALL:
        portal.installed_at, portal.installed_position = event.at, event.position
        portal.uninstalled_at = portal.uninstalled_position = None
        portal.install_count += 1
    elif event.event_type == UNINSTALL:
        portal.uninstalled_at, portal.uninstalled_position = event.at, event.position
        for bot in sorted(state.bots_of(event.member_id), key=lambda b: b.bot_id):
            if bot.status == "active":
                _delete(state, portal, bot, event, facts, APP_UNINSTALLED, never_seen=False)


def _bot_event(
    state: State, portal: Portal, event: StoredEvent, facts: FoldRecord, bot_id: int
) -> None:
    key = (event.member_id, bot_id)
    bot = state.bots.get(key)
    never_seen = bot is None
    event_type = event.event_type
    v2 = event_type.startswith("ONIMBOTV2")
    at = event.occurred_at or event.received_at  # `event.at`
    if bot is None:
        bot = state.bots[key] = Bot(
            member_id=event.member_id, bot_id=bot_id, bot_code=None,
            api_version="v2" if v2 else "v1",
            status="active", first_seen_position=event.position, first_seen_at=at,
        )
    state.dirty_bots.add(key)
    code = facts.codes.get(bot_id)
    if code and bot.bot_code != code:
        bot.bot_code, bot.code_position = code, event.position
    if v2:
        bot.api_version = "v2"
    if event_type in _DELETES:
        _delete(state, portal, bot, event, facts, BOT_DELETED, never_seen=never_seen)
        return
    if bot.status == "deleted":
        _flag_activity_after_deletion(state, bot, event)
    bot.last_activity_position, bot.last_activity_at = event.position, at
    if event_type in _MESSAGE_ADDS:
        bot.message_count += 1
    elif event_type in _COMMANDS:
        bot.command_count += 1
    elif event_type in _JOINS:
        bot.chat_join_count += 1


def _delete(
    state: State, portal: Portal, bot: Bot, event: StoredEvent, facts: FoldRecord, cause: str, *,
    never_seen: bool,
) -> None:
    deletion = Deletion(
        position=event.position, bot_id=bot.bot_id, member_id=bot.member_id,
        domain=portal.domain, bot_code=bot.bot_code, occurred_at=event.occurred_at,
        received_at=event.received_at, actor_user_id=facts.actor, cause=cause,
        event_type=event.event_type, event_hash=event.hash,
        first_seen_at=None if never_seen else bot.first_seen_at,
        last_activity_at=bot.last_activity_at, message_count=bot.message_count,
        never_seen=never_seen, repeated=bot.status == "deleted",
        payload_anomalies=list(facts.notes),
    )
    state.deletions[deletion.key] = deletion
    state.dirty_deletions.add(deletion.key)
    bot.last_deletion_position = event.position
    if bot.status != "deleted":
        bot.status = "deleted"
        bot.deleted_position, bot.deleted_at = event.position, event.at
        bot.deleted_by, bot.deletion_cause = facts.actor, cause
    state.dirty_bots.add(bot.key)


def _flag_activity_after_deletion(state: State, bot: Bot, event: StoredEvent) -> None:
    if bot.last_deletion_position is None:
        return
    deletion = state.deletions.get((bot.last_deletion_position, bot.bot_id))
    if deletion is not None and not deletion.activity_after_deletion:
        deletion.activity_after_deletion = True
        deletion.activity_after_position = event.position
        state.dirty_deletions.add(deletion.key)


# ---- snapshots: the state as bytes, exactly round-tripped ----------------------------------

SNAPSHOT_FORMAT = 2  # 1 (unversioned, hand-written conversions) is ignored: snapshots are derived


def dump_state(state: State) -> bytes:
    """The fold state as versioned JSON (`ledger.codec`), rows in key order so that equal
    states dump equal (dirty-tracking is not state: it is left out)."""
    return orjson.dumps({
        "version": SNAPSHOT_FORMAT,
        "position": state.position,
        "bots": [codec.to_json(state.bots[k]) for k in sorted(state.bots)],
        "deletions": [codec.to_json(state.deletions[k]) for k in sorted(state.deletions)],
        "portals": [codec.to_json(state.portals[k]) for k in sorted(state.portals)],
        "lifecycle": [codec.to_json(item)
                      for item in sorted(state.lifecycle, key=lambda x: x.position)],
        "anomalies": [codec.to_json(state.anomalies[k]) for k in sorted(state.anomalies)],
    })


def load_state(blob: bytes) -> State:
    """The state `dump_state` wrote — or, for a snapshot of another format (or one that does
    not decode), the empty state at position 0, so that the caller folds from the start."""
    try:
        data = orjson.loads(blob)
        if not isinstance(data, dict) or data.get("version") != SNAPSHOT_FORMAT:
            return State()
        state = State(position=codec.from_json(int, data["position"]))
        for row in data["bots"]:
            bot = codec.from_json(Bot, row)
            state.bots[bot.key] = bot
        for row in data["deletions"]:
            deletion = codec.from_json(Deletion, row)
            state.deletions[deletion.key] = deletion
        for row in data["portals"]:
            portal = codec.from_json(Portal, row)
            state.portals[portal.member_id] = portal
        state.lifecycle = [codec.from_json(Lifecycle, row) for row in data["lifecycle"]]
        for row in data["anomalies"]:
            anomaly = codec.from_json(Anomaly, row)
            state.anomalies[anomaly.position] = anomaly
    except (orjson.JSONDecodeError, CodecError, KeyError, TypeError):
        return State()
    return state
