"""Traffic simulation and read-API tokens."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from ledger import operations
from ledger.audit import new_token
from ledger.cli.app import main
from ledger.cli.common import (
    fail_cleanly,
    with_audit,
    with_store,
)
from ledger.storage.store import EventStore
from ledger.trust import TrustChange


@main.command()
@click.option("--url", help="Send to this intake URL, e.g. http://127.0.0.1:8080/bitrix24/events.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path),
              help="Instead of sending, write the deliveries as files into this directory.")
@click.option("--count", default=1000, show_default=True, help="How many deliveries at most.")
@click.option("--duration", type=float, help="Stop sending after this many seconds.")
@click.option("--concurrency", default=16, show_default=True, help="Requests in flight.")
@click.option("--rate", type=float, help="Deliveries per second (default: as fast as answered).")
@click.option("--portals", default=5, show_default=True, help="How many simulated portals.")
@click.option("--seed", default=1, show_default=True, help="Same seed, same traffic.")
@click.option("--provision", is_flag=True,
              help="Allow the simulated portals in this ledger's own database first.")
@click.pass_context
@fail_cleanly
def simulate(
    ctx: click.Context, url: str | None, output: Path | None, count: int,
    duration: float | None, concurrency: int, rate: float | None, portals: int, seed: int,
    provision: bool,
) -> None:
    """Realistic Bitrix24 deliveries (form bodies as PHP encodes them), sent or written.

    Portals install, bots join chats, get messages, edits, commands, are deleted; apps are
    updated, uninstalled and reinstalled. Only the URL given is contacted.
    """
    from ledger import loadgen
    from ledger.simulation import Traffic

    if (url is None) == (output is None):
        raise click.UsageError("give exactly one of --url or --output")
    traffic = Traffic(seed=seed, portals=portals)
    if output is not None:
        written = loadgen.write_corpus(output, traffic, count)
        click.echo(f"wrote {written} deliveries to {output}")
        return
    if provision:

        async def allow_all(store: EventStore) -> None:
            # an allowance admits one install: one per (re)install the traffic will bring
            same = Traffic(seed=seed, portals=portals)
            for _ in range(count):
                delivery = same.next()
                if delivery.document["event"] == "ONAPPINSTALL":
                    await operations.change_trust(
                        store, TrustChange.ALLOWED, member_id=delivery.portal.member_id
                    )

        with_store(ctx, allow_all)
    else:
        click.echo("the simulated portals must be allowed first (or pass --provision):", err=True)
        for portal in traffic.portals:
            click.echo(f"  ledger portals allow --member-id {portal.member_id}", err=True)
    assert url is not None
    report = asyncio.run(loadgen.send(
        url, traffic, count=count, concurrency=concurrency, rate=rate, duration=duration,
    ))
    click.echo(report.summary())
    if report.failed:
        raise click.ClickException(
            f"{report.failed} of {report.sent} deliveries were refused or unanswered: see the "
            "statuses above and `ledger rejections` (portals must be allowed before their "
            "install; a second run with the same --seed re-installs portals already trusted)"
        )


@main.group()
def tokens() -> None:
    """Bearer tokens of the read API (/api/v1/)."""


@tokens.command("create")
@click.argument("name")
@click.pass_context
@fail_cleanly
def tokens_create(ctx: click.Context, name: str) -> None:
    """Make a token; it is printed once and stored only as a hash."""
    token, digest = new_token()
    with_audit(ctx, lambda a: a.create_token(name, digest, operations.local_actor()))
    click.echo(token)


@tokens.command("revoke")
@click.argument("name")
@click.pass_context
@fail_cleanly
def tokens_revoke(ctx: click.Context, name: str) -> None:
    """Stop a token from working (within seconds on running servers)."""
    with_audit(ctx, lambda a: a.revoke_token(name, operations.local_actor()))
    click.echo(f"revoked {name}")


@tokens.command("list")
@click.pass_context
@fail_cleanly
def tokens_list(ctx: click.Context) -> None:
    """Names, creation and revocation of every token (never the tokens)."""
    for row in with_audit(ctx, lambda a: a.tokens()):
        state = f"revoked {row['revoked_at']:%Y-%m-%d %H:%M}" if row["revoked_at"] else "live"
        click.echo(f"{row['name']:24} {state:26} created {row['created_at']:%Y-%m-%d %H:%M} "
                   f"by {row['created_by']}")
