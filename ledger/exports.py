"""Streaming exports (CSV, JSON Lines) with a manifest that ties them to the chain.

Events are read through a server-side cursor inside one read-only snapshot, so memory stays flat
however many there are, and the manifest's head is exactly the head that snapshot saw. A registry
or deletion listing read page by page in one snapshot (`ledger export bots|deletions`) records the
registry projection's checkpoint that snapshot saw — what its rows are a fold of — not the chain's
head read afterwards, which the projector may have moved past meanwhile; `head_is` says which.
"""

from __future__ import annotations

import csv
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

import orjson
from pydantic import BaseModel

from ledger.audit import AuditService
from ledger.display import json_line, spreadsheet_cell
from ledger.storage.audit_store import EventFilter

# audit.events' column names, in human order: what, when, who, then positions and hashes
EVENT_FIELDS = ["event_type", "bot_ids", "occurred_at", "received_at", "actor_user_id",
                "portal_member_id", "origin", "position", "event_hash", "payload"]
_EVENT_NAMES = {"member_id": "portal_member_id", "hash": "event_hash"}


@dataclass
class Manifest:
    kind: str
    format: str
    filters: dict[str, Any]
    rows: int
    first_position: int | None
    last_position: int | None
    head_position: int
    head_hash: str
    exported_at: str
    # what head_position/head_hash are: "chain_head" (the events' head: the snapshot's for
    # events, else read when the rows were written) or "projection_checkpoint" (the position
    # the registry projection was folded to in the snapshot the listing was read in)
    head_is: str = "chain_head"

    def as_json(self) -> bytes:
        return orjson.dumps(self.__dict__, option=orjson.OPT_INDENT_2)


class _Writer:
    def __init__(self, out: IO[str], fmt: str, fields: list[str]) -> None:
        self._out, self._fmt, self._fields = out, fmt, fields
        self._csv = csv.DictWriter(out, fieldnames=fields) if fmt == "csv" else None
        if self._csv is not None:
            self._csv.writeheader()

    def write(self, record: dict[str, Any]) -> None:
        if self._csv is None:
            # the same JSON value; C1 controls and bidirectional overrides as escapes, for
            # whoever pages through it in a terminal (`ledger export … --output -`)
            self._out.write(json_line(orjson.dumps(record, default=str,
                                                   option=orjson.OPT_UTC_Z).decode()) + "\n")
            return
        self._csv.writerow({k: _cell(record.get(k)) for k in self._fields})


def _cell(value: Any) -> Any:
    """A CSV cell a person can read: a list as its items joined by spaces (empty when there
    are none, never `[]`), a mapping as JSON, a time as ISO 8601 UTC with a `Z`; text that a
    spreadsheet would run as a formula starts with `'` (`ledger.display.spreadsheet_cell`)."""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, dict):
        return orjson.dumps(value).decode()
    if isinstance(value, datetime):
        return utc(value)
    return spreadsheet_cell(value)


def utc(moment: datetime) -> str:
    """ISO 8601 in UTC with a `Z`, as the read API and the console write times."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def utc_seconds(moment: datetime) -> str:
    """The same to the second, for tables people read (the CLI's, the console's)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def export_events(
    service: AuditService, where: EventFilter, out: IO[str], fmt: str,
    on_start: Callable[[int], None] = lambda total: None,
    on_progress: Callable[[int], None] = lambda n: None,
) -> Manifest:
    writer = _Writer(out, fmt, EVENT_FIELDS)
    rows, first, last = 0, None, None
    async with service.export_snapshot() as snapshot:
        on_start(snapshot.head_position)
        up_to = snapshot.head_position if where.up_to is None else min(
            where.up_to, snapshot.head_position)  # a caller may pin an earlier head
        bounded = EventFilter(**{**where.__dict__, "up_to": up_to})
        async for batch in snapshot.events(bounded):
            for row in batch:
                record: dict[str, Any] = {_EVENT_NAMES.get(str(k), str(k)): v
                                          for k, v in dict(row).items()}
                record["bot_ids"] = list(record["bot_ids"])
                record["payload"] = orjson.loads(record["payload"])
                for key in ("received_at", "occurred_at"):
                    if record[key] is not None:
                        record[key] = utc(record[key])
                writer.write(record)
                first = record["position"] if first is None else first
                last = record["position"]
            rows += len(batch)
            on_progress(len(batch))
        head = (snapshot.head_position, snapshot.head_hash)
    return _manifest("events", fmt, where.__dict__, rows, first, last, head)


class ReadAt:
    """Where a paged listing was read (`readers.bot_pages`' `at`): the projection checkpoint of
    its snapshot, for the manifest."""

    def __init__(self) -> None:
        self.checkpoint: tuple[int, bytes] | None = None

    def __call__(self, position: int, head_hash: bytes) -> None:
        self.checkpoint = (position, head_hash)


async def export_rows(
    kind: str, rows: Iterable[BaseModel] | AsyncIterable[Sequence[BaseModel]], out: IO[str],
    fmt: str, filters: dict[str, Any], service: AuditService, *, read_at: ReadAt | None = None,
) -> Manifest:
    """Rows, or pages of rows as they come (`AuditService.bot_pages`: a registry of any size in
    constant memory). `read_at`: the pages' snapshot told it its projection checkpoint — the
    manifest records that; else the chain's head, read after the rows."""
    writer: _Writer | None = None
    count, first, last = 0, None, None
    async for page in _pages(rows):
        for item in page:
            if writer is None:
                writer = _Writer(out, fmt, [f.alias or name
                                            for name, f in type(item).model_fields.items()])
            writer.write(item.model_dump(mode="json", by_alias=True))
            position = getattr(item, "position", None)
            if position is not None:
                first = position if first is None else min(first, position)
                last = position if last is None else max(last, position)
        count += len(page)
    if writer is None:
        _Writer(out, fmt, ["portal_member_id"])
    if read_at is not None and read_at.checkpoint is not None:
        position, head_hash = read_at.checkpoint
        head_is = "projection_checkpoint"
    else:
        position, head_hash = await service.head()
        head_is = "chain_head"
    manifest = _manifest(kind, fmt, filters, count, first, last, (position, head_hash.hex()))
    manifest.head_is = head_is
    return manifest


async def _pages(
    rows: Iterable[BaseModel] | AsyncIterable[Sequence[BaseModel]],
) -> AsyncIterator[Sequence[BaseModel]]:
    if isinstance(rows, AsyncIterable):
        async for page in rows:
            yield page
    else:
        yield list(rows)


def _manifest(
    kind: str, fmt: str, filters: dict[str, Any], rows: int, first: int | None,
    last: int | None, head: tuple[int, str],
) -> Manifest:
    return Manifest(
        kind=kind, format=fmt,
        filters={k: (utc(v) if isinstance(v, datetime) else v)
                 for k, v in filters.items() if _filters(k, v)},
        rows=rows, first_position=first, last_position=last,
        head_position=head[0], head_hash=head[1],
        exported_at=utc(datetime.now(UTC)),
    )



def _filters(name: str, value: Any) -> bool:
    """Whether a filter narrowed the rows, so the manifest must name it: not when unset (None,
    False) nor the start cursor `after=0` — but `bot_id=0` or `up_to=0` did (`0 in (0, False)`
    would drop them, and the manifest would claim rows it does not hold)."""
    return value is not None and value is not False and not (name == "after" and value == 0)
