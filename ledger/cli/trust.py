"""Which Bitrix24 portals may write to the ledger: `ledger portals …`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import orjson

from ledger import exports, portal_ids
from ledger.cli.app import main
from ledger.cli.common import (
    change_trust,
    echo_json,
    fail_cleanly,
    shown,
    with_store,
)
from ledger.trust import TrustChange


@main.group()
def portals() -> None:
    """Which Bitrix24 portals may write to the ledger."""


@portals.command("allow")
@click.option("--member-id", help="The portal's member_id (auth.member_id).")
@click.option("--domain", help="The portal's domain, e.g. some-domain.bitrix24.com.")
@click.pass_context
@fail_cleanly
def portals_allow(ctx: click.Context, member_id: str | None, domain: str | None) -> None:
    """Allow one portal's next ONAPPINSTALL to establish its token (once).

    With --domain the install is trusted only after that portal's REST API confirms it; with
    --member-id no call-back is made. Allow again before a reinstall.
    """
    if (member_id is None) == (domain is None):
        raise click.UsageError("give exactly one of --member-id or --domain")
    # the shape is checked before anything is recorded: an allowance stays in the chain forever
    member_id = portal_ids.member_id(member_id) if member_id is not None else None
    domain = portal_ids.domain(domain) if domain is not None else None
    position = change_trust(ctx, TrustChange.ALLOWED, member_id=member_id, domain=domain)
    click.echo(f"allowed {member_id or domain} (recorded at position {position})")


@portals.command("trust")
@click.option("--member-id", required=True, help="The portal's member_id.")
@click.option("--domain", help="The portal's domain, for the record.")
@click.option(
    "--token-file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File holding the application_token (kept out of shell history and `ps`).",
)
@click.pass_context
@fail_cleanly
def portals_trust(
    ctx: click.Context, member_id: str, domain: str | None, token_file: Path
) -> None:
    """Provision the token of an app installed before the ledger existed (or replace it)."""
    member_id = portal_ids.member_id(member_id)
    domain = portal_ids.domain(domain) if domain is not None else None
    token = token_file.read_text().strip()
    if not token:
        raise click.ClickException(f"{token_file} is empty")
    position = change_trust(
        ctx, TrustChange.PROVISIONED, member_id=member_id, domain=domain, token=token
    )
    click.echo(f"trusted {member_id} (recorded at position {position})")


@portals.command("revoke")
@click.option("--member-id", required=True, help="The portal's member_id.")
@click.pass_context
@fail_cleanly
def portals_revoke(ctx: click.Context, member_id: str) -> None:
    """End trust in a portal's token: its deliveries are refused from now on."""
    position = change_trust(ctx, TrustChange.ENDED, member_id=member_id)
    click.echo(f"revoked {member_id} (recorded at position {position})")


@portals.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
@fail_cleanly
def portals_list(ctx: click.Context, as_json: bool) -> None:
    """Show each portal's trust state."""
    rows = with_store(ctx, lambda store: store.portals())
    if as_json:
        for row in rows:
            record: dict[str, Any] = {
                "member_id": row.member_id or None, "domain": row.domain, "state": row.state,
                "allowed": row.allowed, "token_fingerprint": row.token_fingerprint,
                "changed_at": exports.utc(row.changed_at),
                "changed_position": row.changed_position,
            }
            echo_json(orjson.dumps(record).decode())
        return
    header = f"{'MEMBER_ID':34} {'DOMAIN':32} {'STATE':8} {'TOKEN':12} {'SINCE':25} POSITION"
    click.echo(header)
    for row in rows:
        click.echo(
            f"{shown(row.member_id):34} {shown(row.domain):32} {row.state:8} "
            f"{row.token_fingerprint or '-':12} {exports.utc_seconds(row.changed_at):25} "
            f"{row.changed_position}"
        )
