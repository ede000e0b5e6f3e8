"""The auditor's questions as the console and the report ask them: paged, with names and words.

Built on `AuditService` (registry, deletions, events, "as of" folds) and `ConsoleStore` (paged
reads the console needs beyond the read API). Live answers come from the projections one page at
a time; answers "as of" an earlier moment are folded in memory by `AuditService` and then paged.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization

from ledger import checkpoints
from ledger.audit import AuditService, DeletionFilter
from ledger.console import present
from ledger.errors import CheckpointError, NotFound
from ledger.projections import readers
from ledger.settings import Settings
from ledger.storage.audit_store import EventFilter
from ledger.storage.console_store import ConsoleStore

NAME_WINDOW = 5000  # how many earlier events of a portal are searched for a user's name
NAME_CACHE = 10_000  # names found (history never changes, so they never go stale)
REJECTION_COUNT_CAP = 100_000


@dataclass(frozen=True)
class PageOf:
    rows: list[dict[str, Any]]
    next_cursor: str | None


@dataclass
class NameCache:
    """(portal, user id, before position) → (name, position) | None, bounded, LRU."""

    entries: OrderedDict[tuple[str, str, int], tuple[str, int] | None] = field(
        default_factory=OrderedDict
    )

    def get(self, key: tuple[str, str, int]) -> tuple[bool, tuple[str, int] | None]:
        if key in self.entries:
            self.entries.move_to_end(key)
            return True, self.entries[key]
        return False, None

    def put(self, key: tuple[str, str, int], value: tuple[str, int] | None) -> None:
        self.entries[key] = value
        if len(self.entries) > NAME_CACHE:
            self.entries.popitem(last=False)


class Reader:
    def __init__(
        self, audit: AuditService, store: ConsoleStore, settings: Settings,
        names: NameCache | None = None,
    ) -> None:
        """Only `AuditService`'s public questions are used (bots, deletions, event_page,
        verification); everything else the console reads through its own `ConsoleStore`."""
        self.audit = audit
        self.settings = settings
        self.store = store
        self.names = names or NameCache()

    # ---- portals -------------------------------------------------------------------------

    async def resolve_portal(self, portal: str | None) -> list[str] | None:
        """member_ids a reader's "portal" (a domain or a member_id) names; None: all portals."""
        if not portal:
            return None
        return await self.store.members_of(portal)

    async def portal_choices(self) -> list[dict[str, Any]]:
        return await self.store.portal_domains(500)

    async def portals(self, cursor: str | None, limit: int) -> PageOf:
        now = datetime.now(UTC)
        rows = await self.store.portals(after=cursor or "", limit=limit)
        for row in rows:
            last = row.get("last_event_at")
            row["silence"] = present.duration(now - last) if last else None
        return PageOf(rows, rows[-1]["member_id"] if len(rows) == limit else None)

    # ---- registry ------------------------------------------------------------------------

    async def bots(
        self, *, members: list[str] | None, status: str | None, as_of: readers.AsOf,
        cursor: tuple[str, int] | None, limit: int,
    ) -> PageOf:
        after = cursor or ("", -1)
        if members == []:
            return PageOf([], None)
        if as_of is None:  # one keyset page per portal named, in (portal, bot) order
            rows: list[dict[str, Any]] = []
            for member in sorted(members) if members is not None else [None]:
                rows += await self.store.bots(member_id=member, status=status, after=after,
                                              limit=limit - len(rows))
                if len(rows) == limit:
                    break
        else:
            everything = await self.audit.bots(status=status, as_of=as_of)
            rows = [b.model_dump() for b in everything
                    if (members is None or b.member_id in members)
                    and (b.member_id, b.bot_id) > after][:limit]
        await self._describe_bots(rows)
        more = len(rows) == limit
        return PageOf(rows, f"{rows[-1]['member_id']}:{rows[-1]['bot_id']}" if more else None)

    async def all_bots(
        self, *, members: list[str] | None, status: str | None, as_of: readers.AsOf
    ) -> list[dict[str, Any]]:
        """Every row (for exports and the report), as of a moment or now."""
        if members == []:
            return []
        rows = [b.model_dump() for b in await self.audit.bots(status=status, as_of=as_of)
                if members is None or b.member_id in members]
        await self._describe_bots(rows)
        return rows

    async def _describe_bots(self, rows: list[dict[str, Any]]) -> None:
        """Each bot's portal domain, and the name of whoever deleted it."""
        domains = await self.store.domains(sorted({r["member_id"] for r in rows}))
        for row in rows:
            row["domain"] = domains.get(row["member_id"])
            found = None
            if row.get("deleted_by") and row.get("deleted_position"):
                found = await self.user_name(row["member_id"], row["deleted_by"],
                                             row["deleted_position"])
            row["deleted_by_name"], row["deleted_by_name_position"] = found or (None, None)

    # ---- deletion timeline ----------------------------------------------------------------

    async def deletions(
        self, *, members: list[str] | None, as_of: readers.AsOf,
        cursor: tuple[int, int] | None, limit: int,
    ) -> PageOf:
        """Newest first, each with the deleting user's name as the portal's payloads gave it."""
        if members == []:
            return PageOf([], None)
        if as_of is None:  # a keyset page per portal named, merged newest first
            found: list[dict[str, Any]] = []
            for member in members if members is not None else [None]:
                found += await self.store.deletions(member_id=member, before=cursor,
                                                    limit=limit)
            found.sort(key=lambda r: (r["position"], r["bot_id"]), reverse=True)
            rows = [_flagged(r) for r in found[:limit]]
        else:
            rows = [r for r in await self._all_deletions(members, as_of)
                    if cursor is None or (r["position"], r["bot_id"]) < cursor][:limit]
        await self._name_actors(rows)
        more = len(rows) == limit
        return PageOf(rows, f"{rows[-1]['position']}:{rows[-1]['bot_id']}" if more else None)

    async def all_deletions(
        self, *, members: list[str] | None, as_of: readers.AsOf,
        occurred_from: datetime | None = None, occurred_to: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """Every deletion, newest first; `occurred_from`/`occurred_to` by
        `readers.deletion_time`, the one rule every surface's window uses."""
        where = DeletionFilter(occurred_from=occurred_from, occurred_to=occurred_to)
        rows = await self._all_deletions(members, as_of, where)
        await self._name_actors(rows)
        return rows

    async def _all_deletions(
        self, members: list[str] | None, as_of: readers.AsOf,
        where: DeletionFilter | None = None,
    ) -> list[dict[str, Any]]:
        if members == []:
            return []
        found = await self.audit.deletions(where or DeletionFilter(), as_of=as_of)
        rows = [_flagged(d.model_dump()) for d in found
                if members is None or d.member_id in members]
        rows.sort(key=lambda r: (r["position"], r["bot_id"]), reverse=True)
        return rows

    async def _name_actors(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            row["anomaly_words"] = present.anomaly_words(row)
            user = row.get("actor_user_id")
            found = await self.user_name(row["member_id"], user, row["position"]) if user else None
            row["actor_name"], row["actor_name_position"] = found or (None, None)

    async def user_name(
        self, member_id: str, user_id: str, before: int
    ) -> tuple[str, int] | None:
        """The name the portal's own payloads last gave `user_id` before position `before`,
        and the position it came from (None when its recent events never named that user)."""
        key = (member_id, user_id, before)
        hit, value = self.names.get(key)
        if hit:
            return value
        row = await self.store.named_user(member_id, user_id, before, NAME_WINDOW)
        name = present.person_name(row["v1"], row["v2"]) if row else None
        value = (name, int(row["position"])) if row and name else None
        self.names.put(key, value)
        return value

    # ---- one bot, events -----------------------------------------------------------------

    async def bot(
        self, member_id: str, bot_id: int, *, newest_first: bool, cursor: int | None, limit: int
    ) -> tuple[dict[str, Any], PageOf]:
        found = await self.store.bots(member_id=member_id, status=None,
                                      after=(member_id, bot_id - 1), limit=1)
        if not found or (found[0]["member_id"], found[0]["bot_id"]) != (member_id, bot_id):
            raise NotFound(f"no bot {bot_id} on portal {member_id}")
        bot = found[0]
        await self._describe_bots([bot])
        events = await self.store.bot_events(
            member_id, bot_id, newest_first=newest_first, cursor=cursor, limit=limit
        )
        for event in events:
            _decode(event)
        more = len(events) == limit
        return bot, PageOf(events, str(events[-1]["position"]) if more else None)

    async def events(self, where: EventFilter, limit: int) -> PageOf:
        page = await self.audit.event_page(where, limit=limit)
        rows: list[dict[str, Any]] = page["items"]
        domains = await self.store.domains(sorted({r["member_id"] for r in rows}))
        for row in rows:
            row["domain"] = domains.get(row["member_id"])
        after = page["next_after"]
        return PageOf(rows, str(after) if after is not None else None)

    async def event(self, position: int) -> dict[str, Any]:
        row = await self.store.event(position)
        if row is None:
            raise NotFound(f"no event at position {position}")
        _decode(row)
        row["domain"] = (await self.store.domains([row["member_id"]])).get(row["member_id"])
        return row

    # ---- rejections, the chain -----------------------------------------------------------

    async def rejections(self, cursor: int | None, limit: int) -> PageOf:
        rows = await self.store.rejections(before=cursor, limit=limit)
        return PageOf(rows, str(rows[-1]["position"]) if len(rows) == limit else None)

    async def rejections_last_day(self) -> int:
        since = datetime.now(UTC) - timedelta(days=1)
        return await self.store.rejections_since(since, REJECTION_COUNT_CAP)

    async def chain(self) -> dict[str, Any]:
        """Heads, the last `ledger verify` of each chain, projector lag, latest checkpoint."""
        verifications = [v.model_dump() for v in await self.audit.verification()]
        events = next(v for v in verifications if v["stream"] == "events")
        projected = await self.store.projection_checkpoint()
        return {
            "verifications": verifications,
            "head_position": events["head_position"],
            "head_hash": events["head_hash"],
            "projected": projected,
            "lag": max(0, events["head_position"] - projected),
            "checkpoint": await self.latest_checkpoint(),
        }

    async def latest_checkpoint(self) -> dict[str, Any] | None:
        """The newest signed checkpoint `ledger serve` wrote, checked against the public key
        (when it is beside the signing key) and against the chain at its position."""
        directory = self.settings.checkpoint_dir
        if directory is None or not directory.is_dir():
            return None
        files = sorted(directory.glob("checkpoint-*.txt"))
        if not files:
            return None
        path = files[-1]
        text = path.read_text(errors="replace")
        info: dict[str, Any] = {"file": path.name, "text": text, "signature": "not checked",
                                "key_fingerprint": None}
        public_path = self.settings.signing_key_path.parent / checkpoints.PUBLIC_NAME
        lines = text.split("\n")
        try:
            info["position"] = int(lines[1])
        except (IndexError, ValueError):
            info["signature"] = "unreadable checkpoint"
            return info
        if public_path.is_file():
            info["public_key"] = str(public_path)
            info["key_fingerprint"] = public_key_fingerprint(public_path)
            try:
                origin, key = checkpoints.load_public_key(public_path)
                checkpoint = checkpoints.verify(text, key, origin)
            except CheckpointError as exc:
                info["signature"] = f"INVALID: {exc}"
                return info
            info["signature"] = "valid"
            info["time"] = checkpoint.time
            info["head_hash"] = checkpoint.head_hash.hex()
            event = await self.store.event(checkpoint.position)
            info["matches_chain"] = (
                event is not None and event["hash"] == checkpoint.head_hash.hex()
            ) if checkpoint.position > 0 else True
        return info


def public_key_fingerprint(path: Path) -> str:
    """SHA-256 (hex) of the raw 32-byte Ed25519 public key in a ledger public key file."""
    _, key = checkpoints.load_public_key(path)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _flagged(row: dict[str, Any]) -> dict[str, Any]:
    """A deletion row with both shapes of its anomalies: flags (the projection's columns) and
    the read API's list of names."""
    names = row.get("anomalies")
    if names is None:
        row["anomalies"] = [n for n in ("never_seen", "repeated", "activity_after_deletion")
                            if row.get(n)] + (["unexpected_payload"]
                                              if row.get("payload_anomalies") else [])
    else:
        for name in ("never_seen", "repeated", "activity_after_deletion"):
            row.setdefault(name, name in names)
    return row


def _decode(event: dict[str, Any]) -> None:
    payload = orjson.loads(event.pop("payload"))
    metadata = orjson.loads(event.pop("metadata"))
    event["payload"] = present.with_fingerprints(payload, metadata)
    event["bot_ids"] = list(event["bot_ids"])
