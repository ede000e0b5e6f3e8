"""`ledger report`: the evidence pack for reviewers, and re-checking one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from ledger import report
from ledger.audit import AuditService
from ledger.cli.app import main
from ledger.cli.common import AS_OF, fail_cleanly, settings_of
from ledger.console.params import parse_as_of, parse_time
from ledger.console.reader import Reader
from ledger.projections.projector import Projector
from ledger.settings import Settings
from ledger.storage import target as targets
from ledger.storage.audit_store import AuditStore
from ledger.storage.console_store import ConsoleStore
from ledger.storage.projection_store import ProjectionStore
from ledger.storage.store import EventStore, create_pool


@main.command("report")
@click.option("--portal", help="Only this portal (domain or member_id).")
@click.option("--from", "since", help="Deletions and rejections from this time (ISO 8601).")
@click.option("--to", "until", help="... until before this time (ISO 8601).")
@AS_OF
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("report.html"), show_default=True)
@click.option("--pdf", type=click.Path(dir_okay=False, path_type=Path),
              help="Also print it to this PDF (needs the `chromium` package).")
@click.option("--check", "check_file", type=click.Path(exists=True, dir_okay=False,
              path_type=Path), help="Re-check a report's manifest instead of writing one.")
@click.pass_context
@fail_cleanly
def report_command(
    ctx: click.Context, portal: str | None, since: str | None, until: str | None,
    as_of: str | None, output: Path, pdf: Path | None, check_file: Path | None,
) -> None:
    """A self-contained HTML evidence report: scope, registry, deletion timeline, rejections,
    integrity (a `ledger verify` run now, the latest signed checkpoint) and a SHA-256 manifest.
    """
    if check_file is not None:
        problems = report.check(check_file.read_text(encoding="utf-8"))
        for problem in problems:
            click.echo(f"{check_file}: {problem}", err=True)
        if problems:
            ctx.exit(1)
        click.echo(f"{check_file}: every hash in its manifest recomputes")
        return
    scope = report.Scope(
        portal=portal.strip().lower() if portal else None,
        received_from=parse_time(since, "--from") if since else None,
        received_to=parse_time(until, "--to") if until else None,
        as_of=parse_as_of(as_of),
    )
    output.write_text(asyncio.run(_build(settings_of(ctx), scope)), encoding="utf-8")
    click.echo(f"report written to {output}")
    if pdf is not None:
        report.to_pdf(output, pdf)
        click.echo(f"PDF written to {pdf}")


async def _build(settings: Settings, scope: report.Scope) -> str:
    """As `with_audit` builds the service (reads as the service role, catches the projections
    up as the projector role), plus the store the verification and the console queries need."""
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
            return await report.build(Reader(audit, ConsoleStore(pool), settings), store, scope)
        finally:
            await writer.close()
            await pool.close()
    finally:
        target.release()
