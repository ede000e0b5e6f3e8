"""`ledger report`: the evidence pack for reviewers, and re-checking one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from ledger import report
from ledger.cli.app import main
from ledger.cli.common import AS_OF, fail_cleanly, opened_audit, settings_of
from ledger.console.params import parse_as_of, parse_time
from ledger.console.reader import Reader
from ledger.settings import Settings
from ledger.storage.console_store import ConsoleStore


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
    """With the auditor's service (`opened_audit`), plus the store the verification and the
    console queries need."""
    async with opened_audit(settings) as opened:
        reader = Reader(opened.audit, ConsoleStore(opened.pool), settings)
        return await report.build(reader, opened.store, scope)
