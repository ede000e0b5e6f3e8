"""What the `ledger` subcommands share: settings, store and service access (each command
builds what it needs once, here), one-line errors, `--as-of` and other options, progress bars
and output."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import click
import orjson
from pydantic import BaseModel

from ledger import asof, display, operations
from ledger.audit import AuditService, event_type_asked
from ledger.errors import LedgerError
from ledger.exports import utc_seconds
from ledger.projections import readers
from ledger.projections.projector import Projector
from ledger.readmodels import EventOut
from ledger.settings import Settings
from ledger.storage import target as targets
from ledger.storage.audit_store import AuditStore, EventFilter
from ledger.storage.projection_store import ProjectionStore
from ledger.storage.store import EventStore, Pool, create_pool
from ledger.trust import TrustChange

_JSON_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
P = ParamSpec("P")
T = TypeVar("T")


def fail_cleanly(func: Callable[P, T]) -> Callable[P, T]:
    """Ledger errors become one line and exit status 1, not a traceback.

    The `ledger` group (`ledger.cli.app`) renders every other failure the same way.
    """

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return func(*args, **kwargs)
        except LedgerError as exc:
            raise click.ClickException(one_line(str(exc))) from exc

    return wrapper


def one_line(text: str) -> str:
    """An error as one line; the stored text it may quote (a portal's member_id) cannot act on
    the terminal."""
    return display.terminal(" ".join(text.split()))


def settings_of(ctx: click.Context) -> Settings:
    settings = ctx.find_object(Settings)
    assert settings is not None
    return settings


def with_store(
    ctx: click.Context, work: Callable[[EventStore], Awaitable[T]], *, projector: bool = False
) -> T:
    """Run `work` on the service's store. `projector=True`: on the projector's (the only role
    that writes projections) instead."""
    settings = settings_of(ctx)

    async def run() -> T:
        target = await targets.open_target(settings)
        try:
            pool = await create_pool(
                target.projector_dsn if projector else target.service_dsn, size=2
            )
            try:
                await targets.require_current_schema(pool)
                return await work(EventStore(pool, policy=settings.trust_policy))
            finally:
                await pool.close()
        finally:
            target.release()

    return asyncio.run(run())


def change_trust(ctx: click.Context, change: TrustChange, **target: str | None) -> int:
    return with_store(ctx, lambda store: operations.change_trust(store, change, **target))


def with_projections(
    ctx: click.Context,
    work: Callable[[ProjectionStore, Projector], Awaitable[T]],
) -> T:
    """Run `work` with the projector (writing as the projector role); the same pool serves
    its reads."""
    snapshot_every = settings_of(ctx).projector_snapshot_every

    def run(store: EventStore) -> Awaitable[T]:
        projections = ProjectionStore(store.pool)
        return work(projections, Projector(store, projections, snapshot_every=snapshot_every))

    return with_store(ctx, run, projector=True)


def with_portal_projections(
    ctx: click.Context, portal: str | None,
    work: Callable[[ProjectionStore, Projector, str | None], Awaitable[T]],
) -> T:
    """`with_projections`, with `--portal` (a member_id or a domain) resolved to a member_id."""
    snapshot_every = settings_of(ctx).projector_snapshot_every

    async def run(store: EventStore) -> T:
        projections = ProjectionStore(store.pool)
        projector = Projector(store, projections, snapshot_every=snapshot_every)
        member_id = portal
        if portal is not None and "." in portal:  # the projector role reads projected portals
            known = [(p.member_id, p.domain) for p in await readers.portals(projections, projector)]
            member_id = operations.portal_by_domain(portal, known)
        return await work(projections, projector, member_id)

    return with_store(ctx, run, projector=True)


def parse_as_of(value: str | None) -> readers.AsOf:
    return asof.parse_as_of(value, "--as-of")


AS_OF = click.option(
    "--as-of", help="The answer as of then, folded from the store: position:N, received:TIME "
    "(when the ledger received it) or ts:TIME (Bitrix24's time; also Unix seconds), TIME in "
    "ISO 8601 (e.g. 2026-03-01T00:00:00Z). A plain N is a position, a plain TIME received.",
)
PORTAL = click.option("--portal", "member_id",
                      help="Only this portal: its member_id or its domain.")
JSON_OUTPUT = click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")


async def print_pages(
    pages: AsyncIterable[Sequence[BaseModel]], columns: list[str], as_json: bool
) -> int:
    """Rows under the audit views' names (the models' aliases), times in UTC with a `Z`, a
    page at a time as the pages arrive (a registry of any size, never all in memory); a
    table's column widths are its first page's. Returns the rows printed."""
    widths: dict[str, int] | None = None
    count = 0
    async for page in pages:
        records = [r.model_dump(mode="json", by_alias=True) for r in page]
        count += len(records)
        if as_json:
            for record in records:
                echo_json(orjson.dumps(record).decode())
            continue
        if widths is None:
            widths = {c: max([len(c)] + [len(_cell(r[c])) for r in records]) for c in columns}
            click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns))
        for record in records:
            click.echo("  ".join(_cell(record[c]).ljust(widths[c]) for c in columns))
    if widths is None and not as_json:
        click.echo("  ".join(c.upper() for c in columns))
    return count


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    if isinstance(value, str) and _JSON_TIME.fullmatch(value):
        return value[:19] + "Z"  # to the second, as the console shows it
    return display.terminal(str(value))


def echo_json(text: str) -> None:
    """One JSON line of stored values: the same value, with nothing in it a terminal acts on
    (orjson leaves C1 controls and bidirectional overrides raw; `display.json_line`)."""
    click.echo(display.json_line(text))


def shown(value: str | None) -> str:
    """Stored text in a table line: control characters visible as escapes, never acted on."""
    return "-" if not value else display.terminal(value)


@dataclass(frozen=True)
class Opened:
    """What a read-only command works with: the auditor's service and what it is built on."""

    audit: AuditService
    store: EventStore
    pool: Pool


@asynccontextmanager
async def opened_audit(settings: Settings) -> AsyncIterator[Opened]:
    """The auditor's service: reads as the service role, and catches the projections up as the
    projector role (that pool connects only when a command first does)."""
    target = await targets.open_target(settings)
    try:
        pool = await create_pool(target.service_dsn, size=2)
        writer = await create_pool(target.projector_dsn, size=1, connect=False)
        try:
            await targets.require_current_schema(pool)
            store = EventStore(pool, policy=settings.trust_policy)
            projector = Projector(
                EventStore(writer, policy=settings.trust_policy), ProjectionStore(writer),
                snapshot_every=settings.projector_snapshot_every,
            )
            audit = AuditService(store, ProjectionStore(pool), AuditStore(pool), projector)
            yield Opened(audit, store, pool)
        finally:
            await writer.close()
            await pool.close()
    finally:
        target.release()


def with_audit(ctx: click.Context, work: Callable[[AuditService], Awaitable[T]]) -> T:
    """Run `work` with the auditor's service (`opened_audit`)."""
    settings = settings_of(ctx)

    async def run() -> T:
        async with opened_audit(settings) as opened:
            return await work(opened.audit)

    return asyncio.run(run())


def event_filter(
    member_id: str | None, event_type: str | None, bot: int | None, since: str | None,
    until: str | None, after: int = 0,
) -> EventFilter:
    return EventFilter(
        member_id=member_id, event_type=event_type_asked(event_type) if event_type else None,
        bot_id=bot,
        received_from=parse_moment(since), received_to=parse_moment(until), after=after,
    )


def parse_moment(value: str | None) -> datetime | None:
    return asof.parse_time(value) if value else None


EVENT_TYPE = click.option("--type", "event_type", help="Event type, e.g. ONIMBOTDELETE.")
BOT = click.option("--bot", type=int, help="Events naming this bot id.")
FROM = click.option("--from", "since", help="At or after (ISO 8601): when received; for "
                    "deletions, the sender's ts capped at when received.")
TO = click.option("--to", "until", help="Before (ISO 8601), as --from.")


def print_events(items: list[EventOut], as_json: bool) -> None:
    if as_json:
        for item in items:
            echo_json(item.model_dump_json(exclude_none=True, by_alias=True))
        return
    click.echo(f"{'POSITION':>9}  {'RECEIVED_AT':20}  {'EVENT_TYPE':24} {'BOT_IDS':12} "
               f"{'ACTOR_USER_ID':13} EVENT_HASH")
    for e in items:
        bots = ",".join(map(str, e.bot_ids)) or "-"
        click.echo(f"{e.position:>9}  {utc_seconds(e.received_at):20}  "
                   f"{e.event_type:24} {bots:12} {shown(e.actor_user_id):13} {e.hash[:16]}")


class Progress:
    """click's progress bar, started once the total is known."""

    def __init__(self, label: str, quiet: bool) -> None:
        self._label, self._quiet = label, quiet
        self._bar: Any = None

    def start(self, total: int) -> None:
        if not self._quiet:
            self._bar = click.progressbar(length=total, label=self._label, file=sys.stderr)
            self._bar.__enter__()

    def advance(self, rows: int) -> None:
        if self._bar is not None:
            self._bar.update(rows)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
