"""The forensic questions: bots, deletions, history, events, exports, projections,
reader roles."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
from pathlib import Path
from typing import IO

import click

from ledger import exports
from ledger.audit import MAX_PAGE, AuditService, DeletionFilter, deletion_out
from ledger.cli.app import configure_logging, main
from ledger.cli.common import (
    AS_OF,
    BOT,
    EVENT_TYPE,
    FROM,
    JSON_OUTPUT,
    PORTAL,
    TO,
    Progress,
    echo_json,
    event_filter,
    fail_cleanly,
    parse_as_of,
    parse_moment,
    print_events,
    print_pages,
    settings_of,
    shown,
    with_audit,
    with_portal_projections,
    with_projections,
)
from ledger.cli.follow import follow
from ledger.projections import readers
from ledger.projections.projector import PROJECTIONS, REGISTRY, Projector
from ledger.readmodels import BotOut, EventOut, Page, RejectionOut
from ledger.storage import target as targets
from ledger.storage.audit_store import RejectionFilter
from ledger.storage.projection_store import ProjectionStore


@main.command()
@PORTAL
@click.option("--status", type=click.Choice(["active", "deleted"]))
@AS_OF
@JSON_OUTPUT
@click.pass_context
@fail_cleanly
def bots(
    ctx: click.Context, member_id: str | None, status: str | None, as_of: str | None,
    as_json: bool,
) -> None:
    """The bot registry: which bots exist on which portal, active or deleted, since when."""
    moment = parse_as_of(as_of)

    async def pages(p: ProjectionStore, j: Projector, portal: str | None) -> int:
        return await print_pages(
            ([BotOut.model_validate(b) for b in page] async for page in readers.bot_pages(
                p, j, member_id=portal, status=status, as_of=moment)),
            ["bot_id", "bot_code", "status", "first_seen_at", "last_activity_at",
             "message_count", "deleted_at", "deleted_by_user_id", "api_version",
             "portal_member_id"], as_json)

    with_portal_projections(ctx, member_id, pages)


@main.command()
@PORTAL
@AS_OF
@JSON_OUTPUT
@click.pass_context
@fail_cleanly
def deletions(ctx: click.Context, member_id: str | None, as_of: str | None, as_json: bool) -> None:
    """The deletion timeline: who deleted which bot when, and what it had done before."""
    moment = parse_as_of(as_of)

    async def pages(p: ProjectionStore, j: Projector, portal: str | None) -> int:
        return await print_pages(
            ([deletion_out(d) for d in page] async for page in readers.deletion_pages(
                p, j, DeletionFilter(member_id=portal), as_of=moment)),
            ["bot_id", "bot_code", "cause", "deleted_at", "deleted_by_user_id",
             "message_count", "anomalies", "position", "portal_member_id"], as_json)

    with_portal_projections(ctx, member_id, pages)


@main.command()
@click.option("--once", "mode", flag_value="once",
              help="Drain every pending event into the projections and exit.")
@click.option("--follow", "mode", flag_value="follow",
              help="Keep them current until SIGTERM (`ledger serve` runs this as a child).")
@click.option("--parent-pid", type=int, default=None, hidden=True,
              help="Stop when this process is no longer the parent (set by `ledger serve`).")
@click.option("--tree", is_flag=True,
              help="With --follow: keep the Merkle tree up to date too (`ledger serve` passes "
              "it, so that its serving processes do not).")
@click.pass_context
@fail_cleanly
def project(ctx: click.Context, mode: str | None, parent_pid: int | None, tree: bool) -> None:
    """Bring the projections up to date, once or continuously."""
    if mode is None:
        raise click.UsageError("say --once or --follow")
    if mode == "follow":
        settings = settings_of(ctx)
        # the service's log level, not a one-shot command's
        configure_logging(settings, debug=bool(ctx.meta.get("ledger.debug")), command="serve")
        asyncio.run(follow(settings, parent_pid=parent_pid, tree=tree))
        return

    async def work(projections: ProjectionStore, projector: Projector) -> int:
        return await projector.catch_up()

    applied = with_projections(ctx, work)
    click.echo(f"applied {applied} events")


@main.command()
@click.option("--projection", type=click.Choice(PROJECTIONS), default=REGISTRY,
              show_default=True, help="Which projection to rebuild.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
@fail_cleanly
def rebuild(ctx: click.Context, projection: str, quiet: bool) -> None:
    """Replay the store from position 0 and swap the result in atomically."""

    async def work(projections: ProjectionStore, projector: Projector) -> int:
        with Progress(f"rebuilding {projection}", quiet) as bar:
            return await projector.rebuild(on_start=bar.start, on_progress=bar.advance)

    position = with_projections(ctx, work)
    click.echo(f"{projection} rebuilt up to position {position}")


@main.group()
def roles() -> None:
    """Database roles for people and tools."""


@roles.command("create-reader")
@click.argument("name")
@click.pass_context
@fail_cleanly
def roles_create_reader(ctx: click.Context, name: str) -> None:
    """A login role that can read the `audit` views and nothing else (prints its DSN)."""
    settings = settings_of(ctx)
    password = secrets.token_urlsafe(24)

    async def run() -> str:
        target = await targets.open_target(settings, admin_only=True)
        try:
            return await targets.create_reader(target, name, password)
        finally:
            target.release()

    click.echo(asyncio.run(run()))


@main.command()
@click.option("--portal", "member_id", required=True,
              help="The portal: its member_id or its domain.")
@click.option("--bot", type=int, required=True, help="The bot id.")
@JSON_OUTPUT
@click.pass_context
@fail_cleanly
def history(ctx: click.Context, member_id: str, bot: int, as_json: bool) -> None:
    """One bot's whole life: every event that named it, with position, actor and hash."""

    async def work(audit: AuditService) -> list[EventOut]:
        portal = await audit.resolve_portal(member_id)
        assert portal is not None
        result = await audit.bot_history(portal, bot, limit=MAX_PAGE)
        items = list(result.events)
        after = result.next_after
        while after is not None:
            page = await audit.bot_history(portal, bot, after=after, limit=MAX_PAGE)
            items += page.events
            after = page.next_after
        return items

    print_events(with_audit(ctx, work), as_json)


@main.command()
@PORTAL
@click.option("--reason", help="Only this reason code, e.g. invalid_application_token.")
@FROM
@TO
@click.option("--after", default=0, show_default=True, help="Start after this position.")
@click.option("--limit", default=100, show_default=True, help=f"At most this many (<= {MAX_PAGE}).")
@JSON_OUTPUT
@click.pass_context
@fail_cleanly
def rejections(
    ctx: click.Context, member_id: str | None, reason: str | None, since: str | None,
    until: str | None, after: int, limit: int, as_json: bool,
) -> None:
    """Refused deliveries: when, why, which portal, sizes and hashes (never the excerpt)."""

    async def work(audit: AuditService) -> Page[RejectionOut]:
        where = RejectionFilter(
            member_id=await audit.resolve_portal(member_id), reason=reason,
            received_from=parse_moment(since), received_to=parse_moment(until), after=after,
        )
        return await audit.rejections(where, limit=limit)

    page = with_audit(ctx, work)
    if as_json:
        for item in page.items:
            echo_json(item.model_dump_json(by_alias=True))
    else:
        click.echo(f"{'POSITION':>9}  {'RECEIVED_AT':20}  {'STATUS':6} {'REASON':28} "
                   f"{'PORTAL_MEMBER_ID':34} {'BODY_SIZE':>9} BODY_SHA256")
        for r in page.items:
            click.echo(f"{r.position:>9}  {exports.utc_seconds(r.received_at):20}  "
                       f"{r.status:<6} {r.reason:28} {shown(r.member_id):34} {r.body_size:>9} "
                       f"{r.body_sha256[:16]}")
    if page.next_after is not None:
        click.echo(f"(more: --after {page.next_after})", err=True)


@main.command()
@PORTAL
@EVENT_TYPE
@BOT
@FROM
@TO
@click.option("--after", default=0, show_default=True, help="Start after this position.")
@click.option("--limit", default=100, show_default=True, help=f"At most this many (<= {MAX_PAGE}).")
@JSON_OUTPUT
@click.pass_context
@fail_cleanly
def events(
    ctx: click.Context, member_id: str | None, event_type: str | None, bot: int | None,
    since: str | None, until: str | None, after: int, limit: int, as_json: bool,
) -> None:
    """Stored events in ledger order, filtered."""

    async def work(audit: AuditService) -> Page[EventOut]:
        portal = await audit.resolve_portal(member_id)
        where = event_filter(portal, event_type, bot, since, until, after)
        return await audit.events(where, limit=limit)

    page = with_audit(ctx, work)
    print_events(page.items, as_json)
    if page.next_after is not None:
        click.echo(f"(more: --after {page.next_after})", err=True)


_EXPORT_FILTERS = {
    "events": ("--portal", "--type", "--bot", "--from", "--to"),
    "bots": ("--portal",),
    "deletions": ("--portal", "--from", "--to"),
}


@main.command()
@click.argument("kind", type=click.Choice(["events", "bots", "deletions"]))
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="jsonl",
              show_default=True)
@PORTAL
@EVENT_TYPE
@BOT
@FROM
@TO
@click.option("--output", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="Write here (and a FILE.manifest.json beside it); default or `-`: standard "
              "output (the manifest then goes to standard error).")
@click.pass_context
@fail_cleanly
def export(
    ctx: click.Context, kind: str, fmt: str, member_id: str | None, event_type: str | None,
    bot: int | None, since: str | None, until: str | None, output: Path | None,
) -> None:
    """Stream events, bots or deletions as CSV or JSON Lines, with a manifest.

    The manifest records the position range, the chain head at export time, the filters and
    the time, so an export can be tied back to `ledger verify`. A filter the chosen kind
    cannot apply is refused, never ignored.
    """
    given = {"--portal": member_id, "--type": event_type, "--bot": bot, "--from": since,
             "--to": until}
    allowed = _EXPORT_FILTERS[kind]
    stray = [name for name, value in given.items() if value is not None and name not in allowed]
    if stray:
        raise click.UsageError(
            f"{', '.join(stray)} does not apply to `export {kind}` "
            f"(its filters: {', '.join(allowed)})"
        )
    if output is not None and str(output) == "-":
        output = None

    async def work(audit: AuditService) -> exports.Manifest:
        portal = await audit.resolve_portal(member_id)
        with contextlib.ExitStack() as stack:
            out: IO[str] = (stack.enter_context(output.open("w", newline=""))
                            if output else sys.stdout)
            if kind == "events":
                where = event_filter(portal, event_type, bot, since, until)
                bar = stack.enter_context(Progress("exporting", output is None))
                return await exports.export_events(
                    audit, where, out, fmt, on_start=bar.start, on_progress=bar.advance
                )
            read_at = exports.ReadAt()  # the manifest records the snapshot's checkpoint
            if kind == "bots":
                return await exports.export_rows(
                    "bots", audit.bot_pages(member_id=portal, at=read_at), out, fmt,
                    {"member_id": portal}, audit, read_at=read_at)
            where_d = DeletionFilter(member_id=portal, occurred_from=parse_moment(since),
                                     occurred_to=parse_moment(until))
            return await exports.export_rows(
                "deletions", audit.deletion_pages(where_d, at=read_at), out, fmt,
                dict(where_d.__dict__), audit, read_at=read_at)

    manifest = with_audit(ctx, work)
    if output is None:
        click.echo(manifest.as_json().decode(), err=True)
    else:
        manifest_path = output.with_name(output.name + ".manifest.json")
        manifest_path.write_bytes(manifest.as_json())
        click.echo(f"{manifest.rows} {kind} written to {output}; manifest {manifest_path}",
                   err=True)
