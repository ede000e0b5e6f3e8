"""Checking the store against its own chains and against signed checkpoints, and the derived
state (projections, portal trust) against a fold of the store; making checkpoints."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger import foldrecord, proving, trust
from ledger.models import TRUST_EVENT
from ledger.projections import fold, rows
from ledger.projections.fold import State, StoredEvent
from ledger.projections.projector import REGISTRY
from ledger.storage.projection_store import (
    COLUMNS,
    KEYS,
    TABLES,
    ProjectionStore,
    SavedSnapshot,
)
from ledger.storage.store import EventStore
from ledger.storage.tree_store import EVENTS_LOG, TreeStore
from ledger.verification import (
    Anchor,
    ChainVerifier,
    Problem,
    ProblemKind,
    TreeVerifier,
    event_row,
    rejection_row,
)

STREAMS = {"events": event_row, "rejections": rejection_row}


@dataclass(frozen=True)
class StreamReport:
    stream: str
    verified: int
    head_position: int
    head_hash: bytes
    problem: Problem | None


async def verify_stream(
    store: EventStore,
    stream: str,
    *,
    anchor: Anchor | None = None,
    on_start: Callable[[int], None] = lambda total: None,
    on_progress: Callable[[int], None] = lambda rows: None,
) -> StreamReport:
    """Recompute one chain from position 1; stop at the first problem."""
    to_row = STREAMS[stream]
    verifier = ChainVerifier(stream, anchor=anchor)
    async with store.chain_snapshot(stream) as snapshot:
        on_start(snapshot.head_position)
        async for rows in snapshot.batches():
            for record in rows:
                if not verifier.feed(to_row(record)):
                    break
            on_progress(len(rows))
            if verifier.problem is not None:
                break
        problem = verifier.finish(snapshot.head_position, snapshot.head_hash)
        return StreamReport(
            stream, verifier.verified, snapshot.head_position, snapshot.head_hash, problem
        )


async def make_checkpoint(store: EventStore, key: Ed25519PrivateKey, origin: str) -> str:
    """A signed statement of the event log's current tree and chain head (the tree is brought
    up to the chain first)."""
    return await proving.make_checkpoint(TreeStore(store.pool), key, origin)


# ---- the projections against a fold of the store ------------------------------------------


@dataclass(frozen=True)
class Difference:
    """The first place the stored derived state differs from a fold of the store."""

    table: str
    key: str
    column: str
    stored: Any
    expected: Any

    def __str__(self) -> str:
        return (f"{self.table} ({self.key}) {self.column}: stored {_shown(self.stored)}, "
                f"expected {_shown(self.expected)}")


@dataclass(frozen=True)
class ProjectionReport:
    position: int  # the store position the projections say they are folded to
    head_hash: bytes  # the chain hash they recorded for it
    rows: int  # rows compared (projections and portal trust)
    difference: Difference | None


def _shown(value: Any) -> str:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, datetime):
        return value.isoformat()
    return repr(value)


async def verify_projections(
    projections: ProjectionStore,
    on_start: Callable[[int], None] = lambda total: None,
    on_progress: Callable[[int], None] = lambda rows: None,
) -> ProjectionReport:
    """Fold the store from position 0 in memory, in one read-only snapshot with the
    projections, and compare every projection row, the recorded chain head and
    `ledger.portal_trust` with the fold; report the first difference.

    The projections are compared as of their own checkpoint (the projector may lag); trust,
    written inside each append, as of the store's head.
    """
    async with projections.snapshot(REGISTRY) as snapshot:
        position, recorded_hash = await snapshot.checkpoint()
        head = await snapshot.head()
        on_start(head)
        state, trust_events = State(), []
        # saved fold states answer `as_of` questions: each must be the fold at its position
        saved = {s.position: s for s in await snapshot.snapshots() if s.position <= position}
        difference: Difference | None = None
        # the latest times folded so far: a snapshot claiming earlier ones would be taken by
        # time questions it cannot answer (it holds events after their moment)
        latest_received: datetime | None = None
        latest_effective: datetime | None = None
        async for batch in snapshot.events(head):
            for row in batch:
                event = rows.event(row)
                # the fold folds what the payload says; a stored fold record must say the same
                expected = foldrecord.fold_record(event.event_type, event.origin, event.payload)
                if difference is None and row["fold_record"] is not None:
                    difference = _compare_record(event.position, row["fold_record"], expected)
                event = event._replace(record=expected)
                if event.position <= position:
                    fold.apply(state, event)
                    latest_received = _later(latest_received, event.received_at)
                    latest_effective = _later(latest_effective, _effective(event))
                    kept = saved.pop(event.position, None)
                    if kept is not None and difference is None:
                        difference = _compare_snapshot(kept, state) or _compare_snapshot_times(
                            kept, latest_received, latest_effective)
                if event.event_type == TRUST_EVENT:
                    trust_events.append(event)
            on_progress(len(batch))
        compared = 1
        expected_hash = await snapshot.event_hash(position)
        if difference is not None:
            pass
        elif saved:
            first = min(saved)
            difference = Difference("projections.snapshots", f"position={first}", "(row)",
                                    "present", "no event at that position")
        elif position > head:
            difference = Difference("projections.checkpoints", f"projection={REGISTRY!r}",
                                    "position", position, f"at most {head}")
        elif recorded_hash != expected_hash:
            difference = Difference("projections.checkpoints", f"projection={REGISTRY!r}",
                                    "head_hash", recorded_hash, expected_hash)
        expected_rows = rows.all_rows(state)
        for table in TABLES:
            if difference is not None:
                break
            stored = await snapshot.rows(table)
            compared += len(stored)
            difference = _compare(f"projections.{table}", KEYS[table], COLUMNS[table],
                                  stored, expected_rows[table])
        if difference is None:
            stored_trust = await snapshot.portal_trust()
            compared += len(stored_trust)
            expected_trust = _fold_trust(trust_events)
            difference = _compare("ledger.portal_trust", ("member_id",), _TRUST_COLUMNS,
                                  [_trust_row(r) for r in stored_trust], expected_trust)
        if difference is None:
            stored_open = await snapshot.open_allowances()
            compared += len(stored_open)
            expected_open = [
                {"position": a.position, "member_id": a.member_id, "domain": a.domain}
                for a in trust.fold_trust(trust_events).allowances.values()
            ]
            difference = _compare("ledger.portal_allowances (open)", ("position",),
                                  ("member_id", "domain"), stored_open, expected_open)
    return ProjectionReport(position, recorded_hash, compared, difference)


def _compare_record(
    position: int, text: str, expected: foldrecord.FoldRecord
) -> Difference | None:
    """A stored fold record against the one its payload gives (records of another version are
    never used, so only they may differ)."""
    stored = foldrecord.decode(text)
    if stored == expected or (stored is None and _other_version(text)):
        return None
    return Difference("ledger.events", f"position={position}", "fold_record", text,
                      foldrecord.encode(expected))


def _other_version(text: str) -> bool:
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return isinstance(document, dict) and isinstance(document.get("v"), int) \
        and document["v"] != foldrecord.VERSION


def _later(latest: datetime | None, moment: datetime | None) -> datetime | None:
    if moment is None:
        return latest
    return moment if latest is None or moment > latest else latest


def _effective(event: StoredEvent) -> datetime:
    """The time a `ts:` question counts an event by: its Bitrix24 time, never later than the
    ledger received it (migration 0014)."""
    occurred = event.occurred_at
    return event.received_at if occurred is None or occurred > event.received_at else occurred


def _compare_snapshot_times(
    kept: SavedSnapshot, latest_received: datetime | None, latest_effective: datetime | None
) -> Difference | None:
    """A snapshot's recorded times against the latest the fold to its position met: recorded
    earlier (a superuser's edit), `as_of` time questions would start from it and count events
    after their moment. Recorded later only makes it used less; NULL, never by time."""
    where = f"position={kept.position}"
    for column, recorded, latest in (
        ("max_received_at", kept.max_received_at, latest_received),
        ("max_effective_at", kept.max_effective_at, latest_effective),
    ):
        if recorded is not None and latest is not None and recorded < latest:
            return Difference("projections.snapshots", where, column, recorded,
                              f"at least {latest.isoformat()}")
    return None


def _compare_snapshot(kept: SavedSnapshot, state: State) -> Difference | None:
    """A saved fold state against the fold at its position (compared as the dumps both make)."""
    position, blob = kept.position, kept.state
    try:
        saved = fold.load_state(zlib.decompress(blob))
    except zlib.error:
        return Difference("projections.snapshots", f"position={position}", "state",
                          "not zlib data", "the fold state at that position")
    if saved.position == 0 and position != 0:
        return None  # another format: ignored by `as_of` too (it folds from the start instead)
    if fold.dump_state(saved) != fold.dump_state(state):
        return Difference("projections.snapshots", f"position={position}", "state",
                          "differs from the fold", "the fold state at that position")
    return None


def _compare(
    table: str, key: Sequence[str], columns: Sequence[str], stored: Sequence[Mapping[str, Any]],
    expected: Sequence[Mapping[str, Any]],
) -> Difference | None:
    def keyed(items: Sequence[Mapping[str, Any]]) -> dict[tuple[Any, ...], Mapping[str, Any]]:
        return {tuple(r[k] for k in key): r for r in items}

    have, want = keyed(stored), keyed(expected)
    for k in sorted(have.keys() | want.keys()):
        name = ", ".join(f"{c}={v!r}" for c, v in zip(key, k, strict=True))
        if k not in have:
            return Difference(table, name, "(row)", "missing", "present")
        if k not in want:
            return Difference(table, name, "(row)", "present", "missing")
        for column in columns:
            if _normal(have[k][column]) != _normal(want[k][column]):
                return Difference(table, name, column, have[k][column], want[k][column])
    return None


def _normal(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_normal(v) for v in value]
    if isinstance(value, memoryview):
        return bytes(value)
    return value


_TRUST_COLUMNS = ("domain", "state", "token_fingerprint", "changed_at", "changed_position")


def _trust_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A `portal_trust` row as the trust events can vouch for it: they record only the
    token's fingerprint (12 hex digits of its SHA-256), never the digest itself."""
    token = row["token_sha256"]
    return {"member_id": row["member_id"], "domain": row["domain"], "state": row["state"],
            "token_fingerprint": bytes(token).hex()[:12] if token is not None else None,
            "changed_at": row["changed_at"], "changed_position": row["changed_position"]}


def _fold_trust(events: Sequence[StoredEvent]) -> list[dict[str, Any]]:
    """Current trust per portal as `trust.fold_trust` (the one trust fold) makes it, stamped
    with the event that last changed it — what the trigger keeps in `ledger.portal_trust`."""
    facts = trust.TrustFacts()
    rows: dict[str, dict[str, Any]] = {}
    for event in events:
        before = facts.portals.get(event.member_id)
        facts = trust.fold_trust([event], facts)
        after = facts.portals.get(event.member_id)
        if after is None or after == before:
            continue
        # trust events written before migration 0005 recorded only the token's fingerprint
        legacy = event.payload.get("token_fingerprint") if isinstance(event.payload, dict) else None
        rows[event.member_id] = {
            "member_id": event.member_id, "domain": after.domain, "state": after.state.value,
            "token_fingerprint": after.fingerprint or legacy,
            "changed_at": event.received_at, "changed_position": event.position,
        }
    return list(rows.values())


@dataclass(frozen=True)
class TreeReport:
    log_id: str
    size: int
    root: bytes
    problem: Problem | None


async def verify_tree(store: EventStore, log_id: str = EVENTS_LOG) -> TreeReport:
    """Recompute every stored node of a log's tree from the chain; stop at the first bad one."""
    verifier = TreeVerifier(log_id)
    async with TreeStore(store.pool).snapshot(log_id) as snapshot:
        async for leaves in snapshot.leaves():
            made = verifier.expected([h for _, h in leaves])
            expected_positions = range(verifier.size - len(leaves) + 1, verifier.size + 1)
            if [p for p, _ in leaves] != list(expected_positions):
                gap = next(e for (p, _), e in zip(leaves, expected_positions, strict=True)
                           if p != e)
                return TreeReport(log_id, snapshot.size, snapshot.root, Problem(
                    verifier.stream, gap, ProblemKind.EVENT_MISSING,
                    "the chain has a gap under the tree (see the events report)"))
            stored = await snapshot.nodes((level, index) for level, index, _ in made)
            if not verifier.check(made, stored):
                break
        problem = verifier.finish(snapshot.size, snapshot.root, await snapshot.node_count())
        return TreeReport(log_id, snapshot.size, snapshot.root, problem)
