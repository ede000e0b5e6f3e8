"""Gateway mode's routes: `ledger routes add|list|remove|attempts`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click
import orjson

from ledger import exports
from ledger.cli.app import main
from ledger.cli.common import fail_cleanly, settings_of, with_store
from ledger.gateway import admin
from ledger.storage.gateway_store import GatewayStore


@main.group()
def routes() -> None:
    """Where stored deliveries are forwarded (gateway mode: the ledger in front of a bot)."""


@routes.command("add")
@click.option("--member-id", help="Forward this portal's deliveries (its auth.member_id).")
@click.option("--all", "all_portals", is_flag=True, help="Forward every portal's deliveries.")
@click.option("--event", "event_pattern", default="*", show_default=True,
              help="Event types to forward, a shell pattern: ONIMBOT*, ONAPPINSTALL, …")
@click.option("--url", required=True, help="The bot's own handler, https://…")
@click.option("--allow-http", is_flag=True,
              help="Allow a plain http:// destination (a trusted network only).")
@click.pass_context
@fail_cleanly
def routes_add(
    ctx: click.Context, member_id: str | None, all_portals: bool, event_pattern: str, url: str,
    allow_http: bool,
) -> None:
    """Forward matching deliveries, once stored, to URL (recorded as an event)."""
    if (member_id is None) == (not all_portals):
        raise click.UsageError("give exactly one of --member-id or --all")
    settings = settings_of(ctx)
    route_id, position = with_store(ctx, lambda store: admin.add_route(
        store, settings, member_id=member_id, url=url, event_pattern=event_pattern,
        allow_http=allow_http,
    ))
    click.echo(f"added route {route_id} (recorded at position {position}); a running "
               f"`ledger serve` picks it up within {settings.routes_reload_seconds:g}s")


@routes.command("remove")
@click.argument("route_id")
@click.pass_context
@fail_cleanly
def routes_remove(ctx: click.Context, route_id: str) -> None:
    """Stop forwarding to a route; what is pending for it is given up (recorded)."""
    position = with_store(ctx, lambda store: admin.remove_route(store, route_id))
    click.echo(f"removed route {route_id} (recorded at position {position})")


@routes.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
@fail_cleanly
def routes_list(ctx: click.Context, as_json: bool) -> None:
    """The routes now (live health: GET /api/v1/routes or /readyz of the serving ledger)."""
    current = with_store(ctx, admin.current_routes)
    if as_json:
        for r in current.values():
            click.echo(orjson.dumps({
                "route_id": r.route_id, "member_id": r.member_id, "event": r.event_pattern,
                "url": r.url, "allow_http": r.allow_http, "added_at": exports.utc(r.added_at),
                "added_by": r.added_by, "position": r.position,
            }).decode())
        return
    click.echo(f"{'ROUTE':14} {'PORTAL':34} {'EVENT':16} {'ADDED':25} URL")
    for r in current.values():
        click.echo(f"{r.route_id:14} {r.member_id:34} {r.event_pattern:16} "
                   f"{exports.utc_seconds(r.added_at):25} {r.url}")


@routes.command("attempts")
@click.option("--route", "route_id", help="Only this route.")
@click.option("--position", type=int, help="Only forwards of the event at this position.")
@click.option("--outcome", type=click.Choice(["delivered", "failed", "given_up"]))
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
@fail_cleanly
def routes_attempts(
    ctx: click.Context, route_id: str | None, position: int | None, outcome: str | None,
    limit: int, as_json: bool,
) -> None:
    """Forward attempts and forwards given up, newest first (as audit.forwards shows them)."""
    rows = with_store(ctx, lambda store: GatewayStore(store.pool).attempts(
        route_id=route_id, position=position, outcome=outcome, limit=limit))
    if as_json:
        for row in rows:
            click.echo(orjson.dumps({k: _plain(v) for k, v in row.items()}).decode())
        return
    click.echo(f"{'ATTEMPTED':25} {'ROUTE':14} {'POSITION':>9} {'#':>3} {'OUTCOME':9} "
               f"{'STATUS':6} {'MS':>8} ERROR")
    for row in rows:
        latency = f"{row['latency_ms']:.1f}" if row["latency_ms"] is not None else "-"
        click.echo(
            f"{exports.utc_seconds(row['attempted_at']):25} {row['route_id']:14} "
            f"{row['position'] if row['position'] is not None else '-':>9} {row['attempt']:>3} "
            f"{row['outcome']:9} {row['status'] or '-':6} {latency:>8} {row['error'] or ''}"
        )


def _plain(value: Any) -> Any:
    return exports.utc(value) if isinstance(value, datetime) else value
